//! A TCP proxy that injects faults between a client and a backend.
//!
//! Every backend under test is reached through one of these, so a test can
//! make the network misbehave (down, hang, reset, latency, byte limit) and
//! the backend's container can move to another host port (stop and start)
//! while clients keep one address.
//!
//! A fault applies at once to new *and* open connections: `Down` closes
//! them, `Reset` resets them, `Hang` stops every byte until cleared,
//! `Latency` delays each chunk, `ByteLimit` resets a connection once that
//! many bytes have passed through it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long the proxy waits for the backend to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer per direction per connection.
const CHUNK: usize = 16 * 1024;

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

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
}

/// A running proxy. Dropping it stops accepting and ends every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    upstream: Arc<watch::Sender<SocketAddr>>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on an ephemeral loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let fault = Arc::new(watch::Sender::new(Fault::None));
        let upstream = Arc::new(watch::Sender::new(upstream));
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&fault),
            Arc::clone(&upstream),
            Arc::clone(&counters),
        ));
        Ok(Self {
            addr,
            fault,
            upstream,
            counters,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points new connections at another backend address (open ones stay).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.upstream.send_replace(upstream);
    }

    pub fn upstream(&self) -> SocketAddr {
        *self.upstream.borrow()
    }

    pub fn set_fault(&self, fault: Fault) {
        tracing::debug!(proxy = %self.addr, ?fault, "fault set");
        self.fault.send_replace(fault);
    }

    /// Back to forwarding everything.
    pub fn clear(&self) {
        self.set_fault(Fault::None);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.counters.open.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Open connections watch this channel; a kill fault ends them.
        self.fault.send_replace(Fault::Down);
    }
}

async fn accept_loop(
    listener: TcpListener,
    fault: Arc<watch::Sender<Fault>>,
    upstream: Arc<watch::Sender<SocketAddr>>,
    counters: Arc<Counters>,
) {
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
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let faults = fault.subscribe();
        let target = *upstream.borrow();
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            counters.open.fetch_add(1, Ordering::Relaxed);
            serve(client, target, faults).await;
            counters.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// How a connection ended, when the proxy ended it.
enum End {
    Close,
    Reset,
}

async fn serve(client: TcpStream, target: SocketAddr, mut faults: watch::Receiver<Fault>) {
    let _ = client.set_nodelay(true);
    match *faults.borrow_and_update() {
        Fault::Down => return,
        Fault::Reset => return reset(&client),
        _ => {}
    }
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        // The backend is not there: the client sees a reset, as it would
        // when connecting to a closed port.
        _ => return reset(&client),
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
        );
        let to_client = pump(
            &mut upstream_read,
            &mut client_write,
            faults.clone(),
            &passed,
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
    if let Some(End::Reset) = end {
        reset(&client);
        reset(&upstream);
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
            Fault::Reset => return End::Reset,
            _ => {}
        }
    }
}

/// Copies one direction, applying the current fault to every chunk.
/// Returns `None` when this direction ended cleanly (EOF), or how the whole
/// connection must end (a kill fault, a byte limit, a reset from the peer).
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    mut faults: watch::Receiver<Fault>,
    passed: &AtomicU64,
) -> Option<End>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
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
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(End::Reset),
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
                    return Some(End::Reset);
                }
            }
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            return Some(End::Reset);
        }
    }
}

/// Waits while the fault is `Hang`; then `None` to go on, or how the
/// connection must end when the fault kills connections.
async fn wait_while_hung(faults: &mut watch::Receiver<Fault>) -> Option<End> {
    loop {
        match *faults.borrow_and_update() {
            Fault::Down => return Some(End::Close),
            Fault::Reset => return Some(End::Reset),
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
