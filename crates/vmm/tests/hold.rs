//! A VM about to change QEMU holds its agent connection: nothing more is written to it or read
//! from it, and the daemon can tell when QEMU (here, a real unix socket's peer) has read
//! everything that was. Frames that reached a replaced QEMU after its state was taken would
//! land in guest memory behind the new QEMU's back. Then the connection moves to the next
//! QEMU with its requests open, the guest's bytes whole and in order across the change.
//!
//! `unsafe` is allowed for one ioctl that reads how much the client left unread.
#![allow(unsafe_code)]

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nook_proto::{FrameBuf, GuestFrame, GuestMetrics, GuestMsg, HostFrame, HostMsg};
use nook_vmm::{AgentClient, NextConnection};

/// A peer (a QEMU's agent socket) at `name` in `dir`, and what `connect` made to it.
async fn with_peer<T, F>(
    dir: &tempfile::TempDir,
    name: &str,
    connect: impl FnOnce(std::path::PathBuf) -> F,
) -> (T, UnixStream)
where
    F: std::future::Future<Output = Result<T, nook_vmm::VmmError>>,
{
    let path = dir.path().join(name);
    let listener = UnixListener::bind(&path).expect("bind");
    let peer = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let connected = connect(path).await.expect("connect");
    let peer = peer.join().expect("accept thread").expect("accept");
    peer.set_nonblocking(true).expect("nonblocking");
    (connected, peer)
}

async fn agent_with_peer(dir: &tempfile::TempDir) -> (AgentClient, UnixStream) {
    with_peer(dir, "peer.sock", |p| async move {
        AgentClient::connect(&p).await
    })
    .await
}

/// A second peer, the next QEMU, and the connection to it.
async fn next_peer(dir: &tempfile::TempDir) -> (NextConnection, UnixStream) {
    with_peer(dir, "next.sock", |p| async move {
        NextConnection::connect(&p).await
    })
    .await
}

/// The host frames the peer has been sent, waiting up to 5 s for at least one.
async fn frames_sent_to(peer: &mut UnixStream) -> Vec<HostFrame> {
    let mut frames = FrameBuf::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        frames.push(&read_all(peer));
        let mut out = Vec::new();
        while let Some(body) = frames.next_body() {
            out.push(nook_proto::decode::<HostFrame>(&body).expect("host frame"));
        }
        if !out.is_empty() {
            return out;
        }
        assert!(std::time::Instant::now() < deadline, "no frame was written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the peer wrote that the client has not read (`SIOCOUTQ` on the peer's end: for a
/// unix socket, the memory those bytes take, overhead included).
fn unread_by_client(peer: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which lives across it.
    let rc = unsafe { libc::ioctl(peer.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    assert_eq!(rc, 0, "ioctl: {}", std::io::Error::last_os_error());
    usize::try_from(queued).expect("queued bytes")
}

/// Everything the peer can read now.
fn read_all(peer: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[tokio::test]
async fn drained_says_whether_the_peer_read_all_that_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, mut peer) = agent_with_peer(&dir).await;
    let asking = client.clone();
    let _call = tokio::spawn(async move { asking.metrics().await });
    // Until the writer has put the call's frame on the socket.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.drained(Duration::ZERO).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the call was never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let _hold = client.hold().await.expect("no spawn or write in progress");
    assert!(
        !client.drained(Duration::from_millis(100)).await,
        "a frame the peer has not read counted as drained"
    );
    assert!(
        !read_all(&mut peer).is_empty(),
        "the call's frame was not written"
    );
    assert!(client.drained(Duration::from_millis(500)).await);
}

#[tokio::test]
async fn a_held_connection_writes_nothing_until_the_hold_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, mut peer) = agent_with_peer(&dir).await;
    let hold = client.hold().await.expect("hold");

    let asking = client.clone();
    let _call = tokio::spawn(async move { asking.metrics().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        read_all(&mut peer).is_empty(),
        "a frame was written while the connection was held"
    );

    drop(hold);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while read_all(&mut peer).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the held frame was not written once the hold ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_held_connection_reads_nothing_and_moves_to_the_next_qemu_with_its_requests_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, mut old) = agent_with_peer(&dir).await;
    let asking = client.clone();
    let first = tokio::spawn(async move { asking.metrics().await });
    let request = frames_sent_to(&mut old).await;
    assert!(matches!(request[0].msg, HostMsg::Metrics), "{request:?}");
    let metrics = GuestMetrics {
        processes: 42,
        ..GuestMetrics::default()
    };
    let reply = nook_proto::encode(&GuestFrame {
        id: request[0].id,
        msg: GuestMsg::Metrics(metrics.clone()),
    })
    .expect("encode");

    let held = client.hold().await.expect("hold");
    // The old QEMU writes the first half of the reply; held, the client leaves it unread (a
    // read would let QEMU take more off the guest's queue after its state was taken).
    let (head, tail) = reply.split_at(reply.len() / 2);
    std::io::Write::write_all(&mut old, head).expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (The count includes the kernel's overhead; a read would have taken all of it.)
    assert!(unread_by_client(&old) > 0, "read while held");
    // A call made meanwhile waits for the move.
    let asking = client.clone();
    let second = tokio::spawn(async move { asking.metrics().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(read_all(&mut old).is_empty(), "written while held");

    // The next QEMU is connected to before it runs, and the old one ends: the client takes
    // the rest of what the old one wrote, then the next one's bytes, as one stream.
    let (next, mut new) = next_peer(&dir).await;
    drop(old);
    held.switch(next);
    std::io::Write::write_all(&mut new, tail).expect("write");
    let answered = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the reply cut across the change never arrived")
        .expect("task");
    assert_eq!(answered.expect("metrics"), metrics);

    // What waited goes to the next QEMU, and so does what follows.
    let waited = frames_sent_to(&mut new).await;
    assert!(matches!(waited[0].msg, HostMsg::Metrics), "{waited:?}");
    let reply = nook_proto::encode(&GuestFrame {
        id: waited[0].id,
        msg: GuestMsg::Metrics(GuestMetrics::default()),
    })
    .expect("encode");
    std::io::Write::write_all(&mut new, &reply).expect("write");
    let answered = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the call made while held was never answered")
        .expect("task");
    assert_eq!(answered.expect("metrics"), GuestMetrics::default());
    assert!(!client.is_closed());
    assert!(client.drained(Duration::from_millis(500)).await);
}

#[tokio::test]
async fn a_hold_that_ends_without_a_move_reads_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, mut old) = agent_with_peer(&dir).await;
    let asking = client.clone();
    let call = tokio::spawn(async move { asking.metrics().await });
    let request = frames_sent_to(&mut old).await;
    let held = client.hold().await.expect("hold");
    let reply = nook_proto::encode(&GuestFrame {
        id: request[0].id,
        msg: GuestMsg::Metrics(GuestMetrics::default()),
    })
    .expect("encode");
    std::io::Write::write_all(&mut old, &reply).expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "answered while held");
    drop(held);
    let answered = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the reply was not read once the hold ended")
        .expect("task");
    assert_eq!(answered.expect("metrics"), GuestMetrics::default());
}
