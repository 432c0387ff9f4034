//! End-to-end tests: the real OpenSSH client (ssh, scp, sftp, ssh-agent)
//! against nook's SSH server, with a real OpenSSH sshd as the VM.
//! They need root (the VM sshd logs in as root) and OpenSSH installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use support::*;

#[tokio::test]
async fn lobby_exec_output_and_exit_codes() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args(["echo", "hello", "world"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "hello world\n");

    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args(["fail", "3"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(3));
    assert_eq!(out.err(), "failing with 3\n");
    assert_eq!(out.out(), "");

    // Quoting: ssh joins its arguments with spaces, the server splits them again.
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.arg(r#"argv 'a b' "c\"d" e\ f '' --json"#);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0));
    assert_eq!(
        out.out(),
        "[\"argv\",\"a b\",\"c\\\"d\",\"e f\",\"\",\"--json\"]\n"
    );

    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.arg("whoami");
    let out = run_cmd(cmd).await;
    assert_eq!(out.out(), "owner@example.com (lobby)\n");

    // stdin reaches the command.
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.arg("cat");
    let out = run_with_input(cmd, &[b"one ", b"two\n"], Duration::from_millis(50)).await;
    assert_eq!(out.status, Some(0));
    assert_eq!(out.out(), "one two\n");

    // Large output arrives whole (SSH flow control on the lobby side).
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args(["big", "5000000"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0));
    assert_eq!(out.stdout.len(), 5_000_000);

    // With -t the command sees a terminal.
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args(["-tt", "tty"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0));
    assert!(out.out().starts_with("tty=true width="), "{out:?}");
    assert!(out.out().ends_with("\r\n"), "{out:?}");
}

#[tokio::test]
async fn unknown_key_can_sign_up() {
    let fx = Fixture::new().await;
    let fp = fingerprint(&fx.stranger_key);
    let mut cmd = fx.ssh(&fx.stranger_key, "lobby");
    cmd.arg("whoami");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), format!("anonymous {fp}\n"));

    let mut cmd = fx.ssh(&fx.stranger_key, "lobby");
    cmd.args(["signup", "new@example.com"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0), "{out:?}");

    let mut cmd = fx.ssh(&fx.stranger_key, "lobby");
    cmd.arg("whoami");
    let out = run_cmd(cmd).await;
    assert_eq!(out.out(), "new@example.com (lobby)\n");

    // The account is looked up per command, so it changes mid-session too.
    let other = fx.path("other");
    keygen(&other);
    let cmd = fx.ssh(&other, "lobby");
    let out = run_with_input(
        cmd,
        &[b"whoami\n", b"signup mid@example.com\n", b"whoami\n"],
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(out.status, Some(0), "{out:?}");
    let text = out.out();
    assert!(text.starts_with("anonymous SHA256:"), "{text}");
    assert!(text.ends_with("mid@example.com (lobby)\n"), "{text}");
}

#[tokio::test]
async fn password_and_none_auth_are_refused() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args([
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive,none",
        "whoami",
    ]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(255), "{out:?}");
    assert!(
        out.err().contains("Permission denied (publickey)"),
        "{out:?}"
    );
}

#[tokio::test]
async fn unavailable_and_refused_routes() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "stopped");
    cmd.arg("uptime");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(1), "{out:?}");
    assert_eq!(
        out.err(),
        "nook: VM stopped is stopped; start it with `ssh HOST start stopped`\n"
    );
    assert_eq!(out.out(), "");

    // A key that may not enter a VM is told exactly what a missing VM says.
    let mut cmd = fx.ssh(&fx.stranger_key, "vmtest");
    cmd.arg("true");
    let refused = run_cmd(cmd).await;
    let mut cmd = fx.ssh(&fx.owner_key, "ghost");
    cmd.arg("true");
    let missing = run_cmd(cmd).await;
    assert_eq!(refused.status, Some(1), "{refused:?}");
    assert_eq!(refused.status, missing.status);
    assert_eq!(refused.err(), "nook: no VM named vmtest (see `ls`)\n");
    assert_eq!(refused.err().replace("vmtest", "ghost"), missing.err());

    // Shells too, with or without a pty.
    let cmd = fx.ssh(&fx.stranger_key, "vmtest");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(1), "{out:?}");
    let mut cmd = fx.ssh(&fx.stranger_key, "vmtest");
    cmd.arg("-tt");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(out.err().contains("no VM named vmtest"), "{out:?}");

    // Something on the VM's address that shows a host key nook did not make is not the VM.
    let mut cmd = fx.ssh(&fx.owner_key, "impostor");
    cmd.args(["-s", "sftp"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.err().contains("not accepting SSH connections"),
        "{out:?}"
    );

    // A VM whose sshd doesn't answer.
    let mut cmd = fx.ssh(&fx.owner_key, "vmdown");
    cmd.arg("true");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.err().contains("not accepting SSH connections"),
        "{out:?}"
    );
}

