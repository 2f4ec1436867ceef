//! The SQL of accounts and refresh tokens, on either backend: `colloquy.users` and
//! `colloquy.refresh_tokens` on Postgres (migrations/postgres/0005_users.sql),
//! `colloquy_users` and `colloquy_refresh_tokens` in the embedded mode's SQLite file
//! (migrations/sqlite/0003_users.sql).
//!
//! Each function holds one statement per backend; they differ in table names and in how
//! a refresh token is locked, never in the rules. Times (issue, expiry, rotation,
//! revocation) are bound from this process's clock on both backends, and expiry is
//! decided here, so the two cannot disagree on when a token ends.

use chrono::{DateTime, Utc};
use colloquy_eventstore::Database;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::tokens::REFRESH_TOKEN_TTL;

/// Why an account could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InsertUserError {
    /// An account with this (lower-cased) email exists.
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates an account. `email` is stored as given: callers pass an [`Email`]'s
/// lower-cased form, which is what makes uniqueness case-insensitive.
///
/// [`Email`]: super::input::Email
pub async fn insert_user(
    db: &Database,
    id: Uuid,
    email: &str,
    password_hash: &str,
    display_name: Option<&str>,
) -> Result<(), InsertUserError> {
    let now = Utc::now();
    // A taken email inserts nothing rather than failing, so the two backends report it
    // alike (SQLite's errors do not name the constraint).
    let inserted = match db {
        Database::Postgres(pool) => sqlx::query(
            "INSERT INTO colloquy.users (id, email, password_hash, display_name, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(id)
        .bind(email)
        .bind(password_hash)
        .bind(display_name)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected(),
        Database::Sqlite(pool) => sqlx::query(
            "INSERT INTO colloquy_users (id, email, password_hash, display_name, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(id)
        .bind(email)
        .bind(password_hash)
        .bind(display_name)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected(),
    };
    if inserted == 0 {
        return Err(InsertUserError::EmailTaken);
    }
    Ok(())
}

/// What login needs of an account.
#[derive(Debug, sqlx::FromRow)]
pub struct Credentials {
    pub id: Uuid,
    pub password_hash: String,
    pub is_admin: bool,
    pub disabled: bool,
}

/// The account with this (lower-cased) email, as login needs it.
pub async fn credentials(db: &Database, email: &str) -> Result<Option<Credentials>, sqlx::Error> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT id, password_hash, is_admin, disabled FROM colloquy.users
                  WHERE email = $1",
            )
            .bind(email)
            .fetch_optional(pool)
            .await
        }
        Database::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT id, password_hash, is_admin, disabled FROM colloquy_users
                  WHERE email = $1",
            )
            .bind(email)
            .fetch_optional(pool)
            .await
        }
    }
}

/// A write transaction on the accounts tables, of either backend; dropping it without
/// [`Transaction::commit`] rolls it back.
///
/// On SQLite it is begun with `BEGIN IMMEDIATE`: it takes the database's write lock
/// before its first read and holds it to the end, so a read-check-write sequence (refresh
/// rotation) is atomic and concurrent writers queue on the busy timeout instead of
/// failing to upgrade a read lock. On Postgres the rows it changes are locked as usual
/// (and [`lock_refresh_token`] locks the token it reads).
#[derive(Debug)]
pub enum Transaction {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Transaction {
    /// Begins a transaction on a connection of `db`'s pool.
    pub async fn begin(db: &Database) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Database::Postgres(pool) => Self::Postgres(pool.begin().await?),
            Database::Sqlite(pool) => Self::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.commit().await,
            Self::Sqlite(tx) => tx.commit().await,
        }
    }
}

