//! `cp`: cloning a VM. The disk side is `nook_storage::layers` (freeze the source's top, give
//! both VMs a fresh overlay over it); a running source is also forked with `nook_vmm::fork`.
//!
//! Crash safety rests on three facts, each checked by `recover`:
//! - The clone's row is `creating` until the clone is complete, and a `creating` row is
//!   destroyed at start, so an interrupted clone leaves nothing.
//! - The source only ever gains a layer: its new top is made beside its disk as
//!   `disk.next.qcow2` and renamed over `disk.qcow2` once QEMU writes to it (or, with QEMU
//!   gone, whenever its backing file is the source's old top). [`Manager::settle_next_disk`]
//!   finishes or undoes that step.
//! - Layers are collected by reachability from every VM's disk files, under the layers lock
//!   a clone holds from freezing a layer until the overlays that name it exist.

use super::*;
use crate::faults::{self, Fault};
use channel::Placed;
use launch::Sshd;
use nook_api::{CloneMode, CloneMoved, CloneTimings, CloneVm, Cloned, ForkKind};
use nook_storage::layers;
use nook_vmm::fork;
use successor::end_successor;

/// Chains with more layers than this are flattened in the background after a clone.
const MAX_LAYERS: usize = 8;
/// The source's new top while a clone is moving it there.
pub(super) const NEXT_DISK: &str = "disk.next.qcow2";
/// The `-drive id` of every VM's root disk.
pub(super) const DISK_DEVICE: &str = "root";
/// Free space the data dir must have for a clone to be made.
const MIN_FREE_BYTES: u64 = 32 << 20;
/// How long a forked clone's agent has to answer after the restore.
const FORK_READY: Duration = Duration::from_secs(30);

/// Forks of a running VM tried before `cp` gives up on a clone whose kernel crashed on waking.
/// A fork must wake exactly as its source was; one that does not is thrown away, never handed
/// to the user. (Under QEMU 7.2's TCG, before the precopy fix in `nook_vmm::ram`, most forks
/// taken across a flush of a small translation cache woke with a corrupted kernel; this is
/// the net under that fix, and `bench/fork_fresh.sh` counts a retry as a failure.)
const FORK_ATTEMPTS: u32 = 3;
/// How long a fresh clone has to run `true` before it counts as crashed.
const CLONE_HEALTH: Duration = Duration::from_secs(10);

/// How long `cp` waits for a running source to finish booting before forking it anyway.
const BOOT_SETTLE: Duration = Duration::from_secs(60);
/// How long the wait for a boot to finish runs before `cp` says it is waiting.
const BOOT_SETTLE_QUIET: Duration = Duration::from_millis(500);

/// Why making a clone failed.
enum CloneError {
    /// The clone's kernel panicked on waking from the fork: worth forking again.
    Crashed(ApiError),
    /// The source's agent connection could not be held still for an instant fork (a process
    /// was being started, or QEMU did not take what was sent to the agent, as when a paused
    /// guest cannot take more of an upload): worth forking again, by copying.
    SourceBusy,
    Failed(ApiError),
}

impl From<ApiError> for CloneError {
    fn from(err: ApiError) -> Self {
        CloneError::Failed(err)
    }
}

/// Resolves once the VM's console shows the kernel in trouble (a fresh clone's console holds only
/// what it printed since it woke).
async fn kernel_in_trouble(paths: &VmPaths) {
    // Only what the console gained since the last look is read (with a sign's length of
    // overlap, so one split across two reads is still seen).
    let mut seen = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let console = paths.console_log();
        let from = seen;
        let read = tokio::task::spawn_blocking(move || read_from(&console, from))
            .await
            .ok()
            .flatten();
        let Some((len, fresh)) = read else { continue };
        if KERNEL_TROUBLE
            .iter()
            .any(|sign| fresh.windows(sign.len()).any(|w| w == sign.as_bytes()))
        {
            return;
        }
        seen = len.saturating_sub(CRASH_SIGN_MAX as u64);
    }
}

/// The file's length and its bytes from `offset` (from the start if it shrank: rotated).
fn read_from(path: &std::path::Path, offset: u64) -> Option<(u64, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut fresh = Vec::new();
    file.read_to_end(&mut fresh).ok()?;
    Some((len, fresh))
}

/// Longer than any of [`KERNEL_TROUBLE`].
const CRASH_SIGN_MAX: usize = 40;

