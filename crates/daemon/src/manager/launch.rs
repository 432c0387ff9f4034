//! Starting a VM's QEMU: the jail it runs in, the launch, the boot and the guest's
//! identity, and the supervision that follows it (`adopt`).

use super::*;

/// Why a QEMU starts.
#[derive(Debug, Clone)]
pub(super) enum Launch {
    /// A boot from the disk.
    Boot,
    /// A clone of a running VM on this host, waiting for its source's state: with `shared`,
    /// the source's sealed RAM, mapped copy-on-write (an instant fork); without, a RAM of its
    /// own that the source's memory is copied into.
    Fork { shared: Option<GuestRam> },
    /// A running VM's successor, which takes over its tap and opens the disk top `disk`, and
    /// waits (with its runtime files under their staged names) to take over the VM (see
    /// `successor.rs`). In an instant fork it `shares` the VM's sealed RAM copy-on-write;
    /// otherwise it has RAM of its own, which the VM's memory is copied into.
    Successor {
        shares: Option<GuestRam>,
        tap: Option<Arc<std::os::fd::OwnedFd>>,
        disk: PathBuf,
    },
    /// A running VM moving here from another host, waiting for its state.
    Arrival,
}

/// A QEMU just started.
pub(super) struct Launched {
    pub pid: u32,
    pub qmp: Qmp,
    /// Its RAM when it maps a memfd of its own shared: what an instant fork shares.
    pub ram: Option<GuestRam>,
}

/// How long after a fork, at most, the SSH relay tries a refused connection to its sshd again:
/// the restart takes about 0.2 s under TCG; the watch ends the wait once it listens.
const SSHD_RESTART_PATIENCE: Duration = Duration::from_secs(10);

/// Whether "ready" waits for the guest's sshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sshd {
    /// A boot: systemd starts sshd late, and "ready" includes SSH.
    WaitUntilUp,
    /// A fork: its sshd ran in the source and only restarts for the new host keys, a few
    /// hundred milliseconds under TCG that `cp` need not spend; for [`SSHD_RESTART_PATIENCE`]
    /// the SSH relay tries a refused connection to it again.
    Restarting,
}

