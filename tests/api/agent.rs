//! The Gemini agent end to end, against the project's fake Gemini: the chat loop
//! through the gateway (send with `run_agent` → tokens over SSE → `completed` → the
//! reply in the messages read model), the second turn's history, failures that are
//! not retried, retries within an attempt, 504s retried only when configured, another
//! project after a 429, cancellation, no keys, and a redelivered request after
//! completion.

use std::time::Duration;

use colloquy::app::RunsDue;
use colloquy_domain::RunId;
use colloquy_gemini_agent::backoff::{Backoff, RetrySchedule};
use colloquy_gemini_agent::fake::RandomFaults;
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, Fault, ReplyShape};
use colloquy_gemini_agent::gemini::Role;
use colloquy_gemini_agent::worker::{AgentSettings, DEAD_LETTER_PREFIX, Handled, Trigger};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::Value;

use crate::helpers::{
    SseReader, TestApp, TestUser, agent_for, app_without_agent, generation_calls, queued_run,
    run_status, spawn_app_with,
};

/// The application with its agent pointed at `fake`, holding `keys`
/// (`label=key@project,…`; empty for none).
async fn app_with_gemini(fake: &FakeGemini, keys: &str) -> TestApp {
    let base_url = fake.base_url();
    let keys = keys.to_owned();
    spawn_app_with(move |settings| {
        settings.gemini_base_url = base_url;
        settings.gemini_api_keys = (!keys.is_empty()).then(|| SecretString::from(keys));
    })
    .await
}

/// Sends `text` asking for a run; returns the run id and its SSE stream.
async fn ask(
    app: &TestApp,
    user: &TestUser,
    conversation: &str,
    text: &str,
) -> (String, SseReader) {
    let sent = app.send_message(user, conversation, text, true).await;
    let run_id = sent["run_id"].as_str().unwrap().to_owned();
    let events = SseReader::new(
        app.sse(&format!("/v1/runs/{run_id}/events"), user, None)
            .await,
    );
    (run_id, events)
}

