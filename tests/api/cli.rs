//! The binary's own command line, run as a user would.

use std::process::Command;

fn colloquy() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_colloquy"));
    // Start from a clean slate: only what each test sets.
    for key in colloquy::config::KEYS {
        command.env_remove(key);
    }
    command.env_remove("COLLOQUY_CONFIG");
    command
}

#[test]
fn config_prints_the_effective_settings_with_secrets_redacted() {
    let output = colloquy()
        .arg("config")
        .env(
            "DATABASE_URL",
            "postgres://app:pg-secret-1@db:5432/colloquy",
        )
        .env("NATS_URL", "nats://127.0.0.1:4222")
        .env("COLLOQUY_JWT_SECRET", "jwt-secret-2")
        .env(
            "GEMINI_API_KEYS",
            "main=AIzaSecret3@project-a,spare=AIzaSecret4@project-b",
        )
        .env("COLLOQUY_BIND", "0.0.0.0:9000")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    for secret in ["pg-secret-1", "jwt-secret-2", "AIzaSecret3", "AIzaSecret4"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    assert!(stdout.contains("COLLOQUY_BIND = 0.0.0.0:9000"), "{stdout}");
    assert!(
        stdout.contains("GEMINI_API_KEYS = main=[redacted]@project-a,spare=[redacted]@project-b")
    );
    assert!(stdout.contains("DATABASE_URL = postgres://app:[redacted]@db:5432/colloquy"));
}

#[test]
fn config_reads_the_file_and_the_environment_wins() {
    let dir = std::env::temp_dir().join(format!("colloquy-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("colloquy.toml");
    std::fs::write(
        &file,
        "COLLOQUY_BIND = \"127.0.0.1:7000\"\nGEMINI_MODEL = \"from-file\"\n",
    )
    .unwrap();
    let output = colloquy()
        .args(["--config", file.to_str().unwrap(), "config", "--json"])
        .env("GEMINI_MODEL", "from-env")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(output.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["COLLOQUY_BIND"], "127.0.0.1:7000");
    assert_eq!(shown["GEMINI_MODEL"], "from-env");
}

#[test]
fn a_bad_setting_fails_at_start_and_names_the_key() {
    let output = colloquy()
        .arg("serve")
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("NATS_URL", "nats://127.0.0.1:4222")
        .env("COLLOQUY_DUPLICATE_WINDOW", "forever")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("COLLOQUY_DUPLICATE_WINDOW"), "{stderr}");
}

#[test]
fn external_mode_refuses_to_start_without_postgres() {
    let output = colloquy().args(["serve", "--external"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

#[tokio::test]
async fn replay_rebuilds_and_verify_finds_no_difference_then_finds_tampering() {
    use std::sync::Arc;

    use colloquy_commands::cache::CacheConfig;
    use colloquy_commands::{Commands, Context};
    use colloquy_domain::{ConversationCommand, ConversationId, MessageId, MessageText, UserId};
    use colloquy_eventstore::{EventStore, PgEventStore, PgOptions};

    let db = colloquy_testkit::TestDatabase::new().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::with_pool(
        db.pool().await,
        PgOptions::default(),
    ));
    let commands = Commands::new(store, CacheConfig::default());
    let owner = UserId::from_uuid(uuid::Uuid::new_v4());
    let id = ConversationId::from_uuid(uuid::Uuid::new_v4());
    let ctx = Context::new(owner);
    commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner,
                title: None,
                system_prompt: None,
                model: None,
            },
            &ctx,
        )
        .await
        .unwrap();
    for n in 0..5 {
        commands
            .conversation(
                id,
                ConversationCommand::SendMessage {
                    message_id: MessageId::from_uuid(uuid::Uuid::new_v4()),
                    by: owner,
                    text: MessageText::parse(format!("message {n}")).unwrap(),
                },
                &ctx,
            )
            .await
            .unwrap();
    }
    let run = |args: &[&str]| {
        colloquy()
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", "nats://127.0.0.1:4222")
            .output()
            .unwrap()
    };
    let rebuilt = run(&["replay", "--all"]);
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(
        rebuilt.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(
        stdout.contains("messages: rebuilt to position 6"),
        "{stdout}"
    );
    let pool = db.pool().await;
    let count: i32 = sqlx::query_scalar("SELECT message_count FROM rm_messages.conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 5);
    let verified = run(&["replay", "--all", "--verify"]);
    assert!(verified.status.success());
    assert_eq!(
        String::from_utf8_lossy(&verified.stdout)
            .matches("no difference")
            .count(),
        3
    );
    sqlx::query("UPDATE rm_messages.messages SET text = 'tampered' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    let tampered = run(&["replay", "messages", "--verify"]);
    assert!(!tampered.status.success(), "a difference is a failure exit");
    assert!(String::from_utf8_lossy(&tampered.stdout).contains("messages: messages changed"));
}

#[tokio::test]
async fn dev_fake_gemini_serves_the_wire_format_and_knows_its_keys() {
    use std::io::BufRead as _;
    colloquy::install_crypto_provider();
    let mut child = colloquy()
        .args([
            "dev",
            "fake-gemini",
            "--bind",
            "127.0.0.1:0",
            "--keys",
            "try-key@try-project",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("test double"), "labelled as fake: {first}");
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    let call = |key: &'static str| {
        client
            .post(format!(
                "{url}/v1beta/models/gemini-2.5-flash:generateContent"
            ))
            .header("x-goog-api-key", key)
            .json(&serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
            .send()
    };
    let known = call("try-key").await.unwrap();
    assert_eq!(known.status(), 200);
    let body: serde_json::Value = known.json().await.unwrap();
    assert_eq!(
        body["candidates"][0]["content"]["parts"][0]["text"],
        "echo: hi"
    );
    let unknown = call("other-key").await.unwrap();
    assert_eq!(unknown.status(), 400);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn serve_with_the_gemini_double_answers_a_run() {
    use std::io::BufRead as _;
    colloquy::install_crypto_provider();
    let db = colloquy_testkit::TestDatabase::new().await;
    let prefix = colloquy_testkit::unique_prefix();
    let mut child = colloquy()
        .args(["serve", "--fake-gemini"])
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", colloquy_testkit::nats_url())
        .env("COLLOQUY_BIND", "127.0.0.1:0")
        .env("COLLOQUY_SUBJECT_PREFIX", &prefix)
        .env("COLLOQUY_STREAM", prefix.to_uppercase())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("Gemini double"), "labelled: {first}");
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches(';')
        .to_owned();
    let client = reqwest::Client::new();
    let post = |path: &str, token: Option<&str>, body: serde_json::Value| {
        let mut request = client.post(format!("{base}{path}")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let credentials =
        serde_json::json!({"email": "try@example.com", "password": "a long enough password"});
    assert_eq!(
        post("/v1/auth/register", None, credentials.clone())
            .await
            .unwrap()
            .status(),
        201
    );
    let login: serde_json::Value = post("/v1/auth/login", None, credentials)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let created: serde_json::Value = post("/v1/conversations", Some(&token), serde_json::json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let sent: serde_json::Value = post(
        &format!("/v1/conversations/{id}/messages"),
        Some(&token),
        serde_json::json!({"text": "ping", "run_agent": true}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let run = sent["run_id"].as_str().unwrap();
    // Wait on the run's state, bounded.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let shown: serde_json::Value = client
            .get(format!("{base}/v1/runs/{run}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if shown["status"] == "succeeded" || shown["status"] == "failed" {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never ended: {shown}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status["status"], "succeeded", "{status}");
}
