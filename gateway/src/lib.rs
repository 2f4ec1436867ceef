//! Colloquy's HTTP gateway: the axum router for the public API (`/v1/…`), the live
//! feed and the operational endpoints. It holds no business rules: commands go through
//! `colloquy-commands`, queries read the read models.
//!
//! - [`health`]: `/healthz` (the process is alive) and `/readyz` (each dependency,
//!   with detail).
//! - [`auth`]: `/v1/auth/…` (register, login, refresh, logout), `/v1/me`, and the
//!   [`AuthUser`] extractor for every `/v1` route.
//! - [`live`]: the SSE streams, fed by one [`LiveHub`] per process.
//! - [`error`]: [`ApiError`] (problem+json) and the [`ApiJson`] body extractor.
//! - [`admin`]: the operators' routes under `/v1/admin` (admin role only).
//! - [`metrics`]: `/metrics` (Prometheus) and the HTTP metrics of every request.

pub mod admin;
pub mod auth;
pub mod edges;
pub mod error;
pub mod health;
pub mod live;
pub mod metrics;
pub mod openapi;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub use auth::{AdminUser, AuthState, AuthUser};
pub use error::{ApiError, ApiJson};
pub use health::{Probe, ProbeResult};
pub use live::{LiveHub, LiveSettings};
pub use metrics::Scrape;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct GatewayState {
    /// Dependencies `/readyz` checks.
    pub probes: Arc<Vec<Arc<dyn Probe>>>,
    /// Keys, password hashing and the auth rate limiter.
    pub auth: AuthState,
    /// The command side (every write to the log).
    pub commands: colloquy_commands::Commands,
    /// The read models (queries and position waits), on Postgres or SQLite: each query
    /// has its SQL for both (`routes::read_query!`).
    pub db: colloquy_eventstore::Database,
    /// The live feed (SSE).
    pub live: LiveHub,
    /// The agent's key pool, for the admin view (`None`: no keys configured). The same
    /// pool the agent in this process spends from.
    pub keys: Option<Arc<colloquy_gemini_agent::keys::KeyPool>>,
    /// Read-model rebuilds started through the admin routes.
    pub rebuilds: admin::Rebuilds,
    /// The JetStream stream erasure purges (`None` in the embedded mode).
    pub fan_out: Option<admin::FanOutStream>,
    /// Renders `/metrics`.
    pub metrics: Arc<dyn Scrape>,
}

/// The whole HTTP surface, with the default edges (no CORS, a 30 s request timeout).
///
/// Every response carries an `X-Request-Id` (the client's, or a new UUID), and every
/// error body names it; unknown paths and methods are problem+json 404 and 405.
pub fn router(state: GatewayState) -> Router {
    router_with(state, &edges::Edges::default()).expect("BUG: the default edges are valid")
}

/// The whole HTTP surface with `edges` (CORS origins, request timeout).
///
/// # Errors
/// An invalid CORS origin, naming the setting.
pub fn router_with(state: GatewayState, edges: &edges::Edges) -> Result<Router, String> {
    let timeout = edges.request_timeout;
    let router = Router::new()
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(auth::routes(&state.auth))
        .merge(
            routes::routes().route_layer(axum::middleware::from_fn_with_state(
                state.auth.clone(),
                auth::limit_commands_by_user,
            )),
        )
        .merge(live::routes())
        .merge(admin::routes())
        .merge(openapi::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(move |request, next| {
            edges::bounded(timeout, request, next)
        }))
        .layer(axum::middleware::from_fn(metrics::observe))
        .layer(axum::middleware::from_fn(trace_request))
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(axum::middleware::from_fn(error::problem_request_id)),
        );
    edges::apply(router, edges)
}

/// One span per request, continuing the client's trace (a valid `traceparent` header)
/// or starting one; the commands it runs record it in their events' metadata, so the
/// relay, the projectors and the agent continue the same trace. It names the route,
/// never the path or query (which may hold ids and tokens). Probes and scrapes
/// (`/healthz`, `/readyz`, `/metrics`), which arrive every few seconds from every
/// orchestrator and scraper, start no trace.
async fn trace_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    colloquy_eventstore::trace::continue_from(
        &span,
        request
            .headers()
            .get(colloquy_eventstore::wire::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
