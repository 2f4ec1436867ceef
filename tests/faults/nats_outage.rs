//! NATS outage: the broker is a fan-out, never the record. Each test runs the whole
//! application (gateway, relay, projector, agent) against a private `nats-server` of
//! its own, crashes it (`kill`, JetStream's files kept) and starts it again on the same
//! port and store (or, once, on an empty store), with real Postgres throughout.
//!
//! Shown here, beyond the fan-out test of the api suite (which writes through the
//! command side directly):
//! - commands through the HTTP API, `run_agent` included, are accepted while NATS is
//!   down: the log is the source of truth;
//! - the read models follow the log during the outage and reach its head after it, the
//!   stream holds each event once, and every run requested during the outage completes
//!   once NATS is back, with exactly one assistant reply;
//! - a run whose Gemini call is under way when NATS goes down completes with that
//!   reply during the outage (Gemini is not called again);
//! - a server that comes back without its JetStream data: the agent makes its consumer
//!   and its budget buckets again, and runs complete;
//! - a process started while NATS is down serves at once, answers runs once NATS is up,
//!   and spends from the shared budget buckets (from its own memory on a 2.9 server,
//!   Debian's `/usr/sbin/nats-server`, which has no key-value store as they need);
//! - a live client connected across the outage keeps receiving (the hub heals from the
//!   log), and one that reconnects with `Last-Event-ID` during the outage gets what the
//!   log has; in the end each has seen every event of its scope once, in position
//!   order, with no gap; the same under steady writes with NATS killed and restarted
//!   three times.

use std::time::Duration;

use colloquy_eventstore::{GlobalPosition, LogFilter, RecordedEvent};
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, Fault};
use colloquy_testkit::NatsServer;
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::metrics::scrape;
use crate::helpers::{
    SseEvent, SseReader, TestApp, TestUser, generation_calls, read_models_reach, spawn_app_with,
};

/// Each wait in these tests: far above what recovery takes, far below nextest's limit.
const BOUND: Duration = Duration::from_secs(60);

/// The application on `nats`, its agent pointed at `fake` when given, once it is ready.
async fn app_on(nats: &NatsServer, fake: Option<&FakeGemini>) -> TestApp {
    let app = spawn_on(nats, fake).await;
    app.wait_until_ready().await;
    app
}

/// As [`app_on`], without waiting for NATS (which may be down).
async fn spawn_on(nats: &NatsServer, fake: Option<&FakeGemini>) -> TestApp {
    let url = nats.url();
    let gemini = fake.map(FakeGemini::base_url);
    spawn_app_with(move |settings| {
        settings.nats_url = Some(url);
        if let Some(base_url) = gemini {
            settings.gemini_base_url = base_url;
            settings.gemini_api_keys =
                Some(SecretString::from("main=fake-key-1@proj-a".to_owned()));
        }
    })
    .await
}

/// A fake Gemini knowing the key [`spawn_on`] configures.
async fn fake_gemini() -> FakeGemini {
    FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap()
}

/// Asks for a run whose reply comes `between_chunks` apart, and waits until the agent
/// is calling Gemini for it. Returns the run's id.
async fn run_under_way(
    app: &TestApp,
    user: &TestUser,
    fake: &FakeGemini,
    between_chunks: Duration,
    text: &str,
) -> String {
    let conversation = app.create_conversation(user).await;
    fake.push_fault(Fault::Latency {
        before_first_byte: Duration::ZERO,
        between_chunks,
    });
    let sent = app.send_message(user, &conversation, text, true).await;
    tokio::time::timeout(BOUND, async {
        while generation_calls(fake) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the agent calls Gemini");
    sent["run_id"].as_str().unwrap().to_owned()
}

/// Starts the application while `nats` is down, asks for a run, brings NATS up, and
/// shows the run answered with one call. Returns the application.
async fn late_start_answers_a_run(nats: &mut NatsServer, fake: &FakeGemini) -> TestApp {
    nats.kill();
    // Every role, NATS out of reach: the process starts and serves all the same.
    let app = spawn_on(nats, Some(fake)).await;
    nats_seen_as(&app, "down").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let sent = app
        .send_message(&user, &conversation, "asked before NATS was up", true)
        .await;
    let run = sent["run_id"].as_str().unwrap().to_owned();

    nats.restart().await;
    nats_seen_as(&app, "up").await;
    let finished = finished_run(&app, &user, &run).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(generation_calls(fake), 1);
    app
}

fn position(body: &Value) -> GlobalPosition {
    body["position"].as_i64().unwrap()
}

/// Every event of the log, in position order.
async fn log(app: &TestApp) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |e: &RecordedEvent| e.global_position);
        let batch = app
            .store
            .read_log(&LogFilter::All, after, 1000)
            .await
            .unwrap();
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
}

