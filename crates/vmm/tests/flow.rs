//! Output flow control between the host client and the guest agent. The well-behaved guest
//! is the real agent (nook-guest-agent's loop, serving a real unix socket and spawning real
//! processes here); the hostile one is a socket peer that ignores the window.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use nook_proto::{FrameBuf, GuestFrame, GuestMsg, HostFrame, HostMsg, SpawnRequest, Stream};
use nook_vmm::AgentClient;
use nook_vmm::agent::DEFAULT_WINDOW;

fn serve_real_agent(listener: UnixListener) {
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let agent = nook_guest_agent::Agent::with_power_hook(|_| {});
        let reader = stream.try_clone().expect("clone");
        let _ = agent.serve(reader, stream);
    });
}

fn sh(script: &str) -> SpawnRequest {
    SpawnRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// A spawn that asked for no window gets one, acknowledged as its output is read: a caller
/// that does not read holds the process back instead of the host buffering all it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_nobody_reads_holds_the_process_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    serve_real_agent(UnixListener::bind(&path).expect("bind"));
    let client = AgentClient::connect(&path).await.expect("connect");
    client
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");

    let done = dir.path().join("done");
    let total: usize = 8 << 20;
    let mut process = client
        .spawn(sh(&format!(
            "head -c {total} /dev/zero; touch {}",
            done.display()
        )))
        .await
        .expect("spawn");
    // Eight windows of output: it cannot all be sent before it is read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !done.exists(),
        "the process printed everything with nobody reading"
    );

    let mut got = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(60), process.next())
            .await
            .expect("output stalled")
        {
            Some(GuestMsg::Output { data, .. }) => got += data.len(),
            Some(GuestMsg::Exit { code, .. }) => break code,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("stream ended before Exit"),
        }
    };
    assert_eq!((got, code), (total, Some(0)));
    assert!(done.exists());
}

/// Reads host frames until a spawn arrives; returns its id.
fn await_spawn(stream: &mut std::os::unix::net::UnixStream) -> u64 {
    let mut frames = FrameBuf::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "host hung up");
        frames.push(&buf[..n]);
        while let Some(body) = frames.next_body() {
            let frame: HostFrame = nook_proto::decode(&body).expect("decode");
            if let HostMsg::Spawn(req) = frame.msg {
                assert_eq!(req.window, Some(DEFAULT_WINDOW));
                return frame.id;
            }
        }
    }
}

/// A guest that sends output past the window, at full speed, loses the request: the host
/// never holds more than the window (and a frame) for it, however slowly it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_ignores_the_window_loses_the_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let flood: usize = 64 << 20;
    let guest = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let id = await_spawn(&mut stream);
        let mut reader = stream.try_clone().expect("clone");
        // Take and ignore whatever the host sends (acknowledgements).
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let send = |stream: &mut std::os::unix::net::UnixStream, msg| {
            let bytes = nook_proto::encode(&GuestFrame { id, msg }).expect("encode");
            stream.write_all(&bytes)
        };
        send(&mut stream, GuestMsg::Spawned { pid: 4242 }).expect("spawned");
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..flood / chunk.len() {
            if send(
                &mut stream,
                GuestMsg::Output {
                    stream: Stream::Stdout,
                    data: chunk.clone(),
                },
            )
            .is_err()
            {
                return;
            }
        }
        let _ = send(
            &mut stream,
            GuestMsg::Exit {
                code: Some(0),
                signal: None,
            },
        );
    });
    let client = AgentClient::connect(Path::new(&path))
        .await
        .expect("connect");
    let mut process = client.spawn(sh("yes")).await.expect("spawn");
    assert_eq!(process.pid, 4242);

    // Read nothing while the guest floods.
    let started = Instant::now();
    tokio::task::spawn_blocking(move || guest.join())
        .await
        .expect("join")
        .expect("guest thread");
    assert!(started.elapsed() < Duration::from_secs(120));

    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), process.next())
            .await
            .expect("stalled")
        {
            Some(GuestMsg::Output { data, .. }) => got += data.len(),
            other => break other,
        }
    };
    assert!(
        end.is_none(),
        "the overrun request was not dropped: {end:?}"
    );
    assert!(
        got <= 2 * DEFAULT_WINDOW as usize + nook_proto::MAX_FRAME,
        "held {got} bytes for a request"
    );
}
