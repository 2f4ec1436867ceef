//! The application: connects the dependencies a process needs, starts its roles and
//! serves HTTP until the shutdown token is cancelled. Tests build it on port 0.
//!
//! Roles (`colloquy serve --roles …`, all by default): `gateway` (HTTP), `relay`
//! (log → JetStream), `projector` (JetStream → read models, healed from the log),
//! `agent` (runs → Gemini → completions). Without `DATABASE_URL` the process is the
//! embedded mode: one SQLite file, no broker (ADR 0011). Background roles run as tasks
//! that stop between messages when the token is cancelled; correctness never depends on
//! them stopping cleanly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use colloquy_commands::live::LocalSignals;
use colloquy_commands::relay::{Relay, RelayConfig, RelayStats, ensure_stream};
use colloquy_domain::RunId;
use colloquy_eventstore::{
    Database, EventStore, GlobalPosition, PgEventStore, PgOptions, SqliteEventStore,
};
use colloquy_gateway::edges::Edges;
use colloquy_gateway::{GatewayState, LiveHub, LiveSettings, Probe, ProbeResult};
use colloquy_gemini_agent::backoff::RetrySchedule;
use colloquy_gemini_agent::budget::{
    BudgetStore, KvBudgetConfig, KvBudgetStore, KvOnceReachable, MemoryBudgetStore,
    server_has_key_value_stores,
};
use colloquy_gemini_agent::clock::SystemClock;
use colloquy_gemini_agent::gemini::{GeminiClient, GeminiConfig, RetryTimeouts};
use colloquy_gemini_agent::keys::KeyPool;
use colloquy_gemini_agent::worker::{
    Agent, AgentSettings, BoxError, Checkpoint, DueRuns, Transport,
};
use colloquy_projections::jetstream::FanOut;
use colloquy_projections::runner::ProjectionLag;
use colloquy_projections::{Runner, all_projections};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Storage};

/// What one process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    Gateway,
    Relay,
    Projector,
    Agent,
}

/// Every role: the default for `serve`.
pub fn all_roles() -> BTreeSet<Role> {
    [Role::Gateway, Role::Relay, Role::Projector, Role::Agent]
        .into_iter()
        .collect()
}

/// `roles` as `serve --roles` takes them: `gateway,relay,projector,agent`.
pub fn roles_label(roles: &BTreeSet<Role>) -> String {
    roles
        .iter()
        .filter_map(clap::ValueEnum::to_possible_value)
        .map(|value| value.get_name().to_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// A built application, listening but not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    config: Config,
    roles: BTreeSet<Role>,
    /// The read models' and accounts' database (and the log's, in the embedded mode).
    db: Database,
    store: Arc<dyn EventStore>,
    backing: Backing,
    live: LiveHub,
    /// The Gemini key pool, shared by the agent role and the gateway's admin view.
    keys: Option<Arc<KeyPool>>,
    /// The relay's counters once it starts, for `/metrics`.
    relay_stats: Arc<OnceLock<Arc<RelayStats>>>,
}

/// What the log is fanned out with.
#[derive(Debug, Clone)]
enum Backing {
    /// Postgres and NATS JetStream (`--external`, and any `postgres://` URL).
    External {
        store: PgEventStore,
        nats: async_nats::Client,
    },
    /// One SQLite file and no broker: every role tails the log, woken in-process on
    /// append; run tokens travel in memory.
    Embedded { signals: LocalSignals },
}

/// Where `serve` keeps its data, for its first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Postgres + NATS.
    External,
    /// One SQLite file at this path.
    Embedded { path: String },
}

impl Application {
    /// Connects to Postgres (applying migrations) and NATS, or opens the embedded
    /// mode's SQLite file, and binds the listener (`listener` if given, else
    /// `COLLOQUY_BIND`).
    pub async fn build(config: Config, listener: Option<TcpListener>) -> anyhow::Result<Self> {
        Self::build_with_roles(config, listener, all_roles()).await
    }

