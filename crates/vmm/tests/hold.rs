//! A VM about to change QEMU holds its agent connection: nothing more is written to it, and
//! the daemon can tell when QEMU (here, a real unix socket's peer) has read everything that
//! was. Frames that reached a replaced QEMU after its state was taken would land in guest
//! memory behind the new QEMU's back.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nook_vmm::AgentClient;

async fn agent_with_peer(dir: &tempfile::TempDir) -> (AgentClient, UnixStream) {
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let peer = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let client = AgentClient::connect(&path).await.expect("connect");
    let peer = peer.join().expect("accept thread").expect("accept");
    peer.set_nonblocking(true).expect("nonblocking");
    (client, peer)
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

    let _hold = client.hold_spawns().expect("no spawn or write in progress");
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
    let hold = client.hold_spawns().expect("hold");

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
