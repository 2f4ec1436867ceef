use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn healthz_answers_while_the_process_lives() {
    let app = spawn_app().await;
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "alive");
}

#[tokio::test]
async fn readyz_reports_each_dependency() {
    let app = spawn_app().await;
    let body = app.wait_until_ready().await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["projections"]["status"], "up", "{body}");
    if crate::helpers::embedded() {
        // One file, no broker.
        assert_eq!(body["checks"]["sqlite"]["status"], "up", "{body}");
        assert!(body["checks"].get("postgres").is_none(), "{body}");
        assert!(body["checks"].get("nats").is_none(), "{body}");
    } else {
        assert_eq!(body["checks"]["postgres"]["status"], "up");
        assert_eq!(body["checks"]["nats"]["status"], "up");
        assert_eq!(body["checks"]["nats"]["jetstream"], true);
    }
}

#[tokio::test]
async fn readyz_is_503_with_detail_when_nats_is_unreachable() {
    // Nothing listens on port 1; the application still starts (it keeps trying).
    let app = spawn_app_with(|s| s.nats_url = Some("nats://127.0.0.1:1".into())).await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["nats"]["status"], "down");
    assert_eq!(body["checks"]["postgres"]["status"], "up");
}

#[tokio::test]
async fn shutdown_stops_serving_and_returns_cleanly() {
    let mut app = spawn_app().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.stop().await.expect("a clean stop");
    let after = app.client.get(app.url("/healthz")).send().await;
    assert!(after.is_err(), "the listener is closed after shutdown");
}
