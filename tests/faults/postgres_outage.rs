//! Postgres outages, made for one test by a fault-injecting proxy between the
//! application and the shared server (`colloquy_testkit::proxy`): refused (a stopped
//! server: connections closed, new ones refused) and black-holed (a partition:
//! connections open, nothing answers).
//!
//! Under a steady workload of keyed commands (`Idempotency-Key`): each writer starts a
//! conversation, then sends a message that requests a run (one append over two
//! streams: the conversation's and the run's). Each test shows:
//! - during the outage, commands and queries fail within a bound with 503
//!   problem+json and `Retry-After`, never a 500 and never a hang; `/readyz` is 503;
//! - nothing is half-written: every command is in the log entirely (a message and its
//!   run's request) or not at all, and retrying each failed one with its key after
//!   recovery leaves exactly one copy;
//! - everything recovers by itself: new commands succeed, `/readyz` is 200 again, the
//!   read models reach the log's head, the relay publishes the whole log, and the agent
//!   settles every run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use colloquy_testkit::proxy::{Fault, FaultProxy};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::helpers::{TestApp, TestUser, spawn_app_with};

/// Writers sending commands concurrently.
const WRITERS: usize = 4;
/// The longest any request may take, outage or not: the gateway's request timeout
/// (30 s) answers whatever is still waiting, with slack for a loaded machine.
const NEVER_LONGER: Duration = Duration::from_secs(40);
/// The longest a request started once the outage is in place may take, well inside the
/// request timeout: the pool's acquire timeout (5 s) bounds getting a connection, for
/// a command's group-commit batch and for the batch ahead of it, or the write bound
/// (10 s) a batch caught mid-write by a black hole, with slack.
const FAIL_FAST: Duration = Duration::from_secs(20);

/// The application with its Postgres traffic through a proxy of the test's own.
async fn app_behind_proxy() -> (TestApp, FaultProxy) {
    let proxy = FaultProxy::in_front_of(&colloquy_testkit::admin_url()).await;
    let app = spawn_app_with(|settings| {
        let url = settings
            .database_url
            .as_ref()
            .expect("an external-mode database")
            .expose_secret()
            .to_owned();
        settings.database_url = Some(SecretString::from(proxy.proxied_url(&url)));
        // The writers would otherwise be rate limited, which is not the fault here.
        settings.commands_per_second = 10_000;
        settings.command_burst = 10_000;
    })
    .await;
    (app, proxy)
}

/// What one command attempt got.
#[derive(Debug, Clone)]
struct Outcome {
    status: StatusCode,
    body: Value,
}

impl Outcome {
    fn created(&self) -> bool {
        self.status == StatusCode::CREATED
    }
}

/// Sends `body` to `path` with `key`: a 201, or a 503 problem+json with `Retry-After`;
/// panics on anything else or if it takes longer than `bound`.
async fn keyed(
    app: &TestApp,
    user: &TestUser,
    path: &str,
    key: &str,
    body: Value,
    bound: Duration,
) -> Outcome {
    let request = app
        .request(Method::POST, path, user)
        .header("Idempotency-Key", key)
        .json(&body);
    let started = Instant::now();
    let response = tokio::time::timeout(bound, request.send())
        .await
        .unwrap_or_else(|_| panic!("command {key} still unanswered after {bound:?}"))
        .unwrap();
    let status = response.status();
    let unavailable = unavailable_problem(&response);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(
        status == StatusCode::CREATED || unavailable,
        "command {key}: {status} after {:?}: {body}",
        started.elapsed()
    );
    Outcome { status, body }
}

/// Starts the conversation of pair `n` (key `c-…`).
async fn start_conversation(app: &TestApp, user: &TestUser, n: &str, bound: Duration) -> Outcome {
    let body = json!({ "title": format!("pair {n}") });
    keyed(
        app,
        user,
        "/v1/conversations",
        &format!("c-{n}"),
        body,
        bound,
    )
    .await
}

/// Sends pair `n`'s message, requesting a run (key `m-…`).
async fn send_with_run(
    app: &TestApp,
    user: &TestUser,
    conversation: &str,
    n: &str,
    bound: Duration,
) -> Outcome {
    let body = json!({ "text": format!("message {n}"), "run_agent": true });
    let path = format!("/v1/conversations/{conversation}/messages");
    keyed(app, user, &path, &format!("m-{n}"), body, bound).await
}

