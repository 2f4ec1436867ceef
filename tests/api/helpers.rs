//! `spawn_app()`: the real application on `127.0.0.1:0`, with typed helpers; and
//! agents of a test's own against the fake Gemini (`agent_for`).
//!
//! The suite runs against either backend: Postgres + NATS by default, or the embedded
//! mode (one SQLite file, no broker) with `COLLOQUY_TEST_BACKEND=sqlite`. Tests of
//! what only the external mode has (the relay, JetStream, Message DB's SQL functions)
//! call `app.db.pool()`, which is Postgres-only; `scripts/test` leaves them out of the
//! embedded run.

use std::net::SocketAddr;
use std::sync::Arc;

use colloquy::config::Settings;
use colloquy::{Application, telemetry};
use colloquy_commands::Commands;
use colloquy_commands::cache::CacheConfig;
use colloquy_domain::RunId;
use colloquy_eventstore::{Database, EventStore};
use colloquy_gemini_agent::budget::MemoryBudgetStore;
use colloquy_gemini_agent::clock::SystemClock;
use colloquy_gemini_agent::fake::FakeGemini;
use colloquy_gemini_agent::gemini::{GeminiClient, GeminiConfig};
use colloquy_gemini_agent::keys::{KeyPool, PoolConfig, PoolKey};
use colloquy_gemini_agent::worker::{Agent, AgentSettings, BoxError, Checkpoint, Transport};
use colloquy_testkit::{TestDatabase, nats_url, unique_prefix};
use secrecy::SecretString;
use serde_json::Value;
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
    pub db: TestDb,
    /// The application's own event store (appends through it wake the app at once).
    #[allow(dead_code, reason = "not every test reads it")]
    pub store: Arc<dyn EventStore>,
    /// The embedded mode's in-memory run signals (`None` with NATS).
    #[allow(dead_code, reason = "not every test reads it")]
    pub signals: Option<colloquy_commands::live::LocalSignals>,
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

/// Whether this run of the suite is against the embedded mode.
pub fn embedded() -> bool {
    std::env::var("COLLOQUY_TEST_BACKEND").is_ok_and(|b| b == "sqlite")
}

/// A test's own database: a Postgres database, or a SQLite file in a directory of its
/// own (removed when dropped).
#[derive(Debug)]
pub enum TestDb {
    Postgres(TestDatabase),
    Sqlite(SqliteDir),
}

/// A temporary directory holding a test's SQLite file.
#[derive(Debug)]
pub struct SqliteDir(pub std::path::PathBuf);

