//! Agent runs: request (`POST /v1/conversations/{id}/runs`), show (`GET
//! /v1/runs/{run_id}`, from `rm_runs`) and cancel (`POST /v1/runs/{run_id}/cancel`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_domain::process::{CancelRun, ProcessCommand, RequestRun};
use colloquy_domain::{ConversationId, DomainError, Instructions, ModelName, RunId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{CommandBody, Idempotency, MinPosition, committed, parse_id, user_id};
use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// The read model serving run queries.
const SCHEMA: &str = "rm_runs";

/// `POST /v1/conversations/{id}/runs`: ask the agent to answer the latest user
/// message. Both fields are optional.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct NewRun {
    /// The Gemini model for this run (default: the conversation's); 1 to 100
    /// characters of letters, digits, `-`, `_`, `.`.
    #[schema(min_length = 1, max_length = 100)]
    model: Option<String>,
    /// Added after the conversation's system prompt; at most 8,000 characters, no NUL.
    #[schema(max_length = 8000)]
    instructions: Option<String>,
}

/// What a run command answers: the run and the global position of its last event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RunAccepted {
    run_id: Uuid,
    position: i64,
}

/// `POST /v1/conversations/{id}/runs` `{model?, instructions?}` → 202
/// `{run_id, position}`; 409 while another run of the conversation is active.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/runs",
    tag = "runs",
    operation_id = "request_run",
    description = "Asks the agent to answer the conversation's latest user message. Follow it with \
                   `GET /v1/runs/{run_id}` or `GET /v1/runs/{run_id}/events`.",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), Idempotency),
    request_body = NewRun,
    responses(
        (status = 202, description = "Requested", body = RunAccepted, headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed JSON or `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such conversation (or another user's)"),
        (status = 409, description = "Another run of the conversation is active (`run_already_active`), it has no user message to answer, or it is archived"),
        (status = 413, description = "Body over 1 MiB"),
        (status = 415, description = "Body is not `application/json`"),
        (status = 422, description = "A field is invalid, or the `Idempotency-Key` was used with another body"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn request(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    command: CommandBody<NewRun>,
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
        Some(RunAccepted {
            run_id: run_id.as_uuid(),
            position: done.position,
        }),
    ))
}

/// `POST /v1/runs/{run_id}/cancel` → 202 `{run_id, position}`.
#[utoipa::path(
    post,
    path = "/v1/runs/{run_id}/cancel",
    tag = "runs",
    operation_id = "cancel_run",
    security(("bearer" = [])),
    params(("run_id" = Uuid, Path, description = "The run"), Idempotency),
    responses(
        (status = 202, description = "Cancellation requested", body = RunAccepted, headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
        (status = 400, description = "Malformed `Idempotency-Key`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such run (or another user's)"),
        (status = 409, description = "The run has already finished, or changed concurrently"),
        (status = 422, description = "The `Idempotency-Key` was used for another request"),
        (status = 429, description = "Too many commands; see `Retry-After`"),
        (status = 503, description = "The event store is unavailable; see `Retry-After`"),
    )
)]
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
        Some(RunAccepted {
            run_id: run_id.as_uuid(),
            position: done.position,
        }),
    ))
}

/// One agent run, as the `runs` read model has it.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub(crate) struct RunView {
    id: Uuid,
    conversation_id: Uuid,
    #[schema(
        pattern = "^(queued|running|retrying|succeeded|failed|cancelled)$",
        example = "running"
    )]
    status: String,
    /// The latest progress milestone.
    stage: Option<String>,
    #[schema(minimum = 0, maximum = 100)]
    percent: i16,
    attempts: i32,
    /// Why it failed (`failed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The agent's reply (`succeeded` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_message_id: Option<Uuid>,
    /// Token counts as Gemini reported them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    usage: Option<serde_json::Value>,
    /// The run's last event: wait for it (`X-Colloquy-Min-Position`) to read the reply
    /// in the messages.
    position: i64,
    created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
}

/// `GET /v1/runs/{run_id}` → the run as the `runs` read model has it; another
/// user's run is 404.
#[utoipa::path(
    get,
    path = "/v1/runs/{run_id}",
    tag = "runs",
    operation_id = "show_run",
    security(("bearer" = [])),
    params(("run_id" = Uuid, Path, description = "The run"), MinPosition),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 400, description = "Malformed `X-Colloquy-Min-Position`"),
        (status = 401, description = "No valid bearer token"),
        (status = 404, description = "No such run (or another user's)"),
        (status = 503, description = "The read model has not reached the minimum position, or the database is unavailable; see `Retry-After`"),
    )
)]
pub(crate) async fn show(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(run_id): Path<String>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let run_id = parse_id(&run_id)?;
    min.wait(&state, SCHEMA).await?;
    let run: RunView = read_query!(
        &state.db,
        query_as,
        fetch_optional,
        "SELECT id, conversation_id, status, stage, percent, attempts, error, reply_message_id,
                usage, position, created_at, started_at, finished_at
           FROM rm_runs.runs
          WHERE id = $1 AND requested_by = $2",
        "SELECT id, conversation_id, status, stage, percent, attempts, error, reply_message_id,
                usage, position, created_at, started_at, finished_at
           FROM rm_runs_runs
          WHERE id = $1 AND requested_by = $2",
        run_id,
        user.id,
    )?
    .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(run).into_response())
}
