//! System tests (root, real QEMU guests on the tiny image): lifecycle, persistence, clean
//! removal and re-adoption after a daemon crash.

mod common;

use std::time::Duration;

use common::{Daemon, nft_sources, taps, wait_until};

#[test]
fn vm_create_exec_persist_stop_start_rm_leaves_nothing() {
    let d = Daemon::start();
    let vm = d.create_tiny("life");
    assert_eq!(vm["state"], "running");
    let ip = vm["guest_ip"].as_str().expect("guest ip").to_string();

    // QEMU runs under its seccomp filter (no fork, exec or setuid for a device bug to use).
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let seccomp = status.lines().find(|l| l.starts_with("Seccomp:"));
        assert_eq!(
            seccomp
                .map(str::split_whitespace)
                .and_then(|mut w| w.nth(1)),
            Some("2"),
            "QEMU {pid} is not sandboxed: {seccomp:?}"
        );
    }

    // What the daemon keeps is closed to other local users.
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&d.data_dir), 0o700, "data dir");
    let vm_dir = d.data_dir.join("vms").join(vm["id"].as_str().expect("id"));
    let files = [d.data_dir.join("nook.sqlite"), vm_dir.join("disk.qcow2")];
    // On PostgreSQL there is no database file in the data dir.
    for file in files
        .iter()
        .filter(|f| f.exists() || !common::store_is_postgres())
    {
        assert_eq!(
            mode(file) & 0o077,
            0,
            "{} is open to others",
            file.display()
        );
    }

    let uname = d.ok(&["vm", "exec", "life", "--", "uname", "-a"]);
    assert!(uname.starts_with("Linux life "), "{uname}");

    // The host lists itself with its running VM: on SQLite as it is now, on PostgreSQL as
    // its heartbeat (every 5 s) last said.
    let hosts = || -> serde_json::Value {
        serde_json::from_str(&d.ok(&["host", "ls", "--json"])).expect("host ls")
    };
    wait_until("host ls counts the VM", Duration::from_secs(15), || {
        hosts()[0]["running_vms"] == 1
    });
    let hosts = hosts();
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(hosts[0]["up"], true, "{hosts}");

    // Exit status and stderr come back as they are.
    let out = d.nook(&[
        "vm",
        "exec",
        "life",
        "--",
        "sh",
        "-c",
        "echo oops >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    d.exec("life", "echo persisted-$((6*7)) > /root/note && sync");
    let stopped = d.ok(&["vm", "stop", "life", "--json"]);
    assert!(stopped.contains("\"stopped\""), "{stopped}");
    assert!(d.qemu_pids().is_empty(), "QEMU still running after stop");
    assert!(!taps().contains(&"nk0".to_string()), "tap kept after stop");
    let err = d.fails(&["vm", "exec", "life", "--", "true"]);
    assert!(err.contains("not running"), "{err}");

    d.ok(&["vm", "start", "life"]);
    assert_eq!(d.exec("life", "cat /root/note"), "persisted-42\n");
    assert_eq!(d.vm("life")["guest_ip"], ip.as_str());

    let vm_dir = d.data_dir.join("vms").join(vm["id"].as_str().expect("id"));
    assert!(vm_dir.join("disk.qcow2").is_file());
    d.ok(&["vm", "rm", "life"]);
    assert!(!vm_dir.exists(), "VM directory left behind");
    assert!(d.list().is_empty(), "row left behind");
    assert!(d.qemu_pids().is_empty(), "QEMU left behind");
    assert!(taps().is_empty(), "taps left behind: {:?}", taps());
    assert!(
        !nft_sources().contains(&ip),
        "nft source element left behind:\n{}",
        nft_sources()
    );
    let err = d.fails(&["vm", "rm", "life"]);
    assert!(err.contains("No VM named 'life'"), "{err}");
}

#[test]
fn vm_survives_daemon_sigkill_and_is_readopted() {
    let mut d = Daemon::start();
    d.create_tiny("sturdy");
    d.exec("sturdy", "echo before > /tmp/mark");
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1);

    d.restart();
    assert_eq!(
        d.qemu_pids(),
        pids,
        "QEMU was restarted or killed instead of re-adopted"
    );
    assert_eq!(d.vm("sturdy")["state"], "running");
    // /tmp is a tmpfs: the same boot, not a new one.
    assert_eq!(d.exec("sturdy", "cat /tmp/mark"), "before\n");
    assert!(d.log_text().contains("re-adopted running VM"));
    // The new daemon reads QEMU's stderr (a pipe the old one read): what QEMU says from now
    // on, such as why it died, reaches qemu.log.
    let stderr = std::fs::read_link(format!("/proc/{}/fd/2", pids[0])).expect("QEMU's stderr");
    assert!(stderr.to_string_lossy().starts_with("pipe:"), "{stderr:?}");
    let daemon_fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).expect("daemon fds");
    assert!(
        daemon_fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == stderr)),
        "the re-adopting daemon does not read QEMU's stderr ({stderr:?})"
    );

    // A VM that dies while the daemon is down is reported with its reason.
    d.kill9();
    for pid in &pids {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    wait_until("QEMU to die", Duration::from_secs(10), || {
        d.qemu_pids().is_empty()
    });
    d.restart();
    let vm = d.vm("sturdy");
    assert_eq!(vm["state"], "failed");
    assert!(
        vm["state_reason"].as_str().unwrap_or("").contains("exited"),
        "{vm}"
    );
    d.ok(&["vm", "start", "sturdy"]);
    assert_eq!(d.exec("sturdy", "echo back"), "back\n");
}

#[test]
fn vm_killed_while_daemon_runs_is_marked_failed_with_reason() {
    let d = Daemon::start();
    d.create_tiny("fragile");
    for pid in d.qemu_pids() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    wait_until(
        "the VM to be marked failed",
        Duration::from_secs(10),
        || d.vm("fragile")["state"] == "failed",
    );
    let reason = d.vm("fragile")["state_reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.contains("QEMU exited unexpectedly"), "{reason}");
    assert!(taps().is_empty(), "tap of a dead VM left behind");
}
