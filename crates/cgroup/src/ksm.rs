//! Kernel samepage merging: QEMU marks guest RAM mergeable, and the kernel folds identical
//! pages (the same kernel and libraries in many VMs, and above all clones) into one.

use std::path::Path;

const KSM_RUN: &str = "/sys/kernel/mm/ksm/run";

/// Turns KSM on host-wide. Returns `false` when this kernel has no KSM.
pub fn enable_ksm() -> Result<bool, crate::CgroupError> {
    if !Path::new(KSM_RUN).exists() {
        return Ok(false);
    }
    if std::fs::read_to_string(KSM_RUN)
        .map(|v| v.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(true);
    }
    crate::files::write(Path::new(KSM_RUN), "1")?;
    Ok(true)
}

/// Pages currently shared by KSM (`pages_sharing`): each saves one page of host memory.
pub fn ksm_pages_sharing() -> Option<u64> {
    std::fs::read_to_string("/sys/kernel/mm/ksm/pages_sharing")
        .ok()?
        .trim()
        .parse()
        .ok()
}
