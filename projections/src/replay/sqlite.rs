//! Rebuild and verify on SQLite.
//!
//! SQLite has no schemas to swap, but each connection has a TEMP schema that is
//! searched before the main one. The scratch copy is TEMP tables with the live tables'
//! names, created from the live tables' own DDL (`sqlite_schema`: tables, the FTS5
//! index, indexes, triggers) on a connection of the rebuild's own: on that connection
//! the projection's SQL, which names tables unqualified, writes the copy; everywhere
//! else it still reads the live tables. The connection is closed (never returned to the
//! pool) when the rebuild ends, taking the TEMP tables with it.
//!
//! Filling the copy takes no lock on the database file (only TEMP tables are written),
//! so the log and the live runner go on. The swap is one `BEGIN IMMEDIATE` transaction
//! (the write lock pauses the live runner): apply the tail, then replace every live
//! table's rows with the copy's, checkpoint included. Readers in WAL mode keep their
//! snapshot until it commits, so queries are served throughout and never see a
//! half-swapped model. The swap holds the write lock for as long as the copy takes,
//! which writers wait for up to the busy timeout.
//!
//! One rebuild (and one verify) of a projection at a time, per database file, in this
//! process: SQLite has no advisory locks, and the embedded mode is one process.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use colloquy_eventstore::{EventStore, GlobalPosition, LogFilter, RecordedEvent};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection as _, Sqlite, SqliteConnection, SqlitePool};
use uuid::Uuid;

use super::{AlreadyRunning, Difference, Progress, Target, fill, rebuild_scratch, verify_scratch};
use crate::projection::{Conn, Projection};
use crate::runner::{BATCH, apply_fresh, check_schema, sqlite_checkpoint};

/// Columns of the SQLite tables that are storage details, not read-model values: the
/// FTS5 row id of a search document depends on the order rows were inserted in, which
/// differs between batchings of the same log.
const INTERNAL_COLUMNS: &[&str] = &["fts_id"];

/// The scratch copies running in this process, by database file and scratch name.
static RUNNING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A scratch copy registered in [`RUNNING`] until dropped.
#[derive(Debug)]
struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

fn running_key(pool: &SqlitePool, scratch: &str) -> String {
    format!(
        "{}\n{scratch}",
        pool.connect_options().get_filename().display()
    )
}

/// Registers the scratch copy, or fails with [`AlreadyRunning`].
fn hold(
    pool: &SqlitePool,
    projection: &dyn Projection,
    scratch: &str,
) -> Result<Running, AlreadyRunning> {
    let key = running_key(pool, scratch);
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    if !running.insert(key.clone()) {
        return Err(AlreadyRunning {
            projection: projection.name(),
        });
    }
    Ok(Running(key))
}

pub(super) fn is_rebuilding(pool: &SqlitePool, projection: &dyn Projection) -> bool {
    RUNNING
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&running_key(pool, &rebuild_scratch(projection)))
}

/// A connection holding TEMP copies of a projection's tables.
struct Scratch {
    conn: PoolConnection<Sqlite>,
    /// Registered in [`RUNNING`] while it lives.
    _running: Running,
    /// The projection's ordinary tables (the FTS5 index follows its content table
    /// through triggers), in creation order.
    tables: Vec<String>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

/// `CREATE …` of a live object, rewritten to create it in the TEMP schema.
/// `sqlite_schema.sql` is normalized (keywords upper case, one space after the first
/// two, no `IF NOT EXISTS` or schema name), so the prefixes are exact.
fn temp_ddl(sql: &str) -> anyhow::Result<String> {
    for (live, temp) in [
        ("CREATE TABLE ", "CREATE TEMP TABLE "),
        ("CREATE VIRTUAL TABLE ", "CREATE VIRTUAL TABLE temp."),
        ("CREATE INDEX ", "CREATE INDEX temp."),
        ("CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX temp."),
        ("CREATE TRIGGER ", "CREATE TEMP TRIGGER "),
    ] {
        if let Some(rest) = sql.strip_prefix(live) {
            return Ok(format!("{temp}{rest}"));
        }
    }
    anyhow::bail!("BUG: cannot copy this read-model DDL into a scratch table: {sql}")
}

/// Registers the scratch copy `name` ([`hold`]), opens a connection of its own and
/// creates TEMP copies of every object of `projection` (tables, FTS5 index, indexes,
/// triggers: those named `<schema>_…`, without the FTS5 index's own shadow tables),
/// with the checkpoint at 0.
async fn scratch(
    pool: &SqlitePool,
    projection: &dyn Projection,
    name: &str,
) -> anyhow::Result<Scratch> {
    let running = hold(pool, projection, name)?;
    let schema = projection.schema();
    check_schema(schema)?;
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    let objects: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT type, name, sql FROM main.sqlite_schema
          WHERE sql IS NOT NULL AND substr(tbl_name, 1, length($1)) = $1
            AND tbl_name NOT IN (SELECT name FROM pragma_table_list
                                  WHERE schema = 'main' AND type = 'shadow')
          ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid",
    )
    .bind(format!("{schema}_"))
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = Vec::new();
    for (kind, name, sql) in &objects {
        sqlx::query(AssertSqlSafe(temp_ddl(sql)?))
            .execute(&mut *conn)
            .await?;
        if kind == "table" && sql.starts_with("CREATE TABLE ") {
            tables.push(name.clone());
        }
    }
    // SQLite recompiles statements after DDL on their connection; dropping the cached
    // ones (prepared when the names meant the live tables) makes that explicit.
    conn.clear_cached_statements().await?;
    let checkpoint = sqlite_checkpoint(schema)?;
    anyhow::ensure!(
        tables.contains(&checkpoint),
        "the SQLite database has no {checkpoint} table: are its migrations applied?"
    );
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO temp.{checkpoint} (position, updated_at) VALUES (0, $1)"
    )))
    .bind(Utc::now())
    .execute(&mut *conn)
    .await?;
    Ok(Scratch {
        conn,
        _running: running,
        tables,
    })
}

