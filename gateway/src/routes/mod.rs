//! The REST commands and queries under `/v1` (see `docs`' api.md, "Commands" and
//! "Queries").
//!
//! - Commands go through [`colloquy_commands::Commands`]; every response carries
//!   `X-Colloquy-Position` (and `position` in its body). An `Idempotency-Key` makes a
//!   command repeatable: its [`Context`] carries the key and a fingerprint of the
//!   request (method, path, body), and the ids it creates are derived from the key, so
//!   a repeat is the same command and appends nothing.
//! - Queries read the read models (`rm_messages`, `rm_runs`, `rm_search`), after
//!   waiting, bounded, for `X-Colloquy-Min-Position` / `?min_position=`. Each query is
//!   written for both backends ([`read_query!`]): Postgres names a table
//!   `rm_messages.conversations`, SQLite `rm_messages_conversations`.
//! - Path ids that are not UUIDs are 404, like ids that exist but are not the
//!   caller's.
//! - Each handler carries its OpenAPI description (`#[utoipa::path]`), and [`api`]
//!   registers it with its route in one step, so the served router and the document
//!   (`crate::openapi`) list the same operations.

/// Runs one read-model query on whichever backend `$db` (a `&Database`) is:
/// `$postgres` and `$sqlite` are the same query in each dialect, with the same binds.
/// `$kind` is `query_as` or `query_scalar`, `$fetch` how many rows (`fetch_all`,
/// `fetch_optional`, `fetch_one`).
macro_rules! read_query {
    ($db:expr, $kind:ident, $fetch:ident, $postgres:expr, $sqlite:expr $(, $bind:expr)* $(,)?) => {
        match $db {
            colloquy_eventstore::Database::Postgres(pool) => {
                sqlx::$kind($postgres)$(.bind($bind))*.$fetch(pool).await
            }
            colloquy_eventstore::Database::Sqlite(pool) => {
                sqlx::$kind($sqlite)$(.bind($bind))*.$fetch(pool).await
            }
        }
    };
}
pub(crate) use read_query;

mod conversations;
mod messages;
mod runs;
mod search;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use colloquy_commands::Context;
use colloquy_domain::UserId;
use colloquy_eventstore::GlobalPosition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::IntoParams;
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::{ApiError, parse_json};

/// The header every command response carries: the global position of its last event.
pub const POSITION_HEADER: &str = "x-colloquy-position";
/// The header a query waits on.
pub const MIN_POSITION_HEADER: &str = "x-colloquy-min-position";
/// The header that makes a command repeatable.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// How long a query waits for its read model.
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest accepted request body (413 above it).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The routes of this module.
pub(crate) fn routes() -> Router<GatewayState> {
    api().split_for_parts().0
}

/// The routes of this module with their OpenAPI descriptions.
pub(crate) fn api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(
            conversations::create,
            conversations::list
        ))
        .routes(utoipa_axum::routes!(
            conversations::show,
            conversations::rename,
            conversations::archive
        ))
        .routes(utoipa_axum::routes!(messages::send, messages::list))
        .routes(utoipa_axum::routes!(messages::edit, messages::delete))
        .routes(utoipa_axum::routes!(runs::request))
        .routes(utoipa_axum::routes!(runs::show))
        .routes(utoipa_axum::routes!(runs::cancel))
        .routes(utoipa_axum::routes!(search::search))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// A path id: anything that is not a UUID is a 404, as an unknown id is.
pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(raw).map_err(|_| ApiError::NotFound)
}

pub(crate) fn user_id(user: AuthUser) -> UserId {
    UserId::from_uuid(user.id)
}

/// A command response: `status`, `X-Colloquy-Position`, and `body` (if any).
pub(crate) fn committed<T: Serialize>(
    status: StatusCode,
    position: GlobalPosition,
    body: Option<T>,
) -> Response {
    let mut response = match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    response
        .headers_mut()
        .insert(POSITION_HEADER, HeaderValue::from(position));
    response
}

/// A `204 No Content` command response with `X-Colloquy-Position`.
pub(crate) fn committed_empty(position: GlobalPosition) -> Response {
    committed(StatusCode::NO_CONTENT, position, None::<()>)
}

