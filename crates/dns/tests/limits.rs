//! What a hostile client can make the real server spend or send, over real
//! UDP and TCP sockets on loopback. Several source addresses come from
//! binding to 127.0.0.x, which Linux routes to `lo` whole.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use nook_dns::{Limits, RateLimit, Zone, ZoneConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

const DOMAIN: &str = "nook.example.test";
const TYPE_A: u16 = 1;

fn zone() -> Zone {
    Zone::new(ZoneConfig::new(
        DOMAIN,
        Some(Ipv4Addr::new(203, 0, 113, 7)),
        None,
    ))
    .unwrap()
}

/// Serves on UDP and TCP on one free loopback port; `None` means the
/// defaults, through [`nook_dns::serve`] itself.
async fn start(limits: Option<Limits>) -> SocketAddr {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let Ok(tcp) = TcpListener::bind(addr).await else {
            continue;
        };
        match limits {
            None => tokio::spawn(nook_dns::serve(zone(), udp, tcp)),
            Some(l) => tokio::spawn(nook_dns::serve_with(zone(), udp, tcp, l)),
        };
        return addr;
    }
    panic!("no free port for both UDP and TCP");
}

/// An A query for `vm1.DOMAIN`, without recursion desired.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in format!("vm1.{DOMAIN}").split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(TYPE_A.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    q
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Full answers: an A record, TC clear.
    answered: usize,
    /// Empty truncated replies, telling the client to use TCP.
    slipped: usize,
}

/// Sends `n` queries from `sock` at once, then counts the replies until
/// none has come for 300 ms.
async fn flood(sock: &UdpSocket, server: SocketAddr, n: u16) -> Tally {
    for id in 0..n {
        sock.send_to(&query(id), server).await.unwrap();
    }
    let mut tally = Tally::default();
    let mut buf = [0u8; 1500];
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await {
        let len = r.unwrap();
        assert!(len >= 12, "short reply");
        let tc = buf[2] & 0x02 != 0;
        let ancount = u16::from_be_bytes([buf[6], buf[7]]);
        match (tc, ancount) {
            (false, 1) => tally.answered += 1,
            (true, 0) => tally.slipped += 1,
            other => panic!("unexpected reply (tc, ancount) = {other:?}"),
        }
    }
    tally
}

