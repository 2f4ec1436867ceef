//! The Postgres backend: Message DB's `message_store.messages` table, written through
//! group-commit batches that take the commit-ordering lock (see
//! `migrations/postgres/0001_message_store.sql` and docs/adr/0002), each with one
//! statement that holds it for server work only (`message_store.write_batch`,
//! `migrations/postgres/0006_batch_write_functions.sql`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{Row as _, postgres::PgPoolOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{self, Row, StoredId};
use crate::batcher::{BatchConfig, BatchWriter, Batcher};
use crate::model::{
    AppendOutcome, ExpectedVersion, GlobalPosition, Limits, LogFilter, RecordedEvent, StoreError,
    StreamAppend, validate,
};
use crate::store::{EventStore, RedactReport, Redactor, Selection, redact_selected};

/// The advisory-lock key that orders every commit into the log; the same constant
/// as `message_store.commit_order_lock_key()`.
pub const COMMIT_ORDER_LOCK: i64 = 7_236_089_447_143_116_666;

/// The notification channel the log's statement trigger sends on.
pub const APPENDED_CHANNEL: &str = "message_store_appended";

/// The project's Postgres migrations (event store, Message DB functions, read models).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Options for [`PgEventStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub limits: Limits,
    pub batch: BatchConfig,
    /// The longest one group-commit batch may take, connection included (default
    /// 10 s). A batch that has not committed by then fails as the database being
    /// unavailable (whether it committed is unknown; a retry is recognised as a
    /// replay), so a connection that stops answering mid-write (a partition) cannot
    /// hold up every append behind it.
    pub write_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            batch: BatchConfig::default(),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The Postgres event store.
#[derive(Debug, Clone)]
pub struct PgEventStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
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
struct PgWriter {
    pool: PgPool,
    /// [`PgOptions::write_timeout`].
    write_timeout: Duration,
    /// Stream versions as this process last wrote or read them under the lock: the
    /// guess a batch is planned from for `ExpectedVersion::Any` and `StreamExists`.
    /// A guess is only ever a guess: `message_store.write_batch` checks it.
    versions: std::sync::Mutex<HashMap<String, i64>>,
}

/// Most stream versions [`PgWriter::versions`] keeps; it starts over when full.
const REMEMBERED_VERSIONS: usize = 65_536;

/// Batches planned from a guessed or returned state before one takes the ordering lock
/// for a whole transaction (which cannot find its state moved).
const OPTIMISTIC_ATTEMPTS: usize = 3;

impl PgEventStore {
    /// Connects a pool sized for group commit plus readers.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self::with_pool(pool, options))
    }

    /// Uses an existing pool (its database must be migrated).
    pub fn with_pool(pool: PgPool, options: PgOptions) -> Self {
        let (appended, _) = watch::channel(0_u64);
        let stop = CancellationToken::new();
        let batcher = Batcher::start(
            Arc::new(PgWriter {
                pool: pool.clone(),
                write_timeout: options.write_timeout,
                versions: std::sync::Mutex::default(),
            }),
            options.batch,
            appended.clone(),
        );
        tokio::spawn(listen(pool.clone(), appended.clone(), stop.clone()));
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

    /// The pool, for read models that live in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }
}

/// Applies the project's migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Bumps `appended` on every notification from the log's trigger, so subscriptions in
/// this process wake for appends made by any process or by `write_message`.
async fn listen(pool: PgPool, appended: watch::Sender<u64>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(APPENDED_CHANNEL).await?;
            // Anything committed while we were not listening: wake everyone once.
            appended.send_modify(|n| *n = n.wrapping_add(1));
            loop {
                listener.recv().await?;
                appended.send_modify(|n| *n = n.wrapping_add(1));
            }
            #[expect(unreachable_code, reason = "the loop only ends by error")]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = attempt => {
                if pool.is_closed() {
                    // The application is shutting down.
                    return;
                }
                if let Err(error) = result {
                    tracing::warn!(error = %error, "log notification listener failed; reconnecting");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl BatchWriter for PgWriter {
    async fn write_batch(
        &self,
        requests: &[&[StreamAppend]],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        // Getting a connection is bounded by the pool's acquire timeout; using it, here.
        let mut conn = self.pool.acquire().await?;
        match tokio::time::timeout(self.write_timeout, self.write(&mut conn, requests)).await {
            Ok(result) => result,
            Err(_) => {
                // It may be mid-statement or mid-transaction: close it, never reuse it.
                conn.close_on_drop();
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the database did not finish a batch within {:?}",
                        self.write_timeout
                    ),
                ))
                .into())
            }
        }
    }
}

