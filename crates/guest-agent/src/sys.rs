//! The few system calls std and nix do not wrap safely: child set-up between `fork` and `exec`
//! (new session, controlling terminal, dropping to a user), terminal window sizes, and signals
//! to a process group by raw number.
//!
//! `unsafe` is allowed here, and only here, because `CommandExt::pre_exec` is unsafe by
//! definition and `ioctl`/`kill` are raw libc calls. Each block keeps to async-signal-safe libc
//! calls on memory prepared before the fork.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Who a child runs as.
#[derive(Debug, Clone)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the child a session (and process group) leader, takes its stdin as controlling
/// terminal when `ctty`, and drops to `ids` when given. std runs this after it has set up
/// stdio and the working directory, just before `exec`.
pub fn configure_child(cmd: &mut Command, ctty: bool, ids: Option<Ids>) {
    let hook = move || -> io::Result<()> {
        // SAFETY (whole closure): only async-signal-safe syscalls, on data owned by the closure
        // and allocated before the fork.
        unsafe {
            check(libc::setsid())?;
            if ctty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some(ids) = &ids {
                check(libc::setgroups(ids.groups.len(), ids.groups.as_ptr()))?;
                check(libc::setgid(ids.gid))?;
                check(libc::setuid(ids.uid))?;
            }
        }
        Ok(())
    };
    // SAFETY: the hook allocates nothing and takes no locks (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sets the window size of a terminal (the kernel then sends SIGWINCH to its foreground group).
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a live descriptor and `ws` outlives the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })
}

/// Sends signal number `signal` to process `pid`, or to the process group it leads when
/// `group`. Any number the kernel accepts works, real-time signals included.
pub fn signal(pid: u32, signal: i32, group: bool) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing pid <= 1",
        ));
    }
    let target = if group { -pid } else { pid };
    // SAFETY: plain syscall on integers.
    check(unsafe { libc::kill(target, signal) })
}
