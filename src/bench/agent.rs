//! `colloquy bench agent`: the Gemini agent against the project's fake Gemini.
//!
//! Each scenario gets its own scratch database, NATS subject prefix and stream, and
//! fake: the application runs in this process with roles gateway, relay and projector
//! (the runs read model feeds the agents' sweep), and `--agents` agent instances run
//! beside it, built as the application builds its agent role (their own Postgres
//! pools and NATS connections, one shared durable consumer, the key pool's budgets in
//! a JetStream key-value bucket, or per instance in memory where the server has none:
//! nats-server before 2.10). Runs are requested through the gateway (send-message
//! with `run_agent`), each in a conversation of its own, spread over 20 users whose
//! tokens the bench signs with the application's secret.
//!
//! - **overhead**: from `RunRequested` (the event's `time` in the log, which Postgres
//!   sets at the start of the appending transaction) to the first byte of the run's
//!   call at Gemini, for `--runs` runs at `--rate` per second, after 5 unmeasured
//!   runs. The fake records requests but not when they arrived, so the agents call it
//!   through a small recording proxy in this process that notes the wall-clock time
//!   its handler starts (the request head has arrived) and which run the body asks
//!   about. Also reported: `RunRequested` → `RunStarted`, `RunStarted` → Gemini and
//!   `RunRequested` → `RunCompleted`.
//! - **quota**: `--projects` projects with one key each, every project limited to
//!   `--rpm` requests per minute at the fake (fixed one-minute windows from a
//!   project's first request) and configured with that budget in the key pool (which
//!   counts a sliding minute of 5-second slots). `--projects` × `--rpm` runs a minute
//!   (times `--load`) are requested, evenly spaced, for `--window`; the share of what
//!   the quotas allow that completed by the window's end plus `--grace`, and the share
//!   of Gemini calls answered 429, are the figures.
//! - **faults**: `--fault-runs` runs at `--fault-rate` per second while the fake fails
//!   `--fault-probability` of calls at random (500 INTERNAL, 503 overloaded, an error
//!   chunk mid-stream, a connection cut mid-stream). Every run must end succeeded or
//!   failed (none left queued, running or retrying after `--settle-timeout`), and no
//!   run may have more than one reply (assistant `MessageSent`) in its conversation.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use colloquy_commands::Commands;
use colloquy_commands::cache::CacheConfig;
use colloquy_eventstore::{PgEventStore, PgOptions};
use colloquy_gemini_agent::backoff::RetrySchedule;
use colloquy_gemini_agent::budget::{
    BudgetStore, KvBudgetConfig, KvBudgetStore, MemoryBudgetStore,
};
use colloquy_gemini_agent::clock::SystemClock;
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini, Fault, Quota, RandomFaults};
use colloquy_gemini_agent::gemini::{GeminiClient, GeminiConfig};
use colloquy_gemini_agent::keys::{Budget, KeyPool, PoolConfig, PoolKey};
use colloquy_gemini_agent::worker::{Agent, AgentSettings, DueRuns};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::http::{BenchApp, create_conversations, database_url_for, http_client, nats_url};
use super::report::{self, Latency, Machine, Row, Target};
use super::scratch::ScratchDb;
use crate::app::{Role, RunsDue};
use crate::config::Settings;

/// An agent scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentScenario {
    /// RunRequested → the first byte at Gemini.
    Overhead,
    /// Runs per minute within per-project quotas, with several agents.
    Quota,
    /// Random Gemini failures: every run settles, none is answered twice.
    Faults,
}

/// Arguments of `colloquy bench agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [AgentScenario::Overhead, AgentScenario::Quota, AgentScenario::Faults])]
    pub scenarios: Vec<AgentScenario>,
    /// Agent instances (each with its own pools and NATS connection).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub agents: u32,
    /// Runs at once per agent instance (`COLLOQUY_AGENT_CONCURRENCY`'s default).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// overhead: runs measured.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub runs: u32,
    /// overhead: runs requested per second.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,
    /// quota: projects (one key each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub projects: u32,
    /// quota: requests per minute each project may make.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rpm: u32,
    /// quota: runs requested, as a multiple of what the quotas allow (above 1, the
    /// key pool must hold the excess back instead of spending it on 429s).
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,
    /// quota: how long runs are requested.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// quota: how long after the window a run may complete and still count.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// faults: runs requested.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub fault_runs: u32,
    /// faults: runs requested per second.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub fault_rate: u32,
    /// faults: the chance that a Gemini call fails.
    #[arg(long, default_value_t = 0.2)]
    pub fault_probability: f64,
    /// faults (and overhead): how long to wait for every run to settle.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
    /// The agents' escalating retry delays (default: COLLOQUY_RETRY_DELAYS).
    #[arg(long)]
    pub retry_delays: Option<String>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Postgres server to create the scratch databases on (default: DATABASE_URL).
    #[arg(long)]
    pub database_url: Option<String>,
    /// NATS server with JetStream (default: NATS_URL). Shared budgets need 2.10+.
    #[arg(long)]
    pub nats_url: Option<String>,
}

