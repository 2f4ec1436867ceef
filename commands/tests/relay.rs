//! The relay against real Postgres and a real NATS server (`COLLOQUY_TEST_NATS_URL`):
//! every event once, in order, with its headers; one leader at a time; fencing of a
//! stale publisher; resume after restarts, purges, a deleted stream and an outage
//! longer than the duplicate window. Each test has its own database, subject prefix
//! and stream, and deletes the stream at the end. `COLLOQUY_TEST_STREAM_REPLICAS`
//! (default 1) runs them on replicated streams against a cluster.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use colloquy_commands::relay::{self, Relay, RelayConfig, RelayStats};
use colloquy_eventstore::{
    EventStore, ExpectedVersion, GlobalPosition, LogFilter, NewEvent, PgEventStore, PgOptions,
    RecordedEvent, StreamAppend, wire,
};
use colloquy_testkit::{TestDatabase, nats_url, unique_prefix};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bound on every wait for a condition.
const WAIT: Duration = Duration::from_secs(30);

struct Fixture {
    // Field order is drop order: the stream goes before the database.
    _stream: StreamGuard,
    db: TestDatabase,
    store: PgEventStore,
    js: jetstream::Context,
    config: RelayConfig,
}

/// Deletes the test's stream when dropped, also when the test panics.
struct StreamGuard {
    stream: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let stream = self.stream.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = jetstream::new(client).delete_stream(&stream).await;
                }
            });
        })
        .join();
    }
}

/// A running relay.
struct Running {
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    stats: Arc<RelayStats>,
}

impl Running {
    /// Cancels the relay and waits for `run` to return.
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the relay stops promptly when cancelled")
            .unwrap()
            .unwrap();
    }
}

