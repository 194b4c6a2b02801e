//! A TCP proxy that injects faults between a client and a backend.
//!
//! Every backend under test is reached through one of these, so a test can
//! make the network misbehave (down, hang, reset, latency, byte limit) and
//! the backend's container can move to another host port (stop and start,
//! or a `docker restart` by hand) while clients keep one address.
//!
//! A fault applies at once to new *and* open connections: `Down` closes
//! them, `Reset` resets them, `Hang` stops every byte until cleared,
//! `Latency` delays each chunk, `ByteLimit` resets a connection once that
//! many bytes have passed through it.
//!
//! A proxy given a [`Resolver`] follows its backend: whenever the upstream
//! refuses a connection or resets one, the proxy asks the resolver where the
//! backend is now (for a container: its current host port, from Docker) and
//! retries there. Asking is bounded: at most once per
//! [`MIN_RESOLVE_INTERVAL`], whatever the number of failing connections,
//! and never for traffic that flows.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long the proxy waits for the backend to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer per direction per connection.
const CHUNK: usize = 16 * 1024;
/// The least time between two questions to the resolver. A backend that is
/// down refuses every connection; this keeps that from becoming a Docker
/// call per connection.
pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one question to the resolver may take before the proxy gives
/// up on it and keeps the address it has.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything.
    #[default]
    None,
    /// Close new connections at once and close open ones (FIN): a backend
    /// that is not there.
    Down,
    /// Accept connections but pass no byte in either direction: a backend
    /// that is frozen.
    Hang,
    /// Reset new and open connections (RST).
    Reset,
    /// Delay every chunk in each direction.
    Latency(Duration),
    /// Reset a connection once this many bytes (both directions) passed.
    ByteLimit(u64),
}

/// Why a [`Resolver`] could not say where the backend is.
#[derive(Debug, thiserror::Error)]
#[error("cannot tell where the backend is now")]
pub struct ResolveError(#[source] Box<dyn std::error::Error + Send + Sync>);

impl ResolveError {
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(cause.into())
    }
}

/// What a [`Resolver`] returns.
pub type ResolveFuture = Pin<Box<dyn Future<Output = Result<SocketAddr, ResolveError>> + Send>>;

/// Tells a proxy where its backend is right now.
#[derive(Clone)]
pub struct Resolver(Arc<dyn Fn() -> ResolveFuture + Send + Sync>);

impl Resolver {
    pub fn new<F, Fut>(resolve: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<SocketAddr, ResolveError>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(resolve())))
    }

    pub async fn resolve(&self) -> Result<SocketAddr, ResolveError> {
        (self.0)().await
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
    resolutions: AtomicU64,
}

/// What the accept loop, every connection and the handle share.
#[derive(Debug)]
struct Shared {
    fault: watch::Sender<Fault>,
    upstream: watch::Sender<SocketAddr>,
    resolver: Mutex<Option<Resolver>>,
    /// When the resolver was last asked. A tokio mutex: held while asking,
    /// so connections failing together wait for one answer instead of
    /// asking again.
    last_resolve: tokio::sync::Mutex<Option<Instant>>,
    counters: Counters,
}

impl Shared {
    fn resolver(&self) -> Option<Resolver> {
        self.resolver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the resolver where the backend is, unless it was asked less
    /// than [`MIN_RESOLVE_INTERVAL`] ago, and returns the upstream address
    /// to use now (moved or not).
    async fn refresh(&self) -> SocketAddr {
        let Some(resolver) = self.resolver() else {
            return *self.upstream.borrow();
        };
        let mut last = self.last_resolve.lock().await;
        if last.is_some_and(|at| at.elapsed() < MIN_RESOLVE_INTERVAL) {
            return *self.upstream.borrow();
        }
        *last = Some(Instant::now());
        self.counters.resolutions.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.resolve()).await {
            Ok(Ok(now)) => {
                let moved = self.upstream.send_if_modified(|upstream| {
                    let moved = *upstream != now;
                    *upstream = now;
                    moved
                });
                if moved {
                    tracing::info!(upstream = %now, "proxy follows its backend to a new address");
                }
            }
            // A container that is stopped has no host port: nothing to
            // follow yet; the next failure asks again.
            Ok(Err(error)) => tracing::debug!(error = %error, "backend not resolved"),
            Err(_) => tracing::debug!("resolving the backend timed out"),
        }
        *self.upstream.borrow()
    }
}

