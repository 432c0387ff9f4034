//! The few system calls the runtime makes itself, outside QEMU: opening a tap, and what a
//! QEMU's process does between fork and exec. Kept in one module, the only one of this crate
//! allowed `unsafe`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;

use crate::VmmError;
use crate::jail::Prepared;

/// Arranges for `command`'s child to enter `jail` (when given) and find `fds` open at
/// `first`, `first + 1`, ... once it runs.
pub(crate) fn enter_before_exec(
    command: &mut std::process::Command,
    jail: Option<Arc<Prepared>>,
    fds: &[OwnedFd],
    first: i32,
) {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the forked child and makes only system calls, on memory
    // prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if let Some(jail) = &jail {
                jail.enter()?;
            }
            hand_over(&raw, first)
        });
    }
}

/// In the forked child: puts `fds` at `first`, `first + 1`, ... in order, open across `exec`.
/// They are first moved above that range so that none is overwritten before it is moved.
fn hand_over(fds: &[i32], first: i32) -> std::io::Result<()> {
    let above = first + fds.len() as i32;
    let mut moved = [0i32; 8];
    if fds.len() > moved.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: fcntl on a descriptor this process owns.
        let high = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if high < 0 {
            return Err(std::io::Error::last_os_error());
        }
        moved[i] = high;
    }
    for (i, high) in moved.iter().take(fds.len()).enumerate() {
        // SAFETY: as above; dup2 leaves the new descriptor open across exec.
        if unsafe { libc::dup2(*high, first + i as i32) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens the existing tap `ifname` for a QEMU to be handed (IFF_VNET_HDR, as QEMU would).
pub(crate) fn open_tap(ifname: &str) -> Result<OwnedFd, VmmError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(VmmError::LaunchFailed(format!(
            "tap name {ifname} is too long"
        )));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(VmmError::io(Path::new("/dev/net/tun")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(VmmError::LaunchFailed(format!(
            "cannot open tap {ifname}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(OwnedFd::from(tun))
}

/// A new memfd of `size` bytes named `name`, which may be sealed later (for a VM's RAM; see
/// [`crate::ram`]).
pub(crate) fn memfd(name: &std::ffi::CStr, size: u64) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor or -1.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to this process and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::ftruncate(&fd, size as libc::off_t).map_err(std::io::Error::from)?;
    Ok(fd)
}

/// The seals on `fd` (`F_GET_SEALS`).
pub(crate) fn seals(fd: &OwnedFd) -> std::io::Result<i32> {
    // SAFETY: fcntl on a descriptor this process owns.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(seals)
}

/// Seals `fd` against change: `F_SEAL_FUTURE_WRITE` (mappings already shared and writable
/// still write, but no new one can be made, and `write(2)` and `fallocate` hole punches
/// fail), its size (a shrunk file would fault every mapping past its end), and its seals.
pub(crate) fn seal_future_write(fd: &OwnedFd) -> std::io::Result<()> {
    let seals =
        libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_getfd`), which needs the right to
/// ptrace it (root has it over QEMU).
pub(crate) fn take_fd(pid: u32, fd: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `pidfd` was just returned to this process and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags.
    let taken = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if taken < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; pidfd_getfd returns a new descriptor (close-on-exec) of this process.
    Ok(unsafe { OwnedFd::from_raw_fd(taken as i32) })
}

/// How many bytes written to the stream socket `fd` its peer has not read yet (`SIOCOUTQ`).
pub(crate) fn unread_by_peer(fd: &OwnedFd) -> std::io::Result<i32> {
    let mut unread: libc::c_int = 0;
    // SAFETY: `fd` is an open descriptor and the ioctl writes one int into `unread`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut unread) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unread)
}