impl Fixture {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut RelayConfig)) -> Self {
        let db = TestDatabase::new().await;
        let store = PgEventStore::with_pool(db.pool().await, PgOptions::default());
        let client = async_nats::connect(nats_url()).await.unwrap();
        let js = jetstream::new(client);
        let prefix = unique_prefix();
        let mut config = RelayConfig::new(prefix.clone(), prefix.to_uppercase());
        config.leader_poll = Duration::from_millis(100);
        config.check_interval = Duration::from_millis(100);
        config.max_backoff = Duration::from_millis(500);
        // Against a cluster, e.g. COLLOQUY_TEST_STREAM_REPLICAS=3.
        if let Ok(replicas) = std::env::var("COLLOQUY_TEST_STREAM_REPLICAS") {
            config.replicas = replicas
                .parse()
                .expect("COLLOQUY_TEST_STREAM_REPLICAS is a number");
        }
        adjust(&mut config);
        let guard = StreamGuard {
            stream: config.stream.clone(),
        };
        relay::ensure_stream(&js, &config).await.unwrap();
        Self {
            _stream: guard,
            db,
            store,
            js,
            config,
        }
    }

    fn spawn(&self) -> Running {
        self.spawn_with(self.config.clone())
    }

    fn spawn_with(&self, config: RelayConfig) -> Running {
        let relay = Relay::new(self.store.clone(), self.js.clone(), config);
        let stats = relay.stats();
        let token = CancellationToken::new();
        let handle = tokio::spawn(relay.run(token.clone()));
        Running {
            token,
            handle,
            stats,
        }
    }

    /// Appends `n` events spread over `streams`, `per_append` events per append (each
    /// append touching every stream, so appends are multi-stream).
    async fn append_events(&self, n: usize, streams: &[String], per_append: usize) {
        append_events(&self.store, n, streams, per_append).await;
    }

    async fn head(&self) -> GlobalPosition {
        self.store.head().await.unwrap()
    }

    async fn log(&self) -> Vec<RecordedEvent> {
        self.store
            .read_log(&LogFilter::All, 0, 1_000_000)
            .await
            .unwrap()
    }

    async fn stream_state(&self) -> jetstream::stream::State {
        self.js
            .get_stream(&self.config.stream)
            .await
            .unwrap()
            .cached_info()
            .state
            .clone()
    }

    /// Every message the stream holds, in sequence order.
    async fn messages(&self) -> Vec<StreamMessage> {
        let stream = self.js.get_stream(&self.config.stream).await.unwrap();
        let state = stream.cached_info().state.clone();
        let mut messages = Vec::new();
        if state.messages == 0 {
            return messages;
        }
        for sequence in state.first_sequence..=state.last_sequence {
            match stream.get_raw_message(sequence).await {
                Ok(message) => messages.push(message),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Err(e) => panic!("reading message {sequence}: {e}"),
            }
        }
        messages
    }

    /// Waits until the stream holds `n` messages.
    async fn wait_for_count(&self, n: u64) {
        wait_until(&format!("the stream to hold {n} messages"), || async {
            let held = self.stream_state().await.messages;
            assert!(held <= n, "the stream holds {held} messages, more than {n}");
            held == n
        })
        .await;
    }

    /// Waits until the relay reports the log's head as published.
    async fn wait_caught_up(&self, stats: &RelayStats) {
        wait_until("the relay to reach the log's head", || async {
            stats.last_position() == self.head().await
        })
        .await;
    }

    async fn checkpoint(&self) -> Option<GlobalPosition> {
        relay::checkpoint(self.store.pool(), &self.config.stream)
            .await
            .unwrap()
    }

    /// Asserts the stream's relayed messages are exactly the log, once each, in order;
    /// returns how many other (foreign) messages it holds.
    async fn assert_each_event_once(&self, log: &[RecordedEvent]) -> usize {
        let (foreign, republished) = self.assert_each_event_once_allowing_republished(log).await;
        assert_eq!(republished, 0, "nothing was republished out of order");
        foreign
    }

    /// As [`Self::assert_each_event_once`], except that events the relay republished
    /// after a foreign write displaced them (marked `Colloquy-Resume-After`) may be out
    /// of order; everything else is in position order. Returns (foreign, republished).
    async fn assert_each_event_once_allowing_republished(
        &self,
        log: &[RecordedEvent],
    ) -> (usize, usize) {
        let messages = self.messages().await;
        let relayed: Vec<&StreamMessage> = messages
            .iter()
            .filter(|m| m.headers.get(wire::POSITION).is_some())
            .collect();
        let ids: Vec<String> = relayed.iter().map(|m| header(m, wire::MSG_ID)).collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "no event is published twice");
        let expected: Vec<String> = log.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids.len(), expected.len(), "every event is published");
        let expected_set: HashSet<&String> = expected.iter().collect();
        assert_eq!(unique, expected_set, "the stream holds exactly the log");
        let in_order: Vec<GlobalPosition> = relayed
            .iter()
            .filter(|m| m.headers.get(relay::RESUME_AFTER).is_none())
            .map(|m| header(m, wire::POSITION).parse().unwrap())
            .collect();
        assert!(
            in_order.windows(2).all(|w| w[0] < w[1]),
            "events are published in position order: {in_order:?}"
        );
        let republished = relayed.len() - in_order.len();
        (messages.len() - relayed.len(), republished)
    }
}

async fn append_events(store: &PgEventStore, n: usize, streams: &[String], per_append: usize) {
    let mut written = 0;
    while written < n {
        let count = per_append.min(n - written);
        let mut by_stream: Vec<Vec<NewEvent>> = vec![Vec::new(); streams.len()];
        for i in 0..count {
            by_stream[i % streams.len()].push(NewEvent::new(
                Uuid::new_v4(),
                "Happened",
                json!({"n": written + i}),
            ));
        }
        let appends = streams
            .iter()
            .zip(by_stream)
            .filter(|(_, events)| !events.is_empty())
            .map(|(stream, events)| StreamAppend::new(stream.clone(), ExpectedVersion::Any, events))
            .collect();
        store.append(appends).await.unwrap();
        written += count;
    }
}

