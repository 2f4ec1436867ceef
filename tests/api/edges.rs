//! The edges every response passes: CORS for configured origins only, gzip for large
//! bodies but never for SSE.

use reqwest::Method;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn cors_answers_configured_origins_only() {
    let app = spawn_app_with(|settings| {
        settings.cors_origins = Some("https://app.example, https://admin.example".into());
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/v1/conversations"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("PATCH"), "{methods}");
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "{:?}",
        refused.headers()
    );
    // A real request from an allowed origin may read the position header.
    let user = app.register_and_login().await;
    let created = app
        .request(Method::POST, "/v1/conversations", &user)
        .header("origin", "https://admin.example")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let exposed = created.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("x-colloquy-position"), "{exposed}");
}

#[tokio::test]
async fn large_bodies_are_gzipped_and_event_streams_are_not() {
    let app = spawn_app().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let sent = app
        .send_message(&user, &conversation, &"long text ".repeat(200), false)
        .await;
    let page = app
        .request(
            Method::GET,
            &format!("/v1/conversations/{conversation}/messages"),
            &user,
        )
        .header("accept-encoding", "gzip")
        .header("x-colloquy-min-position", sent["position"].to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-encoding"], "gzip");
    let bytes = page.bytes().await.unwrap();
    assert!(
        bytes.len() < 1000,
        "2,000 characters of text compress: {}",
        bytes.len()
    );
    let stream = app
        .request(Method::GET, "/v1/events", &user)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(!stream.headers().contains_key("content-encoding"));
}