    /// As [`Application::build`], running only `roles`.
    pub async fn build_with_roles(
        config: Config,
        listener: Option<TcpListener>,
        roles: BTreeSet<Role>,
    ) -> anyhow::Result<Self> {
        let (db, store, backing) =
            open_storage(&config.storage, config.settings.database_pool_size).await?;
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind(config.settings.bind)
                .await
                .with_context(|| {
                    format!("Failed to bind COLLOQUY_BIND={}", config.settings.bind)
                })?,
        };
        let mut probes: Vec<Arc<dyn Probe>> = vec![Arc::new(DatabaseProbe(db.clone()))];
        if let Backing::External { nats, .. } = &backing {
            probes.push(Arc::new(NatsProbe(nats.clone())));
        }
        if roles.contains(&Role::Projector) {
            probes.push(Arc::new(ProjectionsProbe {
                db: db.clone(),
                budget: config.projection_lag_budget,
            }));
        }
        let jwt_secret = jwt_secret(&config)?;
        let auth = colloquy_gateway::AuthState::new(
            db.clone(),
            colloquy_gateway::auth::AuthSettings {
                jwt_secret,
                jwt_private_key_file: config.settings.jwt_private_key_file.clone(),
                oidc: config.oidc.clone(),
                command_rate_limit: Some(colloquy_gateway::auth::RateLimit::new(
                    config.settings.commands_per_second,
                    config.settings.command_burst,
                )),
                trusted_proxies: config.trusted_proxies.clone(),
                ..Default::default()
            },
        )
        .await
        .context("Failed to set up authentication")?;
        let commands = colloquy_commands::Commands::new(
            Arc::clone(&store),
            colloquy_commands::cache::CacheConfig::default(),
        );
        let live_settings = LiveSettings {
            prefix: config.settings.subject_prefix.clone(),
            buffer: config.settings.sse_buffer,
            max_streams_per_user: config.settings.sse_max_streams_per_user,
            max_streams: config.settings.sse_max_streams,
            ..LiveSettings::default()
        };
        let live = match &backing {
            Backing::External { nats, .. } => {
                LiveHub::new(commands.clone(), Some(nats.clone()), live_settings)
            }
            Backing::Embedded { signals } => {
                LiveHub::embedded(commands.clone(), signals.clone(), live_settings)
            }
        };
        // One pool per process: the agent spends from it and the admin view reads it, so
        // both see the same budgets and key health.
        let keys = if roles.contains(&Role::Agent) || roles.contains(&Role::Gateway) {
            let nats = match &backing {
                Backing::External { nats, .. } => Some(nats),
                Backing::Embedded { .. } => None,
            };
            key_pool(&config, nats, false).await?
        } else {
            None
        };
        let fan_out = match &backing {
            Backing::External { nats, .. } => Some(colloquy_gateway::admin::FanOutStream {
                jetstream: async_nats::jetstream::new(nats.clone()),
                stream: config.settings.stream.clone(),
                prefix: config.settings.subject_prefix.clone(),
            }),
            Backing::Embedded { .. } => None,
        };
        let relay_stats = Arc::new(OnceLock::new());
        let metrics = crate::metrics::Scraper::new(
            roles.clone(),
            db.clone(),
            Arc::clone(&store),
            live.clone(),
            keys.clone(),
            Arc::clone(&relay_stats),
        );
        let router = colloquy_gateway::router_with(
            GatewayState {
                probes: Arc::new(probes),
                auth,
                commands,
                db: db.clone(),
                live: live.clone(),
                keys: keys.clone(),
                rebuilds: colloquy_gateway::admin::Rebuilds::default(),
                fan_out,
                metrics: Arc::new(metrics),
            },
            &Edges {
                cors_origins: config.cors_origins.clone(),
                ..Edges::default()
            },
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Self {
            listener,
            router,
            config,
            roles,
            db,
            store,
            backing,
            live,
            keys,
            relay_stats,
        })
    }

    /// The event store every role of this process appends through.
    pub fn store(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.store)
    }

    /// The embedded mode's in-memory run signals (`None` in the external mode, where
    /// they travel over NATS).
    pub fn local_signals(&self) -> Option<LocalSignals> {
        match &self.backing {
            Backing::External { .. } => None,
            Backing::Embedded { signals } => Some(signals.clone()),
        }
    }

    /// Where this application keeps its data.
    pub fn mode(&self) -> Mode {
        match &self.config.storage {
            Storage::Postgres { .. } => Mode::External,
            Storage::Embedded { sqlite_url } => Mode::Embedded {
                path: sqlite_path(sqlite_url),
            },
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("BUG: a bound listener has an address")
    }

    fn relay_config(&self) -> RelayConfig {
        let settings = &self.config.settings;
        let mut relay = RelayConfig::new(settings.subject_prefix.clone(), settings.stream.clone());
        relay.replicas = settings.stream_replicas;
        relay.duplicate_window = self.config.duplicate_window;
        relay
    }

    /// Starts the background roles.
    async fn start_roles(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if self.roles.contains(&Role::Gateway) {
            tasks.push(tokio::spawn(self.live.clone().run(shutdown.clone())));
        }
        match &self.backing {
            Backing::External { store, nats } => {
                self.start_fan_out(store, nats, shutdown, &mut tasks).await;
            }
            Backing::Embedded { .. } => {
                // No broker: each projection tails the log from its checkpoint, woken
                // in-process on append.
                if self.roles.contains(&Role::Projector) {
                    for projection in all_projections() {
                        let runner =
                            Runner::new(self.db.clone(), Arc::clone(&self.store), projection);
                        let token = shutdown.clone();
                        tasks.push(tokio::spawn(async move {
                            // A failed batch (the file busy past its timeout during a
                            // rebuild's swap, say) wrote nothing: start again from the
                            // checkpoint.
                            while let Err(error) = runner.follow_log(token.clone()).await {
                                tracing::warn!(projection = runner.projection().name(), error = %format!("{error:#}"), "the projector failed; resuming from its checkpoint");
                                tokio::select! {
                                    () = token.cancelled() => return,
                                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                }
                            }
                        }));
                    }
                }
            }
        }
        if self.roles.contains(&Role::Agent) {
            match self.agent() {
                Ok(agent) => {
                    // Disabled keys come back by themselves once Gemini takes them again.
                    tasks.extend(
                        agent.spawn_key_reprobe(Duration::from_secs(300), shutdown.clone()),
                    );
                    let due: Arc<dyn DueRuns> = Arc::new(RunsDue(self.db.clone()));
                    tasks.push(tokio::spawn(agent.run(Some(due), shutdown.clone())));
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "the agent cannot start");
                }
            }
        }
        tasks
    }

    /// The external mode's relay (log → JetStream) and JetStream-fed projectors.
    async fn start_fan_out(
        &self,
        store: &PgEventStore,
        nats: &async_nats::Client,
        shutdown: &CancellationToken,
        tasks: &mut Vec<JoinHandle<()>>,
    ) {
        let jetstream = async_nats::jetstream::new(nats.clone());
        let relay_config = self.relay_config();
        if self.roles.contains(&Role::Relay) || self.roles.contains(&Role::Projector) {
            // Both need the stream; creating it is idempotent. A NATS outage at start
            // is not fatal: the relay retries, projections follow the log meanwhile
            // (so with NATS out of reach nothing waits here for JetStream's timeout).
            if nats.connection_state() != async_nats::connection::State::Connected {
                tracing::warn!(
                    "NATS is not reachable yet: the JetStream stream will be created when it is"
                );
            } else if let Err(error) = ensure_stream(&jetstream, &relay_config).await {
                tracing::warn!(error = %error, "cannot create the JetStream stream yet; roles will retry");
            }
        }
        if self.roles.contains(&Role::Relay) {
            let relay = Relay::new(store.clone(), jetstream.clone(), relay_config);
            let _ = self.relay_stats.set(relay.stats());
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = relay.run(token).await {
                    tracing::error!(error = %error, "the relay stopped");
                }
            }));
        }
        if self.roles.contains(&Role::Projector) {
            for projection in all_projections() {
                let runner = Runner::new(self.db.clone(), Arc::clone(&self.store), projection);
                let fan_out = FanOut {
                    jetstream: jetstream.clone(),
                    stream: self.config.settings.stream.clone(),
                    prefix: self.config.settings.subject_prefix.clone(),
                };
                let token = shutdown.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(error) = runner.follow_jetstream(fan_out, token).await {
                        tracing::error!(projection = runner.projection().name(), error = %error, "the projector stopped");
                    }
                }));
            }
        }
    }

    /// The agent role: the Gemini client and the process's key pool.
    fn agent(&self) -> anyhow::Result<Agent> {
        let settings = &self.config.settings;
        let client = GeminiClient::new(GeminiConfig {
            base_url: settings.gemini_base_url.clone(),
            proxy: settings.https_proxy.clone(),
            ..GeminiConfig::default()
        })
        .context("GEMINI_BASE_URL / HTTPS_PROXY")?;
        let pool = self.keys.clone();
        if pool.is_none() {
            tracing::warn!("no Gemini API keys configured: runs will fail saying so");
        }
        let commands = colloquy_commands::Commands::new(
            Arc::clone(&self.store),
            colloquy_commands::cache::CacheConfig::default(),
        );
        let transport = match &self.backing {
            Backing::External { nats, .. } => Transport::Nats(nats.clone()),
            Backing::Embedded { signals } => Transport::Log {
                signals: signals.clone(),
                checkpoint: Arc::new(SqlCheckpoint {
                    db: self.db.clone(),
                    name: "agent",
                }),
            },
        };
        Ok(Agent::new(
            commands,
            client,
            pool,
            transport,
            AgentSettings {
                prefix: settings.subject_prefix.clone(),
                stream: settings.stream.clone(),
                concurrency: settings.agent_concurrency,
                default_model: settings.gemini_model.clone(),
                retry_delays: RetrySchedule::new(self.config.retry_delays.clone()),
                retry_timeouts: if settings.gemini_retry_timeouts {
                    RetryTimeouts::Yes
                } else {
                    RetryTimeouts::No
                },
                ..AgentSettings::default()
            },
        ))
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight requests and
    /// background roles for at most the shutdown grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tasks = self.start_roles(&shutdown).await;
        let grace = self.config.shutdown_grace;
        let signal = shutdown.clone();
        // Every role serves the operations endpoints (/healthz, /readyz, /metrics); the
        // public API joins them with the gateway role.
        // Each request carries its peer address (the auth routes' rate limit key); a
        // client has `header_read_timeout` to send a request head, and at most
        // COLLOQUY_MAX_CONNECTIONS connections are open (`edges::serve`).
        let connections = colloquy_gateway::edges::Connections {
            max: self.config.settings.max_connections,
            ..colloquy_gateway::edges::Connections::default()
        };
        let server =
            colloquy_gateway::edges::serve(self.listener, self.router, connections, signal);
        let mut server = std::pin::pin!(server);
        tokio::select! {
            () = &mut server => {}
            () = shutdown.cancelled() => {
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    tracing::warn!(?grace, "in-flight requests outlived the shutdown grace period; closing them");
                }
            }
        }
        if tokio::time::timeout(grace, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "background roles outlived the shutdown grace period"
            );
        }
        if let Backing::External { nats, .. } = &self.backing
            && let Err(error) = nats.drain().await
        {
            tracing::warn!(error = %error, "NATS drain failed");
        }
        self.db.close().await;
        Ok(())
    }
}

