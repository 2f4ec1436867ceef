//! `colloquy bench http`: the gateway's request latency and throughput.
//!
//! The application runs in this process (roles gateway, relay and projector, as
//! `colloquy serve` runs them by default, minus the agent) on `127.0.0.1:0`, over a
//! scratch database and a private NATS subject prefix and stream. The load generator
//! is in the same process: on a small machine it competes with the server (and with
//! Postgres and NATS) for the same cores, which the figures include; the cores used
//! by this process, by Postgres and by NATS are reported with each scenario so that
//! the shares are visible.
//!
//! Users are not registered: the bench signs access tokens with the application's
//! own JWT secret, as login does, so that Argon2 (deliberately slow, and not what
//! is measured) stays out of the set-up. The per-user command rate limit is raised for
//! the run (`COLLOQUY_COMMANDS_PER_SECOND` / `COLLOQUY_COMMAND_BURST`), so that the
//! load is spread over many users without being refused.
//!
//! Scenarios, in order:
//!
//! 1. **send-message, open loop**: `POST /v1/conversations/{id}/messages` at `--rate`
//!    requests per second for `--duration`, round-robin over `--users` ×
//!    `--conversations-per-user` conversations. Each request is timed from the moment
//!    the schedule says it should be sent, so a stalled server is charged for the
//!    requests that queue behind it (no coordinated omission).
//! 2. **send-message, saturation**: `--clients` closed-loop clients, each sending its
//!    next request when the last one answers; throughput is what the server sustains.
//! 3. **GET a page, open loop**: `GET /v1/conversations/{id}/messages?limit=50` over
//!    `--page-conversations` conversations filled with 50 messages each beforehand,
//!    at `--page-rate` per second, once the read model has caught up with the sends.
//! 4. **GET a page, saturation**: the same with `--clients` closed-loop clients.
//!
//! A warm-up of `--warmup` (sends at `--rate`, not recorded) comes first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colloquy_gateway::auth::{AccessClaims, JwtKeys};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::report::{self, Latency, Machine, Row};
use super::scratch::ScratchDb;
use crate::app::{Application, Role};
use crate::config::Settings;

/// Arguments of `colloquy bench http`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Requests per second of the open-loop scenarios.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// How long each scenario is measured.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unrecorded sends at `--rate` before the first scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Users the load is spread over.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub users: u32,
    /// Conversations per user that messages are sent to.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub conversations_per_user: u32,
    /// Requests per second of the open-loop page scenario.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub page_rate: u32,
    /// Conversations of 50 messages that pages are read from.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub page_conversations: u32,
    /// Concurrent closed-loop clients of the saturation scenarios.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4_096))]
    pub clients: u32,
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

/// Messages in each page conversation, and the page size read.
const PAGE: usize = 50;

/// The NATS server to use: `--nats-url`, else the configured `NATS_URL`.
pub(super) fn nats_url(flag: Option<&str>, settings: &Settings) -> anyhow::Result<String> {
    flag.map(str::to_owned)
        .or_else(|| settings.nats_url.clone())
        .filter(|url| !url.trim().is_empty())
        .context("this benchmark needs NATS: set NATS_URL or pass --nats-url")
}