/// A running proxy. Dropping it stops accepting and ends every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on an ephemeral loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            fault: watch::Sender::new(Fault::None),
            upstream: watch::Sender::new(upstream),
            resolver: Mutex::new(None),
            last_resolve: tokio::sync::Mutex::new(None),
            counters: Counters::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// Starts a proxy in front of `upstream` that follows the backend
    /// wherever `resolver` says it went.
    pub async fn following(upstream: SocketAddr, resolver: Resolver) -> std::io::Result<Self> {
        let proxy = Self::start(upstream).await?;
        proxy.set_resolver(Some(resolver));
        Ok(proxy)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points new connections at another backend address (open ones stay).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.shared.upstream.send_replace(upstream);
    }

    pub fn upstream(&self) -> SocketAddr {
        *self.shared.upstream.borrow()
    }

    /// Makes the proxy follow its backend with `resolver` (or stop
    /// following, with `None`).
    pub fn set_resolver(&self, resolver: Option<Resolver>) {
        *self
            .shared
            .resolver
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = resolver;
    }

    /// Whether the proxy follows its backend.
    pub fn is_following(&self) -> bool {
        self.shared.resolver().is_some()
    }

    pub fn set_fault(&self, fault: Fault) {
        tracing::debug!(proxy = %self.addr, ?fault, "fault set");
        self.shared.fault.send_replace(fault);
    }

    /// Back to forwarding everything.
    pub fn clear(&self) {
        self.set_fault(Fault::None);
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.shared.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.counters.open.load(Ordering::Relaxed)
    }

    /// How many times the proxy asked its resolver where the backend is.
    pub fn resolutions(&self) -> u64 {
        self.shared.counters.resolutions.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Open connections watch this channel; a kill fault ends them.
        self.shared.fault.send_replace(Fault::Down);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            shared.counters.open.fetch_add(1, Ordering::Relaxed);
            serve(client, &shared).await;
            shared.counters.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// How a connection ended, when the proxy ended it.
enum End {
    Close,
    Reset(Peer),
}

/// Who caused a reset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Client,
    Upstream,
    /// A fault or a byte limit of the proxy's own.
    Proxy,
}

/// Which way a pump copies.
#[derive(Clone, Copy)]
enum Direction {
    ToUpstream,
    ToClient,
}

impl Direction {
    /// Who is at fault when reading fails, and when writing fails.
    fn peers(self) -> (Peer, Peer) {
        match self {
            Self::ToUpstream => (Peer::Client, Peer::Upstream),
            Self::ToClient => (Peer::Upstream, Peer::Client),
        }
    }
}

/// Connects to the backend; when it refuses (or does not answer), asks
/// where it is now and tries once more there if it moved.
async fn connect_upstream(shared: &Shared) -> Option<TcpStream> {
    let target = *shared.upstream.borrow();
    let connect = |addr| tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
    if let Ok(Ok(upstream)) = connect(target).await {
        return Some(upstream);
    }
    let now = shared.refresh().await;
    if now == target {
        return None;
    }
    match connect(now).await {
        Ok(Ok(upstream)) => Some(upstream),
        _ => None,
    }
}