/// A fork's sshd restarts to take the clone's host keys while `cp` has already returned: a
/// session opened then waits for it instead of failing.
#[tokio::test]
async fn a_restarting_sshd_is_waited_for() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "vmlate");
    cmd.args(["echo", "late"]);
    let session = tokio::spawn(run_cmd(cmd));
    // The relay meets a closed port first (it logs in within a few hundred milliseconds) ...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!session.is_finished(), "{:?}", session.await);
    // ... and then the sshd listens: a forwarder to the test VM's sshd.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", fx.backend.late_port))
        .await
        .unwrap();
    let sshd = fx.backend.vm.sshd.as_ref().unwrap().addr;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(sshd).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let out = session.await.unwrap();
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "late\n");
}

#[tokio::test]
async fn lobby_repl_with_pty() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.arg("-tt");
    let out = run_with_input(cmd, &[b"whoami\n", b"exit\n"], Duration::from_millis(300)).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    let text = out.out();
    assert!(
        text.starts_with("Welcome to nook on localhost."),
        "{text:?}"
    );
    assert!(text.contains("nook> "), "{text:?}");
    assert!(
        text.contains("\r\nowner@example.com (lobby)\r\n"),
        "{text:?}"
    );

    // TAB completion, history (up arrow), a bad quote, ^C on a running command.
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.arg("-tt");
    let out = run_with_input(
        cmd,
        &[
            b"who\t\n",
            b"\x1b[A\n",
            b"st\t",
            b"\x15echo 'oops\n",
            b"sleep 30\n",
            b"\x03",
            b"echo after\n",
            b"\x04",
        ],
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(out.status, Some(0), "{out:?}");
    let text = out.out();
    assert_eq!(
        text.matches("owner@example.com (lobby)\r\n").count(),
        2,
        "{text:?}"
    );
    assert!(text.contains("\r\nstart  stop\r\n"), "{text:?}");
    assert!(out.err().contains("nook: unterminated ' quote"), "{out:?}");
    assert!(text.contains("^C\r\n"), "{text:?}");
    assert!(!text.contains("slept"), "{text:?}");
    assert!(text.contains("\r\nafter\r\n"), "{text:?}");
}

#[tokio::test]
async fn lobby_shell_without_pty_reads_lines() {
    let fx = Fixture::new().await;
    let cmd = fx.ssh(&fx.owner_key, "lobby");
    let out = run_with_input(cmd, &[b"echo a\n\nfail 4\r\n"], Duration::ZERO).await;
    assert_eq!(out.status, Some(4), "{out:?}");
    assert_eq!(out.out(), "a\n");
    assert_eq!(out.err(), "failing with 4\n");

    // The last line needs no newline; `exit` stops early.
    let cmd = fx.ssh(&fx.owner_key, "lobby");
    let out = run_with_input(cmd, &[b"echo x\nexit\necho never"], Duration::ZERO).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "x\n");
    let cmd = fx.ssh(&fx.owner_key, "lobby");
    let out = run_with_input(cmd, &[b"echo last"], Duration::ZERO).await;
    assert_eq!(out.out(), "last\n");
}

#[tokio::test]
async fn lobby_refuses_sftp() {
    let fx = Fixture::new().await;
    let mut cmd = tokio::process::Command::new("sftp");
    cmd.args(fx.opts(&fx.owner_key))
        .args([
            "-P",
            &fx.port.to_string(),
            "-b",
            "/dev/null",
            "lobby@127.0.0.1",
        ])
        .kill_on_drop(true);
    let out = run_cmd(cmd).await;
    assert_ne!(out.status, Some(0), "{out:?}");
    assert!(
        out.err().contains("the lobby has no \"sftp\" subsystem"),
        "{out:?}"
    );
}

