//! The `colloquy` command line. Every subcommand reads the same configuration as
//! `serve` (defaults, then `--config FILE` or `COLLOQUY_CONFIG`, then the environment).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::Mode;
use crate::config::{Config, Settings, Storage};
use crate::{Application, shutdown, telemetry};

/// Colloquy: an event-sourced chat backend with a Gemini agent.
#[derive(Debug, Parser)]
#[command(name = "colloquy", version, about, long_about = None)]
pub struct Cli {
    /// A TOML file with the same keys as the environment (e.g. `DATABASE_URL = "…"`).
    #[arg(long, global = true, env = "COLLOQUY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (all roles in one process by default).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets redacted.
    Config {
        /// Print JSON instead of `KEY = value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from the log (not from NATS) and swap them in while queries
    /// keep being served; with --verify, rebuild into scratch tables and report every
    /// difference from the live ones instead (exit status 1 if any).
    Replay(ReplayArgs),
    /// Operators' tools: streams, events, projections, dead-lettered runs, the Gemini
    /// key pool, users and tokens (the `/v1/admin` routes, straight on the database).
    Admin(crate::admin::AdminArgs),
    /// Measure this build on this machine (see docs/PERFORMANCE.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Tools for trying Colloquy without outside services.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Serve the project's Gemini double (the real wire format, fake answers:
    /// `echo: <your message>`), to try the whole loop without a Gemini key. Point
    /// `GEMINI_BASE_URL` at it and give a key it knows.
    FakeGemini(FakeGeminiArgs),
}

#[derive(Debug, clap::Args)]
pub struct FakeGeminiArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub bind: std::net::SocketAddr,
    /// The keys it accepts, as `key@project`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "fake-key@fake-project")]
    pub keys: Vec<String>,
    /// Requests per minute per project (unlimited if unset).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Requests per day per project (unlimited if unset).
    #[arg(long)]
    pub rpd: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Refuse to start without Postgres and NATS (also `COLLOQUY_REQUIRE_EXTERNAL=1`).
    #[arg(long)]
    pub external: bool,
    /// The roles this process runs, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub roles: Vec<crate::app::Role>,
    /// Answer runs with the project's Gemini double (replies are `echo: <message>`)
    /// instead of Gemini: the whole loop without a key. Overrides GEMINI_BASE_URL and
    /// GEMINI_API_KEYS.
    #[arg(long)]
    pub fake_gemini: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The projection: messages, runs or search.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub projection: Option<String>,
    /// Every projection.
    #[arg(long)]
    pub all: bool,
    /// Compare a fresh rebuild with the live tables instead of swapping it in.
    #[arg(long)]
    pub verify: bool,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    Settings::load(cli.config.as_deref())?.validate()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Config { json } => {
            let settings = Settings::load(cli.config.as_deref())?;
            // Validate too, so a bad value is reported, but print what was loaded.
            let validation = settings.clone().validate();
            let shown = settings.redacted();
            if *json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else if let Some(map) = shown.as_object() {
                for key in crate::config::KEYS {
                    match map.get(*key) {
                        Some(serde_json::Value::Null) | None => println!("{key} = (unset)"),
                        Some(serde_json::Value::String(s)) => println!("{key} = {s}"),
                        Some(other) => println!("{key} = {other}"),
                    }
                }
            }
            validation.map(|_| ())
        }
        Command::Migrate => {
            let config = load(&cli)?;
            let _telemetry = telemetry::init(config.settings.rust_log.as_deref(), None)?;
            match &config.storage {
                Storage::Postgres { url, .. } => {
                    let pool = sqlx::PgPool::connect(secrecy::ExposeSecret::expose_secret(url))
                        .await
                        .context("Failed to connect to Postgres (DATABASE_URL)")?;
                    colloquy_eventstore::postgres::migrate(&pool)
                        .await
                        .context("Failed to apply migrations")?;
                }
                Storage::Embedded { sqlite_url } => {
                    // Opening the file applies its migrations.
                    colloquy_eventstore::sqlite::open_url(sqlite_url)
                        .await
                        .with_context(|| format!("Failed to open {sqlite_url}"))?
                        .close()
                        .await;
                }
            }
            println!("migrations applied");
            Ok(())
        }
        Command::Replay(args) => {
            let config = load(&cli)?;
            let _telemetry = telemetry::init(config.settings.rust_log.as_deref(), None)?;
            crate::replay::run(&config, args).await
        }
        Command::Admin(args) => {
            let config = load(&cli)?;
            let _telemetry = telemetry::init(config.settings.rust_log.as_deref(), None)?;
            crate::admin::run(&config, args).await
        }
        Command::Bench(command) => crate::bench::run(cli.config.as_deref(), command).await,
        Command::Dev(DevCommand::FakeGemini(args)) => fake_gemini(args).await,
        Command::Serve(args) => {
            let mut settings = Settings::load(cli.config.as_deref())?;
            settings.require_external |= args.external;
            // Held until the server stops.
            let _fake = if args.fake_gemini {
                let fake = colloquy_gemini_agent::fake::FakeGemini::start(
                    colloquy_gemini_agent::fake::FakeConfig::default()
                        .key("fake-key", "fake-project"),
                )
                .await
                .context("Failed to start the Gemini double")?;
                settings.gemini_base_url = fake.base_url();
                settings.gemini_api_keys =
                    Some(secrecy::SecretString::from("fake=fake-key@fake-project"));
                Some(fake)
            } else {
                None
            };
            let config = settings.validate()?;
            let roles = if args.roles.is_empty() {
                crate::app::all_roles()
            } else {
                args.roles.iter().copied().collect()
            };
            let _telemetry = telemetry::init_for_roles(
                config.settings.rust_log.as_deref(),
                config.settings.otel_endpoint.as_deref(),
                Some(&crate::app::roles_label(&roles)),
            )?;
            let app = Application::build_with_roles(config, None, roles).await?;
            let addr = app.local_addr();
            let gemini = if args.fake_gemini {
                "; runs answered by the Gemini double (fake replies)"
            } else {
                ""
            };
            println!("{}", serving_line(&app.mode(), addr, gemini));
            let token = CancellationToken::new();
            shutdown::on_signal(token.clone());
            app.run_until_stopped(token).await
        }
    }
}

