//! The SQL of accounts and refresh tokens (`colloquy.users`, `colloquy.refresh_tokens`;
//! migration 0005).

use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::tokens::REFRESH_TOKEN_TTL;

/// The name of the unique constraint on `users.email`.
pub const EMAIL_KEY: &str = "users_email_key";

pub async fn insert_user(
    pool: &PgPool,
    id: Uuid,
    email: &str,
    password_hash: &str,
    display_name: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO colloquy.users (id, email, password_hash, display_name)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(email)
    .bind(password_hash)
    .bind(display_name)
    .execute(pool)
    .await?;
    Ok(())
}

/// What login needs of an account.
#[derive(Debug)]
pub struct Credentials {
    pub id: Uuid,
    pub password_hash: String,
    pub is_admin: bool,
    pub disabled: bool,
}

pub async fn credentials(pool: &PgPool, email: &str) -> Result<Option<Credentials>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, password_hash, is_admin, disabled FROM colloquy.users WHERE email = $1",
    )
    .bind(email)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(Credentials {
            id: row.try_get("id")?,
            password_hash: row.try_get("password_hash")?,
            is_admin: row.try_get("is_admin")?,
            disabled: row.try_get("disabled")?,
        })
    })
    .transpose()
}

/// Stores a new refresh token of `family`, valid for [`REFRESH_TOKEN_TTL`].
pub async fn insert_refresh_token(
    conn: &mut PgConnection,
    family: Uuid,
    user_id: Uuid,
    token_hash: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO colloquy.refresh_tokens (id, family, user_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, now() + $5)",
    )
    .bind(Uuid::new_v4())
    .bind(family)
    .bind(user_id)
    .bind(token_hash)
    .bind(REFRESH_TOKEN_TTL)
    .execute(conn)
    .await?;
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

/// Finds the token by its hash and locks its row until the transaction ends, so two
/// concurrent uses of one token are serialised: the second one sees it rotated.
pub async fn lock_refresh_token(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> Result<Option<PresentedToken>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT t.id, t.family, t.user_id,
                t.expires_at <= now() AS expired,
                t.rotated_at IS NOT NULL AS rotated,
                t.revoked_at IS NOT NULL AS revoked,
                u.is_admin, u.disabled
         FROM colloquy.refresh_tokens AS t
         JOIN colloquy.users AS u ON u.id = t.user_id
         WHERE t.token_hash = $1
         FOR UPDATE OF t",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(PresentedToken {
            id: row.try_get("id")?,
            family: row.try_get("family")?,
            user_id: row.try_get("user_id")?,
            expired: row.try_get("expired")?,
            rotated: row.try_get("rotated")?,
            revoked: row.try_get("revoked")?,
            is_admin: row.try_get("is_admin")?,
            disabled: row.try_get("disabled")?,
        })
    })
    .transpose()
}

/// Marks a token used: its successor is being issued.
pub async fn mark_rotated(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE colloquy.refresh_tokens SET rotated_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Revokes every token of `family` not yet revoked; returns how many.
pub async fn revoke_family(conn: &mut PgConnection, family: Uuid) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE colloquy.refresh_tokens SET revoked_at = now()
         WHERE family = $1 AND revoked_at IS NULL",
    )
    .bind(family)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Revokes the family of the token with this hash, if it is `user_id`'s; returns how
/// many tokens were revoked.
pub async fn revoke_family_of(
    pool: &PgPool,
    user_id: Uuid,
    token_hash: &[u8],
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE colloquy.refresh_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL
           AND family = (SELECT family FROM colloquy.refresh_tokens
                         WHERE token_hash = $1 AND user_id = $2)",
    )
    .bind(token_hash)
    .bind(user_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// An account as operators see it (`colloquy admin users …`). Never the hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub is_admin: bool,
    pub disabled: bool,
}

/// The account with this id or (lower-cased) email.
pub async fn find_account(
    pool: &PgPool,
    id_or_email: &str,
) -> Result<Option<Account>, sqlx::Error> {
    let id = Uuid::try_parse(id_or_email).ok();
    let row = sqlx::query(
        "SELECT id, email, is_admin, disabled FROM colloquy.users
          WHERE ($1::uuid IS NOT NULL AND id = $1) OR email = $2",
    )
    .bind(id)
    .bind(id_or_email.trim().to_lowercase())
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(Account {
            id: row.try_get("id")?,
            email: row.try_get("email")?,
            is_admin: row.try_get("is_admin")?,
            disabled: row.try_get("disabled")?,
        })
    })
    .transpose()
}

/// Grants or revokes the admin role. It reaches tokens at the next login or refresh
/// (access tokens carry it and are not revocable).
pub async fn set_admin(pool: &PgPool, id: Uuid, admin: bool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE colloquy.users SET is_admin = $2 WHERE id = $1")
        .bind(id)
        .bind(admin)
        .execute(pool)
        .await?;
    Ok(())
}

/// Disables an account and revokes every refresh token it holds, in one transaction,
/// so no session outlives the change by more than an access token's lifetime. Returns
/// how many tokens were revoked.
pub async fn disable_account(pool: &PgPool, id: Uuid) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE colloquy.users SET disabled = true WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let revoked = sqlx::query(
        "UPDATE colloquy.refresh_tokens SET revoked_at = now()
          WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(revoked.rows_affected())
}
