//! Memory tiers for idle VMs. Memory an idle VM has not touched lately moves down from RAM
//! to a compressed tier and, with `dense`, on to a swap file on disk; it comes back when the
//! VM touches it. `balanced` compresses only (zram used as swap, which nook sets up): waking
//! never waits on the disk. `dense` puts zswap in front of a swap file: the compressed pool is
//! capped, and what overflows it (the coldest pages, written back in LRU order) lies on disk.
//! The daemon decides which VM and how much (through its cgroup); this crate finds what the
//! kernel offers, sets up the tiers, and reports their sizes.
//!
//! It changes host-wide settings only when asked to pack (`--pack balanced|dense`): the
//! host's own swap and zswap settings are left as they are with `--pack off`. It writes
//! sysfs files and runs `mkswap`/`swapon`, so it needs root; its calls are synchronous.

use std::path::{Path, PathBuf};
use std::process::Command;

mod pressure;
pub use pressure::{HostMemory, Pressure, boot_footprint, default_reserve};

/// How hard idle VMs are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pack {
    /// Idle VMs keep their memory (a soft limit only, as without tiers).
    Off,
    /// Idle VMs keep a quarter of their memory in RAM; the rest goes to compressed swap.
    Balanced,
    /// Idle VMs keep only what they touch; a capped compressed pool (zswap) in front of a swap
    /// file, which takes what overflows the pool.
    Dense,
}

impl Pack {
    pub fn parse(s: &str) -> Result<Pack, String> {
        match s {
            "off" => Ok(Pack::Off),
            "balanced" => Ok(Pack::Balanced),
            "dense" => Ok(Pack::Dense),
            other => Err(format!("{other:?}: use off, balanced or dense")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Pack::Off => "off",
            Pack::Balanced => "balanced",
            Pack::Dense => "dense",
        }
    }

    /// What an account whose envelope holds `memory` bytes of RAM may have in swap besides:
    /// what its idle VMs are packed into. Without packing, swap does not extend the envelope.
    pub fn swap_allowance(self, memory: u64) -> u64 {
        match self {
            Pack::Off => 0,
            Pack::Balanced => memory,
            Pack::Dense => memory.saturating_mul(3),
        }
    }

    /// How far the VMs an account runs may add up past its envelope's memory: the
    /// configured overcommit, times this.
    pub fn overcommit_factor(self) -> f64 {
        match self {
            Pack::Off => 1.0,
            Pack::Balanced => 2.0,
            Pack::Dense => 4.0,
        }
    }

    /// What an idle VM of `memory` bytes keeps in RAM.
    pub fn idle_keep(self, memory: u64) -> Option<u64> {
        match self {
            Pack::Off => None,
            Pack::Balanced => Some(memory / 4),
            // The guest kernel's hot pages and QEMU's own: what it touches comes back anyway.
            Pack::Dense => Some(8 << 20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("This kernel has no zram (no /sys/class/zram-control, and `modprobe zram` failed)")]
    NoZram,
    #[error("Cannot set up {what}: {why}")]
    Setup { what: String, why: String },
}

/// One swap area, as `/proc/swaps` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwapArea {
    pub path: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub priority: i32,
}

/// What this kernel offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    pub zram: bool,
    /// Compression algorithms zram offers here.
    pub zram_algorithms: Vec<String>,
    /// `Some(on)` when zswap is built in or loaded.
    pub zswap: Option<bool>,
    pub damon: bool,
    pub swaps: Vec<SwapArea>,
}

/// Reads what the kernel offers, changing nothing.
pub fn probe() -> Probe {
    probe_in(Path::new("/"))
}

fn probe_in(root: &Path) -> Probe {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let zram =
        root.join("sys/class/zram-control").exists() || root.join("sys/block/zram0").exists();
    let zram_algorithms = read("sys/block/zram0/comp_algorithm")
        .map(|s| {
            s.split_whitespace()
                .map(|a| a.trim_matches(|c| c == '[' || c == ']').to_string())
                .collect()
        })
        .unwrap_or_default();
    let zswap = read("sys/module/zswap/parameters/enabled").map(|s| s.trim() == "Y");
    Probe {
        zram,
        zram_algorithms,
        zswap,
        damon: root.join("sys/kernel/mm/damon/admin").exists(),
        swaps: read("proc/swaps")
            .map(|s| parse_swaps(&s))
            .unwrap_or_default(),
    }
}

/// `/proc/swaps`: sizes are KiB.
pub fn parse_swaps(text: &str) -> Vec<SwapArea> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            Some(SwapArea {
                path: f[0].to_string(),
                size_bytes: f[2].parse::<u64>().ok()? << 10,
                used_bytes: f[3].parse::<u64>().ok()? << 10,
                priority: f[4].parse().ok()?,
            })
        })
        .collect()
}

