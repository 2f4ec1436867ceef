//! The Postgres backend: Message DB's `message_store.messages` table, written through
//! group-commit batches that take the commit-ordering lock (see
//! `migrations/postgres/0001_message_store.sql` and docs/adr/0002).

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
    AppendOutcome, GlobalPosition, Limits, LogFilter, RecordedEvent, StoreError, StreamAppend,
    validate,
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
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    pub limits: Limits,
    pub batch: BatchConfig,
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
}

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
            Arc::new(PgWriter { pool: pool.clone() }),
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
        let mut ids = Vec::new();
        let mut streams = Vec::new();
        for append in requests.iter().flat_map(|r| r.iter()) {
            streams.push(append.stream.clone());
            ids.extend(append.events.iter().map(|e| e.id));
        }
        streams.sort_unstable();
        streams.dedup();

        let mut conn = self.pool.acquire().await?;
        // BEGIN and the lock in one round trip. The lock is held to the end of the
        // transaction, and released only after the commit is visible. Custom plans:
        // a generic plan cached while the table was small scans it sequentially for
        // the id look-up, holding the lock for as long as the table is large (seen in
        // `colloquy bench append` on a fresh database); planning for the actual
        // parameters and table size costs far less than that.
        sqlx::raw_sql(
            "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; \
             SELECT pg_advisory_xact_lock(message_store.commit_order_lock_key());",
        )
        .execute(&mut *conn)
        .await?;
        let result = write_locked(&mut conn, requests, &ids, &streams).await;
        match result {
            Ok((results, wrote)) => {
                if wrote {
                    sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
                } else {
                    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
                }
                Ok(results)
            }
            Err(e) => {
                // Best effort; a broken connection is discarded by the pool.
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                Err(e)
            }
        }
    }
}

async fn write_locked(
    conn: &mut sqlx::PgConnection,
    requests: &[&[StreamAppend]],
    ids: &[Uuid],
    streams: &[String],
) -> Result<(Vec<Result<AppendOutcome, StoreError>>, bool), StoreError> {
    // Stored events with the requested ids, and the version of every named stream, in
    // one round trip. The stream versions use the (stream_name, position) index
    // backwards, one probe per stream, however long the stream is.
    let rows = sqlx::query(
        "SELECT true AS is_id, m.id, m.stream_name, m.type, m.data, m.global_position, m.position
           FROM message_store.messages m WHERE m.id = ANY($1)
         UNION ALL
         SELECT false, NULL, s.name, NULL, NULL, NULL,
                (SELECT max(position) FROM message_store.messages WHERE stream_name = s.name)
           FROM unnest($2::text[]) AS s(name)",
    )
    .bind(ids)
    .bind(streams)
    .fetch_all(&mut *conn)
    .await?;
    let mut stored = HashMap::new();
    let mut versions = HashMap::new();
    for row in rows {
        let stream: String = row.try_get("stream_name")?;
        if row.try_get::<bool, _>("is_id")? {
            let id: Uuid = row.try_get("id")?;
            stored.insert(
                id,
                StoredId {
                    id,
                    stream_name: stream,
                    event_type: row.try_get("type")?,
                    data: row
                        .try_get::<Option<Value>, _>("data")?
                        .unwrap_or(Value::Null),
                    global_position: row.try_get("global_position")?,
                    position: row.try_get("position")?,
                },
            );
        } else if let Some(version) = row.try_get::<Option<i64>, _>("position")? {
            versions.insert(stream, version);
        }
    }

    let mut new_rows: Vec<Row> = Vec::new();
    let planned = batch::plan(requests, &stored, &mut versions, &mut new_rows);
    let mut positions = Vec::with_capacity(new_rows.len());
    if !new_rows.is_empty() {
        positions = insert_rows(conn, &new_rows).await?;
    }
    let wrote = !new_rows.is_empty();
    Ok((batch::outcomes(planned, &positions), wrote))
}

/// Inserts rows in order with one statement; the trigger draws their global positions
/// in that order. Returns the positions, aligned with `rows`.
async fn insert_rows(
    conn: &mut sqlx::PgConnection,
    rows: &[Row],
) -> Result<Vec<GlobalPosition>, StoreError> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    let mut stream_positions = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len());
    let mut metadata = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.id);
        streams.push(row.stream_name.as_str());
        types.push(row.event_type.as_str());
        stream_positions.push(row.position);
        data.push(&row.data);
        metadata.push(row.metadata.as_ref());
    }
    let returned = sqlx::query(
        "INSERT INTO message_store.messages (id, stream_name, type, position, data, metadata)
         SELECT id, stream_name, type, position, data, metadata
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::jsonb[], $6::jsonb[])
                WITH ORDINALITY AS t(id, stream_name, type, position, data, metadata, ord)
          ORDER BY ord
         RETURNING id, global_position",
    )
    .bind(&ids)
    .bind(&streams)
    .bind(&types)
    .bind(&stream_positions)
    .bind(&data)
    .bind(&metadata)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_id = HashMap::with_capacity(returned.len());
    for row in returned {
        by_id.insert(
            row.try_get::<Uuid, _>("id")?,
            row.try_get::<i64, _>("global_position")?,
        );
    }
    Ok(ids
        .iter()
        .map(|id| *by_id.get(id).expect("BUG: every inserted row is returned"))
        .collect())
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
