//! Key pool behaviour, with the in-memory store and a manual clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::*;
use crate::budget::MemoryBudgetStore;
use crate::clock::ManualClock;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

struct Fixture {
    pool: KeyPool,
    clock: Arc<ManualClock>,
    store: Arc<MemoryBudgetStore>,
}

/// A pool over `keys` (label, project), each key's secret being `SECRET-<label>`.
fn fixture(keys: &[(&str, &str)], budget: Budget, start: &str) -> Fixture {
    let clock = Arc::new(ManualClock::new(at(start)));
    let store = Arc::new(MemoryBudgetStore::new());
    let pool = pool_on(keys, budget, clock.clone(), store.clone());
    Fixture { pool, clock, store }
}

fn pool_on(
    keys: &[(&str, &str)],
    budget: Budget,
    clock: Arc<ManualClock>,
    store: Arc<MemoryBudgetStore>,
) -> KeyPool {
    let keys = keys
        .iter()
        .map(|(label, project)| PoolKey::new(*label, format!("SECRET-{label}"), *project))
        .collect();
    let mut config = PoolConfig::new(keys);
    config.defaults = budget;
    KeyPool::new(config, store, clock).unwrap()
}

fn budget(rpm: u32, rpd: u32) -> Budget {
    Budget {
        rpm,
        rpd,
        tpm: None,
    }
}

const LARGE: Budget = Budget {
    rpm: 1000,
    rpd: 100_000,
    tpm: None,
};

impl Fixture {
    async fn grant(&self) -> Lease {
        self.pool.acquire(0).await.expect("a key is ready")
    }

    /// Acquires and reports success, returning the label used.
    async fn use_one(&self) -> String {
        let lease = self.grant().await;
        let label = lease.label().to_owned();
        self.pool
            .report(lease, Outcome::Success { tokens: 0 })
            .await
            .unwrap();
        label
    }

    async fn not_ready_until(&self) -> DateTime<Utc> {
        match self.pool.acquire(0).await {
            Err(AcquireError::NotReady { until }) => until,
            other => panic!("expected NotReady, got {other:?}"),
        }
    }

    async fn status(&self, label: &str) -> KeyStatus {
        self.pool
            .snapshot()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.label == label)
            .unwrap()
    }
}

#[tokio::test]
async fn keys_are_used_least_recently_used_first() {
    let f = fixture(
        &[("a1", "alpha"), ("b1", "beta"), ("a2", "alpha")],
        LARGE,
        "2026-01-15T12:00:00Z",
    );
    let mut used = Vec::new();
    for _ in 0..6 {
        used.push(f.use_one().await);
    }
    assert_eq!(used, ["a1", "b1", "a2", "a1", "b1", "a2"]);
}

#[tokio::test]
async fn two_keys_of_one_project_share_one_budget() {
    let f = fixture(
        &[("a1", "alpha"), ("a2", "alpha")],
        budget(3, 100),
        "2026-01-15T12:00:30Z",
    );
    let used: Vec<String> = [f.use_one().await, f.use_one().await, f.use_one().await].into();
    assert_eq!(used, ["a1", "a2", "a1"], "both keys were used");
    // Two keys, but one project: the fourth call waits until the calls' 5-second slot
    // is a minute old.
    assert_eq!(f.not_ready_until().await, at("2026-01-15T12:01:35Z"));
    let status = f.status("a2").await;
    assert_eq!(status.requests_this_minute, 3);
    assert_eq!(status.requests_today, 3);
}

#[tokio::test]
async fn another_project_takes_over_when_one_is_spent() {
    let f = fixture(
        &[("a1", "alpha"), ("b1", "beta")],
        budget(1, 100),
        "2026-01-15T12:00:00Z",
    );
    let used = [f.use_one().await, f.use_one().await];
    assert_eq!(used, ["a1", "b1"]);
    f.not_ready_until().await;
}

