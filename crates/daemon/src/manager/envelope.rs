//! The envelope: what an account and the host may run (`admit`, with the host's share as
//! the pure `host_room`), the cgroups that hold VMs to it, and what VMs use (`stat`, idleness).

use super::*;

impl Manager {
    /// Re-applies an account's plan to its cgroup after the plan changed.
    pub async fn apply_plan(&self, account_id: &str) {
        let Some(cg) = &self.cgroups else { return };
        let Ok(plan) = self.plan_for(account_id).await else {
            return;
        };
        let limits = self.account_limits(&plan);
        let (cg, id) = (cg.clone(), account_id.to_string());
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || cg.set_account(&id, limits)).await
        {
            tracing::warn!(%err, account = account_id, "could not apply the plan to the cgroup");
        }
    }

    /// What an account's cgroup is held to: its plan, and the swap the pack level allows.
    pub(super) fn account_limits(&self, plan: &nook_store::Plan) -> nook_cgroup::AccountLimits {
        let memory_bytes = u64::from(plan.memory_mib) << 20;
        nook_cgroup::AccountLimits {
            cpus: plan.cpu,
            memory_bytes,
            swap_bytes: self.tiers().pack.swap_allowance(memory_bytes),
        }
    }

    /// CPU time and real memory of one confined VM.
    pub fn vm_usage(&self, owner: &str, id: &str) -> Option<nook_cgroup::Usage> {
        if owner == ADMIN_OWNER {
            return None;
        }
        self.cgroups.as_ref()?.vm_usage(owner, id).ok()
    }

    /// Running VMs that live in an account's cgroup (the ones idle detection looks after).
    pub async fn confined_vms(&self) -> Vec<VmRecord> {
        if self.cgroups.is_none() {
            return Vec::new();
        }
        let live: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        self.store
            .list()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|vm| {
                vm.owner != ADMIN_OWNER && vm.state == VmState::Running && live.contains(&vm.id)
            })
            .collect()
    }

    /// CPU nanoseconds and network bytes (both directions) a VM has used so far.
    pub fn activity(&self, vm: &VmRecord) -> Option<(u64, u64)> {
        let cpu = self
            .cgroups
            .as_ref()?
            .vm_usage(&vm.owner, &vm.id)
            .ok()?
            .cpu_usage_ns;
        let net = tap_counter(vm.slot, "rx_bytes").unwrap_or(0)
            + tap_counter(vm.slot, "tx_bytes").unwrap_or(0);
        Some((cpu, net))
    }

    /// Turns a VM's idle knobs on or off; a no-op when nothing changes.
    pub async fn set_idle(&self, vm: &VmRecord, idle: bool) {
        let changed = {
            let mut set = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle {
                set.insert(vm.id.clone())
            } else {
                set.remove(&vm.id)
            }
        };
        let Some(cg) = self.cgroups.clone().filter(|_| changed) else {
            return;
        };
        let knobs = if idle {
            // Weight 10 against the default 100; memory above a quarter of its size is the
            // first to go when the account presses on its cap.
            nook_cgroup::VmKnobs {
                cpu_weight: 10,
                memory_high: Some((u64::from(vm.memory_mib) << 20) / 4),
            }
        } else {
            nook_cgroup::VmKnobs {
                cpu_weight: 100,
                memory_high: None,
            }
        };
        if idle {
            self.pack_idle(vm).await;
        }
        let (owner, id, name) = (vm.owner.clone(), vm.id.clone(), vm.name.clone());
        match tokio::task::spawn_blocking(move || cg.set_vm(&owner, &id, knobs)).await {
            Ok(Ok(())) => {
                tracing::info!(vm = %name, idle, "idle knobs {}", if idle { "on" } else { "off" })
            }
            Ok(Err(err)) => tracing::warn!(vm = %name, %err, "could not change idle knobs"),
            Err(_) => {}
        }
    }

    /// Moves an idle VM's memory down the tiers (`--pack`), keeping what the level says in
    /// RAM. The idle loop calls it when the VM turns idle and again while it stays idle, as
    /// its timers touch pages back in.
    pub async fn pack_idle(&self, vm: &VmRecord) {
        let Some(keep) = self.tiers.pack.idle_keep(u64::from(vm.memory_mib) << 20) else {
            return;
        };
        let Some(cg) = self.cgroups.clone() else {
            return;
        };
        let (owner, id, name) = (vm.owner.clone(), vm.id.clone(), vm.name.clone());
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || cg.squeeze_vm(&owner, &id, keep)).await {
            Ok(Ok(m)) => tracing::debug!(
                vm = %name,
                resident_mib = m.resident_bytes >> 20,
                swapped_mib = m.swapped_bytes >> 20,
                ms = started.elapsed().as_millis() as u64,
                "packed idle VM"
            ),
            Ok(Err(err)) => tracing::warn!(vm = %name, %err, "could not pack idle VM"),
            Err(_) => {}
        }
    }

    /// How a VM's agent browser is held to the VM's account: each of its processes joins a
    /// group of its own beside the account's VMs (`browser-<vm id>`), so the envelope's CPU and
    /// memory caps bound it too. None for VMs outside any envelope.
    pub fn browser_confinement(&self, vm: &VmRecord) -> Option<nook_agent::chromium::Confine> {
        if vm.owner == ADMIN_OWNER {
            return None;
        }
        let cg = self.cgroups.clone()?;
        let (owner, group) = (vm.owner.clone(), browser_group(&vm.id));
        Some(Arc::new(move |pid| {
            cg.set_vm(
                &owner,
                &group,
                nook_cgroup::VmKnobs {
                    cpu_weight: 100,
                    memory_high: None,
                },
            )
            .and_then(|()| cg.attach(&owner, &group, pid))
            .map_err(|e| e.to_string())
        }))
    }

    /// Removes the browser groups of VMs whose browser is gone (`live`: the VMs that have one).
    /// A group whose processes are still exiting is left for the next call.
    pub fn remove_browser_groups(&self, live: &[String]) {
        let Some(cg) = &self.cgroups else { return };
        for account in cg.list_accounts().unwrap_or_default() {
            for group in cg.list_vms(&account).unwrap_or_default() {
                let Some(vm) = group.strip_prefix(BROWSER_GROUP) else {
                    continue;
                };
                if !live.iter().any(|id| id == vm) {
                    let _ = cg.remove_vm(&account, &group);
                }
            }
        }
    }

    pub fn is_idle(&self, id: &str) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// CPU time and real memory of an account's running VMs, when cgroups are in use.
    pub fn account_usage(&self, account_id: &str) -> Option<nook_cgroup::Usage> {
        self.cgroups.as_ref()?.account_usage(account_id).ok()
    }

    pub async fn stat(&self, name: &str, scope: Scope<'_>) -> Result<VmStat, ApiError> {
        let vm = self.record(name, scope).await?;
        let disk_host_bytes = std::fs::metadata(self.paths(&vm.id).disk())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        let metrics = match vm.state {
            VmState::Running => match self.agent(&vm).await {
                Ok(agent) => tokio::time::timeout(Duration::from_secs(5), agent.metrics())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            },
            _ => None,
        };
        let counter = |which: &str| tap_counter(vm.slot, which);
        let running = vm.state == VmState::Running;
        let memory = match (&self.cgroups, running) {
            (Some(cg), true) => {
                let (cg, owner, id) = (cg.clone(), vm.owner.clone(), vm.id.clone());
                tokio::task::spawn_blocking(move || cg.vm_memory(&owner, &id).ok())
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        Ok(VmStat {
            memory_resident_bytes: memory.map(|m| m.resident_bytes),
            memory_swapped_bytes: memory.map(|m| m.swapped_bytes),
            vm: self.info(&vm),
            uptime_secs: metrics.as_ref().map(|m| m.uptime_secs),
            load_avg_1m: metrics.as_ref().map(|m| m.load_avg_1m),
            mem_total_kib: metrics.as_ref().map(|m| m.mem_total_kib),
            mem_available_kib: metrics.as_ref().map(|m| m.mem_available_kib),
            disk_total_kib: metrics.as_ref().map(|m| m.disk_total_kib),
            disk_available_kib: metrics.as_ref().map(|m| m.disk_available_kib),
            disk_host_bytes,
            // The tap's receive is the VM's transmit.
            net_rx_bytes: if running { counter("tx_bytes") } else { None },
            net_tx_bytes: if running { counter("rx_bytes") } else { None },
            processes: metrics.as_ref().map(|m| m.processes),
            idle: self.is_idle(&vm.id),
        })
    }

    /// The envelope of an account: its own plan, or the configured default.
    pub async fn plan_for(&self, account_id: &str) -> Result<nook_store::Plan, ApiError> {
        Ok(self
            .store
            .plan(account_id)
            .await
            .map_err(|e| errors::from_store("read the plan", e))?
            .unwrap_or(self.cfg.default_plan))
    }

    /// Refuses to create, start or resize a VM when that would push `owner` past its
    /// envelope. Each message says what to stop, remove or resize. VMs made through the admin
    /// socket belong to no plan.
    pub(super) async fn admit(
        &self,
        owner: &str,
        ask: Ask<'_>,
        image: ImageKind,
        wants: Wants,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        self.admit_on(owner, ask, image, wants, Stays::Here).await
    }

    /// [`Self::admit`], for a VM that may only pass through this host (a clone made here and
    /// moved to another): then this host's promised totals do not count it, only the memory
    /// it really has left for the while.
    pub(super) async fn admit_on(
        &self,
        owner: &str,
        ask: Ask<'_>,
        image: ImageKind,
        wants: Wants,
        stays: Stays,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        let admitted = self.host_admission.lock().await;
        let starts = !matches!(ask, Ask::Resize { .. });
        // Until a VM has booted nook does not know its accelerator: TCG's larger cost then.
        let tcg_cache = (self.accel() != Some(Accel::Kvm))
            .then(|| tcg_cache_filled(image, self.cfg.tcg_cache_mib));
        // (No memory asked for: a clone that stays stopped, which boots nothing.)
        let need = match wants.memory_mib {
            0 => 0,
            mib => nook_memory::boot_footprint(u64::from(mib) << 20, tcg_cache),
        };
        if starts {
            // Every VM, the admin's too: what is at stake is the VMs already running.
            host_memory_room(
                &nook_memory::HostMemory::read(),
                need,
                self.cfg.host_limits.memory_reserve_bytes,
            )?;
        }
        if owner == ADMIN_OWNER {
            return Ok(admitted);
        }
        let all = self
            .store
            .list()
            .await
            .map_err(|e| errors::from_store("list VMs", e))?;
        let factor = self.tiers().pack.overcommit_factor();
        if stays == Stays::Here {
            host_room(
                &self.host_limits(),
                &self.vms_here(&all),
                ask,
                wants.memory_mib,
                wants.disk_bytes,
            )?;
        }
        let plan = self.plan_for(owner).await?;
        // Packing idle VMs lets the running ones add up further past the envelope.
        let overcommit = self.cfg.memory_overcommit * factor;
        account_room(&plan, overcommit, &all, owner, ask, wants)?;
        if starts && let Some(cg) = &self.cgroups {
            let limits = self.account_limits(&plan);
            let cap = limits.memory_bytes + limits.swap_bytes;
            if let Ok(used) = cg.account_memory(owner) {
                envelope_in_use(&all, owner, used, cap, need)?;
            }
        }
        Ok(admitted)
    }
}

impl Manager {
    /// This host's limits, its memory stretched as far as packing allows.
    fn host_limits(&self) -> crate::config::HostLimits {
        let mut limits = self.cfg.host_limits;
        if limits.memory_from_ram {
            let factor = self.tiers().pack.overcommit_factor();
            limits.memory_mib = (limits.memory_mib as f64 * factor) as u64;
        }
        limits
    }

    /// The VMs of `all` this host holds: its own limits count these (an account's envelope
    /// spans the fleet). With one host, all of them, whatever host name they were made under.
    fn vms_here(&self, all: &[VmRecord]) -> Vec<VmRecord> {
        let me = self.cfg.host_name.as_str();
        all.iter()
            .filter(|vm| !self.store.is_shared() || vm.host.is_empty() || vm.host == me)
            .cloned()
            .collect()
    }

    /// Whether this host's own limits take `vm`, arriving from another host (running when
    /// `runs`): one more VM, its disk, and its memory if it runs.
    pub(super) async fn host_takes(&self, vm: &VmRecord, runs: bool) -> Result<(), ApiError> {
        let all = self
            .store
            .list()
            .await
            .map_err(|e| errors::from_store("list VMs", e))?;
        let here: Vec<VmRecord> = self
            .vms_here(&all)
            .into_iter()
            .filter(|v| v.id != vm.id)
            .collect();
        let memory = if runs { vm.memory_mib } else { 0 };
        host_room(
            &self.host_limits(),
            &here,
            Ask::Create,
            memory,
            vm.disk_bytes,
        )
    }
}

/// How much of a translation cache of `cache_mib` a guest of `image` fills as it boots and
/// settles under TCG: measured here, a tiny guest 64 MiB, a default one (systemd, Debian's
/// userland) all of the 128 MiB default.
fn tcg_cache_filled(image: ImageKind, cache_mib: u32) -> u64 {
    let mib = match image {
        ImageKind::Tiny => cache_mib.min(64),
        ImageKind::Default => cache_mib,
    };
    u64::from(mib) << 20
}

/// Whether the host, by what it really has left, can take a VM that will soon touch `need`
/// bytes. The refusal says it is the host, not the account, and that waiting may help.
pub(super) fn host_memory_room(
    host: &nook_memory::HostMemory,
    need: u64,
    reserve: u64,
) -> Result<(), ApiError> {
    let msg = match host.admit(need, reserve) {
        Ok(()) => return Ok(()),
        Err(nook_memory::Pressure::Short {
            room_bytes,
            need_bytes,
            reserve_bytes,
        }) => format!(
            "This host is short of memory: {} left in RAM and swap, and a new VM needs about {} beside the {} kept free so that no running VM is killed. Try again later, or stop a VM",
            format_size(room_bytes),
            format_size(need_bytes),
            format_size(reserve_bytes)
        ),
        Err(nook_memory::Pressure::Thrashing { stalled_pct }) => format!(
            "This host is short of memory: it spent {stalled_pct:.0}% of the last 10 s waiting for memory. Try again later, or stop a VM"
        ),
    };
    Err(ApiError::new(ErrorCode::HostShortOfMemory, msg))
}

/// Whether `owner`'s envelope, by what its VMs really use in RAM and swap (`used`, of `cap`),
/// has room for a VM that will soon touch `need` bytes. Nominal sizes may pass the envelope
/// (idle VMs give memory back); this is what keeps the envelope's OOM killer from picking a
/// running VM when they all wake at once.
pub(super) fn envelope_in_use(
    all: &[VmRecord],
    owner: &str,
    used: nook_cgroup::VmMemory,
    cap: u64,
    need: u64,
) -> Result<(), ApiError> {
    let in_use = used.resident_bytes + used.swapped_bytes;
    if in_use.saturating_add(need) <= cap {
        return Ok(());
    }
    let mut running: Vec<&VmRecord> = all
        .iter()
        .filter(|vm| vm.owner == owner && vm.state == VmState::Running)
        .collect();
    running.sort_by_key(|vm| std::cmp::Reverse(vm.memory_mib));
    let biggest: Vec<&str> = running.iter().take(3).map(|vm| vm.name.as_str()).collect();
    Err(ApiError::new(
        ErrorCode::OverEnvelope,
        format!(
            "Your running VMs already use {} of the {} your envelope holds in RAM and swap, and a new VM needs about {}: stop one ({})",
            format_size(in_use),
            format_size(cap),
            format_size(need),
            biggest.join(", ")
        ),
    ))
}

/// What an operation asks of an envelope.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wants {
    pub cpu: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
}

