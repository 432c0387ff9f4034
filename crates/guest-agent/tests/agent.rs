//! Drives the real agent loop over a `UnixStream` pair with protocol frames, as the host would
//! over the virtio-serial port. Spawns run real processes on this machine.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.

use nook_guest_agent::Agent;
use nook_proto::{
    CHUNK, ErrorKind, FrameBuf, GuestFrame, GuestMetrics, GuestMsg, HostFrame, HostMsg,
    PROTOCOL_VERSION, PtySize, SpawnRequest, Stream, decode, encode,
};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Host {
    stream: UnixStream,
    frames: FrameBuf,
    pending: VecDeque<GuestFrame>,
    shutdowns: Arc<Mutex<Vec<bool>>>,
}

#[derive(Debug, Default)]
struct Run {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    code: Option<i32>,
    signal: Option<i32>,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn spawn_req(argv: &[&str]) -> SpawnRequest {
    SpawnRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        user: None,
        pty: None,
        stdin: false,
        ..Default::default()
    }
}

impl Host {
    fn start() -> Self {
        let (agent_end, host_end) = UnixStream::pair().unwrap();
        let shutdowns = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&shutdowns);
        let agent = Agent::with_power_hook(move |reboot| recorded.lock().unwrap().push(reboot));
        let reader = agent_end.try_clone().unwrap();
        std::thread::spawn(move || agent.serve(reader, agent_end));
        host_end
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            stream: host_end,
            frames: FrameBuf::new(),
            pending: VecDeque::new(),
            shutdowns,
        }
    }

    fn send(&mut self, id: u64, msg: HostMsg) {
        let bytes = encode(&HostFrame { id, msg }).unwrap();
        self.stream.write_all(&bytes).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame from the wire (not from `pending`).
    fn read_frame(&mut self) -> GuestFrame {
        loop {
            if let Some(body) = self.frames.next_body() {
                return decode(&body).expect("agent sent an undecodable frame");
            }
            let mut buf = [0u8; 65536];
            // Signals for the agent's children land on this test process too.
            let n = match self.stream.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other.expect("no frame from the agent in time"),
            };
            assert!(n > 0, "agent closed the connection");
            self.frames.push(&buf[..n]);
        }
    }

    /// The next frame for `id`; frames for other ids are kept for later.
    fn recv(&mut self, id: u64) -> GuestMsg {
        if let Some(i) = self.pending.iter().position(|f| f.id == id) {
            return self.pending.remove(i).unwrap().msg;
        }
        loop {
            let frame = self.read_frame();
            if frame.id == id {
                return frame.msg;
            }
            self.pending.push_back(frame);
        }
    }

    fn expect_spawned(&mut self, id: u64) -> u32 {
        match self.recv(id) {
            GuestMsg::Spawned { pid } => pid,
            other => panic!("expected Spawned, got {other:?}"),
        }
    }

    /// Collects output until `Exit`, checking nothing for `id` follows an `Exit`.
    fn finish(&mut self, id: u64, run: &mut Run) {
        loop {
            match self.recv(id) {
                GuestMsg::Output { stream, data } => {
                    assert!(data.len() <= CHUNK);
                    assert!(!data.is_empty(), "empty output chunk");
                    match stream {
                        Stream::Stdout => run.stdout.extend(data),
                        Stream::Stderr => run.stderr.extend(data),
                    }
                }
                GuestMsg::Exit { code, signal } => {
                    run.code = code;
                    run.signal = signal;
                    return;
                }
                other => panic!("unexpected frame for {id}: {other:?}"),
            }
        }
    }

    fn run(&mut self, id: u64, req: SpawnRequest) -> Run {
        self.send(id, HostMsg::Spawn(req));
        let mut run = Run {
            pid: self.expect_spawned(id),
            ..Run::default()
        };
        self.finish(id, &mut run);
        run
    }

    /// Reads output for `id` until it contains `needle`.
    fn wait_output(&mut self, id: u64, run: &mut Run, needle: &str) {
        while !run.out().contains(needle) {
            match self.recv(id) {
                GuestMsg::Output { data, .. } => run.stdout.extend(data),
                other => panic!("waiting for {needle:?} in {:?}, got {other:?}", run.out()),
            }
        }
    }

    fn expect_error(&mut self, id: u64) -> (ErrorKind, String) {
        match self.recv(id) {
            GuestMsg::Error { kind, message } => (kind, message),
            other => panic!("expected Error, got {other:?}"),
        }
    }

    fn hello(&mut self, id: u64) -> GuestMsg {
        self.send(
            id,
            HostMsg::Hello {
                version: PROTOCOL_VERSION,
            },
        );
        self.recv(id)
    }

    /// Asserts that nothing at all is left unread for `id` (after a round trip).
    fn assert_quiet(&mut self, id: u64) {
        let probe = 999_999;
        assert!(matches!(self.hello(probe), GuestMsg::Hello { .. }));
        assert!(
            !self.pending.iter().any(|f| f.id == id),
            "unexpected frames for {id}: {:?}",
            self.pending
        );
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nook-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn hello_reports_version_hostname_and_boot_id() {
    let mut host = Host::start();
    let GuestMsg::Hello {
        version,
        agent_version,
        hostname,
        boot_id,
    } = host.hello(1)
    else {
        panic!("expected Hello");
    };
    assert_eq!(version, PROTOCOL_VERSION);
    assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
    let expected_host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(hostname, expected_host.trim());
    let expected_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(boot_id, expected_boot.trim());
    assert_eq!(boot_id.len(), 36);
}

#[test]
fn spawn_separates_streams_and_reports_the_exit_code() {
    let mut host = Host::start();
    let run = host.run(
        7,
        spawn_req(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
    );
    assert_eq!(run.stdout, b"out\n");
    assert_eq!(run.stderr, b"err\n");
    assert_eq!((run.code, run.signal), (Some(3), None));
    assert!(run.pid > 1);
    host.assert_quiet(7);
}

#[test]
fn spawned_children_are_reaped() {
    let mut host = Host::start();
    let run = host.run(1, spawn_req(&["true"]));
    assert_eq!(run.code, Some(0));
    // A zombie keeps its /proc entry until reaped; the waiter reaps before sending Exit.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", run.pid)).unwrap_or_default();
    assert!(
        !stat.contains(") Z "),
        "child {} is a zombie: {stat}",
        run.pid
    );
}

#[test]
fn environment_cwd_and_closed_stdin() {
    let mut host = Host::start();
    let dir = temp_dir("cwd");
    let mut req = spawn_req(&[
        "sh",
        "-c",
        "echo \"$FOO|$PATH|$HOME|$USER|${TERM:-none}\"; pwd; cat; echo done",
    ]);
    req.env = vec![
        ("FOO".into(), "bar".into()),
        ("USER".into(), "override".into()),
    ];
    req.cwd = Some(dir.to_string_lossy().into_owned());
    let run = host.run(3, req);
    let lines: Vec<&str> = std::str::from_utf8(&run.stdout).unwrap().lines().collect();
    let home = if is_root() {
        "/root"
    } else {
        lines[0].split('|').nth(2).unwrap()
    };
    assert_eq!(
        lines[0],
        format!(
            "bar|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|{home}|override|none"
        )
    );
    assert_eq!(lines[1], dir.to_string_lossy());
    // stdin: false means /dev/null, so `cat` ends at once.
    assert_eq!(lines[2], "done");
    assert_eq!(run.code, Some(0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stdin_round_trip_through_cat() {
    let mut host = Host::start();
    let mut req = spawn_req(&["cat"]);
    req.stdin = true;
    host.send(5, HostMsg::Spawn(req));
    host.expect_spawned(5);
    let mut run = Run::default();
    host.send(
        5,
        HostMsg::Stdin {
            data: b"hello\n".to_vec(),
        },
    );
    host.wait_output(5, &mut run, "hello\n");
    let binary: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    host.send(
        5,
        HostMsg::Stdin {
            data: binary.clone(),
        },
    );
    host.send(5, HostMsg::CloseStdin);
    host.finish(5, &mut run);
    assert_eq!(run.code, Some(0));
    let mut expected = b"hello\n".to_vec();
    expected.extend(&binary);
    assert!(
        run.stdout == expected,
        "cat echoed {} bytes",
        run.stdout.len()
    );
    // After exit the id is free again.
    host.send(
        5,
        HostMsg::Stdin {
            data: b"x".to_vec(),
        },
    );
    assert_eq!(host.expect_error(5).0, ErrorKind::NoSuchProcess);
}

#[test]
fn stdin_to_a_process_without_stdin_is_refused() {
    let mut host = Host::start();
    host.send(4, HostMsg::Spawn(spawn_req(&["sleep", "2"])));
    host.expect_spawned(4);
    host.send(
        4,
        HostMsg::Stdin {
            data: b"x".to_vec(),
        },
    );
    assert_eq!(host.expect_error(4).0, ErrorKind::InvalidRequest);
    host.send(4, HostMsg::Resize { cols: 10, rows: 10 });
    assert_eq!(host.expect_error(4).0, ErrorKind::InvalidRequest);
    host.send(4, HostMsg::Signal { signal: 9 });
    let mut run = Run::default();
    host.finish(4, &mut run);
    assert_eq!(run.signal, Some(9));
}

#[test]
fn pty_spawn_has_a_controlling_terminal_and_follows_resize() {
    let mut host = Host::start();
    let mut req = spawn_req(&[
        "sh",
        "-c",
        "stty size; echo ready; read line; tty; stty size; echo \"T=$TERM\"; \
         echo err >&2; exec </dev/tty && echo ctty-ok",
    ]);
    req.pty = Some(PtySize { cols: 80, rows: 24 });
    host.send(9, HostMsg::Spawn(req));
    host.expect_spawned(9);
    let mut run = Run::default();
    host.wait_output(9, &mut run, "ready");
    assert!(run.out().contains("24 80"), "initial size: {:?}", run.out());
    host.send(
        9,
        HostMsg::Resize {
            cols: 132,
            rows: 43,
        },
    );
    host.send(
        9,
        HostMsg::Stdin {
            data: b"go\n".to_vec(),
        },
    );
    host.finish(9, &mut run);
    assert!(run.stderr.is_empty(), "a pty has one stream");
    let out = run.out();
    assert!(out.contains("/dev/pts/"), "tty: {out:?}");
    assert!(out.contains("43 132"), "size after resize: {out:?}");
    assert!(out.contains("T=xterm-256color"), "TERM: {out:?}");
    assert!(out.contains("err"), "stderr on the pty: {out:?}");
    assert!(out.contains("ctty-ok"), "controlling tty: {out:?}");
    assert!(out.contains("\r\n"), "pty output is cooked: {out:?}");
    assert_eq!(run.code, Some(0));
}

#[test]
fn pty_close_stdin_sends_end_of_file() {
    let mut host = Host::start();
    let mut req = spawn_req(&["cat"]);
    req.pty = Some(PtySize { cols: 80, rows: 24 });
    host.send(2, HostMsg::Spawn(req));
    host.expect_spawned(2);
    host.send(
        2,
        HostMsg::Stdin {
            data: b"abc\n".to_vec(),
        },
    );
    let mut run = Run::default();
    host.wait_output(2, &mut run, "abc\r\nabc\r\n");
    host.send(2, HostMsg::CloseStdin);
    host.finish(2, &mut run);
    assert_eq!(run.code, Some(0));
}

#[test]
fn signal_kills_the_process_group() {
    let mut host = Host::start();
    host.send(11, HostMsg::Spawn(spawn_req(&["sleep", "100"])));
    host.expect_spawned(11);
    host.send(11, HostMsg::Signal { signal: 15 });
    let started = Instant::now();
    let mut run = Run::default();
    host.finish(11, &mut run);
    assert_eq!((run.code, run.signal), (None, Some(15)));

    // The shell's child holds the output pipe: only a group signal ends both promptly.
    host.send(
        12,
        HostMsg::Spawn(spawn_req(&["sh", "-c", "sleep 100; echo never"])),
    );
    host.expect_spawned(12);
    std::thread::sleep(Duration::from_millis(200));
    host.send(12, HostMsg::Signal { signal: 9 });
    let mut run = Run::default();
    host.finish(12, &mut run);
    assert_eq!(run.signal, Some(9));
    assert!(run.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    // Signals after the exit find no process.
    host.send(12, HostMsg::Signal { signal: 9 });
    assert_eq!(host.expect_error(12).0, ErrorKind::NoSuchProcess);
}

#[test]
fn bad_argv_is_an_error_and_no_exit() {
    let mut host = Host::start();
    host.send(20, HostMsg::Spawn(spawn_req(&["/nonexistent/program"])));
    assert_eq!(host.expect_error(20).0, ErrorKind::NotFound);
    host.send(21, HostMsg::Spawn(spawn_req(&["no-such-command-anywhere"])));
    assert_eq!(host.expect_error(21).0, ErrorKind::NotFound);
    host.send(22, HostMsg::Spawn(spawn_req(&[])));
    assert_eq!(host.expect_error(22).0, ErrorKind::InvalidRequest);
    let mut req = spawn_req(&["true"]);
    req.cwd = Some("/nonexistent/dir".into());
    host.send(23, HostMsg::Spawn(req));
    assert_eq!(host.expect_error(23).0, ErrorKind::NotFound);
    let mut req = spawn_req(&["true"]);
    req.user = Some("no-such-user-here".into());
    host.send(24, HostMsg::Spawn(req));
    assert_eq!(host.expect_error(24).0, ErrorKind::NotFound);

    let dir = temp_dir("noexec");
    let script = dir.join("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    host.send(25, HostMsg::Spawn(spawn_req(&[script.to_str().unwrap()])));
    assert_eq!(host.expect_error(25).0, ErrorKind::PermissionDenied);
    for id in 20..=25 {
        host.assert_quiet(id);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn spawn_as_nobody_drops_privileges() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut host = Host::start();
    let mut req = spawn_req(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; echo \"$HOME $USER $LOGNAME\"; pwd",
    ]);
    req.user = Some("nobody".into());
    let run = host.run(30, req);
    assert_eq!(
        run.code,
        Some(0),
        "stderr: {:?}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out = run.out();
    let lines: Vec<&str> = out.lines().collect();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let acct = nook_guest_agent::users::parse_passwd(&passwd, "nobody").unwrap();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], acct.gid.to_string());
    assert!(
        !lines[2].split_whitespace().any(|g| g == "0"),
        "kept root's group: {out}"
    );
    assert_eq!(lines[3], format!("{} nobody nobody", acct.home));
    let cwd = if std::path::Path::new(&acct.home).is_dir() {
        acct.home.as_str()
    } else {
        "/"
    };
    assert_eq!(lines[4], cwd);
}

#[test]
fn pty_as_nobody_owns_its_terminal() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut host = Host::start();
    let mut req = spawn_req(&["sh", "-c", "id -u; stat -c %u:%a \"$(tty)\""]);
    req.user = Some("nobody".into());
    req.pty = Some(PtySize { cols: 80, rows: 24 });
    let run = host.run(31, req);
    assert_eq!(run.code, Some(0), "{:?}", run.out());
    assert_eq!(run.out(), "65534\r\n65534:620\r\n");
}

#[test]
fn files_write_append_and_read_in_chunks() {
    let mut host = Host::start();
    let dir = temp_dir("files");
    let path = dir.join("data.bin").to_string_lossy().into_owned();
    let payload: Vec<u8> = (0..(CHUNK * 2 + 12345))
        .map(|i| (i * 7 % 251) as u8)
        .collect();

    // Upload in chunks: a replace, then appends.
    for (i, chunk) in payload.chunks(CHUNK).enumerate() {
        host.send(
            40,
            HostMsg::WriteFile {
                path: path.clone(),
                data: chunk.to_vec(),
                append: i > 0,
                mode: Some(0o600),
            },
        );
        assert_eq!(host.recv(40), GuestMsg::Ok);
    }
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), payload.len() as u64);

    // Download with a len above CHUNK: each reply is capped.
    let mut got = Vec::new();
    loop {
        host.send(
            41,
            HostMsg::ReadFile {
                path: path.clone(),
                offset: got.len() as u64,
                len: u32::MAX,
            },
        );
        let GuestMsg::FileData { data } = host.recv(41) else {
            panic!("expected FileData");
        };
        assert!(data.len() <= CHUNK);
        if data.is_empty() {
            break;
        }
        got.extend(data);
    }
    assert!(got == payload, "read back {} bytes", got.len());

    // A small read in the middle, and past the end.
    host.send(
        42,
        HostMsg::ReadFile {
            path: path.clone(),
            offset: 10,
            len: 5,
        },
    );
    assert_eq!(
        host.recv(42),
        GuestMsg::FileData {
            data: payload[10..15].to_vec()
        }
    );
    host.send(
        42,
        HostMsg::ReadFile {
            path: path.clone(),
            offset: 1 << 40,
            len: 5,
        },
    );
    assert_eq!(host.recv(42), GuestMsg::FileData { data: vec![] });

    // Replace truncates and leaves the mode alone; append adds.
    host.send(
        43,
        HostMsg::WriteFile {
            path: path.clone(),
            data: b"new".to_vec(),
            append: false,
            mode: Some(0o755),
        },
    );
    assert_eq!(host.recv(43), GuestMsg::Ok);
    host.send(
        43,
        HostMsg::WriteFile {
            path: path.clone(),
            data: b"+more".to_vec(),
            append: true,
            mode: None,
        },
    );
    assert_eq!(host.recv(43), GuestMsg::Ok);
    assert_eq!(std::fs::read(&path).unwrap(), b"new+more");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Errors.
    let missing = dir.join("missing").to_string_lossy().into_owned();
    host.send(
        44,
        HostMsg::ReadFile {
            path: missing,
            offset: 0,
            len: 10,
        },
    );
    assert_eq!(host.expect_error(44).0, ErrorKind::NotFound);
    let orphan = dir.join("no-dir/file").to_string_lossy().into_owned();
    host.send(
        45,
        HostMsg::WriteFile {
            path: orphan,
            data: b"x".to_vec(),
            append: false,
            mode: None,
        },
    );
    assert_eq!(host.expect_error(45).0, ErrorKind::NotFound);
    host.send(
        46,
        HostMsg::ReadFile {
            path: dir.to_string_lossy().into_owned(),
            offset: 0,
            len: 10,
        },
    );
    assert_eq!(host.expect_error(46).0, ErrorKind::Io);

    // A FIFO with no writer must not stall the agent.
    let fifo = dir.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo = fifo.to_string_lossy().into_owned();
    host.send(
        47,
        HostMsg::ReadFile {
            path: fifo,
            offset: 0,
            len: 10,
        },
    );
    assert_eq!(host.recv(47), GuestMsg::FileData { data: vec![] });
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn large_output_arrives_whole_before_exit() {
    let mut host = Host::start();
    let run = host.run(50, spawn_req(&["head", "-c", "3000000", "/dev/zero"]));
    assert_eq!(run.stdout.len(), 3_000_000);
    assert!(run.stdout.iter().all(|&b| b == 0));
    assert_eq!(run.code, Some(0));
}

#[test]
fn concurrent_spawns_keep_their_ids_apart() {
    let mut host = Host::start();
    for id in 60..64 {
        let script = format!("for i in 1 2 3 4 5; do echo {id}-$i; done");
        host.send(id, HostMsg::Spawn(spawn_req(&["sh", "-c", &script])));
    }
    for id in 60..64 {
        let mut run = Run::default();
        host.expect_spawned(id);
        host.finish(id, &mut run);
        let expected: String = (1..=5).map(|i| format!("{id}-{i}\n")).collect();
        assert_eq!(run.out(), expected);
    }
}

#[test]
fn metrics_are_sane() {
    let mut host = Host::start();
    host.send(70, HostMsg::Metrics);
    let GuestMsg::Metrics(m) = host.recv(70) else {
        panic!("expected Metrics");
    };
    let GuestMetrics {
        uptime_secs,
        load_avg_1m,
        mem_total_kib,
        mem_available_kib,
        disk_total_kib,
        disk_available_kib,
        processes,
    } = m;
    assert!(uptime_secs > 0.0);
    assert!(load_avg_1m >= 0.0);
    assert!(mem_total_kib > 16 * 1024);
    assert!(mem_available_kib > 0 && mem_available_kib <= mem_total_kib);
    assert!(disk_total_kib > 0 && disk_available_kib <= disk_total_kib);
    assert!(processes >= 2, "processes: {processes}");
}

#[test]
fn garbage_is_answered_and_the_loop_goes_on() {
    let mut host = Host::start();
    // Noise, a frame whose body is not JSON, a JSON body with an unknown op.
    host.send_raw(b"\x00\x01noise");
    let junk = b"not json at all";
    let mut frame = b"NOOK".to_vec();
    frame.extend((junk.len() as u32).to_be_bytes());
    frame.extend(junk);
    host.send_raw(&frame);
    let unknown = br#"{"id":77,"op":"fly_to_the_moon"}"#;
    let mut frame = b"NOOK".to_vec();
    frame.extend((unknown.len() as u32).to_be_bytes());
    frame.extend(unknown);
    host.send_raw(&frame);

    assert_eq!(host.expect_error(0).0, ErrorKind::InvalidRequest);
    assert_eq!(host.expect_error(77).0, ErrorKind::InvalidRequest);
    assert!(matches!(host.hello(1), GuestMsg::Hello { .. }));
}

#[test]
fn follow_ups_for_unknown_ids_are_no_such_process() {
    let mut host = Host::start();
    host.send(
        80,
        HostMsg::Stdin {
            data: b"x".to_vec(),
        },
    );
    assert_eq!(host.expect_error(80).0, ErrorKind::NoSuchProcess);
    host.send(81, HostMsg::CloseStdin);
    assert_eq!(host.expect_error(81).0, ErrorKind::NoSuchProcess);
    host.send(82, HostMsg::Resize { cols: 1, rows: 1 });
    assert_eq!(host.expect_error(82).0, ErrorKind::NoSuchProcess);
    host.send(83, HostMsg::Signal { signal: 9 });
    assert_eq!(host.expect_error(83).0, ErrorKind::NoSuchProcess);
}

#[test]
fn duplicate_spawn_id_is_refused_while_running() {
    let mut host = Host::start();
    let mut req = spawn_req(&["cat"]);
    req.stdin = true;
    host.send(90, HostMsg::Spawn(req));
    host.expect_spawned(90);
    host.send(90, HostMsg::Spawn(spawn_req(&["true"])));
    assert_eq!(host.expect_error(90).0, ErrorKind::InvalidRequest);
    host.send(90, HostMsg::CloseStdin);
    let mut run = Run::default();
    host.finish(90, &mut run);
    assert_eq!(run.code, Some(0));
}

#[test]
fn shutdown_replies_ok_then_powers_off() {
    let mut host = Host::start();
    host.send(100, HostMsg::Shutdown { reboot: true });
    assert_eq!(host.recv(100), GuestMsg::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.shutdowns.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(*host.shutdowns.lock().unwrap(), vec![true]);
}

#[test]
fn processes_outlive_a_connection_and_talk_to_the_next() {
    // The port loop keeps one Agent across host reconnects; emulate that with two streams.
    let agent = Agent::with_power_hook(|_| {});
    let (a1, mut h1) = UnixStream::pair().unwrap();
    let reader = a1.try_clone().unwrap();
    let first = agent.clone();
    let t = std::thread::spawn(move || first.serve(reader, a1));
    let mut req = spawn_req(&["cat"]);
    req.stdin = true;
    h1.write_all(
        &encode(&HostFrame {
            id: 1,
            msg: HostMsg::Spawn(req),
        })
        .unwrap(),
    )
    .unwrap();
    h1.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut fb = FrameBuf::new();
    let mut buf = [0u8; 4096];
    let spawned: GuestFrame = loop {
        if let Some(body) = fb.next_body() {
            break decode(&body).unwrap();
        }
        let n = match h1.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        };
        fb.push(&buf[..n]);
    };
    assert!(matches!(spawned.msg, GuestMsg::Spawned { .. }));
    h1.shutdown(std::net::Shutdown::Both).unwrap();
    t.join().unwrap().unwrap();

    let (a2, h2) = UnixStream::pair().unwrap();
    let reader = a2.try_clone().unwrap();
    let second = agent.clone();
    std::thread::spawn(move || second.serve(reader, a2));
    h2.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut host = Host {
        stream: h2,
        frames: FrameBuf::new(),
        pending: VecDeque::new(),
        shutdowns: Arc::new(Mutex::new(Vec::new())),
    };
    host.send(
        1,
        HostMsg::Stdin {
            data: b"still here\n".to_vec(),
        },
    );
    host.send(1, HostMsg::CloseStdin);
    let mut run = Run::default();
    host.finish(1, &mut run);
    assert_eq!(run.out(), "still here\n");
}

#[test]
fn a_window_holds_output_until_the_host_acknowledges_it() {
    let mut host = Host::start();
    let req = SpawnRequest {
        window: Some(10_000),
        ..spawn_req(&["head", "-c", "200000", "/dev/zero"])
    };
    host.send(1, HostMsg::Spawn(req));
    host.expect_spawned(1);
    let mut received = 0usize;
    let read_until_quiet = |host: &mut Host, received: &mut usize| {
        host.stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        loop {
            let mut buf = [0u8; 65536];
            match host.stream.read(&mut buf) {
                Ok(n) if n > 0 => host.frames.push(&buf[..n]),
                _ => break,
            }
            while let Some(body) = host.frames.next_body() {
                let frame: GuestFrame = decode(&body).unwrap();
                match frame.msg {
                    GuestMsg::Output { data, .. } => *received += data.len(),
                    other => panic!("unexpected {other:?} before the window was acknowledged"),
                }
            }
        }
        host.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    };
    read_until_quiet(&mut host, &mut received);
    // At most the window plus the one read that crossed it.
    assert!(received > 0 && received < 10_000 + 65_536, "{received}");
    host.send(
        1,
        HostMsg::OutputAck {
            bytes: u64::MAX / 2,
        },
    );
    let mut run = Run::default();
    host.finish(1, &mut run);
    assert_eq!(received + run.stdout.len(), 200_000);
    assert_eq!(run.code, Some(0));
}

#[test]
fn stdin_is_acknowledged_as_the_process_takes_it() {
    let mut host = Host::start();
    let req = SpawnRequest {
        window: Some(1 << 20),
        stdin: true,
        ..spawn_req(&["wc", "-c"])
    };
    host.send(2, HostMsg::Spawn(req));
    host.expect_spawned(2);
    host.send(
        2,
        HostMsg::Stdin {
            data: vec![7; 5000],
        },
    );
    match host.recv(2) {
        GuestMsg::StdinAck { bytes } => assert_eq!(bytes, 5000),
        other => panic!("expected StdinAck, got {other:?}"),
    }
    host.send(2, HostMsg::CloseStdin);
    let mut run = Run::default();
    host.finish(2, &mut run);
    assert_eq!(run.out().trim(), "5000");
}

#[test]
fn hangup_sends_sighup_and_ends_a_login_shell_command() {
    let mut host = Host::start();
    let marker = std::env::temp_dir().join(format!("nook-agent-hup-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let script = format!(
        "trap 'echo hup > {}; exit 0' HUP; echo ready; while :; do sleep 0.1; done",
        marker.display()
    );
    let req = SpawnRequest {
        window: Some(1 << 20),
        stdin: true,
        shell: true,
        ..spawn_req(&[script.as_str()])
    };
    host.send(3, HostMsg::Spawn(req));
    host.expect_spawned(3);
    let mut run = Run::default();
    host.wait_output(3, &mut run, "ready\n");
    host.send(3, HostMsg::Hangup);
    host.finish(3, &mut run);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "hup\n");
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn a_new_host_frees_the_processes_it_did_not_start() {
    let mut host = Host::start();
    let flood = || SpawnRequest {
        window: Some(10_000),
        ..spawn_req(&["head", "-c", "200000", "/dev/zero"])
    };
    host.send(1, HostMsg::Spawn(flood()));
    host.expect_spawned(1);
    host.send(2, HostMsg::Spawn(flood()));
    host.expect_spawned(2);
    host.send(3, HostMsg::NewHost { started: vec![2] });
    assert_eq!(host.recv(3), GuestMsg::Ok);
    // Started after the message: the new host's too.
    host.send(4, HostMsg::Spawn(flood()));
    host.expect_spawned(4);
    // The old host's process runs free to its end, with no acknowledgement.
    let mut stray = Run::default();
    host.finish(1, &mut stray);
    assert_eq!((stray.code, stray.stdout.len()), (Some(0), 200_000));
    // The new host's own stop at their windows until acknowledged, then end whole.
    host.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 65536];
    while let Ok(n @ 1..) = host.stream.read(&mut buf) {
        host.frames.push(&buf[..n]);
    }
    host.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    while let Some(body) = host.frames.next_body() {
        host.pending.push_back(decode(&body).unwrap());
    }
    for id in [2, 4] {
        let sent: usize = host
            .pending
            .iter()
            .filter(|f| f.id == id)
            .map(|f| match &f.msg {
                GuestMsg::Output { data, .. } => data.len(),
                GuestMsg::Exit { .. } => panic!("process {id} ran past its window"),
                _ => 0,
            })
            .sum();
        // At most the window plus the one read that crossed it.
        assert!(sent < 10_000 + 65_536, "process {id} sent {sent}");
        host.send(
            id,
            HostMsg::OutputAck {
                bytes: u64::MAX / 2,
            },
        );
        let mut kept = Run::default();
        host.finish(id, &mut kept);
        assert_eq!((kept.code, kept.stdout.len()), (Some(0), 200_000));
    }
}
