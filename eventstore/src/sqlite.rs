//! The SQLite backend of the embedded mode: Message DB's table as
//! `message_store_messages` in one SQLite file (WAL), written through the same
//! group-commit batches and shared planning as the Postgres backend.
//!
//! Commit order: SQLite has one writer at a time, and every write here runs inside
//! `BEGIN IMMEDIATE`, which takes the write lock before anything is read. A batch reads
//! stream versions and stored ids, draws global positions and commits under that lock,
//! so positions are commit order, for every pool and process on the file alike.
//!
//! Wake-ups: the batcher bumps [`EventStore::appended`] after each of its commits. A
//! writer in another process (or another pool on the same file) is noticed by polling
//! `PRAGMA data_version` on a connection of the store's own, every
//! [`SqliteOptions::other_writers_poll`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use md5::{Digest, Md5};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Row as _, Sqlite, SqliteConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{self, Row, StoredId};
use crate::batcher::{BatchConfig, BatchWriter, Batcher};
use crate::model::{
    AppendOutcome, GlobalPosition, Limits, LogFilter, RecordedEvent, StoreError, StreamAppend,
    validate,
};
use crate::store::{EventStore, RedactReport, Redactor, Selection, redact_selected};

/// The embedded mode's migrations (event log, read models, users), one set for the file.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Connections in the pool [`open`] makes: readers run in parallel in WAL mode, while
/// writers queue on SQLite's one write lock whatever the pool size.
pub const POOL_SIZE: u32 = 8;

/// How long a writer waits for the write lock before SQLite reports it busy.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies the embedded mode's migrations.
pub async fn migrate(pool: &SqlitePool) -> Result<(), sqlx::migrate::MigrateError> {
    SQLITE_MIGRATOR.run(pool).await
}

/// Why [`open`] or [`open_url`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the directory {path} for the SQLite database")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a usable SQLite URL: {1}")]
    Url(String, String),
    #[error("cannot open the SQLite database {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the SQLite database {path}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// The connection settings every pool on the embedded database uses: the file (created
/// if missing), WAL, `synchronous=NORMAL` (durable at WAL checkpoints; a power cut may
/// lose the last commits but never corrupts), a 5 s busy timeout, foreign keys on.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    configure(SqliteConnectOptions::new().filename(path))
}

fn configure(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
}

/// Opens (creating it and its directory if missing) and migrates the SQLite database
/// file at `path`, with the settings of [`connect_options`] and [`POOL_SIZE`]
/// connections.
pub async fn open(path: &Path) -> Result<SqlitePool, OpenError> {
    open_with(connect_options(path)).await
}

/// [`open`] for a `sqlite://PATH` (or `sqlite:PATH`) URL, as `DATABASE_URL` gives it.
/// In-memory databases are refused: the log would be lost on exit, and connections of
/// a shared-cache memory database do not wait on each other's locks.
pub async fn open_url(url: &str) -> Result<SqlitePool, OpenError> {
    let refuse = |why: &str| OpenError::Url(url.to_owned(), why.to_owned());
    if !url.starts_with("sqlite:") {
        return Err(refuse("it does not start with sqlite:"));
    }
    let options = SqliteConnectOptions::from_str(url).map_err(|e| refuse(&e.to_string()))?;
    let filename = options.get_filename().to_string_lossy();
    if filename.is_empty() {
        return Err(refuse("it names no file"));
    }
    if filename.starts_with("file:sqlx-in-memory-") || url.contains("mode=memory") {
        return Err(refuse(
            "an in-memory database loses the log on exit; name a file",
        ));
    }
    open_with(configure(options)).await
}

async fn open_with(options: SqliteConnectOptions) -> Result<SqlitePool, OpenError> {
    let path = options.get_filename().to_path_buf();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(|source| OpenError::Connect {
            path: path.clone(),
            source,
        })?;
    if let Err(source) = migrate(&pool).await {
        pool.close().await;
        return Err(OpenError::Migrate { path, source });
    }
    Ok(pool)
}

/// Message DB's `hash_64(cardinal_id(stream_name))`: the first 8 bytes of the MD5 of
/// the stream's cardinal id (the part of its id before any `+`), read as a signed
/// big-endian integer; `None` for a name without `-` (a category).
pub fn cardinal_hash(stream_name: &str) -> Option<i64> {
    let (_, id) = stream_name.split_once('-')?;
    let cardinal = id.split('+').next().unwrap_or(id);
    let digest = Md5::digest(cardinal.as_bytes());
    let mut first = [0_u8; 8];
    first.copy_from_slice(&digest[..8]);
    Some(i64::from_be_bytes(first))
}

