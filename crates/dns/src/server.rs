use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::ratelimit::{RateLimit, RateLimiter, Verdict};
use crate::{DnsError, Transport, Zones};

/// Bigger than any sane query; a larger datagram is cut and then fails to
/// parse, which is what it deserves.
const UDP_RECV_BUF: usize = 4096;

/// What the server spends on clients at most. [`Limits::default`] suits a
/// public authoritative server; tests shrink the numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// How long a TCP client may take to send its next query, to finish
    /// sending one, or to take in a reply, before it is disconnected.
    pub tcp_idle: Duration,
    /// TCP connections served at once; a client over the limit waits in
    /// the listen backlog until one ends.
    pub max_tcp_connections: usize,
    /// TCP connections one source address may hold at once; more are
    /// closed as soon as they are accepted, so no one client can take all
    /// of [`Limits::max_tcp_connections`].
    pub max_tcp_per_source: usize,
    /// The largest query taken over TCP, in bytes. A query is one question
    /// and perhaps an OPT record; the connection of a client announcing more
    /// is closed before anything is read or allocated.
    pub max_tcp_message: usize,
    /// Response rate limiting over UDP. TCP has none: its sources cannot be
    /// forged, and it is where rate-limited clients are sent.
    pub udp_rate: RateLimit,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // RFC 7766 suggests closing idle TCP connections after a few seconds.
            tcp_idle: Duration::from_secs(10),
            max_tcp_connections: 128,
            max_tcp_per_source: 16,
            max_tcp_message: UDP_RECV_BUF,
            udp_rate: RateLimit::default(),
        }
    }
}

/// Serves `zone` on both sockets until one of them fails, within
/// [`Limits::default`].
pub async fn serve(
    zones: impl Into<Zones>,
    udp: UdpSocket,
    tcp: TcpListener,
) -> Result<(), DnsError> {
    serve_with(zones, udp, tcp, Limits::default()).await
}

/// [`serve`] within other limits.
pub async fn serve_with(
    zones: impl Into<Zones>,
    udp: UdpSocket,
    tcp: TcpListener,
    limits: Limits,
) -> Result<(), DnsError> {
    let zone = zones.into();
    tokio::try_join!(
        serve_udp_with(zone.clone(), udp, limits.udp_rate),
        serve_tcp_with(zone, tcp, limits)
    )
    .map(|_| ())
}

/// Answers queries on a bound UDP socket. Only returns on a socket error
/// that is not about one client.
pub async fn serve_udp(zones: impl Into<Zones>, socket: UdpSocket) -> Result<(), DnsError> {
    serve_udp_with(zones.into(), socket, RateLimit::default()).await
}

async fn serve_udp_with(zone: Zones, socket: UdpSocket, rate: RateLimit) -> Result<(), DnsError> {
    let mut buf = vec![0u8; UDP_RECV_BUF];
    // One task owns the limiter: no lock on the per-packet path.
    let mut limiter = RateLimiter::new(rate);
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP port-unreachable from an earlier reply surfaces here on
            // Linux; it is about one client, not about our socket.
            Err(e) if is_per_peer(&e) => continue,
            Err(source) => {
                return Err(DnsError::Socket {
                    transport: "UDP",
                    source,
                });
            }
        };
        let msg = &buf[..len];
        // Parsing first means messages that get no reply cost no tokens.
        let Some(reply) = zone.respond(msg, Transport::Udp) else {
            continue;
        };
        let reply = match limiter.check(peer.ip(), Instant::now()) {
            Verdict::Answer => reply,
            Verdict::Slip => match zone.respond_truncated(msg) {
                Some(r) => r,
                None => continue,
            },
            Verdict::Drop => continue,
        };
        if let Err(e) = socket.send_to(&reply, peer).await {
            tracing::debug!(%peer, error = %e, "DNS reply over UDP not sent");
        }
    }
}

/// Answers queries on a bound TCP listener, several per connection, each
/// framed by a two-byte length (RFC 1035 4.2.2), within
/// [`Limits::default`]. Runs until cancelled.
pub async fn serve_tcp(zones: impl Into<Zones>, listener: TcpListener) -> Result<(), DnsError> {
    serve_tcp_with(zones.into(), listener, Limits::default()).await
}

async fn serve_tcp_with(
    zone: Zones,
    listener: TcpListener,
    limits: Limits,
) -> Result<(), DnsError> {
    let limits = Arc::new(limits);
    let total = Arc::new(Semaphore::new(limits.max_tcp_connections.max(1)));
    let per_source = PerSource::default();
    loop {
        let Ok(permit) = total.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            // Accept errors (an aborted handshake, running out of file
            // descriptors) pass; a short pause keeps EMFILE from spinning.
            Err(e) => {
                tracing::warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = per_source.take(peer.ip(), limits.max_tcp_per_source) else {
            tracing::debug!(%peer, "DNS TCP connection refused: too many from this source");
            // Dropping the stream closes it; the permit goes back at once.
            continue;
        };
        let zone = zone.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(&zone, stream, &limits).await {
                tracing::debug!(%peer, error = %e, "DNS TCP connection ended");
            }
            drop(slot);
            drop(permit);
        });
    }
}

async fn serve_connection(
    zone: &Zones,
    mut stream: TcpStream,
    limits: &Limits,
) -> std::io::Result<()> {
    let idle = limits.tcp_idle;
    let mut msg = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > limits.max_tcp_message {
            tracing::debug!(len, "DNS TCP query too large: closing");
            return Ok(());
        }
        msg.resize(len, 0);
        // A client that stalls mid-message gets the same timeout as an idle one.
        match tokio::time::timeout(idle, stream.read_exact(&mut msg)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let Some(reply) = zone.respond(&msg, Transport::Tcp) else {
            // Nothing sensible to say to a client sending responses or
            // garbage shorter than a header: hang up.
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        // `respond` keeps TCP replies within u16::MAX bytes.
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that sends queries but never reads the replies would
        // otherwise hold this task and its connection slot forever, once
        // the socket buffers fill.
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
    }
}

/// Live TCP connections per source address. It only holds sources with a
/// connection open, so it is as bounded as the connections are.
#[derive(Clone, Default)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerSource {
    /// A slot for one more connection from `ip`, released on drop; `None`
    /// when `ip` already holds `max`.
    fn take(&self, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: self.clone(),
            ip,
        })
    }
}

struct SourceSlot {
    map: PerSource,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        // Counting is all the lock guards, and that cannot be left half
        // done, so a poisoned lock is still good.
        let mut map = self.map.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn is_per_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | Interrupted | WouldBlock
    )
}
