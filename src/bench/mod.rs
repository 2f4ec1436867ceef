//! `colloquy bench …`: measurements of this build on this machine, printed as a table
//! (or one JSON document with `--json`). The figures in `docs/PERFORMANCE.md` come
//! from here.
//!
//! Every benchmark works in its own scratch database (`colloquy_bench_<random>`),
//! created next to the configured one on the same server, migrated, and dropped at
//! the end; the configured database's data is never touched.
//!
//! - [`append`]: `bench append`, the write path against a raw-insert ceiling, `$all`
//!   reads and loading a long conversation.
//! - [`http`]: `bench http`, the gateway's send-message and page latency at a fixed
//!   rate and its throughput at saturation.
//! - [`sse`]: `bench sse`, many live-feed subscribers on one gateway: delivery
//!   latency and the gateway's memory.
//! - [`agent`]: `bench agent`, the Gemini agent against the fake Gemini: its overhead,
//!   runs per minute within quotas, and settling under random failures.
//! - [`chaos`]: `bench chaos`, the role processes killed with SIGKILL under load, then
//!   a check that no accepted command was lost or duplicated (docs/RELIABILITY.md).
//! - [`scratch`]: the scratch database.
//! - [`report`]: latency histograms, result rows, the table and machine facts.

pub mod agent;
pub mod append;
pub mod chaos;
pub mod http;
pub mod readside;
pub mod report;
pub mod scratch;
pub mod sse;

use std::path::Path;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;

use crate::config::Settings;
use crate::telemetry;

/// What `colloquy bench` can measure.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Appends: group commit vs. a raw single-row INSERT ceiling, Message DB's
    /// write_message, `$all` reads and loading a 10,000-event conversation.
    Append(append::AppendArgs),
    /// Rebuilding each read model from a generated log of realistic events.
    Replay(readside::ReplayArgs),
    /// Append → visible in the messages read model, through the relay and JetStream,
    /// at a sustained rate.
    Lag(readside::LagArgs),
    /// Events per second one relay publishes to JetStream.
    Relay(readside::RelayArgs),
    /// The gateway: send-message at a fixed rate and at saturation, and reading a
    /// conversation page.
    Http(http::HttpArgs),
    /// Many SSE subscribers on one gateway (a child process): delivery latency and
    /// the gateway's memory.
    Sse(sse::SseArgs),
    /// The Gemini agent against the fake Gemini: overhead before the call, runs per
    /// minute within quotas, and random failures.
    Agent(agent::AgentArgs),
    /// Kill -9 each role process (gateway, relay, projector, agent) at random under a
    /// workload, restart it, then check that nothing accepted was lost or duplicated.
    Chaos(chaos::ChaosArgs),
}

/// Runs a benchmark. `config` is the `--config` file, if any.
pub async fn run(config: Option<&Path>, command: &BenchCommand) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    let _telemetry = telemetry::init(settings.rust_log.as_deref(), None)?;
    match command {
        BenchCommand::Append(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            append::run(&url, args).await
        }
        BenchCommand::Replay(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            readside::replay(&url, args).await
        }
        BenchCommand::Lag(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            readside::lag(&url, &settings, args).await
        }
        BenchCommand::Relay(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            readside::relay(&url, &settings, args).await
        }
        BenchCommand::Http(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            http::run(&url, &settings, args).await
        }
        BenchCommand::Sse(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            sse::run(&url, &settings, args).await
        }
        BenchCommand::Agent(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            agent::run(&url, &settings, args).await
        }
        BenchCommand::Chaos(args) => {
            let url = database_url(args.database_url.as_deref(), &settings)?;
            chaos::run(&url, &settings, args).await
        }
    }
}

/// The server to benchmark on: `--database-url`, else the configured `DATABASE_URL`.
fn database_url(flag: Option<&str>, settings: &Settings) -> anyhow::Result<String> {
    let url = match flag {
        Some(url) => url.to_owned(),
        None => settings
            .database_url
            .as_ref()
            .map(|url| url.expose_secret().to_owned())
            .context(
                "bench needs Postgres: set DATABASE_URL=postgres://… or pass --database-url",
            )?,
    };
    anyhow::ensure!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "bench needs a postgres:// URL (the scratch database is created on that server)"
    );
    Ok(url)
}

/// Where a `colloquy serve` child process listens: read from the first line it prints
/// ([`crate::cli::serving_addr`]), waiting at most 120 s; `None` if it exited before. Its
/// stdout keeps being drained afterwards, so the child never blocks on a full pipe.
///
/// # Errors
/// It did not start listening within 120 s, or its stdout could not be read.
pub(crate) async fn serving_child_addr(
    child: &mut tokio::process::Child,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = crate::cli::serving_addr(&line) {
                return Ok::<_, anyhow::Error>(Some(addr));
            }
        }
        Ok(None)
    })
    .await
    .context("the process did not start listening in 120 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addr)
}
