//! The operators' routes under `/v1/admin` (see `docs`' api.md, "Admin"). Every one
//! takes an [`AdminUser`](crate::auth::AdminUser): no token or a bad one is 401, a valid
//! token without the admin role is 403 `forbidden`.
//!
//! - [`projections`]: each read model's checkpoint, lag and state, and rebuilds (the
//!   same as `colloquy replay <name>`) started in the background.
//! - [`streams`]: the raw events of any stream, as stored.
//! - [`keys`]: the agent's key pool — labels, budgets, health; never a key.
//! - [`runs`]: dead letters (runs whose retries ran out), and bringing one back.
//! - [`users`]: erasure of a user's text from the log.
//!
//! The operator's id is the acting user of what these routes append, so the log
//! records who revived a run.
//!
//! `colloquy admin …` offers the same operations without a gateway; the queries and
//! commands both need live in public functions here ([`projections::projection_states`],
//! [`runs::list_dead_letters`], [`runs::revive_dead_letter`]) rather than inside the
//! handlers, so the two cannot drift apart.

mod keys;
pub mod projections;
pub mod runs;
mod streams;
pub mod users;

use axum::Router;
use axum::routing::{get, post};

pub use projections::Rebuilds;
pub use users::{Erasure, FanOutStream, erase_user};

use crate::GatewayState;

/// The routes of this module.
pub(crate) fn routes() -> Router<GatewayState> {
    Router::new()
        .route("/v1/admin/projections", get(projections::list))
        .route(
            "/v1/admin/projections/{name}/rebuild",
            post(projections::rebuild),
        )
        .route("/v1/admin/streams/{stream_name}", get(streams::read))
        .route("/v1/admin/agent/keys", get(keys::list))
        .route("/v1/admin/runs/dead-letters", get(runs::dead_letters))
        .route("/v1/admin/runs/{run_id}/retry", post(runs::retry))
        .route("/v1/admin/users/{user_id}/forget", post(users::forget))
}