/// Reads the run stream to its outcome; returns the outcome event and every event
/// before it.
#[tokio::test]
async fn the_chat_loop_streams_tokens_and_records_the_reply_with_history() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    let app = app_with_gemini(&fake, "main=fake-key-1@proj-a").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;

    let (run_id, mut events) = ask(&app, &user, &conversation, "hello there").await;
    let (completed, before) = events.outcome().await;
    assert_eq!(
        completed.event.as_deref(),
        Some("completed"),
        "{completed:?}"
    );
    let data = completed.json();
    assert_eq!(data["text"], "echo: hello there");
    assert_eq!(data["finishReason"], "STOP");
    let streamed: String = before
        .iter()
        .filter(|e| e.event.as_deref() == Some("token"))
        .map(|e| e.json()["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        streamed, "echo: hello there",
        "the tokens add up to the reply"
    );
    // RunStarted, then the milestones in order, the percent never going back.
    let started = before
        .iter()
        .position(|e| e.event.as_deref() == Some("RunStarted"))
        .unwrap_or_else(|| panic!("no RunStarted: {before:?}"));
    let milestones: Vec<(String, u64)> = before[started..]
        .iter()
        .filter(|e| e.event.as_deref() == Some("RunProgressed"))
        .map(|e| {
            let data = e.json();
            (
                data["stage"].as_str().unwrap().to_owned(),
                data["percent"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut stages: Vec<&str> = milestones.iter().map(|(s, _)| s.as_str()).collect();
    stages.dedup();
    assert_eq!(
        stages,
        [
            "loading_context",
            "waiting_for_model",
            "streaming",
            "saving"
        ],
        "{milestones:?}"
    );
    assert!(
        milestones.windows(2).all(|w| w[0].1 <= w[1].1),
        "{milestones:?}"
    );
    // The key went in the header, never the URL.
    let request = fake.requests().pop().unwrap();
    assert_eq!(request.api_key.as_deref(), Some("fake-key-1"));
    assert!(!request.key_in_query);

    let messages = app
        .messages_at(&user, &conversation, completed.position())
        .await;
    let reply = messages.last().unwrap();
    assert_eq!(reply["author"], "assistant");
    assert_eq!(reply["text"], "echo: hello there");
    assert_eq!(reply["run_id"], run_id.as_str());

    // The second turn carries the first as history, the reply as a `model` turn.
    let (_, mut events) = ask(&app, &user, &conversation, "and again").await;
    let (completed, _) = events.outcome().await;
    assert_eq!(completed.json()["text"], "echo: and again");
    let sent = fake.requests().pop().unwrap().request.unwrap();
    let turns: Vec<(Option<Role>, String)> =
        sent.contents.iter().map(|c| (c.role, c.text())).collect();
    assert_eq!(
        turns,
        [
            (Some(Role::User), "hello there".to_owned()),
            (Some(Role::Model), "echo: hello there".to_owned()),
            (Some(Role::User), "and again".to_owned()),
        ]
    );
    let run: Value = app
        .request(Method::GET, &format!("/v1/runs/{run_id}"), &user)
        .header("X-Colloquy-Min-Position", completed.position().to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["attempts"], 1);
}

#[tokio::test]
async fn without_keys_a_run_fails_at_once_saying_so() {
    let fake = FakeGemini::start(FakeConfig::default()).await.unwrap();
    let app = app_with_gemini(&fake, "").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (_, mut events) = ask(&app, &user, &conversation, "anyone?").await;
    let (failed, _) = events.outcome().await;
    assert_eq!(failed.event.as_deref(), Some("failed"));
    assert_eq!(failed.json()["reason"], "no Gemini API keys configured");
    assert_eq!(generation_calls(&fake), 0);
}

#[tokio::test]
async fn a_blocked_prompt_fails_the_run_without_a_retry() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.push_fault(Fault::PromptBlocked);
    let app = app_with_gemini(&fake, "main=fake-key-1@proj-a").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (_, mut events) = ask(&app, &user, &conversation, "something unsafe").await;
    let (failed, _) = events.outcome().await;
    assert_eq!(failed.event.as_deref(), Some("failed"), "{failed:?}");
    let reason = failed.json()["reason"].as_str().unwrap().to_lowercase();
    assert!(reason.contains("block"), "{reason}");
    assert_eq!(
        generation_calls(&fake),
        1,
        "a blocked prompt is not retried"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_within_the_attempt_with_a_reset() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.push_fault(Fault::Overloaded);
    fake.push_fault(Fault::DropMidStream);
    let app = app_with_gemini(&fake, "main=fake-key-1@proj-a").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (run_id, mut events) = ask(&app, &user, &conversation, "try hard").await;
    let (completed, before) = events.outcome().await;
    assert_eq!(
        completed.event.as_deref(),
        Some("completed"),
        "{completed:?}"
    );
    assert_eq!(completed.json()["text"], "echo: try hard");
    assert_eq!(generation_calls(&fake), 3);
    assert!(
        before.iter().any(|e| e.event.as_deref() == Some("reset")),
        "tokens went out before the drop, so the client is told to start over: {before:?}"
    );
    let messages = app
        .messages_at(&user, &conversation, completed.position())
        .await;
    let replies: Vec<&Value> = messages
        .iter()
        .filter(|m| m["run_id"] == run_id.as_str())
        .collect();
    assert_eq!(replies.len(), 1, "one reply, however many tries");
}

#[tokio::test]
async fn a_504_fails_the_run_unless_retrying_timeouts_is_set() {
    for retry_timeouts in [false, true] {
        let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
            .await
            .unwrap();
        fake.push_fault(Fault::DeadlineExceeded);
        let base_url = fake.base_url();
        let app = spawn_app_with(move |settings| {
            settings.gemini_base_url = base_url;
            settings.gemini_api_keys = Some(SecretString::from("main=fake-key-1@proj-a"));
            settings.gemini_retry_timeouts = retry_timeouts;
        })
        .await;
        let user = app.register_and_login().await;
        let conversation = app.create_conversation(&user).await;
        let (_, mut events) = ask(&app, &user, &conversation, "take your time").await;
        let (outcome, _) = events.outcome().await;
        if retry_timeouts {
            assert_eq!(outcome.event.as_deref(), Some("completed"), "{outcome:?}");
            assert_eq!(outcome.json()["text"], "echo: take your time");
            assert_eq!(generation_calls(&fake), 2, "the 504 was retried once");
        } else {
            assert_eq!(outcome.event.as_deref(), Some("failed"), "{outcome:?}");
            assert_eq!(
                generation_calls(&fake),
                1,
                "a 504 may be billed: not retried"
            );
        }
    }
}

#[tokio::test]
async fn a_rate_limited_project_hands_the_call_to_another_project() {
    let fake = FakeGemini::start(
        FakeConfig::default()
            .key("fake-key-a", "proj-a")
            .key("fake-key-b", "proj-b"),
    )
    .await
    .unwrap();
    fake.push_fault(Fault::RateLimited {
        per_day: false,
        retry_after: Duration::from_secs(30),
    });
    let app = app_with_gemini(&fake, "a=fake-key-a@proj-a,b=fake-key-b@proj-b").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (_, mut events) = ask(&app, &user, &conversation, "busy?").await;
    let (completed, _) = events.outcome().await;
    assert_eq!(
        completed.event.as_deref(),
        Some("completed"),
        "{completed:?}"
    );
    let keys: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.action.as_deref() == Some("streamGenerateContent"))
        .map(|r| r.api_key.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1], "the second call used the other project");
}

#[tokio::test]
async fn cancelling_stops_the_call_and_records_no_reply() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.set_reply_shape(ReplyShape {
        chunks: 6,
        chunk_delay: Duration::from_secs(5),
        ..ReplyShape::default()
    });
    let app = app_with_gemini(&fake, "main=fake-key-1@proj-a").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (run_id, mut events) = ask(&app, &user, &conversation, "a long one").await;
    // The call is under way once the first token arrives.
    events.next_of("token").await;
    let cancel = app
        .request(Method::POST, &format!("/v1/runs/{run_id}/cancel"), &user)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    let (cancelled, _) = events.outcome().await;
    assert_eq!(cancelled.event.as_deref(), Some("cancelled"));
    let messages = app
        .messages_at(&user, &conversation, cancelled.position())
        .await;
    assert!(
        messages.iter().all(|m| m["author"] == "user"),
        "no reply after a cancel: {messages:?}"
    );
}

#[tokio::test]
async fn a_redelivered_request_after_completion_does_not_call_gemini() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    let app = app_with_gemini(&fake, "main=fake-key-1@proj-a").await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let (run_id, mut events) = ask(&app, &user, &conversation, "once").await;
    let (completed, _) = events.outcome().await;
    assert_eq!(completed.event.as_deref(), Some("completed"));
    let calls = generation_calls(&fake);

    // A second agent gets the same request again.
    let agent = agent_for(&app, &fake, AgentSettings::default()).await;
    let run = RunId::from_uuid(run_id.parse().unwrap());
    for trigger in [Trigger::Redelivered, Trigger::Sweep] {
        let handled = agent.handle(run, trigger).await.unwrap();
        assert_eq!(handled, Handled::Skipped("already settled"));
    }
    assert_eq!(generation_calls(&fake), calls, "no second call");
}