/// The global positions of a conversation's own events (what its SSE stream shows).
async fn conversation_positions(app: &TestApp, conversation: &str) -> Vec<GlobalPosition> {
    app.store
        .read_stream(&format!("conversation-{conversation}"), 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect()
}

/// The global positions of every conversation and run event: with one user in the
/// test's database, what that user's `/v1/events` shows.
async fn users_positions(app: &TestApp) -> Vec<GlobalPosition> {
    log(app)
        .await
        .iter()
        .filter(|e| matches!(e.category(), "conversation" | "agentRun"))
        .map(|e| e.global_position)
        .collect()
}

/// A live client that reconnects with `Last-Event-ID` whenever the server ends its
/// stream, as a browser's `EventSource` does; it records every `id:` it receives.
struct LiveClient {
    path: String,
    user: TestUser,
    reader: SseReader,
    /// Where the stream (re)started: the `Last-Event-ID` of the first connection.
    after: Option<GlobalPosition>,
    seen: Vec<GlobalPosition>,
    reconnects: usize,
}

impl LiveClient {
    async fn open(
        app: &TestApp,
        user: &TestUser,
        path: String,
        after: Option<GlobalPosition>,
    ) -> Self {
        let reader = SseReader::new(app.sse(&path, user, after).await);
        Self {
            path,
            user: user.clone(),
            reader,
            after,
            seen: Vec::new(),
            reconnects: 0,
        }
    }

    fn last(&self) -> Option<GlobalPosition> {
        self.seen.last().copied().or(self.after)
    }

    /// Reads until an event at or beyond `position` arrives (bounded).
    async fn read_until(&mut self, app: &TestApp, position: GlobalPosition) {
        tokio::time::timeout(BOUND, async {
            while self.last().is_none_or(|last| last < position) {
                let next = self.reader.next().await;
                self.take(app, next).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: position {position} never arrived; seen {:?}",
                self.path, self.seen
            )
        });
    }

    /// Reads until `stop` is cancelled.
    async fn read_until_stopped(&mut self, app: &TestApp, stop: &CancellationToken) {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = self.reader.next() => next,
            };
            self.take(app, next).await;
        }
    }

    /// Records an event, or reconnects after the end of the stream.
    async fn take(&mut self, app: &TestApp, next: Option<SseEvent>) {
        match next {
            Some(SseEvent { id: Some(id), .. }) => self.seen.push(id.parse().unwrap()),
            Some(_) => {}
            None => {
                self.reconnects += 1;
                let response = app.sse(&self.path, &self.user, self.last()).await;
                self.reader = SseReader::new(response);
            }
        }
    }

    /// Reads until the last of `expected` arrives, then [`LiveClient::assert_saw`].
    async fn reads_exactly(&mut self, app: &TestApp, expected: &[GlobalPosition]) {
        self.read_until(app, *expected.last().unwrap()).await;
        self.assert_saw(expected);
    }

    /// Asserts the client saw exactly `expected` after where it started: every event
    /// once, in position order, no gap.
    fn assert_saw(&self, expected: &[GlobalPosition]) {
        let after = self.after.unwrap_or(GlobalPosition::MIN);
        let expected: Vec<GlobalPosition> =
            expected.iter().copied().filter(|p| *p > after).collect();
        assert_eq!(
            self.seen, expected,
            "{}: every event of the log once, in order ({} reconnects)",
            self.path, self.reconnects
        );
    }
}

/// Waits (bounded) until `/readyz` shows NATS `status` (`up` or `down`): the
/// application has noticed the outage, or its end.
async fn nats_seen_as(app: &TestApp, status: &str) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let body: Value = app.get("/readyz").await.json().await.unwrap();
        if body["checks"]["nats"]["status"] == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NATS never {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) for a run to end; returns how `GET /v1/runs/{id}` shows it.
