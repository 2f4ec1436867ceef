//! `GET /v1/admin/agent/keys`: the agent's key pool as its budgets and health show it
//! — label, project, state (`ready`, `cooling`, `exhausted_today`, `disabled`),
//! cooldown, requests this minute and today, limits, last error. Never a key: the
//! status holds labels only, and error texts are scrubbed of keys when recorded.
//!
//! The pool is the same one the agent spends from (budgets shared through NATS), so
//! any gateway shows every agent's spending.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::GatewayState;
use crate::auth::AdminUser;
use crate::error::ApiError;

/// `GET /v1/admin/agent/keys` → `{items: [KeyStatus…]}`; `{items: []}` when no keys
/// are configured; 503 when the shared budgets cannot be read.
pub(crate) async fn list(
    State(state): State<GatewayState>,
    _admin: AdminUser,
) -> Result<Response, ApiError> {
    let items = match &state.keys {
        None => Vec::new(),
        Some(pool) => pool.snapshot().await.map_err(|error| {
            tracing::warn!(error = %error, "the key pool's budgets cannot be read");
            ApiError::Unavailable {
                detail: "the key pool's budgets cannot be read; retry shortly".to_owned(),
                retry_after: Duration::from_secs(1),
            }
        })?,
    };
    Ok(Json(json!({ "items": items })).into_response())
}
