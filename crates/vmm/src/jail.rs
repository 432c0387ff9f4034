//! QEMU's jail: a mount namespace that holds only what one VM's QEMU needs, entered as that
//! VM's own unprivileged uid.
//!
//! A device-emulation bug in QEMU then hands an attacker a process that:
//! - runs as a uid no other process or file on the host uses ([`JailUids::for_slot`]);
//! - sees a read-only tmpfs root holding `/usr` (read-only), a few device nodes, and this VM's
//!   own files at their host paths: its disk top read-write, the layers, base image, kernel
//!   and initrd below it read-only. No other VM's disk, no database, no key exists there;
//! - cannot create a file anywhere (the VM directory is root's, bound only so its disk top
//!   can be reached), and has no socket path to connect to: its monitor, agent and console
//!   sockets and its tap are handed to it already opened;
//! - then runs under QEMU's own seccomp filter (`-sandbox`), so it cannot exec, fork or
//!   regain privileges.
//!
//! The jail is built in the forked child before `exec`, where only async-signal-safe calls
//! are allowed: every path is turned into a `CString` beforehand ([`Jail::prepare`]) and the
//! child only makes system calls ([`Prepared::enter`]). Those calls are why this module may
//! use `unsafe`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The default first uid (and gid) of the range VMs' QEMUs run as: `0x6e6b0000` ("nk"), far
/// above the ranges distributions hand to users and subordinate ids. It lies in the range
/// systemd may hand to containers (`systemd-nspawn -U`), so [`JailUids::check_unused`] looks
/// for a clash at startup, and `jail_uid_base` moves the range.
pub const DEFAULT_JAIL_UID_BASE: u32 = 0x6e6b_0000;

/// The uids (and gids) VMs' QEMUs run as: `base + slot`, one per network slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailUids {
    pub base: u32,
    /// How many slots there are, so the range is `base .. base + count`.
    pub count: u32,
}

/// A uid of the jails' range that something else on the host uses.
#[derive(Debug, thiserror::Error)]
#[error(
    "uids {first}-{last}, which VMs' QEMUs run as, are in use here: {user}. Give nook a free range with jail_uid_base (--jail-uid-base, NOOK_JAIL_UID_BASE)"
)]
pub struct JailUidsInUse {
    pub first: u32,
    pub last: u32,
    /// What uses them, e.g. `user alice (uid 1852506113) in /etc/passwd`.
    pub user: String,
}

impl JailUids {
    /// The uid (and gid) the QEMU of the VM in network `slot` runs as.
    pub fn for_slot(&self, slot: u32) -> u32 {
        self.base + slot
    }

    fn contains(&self, id: u64) -> bool {
        (u64::from(self.base)..u64::from(self.base) + u64::from(self.count)).contains(&id)
    }

    fn overlaps(&self, first: u64, count: u64) -> bool {
        first < u64::from(self.base) + u64::from(self.count)
            && u64::from(self.base) < first.saturating_add(count)
    }

    /// Looks for anything else on this host that uses the range: users and groups in
    /// `/etc/passwd` and `/etc/group`, subordinate ranges in `/etc/subuid` and `/etc/subgid`,
    /// and running processes other than nook's own QEMUs (a container `systemd-nspawn` gave
    /// these ids to, say). Sharing a uid with any of them would let an escaped QEMU act as it.
    pub fn check_unused(&self) -> Result<(), JailUidsInUse> {
        self.check_files(Path::new("/etc"))?;
        self.check_processes(Path::new("/proc"))
    }

    fn clash(&self, user: String) -> JailUidsInUse {
        JailUidsInUse {
            first: self.base,
            last: self.base + self.count.saturating_sub(1),
            user,
        }
    }