#[tokio::test]
async fn the_per_minute_budget_frees_a_minute_after_the_calls() {
    let f = fixture(&[("a1", "alpha")], budget(2, 100), "2026-01-15T12:00:10Z");
    f.use_one().await;
    f.use_one().await;
    let until = f.not_ready_until().await;
    assert_eq!(
        until,
        at("2026-01-15T12:01:15Z"),
        "the end of their slot + 1 minute"
    );
    f.clock.set(at("2026-01-15T12:01:14Z"));
    f.not_ready_until().await;
    f.clock.set(until);
    f.use_one().await;
    assert_eq!(f.status("a1").await.requests_this_minute, 1);
}

#[tokio::test]
async fn the_per_minute_budget_slides_across_the_utc_minute() {
    // A provider whose minute starts with a project's first call (12:00:50 here) would
    // refuse a third call before 12:01:50; a budget per UTC minute would grant it at
    // 12:01:00.
    let f = fixture(&[("a1", "alpha")], budget(2, 100), "2026-01-15T12:00:50Z");
    f.use_one().await;
    f.clock.set(at("2026-01-15T12:00:59Z"));
    f.use_one().await;
    f.clock.set(at("2026-01-15T12:01:10Z"));
    assert_eq!(f.not_ready_until().await, at("2026-01-15T12:01:55Z"));
    f.clock.set(at("2026-01-15T12:01:55Z"));
    f.use_one().await;
    assert_eq!(f.not_ready_until().await, at("2026-01-15T12:02:00Z"));
    assert_eq!(f.status("a1").await.requests_this_minute, 2);
}

#[tokio::test]
async fn the_per_day_budget_lasts_until_midnight_pacific() {
    // 20:00 UTC on 15 January is noon in Los Angeles (PST, UTC-8).
    let f = fixture(&[("a1", "alpha")], budget(100, 3), "2026-01-15T20:00:00Z");
    for _ in 0..3 {
        f.use_one().await;
    }
    assert_eq!(f.not_ready_until().await, at("2026-01-16T08:00:00Z"));
    let status = f.status("a1").await;
    assert_eq!(status.state, KeyState::ExhaustedToday);
    assert_eq!(status.cooldown_until, Some(at("2026-01-16T08:00:00Z")));
    // Midnight UTC is not midnight Pacific.
    f.clock.set(at("2026-01-16T07:59:59Z"));
    f.not_ready_until().await;
    f.clock.set(at("2026-01-16T08:00:00Z"));
    f.use_one().await;
    assert_eq!(f.status("a1").await.requests_today, 1);
}

#[tokio::test]
async fn tokens_per_minute_are_enforced_and_corrected_by_the_real_count() {
    let f = fixture(
        &[("a1", "alpha")],
        Budget {
            rpm: 100,
            rpd: 1000,
            tpm: Some(1000),
        },
        "2026-01-15T12:00:00Z",
    );
    let first = f.pool.acquire(600).await.unwrap();
    assert!(
        matches!(
            f.pool.acquire(600).await,
            Err(AcquireError::NotReady { .. })
        ),
        "1200 estimated tokens exceed 1000"
    );
    // The call used fewer tokens than estimated: the difference is freed.
    f.pool
        .report(first, Outcome::Success { tokens: 300 })
        .await
        .unwrap();
    assert_eq!(f.status("a1").await.tokens_this_minute, 300);
    let second = f.pool.acquire(600).await.unwrap();
    f.pool
        .report(second, Outcome::Success { tokens: 650 })
        .await
        .unwrap();
    assert_eq!(f.status("a1").await.tokens_this_minute, 950);
}

