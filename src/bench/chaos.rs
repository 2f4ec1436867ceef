//! `colloquy bench chaos`: `kill -9` under load, then a check that nothing was lost or
//! duplicated (docs/RELIABILITY.md reports the last long run).
//!
//! Colloquy runs as four child processes of this binary in the external mode, one per
//! role (`serve --external --roles gateway|relay|projector|agent`), over a scratch
//! database and a private NATS subject prefix and stream, with the project's Gemini
//! double (in this process) answering the agent. Users (tokens signed with the run's
//! secret) send messages, `--run-share` of them asking the agent to answer, each with
//! its own `Idempotency-Key`; a request that meets a dead gateway, a connection cut or
//! a 503 is sent again with the same key, as a client does. Every 2xx is recorded.
//!
//! Meanwhile, at random moments drawn from `--seed`, one of the role processes is
//! killed with SIGKILL and started again after a random pause of up to `--max-down`;
//! every role is killed at least once. After `--duration` the faults stop and the bench
//! waits (at most `--settle-timeout`) until every projection is at the log's head, the
//! stream holds as many messages as the log has events and no run is left open. Then:
//!
//! - **lost**: accepted sends whose message (or requested run) is not in the log;
//! - **duplicated**: a message, a run request or a JetStream message (by position or
//!   event id) held twice;
//! - **stream**: every event of the log is in the stream under its own id;
//! - **runs**: every run requested ended exactly once, with at most one reply;
//! - **read models**: each equals a fresh replay of the log (`replay --verify`'s check).
//!
//! The exit status is non-zero if any check fails. The processes' logs are kept in a
//! temporary directory, whose path is printed when a check fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colloquy_eventstore::{Database, EventStore, PgEventStore, PgOptions};
use colloquy_gateway::auth::{AccessClaims, JwtKeys};
use colloquy_gemini_agent::fake::{FakeConfig, FakeGemini};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::http::{
    create_conversations, database_url_for, delete_nats_state, http_client, jwt_secret, nats_url,
    private_names, wait_ready,
};
use super::report::{self, Machine};
use super::scratch::ScratchDb;
use crate::config::Settings;

/// Arguments of `colloquy bench chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// How long processes are killed under the workload.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Seed of the faults and the workload (random if unset; the report gives it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Users sending messages at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub users: u32,
    /// Conversations each user writes in.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub conversations: u32,
    /// Share of the messages that ask the agent to answer (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    pub run_share: f64,
    /// Each user's pause between messages.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// Mean time between kills (each drawn between half and one and a half times it;
    /// shortened so that every role is killed within the first two thirds of the run).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub fault_every: Duration,
    /// Longest a killed process stays down before it is started again.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub max_down: Duration,
    /// Longest wait for everything to settle once the faults stop.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Keep the scratch database, the NATS stream and the processes' logs.
    #[arg(long)]
    pub keep: bool,
    /// Postgres server to create the scratch database on (default: DATABASE_URL).
    #[arg(long)]
    pub database_url: Option<String>,
    /// NATS server with JetStream, 2.10 or later (default: NATS_URL).
    #[arg(long)]
    pub nats_url: Option<String>,
}

/// The roles, one process each, in the order faults are counted.
const ROLES: [&str; 4] = ["gateway", "relay", "projector", "agent"];

/// How long a role process that keeps exiting before it listens is started again.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Event types that end a run.
const TERMINAL: &str = "('RunCompleted', 'RunFailed', 'RunCancelled')";

fn progress(args: &ChaosArgs, message: &str) {
    if !args.json {
        eprintln!("· {message}");
    }
}

