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

// ---------------------------------------------------------------- admin --

/// The JWT secret the app and the CLI share in the admin tests.
const ADMIN_JWT_SECRET: &str = "a test secret that is at least thirty-two bytes long";

/// Waits for a child process without stopping the application under test: the app runs
/// in this test's runtime, and a worker blocked on a child would freeze whichever of its
/// tasks it holds — with the embedded mode, possibly in the middle of a SQLite write
/// transaction that the child then waits for. The CLI tests run on a multi-threaded
/// runtime, so the blocked worker's tasks move to another.
trait OutputInPlace {
    fn output_in_place(&mut self) -> std::io::Result<std::process::Output>;
}

impl OutputInPlace for Command {
    fn output_in_place(&mut self) -> std::io::Result<std::process::Output> {
        tokio::task::block_in_place(|| self.output())
    }
}

/// `colloquy admin …` against the app's database and NATS prefix.
fn admin(app: &crate::helpers::TestApp) -> Command {
    let mut command = colloquy();
    command
        .arg("admin")
        .env("DATABASE_URL", app.db.url())
        .env("NATS_URL", colloquy_testkit::nats_url())
        .env("COLLOQUY_SUBJECT_PREFIX", &app.prefix)
        .env("COLLOQUY_STREAM", app.prefix.to_uppercase())
        .env("COLLOQUY_JWT_SECRET", ADMIN_JWT_SECRET);
    command
}