/// Stores a new refresh token of `family`, valid for [`REFRESH_TOKEN_TTL`] from now.
pub async fn insert_refresh_token(
    tx: &mut Transaction,
    family: Uuid,
    user_id: Uuid,
    token_hash: &[u8],
) -> Result<(), sqlx::Error> {
    let id = Uuid::new_v4();
    let issued_at = Utc::now();
    let expires_at = issued_at + REFRESH_TOKEN_TTL;
    match tx {
        Transaction::Postgres(tx) => {
            sqlx::query(
                "INSERT INTO colloquy.refresh_tokens
                        (id, family, user_id, token_hash, issued_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(family)
            .bind(user_id)
            .bind(token_hash)
            .bind(issued_at)
            .bind(expires_at)
            .execute(&mut **tx)
            .await?;
        }
        Transaction::Sqlite(tx) => {
            sqlx::query(
                "INSERT INTO colloquy_refresh_tokens
                        (id, family, user_id, token_hash, issued_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(family)
            .bind(user_id)
            .bind(token_hash)
            .bind(issued_at)
            .bind(expires_at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// A presented refresh token's row, with its user's current state.
#[derive(Debug)]
pub struct PresentedToken {
    pub id: Uuid,
    pub family: Uuid,
    pub user_id: Uuid,
    pub expired: bool,
    pub rotated: bool,
    pub revoked: bool,
    pub is_admin: bool,
    pub disabled: bool,
}

/// [`PresentedToken`] as both backends select it.
#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    family: Uuid,
    user_id: Uuid,
    expires_at: DateTime<Utc>,
    rotated: bool,
    revoked: bool,
    is_admin: bool,
    disabled: bool,
}

impl TokenRow {
    fn presented(self, now: DateTime<Utc>) -> PresentedToken {
        PresentedToken {
            id: self.id,
            family: self.family,
            user_id: self.user_id,
            expired: self.expires_at <= now,
            rotated: self.rotated,
            revoked: self.revoked,
            is_admin: self.is_admin,
            disabled: self.disabled,
        }
    }
}

/// Finds the token by its hash and keeps it from changing until the transaction ends,
/// so two concurrent uses of one token are serialised: the second one sees it rotated.
/// (Postgres locks the token's row; SQLite's [`Transaction`] holds the write lock.)
pub async fn lock_refresh_token(
    tx: &mut Transaction,
    token_hash: &[u8],
) -> Result<Option<PresentedToken>, sqlx::Error> {
    let row: Option<TokenRow> = match tx {
        Transaction::Postgres(tx) => {
            sqlx::query_as(
                "SELECT t.id, t.family, t.user_id, t.expires_at,
                        t.rotated_at IS NOT NULL AS rotated,
                        t.revoked_at IS NOT NULL AS revoked,
                        u.is_admin, u.disabled
                 FROM colloquy.refresh_tokens AS t
                 JOIN colloquy.users AS u ON u.id = t.user_id
                 WHERE t.token_hash = $1
                 FOR UPDATE OF t",
            )
            .bind(token_hash)
            .fetch_optional(&mut **tx)
            .await?
        }
        Transaction::Sqlite(tx) => {
            sqlx::query_as(
                "SELECT t.id, t.family, t.user_id, t.expires_at,
                        t.rotated_at IS NOT NULL AS rotated,
                        t.revoked_at IS NOT NULL AS revoked,
                        u.is_admin, u.disabled
                 FROM colloquy_refresh_tokens AS t
                 JOIN colloquy_users AS u ON u.id = t.user_id
                 WHERE t.token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(&mut **tx)
            .await?
        }
    };
    Ok(row.map(|row| row.presented(Utc::now())))
}

/// Marks a token used: its successor is being issued.
pub async fn mark_rotated(tx: &mut Transaction, id: Uuid) -> Result<(), sqlx::Error> {
    let now = Utc::now();
    match tx {
        Transaction::Postgres(tx) => {
            sqlx::query("UPDATE colloquy.refresh_tokens SET rotated_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        Transaction::Sqlite(tx) => {
            sqlx::query("UPDATE colloquy_refresh_tokens SET rotated_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// Revokes every token of `family` not yet revoked; returns how many.
pub async fn revoke_family(tx: &mut Transaction, family: Uuid) -> Result<u64, sqlx::Error> {
    revoke_where(tx, "family", family).await
}

/// Revokes every token not yet revoked whose `column` (`family` or `user_id`) is `id`;
/// returns how many.
async fn revoke_where(
    tx: &mut Transaction,
    column: &'static str,
    id: Uuid,
) -> Result<u64, sqlx::Error> {
    debug_assert!(matches!(column, "family" | "user_id"));
    let now = Utc::now();
    let set = format!("SET revoked_at = $2 WHERE {column} = $1 AND revoked_at IS NULL");
    let revoked = match tx {
        Transaction::Postgres(tx) => sqlx::query(AssertSqlSafe(format!(
            "UPDATE colloquy.refresh_tokens {set}"
        )))
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        Transaction::Sqlite(tx) => sqlx::query(AssertSqlSafe(format!(
            "UPDATE colloquy_refresh_tokens {set}"
        )))
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
    };
    Ok(revoked)
}

/// Revokes the family of the token with this hash, if it is `user_id`'s; returns how
/// many tokens were revoked. One statement, so no transaction is needed.
pub async fn revoke_family_of(
    db: &Database,
    user_id: Uuid,
    token_hash: &[u8],
) -> Result<u64, sqlx::Error> {
    let now = Utc::now();
    let revoked = match db {
        Database::Postgres(pool) => sqlx::query(
            "UPDATE colloquy.refresh_tokens SET revoked_at = $3
              WHERE revoked_at IS NULL
                AND family = (SELECT family FROM colloquy.refresh_tokens
                               WHERE token_hash = $1 AND user_id = $2)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected(),
        Database::Sqlite(pool) => sqlx::query(
            "UPDATE colloquy_refresh_tokens SET revoked_at = $3
              WHERE revoked_at IS NULL
                AND family = (SELECT family FROM colloquy_refresh_tokens
                               WHERE token_hash = $1 AND user_id = $2)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(now)
        .execute(pool)
        .await?
        .rows_affected(),
    };
    Ok(revoked)
}

/// An account as operators see it (`colloquy admin users …`). Never the hash.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub is_admin: bool,
    pub disabled: bool,
}

/// The account with this id or (lower-cased) email.
pub async fn find_account(
    db: &Database,
    id_or_email: &str,
) -> Result<Option<Account>, sqlx::Error> {
    let id = Uuid::try_parse(id_or_email).ok();
    let email = id_or_email.trim().to_lowercase();
    match db {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT id, email, is_admin, disabled FROM colloquy.users
                  WHERE ($1::uuid IS NOT NULL AND id = $1) OR email = $2",
            )
            .bind(id)
            .bind(email)
            .fetch_optional(pool)
            .await
        }
        Database::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT id, email, is_admin, disabled FROM colloquy_users
                  WHERE ($1 IS NOT NULL AND id = $1) OR email = $2",
            )
            .bind(id)
            .bind(email)
            .fetch_optional(pool)
            .await
        }
    }
}

/// Grants or revokes the admin role. It reaches tokens at the next login or refresh
/// (access tokens carry it and are not revocable).
pub async fn set_admin(db: &Database, id: Uuid, admin: bool) -> Result<(), sqlx::Error> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query("UPDATE colloquy.users SET is_admin = $2 WHERE id = $1")
                .bind(id)
                .bind(admin)
                .execute(pool)
                .await?;
        }
        Database::Sqlite(pool) => {
            sqlx::query("UPDATE colloquy_users SET is_admin = $2 WHERE id = $1")
                .bind(id)
                .bind(admin)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Disables an account and revokes every refresh token it holds, in one transaction,
/// so no session outlives the change by more than an access token's lifetime. Returns
/// how many tokens were revoked.
pub async fn disable_account(db: &Database, id: Uuid) -> Result<u64, sqlx::Error> {
    let mut tx = Transaction::begin(db).await?;
    match &mut tx {
        Transaction::Postgres(tx) => {
            sqlx::query("UPDATE colloquy.users SET disabled = true WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        Transaction::Sqlite(tx) => {
            sqlx::query("UPDATE colloquy_users SET disabled = true WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
    }
    let revoked = revoke_where(&mut tx, "user_id", id).await?;
    tx.commit().await?;
    Ok(revoked)
}

/// Erasure of a user's account data: deletes the account (email, password hash, display
/// name, flags) and every refresh token it holds, so nobody can log in or refresh as
/// the user again; access tokens already issued live out their 15 minutes. Returns
/// whether there was an account. What the user wrote in the log is redacted separately
/// (`Commands::forget_user`).
pub async fn forget_account(db: &Database, id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = Transaction::begin(db).await?;
    // The tokens go first and explicitly: the foreign key's cascade would take them too,
    // but SQLite enforces foreign keys only on connections that turned them on.
    let deleted = match &mut tx {
        Transaction::Postgres(tx) => {
            sqlx::query("DELETE FROM colloquy.refresh_tokens WHERE user_id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            sqlx::query("DELETE FROM colloquy.users WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected()
        }
        Transaction::Sqlite(tx) => {
            sqlx::query("DELETE FROM colloquy_refresh_tokens WHERE user_id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            sqlx::query("DELETE FROM colloquy_users WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?
                .rows_affected()
        }
    };
    tx.commit().await?;
    Ok(deleted > 0)
}