impl Drop for SqliteDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestDb {
    async fn new() -> Self {
        if embedded() {
            let dir = std::env::temp_dir()
                .join(format!("colloquy-test-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            Self::Sqlite(SqliteDir(dir))
        } else {
            Self::Postgres(TestDatabase::new().await)
        }
    }

    /// The `DATABASE_URL` the application gets.
    pub fn url(&self) -> String {
        match self {
            Self::Postgres(db) => db.url.clone(),
            Self::Sqlite(dir) => format!(
                "sqlite://{}?mode=rwc",
                dir.0.join("colloquy.sqlite").display()
            ),
        }
    }

    /// A Postgres pool on the test's database: for tests of what only the external
    /// mode has.
    pub async fn pool(&self) -> sqlx::PgPool {
        match self {
            Self::Postgres(db) => db.pool().await,
            Self::Sqlite(_) => {
                panic!("this test needs Postgres (run it without COLLOQUY_TEST_BACKEND=sqlite)")
            }
        }
    }

    /// A pool on the test's database, either backend.
    pub async fn database(&self) -> Database {
        match self {
            Self::Postgres(db) => Database::Postgres(db.pool().await),
            Self::Sqlite(_) => Database::Sqlite(
                colloquy_eventstore::sqlite::open_url(&self.url())
                    .await
                    .unwrap(),
            ),
        }
    }
}

/// Settings for a test: its own database, NATS subject prefix and stream.
pub fn test_settings(db: &TestDb, prefix: &str) -> Settings {
    Settings {
        database_url: Some(SecretString::from(db.url())),
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
    spawn(tweak, colloquy::app::all_roles()).await
}

/// Starts the application running only `roles`.
#[allow(dead_code, reason = "not every test module uses it")]
pub async fn spawn_app_with_roles(roles: std::collections::BTreeSet<colloquy::Role>) -> TestApp {
    spawn(|_| {}, roles).await
}

async fn spawn(
    tweak: impl FnOnce(&mut Settings),
    roles: std::collections::BTreeSet<colloquy::Role>,
) -> TestApp {
    telemetry::init_for_tests();
    colloquy::install_crypto_provider();
    let db = TestDb::new().await;
    let prefix = unique_prefix();
    let mut settings = test_settings(&db, &prefix);
    tweak(&mut settings);
    let config = settings.validate().expect("test settings are valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::build_with_roles(config, Some(listener), roles)
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let store = app.store();
    let signals = app.local_signals();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        db,
        store,
        signals,
        prefix,
        shutdown,
        server: Some(server),
    }
}

/// Every test user's password.
const TEST_PASSWORD: &str = "correct horse battery staple";

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
        let response = self
            .client
            .post(self.url("/v1/auth/register"))
            .json(&serde_json::json!({ "email": email, "password": TEST_PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "register");
        let registered: serde_json::Value = response.json().await.unwrap();
        self.login(registered["user_id"].as_str().unwrap(), &email)
            .await
    }

    /// Registers a new user, gives them the admin role in the test's database (the
    /// users table's `is_admin`, which login copies into the token) and logs them in.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn register_admin(&self) -> TestUser {
        let user = self.register_and_login().await;
        let id = uuid::Uuid::parse_str(&user.id).unwrap();
        match self.db.database().await {
            Database::Postgres(pool) => {
                sqlx::query("UPDATE colloquy.users SET is_admin = true WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            Database::Sqlite(pool) => {
                sqlx::query("UPDATE colloquy_users SET is_admin = true WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
        self.login(&user.id, &user.email).await
    }

    /// Logs an existing test user in again (a restarted app, say).
    pub async fn login(&self, id: &str, email: &str) -> TestUser {
        let response = self
            .client
            .post(self.url("/v1/auth/login"))
            .json(&serde_json::json!({ "email": email, "password": TEST_PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "login");
        let tokens: serde_json::Value = response.json().await.unwrap();
        TestUser {
            id: id.to_owned(),
            email: email.to_owned(),
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

impl TestApp {
    /// Creates a conversation for `user`; returns its id.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn create_conversation(&self, user: &TestUser) -> String {
        let response = self
            .request(reqwest::Method::POST, "/v1/conversations", user)
            .json(&serde_json::json!({ "title": "live" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "create a conversation");
        let body: serde_json::Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Sends `text` in `conversation` (with `extra` merged into the body); returns the
    /// command's body (`message_id`, `position`, …).
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn send_message(
        &self,
        user: &TestUser,
        conversation: &str,
        text: &str,
        run_agent: bool,
    ) -> serde_json::Value {
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/conversations/{conversation}/messages"),
                user,
            )
            .json(&serde_json::json!({ "text": text, "run_agent": run_agent }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "send a message");
        response.json().await.unwrap()
    }

    /// A conversation's messages once the messages read model has reached `position`.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn messages_at(
        &self,
        user: &TestUser,
        conversation: &str,
        position: i64,
    ) -> Vec<serde_json::Value> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/conversations/{conversation}/messages"),
                user,
            )
            .header("X-Colloquy-Min-Position", position.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET the messages at {position}");
        let body: serde_json::Value = response.json().await.unwrap();
        body["items"].as_array().unwrap().clone()
    }

    /// Opens an SSE stream at `path` (after `last_event_id`, if given).
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn sse(
        &self,
        path: &str,
        user: &TestUser,
        last_event_id: Option<i64>,
    ) -> reqwest::Response {
        let mut request = self
            .request(reqwest::Method::GET, path, user)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        request.send().await.unwrap()
    }
}

/// One parsed server-sent event.
#[derive(Debug, Default, Clone)]
#[allow(dead_code, reason = "not every test reads every field")]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comments: Vec<String>,
}

impl SseEvent {
    /// `id:` as a global position.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub fn position(&self) -> i64 {
        self.id.as_deref().unwrap().parse().unwrap()
    }

    /// `data:` as JSON.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// A reader of an SSE response body.
#[allow(dead_code, reason = "not every test module uses it")]
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl std::fmt::Debug for SseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseReader").finish_non_exhaustive()
    }
}

#[allow(dead_code, reason = "not every test module uses it")]
impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200, "an SSE stream opens");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event that is not a bare heartbeat comment; `None` when the server
    /// ended the stream. Panics if nothing arrives within 20 s.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures::StreamExt as _;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "" => event.comments.push(value.to_owned()),
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                event.data = data.join("\n");
                if event.id.is_none()
                    && event.event.is_none()
                    && data.is_empty()
                    && event.retry.is_none()
                {
                    continue;
                }
                return Some(event);
            }
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), self.body.next())
                .await
                .expect("an SSE event within 20 s");
            match chunk {
                Some(chunk) => self
                    .buffer
                    .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
                None => return None,
            }
        }
    }

    /// The next event of type `event` (others are skipped).
    pub async fn next_of(&mut self, event: &str) -> SseEvent {
        loop {
            let next = self.next().await.expect("the stream goes on");
            if next.event.as_deref() == Some(event) {
                return next;
            }
        }
    }

    /// A run stream read to its outcome (`completed`, `failed` or `cancelled`), with
    /// every event before it.
    #[allow(dead_code, reason = "not every test module uses it")]
    pub async fn outcome(&mut self) -> (SseEvent, Vec<SseEvent>) {
        let mut seen = Vec::new();
        while let Some(event) = self.next().await {
            if matches!(
                event.event.as_deref(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return (event, seen);
            }
            seen.push(event);
        }
        panic!("the run stream ended without an outcome: {seen:#?}");
    }
}

/// The fake Gemini's generation calls so far.
#[allow(dead_code, reason = "not every test module uses it")]
pub fn generation_calls(fake: &FakeGemini) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.action.as_deref() == Some("streamGenerateContent"))
        .count()
}

