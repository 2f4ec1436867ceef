//! `colloquy bench sse`: many live-feed subscribers on one gateway.
//!
//! The gateway runs as a child process of this binary (`colloquy serve --roles
//! gateway,relay`, on `127.0.0.1:0`, over a scratch database and a private NATS
//! subject prefix and stream), so that its resident memory is its own: the
//! subscribers live in this process and are reported apart. Each scenario starts a
//! fresh gateway, because an allocator keeps what a previous scenario's connections
//! freed and would blur the next one's figure. Both processes hold one
//! socket per subscriber, so each needs an open-file limit above `--subscribers`
//! (`ulimit -n`); the bench checks its own before it starts.
//!
//! A subscriber is one TCP connection with a hand-written HTTP/1.1 request and a
//! small incremental decoder (chunked transfer coding, then SSE fields): a task and a
//! 1 KiB buffer each, nothing else. Access tokens are signed with the gateway's
//! secret (no Argon2 registration: it is not what is measured).
//!
//! Scenarios (`--scenarios`, both by default), each with `--subscribers` connected:
//!
//! - **spread**: `--users` users with an equal share of the subscribers each, half
//!   on `/v1/events` and half on their conversation's `/v1/conversations/{id}/events`
//!   (within the default per-user cap of 16 streams at the defaults). `--messages`
//!   messages are sent at `--rate` per second, round-robin over the users: every
//!   subscriber of that user receives each of its user's messages.
//! - **hot**: every subscriber belongs to one user and follows one conversation
//!   (half through `/v1/events`); `--hot-messages` messages are sent one every
//!   `--hot-interval`, each delivered to all of them. The per-user stream cap is
//!   raised to `--subscribers` for this (`COLLOQUY_SSE_MAX_STREAMS_PER_USER`, and the
//!   gateway-wide `COLLOQUY_SSE_MAX_STREAMS` and `COLLOQUY_MAX_CONNECTIONS` with it).
//!
//! Delivery latency is the time from the send's HTTP response (the command
//! committed) to a subscriber having read the whole `MessageSent` event; the path is
//! log → relay → NATS → the gateway's hub → each stream. "Whole fan-out" is, per
//! message, the latency of the last of its subscribers. The gateway's resident memory
//! (`VmRSS`) is read from `/proc/<pid>/status` when idle, with every subscriber
//! connected, after the messages were delivered and after the subscribers left; its
//! peak (`VmHWM`) at the end. The cores used by the gateway, this process, Postgres
//! and NATS while messages go out are reported too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colloquy_gateway::auth::{AccessClaims, JwtKeys};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::http::{
    create_conversations, database_url_for, delete_nats_state, http_client, jwt_secret, nats_url,
    private_names, wait_ready,
};
use super::report::{self, Latency, Machine, ProcessMemory, Row, Target};
use super::scratch::ScratchDb;
use crate::config::Settings;

/// Which fan-out to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SseScenario {
    /// Many users, each with a few streams; messages round-robin over the users.
    Spread,
    /// One user's conversation followed by every subscriber.
    Hot,
}

/// Arguments of `colloquy bench sse`.
#[derive(Debug, Clone, clap::Args)]
pub struct SseArgs {
    /// Concurrent SSE subscribers.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub subscribers: u32,
    /// Users in the spread scenario (the subscribers are shared out among them).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub users: u32,
    /// Messages sent in the spread scenario.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub messages: u32,
    /// Messages per second in the spread scenario.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Messages sent in the hot scenario.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub hot_messages: u32,
    /// Time between the hot scenario's messages.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub hot_interval: Duration,
    /// The scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [SseScenario::Spread, SseScenario::Hot])]
    pub scenarios: Vec<SseScenario>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connect_concurrency: u32,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Postgres server to create the scratch database on (default: DATABASE_URL).
    #[arg(long)]
    pub database_url: Option<String>,
    /// NATS server with JetStream (default: NATS_URL).
    #[arg(long)]
    pub nats_url: Option<String>,
}

