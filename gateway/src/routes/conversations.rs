//! `/v1/conversations` and `/v1/conversations/{id}`: start, rename, archive, show, list.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_domain::{ConversationCommand, ConversationId, ModelName, SystemPrompt, Title};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    CommandBody, Idempotency, MinPosition, Params, committed, committed_empty, decode_cursor,
    encode_cursor, invalid_cursor, limit, parse_id, user_id,
};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving these queries.
pub(crate) const SCHEMA: &str = "rm_messages";

/// `POST /v1/conversations`: a new conversation. Every field is optional.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NewConversation {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    title: Option<String>,
    /// What the agent is told before the conversation; at most 32,000 characters, no
    /// NUL.
    #[schema(max_length = 32000)]
    system_prompt: Option<String>,
    /// The Gemini model the agent uses (default: the configured one); 1 to 100
    /// characters of letters, digits, `-`, `_`, `.`.
    #[schema(min_length = 1, max_length = 100)]
    model: Option<String>,
}

/// What a conversation command answers: the conversation, the global position of the
/// command's last event, and the conversation stream's version after it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConversationCommitted {
    id: Uuid,
    position: i64,
    version: i64,
}

/// `POST /v1/conversations` → 201 `{id, position, version}`.
#[utoipa::path(
    post,
    path = "/v1/conversations",
    tag = "conversations",
    operation_id = "start_conversation",
    security(("bearer" = [])),
    params(Idempotency),
    request_body = NewConversation,
    responses(
        (status = 201, description = "Started", body = ConversationCommitted,
            headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 409, description = "The conversation changed concurrently; retry"),
        (status = 413, description = "Body over 1 MiB"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is invalid, or the `Idempotency-Key` was used with another body"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn create(
    State(state): State<GatewayState>,
    user: AuthUser,
    command: CommandBody<NewConversation>,
) -> Result<Response, ApiError> {
    let NewConversation {
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
        Some(ConversationCommitted {
            id: id.as_uuid(),
            position: done.position,
            version,
        }),
    ))
}

fn from_validation(error: colloquy_domain::ValidationError) -> ApiError {
    ApiError::field(error.field, error.rule.to_string())
}

/// `PATCH /v1/conversations/{id}`: a new title.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct ConversationRename {
    /// 1 to 200 characters after trimming, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    title: String,
}

