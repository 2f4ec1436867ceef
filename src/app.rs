//! The application: connects the dependencies a process needs, starts its roles and
//! serves HTTP until the shutdown token is cancelled. Tests build it on port 0.
//!
//! Roles (`colloquy serve --roles …`, all by default): `gateway` (HTTP), `relay`
//! (log → JetStream), `projector` (JetStream → read models, healed from the log),
//! `agent` (not built yet). Background roles run as tasks that stop between messages
//! when the token is cancelled; correctness never depends on them stopping cleanly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use colloquy_commands::relay::{Relay, RelayConfig, ensure_stream};
use colloquy_domain::RunId;
use colloquy_eventstore::{Database, EventStore, PgEventStore, PgOptions};
use colloquy_gateway::edges::Edges;
use colloquy_gateway::{GatewayState, LiveHub, LiveSettings, Probe, ProbeResult};
use colloquy_gemini_agent::backoff::RetrySchedule;
use colloquy_gemini_agent::budget::{
    BudgetStore, KvBudgetConfig, KvBudgetStore, MemoryBudgetStore,
};
use colloquy_gemini_agent::clock::SystemClock;
use colloquy_gemini_agent::gemini::{GeminiClient, GeminiConfig};
use colloquy_gemini_agent::keys::KeyPool;
use colloquy_gemini_agent::worker::{Agent, AgentSettings, DueRuns};
use colloquy_projections::jetstream::FanOut;
use colloquy_projections::runner::ProjectionLag;
use colloquy_projections::{Runner, all_projections};
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
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

/// A built application, listening but not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    config: Config,
    roles: BTreeSet<Role>,
    pool: PgPool,
    store: PgEventStore,
    nats: async_nats::Client,
    live: LiveHub,
    /// The Gemini key pool, shared by the agent role and the gateway's admin view.
    keys: Option<Arc<KeyPool>>,
}

impl Application {
    /// Connects to Postgres (applying migrations) and NATS, and binds the listener
    /// (`listener` if given, else `COLLOQUY_BIND`).
    pub async fn build(config: Config, listener: Option<TcpListener>) -> anyhow::Result<Self> {
        Self::build_with_roles(config, listener, all_roles()).await
    }

