//! Benchmark: `nook vm create` (create-to-ready) against a raw `qemu-system-x86_64` boot of
//! the same image, kernel, initrd and devices to the same readiness marker, plus the daemon's
//! and QEMU's RSS per VM.
//!
//! The marker: the guest agent answers a hello; for an image with sshd (`default`) also the
//! guest's sshd listening on port 22, after the host gave the guest its SSH host keys (as nook
//! does, in `Identify`).
//! - nook: `nook vm create` returns once the agent answered, took its identity and nook's SSH
//!   key; with tap networking the daemon also waits for port 22 itself. With user networking
//!   (`NOOK_NET=user`, no route to the guest) the bench then waits, through `nook vm exec`, for
//!   a listening socket on port 22 in the guest: an upper bound, one exec round trip late.
//! - raw: QEMU with nook's own argument list, user networking with a host port forwarded to
//!   the guest's 22; the bench sends the agent the same `Identify` (host keys included) and
//!   waits until a connection through the forward is accepted in the guest.
//!
//! Run as root after `scripts/build release` and building the image:
//!   cargo run --release -p nook-daemon --example boot_bench -- [--image tiny|default] [ROUNDS]
//! (`bench/boot.sh` runs it for the default image.)
//! Env: NOOK_BIN (default target/release/nook), NOOK_IMAGES_DIR (default
//! /var/cache/nook-test/images), NOOK_AGENT, NOOK_ACCEL (default auto); the daemon inherits
//! the rest of the environment (NOOK_NET, NOOK_SSH_ADDR, ...).

use std::io::Read;
use std::net::TcpStream;
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