impl PgWriter {
    /// [`BatchWriter::write_batch`] on `conn`, without its time limit.
    async fn write(
        &self,
        conn: &mut sqlx::PgConnection,
        requests: &[&[StreamAppend]],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
        // Plan from the state the appends expect and write with one autocommit
        // statement that takes the ordering lock, checks that state and inserts: the
        // lock is held for server work and the commit only, never across a client
        // round trip (docs/adr/0002). If the state was not as expected, the statement
        // wrote nothing and returned the actual state: plan again from that.
        let mut state = self.guess(requests);
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            match attempt(&mut *conn, requests, &mut state).await? {
                Some(results) => {
                    self.remember(&state.planned_versions);
                    return Ok(results);
                }
                None => continue,
            }
        }

        // The state kept moving between attempts (other processes writing the same
        // streams).
        let results = write_locked(&mut *conn, requests, &mut state).await?;
        self.remember(&state.planned_versions);
        Ok(results)
    }
}

/// Writes a batch in a transaction that holds the ordering lock from its start, so the
/// state read under it cannot move before the write.
async fn write_locked(
    conn: &mut sqlx::PgConnection,
    requests: &[&[StreamAppend]],
    state: &mut State,
) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
    sqlx::raw_sql("BEGIN; SELECT pg_advisory_xact_lock(message_store.commit_order_lock_key());")
        .execute(&mut *conn)
        .await?;
    let locked = async {
        // At most once moved: the state it returns is read under this lock.
        for _ in 0..2 {
            if let Some(results) = attempt(&mut *conn, requests, state).await? {
                return Ok(results);
            }
        }
        Err(StoreError::Backend(
            "BUG: a batch's state moved while its transaction held the ordering lock".into(),
        ))
    }
    .await;
    match locked {
        Ok(results) => {
            // With nothing written COMMIT ends the transaction all the same.
            sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
            Ok(results)
        }
        Err(e) => {
            // Best effort; a broken connection is discarded by the pool.
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            Err(e)
        }
    }
}

impl PgWriter {
    /// The state a batch expects: no stored ids (a retry is the exception), and every
    /// stream at the version its first append expects, or for `Any` and
    /// `StreamExists` as this process last saw it (-1 if it has not).
    fn guess(&self, requests: &[&[StreamAppend]]) -> State {
        let remembered = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut versions = HashMap::new();
        for append in requests.iter().flat_map(|r| r.iter()) {
            versions
                .entry(append.stream.clone())
                .or_insert_with(|| match append.expected {
                    ExpectedVersion::Exact(v) => v,
                    ExpectedVersion::NoStream => -1,
                    ExpectedVersion::Any | ExpectedVersion::StreamExists => {
                        remembered.get(&append.stream).copied().unwrap_or(-1)
                    }
                });
        }
        let mut streams: Vec<String> = versions.keys().cloned().collect();
        streams.sort_unstable();
        State {
            stored: HashMap::new(),
            versions,
            streams,
            verified: false,
            planned_versions: HashMap::new(),
        }
    }

    /// Keeps the stream versions a batch left behind.
    fn remember(&self, versions: &HashMap<String, i64>) {
        let mut remembered = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if remembered.len() + versions.len() > REMEMBERED_VERSIONS {
            remembered.clear();
        }
        for (stream, version) in versions {
            remembered.insert(stream.clone(), *version);
        }
    }
}