/// The consumer-group member (of `size`) that reads `stream_name`, as Message DB
/// assigns it: `abs(hash_64(cardinal_id)) mod size`. `None` for a category name or a
/// group of size 0. (For the one hash whose `abs` overflows, Postgres raises an error;
/// this takes the remainder's absolute value instead, as the SQL below does.)
pub fn consumer_group_member(stream_name: &str, size: u32) -> Option<u32> {
    let hash = cardinal_hash(stream_name)?;
    if size == 0 {
        return None;
    }
    u32::try_from((hash % i64::from(size)).unsigned_abs()).ok()
}

/// Options for [`SqliteEventStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub limits: Limits,
    pub batch: BatchConfig,
    /// How often to look for commits by other pools or processes on the same file
    /// (`None`: never; appends through this store wake its subscribers regardless).
    pub other_writers_poll: Option<Duration>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            batch: BatchConfig::default(),
            other_writers_poll: Some(Duration::from_millis(100)),
        }
    }
}

/// The SQLite event store.
#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: SqlitePool,
    limits: Limits,
    batcher: Batcher,
    appended: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug)]
struct SqliteWriter {
    pool: SqlitePool,
}

impl SqliteEventStore {
    /// Uses a pool from [`open`] (its database must be migrated), with default options.
    /// Starts background tasks: call it inside a Tokio runtime.
    pub fn new(pool: SqlitePool) -> Self {
        Self::with_pool(pool, SqliteOptions::default())
    }

    /// Uses a pool from [`open`] (its database must be migrated).
    pub fn with_pool(pool: SqlitePool, options: SqliteOptions) -> Self {
        let (appended, _) = watch::channel(0_u64);
        let stop = CancellationToken::new();
        let batcher = Batcher::start(
            Arc::new(SqliteWriter { pool: pool.clone() }),
            options.batch,
            appended.clone(),
        );
        if let Some(every) = options.other_writers_poll {
            tokio::spawn(watch_other_writers(
                pool.clone(),
                appended.clone(),
                stop.clone(),
                every,
            ));
        }
        Self {
            inner: Arc::new(Inner {
                pool,
                limits: options.limits,
                batcher,
                appended,
                stop,
            }),
        }
    }

    /// The pool, for read models that live in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }
}

/// Bumps `appended` whenever another connection commits to the file. `PRAGMA
/// data_version` on a connection changes exactly when some other connection has
/// committed since the last time it was read; this connection never writes.
async fn watch_other_writers(
    pool: SqlitePool,
    appended: watch::Sender<u64>,
    stop: CancellationToken,
    every: Duration,
) {
    let options = pool.connect_options();
    let mut conn: Option<SqliteConnection> = None;
    let mut last: Option<i64> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        if pool.is_closed() {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match SqliteConnection::connect_with(&options).await {
                Ok(c) => conn.insert(c),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot open a connection to watch the log");
                    continue;
                }
            },
        };
        match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
            .fetch_one(&mut *c)
            .await
        {
            Ok(version) => {
                if last.is_some_and(|l| l != version) {
                    appended.send_modify(|n| *n = n.wrapping_add(1));
                }
                last = Some(version);
            }
            Err(error) => {
                tracing::warn!(error = %error, "watching the log for other writers failed");
                // A new connection starts a new count: wake once, in case.
                conn = None;
                last = None;
                appended.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

#[async_trait]
impl BatchWriter for SqliteWriter {
    async fn write_batch(
        &self,
        requests: &[&[StreamAppend]],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        let mut ids = Vec::new();
        let mut streams = Vec::new();
        for append in requests.iter().flat_map(|r| r.iter()) {
            streams.push(append.stream.as_str());
            ids.extend(append.events.iter().map(|e| e.id.simple().to_string()));
        }
        streams.sort_unstable();
        streams.dedup();

        // The write lock before the first read: everything read below stays true until
        // the commit, and positions are drawn in commit order. Dropping the transaction
        // on an error rolls it back.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(
            "SELECT id, stream_name, type, data, global_position, position
               FROM message_store_messages
              WHERE id IN (SELECT unhex(value) FROM json_each($1))",
        )
        .bind(json_array(&ids))
        .fetch_all(&mut *tx)
        .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.try_get("id")?;
            stored.insert(
                id,
                StoredId {
                    id,
                    stream_name: row.try_get("stream_name")?,
                    event_type: row.try_get("type")?,
                    data: row
                        .try_get::<Option<Value>, _>("data")?
                        .unwrap_or(Value::Null),
                    global_position: row.try_get("global_position")?,
                    position: row.try_get("position")?,
                },
            );
        }
        // One index probe per stream (the last entry of its (stream_name, position)
        // range), however long the stream is.
        let rows = sqlx::query(
            "SELECT s.value AS stream_name,
                    (SELECT max(m.position) FROM message_store_messages m
                      WHERE m.stream_name = s.value) AS version
               FROM json_each($1) s",
        )
        .bind(json_array(&streams))
        .fetch_all(&mut *tx)
        .await?;
        let mut versions = HashMap::with_capacity(rows.len());
        for row in rows {
            if let Some(version) = row.try_get::<Option<i64>, _>("version")? {
                versions.insert(row.try_get::<String, _>("stream_name")?, version);
            }
        }

        let mut new_rows: Vec<Row> = Vec::new();
        let planned = batch::plan(requests, &stored, &mut versions, &mut new_rows);
        if new_rows.is_empty() {
            tx.rollback().await?;
            return Ok(batch::outcomes(planned, &[]));
        }
        let positions = insert_rows(&mut tx, &new_rows).await?;
        tx.commit().await?;
        Ok(batch::outcomes(planned, &positions))
    }
}

