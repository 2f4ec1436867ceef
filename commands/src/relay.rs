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
//!   Another relay cannot leave a gap this way (both count from what the stream holds),
//!   but a foreign message can: with many publishes in flight, the publish after a
//!   refused one lands if exactly as many foreign messages were stored as publishes
//!   refused, and the refused events would be missing. So after a refusal the relay
//!   waits for the rest of its acks; if one was stored after a refusal, it reads the
//!   stream's tail and republishes the refused events the stream does not hold, out of
//!   position order and marked [`RESUME_AFTER`]. (`Nats-Expected-Last-Msg-Id` would
//!   refuse them outright, but on nats-server 2.15 a replicated stream treats such a
//!   refusal as a critical write error and goes offline.)
//! - **Resume from the stream.** At start and after every failure the relay reads the
//!   stream's last message and continues after its `Colloquy-Position` (or its
//!   `Colloquy-Resume-After`, when higher). Only when the
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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::HeaderMap;
use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{self, RawMessageErrorKind, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use colloquy_eventstore::{
    EventStore, GlobalPosition, LogFilter, PgEventStore, RecordedEvent, Subscription,
    SubscriptionItem, wire,
};
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};
use sqlx::postgres::{PgConnection, PgExecutor};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The default advisory-lock key relays compete for (in the log's database). Distinct
/// from the event store's commit-order lock.
pub const RELAY_LOCK: i64 = 7_236_089_447_143_116_701;

/// How far back from the stream's last sequence resume looks for a message carrying a
/// position (messages published by others carry none) before using the checkpoint.
const MAX_WALK_BACK: u64 = 256;

/// Categories remembered for `Colloquy-Previous-In-Category`; beyond this the map is
/// cleared and re-seeded from the log (one query per category).
const MAX_CATEGORIES: usize = 10_000;

/// Most messages the log reader hands to the publisher at once.
const CHUNK: usize = 128;

/// Header on a republished (displaced) event: the highest position the stream held when
/// it was republished, which is where a resume continues.
pub const RESUME_AFTER: &str = "Colloquy-Resume-After";

/// Most stream messages read to find which refused events are missing.
const MAX_REPAIR_SCAN: u64 = 8_192;

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

/// Erasure (docs/adr/0003): removes every message of the given log streams from the
/// JetStream stream `stream` (subjects under `prefix`), so the original text cannot be
/// read back from NATS after the log was redacted. Returns how many messages went.
///
/// Consumers that had not yet taken a removed message see a break in the
/// previous-position chain and read the range from the (redacted) log; the relay, if the
/// stream's last message went, resumes from the message before it and republishes the
/// redacted events (JetStream's duplicate window drops those it still remembers).
///
/// # Errors
/// NATS is unreachable or the stream is missing.
pub async fn purge_streams(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
    streams: &[String],
) -> anyhow::Result<u64> {
    let handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("Failed to read JetStream stream {stream}"))?;
    let mut purged = 0;
    for name in streams {
        let response = handle
            .purge()
            .filter(wire::stream_filter(prefix, name))
            .await
            .with_context(|| format!("Failed to purge {name} from JetStream stream {stream}"))?;
        purged += response.purged;
    }
    Ok(purged)
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
    Fenced(Fence),
    /// Anything else: give up leadership, back off, retry.
    Hard(anyhow::Error),
}

/// What a fenced run knows about its refused publishes.
struct Fence {
    reason: String,
    /// Refused publishes, in order: (position, event id, expected last sequence).
    refused: Vec<(GlobalPosition, String, u64)>,
    /// Whether a publish was stored after one was refused (only then can a refused event
    /// be missing below an event the stream holds).
    stored_after_refusal: bool,
}

