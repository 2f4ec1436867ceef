//! Colloquy's HTTP gateway: the axum router for the public API (`/v1/…`), the live
//! feed and the operational endpoints. It holds no business rules: commands go through
//! `colloquy-commands`, queries read the read models.
//!
//! - [`health`]: `/healthz` (the process is alive) and `/readyz` (each dependency,
//!   with detail).

pub mod health;

use std::sync::Arc;

use axum::Router;

pub use health::{Probe, ProbeResult};

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct GatewayState {
    /// Dependencies `/readyz` checks.
    pub probes: Arc<Vec<Arc<dyn Probe>>>,
}

/// The whole HTTP surface.
pub fn router(state: GatewayState) -> Router {
    Router::new().merge(health::routes()).with_state(state)
}
