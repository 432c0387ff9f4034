//! System tests (root, real QEMU guests, cgroups): an account's envelope: plans, admission
//! with messages that say what to do, and CPU held to the plan while another account's VM
//! keeps its share.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Key};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// The share of one CPU `pid` used over `window`.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    std::thread::sleep(window);
    (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64()
}

fn qemu_pid_of(d: &Daemon, vm_id: &str) -> u32 {
    let pidfile = d.data_dir.join("vms").join(vm_id).join("qemu.pid");
    std::fs::read_to_string(pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn vm_envelope_admission_names_what_to_do() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    let plan = d.ok(&[
        "account",
        "set-plan",
        "alice@example.com",
        "--cpu",
        "1",
        "--memory",
        "512M",
        "--disk",
        "2G",
        "--max-vms",
        "2",
    ]);
    assert!(
        plan.contains("1 vCPU, 512 MiB memory, 2 GiB disk, up to 2 VMs"),
        "{plan}"
    );
    let who: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["whoami", "--json"])).expect("json");
    assert_eq!(who["envelope"]["plan"]["memory_mib"], 512);

    let out = d.ssh(
        &alice,
        "lobby",
        &["new", "--image", "tiny", "--name", "big", "--memory", "1G"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not fit your envelope of 512 MiB"),
        "{}",
        stderr(&out)
    );
    let out = d.ssh(
        &alice,
        "lobby",
        &["new", "--image", "tiny", "--name", "wide", "--cpu", "2"],
    );
    assert!(
        stderr(&out).contains("fewer with --cpu"),
        "{}",
        stderr(&out)
    );

    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "one"]);
    let out = d.ssh(
        &alice,
        "lobby",
        &[
            "new", "--image", "tiny", "--name", "two", "--disk", "2G", "--json",
        ],
    );
    let err: serde_json::Value =
        serde_json::from_str(stderr(&out).lines().next().unwrap_or("")).expect("json error");
    assert_eq!(err["error"]["code"], "over_envelope");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("smaller --disk"),
        "{err}"
    );
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "two"]);
    let out = d.ssh(
        &alice,
        "lobby",
        &["new", "--image", "tiny", "--name", "three"],
    );
    assert!(
        stderr(&out).contains("allows 2 VMs") && stderr(&out).contains("rm NAME"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.list().len(), 2, "a refused VM was left behind");

    // Envelope summary: stat without a name.
    let env: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["stat", "--json"])).expect("json");
    assert_eq!(env["vms"], 2);
    assert_eq!(env["running_memory_mib"], 512);
}

