//! Settling every VM after a daemon start: re-adopting live QEMUs, finishing or undoing
//! what a crash interrupted, and removing what no row owns.

use super::*;

/// A VM has one QEMU, the one its pidfile names. Another was cut short in an instant fork
/// (see `clone.rs`): a successor that never took over, or the stopped QEMU a successor
/// replaced. Either is ended: the successor holds nothing yet, and the old QEMU must never
/// run again.
fn end_other_qemus(vm: &VmRecord, paths: &VmPaths, qemus: &[u32], pid: Option<u32>) {
    for &other in qemus {
        if Some(other) != pid {
            tracing::warn!(vm = %vm.name, pid = other, "ending a QEMU of the VM that a fork cut short");
            clone::kill_qemu(Some(other));
        }
    }
    paths.discard_successor();
}

impl Manager {
    /// Settles every VM after a daemon start: re-adopts live QEMUs, finishes or undoes
    /// operations a crash interrupted, and removes leftovers no row owns.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        // With a shared store, other hosts' VMs are in it too: settle only this host's.
        let vms = if self.store.is_shared() {
            self.store.list_on_host(&self.cfg.host_name).await
        } else {
            self.store.list().await
        }
        .map_err(|e| errors::from_store("list VMs", e))?;
        let qemu = Qemu {
            binary: PathBuf::new(),
        };
        let qemus = nook_vmm::qemu::qemus_by_vm();
        for vm in &vms {
            let paths = self.paths(&vm.id);
            let pid = nook_vmm::qemu::read_pid(&paths.pidfile())
                .ok()
                .filter(|pid| qemu.is_running(*pid, &paths));
            let of_vm = qemus.get(&vm.id).map(Vec::as_slice).unwrap_or_default();
            end_other_qemus(vm, &paths, of_vm, pid);
            match (vm.state, pid) {
                (VmState::Creating, _) => {
                    tracing::warn!(vm = %vm.name, "removing a VM whose creation was interrupted");
                    self.destroy(vm).await;
                }
                (VmState::Running | VmState::Starting | VmState::Stopping, Some(pid)) => {
                    // Another host may have taken the VM over while this daemon was down.
                    if let Err(err) = self.take_lease(vm).await {
                        if err.code != ErrorCode::Busy {
                            // The store could not say: the VM keeps running, unadopted, and the
                            // daemon does not start (a restart retries).
                            return Err(err);
                        }
                        tracing::error!(vm = %vm.name, error = %err.message, "not re-adopting a VM this host no longer holds; stopping it");
                        self.halt(vm, false).await;
                        // Only while the row still names this host: the host holding the
                        // lease may have restored the VM and owns the row now.
                        let reason = format!("stopped here: {}", err.message);
                        if let Err(e) = self
                            .store
                            .set_state_on(
                                &vm.id,
                                &self.cfg.host_name,
                                VmState::Stopped,
                                Some(&reason),
                            )
                            .await
                        {
                            tracing::error!(vm = %vm.name, error = %e, "could not record its lease's loss");
                        }
                        continue;
                    }
                    // The lease is this host's again: if the fence watch stopped the QEMU while
                    // the daemon was down, it goes on (QMP would not answer before).
                    self.resume_from_watch(&vm.id);
                    match Qmp::connect(&paths.qmp_socket()).await {
                        Ok(qmp) => {
                            tracing::info!(vm = %vm.name, pid, "re-adopted running VM");
                            nook_vmm::console::follow(&paths);
                            if let Err(err) = nook_vmm::qemu::follow_stderr(pid, &paths) {
                                tracing::warn!(vm = %vm.name, %err, "cannot read a re-adopted QEMU's stderr; what it says is lost");
                            }
                            // A clone the crash interrupted may have left it paused.
                            nook_vmm::fork::resume(&qmp).await;
                            self.settle_next_disk(vm, Some(&qmp)).await;
                            if let Err(err) = self.confine(vm, pid).await {
                                tracing::warn!(vm = %vm.name, error = %err.message, "could not confine a re-adopted VM");
                            }
                            let agent = AgentClient::connect(&paths.agent_socket()).await.ok();
                            // The VM's own RAM, if a fork may still share it (a fork's, which
                            // it maps copy-on-write, is sealed: its next fork copies).
                            let ram = nook_vmm::GuestRam::of_qemu(pid);
                            let forked = ram.as_ref().is_some_and(nook_vmm::GuestRam::is_sealed);
                            let ram = ram.filter(|_| !forked);
                            let own_ram = ram.is_some();
                            self.adopt(vm, qmp, agent, ram);
                            // What the restart cut short goes on: a forked VM's move into
                            // memory of its own, and the give-back of the zero pages a copy
                            // filled in.
                            if forked {
                                self.rehome_later(&vm.id);
                            }
                            let give_back = paths.dir.join(successor::GIVE_BACK_PENDING);
                            if own_ram && give_back.exists() {
                                self.give_back_zero_pages_later(&vm.id);
                            } else {
                                let _ = std::fs::remove_file(give_back);
                            }
                            self.record_state_or_log(
                                &vm.name,
                                &vm.id,
                                VmState::Running,
                                None,
                                Some(pid),
                                "its re-adoption after a restart",
                            )
                            .await;
                        }
                        Err(err) => {
                            tracing::warn!(vm = %vm.name, %err, "cannot reach a running VM's QMP; stopping it");
                            self.halt(vm, false).await;
                            let reason = "QEMU was unreachable after a daemon restart";
                            self.record_state_or_log(
                                &vm.name,
                                &vm.id,
                                VmState::Failed,
                                Some(reason),
                                None,
                                "that its QEMU was unreachable after a restart",
                            )
                            .await;
                        }
                    }
                }
                (VmState::Running | VmState::Starting | VmState::Stopping, None) => {
                    self.settle_next_disk(vm, None).await;
                    self.release_runtime(&vm.id, vm.slot, &vm.owner).await;
                    let (state, reason) = if vm.state == VmState::Stopping {
                        (VmState::Stopped, None)
                    } else {
                        (
                            VmState::Failed,
                            Some("QEMU exited while the nook daemon was down"),
                        )
                    };
                    self.record_state_or_log(
                        &vm.name,
                        &vm.id,
                        state,
                        reason,
                        None,
                        "that its QEMU exited while the daemon was down",
                    )
                    .await;
                }
                // (Only ever shown, never stored.)
                (VmState::Stopped | VmState::Failed | VmState::Unavailable, _) => {
                    if pid.is_some() {
                        self.halt(vm, false).await;
                    }
                    self.settle_next_disk(vm, None).await;
                }
            }
        }
        self.remove_orphans(&vms).await;
        self.collect_layers().await;
        Ok(())
    }

    pub(super) async fn remove_orphans(&self, known: &[VmRecord]) {
        let Ok(entries) = std::fs::read_dir(self.cfg.vms_dir()) else {
            return;
        };
        let qemu = Qemu {
            binary: PathBuf::new(),
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if known.iter().any(|vm| vm.id == id) {
                // Arrived and recorded here; the daemon stopped before the marker went.
                let _ = std::fs::remove_file(entry.path().join(migrate::ARRIVING));
                continue;
            }
            // Only a directory whose row is gone is an orphan. A row that names another host
            // (this host was renamed, or two hosts share a name) keeps its disk: deleting it
            // would lose the VM. An unreadable store proves nothing either. A VM that was
            // still arriving when this daemon stopped, whose row names another host, never
            // became this host's (the hand-over names this host in the row before the marker
            // goes), so what came of it goes.
            let arriving = entry.path().join(migrate::ARRIVING).exists();
            match self.store.get_by_id(&id).await {
                Err(nook_store::StoreError::NotFound(_)) => {}
                Ok(vm) if arriving && vm.host != self.cfg.host_name => {
                    tracing::warn!(vm = %vm.name, from = %vm.host, "a move here was cut short by a restart; removing what came");
                }
                Ok(vm) => {
                    tracing::error!(
                        vm = %vm.name,
                        recorded_host = %vm.host,
                        host = %self.cfg.host_name,
                        "a VM's disk is on this host but its row names another host; leaving it alone (was --host-name changed?)"
                    );
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%err, dir = %id, "cannot tell whether a VM directory is an orphan; leaving it");
                    continue;
                }
            }
            let paths = self.paths(&id);
            if let Ok(pid) = nook_vmm::qemu::read_pid(&paths.pidfile()) {
                nook_vmm::qemu::kill(&qemu, pid, &paths);
            }
            tracing::warn!(dir = %paths.dir.display(), "removing a VM directory no VM owns");
            let _ = std::fs::remove_dir_all(&paths.dir);
        }
        if let Net::Tap(_) = &self.net
            && let Ok(taps) = nook_net::taps_present()
        {
            let live: Vec<String> = self
                .store
                .list()
                .await
                .unwrap_or_default()
                .iter()
                .filter(|vm| {
                    matches!(
                        vm.state,
                        VmState::Running | VmState::Starting | VmState::Stopping
                    )
                })
                .filter_map(|vm| VmLink::for_slot(vm.slot).ok().map(|l| l.tap))
                .collect();
            for tap in taps.into_iter().filter(|t| !live.contains(t)) {
                let slot = tap.trim_start_matches(nook_net::TAP_PREFIX).parse::<u32>();
                if let (Net::Tap(host), Ok(Ok(link))) = (&self.net, slot.map(VmLink::for_slot)) {
                    tracing::warn!(tap, "removing a tap no running VM owns");
                    let _ = host.remove_vm(&link);
                }
            }
        }
    }
}

/// Removes the empty groups of VMs and accounts that are gone. Groups still holding a QEMU
/// (a VM about to be re-adopted) refuse removal and stay.
pub(super) fn sweep_cgroups(cg: &nook_cgroup::Cgroups) {
    for account in cg.list_accounts().unwrap_or_default() {
        for vm in cg.list_vms(&account).unwrap_or_default() {
            let _ = cg.remove_vm(&account, &vm);
        }
        let _ = cg.remove_account(&account);
    }
}
