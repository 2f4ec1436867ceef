//! The handlers of `/v1/auth/…` and `/v1/me`.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::input::{DisplayName, Email, Password, plausible_password};
use super::tokens::{ACCESS_TOKEN_TTL, AccessClaims, new_refresh_token, refresh_token_hash};
use super::{AuthState, AuthUser, rate_limit, store};
use crate::GatewayState;
use crate::error::{ApiError, ApiJson, FieldError, OnConstraint};

/// The longest refresh token looked up (ours are 43 characters).
const MAX_REFRESH_TOKEN_CHARS: usize = 128;

pub(crate) fn routes(auth: &AuthState) -> Router<GatewayState> {
    let limited = Router::new()
        .route("/register", post(register))
        .route("/login", post(login))
        .route("/refresh", post(refresh))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(
            auth.clone(),
            rate_limit::limit_by_ip,
        ));
    Router::new()
        .nest("/v1/auth", limited)
        .route("/v1/me", get(me))
}

#[derive(Debug, Deserialize)]
struct RegisterRequest {
    email: String,
    password: SecretString,
    display_name: Option<String>,
}

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
        &auth.inner.pool,
        id,
        email.as_str(),
        &hash,
        display_name.as_ref().map(DisplayName::as_str),
    )
    .await
    .on_constraint(store::EMAIL_KEY, || ApiError::Conflict {
        code: "email_taken",
        detail: "an account with this email already exists".to_owned(),
    })?;
    tracing::Span::current().record("user.id", tracing::field::display(id));
    tracing::info!("user registered");
    Ok((StatusCode::CREATED, Json(json!({ "user_id": id }))).into_response())
}

#[derive(Debug, Deserialize)]
struct LoginRequest {
    email: String,
    password: SecretString,
}

/// Tokens as login and refresh return them. (No `Debug`: it holds live tokens.)
#[derive(Serialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
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

#[tracing::instrument(skip_all, fields(user.id = tracing::field::Empty))]
async fn login(
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<TokenResponse, ApiError> {
    // The same work whatever is wrong: one lookup, then one Argon2id verification (against
    // a dummy hash when there is no such account or the password is impossibly long).
    let account = store::credentials(&auth.inner.pool, &Email::normalize(&body.email)).await?;
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
    let mut conn = auth.inner.pool.acquire().await?;
    let tokens = issue(
        &auth,
        &mut conn,
        account.id,
        account.is_admin,
        Uuid::new_v4(),
    )
    .await?;
    tracing::info!("user logged in");
    Ok(tokens)
}

/// Stores a new refresh token of `family` and signs an access token.
async fn issue(
    auth: &AuthState,
    conn: &mut PgConnection,
    user: Uuid,
    admin: bool,
    family: Uuid,
) -> Result<TokenResponse, ApiError> {
    let refresh_token = new_refresh_token();
    store::insert_refresh_token(
        conn,
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

#[derive(Debug, Deserialize)]
struct RefreshRequest {
    refresh_token: SecretString,
}

#[tracing::instrument(skip_all, fields(user.id = tracing::field::Empty))]
async fn refresh(
    State(auth): State<AuthState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<TokenResponse, ApiError> {
    let token = body.refresh_token.expose_secret();
    if token.len() > MAX_REFRESH_TOKEN_CHARS {
        return Err(ApiError::InvalidRefreshToken);
    }
    let mut tx = auth.inner.pool.begin().await?;
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
            store::revoke_family_of(&auth.inner.pool, user.id, &refresh_token_hash(token)).await?;
        tracing::info!(tokens.revoked = revoked, "user logged out");
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn me(user: AuthUser) -> Json<Value> {
    Json(json!({ "user_id": user.id, "admin": user.admin }))
}
