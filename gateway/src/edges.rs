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
//!
//! And what every connection is held to, in [`serve`] (HTTP/1.1): a client must send a
//! request's head within [`Connections::header_read_timeout`] (10 s) of connecting or
//! of its previous response, or the connection is closed, so a client that trickles
//! its head a byte at a time (slowloris) or connects and sends nothing holds its
//! connection for that long at most; a connection whose client takes none of what the
//! server has to send for [`Connections::write_timeout`] (30 s) is closed, so a client
//! that sends requests and never reads the responses (or stops reading an event
//! stream) cannot hold its connection either; and at most [`Connections::max`] connections are
//! open at once (`COLLOQUY_MAX_CONNECTIONS`): further clients wait in the listen
//! backlog until one closes, instead of the process running out of file descriptors
//! or memory.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
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

/// What the server holds each connection to ([`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// Connections open at once; further clients wait in the listen backlog.
    pub max: usize,
    /// How long a client may take to send a request's head, counted from the moment
    /// the connection is open or its previous response was sent (so it also bounds
    /// how long an idle keep-alive connection stays open).
    pub header_read_timeout: Duration,
    /// How long the server may wait for the client to take any of what it has to
    /// send; then the connection is closed.
    pub write_timeout: Duration,
}

impl Connections {
    /// The default cap on open connections: room for 10,000 live-feed streams
    /// (`COLLOQUY_SSE_MAX_STREAMS`) and requests beside them.
    pub const DEFAULT_MAX: usize = 12_288;
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            max: Self::DEFAULT_MAX,
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` is cancelled, then
/// stops accepting, lets each connection finish its request in flight (idle ones close
/// at once) and returns when every connection is closed. Each request carries its
/// peer's [`ConnectInfo<SocketAddr>`] (the auth routes' rate limit is keyed by it).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    connections: Connections,
    shutdown: CancellationToken,
) {
    let max = connections.max.clamp(1, Semaphore::MAX_PERMITS);
    let open = Arc::new(Semaphore::new(max));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(connections.header_read_timeout);
    let mut warned_full = false;
    loop {
        // A place for one more connection, or wait (clients queue in the backlog).
        let permit = match Arc::clone(&open).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !warned_full {
                    tracing::warn!(
                        max,
                        "the connection cap is reached; new clients wait until one closes"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    permit = Arc::clone(&open).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !is_connection_error(&error) {
                        // Out of file descriptors, say: wait rather than spin.
                        tracing::warn!(error = %error, "accepting a connection failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    continue;
                }
            },
        };
        if open.available_permits() > max / 2 {
            warned_full = false;
        }
        let service =
            router
                .clone()
                .map_request(move |mut request: axum::http::Request<Incoming>| {
                    request
                        .extensions_mut()
                        .insert(ConnectInfo::<SocketAddr>(peer));
                    request
                });
        let io = StallGuard::new(stream, connections.write_timeout);
        let connection =
            builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                // A header read timeout, a client that went away: routine.
                tracing::debug!(client.address = %peer, error = %error, "connection closed");
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it closes.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
}

/// Errors of one connection that do not concern the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// A connection's socket whose writes fail (`TimedOut`) once the peer has taken nothing
/// for `timeout` while the server had something to send.
struct StallGuard<T> {
    inner: T,
    timeout: Duration,
    /// Set while a write waits for the peer.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    const fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
        }
    }

    /// After a write that made progress (or failed): the clock stops.
    fn progressed<R>(&mut self, result: Poll<R>) -> Poll<R> {
        if result.is_ready() {
            self.deadline = None;
        }
        result
    }

    /// A write is waiting for the peer: fails once it has waited `timeout`.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took nothing of the response for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }
}
