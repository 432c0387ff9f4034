//! A VM's RAM as a memfd, so that a fork can share it instead of copying it.
//!
//! A VM boots with its RAM in a memfd of its own that its QEMU maps shared
//! ([`RamMapping::Own`]). To fork it, the memfd is sealed with `F_SEAL_FUTURE_WRITE` and two
//! new QEMUs, the source's successor and the clone, map it copy-on-write
//! ([`RamMapping::Fork`]): each pays only for the pages it changes, and the memfd's pages are
//! freed with the last QEMU holding it.
//!
//! Why the seal: a guest's balloon reports the memory it frees, and QEMU 7.2 gives such memory
//! back by punching a hole in the RAM's file even when its own mapping is private; unsealed,
//! one fork freeing its copy would zero the pages under the other. Sealed, punches, `write(2)`,
//! new shared writable mappings and size changes all fail, so neither fork (nor an escaped
//! QEMU) can change the other's base. (QEMU then gives back nothing through a fork's balloon; the memory tiers
//! still move its cold pages.)

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::VmmError;

/// The name every VM's RAM memfd carries (`/proc/PID/fd` shows `/memfd:nook-ram (deleted)`),
/// by which a restarted daemon finds it again.
const NAME: &std::ffi::CStr = c"nook-ram";

/// A VM's RAM: a memfd of the guest's memory size.
#[derive(Debug, Clone)]
pub struct GuestRam {
    fd: Arc<OwnedFd>,
}

/// How a QEMU maps a [`GuestRam`].
#[derive(Debug, Clone)]
pub enum RamMapping {
    /// Its own RAM, shared: what the guest writes lands in the memfd, which can then be
    /// forked.
    Own(GuestRam),
    /// A sealed memfd of another QEMU, copy-on-write: the successor or the clone of a fork.
    Fork(GuestRam),
    /// QEMU's own anonymous RAM, under the same name as the others (a migration needs the
    /// same RAM blocks on both sides): nothing to share.
    Anonymous,
}

impl RamMapping {
    pub fn ram(&self) -> Option<&GuestRam> {
        match self {
            RamMapping::Own(ram) | RamMapping::Fork(ram) => Some(ram),
            RamMapping::Anonymous => None,
        }
    }
    pub(crate) fn shared(&self) -> bool {
        matches!(self, RamMapping::Own(_))
    }
}

/// Guest RAM is the size asked for and this much more (two pages; QEMU rounds `-m` up to
/// 8 KiB). QEMU 7.2 syncs a RAM block's migration dirty bits a word (64 pages) at a time
/// when the block is a whole number of words long, and that path clears them without
/// re-arming TCG's write tracking: a vCPU then writes on through its TLB unseen, and a live
/// precopy leaves those pages stale in the destination (`include/exec/ram_addr.h`,
/// `cpu_physical_memory_sync_dirty_bitmap`). A block two pages longer takes the page-by-page
/// path, which resets the TLBs (`tlb_reset_dirty_range_all`). Measured with forks of a busy
/// 2-vCPU default VM under TCG (writing /dev/urandom into tmpfs, `bench/fork_busy.sh`):
/// 4 broken clones in 28 without the tail, their kernel stacks holding stale data; 0 in 40
/// with it. Every QEMU nook starts has the tail, and QEMU refuses a stream between RAM of
/// different lengths, so no VM without it is ever copied live.
pub const RAM_TAIL: u64 = 8 << 10;

/// The bytes of RAM a guest of `memory_mib` MiB gets: see [`RAM_TAIL`].
pub fn ram_bytes(memory_mib: u32) -> u64 {
    (u64::from(memory_mib) << 20) + RAM_TAIL
}

impl GuestRam {
    /// A new, empty RAM for a guest of `memory_mib` MiB (its pages cost nothing until the
    /// guest touches them).
    pub fn new(memory_mib: u32) -> Result<Self, VmmError> {
        crate::sys::memfd(NAME, ram_bytes(memory_mib))
            .map(|fd| Self { fd: Arc::new(fd) })
            .map_err(|e| VmmError::LaunchFailed(format!("cannot make the VM's memory: {e}")))
    }

    /// The RAM the running QEMU `pid` was started with, when it is a memfd nook made. Found by
    /// its name among QEMU's descriptors and copied with `pidfd_getfd` (root only).
    pub fn of_qemu(pid: u32) -> Option<Self> {
        let dir = format!("/proc/{pid}/fd");
        let entries = std::fs::read_dir(&dir).ok()?;
        for entry in entries.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if !target.starts_with("/memfd:nook-ram ") {
                continue;
            }
            let fd = entry.file_name().to_str()?.parse::<i32>().ok()?;
            return crate::sys::take_fd(pid, fd)
                .ok()
                .map(|fd| Self { fd: Arc::new(fd) });
        }
        None
    }

    /// Whether a fork has sealed it: a QEMU that maps it shared still writes to it, but
    /// forking it again would hand out a base that may be changing. Forks of a sealed RAM
    /// copy the memory instead.
    pub fn is_sealed(&self) -> bool {
        crate::sys::seals(&self.fd).map_or(true, |s| s & libc::F_SEAL_FUTURE_WRITE != 0)
    }

    /// Seals it for a fork (see the module's notes). Call with the QEMU that maps it shared
    /// stopped: its later writes would reach the forks.
    pub fn seal(&self) -> Result<(), VmmError> {
        crate::sys::seal_future_write(&self.fd)
            .map_err(|e| VmmError::Qmp(format!("cannot seal the VM's memory for the fork: {e}")))
    }

    /// A descriptor of it to hand to a QEMU.
    pub(crate) fn handed(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::ram_bytes;

    /// Whether QEMU 7.2 takes its page-by-page dirty sync for a RAM block this long.
    fn tracked_page_by_page(bytes: u64) -> bool {
        !bytes.is_multiple_of(64 * 4096)
    }

    #[test]
    fn guest_ram_is_never_a_whole_number_of_dirty_bitmap_words() {
        for mib in [64, 256, 1024, 8192] {
            assert!(tracked_page_by_page(ram_bytes(mib)), "{mib} MiB");
            assert!(
                !tracked_page_by_page(u64::from(mib) << 20),
                "{mib} MiB without the tail"
            );
            // QEMU rounds `-m` up to 8 KiB: the size must survive that unchanged.
            assert_eq!(ram_bytes(mib) % 8192, 0);
        }
    }
}
