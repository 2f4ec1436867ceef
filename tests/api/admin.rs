//! The admin routes under `/v1/admin`, end to end: who may call them, the projections'
//! checkpoints and rebuilds, raw stream reads, the key pool without its keys, dead
//! letters brought back and completed by an agent, and erasure as the log shows it.

use std::time::Duration;

use colloquy::app::RunsDue;
use colloquy_domain::RunId;
use colloquy_gemini_agent::backoff::{Backoff, RetrySchedule};
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, Fault, FaultTarget, RandomFaults};
use colloquy_gemini_agent::worker::{AgentSettings, DEAD_LETTER_PREFIX, Handled, Trigger};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestUser, agent_for, app_without_agent, queued_run, read_models_reach, run_status,
    spawn_app, spawn_app_with,
};

/// How long a test waits for a condition before failing.
const PATIENCE: Duration = Duration::from_secs(20);

async fn get_json(app: &TestApp, path: &str, user: &TestUser) -> Value {
    let response = app.request(Method::GET, path, user).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    response.json().await.unwrap()
}

/// `GET /v1/admin/projections`, as a map from name to item.
async fn projections(app: &TestApp, admin: &TestUser) -> serde_json::Map<String, Value> {
    let body = get_json(app, "/v1/admin/projections", admin).await;
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| (item["name"].as_str().unwrap().to_owned(), item.clone()))
        .collect()
}

