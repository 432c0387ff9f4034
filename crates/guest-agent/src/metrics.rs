//! `Metrics`: a snapshot of uptime, load, memory, root disk and process count from `/proc`.

use nook_proto::GuestMetrics;

/// Seconds since boot, the first field of `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The one-minute load average, the first field of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `(MemTotal, MemAvailable)` in KiB from `/proc/meminfo`. Kernels too old for MemAvailable
/// get MemFree + Buffers + Cached instead.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    let total = field("MemTotal").unwrap_or(0);
    let available = field("MemAvailable").unwrap_or_else(|| {
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    (total, available)
}

/// Collects the metrics; anything unreadable is reported as zero.
pub fn collect() -> GuestMetrics {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (mem_total_kib, mem_available_kib) = parse_meminfo(&read("/proc/meminfo"));
    let (disk_total_kib, disk_available_kib) = match nix::sys::statvfs::statvfs("/") {
        Ok(st) => {
            let frag = st.fragment_size();
            (
                st.blocks() * frag / 1024,
                st.blocks_available() * frag / 1024,
            )
        }
        Err(_) => (0, 0),
    };
    let processes = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    GuestMetrics {
        uptime_secs: parse_uptime(&read("/proc/uptime")).unwrap_or(0.0),
        load_avg_1m: parse_loadavg(&read("/proc/loadavg")).unwrap_or(0.0),
        mem_total_kib,
        mem_available_kib,
        disk_total_kib,
        disk_available_kib,
        processes: u32::try_from(processes).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_uptime("12345.67 45678.90\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_loadavg("0.52 0.40 0.31 2/345 6789\n"), Some(0.52));
        let meminfo = "MemTotal:        2028536 kB\nMemFree:          100000 kB\n\
                       MemAvailable:    1500000 kB\nBuffers:           20000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (2028536, 1500000));
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
        assert_eq!(parse_meminfo(old), (1000, 420));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }
}