async fn serve(client: TcpStream, shared: &Shared) {
    let mut faults = shared.fault.subscribe();
    let _ = client.set_nodelay(true);
    match *faults.borrow_and_update() {
        Fault::Down => return,
        Fault::Reset => return reset(&client),
        _ => {}
    }
    let Some(upstream) = connect_upstream(shared).await else {
        // The backend is not there: the client sees a reset, as it would
        // when connecting to a closed port.
        return reset(&client);
    };
    let _ = upstream.set_nodelay(true);
    let mut client = client;
    let mut upstream = upstream;
    let passed = AtomicU64::new(0);
    let end = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let to_upstream = pump(
            &mut client_read,
            &mut upstream_write,
            faults.clone(),
            &passed,
            Direction::ToUpstream,
        );
        let to_client = pump(
            &mut upstream_read,
            &mut client_write,
            faults.clone(),
            &passed,
            Direction::ToClient,
        );
        tokio::pin!(to_upstream, to_client);
        // Each direction ends on its own (half-close). A fault that kills
        // connections, or a reset from either side, ends the whole
        // connection at once; `biased` checks the fault first, so a Reset is
        // never mistaken for a clean close when both are ready together.
        let (mut upstream_done, mut client_done) = (false, false);
        loop {
            tokio::select! {
                biased;
                end = killed(&mut faults) => break Some(end),
                end = &mut to_upstream, if !upstream_done => {
                    if end.is_some() { break end; }
                    upstream_done = true;
                }
                end = &mut to_client, if !client_done => {
                    if end.is_some() { break end; }
                    client_done = true;
                }
            }
            if upstream_done && client_done {
                break None;
            }
        }
    };
    if let Some(End::Reset(by)) = end {
        reset(&client);
        reset(&upstream);
        // A backend that resets connections may have gone away (or moved):
        // find out now rather than at the next refused connection.
        if by == Peer::Upstream {
            shared.refresh().await;
        }
    }
}

/// Waits until the fault becomes one that ends open connections.
async fn killed(faults: &mut watch::Receiver<Fault>) -> End {
    loop {
        if faults.changed().await.is_err() {
            return End::Close;
        }
        match *faults.borrow_and_update() {
            Fault::Down => return End::Close,
            Fault::Reset => return End::Reset(Peer::Proxy),
            _ => {}
        }
    }
}

/// Copies one direction, applying the current fault to every chunk.
/// Returns `None` when this direction ended cleanly (EOF), or how the whole
/// connection must end (a kill fault, a byte limit, a reset from a peer).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut faults: watch::Receiver<Fault>,
    passed: &AtomicU64,
    direction: Direction,
) -> Option<End>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (reader, writer) = direction.peers();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if let Some(end) = wait_while_hung(&mut faults).await {
            return Some(end);
        }
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                // A frozen link passes no FIN either: hold the close too.
                if let Some(end) = wait_while_hung(&mut faults).await {
                    return Some(end);
                }
                let _ = to.shutdown().await;
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(End::Reset(reader));
            }
            Err(_) => return Some(End::Close),
            Ok(n) => n,
        };
        if let Some(end) = wait_while_hung(&mut faults).await {
            return Some(end);
        }
        let fault = *faults.borrow();
        let mut chunk = &buf[..n];
        match fault {
            Fault::Latency(delay) => tokio::time::sleep(delay).await,
            Fault::ByteLimit(limit) => {
                let before = passed.fetch_add(n as u64, Ordering::Relaxed);
                if before + n as u64 > limit {
                    let allowed = usize::try_from(limit.saturating_sub(before)).unwrap_or(0);
                    chunk = &chunk[..allowed.min(n)];
                    let _ = to.write_all(chunk).await;
                    let _ = to.flush().await;
                    return Some(End::Reset(Peer::Proxy));
                }
            }
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            return Some(End::Reset(writer));
        }
    }
}