#[tokio::test]
async fn a_call_never_sent_gives_its_budget_back() {
    let f = fixture(&[("a1", "alpha")], budget(1, 1), "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.not_ready_until().await;
    f.pool.report(lease, Outcome::NotSent).await.unwrap();
    f.use_one().await;
    let status = f.status("a1").await;
    assert_eq!((status.requests_this_minute, status.requests_today), (1, 1));
}

#[tokio::test]
async fn a_per_minute_429_cools_the_project_until_the_retry_hint() {
    let f = fixture(
        &[("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")],
        LARGE,
        "2026-01-15T12:00:00Z",
    );
    let lease = f.grant().await;
    assert_eq!(lease.project(), "alpha");
    f.pool
        .report(
            lease,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(22)),
                quota: None,
            },
        )
        .await
        .unwrap();
    // The other key of the cooling project is skipped as well.
    for _ in 0..3 {
        assert_eq!(f.use_one().await, "b1");
    }
    let status = f.status("a2").await;
    assert_eq!(status.state, KeyState::Cooling);
    assert_eq!(status.cooldown_until, Some(at("2026-01-15T12:00:22Z")));
    assert_eq!(
        f.status("a1").await.last_error.as_deref(),
        Some("rate limited: per-minute quota, retry after 22s")
    );
    f.clock.set(at("2026-01-15T12:00:22Z"));
    assert_eq!(f.status("a2").await.state, KeyState::Ready);
    assert_eq!(f.use_one().await, "a2");
}

#[tokio::test]
async fn a_per_minute_429_without_a_hint_cools_for_the_default() {
    let f = fixture(&[("a1", "alpha")], LARGE, "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::RateLimited {
                retry_after: None,
                quota: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(f.not_ready_until().await, at("2026-01-15T12:01:00Z"));
}

/// Reports a per-day 429 at `now` and checks the project waits until `midnight` and no
/// longer.
async fn exhausts_until(now: &str, midnight: &str) {
    let f = fixture(&[("a1", "alpha"), ("b1", "beta")], LARGE, now);
    let lease = f.grant().await;
    assert_eq!(lease.label(), "a1");
    f.pool
        .report(lease, Outcome::DailyExhausted { quota: None })
        .await
        .unwrap();
    assert_eq!(f.use_one().await, "b1");
    assert_eq!(f.use_one().await, "b1", "alpha stays exhausted");
    let status = f.status("a1").await;
    assert_eq!(status.state, KeyState::ExhaustedToday);
    assert_eq!(status.cooldown_until, Some(at(midnight)));
    f.clock.set(at(midnight) - chrono::Duration::seconds(1));
    assert_eq!(f.status("a1").await.state, KeyState::ExhaustedToday);
    f.clock.set(at(midnight));
    assert_eq!(f.status("a1").await.state, KeyState::Ready);
    assert_eq!(f.use_one().await, "a1");
}

#[tokio::test]
async fn a_per_day_429_exhausts_the_project_until_midnight_pacific() {
    // 10:00 PST.
    exhausts_until("2026-01-15T18:00:00Z", "2026-01-16T08:00:00Z").await;
    // 10:00 PDT.
    exhausts_until("2026-07-15T17:00:00Z", "2026-07-16T07:00:00Z").await;
    // 23:30 PST on 14 January is still "today" in Los Angeles though it is the 15th in UTC.
    exhausts_until("2026-01-15T07:30:00Z", "2026-01-15T08:00:00Z").await;
}

#[tokio::test]
async fn a_per_day_429_on_a_daylight_saving_day_lasts_until_the_real_midnight() {
    // 8 March 2026 springs forward (23-hour day): 10:00 PDT ends at 07:00 UTC next day,
    // not at 08:00 as midnight PST would.
    exhausts_until("2026-03-08T17:00:00Z", "2026-03-09T07:00:00Z").await;
    // Just after midnight PST that day, before the change.
    exhausts_until("2026-03-08T08:30:00Z", "2026-03-09T07:00:00Z").await;
    // 1 November 2026 falls back (25-hour day): 01:30 PDT, before the change, still ends
    // at midnight PST, 08:00 UTC on the 2nd.
    exhausts_until("2026-11-01T08:30:00Z", "2026-11-02T08:00:00Z").await;
    // 01:30 PST, the second 01:30 of the night.
    exhausts_until("2026-11-01T09:30:00Z", "2026-11-02T08:00:00Z").await;
}

#[tokio::test]
async fn the_day_budget_resets_on_a_daylight_saving_day_at_local_midnight() {
    // 23:00 PST on 7 March; the next day is 23 hours long.
    let f = fixture(&[("a1", "alpha")], budget(100, 1), "2026-03-08T07:00:00Z");
    f.use_one().await;
    assert_eq!(f.not_ready_until().await, at("2026-03-08T08:00:00Z"));
    f.clock.set(at("2026-03-08T08:00:00Z"));
    f.use_one().await;
    assert_eq!(f.not_ready_until().await, at("2026-03-09T07:00:00Z"));
}

#[tokio::test]
async fn a_lower_quota_reported_by_a_429_is_learned_and_expires() {
    let f = fixture(&[("a1", "alpha")], budget(10, 1000), "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(1)),
                quota: QuotaLimit::from_violation(
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    2,
                ),
            },
        )
        .await
        .unwrap();
    // Once the refused call's slot no longer counts.
    f.clock.set(at("2026-01-15T12:01:05Z"));
    f.use_one().await;
    f.use_one().await;
    assert_eq!(
        f.not_ready_until().await,
        at("2026-01-15T12:02:10Z"),
        "2 per minute, not 10"
    );
    assert_eq!(f.status("a1").await.limits.rpm, 2);
    // A day later the configured quota applies again.
    f.clock.set(at("2026-01-16T12:01:00Z"));
    assert_eq!(f.status("a1").await.limits.rpm, 10);
    for _ in 0..10 {
        f.use_one().await;
    }
    f.not_ready_until().await;
}

