//! Every call to the guest agent and to QMP ends by its deadline, whatever the other end
//! does. The other end here is a real unix socket whose peer misbehaves on purpose: it never
//! reads (a guest whose agent never started stops QEMU from draining the socket), reads but
//! never answers, or hangs up with commands in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nook_vmm::{AgentClient, Qmp, VmmError};

/// Generous bound on how late a deadline may fire on a loaded two-core test host.
const SLACK: Duration = Duration::from_secs(5);

fn socket(dir: &tempfile::TempDir) -> (PathBuf, UnixListener) {
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    (path, listener)
}

/// Connects an agent client and returns the peer's end, which nobody reads.
async fn agent_with_silent_peer(path: &Path, listener: UnixListener) -> (AgentClient, UnixStream) {
    let peer = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let client = AgentClient::connect(path).await.expect("connect");
    let peer = peer.join().expect("accept thread").expect("accept");
    (client, peer)
}

/// Starts a write larger than any socket buffer, which a peer that never reads never lets
/// finish. Before deadlines, it held the connection's writer forever, and every later frame
/// (the readiness probe included) waited behind it.
async fn clog(client: &AgentClient) -> tokio::task::JoinHandle<Result<(), VmmError>> {
    let clogger = client.clone();
    let task =
        tokio::spawn(async move { clogger.write_file("/big", &vec![7u8; 4 << 20], None).await });
    // Let the writer get into the frame it cannot finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    task
}

#[tokio::test]
async fn wait_ready_times_out_when_the_guest_never_drains_its_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    let (client, _peer) = agent_with_silent_peer(&path, listener).await;
    let _clog = clog(&client).await;

    let started = Instant::now();
    let ready = tokio::time::timeout(
        Duration::from_secs(1) + SLACK,
        client.wait_ready(Duration::from_secs(1)),
    )
    .await;
    assert!(
        matches!(ready, Ok(Err(VmmError::Timeout(t))) if t == Duration::from_secs(1)),
        "wait_ready did not time out by itself: {ready:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_call_waits_no_longer_than_its_deadline_for_room_to_send() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    let (client, _peer) = agent_with_silent_peer(&path, listener).await;
    let client = client.with_call_timeout(Duration::from_millis(500));
    let _clog = clog(&client).await;
    // Fill the outbox behind the stuck frame, then one more call must give up at its deadline.
    let mut queued = Vec::new();
    for _ in 0..16 {
        let c = client.clone();
        queued.push(tokio::spawn(async move { c.metrics().await }));
    }
    let started = Instant::now();
    let metrics = tokio::time::timeout(SLACK, client.metrics()).await;
    assert!(
        matches!(metrics, Ok(Err(VmmError::AgentTimeout(_)))),
        "{metrics:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(500) + SLACK);
    for q in queued {
        let r = tokio::time::timeout(SLACK, q)
            .await
            .expect("a queued call hung");
        assert!(matches!(r, Ok(Err(VmmError::AgentTimeout(_)))), "{r:?}");
    }
}

#[tokio::test]
async fn a_call_the_guest_never_answers_fails_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    // This peer takes every byte and says nothing.
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    let client = AgentClient::connect(&path)
        .await
        .expect("connect")
        .with_call_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let metrics = tokio::time::timeout(SLACK, client.metrics()).await;
    assert!(
        matches!(metrics, Ok(Err(VmmError::AgentTimeout(_)))),
        "{metrics:?}"
    );
    let spawned = tokio::time::timeout(
        SLACK,
        client.spawn(nook_proto::SpawnRequest {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            user: None,
            pty: None,
            stdin: false,
            shell: false,
            window: None,
        }),
    )
    .await;
    assert!(
        matches!(spawned, Ok(Err(VmmError::AgentTimeout(_)))),
        "spawn: {:?}",
        spawned.map(|r| r.map(|p| p.pid))
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
}

/// QEMU serves one agent connection at a time: a client given up on while its write is stuck
/// must still close its socket, or the next connection is never served.
#[tokio::test]
async fn dropping_the_last_handle_closes_a_stuck_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    let (client, mut peer) = agent_with_silent_peer(&path, listener).await;
    let client = client.with_call_timeout(Duration::from_millis(300));
    let clog = clog(&client).await;
    drop(client);
    let clogged = tokio::time::timeout(SLACK, clog).await;
    assert!(
        matches!(clogged, Ok(Ok(Err(VmmError::AgentTimeout(_))))),
        "{clogged:?}"
    );
    // The peer now reads what was written and must then see the end of the stream.
    let eof = tokio::task::spawn_blocking(move || {
        peer.set_read_timeout(Some(SLACK)).expect("timeout");
        let mut sink = Vec::new();
        peer.read_to_end(&mut sink).map(|_| sink.len())
    })
    .await
    .expect("join");
    let read = eof.expect("the connection stayed open after the last handle was dropped");
    assert!(read < 4 << 20, "the stuck frame was finished after all");
}

