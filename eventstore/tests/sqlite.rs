//! The event-store contract against SQLite (a fresh file per test), plus what is
//! SQLite's own: the file and its settings, data surviving a reopen, and several pools
//! on one file (as several processes would have) staying commit-ordered.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use colloquy_eventstore::contract::tail;
use colloquy_eventstore::sqlite::{self, OpenError};
use colloquy_eventstore::{
    EventStore, ExpectedVersion, LogFilter, NewEvent, Selection, SqliteEventStore, StreamAppend,
    Subscription, SubscriptionItem,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// A directory removed when the test ends.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("colloquy-sqlite-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A database path in a directory that does not exist yet (`open` creates it).
    fn db(&self) -> PathBuf {
        self.0.join("data").join("colloquy.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn store() -> (TempDir, Arc<dyn EventStore>) {
    let dir = TempDir::new();
    let pool = sqlite::open(&dir.db()).await.unwrap();
    (dir, Arc::new(SqliteEventStore::new(pool)))
}

colloquy_eventstore::all_contract_tests!(store());

fn one(stream: &str, expected: ExpectedVersion, data: Value) -> Vec<StreamAppend> {
    vec![StreamAppend::new(
        stream,
        expected,
        vec![NewEvent::new(Uuid::new_v4(), "A", data)],
    )]
}

async fn positions(store: &dyn EventStore) -> Vec<i64> {
    store
        .read_log(&LogFilter::All, 0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect()
}

/// `open` creates the directory and the file, and every connection of the pool has
/// the settings the embedded mode relies on.
#[tokio::test]
async fn open_creates_the_file_with_wal_and_the_connection_settings() {
    let dir = TempDir::new();
    let path = dir.db();
    assert!(!path.parent().unwrap().exists());
    let pool = sqlite::open(&path).await.unwrap();
    assert!(path.is_file());
    // Several connections at once, so each is a different one.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(pool.acquire().await.unwrap());
    }
    for conn in &mut conns {
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
        let settings: (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT synchronous FROM pragma_synchronous),
                    (SELECT timeout FROM pragma_busy_timeout),
                    (SELECT foreign_keys FROM pragma_foreign_keys)",
        )
        .fetch_one(&mut **conn)
        .await
        .unwrap();
        assert_eq!(
            settings,
            (1, 5_000, 1),
            "synchronous=NORMAL, 5 s, foreign keys"
        );
    }
    drop(conns);
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(tables.iter().any(|t| t == "message_store_messages"));
    assert_eq!(pool.options().get_max_connections(), sqlite::POOL_SIZE);
}

#[tokio::test]
async fn open_url_takes_a_file_url_and_refuses_memory() {
    let dir = TempDir::new();
    let path = dir.db();
    let pool = sqlite::open_url(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let store = SqliteEventStore::new(pool.clone());
    store
        .append(one("url-1", ExpectedVersion::NoStream, json!({"n": 1})))
        .await
        .unwrap();
    assert!(path.is_file());
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    for url in [
        "sqlite::memory:",
        "sqlite://x.db?mode=memory",
        "postgres://x/y",
    ] {
        assert!(
            matches!(sqlite::open_url(url).await, Err(OpenError::Url(..))),
            "{url} is refused"
        );
    }
}

/// Closing the pool and opening the file again keeps every event, its position, id,
/// time and payload; appends go on after it, with versions and idempotence intact.
#[tokio::test]
async fn data_survives_closing_and_reopening_the_file() {
    let dir = TempDir::new();
    let path = dir.db();
    let retried = NewEvent::new(Uuid::new_v4(), "Kept", json!({"k": [1, 2.5, "x"]}))
        .with_metadata(json!({"userId": "u1"}));
    let (before, first) = {
        let pool = sqlite::open(&path).await.unwrap();
        let store = SqliteEventStore::new(pool.clone());
        for n in 0..3 {
            store
                .append(one("keep-1", ExpectedVersion::Any, json!({"n": n})))
                .await
                .unwrap();
        }
        let first = store
            .append(vec![StreamAppend::new(
                "keep-2",
                ExpectedVersion::NoStream,
                vec![retried.clone()],
            )])
            .await
            .unwrap();
        let before = store.read_log(&LogFilter::All, 0, 100).await.unwrap();
        drop(store);
        pool.close().await;
        (before, first)
    };
    assert_eq!(before.len(), 4);

    let pool = sqlite::open(&path).await.unwrap();
    let store = SqliteEventStore::new(pool);
    assert_eq!(
        store.read_log(&LogFilter::All, 0, 100).await.unwrap(),
        before
    );
    assert_eq!(store.stream_version("keep-1").await.unwrap(), Some(2));
    assert_eq!(store.head().await.unwrap(), before[3].global_position);
    let replay = store
        .append(vec![StreamAppend::new(
            "keep-2",
            ExpectedVersion::NoStream,
            vec![retried],
        )])
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.positions, first.positions);
    let next = store
        .append(one("keep-1", ExpectedVersion::Exact(2), json!({"n": 3})))
        .await
        .unwrap();
    assert_eq!(next.streams[0].version, 3);
    assert_eq!(next.last_position, before[3].global_position + 1);
    assert!(
        store
            .append(one("keep-1", ExpectedVersion::Exact(2), json!({})))
            .await
            .is_err()
    );
}

/// Separate pools on one file are what separate processes would have: nothing shared
/// but the file. Their writers interleave (on distinct streams and on one shared
/// stream), and a reader on yet another pool sees every event exactly once in position
/// order, with no gap that later fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_pools_on_one_file_see_each_other_and_stay_commit_ordered() {
    const POOLS: usize = 3;
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 25;
    let dir = TempDir::new();
    let path = dir.db();
    let reader_store: Arc<dyn EventStore> =
        Arc::new(SqliteEventStore::new(sqlite::open(&path).await.unwrap()));
    let mut stores: Vec<Arc<dyn EventStore>> = Vec::new();
    for _ in 0..POOLS {
        stores.push(Arc::new(SqliteEventStore::new(
            sqlite::open(&path).await.unwrap(),
        )));
    }
    // Each writer appends to its own stream and to the shared one.
    let total = POOLS * WRITERS * PER_WRITER * 2;
    let reader = tokio::spawn(tail(
        Arc::clone(&reader_store),
        LogFilter::All,
        total,
        Duration::from_secs(60),
    ));
    let mut writers = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..WRITERS {
            let store = Arc::clone(store);
            writers.push(tokio::spawn(async move {
                for n in 0..PER_WRITER {
                    store
                        .append(one(
                            &format!("p{s}-{w}"),
                            ExpectedVersion::Exact(n as i64 - 1),
                            json!({"n": n}),
                        ))
                        .await
                        .unwrap();
                    store
                        .append(one(
                            "shared-1",
                            ExpectedVersion::Any,
                            json!({"s": s, "w": w}),
                        ))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // Every pool sees every other pool's appends.
    for store in &stores {
        assert_eq!(positions(store.as_ref()).await.len(), total);
        assert_eq!(
            store.stream_version("shared-1").await.unwrap(),
            Some((POOLS * WRITERS * PER_WRITER - 1) as i64)
        );
    }
    let log = positions(reader_store.as_ref()).await;
    assert_eq!(log.len(), total);
    assert!(log.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        reader.await.unwrap(),
        log,
        "the reader saw every event once, in order"
    );
    let shared: Vec<i64> = reader_store
        .read_stream("shared-1", 0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(shared, (0..shared.len() as i64).collect::<Vec<_>>());
}

/// An append made through another pool (another process) wakes a subscription
/// within milliseconds, not at the safety-net poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_pools_append_wakes_a_subscription() {
    let dir = TempDir::new();
    let path = dir.db();
    let here: Arc<dyn EventStore> =
        Arc::new(SqliteEventStore::new(sqlite::open(&path).await.unwrap()));
    let elsewhere = SqliteEventStore::new(sqlite::open(&path).await.unwrap());
    let mut subscription = Subscription::new(Arc::clone(&here), LogFilter::All, 0)
        .with_poll_interval(Duration::from_secs(3600));
    assert_eq!(
        subscription.next().await.unwrap(),
        SubscriptionItem::CaughtUp(0)
    );
    // The subscription is waiting (for a wake-up only) before the append happens.
    let waiting = tokio::spawn(async move { subscription.next_event().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let written = elsewhere
        .append(one(
            "elsewhere-1",
            ExpectedVersion::NoStream,
            json!({"a": 1}),
        ))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken by the other pool's commit")
        .unwrap()
        .unwrap();
    assert_eq!(event.global_position, written.last_position);
    assert_eq!(event.data, json!({"a": 1}));
}

/// A write transaction held open elsewhere (another process mid-commit) makes appends
/// wait for the lock rather than fail, and nothing is visible past it until it
/// commits; then everything appears in commit order, the held event first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_wait_for_a_held_write_lock_and_keep_commit_order() {
    const OTHERS: usize = 10;
    let (dir, store) = store().await;
    let other = sqlite::open(&dir.db()).await.unwrap();
    let mut held = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
    let held_position: i64 = sqlx::query_scalar(
        "INSERT INTO message_store_messages (id, stream_name, type, position, data)
         VALUES ($1, 'held-1', 'Held', 0, '{}') RETURNING global_position",
    )
    .bind(Uuid::new_v4())
    .fetch_one(&mut *held)
    .await
    .unwrap();
    let reader = tokio::spawn(tail(
        Arc::clone(&store),
        LogFilter::All,
        OTHERS + 1,
        Duration::from_secs(30),
    ));
    let writers: Vec<_> = (0..OTHERS)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .append(one(
                        &format!("other-{n}"),
                        ExpectedVersion::NoStream,
                        json!({}),
                    ))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "the appends wait for the held lock"
    );
    assert_eq!(store.head().await.unwrap(), 0, "nothing is visible yet");
    held.commit().await.unwrap();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let log = positions(store.as_ref()).await;
    assert_eq!(log.len(), OTHERS + 1);
    assert_eq!(log[0], held_position);
    assert_eq!(reader.await.unwrap(), log);
}

/// One append larger than an INSERT statement's share of rows keeps its events'
/// order: stream positions and global positions both follow the order given.
#[tokio::test]
async fn a_large_append_keeps_its_order() {
    let (_dir, store) = store().await;
    store
        .append(one("before-1", ExpectedVersion::Any, json!({})))
        .await
        .unwrap();
    let events: Vec<NewEvent> = (0..1_000)
        .map(|n| NewEvent::new(Uuid::new_v4(), "A", json!({"n": n})))
        .collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let outcome = store
        .append(vec![StreamAppend::new(
            "big-1",
            ExpectedVersion::NoStream,
            events,
        )])
        .await
        .unwrap();
    assert_eq!(outcome.streams[0].version, 999);
    assert_eq!(outcome.positions, (2..=1_001).collect::<Vec<i64>>());
    let read = store.read_stream("big-1", 0, 10_000).await.unwrap();
    for (n, event) in read.iter().enumerate() {
        assert_eq!(event.id, ids[n]);
        assert_eq!(event.position, n as i64);
        assert_eq!(event.global_position, outcome.positions[n]);
        assert_eq!(event.data, json!({"n": n}));
    }
    let by_id = store.read_events_by_id(&ids[990..]).await.unwrap();
    assert_eq!(by_id.len(), 10);
    assert!(by_id.iter().all(|e| ids[990..].contains(&e.id)));
}

/// Consumer-group members get exactly the streams Message DB's hash assigns them
/// (`consumer_group_member`, checked against Postgres' `hash_64` in the unit tests).
#[tokio::test]
async fn consumer_group_members_follow_message_dbs_hash() {
    let (_dir, store) = store().await;
    let streams: Vec<String> = (0..30)
        .flat_map(|n| [format!("job-{n}"), format!("job-{n}+x")])
        .chain(["job".to_owned(), "job-".to_owned()])
        .collect();
    for stream in &streams {
        store
            .append(one(stream, ExpectedVersion::Any, json!({})))
            .await
            .unwrap();
    }
    for size in [1_u32, 2, 5] {
        let mut seen = 0;
        for member in 0..size {
            let part = store
                .read_log(
                    &LogFilter::CategoryMember {
                        category: "job".into(),
                        member,
                        size,
                    },
                    0,
                    1_000,
                )
                .await
                .unwrap();
            for event in &part {
                assert_eq!(
                    sqlite::consumer_group_member(&event.stream_name, size),
                    Some(member),
                    "{}",
                    event.stream_name
                );
            }
            seen += part.len();
        }
        // Every stream but the bare category name "job" (no cardinal id).
        assert_eq!(seen, streams.len() - 1, "size {size}");
    }
}

/// Erasure by metadata compares the top-level key literally and the value as
/// Postgres' `metadata->>key` text would be.
#[tokio::test]
async fn redaction_by_metadata_matches_keys_literally() {
    let (_dir, store) = store().await;
    let meta = [
        json!({"userId": "u1"}),
        json!({"userId": 1}),
        json!({"a.b": "u1"}),
        json!({"$": "u1"}),
        json!({"nested": {"userId": "u1"}}),
        json!({"userId": "u10"}),
    ];
    let appends = meta
        .iter()
        .enumerate()
        .map(|(n, m)| {
            StreamAppend::new(
                format!("m-{n}"),
                ExpectedVersion::Any,
                vec![
                    NewEvent::new(Uuid::new_v4(), "A", json!({"t": "x"})).with_metadata(m.clone()),
                ],
            )
        })
        .collect();
    store.append(appends).await.unwrap();
    let redact = |_: &str, data: &mut Value| {
        data["t"] = json!("");
        true
    };
    let cases = [
        ("userId", "u1", vec!["m-0"]),
        ("userId", "1", vec!["m-1"]),
        ("a.b", "u1", vec!["m-2"]),
        ("$", "u1", vec!["m-3"]),
        ("b", "u1", vec![]),
    ];
    for (key, value, streams) in cases {
        let report = store
            .redact(
                &Selection::MetadataEquals {
                    key: key.into(),
                    value: value.into(),
                },
                &redact,
            )
            .await
            .unwrap();
        assert_eq!(report.streams, streams, "{key} = {value}");
    }
    let untouched: Vec<String> = store
        .read_log(&LogFilter::All, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.data["t"] == json!("x"))
        .map(|e| e.stream_name)
        .collect();
    assert_eq!(untouched, ["m-4", "m-5"]);
}