/// What a batch is planned from.
struct State {
    /// Stored events with one of the batch's ids.
    stored: HashMap<Uuid, StoredId>,
    /// The version of every stream the batch names (-1: no events).
    versions: HashMap<String, i64>,
    /// The batch's streams, sorted.
    streams: Vec<String>,
    /// Read from the log (under the lock), not guessed: a plan that writes nothing
    /// needs no check then.
    verified: bool,
    /// The streams' versions after the last plan's rows.
    planned_versions: HashMap<String, i64>,
}

/// Plans the batch from `state` and has `message_store.write_batch` write its rows if
/// `state` holds under the ordering lock. `None` if it did not: nothing was written,
/// and `state` is now the actual state.
async fn attempt(
    conn: &mut sqlx::PgConnection,
    requests: &[&[StreamAppend]],
    state: &mut State,
) -> Result<Option<Vec<Result<AppendOutcome, StoreError>>>, StoreError> {
    let mut planned_versions = state.versions.clone();
    let mut rows: Vec<Row> = Vec::new();
    let planned = batch::plan(requests, &state.stored, &mut planned_versions, &mut rows);
    state.planned_versions = planned_versions;
    if rows.is_empty() && state.verified {
        // Replays and rejections only, decided from committed state.
        return Ok(Some(batch::outcomes(planned, &[])));
    }
    let versions: Vec<i64> = state
        .streams
        .iter()
        .map(|s| state.versions.get(s).copied().unwrap_or(-1))
        .collect();
    let absent: Vec<Uuid> = requests
        .iter()
        .flat_map(|r| r.iter())
        .flat_map(|a| a.events.iter().map(|e| e.id))
        .filter(|id| !state.stored.contains_key(id))
        .collect();
    let mut ids = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    let mut stream_positions = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len());
    let mut metadata = Vec::with_capacity(rows.len());
    for row in &rows {
        ids.push(row.id);
        streams.push(row.stream_name.as_str());
        types.push(row.event_type.as_str());
        stream_positions.push(row.position);
        data.push(&row.data);
        metadata.push(row.metadata.as_ref());
    }
    let returned = sqlx::query(
        "SELECT kind, event_id, event_stream_name, event_type, event_data,
                event_global_position, event_position
           FROM message_store.write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&ids)
    .bind(&streams)
    .bind(&types)
    .bind(&stream_positions)
    .bind(&data)
    .bind(&metadata)
    .bind(&state.streams)
    .bind(&versions)
    .bind(&absent)
    .fetch_all(&mut *conn)
    .await?;

    let mut written = HashMap::with_capacity(rows.len());
    let mut moved = false;
    let mut versions = HashMap::with_capacity(state.streams.len());
    for row in returned {
        match row.try_get::<&str, _>("kind")? {
            "written" => {
                written.insert(
                    row.try_get::<Uuid, _>("event_id")?,
                    row.try_get::<GlobalPosition, _>("event_global_position")?,
                );
            }
            "stored" => {
                let id: Uuid = row.try_get("event_id")?;
                state.stored.insert(
                    id,
                    StoredId {
                        id,
                        stream_name: row.try_get("event_stream_name")?,
                        event_type: row.try_get("event_type")?,
                        data: row
                            .try_get::<Option<Value>, _>("event_data")?
                            .unwrap_or(Value::Null),
                        global_position: row.try_get("event_global_position")?,
                        position: row.try_get("event_position")?,
                    },
                );
            }
            "stream" => {
                moved = true;
                versions.insert(
                    row.try_get::<String, _>("event_stream_name")?,
                    row.try_get::<Option<i64>, _>("event_position")?
                        .unwrap_or(-1),
                );
            }
            other => {
                return Err(StoreError::Backend(
                    format!("BUG: message_store.write_batch returned a {other:?} row").into(),
                ));
            }
        }
    }
    if moved {
        state.versions = versions;
        state.verified = true;
        return Ok(None);
    }
    let positions = ids
        .iter()
        .map(|id| written.get(id).copied())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            StoreError::Backend("BUG: message_store.write_batch did not return every row".into())
        })?;
    Ok(Some(batch::outcomes(planned, &positions)))
}