/// Rows per INSERT statement (8 parameters each; SQLite allows 32,766).
const INSERT_CHUNK: usize = 256;

/// Inserts rows in order; SQLite draws their global positions in that order. Returns
/// the positions, aligned with `rows`.
async fn insert_rows(
    conn: &mut SqliteConnection,
    rows: &[Row],
) -> Result<Vec<GlobalPosition>, StoreError> {
    let time = Utc::now().trunc_subsecs(6);
    let mut positions = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO message_store_messages
               (id, stream_name, type, position, data, metadata, time, cardinal_hash) ",
        );
        insert.push_values(chunk, |mut values, row| {
            values
                .push_bind(row.id)
                .push_bind(row.stream_name.as_str())
                .push_bind(row.event_type.as_str())
                .push_bind(row.position)
                .push_bind(&row.data)
                .push_bind(row.metadata.as_ref())
                .push_bind(time)
                .push_bind(cardinal_hash(&row.stream_name));
        });
        insert.push(" RETURNING id, global_position");
        let returned = insert.build().fetch_all(&mut *conn).await?;
        let mut by_id = HashMap::with_capacity(returned.len());
        for row in returned {
            by_id.insert(
                row.try_get::<Uuid, _>("id")?,
                row.try_get::<i64, _>("global_position")?,
            );
        }
        for row in chunk {
            positions.push(
                *by_id
                    .get(&row.id)
                    .expect("BUG: every inserted row is returned"),
            );
        }
    }
    Ok(positions)
}

/// A JSON array of strings, for `json_each($1)`: one statement for any number of
/// values, instead of one per count of `IN (…)` parameters.
fn json_array<S: AsRef<str>>(values: &[S]) -> String {
    Value::Array(
        values
            .iter()
            .map(|v| Value::String(v.as_ref().to_owned()))
            .collect(),
    )
    .to_string()
}

