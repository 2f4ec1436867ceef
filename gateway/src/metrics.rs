//! Prometheus metrics: `GET /metrics` (the text exposition format; no token, like the
//! probes) and the HTTP metrics of every request.
//!
//! Every crate records through the `metrics` facade; the process installs the recorder
//! and renders the page through [`Scrape`], which also refreshes what is read at scrape
//! time (projection lag, SSE subscribers, the key pool) first. docs/OPERATIONS.md,
//! "Metrics", lists every metric.
//!
//! HTTP metrics are labelled with the method, the matched route's template
//! (`/v1/conversations/{id}`), never the raw path, so ids never become label values
//! (a request no route matched is `route="unmatched"`), and the status class (`2xx` …
//! `5xx`). Latency is measured to the response head: an SSE stream counts the time until
//! it opened. Error responses are also counted by their problem `code`.

use std::time::Instant;

use async_trait::async_trait;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;

use crate::GatewayState;
use crate::error::Problem;

/// The media type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The process's metrics page.
#[async_trait]
pub trait Scrape: Send + Sync + 'static {
    /// Every metric of this process in the text exposition format, gauges read at scrape
    /// time refreshed first.
    async fn render(&self) -> String;
}

impl std::fmt::Debug for dyn Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

pub(crate) fn routes() -> axum::Router<GatewayState> {
    api().split_for_parts().0
}

/// The routes of this module with their OpenAPI descriptions.
pub(crate) fn api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new().routes(utoipa_axum::routes!(metrics))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    description = "This process's metrics in Prometheus' text format: HTTP, commands, the \
                   log and its fan-out, projections, the live feed, the agent and Gemini. \
                   docs/OPERATIONS.md lists them.",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain", body = String)
    )
)]
async fn metrics(State(state): State<GatewayState>) -> Response {
    let mut response = (StatusCode::OK, state.metrics.render().await).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// Middleware: counts and times every request by method, route template and status
/// class, and counts problem responses by code. Sits outside the request timeout, so a
/// timed-out request counts as the 503 it was answered with.
pub(crate) async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    ::metrics::counter!(
        "colloquy_http_requests_total",
        "method" => method,
        "route" => route.clone(),
        "status_class" => status_class(response.status()),
    )
    .increment(1);
    ::metrics::histogram!(
        "colloquy_http_request_duration_seconds",
        "method" => method,
        "route" => route.clone(),
    )
    .record(started.elapsed());
    if let Some(problem) = response.extensions().get::<Problem>() {
        ::metrics::counter!(
            "colloquy_http_errors_total",
            "method" => method,
            "route" => route,
            "code" => problem.code,
        )
        .increment(1);
    }
    response
}

/// The method as a label: the standard ones, anything else `other` (a client chooses
/// the method, and labels must stay few).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `2xx` … `5xx`.
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_their_class() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::NOT_MODIFIED), "3xx");
        assert_eq!(status_class(StatusCode::TOO_MANY_REQUESTS), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(
            method_label(&Method::from_bytes(b"PROPFIND").unwrap()),
            "other"
        );
    }
}
