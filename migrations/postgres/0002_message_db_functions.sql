-- Message DB 1.3 SQL interface over the event log created by 0001.
--
-- Why: Message DB clients (Eventide, message-db-py, message-db npm, the mdb-* tools) talk
-- to the store only through these server functions, this composite type, these views and
-- the `message_store` role. Names, parameter names, defaults, result types and error texts
-- follow Message DB 1.3.0's documented interface
-- (docs.eventide-project.org/user-guide/message-db/server-functions.html), so such a
-- client can be pointed at Colloquy's database unchanged.
--
-- What differs from Message DB, on purpose:
--   * write_message first takes the global commit-ordering lock of 0001
--     (message_store.commit_order_lock_key()) and only then reads the stream version, so
--     the expected-version check and the insert are serialised with every other writer
--     (the Rust batcher, raw INSERTs) and global_position is commit order. Message DB's
--     per-category lock (acquire_lock) is still taken afterwards; it is redundant but
--     harmless, and keeps acquire_lock's documented effect.
--   * acquire_lock takes the global lock before the category lock, so all paths lock in
--     one order (global, then category) and cannot deadlock each other.
--   * global_position is never passed: the BEFORE INSERT trigger of 0001 assigns it.
--   * Functions reference each other schema-qualified, so they also work for a caller
--     whose search_path lacks message_store (Message DB's fail there). User-supplied
--     `condition` text is still evaluated with the caller's search_path, as in Message DB.
--
-- Validation is Message DB's, not stricter: any stream name, type and JSON are accepted
-- (name and payload validation belongs to the Rust API only, see the API design doc).
--
-- The file runs in one transaction (sqlx), so it uses nothing that refuses a transaction
-- block (no CREATE INDEX CONCURRENTLY, no CREATE DATABASE).

----------------------------------------------------------------------------------------
-- Role
----------------------------------------------------------------------------------------

-- Message DB creates a LOGIN role `message_store` (no password) that its tools and
-- clients connect as, with privileges limited to the public interface. Roles are
-- cluster-wide: another database of this cluster (or a concurrent migration of one) may
-- already have created it, so an existing role is accepted, including one created by a
-- transaction that commits while this one waits (unique_violation). A migrating user
-- without CREATEROLE gets a warning instead of a failed migration; the grants below are
-- then skipped and the database-level search_path still serves every other role.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'message_store') THEN
    BEGIN
      CREATE ROLE message_store WITH LOGIN;
    EXCEPTION
      WHEN duplicate_object OR unique_violation THEN
        NULL; -- created concurrently by another database's migration
      WHEN insufficient_privilege THEN
        RAISE WARNING 'message_store role not created (no CREATEROLE privilege); Message DB tools that connect as message_store will not work until a superuser creates it and reruns the grants of this migration';
    END;
  END IF;
END
$$;

----------------------------------------------------------------------------------------
-- Result type
----------------------------------------------------------------------------------------

-- The row shape every Message DB read function returns. Clients read data and metadata
-- as JSON text (varchar), not jsonb, and `time` without time zone, so the types match
-- Message DB's exactly.
CREATE TYPE message_store.message AS (
  id varchar,
  stream_name varchar,
  type varchar,
  position bigint,
  global_position bigint,
  data varchar,
  metadata varchar,
  time timestamp
);

COMMENT ON TYPE message_store.message IS
  'Message DB 1.3 result row of get_stream_messages, get_category_messages and get_last_stream_message.';

----------------------------------------------------------------------------------------
-- Stream name functions
----------------------------------------------------------------------------------------

