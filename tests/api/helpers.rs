//! `spawn_app()`: the real application on `127.0.0.1:0`, with typed helpers.

use std::net::SocketAddr;

use colloquy::config::Settings;
use colloquy::{Application, telemetry};
use colloquy_testkit::{TestDatabase, nats_url, unique_prefix};
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running application and what it runs against. Dropping it stops the app and
/// drops its database.
#[derive(Debug)]
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    /// Kept alive for the test's duration (dropping it drops the database).
    #[allow(dead_code, reason = "held for its Drop; not every test reads it")]
    pub db: TestDatabase,
    /// This test's NATS subject prefix and (upper-cased) stream name.
    #[allow(dead_code, reason = "not every test reads it")]
    pub prefix: String,
    pub shutdown: CancellationToken,
    pub server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Polls `/readyz` until it answers 200 (bounded): the NATS connection is made in
    /// the background after start.
    pub async fn wait_until_ready(&self) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let response = self.get("/readyz").await;
            let ready = response.status() == 200;
            let body: serde_json::Value = response.json().await.unwrap();
            if ready {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Cancels the shutdown token and waits for the server to finish.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(server) => server.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings for a test: its own database, NATS subject prefix and stream.
pub fn test_settings(db: &TestDatabase, prefix: &str) -> Settings {
    Settings {
        database_url: Some(SecretString::from(db.url.clone())),
        nats_url: Some(nats_url()),
        subject_prefix: prefix.to_owned(),
        stream: prefix.to_uppercase(),
        shutdown_grace: "5s".into(),
        ..Settings::default()
    }
}

/// Starts the application against fresh dependencies.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the application after `tweak` adjusts its settings.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    telemetry::init_for_tests();
    colloquy::install_crypto_provider();
    let db = TestDatabase::new().await;
    let prefix = unique_prefix();
    let mut settings = test_settings(&db, &prefix);
    tweak(&mut settings);
    let config = settings.validate().expect("test settings are valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::build(config, Some(listener))
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        db,
        prefix,
        shutdown,
        server: Some(server),
    }
}

/// A registered, logged-in user.
#[derive(Debug, Clone)]
#[allow(dead_code, reason = "not every test reads every field")]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub token: String,
}

impl TestApp {
    /// Registers a new user (unique email) and logs them in.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn register_and_login(&self) -> TestUser {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = "correct horse battery staple";
        let response = self
            .client
            .post(self.url("/v1/auth/register"))
            .json(&serde_json::json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "register");
        let registered: serde_json::Value = response.json().await.unwrap();
        let response = self
            .client
            .post(self.url("/v1/auth/login"))
            .json(&serde_json::json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "login");
        let tokens: serde_json::Value = response.json().await.unwrap();
        TestUser {
            id: registered["user_id"].as_str().unwrap().to_owned(),
            email,
            token: tokens["access_token"].as_str().unwrap().to_owned(),
        }
    }

    /// A request to `path` with `user`'s bearer token.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        user: &TestUser,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&user.token)
    }
}
