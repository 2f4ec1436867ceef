//! The REST commands and queries of conversations, messages, runs and search, end to
//! end. Read models update asynchronously, so every query after a command waits for
//! the command's position (`X-Colloquy-Min-Position` / `?min_position=`), never sleeps.

use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestUser, spawn_app};

/// Checks a command response (status, `X-Colloquy-Position` = body `position`) and
/// returns its body.
async fn command_body(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let header: i64 = response.headers()["x-colloquy-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["position"], header, "{body}");
    body
}

fn position_of(response: &Response) -> i64 {
    response.headers()["x-colloquy-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn create(app: &TestApp, user: &TestUser, body: &Value) -> Value {
    let response = app
        .request(Method::POST, "/v1/conversations", user)
        .json(body)
        .send()
        .await
        .unwrap();
    command_body(response, StatusCode::CREATED).await
}

async fn send(app: &TestApp, user: &TestUser, conversation: &str, text: &str) -> Value {
    let response = app
        .request(
            Method::POST,
            &format!("/v1/conversations/{conversation}/messages"),
            user,
        )
        .json(&json!({ "text": text }))
        .send()
        .await
        .unwrap();
    command_body(response, StatusCode::CREATED).await
}

/// A query after waiting for `position`; returns the status and body.
async fn query(app: &TestApp, user: &TestUser, path: &str, position: i64) -> (StatusCode, Value) {
    let response = app
        .request(Method::GET, path, user)
        .header("X-Colloquy-Min-Position", position.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn assert_problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    body
}

/// How many events the log holds (positions are dense: nothing is ever deleted).
async fn log_length(app: &TestApp) -> i64 {
    let events = app
        .store
        .read_log(&colloquy_eventstore::LogFilter::All, 0, 1_000_000)
        .await
        .unwrap();
    i64::try_from(events.len()).unwrap()
}

#[tokio::test]
async fn create_then_show_a_conversation() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let created = create(
        &app,
        &user,
        &json!({ "title": "  Plans ", "model": "gemini-2.5-flash" }),
    )
    .await;
    assert_eq!(created["version"], 0);
    let id = created["id"].as_str().unwrap();
    let position = created["position"].as_i64().unwrap();

    let (status, shown) = query(&app, &user, &format!("/v1/conversations/{id}"), position).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["id"], id);
    assert_eq!(shown["title"], "Plans");
    assert_eq!(shown["message_count"], 0);
    assert_eq!(shown["version"], 0);
    assert!(shown["created_at"].is_string() && shown["updated_at"].is_string());
    assert!(shown.get("last_message_preview").is_some());

    // A conversation without any field is fine too.
    create(&app, &user, &json!({})).await;
}

#[tokio::test]
async fn read_your_writes_with_min_position() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sent = send(&app, &user, &id, "hello there").await;
    let position = sent["position"].as_i64().unwrap();

    // The query parameter form.
    let response = app
        .request(
            Method::GET,
            &format!("/v1/conversations/{id}?min_position={position}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let shown: Value = response.json().await.unwrap();
    assert_eq!(shown["message_count"], 1);
    assert_eq!(shown["last_message_preview"], "hello there");

    // The header form.
    let items = app.messages_at(&user, &id, position).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], sent["message_id"]);
    assert_eq!(items[0]["author"], "user");
    assert_eq!(items[0]["text"], "hello there");
    assert!(items[0].get("edited_at").is_none());
}

#[tokio::test]
async fn a_position_never_reached_is_503_with_retry_after() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let response = app
        .request(Method::GET, "/v1/conversations", &user)
        .header("X-Colloquy-Min-Position", "999999999")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;

    let response = app
        .request(Method::GET, "/v1/conversations?min_position=abc", &user)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_min_position").await;
}

