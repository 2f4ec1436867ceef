//! Rate limits (GCRA, the `governor` crate), answered with 429 `rate_limited` and
//! `Retry-After` before any work (no hashing, no query, no append) is done:
//!
//! - per client address on the auth routes: by default 10 requests a second, in bursts
//!   of up to 20;
//! - per user on commands (every `/v1` request that is not a `GET`): by default 20 a
//!   second, in bursts of up to 40. Queries and SSE are not counted.
//!
//! The key is the client's address: the peer address of the TCP connection
//! (`ConnectInfo`, which `edges::serve` provides) or, when that peer is one of the
//! [`TrustedProxies`] (`COLLOQUY_TRUSTED_PROXIES`), the address its `X-Forwarded-For`
//! names (see [`TrustedProxies::client_address`]). An IPv6 client is keyed by its /64,
//! which one host usually controls whole. `X-Forwarded-For` from any other peer is
//! ignored, since a client can write anything there. A request without `ConnectInfo`
//! (a router served without it) counts against one shared key rather than going
//! unlimited.

use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

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

/// The reverse proxies (load balancers, ingress controllers) whose `X-Forwarded-For`
/// is believed: networks or single addresses, `COLLOQUY_TRUSTED_PROXIES`
/// (comma-separated, e.g. `10.0.0.0/8,192.0.2.7`). Empty (the default): none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<IpNet>()
                    .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("{part:?} is neither an address nor a network (a.b.c.d/n)")
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl TrustedProxies {
    /// Whether `addr` is one of them (an IPv4-mapped IPv6 address as its IPv4 one).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0.iter().any(|net| net.contains(&addr))
    }

    /// The client's address for a request from `peer`: `peer` itself unless it is a
    /// trusted proxy; then the `X-Forwarded-For` entries (every such header, in order),
    /// read from the last one backwards past trusted proxies, give the first address
    /// that is not one: the client as the outermost trusted proxy saw it. Entries a
    /// client put there are to the left of it and so never read. An entry that is not
    /// an address stops the walk at the nearest trusted hop before it.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut nearest = peer;
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for entry in entries.into_iter().rev() {
            let Ok(addr) = entry.parse::<IpAddr>() else {
                return nearest;
            };
            if !self.contains(addr) {
                return addr;
            }
            nearest = addr;
        }
        nearest
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
        .map(|ConnectInfo(addr)| {
            auth.inner
                .trusted_proxies
                .client_address(addr.ip(), request.headers())
        });
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

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let trusted: TrustedProxies = "10.0.0.0/8, 192.0.2.7".parse().unwrap();
        let spoofed = forwarded(&["203.0.113.9"]);
        // A client talking to the gateway directly writes what it likes: ignored.
        assert_eq!(
            trusted.client_address(ip("198.51.100.1"), &spoofed),
            ip("198.51.100.1")
        );
        assert_eq!(
            TrustedProxies::default().client_address(ip("10.1.2.3"), &spoofed),
            ip("10.1.2.3"),
            "no proxy is trusted by default"
        );
        // Through one trusted proxy: the address it appended.
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &spoofed),
            ip("203.0.113.9")
        );
        // Through two (an ingress behind a load balancer), a client that wrote its own
        // entry first: the rightmost address that is not a trusted proxy.
        let chain = forwarded(&["1.1.1.1, 203.0.113.9", "192.0.2.7"]);
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &chain),
            ip("203.0.113.9")
        );
        // Only proxies, or no header: the outermost proxy is the client.
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &forwarded(&["10.9.9.9"])),
            ip("10.9.9.9")
        );
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &HeaderMap::new()),
            ip("10.1.2.3")
        );
        // Garbage stops the walk at the nearest trusted hop.
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &forwarded(&["203.0.113.9, unknown"])),
            ip("10.1.2.3")
        );
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(
            trusted.client_address(ip("::ffff:10.1.2.3"), &spoofed),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_proxies_parse_networks_and_addresses() {
        let trusted: TrustedProxies = "10.0.0.0/8,192.0.2.7, 2001:db8::/32,".parse().unwrap();
        assert!(trusted.contains(ip("10.255.0.1")));
        assert!(trusted.contains(ip("192.0.2.7")));
        assert!(!trusted.contains(ip("192.0.2.8")));
        assert!(trusted.contains(ip("2001:db8:1::1")));
        assert_eq!(
            "".parse::<TrustedProxies>().unwrap(),
            TrustedProxies::default()
        );
        let error = "10.0.0.0/8,proxy.local"
            .parse::<TrustedProxies>()
            .unwrap_err();
        assert!(error.contains("proxy.local"), "{error}");
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