/// A command's idempotency: the client's key and the request's fingerprint.
#[derive(Debug, Clone)]
pub(crate) struct Idempotency(Option<(String, String)>);

/// The `Idempotency-Key` header, as every command documents it.
impl IntoParams for Idempotency {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(format!(
                    "Makes the command repeatable: a repeat with the same key and body returns \
                     the first response and appends nothing; the same key with another body \
                     is 422 `idempotency_key_reused`. 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible \
                     ASCII characters (otherwise 400 `invalid_idempotency_key`)."
                )))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(MAX_IDEMPOTENCY_KEY_LEN))
                        .pattern(Some("^[!-~]+$")),
                ))
                .build(),
        ]
    }
}

impl Idempotency {
    fn read(
        parts_headers: &HeaderMap,
        method: &Method,
        path: &str,
        body: &[u8],
    ) -> Result<Self, ApiError> {
        let Some(value) = parts_headers.get(IDEMPOTENCY_KEY_HEADER) else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN)
            .ok_or_else(|| ApiError::BadRequest {
                code: "invalid_idempotency_key",
                detail: format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
                ),
            })?;
        Ok(Self(Some((
            key.to_owned(),
            fingerprint(method, path, body),
        ))))
    }

    /// The context a command of `user` runs in.
    pub(crate) fn context(&self, user: AuthUser) -> Context {
        let ctx =
            Context::new(user_id(user)).with_traceparent(colloquy_eventstore::trace::current());
        match &self.0 {
            Some((key, fingerprint)) => ctx.with_idempotency(key.clone(), fingerprint.clone()),
            None => ctx,
        }
    }
}

/// Hex SHA-256 of the method, the path and the body bytes.
pub(crate) fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// A command with a JSON body: the parsed body and its idempotency. Rejections are
/// those of [`crate::ApiJson`], plus 400 for a malformed `Idempotency-Key`.
#[derive(Debug)]
pub(crate) struct CommandBody<T> {
    pub body: T,
    pub idempotency: Idempotency,
}

impl<T, S> FromRequest<S> for CommandBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let headers = request.headers().clone();
        let bytes = crate::error::json_body_bytes(request, state).await?;
        let idempotency = Idempotency::read(&headers, &method, &path, &bytes)?;
        let body = parse_json(&bytes)?;
        Ok(Self { body, idempotency })
    }
}

/// A command without a body (`DELETE`): only its idempotency.
impl<S: Send + Sync> FromRequestParts<S> for Idempotency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Self::read(&parts.headers, &parts.method, parts.uri.path(), &[])
    }
}

/// Query parameters whose every rejection is a problem+json 400.
#[derive(Debug)]
pub(crate) struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(value)| Self(value))
            .map_err(|rejection| ApiError::BadRequest {
                code: "invalid_query",
                detail: rejection.body_text(),
            })
    }
}

/// `X-Colloquy-Min-Position` or `?min_position=`: the position a query waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MinPosition(Option<GlobalPosition>);

/// The header and the query parameter, as every query documents them.
impl IntoParams for MinPosition {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let position = || {
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0))
        };
        let description = "Wait (at most 5 s) until the read model serving this query has \
                           reached this global position (a command's `X-Colloquy-Position`); \
                           503 with `Retry-After` if it has not. The header wins over the \
                           query parameter. Not a non-negative integer: 400 \
                           `invalid_min_position`.";
        vec![
            ParameterBuilder::new()
                .name("X-Colloquy-Min-Position")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(position()))
                .build(),
            ParameterBuilder::new()
                .name("min_position")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(position()))
                .build(),
        ]
    }
}