impl Manager {
    /// Boots `vm`, retrying a boot that hangs before the kernel prints anything: a rare
    /// TCG hang that a fresh QEMU does not repeat.
    pub(super) async fn boot(
        self: &Arc<Self>,
        vm: &VmRecord,
        image: &Image,
        progress: Progress<'_>,
    ) -> Result<(), ApiError> {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            match self.boot_once(vm, image, progress).await {
                Err(BootError::SilentHang) if attempt < ATTEMPTS => {
                    tracing::warn!(vm = %vm.name, attempt, "guest printed nothing on its console; restarting QEMU");
                    progress("the guest hung early in boot; retrying");
                    self.halt(vm, false).await;
                }
                Err(BootError::SilentHang) => {
                    return Err(ApiError::new(
                        ErrorCode::GuestNotReady,
                        format!(
                            "VM '{}' hung early in boot {ATTEMPTS} times without printing anything",
                            vm.name
                        ),
                    ));
                }
                Err(BootError::Api(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Starts QEMU for `vm` once and waits for its agent. On error the caller tears down.
    pub(super) async fn boot_once(
        self: &Arc<Self>,
        vm: &VmRecord,
        image: &Image,
        progress: Progress<'_>,
    ) -> Result<(), BootError> {
        let started = Instant::now();
        let paths = self.paths(&vm.id);
        let Launched { pid, qmp, ram } = self.launch(vm, image, Launch::Boot, progress).await?;
        let agent = AgentClient::connect(&paths.agent_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to the guest agent", e))?;
        self.adopt(vm, qmp.clone(), Some(agent.clone()), ram);

        progress("waiting for the guest to boot");
        let timeout = self.cfg.ready_timeout;
        let ready = tokio::select! {
            r = agent.wait_ready(timeout) => r.map(|_| ()),
            () = qmp.closed() => Err(nook_vmm::VmmError::QmpClosed),
            () = silent_console(&paths, Duration::from_secs(15).min(timeout)) => return Err(BootError::SilentHang),
        };
        if let Err(err) = ready {
            let tail = paths.console_tail(25).await;
            let why = match err {
                nook_vmm::VmmError::Timeout(t) => {
                    format!("did not become ready within {}s", t.as_secs())
                }
                nook_vmm::VmmError::QmpClosed => "QEMU exited during boot".to_string(),
                other => format!("failed during boot ({other})"),
            };
            return Err(BootError::Api(ApiError::new(
                ErrorCode::GuestNotReady,
                format!("VM '{}' {why}. Last console lines:\n{tail}", vm.name),
            )));
        }
        self.identify(vm, &agent, Sshd::WaitUntilUp).await?;
        self.store
            .set_state(&vm.id, VmState::Running, None, Some(pid))
            .await
            .map_err(|e| errors::from_store("record the VM as running", e))?;
        if let Ok(running) = self.store.get_by_id(&vm.id).await {
            crate::integrations::sync_hosts(self, &running).await;
        }
        progress(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
        tracing::info!(vm = %vm.name, secs = started.elapsed().as_secs_f64(), "running");
        Ok(())
    }

    /// Starts QEMU for `vm` (paused, waiting for its state, unless it boots), connected to
    /// its network and confined to its account's cgroup; returns its pid and QMP connection.
    pub(super) async fn launch(
        &self,
        vm: &VmRecord,
        image: &Image,
        how: Launch,
        progress: Progress<'_>,
    ) -> Result<Launched, ApiError> {
        // Before anything of the VM's starts: another host may be running it. A VM arriving
        // from another host is that host's until it hands over, and runs no instruction here
        // before this host takes the lease (see `migrate.rs`). A successor runs a VM this
        // host already holds.
        if matches!(how, Launch::Boot | Launch::Fork { .. }) {
            self.take_lease(vm).await?;
        }
        let incoming = !matches!(how, Launch::Boot);
        let successor = matches!(how, Launch::Successor { .. });
        let paths = self.paths(&vm.id);
        let qemu =
            Qemu::locate(self.cfg.qemu.as_deref()).map_err(|e| errors::from_vmm("find QEMU", e))?;
        let accel = self.choose_accel(&qemu, image).await;
        let (img, agent, cache) = (image.clone(), self.cfg.agent.clone(), self.cfg.cache_dir());
        let initrd = tokio::task::spawn_blocking(move || {
            nook_storage::initrd_with_agent(&img, &agent, &cache)
        })
        .await;
        let initrd = map_join(initrd, "prepare the initrd")?
            .map_err(|e| errors::from_storage("prepare the initrd", e))?;

        let link =
            VmLink::for_slot(vm.slot).map_err(|e| errors::from_net("allocate the network", e))?;
        let boot = BootConfig {
            init: Some(image.init.clone()),
            ..self.guest_config(vm, &link)
        };
        let net = match (&self.net, &how) {
            (Net::Tap(_), Launch::Successor { tap: Some(fd), .. }) => NetBackend::TakenTap {
                fd: fd.clone(),
                mac: link.mac.clone(),
            },
            (Net::Tap(host), _) => {
                progress("connecting the network");
                let (host, l) = (host.clone(), link.clone());
                let added = tokio::task::spawn_blocking(move || host.add_vm(&l)).await;
                map_join(added, "connect the network")?
                    .map_err(|e| errors::from_net("connect the network", e))?;
                NetBackend::Tap {
                    ifname: link.tap.clone(),
                    mac: link.mac.clone(),
                }
            }
            (Net::User, _) => NetBackend::User {
                netdev: nook_net::user_mode_netdev("net0"),
                mac: link.mac.clone(),
            },
        };
        let disk = match &how {
            Launch::Successor { disk, .. } => disk.clone(),
            _ => paths.disk(),
        };
        // A successor's top is renamed while it runs (to `disk.qcow2` after a fork, over by
        // the next fork's new top later): it opens it through a descriptor instead of a name.
        let disk_fd = match &how {
            Launch::Successor { disk, .. } => Some(Arc::new(std::os::fd::OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(disk)
                    .map_err(|e| io_error("open the VM's disk", e))?,
            ))),
            _ => None,
        };
        let ram = match &how {
            Launch::Successor {
                shares: Some(ram), ..
            }
            | Launch::Fork { shared: Some(ram) } => Some(RamMapping::Fork(ram.clone())),
            // Without instant forks, QEMU's own RAM: a memfd's pages are 4 KiB shmem pages
            // (no huge pages for shmem on common hosts), which made copying a 1 GiB guest
            // 2.5x slower, and KSM cannot merge them.
            _ if self.cfg.fork_memory == crate::config::ForkMemory::Copy => {
                Some(RamMapping::Anonymous)
            }
            _ => Some(RamMapping::Own(
                GuestRam::new(vm.memory_mib)
                    .map_err(|e| errors::from_vmm("make the VM's memory", e))?,
            )),
        };
        // `-M pc` rather than microvm: under TCG here, microvm guests hang or crash early in a
        // fair share of boots, pc boots as fast and did not fail once.
        // `net.ifnames=0`: a systemd image's udev would otherwise rename eth0 while the agent is
        // configuring it, and the address would land on a name that no longer exists.
        let cmdline = format!(
            "console=ttyS0 root=/dev/vda rw net.ifnames=0 {}",
            boot.to_cmdline()
        );
        let jail = if nix::unistd::geteuid().is_root() {
            let files = JailFiles {
                qemu: qemu.binary.clone(),
                paths: paths.clone(),
                disk: disk.clone(),
                kernel: image.kernel.clone(),
                initrd: initrd.clone(),
                base: image.rootfs.clone(),
                layers: self.layers.clone(),
            };
            let root = self.cfg.data_dir.join(JAIL_ROOT);
            let uid = self.cfg.jail_uids.for_slot(vm.slot);
            let own_net = matches!(net, NetBackend::Tap { .. });
            let made =
                tokio::task::spawn_blocking(move || jail_for(uid, &files, root, accel, own_net))
                    .await;
            Some(map_join(made, "prepare QEMU's jail")??)
        } else {
            None
        };
        let spec = LaunchSpec {
            id: vm.id.clone(),
            paths: paths.clone(),
            cpus: vm.cpu,
            memory_mib: vm.memory_mib,
            ram: ram.clone(),
            disk,
            disk_fd,
            successor,
            kernel: image.kernel.clone(),
            initrd,
            cmdline,
            net,
            accel,
            tcg_cache_mib: Some(self.cfg.tcg_cache_mib),
            reclaim: self.cfg.reclaim,
            incoming,
            // A successor waits to be told to run, once the VM is its (see `clone.rs`).
            hold: matches!(how, Launch::Arrival | Launch::Successor { .. }),
            jail,
        };
        progress(&format!("starting QEMU ({})", accel.qemu_arg()));
        let launched = tokio::task::spawn_blocking(move || qemu.launch(&spec)).await;
        let pid =
            map_join(launched, "start QEMU")?.map_err(|e| errors::from_vmm("start QEMU", e))?;
        // A successor's console is followed once it is the VM's.
        if !successor {
            nook_vmm::console::follow(&paths);
        }
        // A fork's clone stays `creating` until it is complete, so that a crash before then
        // removes it rather than re-adopting half a clone.
        let state = match how {
            Launch::Boot => Some(VmState::Starting),
            Launch::Fork { .. } => Some(VmState::Creating),
            // The row is the sending host's until the VM is handed over; a successor's pid is
            // recorded when it takes over.
            Launch::Arrival | Launch::Successor { .. } => None,
        };
        if let Some(state) = state {
            self.store
                .set_state(&vm.id, state, None, Some(pid))
                .await
                .map_err(|e| errors::from_store("record the VM's process", e))?;
        }
        let qmp_socket = if successor {
            paths.runtime_files()[0].0.clone()
        } else {
            paths.qmp_socket()
        };
        let connected = async {
            self.confine(vm, pid).await?;
            Qmp::connect(&qmp_socket)
                .await
                .map_err(|e| errors::from_vmm("connect to QMP", e))
        }
        .await;
        let qmp = match connected {
            Ok(qmp) => qmp,
            // A successor is no VM's yet: nothing else would ever stop it.
            Err(err) if successor => {
                clone::kill_qemu(Some(pid));
                paths.discard_successor();
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        let ram = match ram {
            Some(RamMapping::Own(ram)) => Some(ram),
            Some(RamMapping::Fork(_) | RamMapping::Anonymous) | None => None,
        };
        Ok(Launched { pid, qmp, ram })
    }

    /// The name and address the guest gets, at boot on its command line and after a fork
    /// through the agent.
    pub(super) fn guest_config(&self, vm: &VmRecord, link: &VmLink) -> BootConfig {
        let (ip, gateway, dns) = match &self.net {
            Net::Tap(_) => (
                link.guest_cidr(),
                link.host_ip.to_string(),
                Some(self.cfg.dns.clone()),
            ),
            Net::User => ("10.0.2.15/24".to_string(), "10.0.2.2".to_string(), None),
        };
        BootConfig {
            hostname: vm.name.clone(),
            ip: Some(ip),
            gateway: Some(gateway),
            dns,
            init: None,
        }
    }

    /// Tells the guest who it is, with nook's key for its sshd, and with [`Sshd::WaitUntilUp`]
    /// waits for that sshd when the image runs one. True when it was another VM until now (a
    /// clone).
    pub(super) async fn identify(
        self: &Arc<Self>,
        vm: &VmRecord,
        agent: &AgentClient,
        sshd: Sshd,
    ) -> Result<bool, ApiError> {
        let link =
            VmLink::for_slot(vm.slot).map_err(|e| errors::from_net("allocate the network", e))?;
        let boot = self.guest_config(vm, &link);
        let identity = nook_proto::Identity {
            vm_id: vm.id.clone(),
            hostname: boot.hostname,
            ip: boot.ip,
            gateway: boot.gateway,
            dns: boot.dns,
            mac: Some(link.mac.clone()),
            seed: rand::random::<[u8; 32]>().to_vec(),
            ssh_host_keys: self.guest_host_keys(vm)?,
            authorized_key: Some(nook_proto::AuthorizedKey {
                user: GUEST_USER.to_string(),
                public_openssh: self.relay_key(vm)?,
            }),
        };
        // A guest that answered its readiness probe but never takes its identity must not hold
        // a boot or a clone forever.
        let answer = async {
            if faults::point("identify") == Fault::NoAnswer {
                std::future::pending::<()>().await;
            }
            agent.identify(identity).await
        };
        let answer = tokio::time::timeout(IDENTIFY_TIMEOUT, answer)
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::GuestNotReady,
                    format!(
                        "VM '{}' did not take its identity within {}s: its guest agent stopped answering",
                        vm.name,
                        IDENTIFY_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map_err(|e| errors::from_vmm("give the VM its identity", e))?;
        if answer.cloned {
            tracing::info!(vm = %vm.name, "the guest took its new identity after a clone");
        }
        if answer.sshd {
            match sshd {
                Sshd::WaitUntilUp => self.wait_for_sshd(vm).await,
                Sshd::Restarting => self.watch_sshd_restart(vm),
            }
        } else {
            // No sshd to relay to: the relay must not think there is one.
            let dir = self.paths(&vm.id).dir;
            let _ = std::fs::remove_file(dir.join(RELAY_KEY));
            let _ = std::fs::remove_file(dir.join(RELAY_KEY).with_extension("pub"));
        }
        Ok(answer.cloned)
    }

    pub(super) async fn choose_accel(&self, qemu: &Qemu, image: &Image) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let accel = match self.cfg.accel {
                    AccelChoice::Kvm => Accel::Kvm,
                    AccelChoice::Tcg => Accel::Tcg,
                    AccelChoice::Auto => nook_vmm::probe_accel(&qemu.binary, &image.kernel, &self.cfg.cache_dir()).await,
                };
                tracing::info!(accel = accel.qemu_arg(), choice = ?self.cfg.accel, "accelerator chosen");
                accel
            })
            .await
    }

    /// A fork's sshd restarts to take the clone's host keys: until it accepts connections again
    /// (at most [`SSHD_RESTART_PATIENCE`]) the relay tries a refused connection again, and
    /// afterwards a refusal is answered at once.
    fn watch_sshd_restart(self: &Arc<Self>, vm: &VmRecord) {
        let (Net::Tap(_), Ok(link)) = (&self.net, VmLink::for_slot(vm.slot)) else {
            return;
        };
        self.with_live(&vm.id, |live| {
            live.sshd_restarting_until = Some(std::time::Instant::now() + SSHD_RESTART_PATIENCE);
        });
        let (this, id) = (self.clone(), vm.id.clone());
        tokio::spawn(async move {
            guest::sshd_accepts_within(link.guest_ip, SSHD_RESTART_PATIENCE).await;
            this.with_live(&id, |live| live.sshd_restarting_until = None);
        });
    }

    /// Registers a running QEMU and watches it until it exits.
    pub(super) fn adopt(
        self: &Arc<Self>,
        vm: &VmRecord,
        qmp: Qmp,
        agent: Option<AgentClient>,
        ram: Option<GuestRam>,
    ) {
        let intended_exit = Arc::new(AtomicBool::new(false));
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.insert(
                vm.id.clone(),
                Live {
                    qmp: qmp.clone(),
                    agent,
                    intended_exit: intended_exit.clone(),
                    booted: false,
                    sshd_restarting_until: None,
                    ram,
                },
            );
        }
        // Its pid is known now: the fence watch guards it from here on.
        self.publish_fence();
        let (this, id, name, slot, owner) = (
            self.clone(),
            vm.id.clone(),
            vm.name.clone(),
            vm.slot,
            vm.owner.clone(),
        );
        tokio::spawn(self.clone().watch_for_a_full_disk(
            vm.id.clone(),
            vm.name.clone(),
            qmp.clone(),
        ));
        tokio::spawn(async move {
            qmp.closed().await;
            if intended_exit.load(Ordering::SeqCst) {
                return;
            }
            let reason = match qmp.shutdown_reason().as_deref() {
                Some("guest-shutdown") => {
                    (VmState::Stopped, "the guest powered itself off".to_string())
                }
                Some(other) => (
                    VmState::Failed,
                    format!("QEMU exited unexpectedly ({other})"),
                ),
                None => (
                    VmState::Failed,
                    "QEMU exited unexpectedly (killed or crashed)".to_string(),
                ),
            };
            tracing::warn!(vm = %name, reason = %reason.1, "VM exited");
            this.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            this.release_runtime(&id, slot, &owner).await;
            this.record_state_or_log(&name, &id, reason.0, Some(&reason.1), None, "its exit")
                .await;
        });
    }

    /// A guest write that finds the host's disk full stops the guest (QEMU's `werror=enospc`)
    /// rather than fail, so nothing it wrote is lost, but a stopped guest looks hung. This
    /// says why in `ls` and `stat` and in the log, and lets the guest go on (`cont` retries
    /// the write) once the disk has room again. Runs until QEMU exits.
    async fn watch_for_a_full_disk(self: Arc<Self>, id: String, name: String, qmp: Qmp) {
        let mut events = qmp.events();
        // A VM adopted after a daemon restart may already be stopped: its event came and went.
        let mut stopped = stopped_for_io(&qmp).await;
        loop {
            if !stopped {
                let event = tokio::select! {
                    () = qmp.closed() => return,
                    event = events.recv() => event,
                };
                stopped = match event {
                    Ok(e) => {
                        e.event == "BLOCK_IO_ERROR"
                            && e.data.get("nospace").and_then(serde_json::Value::as_bool)
                                == Some(true)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        stopped_for_io(&qmp).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                continue;
            }
            self.set_disk_full(&id, true);
            let gone = self.resume_once_room(&id, &name, &qmp).await;
            self.set_disk_full(&id, false);
            if gone {
                return;
            }
            stopped = false;
        }
    }

    /// Waits until the disk has room, then lets the stopped VM go on. True when QEMU went
    /// away meanwhile.
    async fn resume_once_room(&self, id: &str, name: &str, qmp: &Qmp) -> bool {
        let dir = self.cfg.vms_dir();
        tracing::warn!(
            vm = %name,
            free_mib = free_bytes(&dir).unwrap_or(0) >> 20,
            "VM paused: its disk write found the host's disk full; it goes on once {} MiB are free",
            RESUME_ROOM >> 20
        );
        loop {
            tokio::select! {
                () = qmp.closed() => return true,
                () = tokio::time::sleep(FULL_DISK_RETRY) => {}
            }
            if !stopped_for_io(qmp).await {
                // Going on already (an admin's `cont`), or QEMU is gone.
                return qmp.is_closed();
            }
            if free_bytes(&dir).unwrap_or(0) < RESUME_ROOM {
                continue;
            }
            if self.fleet.as_ref().is_some_and(|f| f.is_fenced(id)) {
                // Paused for its lease too: it goes on with its next renewal.
                continue;
            }
            match qmp.execute("cont", None).await {
                Ok(_) => {
                    tracing::info!(vm = %name, "VM goes on: the host's disk has room again");
                    return false;
                }
                Err(err) => tracing::warn!(vm = %name, %err, "could not resume the VM"),
            }
        }
    }

    pub(super) fn is_disk_full(&self, id: &str) -> bool {
        self.disk_full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    fn set_disk_full(&self, id: &str, full: bool) {
        let mut paused = self.disk_full.lock().unwrap_or_else(|p| p.into_inner());
        if full {
            paused.insert(id.to_string(), FULL_DISK_REASON.to_string());
        } else {
            paused.remove(id);
        }
    }

    /// Removes the tap and runtime sockets of a VM whose QEMU is gone. Idempotent.
    /// Puts a VM's QEMU into its account's cgroup, so the account's envelope bounds it.
    /// Admin VMs, and hosts without usable cgroups, run unconfined (logged at start).
    pub(super) async fn confine(&self, vm: &VmRecord, pid: u32) -> Result<(), ApiError> {
        let Some(cg) = &self.cgroups else {
            return Ok(());
        };
        if vm.owner == ADMIN_OWNER {
            return Ok(());
        }
        let plan = self.plan_for(&vm.owner).await?;
        let limits = self.account_limits(&plan);
        let (cg, owner, id) = (cg.clone(), vm.owner.clone(), vm.id.clone());
        let done = tokio::task::spawn_blocking(move || {
            cg.set_account(&owner, limits)?;
            cg.set_vm(
                &owner,
                &id,
                nook_cgroup::VmKnobs {
                    cpu_weight: 100,
                    memory_high: None,
                },
            )?;
            cg.attach(&owner, &id, pid)
        })
        .await;
        map_join(done, "confine the VM")?
            .map_err(|e| errors::internal("confine the VM to its account's envelope", &e))
    }
}

/// The empty directory under the data dir that every QEMU's jail root is mounted on (in that
/// QEMU's own mount namespace; on the host it stays empty).
pub(super) const JAIL_ROOT: &str = "jail";

/// What a VM's QEMU needs from the host's files.
pub(super) struct JailFiles {
    /// QEMU itself: its directory is bound too when it is not under `/usr`.
    pub qemu: PathBuf,
    pub paths: VmPaths,
    /// The disk top QEMU opens (see [`LaunchSpec::disk`]).
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The image's base, the one file below the layers a chain may end in.
    pub base: PathBuf,
    pub layers: nook_storage::layers::Layers,
}

/// Makes the files of a VM fit its jail and describes the jail: the VM's directory is root's
/// and only traversable, its disk top belongs to the VM's uid alone, and what lies below the
/// top (layers, base, kernel, initrd) is readable, never writable, by it.
///
/// The chain's names come from qcow2 headers the VM's QEMU can write, so they go through
/// [`nook_storage::layers::trusted_chain`]: otherwise an escaped QEMU could name any host file
/// (another VM's disk through `/proc`, say) and have root chown it at its next start.
pub(super) fn jail_for(
    uid: u32,
    files: &JailFiles,
    root: PathBuf,
    accel: Accel,
    own_net: bool,
) -> Result<nook_vmm::Jail, ApiError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fail = |what: &str, path: &std::path::Path, e: std::io::Error| {
        io_error(
            &format!("prepare QEMU's jail ({what} {})", path.display()),
            e,
        )
    };
    let mode = |path: &std::path::Path, mode: u32| -> Result<(), ApiError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("set the mode of", path, e))
    };
    let own = |path: &std::path::Path, owner: u32| -> Result<(), ApiError> {
        std::os::unix::fs::chown(path, Some(owner), Some(owner)).map_err(|e| fail("give", path, e))
    };
    std::fs::create_dir_all(&root).map_err(|e| fail("make", &root, e))?;
    own(&files.paths.dir, 0)?;
    mode(&files.paths.dir, 0o711)?;
    let chain = nook_storage::layers::trusted_chain(&files.disk, &files.layers, &files.base)
        .map_err(|e| errors::from_storage("start the VM", e))?;
    let (top, below) = chain
        .split_first()
        .ok_or_else(|| io_error("read the disk's chain", std::io::ErrorKind::NotFound.into()))?;
    own(top, uid)?;
    mode(top, 0o600)?;
    let mut read_only: Vec<PathBuf> = below.to_vec();
    read_only.extend([files.kernel.clone(), files.initrd.clone()]);
    for file in &read_only {
        mode(file, 0o644)?;
    }
    // A QEMU of its own build (under /opt, say) must be found after the jail's chroot.
    if let Some(dir) = std::fs::canonicalize(&files.qemu)
        .ok()
        .and_then(|q| q.parent().map(std::path::Path::to_path_buf))
        .filter(|d| !d.starts_with("/usr"))
    {
        read_only.push(dir);
    }
    // A layer that was this VM's own top before a clone still belongs to its uid: it becomes
    // root's now. Not the VM's live top, though, below a successor's new one until the
    // hand-over: its running QEMU must reopen it writable should the fork fail (QEMU 7.2
    // then hit an assertion at its next migration), and `settle_next_disk` freezes it once
    // the successor runs. (For a clone it is the source's, owned by the source's uid: the
    // clone's jail only makes it readable.)
    let live_top = std::fs::metadata(files.paths.disk())
        .ok()
        .map(|m| (m.dev(), m.ino()));
    for file in below {
        if std::fs::metadata(file)
            .is_ok_and(|m| m.uid() == uid && Some((m.dev(), m.ino())) != live_top)
        {
            own(file, 0)?;
        }
    }
    let (devices, groups) = match accel {
        Accel::Kvm => {
            let kvm = PathBuf::from("/dev/kvm");
            let gid = std::fs::metadata(&kvm)
                .map(|m| m.gid())
                .map_err(|e| fail("read", &kvm, e))?;
            if gid == 0 {
                return Err(ApiError::new(
                    ErrorCode::HostMisconfigured,
                    "/dev/kvm belongs to group root, and QEMU runs as a VM's own user: give /dev/kvm a group of its own (`groupadd -r kvm; chgrp kvm /dev/kvm; chmod 660 /dev/kvm`) or use --accel tcg",
                ));
            }
            (vec![kvm], vec![gid])
        }
        Accel::Tcg => (Vec::new(), Vec::new()),
    };
    Ok(nook_vmm::Jail {
        uid,
        groups,
        root,
        read_only,
        writable: vec![files.paths.dir.clone()],
        devices,
        own_net,
        proc: true,
    })
}

pub(super) enum BootError {
    /// Nothing on the console long after QEMU started.
    SilentHang,
    Api(ApiError),
}

impl From<ApiError> for BootError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// Resolves if the console is still empty after `after`; otherwise never.
pub(super) async fn silent_console(paths: &VmPaths, after: Duration) {
    tokio::time::sleep(after).await;
    let printed = std::fs::metadata(paths.console_log())
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if printed {
        std::future::pending::<()>().await;
    }
}

/// What `ls` and `stat` say of a VM stopped by a full disk.
const FULL_DISK_REASON: &str =
    "paused: the host's disk is full; it goes on by itself once the host's admin frees space";
/// Free space on the VMs' filesystem before a paused VM is let go on: enough that its next
/// writes do not stop it again at once.
const RESUME_ROOM: u64 = 128 << 20;
const FULL_DISK_RETRY: Duration = Duration::from_secs(3);

/// QEMU's run state is `io-error`: a disk error (here, a full disk) stopped the guest.
async fn stopped_for_io(qmp: &Qmp) -> bool {
    run_status(qmp).await.as_deref() == Some("io-error")
}

/// QEMU's run state (`running`, `paused`, `io-error`, ...), or None when QEMU does not answer.
pub(super) async fn run_status(qmp: &Qmp) -> Option<String> {
    qmp.execute("query-status", None)
        .await
        .ok()?
        .get("status")?
        .as_str()
        .map(str::to_string)
}
