//! Prometheus metrics, the process's half: the recorder every crate's `metrics` calls
//! go to (installed once per process, with the histogram buckets and every metric's
//! description), and [`Scraper`], which renders `GET /metrics` (served by the gateway's
//! router on every role's listener). Gauges that are a reading of something rather than
//! a count kept as it happens — projection lag, the relay's lag, SSE subscribers, the
//! key pool, dead letters, the process's CPU and memory — are refreshed when scraped.
//!
//! docs/OPERATIONS.md, "Metrics", lists every metric and what it means. No label ever
//! holds a key, a token, an email or message text: labels are routes, names of
//! commands, outcomes, projections, key labels and project ids.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use colloquy_commands::relay::RelayStats;
use colloquy_eventstore::{Database, EventStore, LogFilter};
use colloquy_gateway::LiveHub;
use colloquy_gemini_agent::keys::{KeyPool, KeyState};
use colloquy_projections::runner::ProjectionLag;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Role;

/// Buckets of every `_seconds` histogram: from a fast append to a slow Gemini call.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `colloquy_append_batch_appends` (group commit's batch sizes; at most 256).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The longest the scrape-time readings may take together; past it the page is rendered
/// with the values they had.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// How often histograms are drained when nobody scrapes, so they stay small.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder: installed by the first call, shared by every later one (tests
/// build several applications in one process; they share the process's metrics).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("colloquy_append_batch_appends".into()),
                        BATCH,
                    )
                })
                .expect("BUG: the bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics stays empty");
            }
            describe();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(
                    error = %error,
                    "cannot start the metrics upkeep thread; histograms are drained by scrapes only"
                );
            }
            handle
        })
        .clone()
}

/// Renders `/metrics` for one application, refreshing the readings of its roles first.
#[derive(Debug)]
pub struct Scraper {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    roles: BTreeSet<Role>,
    db: Database,
    store: Arc<dyn EventStore>,
    live: LiveHub,
    keys: Option<Arc<KeyPool>>,
    /// The relay's counters, once the relay role has started (external mode only).
    relay: Arc<OnceLock<Arc<RelayStats>>>,
}

impl Scraper {
    pub(crate) fn new(
        roles: BTreeSet<Role>,
        db: Database,
        store: Arc<dyn EventStore>,
        live: LiveHub,
        keys: Option<Arc<KeyPool>>,
        relay: Arc<OnceLock<Arc<RelayStats>>>,
    ) -> Self {
        let process = metrics_process::Collector::default();
        let handle = handle();
        process.describe();
        metrics::gauge!("colloquy_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Self {
            handle,
            process,
            roles,
            db,
            store,
            live,
            keys,
            relay,
        }
    }

    /// The readings of this process's roles.
    async fn refresh(&self) {
        if self.roles.contains(&Role::Gateway) {
            metrics::gauge!("colloquy_sse_subscribers").set(self.live.subscribers() as f64);
        }
        let projections = async {
            if self.roles.contains(&Role::Projector) {
                count_failure("projections", self.projections().await);
            }
        };
        let relay = async {
            if self.roles.contains(&Role::Relay) {
                count_failure("relay", self.relay().await);
            }
        };
        let agent = async {
            if self.roles.contains(&Role::Agent) {
                count_failure("dead_letters", self.dead_letters().await);
                count_failure("keys", self.keys().await);
            }
        };
        let all = async {
            futures::join!(projections, relay, agent);
        };
        if tokio::time::timeout(REFRESH_TIMEOUT, all).await.is_err() {
            metrics::counter!("colloquy_scrape_errors_total", "source" => "timeout").increment(1);
        }
    }

    /// Each read model's lag, as readiness reads it.
    async fn projections(&self) -> anyhow::Result<()> {
        for ProjectionLag { projection, lag } in
            colloquy_projections::runner::lags(&self.db).await?
        {
            let name = projection.name();
            metrics::gauge!("colloquy_projection_lag_events", "projection" => name)
                .set(lag.events as f64);
            metrics::gauge!("colloquy_projection_lag_seconds", "projection" => name)
                .set(lag.seconds);
            metrics::gauge!("colloquy_projection_checkpoint", "projection" => name)
                .set(lag.checkpoint as f64);
        }
        Ok(())
    }

