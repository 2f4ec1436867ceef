//! Dead letters: runs that failed because the agent's retry schedule ran out (their
//! reason starts with [`DEAD_LETTER_PREFIX`]), listed from the runs read model, and
//! brought back one at a time once their cause is fixed.
//!
//! A retry is the domain's `ReviveRun`: the run is `retrying` again (same attempt,
//! due now) and open again in its conversation, and the agent's sweep starts its next
//! attempt. Only a dead letter can be revived, and not while another run of its
//! conversation is open: anything else is 409.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_commands::{CommandError, Commands, Context};
use colloquy_domain::RunId;
use colloquy_domain::process::{ProcessCommand, ReviveRun};
use colloquy_domain::run::DEAD_LETTER_PREFIX;
use colloquy_eventstore::{Database, GlobalPosition};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::GatewayState;
use crate::auth::AdminUser;
use crate::error::ApiError;
use crate::routes::{
    Idempotency, MinPosition, Params, committed, decode_cursor, encode_cursor, invalid_cursor,
    limit, parse_id, read_query,
};

/// The read model serving the list.
const SCHEMA: &str = "rm_runs";

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// A run whose retries ran out, as the runs read model shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub error: String,
    pub attempts: i32,
    pub finished_at: DateTime<Utc>,
    /// The run's last event, for position waits.
    pub position: i64,
}

/// Up to `limit` dead letters, newest first, after `after` (`(finished_at, id)` of the
/// last one already seen). Shared by the HTTP list and `colloquy admin runs
/// dead-letters`, so both show the same runs.
pub async fn list_dead_letters(
    db: &Database,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let (after_time, after_id) = after.unzip();
    // On SQLite `finished_at` is RFC 3339 text in UTC, bound from Rust like the cursor's
    // time, which sorts and compares chronologically.
    read_query!(
        db,
        query_as,
        fetch_all,
        "SELECT id, conversation_id, error, attempts, finished_at, position
           FROM rm_runs.runs
          WHERE status = 'failed' AND starts_with(error, $1) AND finished_at IS NOT NULL
            AND ($2::timestamptz IS NULL OR (finished_at, id) < ($2, $3::uuid))
          ORDER BY finished_at DESC, id DESC
          LIMIT $4",
        "SELECT id, conversation_id, error, attempts, finished_at, position
           FROM rm_runs_runs
          WHERE status = 'failed' AND substr(error, 1, length($1)) = $1
            AND finished_at IS NOT NULL
            AND ($2 IS NULL OR (finished_at, id) < ($2, $3))
          ORDER BY finished_at DESC, id DESC
          LIMIT $4",
        DEAD_LETTER_PREFIX,
        after_time,
        after_id,
        limit,
    )
}

/// How many dead letters the runs read model holds (`colloquy_agent_dead_letters`): the
/// runs [`list_dead_letters`] lists.
pub async fn count_dead_letters(db: &Database) -> Result<i64, sqlx::Error> {
    read_query!(
        db,
        query_scalar,
        fetch_one,
        "SELECT count(*) FROM rm_runs.runs
          WHERE status = 'failed' AND starts_with(error, $1) AND finished_at IS NOT NULL",
        "SELECT count(*) FROM rm_runs_runs
          WHERE status = 'failed' AND substr(error, 1, length($1)) = $1
            AND finished_at IS NOT NULL",
        DEAD_LETTER_PREFIX,
    )
}

/// Revives the dead letter `run_id` (the domain's `ReviveRun`, due now) as `ctx`'s
/// user; `Ok(None)` when the log has no such run. Read from the log, not a cache: the
/// run was settled by an agent elsewhere. Shared by the HTTP retry and `colloquy admin
/// runs retry`.
pub async fn revive_dead_letter(
    commands: &Commands,
    run_id: RunId,
    ctx: &Context,
) -> Result<Option<GlobalPosition>, CommandError> {
    let loaded = commands.reload_run(run_id).await?;
    let Some(conversation) = loaded
        .state
        .as_ref()
        .map(colloquy_domain::AgentRun::conversation_id)
    else {
        return Ok(None);
    };
    let done = commands
        .process(
            conversation,
            run_id,
            ProcessCommand::ReviveRun(ReviveRun {
                not_before: Utc::now(),
            }),
            ctx,
        )
        .await?;
    Ok(Some(done.position))
}

/// `GET /v1/admin/runs/dead-letters?limit=&cursor=` → `{items: [{id, conversation_id,
/// error, attempts, finished_at, position}], next_cursor}`, newest first; keyset
/// paging on `(finished_at, id)`; `limit` defaults to 50, at most 200.
pub(crate) async fn dead_letters(
    State(state): State<GatewayState>,
    _admin: AdminUser,
    Params(params): Params<ListParams>,
    min: MinPosition,
) -> Result<Response, ApiError> {
    let limit = limit(params.limit, 50, 200);
    let after = params.cursor.as_deref().map(parse_cursor).transpose()?;
    min.wait(&state, SCHEMA).await?;
    let mut items = list_dead_letters(&state.db, after, limit + 1).await?;
    let page = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = items.len() > page;
    items.truncate(page);
    let next_cursor = more.then(|| items.last()).flatten().map(|last| {
        encode_cursor(&format!(
            "{}.{}",
            last.finished_at.timestamp_micros(),
            last.id
        ))
    });
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })).into_response())
}

/// A cursor is the last item's `finished_at` (microseconds since the epoch, Postgres'
/// precision, so the comparison is exact) and id.
fn parse_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let raw = decode_cursor(cursor)?;
    let (micros, id) = raw.split_once('.').ok_or_else(invalid_cursor)?;
    let micros: i64 = micros.parse().map_err(|_| invalid_cursor())?;
    Ok((
        DateTime::from_timestamp_micros(micros).ok_or_else(invalid_cursor)?,
        Uuid::try_parse(id).map_err(|_| invalid_cursor())?,
    ))
}

/// `POST /v1/admin/runs/{run_id}/retry` → 202 `{run_id, position}`: the dead letter
/// is `retrying` again, due now. 404 for an unknown run; 409 (`not_a_dead_letter`,
/// `run_already_active`, `archived`) when it cannot come back.
pub(crate) async fn retry(
    State(state): State<GatewayState>,
    admin: AdminUser,
    Path(run_id): Path<String>,
    idempotency: Idempotency,
) -> Result<Response, ApiError> {
    let run_id = RunId::from_uuid(parse_id(&run_id)?);
    let ctx = idempotency.context(admin.0);
    let position = revive_dead_letter(&state.commands, run_id, &ctx)
        .await?
        .ok_or(ApiError::NotFound)?;
    tracing::info!(run.id = %run_id, by = %admin.0.id, "dead letter revived");
    Ok(committed(
        StatusCode::ACCEPTED,
        position,
        Some(json!({ "run_id": run_id, "position": position })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_to_the_microsecond() {
        let at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let id = Uuid::new_v4();
        let cursor = encode_cursor(&format!("{}.{id}", at.timestamp_micros()));
        assert_eq!(parse_cursor(&cursor).unwrap(), (at, id));
        assert!(parse_cursor(&encode_cursor("x.y")).is_err());
    }
}