-- category() already exists (0001, identical to Message DB's): it is needed there by the
-- messages_category index, so it is not redefined here.

-- A 64-bit hash of a string: the first 16 hex digits of its MD5 read as a signed bigint.
-- Message DB uses it for the per-category advisory lock key and to assign streams to
-- consumer group members, so the exact bits matter: consumers of one group that use
-- Message DB's own hash elsewhere must agree with this one.
CREATE FUNCTION message_store.hash_64(
  value varchar
)
RETURNS bigint
AS $$
  SELECT ('x' || substr(md5(hash_64.value), 1, 16))::bit(64)::bigint;
$$ LANGUAGE sql
IMMUTABLE;

COMMENT ON FUNCTION message_store.hash_64(varchar) IS
  'Message DB 1.3: signed 64-bit hash (first 16 hex digits of md5). Lock keys and consumer group partitioning.';

-- True when the name has no '-' (a category rather than a stream name). Message DB's
-- returns true for NULL too (its IF treats NULL as not-false), reproduced here.
CREATE FUNCTION message_store.is_category(
  stream_name varchar
)
RETURNS boolean
AS $$
  SELECT (strpos(is_category.stream_name, '-') = 0) IS NOT FALSE;
$$ LANGUAGE sql
IMMUTABLE;

COMMENT ON FUNCTION message_store.is_category(varchar) IS
  'Message DB 1.3: true when the name contains no ''-'' (a category, not a stream name).';

-- The id part of a stream name: everything after the first '-' (so it keeps any further
-- '-' and '+' compound parts), or NULL for a category.
CREATE FUNCTION message_store.id(
  stream_name varchar
)
RETURNS varchar
AS $$
  SELECT CASE
    WHEN strpos(id.stream_name, '-') = 0 THEN NULL
    ELSE substring(id.stream_name FROM strpos(id.stream_name, '-') + 1)
  END;
$$ LANGUAGE sql
IMMUTABLE;

COMMENT ON FUNCTION message_store.id(varchar) IS
  'Message DB 1.3: the id of a stream name (text after the first ''-''), NULL for a category.';

-- The cardinal id: the first part of a compound id ('account-123+abc' -> '123'), NULL for
-- a category. Consumer groups partition a category by it, so all streams of one entity
-- (its compound-id streams included) go to the same consumer.
CREATE FUNCTION message_store.cardinal_id(
  stream_name varchar
)
RETURNS varchar
AS $$
  SELECT split_part(message_store.id(cardinal_id.stream_name), '+', 1);
$$ LANGUAGE sql
IMMUTABLE;

COMMENT ON FUNCTION message_store.cardinal_id(varchar) IS
  'Message DB 1.3: first ''+''-separated part of a stream name''s id; consumer groups hash it.';

----------------------------------------------------------------------------------------
-- Locking and versions
----------------------------------------------------------------------------------------

-- Message DB's write lock: a transaction-scoped advisory lock keyed by the hash of the
-- stream's category. Returns the key. Kept because it is part of Message DB's public
-- interface (a client may call it before reading a stream version and writing) and
-- because write_message documents taking it.
-- Colloquy difference: it first takes the global commit-ordering lock of 0001. Every
-- writer (write_message, the trigger of a raw INSERT, the Rust batcher) takes that lock,
-- so if a client could hold a category lock without it, `acquire_lock` then
-- `write_message` in one transaction would lock category-then-global while any other
-- write_message locks global-then-category: a deadlock. Taking the global lock first
-- everywhere gives one lock order. It costs nothing extra: whoever takes a category lock
-- is about to write, and every write needs the global lock anyway.
CREATE FUNCTION message_store.acquire_lock(
  stream_name varchar
)
RETURNS bigint
AS $$
DECLARE
  _category varchar;
  _category_name_hash bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(message_store.commit_order_lock_key());

  _category := message_store.category(acquire_lock.stream_name);
  _category_name_hash := message_store.hash_64(_category);
  PERFORM pg_advisory_xact_lock(_category_name_hash);

  IF current_setting('message_store.debug_write', true) = 'on'
      OR current_setting('message_store.debug', true) = 'on' THEN
    RAISE NOTICE 'acquire_lock: stream_name=%, category=%, lock key=%',
      acquire_lock.stream_name, _category, _category_name_hash;
  END IF;

  RETURN _category_name_hash;
END;
$$ LANGUAGE plpgsql
VOLATILE;

COMMENT ON FUNCTION message_store.acquire_lock(varchar) IS
  'Message DB 1.3: takes the transaction advisory lock hash_64(category(stream_name)) (after Colloquy''s global commit-order lock) and returns the key.';

-- The position of the last message of a stream, NULL when the stream has none.
-- VOLATILE (as in Message DB) so each call reads with a fresh snapshot: write_message
-- calls it after taking the locks and must see every write committed before it got them.
CREATE FUNCTION message_store.stream_version(
  stream_name varchar
)
RETURNS bigint
AS $$
  SELECT max(m.position)
  FROM message_store.messages AS m
  WHERE m.stream_name = stream_version.stream_name;
$$ LANGUAGE sql
VOLATILE;

COMMENT ON FUNCTION message_store.stream_version(varchar) IS
  'Message DB 1.3: highest position in the stream, NULL for a stream with no messages.';

-- The version of the Message DB interface this schema provides. Clients and tools check it.
CREATE FUNCTION message_store.message_store_version()
RETURNS varchar
AS $$
  SELECT '1.3.0'::varchar;
$$ LANGUAGE sql
VOLATILE;

COMMENT ON FUNCTION message_store.message_store_version() IS
  'Message DB interface version implemented by this schema (Message DB 1.3.0).';

----------------------------------------------------------------------------------------
-- Writing
----------------------------------------------------------------------------------------

-- Appends one message to a stream and returns its stream position (0 for the first).
-- expected_version: NULL = no check; -1 = the stream must be empty; N = the stream's last
-- position must be N; otherwise Message DB's 'Wrong expected version' error.
-- A duplicate id raises a unique violation on the messages_id index; an id that is not a
-- UUID raises invalid_text_representation (both as in Message DB).
CREATE FUNCTION message_store.write_message(
  id varchar,
  stream_name varchar,
  "type" varchar,
  data jsonb,
  metadata jsonb DEFAULT NULL,
  expected_version bigint DEFAULT NULL
)
RETURNS bigint
AS $$
DECLARE
  _message_id uuid;
  _stream_version bigint;
  _next_position bigint;
BEGIN
  -- 1. The global commit-ordering lock (0001), before anything is read: from here until
  --    commit no other writer can append, so the version read below is still the
  --    stream's version when this transaction commits, and the global position the
  --    trigger draws is in commit order. The trigger re-takes it (a no-op then).
  PERFORM pg_advisory_xact_lock(message_store.commit_order_lock_key());

  -- 2. Message DB's own per-category lock (acquire_lock re-takes the global lock first,
  --    a no-op here; see acquire_lock for why the order matters).
  PERFORM message_store.acquire_lock(write_message.stream_name);

  -- 3. Optimistic concurrency check, as Message DB does it.
  _stream_version := message_store.stream_version(write_message.stream_name);
  IF _stream_version IS NULL THEN
    _stream_version := -1;
  END IF;

  IF write_message.expected_version IS NOT NULL
      AND write_message.expected_version <> _stream_version THEN
    RAISE EXCEPTION
      'Wrong expected version: % (Stream: %, Stream Version: %)',
      write_message.expected_version,
      write_message.stream_name,
      _stream_version;
  END IF;

  _next_position := _stream_version + 1;
  _message_id := write_message.id::uuid;

  -- global_position and time are filled in by the trigger and the column default.
  INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata)
  VALUES (
    _message_id,
    write_message.stream_name,
    _next_position,
    write_message.type,
    write_message.data,
    write_message.metadata
  );

  IF current_setting('message_store.debug_write', true) = 'on'
      OR current_setting('message_store.debug', true) = 'on' THEN
    RAISE NOTICE 'write_message: id=%, stream_name=%, type=%, data=%, metadata=%, expected_version=%, stream_version=%, position=%',
      write_message.id, write_message.stream_name, write_message.type,
      write_message.data, write_message.metadata, write_message.expected_version,
      _stream_version, _next_position;
  END IF;

  RETURN _next_position;