#[tokio::test]
async fn a_quota_at_or_above_the_configured_one_is_not_learned() {
    let f = fixture(&[("a1", "alpha")], budget(10, 250), "2026-01-15T12:00:00Z");
    for quota in [
        QuotaLimit::RequestsPerMinute(15),
        QuotaLimit::RequestsPerDay(250),
        QuotaLimit::RequestsPerMinute(0),
    ] {
        let lease = f.grant().await;
        f.pool
            .report(
                lease,
                Outcome::RateLimited {
                    retry_after: Some(Duration::from_secs(1)),
                    quota: Some(quota),
                },
            )
            .await
            .unwrap();
        f.clock.advance(Duration::from_secs(1));
    }
    assert_eq!(f.status("a1").await.limits, budget(10, 250));
    // Without a configured token limit, any reported one is lower.
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(1)),
                quota: Some(QuotaLimit::TokensPerMinute(250_000)),
            },
        )
        .await
        .unwrap();
    assert_eq!(f.status("a1").await.limits.tpm, Some(250_000));
}

#[test]
fn quota_ids_map_to_budgets() {
    assert_eq!(
        QuotaLimit::from_violation("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", 10),
        Some(QuotaLimit::RequestsPerMinute(10))
    );
    assert_eq!(
        QuotaLimit::from_violation("GenerateRequestsPerDayPerProjectPerModel-FreeTier", 250),
        Some(QuotaLimit::RequestsPerDay(250))
    );
    assert_eq!(
        QuotaLimit::from_violation("GenerateContentInputTokensPerModelPerMinute-FreeTier", 1),
        Some(QuotaLimit::TokensPerMinute(1))
    );
    assert_eq!(
        QuotaLimit::from_violation("GenerateContentInputTokensPerModelPerDay-FreeTier", 1),
        None
    );
}

