//! Test support shared by every crate's tests.
//!
//! - [`TestDatabase`]: a fresh Postgres database per test, cloned from a template
//!   that is migrated once per migration set (creating a database from a template is
//!   a file copy, far cheaper than running the migrations). Dropped when the test ends.
//! - [`nats_url`] and [`unique_prefix`]: each test gets its own NATS subject prefix and
//!   stream name on the test server.
//! - [`proxy::FaultProxy`]: a TCP proxy that refuses or black-holes a shared server's
//!   traffic for one test (outage tests).
//!
//! Environment: `COLLOQUY_TEST_DATABASE_URL` (an admin URL; default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `COLLOQUY_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`). `scripts/test` starts a current `nats-server` and sets it.

pub mod proxy;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

/// The admin connection for creating and dropping test databases.
pub fn admin_url() -> String {
    std::env::var("COLLOQUY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("COLLOQUY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A short unique token for a test's NATS subject prefix and stream name.
pub fn unique_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A fresh, migrated database, dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

fn migrations_fingerprint() -> String {
    let mut hasher = DefaultHasher::new();
    for migration in colloquy_eventstore::postgres::MIGRATOR.iter() {
        migration.version.hash(&mut hasher);
        migration.checksum.hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

fn url_for(database: &str) -> String {
    let admin = admin_url();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("BUG: admin URL has a database path");
    format!("{base}/{database}")
}

async fn admin() -> PgConnection {
    let options: PgConnectOptions = admin_url()
        .parse()
        .expect("COLLOQUY_TEST_DATABASE_URL is a URL");
    options
        .connect()
        .await
        .expect("test Postgres is reachable (is it running? see scripts/test)")
}

impl TestDatabase {
    /// An empty database (no migrations), dropped like the others: for restoring a dump
    /// into.
    pub async fn empty() -> Self {
        let mut admin = admin().await;
        let name = format!("colloquy_test_{}", Uuid::new_v4().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create an empty test database");
        let _ = admin.close().await;
        let url = url_for(&name);
        Self { name, url }
    }

    /// Creates a database from the migrated template (creating the template first if
    /// this migration set has none yet; concurrent test processes serialise on an
    /// advisory lock so only one migrates it).
    pub async fn new() -> Self {
        let template = format!("colloquy_tpl_{}", migrations_fingerprint());
        let mut admin = admin().await;
        sqlx::query("SELECT pg_advisory_lock(4242424242)")
            .execute(&mut admin)
            .await
            .expect("advisory lock");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&template)
                .fetch_one(&mut admin)
                .await
                .expect("query pg_database");
        if !exists {
            let building = format!("{template}_building");
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {building} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await;
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {building}")))
                .execute(&mut admin)
                .await
                .expect("create template database");
            {
                let pool = PgPool::connect(&url_for(&building))
                    .await
                    .expect("connect to template");
                colloquy_eventstore::postgres::migrate(&pool)
                    .await
                    .expect("migrations apply to a fresh database");
                pool.close().await;
            }
            sqlx::query(AssertSqlSafe(format!(
                "ALTER DATABASE {building} RENAME TO {template}"
            )))
            .execute(&mut admin)
            .await
            .expect("rename template");
        }
        sqlx::query("SELECT pg_advisory_unlock(4242424242)")
            .execute(&mut admin)
            .await
            .expect("advisory unlock");
        let name = format!("colloquy_test_{}", Uuid::new_v4().simple());
        sqlx::query(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE {template}"
        )))
        .execute(&mut admin)
        .await
        .expect("create test database from template");
        // ALTER DATABASE … SET settings are not copied by a template clone.
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {name} SET search_path TO \"$user\", public, message_store"
        )))
        .execute(&mut admin)
        .await
        .expect("set search path");
        let _ = admin.close().await;
        let url = url_for(&name);
        Self { name, url }
    }

    /// A small pool on this database. Tests run in parallel against one server whose
    /// connection limit is shared (100 by default), so each pool stays small.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(6)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a private one on a thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping a test database");
            runtime.block_on(async move {
                let mut admin = admin().await;
                let _ = sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await;
            });
        })
        .join();
    }
}

/// A private `nats-server` with JetStream, for tests that stop and restart NATS.
/// Uses `COLLOQUY_TEST_NATS_BIN` (set by `scripts/test` to a current server), else the
/// `nats-server` on the PATH. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    binary: String,
    pub port: u16,
    store: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts connections.
    pub async fn start() -> Self {
        let binary =
            std::env::var("COLLOQUY_TEST_NATS_BIN").unwrap_or_else(|_| "nats-server".to_owned());
        Self::start_binary(binary).await
    }

    /// As [`NatsServer::start`], with the server binary at `binary` (e.g. an older
    /// release, to show what works on it).
    pub async fn start_binary(binary: impl Into<String>) -> Self {
        let binary = binary.into();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = std::env::temp_dir().join(format!("colloquy-nats-{}", Uuid::new_v4().simple()));
        let mut server = Self {
            binary,
            port,
            store,
            child: None,
        };
        server.restart().await;
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would; JetStream data stays on disk).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts it again on the same port with an empty store: a server that
    /// comes back without its JetStream data (a replaced node, a lost volume).
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
        self.restart().await;
    }

    /// Starts it again on the same port and storage, waiting until it listens.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (set COLLOQUY_TEST_NATS_BIN): {e}",
                    self.binary
                )
            });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start listening"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
