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

pub mod auth;
pub mod error;
pub mod health;
pub mod live;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub use auth::{AuthState, AuthUser};
pub use error::{ApiError, ApiJson};
pub use health::{Probe, ProbeResult};
pub use live::{LiveHub, LiveSettings};

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct GatewayState {
    /// Dependencies `/readyz` checks.
    pub probes: Arc<Vec<Arc<dyn Probe>>>,
    /// Keys, password hashing and the auth rate limiter.
    pub auth: AuthState,
    /// The command side (every write to the log).
    pub commands: colloquy_commands::Commands,
    /// The read models (queries and position waits).
    pub pool: sqlx::PgPool,
    /// The live feed (SSE).
    pub live: LiveHub,
}

/// The whole HTTP surface.
///
/// Every response carries an `X-Request-Id` (the client's, or a new UUID), and every
/// error body names it; unknown paths and methods are problem+json 404 and 405.
pub fn router(state: GatewayState) -> Router {
    Router::new()
        .merge(health::routes())
        .merge(auth::routes(&state.auth))
        .merge(
            routes::routes().route_layer(axum::middleware::from_fn_with_state(
                state.auth.clone(),
                auth::limit_commands_by_user,
            )),
        )
        .merge(live::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(axum::middleware::from_fn(error::problem_request_id)),
        )
}