/// Users the runs are spread over.
const USERS: usize = 20;
/// Unmeasured runs before the overhead scenario measures.
const WARMUP_RUNS: u64 = 5;

fn progress(args: &AgentArgs, message: &str) {
    if !args.json {
        eprintln!("· {message}");
    }
}

/// `colloquy bench agent`.
pub async fn run(url: &str, settings: &Settings, args: &AgentArgs) -> anyhow::Result<()> {
    let nats_url = nats_url(args.nats_url.as_deref(), settings)?;
    let nats = async_nats::connect(nats_url.as_str())
        .await
        .context("Failed to connect to NATS")?;
    let delays_text = args
        .retry_delays
        .clone()
        .unwrap_or_else(|| settings.retry_delays.clone());
    let retry_delays = delays_text
        .split(',')
        .map(|d| humantime::parse_duration(d.trim()))
        .collect::<Result<Vec<_>, _>>()
        .context("--retry-delays: durations like 1m,10m,1h")?;
    let bench = Bench {
        url,
        settings,
        nats: &nats,
        nats_url: &nats_url,
        args,
        retry_delays,
    };
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .context("Failed to connect to Postgres")?;
    let mut machine = Machine::probe(&admin).await;
    admin.close().await;
    machine.nats = Some(nats.server_info().version);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut budgets = BTreeMap::new();
    for scenario in &args.scenarios {
        progress(args, label(*scenario));
        let outcome = tokio::select! {
            outcome = bench.scenario(*scenario) => outcome?,
            signal = tokio::signal::ctrl_c() => {
                signal.context("Failed to listen for Ctrl-C")?;
                anyhow::bail!("interrupted");
            }
        };
        budgets.insert(label(*scenario), outcome.budgets);
        let mut row = outcome.row;
        row.notes
            .push_str(&format!("; budgets {}", outcome.budgets));
        rows.push(row);
        targets.extend(outcome.targets);
    }
    machine.load_after = report::load_average();
    let scenarios = args.scenarios.clone();
    report::print(
        &format!(
            "colloquy bench agent: {} agents × {} runs at once, against the fake Gemini",
            args.agents, args.concurrency
        ),
        &machine,
        json!({
            "scenarios": scenarios,
            "agents": args.agents,
            "concurrency": args.concurrency,
            "runs": args.runs,
            "rate": args.rate,
            "projects": args.projects,
            "rpm": args.rpm,
            "load": args.load,
            "window_s": args.window.as_secs_f64(),
            "grace_s": args.grace.as_secs_f64(),
            "fault_runs": args.fault_runs,
            "fault_rate": args.fault_rate,
            "fault_probability": args.fault_probability,
            "retry_delays": delays_text,
            "budget_store": budgets,
        }),
        &rows,
        &targets,
        json!({}),
        args.json,
    )
}

fn label(scenario: AgentScenario) -> &'static str {
    match scenario {
        AgentScenario::Overhead => "overhead",
        AgentScenario::Quota => "quota",
        AgentScenario::Faults => "faults",
    }
}

/// What every scenario shares.
struct Bench<'a> {
    url: &'a str,
    settings: &'a Settings,
    nats: &'a async_nats::Client,
    nats_url: &'a str,
    args: &'a AgentArgs,
    retry_delays: Vec<Duration>,
}

/// One scenario's row, targets and where its agents kept budgets.
struct Outcome {
    row: Row,
    targets: Vec<Target>,
    budgets: &'static str,
}

/// The application and the database of one scenario.
struct Env {
    scratch: ScratchDb,
    database_url: String,
    app: BenchApp,
    pool: PgPool,
    client: reqwest::Client,
    /// `Authorization` values of the users.
    users: Vec<String>,
}