END;
$$ LANGUAGE plpgsql
VOLATILE;

COMMENT ON FUNCTION message_store.write_message(varchar, varchar, varchar, jsonb, jsonb, bigint) IS
  'Message DB 1.3 write. Takes the global commit-order lock before reading the stream version; returns the stream position.';

----------------------------------------------------------------------------------------
-- Reading
----------------------------------------------------------------------------------------

-- Raises Message DB's error when a SQL condition is passed but the session has not
-- enabled conditions with the message_store.sql_condition setting. Exactly Message DB's
-- test: only an unset (NULL) or 'off' setting refuses; any other value enables.
-- Conditions are appended verbatim to the query (they are SQL), which is why Message DB
-- makes the caller opt in.
CREATE FUNCTION message_store.require_sql_condition_activated()
RETURNS void
AS $$
BEGIN
  IF current_setting('message_store.sql_condition', true) IS NULL
      OR current_setting('message_store.sql_condition', true) = 'off' THEN
    RAISE EXCEPTION 'Retrieval with SQL condition is not activated';
  END IF;
END;
$$ LANGUAGE plpgsql
STABLE;

COMMENT ON FUNCTION message_store.require_sql_condition_activated() IS
  'Colloquy helper: Message DB''s gate for the condition argument (setting message_store.sql_condition).';

