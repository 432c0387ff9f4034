//! System test (root, the default image, the real OpenSSH client): `ssh VM@HOST` lands in
//! the VM: commands with exit status, a pty shell, scp, `-L` forwarding, and only the owner.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Daemon, Key};

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn vm_ssh_into_a_vm_shell_scp_and_forwarding() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(
        &alice,
        &[
            "new", "--name", "dev", "--image", "default", "--cpu", "2", "--memory", "1G",
        ],
    );
    let port = d.ssh_port.to_string();

    let out = d.ssh(&alice, "dev", &["sh", "-c", "'whoami; hostname; exit 7'"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nook\ndev\n");

    // An interactive shell through a pty.
    let mut child = Command::new("ssh")
        .args(d.ssh_opts(&alice))
        .args(["-tt", "-p", &port, "dev@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh -tt");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"echo answer=$((6*7)); tty; exit\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("answer=42") && text.contains("/dev/pts/"),
        "{text}"
    );

    // scp a 10 MiB file there and back.
    let tmp = tempfile::tempdir().expect("tmp");
    let (src, back) = (tmp.path().join("src.bin"), tmp.path().join("back.bin"));
    let ok = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=1M",
            "count=10",
            "status=none",
        ])
        .status()
        .expect("dd");
    assert!(ok.success());
    let scp = |from: &str, to: &str| {
        let out = Command::new("scp")
            .args(d.ssh_opts(&alice))
            .args(["-P", &port, from, to])
            .output()
            .expect("scp");
        assert!(
            out.status.success(),
            "scp {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    scp(&src.display().to_string(), "dev@127.0.0.1:/tmp/blob");
    scp("dev@127.0.0.1:/tmp/blob", &back.display().to_string());
    assert_eq!(sha256(&src), sha256(&back));
    assert_eq!(sha256(&src).len(), 64);

    // A fork answers `cp` while its sshd is still restarting to take the clone's own host
    // keys (which the relay checks); scp straight after must wait for that sshd.
    d.lobby_ok(&alice, &["cp", "dev", "twin"]);
    let again = tmp.path().join("again.bin");
    scp("twin@127.0.0.1:/tmp/blob", &again.display().to_string());
    assert_eq!(sha256(&src), sha256(&again));
    d.lobby_ok(&alice, &["rm", "twin"]);

    // -L to a web server inside the VM.
    let out = d.ssh(&alice, "dev", &["sh", "-c", "'mkdir -p /tmp/www && echo inside > /tmp/www/index.html && (setsid python3 -m http.server 8000 -d /tmp/www >/dev/null 2>&1 &)'"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = common::free_port();
    let mut forward = Command::new("ssh")
        .args(d.ssh_opts(&alice))
        .args([
            "-N",
            "-L",
            &format!("{local}:127.0.0.1:8000"),
            "-p",
            &port,
            "dev@127.0.0.1",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("ssh -L");
    let mut body = String::new();
    for _ in 0..50 {
        let out = Command::new("curl")
            .args(["-s", "-m", "2", &format!("http://127.0.0.1:{local}/")])
            .output()
            .expect("curl");
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body == "inside\n" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = forward.kill();
    let _ = forward.wait();
    assert_eq!(body, "inside\n", "-L forwarding did not reach the VM");

    // Only the owner gets in; anyone else gets exactly what a missing VM gives.
    let bob = Key::new("bob");
    d.signup(&bob, "bob@example.com");
    let theirs = d.ssh(&bob, "dev", &["hostname"]);
    let missing = d.ssh(&bob, "nosuchvm", &["hostname"]);
    assert!(!theirs.status.success());
    assert_eq!(theirs.status.code(), missing.status.code());
    assert_eq!(theirs.stdout, missing.stdout);
    assert_eq!(theirs.stderr, missing.stderr);
    // A key nook has never seen is refused too.
    let stranger = Key::new("stranger");
    let out = d.ssh(&stranger, "dev", &["hostname"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("dev"));
}
