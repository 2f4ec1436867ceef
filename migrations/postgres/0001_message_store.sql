-- The event log: Message DB 1.3's `message_store.messages` table, plus the one
-- rule Message DB does not give: global position is commit order.
--
-- Why: every reader of the log (the Rust API, Message DB's SQL functions, a client
-- selecting `global_position > P` directly) must never see an event appear below a
-- position it has already seen. A bigserial default does not give that: a lower
-- number can commit after a higher one. Here a BEFORE INSERT trigger takes one
-- transaction-scoped advisory lock and only then draws the position, so positions are
-- drawn in the order transactions take the lock, and the lock is released after the
-- commit is visible. Every write path (the Rust batcher, write_message, a raw INSERT)
-- goes through the trigger. See docs/adr/0002-commit-ordered-positions.md.

CREATE SCHEMA IF NOT EXISTS message_store;

-- Message DB's category(): the part of a stream name before the first '-'.
CREATE OR REPLACE FUNCTION message_store.category(
  stream_name varchar
)
RETURNS varchar
AS $$
BEGIN
  RETURN SPLIT_PART(category.stream_name, '-', 1);
END;
$$ LANGUAGE plpgsql
IMMUTABLE;

-- Positions are drawn from this sequence by the trigger below, never by a column
-- default (a default would be evaluated before the lock is taken).
CREATE SEQUENCE IF NOT EXISTS message_store.messages_global_position_seq;

CREATE TABLE IF NOT EXISTS message_store.messages (
  global_position bigint NOT NULL,
  position bigint NOT NULL,
  time TIMESTAMP WITHOUT TIME ZONE DEFAULT (now() AT TIME ZONE 'utc') NOT NULL,
  stream_name text NOT NULL,
  type text NOT NULL,
  data jsonb,
  metadata jsonb,
  id UUID NOT NULL DEFAULT gen_random_uuid()
);

ALTER SEQUENCE message_store.messages_global_position_seq
  OWNED BY message_store.messages.global_position;

ALTER TABLE message_store.messages
  ADD CONSTRAINT messages_pkey PRIMARY KEY (global_position);

-- Idempotent appends: an event id is stored once.
CREATE UNIQUE INDEX messages_id ON message_store.messages (id);

-- Optimistic concurrency: one event per (stream, version); stream reads.
CREATE UNIQUE INDEX messages_stream ON message_store.messages (stream_name, position);

-- Category reads (and Message DB's correlation filter), as Message DB indexes them.
CREATE INDEX messages_category ON message_store.messages (
  message_store.category(stream_name),
  global_position,
  message_store.category(metadata->>'correlationStreamName')
);

-- The lock key that orders every commit into the log. One constant shared by the
-- Rust API (eventstore crate, `COMMIT_ORDER_LOCK`) and this trigger.
CREATE OR REPLACE FUNCTION message_store.commit_order_lock_key()
RETURNS bigint
AS $$ SELECT 7236089447143116666::bigint $$
LANGUAGE sql IMMUTABLE;

CREATE OR REPLACE FUNCTION message_store.assign_global_position()
RETURNS trigger
AS $$
BEGIN
  -- Re-taking a lock this transaction already holds is a local-table lookup.
  PERFORM pg_advisory_xact_lock(7236089447143116666);
  NEW.global_position := nextval('message_store.messages_global_position_seq');
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER messages_assign_global_position
  BEFORE INSERT ON message_store.messages
  FOR EACH ROW EXECUTE FUNCTION message_store.assign_global_position();

-- Wakes catch-up subscriptions. Statement-level and with an empty payload, so a
-- transaction sends at most one notification however many rows it writes
-- (Postgres folds identical notifications of one transaction). Commits are already
-- serialised by the ordering lock, so the notify queue lock adds no new ordering.
CREATE OR REPLACE FUNCTION message_store.notify_appended()
RETURNS trigger
AS $$
BEGIN
  PERFORM pg_notify('message_store_appended', '');
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER messages_notify_appended
  AFTER INSERT ON message_store.messages
  FOR EACH STATEMENT EXECUTE FUNCTION message_store.notify_appended();

-- Updates and deletes of the log are reserved for erasure (redaction in place,
-- docs/adr/0003-erasure-by-redaction.md); positions and ids never change.