/// `colloquy bench chaos`.
pub async fn run(url: &str, settings: &Settings, args: &ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.run_share),
        "--run-share is between 0 and 1"
    );
    anyhow::ensure!(
        args.duration >= Duration::from_secs(5),
        "--duration must be at least 5s (every role is killed at least once)"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    let nats_url = nats_url(args.nats_url.as_deref(), settings)?;
    let nats = async_nats::connect(nats_url.as_str())
        .await
        .context("Failed to connect to NATS")?;
    let scratch = ScratchDb::create(url).await?;
    let (prefix, stream) = private_names();
    let logs = std::env::temp_dir().join(format!("colloquy-chaos-{prefix}"));
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("Failed to create {}", logs.display()))?;
    let spec = Spec {
        database_url: database_url_for(url, scratch.name())?,
        nats_url,
        prefix,
        stream: stream.clone(),
        secret: jwt_secret(),
        logs: logs.clone(),
    };
    progress(
        args,
        &format!(
            "seed {seed}; scratch database {}, stream {stream}; logs in {}",
            scratch.name(),
            logs.display()
        ),
    );
    let result = tokio::select! {
        result = chaos(&spec, &scratch, &nats, args, seed) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("Failed to listen for Ctrl-C")?;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    if !args.keep {
        delete_nats_state(&nats, &stream).await;
        scratch.drop_database().await.ok();
    }
    let report = result?;
    let failures = report.failures();
    if failures.is_empty() && !args.keep {
        std::fs::remove_dir_all(&logs).ok();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "chaos checks failed: {}; the processes' logs are in {}",
            failures.join("; "),
            logs.display()
        );
    }
    Ok(())
}

/// How the role processes are started.
#[derive(Debug)]
struct Spec {
    database_url: String,
    nats_url: String,
    prefix: String,
    stream: String,
    secret: String,
    logs: PathBuf,
}

/// One running role process.
#[derive(Debug)]
struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
}

/// The role processes, started again after every kill.
#[derive(Debug)]
struct Cluster {
    exe: PathBuf,
    env: Vec<(&'static str, String)>,
    logs: PathBuf,
    processes: [Option<Process>; 4],
    /// The gateway's current address, for the users.
    gateway: Arc<RwLock<SocketAddr>>,
    /// Processes that exited before they listened and were started again.
    failed_starts: u64,
}

impl Cluster {
    fn new(spec: &Spec, gemini: &FakeGemini) -> anyhow::Result<Self> {
        let env = vec![
            ("DATABASE_URL", spec.database_url.clone()),
            ("NATS_URL", spec.nats_url.clone()),
            ("COLLOQUY_BIND", "127.0.0.1:0".to_owned()),
            ("COLLOQUY_SUBJECT_PREFIX", spec.prefix.clone()),
            ("COLLOQUY_STREAM", spec.stream.clone()),
            ("COLLOQUY_JWT_SECRET", spec.secret.clone()),
            ("COLLOQUY_COMMANDS_PER_SECOND", "1000000".to_owned()),
            ("COLLOQUY_COMMAND_BURST", "1000000".to_owned()),
            ("COLLOQUY_SHUTDOWN_GRACE", "2s".to_owned()),
            ("COLLOQUY_RETRY_DELAYS", "1s,2s,5s".to_owned()),
            ("GEMINI_BASE_URL", gemini.base_url()),
            ("GEMINI_API_KEYS", "chaos=fake-key@fake-project".to_owned()),
            ("GEMINI_RPM", "1000000".to_owned()),
            ("GEMINI_RPD", "100000000".to_owned()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
        ];
        Ok(Self {
            exe: this_executable()?,
            env,
            logs: spec.logs.clone(),
            processes: [None, None, None, None],
            gateway: Arc::new(RwLock::new(SocketAddr::from(([127, 0, 0, 1], 9)))),
            failed_starts: 0,
        })
    }

    /// Starts role `index` and waits until it listens (not until it is ready). A process
    /// that exits before it listens is started again, as a supervisor would, for up to
    /// [`START_PATIENCE`]; each such exit is counted. On a shared machine that happens
    /// when Postgres is slow to give a first connection or has none left
    /// (`max_connections`: each role process may hold up to 16).
    async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.start_once(index).await? {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < START_PATIENCE,
                "the {} kept exiting before it listened for {START_PATIENCE:?} (see {})",
                ROLES[index],
                self.logs.display()
            );
            self.failed_starts += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One start of role `index`: `false` if it exited before it listened.
    async fn start_once(&mut self, index: usize) -> anyhow::Result<bool> {
        let role = ROLES[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{role}.log")))
            .context("Failed to open a process log")?;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .args(["serve", "--external", "--roles", role])
            .env_remove("COLLOQUY_CONFIG")
            .env_remove("COLLOQUY_JWT_PRIVATE_KEY_FILE")
            .env_remove("GEMINI_API_KEYS_FILE")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("Failed to start the {role}"))?;
        let addr = super::serving_child_addr(&mut child)
            .await
            .with_context(|| format!("the {role}"))?;
        let Some(addr) = addr else {
            let _ = child.wait().await;
            return Ok(false);
        };
        if role == "gateway" {
            *self.gateway.write().unwrap_or_else(PoisonError::into_inner) = addr;
        }
        self.processes[index] = Some(Process { child, addr });
        Ok(true)
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.processes[index].take() {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
    }

    /// Roles whose process exited by itself (not killed by the bench).
    fn exited(&mut self) -> Vec<&'static str> {
        let mut exited = Vec::new();
        for (index, process) in self.processes.iter_mut().enumerate() {
            let running = process
                .as_mut()
                .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)));
            if !running {
                exited.push(ROLES[index]);
            }
        }
        exited
    }

    fn url(&self, index: usize, path: &str) -> Option<String> {
        self.processes[index]
            .as_ref()
            .map(|p| format!("http://{}{path}", p.addr))
    }

    async fn stop_all(&mut self) {
        for index in 0..ROLES.len() {
            self.kill(index).await;
        }
    }
}

