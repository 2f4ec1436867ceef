//! Gemini storms, against the project's fake Gemini: every call rate-limited for a long
//! stretch, every key rejected, streams dropped mid-reply. Runs wait, retry, dead-letter
//! and recover as ADR 0010 says; nothing is left `running`, no reply is duplicated, and
//! the agent never hot-loops against a Gemini that keeps refusing.
//!
//! Each test runs the application without its agent (gateway, relay, projector) and an
//! agent of its own on the same JetStream consumer and sweep the application's would use,
//! with its own key pool (so the test can look at the keys' health) and with the
//! minutes and hours of a real storm compressed to seconds: retry delays, cooldowns and
//! the re-probe interval are shortened, and each test's doc comment says what its
//! figures stand for. Every run is asked for in a conversation of its own, through the
//! HTTP API; the assertions read the log (each run's and conversation's events) and the
//! read models (runs, messages, dead letters), not only statuses.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use colloquy::app::RunsDue;
use colloquy_commands::Commands;
use colloquy_commands::cache::CacheConfig;
use colloquy_domain::run::REVIVED_REASON;
use colloquy_domain::{ConversationId, RunId};
use colloquy_eventstore::RecordedEvent;
use colloquy_gemini_agent::backoff::{Backoff, RetrySchedule};
use colloquy_gemini_agent::budget::MemoryBudgetStore;
use colloquy_gemini_agent::clock::SystemClock;
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, FakeKey, Fault, RandomFaults};
use colloquy_gemini_agent::gemini::{GeminiClient, GeminiConfig};
use colloquy_gemini_agent::keys::{Budget, KeyCheck, KeyPool, KeyState, PoolConfig, PoolKey};
use colloquy_gemini_agent::worker::{
    Agent, AgentSettings, ClientProbe, DEAD_LETTER_PREFIX, DueRuns, Transport,
};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::helpers::{SseReader, TestApp, TestUser, app_without_agent, generation_calls};

// ------------------------------------------------------------------ harness --

/// The test's agent: its pool (to read the keys' health), the client it calls Gemini
/// with, and the token that stops it.
struct StormAgent {
    agent: Agent,
    pool: Arc<KeyPool>,
    client: GeminiClient,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl StormAgent {
    /// An agent for `app` calling `fake` with `keys`, budgets that never refuse (the
    /// storm is Gemini's, not the pool's), a 1 s default cooldown and `settings`.
    async fn new(
        app: &TestApp,
        fake: &FakeGemini,
        keys: Vec<PoolKey>,
        settings: AgentSettings,
    ) -> Self {
        let mut config = PoolConfig::new(keys);
        config.defaults = Budget {
            rpm: 10_000,
            rpd: 1_000_000,
            tpm: None,
        };
        config.default_cooldown = Duration::from_secs(1);
        let pool = Arc::new(
            KeyPool::new(
                config,
                Arc::new(MemoryBudgetStore::new()),
                Arc::new(SystemClock),
            )
            .unwrap(),
        );
        let client = GeminiClient::new(GeminiConfig {
            base_url: fake.base_url(),
            stream_idle_timeout: Duration::from_secs(10),
            ..GeminiConfig::default()
        })
        .unwrap();
        let nats = async_nats::connect(colloquy_testkit::nats_url())
            .await
            .unwrap();
        let agent = Agent::new(
            Commands::new(Arc::clone(&app.store), CacheConfig::default()),
            client.clone(),
            Some(Arc::clone(&pool)),
            Transport::Nats(nats),
            AgentSettings {
                prefix: app.prefix.clone(),
                stream: app.prefix.to_uppercase(),
                ..settings
            },
        );
        Self {
            agent,
            pool,
            client,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Starts consuming runs and sweeping the runs read model, as the agent role does.
    async fn start(&mut self, app: &TestApp) {
        let due: Arc<dyn DueRuns> = Arc::new(RunsDue(app.db.database().await));
        let agent = self.agent.clone();
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(
            async move { agent.run(Some(due), stop).await },
        ));
    }

    /// Re-probes disabled keys every `every`, as the agent role does every 5 minutes.
    fn reprobe_every(&mut self, every: Duration) {
        let task = self.agent.spawn_key_reprobe(every, self.stop.clone());
        self.tasks.extend(task);
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the agent stops within its bound")
                .unwrap();
        }
    }
}

/// The settings every storm shares: a quick sweep, a few short tries per attempt.
fn storm_settings(retry_delays: &[Duration]) -> AgentSettings {
    AgentSettings {
        concurrency: 3,
        retry_delays: RetrySchedule::new(retry_delays.to_vec()),
        backoff: Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_tries: 3,
            max_total_wait: Duration::from_secs(3),
            max_hint: Duration::from_secs(3),
        },
        sweep_every: Duration::from_millis(200),
        ..AgentSettings::default()
    }
}