    /// The relay's counters, and, while it leads, how far the stream is behind the log.
    async fn relay(&self) -> anyhow::Result<()> {
        let Some(stats) = self.relay.get() else {
            return Ok(());
        };
        metrics::counter!("colloquy_relay_published_total").absolute(stats.published());
        metrics::counter!("colloquy_relay_resumes_total").absolute(stats.resumes());
        metrics::counter!("colloquy_relay_fenced_total").absolute(stats.fenced());
        metrics::counter!("colloquy_relay_failures_total").absolute(stats.failures());
        let leader = stats.is_leader();
        metrics::gauge!("colloquy_relay_leader").set(if leader { 1.0 } else { 0.0 });
        let (events, seconds) = if leader {
            let relayed = stats.last_position();
            let head = self.store.head().await?;
            let oldest = self.store.read_log(&LogFilter::All, relayed, 1).await?;
            let age = oldest.first().map_or(0.0, |event| {
                (chrono::Utc::now() - event.time).as_seconds_f64().max(0.0)
            });
            ((head - relayed).max(0), age)
        } else {
            (0, 0.0)
        };
        metrics::gauge!("colloquy_relay_lag_events").set(events as f64);
        metrics::gauge!("colloquy_relay_lag_seconds").set(seconds);
        Ok(())
    }

    /// Runs whose retries ran out, as the admin list counts them.
    async fn dead_letters(&self) -> anyhow::Result<()> {
        let count = colloquy_gateway::admin::runs::count_dead_letters(&self.db).await?;
        metrics::gauge!("colloquy_agent_dead_letters").set(count as f64);
        Ok(())
    }

    /// Keys and projects by state, and each project's budget, from the pool's snapshot
    /// (labels and project ids only: never a key).
    async fn keys(&self) -> anyhow::Result<()> {
        let Some(pool) = &self.keys else {
            return Ok(());
        };
        let snapshot = pool.snapshot().await?;
        for state in STATES {
            let keys = snapshot.iter().filter(|k| k.state == state).count();
            metrics::gauge!("colloquy_gemini_keys", "state" => state_name(state)).set(keys as f64);
        }
        let projects: BTreeSet<&str> = snapshot.iter().map(|k| k.project.as_str()).collect();
        let mut by_state = [0_usize; STATES.len()];
        for project in projects {
            let keys: Vec<_> = snapshot.iter().filter(|k| k.project == project).collect();
            // A project is as its usable keys are (cooling and exhaustion are the
            // project's); disabled when it has none.
            let state = keys
                .iter()
                .map(|k| k.state)
                .find(|s| *s != KeyState::Disabled)
                .unwrap_or(KeyState::Disabled);
            if let Some(i) = STATES.iter().position(|s| *s == state) {
                by_state[i] += 1;
            }
            let Some(first) = keys.first() else { continue };
            let budget = |name: &'static str, window: &'static str, value: f64| {
                metrics::gauge!(name, "project" => project.to_owned(), "window" => window)
                    .set(value);
            };
            let limits = first.limits;
            budget(
                "colloquy_gemini_budget_requests",
                "minute",
                first.requests_this_minute as f64,
            );
            budget(
                "colloquy_gemini_budget_requests",
                "day",
                first.requests_today as f64,
            );
            budget(
                "colloquy_gemini_budget_requests_limit",
                "minute",
                f64::from(limits.rpm),
            );
            budget(
                "colloquy_gemini_budget_requests_limit",
                "day",
                f64::from(limits.rpd),
            );
            budget(
                "colloquy_gemini_budget_tokens",
                "minute",
                first.tokens_this_minute as f64,
            );
            if let Some(tpm) = limits.tpm {
                budget(
                    "colloquy_gemini_budget_tokens_limit",
                    "minute",
                    f64::from(tpm),
                );
            }
        }
        for (state, count) in STATES.into_iter().zip(by_state) {
            metrics::gauge!("colloquy_gemini_projects", "state" => state_name(state))
                .set(count as f64);
        }
        Ok(())
    }
}

#[async_trait]
impl colloquy_gateway::Scrape for Scraper {
    async fn render(&self) -> String {
        self.process.collect();
        self.refresh().await;
        self.handle.render()
    }
}

/// Every key state, in the admin view's order.
const STATES: [KeyState; 4] = [
    KeyState::Ready,
    KeyState::Cooling,
    KeyState::ExhaustedToday,
    KeyState::Disabled,
];

/// A key state as a label, as the admin view spells it.
fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::Ready => "ready",
        KeyState::Cooling => "cooling",
        KeyState::ExhaustedToday => "exhausted_today",
        KeyState::Disabled => "disabled",
    }
}

/// Counts a reading that failed (its gauges keep their last values).
fn count_failure(source: &'static str, result: anyhow::Result<()>) {
    if let Err(error) = result {
        tracing::debug!(source, error = %format!("{error:#}"), "a metrics reading failed");
        metrics::counter!("colloquy_scrape_errors_total", "source" => source).increment(1);
    }
}