/// Whether `owner`'s envelope (`plan`, running memory overcommitted by `overcommit`) has room
/// for `ask` beside its VMs among `all`; the refusal says what to do. Pure: `admit` reads the
/// store and holds the host's admission lock around it.
pub(super) fn account_room(
    plan: &nook_store::Plan,
    overcommit: f64,
    all: &[VmRecord],
    owner: &str,
    ask: Ask<'_>,
    wants: Wants,
) -> Result<(), ApiError> {
    let Wants {
        cpu,
        memory_mib,
        disk_bytes,
    } = wants;
    let size = |mib: u64| format_size(mib << 20);
    let refuse = |msg: String| Err(ApiError::new(ErrorCode::OverEnvelope, msg));
    if f64::from(cpu) > plan.cpu.ceil() {
        return refuse(format!(
            "A VM with {cpu} vCPUs does not fit your envelope of {} vCPUs: ask for fewer with --cpu",
            plan.cpu
        ));
    }
    if memory_mib > plan.memory_mib {
        return refuse(format!(
            "A VM with {} of memory does not fit your envelope of {}: ask for less with --memory",
            size(memory_mib.into()),
            size(plan.memory_mib.into())
        ));
    }
    let vms: Vec<&VmRecord> = all
        .iter()
        .filter(|vm| vm.owner == owner && Some(vm.id.as_str()) != ask.existing())
        .collect();
    if matches!(ask, Ask::Create) && vms.len() as u32 >= plan.max_vms {
        return refuse(format!(
            "Your envelope allows {} VMs and you have {}: remove one with `rm NAME`",
            plan.max_vms,
            vms.len()
        ));
    }
    // A resize that keeps the disk is not refused for disks a lowered plan no longer
    // covers: it adds nothing to them.
    let adds_disk = match ask {
        Ask::Create => true,
        Ask::Start(_) => false,
        Ask::Resize { old_disk_bytes, .. } => disk_bytes > old_disk_bytes,
    };
    if adds_disk {
        let disk_used: u64 = vms.iter().map(|vm| vm.disk_bytes).sum();
        if disk_used + disk_bytes > plan.disk_bytes {
            return refuse(format!(
                "A {} disk would bring your VMs' disks to {}, over your envelope's {}: remove a VM or ask for a smaller --disk",
                format_size(disk_bytes),
                format_size(disk_used + disk_bytes),
                format_size(plan.disk_bytes)
            ));
        }
    }
    // A stopped VM's new memory is admitted when it starts, not now.
    if matches!(ask, Ask::Resize { runs: false, .. }) {
        return Ok(());
    }
    let mut running: Vec<&VmRecord> = vms
        .iter()
        .copied()
        .filter(|vm| {
            matches!(
                vm.state,
                VmState::Running | VmState::Starting | VmState::Creating
            )
        })
        .collect();
    let running_mib: u64 = running.iter().map(|vm| u64::from(vm.memory_mib)).sum();
    let limit_mib = (f64::from(plan.memory_mib) * overcommit) as u64;
    if running_mib + u64::from(memory_mib) > limit_mib {
        running.sort_by_key(|vm| std::cmp::Reverse(vm.memory_mib));
        let biggest: Vec<String> = running
            .iter()
            .take(3)
            .map(|vm| format!("{} ({})", vm.name, size(vm.memory_mib.into())))
            .collect();
        return refuse(format!(
            "Running another {} would bring your running VMs to {}, over the {} your {} envelope allows: stop one ({}) or resize it",
            size(memory_mib.into()),
            size(running_mib + u64::from(memory_mib)),
            size(limit_mib),
            size(plan.memory_mib.into()),
            biggest.join(", ")
        ));
    }
    Ok(())
}