#[tokio::test]
async fn bad_input_does_not_hurt_the_server() {
    let fx = Fixture::new().await;
    let run_lobby = |args: Vec<std::ffi::OsString>| {
        let mut cmd = fx.ssh(&fx.owner_key, "lobby");
        cmd.args(args);
        run_cmd(cmd)
    };
    let os = |s: &str| std::ffi::OsString::from(s);

    let out = run_lobby(vec![os("echo 'unterminated")]).await;
    assert_eq!(out.status, Some(2), "{out:?}");
    assert_eq!(out.err(), "nook: unterminated ' quote\n");

    let out = run_lobby(vec![os("echo \"unterminated")]).await;
    assert_eq!(out.status, Some(2), "{out:?}");

    let out = run_lobby(vec![os("echo"), os(&"x".repeat(100_000))]).await;
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(out.err().contains("command too long"), "{out:?}");

    // 1 MiB of command line: OpenSSH or russh may give up on the packet,
    // but nothing must crash and the answer is never a success.
    let args: Vec<_> = (0..16).map(|_| os(&"y".repeat(65_536))).collect();
    let out = run_lobby(args).await;
    assert_ne!(out.status, Some(0), "{:?}", out.status);

    let out = run_lobby(vec![os("echo héllo 世界 🎉")]).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "héllo 世界 🎉\n");

    let out = run_lobby(vec![
        std::ffi::OsStr::from_bytes(b"echo \xff\xfe").to_os_string(),
    ])
    .await;
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(out.err().contains("not valid UTF-8"), "{out:?}");

    let out = run_lobby(vec![os("frobnicate --now")]).await;
    assert_eq!(out.status, Some(127), "{out:?}");
    assert_eq!(out.err(), "nook: unknown command: frobnicate\n");

    // Garbage instead of SSH, and a client that hangs up mid-handshake.
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"SSH-2.0-x\r\n\x00\x00\x00\x05\x01\x02\x03",
    ] {
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", fx.port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = sock.write_all(junk).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut buf)).await;
    }
    drop(tokio::net::TcpStream::connect(("127.0.0.1", fx.port)).await);

    let out = run_lobby(vec![os("echo still here")]).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "still here\n");
}

#[tokio::test]
async fn vm_exec_and_exit_status() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.arg("echo out; echo err >&2; exit 7");
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(7), "{out:?}");
    assert_eq!(out.out(), "out\n");
    assert_eq!(out.err(), "err\n");

    // env is relayed (the VM's sshd accepts NOOK_*), and stdin EOF too.
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args(["-o", "SetEnv=NOOK_TEST=hello", "echo $NOOK_TEST; wc -c"]);
    let out = run_with_input(cmd, &[b"12345"], Duration::ZERO).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.out(), "hello\n5\n");
}

#[tokio::test]
async fn vm_shell_with_pty() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.arg("-tt");
    let out = run_with_input(
        cmd,
        &[b"echo $((6*7))\n", b"exit\n"],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.out().contains("42\r\n"), "{}", out.out());

    // A pty exec sees a terminal.
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args(["-tt", "tty; exit 3"]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(3), "{out:?}");
    assert!(out.out().starts_with("/dev/pts/"), "{out:?}");
}

#[tokio::test]
async fn vm_bulk_stream_both_ways() {
    // 32 MiB through `cat` in the VM: data flows both ways at once, which
    // exercises flow control in both directions.
    let fx = Fixture::new().await;
    let data = random_bytes(32 << 20);
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.arg("cat");
    let out = run_with_input(cmd, &[&data], Duration::ZERO).await;
    assert_eq!(out.status, Some(0), "{:?} {}", out.status, out.err());
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(sha256(&out.stdout), sha256(&data));
}

#[tokio::test]
async fn vm_scp_round_trip() {
    let fx = Fixture::new().await;
    let data = random_bytes(10 << 20);
    let local = fx.path("upload.bin");
    std::fs::write(&local, &data).unwrap();
    let remote_dir = fx.path("remote");
    std::fs::create_dir(&remote_dir).unwrap();
    // Default scp (SFTP protocol) and legacy scp (-O, "scp -t" over exec).
    for (flags, name) in [(vec![], "sftp-mode"), (vec!["-O"], "legacy")] {
        let remote = remote_dir.join(name);
        let back = fx.path(&format!("back-{name}"));
        let mut up = tokio::process::Command::new("scp");
        up.args(fx.opts(&fx.owner_key))
            .args(["-P", &fx.port.to_string()])
            .args(&flags)
            .arg(&local)
            .arg(format!("vmtest@127.0.0.1:{}", remote.display()))
            .kill_on_drop(true);
        let out = run_cmd(up).await;
        assert_eq!(out.status, Some(0), "{name} upload: {out:?}");
        let mut down = tokio::process::Command::new("scp");
        down.args(fx.opts(&fx.owner_key))
            .args(["-P", &fx.port.to_string()])
            .args(&flags)
            .arg(format!("vmtest@127.0.0.1:{}", remote.display()))
            .arg(&back)
            .kill_on_drop(true);
        let out = run_cmd(down).await;
        assert_eq!(out.status, Some(0), "{name} download: {out:?}");
        assert_eq!(
            sha256(&std::fs::read(&remote).unwrap()),
            sha256(&data),
            "{name}"
        );
        assert_eq!(
            sha256(&std::fs::read(&back).unwrap()),
            sha256(&data),
            "{name}"
        );
    }
}

