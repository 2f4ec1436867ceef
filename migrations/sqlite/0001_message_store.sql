-- The event log of the embedded mode: Message DB's `message_store.messages` table as
-- `message_store_messages` (SQLite has no schemas), with the same columns.
--
-- Why it is commit-ordered without a lock of its own: SQLite has one writer at a time,
-- and the event store writes inside `BEGIN IMMEDIATE`, so a batch holds the write lock
-- from the moment it reads stream versions until its commit. Global positions are drawn
-- (AUTOINCREMENT: never reused) under that lock, hence in commit order, and a WAL reader
-- sees a commit whole or not at all. See docs/ARCHITECTURE.md, "Event store".
--
-- Encodings are sqlx's: ids are 16-byte BLOBs, `time` is RFC 3339 text in UTC, data and
-- metadata are JSON text.

CREATE TABLE IF NOT EXISTS message_store_messages (
  global_position INTEGER PRIMARY KEY AUTOINCREMENT,
  position INTEGER NOT NULL,
  -- The Rust API binds the time itself; the default (same format) serves raw INSERTs.
  time TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
  stream_name TEXT NOT NULL,
  type TEXT NOT NULL,
  data TEXT,
  metadata TEXT,
  id BLOB NOT NULL,
  -- Message DB's category(): the part of the stream name before the first '-'.
  category TEXT NOT NULL GENERATED ALWAYS AS (
    CASE WHEN instr(stream_name, '-') = 0 THEN stream_name
         ELSE substr(stream_name, 1, instr(stream_name, '-') - 1) END
  ) VIRTUAL,
  -- Message DB's hash_64(cardinal_id(stream_name)), which consumer groups split a
  -- category by; NULL for a stream name without '-'. SQLite has no md5, so the event
  -- store computes it when it writes the row.
  cardinal_hash INTEGER
);

-- Idempotent appends: an event id is stored once.
CREATE UNIQUE INDEX IF NOT EXISTS message_store_messages_id
  ON message_store_messages (id);

-- Optimistic concurrency: one event per (stream, version); stream reads and versions.
CREATE UNIQUE INDEX IF NOT EXISTS message_store_messages_stream
  ON message_store_messages (stream_name, position);

-- Category reads and consumer groups, in log order.
CREATE INDEX IF NOT EXISTS message_store_messages_category
  ON message_store_messages (category, global_position);