/// The tiers a daemon set up (or found from its last run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    pub pack: Pack,
    /// `/dev/zramN`, nook's compressed swap.
    pub zram: Option<u32>,
    /// zswap turned on in front of `swap_file`, its pool capped at this percent of RAM.
    pub zswap_pool_percent: Option<u8>,
    pub swap_file: Option<PathBuf>,
    /// Tiers that `pack` asks for but could not be set up here, each with the reason (for the
    /// daemon's log): the rest still packs.
    pub missing: Vec<String>,
}

/// The host's tiers now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostTiers {
    pub pack: &'static str,
    /// What the compressed tier holds, before and after compression, and the RAM it takes.
    pub compressed_original_bytes: u64,
    pub compressed_stored_bytes: u64,
    pub compressed_ram_bytes: u64,
    pub compressed_capacity_bytes: u64,
    /// Swap used outside the compressed tier (the swap file, the host's own swap).
    pub disk_swap_used_bytes: u64,
    pub disk_swap_size_bytes: u64,
}

impl HostTiers {
    /// Original size over stored size; 0 when the tier is empty.
    pub fn ratio(&self) -> f64 {
        if self.compressed_stored_bytes == 0 {
            0.0
        } else {
            self.compressed_original_bytes as f64 / self.compressed_stored_bytes as f64
        }
    }
}

/// The file where a daemon remembers its zram device, so a restart reuses it (VMs' pages may
/// be in it).
const ZRAM_NOTE: &str = "zram-device";
/// Compressed swap is tried before anything else (the host's own swap, the swap file).
const ZRAM_PRIORITY: i32 = 100;
const SWAP_FILE_PRIORITY: i32 = 10;

