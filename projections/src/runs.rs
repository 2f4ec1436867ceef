//! The `runs` read model: each run's status, stage, percent, attempts, last error,
//! reply message, token usage and timestamps.
//!
//! A batch loads the runs its events touch, folds the events into them ([`evolve`]) and
//! writes back the changed rows (one bulk upsert on Postgres, row by row on SQLite).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound as _, Utc};
use colloquy_domain::{RUN_CATEGORY, RunEvent};
use colloquy_eventstore::RecordedEvent;
use uuid::Uuid;

use crate::projection::{
    Bind, Columns, Conn, Projection, decode_all, distinct, rows_by_id, write_rows,
};

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Runs;

#[async_trait]
impl Projection for Runs {
    fn name(&self) -> &'static str {
        "runs"
    }

    fn schema(&self) -> &'static str {
        "rm_runs"
    }

    fn create_function(&self) -> &'static str {
        "colloquy.create_runs_read_model"
    }

    fn tables(&self) -> &'static [(&'static str, &'static str)] {
        &[("runs", "id")]
    }

    async fn apply(&self, conn: &mut Conn<'_>, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let decoded = decode_all::<RunEvent>(events, RUN_CATEGORY);
        if decoded.is_empty() {
            return Ok(());
        }
        let ids = distinct(decoded.iter().map(|(id, _, _)| *id).collect());
        let mut runs: HashMap<Uuid, RunRow> = load(conn, &ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let mut dirty = Vec::new();
        for (id, event, e) in decoded {
            let before = runs.get(&id);
            let after = evolve(before.cloned(), id, event, &e);
            if after.as_ref() != before {
                dirty.push(id);
            }
            if let Some(after) = after {
                runs.insert(id, after);
            }
        }
        let rows: Vec<&RunRow> = distinct(dirty).iter().map(|id| &runs[id]).collect();
        save(conn, &rows).await
    }
}

/// A run row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    conversation_id: Uuid,
    requested_by: Uuid,
    prompt_message_id: Uuid,
    model: Option<String>,
    status: String,
    stage: Option<String>,
    percent: i16,
    attempts: i32,
    error: Option<String>,
    reply_message_id: Option<Uuid>,
    usage: Option<serde_json::Value>,
    not_before: Option<DateTime<Utc>>,
    /// Global position of the run's last event (what a client waits on).
    position: i64,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The read model's rules: run `id`'s row after `e` (`None`: still no row). A request
/// creates the row once; every other event updates an existing row.
fn evolve(row: Option<RunRow>, id: Uuid, event: &RecordedEvent, e: &RunEvent) -> Option<RunRow> {
    let (time, gp) = (event.time, event.global_position);
    if let RunEvent::RunRequested(r) = e {
        return Some(row.unwrap_or_else(|| RunRow {
            id,
            conversation_id: r.conversation_id.as_uuid(),
            requested_by: r.requested_by.as_uuid(),
            prompt_message_id: r.prompt_message_id.as_uuid(),
            model: r.model.clone(),
            status: "queued".to_owned(),
            stage: None,
            percent: 0,
            attempts: 0,
            error: None,
            reply_message_id: None,
            usage: None,
            not_before: None,
            position: gp,
            created_at: time,
            started_at: None,
            finished_at: None,
        }));
    }
    let mut run = row?;
    match e {
        RunEvent::RunRequested(_) => {}
        RunEvent::RunStarted(s) => {
            run.status = "running".to_owned();
            run.attempts = count(s.attempt);
            run.stage = Some("started".to_owned());
            run.percent = 0;
            run.started_at = run.started_at.or(Some(time));
            run.not_before = None;
        }
        RunEvent::RunProgressed(p) => {
            run.stage = Some(p.stage.clone());
            run.percent = i16::from(p.percent);
        }
        // After `failed` this is a dead letter revived: the run is live again, so it
        // has no finish time until it finishes anew.
        RunEvent::RunRetryScheduled(r) => {
            run.status = "retrying".to_owned();
            run.error = Some(r.reason.clone());
            // Stored to the microsecond, as Postgres keeps it.
            run.not_before = Some(r.not_before.trunc_subsecs(6));
            run.stage = None;
            run.finished_at = None;
        }
        RunEvent::RunCompleted(c) => {
            run.status = "succeeded".to_owned();
            run.reply_message_id = Some(c.reply_message_id.as_uuid());
            run.usage = serde_json::to_value(c.usage).ok();
            run.percent = 100;
            run.stage = Some("done".to_owned());
            run.error = None;
            run.finished_at = Some(time);
        }
        RunEvent::RunFailed(f) => {
            run.status = "failed".to_owned();
            run.error = Some(f.reason.clone());
            run.attempts = run.attempts.max(count(f.attempts));
            run.finished_at = Some(time);
        }
        RunEvent::RunCancelled(_) => {
            run.status = "cancelled".to_owned();
            run.finished_at = Some(time);
        }
    }
    run.position = gp;
    Some(run)
}

// The SQL: how rows are loaded and written on each backend.

macro_rules! run_columns {
    () => {
        "id, conversation_id, requested_by, prompt_message_id, model, status, stage, percent, \
         attempts, error, reply_message_id, usage, not_before, position, created_at, started_at, \
         finished_at"
    };
}

async fn load(conn: &mut Conn<'_>, ids: &[Uuid]) -> anyhow::Result<Vec<RunRow>> {
    rows_by_id(
        conn,
        concat!("SELECT ", run_columns!(), " FROM runs WHERE id = ANY($1)"),
        concat!(
            "SELECT ",
            run_columns!(),
            " FROM rm_runs_runs WHERE id = $1"
        ),
        ids,
    )
    .await
}

macro_rules! run_updates {
    () => {
        " ON CONFLICT (id) DO UPDATE SET \
         status = excluded.status, stage = excluded.stage, \
         percent = excluded.percent, attempts = excluded.attempts, \
         error = excluded.error, reply_message_id = excluded.reply_message_id, \
         usage = excluded.usage, not_before = excluded.not_before, \
         position = excluded.position, started_at = excluded.started_at, \
         finished_at = excluded.finished_at"
    };
}

impl Columns for RunRow {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|r| r.id);
        bind.column(|r| r.conversation_id);
        bind.column(|r| r.requested_by);
        bind.column(|r| r.prompt_message_id);
        bind.column(|r| r.model.as_deref());
        bind.column(|r| r.status.as_str());
        bind.column(|r| r.stage.as_deref());
        bind.column(|r| r.percent);
        bind.column(|r| r.attempts);
        bind.column(|r| r.error.as_deref());
        bind.column(|r| r.reply_message_id);
        bind.column(|r| r.usage.as_ref());
        bind.column(|r| r.not_before);
        bind.column(|r| r.position);
        bind.column(|r| r.created_at);
        bind.column(|r| r.started_at);
        bind.column(|r| r.finished_at);
    }
}

async fn save(conn: &mut Conn<'_>, rows: &[&RunRow]) -> anyhow::Result<()> {
    write_rows(
        conn,
        concat!(
            "INSERT INTO runs (",
            run_columns!(),
            ")
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[],
                                  $6::text[], $7::text[], $8::smallint[], $9::int[], $10::text[],
                                  $11::uuid[], $12::jsonb[], $13::timestamptz[], $14::bigint[],
                                  $15::timestamptz[], $16::timestamptz[], $17::timestamptz[])",
            run_updates!()
        ),
        concat!(
            "INSERT INTO rm_runs_runs (",
            run_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                       $16, $17)",
            run_updates!()
        ),
        rows,
    )
    .await
}
