//! Rebuild and verify on Postgres.
//!
//! A rebuild projects the whole log into a scratch schema (`<schema>__rebuild`) while
//! the live tables keep serving, then, holding the projection's lock (which pauses the
//! live runner for a moment), applies the tail and swaps the schemas with two renames
//! in one transaction. The checkpoint lives in the schema, so it swaps with the tables:
//! the live runner continues from the rebuilt checkpoint with no gap and no duplicate.
//!
//! One scratch schema serves one rebuild (or verify) at a time: each holds a session
//! advisory lock on its scratch schema's name for as long as it runs, so a second one
//! — from the CLI or the admin API, in this process or another — is refused with
//! [`AlreadyRunning`] instead of dropping the first one's tables under it.

use std::sync::Arc;

use colloquy_eventstore::{EventStore, GlobalPosition, LogFilter};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row};

use super::{AlreadyRunning, Difference, Progress, Target, rebuild_scratch, verify_scratch};
use crate::projection::{Conn, Projection};
use crate::runner::{BATCH, apply_fresh, check_schema, lock_schema};

/// The first key of the advisory locks on scratch schemas (the second is the hash of
/// the scratch schema's name); a constant of its own keeps them apart from the
/// single-key locks the runners take.
const SCRATCH_LOCK: i32 = 0x636F_6C71;

/// Takes the scratch schema's lock, or fails with [`AlreadyRunning`]. The lock lives
/// as long as the returned connection, which is closed (not returned to the pool) when
/// dropped: ending the session releases the lock however the rebuild ends, even when
/// its task is cancelled.
async fn lock_scratch(
    pool: &PgPool,
    projection: &dyn Projection,
    scratch: &str,
) -> anyhow::Result<PoolConnection<Postgres>> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(SCRATCH_LOCK)
        .bind(scratch)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Err(AlreadyRunning {
            projection: projection.name(),
        }
        .into());
    }
    Ok(conn)
}

/// Releases the scratch schema's lock at once, when its rebuild or verify is done: the
/// session that holds it is closed on drop as well, but a closing session lets go of
/// its locks only once its server process has exited, a moment after the caller has
/// been told the rebuild is over.
async fn unlock_scratch(mut lock: PoolConnection<Postgres>, scratch: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(SCRATCH_LOCK)
        .bind(scratch)
        .execute(&mut *lock)
        .await?;
    Ok(())
}

/// Whether a rebuild of `projection` is running now, in any process connected to
/// this database (its scratch lock is held).
pub(super) async fn is_rebuilding(
    pool: &PgPool,
    projection: &dyn Projection,
) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM pg_locks
              WHERE locktype = 'advisory' AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND classid = $1::int4::oid AND objid = hashtext($2)::oid AND objsubid = 2)",
    )
    .bind(SCRATCH_LOCK)
    .bind(rebuild_scratch(projection))
    .fetch_one(pool)
    .await?)
}

/// Takes the scratch schema's lock ([`lock_scratch`]) and creates the schema afresh.
/// Returns the lock.
async fn create_scratch(
    pool: &PgPool,
    projection: &dyn Projection,
    scratch: &str,
) -> anyhow::Result<PoolConnection<Postgres>> {
    let lock = lock_scratch(pool, projection, scratch).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{scratch}\" CASCADE"
    )))
    .execute(pool)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "SELECT {}($1)",
        projection.create_function()
    )))
    .bind(scratch)
    .execute(pool)
    .await?;
    Ok(lock)
}

/// Projects the log into `scratch` from its checkpoint until that reaches `until`.
async fn fill(
    pool: &PgPool,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    scratch: &str,
    until: GlobalPosition,
    progress: Progress<'_>,
) -> anyhow::Result<GlobalPosition> {
    let from = checkpoint(pool, scratch).await?;
    let target = Target::Postgres {
        pool,
        schema: scratch,
    };
    super::fill(target, store, projection, from, until, progress).await
}

