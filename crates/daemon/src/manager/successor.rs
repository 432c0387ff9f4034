//! A running VM changing QEMU on this host: a successor QEMU starts beside the VM's, takes its
//! state, and takes over the VM (its tap, sockets, pidfile, cgroup and row) while the old
//! QEMU is stopped, which then ends.
//!
//! Two things do this: an instant fork (`clone.rs`), whose successor maps the VM's sealed RAM
//! copy-on-write, and the move of a VM whose RAM is such a mapping into RAM of its own
//! ([`Manager::rehome`]), so that its next fork can be instant too.
//!
//! Crash safety: the successor's runtime files keep staged names, and its pidfile is renamed
//! over the VM's last. Until then the old QEMU is the VM; after it, the successor. A restarted
//! daemon resumes whichever the pidfile names and ends every other QEMU of the VM
//! (`recovery.rs`). The old QEMU, stopped, is ended once the successor runs, and never runs
//! again: both would write the same disk.

use super::*;
use crate::faults;
use clone::kill_qemu;
use launch::run_status;
use nook_vmm::fork;

/// A VM's agent connection held still while the VM changes QEMU (see [`nook_vmm::Held`]),
/// and new connections to it kept off. Dropped, it goes on as it was (the change was called
/// off); [`Manager::take_over`] moves it to the next QEMU.
pub(super) struct AgentHold {
    held: Option<nook_vmm::Held>,
    /// No new connection to the agent meanwhile: it would reach the old QEMU.
    _connecting: tokio::sync::OwnedMutexGuard<()>,
}

/// How long a VM about to change QEMU waits for its QEMU to read what was sent to its agent.
const AGENT_DRAIN: Duration = Duration::from_millis(500);

/// Ends a successor QEMU that never took over, and what it left.
pub(super) fn end_successor(paths: &VmPaths, pid: u32) {
    kill_qemu(Some(pid));
    paths.discard_successor();
}