/// Polls `check` every 50 ms until it gives a value; panics after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run asked for through the API, in a conversation of its own.
#[derive(Debug, Clone)]
struct Asked {
    run: RunId,
    conversation: String,
    prompt: String,
}

async fn ask(app: &TestApp, user: &TestUser, prompt: &str) -> Asked {
    let conversation = app.create_conversation(user).await;
    let sent = app.send_message(user, &conversation, prompt, true).await;
    let run = RunId::from_uuid(sent["run_id"].as_str().unwrap().parse().unwrap());
    Asked {
        run,
        conversation,
        prompt: prompt.to_owned(),
    }
}

async fn ask_many(app: &TestApp, user: &TestUser, label: &str, n: usize) -> Vec<Asked> {
    let mut asked = Vec::new();
    for i in 0..n {
        asked.push(ask(app, user, &format!("{label} question {i}")).await);
    }
    asked
}

/// A run's events, from the log.
async fn run_log(app: &TestApp, run: RunId) -> Vec<RecordedEvent> {
    app.store
        .read_stream(&run.stream_name(), 0, 100_000)
        .await
        .unwrap()
}

fn of_type<'a>(events: &'a [RecordedEvent], event_type: &str) -> Vec<&'a RecordedEvent> {
    events
        .iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

/// A run's status as its log says (the read model may trail it).
fn log_status(events: &[RecordedEvent]) -> &'static str {
    events
        .iter()
        .fold("none", |status, e| match e.event_type.as_str() {
            "RunRequested" => "queued",
            "RunStarted" => "running",
            "RunRetryScheduled" => "retrying",
            "RunCompleted" => "succeeded",
            "RunFailed" => "failed",
            "RunCancelled" => "cancelled",
            _ => status,
        })
}

/// The attempts the log started, in order.
fn attempts_started(events: &[RecordedEvent]) -> Vec<u64> {
    of_type(events, "RunStarted")
        .iter()
        .map(|e| e.data["attempt"].as_u64().unwrap())
        .collect()
}

