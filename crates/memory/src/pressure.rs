//! Whether the host has room for one more VM in the memory it really has, not the memory VMs
//! were promised. Admission asks this before a VM starts, so a full host refuses new work
//! instead of leaving the kernel's OOM killer to pick a running VM.

use std::path::Path;

/// The host's memory now, from `/proc/meminfo` and `/proc/pressure/memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostMemory {
    pub total_bytes: u64,
    /// What the kernel could hand out without swapping (free, plus cache it can drop).
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    /// zswap's pool: the RAM it takes, and what it holds uncompressed.
    pub zswap_bytes: u64,
    pub zswapped_bytes: u64,
    /// Percent of the last 10 s in which every task waited for memory (PSI "full"); `None`
    /// on kernels without PSI.
    pub stalled_pct: Option<f64>,
}

/// Why the host refuses another VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Pressure {
    /// Too little left in RAM and swap together.
    Short {
        /// RAM and the usable part of swap, together.
        room_bytes: u64,
        need_bytes: u64,
        reserve_bytes: u64,
    },
    /// The host already spends this share of its time waiting for memory.
    Thrashing { stalled_pct: f64 },
}

/// Past this, the host is reclaiming so hard that another VM would only make it worse.
const THRASHING_PCT: f64 = 20.0;

impl HostMemory {
    pub fn read() -> HostMemory {
        Self::read_in(Path::new("/"))
    }

    fn read_in(root: &Path) -> HostMemory {
        let mut m = std::fs::read_to_string(root.join("proc/meminfo"))
            .map(|t| parse_meminfo(&t))
            .unwrap_or_default();
        m.stalled_pct = std::fs::read_to_string(root.join("proc/pressure/memory"))
            .ok()
            .and_then(|t| parse_psi_full_avg10(&t));
        m
    }

    /// RAM the kernel can hand out, plus half of the free swap: a page moved out to
    /// compressed swap still takes part of its size in RAM, and one on disk costs a fault to
    /// bring back, so swap is worth less than RAM.
    pub fn room_bytes(&self) -> u64 {
        self.available_bytes + self.swap_free_bytes / 2
    }

    /// Whether a VM that will soon touch `need` bytes fits, keeping `reserve` free.
    pub fn admit(&self, need: u64, reserve: u64) -> Result<(), Pressure> {
        if let Some(stalled_pct) = self.stalled_pct
            && stalled_pct > THRASHING_PCT
        {
            return Err(Pressure::Thrashing { stalled_pct });
        }
        let room = self.room_bytes();
        if room < need.saturating_add(reserve) {
            return Err(Pressure::Short {
                room_bytes: room,
                need_bytes: need,
                reserve_bytes: reserve,
            });
        }
        Ok(())
    }
}

/// The reserve kept free when none is configured: 1/32 of RAM, at least 256 MiB.
pub fn default_reserve(total: u64) -> u64 {
    (total / 32).max(256 << 20)
}

/// What a VM of `memory` bytes touches as it boots and settles, the part admission counts:
/// half its RAM (at most 256 MiB; guests touch far less than they are given at first, and the
/// rest is the overcommit the `--pack` level allows for) plus QEMU's own memory. Under TCG
/// that includes `tcg_cache`, the part of the translation cache the boot fills, which is never
/// given back (None under KVM). A tiny guest fills 64 MiB here, so a 128 MiB VM's QEMU held
/// about 175 MiB of RAM and swap once booted. Counting only the guest's half let an envelope
/// admit a boot its RAM and swap could not hold, and the OOM killer took a VM (the 93rd of
/// 128 MiB in an 8 GiB envelope with `--pack balanced`).
pub fn boot_footprint(memory: u64, tcg_cache: Option<u64>) -> u64 {
    let qemu: u64 = match tcg_cache {
        Some(cache) => (32 << 20) + cache,
        None => 16 << 20,
    };
    (memory / 2).min(256 << 20) + qemu
}

pub(crate) fn parse_meminfo(text: &str) -> HostMemory {
    let mut m = HostMemory::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(key), Some(kib)) = (f.next(), f.next().and_then(|v| v.parse::<u64>().ok()))
        else {
            continue;
        };
        let bytes = kib << 10;
        match key {
            "MemTotal:" => m.total_bytes = bytes,
            "MemAvailable:" => m.available_bytes = bytes,
            "SwapTotal:" => m.swap_total_bytes = bytes,
            "SwapFree:" => m.swap_free_bytes = bytes,
            "Zswap:" => m.zswap_bytes = bytes,
            "Zswapped:" => m.zswapped_bytes = bytes,
            _ => {}
        }
    }
    m
}

/// `full avg10=1.23 avg60=...` from `/proc/pressure/memory`.
fn parse_psi_full_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("full "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\n\
        MemAvailable:    2048000 kB\nSwapTotal:       4096000 kB\nSwapFree:        1024000 kB\n";

    #[test]
    fn meminfo_and_psi_are_read_in_bytes() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(root.path().join("proc/pressure")).expect("dir");
        std::fs::write(root.path().join("proc/meminfo"), MEMINFO).expect("meminfo");
        std::fs::write(
            root.path().join("proc/pressure/memory"),
            "some avg10=3.00 avg60=1.00 avg300=0.50 total=1\nfull avg10=2.50 avg60=0.90 avg300=0.40 total=1\n",
        )
        .expect("psi");
        let m = HostMemory::read_in(root.path());
        assert_eq!(m.total_bytes, 24_576_000 << 10);
        assert_eq!(m.available_bytes, 2_048_000 << 10);
        assert_eq!(m.swap_free_bytes, 1_024_000 << 10);
        assert_eq!(m.stalled_pct, Some(2.5));
        assert_eq!(m.room_bytes(), (2_048_000 + 512_000) << 10);
    }

    #[test]
    fn a_host_short_of_memory_or_thrashing_refuses() {
        let m = HostMemory {
            total_bytes: 8 << 30,
            available_bytes: 600 << 20,
            swap_total_bytes: 1 << 30,
            swap_free_bytes: 200 << 20,
            stalled_pct: Some(0.0),
            ..HostMemory::default()
        };
        // 600 MiB + 100 MiB of room: a 256 MiB boot fits over a 256 MiB reserve...
        assert_eq!(m.admit(256 << 20, 256 << 20), Ok(()));
        // ...and not over a 512 MiB one.
        assert!(matches!(
            m.admit(256 << 20, 512 << 20),
            Err(Pressure::Short { room_bytes, .. }) if room_bytes == 700 << 20
        ));
        let thrashing = HostMemory {
            stalled_pct: Some(35.0),
            ..m
        };
        assert!(matches!(
            thrashing.admit(1, 0),
            Err(Pressure::Thrashing { .. })
        ));
    }

    #[test]
    fn the_footprint_and_reserve_scale_with_size() {
        assert_eq!(boot_footprint(128 << 20, None), 80 << 20);
        assert_eq!(boot_footprint(128 << 20, Some(64 << 20)), 160 << 20);
        assert_eq!(boot_footprint(128 << 20, Some(128 << 20)), 224 << 20);
        assert_eq!(boot_footprint(8 << 30, None), 272 << 20);
        assert_eq!(default_reserve(2 << 30), 256 << 20);
        assert_eq!(default_reserve(24 << 30), 768 << 20);
    }
}
