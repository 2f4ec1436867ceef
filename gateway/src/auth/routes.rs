//! The handlers of `/v1/auth/…` and `/v1/me`, each with its OpenAPI description.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, middleware};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use super::input::{DisplayName, Email, Password, plausible_password};
use super::store::{self, InsertUserError, Transaction};
use super::tokens::{ACCESS_TOKEN_TTL, AccessClaims, new_refresh_token, refresh_token_hash};
use super::{AuthState, AuthUser, rate_limit};
use crate::GatewayState;
use crate::error::{ApiError, ApiJson, FieldError};

/// The longest refresh token looked up (ours are 43 characters).
const MAX_REFRESH_TOKEN_CHARS: usize = 128;

pub(crate) fn routes(auth: &AuthState) -> Router<GatewayState> {
    let limited = Router::from(limited_api()).layer(middleware::from_fn_with_state(
        auth.clone(),
        rate_limit::limit_by_ip,
    ));
    limited.merge(Router::from(me_api()))
}

/// The four `/v1/auth` routes (rate-limited per client address by [`routes`]).
fn limited_api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(register))
        .routes(utoipa_axum::routes!(login))
        .routes(utoipa_axum::routes!(refresh))
        .routes(utoipa_axum::routes!(logout))
}

/// `/v1/me` and the key set: not rate-limited.
fn me_api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(me))
        .routes(utoipa_axum::routes!(jwks))
}

impl AuthState {
    /// The OpenAPI description of the routes [`routes`] serves: the same registration,
    /// so the two cannot disagree. (Here, next to the handlers, because this module is
    /// private to [`crate::auth`].)
    pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
        limited_api().merge(me_api()).into_openapi()
    }
}

/// A new account.
#[derive(Debug, Deserialize, ToSchema)]
struct RegisterRequest {
    /// `local@domain.tld`, at most 254 characters; stored trimmed and lower-cased.
    #[schema(max_length = 254, example = "ada@example.com")]
    email: String,
    /// 8 to 1,024 characters.
    #[schema(value_type = String, min_length = 8, max_length = 1024, format = Password)]
    password: SecretString,
    /// 1 to 100 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    display_name: Option<String>,
}

/// The new account.
#[derive(Debug, Serialize, ToSchema)]
struct Registered {
    user_id: Uuid,
}

