//! `GET /v1/admin/streams/{stream_name}?from=&limit=`: a stream's events exactly as
//! stored — type, data and metadata included — for operators who need to see what the
//! log holds (after an erasure, say, or when a read model looks wrong).
//!
//! Stream names are anything Message DB accepts (percent-encode them in the path); a
//! stream with no events reads as empty, as in Message DB.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_commands::CommandError;
use colloquy_eventstore::{GlobalPosition, RecordedEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::GatewayState;
use crate::auth::AdminUser;
use crate::error::ApiError;
use crate::routes::{Params, limit};

#[derive(Debug, Deserialize)]
pub(crate) struct ReadParams {
    /// The first stream position to return (default 0).
    from: Option<i64>,
    limit: Option<i64>,
}

/// One event, as stored.
#[derive(Debug, Serialize)]
struct EventItem {
    global_position: GlobalPosition,
    position: i64,
    time: DateTime<Utc>,
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
    metadata: Option<Value>,
    id: Uuid,
}

impl From<RecordedEvent> for EventItem {
    fn from(event: RecordedEvent) -> Self {
        Self {
            global_position: event.global_position,
            position: event.position,
            time: event.time,
            event_type: event.event_type,
            data: event.data,
            metadata: event.metadata,
            id: event.id,
        }
    }
}

/// `GET /v1/admin/streams/{stream_name}?from=&limit=` → `{items: [{global_position,
/// position, time, type, data, metadata, id}], next_from}`, oldest first from stream
/// position `from`; `limit` defaults to 100, at most 1,000. `next_from` is where the
/// next page starts, or `null` when this page was the end.
pub(crate) async fn read(
    State(state): State<GatewayState>,
    _admin: AdminUser,
    Path(stream): Path<String>,
    Params(params): Params<ReadParams>,
) -> Result<Response, ApiError> {
    let from = params.from.unwrap_or(0);
    if from < 0 {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: "from must be a non-negative stream position".to_owned(),
        });
    }
    let limit = usize::try_from(limit(params.limit, 100, 1_000)).unwrap_or(100);
    let events = state
        .commands
        .store()
        .read_stream(&stream, from, limit)
        .await
        .map_err(CommandError::from)?;
    let next_from = (events.len() == limit)
        .then(|| events.last().map(|last| last.position + 1))
        .flatten();
    let items: Vec<EventItem> = events.into_iter().map(EventItem::from).collect();
    Ok(Json(json!({ "items": items, "next_from": next_from })).into_response())
}
