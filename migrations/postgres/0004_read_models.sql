-- Read models. Each projection owns one schema holding its tables AND its checkpoint,
-- so a rebuild can build a complete copy in a scratch schema and swap it in with two
-- renames in one transaction (`colloquy replay`): tables and checkpoint change together.
-- The DDL lives in functions that take the schema name, so the live schema and every
-- rebuild are created by the same code.

CREATE SCHEMA IF NOT EXISTS colloquy;

-- A projection's checkpoint, in the projection's own schema (so it swaps with the
-- tables): every event at or below `position` has been applied. One row.
CREATE OR REPLACE FUNCTION colloquy.create_checkpoint(target text)
RETURNS void
AS $$
BEGIN
  EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', target);
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.checkpoint (
      only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
      position bigint NOT NULL,
      updated_at timestamptz NOT NULL DEFAULT now()
    )$ddl$, target);
  EXECUTE format('INSERT INTO %I.checkpoint (position) VALUES (0) ON CONFLICT DO NOTHING', target);
END;
$$ LANGUAGE plpgsql;

-- The `messages` read model: the conversation list and each conversation's messages.
CREATE OR REPLACE FUNCTION colloquy.create_messages_read_model(target text)
RETURNS void
AS $$
BEGIN
  PERFORM colloquy.create_checkpoint(target);
  -- One row per conversation, for the list and the detail view.
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.conversations (
      id uuid PRIMARY KEY,
      owner uuid NOT NULL,
      title text,
      system_prompt text,
      model text,
      archived boolean NOT NULL DEFAULT false,
      created_at timestamptz NOT NULL,
      updated_at timestamptz NOT NULL,
      -- Global position of the last activity: orders the list (most recent first)
      -- and makes keyset paging stable.
      activity_position bigint NOT NULL,
      message_count integer NOT NULL DEFAULT 0,
      last_message_preview text,
      -- The conversation stream's version, for If-Match.
      version bigint NOT NULL
    )$ddl$, target);
  -- The caller's list, most recent activity first.
  EXECUTE format('CREATE INDEX IF NOT EXISTS conversations_owner_activity ON %I.conversations (owner, activity_position DESC)', target);
  -- Messages in conversation order (seq = the MessageSent event's stream position).
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.messages (
      id uuid PRIMARY KEY,
      conversation_id uuid NOT NULL,
      seq bigint NOT NULL,
      author text NOT NULL,
      author_id uuid,
      text text NOT NULL,
      created_at timestamptz NOT NULL,
      edited_at timestamptz,
      deleted boolean NOT NULL DEFAULT false,
      run_id uuid,
      reply_to uuid
    )$ddl$, target);
  EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS messages_conversation_seq ON %I.messages (conversation_id, seq)', target);
END;
$$ LANGUAGE plpgsql;

-- The `runs` read model: each agent run's progress and outcome.
CREATE OR REPLACE FUNCTION colloquy.create_runs_read_model(target text)
RETURNS void
AS $$
BEGIN
  PERFORM colloquy.create_checkpoint(target);
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.runs (
      id uuid PRIMARY KEY,
      conversation_id uuid NOT NULL,
      requested_by uuid NOT NULL,
      prompt_message_id uuid NOT NULL,
      model text,
      status text NOT NULL,
      stage text,
      percent smallint NOT NULL DEFAULT 0,
      attempts integer NOT NULL DEFAULT 0,
      error text,
      reply_message_id uuid,
      usage jsonb,
      not_before timestamptz,
      -- Global position of the run's last event (what a client waits on).
      position bigint NOT NULL,
      created_at timestamptz NOT NULL,
      started_at timestamptz,
      finished_at timestamptz
    )$ddl$, target);
  -- The agent's sweeper finds due retries and runs that never started.
  EXECUTE format('CREATE INDEX IF NOT EXISTS runs_status ON %I.runs (status, not_before)', target);
  EXECUTE format('CREATE INDEX IF NOT EXISTS runs_conversation ON %I.runs (conversation_id)', target);
END;
$$ LANGUAGE plpgsql;

-- The `search` read model: full-text search over message text.
CREATE OR REPLACE FUNCTION colloquy.create_search_read_model(target text)
RETURNS void
AS $$
BEGIN
  PERFORM colloquy.create_checkpoint(target);
  -- Owners of conversations, so every search is restricted to the caller's own.
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.conversations (
      id uuid PRIMARY KEY,
      owner uuid NOT NULL
    )$ddl$, target);
  EXECUTE format($ddl$
    CREATE TABLE IF NOT EXISTS %I.documents (
      message_id uuid PRIMARY KEY,
      conversation_id uuid NOT NULL,
      owner uuid NOT NULL,
      text text NOT NULL,
      created_at timestamptz NOT NULL,
      tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED
    )$ddl$, target);
  EXECUTE format('CREATE INDEX IF NOT EXISTS documents_tsv ON %I.documents USING gin (tsv)', target);
  EXECUTE format('CREATE INDEX IF NOT EXISTS documents_owner ON %I.documents (owner, created_at DESC)', target);
END;
$$ LANGUAGE plpgsql;

SELECT colloquy.create_messages_read_model('rm_messages');
SELECT colloquy.create_runs_read_model('rm_runs');
SELECT colloquy.create_search_read_model('rm_search');