/// What Linux prints when it finds its own state broken: a warning's or oops's banner, a BUG,
/// a panic. A clone's console holds only what it printed since it woke, so any of these there
/// is from a wake that went wrong.
const KERNEL_TROUBLE: [&str; 5] = [
    "------------[ cut here ]------------",
    "Kernel panic - not syncing",
    "BUG: ",
    "general protection fault",
    "Oops: ",
];

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Manager {
    /// Clones `source` into a new VM owned by the same account. A stopped source gives a
    /// stopped clone of its disk; a running one a running clone with its memory and processes
    /// (or, with `stopped_only`, a fresh boot of a copy of its disk).
    pub async fn clone_vm(
        self: &Arc<Self>,
        source: &str,
        req: CloneVm,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<Cloned, ApiError> {
        let started = Instant::now();
        if let Some(name) = &req.name {
            nook_api::validate_name(name)?;
        }
        let src = self.lock_vm(source, scope).await?;
        let mode = match src.state {
            VmState::Stopped | VmState::Failed => CloneMode::Disk,
            VmState::Running if req.stopped_only => CloneMode::Boot,
            VmState::Running => CloneMode::Fork,
            other => {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "VM '{}' is {}: clone it once it is running or stopped",
                        src.name,
                        other.as_str()
                    ),
                ));
            }
        };
        if mode != CloneMode::Disk {
            Qemu::locate(self.cfg.qemu.as_deref()).map_err(|e| errors::from_vmm("find QEMU", e))?;
        }
        let image = self.image_of(&src)?;
        self.check_room_for_clone()?;
        let need_mib = if mode == CloneMode::Disk {
            0
        } else {
            src.memory_mib
        };
        let away = self
            .place_clone(&src, u64::from(need_mib), req.on.as_deref())
            .await?;
        if let Some(away) = &away {
            progress(&format!(
                "the clone goes to host {} ({}): it is made here, where the layers are, then moved there with what that host lacks",
                away.host, away.why
            ));
        }
        let stays = if away.is_some() {
            Stays::Passing
        } else {
            Stays::Here
        };
        if mode == CloneMode::Fork {
            self.settle_boot(&src, progress).await;
        }
        let mut name = req.name.clone();
        let mut attempt = 1;
        // Cleared when an instant fork could not hold the source's agent connection still:
        // the next attempt copies the memory, which leaves the source in its QEMU.
        let mut may_share = true;
        let (record, timings, clone_guard) = loop {
            let record = {
                let account_lock = self.op_lock(&format!("account:{}", src.owner));
                let _account_guard = account_lock.lock().await;
                let _admitted = self
                    .admit_on(
                        &src.owner,
                        Ask::Create,
                        image.kind,
                        Wants {
                            cpu: src.cpu,
                            memory_mib: need_mib,
                            disk_bytes: src.disk_bytes,
                        },
                        stays,
                    )
                    .await?;
                let template = NewVm {
                    id: String::new(),
                    name: String::new(),
                    owner: src.owner.clone(),
                    image: src.image.clone(),
                    image_dir: src.image_dir.clone(),
                    cpu: src.cpu,
                    memory_mib: src.memory_mib,
                    disk_bytes: src.disk_bytes,
                    host: self.cfg.host_name.clone(),
                };
                self.insert_vm(template, name.as_deref()).await?
            };
            let clone_guard = self.op_lock(&record.id).lock_owned().await;
            faults::point("clone:recorded");
            tracing::info!(source = %src.name, clone = %record.name, ?mode, attempt, "cloning");
            progress(&format!("cloning {} into {}", src.name, record.name));
            let err = match self
                .make_clone(&src, &record, &image, mode, may_share, progress)
                .await
            {
                Ok(mut timings) => {
                    timings.total_ms = ms(started.elapsed());
                    timings.attempts = attempt;
                    tracing::info!(source = %src.name, clone = %record.name, ?timings, "cloned");
                    self.flatten_later(&src.id);
                    if mode == CloneMode::Fork {
                        self.rehome_later(&src.id);
                    }
                    if timings.fork == Some(ForkKind::Copied) {
                        // A copy reads every page of a source whose RAM is a memfd.
                        self.give_back_zero_pages_later(&src.id);
                    }
                    break (record, timings, clone_guard);
                }
                Err(CloneError::SourceBusy) if attempt < FORK_ATTEMPTS => {
                    tracing::info!(source = %src.name, clone = %record.name, "the source's guest agent could not be held still for an instant fork; copying its memory instead");
                    self.destroy(&record).await;
                    name = Some(record.name.clone());
                    may_share = false;
                    attempt += 1;
                    continue;
                }
                Err(CloneError::SourceBusy) => ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "VM '{}' was busy starting processes while it was being cloned; try again",
                        src.name
                    ),
                ),
                Err(CloneError::Crashed(err)) if attempt < FORK_ATTEMPTS => {
                    tracing::warn!(source = %src.name, clone = %record.name, error = %err.message, "the clone crashed on waking; forking again");
                    progress("the clone's kernel crashed on waking; forking again");
                    self.destroy(&record).await;
                    name = Some(record.name.clone());
                    attempt += 1;
                    continue;
                }
                Err(CloneError::Crashed(err) | CloneError::Failed(err)) => err,
            };
            // What the clone's console last showed is the one clue to a clone that woke broken,
            // and it goes with the clone: keep it in the daemon's log.
            let console = self.paths(&record.id).console_tail(30).await;
            tracing::warn!(source = %src.name, clone = %record.name, error = %err.message, console, "clone failed; removing what was made");
            self.destroy(&record).await;
            return Err(err);
        };
        let source = src.name.clone();
        // The source is done with; only the clone goes on.
        drop(src);
        let moved = match away {
            None => {
                drop(clone_guard);
                self.flatten_later(&record.id);
                if mode == CloneMode::Fork {
                    self.rehome_later(&record.id);
                }
                if timings.fork == Some(ForkKind::Copied) {
                    // A copy into a memfd fills in every page.
                    self.give_back_zero_pages_later(&record.id);
                }
                None
            }
            Some(away) => {
                // Moved before its lock is let go: nothing can rename, stop or remove it first.
                let row = self
                    .store
                    .get_by_id(&record.id)
                    .await
                    .map_err(|e| errors::from_store("read the clone", e))?;
                let locked = LockedVm {
                    record: row,
                    _guard: clone_guard,
                };
                Some(self.send_clone(locked, away, progress).await?)
            }
        };
        let mut timings = timings;
        timings.total_ms = ms(started.elapsed());
        let vm = self.get(&record.name, Scope::Admin).await?;
        Ok(Cloned {
            vm,
            source,
            mode,
            timings,
            moved,
        })
    }

    /// Moves a clone just made here (its lock held) to the host placement chose. A clone that
    /// cannot go is removed (it was asked for there, and this host may have no room to keep
    /// it).
    async fn send_clone(
        self: &Arc<Self>,
        locked: LockedVm,
        away: Placed,
        progress: Progress<'_>,
    ) -> Result<CloneMoved, ApiError> {
        let clone = locked.record.clone();
        let me = self.cfg.host_name.clone();
        let err = match self.move_locked(locked, Some(&away.host), progress).await {
            Ok(moved) => {
                return Ok(CloneMoved {
                    from: moved.from,
                    to: moved.to,
                    why: away.why,
                    disk_bytes_sent: moved.disk_bytes_sent,
                    move_ms: moved.total_ms as f64,
                });
            }
            Err(err) => err,
        };
        tracing::warn!(clone = %clone.name, to = %away.host, error = %err.message, "a clone could not go to its host; removing it");
        let lock = self.op_lock(&clone.id);
        let _guard = lock.lock().await;
        // Only while it is still this host's: a hand-over that went through after all made it
        // the other host's.
        let what = match self.store.get_by_id(&clone.id).await {
            Ok(row) if row.host == me => {
                self.destroy(&row).await;
                format!(
                    "The clone '{}' was made on host '{me}' but could not go to host '{}', so it was removed: {}",
                    clone.name, away.host, err.message
                )
            }
            Ok(row) => format!(
                "The move of the clone '{}' to host '{}' ended with an error ({}), but it is recorded on host '{}': `ls` shows it",
                clone.name, away.host, err.message, row.host
            ),
            Err(e) => {
                tracing::warn!(clone = %clone.name, error = %e, "cannot read the clone's row to remove it");
                format!(
                    "The clone '{}' was made on host '{me}' but could not go to host '{}' ({}); it stays on '{me}' for now (`rm {}` removes it)",
                    clone.name, away.host, err.message, clone.name
                )
            }
        };
        Err(ApiError::new(err.code, what))
    }

    /// Waits, within [`BOOT_SETTLE`], for the init system of a running `vm` to finish booting.
    /// A fork taken while systemd was still starting units sometimes woke unable to take its
    /// identity or run anything (a few in a hundred forks in CI, each of a VM `new` had just
    /// returned), while forks of guests whose boot had ended woke well. A guest without
    /// systemd counts as booted once its agent answers, as `systemctl` then fails at once.
    async fn settle_boot(&self, vm: &VmRecord, progress: Progress<'_>) {
        let agent = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            match live.get(&vm.id) {
                Some(l) if !l.booted => l.agent.clone(),
                _ => None,
            }
        };
        let Some(agent) = agent else { return };
        let argv = ["systemctl", "is-system-running", "--wait"].map(String::from);
        let wait = run_to_end(&agent, argv.to_vec());
        tokio::pin!(wait);
        let ended = tokio::select! {
            r = &mut wait => Some(r),
            () = tokio::time::sleep(BOOT_SETTLE_QUIET) => {
                progress(&format!("waiting for {} to finish booting", vm.name));
                tokio::time::timeout(BOOT_SETTLE, wait).await.ok()
            }
        };
        match ended {
            // Any answer, even "degraded" or "no such command", means no boot is under way.
            Some(_) => self.set_booted(&vm.id, true),
            None => {
                tracing::warn!(vm = %vm.name, "the VM's boot did not finish in time; forking it anyway")
            }
        }
    }

    /// A clone costs almost no space to make, but one that cannot write is of no use (and
    /// would push its source, which shares the filesystem, to a stop too).
    fn check_room_for_clone(&self) -> Result<(), ApiError> {
        let dir = &self.cfg.data_dir;
        match free_bytes(dir) {
            Some(free) if free < MIN_FREE_BYTES => Err(errors::no_space("the data dir")),
            Some(_) => Ok(()),
            None => {
                tracing::warn!(dir = %dir.display(), "cannot tell the data dir's free space");
                Ok(())
            }
        }
    }

    async fn make_clone(
        self: &Arc<Self>,
        src: &VmRecord,
        clone: &VmRecord,
        image: &Image,
        mode: CloneMode,
        may_share: bool,
        progress: Progress<'_>,
    ) -> Result<CloneTimings, CloneError> {
        let mut timings = CloneTimings::default();
        let disk_started = Instant::now();
        let clone_paths = self.paths(&clone.id);
        std::fs::create_dir_all(&clone_paths.dir)
            .map_err(|e| io_error("create the VM directory", e))?;
        let layers_guard = self.layers_lock.lock().await;
        let next = self.paths(&src.id).dir.join(NEXT_DISK);
        let (layer_store, src_disk, clone_disk, next_disk) = (
            self.layers.clone(),
            self.paths(&src.id).disk(),
            clone_paths.disk(),
            next.clone(),
        );
        let (src_size, clone_size) = (src.disk_bytes, clone.disk_bytes);
        // The source's QEMU runs jailed as its own uid, and must be able to write its new top.
        let src_uid = nix::unistd::geteuid()
            .is_root()
            .then(|| self.cfg.jail_uids.for_slot(src.slot));
        let made = tokio::task::spawn_blocking(move || {
            let layer = layer_store.freeze(&src_disk)?;
            faults::point("clone:frozen");
            nook_storage::disk::create_overlay_on_qcow2(&layer, &next_disk, src_size)?;
            nook_storage::disk::create_overlay_on_qcow2(&layer, &clone_disk, clone_size)?;
            if let Some(uid) = src_uid {
                std::os::unix::fs::chown(&next_disk, Some(uid), Some(uid)).map_err(|e| {
                    nook_storage::StorageError::Io {
                        action: "give the source its new disk top",
                        path: next_disk.clone(),
                        source: e,
                    }
                })?;
            }
            Ok::<_, nook_storage::StorageError>(layer)
        })
        .await;
        let made = map_join(made, "clone the disk")?;
        if let Err(err) = made {
            let _ = std::fs::remove_file(&next);
            return Err(errors::from_storage("clone the disk", err).into());
        }
        faults::point("clone:overlays");

        if mode != CloneMode::Fork {
            if mode == CloneMode::Boot {
                let qmp = self.live_qmp(src)?;
                let switched = fork::switch_disk(&qmp, DISK_DEVICE, &next).await;
                faults::point("clone:switched");
                self.settle_next_disk(src, Some(&qmp)).await;
                switched.map_err(|e| errors::from_vmm("switch the source's disk", e))?;
            } else {
                self.settle_next_disk(src, None).await;
            }
            drop(layers_guard);
            timings.disk_ms = ms(disk_started.elapsed());
            if mode == CloneMode::Boot {
                let boot_started = Instant::now();
                self.boot(clone, image, progress).await?;
                timings.ready_ms = Some(ms(boot_started.elapsed()));
            } else {
                self.store
                    .set_state(&clone.id, VmState::Stopped, None, None)
                    .await
                    .map_err(|e| errors::from_store("record the clone", e))?;
            }
            return Ok(timings);
        }

        timings.disk_ms = ms(disk_started.elapsed());
        let ram = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&src.id)
            .and_then(|l| l.ram.clone());
        let instant = self.cfg.fork_memory != crate::config::ForkMemory::Copy;
        let shared = ram.filter(|ram| instant && may_share && !ram.is_sealed());
        timings.fork = Some(if shared.is_some() {
            ForkKind::Instant
        } else {
            ForkKind::Copied
        });
        let (pid, clone_qmp) = match shared {
            Some(ram) => {
                self.fork_shared(
                    src,
                    clone,
                    image,
                    &next,
                    ram,
                    layers_guard,
                    &mut timings,
                    progress,
                )
                .await?
            }
            None => {
                self.fork_copying(
                    src,
                    clone,
                    image,
                    &next,
                    layers_guard,
                    &mut timings,
                    progress,
                )
                .await?
            }
        };
        faults::point("clone:restored");

        let ready_started = Instant::now();
        progress("giving the clone its own identity");
        // (Connected before the clone took the state: `connect_clone_agent`.)
        let agent = self.open_agent(clone).ok().flatten().ok_or_else(|| {
            ApiError::new(
                ErrorCode::GuestNotReady,
                format!("The clone '{}' stopped right after its restore", clone.name),
            )
        })?;
        // The kernel is watched from the clone's wake until it is handed over: one that wakes
        // broken has crashed during its identity as well as before it (seen in a loop of forks
        // of a busy VM), and is forked again rather than waited on.
        let woke = async {
            agent
                .wait_ready(FORK_READY)
                .await
                .map_err(|e| errors::from_vmm("reach the clone's guest agent", e))?;
            // The clone's disk already authorizes the source's nook key: the clone shares that
            // key rather than making another.
            self.share_ssh_key(src, clone);
            self.identify(clone, &agent, Sshd::Restarting).await?;
            // A fork of a guest still booting has woken able to answer its identity and then
            // unable to run anything (seen in CI once in a few dozen forks): prove it can run
            // a command before handing it over, or fork again.
            let runs =
                tokio::time::timeout(CLONE_HEALTH, run_to_end(&agent, vec!["true".into()])).await;
            Ok::<_, CloneError>(runs)
        };
        let runs = tokio::select! {
            r = woke => r?,
            () = clone_qmp.closed() => return Err(ApiError::new(ErrorCode::GuestNotReady, format!("The clone '{}' stopped right after its restore", clone.name)).into()),
            () = kernel_in_trouble(&clone_paths) => return Err(CloneError::Crashed(ApiError::new(
                ErrorCode::GuestNotReady,
                format!("The clone '{}' crashed on waking (its kernel failed right after the copy); try again", clone.name),
            ))),
        };
        // A clone can also wake with its kernel reporting corrupt state (a warning or an
        // oops right away, seen in CI once) and answer anyway, then stall: its console is
        // its own, so anything of the kind there is from this wake.
        let console = self.paths(&clone.id).console_tail(200).await;
        let oops = kernel_trouble(&console);
        if !matches!(runs, Ok(Ok(0))) || oops.is_some() {
            let why = match (runs, oops) {
                (_, Some(line)) => format!("its kernel reported: {line}"),
                (Ok(Ok(code)), None) => format!("`true` exited with {code}"),
                (Ok(Err(e)), None) => e.to_string(),
                (Err(_), None) => format!("no answer within {CLONE_HEALTH:?}"),
            };
            tracing::warn!(clone = %clone.name, why, "the clone could not run a command");
            return Err(CloneError::Crashed(ApiError::new(
                ErrorCode::GuestNotReady,
                format!(
                    "The clone '{}' could not run a command right after waking; try again",
                    clone.name
                ),
            )));
        }
        self.store
            .set_state(&clone.id, VmState::Running, None, Some(pid))
            .await
            .map_err(|e| errors::from_store("record the clone as running", e))?;
        timings.ready_ms = Some(ms(ready_started.elapsed()));
        Ok(timings)
    }

    /// A fork that copies the source's memory into the clone (a live precopy): for a source
    /// whose RAM cannot be shared (a fork's successor or clone, until it restarts).
    #[allow(clippy::too_many_arguments)]
    async fn fork_copying(
        self: &Arc<Self>,
        src: &VmRecord,
        clone: &VmRecord,
        image: &Image,
        next: &std::path::Path,
        layers_guard: tokio::sync::MutexGuard<'_, ()>,
        timings: &mut CloneTimings,
        progress: Progress<'_>,
    ) -> Result<(u32, Qmp), CloneError> {
        progress("starting the clone's QEMU");
        let Launched {
            pid,
            qmp: clone_qmp,
            ram,
        } = self
            .launch(clone, image, Launch::Fork { shared: None }, progress)
            .await?;
        self.adopt(clone, clone_qmp.clone(), None, ram);
        self.connect_clone_agent(clone).await?;
        let src_qmp = self.live_qmp(src)?;
        let source_pid = src.pid;
        progress("copying memory");
        let sent = async {
            fork::connect(&clone_qmp, &src_qmp).await?;
            fork::send(
                &src_qmp,
                || async {
                    match faults::point("clone:paused") {
                        Fault::KillSourceQemu => kill_qemu(source_pid),
                        Fault::KillCloneQemu => kill_qemu(Some(pid)),
                        Fault::None | Fault::NoAnswer => {}
                    }
                    fork::switch_disk(&src_qmp, DISK_DEVICE, next).await?;
                    faults::point("clone:switched");
                    Ok(())
                },
                fork::Then::Resume,
            )
            .await
        }
        .await;
        self.settle_next_disk(src, Some(&src_qmp)).await;
        drop(layers_guard);
        let sent = sent.map_err(|e| errors::from_vmm("copy the VM's memory", e))?;
        timings.source_paused_ms = Some(ms(sent.paused));
        self.wake_clone(&clone_qmp).await?;
        timings.memory_ms = Some(ms(sent.total));
        Ok((pid, clone_qmp))
    }

    /// An instant fork: nothing of the source's memory is copied. The source's RAM, a memfd
    /// its QEMU maps shared, is sealed while the source is stopped, and two new QEMUs map it
    /// copy-on-write: the clone, and the source's successor, which takes over the source's
    /// tap, sockets, pid and cgroup and becomes the VM (see `nook_vmm::ram`). Only the device
    /// state (a few hundred KB) goes over a stream.
    ///
    /// Crash safety: the successor's runtime files keep staged names, and its pidfile is
    /// renamed over the VM's last; until then the old QEMU is the VM, after it the successor
    /// (a restarted daemon resumes whichever the pidfile names and ends every other QEMU of
    /// the VM). The old QEMU, stopped, is ended only once the successor runs; it can never
    /// run again, as both would write the same disk.
    #[allow(clippy::too_many_arguments)]
    async fn fork_shared(
        self: &Arc<Self>,
        src: &VmRecord,
        clone: &VmRecord,
        image: &Image,
        next: &std::path::Path,
        ram: GuestRam,
        layers_guard: tokio::sync::MutexGuard<'_, ()>,
        timings: &mut CloneTimings,
        progress: Progress<'_>,
    ) -> Result<(u32, Qmp), CloneError> {
        let src_paths = self.paths(&src.id);
        let src_qmp = self.live_qmp(src)?;
        let source_pid = self.qemu_pid(&src.id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is not running", src.name),
            )
        })?;
        let tap = self.tap_of(source_pid)?;
        progress("starting the clone's QEMU and the source's next one");
        let quiet = |_: &str| {};
        let successor = Launch::Successor {
            shares: Some(ram.clone()),
            tap,
            disk: next.to_path_buf(),
        };
        let for_clone = Launch::Fork {
            shared: Some(ram.clone()),
        };
        let (successor, launched) = tokio::join!(
            self.launch(src, image, successor, &quiet),
            self.launch(clone, image, for_clone, progress)
        );
        if let Ok(l) = &launched {
            self.adopt(clone, l.qmp.clone(), None, None);
        }
        let connected = match &launched {
            Ok(_) => Some(self.connect_clone_agent(clone).await),
            Err(_) => None,
        };
        let (successor, launched) = match (successor, launched, connected) {
            (Ok(s), Ok(l), Some(Ok(()))) => (s, l),
            (successor, launched, connected) => {
                if let Ok(s) = successor {
                    end_successor(&src_paths, s.pid);
                }
                self.settle_next_disk(src, Some(&src_qmp)).await;
                let err = match (launched, connected) {
                    (Err(err), _) | (_, Some(Err(err))) => Some(err),
                    _ => None,
                };
                let err = err.unwrap_or_else(|| {
                    ApiError::new(
                        ErrorCode::Internal,
                        format!("could not start the next QEMU of VM '{}'", src.name),
                    )
                });
                return Err(err.into());
            }
        };
        let (clone_pid, clone_qmp) = (launched.pid, launched.qmp);
        progress("forking the memory");
        let paused_at = std::sync::OnceLock::new();
        let busy = std::sync::atomic::AtomicBool::new(false);
        let held = std::sync::Mutex::new(None);
        let connecting = self.no_new_agent_connections(&src.id).await;
        let next_agent = self.connect_next_agent(&src.id).await;
        let sent = fork::send_shared(&src_qmp, &successor.qmp, &clone_qmp, || async {
            let _ = paused_at.set(Instant::now());
            let Some(hold) = self.hold_agent(&src.id, &connecting).await else {
                busy.store(true, Ordering::SeqCst);
                return Err(nook_vmm::VmmError::Qmp(
                    "a process started in the source during the fork".into(),
                ));
            };
            *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
            ram.seal()?;
            match faults::point("clone:paused") {
                Fault::KillSourceQemu => kill_qemu(Some(source_pid)),
                Fault::KillCloneQemu => kill_qemu(Some(clone_pid)),
                Fault::None | Fault::NoAnswer => {}
            }
            Ok(())
        })
        .await;
        if let Err(err) = sent {
            // The source runs on in its own QEMU (`send_shared` let it go); its RAM may be
            // sealed now, so its next fork copies. Its agent connection goes on at once.
            drop(held.lock().unwrap_or_else(|p| p.into_inner()).take());
            end_successor(&src_paths, successor.pid);
            self.settle_next_disk(src, Some(&src_qmp)).await;
            drop(layers_guard);
            self.forget_sealed_ram(&src.id);
            if busy.load(Ordering::SeqCst) {
                // Forked again (the source's RAM was not sealed).
                return Err(CloneError::SourceBusy);
            }
            return Err(errors::from_vmm("fork the VM's memory", err).into());
        }
        let sent = sent.unwrap_or_default();

        let successor_qmp = successor.qmp.clone();
        let hold = held.lock().unwrap_or_else(|p| p.into_inner()).take();
        let paused = match self
            .take_over(
                src,
                &src_qmp,
                source_pid,
                successor,
                hold,
                next_agent,
                "clone:switched",
            )
            .await
        {
            Ok(running) => paused_at
                .get()
                .map(|at| running.duration_since(*at))
                .unwrap_or_default(),
            Err(err) => {
                self.settle_next_disk(src, Some(&src_qmp)).await;
                drop(layers_guard);
                self.forget_sealed_ram(&src.id);
                return Err(err.into());
            }
        };
        self.settle_next_disk(src, Some(&successor_qmp)).await;
        drop(layers_guard);
        tracing::info!(vm = %src.name, paused_ms = ms(paused), "the VM runs in its next QEMU, sharing its memory with its clone");
        timings.source_paused_ms = Some(ms(paused));
        self.wake_clone(&clone_qmp).await?;
        timings.memory_ms = Some(ms(sent.total));
        Ok((clone_pid, clone_qmp))
    }

    /// Connects to a clone's guest agent as soon as its QEMU has started, before it takes the
    /// source's state. The agent in the source had a host on its port: connected before the
    /// load, the clone's port never goes without one, so the agent never notices the change
    /// of QEMU, and output the source's QEMU was part-way through sending is sent on (into a
    /// port with no host, QEMU would hold it back for good).
    async fn connect_clone_agent(&self, clone: &VmRecord) -> Result<(), ApiError> {
        let agent = AgentClient::connect(&self.paths(&clone.id).agent_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to the clone's guest agent", e))?;
        self.keep_agent(&clone.id, agent);
        Ok(())
    }

    /// Lets a clone that holds all of its state run (its agent connected since its launch).
    async fn wake_clone(&self, clone_qmp: &Qmp) -> Result<(), ApiError> {
        fork::finish(clone_qmp)
            .await
            .map_err(|e| errors::from_vmm("restore the clone", e))
    }

    /// After a fork that sealed the VM's RAM and failed: its RAM cannot be forked again, so
    /// it moves into RAM of its own (and a fork meanwhile copies).
    fn forget_sealed_ram(self: &Arc<Self>, id: &str) {
        let forgot = self.with_live(id, |live| {
            let sealed = live.ram.as_ref().is_some_and(GuestRam::is_sealed);
            if sealed {
                live.ram = None;
            }
            sealed
        });
        if forgot == Some(true) {
            self.rehome_later(id);
        }
    }
    /// Copies `src`'s nook SSH key to `clone`, when it has one (an image without sshd has
    /// none). The key file keeps its 0600 mode (`fs::copy` copies permissions).
    fn share_ssh_key(&self, src: &VmRecord, clone: &VmRecord) {
        let (from, to) = (self.paths(&src.id).dir, self.paths(&clone.id).dir);
        for name in [RELAY_KEY.to_string(), format!("{RELAY_KEY}.pub")] {
            if let Err(e) = std::fs::copy(from.join(&name), to.join(&name))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(vm = %clone.name, error = %e, "cannot share the source's SSH key; making a new one");
            }
        }
    }

    /// The QMP connection of a running VM this daemon supervises.
    pub(super) fn live_qmp(&self, vm: &VmRecord) -> Result<Qmp, ApiError> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm.id)
            .map(|l| l.qmp.clone())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotRunning,
                    format!("VM '{}' is not running", vm.name),
                )
            })
    }

    /// Finishes or undoes moving `vm` onto `disk.next.qcow2`: renamed over `disk.qcow2` when
    /// the VM's QEMU (the one its pidfile names) writes to it or (QEMU gone) when it sits on
    /// the old top, else removed.
    pub(super) async fn settle_next_disk(&self, vm: &VmRecord, qmp: Option<&Qmp>) {
        let paths = self.paths(&vm.id);
        let (next, disk) = (paths.dir.join(NEXT_DISK), paths.disk());
        if !next.exists() {
            return;
        }
        // Whether QEMU holds the file open: its name for its top says nothing for a fork's
        // successor, which opens its top through a descriptor (`/proc/self/fd/N`). QEMU's
        // name is the answer only where its descriptors cannot be read.
        let in_use = match qmp.filter(|q| !q.is_closed()) {
            Some(qmp) => match self
                .qemu_pid(&vm.id)
                .and_then(|pid| nook_vmm::qemu::holds_file(pid, &next))
            {
                Some(held) => Some(held),
                None => match fork::disk_top(qmp, DISK_DEVICE).await {
                    Ok((_, file)) => Some(file == next.display().to_string()),
                    Err(_) => None,
                },
            },
            None => None,
        };
        let keep = in_use.unwrap_or_else(|| same_file_backs(&next, &disk));
        let outcome = if keep {
            std::fs::rename(&next, &disk)
        } else {
            std::fs::remove_file(&next)
        };
        match outcome {
            Ok(()) if keep => {
                tracing::info!(vm = %vm.name, "the VM's disk now sits on a new layer");
                // The old top is a layer now, which the clone reads: the uid that wrote it
                // owns it no more (QEMU itself reopened it read-only when it moved on).
                if nix::unistd::geteuid().is_root()
                    && let Ok(Some(layer)) = layers::backing_file(&disk)
                    && let Err(err) = freeze_ownership(&layer)
                {
                    tracing::error!(vm = %vm.name, layer = %layer.display(), %err, "could not make the new layer root's");
                }
            }
            Ok(()) => tracing::info!(vm = %vm.name, "dropped an unused new disk top"),
            Err(err) => {
                tracing::error!(vm = %vm.name, %err, "could not settle the VM's new disk top")
            }
        }
    }

    /// Deletes the layers no VM's disk reaches any more.
    pub(super) async fn collect_layers(&self) {
        let _guard = self.layers_lock.lock().await;
        let mut tops = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.cfg.vms_dir()) {
            for entry in entries.flatten() {
                tops.push(entry.path().join("disk.qcow2"));
                tops.push(entry.path().join(NEXT_DISK));
            }
        }
        tops.extend(self.replica_tops());
        let layer_store = self.layers.clone();
        match tokio::task::spawn_blocking(move || layer_store.collect(&tops)).await {
            Ok(Ok(removed)) if !removed.is_empty() => {
                tracing::info!(count = removed.len(), "deleted disk layers no VM uses")
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!(%err, "collecting unused disk layers failed"),
            Err(err) => tracing::warn!(%err, "collecting unused disk layers failed"),
        }
    }

    pub(super) fn flatten_later(self: &Arc<Self>, id: &str) {
        let (this, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            if let Err(err) = this.flatten(&id).await {
                tracing::warn!(vm = id, error = %err.message, "flattening a disk chain failed; it stays deep");
            }
        });
    }

    /// Merges a VM's layers into its top once there are more than [`MAX_LAYERS`], so chains of
    /// clones of clones stay short; then collects the layers nobody needs any more.
    async fn flatten(&self, id: &str) -> Result<(), ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let Ok(vm) = self.store.get_by_id(id).await else {
            return Ok(());
        };
        let disk = self.paths(id).disk();
        // Root's qemu-img rebase below follows the chain, so it must be one nook made.
        let chain = self.trusted_chain(&vm).await?;
        let depth = chain.iter().filter(|f| self.layers.contains(f)).count();
        let Some(base) = chain.last().filter(|_| depth > MAX_LAYERS).cloned() else {
            return Ok(());
        };
        tracing::info!(vm = %vm.name, depth, "flattening a deep disk chain");
        match vm.state {
            VmState::Running => {
                let qmp = self.live_qmp(&vm)?;
                fork::stream_to_base(&qmp, DISK_DEVICE, &base)
                    .await
                    .map_err(|e| errors::from_vmm("flatten the disk", e))?;
            }
            VmState::Stopped | VmState::Failed => {
                let rebased =
                    tokio::task::spawn_blocking(move || nook_storage::disk::rebase(&disk, &base))
                        .await;
                map_join(rebased, "flatten the disk")?
                    .map_err(|e| errors::from_storage("flatten the disk", e))?;
            }
            _ => return Ok(()),
        }
        self.collect_layers().await;
        Ok(())
    }
}

