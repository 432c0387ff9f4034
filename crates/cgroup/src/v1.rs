//! cgroup v1: one hierarchy per controller (or a few co-mounted).

use std::path::{Path, PathBuf};

use crate::{CPU_PERIOD_US, CgroupError, Usage, files};

#[derive(Clone, Debug)]
pub(crate) struct V1 {
    pub cpu: PathBuf,
    pub memory: PathBuf,
    /// Where `cpuacct.usage` lives; may be the same mount as `cpu`.
    pub cpuacct: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl V1 {
    /// Every hierarchy a group lives in, each once.
    pub fn hierarchies(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = vec![&self.cpu];
        for h in [
            Some(&self.memory),
            self.cpuacct.as_ref(),
            self.pids.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !out.contains(&h.as_path()) {
                out.push(h);
            }
        }
        out
    }

    pub fn roots(&self) -> Vec<PathBuf> {
        self.hierarchies().into_iter().map(Path::to_owned).collect()
    }

    /// `top` is `nook`, `account` is `nook/<account>`.
    pub fn set_account(
        &self,
        top: &Path,
        account: &Path,
        quota_us: Option<u64>,
        memory: Option<u64>,
        swap: u64,
    ) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            for rel in [top, account] {
                let dir = h.join(rel);
                files::mkdir(&dir)?;
                if h == self.memory {
                    use_hierarchy(&dir);
                }
            }
        }
        let cpu = self.cpu.join(account);
        files::write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        files::write(
            &cpu.join("cpu.cfs_quota_us"),
            &quota_us.map_or("-1".to_owned(), |q| q.to_string()),
        )?;
        set_memory_limit(&self.memory.join(account), memory, swap)
    }

    pub fn set_vm(&self, vm: &Path, shares: u64, soft: Option<u64>) -> Result<(), CgroupError> {
        for h in self.hierarchies() {
            files::mkdir(&h.join(vm))?;
        }
        files::write(&self.cpu.join(vm).join("cpu.shares"), &shares.to_string())?;
        files::write(
            &self.memory.join(vm).join("memory.soft_limit_in_bytes"),
            &soft.map_or("-1".to_owned(), |s| s.to_string()),
        )
    }

    pub fn memory(&self, rel: &Path) -> Result<crate::VmMemory, CgroupError> {
        let dir = self.memory.join(rel);
        let usage = files::read_u64(&dir.join("memory.usage_in_bytes"))?;
        // With swap accounting, memsw is RAM plus swap; without it nothing tells swap apart.
        let swapped = match files::read_u64(&dir.join("memory.memsw.usage_in_bytes")) {
            Ok(both) => both.saturating_sub(usage),
            Err(_) => 0,
        };
        // The working set: file cache nobody touched lately goes as soon as it is needed.
        let cold_cache =
            files::read_keyed(&dir.join("memory.stat"), "total_inactive_file").unwrap_or(0);
        Ok(crate::VmMemory {
            resident_bytes: usage.saturating_sub(cold_cache),
            swapped_bytes: swapped,
        })
    }

    /// v1 has no proactive reclaim file: the group's limit is lowered to `keep` for a moment,
    /// which makes the kernel reclaim (to swap, as `memory.swappiness` 100 prefers) down to
    /// it, then lifted again. A limit the kernel cannot reach (`EBUSY`) is tried halfway up.
    pub fn squeeze(&self, rel: &Path, keep: u64) -> Result<(), CgroupError> {
        let dir = self.memory.join(rel);
        files::write(&dir.join("memory.swappiness"), "100")?;
        let limit = dir.join("memory.limit_in_bytes");
        let usage = files::read_u64(&dir.join("memory.usage_in_bytes"))?;
        let mut target = keep.max(1 << 20);
        while target < usage {
            match files::try_write(&limit, &target.to_string()) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    target += (usage - target) / 2 + 1;
                }
                Err(source) => {
                    let _ = files::try_write(&limit, "-1");
                    return Err(CgroupError::Write {
                        path: limit,
                        value: target.to_string(),
                        source,
                    });
                }
            }
        }
        files::write(&limit, "-1")
    }

    pub fn usage(&self, rel: &Path) -> Result<Usage, CgroupError> {
        let cpu_usage_ns = match &self.cpuacct {
            Some(h) => files::read_u64(&h.join(rel).join("cpuacct.usage"))?,
            None => 0,
        };
        let memory_bytes = files::read_u64(&self.memory.join(rel).join("memory.usage_in_bytes"))?;
        Ok(Usage {
            cpu_usage_ns,
            memory_bytes,
        })
    }
}

/// Asks for hierarchical accounting. It is the default (and the only mode)
/// on kernels since 5.x, so a refusal is only logged.
fn use_hierarchy(dir: &Path) {
    let path = dir.join("memory.use_hierarchy");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = files::try_write(&path, "1") {
        tracing::warn!(path = %path.display(), error = %e, "cannot enable memory.use_hierarchy");
    }
}

/// Sets `memory.limit_in_bytes` and, when swap accounting exists,
/// `memory.memsw.limit_in_bytes` to it plus `swap`, so swap extends the cap by
/// no more than that (not at all with 0). The kernel wants memory <= memsw at
/// every step: lowering writes memory first, raising writes memsw first.
fn set_memory_limit(dir: &Path, limit: Option<u64>, swap: u64) -> Result<(), CgroupError> {
    let value = limit.map_or("-1".to_owned(), |l| l.to_string());
    let both = limit.map_or("-1".to_owned(), |l| l.saturating_add(swap).to_string());
    let mem = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    if !memsw.exists() {
        return files::write(&mem, &value);
    }
    match files::try_write(&mem, &value) {
        Ok(()) => files::write(&memsw, &both),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            files::write(&memsw, &both)?;
            files::write(&mem, &value)
        }
        Err(source) => Err(CgroupError::Write {
            path: mem,
            value,
            source,
        }),
    }
}