/// Polls the projections list until `done` holds for it (bounded).
async fn projections_until(
    app: &TestApp,
    admin: &TestUser,
    what: &str,
    done: impl Fn(&serde_json::Map<String, Value>) -> bool,
) -> serde_json::Map<String, Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let items = projections(app, admin).await;
        if done(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake whose every call fails, and an agent with no retries left after one attempt:
/// each run it handles becomes a dead letter.
pub(crate) async fn failing_agent(
    app: &TestApp,
) -> (FakeGemini, colloquy_gemini_agent::worker::Agent) {
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    fake.set_random_faults(Some(RandomFaults {
        seed: 7,
        probability: 1.0,
        faults: vec![Fault::Internal],
    }));
    let agent = agent_for(
        app,
        &fake,
        AgentSettings {
            retry_delays: RetrySchedule::new(Vec::new()),
            backoff: Backoff {
                max_tries: 1,
                base: Duration::from_millis(1),
                ..Backoff::default()
            },
            ..AgentSettings::default()
        },
    )
    .await;
    (fake, agent)
}

/// A run of `user`'s that the agent gave up on: a dead letter, applied to the runs
/// read model. Returns it and its state as `GET /v1/runs/{id}` shows it.
pub(crate) async fn dead_letter(
    app: &TestApp,
    user: &TestUser,
    agent: &colloquy_gemini_agent::worker::Agent,
) -> (RunId, Value) {
    let run = queued_run(app, user).await;
    let Handled::Failed(reason) = agent.handle(run, Trigger::Delivered).await.unwrap() else {
        panic!("the run should have failed");
    };
    assert!(reason.starts_with(DEAD_LETTER_PREFIX), "{reason}");
    let status = run_status(app, user, run).await;
    assert_eq!(status["status"], "failed", "{status}");
    (run, status)
}

fn assert_problem(response_status: StatusCode, body: &Value, status: u16, code: &str) {
    assert_eq!(response_status.as_u16(), status, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
}

#[tokio::test]
async fn every_admin_route_needs_a_token_with_the_admin_role() {
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let me = get_json(&app, "/v1/me", &admin).await;
    assert_eq!(me["admin"], true, "{me}");
    let (fake, agent) = failing_agent(&app).await;
    let (run, _) = dead_letter(&app, &user, &agent).await;
    fake.set_random_faults(None);
    let conversation = run_status(&app, &user, run).await["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = run.as_uuid();

    let routes = [
        (Method::GET, "/v1/admin/projections".to_owned(), 200),
        (
            Method::POST,
            "/v1/admin/projections/search/rebuild".to_owned(),
            202,
        ),
        (
            Method::GET,
            format!("/v1/admin/streams/conversation-{conversation}"),
            200,
        ),
        (Method::GET, "/v1/admin/agent/keys".to_owned(), 200),
        (Method::GET, "/v1/admin/runs/dead-letters".to_owned(), 200),
        (Method::POST, format!("/v1/admin/runs/{run}/retry"), 202),
        (
            Method::POST,
            format!("/v1/admin/users/{}/forget", user.id),
            200,
        ),
    ];
    for (method, path, _) in &routes {
        let response = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_problem(status, &body, 401, "unauthorized");

        let response = app
            .request(method.clone(), path, &user)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_problem(status, &body, 403, "forbidden");
    }
    for (method, path, expected) in &routes {
        let response = app
            .request(method.clone(), path, &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            *expected,
            "{method} {path}: {}",
            response.text().await.unwrap()
        );
    }
    // Without keys configured the pool is empty, not an error.
    assert_eq!(
        get_json(&app, "/v1/admin/agent/keys", &admin).await,
        json!({ "items": [] })
    );
    // The rebuild started above finishes; the read model is live again.
    projections_until(&app, &admin, "the search rebuild", |items| {
        items["search"]["last_rebuild"]["status"] == "succeeded"
            && items["search"]["state"] != "rebuilding"
    })
    .await;
}

#[tokio::test]
async fn the_projections_reach_the_log_head_and_rebuild_on_request() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let conversation = app.create_conversation(&user).await;
    let sent = app.send_message(&user, &conversation, "hello", false).await;
    let position = sent["position"].as_i64().unwrap();

    let items = projections_until(&app, &admin, "every checkpoint at the command", |items| {
        items
            .values()
            .all(|item| item["checkpoint"].as_i64().unwrap() >= position)
    })
    .await;
    let mut names: Vec<&str> = items.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["messages", "runs", "search"]);
    for item in items.values() {
        // Nothing was written after the message: every read model is at the head.
        assert_eq!(item["checkpoint"], position, "{item}");
        assert_eq!(item["lag_events"], 0, "{item}");
        assert_eq!(item["lag_seconds"], 0.0, "{item}");
        assert_eq!(item["state"], "live", "{item}");
        assert_eq!(item["last_rebuild"], Value::Null, "{item}");
    }

    let response = app
        .request(
            Method::POST,
            "/v1/admin/projections/messages/rebuild",
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let started: Value = response.json().await.unwrap();
    assert_eq!(started["name"], "messages");
    assert_eq!(started["state"], "rebuilding");
    // The rebuild's lock goes with its session, which closes just after the rebuild
    // reports: wait for both.
    let items = projections_until(&app, &admin, "the messages rebuild", |items| {
        items["messages"]["last_rebuild"]["status"] == "succeeded"
            && items["messages"]["state"] == "live"
    })
    .await;
    let messages = &items["messages"];
    assert_eq!(messages["last_rebuild"]["position"], position, "{messages}");
    assert_eq!(messages["state"], "live", "{messages}");
    assert_eq!(messages["checkpoint"], position, "{messages}");
    // The rebuilt read model serves queries as before.
    let listed = app
        .request(
            Method::GET,
            &format!("/v1/conversations/{conversation}/messages"),
            &user,
        )
        .send()
        .await
        .unwrap();
    let listed: Value = listed.json().await.unwrap();
    assert_eq!(listed["items"][0]["text"], "hello", "{listed}");

    let response = app
        .request(
            Method::POST,
            "/v1/admin/projections/nonsense/rebuild",
            &admin,
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_problem(status, &response.json().await.unwrap(), 404, "not_found");
}

#[tokio::test]
async fn a_stream_reads_back_its_events_in_order_page_by_page() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let conversation = app.create_conversation(&user).await;
    for text in ["one", "two", "three"] {
        app.send_message(&user, &conversation, text, false).await;
    }
    let stream = format!("/v1/admin/streams/conversation-{conversation}");

    let all = get_json(&app, &stream, &admin).await;
    let items = all["items"].as_array().unwrap();
    let types: Vec<&str> = items.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "ConversationStarted",
            "MessageSent",
            "MessageSent",
            "MessageSent"
        ]
    );
    let texts: Vec<&str> = items[1..]
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    for (n, event) in items.iter().enumerate() {
        assert_eq!(event["position"], n, "{event}");
        assert!(
            event["id"].is_string() && event["time"].is_string(),
            "{event}"
        );
        assert_eq!(event["metadata"]["userId"], user.id.as_str(), "{event}");
    }
    let globals: Vec<i64> = items
        .iter()
        .map(|e| e["global_position"].as_i64().unwrap())
        .collect();
    assert!(
        globals.is_sorted() && globals[0] < globals[3],
        "{globals:?}"
    );
    assert_eq!(all["next_from"], Value::Null);

    // Two at a time: the pages add up to the whole stream.
    let first = get_json(&app, &format!("{stream}?limit=2"), &admin).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_from"], 2);
    let second = get_json(&app, &format!("{stream}?from=2&limit=2"), &admin).await;
    let mut paged = first["items"].as_array().unwrap().clone();
    paged.extend(second["items"].as_array().unwrap().iter().cloned());
    assert_eq!(&paged, items);
    let rest = get_json(&app, &format!("{stream}?from=4&limit=2"), &admin).await;
    assert_eq!(rest, json!({ "items": [], "next_from": null }));

    // Any stream name, percent-encoded; an empty stream reads as empty.
    let odd = get_json(&app, "/v1/admin/streams/odd%20stream%2Fname-1", &admin).await;
    assert_eq!(odd, json!({ "items": [], "next_from": null }));
    let response = app
        .request(Method::GET, &format!("{stream}?from=-1"), &admin)
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_problem(
        status,
        &response.json().await.unwrap(),
        400,
        "invalid_query",
    );
}

