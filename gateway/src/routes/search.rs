//! `GET /v1/search?q=&conversation_id=&limit=&cursor=`: full-text search over the
//! caller's messages (the `search` read model).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{MinPosition, Params, decode_cursor, encode_cursor, invalid_cursor, limit};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving search.
const SCHEMA: &str = "rm_search";
/// Longest accepted query, in characters.
const MAX_QUERY_CHARS: usize = 1_000;

#[derive(Debug, Deserialize)]
pub(crate) struct SearchParams {
    q: Option<String>,
    conversation_id: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Best first; the cursor is the offset of the next page.
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
        &state.pool,
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
    let items: Vec<_> = hits
        .iter()
        .map(|h| {
            json!({
                "conversation_id": h.conversation_id,
                "message_id": h.message_id,
                "snippet": h.snippet,
                "rank": h.rank,
                "created_at": h.created_at,
            })
        })
        .collect();
    let next_cursor = more.then(|| encode_cursor(&(offset + limit).to_string()));
    Ok(axum::Json(json!({ "items": items, "next_cursor": next_cursor })).into_response())
}

fn empty() -> Response {
    axum::Json(json!({ "items": [], "next_cursor": null })).into_response()
}
