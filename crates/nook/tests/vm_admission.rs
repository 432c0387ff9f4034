//! System tests (root, real QEMU guests, the real OpenSSH client): resize and start go
//! through the same envelope admission as create, and concurrent starts cannot both squeeze
//! into the last of an envelope.

mod common;

use common::{Daemon, Key};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vm_admission_resize_cannot_grow_past_the_plan() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.ok(&[
        "account",
        "set-plan",
        "alice@example.com",
        "--memory",
        "512M",
        "--disk",
        "2G",
    ]);
    d.lobby_ok(
        &alice,
        &["new", "--image", "tiny", "--name", "one", "--disk", "1G"],
    );

    let out = d.ssh(&alice, "lobby", &["resize", "one", "--disk", "3G"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over your envelope's 2 GiB")
            && stderr(&out).contains("smaller --disk"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.vm("one")["disk_bytes"],
        1u64 << 30,
        "a refused resize changed the disk"
    );

    let out = d.ssh(&alice, "lobby", &["resize", "one", "--memory", "1G"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not fit your envelope of 512 MiB"),
        "{}",
        stderr(&out)
    );

    // Up to the plan is fine.
    d.lobby_ok(&alice, &["resize", "one", "--disk", "2G"]);
    assert_eq!(d.vm("one")["disk_bytes"], 2u64 << 30);
}

#[test]
fn vm_admission_concurrent_starts_cannot_both_fit() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("nook.toml");
    // No overcommit: the plan's memory is exactly what may run at once.
    std::fs::write(&config, "memory_overcommit = 1.0\n").expect("config");
    let d = Daemon::start_with(&["--config", config.to_str().expect("utf-8 path")]);
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.ok(&[
        "account",
        "set-plan",
        "alice@example.com",
        "--memory",
        "256M",
    ]);
    for name in ["va", "vb"] {
        d.lobby_ok(
            &alice,
            &["new", "--image", "tiny", "--name", name, "--memory", "256M"],
        );
        d.lobby_ok(&alice, &["stop", name]);
    }

    // Both at once: only one fits, whichever gets there first.
    let (dr, key) = (&d, &alice);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let starts: Vec<_> = ["va", "vb"]
            .map(|name| s.spawn(move || dr.ssh(key, "lobby", &["start", name])))
            .into_iter()
            .collect();
        starts
            .into_iter()
            .map(|h| h.join().expect("ssh thread"))
            .collect()
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        ok,
        1,
        "exactly one start must fit the envelope:\n{}",
        outs.iter().map(stderr).collect::<Vec<_>>().join("\n---\n")
    );
    let refused = outs
        .iter()
        .find(|o| !o.status.success())
        .expect("one refused");
    assert!(
        stderr(refused).contains("over the 256 MiB your 256 MiB envelope allows"),
        "{}",
        stderr(refused)
    );
    let running = d
        .list()
        .into_iter()
        .filter(|vm| vm["state"] == "running")
        .count();
    assert_eq!(running, 1);
    assert_eq!(d.qemu_pids().len(), 1);
}

/// Each account's envelope bounds it, and the host's limits bound all accounts together: many
/// accounts cannot promise more memory, disk or VMs than the host was given.
#[test]
fn vm_admission_host_limits_hold_across_accounts() {
    let d = Daemon::start_with(&["--host-memory", "600M", "--host-max-vms", "3"]);
    let (alice, bob, carol) = (Key::new("alice"), Key::new("bob"), Key::new("carol"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    d.signup(&carol, "carol@example.com");
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "a1"]);
    d.lobby_ok(&bob, &["new", "--image", "tiny", "--name", "b1"]);

    // Two 256 MiB VMs run; a third would pass the host's 600 MiB though carol's own envelope
    // has room. The error says the host is full and nothing about the others.
    let out = d.ssh(&carol, "lobby", &["new", "--image", "tiny", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("over_envelope") && text.contains("This host is full"),
        "{text}"
    );
    assert!(!text.contains("alice") && !text.contains("a1"), "{text}");
    assert_eq!(d.list().len(), 2, "a refused new left a VM behind");

    // Room made by one account is room for another.
    d.lobby_ok(&alice, &["stop", "a1"]);
    d.lobby_ok(&carol, &["new", "--image", "tiny", "--name", "c1"]);
    let out = d.ssh(&alice, "lobby", &["start", "a1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("This host is full"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.vm("a1")["state"], "stopped");

    // Three VMs are the host's limit, running or not.
    d.lobby_ok(&bob, &["stop", "b1"]);
    let out = d.ssh(&bob, "lobby", &["new", "--image", "tiny"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("as many VMs as it may"),
        "{}",
        stderr(&out)
    );
    // A bad limit is named at start.
    let out = std::process::Command::new(common::nook_bin())
        .args(["serve", "--host-memory", "lots"])
        .env("NOOK_DATA_DIR", d.data_dir.join("other"))
        .output()
        .expect("nook serve");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("host_memory"), "{}", stderr(&out));
}