/// The description of every metric Colloquy records (the `# HELP` lines).
fn describe() {
    // HTTP (gateway::metrics)
    describe_counter!(
        "colloquy_http_requests_total",
        "HTTP requests answered, by method, route template and status class"
    );
    describe_counter!(
        "colloquy_http_errors_total",
        "HTTP error responses (problem+json), by method, route template and problem code"
    );
    describe_histogram!(
        "colloquy_http_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head, by method and route template"
    );
    describe_gauge!(
        "colloquy_sse_subscribers",
        "Server-sent event streams open on this gateway"
    );
    // Commands (commands::handler)
    describe_counter!(
        "colloquy_commands_total",
        "Commands handled, by aggregate, command and outcome"
    );
    describe_counter!(
        "colloquy_command_conflicts_total",
        "Appends refused because another writer changed the stream first, by aggregate"
    );
    describe_counter!(
        "colloquy_command_retries_total",
        "Commands decided again, by aggregate and reason (conflict, stale_cache)"
    );
    // The log (eventstore::batcher)
    describe_counter!(
        "colloquy_appends_total",
        "Appends to the log (one per command), by outcome"
    );
    describe_counter!(
        "colloquy_appended_events_total",
        "Events written to the log"
    );
    describe_histogram!(
        "colloquy_append_duration_seconds",
        Unit::Seconds,
        "Time of an append, from queueing to its group commit's result"
    );
    describe_histogram!(
        "colloquy_append_batch_appends",
        "Appends written together in one group commit"
    );
    // The relay
    describe_counter!(
        "colloquy_relay_published_total",
        "Events this relay published to JetStream and saw acknowledged"
    );
    describe_counter!(
        "colloquy_relay_resumes_total",
        "Times this relay resumed publishing from the stream's position"
    );
    describe_counter!(
        "colloquy_relay_fenced_total",
        "Publishes refused because the stream changed under this relay"
    );
    describe_counter!(
        "colloquy_relay_failures_total",
        "Failures that made this relay stop, back off and retry"
    );
    describe_gauge!(
        "colloquy_relay_leader",
        "1 while this relay holds the leader lock"
    );
    describe_gauge!(
        "colloquy_relay_lag_events",
        "Events in the log not yet in the stream (0 unless this relay leads)"
    );
    describe_gauge!(
        "colloquy_relay_lag_seconds",
        "Age of the oldest event not yet in the stream (0 unless this relay leads)"
    );
    // Projections
    describe_gauge!(
        "colloquy_projection_lag_events",
        "Events in the log after the projection's checkpoint"
    );
    describe_gauge!(
        "colloquy_projection_lag_seconds",
        "Age of the oldest event the projection has not applied"
    );
    describe_gauge!(
        "colloquy_projection_checkpoint",
        "The projection's checkpoint (global position)"
    );
    // The agent and Gemini
    describe_counter!(
        "colloquy_agent_runs_total",
        "Runs the agent handled, by outcome"
    );
    describe_counter!(
        "colloquy_agent_retries_total",
        "Retries, by kind (in_attempt, scheduled, taken_over)"
    );
    describe_gauge!(
        "colloquy_agent_dead_letters",
        "Runs whose retries ran out, waiting for an operator"
    );
    describe_counter!(
        "colloquy_gemini_calls_total",
        "Calls to Gemini, by method and status class (timeout, transport: no answer)"
    );
    describe_histogram!(
        "colloquy_gemini_call_duration_seconds",
        Unit::Seconds,
        "Time of a Gemini call to its response head, by method"
    );
    describe_counter!(
        "colloquy_gemini_failures_total",
        "Failed Gemini calls of runs, by kind"
    );
    describe_counter!(
        "colloquy_gemini_tokens_total",
        "Tokens Gemini reported, by kind (prompt, candidates)"
    );
    describe_gauge!("colloquy_gemini_keys", "Gemini API keys, by state");
    describe_gauge!("colloquy_gemini_projects", "Gemini projects, by state");
    describe_gauge!(
        "colloquy_gemini_budget_requests",
        "Requests a project was granted in the current window (minute, day)"
    );
    describe_gauge!(
        "colloquy_gemini_budget_requests_limit",
        "A project's request limit per window, configured or learned from a 429"
    );
    describe_gauge!(
        "colloquy_gemini_budget_tokens",
        "Input tokens a project spent this minute"
    );
    describe_gauge!(
        "colloquy_gemini_budget_tokens_limit",
        "A project's input-token limit per minute, when one is set"
    );
    // This module
    describe_counter!(
        "colloquy_scrape_errors_total",
        "Scrape-time readings that failed, by source (their gauges keep their last values)"
    );
    describe_gauge!("colloquy_build_info", "1, labelled with the version");
}
