//! The HTTP edge's one error type, [`ApiError`], and the JSON body extractor
//! [`ApiJson`] whose rejections are `ApiError`s.
//!
//! Every error response is `application/problem+json` (RFC 9457):
//! `{type, title, status, detail, code, request_id}`, plus `errors: [{field, message}]`
//! for 422. `code` is the stable, machine-readable part; `detail` is for people.
//! `type` is `about:blank`, so `title` is the status's reason phrase (RFC 9457 §4.2.1).
//!
//! How `request_id` gets in: [`ApiError::into_response`](IntoResponse) cannot see the
//! request, so it attaches the [`Problem`] to the response's extensions, and the
//! [`problem_request_id`] middleware (installed by [`crate::router`]) fills in the id of
//! the request (its `X-Request-Id`, set by tower-http's `SetRequestIdLayer` when the
//! client sent none) and renders the body again.
//!
//! Internal errors are logged once, here, with their cause chain, and answered with an
//! opaque 500: no internal detail is ever returned.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A boxed error with its cause chain, for [`ApiError::Internal`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What went wrong, as the client is told. Each variant's doc names its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not syntactically valid JSON.
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),

    /// 400 with a caller-chosen code: a request that cannot be understood (an unreadable
    /// body, a bad query parameter).
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },

    /// 401 `unauthorized`: the bearer token is missing, malformed, expired, tampered
    /// with, wrongly signed or for another issuer or audience. Carries
    /// `WWW-Authenticate: Bearer`. Which of these it was is logged at debug level, never
    /// told to the client.
    #[error("missing or invalid bearer token")]
    Unauthorized,

    /// 401 `invalid_credentials`: login failed. The same for an unknown email, a wrong
    /// password and a disabled account.
    #[error("invalid email or password")]
    InvalidCredentials,

    /// 401 `invalid_refresh_token`: the refresh token is unknown, expired, revoked, or
    /// was already used (which revokes its whole family).
    #[error("invalid refresh token")]
    InvalidRefreshToken,

    /// 403 `forbidden`: authenticated, but the token lacks the role (admin routes).
    /// Never used to hide another user's resource: that is 404.
    #[error("forbidden")]
    Forbidden,

    /// 404 `not_found`: no such resource (or it belongs to another user).
    #[error("not found")]
    NotFound,

    /// 405 `method_not_allowed`: the path exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,

    /// 409 with a caller-chosen code (e.g. `email_taken`): the request conflicts with
    /// the current state.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },

    /// 412 `precondition_failed`: an `If-Match` did not match.
    #[error("{0}")]
    PreconditionFailed(String),

    /// 413 `payload_too_large`: the body is over the limit.
    #[error("the request body is too large")]
    PayloadTooLarge,

    /// 408 `request_timeout`: the request body did not arrive within
    /// [`BODY_TIMEOUT`] (a client trickling it, or one that stalled).
    #[error("the request body did not arrive in time")]
    RequestTimeout,

    /// 415 `unsupported_media_type`: the body is not `Content-Type: application/json`.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,

    /// 422 `validation_failed`: the body is JSON but a field is missing, of the wrong
    /// type or has an invalid value; `errors` names each field.
    #[error("validation failed")]
    Validation(Vec<FieldError>),

    /// 422 with a caller-chosen code (e.g. `idempotency_key_reused`): the request is
    /// well-formed but cannot be processed as sent.
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },

    /// 429 `rate_limited`: too many requests; carries `Retry-After` (whole seconds,
    /// rounded up).
    #[error("too many requests")]
    RateLimited { retry_after: Duration },

    /// 503 `unavailable`: a dependency is not ready; carries `Retry-After`.
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after: Duration,
    },

    /// 500 `internal`: anything else. Logged with its cause chain; the client gets
    /// an opaque body.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// One field's problem, in a 422's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's path in the body (`email`, `items[0].text`), or `body` for the
    /// body as a whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem details body: the body of every error response
/// (`application/problem+json`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status and `code` say what happened.
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "about:blank")]
    pub kind: &'static str,
    /// The status's reason phrase.
    #[schema(value_type = String, example = "Not Found")]
    pub title: &'static str,
    /// The HTTP status, repeated.
    #[schema(example = 404)]
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// What went wrong, for programs: stable (`not_found`, `validation_failed`,
    /// `email_taken`, `run_already_active`, `rate_limited`, …).
    #[schema(value_type = String, example = "not_found")]
    pub code: &'static str,
    /// The request's `X-Request-Id`, to quote when reporting a problem.
    pub request_id: Option<String>,
    /// 422 `validation_failed` only: each field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

