//! The event-store contract against real Postgres, plus the Postgres-specific proofs
//! of commit ordering: a transaction held open on purpose, other processes' writes.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::sync::Arc;
use std::time::Duration;

use colloquy_eventstore::contract::tail;
use colloquy_eventstore::{
    EventStore, ExpectedVersion, LogFilter, NewEvent, PgEventStore, PgOptions, StreamAppend,
    Subscription,
};
use colloquy_testkit::TestDatabase;
use serde_json::json;
use uuid::Uuid;

async fn store() -> (TestDatabase, Arc<dyn EventStore>) {
    let db = TestDatabase::new().await;
    let store = PgEventStore::with_pool(db.pool().await, PgOptions::default());
    (db, Arc::new(store))
}

colloquy_eventstore::all_contract_tests!(store());

/// The heart of rule 2. A transaction draws a position and stays open; meanwhile
/// other writers commit and a reader tails the log. The reader must still see every
/// event exactly once in order: the open transaction's event cannot appear later
/// below a position the reader has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_open_transaction_cannot_be_skipped() {
    let (db, store) = store().await;
    let held = skip_scenario(&db, Arc::clone(&store)).await;
    assert_eq!(
        held.seen, held.log,
        "the reader saw every event once, in order"
    );
    assert!(held.log.contains(&held.held_position));
}

/// The negative control: with the ordering lock taken out of the trigger (a bare
/// sequence, as a plain bigserial table has), the same scenario makes the reader skip
/// the held event. This shows the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_ordering_lock_the_reader_skips() {
    let (db, store) = store().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION message_store.assign_global_position() RETURNS trigger AS $$
         BEGIN
           NEW.global_position := nextval('message_store.messages_global_position_seq');
           RETURN NEW;
         END; $$ LANGUAGE plpgsql;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let held = skip_scenario_raw(&db, store).await;
    assert!(
        !held.seen.contains(&held.held_position),
        "a bare sequence lets the reader pass the held event: {held:?}"
    );
    assert!(held.log.contains(&held.held_position));
}

#[derive(Debug)]
struct Held {
    held_position: i64,
    seen: Vec<i64>,
    log: Vec<i64>,
}

/// Holds a transaction open after it drew a position while other writers append
/// through the Rust API, then commits it.
async fn skip_scenario(db: &TestDatabase, store: Arc<dyn EventStore>) -> Held {
    run_scenario(db, store, false).await
}

/// The same with raw INSERTs for the other writers (the Rust API always takes the
/// lock itself, so the negative control bypasses it).
async fn skip_scenario_raw(db: &TestDatabase, store: Arc<dyn EventStore>) -> Held {
    run_scenario(db, store, true).await
}

async fn run_scenario(db: &TestDatabase, store: Arc<dyn EventStore>, raw_writers: bool) -> Held {
    const OTHERS: usize = 20;
    let pool = db.pool().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = Arc::clone(&seen);
        let mut subscription = Subscription::new(Arc::clone(&store), LogFilter::All, 0);
        tokio::spawn(async move {
            loop {
                let event = subscription.next_event().await.unwrap();
                let mut seen = seen.lock().unwrap();
                seen.push(event.global_position);
                if seen.len() > OTHERS {
                    return;
                }
            }
        })
    };
    let mut held = pool.begin().await.unwrap();
    let held_position: i64 = sqlx::query_scalar(
        "INSERT INTO message_store.messages (id, stream_name, type, position, data)
         VALUES ($1, 'held-1', 'Held', 0, '{}') RETURNING global_position",
    )
    .bind(Uuid::new_v4())
    .fetch_one(&mut *held)
    .await
    .unwrap();
    let writers: Vec<_> = (0..OTHERS)
        .map(|n| {
            let store = Arc::clone(&store);
            let pool = pool.clone();
            tokio::spawn(async move {
                if raw_writers {
                    sqlx::query(
                        "INSERT INTO message_store.messages (id, stream_name, type, position, data)
                         VALUES ($1, $2, 'Other', 0, '{}')",
                    )
                    .bind(Uuid::new_v4())
                    .bind(format!("other-{n}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                } else {
                    store
                        .append(vec![StreamAppend::new(
                            format!("other-{n}"),
                            ExpectedVersion::NoStream,
                            vec![NewEvent::new(Uuid::new_v4(), "Other", json!({}))],
                        )])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    if raw_writers {
        // Nothing stops them: wait until the reader has passed all of them.
        futures::future::join_all(writers).await;
        // Nothing stops them: wait until the reader has reached the newest of them.
        let newest: i64 =
            sqlx::query_scalar("SELECT max(global_position) FROM message_store.messages")
                .fetch_one(&pool)
                .await
                .unwrap();
        wait_for(|| seen.lock().unwrap().last() == Some(&newest)).await;
        held.commit().await.unwrap();
        // The reader is now past the held position and will never see it.
        reader.abort();
    } else {
        // The writers must be queued on the ordering lock behind the held transaction.
        wait_for_async(|| async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                >= 1
        })
        .await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing is visible past the held position"
        );
        held.commit().await.unwrap();
        futures::future::join_all(writers).await;
        tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the reader sees every event")
            .unwrap();
    }
    let log = store
        .read_log(&LogFilter::All, 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    let seen = seen.lock().unwrap().clone();
    Held {
        held_position,
        seen,
        log,
    }
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    wait_for_async(|| std::future::ready(condition())).await;
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(mut condition: impl FnMut() -> F) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition reached in time");
}

/// A write made outside this process (a raw INSERT on another connection, as
/// `write_message` or another Colloquy process would make) wakes a subscription
/// through the log's notification, not through polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_write_wakes_subscriptions() {
    let (db, store) = store().await;
    let mut subscription = Subscription::new(Arc::clone(&store), LogFilter::All, 0)
        .with_poll_interval(Duration::from_secs(3600));
    assert!(matches!(
        subscription.next().await.unwrap(),
        colloquy_eventstore::SubscriptionItem::CaughtUp(0)
    ));
    let other = db.pool().await;
    sqlx::query("SELECT message_store.write_message($1, 'elsewhere-1', 'Written', '{\"a\":1}')")
        .bind(Uuid::new_v4().to_string())
        .execute(&other)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), subscription.next_event())
        .await
        .expect("woken by the notification")
        .unwrap();
    assert_eq!(event.stream_name, "elsewhere-1");
    assert_eq!(event.data, json!({"a": 1}));
}

/// Writers in separate OS processes would share nothing but the database; separate
/// pools (separate connections and batchers) are the closest in-test equivalent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_stores_on_one_database_stay_commit_ordered() {
    let (db, reader_store) = store().await;
    let stores: Vec<Arc<dyn EventStore>> = futures::future::join_all((0..3).map(|_| async {
        Arc::new(PgEventStore::with_pool(
            db.pool().await,
            PgOptions::default(),
        )) as Arc<dyn EventStore>
    }))
    .await;
    let total = 3 * 4 * 25;
    let reader = tokio::spawn(tail(
        Arc::clone(&reader_store),
        LogFilter::All,
        total,
        Duration::from_secs(60),
    ));
    let mut writers = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..4 {
            let store = Arc::clone(store);
            writers.push(tokio::spawn(async move {
                for n in 0..25 {
                    store
                        .append(vec![StreamAppend::new(
                            format!("p{s}-{w}"),
                            ExpectedVersion::Any,
                            vec![NewEvent::new(Uuid::new_v4(), "A", json!({"n": n}))],
                        )])
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let log: Vec<i64> = reader_store
        .read_log(&LogFilter::All, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(log.len(), total);
    assert_eq!(reader.await.unwrap(), log);
}