/// The executable to start the roles from: this very file. On Linux `/proc/self/exe`,
/// which names this process's image even after a rebuild replaced the file on disk
/// (a restart must not start another build than the one killed); elsewhere its path.
fn this_executable() -> anyhow::Result<PathBuf> {
    let proc_self = PathBuf::from("/proc/self/exe");
    if proc_self.exists() {
        return Ok(proc_self);
    }
    std::env::current_exe().context("cannot find this executable")
}

/// What the users saw.
#[derive(Debug, Default)]
struct Tally {
    accepted: Vec<Accepted>,
    /// 409: a run already active in the conversation (not accepted, not checked).
    refused: u64,
    /// Sends given up on at the end without an answer (not accepted, not checked).
    unanswered: u64,
    /// Attempts sent again with the same key after a failure.
    retries: u64,
    /// Answers no fault explains (neither 2xx, 409, 429 nor 503).
    unexpected: Vec<String>,
}

#[derive(Debug, Clone)]
struct Accepted {
    message_id: String,
    run_id: Option<String>,
}

/// The report: figures and checks.
#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    duration_s: f64,
    machine: Machine,
    users: u32,
    /// Kills per role.
    faults: BTreeMap<&'static str, u64>,
    faults_total: u64,
    restarts: Restarts,
    commands: Commands,
    settle: Settle,
    log_events: u64,
    stream_messages: u64,
    lost: u64,
    duplicated: u64,
    checks: Checks,
    ok: bool,
}