fn setup_err(what: &str, why: impl std::fmt::Display) -> MemoryError {
    MemoryError::Setup {
        what: what.to_string(),
        why: why.to_string(),
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<(), MemoryError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| setup_err(cmd, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(setup_err(
            &format!("{cmd} {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }
}

impl Tiers {
    /// No tiers: idle VMs keep their memory.
    pub fn off() -> Tiers {
        Tiers {
            pack: Pack::Off,
            zram: None,
            zswap_pool_percent: None,
            swap_file: None,
            missing: Vec::new(),
        }
    }

    /// Sets up the tiers `pack` asks for: nothing with `off`; with `balanced` a zram swap
    /// device of `host_ram / 2` of uncompressed capacity; with `dense` a swap file in
    /// `state_dir` where its disk has room ([`swap_file_size`]) with zswap in front of it, or
    /// a zram device of `host_ram` where either is missing. What a previous daemon set up
    /// (noted in `state_dir`) is reused.
    pub fn setup(pack: Pack, host_ram: u64, state_dir: &Path) -> Result<Tiers, MemoryError> {
        let mut tiers = Tiers {
            pack,
            ..Tiers::off()
        };
        if pack == Pack::Off {
            return Ok(tiers);
        }
        // Each tier stands alone: a kernel without zswap or zram still has the swap file, and
        // a data directory on a filesystem that cannot hold swap (tmpfs, overlayfs) still has
        // zram.
        if pack == Pack::Dense {
            match swap_file_size(host_ram, state_dir)
                .and_then(|size| setup_swap_file(size, state_dir))
            {
                Ok(p) => tiers.swap_file = Some(p),
                Err(e) => tiers.missing.push(e.to_string()),
            }
        }
        // zswap fronts every swap area, so it is not turned on over a zram device (pages
        // would be compressed twice): a dense host whose last daemon made zram keeps it.
        let reused_zram = noted_zram(state_dir);
        if pack == Pack::Dense && tiers.swap_file.is_some() && reused_zram.is_none() {
            match setup_zswap(DENSE_POOL_PERCENT) {
                Ok(()) => tiers.zswap_pool_percent = Some(DENSE_POOL_PERCENT),
                Err(e) => tiers.missing.push(e.to_string()),
            }
        }
        if tiers.zswap_pool_percent.is_none() {
            match setup_zram(pack, host_ram, state_dir) {
                Ok(n) => tiers.zram = Some(n),
                Err(e) => tiers.missing.push(e.to_string()),
            }
        }
        if tiers.zram.is_none() && tiers.swap_file.is_none() {
            return Err(setup_err("any memory tier", tiers.missing.join("; ")));
        }
        Ok(tiers)
    }

    /// One line for the daemon's log.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("pack {}", self.pack.as_str())];
        if let Some(n) = self.zram {
            let alg = std::fs::read_to_string(format!("/sys/block/zram{n}/comp_algorithm"))
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .find(|a| a.starts_with('['))
                        .map(|a| a.trim_matches(|c| c == '[' || c == ']').to_string())
                })
                .unwrap_or_default();
            let size = std::fs::read_to_string(format!("/sys/block/zram{n}/disksize"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            parts.push(format!(
                "compressed swap /dev/zram{n} ({alg}, {} MiB)",
                size >> 20
            ));
        }
        if let Some(pct) = self.zswap_pool_percent {
            let alg = std::fs::read_to_string(format!("{ZSWAP}/compressor")).unwrap_or_default();
            parts.push(format!(
                "compressed pool zswap ({}, at most {pct}% of RAM)",
                alg.trim()
            ));
        }
        if let Some(f) = &self.swap_file {
            let size = probe()
                .swaps
                .iter()
                .find(|a| Path::new(&a.path) == f)
                .map_or(0, |a| a.size_bytes);
            parts.push(format!("swap file {} ({} MiB)", f.display(), size >> 20));
        }
        parts.join(", ")
    }

    /// The tiers' sizes now.
    pub fn stats(&self) -> HostTiers {
        let mut t = HostTiers {
            pack: self.pack.as_str(),
            ..Default::default()
        };
        if let Some(n) = self.zram {
            // mm_stat: orig_data_size compr_data_size mem_used_total ...
            if let Ok(s) = std::fs::read_to_string(format!("/sys/block/zram{n}/mm_stat")) {
                let f: Vec<u64> = s
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if f.len() >= 3 {
                    t.compressed_original_bytes = f[0];
                    t.compressed_stored_bytes = f[1];
                    t.compressed_ram_bytes = f[2];
                }
            }
            t.compressed_capacity_bytes =
                std::fs::read_to_string(format!("/sys/block/zram{n}/disksize"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
        }
        // zswap's pages keep their slot in the swap area behind it, so /proc/swaps counts them
        // as used there too: what is really on disk is the rest.
        let mut in_pool = 0;
        if let Some(pct) = self.zswap_pool_percent
            && let Ok(text) = std::fs::read_to_string("/proc/meminfo")
        {
            let m = pressure::parse_meminfo(&text);
            t.compressed_original_bytes = m.zswapped_bytes;
            t.compressed_stored_bytes = m.zswap_bytes;
            t.compressed_ram_bytes = m.zswap_bytes;
            t.compressed_capacity_bytes = m.total_bytes / 100 * u64::from(pct);
            in_pool = m.zswapped_bytes;
        }
        let zram_path = self.zram.map(|n| format!("/dev/zram{n}"));
        for a in probe().swaps {
            if Some(&a.path) != zram_path.as_ref() {
                t.disk_swap_used_bytes += a.used_bytes;
                t.disk_swap_size_bytes += a.size_bytes;
            }
        }
        t.disk_swap_used_bytes = t.disk_swap_used_bytes.saturating_sub(in_pool);
        t
    }
}

fn swapped_on(path: &str) -> bool {
    probe().swaps.iter().any(|a| a.path == path)
}

/// The zram device a previous daemon set up here, if it is still swapped on.
fn noted_zram(state_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(state_dir.join(ZRAM_NOTE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| swapped_on(&format!("/dev/zram{n}")))
}

const ZSWAP: &str = "/sys/module/zswap/parameters";

/// How much of the host's RAM `dense`'s compressed pool may take. Past it, zswap writes the
/// pool's least recently used pages to the swap file. An idle VM's swapped memory is mostly
/// what it touched once, at boot (the TCG translations of its boot code, its boot-time
/// allocations), and will not touch again: on disk it costs no RAM. The pool is a buffer in
/// front of the disk, not a tier to fill: at 5% (1.2 GiB here) it held all of 8 idle
/// default-image VMs' swapped memory, 150 MiB each.
const DENSE_POOL_PERCENT: u8 = 2;

/// Turns zswap on: lz4 where the kernel has it (waking decompresses), the pool capped at
/// `pool_percent` of RAM, and its shrinker on, so that on cgroup v2 the pages a group's
/// reclaim finds coldest in the pool go on to disk as well (v1 keeps no per-group zswap
/// counts, so there only the cap moves pages).
fn setup_zswap(pool_percent: u8) -> Result<(), MemoryError> {
    if !Path::new(ZSWAP).join("enabled").exists() {
        return Err(setup_err("zswap", "this kernel has no zswap"));
    }
    let set = |name: &str, value: &str| {
        std::fs::write(Path::new(ZSWAP).join(name), value)
            .map_err(|e| setup_err(&format!("zswap's {name} ({value})"), e))
    };
    // The fastest to decompress the kernel's crypto API has (it may lack lz4); a compressor
    // it lacks is refused, and zswap then keeps its own.
    for alg in ["lz4", "lzo-rle"] {
        if set("compressor", alg).is_ok() {
            break;
        }
    }
    set("max_pool_percent", &pool_percent.to_string())?;
    // Kernels before 6.8 have no shrinker: the pool's cap alone sends pages to disk.
    if Path::new(ZSWAP).join("shrinker_enabled").exists() {
        set("shrinker_enabled", "Y")?;
    }
    set("enabled", "Y")
}

fn setup_zram(pack: Pack, host_ram: u64, state_dir: &Path) -> Result<u32, MemoryError> {
    let note = state_dir.join(ZRAM_NOTE);
    if let Some(n) = noted_zram(state_dir) {
        return Ok(n);
    }
    if !Path::new("/sys/class/zram-control").exists() {
        // Not loaded yet: the module makes zram0 and the control directory.
        let _ = Command::new("modprobe")
            .args(["zram", "num_devices=0"])
            .output();
    }
    let n = if Path::new("/sys/class/zram-control/hot_add").exists() {
        std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .map_err(|e| setup_err("a zram device (hot_add)", e))?
            .trim()
            .parse::<u32>()
            .map_err(|e| setup_err("a zram device (hot_add)", e))?
    } else {
        return Err(MemoryError::NoZram);
    };
    let dev = format!("/sys/block/zram{n}");
    let algorithms = std::fs::read_to_string(format!("{dev}/comp_algorithm")).unwrap_or_default();
    // Fast to decompress first: waking an idle VM reads its pages back from here.
    if let Some(alg) = ["lz4", "zstd", "lzo-rle", "lzo"].into_iter().find(|a| {
        algorithms
            .split_whitespace()
            .any(|x| x.trim_matches(|c| c == '[' || c == ']') == *a)
    }) {
        std::fs::write(format!("{dev}/comp_algorithm"), alg)
            .map_err(|e| setup_err("zram's compression algorithm", e))?;
    }
    let capacity = match pack {
        Pack::Dense => host_ram,
        _ => host_ram / 2,
    };
    std::fs::write(format!("{dev}/disksize"), capacity.to_string())
        .map_err(|e| setup_err("zram's size", e))?;
    let path = format!("/dev/zram{n}");
    run("mkswap", &[&path])?;
    run("swapon", &["-p", &ZRAM_PRIORITY.to_string(), &path])?;
    std::fs::write(&note, n.to_string()).map_err(|e| setup_err("the zram note", e))?;
    Ok(n)
}

/// The smallest swap file worth making.
const MIN_SWAP_FILE: u64 = 256 << 20;

/// How big the swap file may be: as big as RAM (with `dense` it holds what idle VMs are
/// packed into past the compressed pool), and at most what leaves [`disk_to_keep`] free on
/// `state_dir`'s filesystem (VMs' disks and clones grow there; a guest whose write finds the
/// disk full stops).
fn swap_file_size(host_ram: u64, state_dir: &Path) -> Result<u64, MemoryError> {
    let wanted = host_ram;
    if swapped_on(&state_dir.join("swapfile").display().to_string()) {
        return Ok(wanted);
    }
    let fs = nix::sys::statvfs::statvfs(state_dir)
        .map_err(|e| setup_err("the data directory's free space", e))?;
    let (free, total) = (
        fs.blocks_available() * fs.fragment_size(),
        fs.blocks() * fs.fragment_size(),
    );
    let room = free.saturating_sub(disk_to_keep(total));
    sized_to_fit(wanted, room).ok_or_else(|| {
        setup_err(
            "a swap file",
            format!(
                "{} has {} MiB free of {} MiB, and {} MiB stays free for VMs' disks",
                state_dir.display(),
                free >> 20,
                total >> 20,
                disk_to_keep(total) >> 20
            ),
        )
    })
}

/// The disk a swap file must leave free: a tenth of the filesystem, at least 4 GiB.
fn disk_to_keep(total: u64) -> u64 {
    (total / 10).max(4 << 30)
}

fn sized_to_fit(wanted: u64, room: u64) -> Option<u64> {
    let size = wanted.min(room) & !((1 << 20) - 1);
    (size >= MIN_SWAP_FILE).then_some(size)
}

fn setup_swap_file(size: u64, state_dir: &Path) -> Result<PathBuf, MemoryError> {
    let path = state_dir.join("swapfile");
    let p = path.display().to_string();
    if swapped_on(&p) {
        return Ok(path);
    }
    let _ = std::fs::remove_file(&path);
    let made = run("fallocate", &["-l", &size.to_string(), &p])
        .and_then(|()| {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| setup_err("the swap file's mode", e))
        })
        .and_then(|()| run("mkswap", &[&p]))
        .and_then(|()| run("swapon", &["-p", &SWAP_FILE_PRIORITY.to_string(), &p]));
    if let Err(e) = made {
        // Never left behind to fill the disk: a fallocate that ran out of space keeps what it
        // got, and swapon refuses files on tmpfs, overlayfs and other filesystems without
        // swap support.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_file_never_takes_the_disk_vms_need() {
        let gib = 1u64 << 30;
        assert_eq!(disk_to_keep(20 * gib), 4 * gib);
        assert_eq!(disk_to_keep(250 * gib), 25 * gib);
        assert_eq!(sized_to_fit(4 * gib, 10 * gib), Some(4 * gib));
        assert_eq!(sized_to_fit(4 * gib, gib + 12345), Some(gib));
        assert_eq!(sized_to_fit(4 * gib, 100 << 20), None);
        assert_eq!(sized_to_fit(4 * gib, 0), None);
    }

    #[test]
    fn meminfo_fields_are_read_by_name() {
        let m = pressure::parse_meminfo(
            "MemTotal:       24573952 kB\nZswap:            1009080 kB\nZswapped:         2418236 kB\n",
        );
        assert_eq!(m.zswap_bytes, 1009080 << 10);
        assert_eq!(m.zswapped_bytes, 2418236 << 10);
        assert_eq!(m.swap_free_bytes, 0);
    }

    #[test]
    fn proc_swaps_is_read_in_bytes() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/zram1                              partition\t1048572\t\t2048\t\t100\n/var/lib/nook/swapfile file 262140 0 10\n";
        let a = parse_swaps(text);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].path, "/dev/zram1");
        assert_eq!(a[0].size_bytes, 1048572 << 10);
        assert_eq!(a[0].used_bytes, 2048 << 10);
        assert_eq!(a[1].priority, 10);
    }

    #[test]
    fn pack_levels_parse_and_keep_less_as_they_go() {
        assert_eq!(Pack::parse("dense"), Ok(Pack::Dense));
        assert!(Pack::parse("tight").is_err());
        let g = 1 << 30;
        assert_eq!(Pack::Off.idle_keep(g), None);
        assert!(Pack::Dense.idle_keep(g) < Pack::Balanced.idle_keep(g));
    }

    #[test]
    fn a_probe_reads_a_fake_sysfs() {
        let root = tempfile::tempdir().expect("tmp");
        let r = root.path();
        std::fs::create_dir_all(r.join("sys/block/zram0")).expect("dir");
        std::fs::write(
            r.join("sys/block/zram0/comp_algorithm"),
            "[lzo-rle] lzo lz4\n",
        )
        .expect("w");
        std::fs::create_dir_all(r.join("sys/module/zswap/parameters")).expect("dir");
        std::fs::write(r.join("sys/module/zswap/parameters/enabled"), "N\n").expect("w");
        std::fs::create_dir_all(r.join("proc")).expect("dir");
        std::fs::write(r.join("proc/swaps"), "Filename Type Size Used Priority\n").expect("w");
        let p = probe_in(r);
        assert!(p.zram && !p.damon);
        assert_eq!(p.zram_algorithms, ["lzo-rle", "lzo", "lz4"]);
        assert_eq!(p.zswap, Some(false));
        assert!(p.swaps.is_empty());
    }
}
