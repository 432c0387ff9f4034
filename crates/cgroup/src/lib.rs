//! Per-account and per-VM resource control with Linux cgroups.
//!
//! Every group nook makes lives under one top group ([`TOP`] unless the daemon names its
//! own with [`Cgroups::under`], so several daemons can share a machine) at the root of
//! each cgroup hierarchy it uses: `nook/<account>` carries the account's CPU
//! quota and memory hard limit, and `nook/<account>/<vm>` (a leaf, the only
//! place processes live) carries the VM's CPU weight and memory soft limit.
//! (The daemon gives a VM's agent browser a leaf of its own the same way.)
//! Both cgroup v2 (unified) and v1 (per-controller hierarchies) are handled;
//! [`Cgroups::probe`] finds out which one can be used.
//!
//! This is the privileged corner of nook for cgroups: it writes plain files
//! under `/sys/fs/cgroup` and must not touch anything outside its top group, kill
//! processes, or move processes anywhere but into VM groups. Removal is
//! idempotent and refuses (rather than evicting) while processes remain.
//! The API is synchronous: the daemon calls it from `spawn_blocking`.

mod error;
mod files;
mod ksm;
mod mounts;
mod v1;
mod v2;

use std::path::{Path, PathBuf};

pub use error::CgroupError;
pub use ksm::{enable_ksm, ksm_pages_sharing};

/// The top group under which all of nook's groups live, unless [`Cgroups::under`] names
/// another.
pub const TOP: &str = "nook";
/// The longest account or VM name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// The CFS period used for account quotas (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup interface is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    V1,
    V2,
}

/// An account's limits, shared by all its VMs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccountLimits {
    /// CFS quota in CPUs (2.0 = two full CPUs), at least 0.01;
    /// `f64::INFINITY` means no quota.
    pub cpus: f64,
    /// Hard cap on the sum of its QEMUs' memory in RAM; `u64::MAX` means no cap.
    pub memory_bytes: u64,
    /// What its VMs may have in swap on top of that (the tiers idle VMs are packed into);
    /// 0: swap cannot extend the cap at all.
    pub swap_bytes: u64,
}

/// A VM's share within its account.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VmKnobs {
    /// 1..=10000, default 100 (v2 `cpu.weight`; v1 `cpu.shares` = weight*1024/100).
    pub cpu_weight: u32,
    /// Soft limit: v2 `memory.high`, v1 `memory.soft_limit_in_bytes`; `None` for none.
    pub memory_high: Option<u64>,
}

impl Default for VmKnobs {
    fn default() -> Self {
        VmKnobs {
            cpu_weight: 100,
            memory_high: None,
        }
    }
}

/// Where a VM's memory is: in RAM (its working set: file cache not touched lately is left
/// out, since the kernel drops it first), or moved out to swap (a compressed tier or a disk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmMemory {
    pub resident_bytes: u64,
    pub swapped_bytes: u64,
}

/// What a group has consumed: CPU time since it was made, memory now.
/// `cpu_usage_ns` is 0 on v1 hosts without a `cpuacct` hierarchy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
}

/// The cgroup hierarchies found on this host.
#[derive(Clone, Debug)]
pub struct Cgroups {
    backend: Backend,
    /// The top group: [`TOP`], or the daemon's own.
    top: PathBuf,
}

#[derive(Clone, Debug)]
enum Backend {
    V1(v1::V1),
    V2(v2::V2),
}

impl Cgroups {
    /// Finds usable hierarchies: cgroup v2 with the `cpu` and `memory`
    /// controllers if there is one, else v1 `cpu` and `memory` (plus
    /// `cpuacct` and `pids` when mounted).
    pub fn probe() -> Result<Cgroups, CgroupError> {
        let path = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(path)
            .map_err(|e| CgroupError::NotAvailable(format!("cannot read {path}: {e}")))?;
        let cg = Self::from_mounts(&mounts::cgroup_mounts(&text))?;
        for root in cg.roots() {
            if let Err(e) = nix::unistd::access(&root, nix::unistd::AccessFlags::W_OK) {
                return Err(CgroupError::NotAvailable(format!(
                    "cannot write {} ({e}): run nookd as root",
                    root.display()
                )));
            }
        }
        tracing::debug!(?cg, "probed cgroups");
        Ok(cg)
    }

