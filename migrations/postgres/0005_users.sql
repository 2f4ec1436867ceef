-- Accounts and refresh tokens for the gateway's own login (gateway/src/auth).
--
-- Why plain tables and not event-sourced streams: credentials are not chat history.
-- A password hash must be replaceable and deletable outright, a refresh token is
-- short-lived, security state that is checked and rotated under a row lock, and none of
-- it is ever replayed into a read model. Keeping it out of the log also keeps
-- password hashes and token hashes out of JetStream, backups of the log and
-- `colloquy admin events`. Conversations refer to users by id only.

CREATE SCHEMA IF NOT EXISTS colloquy;

CREATE TABLE IF NOT EXISTS colloquy.users (
  id uuid PRIMARY KEY,
  email text NOT NULL,
  password_hash text NOT NULL,
  display_name text,
  is_admin boolean NOT NULL DEFAULT false,
  disabled boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  -- Named so the gateway maps a violation to 409 `email_taken` by its name.
  CONSTRAINT users_email_key UNIQUE (email),
  -- Lower-cased by the gateway before it is stored, so uniqueness is case-insensitive
  -- with a plain index; this keeps any other writer honest.
  CONSTRAINT users_email_lower CHECK (email = lower(email))
);

COMMENT ON TABLE colloquy.users IS
  'Accounts that can log in with an email and password. Not event-sourced: credentials are not chat history (see the header of migration 0005).';
COMMENT ON COLUMN colloquy.users.id IS
  'The user id: the `sub` of access tokens and the owner/author id in events and read models.';
COMMENT ON COLUMN colloquy.users.email IS
  'The login name, lower-cased; unique (users_email_key).';
COMMENT ON COLUMN colloquy.users.password_hash IS
  'Argon2id PHC string ($argon2id$v=19$m=…,t=…,p=…$salt$hash); carries its own parameters, so they can be raised without invalidating old hashes. Never the password.';
COMMENT ON COLUMN colloquy.users.display_name IS
  'Optional name shown to people; at most 100 characters, no control characters (checked by the gateway).';
COMMENT ON COLUMN colloquy.users.is_admin IS
  'Grants the admin role: copied into the access token''s `admin` claim at login and refresh.';
COMMENT ON COLUMN colloquy.users.disabled IS
  'A disabled account cannot log in or refresh (the same 401 as bad credentials); access tokens already issued live out their 15 minutes.';
COMMENT ON COLUMN colloquy.users.created_at IS
  'When the account was registered, for operators.';

CREATE TABLE IF NOT EXISTS colloquy.refresh_tokens (
  id uuid PRIMARY KEY,
  family uuid NOT NULL,
  user_id uuid NOT NULL REFERENCES colloquy.users (id) ON DELETE CASCADE,
  token_hash bytea NOT NULL,
  issued_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  rotated_at timestamptz,
  revoked_at timestamptz,
  -- The lookup on refresh and logout; a collision of random 256-bit tokens is a bug.
  CONSTRAINT refresh_tokens_token_hash_key UNIQUE (token_hash),
  CONSTRAINT refresh_tokens_token_hash_length CHECK (octet_length(token_hash) = 32)
);

-- Reuse of a rotated token revokes its whole family in one UPDATE.
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON colloquy.refresh_tokens (family);
-- Revoking every session of a user (disable, forget) without a scan.
CREATE INDEX IF NOT EXISTS refresh_tokens_user ON colloquy.refresh_tokens (user_id);

COMMENT ON TABLE colloquy.refresh_tokens IS
  'Refresh tokens, one row per token ever issued. Rotated on every use; a reused (already rotated) token means it was stolen or replayed, and revokes its whole family.';
COMMENT ON COLUMN colloquy.refresh_tokens.id IS
  'Row id; never shown to clients.';
COMMENT ON COLUMN colloquy.refresh_tokens.family IS
  'One login session: the token issued at login and every token rotated from it share it, so a detected reuse or a logout revokes them together.';
COMMENT ON COLUMN colloquy.refresh_tokens.user_id IS
  'Whose session; rows go with the user.';
COMMENT ON COLUMN colloquy.refresh_tokens.token_hash IS
  'SHA-256 of the token (32 random bytes, base64url). The token itself is never stored, so a read of this table does not yield usable tokens; a fast hash suffices because the token has 256 bits of entropy.';
COMMENT ON COLUMN colloquy.refresh_tokens.issued_at IS
  'When the token was issued.';
COMMENT ON COLUMN colloquy.refresh_tokens.expires_at IS
  'After this the token is refused (30 days after issue).';
COMMENT ON COLUMN colloquy.refresh_tokens.rotated_at IS
  'NULL until the token is used; then set when its successor is issued. Presenting a token with rotated_at set is reuse.';
COMMENT ON COLUMN colloquy.refresh_tokens.revoked_at IS
  'Set when the family is revoked (logout or detected reuse); a revoked token is refused.';
