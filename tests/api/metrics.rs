//! `GET /metrics` after a workload: registering, a conversation, messages (one repeated
//! with its idempotency key, one conflicting with another writer), errors, and a run
//! the fake Gemini answers after one overloaded call, watched over SSE. Every family
//! of metrics is there with plausible values, labelled with route templates rather
//! than paths, and nothing on the page is a key, a token, an email or message text.
//!
//! The relay exists only in the external mode: its metrics are checked only there.

use std::sync::Arc;
use std::time::Duration;

use colloquy_commands::Commands;
use colloquy_commands::cache::CacheConfig;
use colloquy_domain::{ConversationCommand, ConversationId, MessageId, MessageText, UserId};
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, Fault};
use reqwest::Method;
use secrecy::SecretString;

use crate::helpers::metrics::{Page, parse_sample, scrape};
use crate::helpers::{SseReader, TestApp, embedded, spawn_app_with, spawn_app_with_roles};

/// The route template of sending a message.
const MESSAGES: &str = "/v1/conversations/{id}/messages";
/// The read models.
const PROJECTIONS: [&str; 3] = ["messages", "runs", "search"];

/// Scrapes until `ready` holds (bounded), then returns that page.
async fn scrape_until(app: &TestApp, what: &str, ready: impl Fn(&Page) -> bool) -> Page {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = scrape(app).await;
        if ready(&page) {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}:\n{}",
            page.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_workload_shows_in_every_family_of_metrics() {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    // The run's first call is refused (503); the attempt retries and gets its reply.
    fake.push_fault(Fault::Overloaded);
    let base_url = fake.base_url();
    let app = spawn_app_with(move |settings| {
        settings.gemini_base_url = base_url;
        settings.gemini_api_keys = Some(SecretString::from("main=fake-key-1@proj-a".to_owned()));
    })
    .await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;

    const SENT: usize = 3;
    for n in 0..SENT {
        app.send_message(&user, &conversation, &format!("plain message {n}"), false)
            .await;
    }
    // One request sent twice with its idempotency key: the repeat is replayed.
    for _ in 0..2 {
        let response = app
            .request(
                Method::POST,
                &format!("/v1/conversations/{conversation}/messages"),
                &user,
            )
            .header("Idempotency-Key", "metrics-once")
            .json(&serde_json::json!({ "text": "said once" }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    // Another writer (a command handler of its own, as another process would be)
    // leaves the gateway's cached conversation stale: its next command conflicts on
    // append and is decided again.
    let owner = UserId::from_uuid(user.id.parse().unwrap());
    let other = Commands::new(Arc::clone(&app.store), CacheConfig::default());
    other
        .conversation(
            ConversationId::from_uuid(conversation.parse().unwrap()),
            ConversationCommand::SendMessage {
                message_id: MessageId::from_uuid(uuid::Uuid::new_v4()),
                by: owner,
                text: MessageText::parse("from another writer".to_owned()).unwrap(),
            },
            &colloquy_commands::Context::new(owner),
        )
        .await
        .unwrap();
    app.send_message(&user, &conversation, "after the other writer", false)
        .await;
    // An error on a route, and a path no route matches.
    let missing = app
        .request(
            Method::GET,
            &format!("/v1/conversations/{}", uuid::Uuid::new_v4()),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(app.get("/no/such/path").await.status(), 404);

    // A run, watched over SSE.
    let sent = app
        .send_message(&user, &conversation, "hello metrics", true)
        .await;
    let run_id = sent["run_id"].as_str().unwrap().to_owned();
    let mut events = SseReader::new(
        app.sse(&format!("/v1/runs/{run_id}/events"), &user, None)
            .await,
    );
    let open = scrape(&app).await;
    assert!(
        open.value("colloquy_sse_subscribers", &[]) >= 1.0,
        "a stream is open"
    );
    let completed = events.next_of("completed").await;
    // The fake echoes the user's turn (the messages since the last reply, joined).
    let reply = completed.json()["text"].as_str().unwrap().to_owned();
    assert!(
        reply.starts_with("echo: ") && reply.ends_with("hello metrics"),
        "{reply}"
    );
    drop(events);

    // Everything is appended now; wait until it has gone everywhere it goes.
    let head = app.store.head().await.unwrap();
    let page = scrape_until(&app, "caught up", |page| {
        let settled = page
            .find("colloquy_agent_runs_total", &[("outcome", "completed")])
            .is_some_and(|n| n >= 1.0);
        let projected = PROJECTIONS.iter().all(|p| {
            page.find("colloquy_projection_checkpoint", &[("projection", p)])
                .is_some_and(|c| c >= head as f64)
        });
        let relayed = embedded()
            || (page.find("colloquy_relay_leader", &[]) == Some(1.0)
                && page.find("colloquy_relay_lag_events", &[]) == Some(0.0));
        settled && projected && relayed
    })
    .await;

    // HTTP: by method, route template and status class.
    let posted = [("method", "POST"), ("route", MESSAGES)];
    let sends = (SENT + 4) as f64;
    assert!(
        page.value(
            "colloquy_http_requests_total",
            &[posted[0], posted[1], ("status_class", "2xx")]
        ) >= sends
    );
    assert!(page.value("colloquy_http_request_duration_seconds_count", &posted) >= sends);
    assert!(
        page.value(
            "colloquy_http_request_duration_seconds_bucket",
            &[posted[0], posted[1], ("le", "+Inf")]
        ) >= sends
    );
    assert!(
        page.value(
            "colloquy_http_errors_total",
            &[("route", "/v1/conversations/{id}"), ("code", "not_found")]
        ) >= 1.0
    );
    assert!(
        page.value(
            "colloquy_http_requests_total",
            &[("route", "unmatched"), ("status_class", "4xx")]
        ) >= 1.0
    );
    assert!(page.value("colloquy_http_requests_total", &[("route", "/metrics")]) >= 1.0);
    assert!(
        page.value(
            "colloquy_http_requests_total",
            &[("route", "/v1/auth/register"), ("status_class", "2xx")]
        ) >= 1.0
    );

    // Commands: by aggregate, command and outcome; conflicts and retries.
    let accepted = |aggregate: &str, command: &str| {
        page.value(
            "colloquy_commands_total",
            &[
                ("aggregate", aggregate),
                ("command", command),
                ("outcome", "accepted"),
            ],
        )
    };
    assert!(accepted("conversation", "start") >= 1.0);
    assert!(accepted("conversation", "send_message") >= (SENT + 2) as f64);
    assert!(accepted("process", "send_and_request_run") >= 1.0);
    assert!(accepted("run", "start") >= 1.0);
    assert!(accepted("process", "complete_run") >= 1.0);
    assert!(page.value("colloquy_commands_total", &[("outcome", "replayed")]) >= 1.0);
    assert!(
        page.value(
            "colloquy_command_conflicts_total",
            &[("aggregate", "conversation")]
        ) >= 1.0
    );
    assert!(page.value("colloquy_command_retries_total", &[("reason", "conflict")]) >= 1.0);

    // The log: appends by outcome, events, latency, group-commit batches.
    assert!(page.value("colloquy_appends_total", &[("outcome", "ok")]) >= sends);
    assert!(
        page.value(
            "colloquy_appends_total",
            &[("outcome", "wrong_expected_version")]
        ) >= 1.0
    );
    assert!(page.value("colloquy_appended_events_total", &[]) >= sends);
    assert!(page.value("colloquy_append_duration_seconds_count", &[]) >= sends);
    assert!(page.value("colloquy_append_duration_seconds_sum", &[]) > 0.0);
    assert!(page.value("colloquy_append_batch_appends_count", &[]) >= 1.0);

    // The relay (external mode): it published the log and leads.
    if !embedded() {
        let published = page.value("colloquy_relay_published_total", &[]);
        assert!(published >= 1.0 && published <= head as f64, "{published}");
        assert_eq!(page.value("colloquy_relay_lag_seconds", &[]), 0.0);
    }

    // Projections: lag in events and seconds for each read model.
    for projection in PROJECTIONS {
        let labels = [("projection", projection)];
        assert!(page.value("colloquy_projection_lag_events", &labels) >= 0.0);
        assert!(page.value("colloquy_projection_lag_seconds", &labels) >= 0.0);
    }

    // The agent and Gemini.
    assert!(page.value("colloquy_agent_runs_total", &[("outcome", "completed")]) >= 1.0);
    assert!(page.value("colloquy_agent_retries_total", &[("kind", "in_attempt")]) >= 1.0);
    assert_eq!(page.value("colloquy_agent_dead_letters", &[]), 0.0);
    let generate = ("method", "stream_generate_content");
    assert!(
        page.value(
            "colloquy_gemini_calls_total",
            &[generate, ("status_class", "2xx")]
        ) >= 1.0
    );
    assert!(
        page.value(
            "colloquy_gemini_calls_total",
            &[generate, ("status_class", "5xx")]
        ) >= 1.0
    );
    assert!(page.value("colloquy_gemini_call_duration_seconds_count", &[generate]) >= 2.0);
    assert!(page.value("colloquy_gemini_failures_total", &[("kind", "overloaded")]) >= 1.0);
    assert!(page.value("colloquy_gemini_tokens_total", &[("kind", "prompt")]) > 0.0);
    assert_eq!(
        page.value("colloquy_gemini_keys", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        page.value("colloquy_gemini_keys", &[]),
        1.0,
        "one key in all"
    );
    assert_eq!(
        page.value("colloquy_gemini_projects", &[("state", "ready")]),
        1.0
    );
    assert!(
        page.value(
            "colloquy_gemini_budget_requests",
            &[("project", "proj-a"), ("window", "day")]
        ) >= 2.0
    );
    assert!(
        page.value(
            "colloquy_gemini_budget_requests_limit",
            &[("project", "proj-a"), ("window", "minute")]
        ) > 0.0
    );

    // The process.
    assert!(page.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(page.find("process_cpu_seconds_total", &[]).is_some());
    assert_eq!(page.value("colloquy_build_info", &[]), 1.0);
    assert!(
        page.text
            .contains("# TYPE colloquy_http_request_duration_seconds histogram"),
        "latencies are histograms"
    );
    assert!(page.text.contains("# HELP colloquy_commands_total "));

    // Every family is described on the page and in the operators' guide.
    let guide = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"),
    )
    .unwrap();
    let families: std::collections::BTreeSet<&str> = page
        .samples
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| name.starts_with("colloquy_"))
        .map(|name| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|family| page.text.contains(&format!("# TYPE {family} histogram")))
                .unwrap_or(name)
        })
        .collect();
    for family in families {
        assert!(
            page.text.contains(&format!("# HELP {family} ")),
            "{family} has no description"
        );
        assert!(
            guide.contains(&format!("`{family}")),
            "{family} is not in docs/OPERATIONS.md"
        );
    }

    // Labels hold templates and names, never ids, keys, tokens, emails or text.
    for secret in [
        conversation.as_str(),
        run_id.as_str(),
        user.email.as_str(),
        user.token.as_str(),
        "fake-key-1",
        "plain message",
        "hello metrics",
    ] {
        assert!(!page.text.contains(secret), "{secret:?} is on the page");
    }
}

#[tokio::test]
async fn every_role_serves_metrics() {
    let app = spawn_app_with_roles([colloquy::Role::Projector].into_iter().collect()).await;
    let page = scrape_until(&app, "reporting projection lag", |page| {
        PROJECTIONS.iter().all(|p| {
            page.find("colloquy_projection_lag_seconds", &[("projection", p)])
                .is_some()
        })
    })
    .await;
    assert!(page.find("colloquy_projection_lag_events", &[]).is_some());
    // The scrapes before count themselves once answered.
    let page = scrape(&app).await;
    assert!(page.value("colloquy_http_requests_total", &[("route", "/metrics")]) >= 1.0);
}

#[test]
fn samples_parse_with_braces_and_escapes_in_label_values() {
    let sample = parse_sample(r#"x_total{route="/v1/a/{id}",note="a \"q\", b\\c"} 7"#).unwrap();
    assert_eq!(sample.name, "x_total");
    assert_eq!(sample.labels["route"], "/v1/a/{id}");
    assert_eq!(sample.labels["note"], r#"a "q", b\c"#);
    assert_eq!(sample.value, 7.0);
    assert_eq!(parse_sample("up 1").unwrap().value, 1.0);
    assert_eq!(
        parse_sample(r#"h_bucket{le="+Inf"} +Inf"#).unwrap().value,
        f64::INFINITY
    );
}
