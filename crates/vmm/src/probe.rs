//! Choosing the accelerator by running a guest, not by looking for `/dev/kvm`: on some hosts
//! the device exists but cannot run an ordinary guest.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Returns `Kvm` only if the guest kernel really runs under KVM: it must boot far enough to
/// panic for want of a root disk, and QEMU (`-no-reboot`) must then exit. A broken KVM hangs
/// early or stops on an emulation failure instead, so the probe times out and TCG is chosen.
pub async fn probe_accel(qemu: &Path, kernel: &Path, scratch: &Path) -> Accel {
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    let console = scratch.join("kvm-probe.log");
    let _ = std::fs::remove_file(&console);
    let append = String::from("console=ttyS0 panic=-1 root=/dev/nook-probe-none");
    let child = tokio::process::Command::new(qemu)
        .args([
            "-M",
            "pc",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-no-reboot",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
        ])
        .arg(kernel)
        .args(["-append", &append, "-serial"])
        .arg(format!("file:{}", console.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    let finished = tokio::time::timeout(Duration::from_secs(10), child).await;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    match finished {
        Ok(Ok(_)) if log.contains("Kernel panic") => Accel::Kvm,
        _ => Accel::Tcg,
    }
}
