//! System test (root, real QEMU guests, a real PostgreSQL): three hosts of one fleet on this
//! machine, each `nook serve` in a network namespace of its own with its own address and its
//! own cgroup top (`--cgroup-top`), all on one PostgreSQL the test starts.
//!
//! It shows what the fleet does today: hosts joining with one-time tokens (`nook host
//! invite` on h1, `nook host join` on h2 and h3), which give them the store and the fleet's
//! secrets key, each working once and only for a name no up host has; VMs on every host,
//! listed with their host by every front door; every host's DNS answering for every VM; SSH
//! and HTTPS to every VM through every front door (the host channel); a share revoked
//! through one host refused by every host's edge at the next request; moves, live and cold;
//! a drain with the VM answering through another front door all along, the drained host
//! cordoned and restarted on a newer schema; clones placed on another host than their
//! source's (made beside it, moved, cost told); a daemon killed alone, its QEMUs stopped by
//! its fence watch before their leases could lapse and resumed by its restart; PostgreSQL
//! restarted under the hosts with nothing lost; replicas and a restore on a partitioned
//! host's VM; and a host killed (daemon and QEMUs): its VMs show as `unavailable`, with the
//! reason, on the other hosts, requests for them get a clean error, and the VMs come back
//! with the host.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, FleetEntry, Key, sys_tempdir, wait_until};
use nook_store::testing::TempPostgres;
use serde_json::Value;

const VM_DOMAIN: &str = "nook-vm.localhost";
const BRIDGE: &str = "nfleet0";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hosts' network: a bridge on this machine (10.252.0.1) and, per host, a namespace whose
/// `eth0` (10.252.0.1N) is a veth into it. Removed on drop. (No name starts with `nk`: nook's
/// rules take such links for VM taps.)
struct FleetNet {
    hosts: usize,
}

impl FleetNet {
    fn new(hosts: usize) -> FleetNet {
        let net = FleetNet { hosts };
        net.remove(); // What a crashed run left.
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", "10.252.0.1/24", "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        for i in 1..=hosts {
            let ns = Self::ns(i);
            let veth = format!("nfleetv{i}");
            let addr = format!("{}/24", Self::addr(i));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", BRIDGE, "up"]);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "route", "add", "default", "via", "10.252.0.1"]);
        }
        net
    }

    fn ns(i: usize) -> String {
        format!("nook-fleet-h{i}")
    }

    fn addr(i: usize) -> String {
        format!("10.252.0.1{i}")
    }

    fn remove(&self) {
        for i in 1..=self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &Self::ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("nfleetv{i}")])
                .output();
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    }
}

impl Drop for FleetNet {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ls(h: &Daemon, key: &Key) -> Vec<Value> {
    serde_json::from_str(&h.lobby_ok(key, &["ls", "--json"])).expect("ls --json")
}

fn find<'a>(vms: &'a [Value], name: &str) -> &'a Value {
    vms.iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {vms:?}"))
}

