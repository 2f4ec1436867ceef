//! Agent runs: request (`POST /v1/conversations/{id}/runs`), show (`GET
//! /v1/runs/{run_id}`, from `rm_runs`) and cancel (`POST /v1/runs/{run_id}/cancel`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_domain::process::{CancelRun, ProcessCommand, RequestRun};
use colloquy_domain::{ConversationId, DomainError, Instructions, ModelName, RunId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{CommandBody, Idempotency, MinPosition, committed, parse_id, user_id};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving run queries.
const SCHEMA: &str = "rm_runs";

#[derive(Debug, Deserialize)]
pub(crate) struct RequestBody {
    model: Option<String>,
    instructions: Option<String>,
}

/// `POST /v1/conversations/{id}/runs` `{model?, instructions?}` → 202
/// `{run_id, position}`; 409 while another run of the conversation is active.
pub(crate) async fn request(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    command: CommandBody<RequestBody>,
) -> Result<Response, ApiError> {
    let id = ConversationId::from_uuid(parse_id(&id)?);
    let model = command
        .body
        .model
        .map(ModelName::parse)
        .transpose()
        .map_err(DomainError::from)?;
    let instructions = command
        .body
        .instructions
        .map(Instructions::parse)
        .transpose()
        .map_err(DomainError::from)?;
    let ctx = command.idempotency.context(user);
    let run_id = RunId::from_uuid(ctx.derive_id("run"));
    let done = state
        .commands
        .process(
            id,
            run_id,
            ProcessCommand::RequestRun(RequestRun {
                run_id,
                by: user_id(user),
                model,
                instructions,
            }),
            &ctx,
        )
        .await?;
    Ok(committed(
        StatusCode::ACCEPTED,
        done.position,
        Some(json!({ "run_id": run_id, "position": done.position })),
    ))
}

/// `POST /v1/runs/{run_id}/cancel` → 202 `{run_id, position}`.
pub(crate) async fn cancel(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(run_id): Path<String>,
    idempotency: Idempotency,
) -> Result<Response, ApiError> {
    let run_id = RunId::from_uuid(parse_id(&run_id)?);
    let loaded = state.commands.load_run(run_id).await?;
    let conversation = match &loaded.state {
        Some(run) if run.requested_by() == user_id(user) => run.conversation_id(),
        _ => return Err(ApiError::NotFound),
    };
    let ctx = idempotency.context(user);
    let done = state
        .commands
        .process(
            conversation,
            run_id,
            ProcessCommand::CancelRun(CancelRun { by: user_id(user) }),
            &ctx,
        )
        .await?;
    Ok(committed(
        StatusCode::ACCEPTED,
        done.position,
        Some(json!({ "run_id": run_id, "position": done.position })),
    ))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct RunView {
    id: Uuid,
    conversation_id: Uuid,
    status: String,
    stage: Option<String>,
    percent: i16,
    attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_message_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
    position: i64,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
}

/// `GET /v1/runs/{run_id}` → the run as the `runs` read model has it; another
/// user's run is 404.
pub(crate) async fn show(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(run_id): Path<String>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let run_id = parse_id(&run_id)?;
    min.wait(&state, SCHEMA).await?;
    let run: RunView = sqlx::query_as(
        "SELECT id, conversation_id, status, stage, percent, attempts, error, reply_message_id,
                usage, position, created_at, started_at, finished_at
           FROM rm_runs.runs
          WHERE id = $1 AND requested_by = $2",
    )
    .bind(run_id)
    .bind(user.id)
    .fetch_optional(&state.pool)
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(run).into_response())
}