    fn from_mounts(mounts: &[mounts::Mount]) -> Result<Cgroups, CgroupError> {
        let mut notes = Vec::new();
        for m in mounts.iter().filter(|m| m.fstype == "cgroup2") {
            let controllers =
                std::fs::read_to_string(m.point.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if !(has("cpu") && has("memory")) {
                notes.push(format!(
                    "cgroup v2 at {} lacks cpu or memory (bound to v1?)",
                    m.point.display()
                ));
            } else if m.read_only {
                notes.push(format!("{} is mounted read-only", m.point.display()));
            } else {
                return Ok(Cgroups {
                    backend: Backend::V2(v2::V2 {
                        root: m.point.clone(),
                    }),
                    top: PathBuf::from(TOP),
                });
            }
        }
        let find = |ctl: &str| {
            let ro = mounts
                .iter()
                .any(|m| m.fstype == "cgroup" && m.has_option(ctl) && m.read_only);
            let found = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.has_option(ctl) && !m.read_only)
                .map(|m| m.point.clone());
            (found, ro)
        };
        let (cpu, cpu_ro) = find("cpu");
        let (memory, memory_ro) = find("memory");
        if let (Some(cpu), Some(memory)) = (cpu, memory) {
            return Ok(Cgroups {
                backend: Backend::V1(v1::V1 {
                    cpu,
                    memory,
                    cpuacct: find("cpuacct").0,
                    pids: find("pids").0,
                }),
                top: PathBuf::from(TOP),
            });
        }
        if cpu_ro || memory_ro {
            notes.push("cgroup v1 cpu or memory is mounted read-only".to_owned());
        }
        let mut msg = "found neither cgroup v2 with the cpu and memory controllers nor cgroup v1 \
                       cpu and memory hierarchies; mount cgroup2 on /sys/fs/cgroup read-write \
                       (systemd.unified_cgroup_hierarchy=1) and run nookd as root on the host"
            .to_owned();
        for n in notes {
            msg.push_str("; ");
            msg.push_str(&n);
        }
        Err(CgroupError::NotAvailable(msg))
    }

    /// The same hierarchies, with every group under `top` instead of [`TOP`]: one top group
    /// per daemon when several share a machine. `top` is a plain group name.
    pub fn under(self, top: &str) -> Result<Cgroups, CgroupError> {
        check_name(top)?;
        Ok(Cgroups {
            top: PathBuf::from(top),
            ..self
        })
    }

    /// The top group's name.
    pub fn top(&self) -> &Path {
        &self.top
    }

    pub fn flavor(&self) -> Flavor {
        match self.backend {
            Backend::V1(_) => Flavor::V1,
            Backend::V2(_) => Flavor::V2,
        }
    }

    /// The mount points of the hierarchies in use (one on v2).
    pub fn roots(&self) -> Vec<PathBuf> {
        match &self.backend {
            Backend::V1(v) => v.roots(),
            Backend::V2(v) => vec![v.root.clone()],
        }
    }

    /// The directories of `nook/<account>` (or `nook/<account>/<vm>`), one
    /// per hierarchy in use, whether or not they exist. For diagnostics and tests.
    pub fn group_dirs(&self, account: &str, vm: Option<&str>) -> Result<Vec<PathBuf>, CgroupError> {
        let rel = match vm {
            Some(vm) => self.vm_rel(account, vm)?,
            None => self.account_rel(account)?,
        };
        Ok(self.dirs(&rel))
    }

    fn account_rel(&self, account: &str) -> Result<PathBuf, CgroupError> {
        check_name(account)?;
        Ok(self.top.join(account))
    }

    fn vm_rel(&self, account: &str, vm: &str) -> Result<PathBuf, CgroupError> {
        check_name(vm)?;
        Ok(self.account_rel(account)?.join(vm))
    }

    fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        self.roots().into_iter().map(|r| r.join(rel)).collect()
    }

    fn require(&self, rel: &Path, hint: &'static str) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.dirs(rel);
        if dirs.iter().all(|d| d.is_dir()) {
            Ok(dirs)
        } else {
            Err(CgroupError::Missing {
                group: rel.display().to_string(),
                hint,
            })
        }
    }

    /// Creates or updates `nook/<account>`: CPU quota (period 100 ms) and
    /// memory hard limit. Idempotent.
    pub fn set_account(&self, account: &str, limits: AccountLimits) -> Result<(), CgroupError> {
        let rel = self.account_rel(account)?;
        let quota = quota_us(limits.cpus)?;
        let memory = match limits.memory_bytes {
            0 => {
                return Err(CgroupError::InvalidLimit(
                    "memory_bytes must be positive (u64::MAX for no cap)".to_owned(),
                ));
            }
            u64::MAX => None,
            m => Some(m),
        };
        tracing::debug!(account, ?limits, "set account cgroup");
        match &self.backend {
            Backend::V1(v) => v.set_account(&self.top, &rel, quota, memory, limits.swap_bytes),
            Backend::V2(v) => v.set_account(&self.top, &rel, quota, memory, limits.swap_bytes),
        }
    }

    /// Creates or updates `nook/<account>/<vm>` with the knobs. Idempotent.
    /// The account group must exist ([`Cgroups::set_account`]).
    pub fn set_vm(&self, account: &str, vm: &str, knobs: VmKnobs) -> Result<(), CgroupError> {
        let acct = self.account_rel(account)?;
        let rel = self.vm_rel(account, vm)?;
        if !(1..=10_000).contains(&knobs.cpu_weight) {
            return Err(CgroupError::InvalidLimit(format!(
                "cpu_weight {} is outside 1..=10000",
                knobs.cpu_weight
            )));
        }
        self.require(&acct, "call set_account first")?;
        tracing::debug!(account, vm, ?knobs, "set VM cgroup");
        match &self.backend {
            Backend::V1(v) => {
                let shares = (u64::from(knobs.cpu_weight) * 1024 / 100).max(2);
                v.set_vm(&rel, shares, knobs.memory_high)
            }
            Backend::V2(v) => v.set_vm(&acct, &rel, knobs.cpu_weight, knobs.memory_high),
        }
    }

    /// Moves a process with all its threads into `nook/<account>/<vm>` (on
    /// v1, in every hierarchy in use). Attach before the process allocates
    /// its memory: v1 leaves earlier charges with the old group.
    pub fn attach(&self, account: &str, vm: &str, pid: u32) -> Result<(), CgroupError> {
        let rel = self.vm_rel(account, vm)?;
        let dirs = self.require(&rel, "call set_vm first")?;
        for dir in dirs {
            files::attach(&dir, pid)?;
        }
        tracing::debug!(account, vm, pid, "attached process to cgroup");
        Ok(())
    }

    pub fn vm_usage(&self, account: &str, vm: &str) -> Result<Usage, CgroupError> {
        let rel = self.vm_rel(account, vm)?;
        self.require(&rel, "call set_vm first")?;
        self.usage(&rel)
    }

    /// Where the VM's memory is now.
    pub fn vm_memory(&self, account: &str, vm: &str) -> Result<VmMemory, CgroupError> {
        let rel = self.vm_rel(account, vm)?;
        self.require(&rel, "call set_vm first")?;
        match &self.backend {
            Backend::V1(v) => v.memory(&rel),
            Backend::V2(v) => v.memory(&rel),
        }
    }

    /// Moves the VM's memory out to swap until about `keep` bytes stay in RAM: the kernel
    /// reclaims the least recently used pages first, and the VM faults them back in when it
    /// touches them. Needs swap on the host; without it only clean cache goes. Slow (it is
    /// the kernel's reclaim, at a few hundred MiB/s): call it off the async runtime.
    pub fn squeeze_vm(&self, account: &str, vm: &str, keep: u64) -> Result<VmMemory, CgroupError> {
        let rel = self.vm_rel(account, vm)?;
        self.require(&rel, "call set_vm first")?;
        match &self.backend {
            Backend::V1(v) => v.squeeze(&rel, keep)?,
            Backend::V2(v) => v.squeeze(&rel, keep)?,
        }
        self.vm_memory(account, vm)
    }

    /// What all of an account's VMs hold, in RAM and in swap.
    pub fn account_memory(&self, account: &str) -> Result<VmMemory, CgroupError> {
        let rel = self.account_rel(account)?;
        self.require(&rel, "call set_account first")?;
        match &self.backend {
            Backend::V1(v) => v.memory(&rel),
            Backend::V2(v) => v.memory(&rel),
        }
    }

    pub fn account_usage(&self, account: &str) -> Result<Usage, CgroupError> {
        let rel = self.account_rel(account)?;
        self.require(&rel, "call set_account first")?;
        self.usage(&rel)
    }

    fn usage(&self, rel: &Path) -> Result<Usage, CgroupError> {
        match &self.backend {
            Backend::V1(v) => v.usage(rel),
            Backend::V2(v) => v.usage(rel),
        }
    }

    /// Removes `nook/<account>/<vm>` once it holds no process; fails with
    /// [`CgroupError::Busy`] otherwise. Absent is fine.
    pub fn remove_vm(&self, account: &str, vm: &str) -> Result<(), CgroupError> {
        let rel = self.vm_rel(account, vm)?;
        self.remove(&rel, false)
    }

    /// Removes `nook/<account>` once it has no VM group left; fails with
    /// [`CgroupError::Busy`] otherwise. Absent is fine.
    pub fn remove_account(&self, account: &str) -> Result<(), CgroupError> {
        let rel = self.account_rel(account)?;
        self.remove(&rel, true)
    }

    fn remove(&self, rel: &Path, account: bool) -> Result<(), CgroupError> {
        let busy = |reason| CgroupError::Busy {
            group: rel.display().to_string(),
            reason,
        };
        let dirs = self.dirs(rel);
        // Check every hierarchy before removing from any.
        for dir in &dirs {
            if account && !files::children(dir)?.is_empty() {
                return Err(busy("VM groups remain; remove them first"));
            }
            if !files::procs(dir)?.is_empty() {
                return Err(busy("processes remain; stop them first"));
            }
        }
        for dir in &dirs {
            if !files::rmdir(dir)? {
                return Err(busy("the kernel still counts it as in use; retry"));
            }
        }
        Ok(())
    }

    /// Whether the process is in `nook/<account>/<vm>` (in every hierarchy in use).
    pub fn contains(&self, account: &str, vm: &str, pid: u32) -> bool {
        let Ok(rel) = self.vm_rel(account, vm) else {
            return false;
        };
        self.dirs(&rel)
            .iter()
            .all(|d| files::procs(d).is_ok_and(|p| p.contains(&pid)))
    }

    /// The account groups that exist, for sweeping stale ones at start-up.
    pub fn list_accounts(&self) -> Result<Vec<String>, CgroupError> {
        self.list(&self.top)
    }

    /// The VM groups of an account that exist.
    pub fn list_vms(&self, account: &str) -> Result<Vec<String>, CgroupError> {
        self.list(&self.account_rel(account)?)
    }

    fn list(&self, rel: &Path) -> Result<Vec<String>, CgroupError> {
        let mut out = Vec::new();
        for dir in self.dirs(rel) {
            for child in files::children(&dir)? {
                if let Some(name) = child.file_name().and_then(|n| n.to_str())
                    && check_name(name).is_ok()
                    && !out.iter().any(|o| o == name)
                {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// CFS quota for `cpus` CPUs at the 100 ms period; `None` for no quota.
fn quota_us(cpus: f64) -> Result<Option<u64>, CgroupError> {
    if cpus == f64::INFINITY {
        return Ok(None);
    }
    if !cpus.is_finite() || cpus < 0.01 {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus {cpus} must be at least 0.01 (f64::INFINITY for no quota)"
        )));
    }
    // Saturating float-to-int conversion; the kernel rejects absurd values.
    Ok(Some((cpus * CPU_PERIOD_US as f64).round() as u64))
}

/// Names v1 uses for files in every group; a group cannot share them.
const RESERVED: &[&str] = &["tasks", "notify_on_release", "release_agent"];

fn check_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !RESERVED.contains(&name);
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests;