/// Makes a frozen layer root's and read-only to everyone.
pub(super) fn freeze_ownership(layer: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(layer, Some(0), Some(0))?;
    std::fs::set_permissions(layer, std::fs::Permissions::from_mode(0o644))
}

/// Whether `next`'s backing file is the same file as `disk`: the new top was made for it.
fn same_file_backs(next: &std::path::Path, disk: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(Some(backing)) = layers::backing_file(next) else {
        return false;
    };
    match (std::fs::metadata(backing), std::fs::metadata(disk)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        // The old top is only a layer now: the new top is all the VM has.
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

/// The first line of `console` with one of [`KERNEL_TROUBLE`].
fn kernel_trouble(console: &str) -> Option<&str> {
    console
        .lines()
        .find(|line| KERNEL_TROUBLE.iter().any(|m| line.contains(m)))
        .map(str::trim)
}

pub(super) fn kill_qemu(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_trouble;

    #[test]
    fn kernel_trouble_finds_a_warning_banner_and_not_an_ordinary_console() {
        let woke_broken = "[    5.4] random: crng reseeded due to virtual machine fork\n\
                           [    5.42] ------------[ cut here ]------------\n\
                           [    5.42] WARNING: CPU: 0 PID: 0 at kernel/context_tracking.c:128\n";
        assert_eq!(
            kernel_trouble(woke_broken),
            Some("[    5.42] ------------[ cut here ]------------")
        );
        let panicked = "[    7.19] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(kernel_trouble(panicked).is_some());
        let fine = "[    6.3] random: crng reseeded due to virtual machine fork\n\
                    nook-agent: eth0 now has MAC 02:6e:6b:00:00:01\n\
                    nook-agent: this machine was VM a and is now VM b: renewing its identity\n";
        assert_eq!(kernel_trouble(fine), None);
    }
}