#[tokio::test]
async fn the_sweep_recovers_a_request_that_never_started() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let run = queued_run(&app, &user).await;
    // Its message is lost (no agent consumed it); the sweep finds it in the read model.
    let agent = agent_for(
        &app,
        &fake,
        AgentSettings {
            lost_after: Duration::ZERO,
            ..AgentSettings::default()
        },
    )
    .await;
    let swept = agent
        .sweep(&RunsDue(app.db.database().await))
        .await
        .unwrap();
    assert_eq!(swept, [(run, Handled::Completed)]);
    assert_eq!(run_status(&app, &user, run).await["status"], "succeeded");
    assert!(
        agent
            .sweep(&RunsDue(app.db.database().await))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn retries_escalate_and_end_in_a_dead_letter() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.set_random_faults(Some(RandomFaults {
        seed: 7,
        probability: 1.0,
        faults: vec![Fault::Internal],
    }));
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let run = queued_run(&app, &user).await;
    let agent = agent_for(
        &app,
        &fake,
        AgentSettings {
            retry_delays: RetrySchedule::new(vec![
                Duration::from_millis(1),
                Duration::from_millis(1),
            ]),
            backoff: Backoff {
                max_tries: 2,
                base: Duration::from_millis(1),
                ..Backoff::default()
            },
            ..AgentSettings::default()
        },
    )
    .await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        // Each pass comes once the (1 ms) not-before time has passed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let handled = loop {
            match agent.handle(run, Trigger::Sweep).await.unwrap() {
                Handled::Skipped("not due yet") => {
                    assert!(tokio::time::Instant::now() < deadline, "never due");
                    tokio::task::yield_now().await;
                }
                handled => break handled,
            }
        };
        outcomes.push(handled);
    }
    assert!(matches!(outcomes[0], Handled::Retrying(_)), "{outcomes:?}");
    assert!(matches!(outcomes[1], Handled::Retrying(_)), "{outcomes:?}");
    let Handled::Failed(reason) = &outcomes[2] else {
        panic!("{outcomes:?}");
    };
    assert!(reason.starts_with(DEAD_LETTER_PREFIX), "{reason}");
    assert_eq!(generation_calls(&fake), 6, "three attempts of two tries");
    let status = run_status(&app, &user, run).await;
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["attempts"], 3);
    // Settled: nothing more happens.
    assert_eq!(
        agent.handle(run, Trigger::Redelivered).await.unwrap(),
        Handled::Skipped("already settled")
    );
}

