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

/// The host's page: what a hole punch frees at the least.
const PAGE: usize = 4096;
/// How much [`GuestRam::punch_zero_pages`] reads at a time.
const PUNCH_BLOCK: usize = 1 << 20;

/// Whether `page` holds only zeros. A comparison of byte slices is a `memcmp`, as fast in a
/// debug build as in a release one.
fn is_zero(page: &[u8]) -> bool {
    static ZEROS: [u8; PAGE] = [0; PAGE];
    page == &ZEROS[..page.len()]
}

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

    /// Its size in bytes.
    pub fn size(&self) -> Result<u64, VmmError> {
        nix::sys::stat::fstat(&*self.fd)
            .map(|st| st.st_size as u64)
            .map_err(|e| VmmError::Qmp(format!("cannot read the size of the VM's memory: {e}")))
    }

    /// Punches out of `offset..offset + len` the pages that hold only zeros, and returns how
    /// many bytes it freed. A live copy of a VM's memory into a memfd fills in every page
    /// the guest never touched: QEMU 7.2 reads each page it receives as zero before leaving
    /// it alone, and shmem allocates a page on a read. Read here with `pread`, which leaves
    /// holes alone, and only where the memfd has data.
    ///
    /// Call it only while nothing writes this RAM (its QEMU stopped): a page the guest
    /// writes between the check and the punch would be lost. A page swapped out is read back
    /// in to be checked; nook calls this right after a copy, when the pages are fresh.
    pub fn punch_zero_pages(&self, offset: u64, len: u64) -> Result<u64, VmmError> {
        self.zero_pages(offset, len, true)
    }

    /// The bytes of `offset..offset + len` that hold only zeros and are not holes: what
    /// [`Self::punch_zero_pages`] would free. Safe at any time (it changes nothing), but only
    /// a hint while the guest runs.
    pub fn count_zero_pages(&self, offset: u64, len: u64) -> Result<u64, VmmError> {
        self.zero_pages(offset, len, false)
    }

    fn zero_pages(&self, offset: u64, len: u64, punch_them: bool) -> Result<u64, VmmError> {
        use nix::unistd::{Whence, lseek};
        let fail = |what: &str, e: nix::Error| {
            VmmError::Qmp(format!("cannot {what} the VM's memory: {e}"))
        };
        let end = offset.saturating_add(len).min(self.size()?);
        let mut buf = vec![0u8; PUNCH_BLOCK];
        let mut freed = 0u64;
        let mut pos = offset;
        // The zero pages found and not yet punched: one punch per run.
        let mut run: Option<(u64, u64)> = None;
        let mut punch = |run: &mut Option<(u64, u64)>| -> Result<(), VmmError> {
            if let Some((start, stop)) = run.take() {
                if !punch_them {
                    freed += stop - start;
                    return Ok(());
                }
                nix::fcntl::fallocate(
                    &*self.fd,
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    (stop - start) as libc::off_t,
                )
                .map_err(|e| fail("give back zero pages of", e))?;
                freed += stop - start;
            }
            Ok(())
        };
        while pos < end {
            let data = match lseek(&*self.fd, pos as libc::off_t, Whence::SeekData) {
                Ok(at) => at as u64,
                Err(nix::Error::ENXIO) => break,
                Err(e) => return Err(fail("read", e)),
            };
            if data >= end {
                break;
            }
            let hole = lseek(&*self.fd, data as libc::off_t, Whence::SeekHole)
                .map_err(|e| fail("read", e))? as u64;
            let mut at = data;
            while at < hole.min(end) {
                let want = (hole.min(end) - at).min(PUNCH_BLOCK as u64) as usize;
                let got = nix::sys::uio::pread(&*self.fd, &mut buf[..want], at as libc::off_t)
                    .map_err(|e| fail("read", e))?;
                if got == 0 {
                    break;
                }
                for (i, page) in buf[..got].chunks(PAGE).enumerate() {
                    let page_at = at + (i * PAGE) as u64;
                    if page.len() == PAGE && is_zero(page) {
                        match &mut run {
                            Some((_, stop)) if *stop == page_at => *stop += PAGE as u64,
                            _ => {
                                punch(&mut run)?;
                                run = Some((page_at, page_at + PAGE as u64));
                            }
                        }
                    }
                }
                at += got as u64;
            }
            pos = hole;
        }
        punch(&mut run)?;
        Ok(freed)
    }

    /// Whether `other` is the same memfd (not merely one of the same size).
    pub fn is(&self, other: &GuestRam) -> bool {
        let id = |r: &GuestRam| {
            nix::sys::stat::fstat(&*r.fd)
                .ok()
                .map(|st| (st.st_dev, st.st_ino))
        };
        id(self).is_some() && id(self) == id(other)
    }

    /// A descriptor of it to hand to a QEMU.
    pub(crate) fn handed(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::{GuestRam, ram_bytes};

    #[test]
    fn zero_pages_are_punched_and_data_and_holes_stay() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(4).expect("memfd");
        let file = std::fs::File::from(ram.handed().expect("dup"));
        // Page 0 data, pages 1..=3 written as zeros (what a live copy leaves), page 4 data
        // at its last byte, the rest never touched (a hole).
        file.write_all_at(b"x", 0).expect("memfd");
        file.write_all_at(&[0u8; 3 * 4096], 4096).expect("memfd");
        file.write_all_at(b"y", 5 * 4096 - 1).expect("memfd");
        let allocated = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().expect("memfd").blocks() * 512
        };
        assert_eq!(allocated(&file), 5 * 4096);
        let size = ram.size().expect("memfd");
        assert_eq!(ram.count_zero_pages(0, size).expect("memfd"), 3 * 4096);
        assert_eq!(ram.count_zero_pages(4096, 4096).expect("memfd"), 4096);
        assert_eq!(allocated(&file), 5 * 4096, "counting frees nothing");
        assert_eq!(ram.punch_zero_pages(0, size).expect("memfd"), 3 * 4096);
        assert_eq!(
            allocated(&file),
            2 * 4096,
            "only the two pages of data remain"
        );
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 0).expect("memfd");
        assert_eq!(&byte, b"x");
        file.read_exact_at(&mut byte, 5 * 4096 - 1).expect("memfd");
        assert_eq!(&byte, b"y");
        assert!(ram.is(&ram.clone()) && !ram.is(&GuestRam::new(4).expect("memfd")));
        // A range covers only itself, and a second pass finds nothing more.
        assert_eq!(ram.punch_zero_pages(0, 4096).expect("memfd"), 0);
        assert_eq!(
            ram.punch_zero_pages(0, ram.size().expect("memfd"))
                .expect("memfd"),
            0
        );
    }

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
