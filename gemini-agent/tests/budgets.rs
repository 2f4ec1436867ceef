//! Budgets and key health shared through NATS JetStream key-value buckets, with two pools
//! standing in for two agent instances (each with its own NATS connection), against the
//! test NATS server (`COLLOQUY_TEST_NATS_URL`).

#![allow(clippy::unwrap_used, reason = "test code")]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use colloquy_gemini_agent::budget::{BudgetStore, KvBudgetConfig, KvBudgetStore, Usage, Window};
use colloquy_gemini_agent::clock::{Clock, ManualClock};
use colloquy_gemini_agent::keys::{
    AcquireError, Budget, KeyPool, KeyState, Outcome, PoolConfig, PoolKey, ProbeFn,
};
use secrecy::SecretString;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// A bucket and key prefix of this test's own, dropped at the end.
struct Buckets {
    js: jetstream::Context,
    bucket: String,
    prefix: String,
}

impl Buckets {
    async fn new() -> Self {
        let prefix = colloquy_testkit::unique_prefix();
        Self {
            js: jetstream::new(connect().await),
            bucket: format!("{prefix}_budgets"),
            prefix,
        }
    }

    /// One agent instance: its own connection, its own pool, the shared buckets.
    async fn instance(&self, budget: Budget, clock: &Arc<ManualClock>) -> (KeyPool, KvBudgetStore) {
        let js = jetstream::new(connect().await);
        let store = KvBudgetStore::open(&js, KvBudgetConfig::new(&self.bucket, &self.prefix))
            .await
            .unwrap();
        let mut config = PoolConfig::new(vec![
            PoolKey::new("a1", "SECRET-a1", "alpha"),
            PoolKey::new("a2", "SECRET-a2", "alpha"),
        ]);
        config.defaults = budget;
        let pool = KeyPool::new(config, Arc::new(store.clone()), clock.clone()).unwrap();
        (pool, store)
    }

    async fn drop_buckets(self) {
        let _ = self.js.delete_key_value(&self.bucket).await;
        let _ = self
            .js
            .delete_key_value(format!("{}_health", self.bucket))
            .await;
    }
}

async fn connect() -> async_nats::Client {
    async_nats::connect(colloquy_testkit::nats_url())
        .await
        .expect("the test NATS server is reachable (see scripts/test)")
}

/// Acquires and reports success until the pool says nothing is ready; the grants.
async fn drain(pool: Arc<KeyPool>) -> u64 {
    let mut granted = 0;
    loop {
        match pool.acquire(0).await {
            Ok(lease) => {
                granted += 1;
                pool.report(lease, Outcome::Success { tokens: 0 })
                    .await
                    .unwrap();
            }
            Err(AcquireError::NotReady { .. }) => return granted,
            Err(error) => panic!("acquire failed: {error}"),
        }
    }
}

