use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::{DnsError, Transport, Zone};

/// Bigger than any sane query; a larger datagram is cut and then fails to
/// parse, which is what it deserves.
const UDP_RECV_BUF: usize = 4096;
/// RFC 7766 suggests closing idle TCP connections after a few seconds.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Bounds memory and tasks spent on TCP clients; a client over the limit
/// waits in the listen backlog.
const MAX_TCP_CONNECTIONS: usize = 128;

/// Serves `zone` on both sockets until one of them fails.
pub async fn serve(zone: Zone, udp: UdpSocket, tcp: TcpListener) -> Result<(), DnsError> {
    tokio::try_join!(serve_udp(zone.clone(), udp), serve_tcp(zone, tcp)).map(|_| ())
}

/// Answers queries on a bound UDP socket. Only returns on a socket error
/// that is not about one client.
pub async fn serve_udp(zone: Zone, socket: UdpSocket) -> Result<(), DnsError> {
    let mut buf = vec![0u8; UDP_RECV_BUF];
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
        let Some(reply) = zone.respond(&buf[..len], Transport::Udp) else {
            continue;
        };
        if let Err(e) = socket.send_to(&reply, peer).await {
            tracing::debug!(%peer, error = %e, "DNS reply over UDP not sent");
        }
    }
}

/// Answers queries on a bound TCP listener, several per connection, each
/// framed by a two-byte length (RFC 1035 4.2.2). Runs until cancelled.
pub async fn serve_tcp(zone: Zone, listener: TcpListener) -> Result<(), DnsError> {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
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
        let zone = zone.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(&zone, stream).await {
                tracing::debug!(%peer, error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

async fn serve_connection(zone: &Zone, mut stream: TcpStream) -> std::io::Result<()> {
    let mut msg = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
        msg.resize(usize::from(u16::from_be_bytes(len)), 0);
        // A client that stalls mid-message gets the same timeout as an idle one.
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await {
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
        stream.write_all(&framed).await?;
    }
}

fn is_per_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | ConnectionAborted | Interrupted | WouldBlock
    )
}