/// The Gemini key pool (`None` when no keys are configured), with its budgets shared
/// through a JetStream key-value bucket, or kept in memory where the server cannot
/// hold one.
///
/// With `shared_only`, a NATS server without a key-value store is an error instead of a
/// process-local fallback: `colloquy admin keys` runs in a process of its own, where
/// local budgets would show every key as idle and a recheck would change nothing.
pub(crate) async fn key_pool(
    config: &Config,
    nats: Option<&async_nats::Client>,
    shared_only: bool,
) -> anyhow::Result<Option<Arc<KeyPool>>> {
    let pool_config = config.gemini_pool.clone();
    if pool_config.keys.is_empty() {
        return Ok(None);
    }
    let settings = &config.settings;
    let Some(nats) = nats else {
        // The embedded mode: one process spends from the keys, so its memory is the
        // whole truth.
        let pool = KeyPool::new(
            pool_config,
            Arc::new(MemoryBudgetStore::new()),
            Arc::new(SystemClock),
        )
        .context("Failed to set up the Gemini key pool (GEMINI_API_KEYS)")?;
        return Ok(Some(Arc::new(pool)));
    };
    let jetstream = async_nats::jetstream::new(nats.clone());
    let bucket = format!("{}_budgets", settings.stream);
    let kv_config = KvBudgetConfig {
        // As many copies as the event stream: losing a node must not stall the agents.
        replicas: settings.stream_replicas,
        ..KvBudgetConfig::new(bucket, settings.subject_prefix.clone())
    };
    let connected = nats.connection_state() == async_nats::connection::State::Connected;
    let store: Arc<dyn BudgetStore> = if !connected && !shared_only {
        // Out of reach at start: the buckets are opened once NATS answers (until then
        // the agent can take no run anyway, as runs come through NATS). Waiting here
        // would hold the process's start for JetStream's timeouts, and falling back to
        // process memory would leave the budgets unshared for good.
        tracing::warn!(
            "NATS is not reachable yet: the Gemini budgets' shared buckets will be opened when it is"
        );
        Arc::new(KvOnceReachable::new(&jetstream, kv_config)?)
    } else {
        match KvBudgetStore::open(&jetstream, kv_config.clone()).await {
            Ok(store) => Arc::new(store),
            Err(error) if shared_only => {
                return Err(anyhow::Error::new(error).context(
                    "Failed to open the key pool's shared budgets (NATS needs JetStream with key-value stores: 2.10 or later)",
                ));
            }
            Err(error) if !server_has_key_value_stores(&nats.server_info().version) => {
                tracing::warn!(error = %error, version = %nats.server_info().version, "Gemini budgets are kept in this process only (the NATS server has no key-value store: it needs 2.10 or later)");
                Arc::new(MemoryBudgetStore::new())
            }
            Err(error) => {
                // A server that can hold them did not answer in time (a cluster
                // electing a leader, a connection lost meanwhile): try again with
                // each use rather than give up sharing.
                tracing::warn!(error = %error, "the Gemini budgets' shared buckets could not be opened yet; they will be with their first use");
                Arc::new(KvOnceReachable::new(&jetstream, kv_config)?)
            }
        }
    };
    let pool = KeyPool::new(pool_config, store, Arc::new(SystemClock))
        .context("Failed to set up the Gemini key pool (GEMINI_API_KEYS)")?;
    Ok(Some(Arc::new(pool)))
}

