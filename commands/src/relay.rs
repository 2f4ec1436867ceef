//! The relay: publishes the log to a JetStream stream, in global-position order, each
//! event once (architecture rules 4, 7 and 8).
//!
//! - **One leader.** Relays in every process compete for a Postgres session-level
//!   advisory lock, held on a dedicated connection ([`RelayConfig::lock_key`]). Only the
//!   holder publishes; the others poll for the lock. If the leader's connection drops,
//!   Postgres releases the lock and another relay takes over within a poll interval. The
//!   leader checks its connection between batches and stops when it is gone.
//! - **Fencing.** Every publish carries `Nats-Expected-Last-Sequence`: the leader reads
//!   the stream's last sequence when it resumes and counts up from it. A relay that lost
//!   leadership but still runs has a stale count, so JetStream refuses its publishes;
//!   it stops and resumes (and, having lost the lock, stops publishing altogether).
//!   Every publish after the first of a run also carries `Nats-Expected-Last-Msg-Id` =
//!   the previous event's id, so once one pipelined publish is refused, none after it
//!   can land and leave a gap.
//! - **Resume from the stream.** At start and after every failure the relay reads the
//!   stream's last message and continues after its `Colloquy-Position`. Only when the
//!   stream holds no position (purged, recreated, emptied) does it fall back to its own
//!   checkpoint in `colloquy.relay_checkpoint`, then to 0. Duplicates therefore never
//!   depend on JetStream's duplicate window, however long an outage lasts; the window
//!   (`Nats-Msg-Id` = event id) is a second line of defence.
//! - **Pipelining.** Up to [`RelayConfig::max_in_flight`] publishes are outstanding;
//!   acks are awaited in order. A task reads the log ahead (a [`Subscription`] over
//!   [`LogFilter::All`], woken by appends) and encodes messages, so reading Postgres,
//!   encoding and publishing overlap.
//!
//! Each message carries the previous event's position and the previous position in its
//! category, so consumers notice when NATS lost something ([`wire`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{self, RawMessageErrorKind, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use colloquy_eventstore::{
    EventStore, GlobalPosition, LogFilter, PgEventStore, RecordedEvent, Subscription, wire,
};
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use sqlx::postgres::{PgConnection, PgExecutor};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The default advisory-lock key relays compete for (in the log's database). Distinct
/// from the event store's commit-order lock.
pub const RELAY_LOCK: i64 = 7_236_089_447_143_116_701;

/// How far back from the stream's last sequence resume looks for a message carrying a
/// position (messages published by others carry none) before using the checkpoint.
const MAX_WALK_BACK: u64 = 256;

/// Categories remembered for `Colloquy-Previous-In-Category`; beyond this the map is
/// cleared and re-seeded from the log (one query per category).
const MAX_CATEGORIES: usize = 10_000;

/// Bound on each leader-connection query (lock, liveness, checkpoint).
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping relay waits for acks already in flight, to record them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// First delay after a failure; it doubles up to [`RelayConfig::max_backoff`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// What the relay publishes to, and how.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Subject prefix (`COLLOQUY_SUBJECT_PREFIX`): events go to `<prefix>.ev.…`.
    pub prefix: String,
    /// JetStream stream name (`COLLOQUY_STREAM`).
    pub stream: String,
    /// Stream replicas (`COLLOQUY_STREAM_REPLICAS`).
    pub replicas: usize,
    /// JetStream duplicate window (`COLLOQUY_DUPLICATE_WINDOW`).
    pub duplicate_window: Duration,
    /// Stream max age; zero keeps messages until limits remove them (the default).
    pub max_age: Duration,
    /// Publishes awaiting their ack at once (default 256).
    pub max_in_flight: usize,
    /// The advisory-lock key relays compete for ([`RELAY_LOCK`]).
    pub lock_key: i64,
    /// How often a relay that is not leader tries to take the lock (default 500 ms).
    pub leader_poll: Duration,
    /// How often the leader checks its lock connection and writes its checkpoint
    /// (default 500 ms).
    pub check_interval: Duration,
    /// Events per read of the log (default 1000).
    pub read_batch: usize,
    /// Longest delay between retries after failures (default 5 s).
    pub max_backoff: Duration,
}

