//! System test (root, real QEMU guests): memory tiers. With `--pack dense`, an idle VM's
//! memory moves out of RAM into the tiers nook set up (zswap's compressed pool in front of a
//! swap file where the kernel has zswap, zram otherwise), and comes back intact when the VM
//! touches it again.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Key};

const ZSWAP: &str = "/sys/module/zswap/parameters";
const ZSWAP_KNOBS: [&str; 4] = [
    "enabled",
    "compressor",
    "max_pool_percent",
    "shrinker_enabled",
];

/// Takes down the swap a daemon of this test set up, and puts zswap's settings back, so the
/// host is as it was.
struct SwapCleanup {
    data_dir: std::path::PathBuf,
    zswap_before: Vec<(&'static str, String)>,
}

impl SwapCleanup {
    fn new(data_dir: std::path::PathBuf) -> SwapCleanup {
        let zswap_before = ZSWAP_KNOBS
            .iter()
            .filter_map(|k| {
                let v = std::fs::read_to_string(format!("{ZSWAP}/{k}")).ok()?;
                Some((*k, v.trim().to_string()))
            })
            .collect();
        SwapCleanup {
            data_dir,
            zswap_before,
        }
    }
}

impl Drop for SwapCleanup {
    fn drop(&mut self) {
        for (k, v) in &self.zswap_before {
            let _ = std::fs::write(format!("{ZSWAP}/{k}"), v);
        }
        if let Ok(n) = std::fs::read_to_string(self.data_dir.join("zram-device")) {
            let n = n.trim();
            let _ = std::process::Command::new("swapoff")
                .arg(format!("/dev/zram{n}"))
                .status();
            let _ = std::fs::write("/sys/class/zram-control/hot_remove", n);
        }
        let file = self.data_dir.join("swapfile");
        if file.exists() {
            let _ = std::process::Command::new("swapoff").arg(&file).status();
        }
    }
}

fn stat(d: &Daemon, key: &Key, vm: &str) -> serde_json::Value {
    serde_json::from_str(&d.lobby_ok(key, &["stat", vm, "--json"])).expect("stat --json")
}

#[test]
fn vm_memory_tiers_move_an_idle_vms_memory_down_the_tiers_and_back_intact() {
    // The swap is taken down even when the daemon fails to start after setting it up.
    let tmp = common::sys_tempdir();
    let data_dir = tmp.path().join("data");
    let _cleanup = SwapCleanup::new(data_dir.clone());
    let d = Daemon::start_in(data_dir, None, &["--pack", "dense", "--idle-after", "4"]);
    let log = d.log_text();
    assert!(
        log.contains("memory tiers: pack dense, "),
        "the daemon did not say what it turned on:\n{log}"
    );
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(
        &alice,
        &[
            "new", "--name", "packed", "--image", "tiny", "--memory", "512M",
        ],
    );
    // 300 MiB that does not compress, in the guest's RAM (tmpfs), and its checksum.
    let before = d.exec(
        "packed",
        "mkdir -p /mnt/ram && mount -t tmpfs -o size=400m tmpfs /mnt/ram && \
         head -c 314572800 /dev/urandom > /mnt/ram/data && sha256sum /mnt/ram/data",
    );
    let sum = before
        .split_whitespace()
        .next()
        .expect("a checksum")
        .to_string();
    assert_eq!(sum.len(), 64, "{before}");

    // Idle: the VM's memory goes to the compressed tier, and stat says so.
    let deadline = Instant::now() + Duration::from_secs(120);
    let packed = loop {
        let s = stat(&d, &alice, "packed");
        let swapped = s["memory_swapped_bytes"].as_u64().unwrap_or(0);
        let resident = s["memory_resident_bytes"].as_u64().unwrap_or(u64::MAX);
        // Reclaim runs in steps: the pages go out over a few seconds.
        if s["idle"] == true && swapped > 250 << 20 && resident < 100 << 20 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the idle VM was never packed: {s}\n--- daemon log ---\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let resident = packed["memory_resident_bytes"].as_u64().expect("resident");
    let text = d.lobby_ok(&alice, &["stat", "packed"]);
    assert!(text.contains("swapped out"), "{text}");
    let metrics = d.ok(&["metrics"]);
    assert!(
        metrics.contains("nook_tier_compressed_original_bytes"),
        "{metrics}"
    );
    // The host's owner sees the tiers, and what they hold, in `stat`.
    let host: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["stat", "--json"])).expect("stat --json");
    let tiers = &host["host_memory_tiers"];
    assert_eq!(tiers["pack"], "dense", "{host}");
    let held = tiers["compressed_original_bytes"].as_u64().unwrap_or(0)
        + tiers["disk_swap_used_bytes"].as_u64().unwrap_or(0);
    assert!(
        held > 250 << 20,
        "the tiers do not hold the VM's pages: {tiers}"
    );
    assert!(
        d.lobby_ok(&alice, &["stat"])
            .contains("packing dense: compressed"),
        "{host}"
    );

    println!(
        "packed: {} MiB in RAM, {} MiB swapped out",
        resident >> 20,
        packed["memory_swapped_bytes"].as_u64().unwrap_or(0) >> 20
    );
    // Touched again: every byte comes back.
    let woke = Instant::now();
    let after = d.exec("packed", "sha256sum /mnt/ram/data");
    println!(
        "reading 300 MiB back took {:.2} s",
        woke.elapsed().as_secs_f64()
    );
    assert!(
        after.starts_with(&sum),
        "data changed: {sum} before, {after}"
    );
    let s = stat(&d, &alice, "packed");
    assert!(
        s["memory_resident_bytes"].as_u64().unwrap_or(0) > 250 << 20,
        "the data did not come back into RAM: {s}"
    );
}
