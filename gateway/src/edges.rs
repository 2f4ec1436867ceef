//! What every response passes through on its way out, configured at start: CORS for
//! browser clients on other origins, gzip for large bodies, and a bound on how long a
//! request may take to answer.
//!
//! - CORS: only the origins in `COLLOQUY_CORS_ORIGINS` (none: no CORS headers, so
//!   browsers allow same-origin use only). Credentials are bearer tokens, not cookies,
//!   so `Access-Control-Allow-Credentials` is not sent. The headers clients need are
//!   allowed (`Authorization`, `Idempotency-Key`, `If-Match`, `Last-Event-ID`,
//!   `X-Colloquy-Min-Position`, `X-Request-Id`) and exposed (`X-Colloquy-Position`,
//!   `X-Request-Id`, `Retry-After`, `ETag`).
//! - Compression: gzip when the client accepts it and the body is over 32 bytes; never
//!   for `text/event-stream`, whose events must not wait for a compressor's buffer.
//! - Timeout: a request that has not produced its response head within the bound is
//!   answered 503 problem+json with `Retry-After`. The bound covers the head only, so
//!   an SSE stream, once open, is not cut.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;

/// The edge settings.
#[derive(Debug, Clone)]
pub struct Edges {
    /// Allowed browser origins, e.g. `https://app.example.com`.
    pub cors_origins: Vec<String>,
    /// The longest a request may take to produce its response head.
    pub request_timeout: Duration,
}

impl Default for Edges {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// `router` wrapped in compression and CORS (the timeout sits inside, see
/// [`crate::router_with`], so that its 503 carries the request id).
///
/// # Errors
/// An origin that is not a valid header value.
pub(crate) fn apply(router: Router, edges: &Edges) -> Result<Router, String> {
    let mut router = router.layer(CompressionLayer::new());
    if !edges.cors_origins.is_empty() {
        let origins = edges
            .cors_origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin)
                    .map_err(|_| format!("COLLOQUY_CORS_ORIGINS: {origin:?} is not a valid origin"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::IF_MATCH,
                    HeaderName::from_static("idempotency-key"),
                    HeaderName::from_static("last-event-id"),
                    HeaderName::from_static("x-colloquy-min-position"),
                    HeaderName::from_static("x-request-id"),
                ])
                .expose_headers([
                    HeaderName::from_static("x-colloquy-position"),
                    HeaderName::from_static("x-request-id"),
                    header::RETRY_AFTER,
                    header::ETAG,
                ])
                .max_age(Duration::from_secs(600)),
        );
    }
    Ok(router)
}

/// Answers 503 when the response head takes longer than `timeout`.
pub(crate) async fn bounded(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?timeout, "a request outlived the request timeout");
            ApiError::Unavailable {
                detail: "the request took too long; try again".into(),
                retry_after: Duration::from_secs(1),
            }
            .into_response()
        }
    }
}
