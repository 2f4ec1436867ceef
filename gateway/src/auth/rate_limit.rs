//! Rate limits (GCRA, the `governor` crate), answered with 429 `rate_limited` and
//! `Retry-After` before any work (no hashing, no query, no append) is done:
//!
//! - per client address on the auth routes: by default 10 requests a second, in bursts
//!   of up to 20;
//! - per user on commands (every `/v1` request that is not a `GET`): by default 20 a
//!   second, in bursts of up to 40. Queries and SSE are not counted.
//!
//! The key is the peer address of the TCP connection (`ConnectInfo`, which
//! `axum::serve(…into_make_service_with_connect_info::<SocketAddr>())` provides): an
//! IPv6 client is keyed by its /64, which one host usually controls whole.
//! `X-Forwarded-For` is not trusted: behind a reverse proxy every client shares the
//! proxy's budget. A request without `ConnectInfo` (a router served without it) counts
//! against one shared key rather than going unlimited.

use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};

use super::AuthState;
use super::extract::bearer_token;
use crate::error::ApiError;

/// A request budget per key (an address, a user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second per key.
    pub per_second: NonZeroU32,
    /// Requests an idle key may send at once.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// `per_second` sustained, `burst` at once (both at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// The default budget of one user's commands: 20 a second, bursts of 40.
    pub fn commands() -> Self {
        Self::new(20, 40)
    }
}

impl Default for RateLimit {
    /// The default budget of one address on the auth routes: 10 a second, bursts of 20.
    fn default() -> Self {
        Self::new(10, 20)
    }
}

/// How often (in requests) idle addresses are dropped from the limiter's memory.
const SWEEP_EVERY: u64 = 1024;

/// A keyed limiter and its housekeeping.
pub(crate) struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    requests: AtomicU64,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            requests: AtomicU64::new(0),
        }
    }

    /// Counts a request of `key`: `Err` with the 429 when over the budget.
    pub(crate) fn check(&self, key: &K) -> Result<(), ApiError> {
        if self.requests.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| ApiError::RateLimited {
                retry_after: not_until.wait_time_from(self.limiter.clock().now()),
            })
    }
}

/// The auth routes' limiter, keyed by client address.
pub(crate) type IpLimiter = KeyedLimiter<IpAddr>;

impl IpLimiter {
    /// Counts a request from `addr` (one shared key when unknown).
    fn check_addr(&self, addr: Option<IpAddr>) -> Result<(), ApiError> {
        self.check(&addr.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), key_of))
    }
}

/// The limiter's key for an address: IPv4 as is, IPv6 by its /64 (an IPv4-mapped IPv6
/// address is its IPv4 address).
fn key_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// Middleware on the auth routes.
pub(crate) async fn limit_by_ip(
    State(auth): State<AuthState>,
    request: Request,
    next: Next,
) -> Response {
    let addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    match auth.inner.limiter.check_addr(addr) {
        Ok(()) => next.run(request).await,
        Err(error) => {
            tracing::debug!(client.address = ?addr, "auth request rate-limited");
            error.into_response()
        }
    }
}

/// Middleware on the `/v1` command and query routes: counts every request that is not a
/// `GET` against its user's command budget (whichever key signed the token). Requests
/// without a valid token pass through (their handler answers 401); the caller it
/// verified is left in the request's extensions for [`AuthUser`](super::AuthUser) to take.
pub(crate) async fn limit_commands_by_user(
    State(auth): State<AuthState>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.method() == axum::http::Method::GET {
        return next.run(request).await;
    }
    let user = match bearer_token(request.headers()) {
        Some(token) => auth.authenticate(token).await.ok(),
        None => None,
    };
    if let Some(user) = user {
        if let Err(error) = auth.inner.command_limiter.check(&user.id) {
            tracing::debug!(user.id = %user.id, "command rate-limited");
            return error.into_response();
        }
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_over_the_budget_is_refused_with_a_delay() {
        let limiter = IpLimiter::new(RateLimit::default());
        let addr = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for _ in 0..20 {
            limiter.check_addr(addr).unwrap();
        }
        match limiter.check_addr(addr) {
            Err(ApiError::RateLimited { retry_after }) => {
                assert!(retry_after.as_millis() <= 100, "{retry_after:?}");
            }
            other => panic!("expected 429, got {other:?}"),
        }
        // Another address has its own budget.
        limiter
            .check_addr(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))))
            .unwrap();
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key_of(a), key_of(b));
        assert_ne!(key_of(a), key_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(key_of(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
