//! A fault-injecting TCP proxy: put it between the application and a server the other
//! tests share (Postgres, NATS), point the application at [`FaultProxy::addr`] (or at
//! [`FaultProxy::proxied_url`]), and make an outage for this one test without touching
//! the server.
//!
//! - [`Fault::None`]: bytes pass both ways.
//! - [`Fault::Refuse`]: like a stopped server: every open connection is closed and the
//!   port stops listening, so new connections are refused.
//! - [`Fault::BlackHole`]: like a network partition: connections stay open and new ones
//!   are accepted, but nothing is forwarded either way (bytes read before the fault
//!   are held, not dropped). Ending it delivers what was held, as a healed partition
//!   delivers TCP's retransmissions; new connections reach the server only then.
//!
//! Dropping the proxy closes every connection through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass-through.
    None,
    /// Close every connection and refuse new ones (a stopped server).
    Refuse,
    /// Keep connections, forward nothing (a partition).
    BlackHole,
}

/// A TCP proxy on a loopback port in front of `upstream`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    open: Arc<AtomicUsize>,
    listener: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a pass-through proxy to `upstream` on a free loopback port.
    ///
    /// # Panics
    /// If no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (fault, faults) = watch::channel(Fault::None);
        let open = Arc::new(AtomicUsize::new(0));
        let listener = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            faults,
            Arc::clone(&open),
        ));
        Self {
            addr,
            upstream,
            fault,
            open,
            listener,
        }
    }

    /// Starts a proxy to the host and port of `url` (`scheme://[user@]host:port/…`).
    ///
    /// # Panics
    /// If the URL has no host and port that resolve.
    pub async fn in_front_of(url: &str) -> Self {
        let (_, authority, _) = split_url(url).expect("a URL with scheme://host:port");
        let host_port = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host_port)| host_port);
        let upstream = tokio::net::lookup_host(host_port)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("{host_port} resolves"));
        Self::start(upstream).await
    }

    /// `url` with its host and port replaced by the proxy's (user, path and query kept).
    ///
    /// # Panics
    /// If `url` is not `scheme://[user@]host:port/…`.
    pub fn proxied_url(&self, url: &str) -> String {
        let (scheme, authority, rest) = split_url(url).expect("a URL with scheme://host:port");
        let user = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        format!("{scheme}://{user}{}{rest}", self.addr)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Sets the fault (takes effect at once on every connection).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        // Connections end when the sender goes (their `changed()` fails).
    }
}

/// `(scheme, authority, rest)` of `scheme://authority/rest`.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let end = after.find(['/', '?']).unwrap_or(after.len());
    Some((scheme, &after[..end], &after[end..]))
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Fault>,
    open: Arc<AtomicUsize>,
) {
    let mut listener = Some(listener);
    loop {
        if *faults.borrow_and_update() == Fault::Refuse {
            // Not listening: connections are refused.
            listener = None;
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        if listener.is_none() {
            listener = Some(rebind(addr).await);
        }
        let Some(bound) = listener.as_ref() else {
            continue;
        };
        tokio::select! {
            accepted = bound.accept() => {
                if let Ok((client, _)) = accepted {
                    let _ = client.set_nodelay(true);
                    let guard = OpenGuard::new(&open);
                    let faults = faults.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        serve(client, upstream, faults).await;
                    });
                }
            }
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Listens on `addr` again (after a refusal); retries briefly if the port is taken.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let bound = TcpSocket::new_v4().and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        });
        match bound {
            Ok(listener) => return listener,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the proxy cannot listen on {addr} again: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts an open connection while it lives.
#[derive(Debug)]
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client connection: reaches the server once nothing is black-holed, then pumps
/// both ways until either side closes or the proxy refuses.
async fn serve(client: TcpStream, upstream: SocketAddr, mut faults: watch::Receiver<Fault>) {
    if !passing(&mut faults).await {
        return;
    }
    let server = tokio::select! {
        connected = TcpStream::connect(upstream) => match connected {
            Ok(server) => server,
            Err(_) => return,
        },
        () = refused(faults.clone()) => return,
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, faults.clone()),
        pump(server_read, client_write, faults),
    );
}

/// Waits while black-holed; `true` once passing, `false` when refused or the proxy is
/// gone.
async fn passing(faults: &mut watch::Receiver<Fault>) -> bool {
    loop {
        let fault = *faults.borrow_and_update();
        match fault {
            Fault::None => return true,
            Fault::Refuse => return false,
            Fault::BlackHole => {
                if faults.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Resolves when the proxy refuses or is gone.
async fn refused(mut faults: watch::Receiver<Fault>) {
    let _ = faults.wait_for(|fault| *fault == Fault::Refuse).await;
}

/// Copies `from` to `to` while passing; holds what it read while black-holed; returns
/// (closing both halves) at end of stream, on an error, or when refused.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut faults: watch::Receiver<Fault>) {
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        if !passing(&mut faults).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !passing(&mut faults).await {
            return;
        }
        tokio::select! {
            written = to.write_all(&buffer[..n]) => {
                if written.is_err() {
                    return;
                }
            }
            () = refused(faults.clone()) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn urls_keep_everything_but_the_address() {
        assert_eq!(
            split_url("postgres://u:p@127.0.0.1:5432/db?x=1"),
            Some(("postgres", "u:p@127.0.0.1:5432", "/db?x=1"))
        );
        assert_eq!(
            split_url("nats://127.0.0.1:4222"),
            Some(("nats", "127.0.0.1:4222", ""))
        );
    }

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut back = vec![0; text.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    const SOON: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn passes_holds_and_refuses() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut held, b"hello").await.unwrap(), b"hello");

        // Black-holed: nothing comes back, on an open connection or a new one.
        proxy.set(Fault::BlackHole);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        for stream in [&mut held, &mut fresh] {
            let silent =
                tokio::time::timeout(Duration::from_millis(300), round_trip(stream, b"anyone?"))
                    .await;
            assert!(silent.is_err(), "an answer through a black hole");
        }
        // Healed: what was held arrives.
        proxy.set(Fault::None);
        for stream in [&mut held, &mut fresh] {
            let mut back = [0; 7];
            tokio::time::timeout(SOON, stream.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&back, b"anyone?");
        }
        assert_eq!(proxy.open_connections(), 2);

        // Refused: open connections end, new ones are refused.
        proxy.set(Fault::Refuse);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(SOON, held.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        let deadline = tokio::time::Instant::now() + SOON;
        while TcpStream::connect(proxy.addr()).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Up again on the same port.
        proxy.set(Fault::None);
        let deadline = tokio::time::Instant::now() + SOON;
        let mut again = loop {
            if let Ok(stream) = TcpStream::connect(proxy.addr()).await {
                break stream;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never listening again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(round_trip(&mut again, b"back").await.unwrap(), b"back");
    }

    #[test]
    fn proxied_urls_point_at_the_proxy() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let proxy = FaultProxy::in_front_of("postgres://postgres@127.0.0.1:5432/x").await;
            assert_eq!(proxy.upstream(), "127.0.0.1:5432".parse().unwrap());
            assert_eq!(
                proxy.proxied_url("postgres://postgres@127.0.0.1:5432/db?sslmode=disable"),
                format!("postgres://postgres@{}/db?sslmode=disable", proxy.addr())
            );
        });
    }
}
