//! `/v1/conversations/{id}/messages`: send (optionally asking the agent to answer),
//! edit, delete, and the paged list.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_domain::process::{ProcessCommand, SendAndRequestRun};
use colloquy_domain::{ConversationCommand, ConversationId, MessageId, MessageText, RunId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::conversations::SCHEMA;
use super::{
    CommandBody, Idempotency, MinPosition, Params, committed, committed_empty, decode_cursor,
    encode_cursor, invalid_cursor, limit, parse_id, user_id,
};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// `POST /v1/conversations/{id}/messages`: a user message.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NewMessage {
    /// Not blank, at most 32,000 characters after trimming, no NUL.
    #[schema(min_length = 1, max_length = 32000)]
    text: String,
    /// Also ask the agent to answer it (a run, as `POST …/runs` would start).
    #[serde(default)]
    run_agent: bool,
}

/// What a message command answers: the message, the run it started (if any), the
/// global position of the command's last event, and the conversation stream's version.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageCommitted {
    message_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<Uuid>,
    position: i64,
    version: i64,
}

/// `POST /v1/conversations/{id}/messages` `{text, run_agent?}` → 201
/// `{message_id, run_id?, position, version}`.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "messages",
    operation_id = "send_message",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), Idempotency),
    request_body = NewMessage,
    responses(
        (status = 201, description = "Sent (and the run requested, with `run_agent`)", body = MessageCommitted,
            headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation or message (or another user's)"),
        (status = 409, description = "The conversation changed concurrently or is archived"),
        (status = 413, description = "Body over 1 MiB"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "Text blank, over 32,000 characters or with NUL; or the `Idempotency-Key` was used with another body"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn send(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    command: CommandBody<NewMessage>,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let text = MessageText::parse(command.body.text).map_err(colloquy_domain::DomainError::from)?;
    let ctx = command.idempotency.context(user);
    let message_id = MessageId::from_uuid(ctx.derive_id("message"));
    let (done, run_id) = if command.body.run_agent {
        let run_id = RunId::from_uuid(ctx.derive_id("run"));
        let done = state
            .commands
            .process(
                id,
                run_id,
                ProcessCommand::SendAndRequestRun(SendAndRequestRun {
                    message_id,
                    by: user_id(user),
                    text,
                    run_id,
                    model: None,
                    instructions: None,
                }),
                &ctx,
            )
            .await?;
        (done, Some(run_id))
    } else {
        let done = state
            .commands
            .conversation(
                id,
                ConversationCommand::SendMessage {
                    message_id,
                    by: user_id(user),
                    text,
                },
                &ctx,
            )
            .await?;
        (done, None)
    };
    let version = done.version_of(&id.stream_name()).unwrap_or_default();
    let body = MessageCommitted {
        message_id: message_id.as_uuid(),
        run_id: run_id.map(|r| r.as_uuid()),
        position: done.position,
        version,
    };
    Ok(committed(StatusCode::CREATED, done.position, Some(body)))
}

/// `PATCH /v1/conversations/{id}/messages/{message_id}`: the message's new text.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct MessageEdit {
    /// Not blank, at most 32,000 characters after trimming, no NUL.
    #[schema(min_length = 1, max_length = 32000)]
    text: String,
}

/// `PATCH /v1/conversations/{id}/messages/{message_id}` `{text}` → 200
/// `{message_id, position, version}`.
#[utoipa::path(
    patch,
    path = "/v1/conversations/{id}/messages/{message_id}",
    tag = "messages",
    operation_id = "edit_message",
    description = "Edits one of the caller's messages (not the agent's, not a deleted one).",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The conversation"),
        ("message_id" = Uuid, Path, description = "The message"),
        Idempotency,
    ),
    request_body = MessageEdit,
    responses(
        (status = 200, description = "Edited", body = MessageCommitted, headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation or message (or another user's)"),
        (status = 409, description = "The conversation changed concurrently or is archived"),
        (status = 413, description = "Body over 1 MiB"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "Text blank, over 32,000 characters or with NUL; or the `Idempotency-Key` was used with another body"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn edit(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path((id, message_id)): Path<(String, String)>,
    command: CommandBody<MessageEdit>,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let message_id = MessageId::from_uuid(parse_id(&message_id)?);
    let text = MessageText::parse(command.body.text).map_err(colloquy_domain::DomainError::from)?;
    let ctx = command.idempotency.context(user);
    let done = state
        .commands
        .conversation(
            id,
            ConversationCommand::EditMessage {
                message_id,
                by: user_id(user),
                text,
            },
            &ctx,
        )
        .await?;
    let version = done.version_of(&id.stream_name()).unwrap_or_default();
    Ok(committed(
        StatusCode::OK,
        done.position,
        Some(MessageCommitted {
            message_id: message_id.as_uuid(),
            run_id: None,
            position: done.position,
            version,
        }),
    ))
}

/// `DELETE /v1/conversations/{id}/messages/{message_id}` → 204.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}/messages/{message_id}",
    tag = "messages",
    operation_id = "delete_message",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The conversation"),
        ("message_id" = Uuid, Path, description = "The message"),
        Idempotency,
    ),
    responses(
        (status = 204, description = "Deleted", headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation or message (or another user's)"),
        (status = 409, description = "The conversation changed concurrently or is archived"),
        (status = 422, description = "The `Idempotency-Key` was used for another request"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn delete(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path((id, message_id)): Path<(String, String)>,
    idempotency: Idempotency,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let message_id = MessageId::from_uuid(parse_id(&message_id)?);
    let ctx = idempotency.context(user);
    let done = state
        .commands
        .conversation(
            id,
            ConversationCommand::DeleteMessage {
                message_id,
                by: user_id(user),
            },
            &ctx,
        )
        .await?;
    Ok(committed_empty(done.position))
}

/// At most one of `cursor`, `before` and `after` (400 otherwise).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Page size: default 50, clamped to 1..=200.
    limit: Option<i64>,
    /// A `next_cursor` from the previous page (opaque); continues in the same direction.
    cursor: Option<String>,
    /// A message id: the messages just older than it (still oldest first); paging
    /// then goes back in time. 404 if it is not a message of this conversation.
    #[param(format = Uuid)]
    before: Option<String>,
    /// A message id: the messages after it. 404 if it is not a message of this
    /// conversation.
    #[param(format = Uuid)]
    after: Option<String>,
}

/// A page of messages, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessagePage {
    items: Vec<MessageItem>,
    /// Pass back as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Where a page starts: after a `seq` (oldest first, forward) or before one (the
/// messages just older than it, still returned oldest first; paging goes backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    After(i64),
    Before(i64),
}

impl Anchor {
    /// A cursor: forward ones are the base64url of the last seq, backward ones of
    /// `b` and the oldest seq.
    fn cursor(self) -> String {
        match self {
            Self::After(seq) => encode_cursor(&seq.to_string()),
            Self::Before(seq) => encode_cursor(&format!("b{seq}")),
        }
    }

    fn from_cursor(cursor: &str) -> Result<Self, ApiError> {
        let raw = decode_cursor(cursor)?;
        let anchor = match raw.strip_prefix('b') {
            Some(seq) => seq.parse().map(Self::Before),
            None => raw.parse().map(Self::After),
        };
        anchor.map_err(|_| invalid_cursor())
    }
}

/// One message.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub(crate) struct MessageItem {
    id: Uuid,
    /// `user` or `assistant`.
    #[schema(example = "user")]
    author: String,
    /// The latest text (edits included).
    text: String,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    edited_at: Option<DateTime<Utc>>,
    /// The run that wrote it (the agent's replies).
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<Uuid>,
    #[serde(skip)]
    #[schema(ignore)]
    seq: i64,
}

/// `GET /v1/conversations/{id}/messages?limit=&cursor=&before=&after=` → `{items, next_cursor}`,
/// oldest first, deleted messages left out; keyset paging on `seq` (the message's
/// position in the conversation stream), so new messages never shift a page.
/// `after=<message id>` starts after that message; `before=<message id>` gives the
/// messages just older than it (still oldest first), and its `next_cursor` keeps
/// going back in time.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    tag = "messages",
    operation_id = "list_messages",
    description = "The conversation's messages in conversation order (oldest first), deleted ones \
                   left out. New messages never shift a page already read.",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), ListParams, MinPosition),
    responses(
        (status = 200, description = "A page", body = MessagePage),
        (status = 400, description = "A malformed query parameter or cursor, or more than one of cursor, before and after"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation (or another user's, or archived), or `before`/`after` names no message of it"),
        (status = 503, description = "The read model has not reached the minimum position, or the database is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn list(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    Params(params): Params<ListParams>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let limit = limit(params.limit, 50, 200);
    let given = [&params.cursor, &params.before, &params.after]
        .iter()
        .filter(|p| p.is_some())
        .count();
    if given > 1 {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: "give at most one of cursor, before and after".to_owned(),
        });
    }
    let cursor = params
        .cursor
        .as_deref()
        .map(Anchor::from_cursor)
        .transpose()?;
    // A before/after that is not a UUID names no message of this conversation.
    let before = params.before.as_deref().map(parse_id).transpose()?;
    let after = params.after.as_deref().map(parse_id).transpose()?;
    min.wait(&state, SCHEMA).await?;
    let visible: Option<i32> = read_query!(
        &state.db,
        query_scalar,
        fetch_optional,
        "SELECT 1 FROM rm_messages.conversations WHERE id = $1 AND owner = $2 AND NOT archived",
        "SELECT 1 FROM rm_messages_conversations WHERE id = $1 AND owner = $2 AND NOT archived",
        id,
        user.id,
    )?;
    if visible.is_none() {
        return Err(ApiError::NotFound);
    }
    let anchor = match (cursor, before, after) {
        (Some(anchor), _, _) => anchor,
        (None, Some(message), _) => Anchor::Before(seq_of(&state, id, message).await?),
        (None, None, Some(message)) => Anchor::After(seq_of(&state, id, message).await?),
        (None, None, None) => Anchor::After(-1),
    };
    let (postgres, sqlite, seq) = match anchor {
        Anchor::After(seq) => (
            "SELECT id, author, text, created_at, edited_at, run_id, seq
               FROM rm_messages.messages
              WHERE conversation_id = $1 AND NOT deleted AND seq > $2
              ORDER BY seq
              LIMIT $3",
            "SELECT id, author, text, created_at, edited_at, run_id, seq
               FROM rm_messages_messages
              WHERE conversation_id = $1 AND NOT deleted AND seq > $2
              ORDER BY seq
              LIMIT $3",
            seq,
        ),
        Anchor::Before(seq) => (
            "SELECT id, author, text, created_at, edited_at, run_id, seq
               FROM rm_messages.messages
              WHERE conversation_id = $1 AND NOT deleted AND seq < $2
              ORDER BY seq DESC
              LIMIT $3",
            "SELECT id, author, text, created_at, edited_at, run_id, seq
               FROM rm_messages_messages
              WHERE conversation_id = $1 AND NOT deleted AND seq < $2
              ORDER BY seq DESC
              LIMIT $3",
            seq,
        ),
    };
    let mut items: Vec<MessageItem> = read_query!(
        &state.db,
        query_as,
        fetch_all,
        postgres,
        sqlite,
        id,
        seq,
        limit + 1,
    )?;
    let page = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = items.len() > page;
    items.truncate(page);
    let next = match anchor {
        Anchor::After(_) => items.last().map(|m| Anchor::After(m.seq)),
        Anchor::Before(_) => {
            items.reverse();
            items.first().map(|m| Anchor::Before(m.seq))
        }
    };
    let next_cursor = next.filter(|_| more).map(Anchor::cursor);
    Ok(axum::Json(MessagePage { items, next_cursor }).into_response())
}

/// The `seq` of a message of this conversation (deleted ones too); 404 if none.
async fn seq_of(state: &GatewayState, conversation: Uuid, message: Uuid) -> Result<i64, ApiError> {
    let seq: Option<i64> = read_query!(
        &state.db,
        query_scalar,
        fetch_optional,
        "SELECT seq FROM rm_messages.messages WHERE id = $1 AND conversation_id = $2",
        "SELECT seq FROM rm_messages_messages WHERE id = $1 AND conversation_id = $2",
        message,
        conversation,
    )?;
    seq.ok_or(ApiError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_keep_their_direction() {
        for anchor in [Anchor::After(7), Anchor::Before(7), Anchor::After(-1)] {
            assert_eq!(Anchor::from_cursor(&anchor.cursor()).ok(), Some(anchor));
        }
        assert!(Anchor::from_cursor(&encode_cursor("bx")).is_err());
        assert!(Anchor::from_cursor(&encode_cursor("")).is_err());
    }
}