-- Messages of one stream from a stream position on, in position order.
-- batch_size -1 = no limit (Message DB 1.2.2+); NULL position/batch_size = the defaults.
-- condition: SQL appended to the WHERE clause (table alias `messages`), only when
-- message_store.sql_condition is on.
CREATE FUNCTION message_store.get_stream_messages(
  stream_name varchar,
  "position" bigint DEFAULT 0,
  batch_size bigint DEFAULT 1000,
  condition varchar DEFAULT NULL
)
RETURNS SETOF message_store.message
AS $$
DECLARE
  _command text;
BEGIN
  IF message_store.is_category(get_stream_messages.stream_name) THEN
    RAISE EXCEPTION
      'Must be a stream name: %',
      get_stream_messages.stream_name;
  END IF;

  get_stream_messages.position := COALESCE(get_stream_messages.position, 0);
  get_stream_messages.batch_size := COALESCE(get_stream_messages.batch_size, 1000);

  _command := '
    SELECT
      messages.id::varchar,
      messages.stream_name::varchar,
      messages.type::varchar,
      messages.position::bigint,
      messages.global_position::bigint,
      messages.data::varchar,
      messages.metadata::varchar,
      messages.time::timestamp
    FROM message_store.messages AS messages
    WHERE messages.stream_name = $1
      AND messages.position >= $2';

  IF get_stream_messages.condition IS NOT NULL THEN
    PERFORM message_store.require_sql_condition_activated();
    _command := _command || ' AND (' || get_stream_messages.condition || ')';
  END IF;

  _command := _command || ' ORDER BY messages.position ASC';

  IF get_stream_messages.batch_size <> -1 THEN
    _command := _command || ' LIMIT $3';
  END IF;

  IF current_setting('message_store.debug_get', true) = 'on'
      OR current_setting('message_store.debug', true) = 'on' THEN
    RAISE NOTICE 'get_stream_messages: stream_name=%, position=%, batch_size=%, condition=%, command=%',
      get_stream_messages.stream_name, get_stream_messages.position,
      get_stream_messages.batch_size, get_stream_messages.condition, _command;
  END IF;

  RETURN QUERY EXECUTE _command USING
    get_stream_messages.stream_name,
    get_stream_messages.position,
    get_stream_messages.batch_size;
END;
$$ LANGUAGE plpgsql
VOLATILE;

COMMENT ON FUNCTION message_store.get_stream_messages(varchar, bigint, bigint, varchar) IS
  'Message DB 1.3: a stream''s messages from a position, in position order (batch_size -1 = all).';

-- Messages of every stream of a category from a global position on (inclusive), in global
-- position order, which in Colloquy is commit order. Options, as in Message DB:
--   correlation: only messages whose metadata correlationStreamName is in that category
--                (Pub/Sub replies); must itself be a category.
--   consumer_group_member / consumer_group_size: only streams whose cardinal id hashes to
--                this member (abs(hash_64(cardinal_id)) mod size), so a group of consumers
--                splits a category with each entity owned by one member. Streams named
--                exactly as the category have no cardinal id and are read by no member
--                (as in Message DB).
--   condition:   SQL appended to the WHERE clause; needs message_store.sql_condition.
CREATE FUNCTION message_store.get_category_messages(
  category varchar,
  "position" bigint DEFAULT 1,
  batch_size bigint DEFAULT 1000,
  correlation varchar DEFAULT NULL,
  consumer_group_member bigint DEFAULT NULL,
  consumer_group_size bigint DEFAULT NULL,
  condition varchar DEFAULT NULL
)
RETURNS SETOF message_store.message
AS $$
DECLARE
  _command text;
