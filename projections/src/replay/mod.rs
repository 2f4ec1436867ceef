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

use colloquy_eventstore::{Database, EventStore, GlobalPosition};

use crate::projection::Projection;

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