#[derive(Debug, Serialize)]
struct Commands {
    accepted: u64,
    accepted_with_run: u64,
    refused_409: u64,
    unanswered: u64,
    retries: u64,
    unexpected: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Settle {
    settled: bool,
    seconds: f64,
    /// What was still pending when the wait ended (empty once settled).
    pending: Vec<String>,
    /// Roles whose process exited by itself.
    exited_by_themselves: Vec<&'static str>,
}

/// Kills and restarts beyond the checks.
#[derive(Debug, Serialize)]
struct Restarts {
    /// Starts that exited before listening (on a loaded machine, Postgres slow to
    /// give a first connection) and were tried again.
    failed_starts: u64,
}

#[derive(Debug, Default, Serialize)]
struct Checks {
    /// Accepted sends whose `MessageSent` is not in the log.
    lost_messages: u64,
    /// Accepted sends with a run whose run stream is not in the log.
    lost_runs: u64,
    /// Message ids with more than one `MessageSent`.
    duplicated_messages: u64,
    /// Runs with more than one `RunRequested`.
    duplicated_run_requests: u64,
    /// Positions or event ids the stream holds more than once.
    duplicated_in_stream: u64,
    /// Events of the log the stream does not hold.
    missing_from_stream: u64,
    /// Stream messages that are no event of the log (or carry another event's id).
    foreign_in_stream: u64,
    runs: u64,
    runs_terminal_once: u64,
    runs_not_terminal: u64,
    runs_terminal_more_than_once: u64,
    runs_replied_more_than_once: u64,
    /// Runs with an attempt closed because its agent was killed, and retried.
    runs_taken_over: u64,
    /// Differences between each read model and a fresh replay of the log.
    replay_differences: BTreeMap<&'static str, Vec<String>>,
    verify_clean: bool,
}

impl Report {
    fn failures(&self) -> Vec<String> {
        let c = &self.checks;
        let mut failures = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                failures.push(what);
            }
        };
        check(
            self.lost > 0,
            format!("{} accepted command(s) lost", self.lost),
        );
        check(
            self.duplicated > 0,
            format!("{} duplicate(s)", self.duplicated),
        );
        check(
            c.missing_from_stream + c.foreign_in_stream > 0,
            format!(
                "the stream misses {} event(s) and holds {} foreign message(s)",
                c.missing_from_stream, c.foreign_in_stream
            ),
        );
        check(
            c.runs_not_terminal + c.runs_terminal_more_than_once + c.runs_replied_more_than_once
                > 0,
            format!(
                "runs: {} not ended, {} ended twice, {} answered twice",
                c.runs_not_terminal, c.runs_terminal_more_than_once, c.runs_replied_more_than_once
            ),
        );
        check(
            !c.verify_clean,
            "the read models differ from a fresh replay".to_owned(),
        );
        check(
            !self.settle.settled,
            format!("did not settle: {}", self.settle.pending.join(", ")),
        );
        check(
            !self.settle.exited_by_themselves.is_empty(),
            format!(
                "exited without being killed: {}",
                self.settle.exited_by_themselves.join(", ")
            ),
        );
        check(
            !self.commands.unexpected.is_empty(),
            format!(
                "{} unexpected answer(s), e.g. {}",
                self.commands.unexpected.len(),
                self.commands
                    .unexpected
                    .first()
                    .cloned()
                    .unwrap_or_default()
            ),
        );
        check(
            self.faults.values().any(|&n| n == 0),
            "a role was never killed".to_owned(),
        );
        check(
            self.commands.accepted == 0,
            "no command accepted".to_owned(),
        );
        failures
    }

    fn text(&self) -> String {
        let c = &self.checks;
        let faults = self
            .faults
            .iter()
            .map(|(role, n)| format!("{role} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let differences: usize = c.replay_differences.values().map(Vec::len).sum();
        let mut out = format!(
            "colloquy bench chaos: {:.0} s of kill -9 under {} users (seed {})\n{}\n\n",
            self.duration_s,
            self.users,
            self.seed,
            self.machine.summary()
        );
        let rows = [
            (
                "faults injected",
                format!(
                    "{} ({faults}); starts that exited before listening and were tried again: {}",
                    self.faults_total, self.restarts.failed_starts
                ),
            ),
            (
                "commands accepted",
                format!(
                    "{} ({} with a run); refused 409: {}; unanswered: {}; retried: {}",
                    report::thousands(self.commands.accepted as f64),
                    report::thousands(self.commands.accepted_with_run as f64),
                    self.commands.refused_409,
                    self.commands.unanswered,
                    self.commands.retries
                ),
            ),
            (
                "settled",
                if self.settle.settled {
                    format!("in {:.1} s", self.settle.seconds)
                } else {
                    format!(
                        "NO, after {:.1} s: {}",
                        self.settle.seconds,
                        self.settle.pending.join(", ")
                    )
                },
            ),
            ("lost", self.lost.to_string()),
            (
                "duplicated",
                format!(
                    "{} (messages {}, run requests {}, stream {})",
                    self.duplicated,
                    c.duplicated_messages,
                    c.duplicated_run_requests,
                    c.duplicated_in_stream
                ),
            ),
            (
                "stream",
                format!(
                    "{} messages for {} events; missing {}, foreign {}",
                    self.stream_messages,
                    self.log_events,
                    c.missing_from_stream,
                    c.foreign_in_stream
                ),
            ),
            (
                "runs",
                format!(
                    "{}: ended once {}, not ended {}, ended twice {}, answered twice {}; {} taken over from a killed agent",
                    c.runs,
                    c.runs_terminal_once,
                    c.runs_not_terminal,
                    c.runs_terminal_more_than_once,
                    c.runs_replied_more_than_once,
                    c.runs_taken_over
                ),
            ),
            (
                "read models",
                if c.verify_clean {
                    "equal a fresh replay".to_owned()
                } else {
                    format!("{differences} difference(s) from a fresh replay")
                },
            ),
        ];
        for (name, value) in rows {
            out.push_str(&format!("  {name:<18} {value}\n"));
        }
        for (projection, found) in &c.replay_differences {
            for d in found.iter().take(10) {
                out.push_str(&format!("    {projection}: {d}\n"));
            }
        }
        if !self.commands.unexpected.is_empty() {
            out.push_str(&format!(
                "  unexpected answers: {}\n",
                self.commands.unexpected.len()
            ));
            for answer in self.commands.unexpected.iter().take(5) {
                out.push_str(&format!("    {answer}\n"));
            }
        }
        out.push_str(if self.ok {
            "result: PASS\n"
        } else {
            "result: FAIL\n"
        });
        out
    }
}

/// Starts everything, injects the faults under the workload, settles and checks.
async fn chaos(
    spec: &Spec,
    scratch: &ScratchDb,
    nats: &async_nats::Client,
    args: &ChaosArgs,
    seed: u64,
) -> anyhow::Result<Report> {
    // Opened as needed: Postgres connections are what a loaded test server runs out of
    // first. A replay verify holds up to five at once.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(30))
        .idle_timeout(Duration::from_secs(10))
        .connect_with(scratch.options().clone())
        .await
        .context("Failed to connect to the scratch database")?;
    let mut machine = Machine::probe(&pool).await;
    machine.nats = Some(nats.server_info().version);
    let gemini = FakeGemini::start(FakeConfig::default().key("fake-key", "fake-project"))
        .await
        .context("Failed to start the Gemini double")?;
    let mut cluster = Cluster::new(spec, &gemini)?;
    let client = http_client()?;
    let outcome = async {
        for index in 0..ROLES.len() {
            cluster.start(index).await?;
        }
        for (index, role) in ROLES.iter().enumerate() {
            let url = cluster
                .url(index, "/readyz")
                .context("a role is not running")?;
            wait_ready(&client, &url)
                .await
                .with_context(|| format!("the {role} did not become ready"))?;
        }
        progress(args, "the four role processes are ready");
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (faults, stopped) =
            workload(&mut cluster, &client, spec, args, seed, Arc::clone(&tally)).await?;
        let duration = stopped.as_secs_f64();
        progress(args, "faults stopped; waiting for everything to settle");
        let settle = settle(&mut cluster, &pool, nats, &spec.stream, args).await?;
        progress(
            args,
            "checking the log, the stream, the runs and the read models",
        );
        let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
        let report = check(&pool, nats, &spec.stream, tally, faults, settle).await?;
        anyhow::Ok((duration, report))
    }
    .await;
    cluster.stop_all().await;
    pool.close().await;
    let (duration_s, (commands, settle, figures, checks)) = outcome?;
    machine.load_after = report::load_average();
    let mut report = Report {
        seed,
        duration_s,
        machine,
        users: args.users,
        faults: figures.faults,
        faults_total: 0,
        restarts: Restarts {
            failed_starts: cluster.failed_starts,
        },
        commands,
        settle,
        log_events: figures.log_events,
        stream_messages: figures.stream_messages,
        lost: checks.lost_messages + checks.lost_runs,
        duplicated: checks.duplicated_messages
            + checks.duplicated_run_requests
            + checks.duplicated_in_stream,
        checks,
        ok: false,
    };
    report.faults_total = report.faults.values().sum();
    report.ok = report.failures().is_empty();
    Ok(report)
}

/// Runs the users for `--duration` while killing and restarting role processes;
/// returns the kills per role and how long the faults went on.
async fn workload(
    cluster: &mut Cluster,
    client: &reqwest::Client,
    spec: &Spec,
    args: &ChaosArgs,
    seed: u64,
    tally: Arc<Mutex<Tally>>,
) -> anyhow::Result<(BTreeMap<&'static str, u64>, Duration)> {
    let keys = JwtKeys::hs256(spec.secret.as_bytes())?;
    let mut rng = StdRng::seed_from_u64(seed);
    let base = format!(
        "http://{}",
        *cluster
            .gateway
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    );
    let mut users = Vec::new();
    for _ in 0..args.users {
        let user = Uuid::from_u128(rng.random());
        let token = keys.sign(&AccessClaims::new(user, false))?;
        let tokens = vec![token.clone(); args.conversations as usize];
        let conversations = create_conversations(client, &base, &tokens, 4).await?;
        users.push((token, conversations));
    }
    let stop = CancellationToken::new();
    let give_up = CancellationToken::new();
    let mut tasks = Vec::new();
    for (n, (token, conversations)) in users.into_iter().enumerate() {
        let user = User {
            n,
            client: client.clone(),
            gateway: Arc::clone(&cluster.gateway),
            token,
            conversations,
            rng: StdRng::seed_from_u64(rng.random()),
            run_share: args.run_share,
            pause: args.pause,
            tally: Arc::clone(&tally),
        };
        tasks.push(tokio::spawn(user.run(stop.clone(), give_up.clone())));
    }
    let started = Instant::now();
    let faults = inject(cluster, &mut rng, args, started + args.duration).await;
    let stopped = started.elapsed();
    stop.cancel();
    // Sends in progress get some time to be answered (the gateway may have just
    // restarted); then the users give up on them.
    let give_up_later = {
        let give_up = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            give_up.cancel();
        })
    };
    for task in tasks {
        task.await.context("a user task panicked")?;
    }
    give_up_later.abort();
    Ok((faults?, stopped))
}

