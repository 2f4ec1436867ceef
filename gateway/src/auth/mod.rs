//! Authentication: accounts with email and password, short-lived JWT access tokens,
//! rotating refresh tokens, tokens of an external identity provider, and the
//! [`AuthUser`] extractor every `/v1` route uses.
//!
//! Routes (JSON; errors are problem+json, see [`crate::error`]):
//! - `POST /v1/auth/register {email, password, display_name?}` → 201 `{user_id}`
//! - `POST /v1/auth/login {email, password}` → 200 `{access_token, refresh_token,
//!   token_type, expires_in}`
//! - `POST /v1/auth/refresh {refresh_token}` → 200, same shape; the token rotates
//! - `POST /v1/auth/logout {refresh_token}` (bearer) → 204; revokes the token's family
//! - `GET /v1/me` (bearer) → `{user_id, admin}`
//! - `GET /.well-known/jwks.json` → the public key of `COLLOQUY_JWT_PRIVATE_KEY_FILE` as
//!   a JWK set (empty with `COLLOQUY_JWT_SECRET`), for other services to verify with
//!
//! The four `/v1/auth` routes are rate-limited per client address ([`RateLimit`]).
//!
//! Layout: [`tokens`] (JWT keys, refresh tokens), [`oidc`] (an external identity
//! provider's tokens), [`password`] (Argon2id off the runtime), [`input`] (validated
//! registration fields), [`extract`] ([`AuthUser`]), [`store`] (the SQL, on Postgres or
//! the embedded mode's SQLite file), `rate_limit`, `routes` (the handlers).
//!
//! Which key verifies a bearer token ([`AuthState::authenticate`]): with a provider
//! configured, a token whose `iss` is the provider's goes to [`oidc`], every other one
//! to Colloquy's own key ([`tokens::JwtKeys`]); each pins its algorithms, issuer and
//! audience, so reading `iss` before verifying only picks which check applies.

pub mod extract;
pub mod input;
pub mod oidc;
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
pub use oidc::OidcSettings;
pub use rate_limit::{RateLimit, TrustedProxies};
pub(crate) use routes::routes;
pub use tokens::{AccessClaims, JwtKeys, KeyError};

use crate::GatewayState;
use crate::error::ApiError;
use oidc::{OidcError, OidcVerifier};
use password::Passwords;
pub(crate) use rate_limit::limit_commands_by_user;
use rate_limit::{IpLimiter, KeyedLimiter};

/// How authentication is configured.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// `COLLOQUY_JWT_SECRET`: the HS256 secret (at least 32 bytes). Unset (and no key
    /// file): a random secret per process, with a warning.
    pub jwt_secret: Option<SecretString>,
    /// `COLLOQUY_JWT_PRIVATE_KEY_FILE`: a PEM private key (RSA, EC P-256/P-384 or
    /// Ed25519) to sign with instead of a secret; its public half is published at
    /// `/.well-known/jwks.json`. Setting both is an error.
    pub jwt_private_key_file: Option<PathBuf>,
    /// `COLLOQUY_OIDC_*`: an external identity provider whose tokens are accepted too.
    pub oidc: Option<OidcSettings>,
    /// The per-address budget of the `/v1/auth` routes.
    pub rate_limit: RateLimit,
    /// The per-user budget of commands (`None`: [`RateLimit::commands`]).
    pub command_rate_limit: Option<RateLimit>,
    /// `COLLOQUY_TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` names the client
    /// for the per-address budget.
    pub trusted_proxies: TrustedProxies,
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot prepare password hashing: {0}")]
    Passwords(#[source] ApiError),
    #[error("{0}")]
    Oidc(String),
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
    /// The external identity provider, when configured.
    oidc: Option<OidcVerifier>,
    passwords: Passwords,
    limiter: IpLimiter,
    trusted_proxies: TrustedProxies,
    command_limiter: KeyedLimiter<uuid::Uuid>,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("keys", &self.inner.keys)
            .field("oidc", &self.inner.oidc)
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
        let oidc = settings
            .oidc
            .map(OidcVerifier::new)
            .transpose()
            .map_err(AuthSetupError::Oidc)?;
        let passwords = Passwords::new().await.map_err(AuthSetupError::Passwords)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                keys,
                oidc,
                passwords,
                limiter: IpLimiter::new(settings.rate_limit),
                trusted_proxies: settings.trusted_proxies,
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

    /// The caller a bearer token stands for: a token of Colloquy's own key, or of the
    /// external identity provider (see the module docs). Any invalid token is 401
    /// `unauthorized`, its reason logged at debug level only; 503 when the provider's
    /// keys are needed but none could ever be fetched.
    pub async fn authenticate(&self, token: &str) -> Result<AuthUser, ApiError> {
        if let Some(oidc) = &self.inner.oidc
            && unverified_issuer(token).as_deref() == Some(oidc.issuer())
        {
            return match oidc.verify(token).await {
                Ok(id) => Ok(AuthUser { id, admin: false }),
                Err(OidcError::Rejected(why)) => {
                    tracing::debug!(reason = %why, "identity provider token rejected");
                    Err(ApiError::Unauthorized)
                }
                Err(OidcError::Unavailable) => Err(ApiError::Unavailable {
                    detail: "the identity provider's keys cannot be fetched; try again".into(),
                    retry_after: std::time::Duration::from_secs(5),
                }),
            };
        }
        let claims = self.inner.keys.verify(token).map_err(|error| {
            // The reason stays in the logs; the client learns only "401".
            tracing::debug!(error = %error, "bearer token rejected");
            ApiError::Unauthorized
        })?;
        Ok(AuthUser {
            id: claims.sub,
            admin: claims.admin,
        })
    }

    /// The database accounts and refresh tokens are kept in.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }
}

/// A token's `iss`, read without verifying anything: only to pick the key that verifies.
fn unverified_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: Option<serde_json::Value>,
    }
    let claims: Issuer = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    match claims.iss? {
        serde_json::Value::String(issuer) => Some(issuer),
        _ => None,
    }
}

impl FromRef<GatewayState> for AuthState {
    fn from_ref(state: &GatewayState) -> Self {
        state.auth.clone()
    }
}