/// `PATCH /v1/conversations/{id}` `{title}` → 200 `{id, position, version}`; honours
/// `If-Match: "<version>"` (412 on mismatch).
#[utoipa::path(
    patch,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    operation_id = "rename_conversation",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The conversation"),
        ("If-Match" = Option<String>, Header,
            description = "`\"<version>\"` (or `*`): rename only if the conversation is at this version; 412 otherwise"),
        Idempotency,
    ),
    request_body = ConversationRename,
    responses(
        (status = 200, description = "Renamed", body = ConversationCommitted,
            headers(
                ("X-Colloquy-Position" = i64, description = "Global position of the command's last event"),
                ("ETag" = String, description = "`\"<version>\"` after the rename"),
            )),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation (or another user's, or archived)"),
        (status = 409, description = "The conversation changed concurrently or is archived"),
        (status = 412, description = "`If-Match` does not name the current version"),
        (status = 413, description = "Body over 1 MiB"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is invalid, or the `Idempotency-Key` was used with another body"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn rename(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    command: CommandBody<ConversationRename>,
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
        Some(ConversationCommitted {
            id: id.as_uuid(),
            position: done.position,
            version,
        }),
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
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    operation_id = "archive_conversation",
    description = "Archives the conversation: it leaves the lists, its history stays in the log. Idempotent.",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), Idempotency),
    responses(
        (status = 204, description = "Archived",
            headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation (or another user's)"),
        (status = 409, description = "The conversation changed concurrently; retry"),
        (status = 422, description = "The `Idempotency-Key` was used for another request"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
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
    Ok(committed_empty(done.position))
}

/// One conversation, as listed and shown.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub(crate) struct ConversationItem {
    id: Uuid,
    title: Option<String>,
    created_at: DateTime<Utc>,
    /// The last activity (a message sent, edited or deleted, a rename).
    updated_at: DateTime<Utc>,
    message_count: i32,
    /// The start of the latest message.
    last_message_preview: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    activity_position: i64,
    #[serde(skip)]
    #[schema(ignore)]
    version: i64,
}

/// One conversation with its stream version (what `If-Match` compares with).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Conversation {
    #[serde(flatten)]
    item: ConversationItem,
    version: i64,
}

/// A page of conversations.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConversationPage {
    items: Vec<ConversationItem>,
    /// Pass back as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// `GET /v1/conversations/{id}` → the item plus `version` (and an `ETag`). Another
/// user's, an archived or an unknown conversation is 404.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    operation_id = "show_conversation",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), MinPosition),
    responses(
        (status = 200, description = "The conversation", body = Conversation,
            headers(("ETag" = String, description = "`\"<version>\"`, for `If-Match`"))),
        (status = 400, description = "Malformed `X-Colloquy-Min-Position`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation (or another user's, or archived)"),
        (status = 503, description = "The read model has not reached the minimum position, or the database is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn show(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    min.wait(&state, SCHEMA).await?;
    let item: ConversationItem = read_query!(
        &state.db,
        query_as,
        fetch_optional,
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages.conversations
          WHERE id = $1 AND owner = $2 AND NOT archived",
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages_conversations
          WHERE id = $1 AND owner = $2 AND NOT archived",
        id,
        user.id,
    )?
    .ok_or(ApiError::NotFound)?;
    let version = item.version;
    let mut response = axum::Json(Conversation { item, version }).into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Page size: default 50, clamped to 1..=200.
    limit: Option<i64>,
    /// A `next_cursor` from the previous page (opaque).
    cursor: Option<String>,
}

/// `GET /v1/conversations?limit=&cursor=` → the caller's conversations that are not
/// archived, most recent activity first; keyset paging on `(activity_position, id)`.
#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    operation_id = "list_conversations",
    description = "The caller's conversations that are not archived, most recent activity first. \
                   No conversation that existed at the first page is skipped or shown twice; one \
                   that becomes active meanwhile may move to the top.",
    security(("bearer" = [])),
    params(ListParams, MinPosition),
    responses(
        (status = 200, description = "A page", body = ConversationPage),
        (status = 400, description = "A malformed query parameter or cursor"),
        (status = 401, description = "No valid bearer token"),
        (status = 503, description = "The read model has not reached the minimum position, or the database is unavailable; see `Retry-After`"),
    )
)]
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
    // The conversations whose activity is below the cursor's have not moved since the
    // first page (positions only grow), so the index serves them in list order.
    // Ids compare bytewise on both backends (Postgres' uuid order, SQLite's BLOB order)
    // and in `Uuid`'s `Ord`.
    let mut items: Vec<ConversationItem> = read_query!(
        &state.db,
        query_as,
        fetch_all,
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages.conversations
          WHERE owner = $1 AND NOT archived
            AND ($2::bigint IS NULL OR (activity_position, id) < ($2, $3::uuid))
          ORDER BY activity_position DESC, id DESC
          LIMIT $4",
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages_conversations
          WHERE owner = $1 AND NOT archived
            AND ($2 IS NULL OR (activity_position, id) < ($2, $3))
          ORDER BY activity_position DESC, id DESC
          LIMIT $4",
        user.id,
        after.map(|c| c.position),
        after.map(|c| c.id),
        limit + 1,
    )?;
    if let Some(cursor) = after {
        items.extend(moved_since(&state, user.id, cursor).await?);
        items.sort_by_key(|c| std::cmp::Reverse((c.activity_position, c.id)));
    }
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    // The first page fixes the snapshot every later page is ordered by: the newest
    // activity it saw.
    let snapshot = after.map_or_else(
        || items.first().map(|c| c.activity_position),
        |c| Some(c.snapshot),
    );
    let next_cursor = more
        .then(|| items.last().zip(snapshot))
        .flatten()
        .map(|(last, snapshot)| {
            encode_cursor(&format!(
                "{snapshot}.{}.{}",
                last.activity_position, last.id
            ))
        });
    Ok(axum::Json(ConversationPage { items, next_cursor }).into_response())
}