impl Bench<'_> {
    async fn scenario(&self, scenario: AgentScenario) -> anyhow::Result<Outcome> {
        let env = self.env().await?;
        let result = match scenario {
            AgentScenario::Overhead => self.overhead(&env).await,
            AgentScenario::Quota => self.quota(&env).await,
            AgentScenario::Faults => self.faults(&env).await,
        };
        env.pool.close().await;
        env.app.stop(self.nats).await;
        env.scratch.drop_database().await.ok();
        result
    }

    async fn env(&self) -> anyhow::Result<Env> {
        let scratch = ScratchDb::create(self.url).await?;
        let database_url = database_url_for(self.url, scratch.name())?;
        let roles = [Role::Gateway, Role::Relay, Role::Projector]
            .into_iter()
            .collect();
        let app = match BenchApp::start(self.settings, &database_url, self.nats_url, roles, |s| {
            s.commands_per_second = 1_000_000;
            s.command_burst = 1_000_000;
        })
        .await
        {
            Ok(app) => app,
            Err(error) => {
                scratch.drop_database().await.ok();
                return Err(error);
            }
        };
        let ready = async {
            let client = http_client()?;
            app.wait_ready(&client).await?;
            // The agents' consumer needs the relay's stream.
            let js = async_nats::jetstream::new(self.nats.clone());
            let deadline = Instant::now() + Duration::from_secs(30);
            while js.get_stream(&app.stream).await.is_err() {
                anyhow::ensure!(Instant::now() < deadline, "the stream was not created");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let users = (0..USERS)
                .map(|_| app.token(Uuid::new_v4()).map(|t| format!("Bearer {t}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let pool = scratch.pool(2).await?;
            Ok::<_, anyhow::Error>((client, users, pool))
        }
        .await;
        match ready {
            Ok((client, users, pool)) => Ok(Env {
                scratch,
                database_url,
                app,
                pool,
                client,
                users,
            }),
            Err(error) => {
                app.stop(self.nats).await;
                scratch.drop_database().await.ok();
                Err(error)
            }
        }
    }

    /// Starts `--agents` instances calling `base_url` with `keys`.
    async fn agents(&self, env: &Env, base_url: &str, keys: &PoolConfig) -> anyhow::Result<Agents> {
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut budgets = "shared (JetStream key-value)";
        for _ in 0..self.args.agents {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(&env.database_url)
                .await
                .context("Failed to connect an agent to the scratch database")?;
            let store = PgEventStore::with_pool(pool.clone(), PgOptions::default());
            let commands = Commands::new(Arc::new(store), CacheConfig::default());
            let client = GeminiClient::new(GeminiConfig {
                base_url: base_url.to_owned(),
                ..GeminiConfig::default()
            })
            .map_err(|e| anyhow::anyhow!("the Gemini client: {e}"))?;
            let nats = async_nats::connect(self.nats_url)
                .await
                .context("Failed to connect an agent to NATS")?;
            let js = async_nats::jetstream::new(nats.clone());
            let store: Arc<dyn BudgetStore> = match KvBudgetStore::open(
                &js,
                KvBudgetConfig::new(
                    format!("{}_budgets", env.app.stream),
                    env.app.prefix.clone(),
                ),
            )
            .await
            {
                Ok(store) => Arc::new(store),
                Err(_) => {
                    budgets = "per instance (memory)";
                    Arc::new(MemoryBudgetStore::new())
                }
            };
            let pool_of_keys = KeyPool::new(keys.clone(), store, Arc::new(SystemClock))?;
            let agent = Agent::new(
                commands,
                client,
                Some(Arc::new(pool_of_keys)),
                nats,
                AgentSettings {
                    prefix: env.app.prefix.clone(),
                    stream: env.app.stream.clone(),
                    concurrency: self.args.concurrency as usize,
                    default_model: self.settings.gemini_model.clone(),
                    retry_delays: RetrySchedule::new(self.retry_delays.clone()),
                    ..AgentSettings::default()
                },
            );
            let due: Arc<dyn DueRuns> = Arc::new(RunsDue(pool.into()));
            tasks.push(tokio::spawn(agent.run(Some(due), shutdown.clone())));
        }
        // Wait for the shared consumer, so that the first runs do not pay for it.
        let js = async_nats::jetstream::new(self.nats.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stream = js.get_stream(&env.app.stream).await?;
            if stream
                .consumer_info(&AgentSettings::default().consumer)
                .await
                .is_ok()
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agents did not create their consumer in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Agents {
            shutdown,
            tasks,
            budgets,
        })
    }

    /// Creates `count` conversations over the users; returns (authorization, id).
    async fn conversations(
        &self,
        env: &Env,
        count: usize,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let owners: Vec<String> = (0..count).map(|n| env.users[n % USERS].clone()).collect();
        let tokens: Vec<String> = owners
            .iter()
            .map(|a| a.trim_start_matches("Bearer ").to_owned())
            .collect();
        let ids = create_conversations(&env.client, &env.app.url(""), &tokens, 16).await?;
        Ok(owners.into_iter().zip(ids).collect())
    }

    async fn overhead(&self, env: &Env) -> anyhow::Result<Outcome> {
        let args = self.args;
        let fake = FakeGemini::start(FakeConfig::default().key("bench-key-0", "bench-project-0"))
            .await
            .context("Failed to start the fake Gemini")?;
        let proxy = Proxy::start(fake.base_url()).await?;
        let mut keys = PoolConfig::new(vec![PoolKey::new("k0", "bench-key-0", "bench-project-0")]);
        keys.defaults = Budget {
            rpm: 1_000_000,
            rpd: 100_000_000,
            tpm: None,
        };
        let agents = self.agents(env, &proxy.base_url(), &keys).await?;
        let result = async {
            let total = WARMUP_RUNS + u64::from(args.runs);
            let conversations = self.conversations(env, total as usize).await?;
            let warm = request_runs(env, &conversations[..WARMUP_RUNS as usize], 0, Duration::from_millis(200)).await;
            settle(&env.pool, &warm.runs(), args.settle_timeout).await?;
            let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
            let started = Instant::now();
            let measured = request_runs(env, &conversations[WARMUP_RUNS as usize..], WARMUP_RUNS, period).await;
            let seconds = started.elapsed().as_secs_f64();
            let facts = settle(&env.pool, &measured.runs(), args.settle_timeout).await?;
            let arrivals = proxy.first_arrivals();
            let mut overhead = report::histogram();
            let mut to_start = report::histogram();
            let mut start_to_call = report::histogram();
            let mut to_complete = report::histogram();
            let mut matched = 0_u64;
            for run in &measured.requested {
                let Some(fact) = facts.get(&run.run) else { continue };
                let Some(requested) = fact.requested else { continue };
                if let Some(started) = fact.started.first() {
                    report::record(&mut to_start, since(requested, *started));
                    if let Some(arrived) = arrivals.get(&run.label) {
                        report::record(&mut start_to_call, since(*started, *arrived));
                    }
                }
                if let Some(arrived) = arrivals.get(&run.label) {
                    report::record(&mut overhead, since(requested, *arrived));
                    matched += 1;
                }
                if let Some(completed) = fact.completed {
                    report::record(&mut to_complete, since(requested, completed));
                }
            }
            let statuses = count_statuses(&facts, &measured.runs());
            let succeeded = statuses.get("succeeded").copied().unwrap_or(0);
            let latency = Latency::of(&overhead);
            let (s, c, e) = (
                Latency::of(&to_start),
                Latency::of(&start_to_call),
                Latency::of(&to_complete),
            );
            let row = Row {
                key: "agent_overhead",
                name: format!(
                    "RunRequested → first byte at Gemini, {} runs at {}/s",
                    args.runs, args.rate
                ),
                events: matched,
                seconds,
                events_per_sec: per_sec(measured.requested.len() as u64, seconds),
                latency_of: "run",
                latency,
                ratio_to_raw: None,
                errors: measured.errors + (u64::from(args.runs) - succeeded.min(u64::from(args.runs))),
                first_error: measured.first_error.clone(),
                details: json!({
                    "p90_ms": latency.p90_ms,
                    "requested_to_started": s,
                    "started_to_gemini": c,
                    "requested_to_completed": e,
                    "statuses": statuses,
                    "calls_seen_by_the_proxy": arrivals.len(),
                }),
                notes: format!(
                    "requested→RunStarted p50 {:.1} / p99 {:.1} ms; RunStarted→Gemini p50 {:.1} / p99 {:.1} ms; requested→completed p50 {:.1} / p99 {:.1} ms; {succeeded}/{} succeeded",
                    s.p50_ms, s.p99_ms, c.p50_ms, c.p99_ms, e.p50_ms, e.p99_ms, args.runs
                ),
            };
            let targets = vec![Target {
                name: "RunRequested → first byte at Gemini, p99".to_owned(),
                value: latency.p99_ms,
                unit: "ms",
                target: "≤ 20 ms".to_owned(),
                met: latency.p99_ms <= 20.0 && matched == u64::from(args.runs),
            }];
            Ok::<_, anyhow::Error>((row, targets))
        }
        .await;
        let budgets = agents.budgets;
        agents.stop().await;
        proxy.stop().await;
        let _ = fake.shutdown().await;
        let (row, targets) = result?;
        Ok(Outcome {
            row,
            targets,
            budgets,
        })
    }

    async fn quota(&self, env: &Env) -> anyhow::Result<Outcome> {
        let args = self.args;
        let projects = args.projects as usize;
        let mut fake_config = FakeConfig::default();
        let mut pool_keys = Vec::new();
        for p in 0..projects {
            let (key, project) = (format!("bench-key-{p}"), format!("bench-project-{p}"));
            fake_config = fake_config.key(&key, &project).quota(
                &project,
                Quota {
                    rpm: Some(args.rpm),
                    rpd: None,
                },
            );
            pool_keys.push(PoolKey::new(format!("k{p}"), key, project));
        }
        let fake = FakeGemini::start(fake_config)
            .await
            .context("Failed to start the fake Gemini")?;
        let mut keys = PoolConfig::new(pool_keys);
        keys.defaults = Budget {
            rpm: args.rpm,
            rpd: 100_000_000,
            tpm: None,
        };
        let agents = self.agents(env, &fake.base_url(), &keys).await?;
        let result = async {
            let per_minute = u64::from(args.projects) * u64::from(args.rpm);
            let minutes = args.window.as_secs_f64() / 60.0;
            let allowed = ((per_minute as f64) * minutes).round().max(1.0) as u64;
            let total = ((per_minute as f64) * minutes * args.load.max(0.01)).round().max(1.0) as u64;
            let conversations = self.conversations(env, total as usize).await?;
            let period = args.window.div_f64(total as f64);
            let window_start = Utc::now();
            let started = Instant::now();
            let requested = request_runs(env, &conversations, 0, period).await;
            let window_end = window_start + chrono::Duration::from_std(args.window)?;
            let counted_until = window_end + chrono::Duration::from_std(args.grace)?;
            let wait = (started + args.window + args.grace).saturating_duration_since(Instant::now());
            tokio::time::sleep(wait).await;
            let facts = run_facts(&env.pool).await?;
            let runs = requested.runs();
            let mut in_window = 0_u64;
            let mut counted = 0_u64;
            let mut latency = report::histogram();
            for run in &runs {
                let Some(fact) = facts.get(run) else { continue };
                if let (Some(requested), Some(completed)) = (fact.requested, fact.completed) {
                    if completed <= window_end {
                        in_window += 1;
                    }
                    if completed <= counted_until {
                        counted += 1;
                        report::record(&mut latency, since(requested, completed));
                    }
                }
            }
            let retried = runs
                .iter()
                .filter(|r| facts.get(r).is_some_and(|f| f.retries > 0))
                .count();
            let calls = generation_calls(&fake);
            let limited = calls.get(&429).copied().unwrap_or(0);
            let all_calls: u64 = calls.values().sum();
            // Completion counts against what the quotas allow: runs beyond it wait.
            let expected = total.min(allowed);
            let (completion, limited_share) = (share(counted, expected), share(limited, all_calls));
            let statuses = count_statuses(&facts, &runs);
            let latency = Latency::of(&latency);
            let row = Row {
                key: "agent_quota",
                name: format!(
                    "{} projects × {}/min, {} agents, {}{}",
                    args.projects,
                    args.rpm,
                    args.agents,
                    humantime::format_duration(args.window),
                    if (args.load - 1.0).abs() > f64::EPSILON {
                        format!(", {:.1} × the quota requested", args.load)
                    } else {
                        String::new()
                    }
                ),
                events: counted,
                seconds: args.window.as_secs_f64(),
                events_per_sec: per_sec(in_window, args.window.as_secs_f64()),
                latency_of: "run (requested → completed)",
                latency,
                ratio_to_raw: None,
                errors: requested.errors,
                first_error: requested.first_error.clone(),
                details: json!({
                    "requested": total,
                    "allowed_by_the_quotas": allowed,
                    "completed_in_window": in_window,
                    "completed_in_window_and_grace": counted,
                    "completion_ratio": completion,
                    "runs_per_minute_offered": per_minute,
                    "runs_per_minute_completed_in_window": per_sec(in_window, args.window.as_secs_f64()) * 60.0,
                    "gemini_calls_by_status": calls,
                    "share_429": limited_share,
                    "runs_retried_later": retried,
                    "statuses_at_the_end": statuses,
                }),
                notes: format!(
                    "{counted}/{expected} completed by the window's end + {} ({:.1} %), {in_window} within the window ({total} requested); {limited} of {all_calls} Gemini calls were 429 ({:.2} %); {retried} runs rescheduled",
                    humantime::format_duration(args.grace),
                    completion * 100.0,
                    limited_share * 100.0
                ),
            };
            let targets = vec![
                Target {
                    name: format!("runs completed of {} × {}/min", args.projects, args.rpm),
                    value: completion * 100.0,
                    unit: "%",
                    target: "≥ 95 %".to_owned(),
                    met: completion >= 0.95,
                },
                Target {
                    name: "Gemini calls answered 429".to_owned(),
                    value: limited_share * 100.0,
                    unit: "%",
                    target: "≤ 1 %".to_owned(),
                    met: limited_share <= 0.01,
                },
            ];
            Ok::<_, anyhow::Error>((row, targets))
        }
        .await;
        let budgets = agents.budgets;
        agents.stop().await;
        let _ = fake.shutdown().await;
        let (row, targets) = result?;
        Ok(Outcome {
            row,
            targets,
            budgets,
        })
    }

    async fn faults(&self, env: &Env) -> anyhow::Result<Outcome> {
        let args = self.args;
        let fake = FakeGemini::start(FakeConfig {
            random_faults: Some(RandomFaults {
                seed: 20_261_122,
                probability: args.fault_probability.clamp(0.0, 1.0),
                faults: vec![
                    Fault::Internal,
                    Fault::Overloaded,
                    Fault::ErrorMidStream,
                    Fault::DropMidStream,
                ],
            }),
            ..FakeConfig::default()
                .key("bench-key-0", "bench-project-0")
                .key("bench-key-1", "bench-project-1")
        })
        .await
        .context("Failed to start the fake Gemini")?;
        let mut keys = PoolConfig::new(vec![
            PoolKey::new("k0", "bench-key-0", "bench-project-0"),
            PoolKey::new("k1", "bench-key-1", "bench-project-1"),
        ]);
        keys.defaults = Budget {
            rpm: 1_000_000,
            rpd: 100_000_000,
            tpm: None,
        };
        let agents = self.agents(env, &fake.base_url(), &keys).await?;
        let result = async {
            let conversations = self.conversations(env, args.fault_runs as usize).await?;
            let period = Duration::from_secs_f64(1.0 / f64::from(args.fault_rate));
            let started = Instant::now();
            let requested = request_runs(env, &conversations, 0, period).await;
            let runs = requested.runs();
            let facts = settle(&env.pool, &runs, args.settle_timeout).await?;
            let seconds = started.elapsed().as_secs_f64();
            let statuses = count_statuses(&facts, &runs);
            let replies = replies_per_run(&env.pool).await?;
            let twice = runs
                .iter()
                .filter(|r| replies.get(r).copied().unwrap_or(0) > 1)
                .count() as u64;
            let completed_twice = runs
                .iter()
                .filter(|r| facts.get(r).is_some_and(|f| f.completions > 1))
                .count() as u64;
            let settled = statuses.get("succeeded").copied().unwrap_or(0)
                + statuses.get("failed").copied().unwrap_or(0);
            let unsettled = runs.len() as u64 - settled.min(runs.len() as u64);
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            let mut latency = report::histogram();
            for run in &runs {
                let Some(fact) = facts.get(run) else { continue };
                if let Some((_, reason)) = &fact.failed {
                    *reasons.entry(reason.clone()).or_default() += 1;
                }
                let ended = fact.completed.or(fact.failed.as_ref().map(|(at, _)| *at));
                if let (Some(requested), Some(ended)) = (fact.requested, ended) {
                    report::record(&mut latency, since(requested, ended));
                }
            }
            let calls = generation_calls(&fake);
            let all_calls: u64 = calls.values().sum();
            let retried = runs
                .iter()
                .filter(|r| facts.get(r).is_some_and(|f| f.retries > 0))
                .count();
            let latency = Latency::of(&latency);
            let row = Row {
                key: "agent_faults",
                name: format!(
                    "{} runs at {}/s, {:.0} % of Gemini calls failing",
                    args.fault_runs,
                    args.fault_rate,
                    args.fault_probability * 100.0
                ),
                events: settled,
                seconds,
                events_per_sec: per_sec(settled, seconds),
                latency_of: "run (requested → settled)",
                latency,
                ratio_to_raw: None,
                errors: requested.errors + unsettled + twice,
                first_error: requested.first_error.clone(),
                details: json!({
                    "statuses": statuses,
                    "failure_reasons": reasons,
                    "runs_not_settled": unsettled,
                    "runs_with_more_than_one_reply": twice,
                    "runs_completed_more_than_once": completed_twice,
                    "runs_retried_later": retried,
                    "attempts": runs.iter().filter_map(|r| facts.get(r)).map(|f| f.started.len()).sum::<usize>(),
                    "gemini_calls_by_status": calls,
                    "gemini_calls": all_calls,
                }),
                notes: format!(
                    "{}; {unsettled} not settled; {twice} with two replies; {retried} rescheduled; {all_calls} Gemini calls for {} runs",
                    statuses
                        .iter()
                        .map(|(s, n)| format!("{n} {s}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    runs.len()
                ),
            };
            let targets = vec![
                Target {
                    name: "runs not settled (queued, running or retrying)".to_owned(),
                    value: count(unsettled),
                    unit: "runs",
                    target: "= 0".to_owned(),
                    met: unsettled == 0,
                },
                Target {
                    name: "runs answered more than once".to_owned(),
                    value: count(twice + completed_twice),
                    unit: "runs",
                    target: "= 0".to_owned(),
                    met: twice == 0 && completed_twice == 0,
                },
            ];
            Ok::<_, anyhow::Error>((row, targets))
        }
        .await;
        let budgets = agents.budgets;
        agents.stop().await;
        let _ = fake.shutdown().await;
        let (row, targets) = result?;
        Ok(Outcome {
            row,
            targets,
            budgets,
        })
    }
}

/// Running agent instances.
struct Agents {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    budgets: &'static str,
}

impl Agents {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            futures::future::join_all(self.tasks),
        )
        .await;
    }
}

/// `count` per second over `seconds`.
#[expect(clippy::cast_precision_loss, reason = "rates for humans")]
fn per_sec(count: u64, seconds: f64) -> f64 {
    count as f64 / seconds.max(1e-9)
}

/// `part ÷ whole`, 0 for an empty whole.
#[expect(clippy::cast_precision_loss, reason = "ratios for humans")]
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// A count as a target's value.
#[expect(clippy::cast_precision_loss, reason = "counts for humans")]
fn count(n: u64) -> f64 {
    n as f64
}

/// `b − a`, or zero if `b` is earlier.
fn since(a: DateTime<Utc>, b: DateTime<Utc>) -> Duration {
    (b - a).to_std().unwrap_or_default()
}

/// One requested run.
#[derive(Debug)]
struct RequestedRun {
    /// The number in its prompt, `bench-run-<label>`.
    label: u64,
    run: Uuid,
}

#[derive(Debug, Default)]
struct Requests {
    requested: Vec<RequestedRun>,
    errors: u64,
    first_error: Option<String>,
}

impl Requests {
    fn runs(&self) -> Vec<Uuid> {
        self.requested.iter().map(|r| r.run).collect()
    }
}

/// Asks for one run in each of `conversations`, one every `period` (open loop); the
/// prompts are `bench-run-<first_label + n>`.
async fn request_runs(
    env: &Env,
    conversations: &[(String, String)],
    first_label: u64,
    period: Duration,
) -> Requests {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for (n, (authorization, conversation)) in conversations.iter().enumerate() {
        ticker.tick().await;
        let label = first_label + n as u64;
        let request = env
            .client
            .post(
                env.app
                    .url(&format!("/v1/conversations/{conversation}/messages")),
            )
            .header(reqwest::header::AUTHORIZATION, authorization)
            .json(&json!({ "text": format!("bench-run-{label}"), "run_agent": true }));
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if status != 201 {
                return Err(format!("{status}: {body}"));
            }
            body["run_id"]
                .as_str()
                .and_then(|r| Uuid::try_parse(r).ok())
                .map(|run| RequestedRun { label, run })
                .ok_or_else(|| format!("no run_id in {body}"))
        }));
    }
    let mut requests = Requests::default();
    for task in tasks {
        match task.await {
            Ok(Ok(run)) => requests.requested.push(run),
            Ok(Err(error)) => {
                requests.errors += 1;
                requests.first_error.get_or_insert(error);
            }
            Err(error) => {
                requests.errors += 1;
                requests.first_error.get_or_insert(error.to_string());
            }
        }
    }
    requests
}

