-- The relay's checkpoint: the highest global position the relay knows to be in its
-- JetStream stream.
--
-- Why: the relay resumes from what the stream itself holds (the Colloquy-Position
-- header of the stream's last message), so this table is not what prevents duplicates.
-- It is the fallback for when the stream holds no position to resume from: the stream
-- was purged, recreated, or its last messages were deleted. Without it a relay would
-- start again from position 0 and republish the whole log into a purged stream.
-- See commands/src/relay.rs.

CREATE SCHEMA IF NOT EXISTS colloquy;

CREATE TABLE IF NOT EXISTS colloquy.relay_checkpoint (
  stream text PRIMARY KEY,
  position bigint NOT NULL CHECK (position >= 0),
  updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE colloquy.relay_checkpoint IS
  'The relay''s progress per JetStream stream: where it continues when the stream holds no Colloquy-Position (purged, recreated or emptied). Written by the leading relay after acknowledged publishes; delete a row to make the relay republish the whole log into an empty stream.';
COMMENT ON COLUMN colloquy.relay_checkpoint.stream IS
  'The JetStream stream name (COLLOQUY_STREAM): one row per stream, so a relay pointed at a new stream does not inherit another stream''s progress.';
COMMENT ON COLUMN colloquy.relay_checkpoint.position IS
  'The highest global position acknowledged by (or already held in) the stream; only ever raised (GREATEST), so a stale relay cannot move it back.';
COMMENT ON COLUMN colloquy.relay_checkpoint.updated_at IS
  'When the row last changed, for operators judging whether the relay is alive.';
