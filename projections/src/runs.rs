//! The `runs` read model: each run's status, stage, percent, attempts, last error,
//! reply message, token usage and timestamps.

use async_trait::async_trait;
use colloquy_domain::{RUN_CATEGORY, RunEvent};
use colloquy_eventstore::RecordedEvent;
use sqlx::PgConnection;

use crate::projection::{Projection, decode};

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

    async fn apply(&self, conn: &mut PgConnection, event: &RecordedEvent) -> anyhow::Result<()> {
        let Some((stream_id, e)) = decode::<RunEvent>(event, RUN_CATEGORY) else {
            return Ok(());
        };
        let run = stream_id;
        let (time, gp) = (event.time, event.global_position);
        let query = match &e {
            RunEvent::RunRequested(r) => {
                sqlx::query(
                    "INSERT INTO runs (id, conversation_id, requested_by, prompt_message_id, model, status, position, created_at)
                     VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(run)
                .bind(r.conversation_id.as_uuid())
                .bind(r.requested_by.as_uuid())
                .bind(r.prompt_message_id.as_uuid())
                .bind(&r.model)
                .bind(gp)
                .bind(time)
                .execute(&mut *conn)
                .await?;
                return Ok(());
            }
            RunEvent::RunStarted(s) => sqlx::query(
                "UPDATE runs SET status = 'running', attempts = $3, stage = 'started', percent = 0,
                        started_at = coalesce(started_at, $4), not_before = NULL, position = $2
                  WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(i64::from(s.attempt))
            .bind(time),
            RunEvent::RunProgressed(p) => sqlx::query(
                "UPDATE runs SET stage = $3, percent = $4, position = $2 WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(p.stage.clone())
            .bind(i16::from(p.percent)),
            // After `failed` this is a dead letter revived: the run is live again, so
            // it has no finish time until it finishes anew.
            RunEvent::RunRetryScheduled(r) => sqlx::query(
                "UPDATE runs SET status = 'retrying', error = $3, not_before = $4, stage = NULL,
                        finished_at = NULL, position = $2
                  WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(r.reason.clone())
            .bind(r.not_before),
            RunEvent::RunCompleted(c) => sqlx::query(
                "UPDATE runs SET status = 'succeeded', reply_message_id = $3, usage = $4, percent = 100,
                        stage = 'done', error = NULL, finished_at = $5, position = $2
                  WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(c.reply_message_id.as_uuid())
            .bind(serde_json::to_value(c.usage)?)
            .bind(time),
            RunEvent::RunFailed(f) => sqlx::query(
                "UPDATE runs SET status = 'failed', error = $3, attempts = greatest(attempts, $4),
                        finished_at = $5, position = $2
                  WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(f.reason.clone())
            .bind(i64::from(f.attempts))
            .bind(time),
            RunEvent::RunCancelled(_) => sqlx::query(
                "UPDATE runs SET status = 'cancelled', finished_at = $3, position = $2 WHERE id = $1",
            )
            .bind(run)
            .bind(gp)
            .bind(time),
        };
        query.execute(&mut *conn).await?;
        Ok(())
    }
}