/// What the log says about one run.
#[derive(Debug, Default)]
struct RunFacts {
    requested: Option<DateTime<Utc>>,
    started: Vec<DateTime<Utc>>,
    completed: Option<DateTime<Utc>>,
    completions: u32,
    failed: Option<(DateTime<Utc>, String)>,
    retries: u32,
    status: &'static str,
}

impl RunFacts {
    fn settled(&self) -> bool {
        matches!(self.status, "succeeded" | "failed" | "cancelled")
    }
}

/// Every run in the log, folded from its events.
async fn run_facts(pool: &PgPool) -> anyhow::Result<HashMap<Uuid, RunFacts>> {
    let rows: Vec<(String, String, NaiveDateTime, Option<Value>)> = sqlx::query_as(
        "SELECT stream_name, type, time, data FROM message_store.messages
         WHERE stream_name LIKE 'agentRun-%' ORDER BY global_position",
    )
    .fetch_all(pool)
    .await
    .context("reading the runs from the log")?;
    let mut facts: HashMap<Uuid, RunFacts> = HashMap::new();
    for (stream, kind, time, data) in rows {
        let Some(run) = stream
            .strip_prefix("agentRun-")
            .and_then(|id| Uuid::try_parse(id).ok())
        else {
            continue;
        };
        let at = time.and_utc();
        let fact = facts.entry(run).or_default();
        match kind.as_str() {
            "RunRequested" => {
                fact.requested = Some(at);
                fact.status = "queued";
            }
            "RunStarted" => {
                fact.started.push(at);
                fact.status = "running";
            }
            "RunRetryScheduled" => {
                fact.retries += 1;
                fact.status = "retrying";
            }
            "RunCompleted" => {
                fact.completions += 1;
                fact.completed.get_or_insert(at);
                fact.status = "succeeded";
            }
            "RunFailed" => {
                let reason = data
                    .as_ref()
                    .and_then(|d| d.get("reason"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                fact.failed = Some((at, reason));
                fact.status = "failed";
            }
            "RunCancelled" => fact.status = "cancelled",
            _ => {}
        }
    }
    Ok(facts)
}

/// Waits until every one of `runs` has settled (or `timeout`); the facts then.
async fn settle(
    pool: &PgPool,
    runs: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<HashMap<Uuid, RunFacts>> {
    let deadline = Instant::now() + timeout;
    loop {
        let facts = run_facts(pool).await?;
        let done = runs
            .iter()
            .all(|r| facts.get(r).is_some_and(RunFacts::settled));
        if done || Instant::now() >= deadline {
            return Ok(facts);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How many of `runs` are in each status.
fn count_statuses(facts: &HashMap<Uuid, RunFacts>, runs: &[Uuid]) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for run in runs {
        let status = facts.get(run).map_or("missing", |f| f.status);
        *counts.entry(status).or_default() += 1;
    }
    counts
}

/// Assistant replies (`MessageSent` by the assistant) per run, across conversations.
async fn replies_per_run(pool: &PgPool) -> anyhow::Result<HashMap<Uuid, u64>> {
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT data->>'runId', count(*) FROM message_store.messages
         WHERE stream_name LIKE 'conversation-%' AND type = 'MessageSent'
           AND data->>'author' = 'assistant'
         GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .context("counting replies")?;
    Ok(rows
        .into_iter()
        .filter_map(|(run, count)| {
            let run = Uuid::try_parse(run.as_deref()?).ok()?;
            Some((run, u64::try_from(count).unwrap_or(0)))
        })
        .collect())
}

/// The fake's generation calls by HTTP status (200 for streams, whatever happened
/// after the head).
fn generation_calls(fake: &FakeGemini) -> BTreeMap<u16, u64> {
    let mut calls = BTreeMap::new();
    for request in fake.requests() {
        if request.action.as_deref() == Some("streamGenerateContent") {
            *calls.entry(request.status).or_default() += 1;
        }
    }
    calls
}

/// A pass-through in front of the fake Gemini that notes when each request arrived
/// and which run (`bench-run-<n>` in its body) it is for.
struct Proxy {
    addr: SocketAddr,
    arrivals: Arrivals,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

type Arrivals = Arc<Mutex<Vec<(DateTime<Utc>, Option<u64>)>>>;

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    arrivals: Arrivals,
}

impl Proxy {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let arrivals: Arrivals = Arc::default();
        let state = ProxyState {
            upstream,
            client: reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .build()?,
            arrivals: Arc::clone(&arrivals),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self {
            addr,
            arrivals,
            shutdown,
            task,
        })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// When the first call for each run arrived.
    fn first_arrivals(&self) -> HashMap<u64, DateTime<Utc>> {
        let mut first = HashMap::new();
        for (at, label) in self
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if let Some(label) = label {
                first.entry(*label).or_insert(*at);
            }
        }
        first
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn forward(State(state): State<ProxyState>, request: axum::extract::Request) -> Response {
    let arrived = Utc::now();
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    state
        .arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((arrived, run_label(&body)));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = state
        .client
        .request(parts.method, format!("{}{path}", state.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    match upstream.send().await {
        Ok(response) => {
            let mut builder = axum::http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                if name != header::CONTENT_LENGTH
                    && name != header::TRANSFER_ENCODING
                    && name != header::CONNECTION
                {
                    builder = builder.header(name, value);
                }
            }
            builder
                .body(Body::from_stream(response.bytes_stream()))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// The `<n>` of the last `bench-run-<n>` in a request body: the message answered
/// comes last in the contents.
fn run_label(body: &[u8]) -> Option<u64> {
    const MARK: &[u8] = b"bench-run-";
    let start = body.windows(MARK.len()).rposition(|w| w == MARK)? + MARK.len();
    let digits: Vec<u8> = body[start..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_is_read_from_the_last_prompt() {
        let body = br#"{"contents":[{"parts":[{"text":"bench-run-3"}]},{"parts":[{"text":"bench-run-41"}]}]}"#;
        assert_eq!(run_label(body), Some(41));
        assert_eq!(run_label(b"no mark"), None);
    }
}