/// Rebuilds `projection` from the log and swaps the result in. Returns the position
/// the swapped-in read model has reached.
///
/// # Errors
/// [`AlreadyRunning`] (inside the `anyhow::Error`) when another rebuild of the
/// projection holds its scratch schema; otherwise database and log failures.
pub(super) async fn rebuild(
    pool: &PgPool,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<GlobalPosition> {
    let live = projection.schema();
    let scratch = rebuild_scratch(projection);
    let lock = create_scratch(pool, projection, &scratch).await?;
    let head = store.head().await?;
    fill(pool, store, projection, &scratch, head, progress).await?;

    // The swap: hold the live projection's lock, bring the scratch copy up to the log's
    // head (a short tail), then rename. Queries keep being served throughout.
    let mut tx = pool.begin().await?;
    lock_schema(&mut tx, live).await?;
    let mut position = checkpoint(pool, &scratch).await?;
    crate::runner::set_schema(&mut tx, &scratch).await?;
    loop {
        let events = store.read_log(&LogFilter::All, position, BATCH).await?;
        let Some(last) = events.last().map(|e| e.global_position) else {
            break;
        };
        apply_fresh(&mut Conn::Postgres(&mut tx), projection, &events).await?;
        position = last;
    }
    let old = format!("{live}__old");
    for sql in [
        format!("DROP SCHEMA IF EXISTS \"{old}\" CASCADE"),
        format!("ALTER SCHEMA \"{live}\" RENAME TO \"{old}\""),
        format!("ALTER SCHEMA \"{scratch}\" RENAME TO \"{live}\""),
        format!("DROP SCHEMA \"{old}\" CASCADE"),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    unlock_scratch(lock, &scratch).await?;
    Ok(position)
}

/// Rebuilds `projection` into a scratch schema up to the live checkpoint and reports
/// every row that differs from the live tables. The scratch schema is dropped after.
pub(super) async fn verify(
    pool: &PgPool,
    store: &Arc<dyn EventStore>,
    projection: &dyn Projection,
    progress: Progress<'_>,
) -> anyhow::Result<Vec<Difference>> {
    let live = projection.schema();
    let scratch = verify_scratch(projection);
    let lock = create_scratch(pool, projection, &scratch).await?;
    let target = checkpoint(pool, live).await?;
    fill(pool, store, projection, &scratch, target, progress).await?;

    // Compare under the live lock, after bringing the copy to the live checkpoint
    // (which may have moved while the copy was filled).
    let mut tx = pool.begin().await?;
    lock_schema(&mut tx, live).await?;
    let live_position: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT position FROM \"{live}\".checkpoint"
    )))
    .fetch_one(&mut *tx)
    .await?;
    fill(pool, store, projection, &scratch, live_position, progress).await?;
    let mut differences = Vec::new();
    for (table, key) in projection.tables() {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT coalesce(l.{key}, s.{key})::text AS key,
                    CASE WHEN l.{key} IS NULL THEN 'missing'
                         WHEN s.{key} IS NULL THEN 'extra'
                         ELSE 'changed' END AS kind
               FROM \"{live}\".\"{table}\" l
               FULL JOIN \"{scratch}\".\"{table}\" s ON l.{key} = s.{key}
              WHERE l.{key} IS NULL OR s.{key} IS NULL OR to_jsonb(l) <> to_jsonb(s)
              ORDER BY 1"
        )))
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            differences.push(Difference::new(
                table,
                row.try_get("key")?,
                row.try_get("kind")?,
            ));
        }
    }
    tx.commit().await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{scratch}\" CASCADE"
    )))
    .execute(pool)
    .await?;
    unlock_scratch(lock, &scratch).await?;
    Ok(differences)
}

/// The checkpoint in `schema` (live or scratch).
async fn checkpoint(pool: &PgPool, schema: &str) -> anyhow::Result<GlobalPosition> {
    check_schema(schema)?;
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT position FROM \"{schema}\".checkpoint"
    )))
    .fetch_one(pool)
    .await?)
}
