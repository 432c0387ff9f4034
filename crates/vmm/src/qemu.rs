//! QEMU command lines, launch, and finding a launched QEMU again.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Accel, VmmError};

/// Where a VM's runtime files live. Everything a running VM needs from the host, apart from
/// its read-only image, is under this one directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// What nook keeps of the serial console (see [`crate::console`]).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Where QEMU serves the serial console, for the daemon to follow into `console_log`.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// What QEMU says on stderr (its first 64 KiB).
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The files a QEMU serves the VM through (QMP, agent and console sockets, its log, then
    /// the pidfile), each with the name a successor QEMU keeps it under until it takes over:
    /// a fork starts the source's successor beside the source's QEMU, and the pidfile, renamed
    /// last, says which of the two is the VM.
    pub fn runtime_files(&self) -> [(PathBuf, PathBuf); 5] {
        [
            self.qmp_socket(),
            self.agent_socket(),
            self.console_socket(),
            self.qemu_log(),
            self.pidfile(),
        ]
        .map(|live| {
            let name = live.file_name().unwrap_or_default().to_string_lossy();
            let staged = match name.split_once('.') {
                Some((stem, ext)) => format!("{stem}.next.{ext}"),
                None => format!("{name}.next"),
            };
            (live.with_file_name(staged), live)
        })
    }

    /// Where a successor QEMU serves the guest agent until it takes over.
    pub fn successor_agent_socket(&self) -> PathBuf {
        let [_, (agent, _), ..] = self.runtime_files();
        agent
    }

    /// Makes the successor's files the VM's: from now on QMP, the agent, the console and the
    /// pidfile reach the successor (connections to the old QEMU stay open).
    pub fn promote_successor(&self) -> std::io::Result<()> {
        for (staged, live) in self.runtime_files() {
            std::fs::rename(staged, live)?;
        }
        Ok(())
    }

    /// Removes what a successor that never took over left, but its log (`qemu.next.log`,
    /// which says why).
    pub fn discard_successor(&self) {
        for (staged, live) in self.runtime_files() {
            if live != self.qemu_log() {
                let _ = std::fs::remove_file(staged);
            }
        }
    }

    /// The last `max_lines` lines of the serial console (of its current file, which holds at
    /// most [`crate::console::CONSOLE_LOG_MAX`]), read from its end on a blocking thread.
    pub async fn console_tail(&self, max_lines: usize) -> String {
        let log = self.console_log();
        tokio::task::spawn_blocking(move || {
            crate::console::tail(&log, max_lines, crate::console::CONSOLE_LOG_MAX)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub enum NetBackend {
    /// A host tap made by the network crate; the host tells VMs apart by tap.
    Tap { ifname: String, mac: String },
    /// The tap another QEMU of the same VM holds, taken from it ([`Qemu::take_tap`]): a
    /// fork's successor (a tap that is open cannot be opened again).
    TakenTap {
        fd: std::sync::Arc<OwnedFd>,
        mac: String,
    },
    /// A user-mode `-netdev` argument (rootless fallback).
    User { netdev: String, mac: String },
}

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Stable id; it appears in QEMU's command line so a re-adopting daemon can recognise it.
    pub id: String,
    pub paths: VmPaths,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The guest's RAM; None only to measure anonymous memory against it.
    pub ram: Option<crate::ram::RamMapping>,
    /// The root disk's top: the VM's `disk.qcow2`, except for a fork's successor, which opens
    /// the source's new top before it becomes `disk.qcow2`.
    pub disk: PathBuf,
    /// The disk top opened by nook, for a top that is renamed while QEMU runs (a fork's
    /// successor opens the source's new top before it becomes `disk.qcow2`).
    pub disk_fd: Option<std::sync::Arc<OwnedFd>>,
    /// A fork's successor: its runtime files keep their staged names until it takes over
    /// ([`VmPaths::runtime_files`]).
    pub successor: bool,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub net: NetBackend,
    pub accel: Accel,
    /// Under TCG, the translation cache's size in MiB (`tb-size`); None keeps QEMU's default
    /// (up to 1 GiB). See [`crate::TCG_CACHE_MIB`].
    pub tcg_cache_mib: Option<u32>,
    /// Memory reclaim: a balloon with free page reporting. Off only to measure what it saves.
    pub reclaim: bool,
    /// Start paused, waiting for a running VM's state to stream in (a fork's clone).
    pub incoming: bool,
    /// With `incoming`: stay paused once the state is in, until told to run (`-S`); a VM
    /// arriving from another host must not run before this host holds its lease.
    pub hold: bool,
    /// Where and as whom QEMU runs; None only where the daemon is not root and cannot jail.
    pub jail: Option<crate::jail::Jail>,
}

/// The seam where another VMM (Cloud Hypervisor, Firecracker) would plug in.
pub trait Hypervisor: Send + Sync {
    /// Starts the VM detached from the caller; returns its pid once it is running.
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError>;
    /// Whether `pid` is still the VM launched for `spec_id`.
    fn is_running(&self, pid: u32, paths: &VmPaths) -> bool;
}

#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Qemu {
    /// Finds the binary: an explicit path, or `qemu-system-x86_64` on PATH.
    pub fn locate(configured: Option<&Path>) -> Result<Self, VmmError> {
        let wanted = configured
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        if wanted.components().count() > 1 {
            return if wanted.is_file() {
                Ok(Self { binary: wanted })
            } else {
                Err(VmmError::QemuMissing(wanted))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(&wanted))
            .find(|candidate| candidate.is_file())
            .map(|binary| Self { binary })
            .ok_or(VmmError::QemuMissing(wanted))
    }

    pub fn args(spec: &LaunchSpec) -> Vec<String> {
        let ram_kib = crate::ram::ram_bytes(spec.memory_mib) >> 10;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("nook-{}", spec.id),
            "-M".into(),
            if spec.ram.is_some() {
                "pc,memory-backend=ram".into()
            } else {
                "pc".into()
            },
            "-accel".into(),
            match (spec.accel, spec.tcg_cache_mib) {
                (Accel::Tcg, Some(mib)) => format!("tcg,tb-size={mib}"),
                (Accel::Tcg, None) => "tcg".into(),
                (Accel::Kvm, _) => "kvm".into(),
            },
        ];
        if spec.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            format!("{ram_kib}K"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
            // No image locks on the top: nook guarantees it has one writer, and after a fork
            // the source's old tops (now layers its clones read) must not block its own
            // re-activation. Layers opened as backing files keep QEMU's read locks.
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap,detect-zeroes=unmap,file.locking=off",
                disk_name(spec)
            ),
            "-device".into(),
            "virtio-blk-pci,drive=root".into(),
        ]);
        let (netdev, mac) = match &spec.net {
            // The tap is opened by nook and handed over (see `launch`): QEMU needs neither
            // /dev/net/tun nor the right to attach to a tap.
            NetBackend::Tap { mac, .. } | NetBackend::TakenTap { mac, .. } => {
                (format!("tap,id=net0,fd={TAP_FD}"), mac)
            }
            NetBackend::User { netdev, mac } => (netdev.clone(), mac),
        };
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={mac}"),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!("socket,id=agent,fd={AGENT_FD},server=on,wait=off"),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                nook_proto::PORT_NAME
            ),
            "-device".into(),
            "virtio-rng-pci".into(),
            // A new generation id on every QEMU start, the restore of a fork included: the
            // guest kernel reseeds its RNG when it changes, so clones never share random state.
            "-device".into(),
            "vmgenid,guid=auto".into(),
            // Free page reporting hands pages the guest frees back to the host at once, which
            // is what lets idle VMs cost little and memory be overcommitted.
        ]);
        if spec.reclaim {
            args.extend([
                "-device".into(),
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on".into(),
            ]);
        }
        match &spec.ram {
            Some(crate::RamMapping::Anonymous) => args.extend([
                "-object".into(),
                format!("memory-backend-ram,id=ram,size={ram_kib}K"),
            ]),
            // QEMU opens the memfd again by its /proc name (the jail mounts a /proc of its own
            // for it).
            Some(ram) => args.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id=ram,size={ram_kib}K,mem-path=/proc/self/fd/{},share={}",
                    ram_fd(spec),
                    if ram.shared() { "on" } else { "off" }
                ),
            ]),
            None => {}
        }
        if spec.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
            if spec.hold {
                args.push("-S".into());
            }
        }
        args.extend([
            // Not a file chardev, which would grow for as long as the guest prints: the daemon
            // follows this socket into a log of bounded size (crate::console).
            "-chardev".into(),
            format!("socket,id=console,fd={CONSOLE_FD},server=on,wait=off"),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            // seccomp: no obsolete syscalls, no setuid, no fork or exec, no scheduler or
            // resource changes. A device-emulation bug then cannot start a shell or another
            // process. (QEMU's own -daemonize forks and calls setsid after the filter is on,
            // so nook puts QEMU in the background itself: see `launch`.)
            "-sandbox".into(),
            SANDBOX.into(),
        ]);
        args
    }
}

