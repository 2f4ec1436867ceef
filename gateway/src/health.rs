//! Liveness and readiness. `/healthz` answers as long as the process serves HTTP;
//! `/readyz` checks every dependency concurrently, each with a time limit, and answers
//! 503 with per-dependency detail when one is down. Both need no token.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;

use crate::GatewayState;

/// What a probe reports: `Ok` with optional detail, or the reason it is down.
pub type ProbeResult = Result<Value, String>;

/// A dependency `/readyz` checks.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn check(&self) -> ProbeResult;
}

impl std::fmt::Debug for dyn Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Probe({})", self.name())
    }
}

/// How long one probe may take before it counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn routes() -> Router<GatewayState> {
    api().split_for_parts().0
}

/// The routes of this module with their OpenAPI descriptions.
pub(crate) fn api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(healthz))
        .routes(utoipa_axum::routes!(readyz))
}

/// The process serves HTTP.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Alive {
    #[schema(value_type = String, pattern = "^alive$")]
    status: &'static str,
}

/// Every dependency's state.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    #[schema(value_type = String, pattern = "^(ready|not_ready)$")]
    status: &'static str,
    /// By dependency (`postgres`, `nats`, `projections`, …).
    checks: BTreeMap<&'static str, DependencyCheck>,
}

/// One dependency's probe.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DependencyCheck {
    #[schema(value_type = String, pattern = "^(up|down)$")]
    status: &'static str,
    latency_ms: u64,
    /// Why it is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// What the probe adds when up (a server version, a checkpoint and lag, …).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    detail: Map<String, Value>,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = Alive))
)]
async fn healthz() -> Json<Alive> {
    Json(Alive { status: "alive" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    description = "Checks every dependency concurrently (Postgres, NATS, the projections' lag), \
                   each within 2 s.",
    responses(
        (status = 200, description = "Every dependency is up", body = Readiness),
        (status = 503, description = "A dependency is down (`status: not_ready`; see `checks`)", body = Readiness),
    )
)]
async fn readyz(State(state): State<GatewayState>) -> Response {
    let checks = futures::future::join_all(state.probes.iter().map(|probe| async move {
        let started = Instant::now();
        let result = tokio::time::timeout(PROBE_TIMEOUT, probe.check())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")));
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        (probe.name(), result, elapsed_ms)
    }))
    .await;
    let mut ready = true;
    let mut detail = BTreeMap::new();
    for (name, result, latency_ms) in checks {
        let entry = match result {
            Ok(extra) => {
                let mut detail = match extra {
                    Value::Object(extra) => extra,
                    _ => Map::new(),
                };
                // The fixed fields win over a probe's detail of the same name.
                for fixed in ["status", "latency_ms", "error"] {
                    detail.remove(fixed);
                }
                DependencyCheck {
                    status: "up",
                    latency_ms,
                    error: None,
                    detail,
                }
            }
            Err(error) => {
                ready = false;
                DependencyCheck {
                    status: "down",
                    latency_ms,
                    error: Some(error),
                    detail: Map::new(),
                }
            }
        };
        detail.insert(name, entry);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        checks: detail,
    };
    (status, Json(body)).into_response()
}