// ---------------------------------------------------------------- agent --

/// An agent of the test's own, beside the application's (or instead of it), with the
/// fake's key `fake-key-1@proj-a` and `settings` (prefix and stream are the app's).
pub async fn agent_for(app: &TestApp, fake: &FakeGemini, settings: AgentSettings) -> Agent {
    let transport = match &app.signals {
        Some(signals) => Transport::Log {
            signals: signals.clone(),
            checkpoint: Arc::new(NoCheckpoint),
        },
        None => Transport::Nats(
            async_nats::connect(colloquy_testkit::nats_url())
                .await
                .unwrap(),
        ),
    };
    let pool = KeyPool::new(
        PoolConfig::new(vec![PoolKey::new("main", "fake-key-1", "proj-a")]),
        Arc::new(MemoryBudgetStore::new()),
        Arc::new(SystemClock),
    )
    .unwrap();
    Agent::new(
        Commands::new(Arc::clone(&app.store), CacheConfig::default()),
        GeminiClient::new(GeminiConfig {
            base_url: fake.base_url(),
            ..GeminiConfig::default()
        })
        .unwrap(),
        Some(Arc::new(pool)),
        transport,
        AgentSettings {
            prefix: app.prefix.clone(),
            stream: app.prefix.to_uppercase(),
            ..settings
        },
    )
}

/// A test agent's place in the log: it is driven through `handle` and `sweep`, never
/// by tailing the log.
#[derive(Debug)]
struct NoCheckpoint;

#[async_trait::async_trait]
impl Checkpoint for NoCheckpoint {
    async fn load(&self) -> Result<i64, BoxError> {
        Ok(0)
    }