impl Problem {
    fn response(&self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(self).expect("BUG: a problem always serialises");
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

impl ApiError {
    /// Wraps any error as an opaque 500, unless it or one of its causes is the database
    /// being unavailable (unreachable, shutting down, out of connections): then a 503
    /// with `Retry-After`, since the same request may well succeed shortly.
    pub fn internal(error: impl Into<BoxError>) -> Self {
        let error = error.into();
        if colloquy_eventstore::unavailable_cause(error.as_ref()) {
            Self::database_unavailable(error.as_ref())
        } else {
            Self::Internal(error)
        }
    }

    /// The 503 for the database being unavailable; logged once, here, as a warning.
    fn database_unavailable(error: &(dyn StdError + 'static)) -> Self {
        tracing::warn!(error = %cause_chain(error), "the database is unavailable");
        Self::Unavailable {
            detail: "the database is unavailable; retry shortly".to_owned(),
            retry_after: Duration::from_secs(1),
        }
    }

    /// A 422 for one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::InvalidCredentials | Self::InvalidRefreshToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) | Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::BadRequest { code, .. }
            | Self::Conflict { code, .. }
            | Self::Unprocessable { code, .. } => code,
            Self::Unauthorized => "unauthorized",
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidRefreshToken => "invalid_refresh_token",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PreconditionFailed(_) => "precondition_failed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Validation(_) => "validation_failed",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            Self::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            Self::Validation(_) => "the request body has invalid fields (see errors)".to_owned(),
            other => other.to_string(),
        };
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            code: self.code(),
            request_id: None,
            errors: match self {
                Self::Validation(errors) => Some(errors.clone()),
                _ => None,
            },
        }
    }
}

/// `a: b: c`, the error and its causes.
fn cause_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn retry_after(delay: Duration) -> HeaderValue {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(error) = &self {
            // The one place an internal error is logged.
            tracing::error!(error = %cause_chain(error.as_ref()), "request failed with an internal error");
        }
        let problem = self.problem();
        let mut response = problem.response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"colloquy\""),
                );
            }
            Self::RateLimited { retry_after: delay }
            | Self::Unavailable {
                retry_after: delay, ..
            } => {
                headers.insert(header::RETRY_AFTER, retry_after(*delay));
            }
            _ => {}
        }
        response.extensions_mut().insert(problem);
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::internal(error)
    }
}

/// Like [`ApiError::internal`], looking through anyhow's wrapping: an `anyhow::Error`
/// turned into a boxed error hides the error it wraps from downcasting, so the causes
/// are read from its own chain.
impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        if error.chain().any(colloquy_eventstore::unavailable_cause) {
            Self::database_unavailable(error.as_ref())
        } else {
            Self::Internal(error.into())
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        Self::internal(error)
    }
}

impl From<colloquy_domain::DomainError> for ApiError {
    fn from(error: colloquy_domain::DomainError) -> Self {
        use colloquy_domain::DomainError;
        match error {
            DomainError::Validation(v) => Self::field(v.field, v.rule.to_string()),
            // NotOwner is a 404 like a missing resource: another user's never shows.
            e if e.http_status() == 404 => Self::NotFound,
            e => Self::Conflict {
                code: e.code(),
                detail: e.to_string(),
            },
        }
    }
}

impl From<colloquy_commands::CommandError> for ApiError {
    fn from(error: colloquy_commands::CommandError) -> Self {
        use colloquy_commands::CommandError;
        match error {
            CommandError::Domain(e) => e.into(),
            CommandError::VersionMismatch {
                expected, actual, ..
            } => Self::PreconditionFailed(format!(
                "the conversation is at version {actual}, not {expected}"
            )),
            CommandError::IdempotencyMismatch => Self::Unprocessable {
                code: "idempotency_key_reused",
                detail: "the Idempotency-Key was already used for a different request".to_owned(),
            },
            CommandError::Conflict { .. } => Self::Conflict {
                code: "conflict",
                detail: "the conversation kept changing; retry the request".to_owned(),
            },
            CommandError::Store(e) if e.is_unavailable() => {
                // Logged once, here; the client learns only that it may retry.
                tracing::warn!(error = %cause_chain(&e), "event store unavailable");
                Self::Unavailable {
                    detail: "the event store is unavailable; retry shortly".to_owned(),
                    retry_after: Duration::from_secs(1),
                }
            }
            other => Self::internal(other),
        }
    }
}

/// Turns a named constraint violation into a clean 4xx (crates.io's `on_constraint`).
pub trait OnConstraint<T> {
    /// If the query failed on the constraint `name`, `map` says what the client is told;
    /// any other error stays an internal one.
    fn on_constraint(self, name: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T> OnConstraint<T> for Result<T, sqlx::Error> {
    fn on_constraint(self, name: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        self.map_err(|error| match &error {
            sqlx::Error::Database(db) if db.constraint() == Some(name) => map(),
            _ => ApiError::from(error),
        })
    }
}

/// Middleware: puts the request's `X-Request-Id` into every problem body. Sits inside
/// `SetRequestIdLayer` (so the header is always there) and outside every route.
pub async fn problem_request_id(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut response = next.run(request).await;
    if let Some(mut problem) = response.extensions_mut().remove::<Problem>() {
        problem.request_id = request_id;
        let body = serde_json::to_vec(&problem).expect("BUG: a problem always serialises");
        response.headers_mut().remove(header::CONTENT_LENGTH);
        *response.body_mut() = Body::from(body);
    }
    response
}

/// Router fallback: unknown paths are a problem+json 404.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// Router fallback: known paths with another method are a problem+json 405.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A JSON request body whose every rejection is an [`ApiError`], so axum's plain-text
/// rejections never reach clients: no or another content type → 415; not JSON → 400
/// `malformed_json`; a missing or mistyped field → 422 naming the field; too large → 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_body_bytes(request, state).await?;
        parse_json(&bytes).map(Self)
    }
}

