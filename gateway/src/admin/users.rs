//! `POST /v1/admin/users/{user_id}/forget`: erasure ("a user can be forgotten"; see
//! `docs/adr/0003-erasure-by-redaction.md`).
//!
//! The account goes first (email, password hash, flags and refresh tokens are deleted:
//! `auth::store::forget_account`), so the user cannot log in or refresh while their
//! text is being redacted. The log is redacted in place, at once: every event the user wrote and every event
//! of the conversations they own. The read models are copies of the log and keep the
//! text until they are rebuilt; a full rebuild costs as much as the log is long, so it
//! is left to the operator (the body says how) rather than started on every erasure.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use colloquy_domain::UserId;
use serde_json::json;

use crate::GatewayState;
use crate::auth::{AdminUser, store};
use crate::error::ApiError;
use crate::routes::parse_id;

/// What the operator still has to do after an erasure.
const READ_MODELS_NOTE: &str = "rebuild with colloquy replay --all (or POST /v1/admin/projections/{name}/rebuild for each of messages, runs and search)";

/// `POST /v1/admin/users/{user_id}/forget` → 200 `{user_id, account_erased,
/// events_redacted, streams, read_models}`. Repeating it erases and redacts nothing
/// more (`account_erased: false`, `events_redacted: 0`).
pub(crate) async fn forget(
    State(state): State<GatewayState>,
    admin: AdminUser,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    let user = UserId::from_uuid(parse_id(&user_id)?);
    let account_erased = store::forget_account(state.auth.database(), user.as_uuid()).await?;
    let report = state.commands.forget_user(user).await?;
    tracing::info!(
        user.id = %user,
        by = %admin.0.id,
        account_erased,
        events = report.events_redacted,
        streams = report.streams.len(),
        "user forgotten in the log"
    );
    Ok(Json(json!({
        "user_id": user,
        "account_erased": account_erased,
        "events_redacted": report.events_redacted,
        "streams": report.streams,
        "read_models": READ_MODELS_NOTE,
    }))
    .into_response())
}
