//! System tests (root, real QEMU guests, the real OpenSSH client): `new --setup-script -`
//! reads the whole script from stdin, however many SSH chunks it spans, `--env` reaches the
//! script, and a script over the limit is refused before any VM is made.

mod common;

use std::process::{Command, Output, Stdio};

use common::{Daemon, Key};

/// `ssh -p PORT lobby@127.0.0.1 ARGS... < script`, with the real client.
fn ssh_with_stdin(d: &Daemon, key: &Key, args: &[&str], script: &[u8]) -> Output {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("s.sh");
    std::fs::write(&path, script).expect("write script");
    Command::new("ssh")
        .args(d.ssh_opts(key))
        .args(["-p", &d.ssh_port.to_string(), "lobby@127.0.0.1"])
        .args(args)
        .stdin(Stdio::from(
            std::fs::File::open(&path).expect("open script"),
        ))
        .output()
        .expect("ssh")
}

/// A script of at least `size` bytes: work at its start, middle and end, comment padding
/// between, so a script cut anywhere leaves a marker short.
fn padded_script(size: usize) -> Vec<u8> {
    let pad = |s: &mut String, upto: usize| {
        let mut i = 0;
        while s.len() < upto {
            s.push_str(&format!(
                "# padding line {i:06} to make the script span many chunks\n"
            ));
            i += 1;
        }
    };
    let mut s = String::from("#!/bin/sh\nset -e\necho start > /setup-marker\n");
    pad(&mut s, size / 2);
    s.push_str("echo middle >> /setup-marker\n");
    pad(&mut s, size);
    s.push_str("echo \"end $GREETING\" >> /setup-marker\necho setup done\n");
    s.into_bytes()
}

#[test]
fn vm_setup_script_from_stdin_runs_whole_with_env() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    // Far more than one SSH channel packet (32 KiB) and one agent frame (64 KiB).
    let script = padded_script(200 * 1024);
    assert!(script.len() > 200 * 1024);
    let out = ssh_with_stdin(
        &d,
        &alice,
        &[
            "new",
            "--image",
            "tiny",
            "--name",
            "s1",
            "--env",
            "GREETING=hello_from_env",
            "--setup-script",
            "-",
        ],
        &script,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "new failed ({}):\nstdout: {stdout}\nstderr: {stderr}\n--- daemon log ---\n{}",
        out.status,
        d.log_tail()
    );
    assert!(stdout.contains("setup done"), "stdout: {stdout}");
    assert_eq!(
        d.exec("s1", "cat /setup-marker"),
        "start\nmiddle\nend hello_from_env\n",
        "the script did not run whole, or --env did not reach it"
    );
    // --env also lands in /etc/environment, for later logins.
    assert!(
        d.exec("s1", "cat /etc/environment")
            .contains("GREETING=\"hello_from_env\""),
    );
}

#[test]
fn vm_setup_script_over_the_limit_is_refused_before_a_vm_is_made() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    let script = padded_script(1024 * 1024 + 1);
    let out = ssh_with_stdin(
        &d,
        &alice,
        &[
            "new",
            "--image",
            "tiny",
            "--name",
            "s2",
            "--setup-script",
            "-",
        ],
        &script,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("reads at most 1 MiB from stdin"),
        "stderr: {stderr}"
    );
    assert!(d.list().is_empty(), "a VM was made for a refused script");

    // Empty stdin is named as such, not taken for a script.
    let out = ssh_with_stdin(
        &d,
        &alice,
        &[
            "new",
            "--image",
            "tiny",
            "--name",
            "s3",
            "--setup-script",
            "-",
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("stdin was empty"), "stderr: {stderr}");
    assert!(d.list().is_empty());
}
