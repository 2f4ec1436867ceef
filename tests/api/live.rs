//! The live feed (SSE): delivery, resume without gap or duplicate, ownership, run
//! streams with tokens, the per-user cap, healing from the log, and shutdown.

use std::collections::BTreeSet;

use colloquy::Role;
use colloquy_commands::live::{RunSignal, RunSignals};
use reqwest::{Method, StatusCode};

use crate::helpers::{SseReader, TestApp, spawn_app, spawn_app_with, spawn_app_with_roles};

fn position(body: &serde_json::Value) -> i64 {
    body["position"].as_i64().unwrap()
}

#[tokio::test]
async fn a_conversation_stream_delivers_new_events_with_positions_as_ids() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let mut events = SseReader::new(
        app.sse(
            &format!("/v1/conversations/{conversation}/events"),
            &user,
            None,
        )
        .await,
    );
    let sent = app
        .send_message(&user, &conversation, "<b>hello</b> 'live' 🎉", false)
        .await;
    let event = events.next_of("MessageSent").await;
    assert_eq!(event.position(), position(&sent));
    let data = event.json();
    assert_eq!(data["text"], "<b>hello</b> 'live' 🎉");
    assert_eq!(data["messageId"], sent["message_id"]);
    assert_eq!(data["conversationId"], conversation.as_str());
    assert_eq!(data["author"], "user");
}

#[tokio::test]
async fn resuming_with_last_event_id_misses_nothing_and_repeats_nothing() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let path = format!("/v1/conversations/{conversation}/events");
    let mut events = SseReader::new(app.sse(&path, &user, None).await);
    let mut positions = Vec::new();
    for i in 0..3 {
        let sent = app
            .send_message(&user, &conversation, &format!("before {i}"), false)
            .await;
        positions.push(position(&sent));
    }
    let first = events.next_of("MessageSent").await;
    assert_eq!(first.position(), positions[0]);
    drop(events);
    // Written while the client is away, and after it reconnects.
    for i in 0..3 {
        let sent = app
            .send_message(&user, &conversation, &format!("away {i}"), false)
            .await;
        positions.push(position(&sent));
    }
    let mut events = SseReader::new(app.sse(&path, &user, Some(first.position())).await);
    for i in 0..2 {
        let sent = app
            .send_message(&user, &conversation, &format!("after {i}"), false)
            .await;
        positions.push(position(&sent));
    }
    let mut seen = Vec::new();
    while seen.len() < positions.len() - 1 {
        let event = events.next_of("MessageSent").await;
        seen.push(event.position());
    }
    assert_eq!(
        seen,
        positions[1..],
        "every message after the resume point, once, in order"
    );
}