BEGIN
  IF NOT message_store.is_category(get_category_messages.category) THEN
    RAISE EXCEPTION
      'Must be a category: %',
      get_category_messages.category;
  END IF;

  get_category_messages.position := COALESCE(get_category_messages.position, 1);
  get_category_messages.batch_size := COALESCE(get_category_messages.batch_size, 1000);

  _command := '
    SELECT
      messages.id::varchar,
      messages.stream_name::varchar,
      messages.type::varchar,
      messages.position::bigint,
      messages.global_position::bigint,
      messages.data::varchar,
      messages.metadata::varchar,
      messages.time::timestamp
    FROM message_store.messages AS messages
    WHERE message_store.category(messages.stream_name) = $1
      AND messages.global_position >= $2';

  IF get_category_messages.correlation IS NOT NULL THEN
    IF strpos(get_category_messages.correlation, '-') > 0 THEN
      RAISE EXCEPTION
        'Correlation must be a category (Correlation: %)',
        get_category_messages.correlation;
    END IF;

    _command := _command ||
      ' AND message_store.category(messages.metadata->>''correlationStreamName'') = $4';
  END IF;

  IF (get_category_messages.consumer_group_member IS NULL)
      <> (get_category_messages.consumer_group_size IS NULL) THEN
    RAISE EXCEPTION
      'Consumer group member and size must be specified (Consumer Group Member: %, Consumer Group Size: %)',
      get_category_messages.consumer_group_member,
      get_category_messages.consumer_group_size;
  END IF;

  IF get_category_messages.consumer_group_member IS NOT NULL THEN
    IF get_category_messages.consumer_group_size < 1 THEN
      RAISE EXCEPTION
        'Consumer group size must not be less than 1 (Consumer Group Member: %, Consumer Group Size: %)',
        get_category_messages.consumer_group_member,
        get_category_messages.consumer_group_size;
    END IF;

    IF get_category_messages.consumer_group_member < 0 THEN
      RAISE EXCEPTION
        'Consumer group member must not be less than 0 (Consumer Group Member: %, Consumer Group Size: %)',
        get_category_messages.consumer_group_member,
        get_category_messages.consumer_group_size;
    END IF;

    IF get_category_messages.consumer_group_member >= get_category_messages.consumer_group_size THEN
      RAISE EXCEPTION
        'Consumer group member must be less than the group size (Consumer Group Member: %, Consumer Group Size: %)',
        get_category_messages.consumer_group_member,
        get_category_messages.consumer_group_size;
    END IF;

    _command := _command ||
      ' AND mod(abs(message_store.hash_64(message_store.cardinal_id(messages.stream_name))), $6) = $5';
  END IF;

  IF get_category_messages.condition IS NOT NULL THEN
    PERFORM message_store.require_sql_condition_activated();
    _command := _command || ' AND (' || get_category_messages.condition || ')';
  END IF;

  _command := _command || ' ORDER BY messages.global_position ASC';

  IF get_category_messages.batch_size <> -1 THEN
    _command := _command || ' LIMIT $3';
  END IF;

  IF current_setting('message_store.debug_get', true) = 'on'
      OR current_setting('message_store.debug', true) = 'on' THEN
    RAISE NOTICE 'get_category_messages: category=%, position=%, batch_size=%, correlation=%, consumer_group_member=%, consumer_group_size=%, condition=%, command=%',
      get_category_messages.category, get_category_messages.position,
      get_category_messages.batch_size, get_category_messages.correlation,
      get_category_messages.consumer_group_member, get_category_messages.consumer_group_size,
      get_category_messages.condition, _command;
  END IF;

  RETURN QUERY EXECUTE _command USING
    get_category_messages.category,
    get_category_messages.position,
    get_category_messages.batch_size,
    get_category_messages.correlation,
    get_category_messages.consumer_group_member,
    get_category_messages.consumer_group_size;