/// The descriptors QEMU is started with: its sockets are bound by nook (at `VmPaths`) and
/// listened on by QEMU, so a jailed QEMU needs no directory it could write a socket into.
const QMP_FD: i32 = 3;
const AGENT_FD: i32 = 4;
const CONSOLE_FD: i32 = 5;
const TAP_FD: i32 = 6;

/// The RAM's memfd comes right after the tap, or in its place without one.
fn ram_fd(spec: &LaunchSpec) -> i32 {
    match spec.net {
        NetBackend::Tap { .. } | NetBackend::TakenTap { .. } => TAP_FD + 1,
        NetBackend::User { .. } => TAP_FD,
    }
}

/// A disk top handed as a descriptor comes after the RAM's memfd.
fn disk_fd(spec: &LaunchSpec) -> i32 {
    ram_fd(spec) + i32::from(spec.ram.as_ref().is_some_and(|r| r.ram().is_some()))
}

/// The name QEMU opens the disk top by: its path, or for a top handed as a descriptor, that
/// descriptor's /proc name, which stays right whatever the file is renamed to (QEMU opens a
/// top again by its name whenever it changes between read-write and read-only).
fn disk_name(spec: &LaunchSpec) -> String {
    match &spec.disk_fd {
        Some(_) => format!("/proc/self/fd/{}", disk_fd(spec)),
        None => spec.disk.display().to_string(),
    }
}