    /// As [`Application::build`], running only `roles`.
    pub async fn build_with_roles(
        config: Config,
        listener: Option<TcpListener>,
        roles: BTreeSet<Role>,
    ) -> anyhow::Result<Self> {
        let Storage::Postgres { url, nats_url } = &config.storage else {
            anyhow::bail!(
                "the embedded mode (no DATABASE_URL) is not available in this build yet: set DATABASE_URL=postgres://… and NATS_URL"
            );
        };
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url.expose_secret())
            .await
            .context("Failed to connect to Postgres (DATABASE_URL)")?;
        colloquy_eventstore::postgres::migrate(&pool)
            .await
            .context("Failed to apply database migrations")?;
        let store = PgEventStore::with_pool(pool.clone(), PgOptions::default());
        let nats = async_nats::ConnectOptions::new()
            .name("colloquy")
            .retry_on_initial_connect()
            .connect(nats_url.as_str())
            .await
            .context("Failed to configure the NATS connection (NATS_URL)")?;
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind(config.settings.bind)
                .await
                .with_context(|| {
                    format!("Failed to bind COLLOQUY_BIND={}", config.settings.bind)
                })?,
        };
        let mut probes: Vec<Arc<dyn Probe>> = vec![
            Arc::new(PostgresProbe(pool.clone())),
            Arc::new(NatsProbe(nats.clone())),
        ];
        if roles.contains(&Role::Projector) {
            probes.push(Arc::new(ProjectionsProbe {
                pool: pool.clone(),
                budget: config.projection_lag_budget,
            }));
        }
        let auth = colloquy_gateway::AuthState::new(
            pool.clone(),
            colloquy_gateway::auth::AuthSettings {
                jwt_secret: config.settings.jwt_secret.clone(),
                jwt_private_key_file: config.settings.jwt_private_key_file.clone(),
                command_rate_limit: Some(colloquy_gateway::auth::RateLimit::new(
                    config.settings.commands_per_second,
                    config.settings.command_burst,
                )),
                ..Default::default()
            },
        )
        .await
        .context("Failed to set up authentication")?;
        let commands = colloquy_commands::Commands::new(
            Arc::new(store.clone()),
            colloquy_commands::cache::CacheConfig::default(),
        );
        let live = LiveHub::new(
            commands.clone(),
            Some(nats.clone()),
            LiveSettings {
                prefix: config.settings.subject_prefix.clone(),
                buffer: config.settings.sse_buffer,
                max_streams_per_user: config.settings.sse_max_streams_per_user,
                ..LiveSettings::default()
            },
        );
        // One pool per process: the agent spends from it and the admin view reads it, so
        // both see the same budgets and key health.
        let keys = if roles.contains(&Role::Agent) || roles.contains(&Role::Gateway) {
            key_pool(&config, &nats, false).await?
        } else {
            None
        };
        let router = colloquy_gateway::router_with(
            GatewayState {
                probes: Arc::new(probes),
                auth,
                commands,
                db: Database::from(pool.clone()),
                live: live.clone(),
                keys: keys.clone(),
                rebuilds: colloquy_gateway::admin::Rebuilds::default(),
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
            pool,
            store,
            nats,
            live,
            keys,
        })
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
        let jetstream = async_nats::jetstream::new(self.nats.clone());
        let relay_config = self.relay_config();
        if self.roles.contains(&Role::Relay) || self.roles.contains(&Role::Projector) {
            // Both need the stream; creating it is idempotent. A NATS outage at start
            // is not fatal: the relay retries, projections follow the log meanwhile.
            if let Err(error) = ensure_stream(&jetstream, &relay_config).await {
                tracing::warn!(error = %error, "cannot create the JetStream stream yet; roles will retry");
            }
        }
        if self.roles.contains(&Role::Relay) {
            let relay = Relay::new(self.store.clone(), jetstream.clone(), relay_config);
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = relay.run(token).await {
                    tracing::error!(error = %error, "the relay stopped");
                }
            }));
        }
        if self.roles.contains(&Role::Projector) {
            let store: Arc<dyn EventStore> = Arc::new(self.store.clone());
            for projection in all_projections() {
                let runner = Runner::new(
                    Database::from(self.pool.clone()),
                    Arc::clone(&store),
                    projection,
                );
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
        if self.roles.contains(&Role::Agent) {
            match self.agent() {
                Ok(agent) => {
                    // Disabled keys come back by themselves once Gemini takes them again.
                    tasks.extend(
                        agent.spawn_key_reprobe(Duration::from_secs(300), shutdown.clone()),
                    );
                    let due: Arc<dyn DueRuns> = Arc::new(PgDueRuns(self.pool.clone()));
                    tasks.push(tokio::spawn(agent.run(Some(due), shutdown.clone())));
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "the agent cannot start");
                }
            }
        }
        tasks
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
            Arc::new(self.store.clone()),
            colloquy_commands::cache::CacheConfig::default(),
        );
        Ok(Agent::new(
            commands,
            client,
            pool,
            self.nats.clone(),
            AgentSettings {
                prefix: settings.subject_prefix.clone(),
                stream: settings.stream.clone(),
                concurrency: settings.agent_concurrency,
                default_model: settings.gemini_model.clone(),
                retry_delays: RetrySchedule::new(self.config.retry_delays.clone()),
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
        // Every role serves the operations endpoints (/healthz, /readyz); the public API
        // joins them with the gateway role.
        // ConnectInfo gives the per-address rate limit of the auth routes its key.
        let server = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { signal.cancelled().await });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            result = &mut server => result.context("HTTP server failed")?,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(result) => result.context("HTTP server failed")?,
                    Err(_) => tracing::warn!(?grace, "in-flight requests outlived the shutdown grace period; closing them"),
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
        if let Err(error) = self.nats.drain().await {
            tracing::warn!(error = %error, "NATS drain failed");
        }
        self.pool.close().await;
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
    nats: &async_nats::Client,
    shared_only: bool,
) -> anyhow::Result<Option<Arc<KeyPool>>> {
    let pool_config = config.gemini_pool.clone();
    if pool_config.keys.is_empty() {
        return Ok(None);
    }
    let settings = &config.settings;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let bucket = format!("{}_budgets", settings.stream);
    let store: Arc<dyn BudgetStore> = match KvBudgetStore::open(
        &jetstream,
        KvBudgetConfig::new(bucket, settings.subject_prefix.clone()),
    )
    .await
    {
        Ok(store) => Arc::new(store),
        Err(error) if shared_only => {
            return Err(anyhow::Error::new(error).context(
                "Failed to open the key pool's shared budgets (NATS needs JetStream with key-value stores: 2.10 or later)",
            ));
        }
        Err(error) => {
            tracing::warn!(error = %error, "Gemini budgets are kept in this process only (the NATS server has no key-value store: it needs 2.10 or later)");
            Arc::new(MemoryBudgetStore::new())
        }
    };
    let pool = KeyPool::new(pool_config, store, Arc::new(SystemClock))
        .context("Failed to set up the Gemini key pool (GEMINI_API_KEYS)")?;
    Ok(Some(Arc::new(pool)))
}

/// The runs the agent's sweep looks at, from the runs read model.
#[derive(Debug)]
pub struct PgDueRuns(pub PgPool);

#[async_trait]
impl DueRuns for PgDueRuns {
    async fn due(
        &self,
        lost_after: Duration,
        stale_after: Duration,
    ) -> Result<Vec<RunId>, Box<dyn std::error::Error + Send + Sync>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM rm_runs.runs
             WHERE (status = 'retrying' AND not_before <= now())
                OR (status = 'queued' AND created_at < now() - make_interval(secs => $1))
                OR (status = 'running' AND started_at < now() - make_interval(secs => $2))
             ORDER BY not_before NULLS FIRST
             LIMIT 100",
        )
        .bind(lost_after.as_secs_f64())
        .bind(stale_after.as_secs_f64())
        .fetch_all(&self.0)
        .await?;
        Ok(ids.into_iter().map(RunId::from_uuid).collect())
    }
}

#[derive(Debug)]
struct PostgresProbe(PgPool);

#[async_trait]
impl Probe for PostgresProbe {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn check(&self) -> ProbeResult {
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&self.0)
            .await
            .map(|_| json!({}))
            .map_err(|e| {
                tracing::warn!(error = %e, "readiness: Postgres check failed");
                "cannot query Postgres".to_owned()
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
    pool: PgPool,
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
        let lags = colloquy_projections::runner::lags(&Database::from(self.pool.clone()))
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