END;
$$ LANGUAGE plpgsql
VOLATILE;

COMMENT ON FUNCTION message_store.get_category_messages(varchar, bigint, bigint, varchar, bigint, bigint, varchar) IS
  'Message DB 1.3: a category''s messages from a global position (inclusive), with correlation, consumer group and condition filters.';

-- The last message of a stream, or of one type in that stream (Message DB 1.3 added
-- `type`); no row when there is none. Used by clients to load snapshots and to read a
-- stream's head without paging.
CREATE FUNCTION message_store.get_last_stream_message(
  stream_name varchar,
  "type" varchar DEFAULT NULL
)
RETURNS SETOF message_store.message
AS $$
BEGIN
  IF current_setting('message_store.debug_get', true) = 'on'
      OR current_setting('message_store.debug', true) = 'on' THEN
    RAISE NOTICE 'get_last_stream_message: stream_name=%, type=%',
      get_last_stream_message.stream_name, get_last_stream_message.type;
  END IF;

  IF get_last_stream_message.type IS NULL THEN
    RETURN QUERY
      SELECT m.id::varchar, m.stream_name::varchar, m.type::varchar, m.position::bigint,
             m.global_position::bigint, m.data::varchar, m.metadata::varchar,
             m.time::timestamp
      FROM message_store.messages AS m
      WHERE m.stream_name = get_last_stream_message.stream_name
      ORDER BY m.position DESC
      LIMIT 1;
  ELSE
    RETURN QUERY
      SELECT m.id::varchar, m.stream_name::varchar, m.type::varchar, m.position::bigint,
             m.global_position::bigint, m.data::varchar, m.metadata::varchar,
             m.time::timestamp
      FROM message_store.messages AS m
      WHERE m.stream_name = get_last_stream_message.stream_name
        AND m.type = get_last_stream_message.type
      ORDER BY m.position DESC
      LIMIT 1;
  END IF;
END;
$$ LANGUAGE plpgsql
VOLATILE;

COMMENT ON FUNCTION message_store.get_last_stream_message(varchar, varchar) IS
  'Message DB 1.3: the last message of a stream, optionally of one type; no row if none.';