/// The longest a request body may take to arrive once the handler reads it. Without it a
/// client trickling its body would hold the request until the 30 s request timeout,
/// which answers 503 (a server-side fault) for what is the client's.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The raw body of a JSON request: 415 unless the content type is JSON, 413 when too
/// large, 408 when it does not arrive within [`BODY_TIMEOUT`], 400 when unreadable.
/// Shared by every JSON body extractor.
pub(crate) async fn json_body_bytes<S: Send + Sync>(
    request: Request,
    state: &S,
) -> Result<Bytes, ApiError> {
    if !is_json(request.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(request, state))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest {
                    code: "unreadable_body",
                    detail: "the request body could not be read".to_owned(),
                }
            }
        })
}

/// `application/json` or any `application/*+json`, parameters (charset) ignored.
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

/// Deserialises `bytes`, telling syntax errors (400) from schema errors (422, with the
/// path of the field at fault).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => value,
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            return Err(classify(&path, &inner));
        }
    };
    deserializer
        .end()
        .map_err(|e| ApiError::MalformedJson(without_position(&e)))?;
    Ok(value)
}

fn classify(path: &str, error: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::MalformedJson(without_position(error))
        }
        Category::Data => {
            let message = without_position(error);
            let parent = (path != ".").then_some(path);
            // serde reports a missing field at its parent: name the field itself.
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.strip_suffix('`'));
            let field = match (parent, missing) {
                (Some(parent), Some(name)) => format!("{parent}.{name}"),
                (None, Some(name)) => name.to_owned(),
                (Some(parent), None) => parent.to_owned(),
                (None, None) => "body".to_owned(),
            };
            let message = if missing.is_some() {
                "is required".to_owned()
            } else {
                message
            };
            ApiError::Validation(vec![FieldError::new(field, message)])
        }
    }
}

/// serde_json's message without its ` at line L column C` suffix.
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code, reason = "only deserialised")]
    struct Body {
        email: String,
        age: u32,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code, reason = "only deserialised")]
    struct Inner {
        name: String,
    }

    fn fields(error: ApiError) -> Vec<(String, String)> {
        match error {
            ApiError::Validation(errors) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_are_malformed_json() {
        for body in [
            &b"{"[..],
            b"not json",
            b"",
            b"{\"email\": \"a\", \"age\": 1} trailing",
        ] {
            let error = parse_json::<Body>(body).unwrap_err();
            assert_eq!(error.code(), "malformed_json", "{body:?}: {error:?}");
        }
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let error = parse_json::<Body>(br#"{"age": 3}"#).unwrap_err();
        assert_eq!(fields(error), [("email".into(), "is required".into())]);
        let error = parse_json::<Body>(br#"{"email": "a", "age": "x"}"#).unwrap_err();
        assert_eq!(fields(error)[0].0, "age");
        let error = parse_json::<Body>(br#"{"email": "a", "age": 1, "inner": {}}"#).unwrap_err();
        assert_eq!(fields(error)[0].0, "inner.name");
        let error = parse_json::<Body>(b"[]").unwrap_err();
        assert_eq!(fields(error)[0].0, "body");
    }

    #[test]
    fn json_content_types() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_json(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn internal_errors_are_opaque() {
        let problem = ApiError::internal("db password is hunter2").problem();
        assert_eq!(problem.status, 500);
        assert!(!problem.detail.contains("hunter2"));
    }

    #[test]
    fn an_unavailable_database_is_a_503_wherever_it_is_found() {
        let status = |error: ApiError| {
            let response = error.into_response();
            (
                response.status().as_u16(),
                response.headers().contains_key(header::RETRY_AFTER),
            )
        };
        assert_eq!(status(sqlx::Error::PoolTimedOut.into()), (503, true));
        assert_eq!(
            status(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()).into()),
            (503, true)
        );
        // Wrapped by anyhow, with or without context.
        let wrapped =
            anyhow::Error::from(sqlx::Error::PoolTimedOut).context("reading a checkpoint");
        assert_eq!(status(wrapped.into()), (503, true));
        let bare = anyhow::Error::from(sqlx::Error::PoolTimedOut);
        assert_eq!(status(bare.into()), (503, true));
        assert_eq!(status(anyhow::anyhow!("a bug").into()), (500, false));
        assert_eq!(status(sqlx::Error::RowNotFound.into()), (500, false));
        assert_eq!(status(ApiError::internal("a bug")), (500, false));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after(Duration::from_millis(1)), "1");
        assert_eq!(retry_after(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after(Duration::ZERO), "1");
    }
}