    fn check_files(&self, etc: &Path) -> Result<(), JailUidsInUse> {
        for (file, id_field) in [("passwd", 2), ("group", 2)] {
            let text = std::fs::read_to_string(etc.join(file)).unwrap_or_default();
            for line in text.lines() {
                let fields: Vec<&str> = line.split(':').collect();
                let id = fields.get(id_field).and_then(|f| f.parse::<u64>().ok());
                if let Some(id) = id.filter(|id| self.contains(*id)) {
                    let kind = if file == "passwd" { "user" } else { "group" };
                    return Err(
                        self.clash(format!("{kind} {} (id {id}) in /etc/{file}", fields[0]))
                    );
                }
            }
        }
        for file in ["subuid", "subgid"] {
            let text = std::fs::read_to_string(etc.join(file)).unwrap_or_default();
            for line in text.lines() {
                let mut fields = line.split(':');
                let (Some(who), Some(first), Some(count)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let (Ok(first), Ok(count)) = (first.parse::<u64>(), count.parse::<u64>()) else {
                    continue;
                };
                if self.overlaps(first, count) {
                    return Err(self.clash(format!(
                        "the subordinate ids of {who} ({first}+{count}) in /etc/{file}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_processes(&self, proc: &Path) -> Result<(), JailUidsInUse> {
        let Ok(entries) = std::fs::read_dir(proc) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let pid = entry.file_name();
            if !pid.as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|id| id.parse::<u64>().ok());
            let Some(uid) = uid.filter(|uid| self.contains(*uid)) else {
                continue;
            };
            // A zombie, or a process on its way out, has no command line and holds nothing.
            let state = status
                .lines()
                .find_map(|l| l.strip_prefix("State:"))
                .map(str::trim)
                .unwrap_or("");
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if cmdline.is_empty() || state.starts_with('Z') || state.starts_with('X') {
                continue;
            }
            // A QEMU this daemon started before a restart runs as its VM's uid: that one is
            // ours; so is a daemon's child between taking the uid and exec'ing QEMU.
            let qemu = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg.starts_with(b"nook-") && arg.len() > 5)
                && cmdline.windows(6).any(|w| w == b"-name\0");
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let ours = qemu
                || Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name()
                    == std::env::current_exe()
                        .ok()
                        .as_deref()
                        .and_then(Path::file_name);
            if !ours {
                return Err(self.clash(format!("process {} (uid {uid})", pid.to_string_lossy())));
            }
        }
        Ok(())
    }
}

/// What one VM's QEMU may see, and who it runs as.
#[derive(Debug, Clone)]
pub struct Jail {
    pub uid: u32,
    /// Supplementary groups, e.g. the owner group of `/dev/kvm`.
    pub groups: Vec<u32>,
    /// An empty directory the jail's root is mounted on (in the child's namespace only, so
    /// every jail can use the same one).
    pub root: PathBuf,
    /// Files bound read-only at their own path: kernel, initrd, base image, layers.
    pub read_only: Vec<PathBuf>,
    /// Bound read-write at their own path: the VM's directory. It is root's and QEMU's uid
    /// cannot write to it, only to the disk top in it that it owns, and to a new top the
    /// daemon makes there later to move the running disk onto.
    pub writable: Vec<PathBuf>,
    /// Device nodes beyond the harmless ones every jail gets (`/dev/kvm` under KVM).
    pub devices: Vec<PathBuf>,
    /// A network namespace of its own, with nothing in it: right for a QEMU handed its tap
    /// (it then reaches no host address, loopback or abstract socket), wrong for user-mode
    /// networking, which needs the host's.
    pub own_net: bool,
    /// A `/proc` of its own, showing only processes of its uid and nothing but them
    /// (`hidepid=invisible,subset=pid`): QEMU opens the VM's RAM, a memfd it is handed, by
    /// `/proc/self/fd/N`, and a memfd cannot be bind-mounted.
    pub proc: bool,
}

/// Host directories QEMU loads code and firmware from, bound read-only (or recreated as the
/// symlinks they are on a merged-/usr system).
const SYSTEM_DIRS: [&str; 5] = ["/usr", "/lib", "/lib64", "/bin", "/sbin"];
/// The dynamic loader's cache: without it, libraries under `/usr/lib/<triplet>` are not found.
const SYSTEM_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes glib and QEMU open on their own.
const BASE_DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

/// One thing the child does, with every path already a C string.
#[derive(Debug)]
enum Step {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    Proc(CString),
}

/// A jail turned into system calls, ready for [`Prepared::enter`] in the child.
#[derive(Debug)]
pub struct Prepared {
    root: CString,
    namespaces: libc::c_int,
    steps: Vec<Step>,
    uid: u32,
    groups: Vec<libc::gid_t>,
}

/// Errors from the child encode the step that failed: `STEP_CODE + step * 1000 + errno`, so
/// the parent can say which bind failed although the child cannot allocate a message.
const STEP_CODE: i32 = 100_000;

impl Jail {
    /// Works out every directory, file and mount of the jail. Fails only on a path with a NUL
    /// byte or a system directory that cannot be read.
    pub fn prepare(&self) -> std::io::Result<Prepared> {
        let inside = |path: &Path| -> std::io::Result<CString> {
            let rel = path.strip_prefix("/").unwrap_or(path);
            cstring(&self.root.join(rel))
        };
        let mut steps = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let mut mkdirs = |path: &Path, steps: &mut Vec<Step>| -> std::io::Result<()> {
            let mut wanted: Vec<&Path> =
                path.ancestors().filter(|a| *a != Path::new("/")).collect();
            wanted.reverse();
            for dir in wanted {
                if !made.iter().any(|m| m == dir) {
                    made.push(dir.to_path_buf());
                    steps.push(Step::Mkdir(inside(dir)?));
                }
            }
            Ok(())
        };
        for dir in SYSTEM_DIRS.map(Path::new) {
            match std::fs::symlink_metadata(dir) {
                Ok(meta) if meta.file_type().is_symlink() => steps.push(Step::Symlink {
                    target: cstring(&std::fs::read_link(dir)?)?,
                    link: inside(dir)?,
                }),
                Ok(meta) if meta.is_dir() => {
                    mkdirs(dir, &mut steps)?;
                    steps.push(Step::Bind {
                        src: cstring(dir)?,
                        dst: inside(dir)?,
                        read_only: true,
                    });
                }
                _ => {}
            }
        }
        let mut files: Vec<(&Path, bool)> = Vec::new();
        files.extend(SYSTEM_FILES.iter().map(|f| (Path::new(*f), true)));
        // Device nodes are bound writable: a read-only mount refuses even writes to /dev/null.
        files.extend(BASE_DEVICES.iter().map(|d| (Path::new(*d), false)));
        files.extend(self.devices.iter().map(|d| (d.as_path(), false)));
        files.extend(self.read_only.iter().map(|f| (f.as_path(), true)));
        files.extend(self.writable.iter().map(|f| (f.as_path(), false)));
        for (file, read_only) in files {
            if !file.exists() && SYSTEM_FILES.iter().any(|s| Path::new(s) == file) {
                continue;
            }
            if file.is_dir() {
                mkdirs(file, &mut steps)?;
            } else {
                if let Some(parent) = file.parent() {
                    mkdirs(parent, &mut steps)?;
                }
                steps.push(Step::Touch(inside(file)?));
            }
            steps.push(Step::Bind {
                src: cstring(file)?,
                dst: inside(file)?,
                read_only,
            });
        }
        if self.proc {
            let proc = Path::new("/proc");
            mkdirs(proc, &mut steps)?;
            steps.push(Step::Proc(inside(proc)?));
        }
        Ok(Prepared {
            root: cstring(&self.root)?,
            namespaces: libc::CLONE_NEWNS | if self.own_net { libc::CLONE_NEWNET } else { 0 },
            steps,
            uid: self.uid,
            groups: self.groups.clone(),
        })
    }
}

fn cstring(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("path {} holds a NUL byte", path.display()),
        )
    })
}

impl Prepared {
    /// Builds the jail and drops into it as its uid. Call only in a forked child before
    /// `exec` (`CommandExt::pre_exec`): it changes the calling process's namespace, root and
    /// identity for good.
    ///
    /// # Safety
    /// Only async-signal-safe system calls are made, on memory prepared before the fork.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // Step numbers in errors: 0 namespace, 1 root mount, 2.. the steps, then the rest.
        let fail = |step: usize| {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            std::io::Error::from_raw_os_error(STEP_CODE + step as i32 * 1000 + errno.min(999))
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain system calls on NUL-terminated strings owned by `self`.
        unsafe {
            if libc::unshare(self.namespaces) != 0 {
                return Err(fail(0));
            }
            // Nothing mounted from here on may propagate back to the host.
            if libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(fail(0));
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=64k".as_ptr().cast(),
            ) != 0
            {
                return Err(fail(1));
            }
            // The daemon's umask (077) would make the jail's directories closed to its uid.
            libc::umask(0o022);
            for (i, step) in self.steps.iter().enumerate() {
                let ok = match step {
                    Step::Mkdir(dir) => libc::mkdir(dir.as_ptr(), 0o755) == 0,
                    Step::Touch(file) => {
                        let fd = libc::open(
                            file.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        fd >= 0 && libc::close(fd) == 0
                    }
                    Step::Symlink { target, link } => {
                        libc::symlink(target.as_ptr(), link.as_ptr()) == 0
                    }
                    Step::Proc(dst) => {
                        libc::mount(
                            c"proc".as_ptr(),
                            dst.as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            c"hidepid=invisible,subset=pid".as_ptr().cast(),
                        ) == 0
                    }
                    Step::Bind {
                        src,
                        dst,
                        read_only,
                    } => {
                        libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ) == 0
                            && libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND
                                    | libc::MS_REMOUNT
                                    | libc::MS_NOSUID
                                    | if *read_only {
                                        libc::MS_RDONLY | libc::MS_NODEV
                                    } else {
                                        0
                                    },
                                std::ptr::null(),
                            ) == 0
                    }
                };
                if !ok {
                    return Err(fail(2 + i));
                }
            }
            let last = 2 + self.steps.len();
            // The root itself becomes read-only: QEMU can create no file anywhere.
            if libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ) != 0
            {
                return Err(fail(last));
            }
            if libc::chdir(self.root.as_ptr()) != 0
                || libc::chroot(c".".as_ptr()) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return Err(fail(last + 1));
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setresgid(self.uid, self.uid, self.uid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
            {
                return Err(fail(last + 2));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(fail(last + 3));
            }
        }
        Ok(())
    }

    /// What a failure from [`Prepared::enter`] was about, in words.
    pub fn explain(&self, err: &std::io::Error) -> String {
        let Some(code) = err.raw_os_error().filter(|c| *c >= STEP_CODE) else {
            return err.to_string();
        };
        let (step, errno) = ((code - STEP_CODE) / 1000, (code - STEP_CODE) % 1000);
        let os = std::io::Error::from_raw_os_error(errno);
        let last = 2 + self.steps.len();
        let what = match step as usize {
            0 => "make its namespaces".to_string(),
            1 => format!("mount the jail's root on {}", self.root.to_string_lossy()),
            s if s < last => match &self.steps[s - 2] {
                Step::Mkdir(d) => format!("make {}", d.to_string_lossy()),
                Step::Touch(f) => format!("make {}", f.to_string_lossy()),
                Step::Symlink { link, .. } => format!("link {}", link.to_string_lossy()),
                Step::Bind { src, .. } => format!("bind {}", src.to_string_lossy()),
                Step::Proc(dst) => format!("mount a procfs on {}", dst.to_string_lossy()),
            },
            s if s == last => "make the jail's root read-only".into(),
            s if s == last + 1 => "enter the jail's root".into(),
            s if s == last + 2 => format!("become uid {}", self.uid),
            _ => "forbid new privileges".into(),
        };
        format!("cannot {what} for QEMU's jail: {os}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_gets_its_parents_once_and_a_bind_at_its_own_path() {
        let jail = Jail {
            uid: DEFAULT_JAIL_UID_BASE + 3,
            groups: vec![],
            root: "/j".into(),
            read_only: vec!["/d/img/kernel".into(), "/d/img/base.qcow2".into()],
            writable: vec!["/d/vms/a/disk.qcow2".into()],
            devices: vec![],
            own_net: true,
            proc: false,
        };
        let p = jail.prepare().expect("prepare");
        let dirs: Vec<_> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Mkdir(d) => Some(d.to_string_lossy().to_string()),
                _ => None,
            })
            .collect();
        for d in ["/j/d", "/j/d/img", "/j/d/vms", "/j/d/vms/a", "/j/dev"] {
            assert_eq!(
                dirs.iter().filter(|x| *x == d).count(),
                1,
                "{d} in {dirs:?}"
            );
        }
        let binds: Vec<_> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind {
                    src,
                    dst,
                    read_only,
                } => Some((
                    src.to_string_lossy().to_string(),
                    dst.to_string_lossy().to_string(),
                    *read_only,
                )),
                _ => None,
            })
            .collect();
        assert!(binds.contains(&(
            "/d/vms/a/disk.qcow2".into(),
            "/j/d/vms/a/disk.qcow2".into(),
            false
        )));
        assert!(binds.contains(&("/d/img/kernel".into(), "/j/d/img/kernel".into(), true)));
        assert!(binds.contains(&("/dev/null".into(), "/j/dev/null".into(), false)));
        assert_eq!(p.uid, DEFAULT_JAIL_UID_BASE + 3);
        // A failure names its step.
        let err = std::io::Error::from_raw_os_error(STEP_CODE + 1000 + libc::EPERM);
        assert!(
            p.explain(&err).contains("mount the jail's root on /j"),
            "{}",
            p.explain(&err)
        );
    }

    #[test]
    fn a_jail_for_ram_in_a_memfd_mounts_a_procfs_of_its_own() {
        let jail = Jail {
            uid: DEFAULT_JAIL_UID_BASE + 3,
            groups: vec![],
            root: "/j".into(),
            read_only: vec![],
            writable: vec![],
            devices: vec![],
            own_net: true,
            proc: true,
        };
        let p = jail.prepare().expect("prepare");
        let at = p
            .steps
            .iter()
            .position(|s| matches!(s, Step::Proc(d) if d.to_bytes() == b"/j/proc"))
            .expect("a procfs step");
        assert!(
            p.steps[..at]
                .iter()
                .any(|s| matches!(s, Step::Mkdir(d) if d.to_bytes() == b"/j/proc")),
            "its mount point is made first"
        );
    }

    #[test]
    fn jail_uids_clash_with_users_groups_subordinate_ids_and_foreign_processes() {
        let uids = JailUids {
            base: 200_000,
            count: 100,
        };
        assert_eq!(uids.for_slot(7), 200_007);
        let etc = tempfile::tempdir().expect("tempdir");
        let write = |file: &str, text: &str| {
            std::fs::write(etc.path().join(file), text).expect("write");
        };
        write(
            "passwd",
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        );
        write("group", "root:x:0:\n");
        write("subuid", "alice:100000:65536\n");
        write("subgid", "alice:100000:65536\n");
        uids.check_files(etc.path()).expect("nothing clashes");

        write("subuid", "alice:100000:65536\nbob:199990:20\n");
        let err = uids
            .check_files(etc.path())
            .expect_err("bob's range reaches in");
        assert!(err.to_string().contains("subordinate ids of bob"), "{err}");
        assert!(err.to_string().contains("jail_uid_base"), "{err}");

        write("subuid", "");
        write("group", "qemu:x:200099:\n");
        let err = uids.check_files(etc.path()).expect_err("a group in range");
        assert!(err.to_string().contains("group qemu (id 200099)"), "{err}");

        // Processes: a QEMU of ours is fine, anything else in the range is not.
        let proc = tempfile::tempdir().expect("tempdir");
        let process = |pid: &str, uid: u32, cmdline: &[u8]| {
            let dir = proc.path().join(pid);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(
                dir.join("status"),
                format!("Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .expect("status");
            std::fs::write(dir.join("cmdline"), cmdline).expect("cmdline");
        };
        process("1", 0, b"/sbin/init\0");
        // A zombie of a QEMU that died with its daemon: no command line.
        process("39", 200_002, b"");
        process("40", 200_003, b"qemu-system-x86_64\0-name\0nook-abc\0");
        uids.check_processes(proc.path()).expect("only our QEMU");
        process("41", 200_004, b"/usr/lib/systemd/systemd\0");
        let err = uids
            .check_processes(proc.path())
            .expect_err("a container's init");
        assert!(err.to_string().contains("process 41 (uid 200004)"), "{err}");
    }
}
