-- The embedded mode's read models: the tables of Postgres' rm_messages, rm_runs and
-- rm_search schemas (migrations/postgres/0004_read_models.sql), named
-- `<schema>_<table>` (SQLite has no schemas), with the same columns. Each projection's
-- checkpoint is a table beside its tables, written in the same transaction.
--
-- Encodings are sqlx's: ids are 16-byte BLOBs, times RFC 3339 text in UTC (which sorts
-- chronologically: the code always binds them from Rust), booleans 0/1, JSON as text.
--
-- A rebuild copies these tables' DDL from sqlite_schema into TEMP tables of the same
-- names (projections::replay): every object of a projection is named `<schema>_…`.

-- A projection's checkpoint: every event at or below `position` has been applied.
-- One row.
CREATE TABLE IF NOT EXISTS rm_messages_checkpoint (
  only_row INTEGER PRIMARY KEY DEFAULT 1 CHECK (only_row = 1),
  position INTEGER NOT NULL,
  updated_at TEXT NOT NULL
);
INSERT OR IGNORE INTO rm_messages_checkpoint (position, updated_at)
  VALUES (0, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'));

-- The `messages` read model: one row per conversation, for the list and the detail.
CREATE TABLE IF NOT EXISTS rm_messages_conversations (
  id BLOB PRIMARY KEY,
  owner BLOB NOT NULL,
  title TEXT,
  system_prompt TEXT,
  model TEXT,
  archived INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  -- Global position of the last activity: orders the list (most recent first) and
  -- makes keyset paging stable.
  activity_position INTEGER NOT NULL,
  message_count INTEGER NOT NULL DEFAULT 0,
  last_message_preview TEXT,
  -- The conversation stream's version, for If-Match.
  version INTEGER NOT NULL
);
-- The caller's list, most recent activity first.
CREATE INDEX IF NOT EXISTS rm_messages_conversations_owner_activity
  ON rm_messages_conversations (owner, activity_position DESC);

-- Messages in conversation order (seq = the MessageSent event's stream position).
CREATE TABLE IF NOT EXISTS rm_messages_messages (
  id BLOB PRIMARY KEY,
  conversation_id BLOB NOT NULL,
  seq INTEGER NOT NULL,
  author TEXT NOT NULL,
  author_id BLOB,
  text TEXT NOT NULL,
  created_at TEXT NOT NULL,
  edited_at TEXT,
  deleted INTEGER NOT NULL DEFAULT 0,
  run_id BLOB,
  reply_to BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS rm_messages_messages_conversation_seq
  ON rm_messages_messages (conversation_id, seq);

-- The `runs` read model: each agent run's progress and outcome.
CREATE TABLE IF NOT EXISTS rm_runs_checkpoint (
  only_row INTEGER PRIMARY KEY DEFAULT 1 CHECK (only_row = 1),
  position INTEGER NOT NULL,
  updated_at TEXT NOT NULL
);
INSERT OR IGNORE INTO rm_runs_checkpoint (position, updated_at)
  VALUES (0, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'));

CREATE TABLE IF NOT EXISTS rm_runs_runs (
  id BLOB PRIMARY KEY,
  conversation_id BLOB NOT NULL,
  requested_by BLOB NOT NULL,
  prompt_message_id BLOB NOT NULL,
  model TEXT,
  status TEXT NOT NULL,
  stage TEXT,
  percent INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  reply_message_id BLOB,
  usage TEXT,
  not_before TEXT,
  -- Global position of the run's last event (what a client waits on).
  position INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  started_at TEXT,
  finished_at TEXT
);
-- The agent's sweeper finds due retries and runs that never started.
CREATE INDEX IF NOT EXISTS rm_runs_runs_status ON rm_runs_runs (status, not_before);
CREATE INDEX IF NOT EXISTS rm_runs_runs_conversation ON rm_runs_runs (conversation_id);

-- The `search` read model: full-text search over message text with FTS5.
CREATE TABLE IF NOT EXISTS rm_search_checkpoint (
  only_row INTEGER PRIMARY KEY DEFAULT 1 CHECK (only_row = 1),
  position INTEGER NOT NULL,
  updated_at TEXT NOT NULL
);
INSERT OR IGNORE INTO rm_search_checkpoint (position, updated_at)
  VALUES (0, strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'));

-- Owners of conversations, so every search is restricted to the caller's own.
CREATE TABLE IF NOT EXISTS rm_search_conversations (
  id BLOB PRIMARY KEY,
  owner BLOB NOT NULL
);

-- The searchable messages. `fts_id` (not in Postgres, where the index is a column) is
-- the row's id in rm_search_fts: a rowid alias, stable for the row's life.
CREATE TABLE IF NOT EXISTS rm_search_documents (
  fts_id INTEGER PRIMARY KEY,
  message_id BLOB NOT NULL UNIQUE,
  conversation_id BLOB NOT NULL,
  owner BLOB NOT NULL,
  text TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rm_search_documents_owner
  ON rm_search_documents (owner, created_at DESC);

-- The full-text index over the documents' text (external content: the text is stored
-- once, in rm_search_documents), with Porter stemming as Postgres' english
-- configuration stems ("foxes" finds "fox").
CREATE VIRTUAL TABLE IF NOT EXISTS rm_search_fts USING fts5(
  text,
  content = 'rm_search_documents',
  content_rowid = 'fts_id',
  tokenize = 'porter unicode61 remove_diacritics 2'
);

-- The index follows the documents: inserted, re-indexed on edit, removed on delete.
CREATE TRIGGER IF NOT EXISTS rm_search_documents_insert AFTER INSERT ON rm_search_documents
BEGIN
  INSERT INTO rm_search_fts (rowid, text) VALUES (new.fts_id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS rm_search_documents_delete AFTER DELETE ON rm_search_documents
BEGIN
  INSERT INTO rm_search_fts (rm_search_fts, rowid, text) VALUES ('delete', old.fts_id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS rm_search_documents_update AFTER UPDATE ON rm_search_documents
BEGIN
  INSERT INTO rm_search_fts (rm_search_fts, rowid, text) VALUES ('delete', old.fts_id, old.text);
  INSERT INTO rm_search_fts (rowid, text) VALUES (new.fts_id, new.text);
END;