impl RelayConfig {
    /// The defaults for a prefix and a stream name.
    pub fn new(prefix: impl Into<String>, stream: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            stream: stream.into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            max_in_flight: 256,
            lock_key: RELAY_LOCK,
            leader_poll: Duration::from_millis(500),
            check_interval: Duration::from_millis(500),
            read_batch: 1_000,
            max_backoff: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.prefix.is_empty()
            || self.prefix.split('.').any(|t| {
                t.is_empty() || t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
            })
        {
            bail!(
                "relay subject prefix {:?} must be dot-separated tokens without spaces or wildcards",
                self.prefix
            );
        }
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!(
                "relay stream name {:?} must be letters, digits, '_' and '-'",
                self.stream
            );
        }
        if self.max_in_flight == 0 {
            bail!("relay max_in_flight must be at least 1");
        }
        Ok(())
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self::new("colloquy", "COLLOQUY")
    }
}

/// Creates the relay's stream, or brings an existing one to the relay's settings:
/// subjects `<prefix>.ev.>` (other subjects an operator added are kept), file storage,
/// limits retention, the configured replicas, duplicate window and max age.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &RelayConfig,
) -> anyhow::Result<stream::Info> {
    config.validate()?;
    let subject = wire::filter(&config.prefix, None);
    let apply = |c: &mut stream::Config| {
        if !c.subjects.contains(&subject) {
            c.subjects.push(subject.clone());
        }
        c.retention = RetentionPolicy::Limits;
        c.num_replicas = config.replicas;
        c.duplicate_window = config.duplicate_window;
        c.max_age = config.max_age;
    };
    match js.get_stream(&config.stream).await {
        Ok(existing) => {
            let current = existing.cached_info().config.clone();
            if current.storage != StorageType::File {
                bail!(
                    "JetStream stream {} uses {:?} storage; the relay needs file storage, and a stream's storage cannot be changed: delete the stream (the relay republishes from its checkpoint) or recreate it with file storage",
                    config.stream,
                    current.storage
                );
            }
            let mut wanted = current.clone();
            apply(&mut wanted);
            if wanted == current {
                return Ok(existing.cached_info().clone());
            }
            js.update_stream(wanted)
                .await
                .with_context(|| format!("Failed to update JetStream stream {}", config.stream))
        }
        Err(error) if is_stream_not_found(&error) => {
            let mut wanted = stream::Config {
                name: config.stream.clone(),
                storage: StorageType::File,
                ..Default::default()
            };
            apply(&mut wanted);
            match js.create_stream(wanted).await {
                Ok(mut created) => Ok(created
                    .info()
                    .await
                    .context("Failed to read the new stream's info")?
                    .clone()),
                // Another relay created it at the same moment.
                Err(error)
                    if matches!(&error.kind(), CreateStreamErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                {
                    Box::pin(ensure_stream(js, config)).await
                }
                Err(error) => Err(error).with_context(|| {
                    format!("Failed to create JetStream stream {}", config.stream)
                }),
            }
        }
        Err(error) => Err(error)
            .with_context(|| format!("Failed to look up JetStream stream {}", config.stream)),
    }
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(&error.kind(), GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The relay's checkpoint for a stream: the highest position it knows the stream to
/// hold, or `None` if it has never published to it.
pub async fn checkpoint<'c>(
    executor: impl PgExecutor<'c>,
    stream: &str,
) -> Result<Option<GlobalPosition>, sqlx::Error> {
    sqlx::query_scalar("SELECT position FROM colloquy.relay_checkpoint WHERE stream = $1")
        .bind(stream)
        .fetch_optional(executor)
        .await
}

async fn write_checkpoint(
    conn: &mut PgConnection,
    stream: &str,
    position: GlobalPosition,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO colloquy.relay_checkpoint AS c (stream, position) VALUES ($1, $2)
         ON CONFLICT (stream) DO UPDATE
            SET position = GREATEST(c.position, EXCLUDED.position), updated_at = now()",
    )
    .bind(stream)
    .bind(position)
    .execute(conn)
    .await
    .map(|_| ())
}

/// Counters for metrics and lag. Read them through [`Relay::stats`].
#[derive(Debug, Default)]
pub struct RelayStats {
    published: AtomicU64,
    last_position: AtomicI64,
    leader: AtomicBool,
    resumes: AtomicU64,
    fenced: AtomicU64,
    failures: AtomicU64,
}

impl RelayStats {
    /// Messages this relay has had acknowledged as stored.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// The highest position known to be in the stream (acknowledged, or found there on
    /// resume); lag is the log's head minus this.
    pub fn last_position(&self) -> GlobalPosition {
        self.last_position.load(Ordering::Relaxed)
    }

    /// Whether this relay holds the leader lock.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// How many times this relay has resumed (read the stream's position and started
    /// publishing).
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// How many times a publish was refused because the stream changed under this
    /// relay (another publisher), after which it resumed.
    pub fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Failures that made the relay give up leadership and retry after a backoff.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The relay. Build one per process with [`Relay::new`] and [`Relay::run`] it.
#[derive(Debug)]
pub struct Relay {
    store: PgEventStore,
    js: jetstream::Context,
    config: RelayConfig,
    stats: Arc<RelayStats>,
}

/// Why a publishing run ended without a shutdown.
enum Failure {
    /// The stream is not where this relay thought: another publisher wrote to it, or it
    /// was recreated. Resume at once, keeping leadership.
    Fenced(String),
    /// Anything else: give up leadership, back off, retry.
    Hard(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Hard(error)
    }
}

/// Where a publishing run starts.
#[derive(Debug, Clone, Copy)]
struct Resume {
    /// Publish the events after this position.
    after: GlobalPosition,
    /// The stream's last sequence: the first publish expects it.
    last_sequence: u64,
    /// The checkpoint as stored (0 if none).
    checkpoint: GlobalPosition,
}

/// One encoded event, ready to publish.
struct Outgoing {
    position: GlobalPosition,
    /// The event id (`Nats-Msg-Id`).
    id: String,
    subject: String,
    headers: HeaderMap,
    payload: Vec<u8>,
}

/// A publish awaiting its ack.
struct Pending {
    position: GlobalPosition,
    /// The last sequence it was published to follow.
    expected: u64,
}

type AckFuture = Pin<Box<dyn Future<Output = (Pending, Result<PublishAck, PublishError>)> + Send>>;

/// Aborts the log reader when a publishing run ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Relay {
    pub fn new(store: PgEventStore, js: jetstream::Context, config: RelayConfig) -> Self {
        Self {
            store,
            js,
            config,
            stats: Arc::new(RelayStats::default()),
        }
    }

    /// Live counters (shared; they keep updating while the relay runs).
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Becomes leader, resumes and publishes until `shutdown` is cancelled. Transient
    /// failures (Postgres or NATS unavailable, a lost lock, a fenced publish) are logged
    /// once each and retried with backoff; only an invalid configuration is an error.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.config.validate()?;
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            let published = self.stats.published();
            let result = self.term(&shutdown).await;
            self.stats.leader.store(false, Ordering::Relaxed);
            let Err(error) = result else {
                break;
            };
            if self.stats.published() > published {
                backoff = MIN_BACKOFF;
            }
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            let delay = jitter(backoff);
            tracing::warn!(
                error = format!("{error:#}"),
                stream = %self.config.stream,
                retry_in = ?delay,
                "relay stopped publishing; retrying"
            );
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.config.max_backoff.max(MIN_BACKOFF));
        }
        tracing::info!(stream = %self.config.stream, "relay stopped");
        Ok(())
    }

    /// One term: take the lock, lead until shutdown or failure, let the lock go.
    async fn term(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let Some(mut conn) = self.acquire(shutdown).await? else {
            return Ok(());
        };
        self.stats.leader.store(true, Ordering::Relaxed);
        tracing::info!(stream = %self.config.stream, "relay is the leader");
        let result = self.lead(&mut conn, shutdown).await;
        self.stats.leader.store(false, Ordering::Relaxed);
        // Ending the session releases the lock (if the connection is broken, the server
        // has released it already).
        let _ = tokio::time::timeout(DB_TIMEOUT, conn.close()).await;
        result
    }

    /// Waits for the leader lock on a dedicated connection; `None` on shutdown.
    async fn acquire(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<PgConnection>> {
        let options = (*self.store.pool().connect_options())
            .clone()
            .application_name("colloquy-relay")
            // Let the server notice a vanished leader within about half a minute (not
            // the OS default of two hours), so the lock moves on.
            .options([
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]);
        let mut conn = tokio::time::timeout(DB_TIMEOUT, options.connect())
            .await
            .map_err(|_| anyhow!("timed out connecting to Postgres for the relay lock"))?
            .context("Failed to connect to Postgres for the relay lock")?;
        let mut waiting_logged = false;
        loop {
            let locked: bool = tokio::time::timeout(
                DB_TIMEOUT,
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(self.config.lock_key)
                    .fetch_one(&mut conn),
            )
            .await
            .map_err(|_| anyhow!("timed out taking the relay lock"))?
            .context("Failed to take the relay lock")?;
            if locked {
                return Ok(Some(conn));
            }
            if !waiting_logged {
                tracing::info!(stream = %self.config.stream, "another relay is the leader; standing by");
                waiting_logged = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(DB_TIMEOUT, conn.close()).await;
                    return Ok(None);
                }
                () = tokio::time::sleep(self.config.leader_poll) => {}
            }
        }
    }

    /// Resumes and publishes until shutdown; resumes again at once after a fenced
    /// publish; returns on any other failure.
    async fn lead(
        &self,
        conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut fenced_delay = Duration::ZERO;
        while !shutdown.is_cancelled() {
            let resume = self.resume(conn).await?;
            let before = self.stats.last_position();
            match self.publish(conn, resume, shutdown).await {
                Ok(()) => return Ok(()),
                Err(Failure::Hard(error)) => return Err(error),
                Err(Failure::Fenced(reason)) => {
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    // Something keeps writing to the stream: don't spin.
                    fenced_delay = if self.stats.last_position() > before {
                        Duration::ZERO
                    } else {
                        (fenced_delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
                    };
                    tracing::info!(
                        stream = %self.config.stream,
                        reason,
                        "the stream changed under the relay; resuming from what it holds"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(fenced_delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads where to continue: the position of the stream's last message that has
    /// one, else the checkpoint, else 0. Creates the stream if it is missing.
    async fn resume(&self, conn: &mut PgConnection) -> anyhow::Result<Resume> {
        let name = &self.config.stream;
        let stream = match self.js.get_stream(name).await {
            Ok(stream) => stream,
            Err(error) if is_stream_not_found(&error) => {
                tracing::warn!(stream = %name, "JetStream stream is missing; creating it");
                ensure_stream(&self.js, &self.config).await?;
                self.js
                    .get_stream(name)
                    .await
                    .with_context(|| format!("Failed to read JetStream stream {name}"))?
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("Failed to read JetStream stream {name}"));
            }
        };
        let state = &stream.cached_info().state;
        let last_sequence = state.last_sequence;
        let mut held = None;
        if state.messages > 0 {
            let first = state.first_sequence.max(1);
            let mut sequence = last_sequence;
            while sequence >= first && last_sequence - sequence < MAX_WALK_BACK {
                match stream.get_raw_message(sequence).await {
                    Ok(message) => {
                        if let Some(position) = message
                            .headers
                            .get(wire::POSITION)
                            .and_then(|v| v.as_str().parse::<GlobalPosition>().ok())
                        {
                            held = Some(position);
                            break;
                        }
                    }
                    Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
                    Err(error) => {
                        return Err(error).with_context(|| {
                            format!("Failed to read message {sequence} of JetStream stream {name}")
                        });
                    }
                }
                sequence -= 1;
            }
            if held.is_none() {
                tracing::warn!(
                    stream = %name,
                    last_sequence,
                    "no relayed message near the end of the stream; continuing from the relay checkpoint"
                );
            }
        }
        let stored = tokio::time::timeout(DB_TIMEOUT, checkpoint(&mut *conn, name))
            .await
            .map_err(|_| anyhow!("timed out reading the relay checkpoint"))?
            .context("Failed to read the relay checkpoint")?
            .unwrap_or(0);
        let after = held.unwrap_or(stored);
        let head = self
            .store
            .head()
            .await
            .context("Failed to read the log's head")?;
        if after > head {
            tracing::warn!(
                stream = %name,
                after,
                head,
                "the stream is ahead of the log (a restored database, or a stream shared by two databases?); waiting for the log to pass it"
            );
        }
        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
        self.stats.last_position.store(after, Ordering::Relaxed);
        tracing::debug!(stream = %name, after, last_sequence, from_stream = held.is_some(), "relay resuming");
        Ok(Resume {
            after,
            last_sequence,
            checkpoint: stored,
        })
    }

    /// Publishes the log after `resume.after` until shutdown or failure.
    async fn publish(
        &self,
        conn: &mut PgConnection,
        resume: Resume,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let (tx, mut rx) = mpsc::channel(self.config.read_batch.max(self.config.max_in_flight) * 2);
        let _reader = AbortOnDrop(tokio::spawn(read_log(
            self.store.clone(),
            self.config.prefix.clone(),
            resume.after,
            self.config.read_batch,
            tx,
        )));
        let mut next_expected = resume.last_sequence;
        // The id of the event published just before in this run (none for the first).
        let mut previous_id: Option<String> = None;
        // The highest position known to be in the stream, and the one recorded.
        let mut acked = resume.after;
        let mut recorded = resume.checkpoint;
        let mut in_flight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();

        let outcome = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some((pending, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Err(failure) = self.settle(pending, result, &mut acked) {
                        break Err(failure);
                    }
                }
                item = rx.recv(), if in_flight.len() < self.config.max_in_flight => {
                    let outgoing = match item {
                        Some(Ok(outgoing)) => outgoing,
                        Some(Err(error)) => break Err(Failure::Hard(error)),
                        None => break Err(Failure::Hard(anyhow!("the log reader stopped"))),
                    };
                    let id = outgoing.id.clone();
                    match self.send(outgoing, next_expected, previous_id.take()).await {
                        Ok(ack) => {
                            in_flight.push_back(ack);
                            next_expected += 1;
                            previous_id = Some(id);
                        }
                        Err(error) => break Err(Failure::Hard(error)),
                    }
                }
                _ = check.tick() => {
                    if let Err(error) = self.check_leader(conn, acked, &mut recorded).await {
                        break Err(Failure::Hard(error));
                    }
                }
            }
        };

        if outcome.is_ok() {
            // Stopping: record what is already on its way, briefly.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while let Some((pending, result)) = in_flight.next().await {
                    if self.settle(pending, result, &mut acked).is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        drop(in_flight);
        // Best effort: after a purge, this is where the next resume starts.
        if acked > recorded {
            let _ = tokio::time::timeout(
                DB_TIMEOUT,
                write_checkpoint(conn, &self.config.stream, acked),
            )
            .await;
        }
        outcome
    }

    /// Publishes one message fenced twice: by the stream sequence it must follow, and
    /// (after the first of a run) by the id of the message it must follow. The sequence
    /// alone cannot stop a pipelined publish from landing after a refused one (if exactly
    /// one foreign message was stored, the next publish's expected sequence matches
    /// again, leaving a gap); the id chain can: once one publish of a run is refused,
    /// every later one is too.
    async fn send(
        &self,
        outgoing: Outgoing,
        expected: u64,
        previous_id: Option<String>,
    ) -> anyhow::Result<AckFuture> {
        let Outgoing {
            position,
            subject,
            mut headers,
            payload,
            ..
        } = outgoing;
        headers.insert(wire::EXPECTED_LAST_SEQUENCE, expected.to_string());
        if let Some(previous_id) = previous_id {
            headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, previous_id);
        }
        let ack = self
            .js
            .send_publish(
                subject,
                PublishMessage::build()
                    .headers(headers)
                    .payload(payload.into()),
            )
            .await
            .with_context(|| format!("Failed to publish the event at position {position}"))?;
        let pending = Pending { position, expected };
        Ok(Box::pin(async move { (pending, ack.await) }))
    }

    /// Handles one ack, in publish order.
    fn settle(
        &self,
        pending: Pending,
        result: Result<PublishAck, PublishError>,
        acked: &mut GlobalPosition,
    ) -> Result<(), Failure> {
        match result {
            Ok(ack) if ack.duplicate => {
                // JetStream already holds this event id (within its duplicate window): it
                // was not stored again, so the stream's last sequence did not move, and the
                // publishes after this one (which expected it to) will be refused and sent
                // again after a resume. The event itself is in the stream.
                *acked = (*acked).max(pending.position);
                self.stats.last_position.store(*acked, Ordering::Relaxed);
                Ok(())
            }
            Ok(ack) => {
                *acked = pending.position;
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .last_position
                    .store(pending.position, Ordering::Relaxed);
                if ack.sequence == pending.expected + 1 {
                    Ok(())
                } else {
                    // Only possible where the server did not check the expectation (a
                    // 2.9 server does not check an expected last sequence of 0).
                    Err(Failure::Fenced(format!(
                        "stored at sequence {} where {} was expected",
                        ack.sequence,
                        pending.expected + 1
                    )))
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                ) =>
            {
                Err(Failure::Fenced(format!(
                    "publish at position {} refused: {error}",
                    pending.position
                )))
            }
            Err(error) => Err(Failure::Hard(anyhow::Error::new(error).context(format!(
                "the publish of position {} was not acknowledged",
                pending.position
            )))),
        }
    }

    /// Proves the lock connection is alive (so the lock is still held), recording the
    /// checkpoint through it when there is progress to record.
    async fn check_leader(
        &self,
        conn: &mut PgConnection,
        acked: GlobalPosition,
        recorded: &mut GlobalPosition,
    ) -> anyhow::Result<()> {
        let check = async {
            if acked > *recorded {
                write_checkpoint(conn, &self.config.stream, acked).await?;
                *recorded = acked;
            } else {
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        tokio::time::timeout(DB_TIMEOUT, check)
            .await
            .map_err(|_| anyhow!("the relay's lock connection did not answer"))?
            .context("the relay's lock connection failed (leadership lost)")
    }
}

/// Reads the log after `after` and sends encoded messages, in order, until the receiver
/// goes away or reading fails (the failure is sent, then the task ends).
async fn read_log(
    store: PgEventStore,
    prefix: String,
    after: GlobalPosition,
    batch: usize,
    tx: mpsc::Sender<anyhow::Result<Outgoing>>,
) {
    let mut subscription =
        Subscription::new(Arc::new(store.clone()), LogFilter::All, after).with_batch_size(batch);
    let mut chain = Chain::new(after);
    loop {
        let next = async {
            let event = subscription
                .next_event()
                .await
                .context("Failed to read the log")?;
            chain.next(&store, &prefix, &event).await
        }
        .await;
        let failed = next.is_err();
        if tx.send(next).await.is_err() || failed {
            return;
        }
    }
}

/// The previous-position chains: the previous event in the log, and per category.
struct Chain {
    previous: GlobalPosition,
    categories: HashMap<String, GlobalPosition>,
}

impl Chain {
    fn new(after: GlobalPosition) -> Self {
        Self {
            previous: after,
            categories: HashMap::new(),
        }
    }

    async fn next(
        &mut self,
        store: &PgEventStore,
        prefix: &str,
        event: &RecordedEvent,
    ) -> anyhow::Result<Outgoing> {
        let category = event.category();
        let previous_in_category = match self.categories.get(category) {
            Some(position) => *position,
            None => {
                // First sight of this category since the resume: look its previous event
                // up (an index probe on the category index).
                if self.categories.len() >= MAX_CATEGORIES {
                    self.categories.clear();
                }
                sqlx::query_scalar::<_, Option<GlobalPosition>>(
                    "SELECT max(global_position) FROM message_store.messages
                      WHERE message_store.category(stream_name) = $1 AND global_position < $2",
                )
                .bind(category)
                .bind(event.global_position)
                .fetch_one(store.pool())
                .await
                .context("Failed to look up the previous event of a category")?
                .unwrap_or(0)
            }
        };
        self.categories
            .insert(category.to_owned(), event.global_position);
        let outgoing = encode(prefix, event, self.previous, previous_in_category);
        self.previous = event.global_position;
        Ok(outgoing)
    }
}

/// The message for an event (all headers but the fencing one, which the publisher adds).
fn encode(
    prefix: &str,
    event: &RecordedEvent,
    previous: GlobalPosition,
    previous_in_category: GlobalPosition,
) -> Outgoing {
    let id = event.id.to_string();
    let mut headers = HeaderMap::new();
    headers.insert(wire::MSG_ID, id.as_str());
    headers.insert(wire::POSITION, event.global_position.to_string());
    headers.insert(wire::STREAM_POSITION, event.position.to_string());
    headers.insert(wire::STREAM, header_text(&event.stream_name));
    headers.insert(wire::TYPE, header_text(&event.event_type));
    headers.insert(wire::PREVIOUS, previous.to_string());
    headers.insert(wire::PREVIOUS_IN_CATEGORY, previous_in_category.to_string());
    if let Some(traceparent) = wire::traceparent(event)
        && !traceparent.contains(['\r', '\n'])
    {
        headers.insert(wire::TRACEPARENT, traceparent);
    }
    let payload = serde_json::to_vec(&wire::Payload::from(event))
        .expect("BUG: an event payload always serialises");
    Outgoing {
        position: event.global_position,
        id,
        subject: wire::subject(prefix, &event.stream_name, &event.event_type),
        headers,
        payload,
    }
}

/// A header value for a name. NATS header values cannot hold CR or LF (a name written
/// through SQL might); such a name is sent token-encoded ([`wire::encode_token`]), and
/// the payload always carries it verbatim.
fn header_text(raw: &str) -> String {
    if raw.contains(['\r', '\n']) {
        wire::encode_token(raw)
    } else {
        raw.to_owned()
    }
}

/// Up to 25% random extra, so relays that failed together don't retry in lockstep.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(1.0 + rand::random::<f64>() / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn event(stream: &str, event_type: &str, metadata: Option<serde_json::Value>) -> RecordedEvent {
        RecordedEvent {
            global_position: 42,
            position: 3,
            time: chrono::Utc::now(),
            stream_name: stream.to_owned(),
            event_type: event_type.to_owned(),
            data: json!({"text": "hi"}),
            metadata,
            id: Uuid::new_v4(),
        }
    }

    fn header<'a>(out: &'a Outgoing, name: &str) -> Option<&'a str> {
        out.headers.get(name).map(async_nats::HeaderValue::as_str)
    }

    #[test]
    fn encodes_subject_headers_and_payload() {
        let e = event(
            "odd.name-a*b",
            "MessageSent",
            Some(json!({"traceparent": "00-abc-def-01"})),
        );
        let out = encode("p", &e, 40, 7);
        assert_eq!(out.subject, "p.ev.odd%2Ename.a%2Ab.MessageSent");
        assert_eq!(out.position, 42);
        let id = e.id.to_string();
        assert_eq!(header(&out, wire::MSG_ID), Some(id.as_str()));
        assert_eq!(header(&out, wire::POSITION), Some("42"));
        assert_eq!(header(&out, wire::STREAM_POSITION), Some("3"));
        assert_eq!(header(&out, wire::STREAM), Some("odd.name-a*b"));
        assert_eq!(header(&out, wire::TYPE), Some("MessageSent"));
        assert_eq!(header(&out, wire::PREVIOUS), Some("40"));
        assert_eq!(header(&out, wire::PREVIOUS_IN_CATEGORY), Some("7"));
        assert_eq!(header(&out, wire::TRACEPARENT), Some("00-abc-def-01"));
        let payload: wire::Payload = serde_json::from_slice(&out.payload).expect("payload");
        assert_eq!(RecordedEvent::from(payload), e);
    }

    #[test]
    fn names_that_cannot_be_header_values_are_encoded_not_fatal() {
        let e = event(
            "line\nbreak-1",
            "T",
            Some(json!({"traceparent": "bad\r\nvalue"})),
        );
        let out = encode("p", &e, 0, 0);
        assert_eq!(header(&out, wire::STREAM), Some("line%0Abreak-1"));
        assert_eq!(header(&out, wire::TRACEPARENT), None);
        let payload: wire::Payload = serde_json::from_slice(&out.payload).expect("payload");
        assert_eq!(payload.stream_name, "line\nbreak-1");
    }

    #[test]
    fn configs_are_validated() {
        assert!(RelayConfig::default().validate().is_ok());
        for prefix in ["", "a..b", "a.*", "a b", "a.>"] {
            assert!(
                RelayConfig::new(prefix, "S").validate().is_err(),
                "{prefix:?}"
            );
        }
        for stream in ["", "a.b", "a b", "a*"] {
            assert!(
                RelayConfig::new("p", stream).validate().is_err(),
                "{stream:?}"
            );
        }
        let config = RelayConfig {
            max_in_flight: 0,
            ..RelayConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