#[utoipa::path(
    post,
    path = "/v1/auth/register",
    tag = "auth",
    operation_id = "register",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = Registered),
        (status = 400, description = "Malformed JSON"),
        (status = 409, description = "The email is taken (`email_taken`)"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is missing or invalid; `errors` names each"),
        (status = 429, description = "Too many requests from this address, or too many passwords being checked at once; see `Retry-After`"),
    )
)]
#[tracing::instrument(skip_all, fields(user.id = tracing::field::Empty))]
async fn register(
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    let email = Email::parse(&body.email)
        .map_err(|m| errors.push(FieldError::new("email", m)))
        .ok();
    let password = Password::parse(body.password)
        .map_err(|m| errors.push(FieldError::new("password", m)))
        .ok();
    let display_name = match body.display_name.as_deref().map(DisplayName::parse) {
        Some(Ok(name)) => Some(name),
        Some(Err(m)) => {
            errors.push(FieldError::new("display_name", m));
            None
        }
        None => None,
    };
    let (Some(email), Some(password)) = (email, password) else {
        return Err(ApiError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let hash = auth.inner.passwords.hash(password.into_secret()).await?;
    let id = Uuid::new_v4();
    store::insert_user(
        &auth.inner.db,
        id,
        email.as_str(),
        &hash,
        display_name.as_ref().map(DisplayName::as_str),
    )
    .await
    .map_err(|error| match error {
        InsertUserError::EmailTaken => ApiError::Conflict {
            code: "email_taken",
            detail: "an account with this email already exists".to_owned(),
        },
        InsertUserError::Database(error) => ApiError::from(error),
    })?;
    tracing::Span::current().record("user.id", tracing::field::display(id));
    tracing::info!("user registered");
    Ok((StatusCode::CREATED, Json(Registered { user_id: id })).into_response())
}

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
struct LoginRequest {
    email: String,
    #[schema(value_type = String, format = Password)]
    password: SecretString,
}

/// Tokens as login and refresh return them. (No `Debug`: it holds live tokens.)
#[derive(Serialize, ToSchema)]
struct TokenResponse {
    /// A JWT for `Authorization: Bearer …`.
    access_token: String,
    /// Exchanges for new tokens once (`POST /v1/auth/refresh`); it rotates, and reusing
    /// a rotated one revokes the whole family.
    refresh_token: String,
    #[schema(value_type = String, pattern = "^Bearer$", example = "Bearer")]
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
}

impl IntoResponse for TokenResponse {
    fn into_response(self) -> Response {
        let mut response = Json(self).into_response();
        // RFC 6749 §5.1: responses carrying tokens are not cached.
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "auth",
    operation_id = "login",
    description = "The same answer and the same work whether the email exists or not.",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenResponse,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "Wrong email or password, or a disabled account (`invalid_credentials`)"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is missing or of the wrong type"),
        (status = 429, description = "Too many requests from this address, or too many passwords being checked at once; see `Retry-After`"),
    )
)]
#[tracing::instrument(skip_all, fields(user.id = tracing::field::Empty))]
async fn login(
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<TokenResponse, ApiError> {
    // The same work whatever is wrong: one lookup, then one Argon2id verification (against
    // a dummy hash when there is no such account or the password is impossibly long).
    let account = store::credentials(&auth.inner.db, &Email::normalize(&body.email)).await?;
    let plausible = plausible_password(&body.password);
    let stored = account
        .as_ref()
        .filter(|_| plausible)
        .map(|a| a.password_hash.clone());
    let matched = auth.inner.passwords.verify(body.password, stored).await?;
    let account = match account {
        Some(account) if matched && !account.disabled => account,
        _ => return Err(ApiError::InvalidCredentials),
    };
    tracing::Span::current().record("user.id", tracing::field::display(account.id));
    let mut tx = Transaction::begin(&auth.inner.db).await?;
    let tokens = issue(&auth, &mut tx, account.id, account.is_admin, Uuid::new_v4()).await?;
    tx.commit().await?;
    tracing::info!("user logged in");
    Ok(tokens)
}

/// Stores a new refresh token of `family` and signs an access token.
async fn issue(
    auth: &AuthState,
    tx: &mut Transaction,
    user: Uuid,
    admin: bool,
    family: Uuid,
) -> Result<TokenResponse, ApiError> {
    let refresh_token = new_refresh_token();
    store::insert_refresh_token(
        tx,
        family,
        user,
        &refresh_token_hash(refresh_token.expose_secret()),
    )
    .await?;
    let access_token = auth
        .inner
        .keys
        .sign(&AccessClaims::new(user, admin))
        .map_err(ApiError::internal)?;
    Ok(TokenResponse {
        access_token,
        refresh_token: refresh_token.expose_secret().to_owned(),
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_TTL.as_secs(),
    })
}

/// A refresh token (to exchange, or to revoke).
#[derive(Debug, Deserialize, ToSchema)]
struct RefreshRequest {
    #[schema(value_type = String)]
    refresh_token: SecretString,
}

#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    operation_id = "refresh",
    description = "Exchanges a refresh token for new tokens. The token rotates: reusing a rotated \
                   one revokes its whole family.",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = TokenResponse,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "Unknown, expired, revoked or reused refresh token (`invalid_refresh_token`)"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is missing or of the wrong type"),
        (status = 429, description = "Too many requests from this address; see `Retry-After`"),
    )
)]
#[tracing::instrument(skip_all, fields(user.id = tracing::field::Empty))]
async fn refresh(
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<TokenResponse, ApiError> {
    let token = body.refresh_token.expose_secret();
    if token.len() > MAX_REFRESH_TOKEN_CHARS {
        return Err(ApiError::InvalidRefreshToken);
    }
    let mut tx = Transaction::begin(&auth.inner.db).await?;
    let Some(presented) = store::lock_refresh_token(&mut tx, &refresh_token_hash(token)).await?
    else {
        return Err(ApiError::InvalidRefreshToken);
    };
    tracing::Span::current().record("user.id", tracing::field::display(presented.user_id));
    if presented.revoked || presented.expired {
        return Err(ApiError::InvalidRefreshToken);
    }
    if presented.rotated {
        // Reuse: the token was stolen, or replayed by a confused client. Either way no
        // token of this session can be trusted any more.
        let revoked = store::revoke_family(&mut tx, presented.family).await?;
        tx.commit().await?;
        tracing::warn!(
            token.family = %presented.family,
            tokens.revoked = revoked,
            "a rotated refresh token was reused: its family is revoked"
        );
        return Err(ApiError::InvalidRefreshToken);
    }
    if presented.disabled {
        store::revoke_family(&mut tx, presented.family).await?;
        tx.commit().await?;
        return Err(ApiError::InvalidRefreshToken);
    }
    store::mark_rotated(&mut tx, presented.id).await?;
    let tokens = issue(
        &auth,
        &mut tx,
        presented.user_id,
        presented.is_admin,
        presented.family,
    )
    .await?;
    tx.commit().await?;
    Ok(tokens)
}

#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    operation_id = "logout",
    description = "Revokes the refresh token's family. Idempotent: an unknown token, or another \
                   user's, revokes nothing and is still 204.",
    security(("bearer" = [])),
    request_body = RefreshRequest,
    responses(
        (status = 204, description = "Logged out"),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "No valid bearer token"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is missing or of the wrong type"),
        (status = 429, description = "Too many requests from this address; see `Retry-After`"),
    )
)]
#[tracing::instrument(skip_all, fields(user.id = %user.id))]
async fn logout(
    user: AuthUser,
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let token = body.refresh_token.expose_secret();
    // An unknown token, or another user's, revokes nothing and says so to nobody:
    // logging out is idempotent.
    if token.len() <= MAX_REFRESH_TOKEN_CHARS {
        let revoked =
            store::revoke_family_of(&auth.inner.db, user.id, &refresh_token_hash(token)).await?;
        tracing::info!(tokens.revoked = revoked, "user logged out");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller, as their access token says.
#[derive(Debug, Serialize, ToSchema)]
struct Me {
    user_id: Uuid,
    /// Whether the token grants the admin role.
    admin: bool,
}

#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "auth",
    operation_id = "me",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = Me),
        (status = 401, description = "No valid bearer token"),
    )
)]
async fn me(user: AuthUser) -> Json<Me> {
    Json(Me {
        user_id: user.id,
        admin: user.admin,
    })
}