#[tokio::test]
async fn server_errors_cost_nothing_but_are_shown() {
    let f = fixture(&[("a1", "alpha")], budget(2, 100), "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::ServerError {
                detail: "503 UNAVAILABLE: model is overloaded".into(),
            },
        )
        .await
        .unwrap();
    let status = f.status("a1").await;
    assert_eq!(status.state, KeyState::Ready);
    assert_eq!(
        status.last_error.as_deref(),
        Some("server error: 503 UNAVAILABLE: model is overloaded")
    );
    assert_eq!(status.last_error_at, Some(at("2026-01-15T12:00:00Z")));
    f.use_one().await;
}

fn probe_answering(
    answer: Result<(), ProbeError>,
) -> ProbeFn<impl Fn(SecretString) -> futures::future::Ready<Result<(), ProbeError>> + Send + Sync>
{
    ProbeFn(move |_key: SecretString| futures::future::ready(answer.clone()))
}

#[tokio::test]
async fn an_invalid_key_is_disabled_until_a_recheck_accepts_it() {
    let f = fixture(
        &[("a1", "alpha"), ("a2", "alpha")],
        LARGE,
        "2026-01-15T12:00:00Z",
    );
    let lease = f.grant().await;
    assert_eq!(lease.label(), "a1");
    f.pool
        .report(
            lease,
            Outcome::KeyInvalid {
                reason: "API_KEY_INVALID".into(),
            },
        )
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(f.use_one().await, "a2");
    }
    let status = f.status("a1").await;
    assert_eq!(status.state, KeyState::Disabled);
    assert_eq!(
        status.disabled_reason.as_deref(),
        Some("key invalid: API_KEY_INVALID")
    );

    let rejected = f
        .pool
        .recheck(
            "a1",
            &probe_answering(Err(ProbeError::Rejected("API_KEY_INVALID".into()))),
        )
        .await
        .unwrap();
    assert_eq!(
        rejected,
        KeyCheck::Rejected {
            reason: "API_KEY_INVALID".into()
        }
    );
    let unsure = f
        .pool
        .recheck(
            "a1",
            &probe_answering(Err(ProbeError::Inconclusive("timeout".into()))),
        )
        .await
        .unwrap();
    assert!(matches!(unsure, KeyCheck::Inconclusive { .. }));
    assert_eq!(f.status("a1").await.state, KeyState::Disabled);

    let accepted = f
        .pool
        .recheck("a1", &probe_answering(Ok(())))
        .await
        .unwrap();
    assert_eq!(accepted, KeyCheck::Usable);
    assert_eq!(f.status("a1").await.state, KeyState::Ready);
    assert_eq!(f.use_one().await, "a1");

    assert!(matches!(
        f.pool.recheck("nope", &probe_answering(Ok(()))).await,
        Err(RecheckError::UnknownKey(_))
    ));
}

#[tokio::test]
async fn an_unusable_key_is_disabled_and_with_every_key_disabled_acquire_says_so() {
    let f = fixture(&[("a1", "alpha")], LARGE, "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::KeyUnusable {
                reason: "CONSUMER_SUSPENDED".into(),
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        f.pool.acquire(0).await,
        Err(AcquireError::NoUsableKey)
    ));
    assert_eq!(f.status("a1").await.state, KeyState::Disabled);
}