/// The embedded mode's token-signing secret when none is configured: made once and kept
/// beside the database (`jwt-secret`, readable by its owner only), so sessions survive a
/// restart as the data does.
fn embedded_jwt_secret(database: &Path) -> anyhow::Result<SecretString> {
    let path = database
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => {
            return Ok(SecretString::from(secret.trim().to_owned()));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("Failed to read {}", path.display()));
        }
    }
    let secret: String = {
        use rand::Rng as _;
        let bytes: [u8; 32] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("Failed to create {}", path.display()))?;
    std::io::Write::write_all(&mut file, secret.as_bytes())
        .with_context(|| format!("Failed to write {}", path.display()))?;
    tracing::info!(path = %path.display(), "made the embedded mode's token-signing secret");
    Ok(SecretString::from(secret))
}

/// The file a `sqlite:` URL names, as given (relative paths stay relative).
fn sqlite_path(url: &str) -> String {
    <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url).map_or_else(
        |_| url.to_owned(),
        |options| options.get_filename().display().to_string(),
    )
}

/// The servers of `NATS_URL`: one URL, or several separated by commas (the client
/// picks one and fails over to the others).
pub fn nats_servers(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .with_context(|| format!("NATS_URL: {s:?} is not a NATS server address"))
        })
        .collect()
}