/// `url` (a `postgres://` URL) with its database replaced by `database`: the scratch
/// database's URL, for the application's own settings.
pub(super) fn database_url_for(url: &str, database: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("the database URL has no scheme")?;
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let authority = location.split_once('/').map_or(location, |(a, _)| a);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// A random HS256 secret for a bench application: the bench signs its users' tokens
/// with it.
pub(super) fn jwt_secret() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// A private NATS subject prefix and its (upper-case) stream name, so that nothing
/// a deployment on the same server uses is touched.
pub(super) fn private_names() -> (String, String) {
    let prefix = format!("bench_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let stream = prefix.to_uppercase();
    (prefix, stream)
}

/// An HTTP client for load: no overall pool limit, no proxy from the environment.
pub(super) fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("Failed to build the HTTP client")
}

/// The application under test, in this process, on `127.0.0.1:0`.
#[derive(Debug)]
pub(super) struct BenchApp {
    pub addr: SocketAddr,
    /// The NATS subject prefix (and, upper-cased, the stream) of this run.
    pub prefix: String,
    pub stream: String,
    keys: JwtKeys,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

impl BenchApp {
    /// Builds and starts the application with `roles` over `database_url`, after
    /// `tweak` adjusts its settings (which start from `base` with the database, NATS,
    /// a private prefix and stream and a fresh JWT secret set).
    pub async fn start(
        base: &Settings,
        database_url: &str,
        nats_url: &str,
        roles: BTreeSet<Role>,
        tweak: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let (prefix, stream) = private_names();
        let secret = jwt_secret();
        let mut settings = base.clone();
        settings.database_url = Some(SecretString::from(database_url.to_owned()));
        settings.nats_url = Some(nats_url.to_owned());
        settings.subject_prefix.clone_from(&prefix);
        settings.stream.clone_from(&stream);
        settings.jwt_secret = Some(SecretString::from(secret.clone()));
        settings.jwt_private_key_file = None;
        settings.shutdown_grace = "2s".into();
        tweak(&mut settings);
        let config = settings.validate()?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("Failed to bind 127.0.0.1:0")?;
        let app = Application::build_with_roles(config, Some(listener), roles).await?;
        let addr = app.local_addr();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Ok(Self {
            addr,
            prefix,
            stream,
            keys: JwtKeys::hs256(secret.as_bytes())?,
            shutdown,
            server,
        })
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An access token for `user`, as login would issue it.
    pub fn token(&self, user: Uuid) -> anyhow::Result<String> {
        Ok(self.keys.sign(&AccessClaims::new(user, false))?)
    }

    /// Waits (bounded) until `/readyz` answers 200.
    pub async fn wait_ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        wait_ready(client, &self.url("/readyz")).await
    }

    /// Stops the application and deletes its JetStream stream (and the agent's
    /// budget buckets, if any were made).
    pub async fn stop(self, nats: &async_nats::Client) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        delete_nats_state(nats, &self.stream).await;
    }
}

/// Deletes what a bench run left on the NATS server: its stream and the agent's
/// key-value buckets (`<stream>_budgets`, `<stream>_budgets_health`).
pub(super) async fn delete_nats_state(nats: &async_nats::Client, stream: &str) {
    let js = async_nats::jetstream::new(nats.clone());
    let _ = js.delete_stream(stream).await;
    let _ = js.delete_key_value(format!("{stream}_budgets")).await;
    let _ = js
        .delete_key_value(format!("{stream}_budgets_health"))
        .await;
}

/// Polls `url` (a `/readyz`) until it answers 200, for at most 60 s.
pub(super) async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match client.get(url).send().await {
            Ok(response) if response.status() == 200 => return Ok(()),
            Ok(response) => format!("{}: {}", response.status(), response.text().await?),
            Err(error) => error.to_string(),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "the application did not become ready in 60 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates one conversation for each `(user's token)`, `concurrency` at a time;
/// returns their ids in the same order.
pub(super) async fn create_conversations(
    client: &reqwest::Client,
    base: &str,
    tokens: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let url = format!("{base}/v1/conversations");
    let created: Vec<anyhow::Result<String>> = futures::stream::iter(tokens.iter().enumerate())
        .map(|(n, token)| {
            let request = client
                .post(&url)
                .bearer_auth(token)
                .json(&json!({ "title": format!("bench {n}") }));
            async move {
                let response = request.send().await?;
                anyhow::ensure!(
                    response.status() == 201,
                    "creating a conversation: {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
                let body: Value = response.json().await?;
                body["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("no id in the created conversation")
            }
        })
        .buffered(concurrency)
        .collect()
        .await;
    created.into_iter().collect()
}

/// Which request a scenario sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Send,
    Page,
}

impl Op {
    fn expected(self) -> u16 {
        match self {
            Op::Send => 201,
            Op::Page => 200,
        }
    }
}

/// A conversation to send to or read from, with its owner's `Authorization` value.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    authorization: String,
}

/// What the load generator sends to.
#[derive(Debug)]
struct Load {
    client: reqwest::Client,
    sends: Vec<Endpoint>,
    pages: Vec<Endpoint>,
}

impl Load {
    fn request(&self, op: Op, n: u64) -> reqwest::RequestBuilder {
        let pick = |targets: &[Endpoint]| {
            let at = usize::try_from(n % targets.len() as u64).unwrap_or(0);
            targets[at].clone()
        };
        match op {
            Op::Send => {
                let target = pick(&self.sends);
                self.client
                    .post(target.url)
                    .header(AUTHORIZATION, target.authorization)
                    .header(CONTENT_TYPE, "application/json")
                    .body(format!(r#"{{"text":"bench message {n}"}}"#))
            }
            Op::Page => {
                let target = pick(&self.pages);
                self.client
                    .get(target.url)
                    .header(AUTHORIZATION, target.authorization)
            }
        }
    }
}

/// One request's end.
#[derive(Debug)]
struct Outcome {
    latency: Duration,
    /// The status, or the transport error.
    status: Result<u16, String>,
    /// `X-Colloquy-Position`, for commands.
    position: Option<i64>,
    bytes: usize,
}

async fn one(load: &Load, op: Op, n: u64, started: Instant) -> Outcome {
    let response = load.request(op, n).send().await;
    let (status, position, bytes) = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let position = response
                .headers()
                .get("x-colloquy-position")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            match response.bytes().await {
                Ok(body) => (Ok(status), position, body.len()),
                Err(error) => (Err(error.to_string()), None, 0),
            }
        }
        Err(error) => (Err(error.to_string()), None, 0),
    };
    Outcome {
        latency: started.elapsed(),
        status,
        position,
        bytes,
    }
}

/// What one scenario measured.
#[derive(Debug)]
struct Measured {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    elapsed: Duration,
    max_position: i64,
    bytes: u64,
    cpu: report::CpuUse,
}

impl Measured {
    fn new() -> Self {
        Self {
            histogram: report::histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            first_error: None,
            elapsed: Duration::ZERO,
            max_position: -1,
            bytes: 0,
            cpu: report::CpuUse::default(),
        }
    }

    fn add(&mut self, op: Op, outcome: Outcome) {
        report::record(&mut self.histogram, outcome.latency);
        match outcome.status {
            Ok(status) if status == op.expected() => {
                self.ok += 1;
                self.bytes += outcome.bytes as u64;
                if let Some(position) = outcome.position {
                    self.max_position = self.max_position.max(position);
                }
            }
            Ok(status) => self.error(status.to_string()),
            Err(error) => {
                if self.first_error.is_none() {
                    self.first_error = Some(error);
                }
                self.error("transport".to_owned());
            }
        }
    }

    fn error(&mut self, kind: String) {
        if self.first_error.is_none() {
            self.first_error = Some(format!("status {kind}"));
        }
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Measured) {
        let _ = self.histogram.add(&other.histogram);
        self.ok += other.ok;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.max_position = self.max_position.max(other.max_position);
        self.bytes += other.bytes;
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// `rate` requests a second for `duration`, each timed from its scheduled start.
async fn open_loop(load: &Arc<Load>, op: Op, rate: u32, duration: Duration) -> Measured {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut ticker = tokio::time::interval(period);
    // Behind schedule (a starved load generator), send the missed requests at once:
    // the offered rate stays the rate, and their latency counts from their slot.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let cpu = report::CpuMark::now();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut measured = Measured::new();
    for n in 0..total {
        let slot = ticker.tick().await.into_std();
        let load = Arc::clone(load);
        tasks.spawn(async move { one(&load, op, n, slot).await });
        // Collect what has finished, so that the set stays small.
        while let Some(done) = tasks.try_join_next() {
            if let Ok(outcome) = done {
                measured.add(op, outcome);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(outcome) = done {
            measured.add(op, outcome);
        }
    }
    measured.elapsed = started.elapsed();
    measured.cpu = report::CpuUse::since(cpu);
    measured
}

/// `clients` clients, each sending its next request when the last one answers.
async fn closed_loop(load: &Arc<Load>, op: Op, clients: u32, duration: Duration) -> Measured {
    let counter = Arc::new(AtomicU64::new(0));
    let cpu = report::CpuMark::now();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let load = Arc::clone(load);
        let counter = Arc::clone(&counter);
        tasks.spawn(async move {
            let mut measured = Measured::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let outcome = one(&load, op, n, Instant::now()).await;
                measured.add(op, outcome);
            }
            measured
        });
    }
    let mut measured = Measured::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(part) = done {
            measured.merge(part);
        }
    }
    measured.elapsed = started.elapsed();
    measured.cpu = report::CpuUse::since(cpu);
    measured
}

fn row(key: &'static str, name: String, measured: &Measured, notes: Vec<String>) -> Row {
    let seconds = measured.elapsed.as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "rates for humans")]
    let per_sec = measured.ok as f64 / seconds.max(1e-9);
    let latency = Latency::of(&measured.histogram);
    let mut notes = notes;
    notes.insert(0, format!("p90 {:.2} ms", latency.p90_ms));
    if !measured.errors.is_empty() {
        let errors: Vec<String> = measured
            .errors
            .iter()
            .map(|(kind, count)| format!("{count} × {kind}"))
            .collect();
        notes.push(format!("errors: {}", errors.join(", ")));
    }
    notes.push(measured.cpu.text("bench process (server and load)"));
    let mean_body_bytes = measured.bytes.checked_div(measured.ok).unwrap_or(0);
    Row {
        key,
        name,
        events: measured.ok,
        seconds,
        events_per_sec: per_sec,
        latency_of: "request",
        latency,
        ratio_to_raw: None,
        errors: measured.error_count(),
        first_error: measured.first_error.clone(),
        details: json!({
            "p90_ms": latency.p90_ms,
            "errors_by_status": measured.errors,
            "mean_body_bytes": mean_body_bytes,
            "cpu_cores": measured.cpu,
        }),
        notes: notes.join("; "),
    }
}

/// `colloquy bench http`.
pub async fn run(url: &str, settings: &Settings, args: &HttpArgs) -> anyhow::Result<()> {
    let nats_url = nats_url(args.nats_url.as_deref(), settings)?;
    let nats = async_nats::connect(nats_url.as_str())
        .await
        .context("Failed to connect to NATS")?;
    let scratch = ScratchDb::create(url).await?;
    let roles = [Role::Gateway, Role::Relay, Role::Projector]
        .into_iter()
        .collect();
    let app = BenchApp::start(
        settings,
        &database_url_for(url, scratch.name())?,
        &nats_url,
        roles,
        |s| {
            s.commands_per_second = 1_000_000;
            s.command_burst = 1_000_000;
        },
    )
    .await;
    let app = match app {
        Ok(app) => app,
        Err(error) => {
            scratch.drop_database().await.ok();
            return Err(error);
        }
    };
    let result = tokio::select! {
        result = measure(&app, &scratch, &nats, args) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("Failed to listen for Ctrl-C")?;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    app.stop(&nats).await;
    scratch.drop_database().await.ok();
    let (machine, rows, targets) = result?;
    report::print(
        &format!(
            "colloquy bench http: {} req/s open loop and {} clients closed loop, {} per scenario, {} users",
            report::thousands(f64::from(args.rate)),
            args.clients,
            humantime::format_duration(args.duration),
            args.users,
        ),
        &machine,
        json!({
            "rate": args.rate,
            "page_rate": args.page_rate,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "users": args.users,
            "conversations_per_user": args.conversations_per_user,
            "page_conversations": args.page_conversations,
            "page_size": PAGE,
            "clients": args.clients,
            "roles": ["gateway", "relay", "projector"],
            "load_generator": "in the server's process",
        }),
        &rows,
        &targets,
        json!({}),
        args.json,
    )
}

fn progress(args: &HttpArgs, message: &str) {
    if !args.json {
        eprintln!("· {message}");
    }
}

async fn measure(
    app: &BenchApp,
    scratch: &ScratchDb,
    nats: &async_nats::Client,
    args: &HttpArgs,
) -> anyhow::Result<(Machine, Vec<Row>, Vec<report::Target>)> {
    let pool = scratch.pool(1).await?;
    let mut machine = Machine::probe(&pool).await;
    machine.nats = Some(nats.server_info().version);
    pool.close().await;
    let client = http_client()?;
    app.wait_ready(&client).await?;
    let base = app.url("");

    // Users (tokens only), their conversations, and the page conversations filled.
    let users: Vec<String> = (0..args.users)
        .map(|_| app.token(Uuid::new_v4()).map(|t| format!("Bearer {t}")))
        .collect::<anyhow::Result<_>>()?;
    let bare = |auth: &String| auth.trim_start_matches("Bearer ").to_owned();
    let send_owners: Vec<String> = (0..args.users * args.conversations_per_user)
        .map(|n| users[(n % args.users) as usize].clone())
        .collect();
    let page_owners: Vec<String> = (0..args.page_conversations)
        .map(|n| users[(n % args.users) as usize].clone())
        .collect();
    let started = Instant::now();
    let send_ids = create_conversations(
        &client,
        &base,
        &send_owners.iter().map(bare).collect::<Vec<_>>(),
        32,
    )
    .await?;
    let page_ids = create_conversations(
        &client,
        &base,
        &page_owners.iter().map(bare).collect::<Vec<_>>(),
        32,
    )
    .await?;
    let targets = |ids: &[String], owners: &[String], suffix: &str| -> Vec<Endpoint> {
        ids.iter()
            .zip(owners)
            .map(|(id, auth)| Endpoint {
                url: format!("{base}/v1/conversations/{id}/messages{suffix}"),
                authorization: auth.clone(),
            })
            .collect()
    };
    let fill = Arc::new(Load {
        client: client.clone(),
        sends: targets(&page_ids, &page_owners, ""),
        pages: Vec::new(),
    });
    let filled = closed_count(&fill, Op::Send, 32, page_ids.len() as u64 * PAGE as u64).await;
    anyhow::ensure!(
        filled.error_count() == 0,
        "filling the page conversations failed: {:?}",
        filled.first_error
    );
    progress(
        args,
        &format!(
            "{} conversations created, {} filled with {PAGE} messages, in {:.1?}",
            send_ids.len() + page_ids.len(),
            page_ids.len(),
            started.elapsed()
        ),
    );
    let load = Arc::new(Load {
        client: client.clone(),
        sends: targets(&send_ids, &send_owners, ""),
        pages: targets(&page_ids, &page_owners, &format!("?limit={PAGE}")),
    });

    if !args.warmup.is_zero() {
        let _ = open_loop(&load, Op::Send, args.rate, args.warmup).await;
    }
    let mut rows = Vec::new();
    let shape = format!("{} users, {} conversations", args.users, load.sends.len());
    progress(args, "send-message, open loop");
    let send_open = open_loop(&load, Op::Send, args.rate, args.duration).await;
    let offered = f64::from(args.rate);
    rows.push(row(
        "send_open_loop",
        format!(
            "send-message at {}/s (open loop)",
            report::thousands(offered)
        ),
        &send_open,
        vec![shape.clone()],
    ));
    progress(args, "send-message, saturation");
    let send_closed = closed_loop(&load, Op::Send, args.clients, args.duration).await;
    rows.push(row(
        "send_saturation",
        format!("send-message, {} clients (closed loop)", args.clients),
        &send_closed,
        vec![shape],
    ));

    // Pages are read once the read model holds every message sent so far.
    let head = send_open
        .max_position
        .max(send_closed.max_position)
        .max(filled.max_position);
    let caught_up = wait_for_read_model(&client, &load.pages[0], head).await?;
    progress(
        args,
        &format!("read model caught up with position {head} in {caught_up:.1?}"),
    );
    let items = page_items(&client, &load.pages[0]).await?;
    progress(args, "GET a page, open loop");
    let page_open = open_loop(&load, Op::Page, args.page_rate, args.duration).await;
    let page_shape = format!("{} conversations, {items} items per page", load.pages.len());
    rows.push(row(
        "page_open_loop",
        format!(
            "GET a {PAGE}-message page at {}/s (open loop)",
            report::thousands(f64::from(args.page_rate))
        ),
        &page_open,
        vec![page_shape.clone()],
    ));
    progress(args, "GET a page, saturation");
    let page_closed = closed_loop(&load, Op::Page, args.clients, args.duration).await;
    rows.push(row(
        "page_saturation",
        format!(
            "GET a {PAGE}-message page, {} clients (closed loop)",
            args.clients
        ),
        &page_closed,
        vec![page_shape],
    ));

    let send = &rows[0];
    let sustained = send.events_per_sec >= 0.99 * offered && send.errors == 0;
    let targets = vec![report::Target {
        name: format!(
            "send-message p99 at {}/s sustained{}",
            report::thousands(offered),
            if sustained {
                String::new()
            } else {
                format!(
                    " (NOT sustained: {}/s, {} errors)",
                    report::thousands(send.events_per_sec),
                    send.errors
                )
            }
        ),
        value: send.latency.p99_ms,
        unit: "ms",
        target: "≤ 10 ms at 1,000/s".to_owned(),
        met: sustained && send.latency.p99_ms <= 10.0,
    }];
    machine.load_after = report::load_average();
    Ok((machine, rows, targets))
}

/// Sends `total` requests from `clients` closed-loop clients (set-up, not measured).
async fn closed_count(load: &Arc<Load>, op: Op, clients: u32, total: u64) -> Measured {
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let load = Arc::clone(load);
        let counter = Arc::clone(&counter);
        tasks.spawn(async move {
            let mut measured = Measured::new();
            loop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return measured;
                }
                let outcome = one(&load, op, n, Instant::now()).await;
                measured.add(op, outcome);
            }
        });
    }
    let mut measured = Measured::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(part) = done {
            measured.merge(part);
        }
    }
    measured
}

/// Waits until a query with `X-Colloquy-Min-Position: position` answers 200: the
/// messages read model has applied everything up to it.
async fn wait_for_read_model(
    client: &reqwest::Client,
    page: &Endpoint,
    position: i64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let response = client
            .get(&page.url)
            .header(AUTHORIZATION, &page.authorization)
            .header("x-colloquy-min-position", position.to_string())
            .send()
            .await?;
        if response.status() == 200 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the read model did not reach position {position} in 5 minutes ({})",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number of items one page holds (a check that pages are full).
async fn page_items(client: &reqwest::Client, page: &Endpoint) -> anyhow::Result<usize> {
    let body: Value = client
        .get(&page.url)
        .header(AUTHORIZATION, &page.authorization)
        .send()
        .await?
        .json()
        .await?;
    Ok(body["items"].as_array().map_or(0, Vec::len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scratch_database_replaces_the_path_only() {
        let url = |u: &str| database_url_for(u, "scratch").unwrap();
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/scratch"
        );
        assert_eq!(
            url("postgresql://u:p@host/db?sslmode=disable"),
            "postgresql://u:p@host/scratch?sslmode=disable"
        );
        assert_eq!(url("postgres://host:5432"), "postgres://host:5432/scratch");
    }
}