/// A byte counter of a VM's tap (`rx_bytes`, `tx_bytes`), seen from the host side.
pub(super) fn tap_counter(slot: u32, which: &str) -> Option<u64> {
    let tap = VmLink::for_slot(slot).ok()?.tap;
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{which}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a VM admitted here stays on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stays {
    Here,
    /// It is made here and then moved to another host.
    Passing,
}

/// What [`Manager::admit`] is asked to let through.
#[derive(Clone, Copy)]
pub(super) enum Ask<'a> {
    /// A new VM: one more VM, its disk, and (unless it stays stopped) its memory.
    Create,
    /// Booting the VM with this id: only its CPU and memory count.
    Start(&'a str),
    /// New sizes for the VM with this id: its disk counts when it grows, its memory only if
    /// it runs (a stopped VM is admitted again when it starts).
    Resize {
        id: &'a str,
        runs: bool,
        old_disk_bytes: u64,
    },
}

/// Whether the host, all accounts together, has room for what `ask` adds: a VM (count and
/// disk) and, when it will run, its memory. Says only that the host is full, never what other
/// accounts hold.
pub(super) fn host_room(
    limits: &crate::config::HostLimits,
    all: &[VmRecord],
    ask: Ask<'_>,
    memory_mib: u32,
    disk_bytes: u64,
) -> Result<(), ApiError> {
    let others = || {
        all.iter()
            .filter(|vm| Some(vm.id.as_str()) != ask.existing())
    };
    let full = |what: &str| {
        Err(ApiError::new(
            ErrorCode::OverEnvelope,
            format!("This host is full ({what}): try again later, or ask its admin for room"),
        ))
    };
    if matches!(ask, Ask::Create) && others().count() as u64 >= u64::from(limits.max_vms) {
        return full("it holds as many VMs as it may");
    }
    let adds_disk = match ask {
        Ask::Create => true,
        Ask::Start(_) => false,
        Ask::Resize { old_disk_bytes, .. } => disk_bytes > old_disk_bytes,
    };
    let disks: u64 = others().map(|vm| vm.disk_bytes).sum();
    if adds_disk && disks.saturating_add(disk_bytes) > limits.disk_bytes {
        return full("its disks are all promised");
    }
    if matches!(ask, Ask::Resize { runs: false, .. }) {
        return Ok(());
    }
    let running: u64 = others()
        .filter(|vm| {
            matches!(
                vm.state,
                VmState::Running | VmState::Starting | VmState::Creating
            )
        })
        .map(|vm| u64::from(vm.memory_mib))
        .sum();
    if running + u64::from(memory_mib) > limits.memory_mib {
        return full("its memory is all promised to running VMs");
    }
    Ok(())
}

impl Ask<'_> {
    /// The VM already counted in the account, left out of the totals it is checked against.
    fn existing(&self) -> Option<&str> {
        match self {
            Ask::Create => None,
            Ask::Start(id) | Ask::Resize { id, .. } => Some(id),
        }
    }
}