/// Four tasks per instance drain concurrently; the total of grants.
async fn drain_concurrently(pools: &[Arc<KeyPool>]) -> (u64, Vec<u64>) {
    let tasks: Vec<_> = pools
        .iter()
        .flat_map(|pool| (0..4).map(|_| tokio::spawn(drain(pool.clone()))))
        .collect();
    let mut per_task = Vec::new();
    for task in tasks {
        per_task.push(task.await.unwrap());
    }
    (per_task.iter().sum(), per_task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_never_spend_one_budget_twice() {
    let buckets = Buckets::new().await;
    let clock = Arc::new(ManualClock::new(at("2026-01-15T20:00:10Z")));
    let budget = Budget {
        rpm: 60,
        rpd: 80,
        tpm: None,
    };
    let (one, store) = buckets.instance(budget, &clock).await;
    let (two, _) = buckets.instance(budget, &clock).await;
    let pools = [Arc::new(one), Arc::new(two)];

    // Eight tasks over two connections race for 60 calls of one minute.
    let (granted, per_task) = drain_concurrently(&pools).await;
    assert_eq!(granted, 60, "grants per task: {per_task:?}");
    let minute = Window::slot("alpha", clock.now());
    assert_eq!(store.usage(&minute).await.unwrap().requests, 60);

    // A minute after their 5-second slot there is room for 60 more, but the day only
    // has 20.
    clock.advance(Duration::from_secs(65));
    let (granted, per_task) = drain_concurrently(&pools).await;
    assert_eq!(granted, 20, "grants per task: {per_task:?}");
    let day = Window::day("alpha", clock.now());
    assert_eq!(
        store.usage(&day).await.unwrap(),
        Usage {
            requests: 80,
            tokens: 0
        }
    );
    match pools[1].acquire(0).await {
        Err(AcquireError::NotReady { until }) => assert_eq!(until, at("2026-01-16T08:00:00Z")),
        other => panic!("expected NotReady until Pacific midnight, got {other:?}"),
    }

    // The documented layout: `<prefix>.rpm.<project>.<unix-minute>` in `<bucket>`, which
    // expires old windows, and the health document in `<bucket>_health`, which does not.
    let windows = buckets.js.get_key_value(&buckets.bucket).await.unwrap();
    let raw = windows
        .get(format!("{}.{}", buckets.prefix, minute.key()))
        .await
        .unwrap()
        .expect("the first minute's window");
    let usage: Usage = serde_json::from_slice(&raw).unwrap();
    assert_eq!(usage.requests, 60);
    assert_eq!(
        windows.status().await.unwrap().max_age(),
        Duration::from_secs(2 * 24 * 3600)
    );
    let health = buckets
        .js
        .get_key_value(format!("{}_health", buckets.bucket))
        .await
        .unwrap();
    assert_eq!(health.status().await.unwrap().max_age(), Duration::ZERO);

    buckets.drop_buckets().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_are_shared_too() {
    let buckets = Buckets::new().await;
    let clock = Arc::new(ManualClock::new(at("2026-01-15T20:00:10Z")));
    let budget = Budget {
        rpm: 100,
        rpd: 1000,
        tpm: Some(1000),
    };
    let (one, store) = buckets.instance(budget, &clock).await;
    let (two, _) = buckets.instance(budget, &clock).await;
    let first = one.acquire(600).await.unwrap();
    assert!(matches!(
        two.acquire(600).await,
        Err(AcquireError::NotReady { .. })
    ));
    one.report(first, Outcome::Success { tokens: 200 })
        .await
        .unwrap();
    // The first call used 200 tokens, not 600: the other instance can use the room.
    let second = two.acquire(600).await.unwrap();
    two.report(second, Outcome::Success { tokens: 700 })
        .await
        .unwrap();
    let minute = Window::slot("alpha", clock.now());
    assert_eq!(
        store.usage(&minute).await.unwrap(),
        Usage {
            requests: 2,
            tokens: 900
        }
    );
    buckets.drop_buckets().await;
}

#[tokio::test]
async fn cooldowns_and_disabled_keys_are_seen_by_every_instance() {
    let buckets = Buckets::new().await;
    let clock = Arc::new(ManualClock::new(at("2026-01-15T20:00:10Z")));
    let budget = Budget {
        rpm: 100,
        rpd: 1000,
        tpm: None,
    };
    let (one, _) = buckets.instance(budget, &clock).await;
    let (two, _) = buckets.instance(budget, &clock).await;

    // A per-minute 429 met by one instance cools the project for the other.
    let lease = one.acquire(0).await.unwrap();
    one.report(
        lease,
        Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(20)),
            quota: None,
        },
    )
    .await
    .unwrap();
    match two.acquire(0).await {
        Err(AcquireError::NotReady { until }) => assert_eq!(until, at("2026-01-15T20:00:30Z")),
        other => panic!("expected the project to be cooling, got {other:?}"),
    }
    clock.advance(Duration::from_secs(20));

    // A key one instance disables is never used by the other.
    let lease = one.acquire(0).await.unwrap();
    let disabled = lease.label().to_owned();
    let other = if disabled == "a1" { "a2" } else { "a1" };
    one.report(
        lease,
        Outcome::KeyInvalid {
            reason: "API_KEY_INVALID".into(),
        },
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let lease = two.acquire(0).await.unwrap();
        assert_eq!(lease.label(), other);
        two.report(lease, Outcome::Success { tokens: 0 })
            .await
            .unwrap();
    }
    let snapshot = two.snapshot().await.unwrap();
    let status = snapshot.iter().find(|s| s.label == disabled).unwrap();
    assert_eq!(status.state, KeyState::Disabled);
    assert_eq!(status.requests_this_minute, 5, "the project's count");
    let json = serde_json::to_string(&snapshot).unwrap();
    assert!(!json.contains("SECRET-"), "{json}");

    // A recheck on the second instance brings the key back for the first.
    let accept = ProbeFn(|_key: SecretString| futures::future::ready(Ok(())));
    two.recheck(&disabled, &accept).await.unwrap();
    let snapshot = one.snapshot().await.unwrap();
    let status = snapshot.iter().find(|s| s.label == disabled).unwrap();
    assert_eq!(status.state, KeyState::Ready);

    buckets.drop_buckets().await;
}
