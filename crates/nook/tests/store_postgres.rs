//! System tests (root, real QEMU guests, the real OpenSSH client, a real PostgreSQL started
//! from Debian's binaries): a host whose state lives in PostgreSQL (`--store postgres://`)
//! keeps it there, rides out a database restart, and refuses a store it cannot use with an
//! error that says what to fix and never shows the URL's password.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Key, wait_until};

fn psql(d: &mut Daemon, sql: &str) -> String {
    let socket = d
        .postgres()
        .expect("on postgres")
        .socket_dir()
        .to_path_buf();
    let out = Command::new("psql")
        .arg("-h")
        .arg(&socket)
        .args(["-U", "nook", "-d", "nook", "-tAc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn vm_store_on_postgres_holds_the_state_and_rides_out_a_database_restart() {
    let mut d = Daemon::start_on_postgres(&[]);
    assert!(
        d.log_text()
            .lines()
            .any(|l| l.contains("state store open") && l.contains("postgres")),
        "the log does not say which store:\n{}",
        d.log_text()
    );
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--name", "web", "--image", "tiny"]);
    d.lobby_ok(&alice, &["share", "add", "web", "bob@example.com"]);

    // The state is in PostgreSQL, and no SQLite file was made beside it.
    assert!(!d.data_dir.join("nook.sqlite").exists());
    assert_eq!(
        psql(&mut d, "SELECT name || ' ' || state FROM vms"),
        "web running"
    );
    assert_eq!(
        psql(&mut d, "SELECT email FROM accounts"),
        "alice@example.com"
    );
    assert_eq!(psql(&mut d, "SELECT email FROM shares"), "bob@example.com");

    // The database dies. The VM goes on; a request gets an error, not a hang.
    let qemu = d.qemu_pids();
    assert_eq!(qemu.len(), 1);
    d.postgres().expect("postgres").kill();
    let started = std::time::Instant::now();
    let out = d.ssh(&alice, "lobby", &["ls"]);
    assert!(!out.status.success(), "ls worked with the database down");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot reach its database") && !said.contains("Sign up"),
        "with the database down, ls said: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ls took {:?} to fail",
        started.elapsed()
    );
    assert_eq!(d.qemu_pids(), qemu, "the VM stopped with the database");

    // Back again: the same daemon, with no restart, serves as before, and nothing was lost.
    d.postgres().expect("postgres").start_again();
    wait_until(
        "the lobby works again after the database restart",
        Duration::from_secs(30),
        || d.ssh(&alice, "lobby", &["ls"]).status.success(),
    );
    assert!(d.lobby_ok(&alice, &["ls"]).contains("web"));
    assert!(
        d.lobby_ok(&alice, &["share", "show", "web"])
            .contains("bob@example.com")
    );
    d.lobby_ok(&alice, &["new", "--name", "api", "--image", "tiny"]);
    assert_eq!(d.exec("api", "echo hi"), "hi\n");

    // A daemon restart finds its VMs in PostgreSQL and adopts them, still running.
    d.restart();
    let names: Vec<String> = d
        .list()
        .iter()
        .map(|vm| format!("{} {}", vm["name"].as_str().unwrap_or(""), vm["state"]))
        .collect();
    assert_eq!(names, ["api \"running\"", "web \"running\""]);
    assert_eq!(d.exec("web", "echo still"), "still\n");
}

/// `nook serve` with STORE in the environment, in a fresh data dir; its exit status and
/// output once it stops (it must not start).
fn serve_with_store(store: &str) -> (std::process::ExitStatus, String) {
    let tmp = common::sys_tempdir();
    let mut child = Command::new(common::nook_bin())
        .arg("serve")
        .env("NOOK_DATA_DIR", tmp.path().join("data"))
        .env("NOOK_IMAGES_DIR", common::images_dir())
        .env("NOOK_AGENT", common::agent_bin())
        .env("NOOK_SSH_ADDR", "off")
        .env("NOOK_HTTPS_ADDR", "off")
        .env("NOOK_STORE", store)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nook serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("nook serve with store {store:?} did not stop");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[test]
fn vm_store_that_cannot_be_used_stops_serve_with_what_to_fix_and_no_password() {
    let (status, text) = serve_with_store("mysql://nook:hunter2@db.example/nook");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("store") && text.contains("postgres://"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");

    // A PostgreSQL that is not there: no socket in an empty dir.
    let empty = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "postgres://nook:hunter2@localhost/nook?host={}",
        empty.path().display()
    );
    let (status, text) = serve_with_store(&url);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("Cannot reach the postgres store") && text.contains("--store"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
}

/// Host seconds minus the guest's uptime: it grows by however long the guest was paused,
/// since a paused guest's clock stands still.
fn guest_lag(d: &Daemon, vm: &str) -> f64 {
    let host_before = now_secs();
    let uptime = d.exec(vm, "cat /proc/uptime");
    let guest: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("guest uptime: {uptime:?}"));
    let host_after = now_secs();
    (host_before + host_after) / 2.0 - guest
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// Leases and fencing with one real host: the lease is taken at start; with the database out
/// of reach the VM is paused before its lease could lapse and goes on when it is back; a VM
/// whose lease another host took over is killed here at once, and cannot start here until
/// that lease lapses.
#[test]
fn vm_fleet_lease_fences_a_vm_that_cannot_renew_and_stops_one_taken_over() {
    let mut d = Daemon::start_on_postgres(&["--host-name", "h1", "--host-addr", "h1.test:7000"]);
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--name", "web", "--image", "tiny"]);
    assert_eq!(
        psql(&mut d, "SELECT host || ' ' || epoch FROM vm_leases"),
        "h1 1"
    );
    assert_eq!(psql(&mut d, "SELECT host FROM vms"), "h1");

    // The host lists itself, up, with its VM and lease (after its first heartbeat).
    wait_until("the first heartbeat", Duration::from_secs(15), || {
        let hosts: serde_json::Value =
            serde_json::from_str(&d.ok(&["host", "ls", "--json"])).expect("json");
        hosts[0]["running_vms"] == 1
    });
    let hosts: serde_json::Value =
        serde_json::from_str(&d.ok(&["host", "ls", "--json"])).expect("json");
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    let h = &hosts[0];
    assert_eq!(
        (&h["name"], &h["addr"], &h["up"], &h["leases"]),
        (
            &serde_json::json!("h1"),
            &serde_json::json!("h1.test:7000"),
            &serde_json::json!(true),
            &serde_json::json!(1)
        ),
        "{h}"
    );
    let text = d.ok(&["host", "ls"]);
    assert!(text.contains("h1") && text.contains(" up "), "{text}");
    let metrics = d.ok(&["metrics"]);
    for line in [
        "nook_host_up{host=\"h1\"} 1",
        "nook_host_leases{host=\"h1\"} 1",
        "nook_host_running_vms{host=\"h1\"} 1",
        "nook_store_hears_other_hosts 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }

    // The database goes away: the VM is paused well before its lease (15 s past the last
    // renewal, which came at most 5 s before this) could lapse, and goes on when it is back.
    let lag_before = guest_lag(&d, "web");
    let expires_ms: f64 = psql(&mut d, "SELECT expires_at FROM vm_leases")
        .parse()
        .expect("expires_at");
    d.postgres().expect("postgres").kill();
    wait_until(
        "the VM paused for its lease",
        Duration::from_secs(20),
        || {
            d.log_text()
                .contains("VM paused: its lease cannot be renewed")
        },
    );
    let margin = expires_ms / 1000.0 - now_secs();
    assert!(
        margin > 0.0,
        "paused {:.1} s after its lease lapsed: another host could have started it",
        -margin
    );
    std::thread::sleep(Duration::from_secs(3));
    d.postgres().expect("postgres").start_again();
    wait_until("the VM going on", Duration::from_secs(30), || {
        d.log_text().contains("VM goes on: its lease is renewed")
    });
    let paused_for = guest_lag(&d, "web") - lag_before;
    assert!(
        paused_for > 2.0,
        "the guest's clock lost only {paused_for:.1} s: it was not paused"
    );
    assert_eq!(d.exec("web", "echo alive"), "alive\n");

    // Another host takes the VM over (as it may once the lease lapsed): this host kills it at
    // its next renewal, and says who has it.
    let qemu = d.qemu_pids();
    assert_eq!(qemu.len(), 1);
    psql(
        &mut d,
        "UPDATE vm_leases SET host = 'h2', epoch = epoch + 1, \
         expires_at = CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) + 600000",
    );
    let ls = || -> serde_json::Value {
        serde_json::from_str(&d.lobby_ok(&alice, &["ls", "--json"])).expect("ls")
    };
    wait_until("the VM stopped here", Duration::from_secs(15), || {
        ls()[0]["state"] == "stopped"
    });
    assert!(d.qemu_pids().is_empty(), "its QEMU still runs");
    let ls = ls();
    assert!(
        ls[0]["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("host 'h2' took it over")),
        "{ls}"
    );
    let out = d.ssh(&alice, "lobby", &["start", "web"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("running on host 'h2'"),
        "{said}"
    );
    assert!(d.qemu_pids().is_empty(), "a refused start left a QEMU");

    // Once h2's lease lapses, the VM starts here again, under a new epoch.
    psql(&mut d, "UPDATE vm_leases SET expires_at = 0");
    d.lobby_ok(&alice, &["start", "web"]);
    assert_eq!(
        psql(&mut d, "SELECT host || ' ' || epoch FROM vm_leases"),
        "h1 3"
    );
    assert_eq!(d.exec("web", "echo back"), "back\n");
}

/// Hosts sharing a store must share its secrets key: a host with another key (here, a new
/// data dir that made its own) refuses to start and says which file to copy.
#[test]
fn vm_store_refuses_a_host_whose_secrets_key_does_not_open_its_secrets() {
    let mut d = Daemon::start_on_postgres(&[]);
    let url = d.postgres().expect("postgres").url("nook");
    let (status, text) = serve_with_store(&url);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("does not open the secrets this store holds") && text.contains("secrets.key"),
        "{text}"
    );
    // The first host is unaffected.
    let hosts: serde_json::Value =
        serde_json::from_str(&d.ok(&["host", "ls", "--json"])).expect("host ls");
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
}