async fn udp_from(last: u8) -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::new(127, 0, 0, last), 0))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_floods_from_one_source_are_rate_limited() {
    let server = start(None).await;
    let default = RateLimit::default();
    let flooder = udp_from(1).await;
    // 150 datagrams fit the server's receive buffer, so none is lost
    // before the limiter sees it.
    let t = flood(&flooder, server, 150).await;
    // The burst, plus what refills while the flood is sent and read.
    let most = default.burst as usize + (default.per_second * 1.0) as usize;
    assert!(
        (default.burst as usize..=most).contains(&t.answered),
        "{t:?}: expected {} to {most} answers",
        default.burst
    );
    // Every second reply over the limit slips out truncated, the rest are
    // dropped: the flooder (or the victim it forges) gets little back.
    let over = 150 - t.answered;
    assert!(t.slipped.abs_diff(over / 2) <= 2, "{t:?}");
    // Another source is not affected.
    let other = udp_from(2).await;
    assert_eq!(
        flood(&other, server, 1).await,
        Tally {
            answered: 1,
            slipped: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refills_and_forgets_the_stalest_source() {
    let limits = Limits {
        udp_rate: RateLimit {
            per_second: 1.0,
            burst: 3.0,
            slip: 0,
            max_sources: 2,
        },
        ..Limits::default()
    };
    let server = start(Some(limits)).await;
    let a = udp_from(1).await;
    let t = flood(&a, server, 10).await;
    assert_eq!((t.answered, t.slipped), (3, 0), "slip 0 drops the rest");
    // A second at one per second buys one more (`flood` waited 300 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(flood(&a, server, 3).await.answered, 1);
    assert_eq!(flood(&a, server, 1).await.answered, 0, "spent again");
    // Two more sources fill the table of two: `a`, seen longest ago, goes,
    // and comes back with a fresh burst. Memory stays at two buckets.
    for last in [2, 3] {
        assert_eq!(flood(&udp_from(last).await, server, 1).await.answered, 1);
    }
    assert_eq!(flood(&a, server, 10).await.answered, 3);
}

/// Connects from 127.0.0.`last`.
async fn tcp_from(last: u8, server: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((Ipv4Addr::new(127, 0, 0, last), 0).into())
        .unwrap();
    sock.connect(server).await.unwrap()
}

/// Sends one framed query; `Some(reply)` if one comes within `wait`, `None`
/// if the server closed the connection, and a panic if neither happened.
async fn tcp_query(s: &mut TcpStream, id: u16, wait: Duration) -> Option<Vec<u8>> {
    let q = query(id);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend(q);
    // A write to a connection the server already closed may fail or not;
    // the read below tells which it was.
    let _ = s.write_all(&framed).await;
    let read = async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut reply).await.ok()?;
        Some(reply)
    };
    match tokio::time::timeout(wait, read).await {
        Ok(r) => r,
        Err(_) => panic!("no reply and no close within {wait:?}"),
    }
}

/// Waits for the server to close `s`, and says how long that took.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {wait:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_query_over_the_size_limit_is_cut_off_at_once() {
    let server = start(None).await;
    let mut s = tcp_from(1, server).await;
    // A 65535-byte query announced: the server would wait (10 s) for it.
    s.write_all(&[0xff, 0xff, 0, 0]).await.unwrap();
    let took = closed_within(&mut s, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Exactly the limit is still read: the server waits for the rest.
    let mut s = tcp_from(1, server).await;
    let limit = Limits::default().max_tcp_message as u16;
    s.write_all(&limit.to_be_bytes()).await.unwrap();
    let mut buf = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    assert!(waited.is_err(), "closed a query of the maximum size");
    // Normal queries are answered.
    let mut s = tcp_from(1, server).await;
    assert!(tcp_query(&mut s, 7, Duration::from_secs(2)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_clients_are_closed() {
    let limits = Limits {
        tcp_idle: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = start(Some(limits)).await;
    // Silent from the start.
    let mut s = tcp_from(1, server).await;
    let took = closed_within(&mut s, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // Silent after a query: answered, then closed.
    let mut s = tcp_from(1, server).await;
    assert!(tcp_query(&mut s, 1, Duration::from_secs(2)).await.is_some());
    closed_within(&mut s, Duration::from_secs(3)).await;
    // Stalled in the middle of a query.
    let mut s = tcp_from(1, server).await;
    s.write_all(&[0, 40, 0x12]).await.unwrap();
    closed_within(&mut s, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_never_read_replies_are_closed() {
    let limits = Limits {
        tcp_idle: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = start(Some(limits)).await;
    let sock = TcpSocket::new_v4().unwrap();
    // A small receive window fills quickly; the server's send buffer next.
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(server).await.unwrap();
    let (_reader, mut writer) = s.into_split();
    let batch: Vec<u8> = (0..1000u16)
        .flat_map(|id| {
            let q = query(id);
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend(q);
            framed
        })
        .collect();
    // Pipelines queries and reads nothing, until the server hangs up. With
    // the server stuck writing, it stops reading, and these writes block
    // until it closes the connection.
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(e) = writer.write_all(&batch).await {
                return e;
            }
        }
    })
    .await;
    if outcome.is_err() {
        panic!("the server still holds a client that reads nothing");
    }
    // And it still serves others.
    let mut other = tcp_from(2, server).await;
    assert!(
        tcp_query(&mut other, 1, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_per_source_are_capped() {
    let server = start(None).await;
    let max = Limits::default().max_tcp_per_source;
    let mut held = Vec::new();
    for id in 0..max {
        let mut s = tcp_from(1, server).await;
        assert!(
            tcp_query(&mut s, id as u16, Duration::from_secs(2))
                .await
                .is_some()
        );
        held.push(s);
    }
    // One more from the same source is closed without an answer, at once
    // rather than after the idle timeout.
    let mut extra = tcp_from(1, server).await;
    assert_eq!(
        tcp_query(&mut extra, 99, Duration::from_secs(2)).await,
        None
    );
    // Another source is served.
    let mut other = tcp_from(2, server).await;
    assert!(
        tcp_query(&mut other, 1, Duration::from_secs(2))
            .await
            .is_some()
    );
    // A connection that ends makes room for the source again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = tcp_from(1, server).await;
    assert!(
        tcp_query(&mut again, 2, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_in_total_are_capped() {
    let limits = Limits {
        max_tcp_connections: 4,
        ..Limits::default()
    };
    let server = start(Some(limits)).await;
    let mut held = Vec::new();
    for last in 1..=4 {
        let mut s = tcp_from(last, server).await;
        assert!(tcp_query(&mut s, 1, Duration::from_secs(2)).await.is_some());
        held.push(s);
    }
    // The fifth waits in the backlog, unanswered but not refused...
    let mut fifth = tcp_from(5, server).await;
    let q = query(5);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend(q);
    fifth.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    let early = tokio::time::timeout(Duration::from_millis(500), fifth.read_exact(&mut len)).await;
    assert!(
        early.is_err(),
        "served a fifth connection over a limit of 4"
    );
    // ...and is served as soon as one of the four ends.
    drop(held.remove(0));
    let served = tokio::time::timeout(Duration::from_secs(2), fifth.read_exact(&mut len)).await;
    assert!(matches!(served, Ok(Ok(_))), "{served:?}");
}