/// QEMU's seccomp filter, all of it.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// How long QEMU may take to come up (its QMP greeting) before the launch is abandoned.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// What is kept of QEMU's stderr in `qemu.log`; the rest is read and dropped, so a guest that
/// makes QEMU warn forever can neither fill the disk nor block QEMU on a full pipe.
const STDERR_KEEP: usize = 64 * 1024;

impl Hypervisor for Qemu {
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError> {
        let p = &spec.paths;
        // QMP, agent and console sockets and the pidfile, under the names this QEMU uses.
        let [qmp_socket, agent_socket, console_socket, log, pidfile] = p
            .runtime_files()
            .map(|(staged, live)| if spec.successor { staged } else { live });
        for stale in [&qmp_socket, &agent_socket, &console_socket, &log, &pidfile] {
            let _ = std::fs::remove_file(stale);
        }
        // Keep the previous boot's console for post-mortems, and start this boot's afresh (a
        // successor goes on with its VM's console).
        if !spec.successor {
            let _ = std::fs::rename(p.console_log(), p.dir.join("console.log.1"));
        }
        let listen = |path: PathBuf| {
            std::os::unix::net::UnixListener::bind(&path)
                .map(OwnedFd::from)
                .map_err(VmmError::io(&path))
        };
        // Ordered as the fd numbers in `args`.
        let mut handed = vec![
            listen(qmp_socket.clone())?,
            listen(agent_socket)?,
            listen(console_socket)?,
        ];
        match &spec.net {
            NetBackend::Tap { ifname, .. } => handed.push(crate::sys::open_tap(ifname)?),
            NetBackend::TakenTap { fd, .. } => {
                handed.push(fd.try_clone().map_err(|e| {
                    VmmError::LaunchFailed(format!("cannot hand over the tap: {e}"))
                })?)
            }
            NetBackend::User { .. } => {}
        }
        if let Some(ram) = spec.ram.as_ref().and_then(crate::RamMapping::ram) {
            handed.push(ram.handed().map_err(|e| {
                VmmError::LaunchFailed(format!("cannot hand over the VM's memory: {e}"))
            })?);
        }
        if let Some(disk) = &spec.disk_fd {
            handed.push(disk.try_clone().map_err(|e| {
                VmmError::LaunchFailed(format!("cannot hand over the VM's disk: {e}"))
            })?);
        }
        let jail = spec
            .jail
            .as_ref()
            .map(crate::jail::Jail::prepare)
            .transpose()
            .map_err(|e| VmmError::LaunchFailed(format!("cannot prepare QEMU's jail: {e}")))?;
        let mut command = std::process::Command::new(&self.binary);
        command
            .args(Self::args(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A process group of its own: QEMU outlives the daemon, and a ^C or a signal to the
            // daemon's group must not reach it.
            .process_group(0);
        let jail = jail.map(std::sync::Arc::new);
        crate::sys::enter_before_exec(&mut command, jail.clone(), &handed, QMP_FD);
        let mut child = command.spawn().map_err(|e| match (&jail, e.kind()) {
            (_, std::io::ErrorKind::NotFound) => VmmError::QemuMissing(self.binary.clone()),
            (Some(jail), _) => VmmError::LaunchFailed(jail.explain(&e)),
            (None, _) => VmmError::LaunchFailed(e.to_string()),
        })?;
        drop(handed);
        let pid = child.id();
        // nook writes the pidfile, not QEMU: a jailed QEMU cannot write into the VM's directory.
        if let Err(e) = std::fs::write(&pidfile, format!("{pid}\n")) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmmError::io(&pidfile)(e));
        }
        let early = keep_stderr(&mut child, log);
        // QEMU is up once its monitor greets: then every device, the tap included, is set up,
        // and a bad argument or a missing tap has made it exit with its own words instead.
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let failure = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| VmmError::LaunchFailed(e.to_string()))?
            {
                // Give the stderr reader a moment to take QEMU's last words.
                std::thread::sleep(Duration::from_millis(50));
                let said = String::from_utf8_lossy(&lock(&early)).trim().to_string();
                break if said.is_empty() {
                    format!("QEMU exited ({status})")
                } else {
                    said
                };
            }
            if greets(&qmp_socket) {
                // Reaped when it ends, so a VM that stops leaves no zombie behind.
                let _ = std::thread::Builder::new()
                    .name(format!("qemu-{pid}"))
                    .spawn(move || child.wait());
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break format!("QEMU did not come up within {}s", LAUNCH_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_file(&pidfile);
        Err(VmmError::LaunchFailed(failure))
    }

    fn is_running(&self, pid: u32, paths: &VmPaths) -> bool {
        runs_vm(pid, paths)
    }
}

/// Whether process `pid` is a QEMU of the VM at `paths`. The pid may have been reused: only a
/// process whose command line carries this VM's `-name` is ours.
fn runs_vm(pid: u32, paths: &VmPaths) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let Some(id) = paths.dir.file_name() else {
        return false;
    };
    let mut needle = b"\0nook-".to_vec();
    needle.extend_from_slice(id.as_encoded_bytes());
    needle.push(0);
    cmdline
        .windows(needle.len())
        .any(|w| w == needle.as_slice())
}

