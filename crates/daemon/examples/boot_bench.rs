//! Benchmark: `nook vm create` (create-to-ready) against a raw `qemu-system-x86_64` boot of
//! the same image, kernel, initrd and devices to the same readiness marker (the guest agent's
//! answer to a hello), plus the daemon's and QEMU's RSS per VM.
//!
//! Run as root after `scripts/build release` and building the tiny image:
//!   cargo run --release -p nook-daemon --example boot_bench -- [ROUNDS]
//! Env: NOOK_BIN (default target/release/nook), NOOK_IMAGES_DIR (default
//! /var/cache/nook-test/images), NOOK_AGENT, NOOK_ACCEL (default auto).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nook_storage::{ImageKind, ImageStore};
use nook_vmm::{AgentClient, LaunchSpec, NetBackend, Qemu, VmPaths};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn qemu_pid_under(dir: &std::path::Path) -> Option<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("qemu-system") && cmd.contains(&needle)).then_some(pid)
    })
}

#[tokio::main]
async fn main() -> anyhow_free::Result {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let nook = std::env::var_os("NOOK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/nook"));
    let images = std::env::var_os("NOOK_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/nook-test/images".into());
    let agent = std::env::var_os("NOOK_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/x86_64-unknown-linux-gnu/release/nook-guest-agent"));
    let tmp = std::env::temp_dir().join(format!("nook-bench-{}", std::process::id()));
    let data = tmp.join("data");
    std::fs::create_dir_all(&data)?;

    // --- nook ---
    let log = std::fs::File::create(tmp.join("daemon.log"))?;
    let mut daemon = Command::new(&nook)
        .arg("serve")
        .env("NOOK_DATA_DIR", &data)
        .env("NOOK_IMAGES_DIR", &images)
        .env("NOOK_AGENT", &agent)
        .env(
            "NOOK_ACCEL",
            std::env::var("NOOK_ACCEL").unwrap_or_else(|_| "auto".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    while !data.join("nook.sock").exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle_rss = rss_kib(daemon.id());
    let cli = |args: &[&str]| {
        Command::new(&nook)
            .args(args)
            .env("NOOK_DATA_DIR", &data)
            .output()
    };
    // One warm-up create absorbs the accelerator probe and the initrd cache.
    cli(&["vm", "create", "--image", "tiny", "--name", "warm"])?;
    let mut nook_secs = Vec::new();
    let (mut daemon_rss, mut qemu_rss) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let name = format!("bench{i}");
        let t = Instant::now();
        let out = cli(&["vm", "create", "--image", "tiny", "--name", &name])?;
        nook_secs.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            return Err(format!("create failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
    }
    let base_rss = rss_kib(daemon.id());
    if let Some(pid) = qemu_pid_under(&data) {
        qemu_rss.push(rss_kib(pid));
    }
    daemon_rss.push(base_rss);
    let vms = rounds + 1;
    for i in 0..rounds {
        cli(&["vm", "rm", &format!("bench{i}")])?;
    }
    cli(&["vm", "rm", "warm"])?;
    let _ = daemon.kill();
    let _ = daemon.wait();

    // --- raw QEMU, same image and devices, same marker ---
    let image = ImageStore::new(&images).image(ImageKind::Tiny)?;
    let initrd = nook_storage::initrd_with_agent(&image, &agent, &tmp)?;
    let qemu = Qemu::locate(None)?;
    let accel = nook_vmm::probe_accel(&qemu.binary, &image.kernel, &tmp).await;
    let mut raw_secs = Vec::new();
    let mut raw_hangs = 0;
    for i in 0..rounds {
        let paths = VmPaths::new(tmp.join(format!("raw{i}")));
        std::fs::create_dir_all(&paths.dir)?;
        nook_storage::disk::create_overlay(
            &image.rootfs,
            &paths.disk(),
            image.rootfs_virtual_bytes,
        )?;
        let cmdline = format!(
            "console=ttyS0 root=/dev/vda rw nook.hostname=raw nook.init={}",
            image.init
        );
        let spec = LaunchSpec {
            id: format!("raw{i}"),
            paths: paths.clone(),
            cpus: 1,
            memory_mib: image.default_memory_mib,
            kernel: image.kernel.clone(),
            initrd: initrd.clone(),
            cmdline,
            net: NetBackend::User {
                netdev: nook_net::user_mode_netdev("net0"),
                mac: "02:6e:6b:ff:ff:ff".into(),
            },
            accel,
            reclaim: true,
            incoming: false,
        };
        let mut args = Qemu::args(&spec);
        // Plain foreground QEMU: no daemonizing, no pidfile.
        let cut = args
            .iter()
            .position(|a| a == "-pidfile")
            .unwrap_or(args.len());
        args.truncate(cut);
        // A raw boot that hangs silently (a known TCG hazard) is retried and counted,
        // exactly as nook's boot watchdog does.
        let (elapsed, mut child) = loop {
            let _ = std::fs::remove_file(paths.agent_socket());
            let t = Instant::now();
            let mut child = Command::new(&qemu.binary)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let client = loop {
                if let Ok(c) = AgentClient::connect(&paths.agent_socket()).await {
                    break c;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            match client.wait_ready(Duration::from_secs(20)).await {
                Ok(_) => break (t.elapsed().as_secs_f64(), child),
                Err(_) => {
                    raw_hangs += 1;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        };
        raw_secs.push(elapsed);
        if i == 0 {
            qemu_rss.push(rss_kib(child.id()));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let (n, r) = (median(nook_secs.clone()), median(raw_secs.clone()));
    println!("accelerator: {}", accel.qemu_arg());
    println!("nook vm create (tiny) to ready: median {n:.3}s over {rounds} ({nook_secs:.2?})");
    println!("raw qemu boot to the same marker: median {r:.3}s over {rounds} ({raw_secs:.2?})");
    println!(
        "ratio nook/raw: {:.2} (raw boots that hung and were retried: {raw_hangs})",
        n / r
    );
    println!(
        "daemon RSS with {vms} VMs: {} KiB ({} KiB at start); per VM ≈ {} KiB",
        base_rss,
        idle_rss,
        base_rss.saturating_sub(idle_rss) / vms as u64
    );
    println!("QEMU RSS per tiny VM (nook-launched, raw): {qemu_rss:?} KiB");
    Ok(())
}

/// The example avoids an anyhow dependency in a library crate.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