impl Fence {
    fn new(reason: String) -> Self {
        Self {
            reason,
            refused: Vec::new(),
            stored_after_refusal: false,
        }
    }
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

/// The state of one publishing run (from a resume to its end).
struct Run {
    /// The stream sequence the next publish expects to be last.
    next_expected: u64,
    /// The highest position known to be in the stream.
    acked: GlobalPosition,
    /// The checkpoint as last written.
    recorded: GlobalPosition,
    /// One publish at a time until the first is stored: right after a resume, events
    /// JetStream still remembers (after a purge) come back as duplicates, and one at a
    /// time each costs a round trip instead of a resume.
    careful: bool,
}

/// A publish awaiting its ack.
struct Pending {
    position: GlobalPosition,
    /// The event id.
    id: String,
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
                Err(Failure::Fenced(fence)) => {
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    let reason = fence.reason.clone();
                    if fence.stored_after_refusal {
                        match self.repair(&fence).await {
                            Ok(0) => {}
                            Ok(republished) => tracing::warn!(
                                stream = %self.config.stream,
                                republished,
                                "a foreign write displaced events in the stream; republished them out of position order"
                            ),
                            Err(error) => tracing::warn!(
                                stream = %self.config.stream,
                                error = format!("{error:#}"),
                                "events displaced by a foreign write could not be republished; consumers read them from the log"
                            ),
                        }
                    }
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
                        if let Some(position) = held_position(&message.headers) {
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
        let read_ahead = self.config.read_batch.max(self.config.max_in_flight) * 2 / CHUNK;
        let (tx, mut rx) = mpsc::channel(read_ahead.max(2));
        let _reader = AbortOnDrop(tokio::spawn(read_log(
            self.store.clone(),
            self.config.prefix.clone(),
            resume.after,
            self.config.read_batch,
            tx,
        )));
        let mut run = Run {
            next_expected: resume.last_sequence,
            acked: resume.after,
            recorded: resume.checkpoint,
            careful: true,
        };
        let mut in_flight: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        // Read and encoded, not yet published.
        let mut queue: VecDeque<Outgoing> = VecDeque::new();
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.reset();

        let outcome = 'run: loop {
            let limit = if run.careful {
                1
            } else {
                self.config.max_in_flight
            };
            while in_flight.len() < limit
                && let Some(outgoing) = queue.pop_front()
            {
                match self.send(outgoing, run.next_expected).await {
                    Ok(ack) => {
                        in_flight.push_back(ack);
                        run.next_expected += 1;
                    }
                    Err(error) => break 'run Err(Failure::Hard(error)),
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some((pending, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Err(failure) = self.settle(&mut run, pending, result) {
                        break Err(failure);
                    }
                    // Settle whatever else has arrived before sending more.
                    while let Some(Some((pending, result))) = in_flight.next().now_or_never() {
                        if let Err(failure) = self.settle(&mut run, pending, result) {
                            break 'run Err(failure);
                        }
                    }
                }
                chunk = rx.recv(), if queue.is_empty() => match chunk {
                    Some(Ok(chunk)) => queue.extend(chunk),
                    Some(Err(error)) => break Err(Failure::Hard(error)),
                    None => break Err(Failure::Hard(anyhow!("the log reader stopped"))),
                },
                _ = check.tick() => {
                    if let Err(error) = self.check_leader(conn, run.acked, &mut run.recorded).await {
                        break Err(Failure::Hard(error));
                    }
                }
            }
        };

        let mut outcome = outcome;
        match &mut outcome {
            Ok(()) => {
                // Stopping: record what is already on its way, briefly.
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                    while let Some((pending, result)) = in_flight.next().await {
                        if self.settle(&mut run, pending, result).is_err() {
                            break;
                        }
                    }
                })
                .await;
            }
            Err(Failure::Fenced(fence)) => {
                // Learn the fate of every publish still in flight: one stored after a
                // refusal means refused events may be missing below it.
                let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                    while let Some((pending, result)) = in_flight.next().await {
                        match self.settle(&mut run, pending, result) {
                            Ok(()) => {
                                if !fence.refused.is_empty() {
                                    fence.stored_after_refusal = true;
                                }
                            }
                            Err(Failure::Fenced(later)) => fence.refused.extend(later.refused),
                            Err(Failure::Hard(_)) => {}
                        }
                    }
                })
                .await;
                if drained.is_err() {
                    tracing::warn!(
                        stream = %self.config.stream,
                        "acks after a refused publish did not arrive; events may be missing from the stream (consumers read them from the log)"
                    );
                }
            }
            Err(Failure::Hard(_)) => {}
        }
        drop(in_flight);
        // Best effort: after a purge, this is where the next resume starts.
        if run.acked > run.recorded {
            let _ = tokio::time::timeout(
                DB_TIMEOUT,
                write_checkpoint(conn, &self.config.stream, run.acked),
            )
            .await;
        }
        outcome
    }

    /// Publishes one message, fenced by the stream sequence it must follow.
    async fn send(&self, outgoing: Outgoing, expected: u64) -> anyhow::Result<AckFuture> {
        let Outgoing {
            position,
            id,
            subject,
            mut headers,
            payload,
        } = outgoing;
        headers.insert(
            HeaderName::from_static(wire::EXPECTED_LAST_SEQUENCE),
            expected.to_string(),
        );
        // A traced event's publish is a span in its trace; an untraced one costs nothing.
        let span = headers
            .get(wire::TRACEPARENT)
            .map_or_else(tracing::Span::none, |parent| {
                let span = tracing::info_span!("relay.publish", otel.kind = "producer", position);
                colloquy_eventstore::trace::continue_from(&span, Some(parent.as_str()));
                span
            });
        let ack = self
            .js
            .send_publish(
                subject,
                PublishMessage::build()
                    .headers(headers)
                    .payload(payload.into()),
            )
            .instrument(span)
            .await
            .with_context(|| format!("Failed to publish the event at position {position}"))?;
        let pending = Pending {
            position,
            id,
            expected,
        };
        Ok(Box::pin(async move { (pending, ack.await) }))
    }

    /// Handles one ack, in publish order.
    fn settle(
        &self,
        run: &mut Run,
        pending: Pending,
        result: Result<PublishAck, PublishError>,
    ) -> Result<(), Failure> {
        match result {
            Ok(ack) if ack.duplicate => {
                // JetStream already knows this event id (its duplicate window remembers
                // it, e.g. after a purge): the event was published, and was not stored
                // again, so the stream's last sequence did not move.
                run.acked = run.acked.max(pending.position);
                self.stats.last_position.store(run.acked, Ordering::Relaxed);
                if run.careful {
                    // The only publish in flight: the next one follows the stream as it is.
                    run.next_expected -= 1;
                }
                // Otherwise the publishes after this one expected it to be stored; they
                // are refused, and sent again after a resume.
                Ok(())
            }
            Ok(ack) => {
                run.acked = pending.position;
                run.careful = false;
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .last_position
                    .store(pending.position, Ordering::Relaxed);
                if ack.sequence == pending.expected + 1 {
                    Ok(())
                } else {
                    // Defensive: the server checked the expected last sequence, so this
                    // should not happen.
                    Err(Failure::Fenced(Fence::new(format!(
                        "stored at sequence {} where {} was expected",
                        ack.sequence,
                        pending.expected + 1
                    ))))
                }
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                let mut fence = Fence::new(format!(
                    "publish at position {} refused: {error}",
                    pending.position
                ));
                fence
                    .refused
                    .push((pending.position, pending.id, pending.expected));
                Err(Failure::Fenced(fence))
            }
            Err(error) => Err(Failure::Hard(anyhow::Error::new(error).context(format!(
                "the publish of position {} was not acknowledged",
                pending.position
            )))),
        }
    }

    /// After a refused publish was followed by a stored one: finds which refused events
    /// the stream does not hold below its highest position, and republishes them (fenced,
    /// one at a time, marked with [`RESUME_AFTER`]). Returns how many it republished.
    async fn repair(&self, fence: &Fence) -> anyhow::Result<usize> {
        let Some(scan_from) = fence
            .refused
            .iter()
            .map(|(_, _, expected)| expected + 1)
            .min()
        else {
            return Ok(0);
        };
        let name = &self.config.stream;
        let stream = self
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("Failed to read JetStream stream {name}"))?;
        let last = stream.cached_info().state.last_sequence;
        if last.saturating_sub(scan_from) >= MAX_REPAIR_SCAN {
            bail!(
                "the stream moved {} messages past the refusal; not scanning",
                last - scan_from
            );
        }
        // Every event a refused publish could have been displaced by is in this range.
        let mut present = std::collections::HashSet::new();
        let mut high: GlobalPosition = 0;
        for sequence in scan_from..=last {
            match stream.get_raw_message(sequence).await {
                Ok(message) => {
                    if let Some(id) = message.headers.get(NATS_MESSAGE_ID) {
                        present.insert(id.as_str().to_owned());
                    }
                    if let Some(position) = held_position(&message.headers) {
                        high = high.max(position);
                    }
                }
                Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("Failed to read message {sequence} of JetStream stream {name}")
                    });
                }
            }
        }
        let missing: Vec<uuid::Uuid> = fence
            .refused
            .iter()
            .filter(|(position, id, _)| *position < high && !present.contains(id))
            .filter_map(|(_, id, _)| id.parse().ok())
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let events = self
            .store
            .read_events_by_id(&missing)
            .await
            .context("Failed to read displaced events from the log")?;
        let mut expected = last;
        let mut republished = 0;
        for event in &events {
            let previous: Option<GlobalPosition> = sqlx::query_scalar(
                "SELECT max(global_position) FROM message_store.messages WHERE global_position < $1",
            )
            .bind(event.global_position)
            .fetch_one(self.store.pool())
            .await?;
            let previous_in_category = previous_in_category(&self.store, event).await?;
            let mut outgoing = encode(
                &self.config.prefix,
                event,
                previous.unwrap_or(0),
                previous_in_category,
            );
            outgoing
                .headers
                .insert(HeaderName::from_static(RESUME_AFTER), high.to_string());
            let (_, result) = self.send(outgoing, expected).await?.await;
            match result {
                Ok(ack) if ack.duplicate => {}
                Ok(_) => {
                    expected += 1;
                    republished += 1;
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context(format!(
                        "Failed to republish the event at position {}",
                        event.global_position
                    )));
                }
            }
        }
        Ok(republished)
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
///
/// Messages go in chunks of up to [`CHUNK`], handed over when a chunk is full or the
/// subscription has caught up (so a lone live event is not held back), which keeps
/// hand-offs between the tasks far fewer than events.
async fn read_log(
    store: PgEventStore,
    prefix: String,
    after: GlobalPosition,
    batch: usize,
    tx: mpsc::Sender<anyhow::Result<Vec<Outgoing>>>,
) {
    let mut subscription =
        Subscription::new(Arc::new(store.clone()), LogFilter::All, after).with_batch_size(batch);
    let mut chain = Chain::new(after);
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let next = async {
            match subscription
                .next()
                .await
                .context("Failed to read the log")?
            {
                SubscriptionItem::Event(event) => {
                    chunk.push(chain.next(&store, &prefix, &event).await?);
                    Ok(chunk.len() >= CHUNK)
                }
                SubscriptionItem::CaughtUp(_) => Ok(true),
            }
        }
        .await;
        let sent = match next {
            Ok(false) => continue,
            Ok(true) if chunk.is_empty() => continue,
            Ok(true) => tx.send(Ok(std::mem::take(&mut chunk))).await,
            Err(error) => {
                // What was read before the failure still goes first.
                if !chunk.is_empty() && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
                    return;
                }
                let _ = tx.send(Err(error)).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
        chunk = Vec::with_capacity(CHUNK);
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
                previous_in_category(store, event).await?
            }
        };
        self.categories
            .insert(category.to_owned(), event.global_position);
        let outgoing = encode(prefix, event, self.previous, previous_in_category);
        self.previous = event.global_position;
        Ok(outgoing)
    }
}