/// Every running QEMU of nook's, by the VM id its `-name nook-ID` carries: one per VM, except
/// while a fork's successor and the QEMU it replaces both run (or after a crash cut such a
/// fork short). One pass over `/proc`.
pub fn qemus_by_vm() -> std::collections::HashMap<String, Vec<u32>> {
    let mut found: std::collections::HashMap<String, Vec<u32>> = Default::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        while let Some(arg) = args.next() {
            if arg == b"-name" {
                if let Some(id) = args.next().and_then(|n| n.strip_prefix(b"nook-")) {
                    found
                        .entry(String::from_utf8_lossy(id).into_owned())
                        .or_default()
                        .push(pid);
                }
                break;
            }
        }
    }
    found
}

/// Whether process `pid` has the file at `path` open (None when its descriptors cannot be
/// read).
pub fn holds_file(pid: u32, path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let wanted = std::fs::metadata(path).ok()?;
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.flatten().any(|fd| {
        std::fs::metadata(fd.path())
            .is_ok_and(|m| m.dev() == wanted.dev() && m.ino() == wanted.ino())
    }))
}

impl Qemu {
    /// A copy of the tap the running QEMU `pid` was handed, for its successor: an open tap
    /// cannot be opened a second time.
    pub fn take_tap(pid: u32) -> Result<OwnedFd, VmmError> {
        let held = std::fs::read_link(format!("/proc/{pid}/fd/{TAP_FD}"));
        if !held.as_ref().is_ok_and(|t| t == Path::new("/dev/net/tun")) {
            return Err(VmmError::LaunchFailed(format!(
                "QEMU {pid} holds no tap at descriptor {TAP_FD} ({held:?})"
            )));
        }
        crate::sys::take_fd(pid, TAP_FD)
            .map_err(|e| VmmError::LaunchFailed(format!("cannot take QEMU {pid}'s tap: {e}")))
    }
}