/// Whether a response is a 503 problem+json with `Retry-After`.
fn unavailable_problem(response: &reqwest::Response) -> bool {
    let headers = response.headers();
    response.status() == StatusCode::SERVICE_UNAVAILABLE
        && headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default() == "application/problem+json")
        && headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|secs| secs >= 1)
}

/// One writer's step: a conversation and a message in it, each with its outcome (no
/// message when the conversation failed).
#[derive(Debug, Clone)]
struct Pair {
    conversation: Outcome,
    message: Option<Outcome>,
}

impl Pair {
    fn done(&self) -> bool {
        self.conversation.created() && self.message.as_ref().is_some_and(Outcome::created)
    }
}

/// The workload: writers running pairs until told to stop.
#[derive(Debug, Default)]
struct Workload {
    pairs: Mutex<BTreeMap<String, Pair>>,
    stop: AtomicBool,
}

impl Workload {
    async fn count(&self, done: bool) -> usize {
        self.pairs
            .lock()
            .await
            .values()
            .filter(|p| p.done() == done)
            .count()
    }

    async fn wait_for(&self, done: bool, at_least: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(45);
        while self.count(done).await < at_least {
            assert!(
                Instant::now() < deadline,
                "{what}: never {at_least} pairs with done = {done}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn start_writers(
    app: &Arc<TestApp>,
    user: &TestUser,
    workload: &Arc<Workload>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|writer| {
            let (app, user, workload) = (Arc::clone(app), user.clone(), Arc::clone(workload));
            tokio::spawn(async move {
                let mut i = 0;
                while !workload.stop.load(Ordering::Relaxed) {
                    let n = format!("{writer}-{i:04}");
                    let conversation = start_conversation(&app, &user, &n, NEVER_LONGER).await;
                    let message = match conversation.body["id"].as_str() {
                        Some(id) if conversation.created() => {
                            Some(send_with_run(&app, &user, id, &n, NEVER_LONGER).await)
                        }
                        _ => None,
                    };
                    let pair = Pair {
                        conversation,
                        message,
                    };
                    let done = pair.done();
                    workload.pairs.lock().await.insert(n, pair);
                    i += 1;
                    if !done {
                        // A client backing off as Retry-After asks (shortened).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect()
}

/// One request made during the outage: it must be a 503 problem+json with
/// `Retry-After` within `FAIL_FAST`.
async fn assert_unavailable(what: &str, request: reqwest::RequestBuilder) {
    let started = Instant::now();
    let response = tokio::time::timeout(FAIL_FAST, request.send())
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {FAIL_FAST:?} during the outage"))
        .unwrap();
    let elapsed = started.elapsed();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let problem = unavailable_problem(&response);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(
        problem,
        "{what}: expected 503 problem+json with Retry-After, got {status} ({retry_after:?}) after {elapsed:?}: {body}"
    );
    assert_eq!(body["code"], "unavailable", "{what}: {body}");
}

/// Every kind of request the outage must answer fast with 503, in parallel.
async fn assert_requests_fail_fast(
    app: &TestApp,
    user: &TestUser,
    conversation: &str,
    run: &str,
    head: i64,
) {
    let messages = format!("/v1/conversations/{conversation}/messages");
    let checks = vec![
        (
            "create a conversation",
            app.request(Method::POST, "/v1/conversations", user)
                .json(&json!({ "title": "during the outage" })),
        ),
        (
            "send a message",
            app.request(Method::POST, &messages, user)
                .json(&json!({ "text": "anyone?" })),
        ),
        (
            "send a message with an Idempotency-Key",
            app.request(Method::POST, &messages, user)
                .header("Idempotency-Key", "during-the-outage")
                .json(&json!({ "text": "anyone?", "run_agent": true })),
        ),
        (
            "list conversations",
            app.request(Method::GET, "/v1/conversations", user),
        ),
        ("list messages", app.request(Method::GET, &messages, user)),
        (
            "list messages after a position wait",
            app.request(Method::GET, &messages, user)
                .header("X-Colloquy-Min-Position", head.to_string()),
        ),
        (
            "show a run",
            app.request(Method::GET, &format!("/v1/runs/{run}"), user),
        ),
        (
            "log in",
            app.client
                .post(app.url("/v1/auth/login"))
                .json(&json!({ "email": user.email, "password": "correct horse battery staple" })),
        ),
    ];
    futures::future::join_all(
        checks
            .into_iter()
            .map(|(what, request)| assert_unavailable(what, request)),
    )
    .await;
}

/// `/readyz` says Postgres is down (503) within a bound, until it does.
async fn wait_until_not_ready(app: &TestApp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = tokio::time::timeout(Duration::from_secs(10), app.get("/readyz"))
            .await
            .expect("/readyz answers within 10 s (each probe has 2 s)");
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(body["status"], "not_ready", "{body}");
            assert_eq!(body["checks"]["postgres"]["status"], "down", "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The outage scenario with `fault`.
async fn outage_and_recovery(fault: Fault) {
    let (app, proxy) = app_behind_proxy().await;
    let app = Arc::new(app);
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let first = app
        .send_message(&user, &conversation, "before the outage", true)
        .await;
    let run = first["run_id"].as_str().unwrap().to_owned();
    let position = first["position"].as_i64().unwrap();
    app.wait_until_ready().await;

    let workload = Arc::new(Workload::default());
    let writers = start_writers(&app, &user, &workload);
    workload.wait_for(true, 10, "before the outage").await;

    // The outage, while commands are in flight.
    proxy.set(fault);
    wait_until_not_ready(&app).await;
    workload
        .wait_for(false, 2 * WRITERS, "during the outage")
        .await;
    assert_requests_fail_fast(&app, &user, &conversation, &run, position).await;

    // Postgres is back: the application recovers without a restart.
    let done_before = workload.count(true).await;
    proxy.set(Fault::None);
    app.wait_until_ready().await;
    workload
        .wait_for(true, done_before + 10, "after the outage")
        .await;
    workload.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    // Every pair that failed is retried with its keys: it goes through, once.
    let pairs = workload.pairs.lock().await.clone();
    let failed: Vec<&String> = pairs
        .iter()
        .filter(|(_, pair)| !pair.done())
        .map(|(n, _)| n)
        .collect();
    assert!(!failed.is_empty(), "the outage failed no command");
    let mut committed: BTreeMap<String, (Value, Value)> = BTreeMap::new();
    for (n, pair) in &pairs {
        if pair.done() {
            let message = pair.message.as_ref().unwrap().body.clone();
            committed.insert(n.clone(), (pair.conversation.body.clone(), message));
            continue;
        }
        let started = start_conversation(&app, &user, n, FAIL_FAST).await;
        assert!(started.created(), "retry of conversation {n}: {started:?}");
        if pair.conversation.created() {
            assert_eq!(started.body["id"], pair.conversation.body["id"], "{n}");
        }
        let id = started.body["id"].as_str().unwrap();
        let sent = send_with_run(&app, &user, id, n, FAIL_FAST).await;
        assert!(sent.created(), "retry of message {n}: {sent:?}");
        committed.insert(n.clone(), (started.body, sent.body));
    }
    // A repeat of an accepted command is the same command.
    let (n, (conversation_body, message_body)) = committed.iter().next().unwrap();
    let id = conversation_body["id"].as_str().unwrap();
    let repeat = send_with_run(&app, &user, id, n, FAIL_FAST).await;
    assert!(repeat.created());
    assert_eq!(repeat.body["message_id"], message_body["message_id"], "{n}");
    assert_eq!(repeat.body["run_id"], message_body["run_id"], "{n}");

    let mut expected: Vec<Expected> = committed
        .values()
        .map(|(conversation, message)| Expected::of(conversation["id"].clone(), message))
        .collect();
    expected.push(Expected::of(json!(conversation), &first));
    assert_log_holds_each_command_once(&app, &expected).await;
    assert_everything_catches_up(&app, &user, &expected).await;
    drop(proxy);
}

/// One committed pair: its conversation, message and run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expected {
    conversation: String,
    message: String,
    run: String,
}

impl Expected {
    fn of(conversation: Value, message: &Value) -> Self {
        let text = |v: &Value| v.as_str().unwrap().to_owned();
        Self {
            conversation: text(&conversation),
            message: text(&message["message_id"]),
            run: text(&message["run_id"]),
        }
    }
}

/// The log holds each command whole and once: each conversation started once, its
/// message sent once, its run requested once for that message; no message without its
/// run, no run without its message, nothing else.
async fn assert_log_holds_each_command_once(app: &TestApp, expected: &[Expected]) {
    let pool = app.db.pool().await;
    let started: Vec<String> = sqlx::query_scalar(
        "SELECT message_store.id(stream_name) FROM message_store.messages
          WHERE message_store.category(stream_name) = 'conversation'
            AND type = 'ConversationStarted'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sent: Vec<(String, String)> = sqlx::query_as(
        "SELECT message_store.id(stream_name), data->>'messageId' FROM message_store.messages
          WHERE message_store.category(stream_name) = 'conversation' AND type = 'MessageSent'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let requested: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT data->>'conversationId', data->>'promptMessageId', message_store.id(stream_name)
           FROM message_store.messages
          WHERE message_store.category(stream_name) = 'agentRun' AND type = 'RunRequested'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();

    let mut started_sorted = started.clone();
    started_sorted.sort();
    let mut expected_started: Vec<String> =
        expected.iter().map(|e| e.conversation.clone()).collect();
    expected_started.sort();
    assert_eq!(started_sorted, expected_started, "conversations started");

    let mut sent_sorted = sent.clone();
    sent_sorted.sort();
    let mut expected_sent: Vec<(String, String)> = expected
        .iter()
        .map(|e| (e.conversation.clone(), e.message.clone()))
        .collect();
    expected_sent.sort();
    assert_eq!(sent_sorted, expected_sent, "messages sent");

    let mut requested_sorted = requested.clone();
    requested_sorted.sort();
    let mut expected_requested: Vec<(String, String, String)> = expected
        .iter()
        .map(|e| (e.conversation.clone(), e.message.clone(), e.run.clone()))
        .collect();
    expected_requested.sort();
    assert_eq!(requested_sorted, expected_requested, "runs requested");
}

/// After recovery: the read models reach the log's head (a position wait, then every
/// conversation as the API lists it, with its one message), the relay has published the
/// whole log, and the agent has settled every run.
async fn assert_everything_catches_up(app: &TestApp, user: &TestUser, expected: &[Expected]) {
    let head = app.store.head().await.unwrap();
    let mut listed = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/conversations?limit=200".to_owned();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let response = app
            .request(Method::GET, &path, user)
            .header("X-Colloquy-Min-Position", head.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "the conversations at the head"
        );
        let page: Value = response.json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            let id = item["id"].as_str().unwrap().to_owned();
            assert!(
                listed.insert(id, item.clone()).is_none(),
                "listed twice: {item}"
            );
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let ids: BTreeSet<&String> = listed.keys().collect();
    let expected_ids: BTreeSet<&String> = expected.iter().map(|e| &e.conversation).collect();
    assert_eq!(ids, expected_ids, "the conversations listed");
    for item in listed.values() {
        assert_eq!(item["message_count"], 1, "{item}");
    }

    let pool = app.db.pool().await;
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM message_store.messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    let nats = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = js.get_stream(app.prefix.to_uppercase()).await.unwrap();
        let published = stream.info().await.unwrap().state.messages;
        // The agent may still be appending (it fails each run: no Gemini keys), so the
        // log can only have grown since it was counted.
        if published >= u64::try_from(logged).unwrap() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay published {published} of {logged} events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent (no keys configured: it fails each run, saying so) settles every run,
    // those requested during the outage included.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (total, open): (i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed', 'cancelled'))
               FROM rm_runs.runs",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if open == 0 && total == i64::try_from(expected.len()).unwrap() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {total} runs still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stopped server: open connections closed, new ones refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_postgres_fails_fast_loses_nothing_and_recovers() {
    outage_and_recovery(Fault::Refuse).await;
}

/// A partition: connections stay open and new ones are accepted, but nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn black_holed_postgres_fails_fast_loses_nothing_and_recovers() {
    outage_and_recovery(Fault::BlackHole).await;
}
