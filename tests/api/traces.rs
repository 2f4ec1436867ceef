//! One user action is one trace across processes: the real binary runs as three
//! processes (a gateway; a relay and projector; an agent calling the Gemini double, a
//! fourth), each exporting OTLP/HTTP to a receiver this test runs. A message sent with
//! `run_agent` under a known `traceparent` must come back as spans of that one trace
//! from the gateway, the projector and the agent (its Gemini call included). The same
//! workload's logs (info level, every process's stdout and stderr) and every exported
//! span must hold no password, token, key, signing secret or message text.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

/// Everything the receiver was sent, decoded.
type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// An OTLP/HTTP receiver on 127.0.0.1:0 (`POST /v1/traces`, protobuf bodies).
async fn otlp_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        store.lock().unwrap().push(request);
                        (axum::http::StatusCode::OK, Vec::new())
                    }
                    Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// A child process whose output is collected line by line; killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Self {
            name,
            child,
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The first `http://…` URL on a line containing `marker`, waiting up to 60 s.
    async fn url_after(&mut self, marker: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .output()
                .lines()
                .filter(|line| line.contains(marker))
                .find_map(|line| {
                    line.split_whitespace()
                        .find(|w| w.starts_with("http://"))
                        .map(|w| w.trim_end_matches([';', ')']).to_owned())
                });
            if let Some(url) = found {
                return url;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.output());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not print {marker:?}:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `colloquy` with only the settings given here.
fn colloquy() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_colloquy"));
    for key in colloquy::config::KEYS {
        command.env_remove(key);
    }
    for key in [
        "COLLOQUY_CONFIG",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_BSP_SCHEDULE_DELAY",
    ] {
        command.env_remove(key);
    }
    command
}

fn string_attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            Some(Value::IntValue(i)) => Some(i.to_string()),
            _ => None,
        })
}

/// A span of the trace: which process (roles, pid) and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    roles: String,
    pid: String,
    name: String,
}