/// True once QEMU's monitor at `socket` sends its greeting (the connection is then dropped;
/// the monitor takes the next client).
fn greets(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 1];
    matches!(stream.read(&mut first), Ok(1))
}

/// Reads QEMU's stderr until it closes, keeping the first [`STDERR_KEEP`] bytes in `log` and
/// in the returned buffer (for a launch that fails).
fn keep_stderr(child: &mut std::process::Child, log: PathBuf) -> Arc<Mutex<Vec<u8>>> {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let Some(stderr) = child.stderr.take() else {
        return kept;
    };
    relay_stderr(
        stderr,
        std::fs::File::create(&log).ok(),
        0,
        Some(Arc::clone(&kept)),
    );
    kept
}

/// Reads the stderr of the running QEMU `pid` again after a daemon restart, appending to its
/// `qemu.log` within the same [`STDERR_KEEP`]. QEMU's stderr is a pipe whose reader was the
/// daemon that launched it; with that daemon gone its messages would be lost (QEMU ignores
/// SIGPIPE, so it goes on), and it is what a re-adopted VM that dies says about why. Opening
/// `/proc/PID/fd/2` opens that same pipe, as a new reader. Call it once per re-adoption.
pub fn follow_stderr(pid: u32, paths: &VmPaths) -> Result<(), VmmError> {
    let end = PathBuf::from(format!("/proc/{pid}/fd/2"));
    let held = std::fs::read_link(&end).map_err(VmmError::io(&end))?;
    if !held.to_string_lossy().starts_with("pipe:") {
        return Err(VmmError::LaunchFailed(format!(
            "QEMU {pid}'s stderr is not the pipe nook gave it ({})",
            held.display()
        )));
    }
    // An anonymous pipe's open never waits for a writer (unlike a FIFO's), so a QEMU gone
    // since the check cannot hang it: the reader then reads end of file at once.
    let pipe = std::fs::File::open(&end).map_err(VmmError::io(&end))?;
    let log = paths.qemu_log();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .map_err(VmmError::io(&log))?;
    let written = file.metadata().map_or(STDERR_KEEP, |m| {
        usize::try_from(m.len()).unwrap_or(STDERR_KEEP)
    });
    relay_stderr(pipe, Some(file), written, None);
    Ok(())
}

