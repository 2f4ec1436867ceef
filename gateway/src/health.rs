//! Liveness and readiness. `/healthz` answers as long as the process serves HTTP;
//! `/readyz` checks every dependency concurrently, each with a time limit, and answers
//! 503 with per-dependency detail when one is down.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

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
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

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
    let mut detail = Map::new();
    for (name, result, elapsed_ms) in checks {
        let entry = match result {
            Ok(extra) => {
                let mut entry = json!({ "status": "up", "latency_ms": elapsed_ms });
                if let (Some(obj), Value::Object(extra)) = (entry.as_object_mut(), extra) {
                    obj.extend(extra);
                }
                entry
            }
            Err(error) => {
                ready = false;
                json!({ "status": "down", "error": error, "latency_ms": elapsed_ms })
            }
        };
        detail.insert(name.to_owned(), entry);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": detail,
    });
    (status, Json(body)).into_response()
}