#[tokio::test]
async fn the_key_pool_is_shown_by_label_and_never_with_a_key() {
    let fake = FakeGemini::start(
        FakeConfig::default()
            .key("fake-key-1", "proj-a")
            .key("fake-key-2", "proj-b"),
    )
    .await
    .unwrap();
    // The first key is refused with a message that names it, as some errors do.
    fake.push_fault_for(
        FaultTarget::Key("fake-key-1".to_owned()),
        Fault::Status {
            code: 403,
            status: "PERMISSION_DENIED".to_owned(),
            message: "Permission denied for API key fake-key-1.".to_owned(),
        },
    );
    let base_url = fake.base_url();
    let app = spawn_app_with(move |settings| {
        settings.gemini_base_url = base_url;
        settings.gemini_api_keys = Some(SecretString::from(
            "main=fake-key-1@proj-a,spare=fake-key-2@proj-b".to_owned(),
        ));
    })
    .await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;

    let body = get_json(&app, "/v1/admin/agent/keys", &admin).await;
    let labels: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["main", "spare"], "{body}");
    assert_eq!(body["items"][0]["project"], "proj-a");
    assert_eq!(body["items"][0]["state"], "ready");

    // Two runs, so that each key is tried at least once whichever comes first.
    for text in ["first", "second"] {
        let conversation = app.create_conversation(&user).await;
        app.send_message(&user, &conversation, text, true).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let body = loop {
        let response = app
            .request(Method::GET, "/v1/admin/agent/keys", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("fake-key-1") && !text.contains("fake-key-2"),
            "a key in the body: {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap();
        if body["items"][0]["state"] == "disabled" {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused key was never disabled: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let main = &body["items"][0];
    assert!(
        main["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("unusable"),
        "{main}"
    );
    assert_eq!(body["items"][1]["state"], "ready", "{body}");
}

#[tokio::test]
async fn a_dead_letter_is_listed_retried_and_then_completed_by_the_agent() {
    let app = app_without_agent().await;
    let user = app.register_and_login().await;
    let admin = app.register_admin().await;
    let (fake, agent) = failing_agent(&app).await;
    let (older, _) = dead_letter(&app, &user, &agent).await;
    let (newer, newer_status) = dead_letter(&app, &user, &agent).await;

    // Newest first, one page at a time.
    let min = newer_status["position"].as_i64().unwrap();
    let first = app
        .request(Method::GET, "/v1/admin/runs/dead-letters?limit=1", &admin)
        .header("X-Colloquy-Min-Position", min.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first: Value = first.json().await.unwrap();
    let item = &first["items"][0];
    assert_eq!(item["id"], newer.as_uuid().to_string(), "{first}");
    assert_eq!(item["conversation_id"], newer_status["conversation_id"]);
    assert_eq!(item["attempts"], 1);
    assert!(
        item["error"]
            .as_str()
            .unwrap()
            .starts_with(DEAD_LETTER_PREFIX),
        "{item}"
    );
    assert!(item["finished_at"].is_string(), "{item}");
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = get_json(
        &app,
        &format!("/v1/admin/runs/dead-letters?limit=1&cursor={cursor}"),
        &admin,
    )
    .await;
    assert_eq!(second["items"][0]["id"], older.as_uuid().to_string());
    assert_eq!(second["next_cursor"], Value::Null, "{second}");

    // A run that is not a dead letter cannot be retried.
    let queued = queued_run(&app, &user).await;
    let response = app
        .request(
            Method::POST,
            &format!("/v1/admin/runs/{}/retry", queued.as_uuid()),
            &admin,
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_problem(
        status,
        &response.json().await.unwrap(),
        409,
        "not_a_dead_letter",
    );
    let response = app
        .request(
            Method::POST,
            &format!("/v1/admin/runs/{}/retry", uuid::Uuid::new_v4()),
            &admin,
        )
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_problem(status, &response.json().await.unwrap(), 404, "not_found");

    // Retried: retrying again, due now, no longer a dead letter.
    let response = app
        .request(
            Method::POST,
            &format!("/v1/admin/runs/{}/retry", newer.as_uuid()),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let position_header: i64 = response.headers()["x-colloquy-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retried: Value = response.json().await.unwrap();
    assert_eq!(retried["run_id"], newer.as_uuid().to_string());
    assert_eq!(retried["position"], position_header);
    let status = run_status(&app, &user, newer).await;
    assert_eq!(status["status"], "retrying", "{status}");
    assert!(status.get("finished_at").is_none(), "{status}");
    let response = app
        .request(
            Method::POST,
            &format!("/v1/admin/runs/{}/retry", newer.as_uuid()),
            &admin,
        )
        .send()
        .await
        .unwrap();
    let code = response.status();
    assert_problem(
        code,
        &response.json().await.unwrap(),
        409,
        "not_a_dead_letter",
    );
    let listed = get_json(&app, "/v1/admin/runs/dead-letters", &admin).await;
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [older.as_uuid().to_string()], "{listed}");

    // Gemini is back: the sweep finds the run and the agent answers it.
    fake.set_random_faults(None);
    let swept = agent
        .sweep(&RunsDue(app.db.database().await))
        .await
        .unwrap();
    assert!(swept.contains(&(newer, Handled::Completed)), "{swept:?}");
    let status = run_status(&app, &user, newer).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 2, "{status}");
    assert!(status["finished_at"].is_string(), "{status}");
}

/// How many rows of the read models still hold `text` (messages, conversation
/// titles, search documents), on either backend.
async fn read_model_copies(app: &TestApp, text: &str) -> i64 {
    let like = format!("%{text}%");
    match app.db.database().await {
        colloquy_eventstore::Database::Postgres(pool) => sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM rm_messages.messages WHERE text LIKE $1)
                  + (SELECT count(*) FROM rm_messages.conversations
                      WHERE title LIKE $1 OR last_message_preview LIKE $1)
                  + (SELECT count(*) FROM rm_search.documents WHERE text LIKE $1)",
        )
        .bind(like)
        .fetch_one(&pool)
        .await
        .unwrap(),
        colloquy_eventstore::Database::Sqlite(pool) => sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM rm_messages_messages WHERE text LIKE $1)
                  + (SELECT count(*) FROM rm_messages_conversations
                      WHERE title LIKE $1 OR last_message_preview LIKE $1)
                  + (SELECT count(*) FROM rm_search_documents WHERE text LIKE $1)",
        )
        .bind(like)
        .fetch_one(&pool)
        .await
        .unwrap(),
    }
}

/// The JetStream stream's messages whose payload holds `text` (`None` in the embedded
/// mode), once the stream holds every event up to `position`.
async fn jetstream_copies(app: &TestApp, text: &str, position: i64) -> Option<usize> {
    if crate::helpers::embedded() {
        return None;
    }
    let client = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(app.prefix.to_uppercase()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = stream.info().await.unwrap().state.clone();
        let mut found = 0;
        let mut highest = 0;
        for sequence in state.first_sequence..=state.last_sequence {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let payload = String::from_utf8_lossy(&message.payload).into_owned();
            if payload.contains(text) {
                found += 1;
            }
            let event: Value = serde_json::from_str(&payload).unwrap();
            highest = highest.max(event["globalPosition"].as_i64().unwrap_or(0));
        }
        if highest >= position {
            return Some(found);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never held position {position}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn forgetting_a_user_removes_their_text_from_the_stream() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let other = app.register_and_login().await;
    let admin = app.register_admin().await;
    let conversation = app.create_conversation(&user).await;
    let sent = app
        .send_message(&user, &conversation, "my secret plan", false)
        .await;
    let theirs = app.create_conversation(&other).await;
    let last = app
        .send_message(&other, &theirs, "their own words", false)
        .await;
    let position = last["position"].as_i64().unwrap();
    assert!(sent["position"].as_i64().unwrap() < position);
    let stream = format!("/v1/admin/streams/conversation-{conversation}");
    let before = get_json(&app, &stream, &admin).await;
    assert!(before.to_string().contains("my secret plan"));
    // Every copy exists before: the read models (once they reach the last command) and
    // the JetStream stream.
    read_models_reach(&app.db.database().await, position, PATIENCE).await;
    assert_eq!(
        read_model_copies(&app, "my secret plan").await,
        3,
        "the message, the preview and the search document"
    );
    let copies = jetstream_copies(&app, "my secret plan", position).await;
    assert!(copies.is_none_or(|n| n >= 1), "{copies:?}");

    let response = app
        .request(
            Method::POST,
            &format!("/v1/admin/users/{}/forget", user.id),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["user_id"], user.id.as_str());
    assert!(report["events_redacted"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        report["streams"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("conversation-{conversation}"))),
        "{report}"
    );
    assert_eq!(
        report["read_models"],
        json!(["messages", "search"]),
        "{report}"
    );
    if crate::helpers::embedded() {
        assert_eq!(
            report["jetstream_messages_removed"],
            Value::Null,
            "{report}"
        );
    } else {
        assert!(
            report["jetstream_messages_removed"].as_u64().unwrap() >= 2,
            "{report}"
        );
    }
    // No copy is left: not in the read models, not in the JetStream stream; the other
    // user's text stays everywhere.
    assert_eq!(read_model_copies(&app, "my secret plan").await, 0);
    assert_eq!(read_model_copies(&app, "their own words").await, 3);
    if let Some(copies) = jetstream_copies(&app, "my secret plan", position).await {
        assert_eq!(copies, 0);
        assert_eq!(
            jetstream_copies(&app, "their own words", position).await,
            Some(1)
        );
    }

    let after = get_json(&app, &stream, &admin).await;
    assert!(!after.to_string().contains("my secret plan"), "{after}");
    let sent = &after["items"][1];
    assert_eq!(sent["type"], "MessageSent");
    assert_eq!(sent["data"]["text"], "");
    assert_eq!(sent["data"]["redacted"], true);
    // Positions and ids stay; other users keep their text.
    assert_eq!(after["items"].as_array().unwrap().len(), 2);
    assert_eq!(sent["id"], before["items"][1]["id"]);
    let theirs = get_json(
        &app,
        &format!("/v1/admin/streams/conversation-{theirs}"),
        &admin,
    )
    .await;
    assert!(theirs.to_string().contains("their own words"));

    // Again: nothing left to redact.
    let again: Value = app
        .request(
            Method::POST,
            &format!("/v1/admin/users/{}/forget", user.id),
            &admin,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["events_redacted"], 0, "{again}");
    let response = app
        .request(Method::POST, "/v1/admin/users/not-a-uuid/forget", &admin)
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_problem(status, &response.json().await.unwrap(), 404, "not_found");
}