#[tokio::test]
async fn an_agent_killed_mid_call_leaves_a_run_that_completes_once() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.set_reply_shape(ReplyShape {
        chunks: 4,
        chunk_delay: Duration::from_secs(30),
        ..ReplyShape::default()
    });
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let run = queued_run(&app, &user).await;
    let doomed = agent_for(&app, &fake, AgentSettings::default()).await;
    let call = tokio::spawn(async move { doomed.handle(run, Trigger::Delivered).await });
    // Killed once the call is under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while generation_calls(&fake) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    assert_eq!(run_status(&app, &user, run).await["status"], "running");

    // Its message is redelivered to another agent, which takes the run over.
    fake.set_reply_shape(ReplyShape::default());
    let rescuer = agent_for(&app, &fake, AgentSettings::default()).await;
    assert_eq!(
        rescuer.handle(run, Trigger::Delivered).await.unwrap(),
        Handled::Skipped("another agent is running it"),
        "a first delivery never takes over a running attempt"
    );
    assert_eq!(
        rescuer.handle(run, Trigger::Redelivered).await.unwrap(),
        Handled::Completed
    );
    assert_eq!(
        rescuer.handle(run, Trigger::Redelivered).await.unwrap(),
        Handled::Skipped("already settled")
    );
    let status = run_status(&app, &user, run).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 2);
    let conversation = status["conversation_id"].as_str().unwrap().to_owned();
    // The run's last event is the messages read model's mark too (it may trail the runs
    // one by a batch).
    let messages = app
        .messages_at(&user, &conversation, status["position"].as_i64().unwrap())
        .await;
    let replies = messages
        .iter()
        .filter(|m| m["author"] == "assistant")
        .count();
    assert_eq!(replies, 1, "{messages:?}");
}