#[tokio::test]
async fn recheck_disabled_probes_only_disabled_keys() {
    let f = fixture(
        &[("a1", "alpha"), ("b1", "beta")],
        LARGE,
        "2026-01-15T12:00:00Z",
    );
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::KeyInvalid {
                reason: "gone".into(),
            },
        )
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let probe = ProbeFn(move |_key: SecretString| {
        counted.fetch_add(1, Ordering::SeqCst);
        futures::future::ready(Ok(()))
    });
    let checked = f.pool.recheck_disabled(&probe).await.unwrap();
    assert_eq!(checked, [("a1".to_owned(), KeyCheck::Usable)]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(f.pool.recheck_disabled(&probe).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_periodic_reprobe_brings_back_a_key_gemini_accepts_again() {
    let f = fixture(&[("a1", "alpha")], LARGE, "2026-01-15T12:00:00Z");
    let lease = f.grant().await;
    f.pool
        .report(
            lease,
            Outcome::KeyInvalid {
                reason: "gone".into(),
            },
        )
        .await
        .unwrap();
    let pool = Arc::new(f.pool);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let probe = ProbeFn(move |key: SecretString| {
        let _ = tx.send(secrecy::ExposeSecret::expose_secret(&key).to_owned());
        futures::future::ready(Ok(()))
    });
    let cancel = CancellationToken::new();
    let started = tokio::time::Instant::now();
    let task = pool.spawn_reprobe(Arc::new(probe), Duration::from_secs(3600), cancel.clone());
    // Paused time jumps to the next timer whenever every task is idle.
    let probed = rx.recv().await.unwrap();
    assert_eq!(probed, "SECRET-a1");
    assert!(
        started.elapsed() >= Duration::from_secs(3600),
        "the first probe waits one interval"
    );
    let mut enabled = false;
    for _ in 0..100 {
        if pool.acquire(0).await.is_ok() {
            enabled = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(enabled, "the probed key is usable again");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn instances_sharing_a_store_share_budgets_and_health() {
    let clock = Arc::new(ManualClock::new(at("2026-01-15T12:00:00Z")));
    let store = Arc::new(MemoryBudgetStore::new());
    let keys = [("a1", "alpha"), ("b1", "beta")];
    let one = pool_on(&keys, budget(2, 100), clock.clone(), store.clone());
    let two = pool_on(&keys, budget(2, 100), clock.clone(), store.clone());
    // `one` disables a1: `two` never uses it.
    let lease = one.acquire(0).await.unwrap();
    assert_eq!(lease.label(), "a1");
    one.report(
        lease,
        Outcome::KeyInvalid {
            reason: "bad".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(two.acquire(0).await.unwrap().label(), "b1");
    assert_eq!(one.acquire(0).await.unwrap().label(), "b1");
    // beta's two calls this minute are spent, one by each instance.
    assert!(matches!(
        two.acquire(0).await,
        Err(AcquireError::NotReady { .. })
    ));
}

#[tokio::test]
async fn neither_the_snapshot_nor_debug_output_shows_a_key() {
    let f = fixture(
        &[
            ("a1", "alpha"),
            ("a2", "alpha"),
            ("b1", "beta"),
            ("c1", "gamma"),
        ],
        LARGE,
        "2026-01-15T12:00:00Z",
    );
    let secrets = ["SECRET-a1", "SECRET-a2", "SECRET-b1", "SECRET-c1"];
    // Error texts that echo the key are scrubbed before they are stored.
    let outcomes = [
        Outcome::KeyInvalid {
            reason: "API key SECRET-a1 not valid".into(),
        },
        Outcome::ServerError {
            detail: "echo SECRET-a2".into(),
        },
        Outcome::DailyExhausted { quota: None },
        Outcome::RateLimited {
            retry_after: None,
            quota: None,
        },
    ];
    let mut debug = Vec::new();
    for outcome in outcomes {
        let lease = f.grant().await;
        debug.push(format!("{lease:?}"));
        f.pool.report(lease, outcome).await.unwrap();
    }
    let snapshot = f.pool.snapshot().await.unwrap();
    let states: Vec<KeyState> = snapshot.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            KeyState::Disabled,
            KeyState::Ready,
            KeyState::ExhaustedToday,
            KeyState::Cooling
        ]
    );
    let json = serde_json::to_string(&snapshot).unwrap();
    assert!(json.contains("\"exhausted_today\""), "{json}");
    assert!(json.contains("[redacted]"), "{json}");
    debug.push(format!("{:?}", f.pool));
    debug.push(format!("{:?}", f.store.load_health().await.unwrap()));
    for text in debug.iter().chain([&json]) {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
    }
}
