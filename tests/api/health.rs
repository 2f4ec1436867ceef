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

/// `COLLOQUY_DATABASE_POOL_SIZE` bounds the Postgres connections of a process, which
/// names them `colloquy`: a burst of concurrent sends and reads, with every role
/// running, never has more open, and is all served (requests wait for a connection).
#[tokio::test]
async fn a_process_opens_no_more_postgres_connections_than_its_pool_size() {
    if crate::helpers::embedded() {
        return; // One SQLite file, no server connections.
    }
    const POOL: u32 = 4;
    let app = spawn_app_with(|s| s.database_pool_size = POOL).await;
    let user = app.register_and_login().await;
    let mut conversations = Vec::new();
    for _ in 0..8 {
        conversations.push(app.create_conversation(&user).await);
    }
    // Pages are read once the read model has every conversation (read your writes):
    // reached here first, so that no request of the burst waits for the projector.
    let created = app.store.head().await.unwrap().to_string();
    let reached = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/conversations/{}/messages", conversations[7]),
            &user,
        )
        .header("X-Colloquy-Min-Position", created.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(reached.status(), 200);
    let observer = app.db.pool().await;
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'colloquy'",
        )
        .fetch_one(&observer)
        .await
        .unwrap()
    };
    let done = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let done = done.clone();
        async move {
            let mut most = 0;
            while !done.is_cancelled() {
                most = most.max(count().await);
                tokio::task::yield_now().await;
            }
            most.max(count().await)
        }
    };
    let burst = async {
        let requests = (0..64).map(|i| {
            let conversation = &conversations[i % conversations.len()];
            let (app, user, created) = (&app, &user, &created);
            async move {
                if i % 2 == 0 {
                    app.send_message(user, conversation, &format!("message {i}"), false)
                        .await;
                } else {
                    let response = app
                        .request(
                            reqwest::Method::GET,
                            &format!("/v1/conversations/{conversation}/messages"),
                            user,
                        )
                        .header("X-Colloquy-Min-Position", created.as_str())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200, "read a page");
                }
            }
        });
        futures::future::join_all(requests).await;
        done.cancel();
    };
    let ((), most) = tokio::join!(burst, sampler);
    assert!(
        (1..=i64::from(POOL)).contains(&most),
        "{most} connections named colloquy with a pool of {POOL}"
    );
}
