-- The Rust batcher's write in one statement: the commit-ordering lock of 0001 is held
-- for server work and the commit's WAL flush only, never across a client round trip.
--
-- Why: every writer in every process serialises on that lock, so the time it is held
-- bounds the log's write throughput. Before this, a batch took it with BEGIN and held
-- it across three more round trips (read stored ids and stream versions, INSERT,
-- COMMIT), each paying network and scheduling delay. Now a batch is planned in Rust
-- (eventstore::batch::plan stays the only place that decides replays, conflicts,
-- expected versions and stream positions) from the state it expects: stream versions
-- as the appends expect them or as this process last wrote them, and no stored ids.
-- The planned rows go to message_store.write_batch as one autocommit statement, which
-- takes the lock, checks that the state the plan was made from is the state, and
-- inserts. If it is not (a retried append, a stream another process wrote), nothing is
-- written and the actual state is returned, read under the lock; the batch is planned
-- again from it. See docs/adr/0002-commit-ordered-positions.md.

-- Writes planned rows (the row arrays, aligned, in the order positions are to be drawn;
-- they may be empty, to check a plan that writes nothing) if the state they were
-- planned from holds under the commit-ordering lock: every stream of `streams` is at
-- its entry of `versions` (-1: no events) and no event with one of `absent_ids` is
-- stored. (Events the plan knows as stored stay stored: the log is only appended to,
-- and erasure redacts in place.)
--
-- Returns, if it held, one 'written' row per row written (event_id, and the
-- event_global_position the trigger of 0001 drew for it); if not, nothing is written
-- and it returns the actual state: a 'stored' row for each stored event with one of
-- `absent_ids`, and a 'stream' row for each of `streams` with its version in
-- event_position (NULL: no events). A caller tells the cases apart by the 'stream'
-- rows, which a moved state always has (a batch names at least one stream).
--
-- VOLATILE, so each statement after the lock takes a fresh snapshot: the check sees
-- every transaction that committed before the lock was granted. Called as an
-- autocommit statement, the lock is released when the implicit transaction ends, after
-- its commit is visible.
--
-- Sequential scans are disabled for the function's queries: its plans are cached per
-- session, and a plan cached while the log was small would otherwise scan the log for
-- the id look-up for as long as the session lasts (docs/PERFORMANCE.md, "Cold start").
-- Every query here has an index to use. (Planning every call for its arguments,
-- plan_cache_mode = force_custom_plan, costs more server time under the lock.)
CREATE FUNCTION message_store.write_batch(
  row_ids uuid[],
  row_stream_names text[],
  row_types text[],
  row_positions bigint[],
  row_data jsonb[],
  row_metadata jsonb[],
  streams text[],
  versions bigint[],
  absent_ids uuid[]
)
RETURNS TABLE (
  kind text,
  event_id uuid,
  event_stream_name text,
  event_type text,
  event_data jsonb,
  event_global_position bigint,
  event_position bigint
)
AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(message_store.commit_order_lock_key());

  IF EXISTS (
       SELECT 1
         FROM unnest(write_batch.streams, write_batch.versions) AS s(name, version)
        WHERE coalesce(
                (SELECT max(v.position) FROM message_store.messages v
                  WHERE v.stream_name = s.name),
                -1) <> s.version)
     OR EXISTS (
       SELECT 1 FROM message_store.messages m WHERE m.id = ANY(write_batch.absent_ids))
  THEN
    RETURN QUERY
      SELECT 'stored', m.id, m.stream_name, m.type, m.data, m.global_position, m.position
        FROM message_store.messages m
       WHERE m.id = ANY(write_batch.absent_ids)
      UNION ALL
      SELECT 'stream', NULL::uuid, s.name, NULL::text, NULL::jsonb, NULL::bigint,
             (SELECT max(v.position) FROM message_store.messages v
               WHERE v.stream_name = s.name)
        FROM unnest(write_batch.streams) AS s(name);
    RETURN;
  END IF;

  IF cardinality(write_batch.row_ids) > 0 THEN
    RETURN QUERY
      WITH inserted AS (
        INSERT INTO message_store.messages (id, stream_name, type, position, data, metadata)
        SELECT t.id, t.stream_name, t.type, t.position, t.data, t.metadata
          FROM unnest(write_batch.row_ids, write_batch.row_stream_names, write_batch.row_types,
                      write_batch.row_positions, write_batch.row_data,
                      write_batch.row_metadata)
               WITH ORDINALITY AS t(id, stream_name, type, position, data, metadata, ord)
         ORDER BY t.ord
        RETURNING message_store.messages.id, message_store.messages.global_position
      )
      SELECT 'written', i.id, NULL::text, NULL::text, NULL::jsonb, i.global_position,
             NULL::bigint
        FROM inserted i;
  END IF;
END;
$$ LANGUAGE plpgsql
VOLATILE
SET enable_seqscan = off;