/// The first line `serve` prints: the mode, where the data is, the URL and the docs.
fn serving_line(mode: &Mode, addr: std::net::SocketAddr, gemini: &str) -> String {
    let place = match mode {
        Mode::External => "external mode: Postgres + NATS".to_owned(),
        Mode::Embedded { path } => format!("embedded mode: SQLite at {path}, no broker"),
    };
    format!("colloquy serving ({place}) on http://{addr} (API docs: http://{addr}/docs){gemini}")
}

/// The address in a line [`serving_line`] printed: how a parent process (the benches
/// that start `serve` as a child) learns where the child listens.
pub(crate) fn serving_addr(line: &str) -> Option<std::net::SocketAddr> {
    let rest = line
        .strip_prefix("colloquy serving (")?
        .split_once(") on http://")?
        .1;
    rest.split_whitespace().next()?.parse().ok()
}

/// `colloquy dev fake-gemini`: serves the Gemini double until a signal.
async fn fake_gemini(args: &FakeGeminiArgs) -> anyhow::Result<()> {
    use colloquy_gemini_agent::fake::{FakeConfig, Quota, serve};
    let mut config = FakeConfig {
        default_quota: Quota {
            rpm: args.rpm,
            rpd: args.rpd,
        },
        ..FakeConfig::default()
    };
    let mut keys = Vec::new();
    for entry in &args.keys {
        let Some((key, project)) = entry.rsplit_once('@') else {
            anyhow::bail!("--keys: each entry is key@project");
        };
        keys.push(format!("fake={key}@{project}"));
        config = config.key(key, project);
    }
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("Failed to bind {}", args.bind))?;
    let addr = listener.local_addr()?;
    println!("fake Gemini (a test double, not Google) on http://{addr}");
    println!(
        "try: GEMINI_BASE_URL=http://{addr} GEMINI_API_KEYS={} colloquy serve",
        keys.join(",")
    );
    let token = CancellationToken::new();
    shutdown::on_signal(token.clone());
    serve(listener, config, token).await?;
    Ok(())
}

#[cfg(test)]
mod serving_line_tests {
    use super::*;

    #[test]
    fn the_address_is_read_back_from_the_serving_line() {
        let addr: std::net::SocketAddr =
            "127.0.0.1:4567".parse().unwrap_or_else(|_| unreachable!());
        for mode in [
            Mode::External,
            Mode::Embedded {
                path: "./data/colloquy (1).sqlite".to_owned(),
            },
        ] {
            let line = serving_line(&mode, addr, "; Gemini: the double at http://127.0.0.1:1");
            assert_eq!(serving_addr(&line), Some(addr), "{line}");
        }
        assert_eq!(serving_addr("colloquy listening somewhere"), None);
    }
}