/// What a VM's browser group is named after (`browser-<vm id>`); no VM id starts so.
const BROWSER_GROUP: &str = "browser-";

fn browser_group(vm_id: &str) -> String {
    format!("{BROWSER_GROUP}{vm_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_counts_the_translation_cache_its_image_fills() {
        assert_eq!(tcg_cache_filled(ImageKind::Tiny, 128), 64 << 20);
        assert_eq!(tcg_cache_filled(ImageKind::Tiny, 32), 32 << 20);
        assert_eq!(tcg_cache_filled(ImageKind::Default, 128), 128 << 20);
        assert_eq!(tcg_cache_filled(ImageKind::Default, 512), 512 << 20);
    }

    fn vm(id: &str, state: VmState, memory_mib: u32, disk_gib: u64) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: id.into(),
            owner: format!("owner-of-{id}"),
            image: "tiny".into(),
            image_dir: String::new(),
            cpu: 1,
            memory_mib,
            disk_bytes: disk_gib << 30,
            slot: 1,
            state,
            state_reason: None,
            pid: None,
            created_at: String::new(),
            host: String::new(),
            replica_host: String::new(),
            replicated_at_ms: 0,
        }
    }

    #[test]
    fn real_use_refuses_on_a_short_host_or_a_full_envelope() {
        let host = nook_memory::HostMemory {
            total_bytes: 8 << 30,
            available_bytes: 300 << 20,
            swap_total_bytes: 0,
            swap_free_bytes: 0,
            stalled_pct: None,
            ..Default::default()
        };
        let err = host_memory_room(&host, 256 << 20, 256 << 20).expect_err("short");
        assert_eq!(err.code, ErrorCode::HostShortOfMemory);
        assert!(
            err.message.contains("300 MiB left") && err.message.contains("256 MiB"),
            "{}",
            err.message
        );
        assert!(host_memory_room(&host, 64 << 20, 128 << 20).is_ok());

        let mut all = [
            vm("big", VmState::Running, 1024, 1),
            vm("small", VmState::Running, 256, 1),
        ];
        for v in &mut all {
            v.owner = "alice".into();
        }
        let used = nook_cgroup::VmMemory {
            resident_bytes: 1800 << 20,
            swapped_bytes: 200 << 20,
        };
        let err = envelope_in_use(&all, "alice", used, 2 << 30, 64 << 20).expect_err("full");
        assert_eq!(err.code, ErrorCode::OverEnvelope);
        assert!(
            err.message.contains("stop one (big, small)"),
            "{}",
            err.message
        );
        assert!(envelope_in_use(&all, "alice", used, 3 << 30, 64 << 20).is_ok());
    }

    #[test]
    fn the_host_limits_every_account_together() {
        let limits = crate::config::HostLimits {
            memory_mib: 1024,
            disk_bytes: 10 << 30,
            max_vms: 3,
            memory_reserve_bytes: 256 << 20,
            memory_from_ram: false,
        };
        let all = [
            vm("a", VmState::Running, 512, 4),
            vm("b", VmState::Stopped, 512, 4),
        ];
        assert!(host_room(&limits, &all, Ask::Create, 512, 1 << 30).is_ok());
        // Memory counts only running VMs; disk counts all.
        let err = host_room(&limits, &all, Ask::Create, 768, 1 << 30).expect_err("memory");
        assert!(err.message.contains("memory"), "{}", err.message);
        let err = host_room(&limits, &all, Ask::Create, 128, 3 << 30).expect_err("disk");
        assert!(err.message.contains("disks"), "{}", err.message);
        // Starting b adds its memory, not its disk or a VM.
        assert!(host_room(&limits, &all, Ask::Start("b"), 512, 0).is_ok());
        assert!(host_room(&limits, &all, Ask::Start("b"), 600, 0).is_err());
        let three = [
            vm("a", VmState::Stopped, 512, 1),
            vm("b", VmState::Stopped, 512, 1),
            vm("c", VmState::Stopped, 512, 1),
        ];
        let err = host_room(&limits, &three, Ask::Create, 128, 1 << 30).expect_err("count");
        assert!(err.message.contains("as many VMs"), "{}", err.message);
        // A resize of a stopped VM that keeps its disk adds nothing.
        let resize = Ask::Resize {
            id: "a",
            runs: false,
            old_disk_bytes: 1 << 30,
        };
        assert!(host_room(&limits, &three, resize, 4096, 1 << 30).is_ok());
        // The message names nothing of other accounts.
        let err = host_room(&limits, &all, Ask::Create, 768, 1 << 30).expect_err("memory");
        assert!(!err.message.contains("owner-of"), "{}", err.message);
    }

    #[test]
    fn an_envelope_refuses_what_does_not_fit_and_says_what_to_do() {
        let plan = nook_store::Plan {
            cpu: 2.0,
            memory_mib: 1024,
            disk_bytes: 10 << 30,
            max_vms: 3,
        };
        let mine = |id: &str, state, mib, gib| VmRecord {
            owner: "ann".into(),
            ..vm(id, state, mib, gib)
        };
        let all = [
            mine("big", VmState::Running, 1024, 4),
            mine("small", VmState::Stopped, 512, 4),
            // Another account's VMs count against the host, never against ann.
            vm("theirs", VmState::Running, 4096, 50),
        ];
        let room = |ask, cpu, memory_mib, disk_gib: u64| {
            account_room(
                &plan,
                1.5,
                &all,
                "ann",
                ask,
                Wants {
                    cpu,
                    memory_mib,
                    disk_bytes: disk_gib << 30,
                },
            )
            .map_err(|e| e.message)
        };
        assert_eq!(room(Ask::Create, 2, 512, 2), Ok(()));
        assert!(
            room(Ask::Create, 3, 512, 1)
                .expect_err("refused")
                .contains("--cpu")
        );
        assert!(
            room(Ask::Create, 1, 2048, 1)
                .expect_err("refused")
                .contains("--memory")
        );
        let disk = room(Ask::Create, 1, 256, 3).expect_err("refused");
        assert!(
            disk.contains("--disk") && disk.contains("over your envelope"),
            "{disk}"
        );
        // 1024 running + 1024 asked passes 1.5 × 1024: the biggest running VM is named.
        let memory = room(Ask::Create, 1, 1024, 1).expect_err("refused");
        assert!(memory.contains("stop one (big"), "{memory}");
        // Starting a VM does not count that VM twice, nor its disk at all.
        assert_eq!(room(Ask::Start("small"), 1, 512, 0), Ok(()));
        assert!(room(Ask::Start("small"), 1, 1024, 0).is_err());
        // A stopped VM's memory is admitted when it starts; its disk when it grows.
        let resize = |runs, old: u64| Ask::Resize {
            id: "small",
            runs,
            old_disk_bytes: old << 30,
        };
        assert_eq!(room(resize(false, 4), 1, 1024, 4), Ok(()));
        assert!(room(resize(false, 4), 1, 512, 7).is_err());
        assert!(room(resize(true, 4), 1, 1024, 4).is_err());
        // A full envelope of VMs.
        let crowded: Vec<VmRecord> = (0..3)
            .map(|i| mine(&format!("v{i}"), VmState::Stopped, 128, 1))
            .collect();
        let full = account_room(
            &plan,
            1.5,
            &crowded,
            "ann",
            Ask::Create,
            Wants {
                cpu: 1,
                memory_mib: 128,
                disk_bytes: 1 << 30,
            },
        )
        .expect_err("refused")
        .message;
        assert!(
            full.contains("allows 3 VMs") && full.contains("rm NAME"),
            "{full}"
        );
    }
}