----------------------------------------------------------------------------------------
-- Summary views (read by Message DB's mdb-print-*-summary tools)
----------------------------------------------------------------------------------------

-- Each view counts messages per group and gives the group's share of all messages as a
-- percentage rounded to 2 places, computed as Message DB does (count / total * 100).

CREATE VIEW message_store.stream_summary AS
  WITH counts AS (
    SELECT stream_name, count(id) AS message_count
    FROM message_store.messages
    GROUP BY stream_name
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.stream_name,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.stream_name;

COMMENT ON VIEW message_store.stream_summary IS
  'Message DB 1.3 report: messages per stream and their share of all messages.';

CREATE VIEW message_store.type_summary AS
  WITH counts AS (
    SELECT type, count(id) AS message_count
    FROM message_store.messages
    GROUP BY type
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.type,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.type;

COMMENT ON VIEW message_store.type_summary IS
  'Message DB 1.3 report: messages per type and their share of all messages.';

CREATE VIEW message_store.stream_type_summary AS
  WITH counts AS (
    SELECT stream_name, type, count(id) AS message_count
    FROM message_store.messages
    GROUP BY stream_name, type
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.stream_name,
         counts.type,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.stream_name, counts.type;

COMMENT ON VIEW message_store.stream_type_summary IS
  'Message DB 1.3 report: messages per (stream, type) and their share of all messages.';

CREATE VIEW message_store.type_stream_summary AS
  WITH counts AS (
    SELECT type, stream_name, count(id) AS message_count
    FROM message_store.messages
    GROUP BY type, stream_name
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.type,
         counts.stream_name,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.type, counts.stream_name;

COMMENT ON VIEW message_store.type_stream_summary IS
  'Message DB 1.3 report: messages per (type, stream) and their share of all messages.';

CREATE VIEW message_store.category_type_summary AS
  WITH counts AS (
    SELECT message_store.category(stream_name) AS category, type, count(id) AS message_count
    FROM message_store.messages
    GROUP BY 1, 2
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.category,
         counts.type,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.category, counts.type;

COMMENT ON VIEW message_store.category_type_summary IS
  'Message DB 1.3 report: messages per (category, type) and their share of all messages.';

CREATE VIEW message_store.type_category_summary AS
  WITH counts AS (
    SELECT type, message_store.category(stream_name) AS category, count(id) AS message_count
    FROM message_store.messages
    GROUP BY 1, 2
  ),
  total AS (
    SELECT count(id)::numeric AS total_count FROM message_store.messages
  )
  SELECT counts.type,
         counts.category,
         counts.message_count,
         round((counts.message_count / total.total_count) * 100, 2) AS percent
  FROM counts CROSS JOIN total
  ORDER BY counts.type, counts.category;

COMMENT ON VIEW message_store.type_category_summary IS
  'Message DB 1.3 report: messages per (type, category) and their share of all messages.';

----------------------------------------------------------------------------------------
-- Privileges and search path of the message_store role
----------------------------------------------------------------------------------------

-- Message DB's privilege set for its role: use the schema, read and append to the log
-- (never update or delete it), draw positions from the sequence (the trigger's nextval
-- runs as the inserting role), run the functions, read the reports.
-- The role's search_path is Message DB's (message_store, public), because its clients call
-- some functions unqualified. ALTER ROLE ... SET writes one cluster-wide catalog row that
-- a concurrent migration of another database may be writing too: it is skipped when the
-- setting is already there, and the concurrent-update error of that race is tolerated
-- (both writers set the same value).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'message_store') THEN
    RETURN;
  END IF;

  GRANT USAGE ON SCHEMA message_store TO message_store;
  GRANT SELECT, INSERT ON message_store.messages TO message_store;
  GRANT USAGE, SELECT ON SEQUENCE message_store.messages_global_position_seq TO message_store;
  GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA message_store TO message_store;
  GRANT SELECT ON
    message_store.stream_summary,
    message_store.type_summary,
    message_store.stream_type_summary,
    message_store.type_stream_summary,
    message_store.category_type_summary,
    message_store.type_category_summary
  TO message_store;

  IF NOT EXISTS (
    SELECT 1
    FROM pg_catalog.pg_db_role_setting AS s
    JOIN pg_catalog.pg_roles AS r ON r.oid = s.setrole
    WHERE r.rolname = 'message_store'
      AND s.setdatabase = 0
      AND 'search_path=message_store, public' = ANY (s.setconfig)
  ) THEN
    BEGIN
      ALTER ROLE message_store SET search_path TO message_store, public;
    EXCEPTION
      WHEN unique_violation THEN
        NULL; -- the same setting was inserted concurrently
      WHEN insufficient_privilege THEN
        RAISE WARNING 'search_path of role message_store not set (no privilege to alter the role)';
      WHEN internal_error THEN
        IF SQLERRM <> 'tuple concurrently updated' THEN
          RAISE;
        END IF;
    END;
  END IF;
END
$$;

----------------------------------------------------------------------------------------
-- Search path for every other role of this database
----------------------------------------------------------------------------------------

-- Message DB clients connecting as some other role (the application's own user, say) also
-- call functions and the `messages` table unqualified, so message_store goes on this
-- database's default search_path, after the usual entries so it never shadows them.
-- This only affects sessions opened after the migration commits (a running session keeps
-- its search_path), and a role- or role-in-database-level search_path takes precedence
-- over it. Such roles still need privileges on the schema (e.g. GRANT message_store TO
-- them, as Message DB suggests). Needs ownership of the database.
DO $$
BEGIN
  EXECUTE format(
    'ALTER DATABASE %I SET search_path TO "$user", public, message_store',
    current_database()
  );
END
$$;
