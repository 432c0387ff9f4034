//! System test (root, the tiny image, the real OpenSSH client): `ssh VM@HOST [CMD]` runs
//! through the guest agent, so it works in an image without an SSH server: exit status and
//! signals, stdin and EOF, `SetEnv`, a pty with window resizes and ^C, 100 MiB each way and
//! both ways at once, and a client that goes away hangs the command up.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Key};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A shell pipeline on the host, with the VM's ssh command line as `$SSH`.
fn sh(d: &Daemon, key: &Key, script: &str) -> std::process::Output {
    let ssh = format!("ssh {} -p {}", d.ssh_opts(key).join(" "), d.ssh_port);
    Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .env("SSH", ssh)
        .stdin(Stdio::null())
        .output()
        .expect("bash")
}

#[test]
fn vm_ssh_into_a_tiny_vm_runs_through_the_agent() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--name", "t1", "--image", "tiny"]);

    // Exit status, stdout and stderr kept apart, the login user and the VM's name.
    let out = d.ssh(
        &alice,
        "t1",
        &["echo out; echo err >&2; whoami; hostname; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\nnook\nt1\n");
    assert_eq!(text(&out.stderr), "err\n");

    // A command killed by a signal: OpenSSH reports 255.
    let out = d.ssh(&alice, "t1", &["kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(255));

    // stdin reaches the command and its end reaches it as EOF; SetEnv arrives.
    let out = sh(
        &d,
        &alice,
        "printf 'a\\nb\\n' | $SSH -o SetEnv=GREETING=hello-there t1@127.0.0.1 'wc -l; echo \"$GREETING\"'",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(lines, ["2", "hello-there"]);

    // 100 MiB up, then down, then 20 MiB through `cat` both ways at once.
    let tmp = tempfile::tempdir().expect("tmp");
    let big = tmp.path().join("big");
    let made = Command::new("head")
        .args(["-c", "100M", "/dev/urandom"])
        .stdout(std::fs::File::create(&big).expect("create"))
        .status()
        .expect("head");
    assert!(made.success());
    let want = text(&sh(&d, &alice, &format!("sha256sum < {}", big.display())).stdout);
    let up = sh(
        &d,
        &alice,
        &format!(
            "$SSH t1@127.0.0.1 'cat > /home/nook/big; sha256sum < /home/nook/big' < {}",
            big.display()
        ),
    );
    assert!(up.status.success(), "{}", text(&up.stderr));
    assert_eq!(text(&up.stdout), want, "upload");
    let down = sh(
        &d,
        &alice,
        "$SSH t1@127.0.0.1 'cat /home/nook/big' | sha256sum",
    );
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert_eq!(text(&down.stdout), want, "download");
    let both = sh(
        &d,
        &alice,
        &format!(
            "head -c 20M {} | $SSH t1@127.0.0.1 cat | sha256sum; head -c 20M {} | sha256sum",
            big.display(),
            big.display()
        ),
    );
    let sums: Vec<String> = text(&both.stdout).lines().map(str::to_string).collect();
    assert_eq!(sums.len(), 2, "{}", text(&both.stderr));
    assert_eq!(sums[0], sums[1], "both ways at once");

    // A client that goes away: the command gets SIGHUP, and nothing is left running. `started`
    // comes once `sleep` runs: a SIGHUP between the shell's fork and the child's exec would
    // reach the shell's HUP trap in the child rather than `sleep` (any sshd has that race).
    let mut child = Command::new("ssh")
        .args(d.ssh_opts(&alice))
        .args(["-p", &d.ssh_port.to_string(), "t1@127.0.0.1"])
        .arg(
            "trap 'echo hup > /home/nook/hup; exit 0' HUP; sleep 1000 & \
             until [ \"$(cat /proc/$!/comm)\" = sleep ]; do :; done; echo started; wait",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ssh");
    let mut first = [0u8; 8];
    std::io::Read::read_exact(child.stdout.as_mut().expect("stdout"), &mut first).expect("read");
    assert_eq!(&first, b"started\n");
    child.kill().expect("kill ssh");
    let _ = child.wait();
    common::wait_until(
        "the hung-up command to react",
        Duration::from_secs(10),
        || d.ssh(&alice, "t1", &["cat /home/nook/hup"]).stdout == b"hup\n",
    );
    let left = d.ssh(&alice, "t1", &["ps | grep -c '[s]leep 1000'"]);
    assert_eq!(text(&left.stdout).trim(), "0", "sleep survived the hangup");

    // What needs an SSH server (here the sftp subsystem) says so instead of failing obscurely.
    let out = sh(&d, &alice, "$SSH -s t1@127.0.0.1 sftp < /dev/null");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("without an SSH server") && err.contains("default image"),
        "{err}"
    );
}

/// Drives `ssh -tt` through a real pty so window-size changes (SIGWINCH on the client) and ^C
/// are what a terminal user makes.
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, fcntl, termios, struct, signal, select
argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
def setsize(rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
setsize(24, 80)
buf = b""
def expect(token, timeout=30, fail=True):
    global buf
    end = time.time() + timeout
    while token not in buf:
        left = end - time.time()
        if left <= 0:
            if not fail:
                return False
            sys.stdout.write(buf.decode(errors="replace"))
            sys.exit("timed out waiting for %r" % token)
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                sys.stdout.write(buf.decode(errors="replace"))
                sys.exit("EOF waiting for %r" % token)
            buf += data
    buf = buf[buf.index(token) + len(token):]
    return True
os.write(fd, b"stty size | sed 's/^/size=/'\n")
expect(b"size=24 80")
setsize(40, 132)
os.kill(pid, signal.SIGWINCH)
# The resize travels to the guest's pty on its own; ask until it has arrived (30 s at most).
for _ in range(15):
    os.write(fd, b"stty size | sed 's/^/size=/'\n")
    if expect(b"size=40 132", timeout=2, fail=False):
        break
else:
    expect(b"size=40 132")
# ^C only once the command runs: sent earlier, it would flush the line before the shell read
# it. The command is one process that prints, then becomes sleep, so ^C ends it with 130
# whichever it is by then. (The quotes keep the echoed command line from matching.)
os.write(fd, b"sh -c 'echo sl\"\"eeping; exec sleep 100'\n")
expect(b"sleeping")
os.write(fd, b"\x03")
os.write(fd, b"echo status=$?\n")
expect(b"status=130")
os.write(fd, b"echo $TERM; exit 5\n")
expect(b"xterm-pty-test")
_, status = os.waitpid(pid, 0)
print("exit=%d" % os.waitstatus_to_exitcode(status))
"#;

#[test]
fn vm_ssh_pty_session_follows_resizes_and_ctrl_c() {
    let d = Daemon::start();
    let bob = Key::new("bob");
    d.signup(&bob, "bob@example.com");
    d.lobby_ok(&bob, &["new", "--name", "t2", "--image", "tiny"]);
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PTY_DRIVER, "ssh", "-tt"])
        .args(d.ssh_opts(&bob))
        .args(["-p", &d.ssh_port.to_string(), "t2@127.0.0.1"])
        .env("TERM", "xterm-pty-test");
    let out = cmd.stdin(Stdio::null()).output().expect("python3");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.trim_end().ends_with("exit=5"), "{stdout}");
}