/// The database and log for a command-line tool (`replay`, `admin`): Postgres with
/// `max_connections` (migrated, so a fresh database works), or the embedded file. No
/// NATS: the tools read and write the log and the read models directly.
pub async fn open_database(
    config: &Config,
    max_connections: u32,
) -> anyhow::Result<(Database, Arc<dyn EventStore>)> {
    match &config.storage {
        Storage::Postgres { url, .. } => {
            let pool = postgres_pool(url, max_connections, Duration::from_secs(10)).await?;
            colloquy_eventstore::postgres::migrate(&pool)
                .await
                .context("Failed to apply migrations")?;
            let store = PgEventStore::with_pool(pool.clone(), PgOptions::default());
            Ok((Database::Postgres(pool), Arc::new(store)))
        }
        Storage::Embedded { sqlite_url } => {
            let pool = colloquy_eventstore::sqlite::open_url(sqlite_url)
                .await
                .with_context(|| format!("Failed to open the embedded database ({sqlite_url})"))?;
            let store = SqliteEventStore::new(pool.clone());
            Ok((Database::Sqlite(pool), Arc::new(store)))
        }
    }
}

/// The token-signing secret the gateways of this configuration verify with:
/// `COLLOQUY_JWT_SECRET`, or the embedded mode's own (made by the first `serve`).
pub fn jwt_secret(config: &Config) -> anyhow::Result<Option<SecretString>> {
    match (&config.settings.jwt_secret, &config.storage) {
        (Some(secret), _) => Ok(Some(secret.clone())),
        (None, Storage::Embedded { sqlite_url })
            if config.settings.jwt_private_key_file.is_none() =>
        {
            Ok(Some(embedded_jwt_secret(Path::new(&sqlite_path(
                sqlite_url,
            )))?))
        }
        (None, _) => Ok(None),
    }
}