impl Manager {
    /// Hands `vm` to `successor`, which holds all of its state, paused, while the old QEMU
    /// (`old_pid`, reached at `old_qmp`) is stopped: the successor's files take the VM's names
    /// (the pidfile last), it runs, the old QEMU ends, and the store records the successor's
    /// pid. `fault` names the fault point between the old QEMU's end and that record. The
    /// agent connection `hold` holds moves with the VM to `next_agent`, the connection to the
    /// successor's agent made before the successor took the VM's state
    /// ([`Manager::connect_next_agent`]): the guest never finds its host gone, and processes
    /// streaming through the agent keep their streams. Returns when the successor was told to
    /// run (where the VM's pause ended). On an error the successor is ended and the old QEMU
    /// goes on.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn take_over(
        self: &Arc<Self>,
        vm: &VmRecord,
        old_qmp: &Qmp,
        old_pid: u32,
        successor: Launched,
        hold: Option<AgentHold>,
        next_agent: Option<nook_vmm::NextConnection>,
        fault: &str,
    ) -> Result<Instant, ApiError> {
        let paths = self.paths(&vm.id);
        let old = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm.id)
            .map(|l| (l.intended_exit.clone(), l.booted));
        // The old QEMU's end is the daemon's doing, not a crash.
        if let Some((intended_exit, _)) = &old {
            intended_exit.store(true, Ordering::SeqCst);
        }
        if let Err(e) = paths.promote_successor() {
            end_successor(&paths, successor.pid);
            if let Some((intended_exit, _)) = &old {
                intended_exit.store(false, Ordering::SeqCst);
            }
            fork::resume(old_qmp).await;
            return Err(io_error("hand the VM to its next QEMU", e));
        }
        let resumed = successor.qmp.execute("cont", None).await;
        let running = Instant::now();
        kill_qemu(Some(old_pid));
        faults::point(fault);
        if let Err(e) = self
            .store
            .set_state(&vm.id, VmState::Running, None, Some(successor.pid))
            .await
        {
            tracing::error!(vm = %vm.name, error = %e, "could not record the VM's next QEMU; a restart finds it by its pidfile");
        }
        nook_vmm::console::follow(&paths);
        let (agent, reconnect) = match (hold.and_then(|h| h.held), next_agent) {
            (Some(held), Some(next)) if !held.client().is_closed() => {
                let agent = held.client().clone();
                held.switch(next);
                (Some(agent), false)
            }
            // No connection to move, or none made to the successor: a new one is made, and
            // what streamed through the old one has ended, as in a move between hosts. (A
            // connection made to the successor but unused is dropped here: QEMU serves one
            // at a time.)
            (Some(held), _) => {
                held.close();
                (None, true)
            }
            (None, _) => (None, true),
        };
        self.adopt(vm, successor.qmp.clone(), agent, successor.ram);
        self.set_booted(&vm.id, old.is_some_and(|(_, booted)| booted));
        if let Err(err) = resumed {
            tracing::error!(vm = %vm.name, %err, "the VM's next QEMU would not run");
        }
        if reconnect {
            let (this, vm) = (self.clone(), vm.clone());
            tokio::spawn(async move { this.reconnect_agent(&vm).await });
        }
        Ok(running)
    }

    /// A copy of the tap QEMU `pid` holds, for its successor (None with user networking).
    pub(super) fn tap_of(&self, pid: u32) -> Result<Option<Arc<std::os::fd::OwnedFd>>, ApiError> {
        match &self.net {
            Net::Tap(_) => Qemu::take_tap(pid)
                .map(|tap| Some(Arc::new(tap)))
                .map_err(|e| errors::from_vmm("hand the VM's network to its next QEMU", e)),
            Net::User => Ok(None),
        }
    }

    fn live_agent(&self, id: &str) -> Option<AgentClient> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|l| l.agent.clone())
    }

    /// For a change of QEMU, with the VM paused: holds its agent connection still (no new
    /// process, no frame written, nothing more read: see [`nook_vmm::Held`]), and new
    /// connections to it off, once QEMU has read all that was sent. Nothing then reaches the
    /// guest through the old QEMU after its state is taken, and the old QEMU takes nothing
    /// more from it. None when a process is being started or QEMU does not read: the change
    /// must wait. `connecting` is [`Manager::no_new_agent_connections`]'s, taken
    /// before the VM paused.
    pub(super) async fn hold_agent(
        &self,
        id: &str,
        connecting: &std::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
    ) -> Option<AgentHold> {
        let connecting = connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let Some(agent) = self.live_agent(id) else {
            return Some(AgentHold {
                held: None,
                _connecting: connecting,
            });
        };
        let held = agent.hold().await?;
        if !agent.drained(AGENT_DRAIN).await {
            return None;
        }
        Some(AgentHold {
            held: Some(held),
            _connecting: connecting,
        })
    }

    /// A connection to the agent of `id`'s successor QEMU (started, not yet holding the VM's
    /// state), for its agent connection to move to: made before the successor takes the
    /// state, so its port never goes without a host (see `connect_clone_agent` in
    /// `clone.rs`). None when the VM has no connection to move, or this one cannot be made
    /// (then the VM's connection ends with the change, and a new one is made). Call it with
    /// [`Manager::no_new_agent_connections`] held.
    pub(super) async fn connect_next_agent(&self, id: &str) -> Option<nook_vmm::NextConnection> {
        self.live_agent(id).filter(|a| !a.is_closed())?;
        match nook_vmm::NextConnection::connect(&self.paths(id).successor_agent_socket()).await {
            Ok(next) => Some(next),
            Err(err) => {
                tracing::warn!(vm = id, %err, "could not connect to the guest agent of the VM's next QEMU; what streams through its agent ends with the change");
                None
            }
        }
    }

    /// Waits for a connection being made to `id`'s agent, and keeps new ones off until
    /// [`Manager::hold_agent`]'s hold ends: for a change of QEMU, taken before the VM pauses.
    pub(super) async fn no_new_agent_connections(
        &self,
        id: &str,
    ) -> std::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>> {
        std::sync::Mutex::new(Some(self.agent_lock(id).lock_owned().await))
    }

    /// After an instant fork, moves `id` (the source or the clone) in the background into a
    /// QEMU with RAM of its own, so that its next fork is instant as well. Not while its
    /// agent connection cannot be held still (a process being started, or an upload the
    /// guest takes slower than it comes), so it tries again, within [`REHOME_PATIENCE`]. Only with `fork_memory = own`: `shared` keeps the
    /// two sharing their memory instead (their next forks copy).
    pub(super) fn rehome_later(self: &Arc<Self>, id: &str) {
        if self.cfg.fork_memory != crate::config::ForkMemory::Own {
            return;
        }
        let (this, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            let deadline = Instant::now() + REHOME_PATIENCE;
            while Instant::now() < deadline {
                // A move its agent connection could not be held still for is called off only
                // after the memory was copied: not started at all while it looks busy.
                if this.live_agent(&id).is_some_and(|a| a.looks_busy()) {
                    tokio::time::sleep(REHOME_RETRY).await;
                    continue;
                }
                match this.rehome(&id).await {
                    Ok(Rehomed::Done | Rehomed::NotNeeded) => return,
                    Ok(Rehomed::Busy) => {}
                    Err(err) => {
                        tracing::warn!(vm = id, error = %err.message, "could not give a forked VM memory of its own; its next fork copies");
                    }
                }
                tokio::time::sleep(REHOME_RETRY).await;
            }
            tracing::info!(
                vm = id,
                "a forked VM's guest agent stayed busy; its next fork copies"
            );
        });
    }

    /// Moves the running VM `id`, whose QEMU maps another's sealed RAM, live into a successor
    /// with RAM of its own: its memory is copied over while it runs (a precopy), and it is
    /// paused only for the last pages and the hand-over.
    async fn rehome(self: &Arc<Self>, id: &str) -> Result<Rehomed, ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let Ok(vm) = self.store.get_by_id(id).await else {
            return Ok(Rehomed::NotNeeded);
        };
        let has_ram = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.ram.is_some());
        if vm.state != VmState::Running || has_ram != Some(false) {
            return Ok(Rehomed::NotNeeded);
        }
        // Only a fork's QEMU (mapping a sealed memfd) moves; one with QEMU's own RAM
        // (`fork_memory = copy`) stays as it is.
        let forked = self
            .qemu_pid(id)
            .and_then(nook_vmm::GuestRam::of_qemu)
            .is_some_and(|r| r.is_sealed());
        if !forked {
            return Ok(Rehomed::NotNeeded);
        }
        let started = Instant::now();
        let image = self.image_of(&vm)?;
        let paths = self.paths(id);
        let old_qmp = self.live_qmp(&vm)?;
        let Some(old_pid) = self.qemu_pid(id) else {
            return Ok(Rehomed::NotNeeded);
        };
        let tap = self.tap_of(old_pid)?;
        let quiet = |_: &str| {};
        let how = Launch::Successor {
            shares: None,
            tap,
            disk: paths.disk(),
        };
        let successor = self.launch(&vm, &image, how, &quiet).await?;
        let busy = AtomicBool::new(false);
        let held = std::sync::Mutex::new(None);
        let connecting = self.no_new_agent_connections(id).await;
        let next_agent = self.connect_next_agent(id).await;
        let sent = async {
            fork::connect(&successor.qmp, &old_qmp).await?;
            // Paused for the last pages: a process started through the agent meanwhile
            // calls the move off.
            let sent = fork::send(
                &old_qmp,
                || async {
                    let Some(hold) = self.hold_agent(id, &connecting).await else {
                        busy.store(true, Ordering::SeqCst);
                        return Err(nook_vmm::VmmError::Qmp(
                            "a process is being started in the VM".into(),
                        ));
                    };
                    *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
                    Ok(())
                },
                fork::Then::StayPaused,
            )
            .await?;
            fork::received(&successor.qmp).await?;
            Ok::<_, nook_vmm::VmmError>(sent)
        }
        .await;
        let sent = match sent {
            Ok(sent) => sent,
            Err(err) => {
                // The agent connection goes on at once, not after the clean-up.
                drop(held.lock().unwrap_or_else(|p| p.into_inner()).take());
                end_successor(&paths, successor.pid);
                fork::resume(&old_qmp).await;
                if busy.load(Ordering::SeqCst) {
                    return Ok(Rehomed::Busy);
                }
                return Err(errors::from_vmm("copy the VM's memory", err));
            }
        };
        let paused_from = Instant::now() - sent.paused;
        let hold = held.lock().unwrap_or_else(|p| p.into_inner()).take();
        let running = self
            .take_over(
                &vm,
                &old_qmp,
                old_pid,
                successor,
                hold,
                next_agent,
                "rehome:switched",
            )
            .await?;
        tracing::info!(
            vm = %vm.name,
            secs = started.elapsed().as_secs_f64(),
            paused_ms = running.duration_since(paused_from).as_millis() as u64,
            "the VM has memory of its own again: its next fork is instant"
        );
        self.give_back_zero_pages_later(id);
        Ok(Rehomed::Done)
    }

    /// After a live copy of `id`'s memory into a memfd of its own, gives back the pages the
    /// copy filled with zeros (every page the guest never touched: see
    /// `GuestRam::punch_zero_pages`). Without this a forked 1 GiB tiny VM held 1 GiB of host
    /// memory after its move, against 114 MiB before the fork. A punch must not race the
    /// guest's writes, so the VM is paused for each slice of its memory that holds zero pages,
    /// in turn and under its lock (a `cp` or a move waits one slice at most, and one that
    /// changes its QEMU or shares its memory ends this).
    ///
    /// One give-back runs per VM: another copy meanwhile has it go over the memory again once
    /// it ends. [`GIVE_BACK_PENDING`] in the VM's directory says one is due, so a daemon that
    /// restarts before it ends starts it again (`recover`).
    pub(super) fn give_back_zero_pages_later(self: &Arc<Self>, id: &str) {
        let marker = self.paths(id).dir.join(GIVE_BACK_PENDING);
        {
            let mut pending = self.give_backs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(again) = pending.get_mut(id) {
                *again = true;
                return;
            }
            pending.insert(id.to_string(), false);
            if let Err(err) = std::fs::write(&marker, b"") {
                tracing::warn!(vm = id, %err, "cannot note a pending give-back of zero pages; a restart before it ends forgets it");
            }
        }
        let (this, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            loop {
                // Not at once: the moments after a `cp` are when its user connects to the
                // clone, and the scans and pauses slowed that (`bench/clone_ssh.sh`).
                tokio::time::sleep(GIVE_BACK_DELAY).await;
                this.give_back_zero_pages(&id).await;
                let mut pending = this.give_backs.lock().unwrap_or_else(|p| p.into_inner());
                match pending.get_mut(&id) {
                    Some(again) if *again => *again = false,
                    _ => {
                        pending.remove(&id);
                        // (Gone with the VM's directory if it was removed meanwhile.)
                        let _ = std::fs::remove_file(&marker);
                        return;
                    }
                }
            }
        });
    }

    async fn give_back_zero_pages(&self, id: &str) {
        let Some(ram) = self.own_ram(id) else {
            return;
        };
        let started = Instant::now();
        let name = match self.store.get_by_id(id).await {
            Ok(vm) => vm.name,
            Err(_) => id.to_string(),
        };
        match self.punch_zero_pages_in_slices(id, &ram).await {
            Ok(given) => tracing::info!(
                vm = name,
                given_mib = given.bytes >> 20,
                pauses = given.pauses,
                longest_pause_ms = given.longest_pause.as_millis() as u64,
                secs = started.elapsed().as_secs_f64(),
                "gave back the zero pages a copy of the VM's memory filled in"
            ),
            Err(why) => tracing::info!(
                vm = name,
                why,
                "stopped giving back zero pages of the VM's memory"
            ),
        }
    }

    /// The running VM's RAM when it is a memfd of its own that no fork shares.
    fn own_ram(&self, id: &str) -> Option<GuestRam> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(id)?.ram.clone().filter(|r| !r.is_sealed())
    }

    async fn punch_zero_pages_in_slices(
        &self,
        id: &str,
        ram: &GuestRam,
    ) -> Result<GivenBack, String> {
        let size = ram.size().map_err(|e| e.to_string())?;
        let mut given = GivenBack::default();
        let mut offset = 0;
        while offset < size {
            let slice = offset;
            offset += ZERO_PAGE_SLICE;
            // Looked at first while the guest runs: a slice with no zero pages costs no pause.
            let counted = ram.clone();
            let zeros = tokio::task::spawn_blocking(move || {
                counted.count_zero_pages(slice, ZERO_PAGE_SLICE)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            if zeros == 0 {
                continue;
            }
            let lock = self.op_lock(id);
            let guard = lock.lock().await;
            // Still the same QEMU on the same memory, which no fork shares.
            if !self.own_ram(id).is_some_and(|r| r.is(ram)) {
                return Err("the VM changed QEMU or shares its memory now".into());
            }
            let qmp = self.live_qmp_by_id(id).ok_or("the VM stopped")?;
            // Only a VM that runs: one a full disk, its lease or an admin paused stays as it
            // is, and is never let go on from here.
            if self.fleet.as_ref().is_some_and(|f| f.is_fenced(id)) {
                return Err("the VM's lease is being renewed".into());
            }
            if run_status(&qmp).await.as_deref() != Some("running") {
                return Err("the VM is not running".into());
            }
            qmp.execute("stop", None)
                .await
                .map_err(|e| format!("cannot pause it: {e}"))?;
            let paused = Instant::now();
            let punched_ram = ram.clone();
            let punched = tokio::task::spawn_blocking(move || {
                punched_ram.punch_zero_pages(slice, ZERO_PAGE_SLICE)
            })
            .await;
            // Let it go on unless something else stopped it meanwhile (a write that found the
            // disk full while QEMU paused: the full-disk watcher resumes it).
            let status = run_status(&qmp).await;
            if status.as_deref() == Some("paused")
                && let Err(err) = qmp.execute("cont", None).await
            {
                tracing::error!(vm = id, %err, "could not resume the VM after giving back its zero pages");
                return Err(format!("cannot resume it: {err}"));
            }
            given.pauses += 1;
            given.longest_pause = given.longest_pause.max(paused.elapsed());
            given.bytes += punched
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if status.as_deref() != Some("paused") {
                return Err(format!("the VM went from paused to {status:?}"));
            }
            drop(guard);
            tokio::time::sleep(ZERO_PAGE_GAP).await;
        }
        Ok(given)
    }
}

/// How much of a VM's memory is checked for zero pages in one pause, and how long it runs
/// between two pauses.
const ZERO_PAGE_SLICE: u64 = 32 << 20;
const ZERO_PAGE_GAP: Duration = Duration::from_millis(50);
/// How long after a copy its zero pages start to be given back.
const GIVE_BACK_DELAY: Duration = Duration::from_secs(10);
/// In a VM's directory while zero pages a copy filled in are still to be given back.
pub(super) const GIVE_BACK_PENDING: &str = "give-back-pending";

#[derive(Default)]
struct GivenBack {
    bytes: u64,
    pauses: u32,
    longest_pause: Duration,
}

/// How long after a fork a VM may wait for a moment when no process is being started through
/// its agent, to get memory of its own.
const REHOME_PATIENCE: Duration = Duration::from_secs(600);
const REHOME_RETRY: Duration = Duration::from_secs(2);

enum Rehomed {
    Done,
    /// It has memory of its own, or runs no more.
    NotNeeded,
    /// A process started through its agent; try again later.
    Busy,
}
