//! Running a projection: apply batches with their checkpoint in one transaction,
//! catch up from the log, and follow it.
//!
//! Batches of one projection never interleave, and two runners of one projection (two
//! processes) apply each event once: the checkpoint is read under a lock and events at
//! or below it are skipped. On Postgres the lock is a transaction-scoped advisory lock
//! on the projection's schema name (which a rebuild's swap takes too); on SQLite it is
//! the database's one write lock, taken by `BEGIN IMMEDIATE`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use colloquy_eventstore::{
    Database, EventStore, GlobalPosition, LogFilter, RecordedEvent, Subscription, SubscriptionItem,
};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::projection::{Conn, Projection};

/// Largest batch applied in one transaction.
pub const BATCH: usize = 500;

/// Applies `events` to `projection`'s live tables and advances its checkpoint to the
/// last event's position, all in one transaction. Events at or below the stored
/// checkpoint are skipped (redelivery changes nothing). Returns the new checkpoint.
pub async fn apply_batch(
    db: &Database,
    projection: &dyn Projection,
    events: &[RecordedEvent],
) -> anyhow::Result<GlobalPosition> {
    match db {
        Database::Postgres(pool) => {
            apply_batch_in_schema(pool, projection, projection.schema(), events).await
        }
        Database::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            let position = apply_fresh(&mut Conn::Sqlite(&mut tx), projection, events).await?;
            tx.commit().await?;
            Ok(position)
        }
    }
}

/// [`apply_batch`] on Postgres, into the tables in `schema` (the live schema or a
/// rebuild's scratch schema), under the lock on `schema`'s name.
pub(crate) async fn apply_batch_in_schema(
    pool: &PgPool,
    projection: &dyn Projection,
    schema: &str,
    events: &[RecordedEvent],
) -> anyhow::Result<GlobalPosition> {
    let mut tx = pool.begin().await?;
    lock_schema(&mut tx, schema).await?;
    set_schema(&mut tx, schema).await?;
    let position = apply_fresh(&mut Conn::Postgres(&mut tx), projection, events).await?;
    tx.commit().await?;
    Ok(position)
}

/// Inside the caller's transaction (and lock): applies the events above the stored
/// checkpoint and advances it to the last of them. Returns the checkpoint.
pub(crate) async fn apply_fresh(
    conn: &mut Conn<'_>,
    projection: &dyn Projection,
    events: &[RecordedEvent],
) -> anyhow::Result<GlobalPosition> {
    let start = checkpoint_in(conn, projection).await?;
    let fresh: Vec<&RecordedEvent> = events
        .iter()
        .filter(|e| e.global_position > start)
        .collect();
    let Some(last) = fresh.last().map(|e| e.global_position) else {
        return Ok(start);
    };
    if fresh.len() == events.len() {
        projection.apply(conn, events).await?;
    } else {
        let fresh: Vec<RecordedEvent> = fresh.into_iter().cloned().collect();
        projection.apply(conn, &fresh).await?;
    }
    set_checkpoint_in(conn, projection, last).await?;
    Ok(last)
}

/// The checkpoint of the tables `conn` writes (locked for the transaction on
/// Postgres; SQLite's write lock is already held).
pub(crate) async fn checkpoint_in(
    conn: &mut Conn<'_>,
    projection: &dyn Projection,
) -> anyhow::Result<i64> {
    Ok(match conn {
        Conn::Postgres(conn) => {
            sqlx::query_scalar("SELECT position FROM checkpoint FOR UPDATE")
                .fetch_one(&mut **conn)
                .await?
        }
        Conn::Sqlite(conn) => {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT position FROM {}",
                sqlite_checkpoint(projection.schema())?
            )))
            .fetch_one(&mut **conn)
            .await?
        }
    })
}

pub(crate) async fn set_checkpoint_in(
    conn: &mut Conn<'_>,
    projection: &dyn Projection,
    position: GlobalPosition,
) -> anyhow::Result<()> {
    match conn {
        Conn::Postgres(conn) => {
            sqlx::query("UPDATE checkpoint SET position = $1, updated_at = now()")
                .bind(position)
                .execute(&mut **conn)
                .await?;
        }
        Conn::Sqlite(conn) => {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET position = $1, updated_at = $2",
                sqlite_checkpoint(projection.schema())?
            )))
            .bind(position)
            .bind(Utc::now())
            .execute(&mut **conn)
            .await?;
        }
    }
    Ok(())
}