/// How long other services may cache the key set. A new key file takes effect at the
/// next start; verifiers that cached the old set pick up the new `kid` when they next
/// fetch (most refetch on an unknown `kid` at once).
const JWKS_MAX_AGE_SECS: u64 = 300;

#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "operations",
    operation_id = "jwks",
    description = "The public keys that verify Colloquy's access tokens, as a JWK set (RFC 7517), \
                   for other services: the public half of `COLLOQUY_JWT_PRIVATE_KEY_FILE`, named \
                   by the `kid` every token carries. Empty when tokens are signed with a shared \
                   secret (`COLLOQUY_JWT_SECRET`), which is never published. No token needed.",
    responses(
        (status = 200, description = "The key set: `{keys: [JWK…]}`", content_type = "application/json", body = Object,
            headers(("Cache-Control" = String, description = "`public, max-age=300`"))),
    )
)]
async fn jwks(State(auth): State<AuthState>) -> Response {
    let mut response = Json(auth.inner.keys.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE_SECS}"))
            .expect("BUG: a valid header value"),
    );
    response
}

/// The handlers on the embedded mode's SQLite file (the API suite drives them over HTTP
/// on Postgres).
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use colloquy_eventstore::Database;

    use super::*;
    use crate::auth::AuthSettings;

    /// An [`AuthState`] on a fresh SQLite file, removed when dropped.
    struct Embedded {
        auth: AuthState,
        dir: PathBuf,
    }

    impl Drop for Embedded {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn embedded() -> Embedded {
        let dir = std::env::temp_dir().join(format!("colloquy-auth-{}", Uuid::new_v4().simple()));
        let pool = colloquy_eventstore::sqlite::open(&dir.join("colloquy.db"))
            .await
            .unwrap();
        let auth = AuthState::new(Database::Sqlite(pool), AuthSettings::default())
            .await
            .unwrap();
        Embedded { auth, dir }
    }

    async fn register_as(auth: &AuthState, email: &str) -> Result<Uuid, ApiError> {
        let response = register(
            State(auth.clone()),
            ApiJson(RegisterRequest {
                email: email.to_owned(),
                password: SecretString::from("correct horse"),
                display_name: Some("Ada".to_owned()),
            }),
        )
        .await?;
        assert_eq!(response.status(), StatusCode::CREATED);
        let id = store::credentials(auth.database(), &email.to_lowercase())
            .await
            .unwrap()
            .unwrap()
            .id;
        Ok(id)
    }

    async fn login_as(auth: &AuthState, email: &str) -> Result<TokenResponse, ApiError> {
        login(
            State(auth.clone()),
            ApiJson(LoginRequest {
                email: email.to_owned(),
                password: SecretString::from("correct horse"),
            }),
        )
        .await
    }

    async fn refresh_with(auth: &AuthState, token: &str) -> Result<TokenResponse, ApiError> {
        refresh(
            State(auth.clone()),
            ApiJson(RefreshRequest {
                refresh_token: SecretString::from(token),
            }),
        )
        .await
    }

    #[tokio::test]
    async fn register_login_refresh_and_reuse_on_sqlite() {
        let test = embedded().await;
        let auth = &test.auth;
        let id = register_as(auth, "Ada@Example.com").await.unwrap();
        let taken = register_as(auth, "ada@EXAMPLE.com").await;
        assert!(
            matches!(
                taken,
                Err(ApiError::Conflict {
                    code: "email_taken",
                    ..
                })
            ),
            "{taken:?}"
        );

        let tokens = login_as(auth, "ADA@example.com").await.unwrap();
        let claims = auth.keys().verify(&tokens.access_token).unwrap();
        assert_eq!(claims.sub, id);
        assert!(!claims.admin);

        // Refresh rotates, and carries the current admin flag.
        store::set_admin(auth.database(), id, true).await.unwrap();
        let rotated = refresh_with(auth, &tokens.refresh_token).await.unwrap();
        assert_ne!(rotated.refresh_token, tokens.refresh_token);
        assert!(auth.keys().verify(&rotated.access_token).unwrap().admin);

        // Reusing the rotated token fails and takes its successor with it.
        let reused = refresh_with(auth, &tokens.refresh_token).await;
        assert!(matches!(reused, Err(ApiError::InvalidRefreshToken)));
        let successor = refresh_with(auth, &rotated.refresh_token).await;
        assert!(matches!(successor, Err(ApiError::InvalidRefreshToken)));

        // A new login is a new family; logout revokes it.
        let again = login_as(auth, "ada@example.com").await.unwrap();
        let status = logout(
            AuthUser { id, admin: false },
            State(auth.clone()),
            ApiJson(RefreshRequest {
                refresh_token: SecretString::from(again.refresh_token.clone()),
            }),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT);
        let after_logout = refresh_with(auth, &again.refresh_token).await;
        assert!(matches!(after_logout, Err(ApiError::InvalidRefreshToken)));
    }

    #[tokio::test]
    async fn disabled_and_forgotten_accounts_cannot_log_in_on_sqlite() {
        let test = embedded().await;
        let auth = &test.auth;
        let id = register_as(auth, "ada@example.com").await.unwrap();
        let tokens = login_as(auth, "ada@example.com").await.unwrap();

        assert_eq!(
            store::disable_account(auth.database(), id).await.unwrap(),
            1
        );
        let login_refused = login_as(auth, "ada@example.com").await;
        assert!(matches!(login_refused, Err(ApiError::InvalidCredentials)));
        let refresh_refused = refresh_with(auth, &tokens.refresh_token).await;
        assert!(matches!(
            refresh_refused,
            Err(ApiError::InvalidRefreshToken)
        ));

        assert!(store::forget_account(auth.database(), id).await.unwrap());
        let forgotten = login_as(auth, "ada@example.com").await;
        assert!(matches!(forgotten, Err(ApiError::InvalidCredentials)));
        // The email can be registered again, as a new account.
        assert_ne!(register_as(auth, "ada@example.com").await.unwrap(), id);
    }
}
