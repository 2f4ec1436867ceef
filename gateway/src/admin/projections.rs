//! `GET /v1/admin/projections` (each read model's checkpoint, lag and state) and
//! `POST /v1/admin/projections/{name}/rebuild` (a rebuild in the background).
//!
//! A rebuild is the one `colloquy replay <name>` runs: the log is projected into
//! scratch tables while the live tables keep serving, then swapped in. It can take
//! minutes on a long log, so the request only starts it (202); the list shows it as
//! `rebuilding` until it is done, and this process remembers how its last one ended.
//! A rebuild cut short (the process stops) leaves the live tables as they were (and on
//! Postgres its scratch schema, for the next rebuild to drop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use colloquy_eventstore::{Database, GlobalPosition};
use colloquy_projections::replay::{self, AlreadyRunning};
use colloquy_projections::runner::{ProjectionLag, lags};
use colloquy_projections::{Projection, by_name};
use serde::Serialize;
use serde_json::json;

use crate::GatewayState;
use crate::auth::AdminUser;
use crate::error::ApiError;

/// The rebuilds this process started, by projection: a rebuild shows as running from
/// the moment it is accepted (before it takes its lock), and how it ended stays
/// visible afterwards. Rebuilds started elsewhere (the CLI, another gateway) are seen
/// through their lock instead.
#[derive(Debug, Clone, Default)]
pub struct Rebuilds(Arc<Mutex<HashMap<&'static str, Rebuild>>>);

/// One rebuild started here.
#[derive(Debug, Clone, Serialize)]
struct Rebuild {
    /// `running`, `succeeded` or `failed` (the cause is in the log, not here).
    status: &'static str,
    started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    /// The position the swapped-in read model had reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<GlobalPosition>,
}

impl Rebuilds {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<&'static str, Rebuild>) -> T) -> T {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records a new rebuild of `name` as running; `None` if one already is.
    fn begin(&self, name: &'static str) -> Option<Rebuild> {
        self.with(|rebuilds| {
            if rebuilds.get(name).is_some_and(|r| r.status == "running") {
                return None;
            }
            let rebuild = Rebuild {
                status: "running",
                started_at: Utc::now(),
                finished_at: None,
                position: None,
            };
            rebuilds.insert(name, rebuild.clone());
            Some(rebuild)
        })
    }

    /// Records how the running rebuild of `name` ended.
    fn finish(&self, name: &'static str, reached: Option<GlobalPosition>) {
        self.with(|rebuilds| {
            if let Some(rebuild) = rebuilds.get_mut(name) {
                rebuild.status = if reached.is_some() {
                    "succeeded"
                } else {
                    "failed"
                };
                rebuild.finished_at = Some(Utc::now());
                rebuild.position = reached;
            }
        });
    }

    fn get(&self, name: &str) -> Option<Rebuild> {
        self.with(|rebuilds| rebuilds.get(name).cloned())
    }
}

/// One read model as the log and the rebuild locks show it: its lag and whether a
/// rebuild holds its lock (in any process). Shared by the HTTP list and `colloquy admin
/// projections status`.
#[derive(Debug)]
pub struct ProjectionState {
    pub lag: ProjectionLag,
    /// A rebuild holds the projection's lock.
    pub rebuilding: bool,
}

impl ProjectionState {
    /// `rebuilding`, `catching_up` (events in the log after the checkpoint) or `live`.
    pub fn state(&self, rebuilding_here: bool) -> &'static str {
        if self.rebuilding || rebuilding_here {
            "rebuilding"
        } else if self.lag.lag.events > 0 {
            "catching_up"
        } else {
            "live"
        }
    }
}

/// Every projection's lag and rebuild lock, in `all_projections` order.
pub async fn projection_states(db: &Database) -> anyhow::Result<Vec<ProjectionState>> {
    let mut states = Vec::new();
    for lag in lags(db).await? {
        let rebuilding = replay::is_rebuilding(db, lag.projection.as_ref()).await?;
        states.push(ProjectionState { lag, rebuilding });
    }
    Ok(states)
}

