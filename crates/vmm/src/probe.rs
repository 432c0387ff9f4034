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

/// The exit status QEMU reports for a write of `0x31` to the isa-debug-exit port.
const PROBE_EXIT: i32 = (0x31 << 1) | 1;

/// A 64 KiB firmware whose reset vector writes to isa-debug-exit. If the CPU really executes
/// it under KVM, QEMU exits with [`PROBE_EXIT`]; a broken KVM hangs or fails instead.
fn probe_firmware() -> Vec<u8> {
    let mut rom = vec![0xf4u8; 64 * 1024]; // hlt
    // mov al, 0x31; out 0xf4, al; hlt; jmp $-1
    let code = [0xb0, 0x31, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];
    rom[0xfff0..0xfff0 + code.len()].copy_from_slice(&code);
    rom
}

/// Returns `Kvm` only if a guest actually ran under KVM within a few seconds.
pub async fn probe_accel(qemu: &Path, scratch: &Path) -> Accel {
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    let firmware = scratch.join("kvm-probe.rom");
    if std::fs::write(&firmware, probe_firmware()).is_err() {
        return Accel::Tcg;
    }
    let child = tokio::process::Command::new(qemu)
        .args(["-M", "pc", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none", "-m", "16"])
        .arg("-bios")
        .arg(&firmware)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    let result = tokio::time::timeout(Duration::from_secs(5), child).await;
    let _ = std::fs::remove_file(&firmware);
    match result {
        Ok(Ok(status)) if status.code() == Some(PROBE_EXIT) => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

/// The host TSC frequency in kHz, for `tsc_early_khz=`: without it a microvm guest under TCG
/// sometimes hangs calibrating against a PIT it does not have.
pub fn tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_runs_real_qemu_and_tcg_always_executes_the_firmware() {
        // The same firmware under TCG must exit with the marker, proving the probe can succeed.
        let Ok(qemu) = crate::Qemu::locate(None) else {
            panic!("qemu-system-x86_64 is required for this test");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let rom = dir.path().join("rom");
        std::fs::write(&rom, probe_firmware()).expect("write");
        let status = tokio::process::Command::new(&qemu.binary)
            .args(["-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "16", "-bios"])
            .arg(&rom)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .status()
            .await
            .expect("run qemu");
        assert_eq!(status.code(), Some(PROBE_EXIT));
        let accel = probe_accel(&qemu.binary, dir.path()).await;
        println!("probed accelerator: {accel:?}");
    }
}