    async fn save(&self, _: i64) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The application without its agent: runs stay queued until a test's agent acts.
pub async fn app_without_agent() -> TestApp {
    spawn_app_with_roles(
        [
            colloquy::Role::Gateway,
            colloquy::Role::Relay,
            colloquy::Role::Projector,
        ]
        .into_iter()
        .collect(),
    )
    .await
}

/// A queued run (its request applied to the runs read model); returns its id.
pub async fn queued_run(app: &TestApp, user: &TestUser) -> RunId {
    let conversation = app.create_conversation(user).await;
    let sent = app
        .send_message(user, &conversation, "are you there?", true)
        .await;
    let run_id = sent["run_id"].as_str().unwrap().to_owned();
    let response = app
        .request(reqwest::Method::GET, &format!("/v1/runs/{run_id}"), user)
        .header("X-Colloquy-Min-Position", sent["position"].to_string())
        .send()
        .await
        .unwrap();
    let run: Value = response.json().await.unwrap();
    assert_eq!(run["status"], "queued");
    RunId::from_uuid(run_id.parse().unwrap())
}

/// The run as `GET /v1/runs/{id}` shows it once the runs read model has reached the
/// log's head.
pub async fn run_status(app: &TestApp, user: &TestUser, run: RunId) -> Value {
    // The run's last event position, read from the log, is what the read model must reach.
    let position = app.store.head().await.unwrap();
    app.request(
        reqwest::Method::GET,
        &format!("/v1/runs/{}", run.as_uuid()),
        user,
    )
    .header("X-Colloquy-Min-Position", position.to_string())
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

/// Waits (bounded by `within`) until every read model in `db` has applied the log up to
/// `position`.
pub async fn read_models_reach(db: &Database, position: i64, within: std::time::Duration) {
    for projection in colloquy_projections::all_projections() {
        assert!(
            colloquy_projections::wait::wait_for_position(
                db,
                projection.schema(),
                position,
                within
            )
            .await
            .unwrap(),
            "{} reached {position}",
            projection.name()
        );
    }
}

/// `replay --verify` of every projection in `db`: no difference from a fresh rebuild
/// from `store`.
pub async fn assert_read_models_equal_a_replay(db: &Database, store: &Arc<dyn EventStore>) {
    for projection in colloquy_projections::all_projections() {
        let differences =
            colloquy_projections::replay::verify(db, store, projection.as_ref(), &|_, _| {})
                .await
                .unwrap();
        assert!(
            differences.is_empty(),
            "{}: {differences:?}",
            projection.name()
        );
    }
}

/// The `/metrics` page, parsed: what the metrics tests read, and what other tests wait
/// on.
pub mod metrics {
    use std::collections::BTreeMap;

    use super::TestApp;

    /// One sample of the text format: `name{label="value",…} value`.
    #[derive(Debug, Clone)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A scraped page.
    #[derive(Debug)]
    pub struct Page {
        pub text: String,
        pub samples: Vec<Sample>,
    }

    impl Page {
        pub fn parse(text: String) -> Self {
            let samples = text
                .lines()
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(|line| parse_sample(line).unwrap_or_else(|| panic!("unparsable: {line}")))
                .collect();
            Self { text, samples }
        }

        /// The samples of `name` carrying every label of `labels`.
        pub fn matching<'a>(
            &'a self,
            name: &'a str,
            labels: &'a [(&str, &str)],
        ) -> impl Iterator<Item = &'a Sample> + 'a {
            self.samples.iter().filter(move |s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
        }

        /// The sum of the samples of `name` carrying `labels`, if there is any.
        pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let mut found = self.matching(name, labels).peekable();
            found.peek()?;
            Some(found.map(|s| s.value).sum())
        }

        /// As [`Page::find`], failing the test when there is no such sample.
        pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            self.find(name, labels).unwrap_or_else(|| {
                let family: Vec<_> = self.samples.iter().filter(|s| s.name == name).collect();
                panic!("no {name} with {labels:?}; the family: {family:#?}")
            })
        }
    }

    /// Parses `name{k="v",…} value` (label values may hold braces, commas and escapes).
    pub fn parse_sample(line: &str) -> Option<Sample> {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return None,
        };
        let mut labels = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        if chars.peek() == Some(&'{') {
            chars.next();
            loop {
                match chars.peek()? {
                    '}' => {
                        chars.next();
                        break;
                    }
                    ',' => {
                        chars.next();
                        continue;
                    }
                    _ => {}
                }
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                if chars.next()? != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
            }
        }
        let value: String = chars.collect();
        let value = value.split_whitespace().next()?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    /// `GET /metrics`, checked to be the text format.
    pub async fn scrape(app: &TestApp) -> Page {
        let response = app.get("/metrics").await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Page::parse(response.text().await.unwrap())
    }
}