/// Waits until every run's log says `status`.
async fn all_reach(app: &TestApp, runs: &[Asked], status: &str, within: Duration) {
    eventually(&format!("every run {status}"), within, || async {
        for asked in runs {
            if log_status(&run_log(app, asked.run).await) != status {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The assistant replies the conversation's log holds for `run`.
async fn replies_in_log(app: &TestApp, asked: &Asked) -> Vec<RecordedEvent> {
    let conversation = ConversationId::from_uuid(asked.conversation.parse().unwrap());
    app.store
        .read_stream(&conversation.stream_name(), 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.event_type == "MessageSent"
                && e.data["author"] == "assistant"
                && e.data["runId"] == asked.run.as_uuid().to_string()
        })
        .collect()
}

/// `GET /v1/runs/{id}` once the read model has reached the log's head.
async fn run_view(app: &TestApp, user: &TestUser, run: RunId) -> Value {
    let head = app.store.head().await.unwrap();
    let response = app
        .request(Method::GET, &format!("/v1/runs/{}", run.as_uuid()), user)
        .header("X-Colloquy-Min-Position", head.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// The run succeeded exactly once: one `RunCompleted` in its log, one assistant
/// `MessageSent` in its conversation's log (the completion's reply id), one assistant
/// message in the messages read model with the echo, and `succeeded` in the runs read
/// model. Returns the run's log.
async fn assert_replied_once(app: &TestApp, user: &TestUser, asked: &Asked) -> Vec<RecordedEvent> {
    let events = run_log(app, asked.run).await;
    let completed = of_type(&events, "RunCompleted");
    assert_eq!(completed.len(), 1, "one completion: {events:#?}");
    let replies = replies_in_log(app, asked).await;
    assert_eq!(replies.len(), 1, "one reply in the log: {replies:#?}");
    assert_eq!(
        replies[0].data["messageId"], completed[0].data["replyMessageId"],
        "the reply is the completion's"
    );
    let expected = format!("echo: {}", asked.prompt);
    assert_eq!(replies[0].data["text"], expected.as_str());

    let view = run_view(app, user, asked.run).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(
        view["attempts"].as_u64(),
        attempts_started(&events).last().copied(),
        "{view}"
    );
    let head = app.store.head().await.unwrap();
    let messages = app.messages_at(user, &asked.conversation, head).await;
    let assistant: Vec<&Value> = messages
        .iter()
        .filter(|m| m["author"] == "assistant")
        .collect();
    assert_eq!(
        assistant.len(),
        1,
        "one reply in the read model: {messages:#?}"
    );
    assert_eq!(assistant[0]["run_id"], asked.run.as_uuid().to_string());
    assert_eq!(assistant[0]["text"], expected.as_str());
    events
}

/// Attempts are started one after another from 1, each once.
fn assert_attempts_in_order(events: &[RecordedEvent]) {
    let started = attempts_started(events);
    let expected: Vec<u64> = (1..=started.len() as u64).collect();
    assert_eq!(started, expected, "attempts in order, each once");
}

/// The ids of the runs `/v1/admin/runs/dead-letters` lists once the runs read model has
/// reached the log's head, sorted.
async fn dead_letters(app: &TestApp, admin: &TestUser) -> Vec<String> {
    let head = app.store.head().await.unwrap();
    let listed: Value = app
        .request(Method::GET, "/v1/admin/runs/dead-letters", admin)
        .header("X-Colloquy-Min-Position", head.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The runs' ids, sorted.
fn run_ids(runs: &[Asked]) -> Vec<String> {
    let mut ids: Vec<String> = runs.iter().map(|a| a.run.as_uuid().to_string()).collect();
    ids.sort();
    ids
}

fn probe_calls(fake: &FakeGemini) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.action.as_deref() == Some("list"))
        .count()
}

// --------------------------------------------------------------- 429 storm --

/// Every call rate-limited (429 `RESOURCE_EXHAUSTED` with `QuotaFailure` and a 1 s
/// `RetryInfo`) across two projects for as long as it takes three runs to use up their
/// whole retry schedule, and then for three more runs asked during it; then the storm
/// ends.
///
/// Compressed: the 1 s `RetryInfo` stands for Gemini's usual 20–60 s, the retry delays
/// 2 s, 3 s for the first two of `1m,10m,1h,1d`, so the storm (≈10–20 s here) stands for
/// a quarter of an hour or more of 429s on every project.
///
/// Shows: projects cool for their `RetryInfo` and attempts are retried only when due, so
/// the calls during the storm stay within what the cooldowns and attempts allow (no hot
/// loop); a run past its last delay dead-letters (`retries exhausted`, listed in
/// `/v1/admin/runs/dead-letters`); after the storm every other run completes with
/// exactly one reply, and each dead letter revived through `POST
/// /v1/admin/runs/{id}/retry` completes once. No run is left running, queued or
/// retrying.
#[tokio::test]
async fn a_rate_limit_storm_dead_letters_the_exhausted_and_completes_the_rest_once() {
    const RETRY_INFO: Duration = Duration::from_secs(1);
    let delays = [Duration::from_secs(2), Duration::from_secs(3)];
    let fake = FakeGemini::start(
        FakeConfig::default()
            .key("storm-key-a", "proj-a")
            .key("storm-key-b", "proj-b"),
    )
    .await
    .unwrap();
    fake.set_random_faults(Some(RandomFaults {
        seed: 429,
        probability: 1.0,
        faults: vec![Fault::RateLimited {
            per_day: false,
            retry_after: RETRY_INFO,
        }],
    }));
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let settings = storm_settings(&delays);
    let concurrency = settings.concurrency;
    let max_tries = settings.backoff.max_tries as usize;
    let mut agent = StormAgent::new(
        &app,
        &fake,
        vec![
            PoolKey::new("a", "storm-key-a", "proj-a"),
            PoolKey::new("b", "storm-key-b", "proj-b"),
        ],
        settings,
    )
    .await;
    let storm = Instant::now();
    let early = ask_many(&app, &user, "early", 3).await;
    agent.start(&app).await;

    // The early runs go through every attempt the schedule allows, then dead-letter.
    all_reach(&app, &early, "failed", Duration::from_secs(60)).await;
    for asked in &early {
        let events = run_log(&app, asked.run).await;
        assert_attempts_in_order(&events);
        assert_eq!(
            attempts_started(&events).len(),
            delays.len() + 1,
            "one attempt per delay and the first: {events:#?}"
        );
        let failed = of_type(&events, "RunFailed");
        assert_eq!(failed.len(), 1);
        let reason = failed[0].data["reason"].as_str().unwrap();
        assert!(reason.starts_with(DEAD_LETTER_PREFIX), "{reason}");
        assert!(
            reason.contains("429") || reason.contains("rate"),
            "{reason}"
        );
        assert!(of_type(&events, "RunCompleted").is_empty());
        assert!(replies_in_log(&app, asked).await.is_empty());
    }

    // Runs asked during the storm wait in `retrying` (the storm ends before they can
    // use up their schedule).
    let late = ask_many(&app, &user, "late", 3).await;
    all_reach(&app, &late, "retrying", Duration::from_secs(30)).await;
    fake.set_random_faults(None);
    let storm_length = storm.elapsed();
    let mut attempts_in_storm = 0;
    for asked in early.iter().chain(&late) {
        attempts_in_storm += attempts_started(&run_log(&app, asked.run).await).len();
    }
    // Faults are drawn only while the storm lasts: its calls are the 429s.
    let refused = |fake: &FakeGemini| fake.status_counts().get(&429).copied().unwrap_or(0) as usize;
    let storm_calls = refused(&fake);

    // No hot loop: each call belongs to an attempt of at most `max_tries` calls, and a
    // project takes a call only when its cooldown is over (a few in flight may race it).
    assert!(
        storm_calls <= attempts_in_storm * max_tries,
        "{storm_calls} calls for {attempts_in_storm} attempts"
    );
    let windows = (storm_length.as_secs_f64() / RETRY_INFO.as_secs_f64()).ceil() as usize + 1;
    let bound = 2 * windows * (concurrency + 1);
    assert!(
        storm_calls <= bound,
        "{storm_calls} calls in {storm_length:?} against two projects cooling {RETRY_INFO:?} each time (bound {bound})"
    );

    // Keys cool per RetryInfo: within any stretch shorter than it, a project is called
    // only by the calls already in flight when its 429 came back (one per pull loop and
    // one for the sweep), never by a retry loop.
    let requests = fake.requests();
    for key in ["storm-key-a", "storm-key-b"] {
        let mut times: Vec<Instant> = requests
            .iter()
            .filter(|r| r.status == 429 && r.api_key.as_deref() == Some(key))
            .map(|r| r.received)
            .collect();
        times.sort();
        let busiest = (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < RETRY_INFO.mul_f64(0.9))
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(
            busiest <= concurrency + 1,
            "{busiest} calls with {key} within one cooldown: {:?}",
            times.iter().map(|t| *t - times[0]).collect::<Vec<_>>()
        );
    }

    // After the storm every run that was not dead-lettered completes, once.
    all_reach(&app, &late, "succeeded", Duration::from_secs(30)).await;
    for asked in &late {
        let events = assert_replied_once(&app, &user, asked).await;
        assert_attempts_in_order(&events);
        assert!(of_type(&events, "RunFailed").is_empty());
        let retries = of_type(&events, "RunRetryScheduled");
        assert!(!retries.is_empty(), "it waited out the storm: {events:#?}");
        // Rescheduled no more often than the first delay allows (plus the one the
        // attempt's own failure scheduled).
        let most = (storm_length.as_secs_f64() / delays[0].as_secs_f64()).ceil() as usize + 1;
        assert!(
            retries.len() <= most,
            "{} retries: {events:#?}",
            retries.len()
        );
    }

    // The dead letters are listed for an operator, who revives them; each then
    // completes once.
    assert_eq!(
        dead_letters(&app, &admin).await,
        run_ids(&early),
        "exactly the exhausted runs are dead letters"
    );
    for asked in &early {
        let response = app
            .request(
                Method::POST,
                &format!("/v1/admin/runs/{}/retry", asked.run.as_uuid()),
                &admin,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    all_reach(&app, &early, "succeeded", Duration::from_secs(30)).await;
    for asked in &early {
        let events = assert_replied_once(&app, &user, asked).await;
        assert_attempts_in_order(&events);
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let failed_at = types.iter().position(|t| *t == "RunFailed").unwrap();
        let after: Vec<&RecordedEvent> = events[failed_at..]
            .iter()
            .filter(|e| e.event_type != "RunProgressed")
            .collect();
        let after_types: Vec<&str> = after.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            after_types,
            [
                "RunFailed",
                "RunRetryScheduled",
                "RunStarted",
                "RunCompleted"
            ],
            "revived, then one more attempt that succeeded"
        );
        assert_eq!(after[1].data["reason"], REVIVED_REASON);
    }
    assert_eq!(refused(&fake), storm_calls, "no 429 after the storm");
    assert_eq!(
        generation_calls(&fake) - storm_calls,
        late.len() + early.len(),
        "after the storm, one call per run"
    );

    // Nothing is left running, and the dead letters are gone.
    for asked in early.iter().chain(&late) {
        assert_eq!(
            run_view(&app, &user, asked.run).await["status"],
            "succeeded"
        );
    }
    assert!(dead_letters(&app, &admin).await.is_empty());
    agent.stop().await;
}

// ----------------------------------------------------------- keys rejected --

/// Every key rejected: one deleted (400 `INVALID_ARGUMENT`, `API_KEY_INVALID`), the
/// other's project suspended (403 `PERMISSION_DENIED`, `CONSUMER_SUSPENDED`, whose
/// message quotes the key). Then the key is issued again and the project reinstated.
///
/// Compressed: the re-probe every 400 ms stands for the agent role's every 5 minutes, and
/// the retry delays 1 s, 2 s, 12 s for `1m,10m,1h,1d`, so the outage (≈5 s here) stands
/// for an hour or so with every key out.
///
/// Shows: each key is disabled after the first call it fails and is not called again
/// for runs (the re-probe's cheap model list is the only traffic, at its interval);
/// runs wait in `retrying`, each wait a step further along the retry schedule (so no
/// more reschedules than the schedule has delays, however long the outage), with a
/// last error saying the keys are disabled and never quoting a key; the admin view of
/// the pool says why each key is disabled. Once Gemini takes the keys again, an
/// operator's recheck and the periodic re-probe enable them, and every run completes
/// with exactly one reply, without having dead-lettered.
#[tokio::test]
async fn with_every_key_rejected_runs_wait_without_calls_and_complete_once_keys_return() {
    const REVOKED: &str = "storm-revoked-key-a";
    const SUSPENDED: &str = "storm-suspended-key-b";
    let delays = [
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(12),
    ];
    // The revoked key is unknown to Gemini; the other one's project is suspended.
    let fake = FakeGemini::start(FakeConfig::default().key(SUSPENDED, "proj-b"))
        .await
        .unwrap();
    assert!(fake.suspend_key(SUSPENDED));
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let settings = storm_settings(&delays);
    let concurrency = settings.concurrency;
    let mut agent = StormAgent::new(
        &app,
        &fake,
        vec![
            PoolKey::new("revoked", REVOKED, "proj-a"),
            PoolKey::new("suspended", SUSPENDED, "proj-b"),
        ],
        settings,
    )
    .await;
    const REPROBE: Duration = Duration::from_millis(400);
    agent.reprobe_every(REPROBE);
    let runs = ask_many(&app, &user, "keyless", 4).await;
    agent.start(&app).await;
    let outage = Instant::now();

    all_reach(&app, &runs, "retrying", Duration::from_secs(30)).await;
    let snapshot = agent.pool.snapshot().await.unwrap();
    let health: BTreeMap<&str, (KeyState, Option<String>)> = snapshot
        .iter()
        .map(|k| (k.label.as_str(), (k.state, k.disabled_reason.clone())))
        .collect();
    assert_eq!(health["revoked"].0, KeyState::Disabled, "{snapshot:?}");
    assert_eq!(health["suspended"].0, KeyState::Disabled, "{snapshot:?}");
    let why_revoked = health["revoked"].1.clone().unwrap();
    let why_suspended = health["suspended"].1.clone().unwrap();
    assert!(
        why_revoked.contains("API_KEY_INVALID") || why_revoked.contains("not valid"),
        "{why_revoked}"
    );
    assert!(
        why_suspended.to_lowercase().contains("suspended"),
        "{why_suspended}"
    );
    assert!(
        !why_suspended.contains(SUSPENDED),
        "no key in the admin view"
    );

    // The outage goes on: no more calls for runs, only the re-probe's at its interval.
    let calls = generation_calls(&fake);
    assert!(
        (1..=2 * concurrency).contains(&calls),
        "each key is called until it is disabled, by at most the calls in flight: {calls}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        generation_calls(&fake),
        calls,
        "no call with a disabled key"
    );
    let probes = probe_calls(&fake);
    let rounds = (outage.elapsed().as_secs_f64() / REPROBE.as_secs_f64()).ceil() as usize + 1;
    assert!(
        probes <= 2 * rounds,
        "{probes} probes in {:?} at one per key every {REPROBE:?}",
        outage.elapsed()
    );
    let waited = outage.elapsed();
    for asked in &runs {
        let events = run_log(&app, asked.run).await;
        assert_eq!(log_status(&events), "retrying", "{events:#?}");
        assert!(
            of_type(&events, "RunFailed").is_empty(),
            "not a dead letter"
        );
        assert!(
            attempts_started(&events).len() <= 1,
            "no attempt starts without a usable key: {events:#?}"
        );
        // Each wait is a step of the schedule (the first the failed attempt's, if it
        // started one), not one more first delay: at the first delay's pace the outage
        // would have rescheduled each run about once a second.
        let retries = of_type(&events, "RunRetryScheduled");
        assert!(
            (1..=delays.len()).contains(&retries.len()),
            "{} reschedules in {waited:?}: {events:#?}",
            retries.len()
        );
        let due: Vec<chrono::DateTime<chrono::Utc>> = retries
            .iter()
            .map(|e| e.data["notBefore"].as_str().unwrap().parse().unwrap())
            .collect();
        for pair in due.windows(2) {
            assert!(
                pair[1] - pair[0] >= chrono::Duration::from_std(delays[1]).unwrap(),
                "the waits grow: {due:?}"
            );
        }
        let view = run_view(&app, &user, asked.run).await;
        assert_eq!(view["status"], "retrying", "{view}");
        let error = view["error"].as_str().unwrap();
        assert!(
            error.contains("disabled")
                || error.contains("API_KEY_INVALID")
                || error.to_lowercase().contains("suspended"),
            "a clear last error: {error}"
        );
        for event in &events {
            let text = event.data.to_string();
            assert!(
                !text.contains(SUSPENDED) && !text.contains(REVOKED),
                "a key in the log: {text}"
            );
        }
    }

    // The key is issued again and the project reinstated: an operator rechecks one key
    // (`colloquy admin keys recheck`), the periodic re-probe finds the other.
    fake.add_key(FakeKey::new(REVOKED, "proj-a"));
    assert!(fake.unsuspend_key(SUSPENDED));
    let recheck = agent
        .pool
        .recheck("revoked", &ClientProbe(agent.client.clone()))
        .await
        .unwrap();
    assert_eq!(recheck, KeyCheck::Usable);
    all_reach(&app, &runs, "succeeded", Duration::from_secs(30)).await;
    for asked in &runs {
        let events = assert_replied_once(&app, &user, asked).await;
        assert_attempts_in_order(&events);
        assert!(attempts_started(&events).len() <= 2, "{events:#?}");
        assert!(of_type(&events, "RunFailed").is_empty());
    }
    eventually(
        "the re-probe enables the other key",
        Duration::from_secs(10),
        || async {
            let snapshot = agent.pool.snapshot().await.unwrap();
            snapshot
                .iter()
                .all(|k| k.state == KeyState::Ready)
                .then_some(())
        },
    )
    .await;
    agent.stop().await;
}

/// Every key rejected for good: the only key is unknown to Gemini and nobody issues it
/// again.
///
/// Compressed: retry delays of 300 ms and 600 ms for `1m,10m,1h,1d`, so the outage
/// (about a second here) stands for a day and more.
///
/// Shows: a run that waits for a usable key past the last delay of its schedule
/// dead-letters (`retries exhausted … every Gemini key is disabled`) instead of waiting
/// for good, is listed for an operator with the dead letters, and wrote no more
/// reschedules than the schedule has delays.
#[tokio::test]
async fn with_every_key_rejected_for_good_runs_dead_letter_after_the_schedule() {
    let delays = [Duration::from_millis(300), Duration::from_millis(600)];
    let fake = FakeGemini::start(FakeConfig::default()).await.unwrap();
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let mut agent = StormAgent::new(
        &app,
        &fake,
        vec![PoolKey::new("revoked", "storm-unknown-key", "proj-a")],
        storm_settings(&delays),
    )
    .await;
    let runs = ask_many(&app, &user, "keyless-for-good", 3).await;
    agent.start(&app).await;

    all_reach(&app, &runs, "failed", Duration::from_secs(30)).await;
    for asked in &runs {
        let events = run_log(&app, asked.run).await;
        let failed = of_type(&events, "RunFailed");
        assert_eq!(failed.len(), 1, "{events:#?}");
        let reason = failed[0].data["reason"].as_str().unwrap();
        assert!(reason.starts_with(DEAD_LETTER_PREFIX), "{reason}");
        assert!(reason.contains("every Gemini key is disabled"), "{reason}");
        assert!(!reason.contains("storm-unknown-key"), "{reason}");
        assert!(attempts_started(&events).len() <= 1, "{events:#?}");
        assert!(
            of_type(&events, "RunRetryScheduled").len() <= delays.len(),
            "{events:#?}"
        );
    }
    assert_eq!(
        dead_letters(&app, &admin).await,
        run_ids(&runs),
        "the runs are dead letters"
    );
    agent.stop().await;
}

// --------------------------------------------------------- dropped streams --

/// Every streamed reply cut off: half the reply then a dropped connection, or the whole
/// reply without a finish reason; then the storm ends.
///
/// Compressed: 3 tries per attempt and 500 ms between attempts (for 4 tries and
/// `1m,10m,1h,1d`), so the storm (a few seconds here) stands for some minutes of a
/// network that cuts every stream.
///
/// Shows: every try that streamed tokens is voided with a `reset` on the run's live
/// feed, attempts are retried and then rescheduled, and once streams stay up each run
/// records exactly one reply: one `RunCompleted` per run in the log, one assistant
/// `MessageSent` per conversation, one assistant message in the read model, and the
/// tokens streamed after the last `reset` are exactly that reply.
#[tokio::test]
async fn dropped_streams_are_retried_with_a_reset_and_each_run_replies_once() {
    let delays = [Duration::from_millis(500); 8];
    let fake = FakeGemini::start(FakeConfig::default().key("storm-key", "proj-a"))
        .await
        .unwrap();
    fake.set_random_faults(Some(RandomFaults {
        seed: 11,
        probability: 1.0,
        faults: vec![
            Fault::DropMidStream,
            Fault::DropMidStream,
            Fault::EndWithoutFinish,
        ],
    }));
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let settings = storm_settings(&delays);
    let max_tries = settings.backoff.max_tries as usize;
    let mut agent = StormAgent::new(
        &app,
        &fake,
        vec![PoolKey::new("main", "storm-key", "proj-a")],
        settings,
    )
    .await;
    let runs = ask_many(&app, &user, "cut", 4).await;
    // Each run's live feed is open before the agent starts, so it sees every try.
    let mut feeds = Vec::new();
    for asked in &runs {
        let reader = SseReader::new(
            app.sse(
                &format!("/v1/runs/{}/events", asked.run.as_uuid()),
                &user,
                None,
            )
            .await,
        );
        feeds.push(tokio::spawn(async move {
            let mut reader = reader;
            reader.outcome().await
        }));
    }
    agent.start(&app).await;

    // The storm lasts until every run has used up two whole attempts.
    eventually(
        "every run rescheduled twice",
        Duration::from_secs(30),
        || async {
            for asked in &runs {
                let events = run_log(&app, asked.run).await;
                if of_type(&events, "RunRetryScheduled").len() < 2 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    fake.set_random_faults(None);
    let storm_calls = generation_calls(&fake);
    assert!(
        storm_calls >= 2 * runs.len() * max_tries,
        "every run tried two whole attempts: {storm_calls}"
    );

    all_reach(&app, &runs, "succeeded", Duration::from_secs(30)).await;
    assert!(
        generation_calls(&fake) - storm_calls <= runs.len(),
        "after the storm, at most one call per run"
    );
    let mut completions = 0;
    for (asked, feed) in runs.iter().zip(feeds) {
        let events = assert_replied_once(&app, &user, asked).await;
        assert_attempts_in_order(&events);
        completions += of_type(&events, "RunCompleted").len();
        let retries = of_type(&events, "RunRetryScheduled");
        assert!(retries.len() >= 2, "{events:#?}");
        for retry in &retries {
            let reason = retry.data["reason"].as_str().unwrap().to_lowercase();
            assert!(
                ["incomplete", "stream", "connection", "finish"]
                    .iter()
                    .any(|word| reason.contains(word)),
                "{reason}"
            );
        }
        // The live feed: resets for the voided tries, and the tokens after the last
        // one are the reply.
        let (outcome, seen) = tokio::time::timeout(Duration::from_secs(30), feed)
            .await
            .expect("the feed reached the outcome")
            .unwrap();
        assert_eq!(outcome.event.as_deref(), Some("completed"), "{outcome:?}");
        let expected = format!("echo: {}", asked.prompt);
        assert_eq!(outcome.json()["text"], expected.as_str());
        let last_reset = seen
            .iter()
            .rposition(|e| e.event.as_deref() == Some("reset"))
            .unwrap_or_else(|| panic!("no reset on the feed: {seen:#?}"));
        let streamed: String = seen[last_reset..]
            .iter()
            .filter(|e| e.event.as_deref() == Some("token"))
            .map(|e| e.json()["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(streamed, expected, "only the last try's tokens count");
    }
    assert_eq!(completions, runs.len(), "one completion per run");
    agent.stop().await;
}