fn spans_of_trace(received: &Received, trace_id: &[u8]) -> BTreeSet<Seen> {
    let mut seen = BTreeSet::new();
    for request in received.lock().unwrap().iter() {
        for resource_spans in &request.resource_spans {
            let attributes = resource_spans
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default();
            let roles = string_attribute(attributes, "colloquy.roles").unwrap_or_default();
            let pid = string_attribute(attributes, "process.pid").unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    if span.trace_id == trace_id {
                        seen.insert(Seen {
                            roles: roles.clone(),
                            pid: pid.clone(),
                            name: span.name.clone(),
                        });
                    }
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_action_is_one_trace_across_processes_and_nothing_secret_is_logged_or_traced() {
    colloquy::install_crypto_provider();
    let db = colloquy_testkit::TestDatabase::new().await;
    let prefix = colloquy_testkit::unique_prefix();
    let (otlp, received) = otlp_receiver().await;

    // Distinctive secrets, to be found nowhere in the output or the spans.
    let gemini_key = "gemkey-TRACESCAN-7f3c1a9e";
    let jwt_secret = "jwtsecret-TRACESCAN-a-test-secret-well-over-thirty-two-bytes";
    let password = "pw-TRACESCAN-correct horse battery";
    let message = "msg-TRACESCAN-the heron flies at dawn";

    let mut gemini = Proc::spawn("fake-gemini", {
        let mut command = colloquy();
        command.args([
            "dev",
            "fake-gemini",
            "--bind",
            "127.0.0.1:0",
            "--keys",
            &format!("{gemini_key}@trace-project"),
        ]);
        command
    });
    let gemini_url = gemini.url_after("fake Gemini").await;

    let serve = |roles: &str| {
        let mut command = colloquy();
        command
            .args(["serve", "--roles", roles])
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", colloquy_testkit::nats_url())
            .env("COLLOQUY_BIND", "127.0.0.1:0")
            .env("COLLOQUY_SUBJECT_PREFIX", &prefix)
            .env("COLLOQUY_STREAM", prefix.to_uppercase())
            .env("COLLOQUY_JWT_SECRET", jwt_secret)
            .env("GEMINI_BASE_URL", &gemini_url)
            .env(
                "GEMINI_API_KEYS",
                format!("trace={gemini_key}@trace-project"),
            )
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            // Export every 100 ms, so the spans arrive while the test waits.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        command
    };
    // One at a time: each applies the migrations as it starts.
    let mut gateway = Proc::spawn("gateway", serve("gateway"));
    let base = gateway.url_after("colloquy serving").await;
    let mut projector = Proc::spawn("relay+projector", serve("relay,projector"));
    projector.url_after("colloquy serving").await;
    let mut agent = Proc::spawn("agent", serve("agent"));
    agent.url_after("colloquy serving").await;

    // Probes and scrapes, as an orchestrator and a scraper send them: no trace (checked
    // below, once later spans of this gateway have been exported).
    for path in ["/healthz", "/readyz", "/metrics"] {
        let probed = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert!(probed.status().is_success(), "{path}: {}", probed.status());
    }

    // The user action, under a trace the test chose.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!(
        "00-{trace_id}-{}-01",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let client = reqwest::Client::new();
    let credentials = serde_json::json!({"email": "trace@example.com", "password": password});
    let registered = client
        .post(format!("{base}/v1/auth/register"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let login: serde_json::Value = client
        .post(format!("{base}/v1/auth/login"))
        .json(&credentials)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = login["access_token"].as_str().unwrap().to_owned();
    let refresh = login["refresh_token"].as_str().unwrap().to_owned();
    let created: serde_json::Value = client
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(&access)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation = created["id"].as_str().unwrap();
    let sent = client
        .post(format!("{base}/v1/conversations/{conversation}/messages"))
        .bearer_auth(&access)
        .header("traceparent", &traceparent)
        .json(&serde_json::json!({"text": message, "run_agent": true}))
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success(), "{}", sent.status());
    let sent: serde_json::Value = sent.json().await.unwrap();
    let run = sent["run_id"].as_str().unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let shown: serde_json::Value = client
            .get(format!("{base}/v1/runs/{run}"))
            .bearer_auth(&access)
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
            "the run never ended: {shown}\nagent:\n{}",
            agent.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["status"], "succeeded", "{status}");

    // The trace: spans from the gateway, the projector and the agent, its Gemini call
    // among them, in three processes.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let has = |seen: &BTreeSet<Seen>, role: &str, name: &str| {
        seen.iter()
            .any(|s| s.roles.split(',').any(|r| r == role) && s.name.starts_with(name))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = spans_of_trace(&received, &trace_bytes);
        if has(&seen, "gateway", "POST /v1/conversations/")
            && has(&seen, "relay", "relay.publish")
            && has(&seen, "projector", "projection.apply")
            && has(&seen, "agent", "agent.run")
            && has(&seen, "agent", "gemini.stream_generate")
        {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace {trace_id} lacks a process's spans: {seen:#?}\n\
             ({} export requests received)\ngateway:\n{}",
            received.lock().unwrap().len(),
            gateway.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let every_span = format!("{:?}", received.lock().unwrap());
    for probe in ["GET /healthz", "GET /readyz", "GET /metrics"] {
        assert!(
            !every_span.contains(probe),
            "a span for {probe}: probes and scrapes start no trace"
        );
    }
    let processes: BTreeMap<&str, &str> = seen
        .iter()
        .map(|s| (s.pid.as_str(), s.roles.as_str()))
        .collect();
    assert!(
        processes.len() >= 3 && !processes.contains_key(""),
        "one trace, three processes: {processes:?}"
    );

    // Nothing secret anywhere: every process's output (info level) and everything
    // exported (span names, attributes, events, links, resources).
    let exported = format!("{:?}", received.lock().unwrap());
    let secrets = [
        ("the password", password),
        ("the access token", access.as_str()),
        ("the refresh token", refresh.as_str()),
        ("the Gemini key", gemini_key),
        ("the JWT secret", jwt_secret),
        ("the message text", message),
    ];
    for proc in [&gateway, &projector, &agent] {
        let output = proc.output();
        assert!(
            output.contains("colloquy serving"),
            "{}'s output was captured",
            proc.name
        );
        for (what, secret) in secrets {
            assert!(
                !output.contains(secret),
                "{what} is in {}'s output:\n{output}",
                proc.name
            );
        }
    }
    for (what, secret) in secrets {
        assert!(!exported.contains(secret), "{what} is in an exported span");
    }
    // The scans read what they should: attribute values and log lines.
    assert!(exported.contains(run), "the run's id is a span attribute");
    assert!(
        gateway.output().contains("user registered"),
        "info lines are captured"
    );
    drop(gemini);
}
