//! Rebuilding a read model from the log, and verifying one against a rebuild.
//!
//! A rebuild projects the whole log into scratch tables while the live tables keep
//! serving, then, holding the projection's lock (which pauses its live runner for a
//! moment), brings the copy up to the log's head and swaps it in atomically, checkpoint
//! included: the live runner continues from the rebuilt checkpoint with no gap and no
//! duplicate. A verify fills scratch tables up to the live checkpoint and reports every
//! row that differs.
//!
//! - Postgres ([`postgres`](self)): scratch schemas, swapped in by renaming schemas.
//! - SQLite: scratch TEMP tables with the live tables' DDL on a connection of the
//!   rebuild's own, copied over the live tables in one write transaction.
//!
//! One rebuild (and one verify) of a projection runs at a time; a second is refused
//! with [`AlreadyRunning`].

mod postgres;
mod sqlite;

use std::sync::Arc;

use colloquy_eventstore::{Database, EventStore, GlobalPosition, LogFilter};
use sqlx::{PgPool, SqliteConnection};

use crate::projection::Projection;
use crate::runner::BATCH;

/// Progress callback: (position reached, head when the rebuild started).
pub type Progress<'a> = &'a (dyn Fn(GlobalPosition, GlobalPosition) + Send + Sync);

/// A rebuild or verify of this projection is already running (somewhere).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a rebuild or verify of {projection} is already running")]
pub struct AlreadyRunning {
    /// The projection's name.
    pub projection: &'static str,
}

/// One difference between a live read model and a fresh rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub table: String,
    pub key: String,
    /// `missing` (in the rebuild, not live), `extra` (live, not in the rebuild) or
    /// `changed` (both, with other values).
    pub kind: &'static str,
}

impl Difference {
    fn new(table: &str, key: String, kind: &str) -> Self {
        Self {
            table: table.to_owned(),
            key,
            kind: match kind {
                "missing" => "missing",
                "extra" => "extra",
                _ => "changed",
            },
        }
    }
}

/// The scratch copy a rebuild of `projection` fills (on Postgres its schema, on SQLite
/// the name it is registered under).
fn rebuild_scratch(projection: &dyn Projection) -> String {
    format!("{}__rebuild", projection.schema())
}

/// The scratch copy a verify of `projection` fills.
fn verify_scratch(projection: &dyn Projection) -> String {
    format!("{}__verify", projection.schema())
}

/// Where a rebuild or verify writes its copy.
enum Target<'a> {
    /// A scratch schema, written batch by batch in transactions of the pool's.
    Postgres { pool: &'a PgPool, schema: &'a str },
    /// The connection holding the TEMP tables.
    Sqlite(&'a mut SqliteConnection),
}

impl Target<'_> {
    /// Applies a batch to the copy, with its checkpoint.
    async fn apply(
        &mut self,
        projection: &dyn Projection,
        events: &[colloquy_eventstore::RecordedEvent],
    ) -> anyhow::Result<GlobalPosition> {
        match self {
            Self::Postgres { pool, schema } => {
                crate::runner::apply_batch_in_schema(pool, projection, schema, events).await
            }
            Self::Sqlite(conn) => sqlite::apply_to_scratch(conn, projection, events).await,
        }
    }
}

/// Projects the log after `from` (the copy's checkpoint) into the copy until its
/// checkpoint reaches `until`, reading the next page while applying this one.
async fn fill(
    mut target: Target<'_>,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    from: GlobalPosition,
    until: GlobalPosition,
    progress: Progress<'_>,
) -> anyhow::Result<GlobalPosition> {
    let mut position = from;
    let page = |after: GlobalPosition| {
        let store = Arc::clone(store);
        async move {
            let mut events = store.read_log(&LogFilter::All, after, BATCH * 10).await?;
            events.retain(|e| e.global_position <= until);
            Ok::<_, colloquy_eventstore::StoreError>(events)
        }
    };
    let mut events = page(position).await?;
    while position < until {
        let Some(last) = events.last().map(|e| e.global_position) else {
            break;
        };
        let (applied, next) = tokio::join!(target.apply(projection, &events), page(last));
        applied?;
        events = next?;
        position = last;
        progress(position, until);
    }
    Ok(position)
}

/// Whether a rebuild of `projection` is running now: on Postgres in any process
/// connected to the database (its scratch lock is held), on SQLite in this process.
pub async fn is_rebuilding(db: &Database, projection: &dyn Projection) -> anyhow::Result<bool> {
    match db {
        Database::Postgres(pool) => postgres::is_rebuilding(pool, projection).await,
        Database::Sqlite(pool) => Ok(sqlite::is_rebuilding(pool, projection)),
    }
}

/// Rebuilds `projection` from the log and swaps the result in. Returns the position
/// the swapped-in read model has reached.
///
/// # Errors
/// [`AlreadyRunning`] (inside the `anyhow::Error`) when another rebuild of the
/// projection is running; otherwise database and log failures.
pub async fn rebuild(
    db: &Database,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<GlobalPosition> {
    match db {
        Database::Postgres(pool) => postgres::rebuild(pool, store, projection, progress).await,
        Database::Sqlite(pool) => sqlite::rebuild(pool, store, projection, progress).await,
    }
}

/// Rebuilds `projection` into scratch tables up to the live checkpoint and reports
/// every row that differs from the live tables. The scratch tables are dropped after.
///
/// # Errors
/// [`AlreadyRunning`] when another verify of the projection is running; otherwise
/// database and log failures.
pub async fn verify(
    db: &Database,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<Vec<Difference>> {
    match db {
        Database::Postgres(pool) => postgres::verify(pool, store, projection, progress).await,
        Database::Sqlite(pool) => sqlite::verify(pool, store, projection, progress).await,
    }
}
