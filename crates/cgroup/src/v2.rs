//! cgroup v2: one unified hierarchy.

use std::io;
use std::path::{Path, PathBuf};

use crate::{CPU_PERIOD_US, CgroupError, Usage, files};

#[derive(Clone, Debug)]
pub(crate) struct V2 {
    pub root: PathBuf,
}

impl V2 {
    /// `top` is `nook`, `account` is `nook/<account>`.
    pub fn set_account(
        &self,
        top: &Path,
        account: &Path,
        quota_us: Option<u64>,
        memory: Option<u64>,
        swap: u64,
    ) -> Result<(), CgroupError> {
        enable_controllers(&self.root)?;
        files::mkdir(&self.root.join(top))?;
        enable_controllers(&self.root.join(top))?;
        let dir = self.root.join(account);
        files::mkdir(&dir)?;
        let quota = quota_us.map_or("max".to_owned(), |q| q.to_string());
        files::write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        files::write(
            &dir.join("memory.max"),
            &memory.map_or("max".to_owned(), |m| m.to_string()),
        )?;
        // memory.max counts RAM only: swap extends the cap by `swap` (0: not at all).
        let swap_max = dir.join("memory.swap.max");
        if swap_max.exists() {
            files::write(&swap_max, &swap.to_string())?;
        }
        enable_controllers(&dir)
    }

    /// `account` is `nook/<account>`, `vm` is `nook/<account>/<vm>`.
    pub fn set_vm(
        &self,
        account: &Path,
        vm: &Path,
        weight: u32,
        high: Option<u64>,
    ) -> Result<(), CgroupError> {
        enable_controllers(&self.root.join(account))?;
        let dir = self.root.join(vm);
        files::mkdir(&dir)?;
        files::write(&dir.join("cpu.weight"), &weight.to_string())?;
        files::write(
            &dir.join("memory.high"),
            &high.map_or("max".to_owned(), |h| h.to_string()),
        )
    }

    pub fn memory(&self, rel: &Path) -> Result<crate::VmMemory, CgroupError> {
        let dir = self.root.join(rel);
        // The working set: file cache nobody touched lately goes as soon as it is needed.
        let cold_cache = files::read_keyed(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
        Ok(crate::VmMemory {
            resident_bytes: files::read_u64(&dir.join("memory.current"))?
                .saturating_sub(cold_cache),
            swapped_bytes: files::read_u64(&dir.join("memory.swap.current")).unwrap_or(0),
        })
    }

    /// `memory.reclaim` (Linux 5.19+) asks for the difference; `EAGAIN` means the kernel
    /// reclaimed less, which is as far as it goes.
    pub fn squeeze(&self, rel: &Path, keep: u64) -> Result<(), CgroupError> {
        let dir = self.root.join(rel);
        let current = files::read_u64(&dir.join("memory.current"))?;
        if current <= keep {
            return Ok(());
        }
        let path = dir.join("memory.reclaim");
        match files::try_write(&path, &(current - keep).to_string()) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            Err(source) => Err(CgroupError::Write {
                path,
                value: (current - keep).to_string(),
                source,
            }),
        }
    }

    pub fn usage(&self, rel: &Path) -> Result<Usage, CgroupError> {
        let dir = self.root.join(rel);
        let usec = files::read_keyed(&dir.join("cpu.stat"), "usage_usec")?;
        let memory_bytes = files::read_u64(&dir.join("memory.current"))?;
        Ok(Usage {
            cpu_usage_ns: usec.saturating_mul(1000),
            memory_bytes,
        })
    }
}

/// Makes `cpu` and `memory` available to `dir`'s children. Only groups
/// without processes may do so (the "no internal processes" rule), which is
/// why processes only ever live in the leaf VM groups.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let current = files::read(&path)?;
    let on = |c: &str| current.split_whitespace().any(|x| x == c);
    if on("cpu") && on("memory") {
        return Ok(());
    }
    match files::try_write(&path, "+cpu +memory") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(CgroupError::InternalProcesses {
            path: dir.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOENT) => {
            Err(CgroupError::NotAvailable(format!(
                "{} does not offer the cpu and memory controllers; enable them in its parent",
                dir.display()
            )))
        }
        Err(source) => Err(CgroupError::Write {
            path,
            value: "+cpu +memory".to_owned(),
            source,
        }),
    }
}
