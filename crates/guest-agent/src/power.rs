//! Power-off and reboot, through the guest's init when it can, by syscall when it cannot.

use crate::{SYSTEM_PATH, find_tool};
use nix::sys::reboot::RebootMode;
use std::path::Path;
use std::process::{Command, Stdio};

/// Flushes disks and asks init to power off (or reboot): `systemctl` under systemd, busybox's
/// `poweroff`/`reboot` otherwise. If that fails, syncs and calls `reboot(2)` directly.
pub fn power_off(reboot: bool) {
    nix::unistd::sync();
    let verb = if reboot { "reboot" } else { "poweroff" };
    let (tool, args): (&str, &[&str]) = if Path::new("/run/systemd/system").exists() {
        ("systemctl", &[verb])
    } else {
        (verb, &[])
    };
    match find_tool(tool).map(|path| {
        Command::new(path)
            .args(args)
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .status()
    }) {
        Some(Ok(status)) if status.success() => return,
        Some(Ok(status)) => log!("{tool} {verb} failed: {status}"),
        Some(Err(e)) => log!("cannot run {tool}: {e}"),
        None => log!("{tool} not found"),
    }
    log!("falling back to reboot(2)");
    nix::unistd::sync();
    let mode = if reboot {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    };
    let Err(e) = nix::sys::reboot::reboot(mode);
    log!("reboot(2) failed: {e}");
}