/// A QMP peer: greets, answers `qmp_capabilities`, then does `then` with every other command.
#[derive(Clone, Copy)]
enum QmpPeer {
    Answers,
    Ignores,
    /// Stops sending (as QEMU does when it exits) once `n` commands arrived.
    HangsUpAfter(usize),
}

fn qmp_peer(listener: UnixListener, then: QmpPeer) {
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut out = stream.try_clone().expect("clone");
        let _ = out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
        let mut seen = 0;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let msg: serde_json::Value = serde_json::from_str(&line).expect("json");
            let id = msg["id"].clone();
            if msg["execute"] == "qmp_capabilities" {
                let _ = out.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes());
                continue;
            }
            seen += 1;
            match then {
                QmpPeer::Answers => {
                    let _ =
                        out.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes());
                }
                QmpPeer::Ignores => {}
                QmpPeer::HangsUpAfter(n) if seen >= n => {
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return;
                }
                QmpPeer::HangsUpAfter(_) => {}
            }
        }
    });
}

#[tokio::test]
async fn a_qmp_command_qemu_never_answers_fails_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    qmp_peer(listener, QmpPeer::Ignores);
    let qmp = Qmp::connect_within(&path, Duration::from_millis(300))
        .await
        .expect("connect");
    let started = Instant::now();
    let r = tokio::time::timeout(SLACK, qmp.execute("query-status", None)).await;
    assert!(
        matches!(&r, Ok(Err(VmmError::QmpTimeout(cmd, _))) if cmd == "query-status"),
        "{r:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_qmp_socket_that_never_greets_fails_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let r = tokio::time::timeout(
        SLACK,
        Qmp::connect_within(&path, Duration::from_millis(300)),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(VmmError::QmpTimeout(..)))),
        "{:?}",
        r.map(|r| r.map(|_| ()))
    );
    drop(held);
}

/// QEMU exiting with commands in flight, and commands issued while it goes: every one of them
/// ends with `QmpClosed`, none waits for its deadline. A command registered just after the
/// reader failed the waiting ones used to wait for an answer that could never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_racing_qemus_exit_all_end_at_once() {
    for round in 0..20 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, listener) = socket(&dir);
        qmp_peer(listener, QmpPeer::HangsUpAfter(10));
        let qmp = Qmp::connect_within(&path, Duration::from_secs(30))
            .await
            .expect("connect");
        let mut calls = Vec::new();
        for _ in 0..40 {
            let q = qmp.clone();
            calls.push(tokio::spawn(async move {
                let mut last = Ok(serde_json::Value::Null);
                for _ in 0..5 {
                    last = q.execute("query-status", None).await;
                    if last.is_err() {
                        break;
                    }
                }
                last
            }));
        }
        for call in calls {
            let r = tokio::time::timeout(SLACK, call).await;
            assert!(
                matches!(r, Ok(Ok(Err(VmmError::QmpClosed)))),
                "round {round}: {r:?}"
            );
        }
        qmp.closed().await;
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(VmmError::QmpClosed)
        ));
    }
}

#[tokio::test]
async fn qmp_commands_get_their_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, listener) = socket(&dir);
    qmp_peer(listener, QmpPeer::Answers);
    let qmp = Qmp::connect(&path).await.expect("connect");
    for _ in 0..50 {
        assert_eq!(
            qmp.execute("query-status", None).await.expect("answer"),
            serde_json::json!({})
        );
    }
}
