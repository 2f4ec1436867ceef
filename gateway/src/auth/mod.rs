//! Authentication: accounts with email and password, short-lived JWT access tokens,
//! rotating refresh tokens, and the [`AuthUser`] extractor every `/v1` route uses.
//!
//! Routes (JSON; errors are problem+json, see [`crate::error`]):
//! - `POST /v1/auth/register {email, password, display_name?}` → 201 `{user_id}`
//! - `POST /v1/auth/login {email, password}` → 200 `{access_token, refresh_token,
//!   token_type, expires_in}`
//! - `POST /v1/auth/refresh {refresh_token}` → 200, same shape; the token rotates
//! - `POST /v1/auth/logout {refresh_token}` (bearer) → 204; revokes the token's family
//! - `GET /v1/me` (bearer) → `{user_id, admin}`
//!
//! The four `/v1/auth` routes are rate-limited per client address ([`RateLimit`]).
//!
//! Layout: [`tokens`] (JWT keys, refresh tokens), [`password`] (Argon2id off the
//! runtime), [`input`] (validated registration fields), [`extract`] ([`AuthUser`]),
//! [`store`] (the SQL, on Postgres or the embedded mode's SQLite file), `rate_limit`,
//! `routes` (the handlers).
//!
//! Only Colloquy's own tokens are accepted. Tokens of an external identity provider
//! (`COLLOQUY_OIDC_*`: issuer, audience, JWKS URL, algorithms) are not supported yet;
//! they belong in the verification step of [`AuthUser`], next to [`tokens::JwtKeys`].

pub mod extract;
pub mod input;
pub mod password;
mod rate_limit;
mod routes;
pub mod store;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRef;
use colloquy_eventstore::Database;
use secrecy::SecretString;

pub use extract::{AdminUser, AuthUser};
pub use rate_limit::RateLimit;
pub(crate) use routes::routes;
pub use tokens::{AccessClaims, JwtKeys, KeyError};

use crate::GatewayState;
use crate::error::ApiError;
use password::Passwords;
pub(crate) use rate_limit::limit_commands_by_user;
use rate_limit::{IpLimiter, KeyedLimiter};

/// How authentication is configured.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// `COLLOQUY_JWT_SECRET`: the HS256 secret (at least 32 bytes). Unset (and no key
    /// file): a random secret per process, with a warning.
    pub jwt_secret: Option<SecretString>,
    /// `COLLOQUY_JWT_PRIVATE_KEY_FILE`: not supported yet; refused at start.
    pub jwt_private_key_file: Option<PathBuf>,
    /// The per-address budget of the `/v1/auth` routes.
    pub rate_limit: RateLimit,
    /// The per-user budget of commands (`None`: [`RateLimit::commands`]).
    pub command_rate_limit: Option<RateLimit>,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot prepare password hashing: {0}")]
    Passwords(#[source] ApiError),
}

/// What the auth routes and [`AuthUser`] share. Cheap to clone.
#[derive(Clone)]
pub struct AuthState {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where accounts and refresh tokens live (either backend; see [`store`]).
    db: Database,
    keys: JwtKeys,
    passwords: Passwords,
    limiter: IpLimiter,
    command_limiter: KeyedLimiter<uuid::Uuid>,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("keys", &self.inner.keys)
            .field("limiter", &self.inner.limiter)
            .finish_non_exhaustive()
    }
}

impl AuthState {
    /// Sets up the signing keys (failing on a bad setting, named) and the password
    /// hasher, whose dummy hash costs one hash at start. Accounts are kept in `db`.
    pub async fn new(db: Database, settings: AuthSettings) -> Result<Self, AuthSetupError> {
        let keys = JwtKeys::from_settings(
            settings.jwt_secret.as_ref(),
            settings.jwt_private_key_file.as_deref(),
        )?;
        let passwords = Passwords::new().await.map_err(AuthSetupError::Passwords)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                keys,
                passwords,
                limiter: IpLimiter::new(settings.rate_limit),
                command_limiter: KeyedLimiter::new(
                    settings
                        .command_rate_limit
                        .unwrap_or_else(RateLimit::commands),
                ),
            }),
        })
    }

    /// The access-token keys (for tools and tests that mint tokens).
    pub fn keys(&self) -> &JwtKeys {
        &self.inner.keys
    }

    /// The database accounts and refresh tokens are kept in.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }
}

impl FromRef<GatewayState> for AuthState {
    fn from_ref(state: &GatewayState) -> Self {
        state.auth.clone()
    }
}
