//! `GET /v1/search?q=&conversation_id=&limit=&cursor=`: full-text search over the
//! caller's messages (the `search` read model).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{MinPosition, Params, decode_cursor, encode_cursor, invalid_cursor, limit};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving search.
const SCHEMA: &str = "rm_search";
/// Longest accepted query, in characters.
const MAX_QUERY_CHARS: usize = 1_000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SearchParams {
    /// What to look for, in web-search syntax (quotes, `-word`, `or`); required, not
    /// blank, at most 1,000 characters, no NUL (422 otherwise).
    #[param(required = true, min_length = 1, max_length = 1000)]
    q: Option<String>,
    /// Only this conversation (one that is not the caller's matches nothing).
    #[param(format = Uuid)]
    conversation_id: Option<String>,
    /// Page size: default 20, clamped to 1..=100.
    limit: Option<i64>,
    /// A `next_cursor` from the previous page (opaque).
    cursor: Option<String>,
}

/// One matching message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SearchHit {
    conversation_id: Uuid,
    message_id: Uuid,
    /// The matching text with the matches marked.
    snippet: String,
    /// Higher is better.
    rank: f32,
    created_at: DateTime<Utc>,
}

/// A page of hits, best first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SearchPage {
    items: Vec<SearchHit>,
    /// Pass back as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Best first; the cursor is the offset of the next page.
#[utoipa::path(
    get,
    path = "/v1/search",
    tag = "search",
    operation_id = "search",
    description = "Full-text search over the caller's messages (only the caller's conversations).",
    security(("bearer" = [])),
    params(SearchParams, MinPosition),
    responses(
        (status = 200, description = "A page of hits", body = SearchPage),
        (status = 400, description = "A malformed query parameter or cursor"),
        (status = 401, description = "No valid bearer token"),
        (status = 422, description = "`q` is missing, blank, too long or contains NUL"),
        (status = 503, description = "The read model has not reached the minimum position, or the database is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn search(
    State(state): State<GatewayState>,
    user: AuthUser,
    Params(params): Params<SearchParams>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let q = params.q.unwrap_or_default();
    if q.trim().is_empty() {
        return Err(ApiError::field("q", "must not be blank"));
    }
    if q.chars().count() > MAX_QUERY_CHARS || q.contains('\0') {
        return Err(ApiError::field(
            "q",
            format!("must be at most {MAX_QUERY_CHARS} characters without NUL"),
        ));
    }
    // An id that is not a UUID matches none of the caller's conversations.
    let conversation = match params.conversation_id.as_deref() {
        Some(raw) => match Uuid::try_parse(raw) {
            Ok(id) => Some(id),
            Err(_) => return Ok(empty()),
        },
        None => None,
    };
    let limit = limit(params.limit, 20, 100);
    let offset = match params.cursor.as_deref() {
        Some(cursor) => decode_cursor(cursor)?
            .parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(invalid_cursor)?,
        None => 0,
    };
    min.wait(&state, SCHEMA).await?;
    let mut hits = colloquy_projections::search::search(
        &state.db,
        user.id,
        &q,
        conversation,
        limit + 1,
        offset,
    )
    .await?;
    let page = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = hits.len() > page;
    hits.truncate(page);
    let items = hits
        .into_iter()
        .map(|h| SearchHit {
            conversation_id: h.conversation_id,
            message_id: h.message_id,
            snippet: h.snippet,
            rank: h.rank,
            created_at: h.created_at,
        })
        .collect();
    let next_cursor = more.then(|| encode_cursor(&(offset + limit).to_string()));
    Ok(axum::Json(SearchPage { items, next_cursor }).into_response())
}

fn empty() -> Response {
    axum::Json(SearchPage {
        items: Vec::new(),
        next_cursor: None,
    })
    .into_response()
}