/// How long a starting process waits for its first NATS connection before going on
/// without it.
const NATS_FIRST_CONNECT: Duration = Duration::from_secs(2);

/// What every Colloquy connection to Postgres sets for its session, so that the server
/// lets go of what a vanished process held. Without them, a process cut off by a
/// network partition keeps its locks until the server's TCP gives up (two hours by
/// Linux's default): a transaction holding the commit-ordering lock or a projection's
/// lock would stall every writer or that projection, and a relay leader's session lock
/// would keep the other relays from taking over.
/// - `idle_in_transaction_session_timeout`: a transaction left idle for a minute is
///   ended (no Colloquy transaction waits on its client for more than milliseconds);
/// - `tcp_keepalives_*`: an idle connection whose peer stopped answering is found dead
///   within about 25 s (probes after 10 s idle, every 5 s, 3 lost);
/// - `tcp_user_timeout`: data the server sent that goes unacknowledged for 30 s ends
///   the connection.
///
/// They are `SET` after connecting, not passed as startup options, which poolers such
/// as PgBouncer refuse.
pub const POSTGRES_SESSION_SETTINGS: &str = "SET idle_in_transaction_session_timeout = '60s'; \
    SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
    SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000";

/// A pool on `url` of up to `size` connections, each named `colloquy` in
/// `pg_stat_activity` unless `DATABASE_URL` names it, with
/// [`POSTGRES_SESSION_SETTINGS`].
async fn postgres_pool(
    url: &SecretString,
    size: u32,
    acquire_timeout: Duration,
) -> anyhow::Result<sqlx::PgPool> {
    let mut options = PgConnectOptions::from_str(url.expose_secret())
        .context("DATABASE_URL is not a Postgres URL")?;
    if options.get_application_name().is_none() {
        options = options.application_name("colloquy");
    }
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(acquire_timeout)
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::raw_sql(POSTGRES_SESSION_SETTINGS)
                    .execute(connection)
                    .await
                    .map(|_| ())
            })
        })
        .connect_with(options)
        .await
        .context("Failed to connect to Postgres (DATABASE_URL)")
}