async fn finished_run(app: &TestApp, user: &TestUser, run: &str) -> Value {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let response = app
            .request(Method::GET, &format!("/v1/runs/{run}"), user)
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::OK {
            let body: Value = response.json().await.unwrap();
            if !matches!(
                body["status"].as_str(),
                Some("queued" | "running" | "retrying")
            ) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} never finished: {body}"
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {run} never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many events of the JetStream stream (waiting, bounded, for the relay to reach
/// `head`).
async fn stream_messages(nats: &NatsServer, app: &TestApp, head: GlobalPosition) -> u64 {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let head = u64::try_from(head).unwrap();
    tokio::time::timeout(BOUND, async {
        loop {
            if let Ok(mut stream) = js.get_stream(app.prefix.to_uppercase()).await
                && let Ok(info) = stream.info().await
                && info.state.messages >= head
            {
                return info.state.messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay republishes what NATS missed")
}

#[tokio::test]
async fn commands_during_a_nats_outage_are_kept_and_everything_catches_up_once_it_returns() {
    let mut nats = NatsServer::start().await;
    let fake = fake_gemini().await;
    let app = app_on(&nats, Some(&fake)).await;
    let user = app.register_and_login().await;
    let first = app.create_conversation(&user).await;
    // Two clients across the outage, each from the start of the log.
    let mut conversation_client = LiveClient::open(
        &app,
        &user,
        format!("/v1/conversations/{first}/events"),
        Some(0),
    )
    .await;
    let mut users_client = LiveClient::open(&app, &user, "/v1/events".into(), Some(0)).await;
    // A run before the outage: the agent works.
    let before = app.send_message(&user, &first, "before", true).await;
    let mut runs = vec![before["run_id"].as_str().unwrap().to_owned()];
    assert_eq!(
        finished_run(&app, &user, &runs[0]).await["status"],
        "succeeded"
    );

    nats.kill();
    nats_seen_as(&app, "down").await;
    // Every command is accepted: the log is the source of truth. One run at a time per
    // conversation: one during the outage in this one, and one in each of two new ones.
    for (text, run_agent) in [("during 1", true), ("during 2", false), ("during 3", false)] {
        let sent = app.send_message(&user, &first, text, run_agent).await;
        if run_agent {
            runs.push(sent["run_id"].as_str().unwrap().to_owned());
        }
    }
    let last_during = *conversation_positions(&app, &first).await.last().unwrap();
    for i in 0..2 {
        let other = app.create_conversation(&user).await;
        let sent = app
            .send_message(&user, &other, &format!("elsewhere {i}"), true)
            .await;
        runs.push(sent["run_id"].as_str().unwrap().to_owned());
    }
    let head_during = app.store.head().await.unwrap();
    // A run stream opened while NATS is down, for a run requested while it is down.
    let mut run_stream = SseReader::new(
        app.sse(&format!("/v1/runs/{}/events", runs[1]), &user, None)
            .await,
    );
    // Still down: the read models follow the log, and the live clients keep receiving
    // (the hub reads what NATS does not bring from the log).
    read_models_reach(&app.db.database().await, head_during, BOUND).await;
    let messages: Value = app
        .request(
            Method::GET,
            &format!("/v1/conversations/{first}/messages"),
            &user,
        )
        .header("X-Colloquy-Min-Position", last_during.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let texts: Vec<&str> = messages["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["author"] == "user")
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["before", "during 1", "during 2", "during 3"]);
    conversation_client.read_until(&app, last_during).await;
    users_client.read_until(&app, head_during).await;
    assert_eq!(
        finished_run(&app, &user, &runs[0]).await["status"],
        "succeeded"
    );

    nats.restart().await;
    nats_seen_as(&app, "up").await;
    let after = app.send_message(&user, &first, "after", false).await;
    // Every run requested during the outage completes, each with one reply.
    for run in &runs {
        let finished = finished_run(&app, &user, run).await;
        assert_eq!(finished["status"], "succeeded", "{finished}");
    }
    let (completed, _) = {
        let mut seen = Vec::new();
        loop {
            let event = run_stream.next().await.expect("the run stream goes on");
            if event.event.as_deref() == Some("completed") {
                break (event, seen);
            }
            seen.push(event);
        }
    };
    assert_eq!(completed.json()["text"], "echo: during 1");
    let events = log(&app).await;
    for run in &runs {
        let replies = replies_to(&events, run);
        assert_eq!(replies, 1, "run {run}: one assistant reply");
        let completions = events
            .iter()
            .filter(|e| {
                e.stream_name == format!("agentRun-{run}") && e.event_type == "RunCompleted"
            })
            .count();
        assert_eq!(completions, 1, "run {run}: completed once");
    }
    // The read models reach the log's head, and the stream holds each event once.
    let head = app.store.head().await.unwrap();
    assert!(head > position(&after));
    read_models_reach(&app.db.database().await, head, BOUND).await;
    assert_eq!(
        stream_messages(&nats, &app, head).await,
        u64::try_from(head).unwrap(),
        "the relay published each event once"
    );
    // The live clients saw each event of their scope once, in order, with no gap.
    let expected = conversation_positions(&app, &first).await;
    conversation_client.reads_exactly(&app, &expected).await;
    let expected = users_positions(&app).await;
    users_client.reads_exactly(&app, &expected).await;
}

#[tokio::test]
async fn a_client_resuming_during_a_nats_outage_gets_what_the_log_has() {
    let mut nats = NatsServer::start().await;
    let app = app_on(&nats, None).await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let path = format!("/v1/conversations/{conversation}/events");
    // A client reads a little, then goes away.
    let mut client = LiveClient::open(&app, &user, path.clone(), None).await;
    let mut last = 0;
    for i in 0..2 {
        last = position(
            &app.send_message(&user, &conversation, &format!("before {i}"), false)
                .await,
        );
    }
    client.read_until(&app, last).await;
    let resume_from = *client.seen.last().unwrap();
    drop(client);

    nats.kill();
    nats_seen_as(&app, "down").await;
    // Written while NATS is down and the client is away.
    for i in 0..3 {
        app.send_message(&user, &conversation, &format!("away {i}"), false)
            .await;
    }
    // It comes back during the outage with Last-Event-ID: the log has it all.
    let mut client = LiveClient::open(&app, &user, path.clone(), Some(resume_from)).await;
    let mut users_client =
        LiveClient::open(&app, &user, "/v1/events".into(), Some(resume_from)).await;
    for i in 0..2 {
        app.send_message(&user, &conversation, &format!("back {i}"), false)
            .await;
    }
    last = *conversation_positions(&app, &conversation)
        .await
        .last()
        .unwrap();
    client.read_until(&app, last).await;
    users_client.read_until(&app, last).await;
    assert_eq!(
        client.seen,
        conversation_positions(&app, &conversation)
            .await
            .into_iter()
            .filter(|p| *p > resume_from)
            .collect::<Vec<_>>(),
        "during the outage, the resumed stream holds the log"
    );

    nats.restart().await;
    nats_seen_as(&app, "up").await;
    for i in 0..2 {
        app.send_message(&user, &conversation, &format!("after {i}"), false)
            .await;
    }
    last = *conversation_positions(&app, &conversation)
        .await
        .last()
        .unwrap();
    client.read_until(&app, last).await;
    users_client.read_until(&app, last).await;
    client.assert_saw(&conversation_positions(&app, &conversation).await);
    users_client.assert_saw(&users_positions(&app).await);
}

/// Waits (bounded) until the agent's durable consumer is on the stream and has taken
/// every run request there.
async fn agent_consumer_drained(nats: &NatsServer, app: &TestApp) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut last = String::new();
    let drained = tokio::time::timeout(BOUND, async {
        loop {
            match js.get_stream(app.prefix.to_uppercase()).await {
                Ok(stream) => match stream.consumer_info("agent").await {
                    Ok(info)
                        if info.delivered.stream_sequence > 0
                            && info.num_pending == 0
                            && info.num_ack_pending == 0 =>
                    {
                        return;
                    }
                    Ok(info) => last = format!("{info:?}"),
                    Err(error) => last = error.to_string(),
                },
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the agent consumes the stream again: {last}"
    );
}

#[tokio::test]
async fn nats_back_without_its_data_is_refilled_and_the_agent_resumes() {
    let mut nats = NatsServer::start().await;
    let fake = fake_gemini().await;
    let app = app_on(&nats, Some(&fake)).await;
    let user = app.register_and_login().await;
    let mut users_client = LiveClient::open(&app, &user, "/v1/events".into(), Some(0)).await;
    let mut runs = Vec::new();
    for when in ["before", "during", "after"] {
        match when {
            "during" => {
                nats.kill();
                nats_seen_as(&app, "down").await;
            }
            "after" => {
                // The server comes back empty: no stream, no consumers, no budget buckets.
                nats.restart_empty().await;
                nats_seen_as(&app, "up").await;
            }
            _ => {}
        }
        let conversation = app.create_conversation(&user).await;
        let sent = app.send_message(&user, &conversation, when, true).await;
        runs.push(sent["run_id"].as_str().unwrap().to_owned());
        if when == "before" {
            assert_eq!(
                finished_run(&app, &user, &runs[0]).await["status"],
                "succeeded"
            );
        }
    }
    // The relay made the stream again and the agent consumes it; the budgets' buckets
    // are made again too, so every run completes, each with one reply.
    for run in &runs {
        let finished = finished_run(&app, &user, run).await;
        assert_eq!(finished["status"], "succeeded", "{finished}");
    }
    agent_consumer_drained(&nats, &app).await;
    let events = log(&app).await;
    for run in &runs {
        let replies = replies_to(&events, run);
        assert_eq!(replies, 1, "run {run}: one assistant reply");
    }
    let head = app.store.head().await.unwrap();
    read_models_reach(&app.db.database().await, head, BOUND).await;
    let expected = users_positions(&app).await;
    users_client.reads_exactly(&app, &expected).await;
}

#[tokio::test]
async fn a_process_started_while_nats_is_down_serves_and_shares_its_budgets_once_it_is_up() {
    let mut nats = NatsServer::start().await;
    let fake = fake_gemini().await;
    let app = late_start_answers_a_run(&mut nats, &fake).await;

    // The call was spent from the budgets every agent shares (the JetStream key-value
    // bucket), not from this process's memory.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let bucket = format!("{}_budgets", app.prefix.to_uppercase());
    let budgets = jetstream
        .get_key_value(bucket.clone())
        .await
        .unwrap_or_else(|e| panic!("no shared budgets bucket {bucket}: {e}"));
    let keys: Vec<String> = futures::TryStreamExt::try_collect(budgets.keys().await.unwrap())
        .await
        .unwrap();
    assert!(
        keys.iter().any(|key| key.contains("proj-a")),
        "the call's spending is shared: {keys:?}"
    );
}

/// How many runs the agent of `app` has handled with `outcome` (its `/metrics`).
async fn runs_handled(app: &TestApp, outcome: &str) -> f64 {
    scrape(app)
        .await
        .find("colloquy_agent_runs_total", &[("outcome", outcome)])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_run_cancelled_while_nats_is_down_stops_its_call() {
    let mut nats = NatsServer::start().await;
    let fake = fake_gemini().await;
    let app = app_on(&nats, Some(&fake)).await;
    let user = app.register_and_login().await;
    // A reply far slower than any wait here: only a cancellation ends the call early.
    let run = run_under_way(&app, &user, &fake, Duration::from_secs(120), "cancel me").await;
    nats.kill();
    nats_seen_as(&app, "down").await;

    // The cancellation is in the log; NATS cannot carry it to the agent.
    let cancelled = app
        .request(Method::POST, &format!("/v1/runs/{run}/cancel"), &user)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    let deadline = tokio::time::Instant::now() + BOUND;
    while runs_handled(&app, "cancelled").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call went on after its run was cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(generation_calls(&fake), 1);
    let finished = finished_run(&app, &user, &run).await;
    assert_eq!(finished["status"], "cancelled", "{finished}");
}

/// Debian 12's nats-server, the oldest release Colloquy keeps working on.
const NATS_2_9: &str = "/usr/sbin/nats-server";

#[tokio::test]
async fn a_process_started_while_an_old_nats_is_down_answers_runs_once_it_is_up() {
    // A 2.9 server has no key-value store as the budgets need: a process that meets one
    // at start keeps its budgets in memory, and so must one that meets it later.
    let mut nats = NatsServer::start_binary(NATS_2_9).await;
    let fake = fake_gemini().await;
    late_start_answers_a_run(&mut nats, &fake).await;
}

#[tokio::test]
async fn a_run_in_flight_when_nats_goes_down_completes_with_the_reply_it_got() {
    let mut nats = NatsServer::start().await;
    let fake = fake_gemini().await;
    let app = app_on(&nats, Some(&fake)).await;
    let user = app.register_and_login().await;
    // A slow reply: NATS goes down while Gemini is answering.
    let run = run_under_way(&app, &user, &fake, Duration::from_secs(1), "in flight").await;
    nats.kill();
    nats_seen_as(&app, "down").await;
    // The reply is in hand and the log is up: the run completes without NATS (its
    // usage could not be recorded in the shared budgets, which is no reason to lose it).
    let finished = finished_run(&app, &user, &run).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(
        nats_seen_as_now(&app).await,
        "down",
        "completed during the outage"
    );
    nats.restart().await;
    nats_seen_as(&app, "up").await;
    // Whatever NATS redelivers changes nothing: one call, one reply.
    agent_consumer_drained(&nats, &app).await;
    assert_eq!(generation_calls(&fake), 1, "Gemini was called once");
    let replies = log(&app)
        .await
        .iter()
        .filter(|e| e.event_type == "MessageSent" && e.data["author"] == "assistant")
        .count();
    assert_eq!(replies, 1);
}

/// The assistant's replies to `run` in the log.
fn replies_to(events: &[RecordedEvent], run: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e.event_type == "MessageSent"
                && e.data["author"] == "assistant"
                && e.data["runId"] == run
        })
        .count()
}

/// The relay's failures so far (`/metrics`).
async fn relay_failures(app: &TestApp) -> u64 {
    let metrics = app.get("/metrics").await.text().await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("colloquy_relay_failures_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// NATS's status on `/readyz` now.
async fn nats_seen_as_now(app: &TestApp) -> String {
    let body: Value = app.get("/readyz").await.json().await.unwrap();
    body["checks"]["nats"]["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_flapping_nats_under_steady_writes_loses_and_repeats_nothing() {
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    // The writer writes faster than the per-user command rate limit allows.
    let app = spawn_app_with(move |settings| {
        settings.nats_url = Some(url);
        settings.commands_per_second = 10_000;
        settings.command_burst = 10_000;
    })
    .await;
    app.wait_until_ready().await;
    let user = app.register_and_login().await;
    let conversations = [
        app.create_conversation(&user).await,
        app.create_conversation(&user).await,
    ];
    let mut conversation_client = LiveClient::open(
        &app,
        &user,
        format!("/v1/conversations/{}/events", conversations[0]),
        Some(0),
    )
    .await;
    let mut users_client = LiveClient::open(&app, &user, "/v1/events".into(), Some(0)).await;
    let stop = CancellationToken::new();
    // A steady writer through the API; every command must be accepted.
    let writer = async {
        let mut sent = 0_usize;
        while !stop.is_cancelled() {
            let conversation = &conversations[sent % 2];
            app.send_message(&user, conversation, &format!("message {sent}"), false)
                .await;
            sent += 1;
            // Steady, not flat out: the machine is shared.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    };
    // NATS killed and restarted three times while the writer writes. Down, the log
    // moves on by some commands; up, the relay catches the stream up with the log and
    // some commands travel through NATS live.
    let flapper = async {
        let moved_on = async |by: i64| {
            let from = app.store.head().await.unwrap();
            tokio::time::timeout(BOUND, async {
                while app.store.head().await.unwrap() < from + by {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the writer keeps writing");
        };
        for _ in 0..3 {
            let failures = relay_failures(&app).await;
            nats.kill();
            nats_seen_as(&app, "down").await;
            moved_on(20).await;
            // Long enough for the relay to give up on NATS, not only to queue.
            tokio::time::timeout(BOUND, async {
                while relay_failures(&app).await == failures {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("the relay notices the outage");
            let missed = app.store.head().await.unwrap();
            nats.restart().await;
            nats_seen_as(&app, "up").await;
            stream_messages(&nats, &app, missed).await;
            moved_on(20).await;
        }
        stop.cancel();
    };
    // The live clients read throughout.
    let (sent, (), (), ()) = tokio::join!(
        writer,
        flapper,
        conversation_client.read_until_stopped(&app, &stop),
        users_client.read_until_stopped(&app, &stop),
    );
    assert!(sent >= 30, "{sent} commands");
    let head = app.store.head().await.unwrap();
    read_models_reach(&app.db.database().await, head, BOUND).await;
    assert_eq!(
        stream_messages(&nats, &app, head).await,
        u64::try_from(head).unwrap(),
        "the relay published each event once"
    );
    let expected = conversation_positions(&app, &conversations[0]).await;
    conversation_client.reads_exactly(&app, &expected).await;
    let expected = users_positions(&app).await;
    users_client.reads_exactly(&app, &expected).await;
}