#[tokio::test]
async fn another_users_conversation_is_404_on_every_route() {
    let app = spawn_app().await;
    let owner = app.register_and_login().await;
    let stranger = app.register_and_login().await;
    let id = create(&app, &owner, &json!({ "title": "mine" })).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sent = send(&app, &owner, &id, "private").await;
    let message = sent["message_id"].as_str().unwrap();
    let position = sent["position"].as_i64().unwrap();
    let conv = format!("/v1/conversations/{id}");
    let msgs = format!("/v1/conversations/{id}/messages");
    let msg = format!("/v1/conversations/{id}/messages/{message}");
    let runs = format!("/v1/conversations/{id}/runs");
    let attempts: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, &conv, None),
        (Method::PATCH, &conv, Some(json!({ "title": "theirs" }))),
        (Method::DELETE, &conv, None),
        (Method::GET, &msgs, None),
        (Method::POST, &msgs, Some(json!({ "text": "hi" }))),
        (Method::PATCH, &msg, Some(json!({ "text": "edited" }))),
        (Method::DELETE, &msg, None),
        (Method::POST, &runs, Some(json!({}))),
    ];
    for (method, path, body) in attempts {
        let mut request = app
            .request(method.clone(), path, &stranger)
            .header("X-Colloquy-Min-Position", position.to_string());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    // The stranger's list does not show it; the owner still has everything.
    let (_, list) = query(&app, &stranger, "/v1/conversations", position).await;
    assert_eq!(list["items"], json!([]));
    assert_eq!(
        app.messages_at(&owner, &id, position).await[0]["text"],
        "private"
    );

    // Ids that are not UUIDs are 404 problems, never 500.
    for path in [
        "/v1/conversations/not-a-uuid",
        "/v1/conversations/not-a-uuid/messages",
        "/v1/runs/42",
    ] {
        let response = app.request(Method::GET, path, &owner).send().await.unwrap();
        assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn invalid_text_is_422_naming_the_field() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/conversations/{id}/messages");
    for body in [
        json!({ "text": "" }),
        json!({ "text": " \n\t " }),
        json!({ "text": "x".repeat(32_001) }),
        json!({ "text": "a\u{0}b" }),
        json!({}),
        json!({ "text": 7 }),
    ] {
        let response = app
            .request(Method::POST, &path, &user)
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        assert_eq!(problem["errors"][0]["field"], "text", "{problem}");
    }
    // 32,000 characters are fine.
    send(&app, &user, &id, &"é".repeat(32_000)).await;

    // A body over 1 MiB is 413.
    let response = app
        .request(Method::POST, &path, &user)
        .json(&json!({ "text": "x".repeat(1_100_000) }))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let response = app
        .request(Method::POST, "/v1/conversations", &user)
        .json(&json!({ "title": "t".repeat(201) }))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "title");
}

#[tokio::test]
async fn any_text_round_trips_byte_for_byte() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let texts = [
        "<script>alert('x')</script> &amp; <b>bold</b>",
        "'; DROP TABLE messages; -- \" \\ %_",
        "👩‍👩‍👧 émoji ✓ 漢字 \u{202e}rtl",
        "  surrounding whitespace\n\ttabs\r\n  ",
    ];
    let mut position = 0;
    for text in texts {
        position = send(&app, &user, &id, text).await["position"]
            .as_i64()
            .unwrap();
    }
    let items = app.messages_at(&user, &id, position).await;
    let got: Vec<&str> = items.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(got, texts);
}

#[tokio::test]
async fn message_pages_continue_while_messages_arrive() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut position = 0;
    for i in 1..=3 {
        position = send(&app, &user, &id, &format!("m{i}")).await["position"]
            .as_i64()
            .unwrap();
    }
    let base = format!("/v1/conversations/{id}/messages");
    let (_, page1) = query(&app, &user, &format!("{base}?limit=2"), position).await;
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();

    // More messages arrive, and one already read is deleted: page 2 does not shift.
    for i in 4..=5 {
        send(&app, &user, &id, &format!("m{i}")).await;
    }
    let first_id = page1["items"][0]["id"].as_str().unwrap();
    let response = app
        .request(
            Method::DELETE,
            &format!("/v1/conversations/{id}/messages/{first_id}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    position = position_of(&response);
    let (_, page2) = query(
        &app,
        &user,
        &format!("{base}?limit=2&cursor={cursor}"),
        position,
    )
    .await;
    let cursor = page2["next_cursor"].as_str().unwrap().to_owned();
    let (_, page3) = query(
        &app,
        &user,
        &format!("{base}?limit=2&cursor={cursor}"),
        position,
    )
    .await;
    assert_eq!(page3["next_cursor"], Value::Null);

    let texts: Vec<&str> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap())
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5"]);

    let response = app
        .request(Method::GET, &format!("{base}?cursor=%21%21"), &user)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;
}

