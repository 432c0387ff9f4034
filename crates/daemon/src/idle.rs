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
/// An idle VM's timers touch pages back in: with `--pack`, it is packed again this often.
const REPACK: Duration = Duration::from_secs(60);

struct Sample {
    at: Instant,
    cpu_ns: u64,
    net_bytes: u64,
    quiet_since: Option<Instant>,
    packed_at: Option<Instant>,
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
                        packed_at: None,
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
                // set_idle packs it as it turns idle; while it stays idle, again every REPACK.
                let mut packed_at = prev.packed_at.filter(|_| idle);
                if idle && !was_idle {
                    packed_at = Some(now);
                } else if idle && packed_at.is_none_or(|t| now.duration_since(t) >= REPACK) {
                    manager.pack_idle(&vm).await;
                    packed_at = Some(now);
                }
                if let Some(s) = samples.get_mut(&vm.id) {
                    s.quiet_since = quiet_since;
                    s.packed_at = packed_at;
                }
            }
        }
    });
}