#[tokio::test]
async fn another_users_streams_are_404_and_a_bad_last_event_id_is_400() {
    let app = spawn_app().await;
    let owner = app.register_and_login().await;
    let other = app.register_and_login().await;
    let conversation = app.create_conversation(&owner).await;
    let run = app
        .request(
            Method::POST,
            &format!("/v1/conversations/{conversation}/messages"),
            &owner,
        )
        .json(&serde_json::json!({ "text": "hi", "run_agent": true }))
        .send()
        .await
        .unwrap();
    let run_id = run.json::<serde_json::Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        format!("/v1/conversations/{conversation}/events"),
        format!("/v1/runs/{run_id}/events"),
        format!("/v1/conversations/{}/events", uuid::Uuid::new_v4()),
        "/v1/runs/not-a-uuid/events".to_owned(),
    ] {
        let response = app.sse(&path, &other, None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let response = app
        .client
        .get(app.url(&format!("/v1/conversations/{conversation}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .request(Method::GET, "/v1/events", &owner)
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_users_stream_carries_only_their_own_conversations() {
    let app = spawn_app().await;
    let alice = app.register_and_login().await;
    let bob = app.register_and_login().await;
    let mut events = SseReader::new(app.sse("/v1/events", &alice, None).await);
    let bobs = app.create_conversation(&bob).await;
    app.send_message(&bob, &bobs, "bob's secret", false).await;
    let alices = app.create_conversation(&alice).await;
    let sent = app.send_message(&alice, &alices, "alice here", false).await;
    let mut seen = Vec::new();
    loop {
        let event = events.next().await.unwrap();
        let data = event.json();
        assert_eq!(data["conversationId"], alices.as_str(), "{data}");
        seen.push(event.event.clone().unwrap());
        if event.position() == position(&sent) {
            break;
        }
    }
    assert_eq!(seen, ["ConversationStarted", "MessageSent"]);
}

#[tokio::test]
async fn a_run_stream_replays_the_run_relays_tokens_and_ends_with_the_outcome() {
    // No agent: the test plays its part (tokens, then a cancel).
    let app = crate::helpers::app_without_agent().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let sent = app
        .send_message(&user, &conversation, "answer me", true)
        .await;
    let run_id = sent["run_id"].as_str().unwrap().to_owned();
    let mut events = SseReader::new(
        app.sse(&format!("/v1/runs/{run_id}/events"), &user, None)
            .await,
    );
    // Subscribed after the request, yet the request is there.
    let requested = events.next_of("RunRequested").await;
    assert_eq!(requested.json()["runId"], run_id.as_str());
    // Token deltas ride core NATS (in memory in the embedded mode) and carry no id.
    let signals = match &app.signals {
        Some(local) => RunSignals::Local(local.clone()),
        None => RunSignals::Nats {
            client: async_nats::connect(colloquy_testkit::nats_url())
                .await
                .unwrap(),
            prefix: app.prefix.clone(),
        },
    };
    for signal in [
        RunSignal::Token {
            attempt: 1,
            text: "Hel".into(),
        },
        RunSignal::Reset { attempt: 2 },
    ] {
        signals.publish(run_id.parse().unwrap(), &signal).await;
    }
    if let RunSignals::Nats { client, .. } = &signals {
        client.flush().await.unwrap();
    }
    let token = events.next_of("token").await;
    assert_eq!(token.id, None);
    assert_eq!(
        token.json(),
        serde_json::json!({ "attempt": 1, "text": "Hel" })
    );
    let reset = events.next_of("reset").await;
    assert_eq!(reset.json()["attempt"], 2);
    let cancel = app
        .request(Method::POST, &format!("/v1/runs/{run_id}/cancel"), &user)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    let cancelled = events.next_of("cancelled").await;
    assert_eq!(cancelled.json()["runId"], run_id.as_str());
    assert!(
        events.next().await.is_none(),
        "the stream ends after the outcome"
    );
}

#[tokio::test]
async fn streams_per_user_are_capped_with_429() {
    let app = spawn_app_with(|settings| settings.sse_max_streams_per_user = 2).await;
    let user = app.register_and_login().await;
    let other = app.register_and_login().await;
    let _one = app.sse("/v1/events", &user, None).await;
    let _two = app.sse("/v1/events", &user, None).await;
    let third = app.sse("/v1/events", &user, None).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    let others = app.sse("/v1/events", &other, None).await;
    assert_eq!(others.status(), StatusCode::OK, "the cap is per user");
}

#[tokio::test]
async fn without_the_relay_the_feed_follows_the_log() {
    // No relay: nothing reaches NATS, so every event the stream shows came from the
    // hub healing from the log.
    let app = spawn_app_with_roles([Role::Gateway].into_iter().collect::<BTreeSet<_>>()).await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let mut events = SseReader::new(
        app.sse(
            &format!("/v1/conversations/{conversation}/events"),
            &user,
            None,
        )
        .await,
    );
    let sent = app
        .send_message(&user, &conversation, "via the log", false)
        .await;
    let event = events.next_of("MessageSent").await;
    assert_eq!(event.position(), position(&sent));
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_retry_hint() {
    let mut app: TestApp = spawn_app().await;
    let user = app.register_and_login().await;
    let mut events = SseReader::new(app.sse("/v1/events", &user, None).await);
    let stopping = tokio::spawn(async move { app.stop().await });
    let last = events.next().await.expect("a last event before the end");
    assert!(last.retry.is_some(), "{last:?}");
    assert!(events.next().await.is_none());
    stopping.await.unwrap().unwrap();
}