/// File descriptors needed beyond the subscribers' sockets (pools, NATS, stdio …).
const SPARE_FILES: u64 = 512;

fn progress(args: &SseArgs, message: &str) {
    if !args.json {
        eprintln!("· {message}");
    }
}

/// `colloquy bench sse`.
pub async fn run(url: &str, settings: &Settings, args: &SseArgs) -> anyhow::Result<()> {
    let needed = u64::from(args.subscribers) + SPARE_FILES;
    if let Some(limit) = report::open_files_limit() {
        anyhow::ensure!(
            limit >= needed,
            "{} subscribers need about {needed} open files in this process and in the gateway, but the limit is {limit}: raise it (`ulimit -n {needed}`, or higher) or pass a smaller --subscribers",
            args.subscribers
        );
    }
    let nats_url = nats_url(args.nats_url.as_deref(), settings)?;
    let nats = async_nats::connect(nats_url.as_str())
        .await
        .context("Failed to connect to NATS")?;
    let scratch = ScratchDb::create(url).await?;
    let (prefix, stream) = private_names();
    let spec = ServerSpec {
        database_url: database_url_for(url, scratch.name())?,
        nats_url,
        prefix,
        stream: stream.clone(),
        secret: jwt_secret(),
        max_streams_per_user: args.subscribers,
    };
    let result = tokio::select! {
        result = measure(&spec, &scratch, &nats, args) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("Failed to listen for Ctrl-C")?;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    delete_nats_state(&nats, &stream).await;
    scratch.drop_database().await.ok();
    let (machine, rows, targets, memory) = result?;
    let scenarios: Vec<SseScenario> = args.scenarios.clone();
    report::print(
        &format!(
            "colloquy bench sse: {} subscribers on one gateway (a child process)",
            report::thousands(f64::from(args.subscribers))
        ),
        &machine,
        json!({
            "subscribers": args.subscribers,
            "users": args.users,
            "messages": args.messages,
            "rate": args.rate,
            "hot_messages": args.hot_messages,
            "hot_interval_s": args.hot_interval.as_secs_f64(),
            "scenarios": scenarios,
            "server": "colloquy serve --roles gateway,relay (child process)",
            "sse_max_streams_per_user": args.subscribers,
        }),
        &rows,
        &targets,
        json!({ "memory": memory }),
        args.json,
    )?;
    if !args.json {
        println!("memory (MB, resident):\n{}", memory_text(&memory));
    }
    Ok(())
}

/// How the gateway under test is started.
#[derive(Debug)]
struct ServerSpec {
    database_url: String,
    nats_url: String,
    prefix: String,
    stream: String,
    secret: String,
    max_streams_per_user: u32,
}

/// The gateway under test: a child process of this binary.
#[derive(Debug)]
struct Server {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
}

impl Server {
    /// Starts `colloquy serve --roles gateway,relay` and waits until it listens.
    async fn spawn(spec: &ServerSpec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .args(["serve", "--roles", "gateway,relay"])
            .env("DATABASE_URL", &spec.database_url)
            .env("NATS_URL", &spec.nats_url)
            .env("COLLOQUY_BIND", "127.0.0.1:0")
            .env("COLLOQUY_SUBJECT_PREFIX", &spec.prefix)
            .env("COLLOQUY_STREAM", &spec.stream)
            .env("COLLOQUY_JWT_SECRET", &spec.secret)
            .env_remove("COLLOQUY_JWT_PRIVATE_KEY_FILE")
            .env(
                "COLLOQUY_SSE_MAX_STREAMS_PER_USER",
                spec.max_streams_per_user.to_string(),
            )
            // Every subscriber of the bench, whatever the gateway's caps by default.
            .env(
                "COLLOQUY_SSE_MAX_STREAMS",
                spec.max_streams_per_user.max(10_000).to_string(),
            )
            .env(
                "COLLOQUY_MAX_CONNECTIONS",
                (u64::from(spec.max_streams_per_user) + 1_000)
                    .max(12_288)
                    .to_string(),
            )
            .env("COLLOQUY_COMMANDS_PER_SECOND", "1000000")
            .env("COLLOQUY_COMMAND_BURST", "1000000")
            .env("COLLOQUY_SHUTDOWN_GRACE", "2s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command.spawn().context("Failed to start the gateway")?;
        let pid = child.id().context("the gateway exited at once")?;
        let addr = super::serving_child_addr(&mut child)
            .await
            .context("the gateway")?
            .context("the gateway exited before it listened")?;
        Ok(Self { child, pid, addr })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn memory(&self) -> ProcessMemory {
        ProcessMemory::of(Some(self.pid)).unwrap_or_default()
    }

    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Resident memory at the points the bench looks.
#[derive(Debug, Clone, Default, Serialize)]
struct MemoryReport {
    scenarios: Vec<ScenarioMemory>,
    /// This process's peak: the subscribers of every scenario, one after another.
    client_peak_mb: f64,
}

/// One scenario's memory; each scenario has a fresh gateway.
#[derive(Debug, Clone, Serialize)]
struct ScenarioMemory {
    scenario: SseScenario,
    server_idle: ProcessMemory,
    server_connected: ProcessMemory,
    server_delivered: ProcessMemory,
    server_after_disconnect: ProcessMemory,
    server_peak_mb: f64,
    client_idle: ProcessMemory,
    client_connected: ProcessMemory,
    /// (server connected − server idle) ÷ subscribers, in KB.
    server_kb_per_subscriber: f64,
    client_kb_per_subscriber: f64,
}

fn memory_text(memory: &MemoryReport) -> String {
    let mut out = String::new();
    for s in &memory.scenarios {
        out.push_str(&format!(
            "  {}: gateway {:.0} idle, {:.0} connected ({:.1} KB per subscriber), {:.0} after delivery, {:.0} after disconnecting, peak {:.0}; bench {:.0} idle, {:.0} connected ({:.1} KB per subscriber)\n",
            label(s.scenario),
            s.server_idle.rss_mb,
            s.server_connected.rss_mb,
            s.server_kb_per_subscriber,
            s.server_delivered.rss_mb,
            s.server_after_disconnect.rss_mb,
            s.server_peak_mb,
            s.client_idle.rss_mb,
            s.client_connected.rss_mb,
            s.client_kb_per_subscriber,
        ));
    }
    out.push_str(&format!("  bench peak {:.0}\n", memory.client_peak_mb));
    out
}

/// The users of a scenario and which subscriber follows what.
#[derive(Debug)]
struct Plan {
    /// Per user: `Authorization` value and conversation id.
    users: Vec<(String, String)>,
    /// Per subscriber: (user index, path).
    subscribers: Vec<(usize, String)>,
    /// Subscribers per user.
    fan_out: Vec<u64>,
}

impl Plan {
    fn new(users: Vec<(String, String)>, subscribers: u32) -> Self {
        let count = users.len();
        let mut fan_out = vec![0_u64; count];
        let subscribers = (0..subscribers as usize)
            .map(|j| {
                let user = j % count;
                fan_out[user] += 1;
                let path = if (j / count).is_multiple_of(2) {
                    "/v1/events".to_owned()
                } else {
                    format!("/v1/conversations/{}/events", users[user].1)
                };
                (user, path)
            })
            .collect();
        Self {
            users,
            subscribers,
            fan_out,
        }
    }
}

type Measured = (Machine, Vec<Row>, Vec<Target>, MemoryReport);

async fn measure(
    spec: &ServerSpec,
    scratch: &ScratchDb,
    nats: &async_nats::Client,
    args: &SseArgs,
) -> anyhow::Result<Measured> {
    let pool = scratch.pool(1).await?;
    let mut machine = Machine::probe(&pool).await;
    machine.nats = Some(nats.server_info().version);
    pool.close().await;
    let client = http_client()?;
    let keys = JwtKeys::hs256(spec.secret.as_bytes())?;
    let token =
        || -> anyhow::Result<String> { Ok(keys.sign(&AccessClaims::new(Uuid::new_v4(), false))?) };
    let mut memory = MemoryReport::default();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut least_connected = u64::MAX;
    for scenario in &args.scenarios {
        // A fresh gateway per scenario: its memory is this scenario's alone.
        let mut server = Server::spawn(spec).await?;
        wait_ready(&client, &server.url("/readyz")).await?;
        progress(
            args,
            &format!(
                "{}: gateway pid {} on {}",
                label(*scenario),
                server.pid,
                server.addr
            ),
        );
        let (users, sends) = match scenario {
            SseScenario::Spread => (args.users, Sends::Rate(args.messages, args.rate)),
            SseScenario::Hot => (1, Sends::Every(args.hot_messages, args.hot_interval)),
        };
        // Every user's conversation, created before anyone subscribes.
        let tokens: Vec<String> = (0..users).map(|_| token()).collect::<anyhow::Result<_>>()?;
        let ids = create_conversations(&client, &server.url(""), &tokens, 32).await?;
        let plan = Plan::new(
            tokens
                .iter()
                .zip(ids)
                .map(|(t, id)| (format!("Bearer {t}"), id))
                .collect(),
            args.subscribers,
        );
        // Let the creations pass the hub before anyone subscribes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let server_idle = server.memory();
        let client_idle = ProcessMemory::of(None).unwrap_or_default();
        progress(
            args,
            &format!(
                "{}: connecting {} subscribers",
                label(*scenario),
                plan.subscribers.len()
            ),
        );
        let outcome = one_scenario(&server, &client, &plan, sends, args).await;
        let server_peak_mb = server.memory().peak_rss_mb;
        server.stop().await;
        let outcome = outcome?;
        least_connected = least_connected.min(outcome.connected);
        let subscribers = f64::from(args.subscribers);
        memory.scenarios.push(ScenarioMemory {
            scenario: *scenario,
            server_idle,
            server_connected: outcome.server_connected,
            server_delivered: outcome.server_delivered,
            server_after_disconnect: outcome.server_after_disconnect,
            server_peak_mb,
            client_idle,
            client_connected: outcome.client_connected,
            server_kb_per_subscriber: (outcome.server_connected.rss_mb - server_idle.rss_mb)
                * 1000.0
                / subscribers,
            client_kb_per_subscriber: (outcome.client_connected.rss_mb - client_idle.rss_mb)
                * 1000.0
                / subscribers,
        });
        let name = match scenario {
            SseScenario::Spread => format!(
                "spread: {} subscribers of {} users, {} messages at {}/s",
                report::thousands(f64::from(args.subscribers)),
                report::thousands(plan.users.len() as f64),
                report::thousands(f64::from(args.messages)),
                args.rate
            ),
            SseScenario::Hot => format!(
                "hot: {} subscribers of one conversation, {} messages",
                report::thousands(f64::from(args.subscribers)),
                args.hot_messages
            ),
        };
        let server_rss = outcome
            .server_connected
            .rss_mb
            .max(outcome.server_delivered.rss_mb);
        targets.push(Target {
            name: format!("{}: p99 delivery", label(*scenario)),
            value: outcome.latency.p99_ms,
            unit: "ms",
            target: "≤ 100 ms".to_owned(),
            met: outcome.latency.p99_ms <= 100.0 && outcome.missing == 0,
        });
        targets.push(Target {
            name: format!("{}: gateway RSS with every subscriber", label(*scenario)),
            value: server_rss,
            unit: "MB",
            target: "≤ 300 MB".to_owned(),
            met: server_rss <= 300.0,
        });
        rows.push(outcome.row(scenario_key(*scenario), name));
    }
    targets.insert(
        0,
        Target {
            name: "concurrent subscribers on one gateway".to_owned(),
            value: count(least_connected),
            unit: "streams",
            target: "≥ 10,000".to_owned(),
            met: least_connected >= 10_000,
        },
    );
    memory.client_peak_mb = ProcessMemory::of(None).unwrap_or_default().peak_rss_mb;
    machine.load_after = report::load_average();
    Ok((machine, rows, targets, memory))
}

/// A count as a target's value.
#[expect(clippy::cast_precision_loss, reason = "counts for humans")]
fn count(n: u64) -> f64 {
    n as f64
}

fn label(scenario: SseScenario) -> &'static str {
    match scenario {
        SseScenario::Spread => "spread",
        SseScenario::Hot => "hot",
    }
}

fn scenario_key(scenario: SseScenario) -> &'static str {
    match scenario {
        SseScenario::Spread => "sse_spread",
        SseScenario::Hot => "sse_hot",
    }
}

/// How a scenario sends its messages.
#[derive(Debug, Clone, Copy)]
enum Sends {
    /// This many, at this rate per second, round-robin over the users.
    Rate(u32, u32),
    /// This many, one per interval, all by the first user.
    Every(u32, Duration),
}

/// What one scenario measured.
#[derive(Debug)]
struct ScenarioOutcome {
    connected: u64,
    connect_failures: u64,
    first_error: Option<String>,
    connect_time: Duration,
    sent: u64,
    send_errors: u64,
    send_seconds: f64,
    expected: u64,
    delivered: u64,
    missing: u64,
    early: u64,
    closed_by_server: u64,
    latency: Latency,
    whole_fan_out: Latency,
    server_connected: ProcessMemory,
    server_delivered: ProcessMemory,
    server_after_disconnect: ProcessMemory,
    client_connected: ProcessMemory,
    server_cpu_seconds: f64,
    /// From the first send until the deliveries were in (or given up on).
    busy_seconds: f64,
    /// Cores used meanwhile by this process (the subscribers), Postgres and NATS.
    cpu: report::CpuUse,
}

impl ScenarioOutcome {
    fn row(&self, key: &'static str, name: String) -> Row {
        #[expect(clippy::cast_precision_loss, reason = "rates for humans")]
        let per_sec = self.delivered as f64 / self.send_seconds.max(1e-9);
        let mut notes = vec![
            format!(
                "{} connected in {:.1} s",
                report::thousands(self.connected as f64),
                self.connect_time.as_secs_f64()
            ),
            format!(
                "whole fan-out p50 {:.1} / p99 {:.1} ms",
                self.whole_fan_out.p50_ms, self.whole_fan_out.p99_ms
            ),
            format!(
                "gateway RSS {:.0} MB connected, {:.0} after delivery",
                self.server_connected.rss_mb, self.server_delivered.rss_mb
            ),
            format!(
                "gateway {:.2} cores, {}",
                self.server_cpu_seconds / self.busy_seconds.max(1e-9),
                self.cpu.text("subscribers")
            ),
        ];
        if self.missing > 0 {
            notes.push(format!("{} deliveries missing", self.missing));
        }
        if self.closed_by_server > 0 {
            notes.push(format!(
                "{} streams ended by the gateway",
                self.closed_by_server
            ));
        }
        if self.connect_failures > 0 {
            notes.push(format!("{} connections failed", self.connect_failures));
        }
        Row {
            key,
            name,
            events: self.delivered,
            seconds: self.send_seconds,
            events_per_sec: per_sec,
            latency_of: "delivery",
            latency: self.latency,
            ratio_to_raw: None,
            errors: self.missing + self.connect_failures + self.send_errors,
            first_error: self.first_error.clone(),
            details: json!({
                "connected": self.connected,
                "connect_failures": self.connect_failures,
                "connect_seconds": self.connect_time.as_secs_f64(),
                "messages_sent": self.sent,
                "send_errors": self.send_errors,
                "deliveries_expected": self.expected,
                "deliveries": self.delivered,
                "deliveries_missing": self.missing,
                "delivered_before_the_response": self.early,
                "streams_ended_by_the_gateway": self.closed_by_server,
                "whole_fan_out": self.whole_fan_out,
                "gateway_cpu_seconds": self.server_cpu_seconds,
                "busy_seconds": self.busy_seconds,
                "gateway_cores": self.server_cpu_seconds / self.busy_seconds.max(1e-9),
                "other_cores": self.cpu,
            }),
            notes: notes.join("; "),
        }
    }
}

/// Per subscriber: the positions it received `MessageSent` at, and whether the
/// gateway ended the stream.
type Received = (Vec<(i64, Instant)>, bool);

async fn one_scenario(
    server: &Server,
    client: &reqwest::Client,
    plan: &Plan,
    sends: Sends,
    args: &SseArgs,
) -> anyhow::Result<ScenarioOutcome> {
    let stop = CancellationToken::new();
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let gate = Arc::new(Semaphore::new(args.connect_concurrency as usize));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(plan.subscribers.len());
    for (user, path) in &plan.subscribers {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nAccept: text/event-stream\r\n\r\n",
            server.addr, plan.users[*user].0
        );
        let (addr, stop, gate) = (server.addr, stop.clone(), Arc::clone(&gate));
        let (connected, failed, received) = (
            Arc::clone(&connected),
            Arc::clone(&failed),
            Arc::clone(&received),
        );
        let first_error = Arc::clone(&first_error);
        tasks.push(tokio::spawn(async move {
            let opened = {
                let _permit = gate.acquire().await;
                open_stream(addr, &request).await
            };
            drop(request);
            match opened {
                Ok((stream, decoder)) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    follow(stream, decoder, &stop, &received).await
                }
                Err(error) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert_with(|| format!("{error:#}"));
                    (Vec::new(), false)
                }
            }
        }));
    }
    let total = plan.subscribers.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "subscribers still connecting after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = started.elapsed();
    progress(
        args,
        &format!(
            "{} connected, {} failed, in {connect_time:.1?}",
            connected.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        ),
    );
    // Let the connections settle (the last ones' first bytes, allocator caches).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server_connected = server.memory();
    let client_connected = ProcessMemory::of(None).unwrap_or_default();

    // The messages, and the instant each one's response arrived, by position.
    let sent_at: Arc<Mutex<HashMap<i64, (Instant, usize)>>> = Arc::default();
    let send_errors = Arc::new(AtomicU64::new(0));
    let cpu_before = report::cpu_seconds(Some(server.pid));
    let others = report::CpuMark::now();
    let sending = Instant::now();
    let mut senders = Vec::new();
    let (count, period) = match sends {
        Sends::Rate(count, rate) => (count, Duration::from_secs_f64(1.0 / f64::from(rate))),
        Sends::Every(count, interval) => (count, interval),
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..count as usize {
        ticker.tick().await;
        let user = n % plan.users.len();
        let (authorization, conversation) = plan.users[user].clone();
        let request = client
            .post(server.url(&format!("/v1/conversations/{conversation}/messages")))
            .header(reqwest::header::AUTHORIZATION, authorization)
            .json(&json!({ "text": format!("live message {n}") }));
        let (sent_at, send_errors) = (Arc::clone(&sent_at), Arc::clone(&send_errors));
        senders.push(tokio::spawn(async move {
            let position = async {
                let response = request.send().await.ok()?;
                if response.status() != 201 {
                    return None;
                }
                response
                    .headers()
                    .get("x-colloquy-position")?
                    .to_str()
                    .ok()?
                    .parse::<i64>()
                    .ok()
            }
            .await;
            match position {
                Some(position) => {
                    sent_at
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(position, (Instant::now(), user));
                }
                None => {
                    send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for sender in senders {
        let _ = sender.await;
    }
    let send_seconds = sending.elapsed().as_secs_f64();
    let failed_sends = send_errors.load(Ordering::Relaxed);
    // Every subscriber of a message's user is owed it (failed sends owe nothing).
    let expected: u64 = sent_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .map(|(_, user)| plan.fan_out[*user])
        .sum();
    // Wait for the deliveries: all of them, or 5 s without progress.
    let mut last = (received.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = received.load(Ordering::Relaxed);
        if now >= expected {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_cpu_seconds = match (cpu_before, report::cpu_seconds(Some(server.pid))) {
        (Some(before), Some(after)) => after - before,
        _ => 0.0,
    };
    let cpu = report::CpuUse::since(others);
    let busy_seconds = sending.elapsed().as_secs_f64();
    let server_delivered = server.memory();

    stop.cancel();
    let mut samples = Vec::new();
    let mut closed_by_server = 0_u64;
    for task in tasks {
        if let Ok((received, closed)) = task.await {
            samples.extend(received);
            closed_by_server += u64::from(closed);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_after_disconnect = server.memory();

    let sent_at = sent_at.lock().unwrap_or_else(PoisonError::into_inner);
    let mut histogram = report::histogram();
    let mut slowest: HashMap<i64, Duration> = HashMap::new();
    let (mut delivered, mut early) = (0_u64, 0_u64);
    for (position, at) in samples {
        let Some((sent, _)) = sent_at.get(&position) else {
            continue;
        };
        delivered += 1;
        if at < *sent {
            early += 1;
        }
        let latency = at.saturating_duration_since(*sent);
        report::record(&mut histogram, latency);
        let entry = slowest.entry(position).or_default();
        *entry = (*entry).max(latency);
    }
    let mut whole = report::histogram();
    for latency in slowest.values() {
        report::record(&mut whole, *latency);
    }
    let first_error = first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(ScenarioOutcome {
        connected: connected.load(Ordering::Relaxed),
        connect_failures: failed.load(Ordering::Relaxed),
        first_error,
        connect_time,
        sent: sent_at.len() as u64,
        send_errors: failed_sends,
        send_seconds,
        expected,
        delivered,
        missing: expected.saturating_sub(delivered),
        early,
        closed_by_server,
        latency: Latency::of(&histogram),
        whole_fan_out: Latency::of(&whole),
        server_connected,
        server_delivered,
        server_after_disconnect,
        client_connected,
        server_cpu_seconds,
        busy_seconds,
        cpu,
    })
}

/// Opens one SSE stream: connects, sends `request`, reads the response head and
/// checks it is a 200 event stream.
async fn open_stream(addr: SocketAddr, request: &str) -> anyhow::Result<(TcpStream, Decoder)> {
    let mut stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0_u8; 1024];
    loop {
        let n = stream.read(&mut buffer).await?;
        anyhow::ensure!(n > 0, "the gateway closed the connection before answering");
        head.extend_from_slice(&buffer[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let status = text.lines().next().unwrap_or_default().to_owned();
            anyhow::ensure!(
                status.split_whitespace().nth(1) == Some("200"),
                "the stream was refused: {status}"
            );
            let chunked = text.contains("transfer-encoding: chunked");
            let mut decoder = Decoder::new(chunked);
            decoder.raw.extend_from_slice(&head[end + 4..]);
            return Ok((stream, decoder));
        }
        anyhow::ensure!(head.len() < 16 * 1024, "response head too long");
    }
}

/// Reads a stream until `stop`, noting when each `MessageSent` arrived.
async fn follow(
    mut stream: TcpStream,
    mut decoder: Decoder,
    stop: &CancellationToken,
    received: &AtomicU64,
) -> Received {
    let mut seen = Vec::new();
    let mut buffer = [0_u8; 1024];
    let mut note = |decoder: &mut Decoder, at: Instant| {
        for position in decoder.events() {
            seen.push((position, at));
            received.fetch_add(1, Ordering::Relaxed);
        }
    };
    note(&mut decoder, Instant::now());
    loop {
        tokio::select! {
            () = stop.cancelled() => return (seen, false),
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return (seen, true),
                Ok(n) => {
                    let at = Instant::now();
                    decoder.raw.extend_from_slice(&buffer[..n]);
                    note(&mut decoder, at);
                }
            },
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where the chunked-coding decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes to go.
    Data(usize),
    /// This many bytes of the CRLF after the data to go.
    Crlf(usize),
    /// The last chunk was read.
    Done,
}

/// An incremental decoder of an SSE response body, chunked or not.
#[derive(Debug)]
struct Decoder {
    chunked: bool,
    state: Chunk,
    /// Received bytes not decoded yet.
    raw: Vec<u8>,
    /// Decoded body not yet split into events.
    text: Vec<u8>,
}

impl Decoder {
    fn new(chunked: bool) -> Self {
        Self {
            chunked,
            state: Chunk::Size,
            raw: Vec::new(),
            text: Vec::new(),
        }
    }

    /// The positions (`id:`) of the complete `MessageSent` events decoded so far.
    fn events(&mut self) -> Vec<i64> {
        self.dechunk();
        let mut positions = Vec::new();
        while let Some(end) = find(&self.text, b"\n\n") {
            let block: Vec<u8> = self.text.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut id = None;
            let mut event = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().parse::<i64>().ok();
                } else if let Some(value) = line.strip_prefix("event:") {
                    event = Some(value.trim().to_owned());
                }
            }
            if let (Some(id), Some("MessageSent")) = (id, event.as_deref()) {
                positions.push(id);
            }
        }
        positions
    }

    fn dechunk(&mut self) {
        if !self.chunked {
            self.text.append(&mut self.raw);
            return;
        }
        loop {
            match self.state {
                Chunk::Size => {
                    let Some(end) = find(&self.raw, b"\r\n") else {
                        return;
                    };
                    let line = String::from_utf8_lossy(&self.raw[..end]).into_owned();
                    self.raw.drain(..end + 2);
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(size, 16).unwrap_or(0);
                    self.state = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if self.raw.is_empty() {
                        return;
                    }
                    let take = left.min(self.raw.len());
                    self.text.extend(self.raw.drain(..take));
                    self.state = if take == left {
                        Chunk::Crlf(2)
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::Crlf(left) => {
                    if self.raw.is_empty() {
                        return;
                    }
                    let take = left.min(self.raw.len());
                    self.raw.drain(..take);
                    self.state = if take == left {
                        Chunk::Size
                    } else {
                        Chunk::Crlf(left - take)
                    };
                }
                Chunk::Done => {
                    self.raw.clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(body: &str, sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body.as_bytes();
        for size in sizes.iter().copied().chain(std::iter::repeat(usize::MAX)) {
            if rest.is_empty() {
                break;
            }
            let take = size.min(rest.len());
            out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
            out.extend_from_slice(&rest[..take]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[take..];
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn message_events_are_found_across_any_split() {
        let body = ": heartbeat\n\nid: 7\nevent: MessageSent\ndata: {\"a\":1}\n\nid: 8\nevent: ConversationRenamed\ndata: {}\n\nid: 9\nevent: MessageSent\ndata: {}\n\n";
        let wire = chunked(body, &[5, 17, 3]);
        for step in [1, 2, 7, 64, wire.len()] {
            let mut decoder = Decoder::new(true);
            let mut found = Vec::new();
            for piece in wire.chunks(step) {
                decoder.raw.extend_from_slice(piece);
                found.extend(decoder.events());
            }
            assert_eq!(found, [7, 9], "read {step} bytes at a time");
        }
        let mut plain = Decoder::new(false);
        plain.raw.extend_from_slice(body.as_bytes());
        assert_eq!(plain.events(), [7, 9]);
    }

    #[test]
    fn plans_share_subscribers_among_users() {
        let users = (0..3)
            .map(|n| (format!("Bearer {n}"), format!("c{n}")))
            .collect();
        let plan = Plan::new(users, 10);
        assert_eq!(plan.fan_out, [4, 3, 3]);
        assert_eq!(plan.subscribers[0], (0, "/v1/events".to_owned()));
        assert_eq!(
            plan.subscribers[3],
            (0, "/v1/conversations/c0/events".to_owned())
        );
    }
}
