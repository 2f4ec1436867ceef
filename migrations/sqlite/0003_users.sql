-- Accounts and refresh tokens of the embedded mode: Postgres' `colloquy.users` and
-- `colloquy.refresh_tokens` (migrations/postgres/0005_users.sql, which says why they are
-- plain tables and not streams) as `colloquy_users` and `colloquy_refresh_tokens`, with
-- the same columns and constraints.
--
-- Encodings are sqlx's: ids are 16-byte BLOBs, booleans 0/1, times RFC 3339 text in UTC
-- bound by the gateway (so every stored time has one format). STRICT makes SQLite refuse
-- a value of another type instead of storing it as given.
--
-- Refresh-token rotation has no row lock here: the gateway runs it in a transaction
-- begun with `BEGIN IMMEDIATE`, which holds the database's one write lock from the
-- token's read to the commit, so two uses of one token are serialised just the same.

CREATE TABLE IF NOT EXISTS colloquy_users (
  id BLOB PRIMARY KEY CHECK (length(id) = 16),
  email TEXT NOT NULL,
  -- Argon2id PHC string; never the password.
  password_hash TEXT NOT NULL,
  display_name TEXT,
  is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
  disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
  -- The gateway binds the time itself; the default (same format) serves raw INSERTs.
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
  CONSTRAINT users_email_key UNIQUE (email),
  -- As on Postgres: the gateway lower-cases the email (fully, in Rust) before it is
  -- stored or looked up, so uniqueness is case-insensitive with a plain index. SQLite's
  -- lower() folds ASCII only, so this check catches the common case of another writer.
  CONSTRAINT users_email_lower CHECK (email = lower(email))
) STRICT;

CREATE TABLE IF NOT EXISTS colloquy_refresh_tokens (
  id BLOB PRIMARY KEY CHECK (length(id) = 16),
  -- One login session: a detected reuse or a logout revokes the family together.
  family BLOB NOT NULL CHECK (length(family) = 16),
  user_id BLOB NOT NULL REFERENCES colloquy_users (id) ON DELETE CASCADE,
  -- SHA-256 of the token; the token itself is never stored.
  token_hash BLOB NOT NULL,
  issued_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
  expires_at TEXT NOT NULL,
  -- Set when the token's successor is issued: presenting it again is reuse.
  rotated_at TEXT,
  -- Set when the family is revoked (logout, detected reuse, a disabled account).
  revoked_at TEXT,
  CONSTRAINT refresh_tokens_token_hash_key UNIQUE (token_hash),
  CONSTRAINT refresh_tokens_token_hash_length CHECK (length(token_hash) = 32)
) STRICT;

-- Reuse of a rotated token revokes its whole family in one UPDATE.
CREATE INDEX IF NOT EXISTS colloquy_refresh_tokens_family
  ON colloquy_refresh_tokens (family);
-- Revoking every session of a user (disable, forget) without a scan.
CREATE INDEX IF NOT EXISTS colloquy_refresh_tokens_user
  ON colloquy_refresh_tokens (user_id);
