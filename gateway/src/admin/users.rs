//! `POST /v1/admin/users/{user_id}/forget`: erasure ("a user can be forgotten"; see
//! `docs/adr/0003-erasure-by-redaction.md`).
//!
//! The account goes first (email, password hash, flags and refresh tokens are deleted:
//! `auth::store::forget_account`), so the user cannot log in or refresh while their text
//! is being erased. Then every copy of the text: the log is redacted in place (every
//! event the user wrote and every event of the conversations they own); the read models'
//! rows of those conversations are rewritten from the redacted log
//! (`colloquy_projections::erasure`); and the streams' messages are purged from the
//! JetStream stream (`colloquy_commands::relay::purge_streams`). [`erase_user`] does it
//! for this route and for `colloquy admin users forget`.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use colloquy_commands::Commands;
use colloquy_domain::{CONVERSATION_CATEGORY, UserId};
use colloquy_eventstore::Database;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::GatewayState;
use crate::auth::{AdminUser, store};
use crate::error::ApiError;
use crate::routes::parse_id;

/// The JetStream stream the log is fanned out to (the external mode), whose copies of
/// a forgotten user's events erasure purges.
#[derive(Debug, Clone)]
pub struct FanOutStream {
    pub jetstream: async_nats::jetstream::Context,
    /// `COLLOQUY_STREAM`.
    pub stream: String,
    /// `COLLOQUY_SUBJECT_PREFIX`.
    pub prefix: String,
}

/// What an erasure did.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AdminForgotten)]
pub struct Erasure {
    pub user_id: Uuid,
    /// Whether an account (email, password hash, refresh tokens) was deleted; false when
    /// repeated.
    pub account_erased: bool,
    /// Events redacted in the log; 0 when repeated.
    pub events_redacted: u64,
    /// The log streams that held the user's text.
    pub streams: Vec<String>,
    /// The read models whose rows of those conversations were rewritten from the
    /// redacted log.
    pub read_models: Vec<&'static str>,
    /// Messages of those streams removed from the JetStream stream; `null` without one
    /// (the embedded mode).
    pub jetstream_messages_removed: Option<u64>,
}

/// Forgets `user` everywhere their text is kept: the account, the log, the read models
/// and the JetStream stream. Repeating it is safe.
///
/// # Errors
/// The database, the log or NATS failed; what was erased before the failure stays
/// erased, and repeating the call finishes the rest.
pub async fn erase_user(
    accounts: &Database,
    read_models: &Database,
    commands: &Commands,
    fan_out: Option<&FanOutStream>,
    user: UserId,
) -> Result<Erasure, ApiError> {
    let account_erased = store::forget_account(accounts, user.as_uuid()).await?;
    let report = commands.forget_user(user).await?;
    let conversations: Vec<Uuid> = report
        .streams
        .iter()
        .filter(|s| colloquy_eventstore::category(s) == CONVERSATION_CATEGORY)
        .filter_map(|s| {
            s.split_once('-')
                .and_then(|(_, id)| Uuid::parse_str(id).ok())
        })
        .collect();
    let rewritten = colloquy_projections::erasure::rewrite_conversations(
        read_models,
        commands.store().as_ref(),
        &conversations,
    )
    .await
    .map_err(ApiError::internal)?;
    let removed = match fan_out {
        Some(fan_out) => Some(
            colloquy_commands::relay::purge_streams(
                &fan_out.jetstream,
                &fan_out.stream,
                &fan_out.prefix,
                &report.streams,
            )
            .await
            .map_err(ApiError::internal)?,
        ),
        None => None,
    };
    Ok(Erasure {
        user_id: user.as_uuid(),
        account_erased,
        events_redacted: report.events_redacted,
        streams: report.streams,
        read_models: rewritten,
        jetstream_messages_removed: removed,
    })
}

/// `POST /v1/admin/users/{user_id}/forget` → 200 [`Erasure`]. Repeating it erases and
/// redacts nothing more (`account_erased: false`, `events_redacted: 0`).
pub(crate) async fn forget(
    State(state): State<GatewayState>,
    admin: AdminUser,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    let user = UserId::from_uuid(parse_id(&user_id)?);
    let erasure = erase_user(
        state.auth.database(),
        &state.db,
        &state.commands,
        state.fan_out.as_ref(),
        user,
    )
    .await?;
    tracing::info!(
        user.id = %user,
        by = %admin.0.id,
        account_erased = erasure.account_erased,
        events = erasure.events_redacted,
        streams = erasure.streams.len(),
        jetstream_messages = erasure.jetstream_messages_removed,
        "user forgotten"
    );
    Ok(Json(erasure).into_response())
}