/// `curl https://VM.VM_DOMAIN/` through host `h`'s edge, trusting its CA: the status code
/// and the body.
fn get_through(h: &Daemon, vm: &str) -> (String, String) {
    let ca = PathBuf::from(h.ok(&["ca", "path"]).trim());
    let host = format!("{vm}.{VM_DOMAIN}");
    let out = Command::new("curl")
        .args(["-sS", "-m", "20", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&ca)
        .args([
            "--resolve",
            &format!("{host}:{}:{}", h.https_port, h.addr),
            &format!("https://{host}:{}/", h.https_port),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.trim().to_string())
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vm_fleet_three_hosts_in_namespaces_on_one_postgres() {
    let _turn = common::host_turn();
    let net = FleetNet::new(3);
    // PostgreSQL on the hosts' network, so that a host can be cut off from it by a firewall.
    let pg_addr = std::net::TcpListener::bind("10.252.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on the bridge");
    let mut pg = TempPostgres::start_on(Some(pg_addr));
    let store = pg.url("nook");

    // h1 starts on the store; h2 and h3 join the fleet through it with one-time tokens,
    // which give them the store and the fleet's secrets key, and nothing else.
    let mut h1 = Daemon::start_fleet_host(
        &FleetNet::ns(1),
        &FleetNet::addr(1),
        "h1",
        FleetEntry::Store(&store),
    );
    let invite = || {
        let mut token = String::new();
        wait_until("an invitation from h1", Duration::from_secs(30), || {
            let out = h1.nook(&["host", "invite", "--ttl", "10m"]);
            token = String::from_utf8_lossy(&out.stdout).trim().to_string();
            out.status.success()
        });
        token
    };
    let spare = sys_tempdir();
    let join_spare = |token: &str, name: &str| {
        let out = common::join_fleet(&FleetNet::ns(2), spare.path(), token, name, "10.252.0.19");
        assert!(!out.status.success(), "joined twice as {name}");
        stderr_of(&out)
    };
    let token = invite();
    // A name an up host has is refused, and costs no invitation.
    let refused = join_spare(&token, "h1");
    assert!(refused.contains("host 'h1' is up already"), "{refused}");
    let mut h2 = Daemon::start_fleet_host(
        &FleetNet::ns(2),
        &FleetNet::addr(2),
        "h2",
        FleetEntry::Join(&token),
    );
    // A token works once; a mangled one says so.
    let refused = join_spare(&token, "h9");
    assert!(refused.contains("used, lapsed or unknown"), "{refused}");
    let refused = join_spare(&token[..token.len() - 4], "h9");
    assert!(refused.contains("not a join token"), "{refused}");
    assert!(
        !spare.path().join("secrets.key").exists() && !spare.path().join("nook.toml").exists(),
        "a refused join wrote to its data dir"
    );
    let mut h3 = Daemon::start_fleet_host(
        &FleetNet::ns(3),
        &FleetNet::addr(3),
        "h3",
        FleetEntry::Join(&invite()),
    );

    // One account, known to every host: it signs up through h1, and h1 places its VMs
    // across the fleet, each where the most memory is free (h1 itself on a tie).
    let alice = Key::new("alice");
    h1.signup(&alice, "alice@example.com");
    for i in 1..=3 {
        let name = format!("vm{i}");
        let out = h1.lobby_ok(
            &alice,
            &["new", "--name", &name, "--image", "tiny", "--json"],
        );
        let made: Value = serde_json::from_str(&out).expect("new --json");
        assert_eq!(made["host"], format!("h{i}"), "{made}");
    }

    // Every front door lists every VM, with the host it lives on; each is running there, and
    // each host's cgroups are its own.
    for h in [&h1, &h2, &h3] {
        let vms = ls(h, &alice);
        assert_eq!(vms.len(), 3, "{vms:?}");
        for i in 1..=3 {
            let vm = find(&vms, &format!("vm{i}"));
            assert_eq!(vm["host"], format!("h{i}"), "{vm}");
            assert_eq!(vm["state"], "running", "{vm}");
        }
    }
    for i in 1..=3 {
        let top = PathBuf::from(format!("/sys/fs/cgroup/nook-h{i}"));
        let own = std::fs::read_dir(&top)
            .map(|d| d.count())
            .unwrap_or_default();
        let v1 = PathBuf::from(format!("/sys/fs/cgroup/memory/nook-h{i}"));
        assert!(
            own > 0 || v1.is_dir(),
            "h{i} has no cgroup top of its own ({} or {})",
            top.display(),
            v1.display()
        );
    }
    let text = h2.lobby_ok(&alice, &["ls"]);
    assert!(text.contains("running on h3"), "{text}");
    // Every host's DNS answers for the whole zone: any VM's name, wherever the VM runs,
    // points at that host, whose front doors reach it.
    for h in [&h1, &h2, &h3] {
        for i in 1..=3 {
            let out = Command::new("dig")
                .args([
                    &format!("@{}", h.addr),
                    "-p",
                    &common::FLEET_DNS_PORT.to_string(),
                ])
                .args(["+short", "+norecurse", &format!("vm{i}.{VM_DOMAIN}"), "A"])
                .output()
                .expect("dig (apt-get install dnsutils)");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                h.addr,
                "vm{i} through the DNS of {}",
                h.addr
            );
        }
    }

    // Every command about a VM works through any front door: it runs on the VM's host.
    // `--on` picks the host; a clone stays with its source's layers.
    let out = h2.lobby_ok(
        &alice,
        &[
            "new", "--name", "pinned", "--image", "tiny", "--on", "h1", "--json",
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json")["host"],
        "h1"
    );
    h3.lobby_ok(&alice, &["stop", "pinned"]);
    assert_eq!(find(&ls(&h1, &alice), "pinned")["state"], "stopped");
    h2.lobby_ok(&alice, &["start", "pinned"]);
    let out = h3.lobby_ok(&alice, &["cp", "pinned", "pinned-copy", "--json"]);
    let copy: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(copy["vm"]["host"], "h1", "{out}");
    let out = h2.lobby_ok(&alice, &["stat", "pinned-copy", "--json"]);
    assert!(out.contains("pinned-copy"), "{out}");
    h3.lobby_ok(&alice, &["rm", "pinned", "pinned-copy"]);
    assert_eq!(ls(&h2, &alice).len(), 3);
    for (args, says) in [
        (vec!["new", "--image", "tiny", "--on", "h9"], "no such host"),
        (vec!["rm", "vm1", "vm2"], "live on different hosts"),
    ] {
        let out = h2.ssh(&alice, "lobby", &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr_of(&out).contains(says),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }

    // `host ls` on any host shows the three, up, each with its VM (after a heartbeat).
    wait_until(
        "every host's heartbeat to count its VM",
        Duration::from_secs(20),
        || {
            let listed: Vec<Value> =
                serde_json::from_str(&h1.ok(&["host", "ls", "--json"])).expect("host ls --json");
            listed.len() == 3
                && listed
                    .iter()
                    .all(|h| h["up"] == true && h["running_vms"] == 1)
        },
    );

    // Into every VM through every front door: a VM another host runs is reached through the
    // host channel (mutual TLS), with its exit status, stdin and output intact.
    for (i, h) in [&h1, &h2, &h3].iter().enumerate() {
        let vm = format!("vm{}", i + 1);
        let out = h.ssh(
            &alice,
            &vm,
            &[
                "sh",
                "-c",
                &format!("'echo kept-on-{vm} > ~/mark && sync && cat ~/mark'"),
            ],
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("kept-on-{vm}")),
            "ssh {vm}@h{}: {}",
            i + 1,
            stderr_of(&out)
        );
    }
    for (i, h) in [&h1, &h2, &h3].iter().enumerate() {
        for j in 1..=3 {
            let vm = format!("vm{j}");
            let out = h.ssh(&alice, &vm, &["sh", "-c", "'cat ~/mark; exit 3'"]);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("kept-on-{vm}"),
                "ssh {vm}@h{}: {}",
                i + 1,
                stderr_of(&out)
            );
            assert_eq!(out.status.code(), Some(3), "ssh {vm}@h{}", i + 1);
        }
    }
    // Input crosses too: 1 MiB through h1 into vm3 on h3, counted there.
    let mut piped = Command::new("ssh")
        .args(h1.ssh_opts(&alice))
        .args(["-p", &h1.ssh_port.to_string(), &format!("vm3@{}", h1.addr)])
        .arg("wc -c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ssh");
    {
        use std::io::Write;
        let mut stdin = piped.stdin.take().expect("stdin");
        stdin.write_all(&vec![b'z'; 1 << 20]).expect("write");
    }
    let out = piped.wait_with_output().expect("ssh");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");

    // HTTPS to every VM through every front door: a VM another host runs is reached through
    // the host channel (mutual TLS). A share changed through one host is obeyed by every
    // host's edge at the next request.
    for (i, h) in [&h1, &h2, &h3].iter().enumerate() {
        let vm = format!("vm{}", i + 1);
        h.exec(
            &vm,
            &format!(
                "mkdir -p /www && echo hello-from-{vm} > /www/index.html && httpd -p 80 -h /www"
            ),
        );
        assert_eq!(get_through(&h2, &vm).0, "401", "{vm} before it is shared");
        h1.lobby_ok(&alice, &["share", "set-public", &vm]);
    }
    for h in [&h1, &h2, &h3] {
        for i in 1..=3 {
            let vm = format!("vm{i}");
            assert_eq!(
                get_through(h, &vm),
                ("200".to_string(), format!("hello-from-{vm}")),
                "{vm} through {}",
                h.addr
            );
        }
    }
    h3.lobby_ok(&alice, &["share", "set-private", "vm2"]);
    for h in [&h1, &h2, &h3] {
        assert_eq!(get_through(h, "vm2").0, "401", "through {}", h.addr);
    }

    // A running VM moves live to another host, asked through a third: its processes go on
    // (the same pid, still counting), its files and web server come along, every front door
    // finds it on its new host, and its old host runs no QEMU for it any more.
    // vm1's counter through a front door (0 when it cannot be read).
    let count = |h: &Daemon| {
        let out = h.ssh(&alice, "vm1", &["sh", "-c", "'cat /tmp/count'"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    let pid = h1.exec(
        "vm1",
        "echo 'echo $$ > /tmp/counter.pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done' > /tmp/counter.sh \
         && (setsid sh /tmp/counter.sh </dev/null >/dev/null 2>&1 &) ; sleep 1; cat /tmp/counter.pid",
    );
    let pid = pid.trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "counter pid: {pid:?}");
    // A session open on the old host ends with the move, but what it started runs on: its
    // output no longer waits for the old host's acknowledgements (the guest never saw that
    // host go, and 4 MB is past the flow-control window).
    let session_script = "'echo $$ > /tmp/session.pid; while [ ! -e /tmp/go ]; do sleep 0.1; done; \
                          head -c 4000000 /dev/zero; echo done > /tmp/session.done'";
    let mut session = Command::new("ssh")
        .args(h1.ssh_opts(&alice))
        .args(["-p", &h1.ssh_port.to_string(), &format!("vm1@{}", h1.addr)])
        .args(["sh", "-c", session_script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ssh");
    wait_until(
        "the session to start in vm1",
        Duration::from_secs(30),
        || !file_in(&h1, "vm1", "/tmp/session.pid").is_empty(),
    );
    let out = h3.lobby_ok(&alice, &["move", "vm1", "h2", "--json"]);
    let moved: Value = serde_json::from_str(&out).expect("move --json");
    eprintln!("live move: {moved}");
    assert_eq!(
        (
            moved["from"].as_str(),
            moved["to"].as_str(),
            moved["live"].as_bool()
        ),
        (Some("h1"), Some("h2"), Some(true)),
        "{moved}"
    );
    assert!(moved["paused_ms"].as_u64().is_some(), "{moved}");
    assert!(
        h1.qemu_pids().is_empty(),
        "h1 still runs a QEMU: {:?}",
        h1.qemu_pids()
    );
    // ...nor keeps its cgroup (the sender's QEMU may still be in it as it exits).
    let vm1 = find(&ls(&h2, &alice), "vm1").clone();
    let group = format!(
        "nook-h1/{}/{}",
        vm1["owner"].as_str().expect("owner"),
        vm1["id"].as_str().expect("id")
    );
    let groups: Vec<PathBuf> = [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(|root| PathBuf::from(root).join(&group))
    .collect();
    wait_until("h1 to remove vm1's cgroup", Duration::from_secs(10), || {
        groups.iter().all(|g| !g.exists())
    });
    for h in [&h1, &h2, &h3] {
        let vm1 = find(&ls(h, &alice), "vm1").clone();
        assert_eq!(
            (vm1["host"].as_str(), vm1["state"].as_str()),
            (Some("h2"), Some("running")),
            "{vm1}"
        );
        let probe =
            "'test -d /proc/$(cat /tmp/counter.pid) && cat /tmp/counter.pid ~/mark /tmp/count'";
        let out = h.ssh(&alice, "vm1", &["sh", "-c", probe]);
        let first = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(
            lines.get(..2),
            Some(&[pid.as_str(), "kept-on-vm1"][..]),
            "vm1 through {}: {first} {}",
            h.addr,
            stderr_of(&out)
        );
        let before = lines
            .get(2)
            .and_then(|c| c.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        wait_until(
            &format!("vm1's counter to go on after the move (it read {before})"),
            Duration::from_secs(30),
            || count(h) > before,
        );
        assert_eq!(
            get_through(h, "vm1"),
            ("200".to_string(), "hello-from-vm1".to_string()),
            "vm1 through {}",
            h.addr
        );
    }
    wait_until(
        "the old host's session to end",
        Duration::from_secs(30),
        || session.try_wait().ok().flatten().is_some(),
    );
    h2.exec("vm1", "touch /tmp/go");
    wait_until(
        "what vm1's session from the old host started to run to its end",
        Duration::from_secs(30),
        || file_in(&h2, "vm1", "/tmp/session.done") == "done",
    );
    // The moved VM's RAM is a memfd, as every VM's is (its forks here are instant): the live
    // copy filled in every page of it, and the zero pages are given back.
    let (vm1_id, size) = (
        vm1["id"].as_str().expect("id"),
        vm1["memory_mib"].as_u64().expect("memory_mib"),
    );
    wait_until(
        "vm1 on h2 to give back the pages its move filled in",
        Duration::from_secs(60),
        || {
            let held: u64 = common::qemu_pids_of_vm(vm1_id)
                .into_iter()
                .filter_map(common::rss_shmem_mib)
                .sum();
            held > 0 && held < size / 2
        },
    );
    // A stopped VM moves with its disk, and starts on its new host with its files.
    h2.lobby_ok(&alice, &["stop", "vm2"]);
    let out = h3.lobby_ok(&alice, &["move", "vm2", "h1", "--json"]);
    let moved: Value = serde_json::from_str(&out).expect("move --json");
    assert_eq!(
        (moved["to"].as_str(), moved["live"].as_bool()),
        (Some("h1"), Some(false)),
        "{moved}"
    );
    let vm2 = find(&ls(&h2, &alice), "vm2").clone();
    assert_eq!(
        (vm2["host"].as_str(), vm2["state"].as_str()),
        (Some("h1"), Some("stopped")),
        "{vm2}"
    );
    h2.lobby_ok(&alice, &["start", "vm2"]);
    let out = h3.ssh(&alice, "vm2", &["sh", "-c", "'cat ~/mark'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept-on-vm2");
    assert_eq!(h1.qemu_pids().len(), 1);
    for (args, says) in [
        (["move", "vm3", "h9"], "no such host"),
        (["move", "vm3", "h3"], "already"),
    ] {
        let out = h1.ssh(&alice, "lobby", &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr_of(&out).contains(says),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }

    // Draining h2 (asked on h3) moves its VM live to the roomiest other host (h1 and h3 tie;
    // the name decides), still counting, and leaves h2 with nothing.
    // A rolling upgrade takes one host at a time: drained (its VMs move live, reachable
    // through every front door meanwhile), restarted, back. vm1 is asked for through h3
    // all along; a request in flight at the switch may be cut, no more.
    let polling = std::sync::atomic::AtomicBool::new(true);
    let (out, (asked, missed)) = std::thread::scope(|s| {
        let poll = s.spawn(|| {
            let (mut asked, mut missed) = (0, Vec::new());
            while polling.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, body) = get_through(&h3, "vm1");
                asked += 1;
                if code != "200" || body != "hello-from-vm1" {
                    missed.push(format!("{code} {body}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (asked, missed)
        });
        let out = h3.ok(&["host", "drain", "h2"]);
        std::thread::sleep(Duration::from_millis(500));
        polling.store(false, std::sync::atomic::Ordering::Relaxed);
        (out, poll.join().expect("poller"))
    });
    eprintln!(
        "during the drain: {asked} requests to vm1 through h3, {} missed",
        missed.len()
    );
    assert!(
        asked >= 3 && missed.len() <= 1,
        "vm1 through h3 during the drain: {missed:?} of {asked}"
    );
    assert_eq!(get_through(&h3, "vm1").1, "hello-from-vm1");
    assert!(out.contains("host h2 is drained: 1 VMs moved"), "{out}");
    assert!(h2.qemu_pids().is_empty(), "h2 still runs a QEMU");
    let vm1 = find(&ls(&h2, &alice), "vm1").clone();
    assert_eq!(
        (vm1["host"].as_str(), vm1["state"].as_str()),
        (Some("h1"), Some("running")),
        "{vm1}"
    );
    let out = h2.ssh(&alice, "vm1", &["sh", "-c", "'cat /tmp/counter.pid'"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pid,
        "{}",
        stderr_of(&out)
    );
    assert!(h2.ok(&["host", "drain", "h2"]).contains("holds no VMs"));
    // The drain left h2 cordoned: nothing is placed there, asked for or not.
    for args in [
        vec!["new", "--image", "tiny", "--on", "h2"],
        vec!["cp", "vm1", "--on", "h2"],
        vec!["move", "vm2", "h2"],
    ] {
        let out = h3.ssh(&alice, "lobby", &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr_of(&out).contains("host 'h2' is cordoned"),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    // The drained host comes back on a schema a newer release has moved on (a migration it
    // does not know, as when another host was upgraded first): it starts, and serves.
    pg.psql(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101, 'from a newer release', true, '\\x00', 0)",
    );
    h2.restart();
    wait_until("h2 to serve again", Duration::from_secs(60), || {
        h2.nook(&["host", "ls", "--json"]).status.success()
    });
    let listed: Value = serde_json::from_str(&h1.ok(&["host", "ls", "--json"])).expect("json");
    assert!(
        listed
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["name"] == "h2" && h["up"] == true)),
        "{listed}"
    );
    assert_eq!(get_through(&h2, "vm1").1, "hello-from-vm1");
    // A restart keeps the cordon (it is the admin's word); uncordoned, h2 takes VMs again.
    let cordoned = |h: &Daemon| -> Value {
        let listed: Value = serde_json::from_str(&h.ok(&["host", "ls", "--json"])).expect("json");
        listed
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["name"] == "h2"))
            .map(|h| h["cordoned"].clone())
            .unwrap_or_default()
    };
    assert_eq!(cordoned(&h1), true);
    let metrics = h3.ok(&["metrics"]);
    assert!(
        metrics.contains("nook_host_cordoned{host=\"h2\"} 1")
            && metrics.contains("nook_host_cordoned{host=\"h1\"} 0"),
        "{metrics}"
    );
    assert!(
        h1.ok(&["host", "uncordon", "h2"])
            .contains("takes new VMs again")
    );
    assert_eq!(cordoned(&h3), false);

    // A clone asked for on another host is made where its source's layers are and moved
    // there live, saying what that cost: the fork runs on h2 with vm1's processes, and h1 keeps
    // no QEMU of it. vm1 came to h1 live (the drain), into memory it can share: the fork is
    // instant, with no copy of its RAM.
    let h1_qemus = h1.qemu_pids().len();
    let out = h3.lobby_ok(&alice, &["cp", "vm1", "vm1-fork", "--on", "h2", "--json"]);
    let cloned: Value = serde_json::from_str(&out).expect("cp --json");
    eprintln!("clone placed on another host: {cloned}");
    assert_eq!(
        (
            cloned["mode"].as_str(),
            cloned["vm"]["host"].as_str(),
            cloned["vm"]["state"].as_str(),
            cloned["moved"]["from"].as_str(),
            cloned["moved"]["to"].as_str(),
            cloned["timings"]["fork"].as_str(),
        ),
        (
            Some("fork"),
            Some("h2"),
            Some("running"),
            Some("h1"),
            Some("h2"),
            Some("instant")
        ),
        "{cloned}"
    );
    assert!(
        cloned["moved"]["disk_bytes_sent"].as_u64() > Some(0),
        "{cloned}"
    );
    let text = h1.lobby_ok(&alice, &["cp", "vm2", "vm2-copy", "--on", "h3"]);
    assert!(
        text.contains("on host h3: made on h1") && text.contains("of disk sent"),
        "{text}"
    );
    let out = h1.ssh(
        &alice,
        "vm1-fork",
        &[
            "sh",
            "-c",
            "'test -d /proc/$(cat /tmp/counter.pid) && cat /tmp/counter.pid ~/mark'",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [pid.as_str(), "kept-on-vm1"],
        "{}",
        stderr_of(&out)
    );
    assert_eq!(find(&ls(&h3, &alice), "vm2-copy")["host"], "h3");
    // (A source moves into memory of its own after its fork: two QEMUs of it for a moment.)
    wait_until(
        "h1 to keep no QEMU of a clone that left",
        Duration::from_secs(30),
        || h1.qemu_pids().len() == h1_qemus,
    );
    assert_eq!(h2.qemu_pids().len(), 1);
    h2.lobby_ok(&alice, &["rm", "vm1-fork"]);
    h2.lobby_ok(&alice, &["rm", "vm2-copy"]);
    assert!(h2.qemu_pids().is_empty(), "h2 still runs a QEMU");

    // h1's daemon dies alone; its QEMUs run on (as across any restart), but once their leases
    // could lapse, the fence watch it left has stopped them: their vCPUs run nothing, so no
    // other host could ever run one of them twice. The restarted daemon takes the leases
    // back, and they go on where they stood.
    let mut qemus = h1.qemu_pids();
    qemus.sort();
    assert_eq!(qemus.len(), 2, "vm1 and vm2 on h1");
    h1.kill9();
    let killed = std::time::Instant::now();
    wait_until(
        "the fence watch to stop h1's QEMUs",
        Duration::from_secs(25),
        || qemus.iter().all(|pid| process_state(*pid) == Some('T')),
    );
    let stopped_after = killed.elapsed();
    eprintln!("h1's QEMUs stopped {stopped_after:?} after its daemon died");
    assert!(
        stopped_after >= Duration::from_secs(5),
        "stopped while the leases still ran: {stopped_after:?}"
    );
    let ticks: Vec<u64> = qemus.iter().map(|pid| vcpu_ticks(*pid)).collect();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        qemus.iter().map(|pid| vcpu_ticks(*pid)).collect::<Vec<_>>(),
        ticks,
        "a stopped QEMU's vCPUs ran"
    );
    h1.restart();
    wait_until("h1's QEMUs to go on", Duration::from_secs(60), || {
        qemus
            .iter()
            .all(|pid| process_state(*pid).is_some_and(|s| s != 'T'))
    });
    let mut adopted = h1.qemu_pids();
    adopted.sort();
    assert_eq!(adopted, qemus, "h1 re-adopted the same QEMUs");
    // Polled rather than read once after a fixed sleep: on a loaded host the resumed guest
    // and the SSH round trips can take longer than the counter's period (CI lost a run to a
    // single read 1.5 s later).
    let mut before = 0;
    wait_until(
        "vm1's counter through h2 after the restart",
        Duration::from_secs(30),
        || {
            before = count(&h2);
            before > 0
        },
    );
    wait_until(
        "vm1's counter to go on after the restart",
        Duration::from_secs(30),
        || count(&h3) > before,
    );

    // PostgreSQL restarted under the hosts: requests fail cleanly meanwhile, the VMs run on,
    // and afterwards every host serves again with nothing lost.
    pg.kill();
    let out = h1.ssh(&alice, "lobby", &["ls"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cannot reach its database"),
        "{}",
        stderr_of(&out)
    );
    pg.start_again();
    for h in [&h1, &h2, &h3] {
        wait_until(
            "the host to use the database again",
            Duration::from_secs(30),
            || h.ssh(&alice, "lobby", &["ls"]).status.success(),
        );
        assert_eq!(ls(h, &alice).len(), 3);
    }
    let out = h1.ssh(&alice, "vm1", &["sh", "-c", "'cat ~/mark'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept-on-vm1");

    // h3 dies with its QEMUs. The others mark it down, show its VM as unavailable with the
    // reason, and refuse to act on it with a clean error.
    let h3_qemus = h3.qemu_pids();
    assert_eq!(h3_qemus.len(), 1, "{h3_qemus:?}");
    h3.kill9();
    for pid in h3_qemus {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    for h in [&h1, &h2] {
        wait_until(
            "vm3 to show as unavailable",
            Duration::from_secs(40),
            || find(&ls(h, &alice), "vm3")["state"] == "unavailable",
        );
        let vm3 = find(&ls(h, &alice), "vm3").clone();
        let why = vm3["state_reason"].as_str().unwrap_or_default();
        assert!(
            why.contains("'h3' is down") && why.contains("it was running"),
            "{vm3}"
        );
        assert_eq!(find(&ls(h, &alice), "vm1")["state"], "running");
    }
    let listed: Vec<Value> =
        serde_json::from_str(&h1.ok(&["host", "ls", "--json"])).expect("host ls --json");
    let h3_row = listed
        .iter()
        .find(|h| h["name"] == "h3")
        .expect("h3 listed");
    assert_eq!(h3_row["up"], false, "{h3_row}");
    for args in [["start", "vm3"], ["stop", "vm3"]] {
        let out = h1.ssh(&alice, "lobby", &args);
        assert!(!out.status.success());
        let err = stderr_of(&out);
        assert!(
            err.contains("vm3") && err.contains("unavailable") && err.contains("'h3' is down"),
            "{args:?}: {err}"
        );
    }
    let out = h2.ssh(&alice, "vm3", &["true"]);
    assert!(
        stderr_of(&out).contains("'h3' is down"),
        "{}",
        stderr_of(&out)
    );
    // Without a replica there is nothing to bring it back from elsewhere.
    let out = h2.ssh(&alice, "lobby", &["start", "vm3", "--on", "h1"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("it has no replica"),
        "{}",
        stderr_of(&out)
    );

    // h3 comes back: its VM is its own again (stopped by the crash), and starts there.
    h3.restart();
    wait_until("h3 to be up again", Duration::from_secs(40), || {
        find(&ls(&h1, &alice), "vm3")["state"] != "unavailable"
    });
    let vm3 = find(&ls(&h1, &alice), "vm3").clone();
    assert_eq!(vm3["state"], "failed", "{vm3}");
    h3.lobby_ok(&alice, &["start", "vm3"]);
    let out = h3.ssh(&alice, "vm3", &["sh", "-c", "'cat ~/mark'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept-on-vm3");

    // vm3 (on h3) gets a replica on h1, asked through h2. What it writes after the replica is
    // what a restore from it loses.
    let out = h2.lobby_ok(&alice, &["replicate", "vm3", "h1", "--json"]);
    let replica: Value = serde_json::from_str(&out).expect("replicate --json");
    assert_eq!(replica["host"], "h1", "{replica}");
    assert!(replica["bytes_sent"].as_u64() > Some(0), "{replica}");
    let out = h3.ssh(
        &alice,
        "vm3",
        &["sh", "-c", "'echo after-the-replica > ~/late && sync'"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));

    // h3 is cut off by nftables (everything through its one link dropped). It pauses vm3
    // before its lease can lapse: from then on the QEMU's vCPU threads run nothing.
    let h3_qemu = h3.qemu_pids();
    assert_eq!(h3_qemu.len(), 1, "{h3_qemu:?}");
    let h3_qemu = h3_qemu[0];
    let ns3 = FleetNet::ns(3);
    nft_in(&ns3, "add table inet cut");
    nft_in(
        &ns3,
        "add chain inet cut o { type filter hook output priority 0; policy accept; }",
    );
    nft_in(
        &ns3,
        "add chain inet cut i { type filter hook input priority 0; policy accept; }",
    );
    nft_in(&ns3, "add rule inet cut o oifname eth0 drop");
    nft_in(&ns3, "add rule inet cut i iifname eth0 drop");
    for h in [&h1, &h2] {
        wait_until(
            "vm3 to show as unavailable",
            Duration::from_secs(40),
            || find(&ls(h, &alice), "vm3")["state"] == "unavailable",
        );
    }
    let paused_at = vcpu_ticks(h3_qemu);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        vcpu_ticks(h3_qemu),
        paused_at,
        "the cut-off host's vm3 still runs"
    );

    // While h3's lease may still run, a restore is refused; once it lapsed, h1 brings vm3 back
    // from the replica: the files of the replica are there, what came after is not.
    let mut restored = None;
    wait_until(
        "a restore from the replica",
        Duration::from_secs(30),
        || {
            let out = h2.ssh(&alice, "lobby", &["start", "vm3", "--on", "h1", "--json"]);
            if out.status.success() {
                restored = Some(String::from_utf8_lossy(&out.stdout).into_owned());
                return true;
            }
            let err = stderr_of(&out);
            assert!(err.contains("lease"), "{err}");
            false
        },
    );
    let restored: Value =
        serde_json::from_str(&restored.unwrap_or_default()).expect("start --json");
    assert!(
        restored["restored_from_replica_ms"].as_i64() > Some(0),
        "{restored}"
    );
    let vm3 = find(&ls(&h2, &alice), "vm3").clone();
    assert_eq!(
        (vm3["host"].as_str(), vm3["state"].as_str()),
        (Some("h1"), Some("running")),
        "{vm3}"
    );
    let out = h2.ssh(
        &alice,
        "vm3",
        &["sh", "-c", "'cat ~/mark; test -e ~/late && echo late-too'"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kept-on-vm3",
        "{}",
        stderr_of(&out)
    );

    // The cut heals. h3's renewal is refused (h1 holds the lease at a higher epoch), so it
    // kills its paused QEMU: it never ran vm3 again. vm3 runs on at h1.
    let mut watched = 0;
    nft_in(&ns3, "delete table inet cut");
    wait_until("h3 to end its old vm3", Duration::from_secs(40), || {
        let ticks = vcpu_ticks(h3_qemu);
        if !std::path::Path::new(&format!("/proc/{h3_qemu}")).exists() {
            return true;
        }
        assert_eq!(ticks, paused_at, "the cut-off host ran vm3 again");
        watched += 1;
        false
    });
    eprintln!("watched h3's old QEMU {watched} times until it ended");
    let vm3 = find(&ls(&h3, &alice), "vm3").clone();
    assert_eq!(
        (vm3["host"].as_str(), vm3["state"].as_str()),
        (Some("h1"), Some("running")),
        "{vm3}"
    );
    let out = h3.ssh(&alice, "vm3", &["sh", "-c", "'cat ~/mark'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept-on-vm3");

    drop((h1, h2, h3));
    drop(net);
    for i in 1..=3 {
        remove_cgroup_top(&format!("nook-h{i}"));
    }
}

/// A process's state letter (`R`, `S`, `T` for stopped, ...), while it exists.
/// What the file at `path` in `vm` holds, trimmed; empty when there is no such file.
fn file_in(h: &Daemon, vm: &str, path: &str) -> String {
    h.exec(vm, &format!("cat {path} 2>/dev/null; true"))
        .trim()
        .to_string()
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Runs one `nft` command in network namespace `ns`.
fn nft_in(ns: &str, command: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(command.split(' '))
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "nft {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU time (clock ticks) spent by QEMU `pid`'s vCPU threads: the only threads that run guest
/// instructions.
fn vcpu_ticks(pid: u32) -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("CPU ") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields
            .get(11)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        ticks += fields
            .get(12)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ticks
}

/// Removes a host's (empty) cgroup top from every hierarchy, deepest groups first.
fn remove_cgroup_top(top: &str) {
    fn rmdir_tree(dir: &std::path::Path) {
        for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if sub.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&sub.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    rmdir_tree(&PathBuf::from("/sys/fs/cgroup").join(top));
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        rmdir_tree(&hierarchy.path().join(top));
    }
}