/// Copies `stderr` into `file` (which holds `written` bytes already) up to [`STDERR_KEEP`] in
/// all, and into `kept` if given (a launch reads it when QEMU fails to come up), on a thread
/// of its own until the pipe closes. Past the cap it reads and drops, so a guest that makes
/// QEMU warn forever can neither fill the disk nor block QEMU on a full pipe.
fn relay_stderr(
    mut stderr: impl std::io::Read + Send + 'static,
    mut file: Option<std::fs::File>,
    mut written: usize,
    kept: Option<Arc<Mutex<Vec<u8>>>>,
) {
    use std::io::Write;
    let spawned = std::thread::Builder::new()
        .name("qemu-stderr".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = STDERR_KEEP.saturating_sub(written).min(n);
                if room > 0 {
                    written += room;
                    if let Some(kept) = &kept {
                        lock(kept).extend_from_slice(&buf[..room]);
                    }
                    if let Some(f) = file.as_mut() {
                        let _ = f.write_all(&buf[..room]);
                    }
                }
            }
        });
    if spawned.is_err() {
        tracing::warn!("cannot read QEMU's stderr; its messages are lost");
    }
}

/// Locks, ignoring poisoning: a panicked reader thread loses only log lines.
fn lock(m: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn read_pid(pidfile: &Path) -> Result<u32, VmmError> {
    let text = std::fs::read_to_string(pidfile).map_err(VmmError::io(pidfile))?;
    text.trim()
        .parse()
        .map_err(|_| VmmError::LaunchFailed(format!("bad pidfile {}", pidfile.display())))
}

/// Last resort when QMP is gone: SIGKILL the process if it is still ours.
pub fn kill(hv: &dyn Hypervisor, pid: u32, paths: &VmPaths) {
    if hv.is_running(pid, paths) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with a tap, booting, its RAM anonymous.
    fn spec() -> LaunchSpec {
        LaunchSpec {
            id: "abc123".into(),
            paths: VmPaths::new("/d/vms/abc123"),
            cpus: 2,
            memory_mib: 256,
            ram: None,
            disk: "/d/vms/abc123/disk.qcow2".into(),
            disk_fd: None,
            successor: false,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd".into(),
            cmdline: "console=ttyS0".into(),
            net: NetBackend::Tap {
                ifname: "nk3".into(),
                mac: "02:6e:6b:00:00:03".into(),
            },
            accel: Accel::Tcg,
            tcg_cache_mib: Some(128),
            reclaim: true,
            incoming: false,
            hold: false,
            jail: None,
        }
    }

    /// A re-adopting daemon reads QEMU's stderr again: what the process says after its first
    /// reader is gone reaches `qemu.log`, after what is there, and never past the cap.
    #[test]
    fn stderr_is_followed_again_after_its_reader_is_gone() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = VmPaths::new(dir.path());
        std::fs::write(paths.qemu_log(), "before the restart\n").expect("log");
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "read line; echo \"$line\" >&2; read line; echo \"$line\" >&2",
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        // The launching daemon's reader is gone.
        drop(child.stderr.take());
        follow_stderr(child.id(), &paths).expect("follow");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "after the restart").expect("write");
        // Past the cap: dropped, but read, so the writer never blocks.
        writeln!(stdin, "{}", "x".repeat(2 * STDERR_KEEP)).expect("write");
        drop(stdin);
        assert!(child.wait().expect("wait").success());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = std::fs::read_to_string(paths.qemu_log()).expect("log");
            if log.len() >= STDERR_KEEP || Instant::now() > deadline {
                assert!(
                    log.starts_with("before the restart\nafter the restart\nxxx"),
                    "{log:.80}"
                );
                assert_eq!(log.len(), STDERR_KEEP);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Not a pipe (not what nook launched): refused.
        let mut other = std::process::Command::new("sleep")
            .arg("5")
            .stderr(Stdio::null())
            .spawn()
            .expect("sleep");
        let err = follow_stderr(other.id(), &paths);
        let _ = other.kill();
        let _ = other.wait();
        assert!(err.is_err_and(|e| e.to_string().contains("not the pipe")));
    }

    #[test]
    fn command_line_has_every_device_and_the_sandbox() {
        let spec = spec();
        let line = Qemu::args(&spec).join(" ");
        for part in [
            "-name nook-abc123",
            "-M pc",
            "-accel tcg,tb-size=128 ",
            // Two pages past 256 MiB: QEMU 7.2 tracks TCG's writes soundly only then (`ram.rs`).
            "-smp 2 -m 262152K",
            "file=/d/vms/abc123/disk.qcow2,format=qcow2",
            "-netdev tap,id=net0,fd=6",
            "mac=02:6e:6b:00:00:03",
            "socket,id=agent,fd=4,server=on,wait=off",
            "name=org.nook.agent.0",
            "-chardev socket,id=qmp,fd=3,server=on,wait=off -mon chardev=qmp,mode=control",
            "socket,id=console,fd=5,server=on,wait=off",
            "-serial chardev:console",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "free-page-reporting=on",
        ] {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
        assert!(!line.contains("-cpu host"));
        // A jailed QEMU could not write these: nook binds the sockets and writes the pidfile.
        assert!(!line.contains("path="), "{line}");
        assert!(!line.contains("-pidfile"), "{line}");
        // QEMU's own translation cache where none is asked for, and none under KVM.
        let mut spec = spec;
        spec.tcg_cache_mib = None;
        assert!(Qemu::args(&spec).join(" ").contains("-accel tcg "));
        spec.tcg_cache_mib = Some(64);
        spec.accel = Accel::Kvm;
        assert!(!Qemu::args(&spec).join(" ").contains("tb-size"));
    }

    #[test]
    fn ram_and_a_handed_disk_follow_the_tap_and_successors_stage_their_files() {
        let ram = crate::GuestRam::new(256).expect("memfd");
        let disk = std::fs::File::open("/dev/null").expect("open");
        let mut spec = LaunchSpec {
            ram: Some(crate::RamMapping::Own(ram.clone())),
            disk: "/d/vms/abc123/disk.next.qcow2".into(),
            incoming: true,
            hold: true,
            ..spec()
        };
        let line = Qemu::args(&spec).join(" ");
        for part in [
            "-M pc,memory-backend=ram",
            "memory-backend-file,id=ram,size=262152K,mem-path=/proc/self/fd/7,share=on",
            "file=/d/vms/abc123/disk.next.qcow2,format=qcow2",
            "-incoming defer -S",
        ] {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
        // A fork maps the RAM copy-on-write; a handed top is opened by its descriptor, after
        // the RAM's; without a tap, the RAM takes the tap's number.
        spec.ram = Some(crate::RamMapping::Fork(ram));
        spec.disk_fd = Some(std::sync::Arc::new(OwnedFd::from(disk)));
        let line = Qemu::args(&spec).join(" ");
        assert!(
            line.contains("mem-path=/proc/self/fd/7,share=off"),
            "{line}"
        );
        assert!(line.contains("file=/proc/self/fd/8,format=qcow2"), "{line}");
        spec.net = NetBackend::User {
            netdev: "user,id=net0".into(),
            mac: "02:6e:6b:00:00:03".into(),
        };
        let line = Qemu::args(&spec).join(" ");
        assert!(
            line.contains("mem-path=/proc/self/fd/6,share=off"),
            "{line}"
        );
        assert!(line.contains("file=/proc/self/fd/7,format=qcow2"), "{line}");

        let names: Vec<(String, String)> = VmPaths::new("/d/vms/abc123")
            .runtime_files()
            .iter()
            .map(|(staged, live)| (staged.display().to_string(), live.display().to_string()))
            .collect();
        let expected = [
            ("qmp.next.sock", "qmp.sock"),
            ("agent.next.sock", "agent.sock"),
            ("console.next.sock", "console.sock"),
            ("qemu.next.log", "qemu.log"),
            // Renamed last: the pidfile says which QEMU is the VM.
            ("qemu.next.pid", "qemu.pid"),
        ];
        for ((staged, live), (s, l)) in names.iter().zip(expected) {
            assert_eq!(staged, &format!("/d/vms/abc123/{s}"));
            assert_eq!(live, &format!("/d/vms/abc123/{l}"));
        }
    }
}