/// Where the conversation list stood when its first page was read, and where the last
/// page ended, in that first page's order.
#[derive(Debug, Clone, Copy)]
struct ListCursor {
    /// The newest activity the first page saw: every later page orders conversations
    /// by their activity as of this position.
    snapshot: i64,
    position: i64,
    id: Uuid,
}

/// The caller's conversations that became active after the cursor's snapshot and still
/// belong after the cursor in the snapshot's order, each with its activity as of the
/// snapshot (read back from the log). Without them a conversation not yet listed that
/// became active meanwhile would jump above the cursor and be skipped; one created
/// after the snapshot did not exist at the first page and is left out (it shows at the
/// top of a fresh list).
async fn moved_since(
    state: &GatewayState,
    owner: Uuid,
    cursor: ListCursor,
) -> Result<Vec<ConversationItem>, ApiError> {
    let moved: Vec<ConversationItem> = read_query!(
        &state.db,
        query_as,
        fetch_all,
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages.conversations
          WHERE owner = $1 AND NOT archived AND activity_position > $2",
        "SELECT id, title, created_at, updated_at, message_count, last_message_preview,
                activity_position, version
           FROM rm_messages_conversations
          WHERE owner = $1 AND NOT archived AND activity_position > $2",
        owner,
        cursor.snapshot,
    )?;
    let mut items = Vec::new();
    for mut item in moved {
        let stream = ConversationId::from_uuid(item.id).stream_name();
        let Some(position) = activity_as_of(state, &stream, cursor.snapshot).await? else {
            continue;
        };
        item.activity_position = position;
        if (position, item.id) < (cursor.position, cursor.id) {
            items.push(item);
        }
    }
    Ok(items)
}

/// The global position of the last event of `stream` at or below `snapshot` that moved
/// the conversation in the list (the read model's own rule,
/// [`colloquy_projections::messages::moves_activity`]); `None` if the conversation did
/// not exist then.
async fn activity_as_of(
    state: &GatewayState,
    stream: &str,
    snapshot: i64,
) -> Result<Option<i64>, ApiError> {
    const PAGE: usize = 32;
    let store = state.commands.store();
    let mut before = None;
    loop {
        let events = store
            .read_stream_backward(stream, before, PAGE)
            .await
            .map_err(colloquy_commands::CommandError::Store)?;
        for event in &events {
            if event.global_position <= snapshot
                && colloquy_projections::messages::recorded_moves_activity(event)
            {
                return Ok(Some(event.global_position));
            }
        }
        match events.last() {
            Some(oldest) if events.len() == PAGE => before = Some(oldest.position),
            _ => return Ok(None),
        }
    }
}

fn parse_list_cursor(cursor: &str) -> Result<ListCursor, ApiError> {
    let raw = decode_cursor(cursor)?;
    let mut parts = raw.splitn(3, '.');
    let (Some(snapshot), Some(position), Some(id)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_cursor());
    };
    let cursor = ListCursor {
        snapshot: snapshot.parse().map_err(|_| invalid_cursor())?,
        position: position.parse().map_err(|_| invalid_cursor())?,
        id: Uuid::try_parse(id).map_err(|_| invalid_cursor())?,
    };
    if cursor.position > cursor.snapshot {
        return Err(invalid_cursor());
    }
    Ok(cursor)
}
