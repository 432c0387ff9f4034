//! Idle detection: a VM with almost no CPU and network use for a while gets a low CPU weight
//! and a soft memory limit, so busy VMs of the same account come first and its memory is the
//! first reclaimed under pressure. The first busy sample restores it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::manager::Manager;

/// Below this share of one CPU, and with less network than [`QUIET_NET_BYTES`] per sample,
/// a VM counts as quiet. An idle TCG busybox guest uses about 1.5%.
const QUIET_CPU: f64 = 0.05;
const QUIET_NET_BYTES: u64 = 64 * 1024;
const SAMPLE: Duration = Duration::from_secs(2);
/// An idle VM's timers touch pages back in: with `--pack`, what it gathered is packed again
/// this often.
const REPACK: Duration = Duration::from_secs(60);
/// After a pack, an idle guest faults its hot pages (its timers' and QEMU's own) back within
/// seconds; what it holds this long after is its hot set.
const HOT_SETTLE: Duration = Duration::from_secs(10);
/// A repack takes only what the VM gathered beyond its hot set: squeezing the hot set out
/// again each minute cost an idle VM more CPU than it used itself (decompressing what it
/// touches right back). Every so often a full pack lets a hot set that went cold shrink.
const FULL_REPACK: Duration = Duration::from_secs(600);
/// Growth beyond the hot set smaller than this is not worth a repack.
const REPACK_SLACK: u64 = 4 << 20;

struct Sample {
    at: Instant,
    cpu_ns: u64,
    net_bytes: u64,
    quiet_since: Option<Instant>,
    pack: Option<Packed>,
}

/// What the idle loop knows of an idle VM's packing.
#[derive(Clone, Copy)]
struct Packed {
    at: Instant,
    /// The last full pack (down to what the `--pack` level keeps).
    full_at: Instant,
    /// Resident memory [`HOT_SETTLE`] after the last pack.
    hot: Option<u64>,
}

/// What to do about an idle VM's memory this sample.
#[derive(Debug, PartialEq, Eq)]
enum Repack {
    Nothing,
    /// Measure the hot set.
    Measure,
    /// Pack down to this many bytes (0: as far as the level goes).
    To(u64),
}

fn repack(p: &Packed, now: Instant, resident: impl FnOnce() -> Option<u64>) -> Repack {
    if p.hot.is_none() {
        return if now.duration_since(p.at) >= HOT_SETTLE {
            Repack::Measure
        } else {
            Repack::Nothing
        };
    }
    if now.duration_since(p.at) < REPACK {
        return Repack::Nothing;
    }
    if now.duration_since(p.full_at) >= FULL_REPACK {
        return Repack::To(0);
    }
    let hot = p.hot.unwrap_or(0);
    match resident() {
        Some(r) if r > hot + REPACK_SLACK => Repack::To(hot),
        _ => Repack::Nothing,
    }
}

/// Runs for the daemon's lifetime.
pub fn spawn(manager: Arc<Manager>, idle_after: Duration) {
    tokio::spawn(async move {
        let mut samples: HashMap<String, Sample> = HashMap::new();
        let mut tick = tokio::time::interval(SAMPLE);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let vms = manager.confined_vms().await;
            samples.retain(|id, _| vms.iter().any(|vm| &vm.id == id));
            for vm in vms {
                let Some((cpu_ns, net_bytes)) = manager.activity(&vm) else {
                    continue;
                };
                let previous = samples.insert(
                    vm.id.clone(),
                    Sample {
                        at: now,
                        cpu_ns,
                        net_bytes,
                        quiet_since: None,
                        pack: None,
                    },
                );
                let Some(prev) = previous else { continue };
                let secs = now.duration_since(prev.at).as_secs_f64().max(0.001);
                let cpu = cpu_ns.saturating_sub(prev.cpu_ns) as f64 / 1e9 / secs;
                let quiet =
                    cpu < QUIET_CPU && net_bytes.saturating_sub(prev.net_bytes) < QUIET_NET_BYTES;
                let quiet_since = if quiet {
                    Some(prev.quiet_since.unwrap_or(prev.at))
                } else {
                    None
                };
                let idle = quiet_since.is_some_and(|since| now.duration_since(since) >= idle_after);
                let was_idle = manager.is_idle(&vm.id);
                manager.set_idle(&vm, idle).await;
                // set_idle packs it as it turns idle; while it stays idle, what it gathers is
                // packed again (see `repack`).
                let mut pack = prev.pack.filter(|_| idle && manager.packs());
                if idle && !was_idle {
                    pack = Some(Packed {
                        at: now,
                        full_at: now,
                        hot: None,
                    });
                } else if let Some(p) = pack.as_mut() {
                    match repack(p, now, || manager.vm_resident(&vm)) {
                        Repack::Nothing => {}
                        Repack::Measure => p.hot = manager.vm_resident(&vm),
                        Repack::To(keep) => {
                            manager.pack_idle(&vm, keep).await;
                            *p = Packed {
                                at: now,
                                full_at: if keep == 0 { now } else { p.full_at },
                                hot: None,
                            };
                        }
                    }
                }
                if let Some(s) = samples.get_mut(&vm.id) {
                    s.quiet_since = quiet_since;
                    s.pack = pack;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repack_takes_only_what_gathered_beyond_the_hot_set() {
        let t0 = Instant::now();
        let mut p = Packed {
            at: t0,
            full_at: t0,
            hot: None,
        };
        let never = || -> Option<u64> { panic!("not asked") };
        assert_eq!(
            repack(&p, t0 + Duration::from_secs(2), never),
            Repack::Nothing
        );
        assert_eq!(repack(&p, t0 + HOT_SETTLE, never), Repack::Measure);
        p.hot = Some(30 << 20);
        assert_eq!(
            repack(&p, t0 + Duration::from_secs(30), never),
            Repack::Nothing
        );
        let later = t0 + REPACK;
        assert_eq!(repack(&p, later, || Some(32 << 20)), Repack::Nothing);
        assert_eq!(repack(&p, later, || Some(60 << 20)), Repack::To(30 << 20));
        assert_eq!(repack(&p, later, || None), Repack::Nothing);
        assert_eq!(repack(&p, t0 + FULL_REPACK, never), Repack::To(0));
    }
}