/// The position of the previous event of `event`'s category (0 if none).
async fn previous_in_category(
    store: &PgEventStore,
    event: &RecordedEvent,
) -> anyhow::Result<GlobalPosition> {
    Ok(sqlx::query_scalar::<_, Option<GlobalPosition>>(
        "SELECT max(global_position) FROM message_store.messages
          WHERE message_store.category(stream_name) = $1 AND global_position < $2",
    )
    .bind(event.category())
    .bind(event.global_position)
    .fetch_one(store.pool())
    .await
    .context("Failed to look up the previous event of a category")?
    .unwrap_or(0))
}

/// Where a stream message says a resume continues: after its `Colloquy-Position`, or
/// after its `Colloquy-Resume-After` if that is higher (a republished, displaced event);
/// `None` for a message the relay did not publish.
fn held_position(headers: &HeaderMap) -> Option<GlobalPosition> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.as_str().parse::<GlobalPosition>().ok())
    };
    let position = header(wire::POSITION)?;
    Some(header(RESUME_AFTER).map_or(position, |after| after.max(position)))
}

/// The message for an event (all headers but the fencing one, which the publisher adds).
fn encode(
    prefix: &str,
    event: &RecordedEvent,
    previous: GlobalPosition,
    previous_in_category: GlobalPosition,
) -> Outgoing {
    let id = event
        .id
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned();
    // Static names: no validation or allocation per message.
    let name = HeaderName::from_static;
    let mut headers = HeaderMap::new();
    headers.insert(name(wire::MSG_ID), id.as_str());
    headers.insert(name(wire::POSITION), event.global_position.to_string());
    headers.insert(name(wire::STREAM_POSITION), event.position.to_string());
    headers.insert(name(wire::STREAM), header_text(&event.stream_name));
    headers.insert(name(wire::TYPE), header_text(&event.event_type));
    headers.insert(name(wire::PREVIOUS), previous.to_string());
    headers.insert(
        name(wire::PREVIOUS_IN_CATEGORY),
        previous_in_category.to_string(),
    );
    if let Some(traceparent) = wire::traceparent(event)
        && !traceparent.contains(['\r', '\n'])
    {
        headers.insert(name(wire::TRACEPARENT), traceparent);
    }
    let payload = serde_json::to_vec(&PayloadRef::from(event))
        .expect("BUG: an event payload always serialises");
    Outgoing {
        position: event.global_position,
        id,
        subject: wire::subject(prefix, &event.stream_name, &event.event_type),
        headers,
        payload,
    }
}

/// [`wire::Payload`], borrowed: the same JSON without copying the event's data (a unit
/// test holds the two byte for byte equal).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PayloadRef<'a> {
    id: uuid::Uuid,
    global_position: GlobalPosition,
    position: i64,
    time: chrono::DateTime<chrono::Utc>,
    stream_name: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    data: &'a serde_json::Value,
    metadata: Option<&'a serde_json::Value>,
}

impl<'a> From<&'a RecordedEvent> for PayloadRef<'a> {
    fn from(e: &'a RecordedEvent) -> Self {
        Self {
            id: e.id,
            global_position: e.global_position,
            position: e.position,
            time: e.time,
            stream_name: &e.stream_name,
            event_type: &e.event_type,
            data: &e.data,
            metadata: e.metadata.as_ref(),
        }
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
        assert_eq!(
            out.payload,
            serde_json::to_vec(&wire::Payload::from(&e)).expect("payload"),
            "the borrowed payload is byte for byte the wire payload"
        );
        let bare = event("plain", "T", None);
        assert_eq!(
            encode("p", &bare, 0, 0).payload,
            serde_json::to_vec(&wire::Payload::from(&bare)).expect("payload")
        );
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