/// Opens the configured storage: Postgres (migrated; a pool of `pool_size`
/// connections, see [`postgres_pool`]) and NATS, or the SQLite file.
async fn open_storage(
    storage: &Storage,
    pool_size: u32,
) -> anyhow::Result<(Database, Arc<dyn EventStore>, Backing)> {
    match storage {
        Storage::Postgres { url, nats_url } => {
            let pool = postgres_pool(url, pool_size, Duration::from_secs(5)).await?;
            colloquy_eventstore::postgres::migrate(&pool)
                .await
                .context("Failed to apply database migrations")?;
            let store = PgEventStore::with_pool(pool.clone(), PgOptions::default());
            let nats = async_nats::ConnectOptions::new()
                .name("colloquy")
                .retry_on_initial_connect()
                .connect(nats_servers(nats_url)?)
                .await
                .context("Failed to configure the NATS connection (NATS_URL)")?;
            // The client connects in the background; give it a moment, so that what
            // starts next sees a server that is up as up. One that is down is not
            // waited for: every role copes with NATS coming later.
            let connecting = tokio::time::Instant::now();
            while nats.connection_state() != async_nats::connection::State::Connected
                && connecting.elapsed() < NATS_FIRST_CONNECT
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok((
                Database::Postgres(pool),
                Arc::new(store.clone()),
                Backing::External { store, nats },
            ))
        }
        Storage::Embedded { sqlite_url } => {
            let pool = colloquy_eventstore::sqlite::open_url(sqlite_url)
                .await
                .with_context(|| format!("Failed to open the embedded database ({sqlite_url})"))?;
            let store = SqliteEventStore::new(pool.clone());
            Ok((
                Database::Sqlite(pool),
                Arc::new(store),
                Backing::Embedded {
                    signals: LocalSignals::default(),
                },
            ))
        }
    }
}

/// The runs the agent's sweep looks at, from the runs read model.
#[derive(Debug)]
pub struct RunsDue(pub Database);

#[async_trait]
impl DueRuns for RunsDue {
    async fn due(
        &self,
        lost_after: Duration,
        stale_after: Duration,
    ) -> Result<Vec<RunId>, BoxError> {
        let now = chrono::Utc::now();
        let lost = now - chrono::Duration::from_std(lost_after)?;
        let stale = now - chrono::Duration::from_std(stale_after)?;
        // The same question of both backends: retries due, requests never started,
        // attempts gone silent.
        const DUE: &str = "WHERE (status = 'retrying' AND not_before <= $1)
                OR (status = 'queued' AND created_at < $2)
                OR (status = 'running' AND started_at < $3)
             ORDER BY not_before NULLS FIRST
             LIMIT 100";
        let ids: Vec<uuid::Uuid> = match &self.0 {
            Database::Postgres(pool) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM rm_runs.runs {DUE}"
                )))
                .bind(now)
                .bind(lost)
                .bind(stale)
                .fetch_all(pool)
                .await?
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM rm_runs_runs {DUE}"
                )))
                .bind(now)
                .bind(lost)
                .bind(stale)
                .fetch_all(pool)
                .await?
            }
        };
        Ok(ids.into_iter().map(RunId::from_uuid).collect())
    }
}

/// A named position in the log, kept in the database (the embedded agent's place).
#[derive(Debug)]
struct SqlCheckpoint {
    db: Database,
    name: &'static str,
}

#[async_trait]
impl Checkpoint for SqlCheckpoint {
    async fn load(&self) -> Result<GlobalPosition, BoxError> {
        let position: Option<i64> = match &self.db {
            Database::Sqlite(pool) => {
                sqlx::query_scalar("SELECT position FROM colloquy_checkpoints WHERE name = $1")
                    .bind(self.name)
                    .fetch_optional(pool)
                    .await?
            }
            Database::Postgres(_) => {
                return Err("the agent tails the log only in the embedded mode".into());
            }
        };
        Ok(position.unwrap_or(0))
    }