fn decode(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    Ok(RecordedEvent {
        global_position: row.try_get("global_position")?,
        position: row.try_get("position")?,
        time: row.try_get::<DateTime<Utc>, _>("time")?,
        stream_name: row.try_get("stream_name")?,
        event_type: row.try_get("type")?,
        data: row
            .try_get::<Option<Value>, _>("data")?
            .unwrap_or(Value::Null),
        metadata: row.try_get("metadata")?,
        id: row.try_get("id")?,
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `SELECT` of every column [`decode`] reads, followed by the rest of the query.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT global_position, position, time, stream_name, type, data, metadata, id
               FROM message_store_messages ",
            $rest
        )
    };
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<AppendOutcome, StoreError> {
        validate(&appends, self.inner.limits)?;
        self.inner.batcher.append(appends).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        from: i64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(select_events!(
            "WHERE stream_name = $1 AND position >= $2
              ORDER BY position LIMIT $3"
        ))
        .bind(stream)
        .bind(from)
        .bind(limit(max))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn read_stream_backward(
        &self,
        stream: &str,
        before: Option<i64>,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(select_events!(
            "WHERE stream_name = $1 AND position < $2
              ORDER BY position DESC LIMIT $3"
        ))
        .bind(stream)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit(max))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn read_log(
        &self,
        filter: &LogFilter,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = match filter {
            LogFilter::All => {
                sqlx::query(select_events!(
                    "WHERE global_position > $1
                      ORDER BY global_position LIMIT $2"
                ))
                .bind(after)
                .bind(limit(max))
                .fetch_all(&self.inner.pool)
                .await?
            }
            LogFilter::Category(category) => {
                sqlx::query(select_events!(
                    "WHERE category = $1 AND global_position > $2
                      ORDER BY global_position LIMIT $3"
                ))
                .bind(category)
                .bind(after)
                .bind(limit(max))
                .fetch_all(&self.inner.pool)
                .await?
            }
            // `abs(h % size)` is `abs(h) % size` (SQLite's `%` truncates) without
            // overflowing for the one hash whose `abs` does not fit (see
            // `consumer_group_member`). A size of 0 selects nothing.
            LogFilter::CategoryMember {
                category,
                member,
                size,
            } => {
                sqlx::query(select_events!(
                    "WHERE category = $1 AND global_position > $2
                        AND abs(cardinal_hash % $5) = $4
                      ORDER BY global_position LIMIT $3"
                ))
                .bind(category)
                .bind(after)
                .bind(limit(max))
                .bind(i64::from(*member))
                .bind(i64::from(*size))
                .fetch_all(&self.inner.pool)
                .await?
            }
        };
        rows.iter().map(decode).collect()
    }

    async fn read_events_by_id(&self, ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| id.simple().to_string()).collect();
        let rows = sqlx::query(select_events!(
            "WHERE id IN (SELECT unhex(value) FROM json_each($1))
              ORDER BY global_position"
        ))
        .bind(json_array(&ids))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT max(position) FROM message_store_messages WHERE stream_name = $1",
        )
        .bind(stream)
        .fetch_one(&self.inner.pool)
        .await?)
    }

    async fn head(&self) -> Result<GlobalPosition, StoreError> {
        Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT max(global_position) FROM message_store_messages",
        )
        .fetch_one(&self.inner.pool)
        .await?
        .unwrap_or(0))
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }

    async fn redact(
        &self,
        selection: &Selection,
        redactor: &Redactor,
    ) -> Result<RedactReport, StoreError> {
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = match selection {
            Selection::Streams(streams) => {
                sqlx::query(
                    "SELECT global_position, stream_name, type, data FROM message_store_messages
                      WHERE stream_name IN (SELECT value FROM json_each($1))
                      ORDER BY global_position",
                )
                .bind(json_array(streams))
                .fetch_all(&mut *tx)
                .await?
            }
            // Postgres' `metadata->>key = value`: the top-level key compared exactly (no
            // JSON-path parsing of the key), its value as text (`true`/`false` for
            // booleans, the number as written, a JSON null as SQL NULL).
            Selection::MetadataEquals { key, value } => {
                sqlx::query(
                    "SELECT global_position, stream_name, type, data FROM message_store_messages m
                      WHERE EXISTS (
                        SELECT 1 FROM json_each(m.metadata) j
                         WHERE j.key = $1
                           AND CASE j.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'
                                           WHEN 'null' THEN NULL ELSE CAST(j.value AS TEXT) END = $2)
                      ORDER BY global_position",
                )
                .bind(key)
                .bind(value)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let selected = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get("global_position")?,
                    row.try_get("stream_name")?,
                    row.try_get("type")?,
                    row.try_get("data")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let (report, changed) = redact_selected(selected, redactor);
        for (position, data) in changed {
            sqlx::query("UPDATE message_store_messages SET data = $2 WHERE global_position = $1")
                .bind(position)
                .bind(&data)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of Postgres' `message_store.hash_64(cardinal_id(name))` (migration 0002 of
    /// the Postgres set), so both backends put a stream in the same consumer-group member.
    #[test]
    fn cardinal_hash_is_message_dbs() {
        for (name, expected) in POSTGRES_HASHES {
            assert_eq!(cardinal_hash(name), *expected, "{name}");
        }
        assert_eq!(cardinal_hash("job"), None);
        assert_eq!(cardinal_hash("job-7+retry"), cardinal_hash("job-7"));
        assert_eq!(consumer_group_member("job", 3), None);
        assert_eq!(consumer_group_member("job-1", 0), None);
    }

    #[test]
    fn consumer_group_member_is_abs_hash_mod_size() {
        for (name, hash) in POSTGRES_HASHES {
            let Some(hash) = hash else { continue };
            for size in 1..7_u32 {
                let expected = u32::try_from(hash.unsigned_abs() % u64::from(size)).unwrap();
                assert_eq!(consumer_group_member(name, size), Some(expected), "{name}");
            }
        }
    }

    const POSTGRES_HASHES: &[(&str, Option<i64>)] = &[
        ("job-0", Some(-3_473_083_983_811_222_033)),
        ("job-1", Some(-4_266_524_885_998_034_046)),
        ("job-2", Some(-4_026_655_064_267_673_757)),
        ("job-7+retry", Some(-8_136_627_526_607_169_926)),
        ("account-123+abc", Some(2_318_431_741_638_412_123)),
        (
            "conversation-0190a1b2-c3d4-7e8f-9a0b-1c2d3e4f5a6b",
            Some(-5_953_246_741_584_173_002),
        ),
        ("x-", Some(-3_162_216_497_309_240_828)),
        ("a-b-c", Some(-6_764_591_547_844_729_058)),
        ("user-\u{fc}n\u{ef}code", Some(-3_668_093_054_441_986_943)),
        ("other-19", Some(2_237_793_880_664_736_581)),
        ("job", None),
    ];
}