#[test]
fn vm_envelope_caps_cpu_and_spares_other_accounts() {
    let d = Daemon::start();
    let (alice, bob) = (Key::new("alice"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    d.ok(&["account", "set-plan", "alice@example.com", "--cpu", "0.25"]);
    let a: serde_json::Value = serde_json::from_str(&d.lobby_ok(
        &alice,
        &["new", "--image", "tiny", "--name", "hog", "--json"],
    ))
    .expect("json");
    let b: serde_json::Value = serde_json::from_str(&d.lobby_ok(
        &bob,
        &["new", "--image", "tiny", "--name", "work", "--json"],
    ))
    .expect("json");
    let (a_pid, b_pid) = (
        qemu_pid_of(&d, a["id"].as_str().expect("id")),
        qemu_pid_of(&d, b["id"].as_str().expect("id")),
    );
    let account_a =
        serde_json::from_str::<serde_json::Value>(&d.lobby_ok(&alice, &["whoami", "--json"]))
            .expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string();
    let cgroups = std::fs::read_to_string(format!("/proc/{a_pid}/cgroup")).expect("cgroup");
    assert!(
        cgroups.contains(&format!("nook/{account_a}/")),
        "QEMU is not in its account's cgroup:\n{cgroups}"
    );

    for vm in ["hog", "work"] {
        d.exec(vm, "(while :; do :; done) >/dev/null 2>&1 &");
    }
    let (a_share, b_share) = std::thread::scope(|s| {
        let a = s.spawn(|| cpu_share(a_pid, Duration::from_secs(4)));
        let b = s.spawn(|| cpu_share(b_pid, Duration::from_secs(4)));
        (a.join().expect("a"), b.join().expect("b"))
    });
    eprintln!(
        "CPU share over 4 s: alice (plan 0.25) {a_share:.2}, bob (default plan) {b_share:.2}"
    );
    assert!(
        a_share < 0.40,
        "alice's VM used {a_share:.2} CPUs past her 0.25 plan"
    );
    assert!(
        b_share > 0.70,
        "bob's VM got only {b_share:.2} CPUs next to alice's hog"
    );

    // Usage per account and per VM, in Prometheus form.
    let metrics = d.ok(&["metrics"]);
    assert!(
        metrics.contains("email=\"alice@example.com\"} 0.25"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nook_vms{state=\"running\"} 2"),
        "{metrics}"
    );
    for line in [
        "nook_vm_cpu_seconds_total{vm=\"hog\",account=\"alice@example.com\"}",
        "nook_account_memory_bytes{account=",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }

    // Raising the plan takes effect on the running VM.
    d.ok(&["account", "set-plan", "alice@example.com", "--cpu", "1"]);
    std::thread::sleep(Duration::from_millis(500));
    let raised = cpu_share(a_pid, Duration::from_secs(3));
    eprintln!("after raising alice's plan to 1 CPU: {raised:.2}");
    assert!(
        raised > 0.40,
        "alice's VM still held to {raised:.2} after the plan grew"
    );
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

#[test]
fn vm_envelope_freed_guest_memory_returns_to_the_host() {
    let d = Daemon::start();
    let vm = d.ok(&[
        "vm", "create", "--image", "tiny", "--name", "reclaim", "--memory", "512M", "--json",
    ]);
    let vm: serde_json::Value = serde_json::from_str(&vm).expect("json");
    let pid = qemu_pid_of(&d, vm["id"].as_str().expect("id"));
    let idle = rss_mib(pid);
    // /tmp is a tmpfs in the tiny image: 200 MiB of file data is 200 MiB of guest RAM.
    d.exec(
        "reclaim",
        "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null",
    );
    let full = rss_mib(pid);
    assert!(
        full - idle > 150.0,
        "the guest's 200 MiB did not show in QEMU's RSS ({idle:.0} -> {full:.0} MiB)"
    );
    d.exec("reclaim", "rm /tmp/fill");
    let freed_at = Instant::now();
    let mut now = full;
    while freed_at.elapsed() < Duration::from_secs(60) {
        now = rss_mib(pid);
        if full - now > 150.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "QEMU RSS: idle {idle:.0} MiB, with 200 MiB in use {full:.0} MiB, {:.1}s after freeing {now:.0} MiB",
        freed_at.elapsed().as_secs_f64()
    );
    assert!(
        full - now > 150.0,
        "freed guest memory was not returned within a minute ({full:.0} -> {now:.0} MiB)"
    );
}

/// The VM group's CPU weight as the kernel holds it: v1 `cpu.shares` or v2 `cpu.weight`.
fn cpu_weight_file(pid: u32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if controllers.split(',').any(|c| c == "cpu") {
            let mount = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
                .into_iter()
                .find(|m| std::path::Path::new(m).is_dir());
            let file = format!("{}{path}/cpu.shares", mount.expect("cpu mount"));
            return std::fs::read_to_string(file)
                .expect("cpu.shares")
                .trim()
                .to_string();
        }
        if controllers.is_empty()
            && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        {
            return std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.weight"))
                .expect("cpu.weight")
                .trim()
                .to_string();
        }
    }
    panic!("no cpu cgroup for {pid}:\n{cgroups}");
}

#[test]
fn vm_envelope_idle_knobs_turn_on_and_off() {
    let d = Daemon::start_with(&["--idle-after", "4"]);
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    let vm: serde_json::Value = serde_json::from_str(&d.lobby_ok(
        &alice,
        &["new", "--image", "tiny", "--name", "sleepy", "--json"],
    ))
    .expect("json");
    let pid = qemu_pid_of(&d, vm["id"].as_str().expect("id"));
    let busy_weight = cpu_weight_file(pid);
    let idle = |d: &Daemon| -> bool {
        let stat: serde_json::Value =
            serde_json::from_str(&d.lobby_ok(&alice, &["stat", "sleepy", "--json"])).expect("json");
        stat["idle"].as_bool().expect("idle flag")
    };
    common::wait_until(
        "the quiet VM to be marked idle",
        Duration::from_secs(40),
        || idle(&d),
    );
    let idle_weight = cpu_weight_file(pid);
    assert_ne!(
        idle_weight, busy_weight,
        "the idle knob did not reach the cgroup"
    );
    assert!(d.log_text().contains("idle knobs on"));

    d.exec("sleepy", "(while :; do :; done) >/dev/null 2>&1 &");
    let woke = Instant::now();
    common::wait_until(
        "the busy VM to lose its idle knobs",
        Duration::from_secs(15),
        || !idle(&d),
    );
    eprintln!(
        "idle weight {idle_weight}, busy weight {busy_weight}; recovered {:.1}s after getting busy",
        woke.elapsed().as_secs_f64()
    );
    assert_eq!(cpu_weight_file(pid), busy_weight);
}