/// Kills a random role every `--fault-every` or so until `deadline` (then any role
/// not yet killed), restarting each after a random pause.
async fn inject(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    args: &ChaosArgs,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let mut faults: BTreeMap<&'static str, u64> = ROLES.iter().map(|r| (*r, 0)).collect();
    // Every role first, in a random order, then at random.
    let mut pending: Vec<usize> = (0..ROLES.len()).collect();
    pending.shuffle(rng);
    // Room for every role within about two thirds of the run.
    let every = args
        .fault_every
        .min(args.duration * 2 / 3 / (ROLES.len() as u32 + 1))
        .max(Duration::from_millis(100));
    loop {
        let wait = every.mul_f64(rng.random_range(0.5..1.5));
        let now = Instant::now();
        if now + wait >= deadline {
            if pending.is_empty() {
                tokio::time::sleep(deadline.saturating_duration_since(now)).await;
                break;
            }
        } else {
            tokio::time::sleep(wait).await;
        }
        let index = pending
            .pop()
            .unwrap_or_else(|| rng.random_range(0..ROLES.len()));
        cluster.kill(index).await;
        *faults.entry(ROLES[index]).or_default() += 1;
        let down = args
            .max_down
            .mul_f64(rng.random_range(0.05..1.0))
            .max(Duration::from_millis(50));
        tokio::time::sleep(down).await;
        cluster.start(index).await?;
    }
    Ok(faults)
}