/// Runs `command`, asserting success; its stdout as JSON.
fn json_of(command: &mut Command) -> serde_json::Value {
    let output = command.output_in_place().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_users_create_and_a_cli_token_opens_the_admin_routes() {
    use std::io::Write as _;
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.jwt_secret = Some(secrecy::SecretString::from(ADMIN_JWT_SECRET));
    })
    .await;
    let email = format!("ops-{}@example.com", uuid::Uuid::new_v4().simple());
    let mut child = admin(&app)
        .args([
            "users",
            "create",
            "--email",
            &email,
            "--password-stdin",
            "--admin",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a long enough password\n")
        .unwrap();
    let output = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(created["email"], email.as_str());
    assert_eq!(created["is_admin"], true);
    // The password works on the app's login.
    let login = app
        .client
        .post(app.url("/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": "a long enough password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);

    let issued = admin(&app)
        .args(["tokens", "issue", &email, "--ttl", "1h"])
        .output_in_place()
        .unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let token = String::from_utf8(issued.stdout).unwrap().trim().to_owned();
    let listed = app
        .client
        .get(app.url("/v1/admin/projections"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    // Revoked: a new token lacks the role; granted again by email: it has it.
    let id = created["id"].as_str().unwrap();
    let revoked = json_of(admin(&app).args(["users", "revoke-admin", id, "--json"]));
    assert_eq!(revoked["is_admin"], false);
    let issued = json_of(admin(&app).args(["tokens", "issue", id, "--json"]));
    assert_eq!(issued["admin"], false);
    let forbidden = app
        .client
        .get(app.url("/v1/admin/projections"))
        .bearer_auth(issued["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let granted = json_of(admin(&app).args(["users", "grant-admin", &email, "--json"]));
    assert_eq!(granted["is_admin"], true);

    // Disabled: login answers as for a wrong password, and no token is issued.
    let disabled = json_of(admin(&app).args(["users", "disable", &email, "--json"]));
    assert_eq!(disabled["disabled"], true);
    let login = app
        .client
        .post(app.url("/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": "a long enough password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 401);
    let refused = admin(&app)
        .args(["tokens", "issue", &email])
        .output_in_place()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));

    // The projections' status, as a table and as JSON.
    let status = json_of(admin(&app).args(["projections", "status", "--json"]));
    assert_eq!(status["items"].as_array().unwrap().len(), 3, "{status}");
    let table = admin(&app)
        .args(["projections", "status"])
        .output_in_place()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("CHECKPOINT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_streams_read_and_events_tail_show_what_a_command_wrote() {
    let app = crate::helpers::spawn_app().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    app.send_message(&user, &conversation, "hello from the log", false)
        .await;
    let tail =
        json_of(admin(&app).args(["events", "tail", "--category", "conversation", "--json"]));
    let items = tail["items"].as_array().unwrap();
    let sent = items
        .iter()
        .find(|e| e["type"] == "MessageSent")
        .unwrap_or_else(|| panic!("{tail}"));
    assert_eq!(sent["data"]["text"], "hello from the log", "{sent}");
    let stream = sent["stream_name"].as_str().unwrap();
    assert!(stream.contains(&conversation), "{stream}");
    let only = json_of(admin(&app).args([
        "events",
        "tail",
        "--category",
        "conversation",
        "--type",
        "MessageSent",
        "--json",
    ]));
    assert_eq!(only["items"].as_array().unwrap().len(), 1, "{only}");

    let read = json_of(admin(&app).args(["streams", "read", stream, "--json"]));
    let types: Vec<&str> = read["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(types.contains(&"MessageSent"), "{read}");
    let from_one = json_of(admin(&app).args(["streams", "read", stream, "--from", "1", "--json"]));
    assert_eq!(from_one["items"][0]["position"], 1, "{from_one}");
    let table = admin(&app)
        .args(["streams", "read", stream])
        .output_in_place()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("MessageSent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_runs_lists_and_retries_a_dead_letter() {
    let app = crate::helpers::app_without_agent().await;
    let user = app.register_and_login().await;
    let (_fake, agent) = crate::admin::failing_agent(&app).await;
    let (run, _) = crate::admin::dead_letter(&app, &user, &agent).await;
    let run = run.as_uuid().to_string();

    let listed = json_of(admin(&app).args(["runs", "dead-letters", "--json"]));
    assert_eq!(listed["items"][0]["id"], run.as_str(), "{listed}");
    let table = admin(&app)
        .args(["runs", "dead-letters"])
        .output_in_place()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains(&run));

    let retried = json_of(admin(&app).args(["runs", "retry", &run, "--json"]));
    assert_eq!(retried["run_id"], run.as_str(), "{retried}");
    // No longer a dead letter: a second retry fails.
    let again = admin(&app)
        .args(["runs", "retry", &run])
        .output_in_place()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));

    // An unknown id is a failure (1); a malformed one is bad usage (2).
    let unknown = admin(&app)
        .args(["runs", "retry", &uuid::Uuid::new_v4().to_string()])
        .output_in_place()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no run"));
    let malformed = admin(&app)
        .args(["runs", "retry", "not-a-uuid"])
        .output_in_place()
        .unwrap();
    assert_eq!(malformed.status.code(), Some(2));
    let unknown_user = admin(&app)
        .args(["users", "grant-admin", "nobody@example.com"])
        .output_in_place()
        .unwrap();
    assert_eq!(unknown_user.status.code(), Some(1));
    let no_subcommand = admin(&app).args(["runs"]).output_in_place().unwrap();
    assert_eq!(no_subcommand.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_status_never_prints_a_key() {
    let app = crate::helpers::app_without_agent().await;
    let keys = "main=AIzaSecretKeyOne@proj-a,spare=AIzaSecretKeyTwo@proj-b";
    for args in [&["keys", "status"][..], &["keys", "status", "--json"][..]] {
        let output = admin(&app)
            .args(args)
            .env("GEMINI_API_KEYS", keys)
            .output_in_place()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}{stderr}");
        assert!(
            stdout.contains("main") && stdout.contains("spare"),
            "{stdout}"
        );
        for secret in ["AIzaSecretKeyOne", "AIzaSecretKeyTwo"] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{secret} leaked"
            );
        }
    }
    let help = colloquy()
        .args(["admin", "keys", "recheck", "--help"])
        .output_in_place()
        .unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("label"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_events_tail_follow_prints_new_events_as_they_are_committed() {
    use std::io::BufRead as _;
    let app = crate::helpers::spawn_app().await;
    let user = app.register_and_login().await;
    let mut child = admin(&app)
        .args([
            "events",
            "tail",
            "--follow",
            "--json",
            "--category",
            "conversation",
            "--type",
            "MessageSent",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let conversation = app.create_conversation(&user).await;
    app.send_message(&user, &conversation, "followed", false)
        .await;
    let line = tokio::task::spawn_blocking(move || {
        received.recv_timeout(std::time::Duration::from_secs(20))
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(&line.expect("an event within 20 s")).unwrap();
    assert_eq!(event["type"], "MessageSent", "{event}");
    assert_eq!(event["data"]["text"], "followed", "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_recheck_disables_a_rejected_key_and_status_shows_it() {
    use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini};
    let app = crate::helpers::app_without_agent().await;
    let fake = FakeGemini::start(FakeConfig::default().key("fake-key-1", "proj-a"))
        .await
        .unwrap();
    let keyed = |command: &mut Command| {
        command.env("GEMINI_BASE_URL", fake.base_url()).env(
            "GEMINI_API_KEYS",
            "main=fake-key-1@proj-a,stale=AIzaRevokedKey@proj-b",
        );
    };
    // The fake answers on this test's runtime: the CLI waits on another thread.
    let mut recheck = admin(&app);
    recheck.args(["keys", "recheck", "--json"]);
    keyed(&mut recheck);
    let checked = tokio::task::spawn_blocking(move || json_of(&mut recheck))
        .await
        .unwrap();
    let result_of = |label: &str| {
        checked["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["label"] == label)
            .map(|item| item["result"].clone())
    };
    assert_eq!(result_of("main"), Some("usable".into()), "{checked}");
    assert_eq!(result_of("stale"), Some("rejected".into()), "{checked}");
    assert!(!checked.to_string().contains("AIzaRevokedKey"));

    let mut status = admin(&app);
    status.args(["keys", "status", "--json"]);
    keyed(&mut status);
    let shown = json_of(&mut status);
    let stale = shown["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["label"] == "stale")
        .cloned()
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(stale["state"], "disabled", "{stale}");

    let mut unknown = admin(&app);
    unknown.args(["keys", "recheck", "nope"]);
    keyed(&mut unknown);
    let unknown = tokio::task::spawn_blocking(move || unknown.output().unwrap())
        .await
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_issue_signs_with_the_private_key_file() {
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("gateway/src/auth/testdata/ed25519.pem");
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.jwt_private_key_file = Some(key.clone());
    })
    .await;
    let user = app.register_and_login().await;
    let issued = json_of(
        admin(&app)
            .env_remove("COLLOQUY_JWT_SECRET")
            .env("COLLOQUY_JWT_PRIVATE_KEY_FILE", &key)
            .args(["tokens", "issue", &user.email, "--json"]),
    );
    let token = issued["access_token"].as_str().unwrap();
    let me = app
        .client
        .get(app.url("/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200, "the gateway accepts the CLI's token");
    let body: serde_json::Value = me.json().await.unwrap();
    assert_eq!(
        body["id"].as_str().or(body["user_id"].as_str()),
        Some(user.id.as_str()),
        "{body}"
    );
}

/// Every event id and position the JetStream stream `name` holds, in stream order, once
/// it holds position `until`.
async fn stream_events(name: &str, until: i64) -> Vec<(String, i64)> {
    let client = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut held = Vec::new();
        if let Ok(mut stream) = js.get_stream(name).await {
            let state = stream.info().await.unwrap().state.clone();
            for sequence in state.first_sequence..=state.last_sequence {
                if let Ok(message) = stream.get_raw_message(sequence).await {
                    let event: serde_json::Value =
                        serde_json::from_slice(&message.payload).unwrap();
                    held.push((
                        event["id"].as_str().unwrap().to_owned(),
                        event["globalPosition"].as_i64().unwrap(),
                    ));
                }
            }
        }
        if held.iter().any(|(_, position)| *position >= until) {
            return held;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never held position {until}: {held:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// docs/OPERATIONS.md, "Backup and restore", step by step: `pg_dump`, more writes (lost
/// with the restore), `pg_restore` into a fresh database, `colloquy admin after-restore`,
/// start again. Positions rewind to the backup's; nothing points at the lost events: the
/// JetStream stream holds exactly the restored log (then the new events), the read
/// models equal a replay, and new commands continue from the restored head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_rewinds_positions_and_the_stream() {
    use colloquy_eventstore::LogFilter;
    let mut app = crate::helpers::spawn_app().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    for text in ["one", "two", "three"] {
        app.send_message(&user, &conversation, text, false).await;
    }
    let backed_up = app.store.head().await.unwrap();
    let stream = app.prefix.to_uppercase();
    stream_events(&stream, backed_up).await;

    let dir = std::env::temp_dir().join(format!("colloquy-backup-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("colloquy.dump");
    let output = Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&dump)
        .arg(app.db.url())
        .output_in_place()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Written after the backup: the restore loses them, and the stream has them.
    for text in ["lost four", "lost five"] {
        app.send_message(&user, &conversation, text, false).await;
    }
    let lost_head = app.store.head().await.unwrap();
    assert!(lost_head > backed_up);
    stream_events(&stream, lost_head).await;
    app.stop().await.unwrap();

    // A fresh database, the dump restored into it.
    let restored = colloquy_testkit::TestDatabase::empty().await;
    let output = Command::new("pg_restore")
        .args(["--no-owner", "--dbname", &restored.url])
        .arg(&dump)
        .output_in_place()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut after = colloquy();
    after
        .args(["admin", "after-restore", "--json"])
        .env("DATABASE_URL", &restored.url)
        .env("NATS_URL", colloquy_testkit::nats_url())
        .env("COLLOQUY_SUBJECT_PREFIX", &app.prefix)
        .env("COLLOQUY_STREAM", &stream);
    let report = json_of(&mut after);
    assert_eq!(report["log_head"], backed_up, "{report}");
    assert_eq!(report["stream_deleted"], true, "{report}");
    assert_eq!(report["rebuilt"], serde_json::json!([]), "{report}");

    // Start again on the restored database, with the same NATS stream.
    let prefix = app.prefix.clone();
    let url = restored.url.clone();
    let app = crate::helpers::spawn_app_with(move |settings| {
        settings.database_url = Some(secrecy::SecretString::from(url));
        settings.subject_prefix = prefix.clone();
        settings.stream = prefix.to_uppercase();
    })
    .await;
    let user = app.login(&user.id, &user.email).await;
    let sent = app.send_message(&user, &conversation, "after", false).await;
    let position = sent["position"].as_i64().unwrap();
    assert!(
        position > backed_up && position <= lost_head,
        "positions rewound: {sent}"
    );

    let log = app
        .store
        .read_log(&LogFilter::All, 0, 100_000)
        .await
        .unwrap();
    let expected: Vec<(String, i64)> = log
        .iter()
        .map(|e| (e.id.to_string(), e.global_position))
        .collect();
    assert_eq!(stream_events(&stream, position).await, expected);

    let pool = sqlx::PgPool::connect(&restored.url).await.unwrap();
    let db = colloquy_eventstore::Database::Postgres(pool.clone());
    crate::helpers::read_models_reach(&db, position, std::time::Duration::from_secs(30)).await;
    crate::helpers::assert_read_models_equal_a_replay(&db, &app.store).await;
    let texts: Vec<String> = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conversation}/messages"),
            &user,
        )
        .header("X-Colloquy-Min-Position", position.to_string())
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["one", "two", "three", "after"]);
    pool.close().await;
}

// ----------------------------------------------------------------- help --

/// The entries of `--help`'s `Commands:`, `Options:` and `Arguments:` sections, each as
/// (section, name, description). Clap prints a description beside the name, or (when
/// any entry has a long description) on the lines under it, indented further.
fn help_entries(help: &str) -> Vec<(String, String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut section: Option<&str> = None;
    let mut entries = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.is_empty() && !line.starts_with(' ') {
            section = ["Commands:", "Options:", "Arguments:"]
                .into_iter()
                .find(|s| line == s);
            continue;
        }
        let Some(section) = section else { continue };
        let indent = line.len() - line.trim_start().len();
        if line.trim().is_empty() || indent > 6 {
            continue; // a blank line or a description's line
        }
        let entry = line.trim();
        let (name, mut description) = match entry.split_once("  ") {
            Some((name, description)) => (name.trim(), description.trim().to_owned()),
            None => (entry, String::new()),
        };
        if description.is_empty()
            && let Some(next) = lines.get(i + 1)
            && next.len() - next.trim_start().len() > indent
        {
            description = next.trim().to_owned();
        }
        entries.push((section.to_owned(), name.to_owned(), description));
    }
    entries
}

/// `colloquy --help` and every subcommand's, through the whole tree: every command,
/// option and argument says what it is.
#[test]
fn every_commands_help_describes_every_command_option_and_argument() {
    let mut pending = vec![Vec::<String>::new()];
    let mut walked = 0;
    let mut missing = Vec::new();
    while let Some(path) = pending.pop() {
        let output = colloquy().args(&path).arg("--help").output().unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(output.status.success(), "colloquy {path:?} --help: {help}");
        let entries = help_entries(&help);
        assert!(
            entries.iter().any(|(_, name, _)| name.contains("--help")),
            "colloquy {path:?} --help was read: {help}"
        );
        walked += 1;
        for (section, name, description) in entries {
            if description.is_empty() {
                missing.push(format!("colloquy {} — {section} {name}", path.join(" ")));
            }
            if section == "Commands:" && name != "help" {
                let mut child = path.clone();
                child.push(name);
                pending.push(child);
            }
        }
    }
    // The tree: the top level, its commands and theirs (admin's, bench's, dev's, …).
    assert!(walked > 20, "walked only {walked} commands");
    assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
}

/// `colloquy bench append` end to end, in a tiny run: every write scenario appears, with
/// its ratio to the raw INSERT ceiling measured in the same run, the group-commit batch
/// sizes of both stores (with and without gathering), the reads, and the targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_append_measures_the_store_against_the_raw_ceiling_in_one_run() {
    if crate::helpers::embedded() {
        return; // Postgres only; the external-mode run covers it.
    }
    let report = json_of(colloquy().args([
        "bench",
        "append",
        "--writers",
        "4",
        "--events",
        "200",
        "--rounds",
        "1",
        "--warmup",
        "50ms",
        "--read-events",
        "500",
        "--conversation-events",
        "50",
        "--json",
        "--database-url",
        &colloquy_testkit::admin_url(),
    ]));
    let rows: std::collections::BTreeMap<&str, &serde_json::Value> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["key"].as_str().unwrap(), row))
        .collect();
    for key in [
        "distinct_streams",
        "distinct_streams_no_gathering",
        "contended_streams",
        "raw_ceiling",
        "write_message",
    ] {
        let row = rows
            .get(key)
            .unwrap_or_else(|| panic!("no {key}: {report}"));
        assert_eq!(row["events"], 200, "{key}: {row}");
        assert_eq!(row["errors"], 0, "{key}: {row}");
        assert!(row["ratio_to_raw"].as_f64().unwrap() > 0.0, "{key}: {row}");
    }
    assert_eq!(rows["raw_ceiling"]["ratio_to_raw"], 1.0);
    for key in ["distinct_streams", "distinct_streams_no_gathering"] {
        let batches = &rows[key]["details"]["group_commit"];
        assert!(batches["mean"].as_f64().unwrap() >= 1.0, "{key}: {batches}");
    }
    for key in ["bulk_append", "read_all", "conversation_load"] {
        assert!(rows.contains_key(key), "no {key}: {report}");
    }
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3, "{report}");
}