/// Applies a batch to the scratch copy (a deferred transaction: only TEMP tables are
/// written, so the database's write lock is not taken).
pub(super) async fn apply_to_scratch(
    conn: &mut SqliteConnection,
    projection: &dyn Projection,
    events: &[RecordedEvent],
) -> anyhow::Result<GlobalPosition> {
    let mut tx = conn.begin().await?;
    let position = apply_fresh(&mut Conn::Sqlite(&mut tx), projection, events).await?;
    tx.commit().await?;
    Ok(position)
}

/// Applies the log after the scratch checkpoint, up to `until` (all of it when
/// `None`), inside the caller's transaction. Returns the scratch checkpoint.
async fn tail(
    conn: &mut SqliteConnection,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    until: Option<GlobalPosition>,
) -> anyhow::Result<GlobalPosition> {
    let checkpoint = sqlite_checkpoint(projection.schema())?;
    let mut position: GlobalPosition = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT position FROM temp.{checkpoint}"
    )))
    .fetch_one(&mut *conn)
    .await?;
    loop {
        let mut events = store.read_log(&LogFilter::All, position, BATCH).await?;
        if let Some(until) = until {
            events.retain(|e| e.global_position <= until);
        }
        let Some(last) = events.last().map(|e| e.global_position) else {
            return Ok(position);
        };
        apply_fresh(&mut Conn::Sqlite(&mut *conn), projection, &events).await?;
        position = last;
    }
}

pub(super) async fn rebuild(
    pool: &SqlitePool,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<GlobalPosition> {
    let mut scratch = scratch(pool, projection, &rebuild_scratch(projection)).await?;
    let head = store.head().await?;
    fill(
        Target::Sqlite(&mut scratch.conn),
        store,
        projection,
        0,
        head,
        progress,
    )
    .await?;

    // The swap, under the write lock: the tail, then the copy over the live rows.
    let mut tx = scratch.conn.begin_with("BEGIN IMMEDIATE").await?;
    let position = tail(&mut tx, store, projection, None).await?;
    for table in &scratch.tables {
        for sql in [
            format!("DELETE FROM main.{table}"),
            format!("INSERT INTO main.{table} SELECT * FROM temp.{table}"),
        ] {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(position)
}

pub(super) async fn verify(
    pool: &SqlitePool,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<Vec<Difference>> {
    let schema = projection.schema();
    let mut scratch = scratch(pool, projection, &verify_scratch(projection)).await?;
    let checkpoint = sqlite_checkpoint(schema)?;
    let target = crate::runner::read_checkpoint(&pool.clone().into(), schema).await?;
    fill(
        Target::Sqlite(&mut scratch.conn),
        store,
        projection,
        0,
        target,
        progress,
    )
    .await?;

    // Compare in one read transaction (one snapshot of the live tables), after bringing
    // the copy to the live checkpoint of that snapshot.
    let mut tx = scratch.conn.begin().await?;
    let live: GlobalPosition = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT position FROM main.{checkpoint}"
    )))
    .fetch_one(&mut *tx)
    .await?;
    tail(&mut tx, store, projection, Some(live)).await?;
    let mut differences = Vec::new();
    for (table, key) in projection.tables() {
        let full = format!("{schema}_{table}");
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1, 'main') ORDER BY cid")
                .bind(&full)
                .fetch_all(&mut *tx)
                .await?;
        let same = columns
            .iter()
            .filter(|c| !INTERNAL_COLUMNS.contains(&c.as_str()))
            .map(|c| format!("l.\"{c}\" IS s.\"{c}\""))
            .collect::<Vec<_>>()
            .join(" AND ");
        let rows: Vec<(Uuid, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT coalesce(l.{key}, s.{key}) AS key,
                    CASE WHEN l.{key} IS NULL THEN 'missing'
                         WHEN s.{key} IS NULL THEN 'extra'
                         ELSE 'changed' END AS kind
               FROM main.{full} l
               FULL JOIN temp.{full} s ON l.{key} = s.{key}
              WHERE l.{key} IS NULL OR s.{key} IS NULL OR NOT ({same})
              ORDER BY 1"
        )))
        .fetch_all(&mut *tx)
        .await?;
        for (key, kind) in rows {
            differences.push(Difference::new(table, key.to_string(), &kind));
        }
    }
    tx.rollback().await?;
    Ok(differences)
}