#[derive(Deserialize)]
struct MinPositionQuery {
    min_position: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for MinPosition {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Params(query) = Params::<MinPositionQuery>::from_request_parts(parts, state).await?;
        let header = parts
            .headers
            .get(MIN_POSITION_HEADER)
            .map(|v| v.to_str().unwrap_or("x").to_owned());
        let Some(raw) = header.or(query.min_position) else {
            return Ok(Self(None));
        };
        raw.trim()
            .parse::<GlobalPosition>()
            .ok()
            .filter(|p| *p >= 0)
            .map(|p| Self(Some(p)))
            .ok_or_else(|| ApiError::BadRequest {
                code: "invalid_min_position",
                detail: "the minimum position must be a non-negative integer".to_owned(),
            })
    }
}

impl MinPosition {
    /// Waits until the read model in `schema` has reached the position (bounded);
    /// 503 with `Retry-After: 1` if it has not.
    pub(crate) async fn wait(self, state: &GatewayState, schema: &str) -> Result<(), ApiError> {
        let Some(position) = self.0 else {
            return Ok(());
        };
        let reached = colloquy_projections::wait::wait_for_position(
            &state.db,
            schema,
            position,
            WAIT_TIMEOUT,
        )
        .await?;
        if reached {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                detail: format!("the read model has not reached position {position} yet"),
                retry_after: Duration::from_secs(1),
            })
        }
    }
}

/// `limit`: `default` when absent, clamped to `1..=max`.
pub(crate) fn limit(given: Option<i64>, default: i64, max: i64) -> i64 {
    given.unwrap_or(default).clamp(1, max)
}

/// An opaque cursor.
pub(crate) fn encode_cursor(raw: &str) -> String {
    URL_SAFE_NO_PAD.encode(raw)
}

/// The text inside an opaque cursor; 400 `invalid_cursor` when it is not one of ours.
pub(crate) fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid_cursor)
}

pub(crate) fn invalid_cursor() -> ApiError {
    ApiError::BadRequest {
        code: "invalid_cursor",
        detail: "the cursor is not valid".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let a = fingerprint(&Method::POST, "/v1/conversations", b"{}");
        assert_eq!(a.len(), 64);
        assert_eq!(a, fingerprint(&Method::POST, "/v1/conversations", b"{}"));
        assert_ne!(a, fingerprint(&Method::PATCH, "/v1/conversations", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/v1/conversation", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/v1/conversations", b"{ }"));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(
            decode_cursor(&encode_cursor("42")).ok().as_deref(),
            Some("42")
        );
        assert!(decode_cursor("!!!").is_err());
    }

    #[test]
    fn command_errors_map_to_statuses_and_codes() {
        use axum::response::IntoResponse as _;
        use colloquy_commands::CommandError;
        use colloquy_domain::{DomainError, RunId, ValidationError};
        use colloquy_eventstore::StoreError;

        let status_and_code = |error: CommandError| {
            let error = ApiError::from(error);
            (error.status().as_u16(), error.code())
        };
        assert_eq!(
            status_and_code(DomainError::NotOwner.into()),
            (404, "not_found")
        );
        assert_eq!(
            status_and_code(DomainError::NotFound.into()),
            (404, "not_found")
        );
        assert_eq!(
            status_and_code(
                DomainError::RunAlreadyActive {
                    run_id: RunId::from_uuid(Uuid::nil())
                }
                .into()
            ),
            (409, "run_already_active")
        );
        assert_eq!(
            status_and_code(CommandError::IdempotencyMismatch),
            (422, "idempotency_key_reused")
        );
        assert_eq!(
            status_and_code(CommandError::Conflict { stream: "s".into() }),
            (409, "conflict")
        );
        let unavailable = ApiError::from(CommandError::Store(StoreError::Closed));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.into_response().headers()["retry-after"], "1");
        assert_eq!(
            status_and_code(CommandError::Store(StoreError::DuplicateEventId {
                id: Uuid::nil()
            })),
            (500, "internal")
        );
        let invalid = ApiError::from(CommandError::Domain(DomainError::Validation(
            ValidationError::new("text", colloquy_domain::text::Rule::Blank),
        )));
        match invalid {
            ApiError::Validation(errors) => assert_eq!(errors[0].field, "text"),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(limit(None, 50, 200), 50);
        assert_eq!(limit(Some(0), 50, 200), 1);
        assert_eq!(limit(Some(1_000), 50, 200), 200);
    }
}