fn streams(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let category = ["conversation", "agentRun", "other"][i % 3];
            format!("{category}-{}", Uuid::new_v4())
        })
        .collect()
}

fn header(message: &StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("message {} has no {name} header", message.sequence))
        .as_str()
        .to_owned()
}

/// Polls `condition` until it holds, for at most [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn event(event_type: &str) -> NewEvent {
    NewEvent::new(Uuid::new_v4(), event_type, json!({"at": event_type}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_published_once_in_order_with_its_headers() {
    let f = Fixture::new().await;
    let relay = f.spawn();
    let conversation = format!("conversation-{}", Uuid::new_v4());
    let run = format!("agentRun-{}", Uuid::new_v4());
    // Stream names with subject syntax in them (the Rust API rejects only whitespace).
    let odd = "odd.name*x-a*b.c>d".to_owned();
    let plain = "plain".to_owned();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let any = ExpectedVersion::Any;
    f.store
        .append(vec![StreamAppend::new(
            &conversation,
            any,
            vec![
                event("ConversationStarted").with_metadata(json!({"traceparent": traceparent})),
                event("MessageSent").with_metadata(json!({"userId": "u1"})),
            ],
        )])
        .await
        .unwrap();
    f.store
        .append(vec![
            StreamAppend::new(&run, any, vec![event("RunRequested")]),
            StreamAppend::new(&conversation, any, vec![event("RunOpened")]),
        ])
        .await
        .unwrap();
    f.store
        .append(vec![
            StreamAppend::new(&odd, any, vec![event("Odd"), event("Odd")]),
            StreamAppend::new(&plain, any, vec![event("Plain")]),
        ])
        .await
        .unwrap();
    f.wait_caught_up(&relay.stats).await;
    relay.stop().await;

    // A new relay resumes: the previous-position chains continue across the resume (the
    // per-category map is seeded from the log).
    let relay = f.spawn();
    f.store
        .append(vec![
            StreamAppend::new(&odd, any, vec![event("Odd")]),
            StreamAppend::new(&run, any, vec![event("RunStarted")]),
        ])
        .await
        .unwrap();
    f.store
        .append(vec![StreamAppend::new(
            &conversation,
            any,
            vec![event("MessageSent")],
        )])
        .await
        .unwrap();
    f.wait_caught_up(&relay.stats).await;
    relay.stop().await;

    let log = f.log().await;
    assert_eq!(log.len(), 10);
    assert_eq!(f.assert_each_event_once(&log).await, 0);
    let messages = f.messages().await;
    let mut previous = 0;
    let mut previous_in_category: HashMap<String, GlobalPosition> = HashMap::new();
    for (message, e) in messages.iter().zip(&log) {
        let prefix = &f.config.prefix;
        assert_eq!(
            message.subject.as_str(),
            wire::subject(prefix, &e.stream_name, &e.event_type)
        );
        assert_eq!(header(message, wire::MSG_ID), e.id.to_string());
        assert_eq!(
            header(message, wire::POSITION),
            e.global_position.to_string()
        );
        assert_eq!(
            header(message, wire::STREAM_POSITION),
            e.position.to_string()
        );
        assert_eq!(header(message, wire::STREAM), e.stream_name);
        assert_eq!(header(message, wire::TYPE), e.event_type);
        assert_eq!(header(message, wire::PREVIOUS), previous.to_string());
        let category = e.category().to_owned();
        assert_eq!(
            header(message, wire::PREVIOUS_IN_CATEGORY),
            previous_in_category
                .get(&category)
                .copied()
                .unwrap_or(0)
                .to_string(),
            "previous in category of {}",
            e.global_position
        );
        assert_eq!(
            message
                .headers
                .get(wire::TRACEPARENT)
                .map(async_nats::HeaderValue::as_str),
            wire::traceparent(e)
        );
        let payload: wire::Payload = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(payload, wire::Payload::from(e));
        previous = e.global_position;
        previous_in_category.insert(category, e.global_position);
    }
    assert!(
        messages.iter().any(|m| m.subject.as_str()
            == format!("{}.ev.odd%2Ename%2Ax.a%2Ab%2Ec%3Ed.Odd", f.config.prefix)),
        "odd names are encoded in the subject"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.subject.as_str() == format!("{}.ev.plain.%00.Plain", f.config.prefix))
    );
    assert_eq!(f.checkpoint().await, Some(f.head().await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_publish_each_event_exactly_once_and_hand_over() {
    let f = Fixture::new().await;
    let a = f.spawn();
    let b = f.spawn();
    let names = streams(6);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        let names = names.clone();
        writers.push(tokio::spawn(async move {
            append_events(&store, 250, &names, 10).await;
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    f.wait_for_count(2_000).await;
    wait_until("exactly one leader", || async {
        a.stats.is_leader() != b.stats.is_leader()
    })
    .await;

    // The leader stops; the other takes over and publishes what follows.
    let (leader, standby) = if a.stats.is_leader() { (a, b) } else { (b, a) };
    assert_eq!(standby.stats.published(), 0, "the standby never published");
    leader.stop().await;
    f.append_events(500, &names, 50).await;
    f.wait_for_count(2_500).await;
    assert!(standby.stats.is_leader());
    standby.stop().await;
    assert_eq!(f.assert_each_event_once(&f.log().await).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_lock_connection_hands_leadership_over() {
    let f = Fixture::new().await;
    let a = f.spawn();
    wait_until("a to lead", || async { a.stats.is_leader() }).await;
    // b polls for the lock faster than a retries after its failure, so b wins.
    let b = f.spawn_with(RelayConfig {
        leader_poll: Duration::from_millis(20),
        ..f.config.clone()
    });
    let names = streams(3);
    f.append_events(300, &names, 30).await;
    f.wait_for_count(300).await;

    // Kill the leader's lock session, as a network failure or a DBA would.
    let pool = f.db.pool().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND objsubid = 1
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(f.config.lock_key)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    wait_until("b to take over", || async { b.stats.is_leader() }).await;
    f.append_events(300, &names, 30).await;
    f.wait_for_count(600).await;
    assert!(a.stats.failures() >= 1, "a noticed it lost the lock");
    a.stop().await;
    b.stop().await;
    assert_eq!(f.assert_each_event_once(&f.log().await).await, 0);
}

/// Two relays that both believe they lead (different lock keys: a split brain) race on
/// one stream. Fencing (and de-duplication) keep each event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_that_both_lead_are_fenced_into_exactly_once() {
    let f = Fixture::with(|c| c.duplicate_window = Duration::from_secs(1)).await;
    let a = f.spawn_with(RelayConfig {
        lock_key: 1,
        ..f.config.clone()
    });
    let b = f.spawn_with(RelayConfig {
        lock_key: 2,
        ..f.config.clone()
    });
    wait_until("both to lead", || async {
        a.stats.is_leader() && b.stats.is_leader()
    })
    .await;
    let names = streams(4);
    let mut writers = Vec::new();
    for _ in 0..4 {
        let store = f.store.clone();
        let names = names.clone();
        writers.push(tokio::spawn(async move {
            append_events(&store, 500, &names, 5).await;
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    f.wait_caught_up(&a.stats).await;
    f.wait_caught_up(&b.stats).await;
    let (a_stats, b_stats) = (Arc::clone(&a.stats), Arc::clone(&b.stats));
    a.stop().await;
    b.stop().await;
    assert_eq!(f.assert_each_event_once(&f.log().await).await, 0);
    let (a, b) = (a_stats, b_stats);
    eprintln!(
        "split brain: a published {} (fenced {}x), b published {} (fenced {}x)",
        a.published(),
        a.fenced(),
        b.published(),
        b.fenced()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_stopped_mid_publish_is_succeeded_without_duplicates() {
    let f = Fixture::new().await;
    let names = streams(5);
    f.append_events(5_000, &names, 500).await;
    let a = f.spawn_with(RelayConfig {
        max_in_flight: 32,
        ..f.config.clone()
    });
    wait_until("a to have published some", || async {
        a.stats.published() >= 200
    })
    .await;
    a.stop().await;
    let held = f.stream_state().await.messages;
    eprintln!("stopped after {held} of 5000");
    let b = f.spawn();
    f.wait_for_count(5_000).await;
    f.wait_caught_up(&b.stats).await;
    b.stop().await;
    assert_eq!(f.assert_each_event_once(&f.log().await).await, 0);
}

/// Resume reads the stream, not the duplicate window: a relay restarted after the
/// window has passed publishes nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_after_the_duplicate_window_publishes_no_duplicate() {
    let f = Fixture::with(|c| c.duplicate_window = Duration::from_secs(1)).await;
    let names = streams(3);
    let a = f.spawn();
    f.append_events(100, &names, 10).await;
    f.wait_caught_up(&a.stats).await;
    a.stop().await;
    // The window is time itself: let it pass.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let b = f.spawn();
    f.append_events(50, &names, 10).await;
    f.wait_caught_up(&b.stats).await;
    b.stop().await;
    assert_eq!(f.stream_state().await.messages, 150);
    assert_eq!(f.assert_each_event_once(&f.log().await).await, 0);
}

/// A foreign message lands in the stream while the relay believes it knows the last
/// sequence: its next publishes are refused, it resumes from what the stream holds,
/// and every event still appears once, with no gap. (With many publishes in flight, one
/// after the refused one can still land, displacing the refused event: the relay finds
/// and republishes it, marked, out of position order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_relay_is_fenced_and_resumes() {
    let f = Fixture::new().await;
    let names = streams(3);
    let relay = f.spawn();
    f.append_events(20, &names, 10).await;
    f.wait_for_count(20).await;
    f.js.publish(
        format!("{}.ev.foreign.x.Foreign", f.config.prefix),
        "not from the relay".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let fenced = relay.stats.fenced();
    // Many at once, so several publishes are in flight when the first is refused.
    f.append_events(200, &names, 200).await;
    f.wait_caught_up(&relay.stats).await;
    f.wait_for_count(221).await;
    assert!(relay.stats.fenced() > fenced, "the relay was fenced");
    relay.stop().await;
    let (foreign, republished) = f
        .assert_each_event_once_allowing_republished(&f.log().await)
        .await;
    assert_eq!(foreign, 1);
    eprintln!("republished {republished} displaced event(s)");
}

/// The stream is purged under a running relay: it keeps publishing new events; a relay
/// started after a second purge continues from the checkpoint instead of republishing
/// the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purged_stream_keeps_receiving_new_events() {
    let f = Fixture::new().await;
    let names = streams(3);
    let relay = f.spawn();
    f.append_events(30, &names, 10).await;
    f.wait_for_count(30).await;
    let stream = f.js.get_stream(&f.config.stream).await.unwrap();
    stream.purge().await.unwrap();
    let before = f.head().await;
    f.append_events(30, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    f.wait_for_count(30).await;
    let log = f.log().await;
    let (_, after_purge) = log.split_at(log.iter().filter(|e| e.global_position <= before).count());
    assert_eq!(f.assert_each_event_once(after_purge).await, 0);
    relay.stop().await;
    assert_eq!(f.checkpoint().await, Some(f.head().await));

    stream.purge().await.unwrap();
    let before = f.head().await;
    let relay = f.spawn();
    f.append_events(10, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    f.wait_for_count(10).await;
    relay.stop().await;
    let log = f.log().await;
    let (_, after_purge) = log.split_at(log.iter().filter(|e| e.global_position <= before).count());
    assert_eq!(f.assert_each_event_once(after_purge).await, 0);
}

/// After a crash the checkpoint can lag behind the stream. If the stream is then
/// purged, the relay resumes from the lagging checkpoint: the events JetStream's
/// duplicate window still remembers come back as duplicates and are skipped one round
/// trip each (not one resume each), and only new events are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_after_a_lagging_checkpoint_stores_only_new_events() {
    let f = Fixture::new().await;
    let names = streams(3);
    let relay = f.spawn();
    f.append_events(100, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    relay.stop().await;
    let log = f.log().await;
    // As if the relay had crashed before recording the last 60.
    sqlx::query("UPDATE colloquy.relay_checkpoint SET position = $2 WHERE stream = $1")
        .bind(&f.config.stream)
        .bind(log[39].global_position)
        .execute(f.store.pool())
        .await
        .unwrap();
    f.js.get_stream(&f.config.stream)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    let relay = f.spawn();
    f.append_events(10, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    f.wait_for_count(10).await;
    assert_eq!(relay.stats.published(), 10);
    assert_eq!(relay.stats.resumes(), 1, "duplicates did not force resumes");
    relay.stop().await;
    let log = f.log().await;
    assert_eq!(f.assert_each_event_once(&log[100..]).await, 0);
    assert_eq!(f.checkpoint().await, Some(f.head().await));
}

/// The stream is deleted under a running relay: the relay recreates it and continues
/// from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_stream_is_recreated_and_continued() {
    let f = Fixture::new().await;
    let names = streams(3);
    let relay = f.spawn();
    f.append_events(30, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    let head = f.head().await;
    wait_until("the checkpoint to reach the head", || async {
        f.checkpoint().await == Some(head)
    })
    .await;
    f.js.delete_stream(&f.config.stream).await.unwrap();
    f.append_events(20, &names, 10).await;
    f.wait_caught_up(&relay.stats).await;
    f.wait_for_count(20).await;
    relay.stop().await;
    let log = f.log().await;
    assert_eq!(f.assert_each_event_once(&log[30..]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ensure_stream_creates_then_updates_the_stream() {
    let f = Fixture::new().await;
    let info = relay::ensure_stream(&f.js, &f.config).await.unwrap();
    assert_eq!(info.config.subjects, [format!("{}.ev.>", f.config.prefix)]);
    assert_eq!(info.config.storage, jetstream::stream::StorageType::File);
    assert_eq!(info.config.duplicate_window, f.config.duplicate_window);
    assert_eq!(info.config.max_age, Duration::ZERO);
    let changed = RelayConfig {
        duplicate_window: Duration::from_secs(30),
        ..f.config.clone()
    };
    let info = relay::ensure_stream(&f.js, &changed).await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));
    let again = relay::ensure_stream(&f.js, &changed).await.unwrap();
    assert_eq!(again.config, info.config);
}

/// Rough throughput: 20,000 events already in the log, one relay, time until all are
/// acknowledged by the stream. Run in release for a meaningful figure:
/// `cargo nextest run --release -p colloquy-commands -E 'test(throughput)' --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_of_one_relay() {
    const N: u64 = 20_000;
    let f = Fixture::new().await;
    let names = streams(50);
    f.append_events(N as usize, &names, 1_000).await;
    let started = Instant::now();
    let relay = f.spawn();
    // Polls the relay's own counter, so measuring adds no load on the server.
    while relay.stats.published() < N {
        assert!(
            started.elapsed() < WAIT,
            "timed out at {} of {N}",
            relay.stats.published()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    relay.stop().await;
    assert_eq!(f.stream_state().await.messages, N);
    #[expect(clippy::cast_precision_loss, reason = "a rough rate")]
    let rate = N as f64 / elapsed.as_secs_f64();
    eprintln!("relay throughput: {N} events in {elapsed:.2?} = {rate:.0} events/s");
}