/// A free TCP port on 127.0.0.1 for QEMU's forward to the guest's sshd.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// True when something in the guest accepts a connection on port 22 through the forward, as
/// nook's own readiness check (a TCP connect) sees it. slirp accepts the host side of a forward
/// at once and only then connects to the guest: a guest with nothing listening resets that, and
/// slirp closes our side (end of file), while a guest that accepted keeps it open (sshd sends
/// its banner once it has forked for the connection).
fn ssh_accepts(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 4];
    match s.read(&mut buf) {
        Ok(n) => n > 0,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Waits in the guest (one `nook vm exec`) until something listens on TCP port 22, reading
/// /proc/net/tcp{,6} with bash builtins (and sleeping on a pipe that never has data) so that
/// the wait itself starts no processes.
const WAIT_SSHD: &str = r#"exec 3<> <(:); while :; do for f in /proc/net/tcp /proc/net/tcp6; do while read -r _ l _ s _; do case "$l:$s" in *:0016:0A) exit 0;; esac; done < "$f"; done; read -rt 0.05 -u 3 || :; done"#;

#[tokio::main]
async fn main() -> anyhow_free::Result {
    let mut rounds: usize = 5;
    let mut kind = ImageKind::Tiny;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--image" => kind = args.next().ok_or("--image needs a name")?.parse()?,
            n => rounds = n.parse().map_err(|_| format!("not a round count: {n}"))?,
        }
    }
    let image_name = kind.name();
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
    let image = ImageStore::new(&images).image(kind)?;
    // The default image runs sshd; readiness includes it.
    let sshd = kind == ImageKind::Default;
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
    cli(&["vm", "create", "--image", image_name, "--name", "warm"])?;
    // A systemd guest goes on booting (for half a minute under TCG) after it is ready; the
    // next create must not share the CPU with that, any more than the raw boots below do. So
    // for such an image each VM is removed after its round (the last one after its
    // systemd-analyze), and the RSS figures cover the VMs left.
    let one_at_a_time = sshd;
    if one_at_a_time {
        cli(&["vm", "rm", "warm"])?;
    }
    let mut nook_secs = Vec::new();
    let mut create_secs = Vec::new();
    let (mut daemon_rss, mut qemu_rss) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let name = format!("bench{i}");
        let t = Instant::now();
        let out = cli(&["vm", "create", "--image", image_name, "--name", &name])?;
        create_secs.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            return Err(format!("create failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        if sshd {
            let out = cli(&["vm", "exec", &name, "--", "bash", "-c", WAIT_SSHD])?;
            if !out.status.success() {
                return Err(format!(
                    "waiting for sshd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
        }
        nook_secs.push(t.elapsed().as_secs_f64());
        if one_at_a_time && i + 1 < rounds {
            cli(&["vm", "rm", &name])?;
        }
    }
    let base_rss = rss_kib(daemon.id());
    if let Some(pid) = qemu_pid_under(&data) {
        qemu_rss.push(rss_kib(pid));
    }
    daemon_rss.push(base_rss);
    let vms = if one_at_a_time { 1 } else { rounds + 1 };
    if sshd && rounds > 0 {
        // How the last guest's boot went, once systemd calls it finished.
        let last = format!("bench{}", rounds - 1);
        let script = "until systemd-analyze >/dev/null 2>&1; do sleep 1; done; systemd-analyze; \
                      echo; systemd-analyze critical-chain nook-agent.service ssh.service; \
                      echo; systemd-analyze blame | head -n 15";
        let out = cli(&["vm", "exec", &last, "--", "sh", "-c", script])?;
        println!("--- systemd in {last} (one run) ---");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!("---");
    }
    if one_at_a_time {
        cli(&["vm", "rm", &format!("bench{}", rounds.saturating_sub(1))])?;
    } else {
        for i in 0..rounds {
            cli(&["vm", "rm", &format!("bench{i}")])?;
        }
        cli(&["vm", "rm", "warm"])?;
    }
    let _ = daemon.kill();
    let _ = daemon.wait();

    // --- raw QEMU, same image and devices, same marker ---
    let initrd = nook_storage::initrd_with_agent(&image, &agent, &tmp)?;
    let qemu = Qemu::locate(None)?;
    let accel = nook_vmm::probe_accel(&qemu.binary, &image.kernel, &tmp).await;
    let mut raw_secs = Vec::new();
    let mut raw_hangs = 0;
    // A silent hang shows as no answer at all; a full systemd boot under TCG takes a while.
    let answer_within = Duration::from_secs(if sshd { 90 } else { 20 });
    for i in 0..rounds {
        let paths = VmPaths::new(tmp.join(format!("raw{i}")));
        std::fs::create_dir_all(&paths.dir)?;
        // As nook makes a VM's disk: the image's default size (the agent grows the
        // filesystem into it in the background, in both cases).
        nook_storage::disk::create_overlay(
            &image.rootfs,
            &paths.disk(),
            image.default_disk_bytes.max(image.rootfs_virtual_bytes),
        )?;
        // The words nook gives a VM with user networking.
        let boot = nook_proto::BootConfig {
            hostname: format!("raw{i}"),
            ip: Some("10.0.2.15/24".into()),
            gateway: Some("10.0.2.2".into()),
            dns: None,
            init: Some(image.init.clone()),
        };
        let cmdline = format!(
            "console=ttyS0 root=/dev/vda rw net.ifnames=0 {}",
            boot.to_cmdline()
        );
        let ssh_port = free_port()?;
        let mut netdev = nook_net::user_mode_netdev("net0");
        if sshd {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"));
        }
        let spec = LaunchSpec {
            id: format!("raw{i}"),
            paths: paths.clone(),
            cpus: 1,
            memory_mib: image.default_memory_mib,
            // Raw QEMU's own anonymous RAM: the baseline nook's memfd RAM is measured against.
            ram: None,
            disk: paths.disk(),
            disk_fd: None,
            successor: false,
            kernel: image.kernel.clone(),
            initrd: initrd.clone(),
            cmdline,
            net: NetBackend::User {
                netdev,
                mac: "02:6e:6b:ff:ff:ff".into(),
            },
            accel,
            // Raw QEMU's own translation cache, as a user running it by hand has.
            tcg_cache_mib: None,
            reclaim: true,
            incoming: false,
            hold: false,
            jail: None,
        };
        // nook hands QEMU its sockets already bound; a plain QEMU makes them itself, and
        // writes its console to a file.
        let agent = paths.agent_socket().display().to_string();
        let console = paths.console_log().display().to_string();
        let mut args: Vec<String> = Vec::new();
        let mut given = Qemu::args(&spec).into_iter();
        while let Some(arg) = given.next() {
            if arg.starts_with("socket,id=agent,") {
                args.push(format!("socket,id=agent,path={agent},server=on,wait=off"));
            } else if arg.starts_with("socket,id=console,") {
                args.push(format!("file,id=console,path={console}"));
            } else if arg.starts_with("socket,id=qmp,") {
                // Drops the `-chardev` before it and the `-mon` pair after it: no monitor.
                args.pop();
                given.next();
                given.next();
            } else {
                args.push(arg);
            }
        }
        // A raw boot that hangs silently (a known TCG hazard) is retried and counted,
        // exactly as nook's boot watchdog does.
        let (t, client, mut child) = loop {
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
            match client.wait_ready(answer_within).await {
                Ok(_) => break (t, client, child),
                Err(_) => {
                    raw_hangs += 1;
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        };
        if sshd {
            let keys = nook_sshd::generate_guest_host_keys(&format!("root@raw{i}"))?;
            let identity = nook_proto::Identity {
                vm_id: format!("raw{i}"),
                hostname: format!("raw{i}"),
                ip: Some("10.0.2.15/24".into()),
                gateway: Some("10.0.2.2".into()),
                dns: None,
                mac: Some("02:6e:6b:ff:ff:ff".into()),
                seed: vec![7; 32],
                ssh_host_keys: keys
                    .into_iter()
                    .map(|k| nook_proto::SshHostKey {
                        kind: k.kind.to_string(),
                        private_openssh: k.private_openssh,
                        public_openssh: k.public_openssh,
                    })
                    .collect(),
                // The same work as nook's boot: its relay key goes in with the identity.
                authorized_key: Some(nook_proto::AuthorizedKey {
                    user: "nook".into(),
                    public_openssh: nook_sshd::generate_client_key("raw")?.public_openssh,
                }),
            };
            client.identify(identity).await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let accepted = loop {
                let at = t.elapsed();
                if ssh_accepts(ssh_port) {
                    break at;
                }
                if Instant::now() >= deadline {
                    return Err("raw boot: sshd did not listen within 60 s of Identify".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            raw_secs.push(accepted.as_secs_f64());
        } else {
            raw_secs.push(t.elapsed().as_secs_f64());
        }
        if i == 0 {
            qemu_rss.push(rss_kib(child.id()));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let (n, r) = (median(nook_secs.clone()), median(raw_secs.clone()));
    let marker = if sshd {
        "agent answers and sshd listens"
    } else {
        "agent answers"
    };
    println!("accelerator: {}", accel.qemu_arg());
    println!("ready = {marker}");
    if sshd {
        println!(
            "nook vm create ({image_name}) returned: median {:.3}s over {rounds} ({create_secs:.2?})",
            median(create_secs.clone())
        );
    }
    println!(
        "nook vm create ({image_name}) to ready: median {n:.3}s over {rounds} ({nook_secs:.2?})"
    );
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
    println!("QEMU RSS per {image_name} VM (nook-launched, raw): {qemu_rss:?} KiB");
    Ok(())
}

/// The example avoids an anyhow dependency in a library crate.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}