/// `GET /v1/admin/projections` → `{items: [{name, checkpoint, lag_events, lag_seconds,
/// state, last_rebuild}]}`. `state` is `rebuilding` (here or in another process),
/// `catching_up` (events in the log after the checkpoint) or `live`; `last_rebuild` is
/// the last rebuild this process started, if any.
pub(crate) async fn list(
    State(state): State<GatewayState>,
    _admin: AdminUser,
) -> Result<Response, ApiError> {
    let states = projection_states(&state.db).await.map_err(ApiError::from)?;
    let mut items = Vec::with_capacity(states.len());
    for found in states {
        let projection = &found.lag.projection;
        let lag = found.lag.lag;
        let last_rebuild = state.rebuilds.get(projection.name());
        let projection_state =
            found.state(last_rebuild.as_ref().is_some_and(|r| r.status == "running"));
        items.push(json!({
            "name": projection.name(),
            "checkpoint": lag.checkpoint,
            "lag_events": lag.events,
            "lag_seconds": lag.seconds,
            "state": projection_state,
            "last_rebuild": last_rebuild,
        }));
    }
    Ok(Json(json!({ "items": items })).into_response())
}

/// `POST /v1/admin/projections/{name}/rebuild` → 202 `{name, state: "rebuilding",
/// rebuild}` once the rebuild has started in the background; 404 for an unknown
/// projection; 409 `rebuild_in_progress` while one is running.
pub(crate) async fn rebuild(
    State(state): State<GatewayState>,
    admin: AdminUser,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let projection = by_name(&name).ok_or(ApiError::NotFound)?;
    let name = projection.name();
    let busy = || ApiError::Conflict {
        code: "rebuild_in_progress",
        detail: format!("a rebuild of {name} is already running"),
    };
    if replay::is_rebuilding(&state.db, projection.as_ref())
        .await
        .map_err(ApiError::from)?
    {
        return Err(busy());
    }
    let started = state.rebuilds.begin(name).ok_or_else(busy)?;
    tracing::info!(projection = name, by = %admin.0.id, "rebuild requested");
    tokio::spawn(run_rebuild(state.clone(), projection));
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "name": name, "state": "rebuilding", "rebuild": started })),
    )
        .into_response())
}

/// The background half of [`rebuild`]: runs it and records how it ended. Its failure
/// is logged here, once, with its cause.
async fn run_rebuild(state: GatewayState, projection: Arc<dyn Projection>) {
    let name = projection.name();
    let store = Arc::clone(state.commands.store());
    let result = replay::rebuild(&state.db, &store, projection.as_ref(), &|_, _| {}).await;
    match &result {
        Ok(position) => tracing::info!(projection = name, position, "rebuilt and swapped in"),
        Err(error) if error.downcast_ref::<AlreadyRunning>().is_some() => {
            tracing::warn!(
                projection = name,
                "rebuild not started: another one is running"
            );
        }
        Err(error) => {
            tracing::error!(projection = name, error = %format!("{error:#}"), "rebuild failed");
        }
    }
    state.rebuilds.finish(name, result.ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rebuild_of_a_projection_runs_at_a_time_here() {
        let rebuilds = Rebuilds::default();
        assert!(rebuilds.begin("runs").is_some());
        assert!(rebuilds.begin("runs").is_none(), "already running");
        assert!(rebuilds.begin("search").is_some(), "another projection");
        rebuilds.finish("runs", Some(42));
        let done = rebuilds.get("runs");
        assert_eq!(done.as_ref().map(|r| r.status), Some("succeeded"));
        assert_eq!(done.and_then(|r| r.position), Some(42));
        assert!(rebuilds.begin("runs").is_some(), "again once finished");
        rebuilds.finish("runs", None);
        assert_eq!(rebuilds.get("runs").map(|r| r.status), Some("failed"));
    }
}