#[tokio::test]
async fn vm_sftp_put_get() {
    let fx = Fixture::new().await;
    let data = random_bytes(3 << 20);
    let local = fx.path("put.bin");
    std::fs::write(&local, &data).unwrap();
    let remote = fx.path("remote.bin");
    let back = fx.path("got.bin");
    let batch = fx.path("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nls -l {}\n",
            local.display(),
            remote.display(),
            remote.display(),
            back.display(),
            remote.display()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new("sftp");
    cmd.args(fx.opts(&fx.owner_key))
        .args(["-P", &fx.port.to_string(), "-b"])
        .arg(&batch)
        .arg("vmtest@127.0.0.1")
        .kill_on_drop(true);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.out().contains("3145728"), "{out:?}");
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&data));
}

#[tokio::test]
async fn vm_local_forward() {
    let fx = Fixture::new().await;
    let (echo_port, _echo) = echo_server().await;
    let local_port = free_port();
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args([
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        &format!("{local_port}:127.0.0.1:{echo_port}"),
    ])
    .stdin(std::process::Stdio::null());
    let _ssh = Proc(cmd.spawn().unwrap());
    wait_for_port(local_port).await;
    check_echo(local_port, b"hello through -L").await;
    check_echo(local_port, &random_bytes(4 << 20)).await;
    // Several at once.
    let a = check_echo(local_port, b"first");
    let b = check_echo(local_port, b"second");
    tokio::join!(a, b);
}

#[tokio::test]
async fn vm_remote_forward() {
    let fx = Fixture::new().await;
    let (echo_port, _echo) = echo_server().await;
    let remote_port = free_port();
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args([
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        &format!("{remote_port}:127.0.0.1:{echo_port}"),
    ])
    .stdin(std::process::Stdio::null());
    let _ssh = Proc(cmd.spawn().unwrap());
    wait_for_port(remote_port).await;
    check_echo(remote_port, b"hello through -R").await;
    check_echo(remote_port, &random_bytes(4 << 20)).await;
}

#[tokio::test]
async fn remote_forward_refused_in_the_lobby() {
    let fx = Fixture::new().await;
    let mut cmd = fx.ssh(&fx.owner_key, "lobby");
    cmd.args([
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        &format!("{}:127.0.0.1:9", free_port()),
        "whoami",
    ]);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(255), "{out:?}");
    assert!(
        out.err().contains("remote port forwarding failed"),
        "{out:?}"
    );
}

#[tokio::test]
async fn vm_agent_forwarding() {
    let fx = Fixture::new().await;
    let agent_key = fx.path("agent_key");
    keygen(&agent_key);
    let sock = fx.path("agent.sock");
    let agent = tokio::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _agent = Proc(agent);
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut add = tokio::process::Command::new("ssh-add");
    add.arg(&agent_key)
        .env("SSH_AUTH_SOCK", &sock)
        .kill_on_drop(true);
    let out = run_cmd(add).await;
    assert_eq!(out.status, Some(0), "{out:?}");

    // Without -A the VM sees no agent.
    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args(["ssh-add", "-l"]).env("SSH_AUTH_SOCK", &sock);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(2), "{out:?}");

    let mut cmd = fx.ssh(&fx.owner_key, "vmtest");
    cmd.args(["-A", "ssh-add", "-l"])
        .env("SSH_AUTH_SOCK", &sock);
    let out = run_cmd(cmd).await;
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.out().contains(&fingerprint(&agent_key)), "{out:?}");
}

/// The host key offered by the server on `port`, as "ssh-ed25519 AAAA…".
async fn scan_host_key(port: u16) -> String {
    let mut cmd = tokio::process::Command::new("ssh-keyscan");
    cmd.args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .kill_on_drop(true);
    let out = run_cmd(cmd).await;
    let line = out.out();
    line.split_whitespace()
        .skip(1)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn host_key_persists_and_shutdown_stops_the_server() {
    let fx = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("state/host_key");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let cfg = nook_sshd::SshServerConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            host_key_path: key_path.clone(),
            banner_host: "localhost".into(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(nook_sshd::serve(cfg, fx.backend.clone(), async move {
            let _ = rx.await;
        }));
        wait_for_port(port).await;
        seen.push(scan_host_key(port).await);

        // A connected client is disconnected by the shutdown.
        let mut cmd = fx.ssh_port(&fx.owner_key, "lobby", port);
        cmd.args(["sleep", "60"]);
        let client = tokio::spawn(run_cmd(cmd));
        tokio::time::sleep(Duration::from_secs(2)).await;

        let _ = tx.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops")
            .expect("no panic");
        assert!(result.is_ok());
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        );
        let out = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("client disconnected")
            .unwrap();
        assert_ne!(out.status, Some(0), "{out:?}");
    }
    let mut cmd = tokio::process::Command::new("ssh-keygen");
    cmd.arg("-y").arg("-f").arg(&key_path).kill_on_drop(true);
    let public = run_cmd(cmd).await.out();
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    assert_eq!(seen, [public.clone(), public]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
