//! System test (root, real guests, the real OpenSSH client): guests and clients that flood.
//! A guest writing to its console without end, a guest sending garbage down its agent port at
//! full speed, and a lobby client that stops reading a setup script's output, all at once:
//! the daemon's memory and the data dir must stay bounded, and the daemon must stay usable.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Key};

/// How long the floods run together.
const FLOOD: Duration = Duration::from_secs(60);
/// The most the daemon's resident memory may grow while they do.
const RSS_GROWTH_MAX: u64 = 96 << 20;
/// The most the data dir may grow by, disks aside: the console rings (2 × 1 MiB per VM),
/// QEMU's kept stderr and the logs.
const DATA_GROWTH_MAX: u64 = 16 << 20;

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .unwrap_or(0)
}

/// Bytes under `dir`, disk images aside (a guest's disk is bounded by its plan, not here).
fn data_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += data_bytes(&path);
        } else if path.extension().is_none_or(|e| e != "qcow2") {
            total += meta.len();
        }
    }
    total
}

#[test]
fn vm_flood_of_console_garbage_frames_and_a_stalled_client_keeps_the_daemon_bounded() {
    let d = Daemon::start();
    let key = Key::new("flood");
    d.signup(&key, "flood@example.com");
    d.create_tiny("loud");
    d.create_tiny("garbage");
    let rss_before = rss(d.pid());
    let data_before = data_bytes(&d.data_dir);

    // 1. The console: 1 MiB at a time, counted, up to 1 GiB. (Under TCG the emulated UART
    // passes 0.1-0.3 MiB/s, depending on what else the host runs, so a minute writes 7-18
    // MiB, several times the 2 MiB a console keeps: its log and one rotated copy.)
    d.exec(
        "loud",
        "(i=0; while [ $i -lt 1024 ]; do head -c 1048576 /dev/zero | tr '\\0' x > /dev/ttyS0; i=$((i+1)); echo $i > /tmp/mib; done) </dev/null >/dev/null 2>&1 &",
    );
    // 2. Garbage frames: the agent is killed (and its respawns too) and its port is filled
    // with random bytes at full speed (some 20 MB/s here).
    d.exec(
        "garbage",
        "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = org.nook.agent.0 ] && port=/dev/${p##*/}; done; \
         (sleep 1; while :; do killall -9 nook-agent 2>/dev/null; cat /dev/urandom > $port 2>/dev/null; done) </dev/null >/dev/null 2>&1 &",
    );
    // 3. A client that stops reading: a setup script that prints without end, whose ssh's
    // stdout is a pipe nobody reads.
    let mut stalled = Command::new("ssh")
        .args(d.ssh_opts(&key))
        .args(["-p", &d.ssh_port.to_string(), "lobby@127.0.0.1"])
        .args([
            "new",
            "--image",
            "tiny",
            "--name",
            "talk",
            "--setup-script",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh");
    stalled
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"yes nook-setup-flood-line-that-nobody-reads\n")
        .expect("script");

    let started = Instant::now();
    let mut rss_peak = rss_before;
    let mut data_peak = data_before;
    while started.elapsed() < FLOOD {
        std::thread::sleep(Duration::from_secs(1));
        rss_peak = rss_peak.max(rss(d.pid()));
        data_peak = data_peak.max(data_bytes(&d.data_dir));
    }
    let console_mib: u64 = d
        .exec("loud", "cat /tmp/mib 2>/dev/null || echo 0")
        .trim()
        .parse()
        .unwrap_or(0);
    // The script still runs, held up by the client that stopped reading, not finished or
    // buffered away.
    let yes = d.exec("talk", "pidof yes || true");
    assert!(
        !yes.trim().is_empty(),
        "the setup script is not running in 'talk'"
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
    eprintln!(
        "flood for {}s: console {console_mib} MiB; daemon RSS {} -> peak {} MiB; data dir (disks aside) {} -> peak {} KiB",
        FLOOD.as_secs(),
        rss_before >> 20,
        rss_peak >> 20,
        data_before >> 10,
        data_peak >> 10
    );
    // Twice what a console keeps is enough to show the rotation, not the disk, takes the flood.
    assert!(
        console_mib >= 4,
        "the console flood hardly ran ({console_mib} MiB)"
    );
    assert!(
        rss_peak < rss_before + RSS_GROWTH_MAX,
        "the daemon grew from {} to {} MiB",
        rss_before >> 20,
        rss_peak >> 20
    );
    assert!(
        data_peak < data_before + DATA_GROWTH_MAX,
        "the data dir grew from {} to {} KiB",
        data_before >> 10,
        data_peak >> 10
    );

    // The daemon still serves, and every VM can be removed.
    let names: Vec<String> = d
        .list()
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert!(names.contains(&"loud".to_string()), "{names:?}");
    for name in names {
        d.ok(&["vm", "rm", &name]);
    }
    assert!(d.list().is_empty());
}