/// Takes the lock on `schema`'s name for the rest of the transaction (batches into
/// that schema, and a rebuild's swap or a verify's comparison, take turns under it).
pub(crate) async fn lock_schema(conn: &mut sqlx::PgConnection, schema: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema)
        .execute(conn)
        .await?;
    Ok(())
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
pub(crate) fn check_schema(schema: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        schema.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "BUG: schema names are lowercase identifiers"
    );
    Ok(())
}

/// The SQLite table holding the checkpoint of the projection whose tables are
/// prefixed `schema`.
pub(crate) fn sqlite_checkpoint(schema: &str) -> anyhow::Result<String> {
    check_schema(schema)?;
    Ok(format!("{schema}_checkpoint"))
}

/// A projection's checkpoint (`schema` as [`Projection::schema`] names it).
pub async fn read_checkpoint(db: &Database, schema: &str) -> anyhow::Result<GlobalPosition> {
    check_schema(schema)?;
    Ok(match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT position FROM \"{schema}\".checkpoint"
            )))
            .fetch_one(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT position FROM {}",
                sqlite_checkpoint(schema)?
            )))
            .fetch_one(pool)
            .await?
        }
    })
}

/// One projection's live runner.
#[derive(Debug, Clone)]
pub struct Runner {
    db: Database,
    store: Arc<dyn EventStore>,
    projection: Arc<dyn Projection>,
    checkpoint: Arc<watch::Sender<GlobalPosition>>,
}

impl Runner {
    pub fn new(db: Database, store: Arc<dyn EventStore>, projection: Arc<dyn Projection>) -> Self {
        Self {
            db,
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
        read_checkpoint(&self.db, self.projection.schema()).await
    }

    /// Applies a batch to the live tables.
    ///
    /// Traced as one span in the trace of the batch's first traced event, linked to the
    /// traces of the others.
    pub async fn apply(&self, events: &[RecordedEvent]) -> anyhow::Result<GlobalPosition> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "projection.apply",
            projection = self.projection.name(),
            events = events.len(),
        );
        let mut traces = events
            .iter()
            .filter_map(colloquy_eventstore::wire::traceparent);
        let first = traces.next();
        colloquy_eventstore::trace::continue_from(&span, first);
        let mut last = first;
        for other in traces {
            // A command's events share one trace context: link each run of them once.
            if Some(other) != last {
                colloquy_eventstore::trace::link_to(&span, other);
                last = Some(other);
            }
        }
        let position = apply_batch(&self.db, self.projection.as_ref(), events)
            .instrument(span)
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
pub async fn lags(db: &Database) -> anyhow::Result<Vec<ProjectionLag>> {
    let mut lags = Vec::new();
    for projection in crate::all_projections() {
        let lag = lag(db, projection.schema()).await?;
        lags.push(ProjectionLag { projection, lag });
    }
    Ok(lags)
}

/// The lag of the projection whose tables live in `schema`.
pub async fn lag(db: &Database, schema: &str) -> anyhow::Result<Lag> {
    let checkpoint = read_checkpoint(db, schema).await?;
    let (head, oldest): (Option<i64>, Option<f64>) = match db {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT (SELECT max(global_position) FROM message_store.messages),
                        (SELECT extract(epoch FROM (now() AT TIME ZONE 'utc') - time)::float8
                           FROM message_store.messages WHERE global_position > $1
                          ORDER BY global_position LIMIT 1)",
            )
            .bind(checkpoint)
            .fetch_one(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            // The age is computed here: SQLite's clock functions would compare its own
            // time format with the one stored.
            let (head, time): (Option<i64>, Option<DateTime<Utc>>) = sqlx::query_as(
                "SELECT (SELECT max(global_position) FROM message_store_messages),
                        (SELECT time FROM message_store_messages WHERE global_position > $1
                          ORDER BY global_position LIMIT 1)",
            )
            .bind(checkpoint)
            .fetch_one(pool)
            .await?;
            let age = time.map(|t| (Utc::now() - t).as_seconds_f64());
            (head, age)
        }
    };
    Ok(Lag {
        checkpoint,
        events: (head.unwrap_or(0) - checkpoint).max(0),
        seconds: oldest.unwrap_or(0.0).max(0.0),
    })
}