fn decode(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let time: NaiveDateTime = row.try_get("time")?;
    Ok(RecordedEvent {
        global_position: row.try_get("global_position")?,
        position: row.try_get("position")?,
        time: DateTime::<Utc>::from_naive_utc_and_offset(time, Utc),
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

#[async_trait]
impl EventStore for PgEventStore {
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
        let rows = sqlx::query(
            "SELECT global_position, position, time, stream_name, type, data, metadata, id
               FROM message_store.messages
              WHERE stream_name = $1 AND position >= $2
              ORDER BY position LIMIT $3",
        )
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
        let rows = sqlx::query(
            "SELECT global_position, position, time, stream_name, type, data, metadata, id
               FROM message_store.messages
              WHERE stream_name = $1 AND position < $2
              ORDER BY position DESC LIMIT $3",
        )
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
        let rows =
            match filter {
                LogFilter::All => sqlx::query(
                    "SELECT global_position, position, time, stream_name, type, data, metadata, id
                       FROM message_store.messages
                      WHERE global_position > $1
                      ORDER BY global_position LIMIT $2",
                )
                .bind(after)
                .bind(limit(max))
                .fetch_all(&self.inner.pool)
                .await?,
                LogFilter::Category(category) => sqlx::query(
                    "SELECT global_position, position, time, stream_name, type, data, metadata, id
                       FROM message_store.messages
                      WHERE message_store.category(stream_name) = $1 AND global_position > $2
                      ORDER BY global_position LIMIT $3",
                )
                .bind(category)
                .bind(after)
                .bind(limit(max))
                .fetch_all(&self.inner.pool)
                .await?,
                LogFilter::CategoryMember {
                    category,
                    member,
                    size,
                } => sqlx::query(
                    "SELECT global_position, position, time, stream_name, type, data, metadata, id
                       FROM message_store.messages
                      WHERE message_store.category(stream_name) = $1 AND global_position > $2
                        AND mod(abs(message_store.hash_64(message_store.cardinal_id(stream_name))), $5) = $4
                      ORDER BY global_position LIMIT $3",
                )
                .bind(category)
                .bind(after)
                .bind(limit(max))
                .bind(i64::from(*member))
                .bind(i64::from(*size))
                .fetch_all(&self.inner.pool)
                .await?,
            };
        rows.iter().map(decode).collect()
    }

    async fn read_events_by_id(&self, ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT global_position, position, time, stream_name, type, data, metadata, id
               FROM message_store.messages WHERE id = ANY($1) ORDER BY global_position",
        )
        .bind(ids)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn stream_version(&self, stream: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT max(position) FROM message_store.messages WHERE stream_name = $1",
        )
        .bind(stream)
        .fetch_one(&self.inner.pool)
        .await?)
    }

    async fn head(&self) -> Result<GlobalPosition, StoreError> {
        Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT max(global_position) FROM message_store.messages",
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
        let mut tx = self.inner.pool.begin().await?;
        let rows =
            match selection {
                Selection::Streams(streams) => sqlx::query(
                    "SELECT global_position, stream_name, type, data FROM message_store.messages
                      WHERE stream_name = ANY($1) FOR UPDATE",
                )
                .bind(streams)
                .fetch_all(&mut *tx)
                .await?,
                Selection::MetadataEquals { key, value } => sqlx::query(
                    "SELECT global_position, stream_name, type, data FROM message_store.messages
                      WHERE metadata->>$1 = $2 FOR UPDATE",
                )
                .bind(key)
                .bind(value)
                .fetch_all(&mut *tx)
                .await?,
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
            sqlx::query("UPDATE message_store.messages SET data = $2 WHERE global_position = $1")
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
    #![allow(clippy::unwrap_used, reason = "test code")]

    use colloquy_testkit::TestDatabase;
    use serde_json::json;

    use super::*;
    use crate::model::NewEvent;

    /// Another process's commit lands between a batch's unlocked read and its write:
    /// the ordering lock is held while the batch is written, `other` is inserted under
    /// it once the batch waits for the lock, and then committed. The batch's write then
    /// finds its state moved and must be planned again under the lock.
    async fn write_while_another_commits(
        requests: Vec<StreamAppend>,
        other: (&str, i64, Uuid, Value),
    ) -> (
        Result<AppendOutcome, StoreError>,
        GlobalPosition,
        Vec<(i64, i64)>,
    ) {
        let db = TestDatabase::new().await;
        let pool = db.pool().await;
        let writer = PgWriter {
            pool: pool.clone(),
            write_timeout: PgOptions::default().write_timeout,
            versions: std::sync::Mutex::default(),
        };
        let mut held = pool.begin().await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(message_store.commit_order_lock_key())")
            .execute(&mut *held)
            .await
            .unwrap();
        let task = tokio::spawn(async move { writer.write_batch(&[requests.as_slice()]).await });
        tokio::time::timeout(Duration::from_secs(20), async {
            while sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 0
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the batch waits for the ordering lock");
        let (stream, position, id, data) = other;
        let other_position: i64 = sqlx::query_scalar(
            "INSERT INTO message_store.messages (id, stream_name, type, position, data)
             VALUES ($1, $2, 'A', $3, $4) RETURNING global_position",
        )
        .bind(id)
        .bind(stream)
        .bind(position)
        .bind(&data)
        .fetch_one(&mut *held)
        .await
        .unwrap();
        held.commit().await.unwrap();
        let mut results = task.await.unwrap().unwrap();
        assert_eq!(results.len(), 1);
        let log = sqlx::query_as(
            "SELECT global_position, position FROM message_store.messages
              WHERE stream_name = $1 ORDER BY global_position",
        )
        .bind(stream)
        .fetch_all(&pool)
        .await
        .unwrap();
        (results.pop().unwrap(), other_position, log)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_moved_is_appended_to_after_its_new_version() {
        let (result, other, log) = write_while_another_commits(
            vec![StreamAppend::new(
                "moved-1",
                ExpectedVersion::Any,
                vec![NewEvent::new(Uuid::new_v4(), "A", json!({"n": 1}))],
            )],
            ("moved-1", 0, Uuid::new_v4(), json!({"n": 0})),
        )
        .await;
        let outcome = result.unwrap();
        assert_eq!(outcome.streams[0].version, 1);
        assert!(outcome.positions[0] > other);
        assert_eq!(log, vec![(other, 0), (outcome.positions[0], 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_created_meanwhile_fails_no_stream() {
        let (result, other, log) = write_while_another_commits(
            vec![StreamAppend::new(
                "moved-1",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(Uuid::new_v4(), "A", json!({}))],
            )],
            ("moved-1", 0, Uuid::new_v4(), json!({})),
        )
        .await;
        assert!(
            matches!(
                result,
                Err(StoreError::WrongExpectedVersion { actual: 0, .. })
            ),
            "{result:?}"
        );
        assert_eq!(log, vec![(other, 0)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_stored_meanwhile_is_a_replay() {
        let id = Uuid::new_v4();
        let (result, other, log) = write_while_another_commits(
            vec![StreamAppend::new(
                "moved-1",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(id, "A", json!({"n": 1}))],
            )],
            ("moved-1", 0, id, json!({"n": 1})),
        )
        .await;
        let outcome = result.unwrap();
        assert!(outcome.replayed);
        assert_eq!(outcome.positions, vec![other]);
        assert_eq!(log, vec![(other, 0)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_stored_meanwhile_elsewhere_is_a_conflict() {
        let id = Uuid::new_v4();
        let (result, other, log) = write_while_another_commits(
            vec![StreamAppend::new(
                "mine-1",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(id, "A", json!({"n": 1}))],
            )],
            ("theirs-1", 0, id, json!({"n": 1})),
        )
        .await;
        assert!(
            matches!(result, Err(StoreError::DuplicateEventId { id: d }) if d == id),
            "{result:?}"
        );
        assert_eq!(log, vec![(other, 0)]);
    }

    /// A plan from a wrong guess that writes nothing (a rejection) is not trusted: the
    /// function checks it, and the batch is planned again from the actual state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejection_planned_from_a_guess_is_checked() {
        let db = TestDatabase::new().await;
        let pool = db.pool().await;
        let writer = PgWriter {
            pool: pool.clone(),
            write_timeout: PgOptions::default().write_timeout,
            versions: std::sync::Mutex::default(),
        };
        // Written by another process: this one has not seen the stream.
        for position in 0..3 {
            sqlx::query(
                "INSERT INTO message_store.messages (id, stream_name, type, position, data)
                 VALUES ($1, 'guess-1', 'A', $2, '{}')",
            )
            .bind(Uuid::new_v4())
            .bind(position)
            .execute(&pool)
            .await
            .unwrap();
        }
        // Guessed as having no events, which rejects StreamExists.
        let requests = [StreamAppend::new(
            "guess-1",
            ExpectedVersion::StreamExists,
            vec![NewEvent::new(Uuid::new_v4(), "A", json!({}))],
        )];
        let outcome = writer
            .write_batch(&[requests.as_slice()])
            .await
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(outcome.streams[0].version, 3);
        // Guessed as the appends expect it, which writes: checked too.
        let requests = [StreamAppend::new(
            "guess-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(Uuid::new_v4(), "A", json!({}))],
        )];
        let result = writer
            .write_batch(&[requests.as_slice()])
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert!(
            matches!(
                result,
                Err(StoreError::WrongExpectedVersion { actual: 3, .. })
            ),
            "{result:?}"
        );
    }

    /// The last resort, a transaction that holds the lock from its start, plans again
    /// from the state read under it when its guess was wrong.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_locked_write_plans_from_the_state_read_under_the_lock() {
        let db = TestDatabase::new().await;
        let pool = db.pool().await;
        let writer = PgWriter {
            pool: pool.clone(),
            write_timeout: PgOptions::default().write_timeout,
            versions: std::sync::Mutex::default(),
        };
        let stored = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO message_store.messages (id, stream_name, type, position, data)
             VALUES ($1, 'locked-1', 'A', 0, '{\"n\": 0}')",
        )
        .bind(stored)
        .execute(&pool)
        .await
        .unwrap();
        let new = Uuid::new_v4();
        let first = [StreamAppend::new(
            "locked-1",
            ExpectedVersion::Any,
            vec![NewEvent::new(new, "A", json!({"n": 1}))],
        )];
        let retry = [StreamAppend::new(
            "locked-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::new(stored, "A", json!({"n": 0}))],
        )];
        let requests = [first.as_slice(), retry.as_slice()];
        let mut state = writer.guess(&requests);
        let mut conn = pool.acquire().await.unwrap();
        let mut results = write_locked(&mut conn, &requests, &mut state)
            .await
            .unwrap();
        let replay = results.pop().unwrap().unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.streams[0].version, 0);
        let written = results.pop().unwrap().unwrap();
        assert!(!written.replayed);
        assert_eq!(written.streams[0].version, 1);
        let locks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(locks, 0, "the transaction ended and let go of the lock");
        let log: Vec<(i64, Uuid)> = sqlx::query_as(
            "SELECT position, id FROM message_store.messages
              WHERE stream_name = 'locked-1' ORDER BY position",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(log, vec![(0, stored), (1, new)]);
    }
}
