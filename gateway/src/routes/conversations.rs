//! `/v1/conversations` and `/v1/conversations/{id}`: start, rename, archive, show, list.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_domain::{ConversationCommand, ConversationId, ModelName, SystemPrompt, Title};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{
    CommandBody, Idempotency, MinPosition, Params, committed, decode_cursor, encode_cursor,
    invalid_cursor, limit, parse_id, user_id,
};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving these queries.
pub(crate) const SCHEMA: &str = "rm_messages";

#[derive(Debug, Deserialize)]
pub(crate) struct CreateBody {
    title: Option<String>,
    system_prompt: Option<String>,
    model: Option<String>,
}

/// `POST /v1/conversations` → 201 `{id, position, version}`.
pub(crate) async fn create(
    State(state): State<GatewayState>,
    user: AuthUser,
    command: CommandBody<CreateBody>,
) -> Result<Response, ApiError> {
    let CreateBody {
        title,
        system_prompt,
        model,
    } = command.body;
    let title = title
        .map(Title::parse)
        .transpose()
        .map_err(from_validation)?;
    let system_prompt = system_prompt
        .map(SystemPrompt::parse)
        .transpose()
        .map_err(from_validation)?;
    let model = model
        .map(ModelName::parse)
        .transpose()
        .map_err(from_validation)?;
    let ctx = command.idempotency.context(user);
    let id = ConversationId::from_uuid(ctx.derive_id("conversation"));
    let done = state
        .commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner: user_id(user),
                title,
                system_prompt,
                model,
            },
            &ctx,
        )
        .await?;
    let version = done.version_of(&id.stream_name()).unwrap_or_default();
    Ok(committed(
        StatusCode::CREATED,
        done.position,
        Some(json!({ "id": id, "position": done.position, "version": version })),
    ))
}

fn from_validation(error: colloquy_domain::ValidationError) -> ApiError {
    ApiError::field(error.field, error.rule.to_string())
}

#[derive(Debug, Deserialize)]
pub(crate) struct RenameBody {
    title: String,
}

/// `PATCH /v1/conversations/{id}` `{title}` → 200 `{id, position, version}`; honours
/// `If-Match: "<version>"` (412 on mismatch).
pub(crate) async fn rename(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    command: CommandBody<RenameBody>,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let title = Title::parse(command.body.title).map_err(from_validation)?;
    let ctx = command.idempotency.context(user);
    let command = ConversationCommand::Rename {
        by: user_id(user),
        title,
    };
    let done = match if_match(&headers)? {
        Some(expected) => {
            // Ownership first, so another user learns nothing from a 412. (Ownership
            // never changes, so the cached state is good enough for this.)
            let loaded = state.commands.load_conversation(id).await?;
            match &loaded.state {
                Some(c) if c.owner() == user_id(user) => {}
                _ => return Err(ApiError::NotFound),
            }
            // The version check is the append's own expectation: atomic.
            state
                .commands
                .conversation_expecting(id, command, expected, &ctx)
                .await?
        }
        None => state.commands.conversation(id, command, &ctx).await?,
    };
    let version = done.version_of(&id.stream_name()).unwrap_or_default();
    let mut response = committed(
        StatusCode::OK,
        done.position,
        Some(json!({ "id": id, "position": done.position, "version": version })),
    );
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

/// `If-Match: "<version>"`: `None` when absent or `*`; a value that is no version can
/// never match (412).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_matches('"')
        .parse::<i64>()
        .map(Some)
        .map_err(|_| ApiError::PreconditionFailed(format!("If-Match {text:?} is not a version")))
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\""))
        .expect("BUG: digits and quotes are a valid header")
}

/// `DELETE /v1/conversations/{id}` → 204: archives it (idempotent).
pub(crate) async fn archive(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    idempotency: Idempotency,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let ctx = idempotency.context(user);
    let done = state
        .commands
        .conversation(id, ConversationCommand::Archive { by: user_id(user) }, &ctx)
        .await?;
    Ok(committed(StatusCode::NO_CONTENT, done.position, None))
}

/// One conversation, as listed and shown.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct ConversationItem {
    id: Uuid,
    title: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    message_count: i32,
    last_message_preview: Option<String>,
    #[serde(skip)]
    activity_position: i64,
    #[serde(skip)]
    version: i64,
}

/// `GET /v1/conversations/{id}` → the item plus `version` (and an `ETag`). Another
/// user's, an archived or an unknown conversation is 404.
pub(crate) async fn show(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    min.wait(&state, SCHEMA).await?;
    let item: ConversationItem = sqlx::query_as(
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages.conversations
          WHERE id = $1 AND owner = $2 AND NOT archived",
    )
    .bind(id)
    .bind(user.id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    let version = item.version;
    let mut body = serde_json::to_value(&item).map_err(ApiError::internal)?;
    body["version"] = json!(version);
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/conversations?limit=&cursor=` → the caller's conversations that are not
/// archived, most recent activity first; keyset paging on `(activity_position, id)`.
pub(crate) async fn list(
    State(state): State<GatewayState>,
    user: AuthUser,
    Params(params): Params<ListParams>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let limit = limit(params.limit, 50, 200);
    let after = params
        .cursor
        .as_deref()
        .map(parse_list_cursor)
        .transpose()?;
    min.wait(&state, SCHEMA).await?;
    let (after_position, after_id) = after.unzip();
    let mut items: Vec<ConversationItem> = sqlx::query_as(
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages.conversations
          WHERE owner = $1 AND NOT archived
            AND ($2::bigint IS NULL OR (activity_position, id) < ($2, $3::uuid))
          ORDER BY activity_position DESC, id DESC
          LIMIT $4",
    )
    .bind(user.id)
    .bind(after_position)
    .bind(after_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = more
        .then(|| items.last())
        .flatten()
        .map(|last| encode_cursor(&format!("{}.{}", last.activity_position, last.id)));
    Ok(axum::Json(json!({ "items": items, "next_cursor": next_cursor })).into_response())
}

fn parse_list_cursor(cursor: &str) -> Result<(i64, Uuid), ApiError> {
    let raw = decode_cursor(cursor)?;
    let (position, id) = raw.split_once('.').ok_or_else(invalid_cursor)?;
    Ok((
        position.parse().map_err(|_| invalid_cursor())?,
        Uuid::try_parse(id).map_err(|_| invalid_cursor())?,
    ))
}