/// Waits while the fault is `Hang`; then `None` to go on, or how the
/// connection must end when the fault kills connections.
async fn wait_while_hung(faults: &mut watch::Receiver<Fault>) -> Option<End> {
    loop {
        match *faults.borrow_and_update() {
            Fault::Down => return Some(End::Close),
            Fault::Reset => return Some(End::Reset(Peer::Proxy)),
            Fault::Hang => {}
            _ => return None,
        }
        if faults.changed().await.is_err() {
            return Some(End::Close);
        }
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server standing in for a backend.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn forwards_and_counts() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        assert_eq!(round_trip(proxy.addr()).await.unwrap(), b"ping");
        assert_eq!(proxy.accepted(), 1);
    }

    async fn open_connection(proxy: &FaultProxy) -> TcpStream {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s
    }

    async fn read_outcome(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
                Ok(Ok(0)) => return Ok(got),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    #[tokio::test]
    async fn byte_limit_passes_exactly_the_limit_then_resets() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        proxy.set_fault(Fault::ByteLimit(6));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        // 4 bytes out and 2 of the echo back fit in 6; then a reset.
        let mut first = [0u8; 2];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"pi");
        let rest = read_outcome(&mut s).await;
        assert_eq!(
            rest.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    #[tokio::test]
    async fn reset_sends_rst_on_open_connections() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = open_connection(&proxy).await;
        proxy.set_fault(Fault::Reset);
        assert_eq!(
            read_outcome(&mut s).await.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    #[tokio::test]
    async fn down_closes_open_connections_cleanly() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = open_connection(&proxy).await;
        proxy.set_fault(Fault::Down);
        assert_eq!(read_outcome(&mut s).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn reset_wins_over_a_hang() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = open_connection(&proxy).await;
        proxy.set_fault(Fault::Hang);
        s.write_all(b"held").await.unwrap();
        proxy.set_fault(Fault::Reset);
        assert_eq!(
            read_outcome(&mut s).await.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    #[tokio::test]
    async fn hang_holds_data_and_close_until_cleared() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = open_connection(&proxy).await;
        proxy.set_fault(Fault::Hang);
        s.write_all(b"late").await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(early.is_err(), "something passed a hung proxy: {early:?}");
        proxy.clear();
        assert_eq!(read_outcome(&mut s).await.unwrap(), b"late");
    }

    #[tokio::test]
    async fn upstream_can_move() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let second = echo().await;
        proxy.set_upstream(second);
        assert_eq!(proxy.upstream(), second);
        assert_eq!(round_trip(proxy.addr()).await.unwrap(), b"ping");
    }

    /// An echo server that can be shut down: its port then refuses.
    async fn stoppable_echo() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    /// A resolver that answers what `answer` holds, counting the questions.
    fn resolver_of(answer: &Arc<Mutex<SocketAddr>>) -> Resolver {
        let answer = Arc::clone(answer);
        Resolver::new(move || {
            let now = *answer.lock().unwrap();
            async move { Ok(now) }
        })
    }

    #[tokio::test]
    async fn follows_a_backend_that_moved_when_the_old_address_refuses() {
        let (first, first_server) = stoppable_echo().await;
        let answer = Arc::new(Mutex::new(first));
        let proxy = FaultProxy::following(first, resolver_of(&answer))
            .await
            .unwrap();
        assert_eq!(round_trip(proxy.addr()).await.unwrap(), b"ping");
        assert_eq!(proxy.resolutions(), 0, "asked while the backend answered");

        // The backend goes away and comes back elsewhere, as a container
        // does after `docker restart`; nobody tells the proxy.
        first_server.abort();
        let _ = first_server.await;
        let second = echo().await;
        *answer.lock().unwrap() = second;

        // The very first connection after the move gets through.
        assert_eq!(round_trip(proxy.addr()).await.unwrap(), b"ping");
        assert_eq!(proxy.upstream(), second);
        assert_eq!(proxy.resolutions(), 1);
    }

    #[tokio::test]
    async fn a_proxy_without_a_resolver_stays_where_it_was_put() {
        let (first, first_server) = stoppable_echo().await;
        let proxy = FaultProxy::start(first).await.unwrap();
        first_server.abort();
        let _ = first_server.await;
        assert!(round_trip(proxy.addr()).await.is_err());
        assert_eq!(proxy.upstream(), first);
        assert!(!proxy.is_following());
    }

    #[tokio::test]
    async fn a_refusing_backend_is_resolved_at_most_every_interval() {
        // A port nothing listens on, and a resolver that keeps saying so.
        let dead = {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
            listener.local_addr().unwrap()
        };
        let answer = Arc::new(Mutex::new(dead));
        let proxy = FaultProxy::following(dead, resolver_of(&answer))
            .await
            .unwrap();
        let started = Instant::now();
        let attempts = 40;
        for _ in 0..attempts {
            assert!(round_trip(proxy.addr()).await.is_err());
        }
        let elapsed = started.elapsed();
        let bound = 1 + (elapsed.as_millis() / MIN_RESOLVE_INTERVAL.as_millis()) as u64;
        let asked = proxy.resolutions();
        assert!(asked >= 1, "never asked where the backend went");
        assert!(
            asked <= bound && asked < attempts,
            "asked {asked} times for {attempts} refused connections in {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_open_connections() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        drop(proxy);
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    }
}