#[tokio::test]
async fn message_pages_around_a_message() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ids = Vec::new();
    let mut position = 0;
    for i in 1..=5 {
        let sent = send(&app, &user, &id, &format!("m{i}")).await;
        position = sent["position"].as_i64().unwrap();
        ids.push(sent["message_id"].as_str().unwrap().to_owned());
    }
    let base = format!("/v1/conversations/{id}/messages?limit=2");
    let texts = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect()
    };

    let (_, page) = query(&app, &user, &format!("{base}&after={}", ids[1]), position).await;
    assert_eq!(texts(&page), ["m3", "m4"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = query(&app, &user, &format!("{base}&cursor={cursor}"), position).await;
    assert_eq!(texts(&page), ["m5"]);
    assert_eq!(page["next_cursor"], Value::Null);

    // Backward: the messages just before m5, oldest first, then further back.
    let (_, page) = query(&app, &user, &format!("{base}&before={}", ids[4]), position).await;
    assert_eq!(texts(&page), ["m3", "m4"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = query(&app, &user, &format!("{base}&cursor={cursor}"), position).await;
    assert_eq!(texts(&page), ["m1", "m2"]);
    assert_eq!(page["next_cursor"], Value::Null);

    let unknown = uuid::Uuid::new_v4();
    let (status, _) = query(&app, &user, &format!("{base}&before={unknown}"), position).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = app
        .request(
            Method::GET,
            &format!("{base}&before={}&after={}", ids[4], ids[0]),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
}

#[tokio::test]
async fn edit_and_delete_messages() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = send(&app, &user, &id, "first").await;
    let second = send(&app, &user, &id, "second").await;
    let first_id = first["message_id"].as_str().unwrap();
    let second_id = second["message_id"].as_str().unwrap();

    let response = app
        .request(
            Method::PATCH,
            &format!("/v1/conversations/{id}/messages/{first_id}"),
            &user,
        )
        .json(&json!({ "text": "first, edited" }))
        .send()
        .await
        .unwrap();
    let edited = command_body(response, StatusCode::OK).await;
    assert_eq!(edited["message_id"], first_id);

    let response = app
        .request(
            Method::DELETE,
            &format!("/v1/conversations/{id}/messages/{second_id}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let position = position_of(&response);

    let items = app.messages_at(&user, &id, position).await;
    assert_eq!(items.len(), 1, "the deleted message is left out");
    assert_eq!(items[0]["text"], "first, edited");
    assert!(items[0]["edited_at"].is_string());

    // Deleting it again: no such message.
    let response = app
        .request(
            Method::DELETE,
            &format!("/v1/conversations/{id}/messages/{second_id}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rename_honours_if_match() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({ "title": "old" })).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/conversations/{id}");

    let response = app
        .request(Method::PATCH, &path, &user)
        .header("If-Match", "\"0\"")
        .json(&json!({ "title": "new" }))
        .send()
        .await
        .unwrap();
    let renamed = command_body(response, StatusCode::OK).await;
    assert_eq!(renamed["version"], 1);

    let response = app
        .request(Method::PATCH, &path, &user)
        .header("If-Match", "\"0\"")
        .json(&json!({ "title": "stale" }))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    )
    .await;

    // Without If-Match, last writer wins.
    let response = app
        .request(Method::PATCH, &path, &user)
        .json(&json!({ "title": "newest" }))
        .send()
        .await
        .unwrap();
    let renamed = command_body(response, StatusCode::OK).await;
    let (_, shown) = query(&app, &user, &path, renamed["position"].as_i64().unwrap()).await;
    assert_eq!(shown["title"], "newest");
    assert_eq!(shown["version"], 2);
}

#[tokio::test]
async fn archived_conversations_leave_the_list() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/conversations/{id}");
    let response = app
        .request(Method::DELETE, &path, &user)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let position = position_of(&response);
    let (status, _) = query(&app, &user, &path, position).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = query(&app, &user, "/v1/conversations", position).await;
    assert_eq!(list["items"], json!([]));
    // Archiving again is accepted; sending is refused.
    let response = app
        .request(Method::DELETE, &path, &user)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = app
        .request(Method::POST, &format!("{path}/messages"), &user)
        .json(&json!({ "text": "late" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "archived").await;
}

#[tokio::test]
async fn the_list_is_most_recent_activity_first_and_pages() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let other = app.register_and_login().await;
    create(&app, &other, &json!({ "title": "not mine" })).await;
    let mut ids = Vec::new();
    for title in ["a", "b", "c"] {
        ids.push(
            create(&app, &user, &json!({ "title": title })).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Activity in "a" moves it to the top.
    let position = send(&app, &user, &ids[0], "bump").await["position"]
        .as_i64()
        .unwrap();

    let (_, page1) = query(&app, &user, "/v1/conversations?limit=2", position).await;
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = query(
        &app,
        &user,
        &format!("/v1/conversations?limit=2&cursor={cursor}"),
        position,
    )
    .await;
    assert_eq!(page2["next_cursor"], Value::Null);
    let titles: Vec<&str> = [&page1, &page2]
        .iter()
        .flat_map(|p| p["items"].as_array().unwrap())
        .map(|c| c["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["a", "c", "b"]);
    assert_eq!(page1["items"][0]["message_count"], 1);
    assert_eq!(page1["items"][0]["last_message_preview"], "bump");
}

/// api.md: paging is correct when no conversation that existed at the first page is
/// skipped or shown twice, while others become active (and jump to the top) between
/// pages, and new ones start.
#[tokio::test]
async fn list_pages_skip_nothing_while_conversations_become_active() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            create(&app, &user, &json!({ "title": format!("c{i}") })).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Newest first: c6 … c0.
    let mut position = log_length(&app).await;
    let (_, page) = query(&app, &user, "/v1/conversations?limit=2", position).await;
    let mut seen: Vec<String> = Vec::new();
    let mut page = page;
    let mut round = 0;
    loop {
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        let Some(cursor) = page["next_cursor"].as_str().map(str::to_owned) else {
            break;
        };
        // Between pages: the oldest conversation not yet listed becomes active (it
        // moves to the top, above the cursor), one already listed becomes active too,
        // and a new conversation starts.
        if let Some(unlisted) = ids.iter().find(|id| !seen.contains(id)) {
            send(&app, &user, unlisted, &format!("bump {round}")).await;
        }
        position = send(&app, &user, &seen[0], &format!("again {round}")).await["position"]
            .as_i64()
            .unwrap();
        create(&app, &user, &json!({ "title": format!("new {round}") })).await;
        round += 1;
        let (status, next) = query(
            &app,
            &user,
            &format!("/v1/conversations?limit=2&cursor={cursor}"),
            position,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{next}");
        page = next;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        seen.len(),
        "a conversation was listed twice: {seen:?}"
    );
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        sorted, expected,
        "the pages listed exactly the conversations of the first page"
    );
    // The first page's order holds across pages: c6 … c0.
    let mut first_order = ids.clone();
    first_order.reverse();
    assert_eq!(seen, first_order);

    // A cursor that is not one of ours is a 400, not a 500.
    let forged = base64_url("9.10.00000000-0000-0000-0000-000000000000");
    let response = app
        .request(
            Method::GET,
            &format!("/v1/conversations?cursor={forged}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;
}

fn base64_url(raw: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn idempotency_keys_make_commands_repeatable() {
    // No agent: the log changes only by the test's own commands, so its length shows
    // whether a repeat appended anything.
    let app = crate::helpers::app_without_agent().await;
    let user = app.register_and_login().await;
    let post = |path: String, key: &'static str, body: Value| {
        app.request(Method::POST, &path, &user)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };

    let first = command_body(
        post(
            "/v1/conversations".into(),
            "create-1",
            json!({ "title": "once" }),
        )
        .await
        .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let length = log_length(&app).await;
    let again = command_body(
        post(
            "/v1/conversations".into(),
            "create-1",
            json!({ "title": "once" }),
        )
        .await
        .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(again, first);
    assert_eq!(log_length(&app).await, length, "a repeat appends nothing");

    let other = post(
        "/v1/conversations".into(),
        "create-1",
        json!({ "title": "twice" }),
    )
    .await
    .unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;

    // Send-and-run: the same message and run ids, the same position.
    let id = first["id"].as_str().unwrap();
    let path = format!("/v1/conversations/{id}/messages");
    let body = json!({ "text": "answer me", "run_agent": true });
    let sent = command_body(
        post(path.clone(), "send-1", body.clone()).await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert!(sent["run_id"].is_string());
    let length = log_length(&app).await;
    let repeat = command_body(
        post(path.clone(), "send-1", body).await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(repeat, sent);
    assert_eq!(log_length(&app).await, length);
    let other = post(path, "send-1", json!({ "text": "something else" }))
        .await
        .unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;

    let items = app
        .messages_at(&user, id, repeat["position"].as_i64().unwrap())
        .await;
    assert_eq!(items.len(), 1);
}

#[tokio::test]
async fn runs_are_requested_shown_and_cancelled() {
    // No agent: the run stays queued until the test cancels it.
    let app = crate::helpers::app_without_agent().await;
    let user = app.register_and_login().await;
    let stranger = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let runs = format!("/v1/conversations/{id}/runs");

    // Nothing to answer yet.
    let response = app
        .request(Method::POST, &runs, &user)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "nothing_to_answer").await;

    send(&app, &user, &id, "what is 2 + 2?").await;
    let response = app
        .request(Method::POST, &runs, &user)
        .json(&json!({ "instructions": "be brief" }))
        .send()
        .await
        .unwrap();
    let requested = command_body(response, StatusCode::ACCEPTED).await;
    let run_id = requested["run_id"].as_str().unwrap();

    let response = app
        .request(Method::POST, &runs, &user)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "run_already_active").await;

    let run_path = format!("/v1/runs/{run_id}");
    let position = requested["position"].as_i64().unwrap();
    let (status, run) = query(&app, &user, &run_path, position).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["id"], run_id);
    assert_eq!(run["conversation_id"], id.as_str());
    let (status, _) = query(&app, &stranger, &run_path, position).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = app
        .request(Method::POST, &format!("{run_path}/cancel"), &stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let response = app
        .request(Method::POST, &format!("{run_path}/cancel"), &user)
        .send()
        .await
        .unwrap();
    let cancelled = command_body(response, StatusCode::ACCEPTED).await;
    let (_, run) = query(
        &app,
        &user,
        &run_path,
        cancelled["position"].as_i64().unwrap(),
    )
    .await;
    assert_eq!(run["status"], "cancelled", "{run}");
}

#[tokio::test]
async fn search_finds_only_the_callers_messages() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let stranger = app.register_and_login().await;
    let id = create(&app, &user, &json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    send(&app, &user, &id, "the quick brown fox").await;
    let position = send(&app, &user, &id, "a lazy dog").await["position"]
        .as_i64()
        .unwrap();

    let (status, found) = query(&app, &user, "/v1/search?q=fox", position).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let items = found["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["conversation_id"], id.as_str());
    assert!(items[0]["snippet"].as_str().unwrap().contains("fox"));

    let (_, theirs) = query(&app, &stranger, "/v1/search?q=fox", position).await;
    assert_eq!(theirs["items"], json!([]));
    let (status, _) = query(&app, &user, "/v1/search?q=", position).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
