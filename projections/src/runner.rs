//! Running a projection: apply batches with their checkpoint in one transaction,
//! catch up from the log, and follow it.
//!
//! Every batch takes a transaction-scoped advisory lock on the projection's schema
//! name, so a live runner and a rebuild's swap never interleave, and two runners of
//! one projection (two processes) apply each event once: the checkpoint is read under
//! the lock and events at or below it are skipped.

use std::sync::Arc;

use colloquy_eventstore::{
    EventStore, GlobalPosition, LogFilter, RecordedEvent, Subscription, SubscriptionItem,
};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::projection::Projection;

/// Largest batch applied in one transaction.
pub const BATCH: usize = 500;

/// Applies `events` to `projection`'s tables in `schema` and advances its checkpoint to
/// the last event's position, all in one transaction. Events at or below the stored
/// checkpoint are skipped (redelivery changes nothing). Returns the new checkpoint.
pub async fn apply_batch(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    events: &[RecordedEvent],
) -> anyhow::Result<GlobalPosition> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    set_schema(&mut tx, schema).await?;
    let mut checkpoint: i64 = sqlx::query_scalar("SELECT position FROM checkpoint FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    let start = checkpoint;
    let fresh: Vec<&RecordedEvent> = events
        .iter()
        .filter(|e| e.global_position > start)
        .collect();
    if let Some(last) = fresh.last() {
        checkpoint = last.global_position;
        if fresh.len() == events.len() {
            projection.apply_all(&mut tx, events).await?;
        } else {
            let fresh: Vec<RecordedEvent> = fresh.into_iter().cloned().collect();
            projection.apply_all(&mut tx, &fresh).await?;
        }
    }
    if checkpoint != start {
        sqlx::query("UPDATE checkpoint SET position = $1, updated_at = now()")
            .bind(checkpoint)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(checkpoint)
}

/// Points unqualified table names at `schema` for the rest of the transaction.
pub(crate) async fn set_schema(conn: &mut sqlx::PgConnection, schema: &str) -> anyhow::Result<()> {
    check_schema(schema)?;
    sqlx::query(AssertSqlSafe(format!(
        "SET LOCAL search_path TO \"{schema}\", public"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Schema names are spliced into SQL, so they must be plain lowercase identifiers
/// (they come from the code, never from input).
fn check_schema(schema: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        schema.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "BUG: schema names are lowercase identifiers"
    );
    Ok(())
}

/// A projection's checkpoint in `schema`.
pub async fn read_checkpoint(pool: &PgPool, schema: &str) -> anyhow::Result<GlobalPosition> {
    check_schema(schema)?;
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT position FROM \"{schema}\".checkpoint"
    )))
    .fetch_one(pool)
    .await?)
}

/// One projection's live runner.
#[derive(Debug, Clone)]
pub struct Runner {
    pool: PgPool,
    store: Arc<dyn EventStore>,
    projection: Arc<dyn Projection>,
    checkpoint: Arc<watch::Sender<GlobalPosition>>,
}

impl Runner {
    pub fn new(pool: PgPool, store: Arc<dyn EventStore>, projection: Arc<dyn Projection>) -> Self {
        Self {
            pool,
            store,
            projection,
            checkpoint: Arc::new(watch::channel(0).0),
        }
    }

    pub fn projection(&self) -> &Arc<dyn Projection> {
        &self.projection
    }

    /// The log this runner reads.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The checkpoint as this process last saw it; changes after every batch.
    pub fn watch(&self) -> watch::Receiver<GlobalPosition> {
        self.checkpoint.subscribe()
    }

    /// The stored checkpoint.
    pub async fn checkpoint(&self) -> anyhow::Result<GlobalPosition> {
        read_checkpoint(&self.pool, self.projection.schema()).await
    }

    /// Applies a batch to the live tables.
    pub async fn apply(&self, events: &[RecordedEvent]) -> anyhow::Result<GlobalPosition> {
        let position = apply_batch(
            &self.pool,
            self.projection.as_ref(),
            self.projection.schema(),
            events,
        )
        .await?;
        self.checkpoint.send_if_modified(|current| {
            let newer = position > *current;
            if newer {
                *current = position;
            }
            newer
        });
        Ok(position)
    }

    /// Reads the log from the checkpoint up to (at least) `until` and applies it:
    /// how gaps in the fan-out are healed, and how a runner starts.
    pub async fn catch_up(&self, until: Option<GlobalPosition>) -> anyhow::Result<GlobalPosition> {
        let mut position = self.checkpoint().await?;
        loop {
            if until.is_some_and(|u| position >= u) {
                return Ok(position);
            }
            let events = self
                .store
                .read_log(&LogFilter::All, position, BATCH)
                .await?;
            let Some(last) = events.last().map(|e| e.global_position) else {
                return Ok(position);
            };
            let applied = self.apply(&events).await?;
            position = applied.max(last);
        }
    }

    /// Follows the log directly (catch-up subscription, woken by appends) until
    /// `shutdown`: the embedded mode, and the fallback while the fan-out is down.
    pub async fn follow_log(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let start = self.checkpoint().await?;
        let mut subscription = Subscription::new(Arc::clone(&self.store), LogFilter::All, start);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                item = subscription.next() => item?,
            };
            match item {
                SubscriptionItem::Event(event) => {
                    batch.push(*event);
                    if batch.len() >= BATCH {
                        self.apply(&batch).await?;
                        batch.clear();
                    }
                }
                SubscriptionItem::CaughtUp(_) => {
                    if !batch.is_empty() {
                        self.apply(&batch).await?;
                        batch.clear();
                    }
                }
            }
        }
    }
}

/// How far a projection is behind the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    pub checkpoint: GlobalPosition,
    /// Events in the log after the checkpoint (approximate: positions may have gaps).
    pub events: i64,
    /// Age of the oldest event not yet applied (0 when caught up).
    pub seconds: f64,
}

/// One projection and its lag.
#[derive(Debug, Clone)]
pub struct ProjectionLag {
    pub projection: Arc<dyn Projection>,
    pub lag: Lag,
}

/// Every projection's lag, in [`crate::all_projections`] order: the one reading that
/// readiness (`/readyz`, against its budget) and the admin view both report.
pub async fn lags(pool: &PgPool) -> anyhow::Result<Vec<ProjectionLag>> {
    let mut lags = Vec::new();
    for projection in crate::all_projections() {
        let lag = lag(pool, projection.schema()).await?;
        lags.push(ProjectionLag { projection, lag });
    }
    Ok(lags)
}

/// The lag of the projection whose tables live in `schema`.
pub async fn lag(pool: &PgPool, schema: &str) -> anyhow::Result<Lag> {
    let checkpoint = read_checkpoint(pool, schema).await?;
    let (head, oldest): (Option<i64>, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT max(global_position) FROM message_store.messages),
                (SELECT extract(epoch FROM (now() AT TIME ZONE 'utc') - time)::float8
                   FROM message_store.messages WHERE global_position > $1
                  ORDER BY global_position LIMIT 1)",
    )
    .bind(checkpoint)
    .fetch_one(pool)
    .await?;
    Ok(Lag {
        checkpoint,
        events: (head.unwrap_or(0) - checkpoint).max(0),
        seconds: oldest.unwrap_or(0.0).max(0.0),
    })
}
