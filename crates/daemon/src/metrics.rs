//! Prometheus text exposition of per-account and per-VM usage, served on the admin socket
//! (`GET /metrics`) and, when configured, on `metrics_addr`.

use std::fmt::Write;

use nook_api::VmState;

use crate::manager::{ADMIN_OWNER, Manager, Scope};

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(m: &Manager) -> String {
    let mut out = String::new();
    let vms = m.list(Scope::Admin).await.unwrap_or_default();
    let accounts = m.store().accounts().await.unwrap_or_default();
    let email = |id: &str| {
        accounts
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.email.clone())
            .unwrap_or_else(|| id.to_string())
    };

    let _ = writeln!(
        out,
        "# HELP nook_vms VMs on this host by state.\n# TYPE nook_vms gauge"
    );
    for state in [
        VmState::Creating,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ] {
        let n = vms.iter().filter(|vm| vm.state == state).count();
        let _ = writeln!(out, "nook_vms{{state=\"{}\"}} {n}", state.as_str());
    }

    let _ = writeln!(
        out,
        "# HELP nook_account_plan_cpus vCPUs in the account's envelope.\n# TYPE nook_account_plan_cpus gauge"
    );
    let _ = writeln!(
        out,
        "# HELP nook_account_plan_memory_bytes Memory in the account's envelope.\n# TYPE nook_account_plan_memory_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP nook_account_memory_bytes Real memory the account's VMs use.\n# TYPE nook_account_memory_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP nook_account_cpu_seconds_total CPU time the account's VMs used.\n# TYPE nook_account_cpu_seconds_total counter"
    );
    for account in &accounts {
        let Ok(plan) = m.plan_for(&account.id).await else {
            continue;
        };
        let l = format!(
            "account=\"{}\",email=\"{}\"",
            label(&account.id),
            label(&account.email)
        );
        let _ = writeln!(out, "nook_account_plan_cpus{{{l}}} {}", plan.cpu);
        let _ = writeln!(
            out,
            "nook_account_plan_memory_bytes{{{l}}} {}",
            u64::from(plan.memory_mib) << 20
        );
        if let Some(usage) = m.account_usage(&account.id) {
            let _ = writeln!(
                out,
                "nook_account_memory_bytes{{{l}}} {}",
                usage.memory_bytes
            );
            let _ = writeln!(
                out,
                "nook_account_cpu_seconds_total{{{l}}} {:.3}",
                usage.cpu_usage_ns as f64 / 1e9
            );
        }
    }

    let _ = writeln!(
        out,
        "# HELP nook_vm_memory_nominal_bytes The VM's configured memory.\n# TYPE nook_vm_memory_nominal_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP nook_vm_memory_bytes Real memory of the VM's QEMU.\n# TYPE nook_vm_memory_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP nook_vm_cpu_seconds_total CPU time of the VM's QEMU.\n# TYPE nook_vm_cpu_seconds_total counter"
    );
    let _ = writeln!(
        out,
        "# HELP nook_vm_idle 1 while the VM's idle knobs are on.\n# TYPE nook_vm_idle gauge"
    );
    for vm in vms.iter().filter(|vm| vm.state == VmState::Running) {
        let owner = if vm.owner == ADMIN_OWNER {
            ADMIN_OWNER.to_string()
        } else {
            email(&vm.owner)
        };
        let l = format!("vm=\"{}\",account=\"{}\"", label(&vm.name), label(&owner));
        let _ = writeln!(
            out,
            "nook_vm_memory_nominal_bytes{{{l}}} {}",
            u64::from(vm.memory_mib) << 20
        );
        if let Some(usage) = m.vm_usage(&vm.owner, &vm.id) {
            let _ = writeln!(out, "nook_vm_memory_bytes{{{l}}} {}", usage.memory_bytes);
            let _ = writeln!(
                out,
                "nook_vm_cpu_seconds_total{{{l}}} {:.3}",
                usage.cpu_usage_ns as f64 / 1e9
            );
        }
        let _ = writeln!(out, "nook_vm_idle{{{l}}} {}", u8::from(m.is_idle(&vm.id)));
    }
    if let Some(pages) = nook_cgroup::ksm_pages_sharing() {
        let _ = writeln!(
            out,
            "# HELP nook_ksm_pages_sharing Host pages saved by KSM.\n# TYPE nook_ksm_pages_sharing gauge"
        );
        let _ = writeln!(out, "nook_ksm_pages_sharing {pages}");
    }
    if let Some(t) = m.tier_stats().await {
        for (name, help, value) in [
            (
                "nook_tier_compressed_original_bytes",
                "Memory in the compressed tier, uncompressed.",
                t.compressed_original_bytes,
            ),
            (
                "nook_tier_compressed_stored_bytes",
                "Memory in the compressed tier, compressed.",
                t.compressed_stored_bytes,
            ),
            (
                "nook_tier_compressed_ram_bytes",
                "Host RAM the compressed tier takes.",
                t.compressed_ram_bytes,
            ),
            (
                "nook_tier_compressed_capacity_bytes",
                "The compressed tier's capacity: what zram holds uncompressed, or the RAM zswap's pool may take.",
                t.compressed_capacity_bytes,
            ),
            (
                "nook_tier_disk_swap_used_bytes",
                "Swap used on disk (the swap file, the host's own swap).",
                t.disk_swap_used_bytes,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    }
    fleet(m, &mut out).await;
    out.push_str(&m.gateway().metrics().render());
    out
}

/// The hosts sharing the store as their heartbeats describe them (with SQLite, this host),
/// and whether this host hears the others' writes.
async fn fleet(m: &Manager, out: &mut String) {
    let hosts = m.hosts().await.unwrap_or_default();
    type Reading = fn(&Manager, &nook_store::HostStatus) -> f64;
    let gauges: [(&str, &str, Reading); 6] = [
        (
            "nook_host_up",
            "1 while the host's heartbeats come.",
            |m, h| f64::from(u8::from(m.host_is_up(h))),
        ),
        (
            "nook_host_cordoned",
            "1 while the host is cordoned: no new VMs are placed on it.",
            |_, h| f64::from(u8::from(h.cordoned)),
        ),
        (
            "nook_host_heartbeat_age_seconds",
            "Time since the host's last heartbeat, by the store's clock.",
            |_, h| h.since_heartbeat_ms as f64 / 1000.0,
        ),
        (
            "nook_host_running_vms",
            "VMs running on the host.",
            |_, h| f64::from(h.host.running_vms),
        ),
        ("nook_host_leases", "VM leases the host holds.", |_, h| {
            f64::from(h.leases)
        }),
        (
            "nook_host_memory_used_bytes",
            "Memory of the VMs running on the host.",
            |_, h| (h.host.memory_used_mib << 20) as f64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for h in &hosts {
            let _ = writeln!(
                out,
                "{name}{{host=\"{}\"}} {}",
                label(&h.host.name),
                value(m, h)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP nook_store_hears_other_hosts 1 while this host hears other hosts' writes (always with SQLite).\n# TYPE nook_store_hears_other_hosts gauge\nnook_store_hears_other_hosts {}",
        u8::from(m.store().hears_other_hosts())
    );
}
