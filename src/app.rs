//! The application: connects the dependencies a process needs, starts its roles and
//! serves HTTP until the shutdown token is cancelled. Tests build it on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use colloquy_gateway::{GatewayState, Probe, ProbeResult};
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Storage};

/// A built application, listening but not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    grace: Duration,
    pool: PgPool,
    nats: async_nats::Client,
}

impl Application {
    /// Connects to Postgres (applying migrations) and NATS, and binds the listener
    /// (`listener` if given, else `COLLOQUY_BIND`).
    pub async fn build(config: Config, listener: Option<TcpListener>) -> anyhow::Result<Self> {
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
        let probes: Vec<Arc<dyn Probe>> = vec![
            Arc::new(PostgresProbe(pool.clone())),
            Arc::new(NatsProbe(nats.clone())),
        ];
        let router = colloquy_gateway::router(GatewayState {
            probes: Arc::new(probes),
        });
        Ok(Self {
            listener,
            router,
            grace: config.shutdown_grace,
            pool,
            nats,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("BUG: a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight requests for at most
    /// the shutdown grace period.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let signal = shutdown.clone();
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { signal.cancelled().await });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            result = &mut server => result.context("HTTP server failed")?,
            () = shutdown.cancelled() => {
                match tokio::time::timeout(self.grace, &mut server).await {
                    Ok(result) => result.context("HTTP server failed")?,
                    Err(_) => tracing::warn!(grace = ?self.grace, "in-flight requests outlived the shutdown grace period; closing them"),
                }
            }
        }
        if let Err(error) = self.nats.drain().await {
            tracing::warn!(error = %error, "NATS drain failed");
        }
        self.pool.close().await;
        Ok(())
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