    async fn save(&self, position: GlobalPosition) -> Result<(), BoxError> {
        match &self.db {
            Database::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO colloquy_checkpoints (name, position) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET position = max(position, excluded.position)",
                )
                .bind(self.name)
                .bind(position)
                .execute(pool)
                .await?;
                Ok(())
            }
            Database::Postgres(_) => {
                Err("the agent tails the log only in the embedded mode".into())
            }
        }
    }
}

/// Readiness of the database: one trivial query.
#[derive(Debug)]
struct DatabaseProbe(Database);

#[async_trait]
impl Probe for DatabaseProbe {
    fn name(&self) -> &'static str {
        self.0.backend().as_str()
    }

    async fn check(&self) -> ProbeResult {
        let result = match &self.0 {
            Database::Postgres(pool) => {
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(pool)
                    .await
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(pool)
                    .await
            }
        };
        result.map(|_| json!({})).map_err(|e| {
            tracing::warn!(error = %e, backend = %self.0.backend(), "readiness: database check failed");
            format!("cannot query {}", self.0.backend())
        })
    }
}

#[derive(Debug)]
struct NatsProbe(async_nats::Client);

#[async_trait]
impl Probe for NatsProbe {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn check(&self) -> ProbeResult {
        match self.0.connection_state() {
            async_nats::connection::State::Connected => {
                let server = self.0.server_info();
                Ok(json!({ "server_version": server.version, "jetstream": server.jetstream }))
            }
            state => Err(format!("connection is {state}")),
        }
    }
}

/// Ready while every projection's oldest unapplied event is younger than the budget.
#[derive(Debug)]
struct ProjectionsProbe {
    db: Database,
    budget: Duration,
}

#[async_trait]
impl Probe for ProjectionsProbe {
    fn name(&self) -> &'static str {
        "projections"
    }

    async fn check(&self) -> ProbeResult {
        let mut detail = serde_json::Map::new();
        let mut late = Vec::new();
        let lags = colloquy_projections::runner::lags(&self.db)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "readiness: projection lag check failed");
                "cannot read projection checkpoints".to_owned()
            })?;
        for ProjectionLag { projection, lag } in lags {
            if lag.seconds > self.budget.as_secs_f64() {
                late.push(projection.name());
            }
            detail.insert(
                projection.name().to_owned(),
                json!({ "checkpoint": lag.checkpoint, "lag_events": lag.events, "lag_seconds": lag.seconds }),
            );
        }
        if late.is_empty() {
            Ok(serde_json::Value::Object(detail))
        } else {
            Err(format!(
                "lagging beyond {:?}: {}",
                self.budget,
                late.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_sessions_are_named_and_let_go_of_a_vanished_process() {
        let db = colloquy_testkit::TestDatabase::new().await;
        let url = SecretString::from(db.url.clone());
        let pool = postgres_pool(&url, 2, Duration::from_secs(5))
            .await
            .unwrap();
        for (setting, expected) in [
            ("application_name", "colloquy"),
            ("idle_in_transaction_session_timeout", "1min"),
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", "30000"),
        ] {
            // Every connection of the pool, not just the first.
            let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
            for mut connection in [a, b] {
                let shown: String =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
                        .fetch_one(&mut *connection)
                        .await
                        .unwrap();
                assert_eq!(shown, expected, "{setting}");
            }
        }
        // A name in DATABASE_URL is kept.
        let named = SecretString::from(format!("{}?application_name=reporting", db.url));
        let pool = postgres_pool(&named, 1, Duration::from_secs(5))
            .await
            .unwrap();
        let shown: String = sqlx::query_scalar("SHOW application_name")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(shown, "reporting");
    }

    #[test]
    fn nats_url_takes_one_server_or_a_list() {
        assert_eq!(nats_servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        let servers = nats_servers("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[1].port(), 4223);
        let error = nats_servers("nats://a:4222,nats://b:x").unwrap_err();
        assert!(format!("{error:#}").contains("nats://b:x"), "{error:#}");
    }

    #[test]
    fn the_sqlite_path_is_the_urls_file() {
        assert_eq!(
            sqlite_path("sqlite://./data/colloquy.sqlite?mode=rwc"),
            "./data/colloquy.sqlite"
        );
    }
}