/// One user: sends messages until stopped, each retried with its key until answered.
struct User {
    n: usize,
    client: reqwest::Client,
    gateway: Arc<RwLock<SocketAddr>>,
    token: String,
    conversations: Vec<String>,
    rng: StdRng,
    run_share: f64,
    pause: Duration,
    tally: Arc<Mutex<Tally>>,
}

impl User {
    async fn run(mut self, stop: CancellationToken, give_up: CancellationToken) {
        let mut sent = 0_u64;
        while !stop.is_cancelled() {
            sent += 1;
            let conversation =
                self.conversations[self.rng.random_range(0..self.conversations.len())].clone();
            let run_agent = self.rng.random_bool(self.run_share);
            let key = Uuid::from_u128(self.rng.random()).to_string();
            let body = json!({
                "text": format!("chaos message {sent} of user {}", self.n),
                "run_agent": run_agent,
            });
            self.send(&conversation, &key, &body, &give_up).await;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(self.pause) => {}
            }
        }
    }

    async fn send(
        &mut self,
        conversation: &str,
        key: &str,
        body: &Value,
        give_up: &CancellationToken,
    ) {
        loop {
            let addr = *self.gateway.read().unwrap_or_else(PoisonError::into_inner);
            let answer = self
                .client
                .post(format!(
                    "http://{addr}/v1/conversations/{conversation}/messages"
                ))
                .bearer_auth(&self.token)
                .header("Idempotency-Key", key)
                .timeout(Duration::from_secs(15))
                .json(body)
                .send()
                .await;
            let retry = match answer {
                Ok(response) if response.status().is_success() => {
                    let status = response.status();
                    // A cut while reading the body is a failure like any other: the
                    // same key again.
                    match response.json::<Value>().await {
                        Ok(committed) => {
                            let accepted = Accepted {
                                message_id: committed["message_id"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                                run_id: committed["run_id"].as_str().map(str::to_owned),
                            };
                            let mut tally =
                                self.tally.lock().unwrap_or_else(PoisonError::into_inner);
                            if accepted.message_id.is_empty() {
                                tally
                                    .unexpected
                                    .push(format!("{status} without a message_id: {committed}"));
                            } else {
                                tally.accepted.push(accepted);
                            }
                            return;
                        }
                        Err(_) => true,
                    }
                }
                Ok(response) if response.status() == 409 => {
                    self.tally
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .refused += 1;
                    return;
                }
                Ok(response) if matches!(response.status().as_u16(), 429 | 503) => true,
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    self.tally
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .unexpected
                        .push(format!("{status}: {text}"));
                    return;
                }
                // Refused, reset or timed out: the gateway died or is starting.
                Err(_) => true,
            };
            debug_assert!(retry);
            if give_up.is_cancelled() {
                self.tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .unanswered += 1;
                return;
            }
            self.tally
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retries += 1;
            let pause = Duration::from_millis(self.rng.random_range(100..400));
            tokio::select! {
                () = give_up.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Waits (at most `--settle-timeout`) until every process runs, every projection is
/// at the log's head, the stream holds every event and no run is open.
async fn settle(
    cluster: &mut Cluster,
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
    stream: &str,
    args: &ChaosArgs,
) -> anyhow::Result<Settle> {
    let started = Instant::now();
    let db = Database::Postgres(pool.clone());
    let js = async_nats::jetstream::new(nats.clone());
    loop {
        let exited = cluster.exited();
        // A query that fails (the server out of connections for a moment) leaves the
        // state unknown: it is pending, and asked again.
        let pending = match pending_work(&db, pool, &js, stream).await {
            Ok(pending) => pending,
            Err(error) => vec![format!("cannot tell: {error:#}")],
        };
        if (pending.is_empty() && exited.is_empty()) || started.elapsed() >= args.settle_timeout {
            return Ok(Settle {
                settled: pending.is_empty() && exited.is_empty(),
                seconds: started.elapsed().as_secs_f64(),
                pending,
                exited_by_themselves: exited,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What is still to happen before everything has settled (nothing once it has).
async fn pending_work(
    db: &Database,
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<String>> {
    let mut pending = Vec::new();
    let lags = colloquy_projections::runner::lags(db).await?;
    for lag in &lags {
        if lag.lag.events > 0 {
            pending.push(format!(
                "projection {} {} event(s) behind",
                lag.projection.name(),
                lag.lag.events
            ));
        }
    }
    let open: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM (
           SELECT stream_name FROM message_store.messages
            WHERE split_part(stream_name, '-', 1) = 'agentRun'
            GROUP BY stream_name
           HAVING count(*) FILTER (WHERE type IN {TERMINAL}) = 0) open"
    )))
    .fetch_one(pool)
    .await?;
    if open > 0 {
        pending.push(format!("{open} run(s) not ended"));
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM message_store.messages")
        .fetch_one(pool)
        .await?;
    let held = match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    };
    if held < events.unsigned_abs() {
        pending.push(format!("the stream holds {held} of {events} events"));
    }
    Ok(pending)
}

/// Figures beside the checks.
#[derive(Debug)]
struct Figures {
    faults: BTreeMap<&'static str, u64>,
    log_events: u64,
    stream_messages: u64,
}

/// Compares what the users were told with the log, the stream and the read models.
async fn check(
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
    stream: &str,
    tally: Tally,
    faults: BTreeMap<&'static str, u64>,
    settle: Settle,
) -> anyhow::Result<(Commands, Settle, Figures, Checks)> {
    let mut checks = Checks::default();
    // The log.
    let log: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT global_position, id FROM message_store.messages ORDER BY 1")
            .fetch_all(pool)
            .await?;
    let sent: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT data->>'messageId', count(*) FROM message_store.messages
          WHERE type = 'MessageSent' GROUP BY 1",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // Per run: RunRequested events, terminal events.
    let runs: HashMap<String, (i64, i64)> =
        sqlx::query_as::<_, (String, i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT substr(stream_name, length('agentRun-') + 1),
                    count(*) FILTER (WHERE type = 'RunRequested'),
                    count(*) FILTER (WHERE type IN {TERMINAL})
               FROM message_store.messages
              WHERE split_part(stream_name, '-', 1) = 'agentRun'
              GROUP BY stream_name"
        )))
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(run, requested, ended)| (run, (requested, ended)))
        .collect();
    let replies: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT data->>'runId', count(*) FROM message_store.messages
          WHERE type = 'MessageSent' AND data->>'author' = 'assistant'
            AND data->>'runId' IS NOT NULL
          GROUP BY 1",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();

    // Lost: accepted but not in the log.
    for accepted in &tally.accepted {
        if !sent.contains_key(&accepted.message_id) {
            checks.lost_messages += 1;
        }
        if let Some(run) = &accepted.run_id
            && !runs.contains_key(run)
        {
            checks.lost_runs += 1;
        }
    }
    // Duplicated in the log.
    checks.duplicated_messages = sent.values().filter(|&&n| n > 1).count() as u64;
    checks.duplicated_run_requests = runs.values().filter(|(r, _)| *r > 1).count() as u64;
    // Runs.
    checks.runs = runs.len() as u64;
    for (_, ended) in runs.values() {
        match ended {
            0 => checks.runs_not_terminal += 1,
            1 => checks.runs_terminal_once += 1,
            _ => checks.runs_terminal_more_than_once += 1,
        }
    }
    checks.runs_replied_more_than_once = replies.values().filter(|&&n| n > 1).count() as u64;
    let taken_over: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT stream_name) FROM message_store.messages
          WHERE type = 'RunRetryScheduled'
            AND data->>'reason' LIKE 'the agent running attempt % stopped'",
    )
    .fetch_one(pool)
    .await?;
    checks.runs_taken_over = taken_over.unsigned_abs();

    // The stream against the log.
    let held = stream_messages(nats, stream).await?;
    let by_position: HashMap<i64, Uuid> = log.iter().copied().collect();
    let mut positions_seen = HashSet::new();
    let mut ids_seen = HashSet::new();
    for (position, id) in &held {
        let duplicate_position = !positions_seen.insert(*position);
        let duplicate_id = !ids_seen.insert(*id);
        if duplicate_position || duplicate_id {
            checks.duplicated_in_stream += 1;
        }
        if by_position.get(position) != Some(id) {
            checks.foreign_in_stream += 1;
        }
    }
    checks.missing_from_stream = log
        .iter()
        .filter(|(position, _)| !positions_seen.contains(position))
        .count() as u64;

    // The read models against a fresh replay.
    let db = Database::Postgres(pool.clone());
    let store: Arc<dyn EventStore> =
        Arc::new(PgEventStore::with_pool(pool.clone(), PgOptions::default()));
    let quiet = |_: i64, _: i64| {};
    for projection in colloquy_projections::all_projections() {
        let found =
            colloquy_projections::replay::verify(&db, &store, projection.as_ref(), &quiet).await?;
        checks.replay_differences.insert(
            projection.name(),
            found
                .iter()
                .map(|d| format!("{} {} {}", d.table, d.kind, d.key))
                .collect(),
        );
    }
    checks.verify_clean = checks.replay_differences.values().all(Vec::is_empty);

    let commands = Commands {
        accepted: tally.accepted.len() as u64,
        accepted_with_run: tally.accepted.iter().filter(|a| a.run_id.is_some()).count() as u64,
        refused_409: tally.refused,
        unanswered: tally.unanswered,
        retries: tally.retries,
        unexpected: tally.unexpected,
    };
    let figures = Figures {
        faults,
        log_events: log.len() as u64,
        stream_messages: held.len() as u64,
    };
    Ok((commands, settle, figures, checks))
}

/// Every message of the stream: (its `Colloquy-Position`, its `Nats-Msg-Id`), in
/// sequence order; a message without them counts as position 0 and the nil id.
async fn stream_messages(
    nats: &async_nats::Client,
    stream: &str,
) -> anyhow::Result<Vec<(i64, Uuid)>> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("Failed to open the stream {stream}"))?;
    let state = handle.info().await?.state.clone();
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let handle = &handle;
    let read: Vec<anyhow::Result<Option<(i64, Uuid)>>> =
        futures::stream::iter(state.first_sequence..=state.last_sequence)
            .map(|sequence| async move {
                match handle.get_raw_message(sequence).await {
                    Ok(message) => {
                        let header = |name: &str| {
                            message
                                .headers
                                .get(name)
                                .map(|v| v.as_str().to_owned())
                                .unwrap_or_default()
                        };
                        let position = header(colloquy_eventstore::wire::POSITION)
                            .parse()
                            .unwrap_or(0);
                        let id = header("Nats-Msg-Id").parse().unwrap_or(Uuid::nil());
                        Ok(Some((position, id)))
                    }
                    Err(error)
                        if error.kind()
                            == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(anyhow::Error::new(error)
                        .context(format!("Failed to read message {sequence} of {stream}"))),
                }
            })
            .buffered(32)
            .collect()
            .await;
    let mut messages = Vec::new();
    for message in read {
        if let Some(m) = message? {
            messages.push(m);
        }
    }
    Ok(messages)
}
