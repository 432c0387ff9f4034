//! Moving a VM to another host of the fleet (`move VM HOST`), over the host channel.
//!
//! The VM's host drives it; the receiving host checks and stores what arrives. Layers are
//! immutable and named once for all hosts, so only those the receiver lacks travel, and
//! the image build travels only when the receiver has no build of that name. Each file the
//! receiver takes names its backing file by the receiver's own paths (`qemu-img rebase -u`),
//! and the chain is checked (`trusted_chain`) before anything opens it.
//!
//! - **Stopped VM:** its top and what the receiver lacks go over, then `Commit`: the
//!   receiver records the VM as its own (`Store::move_vm`, only while the row still names
//!   the sender), and the sender deletes its copy.
//! - **Running VM (live):** the sender first freezes the top as a layer (as `cp` does), so
//!   everything below the VM's new small top is immutable and travels while the VM runs. The
//!   receiver starts QEMU paused (`-incoming`) on a placeholder top over those layers, and the
//!   memory streams over a second channel connection while the guest runs on. At the one
//!   moment the sender is paused, with its disk flushed, the small top goes over and replaces
//!   the placeholder in place; QEMU re-reads its images when the migration completes. The
//!   sender's QEMU then ends (its lease released), and only then does the receiver take the
//!   lease and let the guest run: the VM never runs on two hosts at once.
//!
//! What fails before the sender's QEMU ends leaves the VM running where it was, and the
//! receiver deletes what it took. If the receiver fails after that, the sender still holds
//! the whole disk (its top is unchanged since the pause) and records the VM stopped there,
//! with why: its memory is lost, its data is not.

use super::*;

use clone::{DISK_DEVICE, NEXT_DISK};
use nook_channel::{MoveIn, MoveLink, MoveOffer, MoveOut, PeerStream};
use nook_vmm::fork;
use tokio::io::AsyncWriteExt;

/// How long the receiver waits for the memory stream after it said it listens.
const MEMORY_WAIT: Duration = Duration::from_secs(30);
/// How long either side waits for the other's next answer (a file may be large, but the
/// receiver answers only after it is written; a stall beyond this ends the move).
const ANSWER_WAIT: Duration = Duration::from_secs(600);
/// The image build's files a receiver takes.
const IMAGE_FILES: [&str; 4] = ["manifest.json", "rootfs.qcow2", "vmlinux", "initrd.cpio"];
/// A file in the directory of a VM that is arriving and not yet this host's: a restart
/// removes such a directory (and its QEMU) instead of keeping it.
pub(super) const ARRIVING: &str = ".arriving";
/// The directory under the layers where arriving layers are written.
const INCOMING_LAYERS: &str = ".incoming";
/// Room a qcow2 top may take beyond its disk's size (its own metadata).
const TOP_OVERHEAD: u64 = 64 << 20;

/// Live moves waiting on this host for their memory stream: VM id to token and handoff.
pub(super) type Arrivals =
    std::sync::Mutex<HashMap<String, (String, tokio::sync::oneshot::Sender<PeerStream>)>>;

/// What `move` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Moved {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub live: bool,
    /// Bytes of disk (and image) sent; memory is not counted.
    pub disk_bytes_sent: u64,
    /// How long the guest was paused (a live move), at most: from the pause here until the
    /// other host said it runs there.
    pub paused_ms: Option<u64>,
    pub total_ms: u64,
}

impl Moved {
    pub fn summary(&self) -> String {
        let how = match self.paused_ms {
            Some(ms) => format!("live, its processes running on; paused {ms} ms"),
            None => "stopped".to_string(),
        };
        format!(
            "moved {} from {} to {} ({how}; {} of disk sent, {:.1} s in all)",
            self.vm,
            self.from,
            self.to,
            format_size(self.disk_bytes_sent),
            self.total_ms as f64 / 1000.0
        )
    }
}

fn failed(to: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("The move to host '{to}' failed: {why}"),
    )
}

/// A name a peer sent that this host will use as a file name: no path, nothing hidden.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(super) async fn expect<S, T>(link: &mut MoveLink<S>, what: &str) -> Result<T, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: serde::de::DeserializeOwned,
{
    match tokio::time::timeout(ANSWER_WAIT, link.recv::<T>()).await {
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => Err(format!("the other host closed the move while {what}")),
        Ok(Err(why)) => Err(format!("{why} while {what}")),
        Err(_) => Err(format!(
            "no answer in {} s while {what}",
            ANSWER_WAIT.as_secs()
        )),
    }
}

async fn send_path<S>(
    link: &mut MoveLink<S>,
    name: &str,
    path: &std::path::Path,
) -> Result<u64, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    link.send_file(name, &mut file, size).await?;
    Ok(size)
}

fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn name_of(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Manager {
    /// Moves `name` to host `to` (or the other host with the most memory free): live when it
    /// runs, else its disk alone.
    pub async fn move_vm(
        self: &Arc<Self>,
        name: &str,
        to: Option<&str>,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<Moved, ApiError> {
        if self.fleet.is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "This host is not part of a fleet (its store is SQLite): there is no other host to move to",
            ));
        }
        let vm = self.lock_vm(name, scope).await?;
        self.move_locked(vm, to, progress).await
    }

    /// [`Self::move_vm`] of a VM whose op lock the caller took (and read under it).
    pub(super) async fn move_locked(
        self: &Arc<Self>,
        vm: LockedVm,
        to: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Moved, ApiError> {
        let started = Instant::now();
        let me = self.cfg.host_name.clone();
        let to = match to {
            Some(to) => to.to_string(),
            None => self.place_elsewhere(vm.memory_mib).await?,
        };
        let to = to.as_str();
        if to == me {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("VM '{}' is on host '{to}' already", vm.name),
            ));
        }
        let hosts = self.hosts().await?;
        self.check_takes_vms(&hosts, to, &format!("move to {to}"))?;
        let live = match vm.state {
            VmState::Running => true,
            VmState::Stopped | VmState::Failed => false,
            other => {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "VM '{}' is {}: move it once it is running or stopped",
                        vm.name,
                        other.as_str()
                    ),
                ));
            }
        };
        if live && self.fleet.as_ref().is_some_and(|f| f.is_fenced(&vm.id)) {
            return Err(ApiError::new(
                ErrorCode::StoreUnavailable,
                format!(
                    "VM '{}' is paused until this host reaches the fleet's database again; move it then",
                    vm.name
                ),
            ));
        }
        let image = self.image_of(&vm)?;
        let (identity, addr) = self.channel_route(to).await.map_err(|why| {
            ApiError::new(
                ErrorCode::HostDown,
                format!("Cannot reach host '{to}': {why}"),
            )
        })?;

        if live {
            progress("freezing the disk so it can travel while the VM runs");
            self.freeze_top(&vm).await?;
        }
        let top = self.paths(&vm.id).disk();
        let (offer, below) = self.offer(&vm, &image, file_size(&top)).await?;
        let mut link = nook_channel::start_move(&identity, to, &addr, &vm.id, live)
            .await
            .map_err(|e| failed(to, e))?;
        let mut sent = self
            .send_what_is_wanted(&mut link, &vm.id, offer, &image, &below, progress)
            .await
            .map_err(|e| failed(to, e.message))?;
        // For a live move: when the guest paused here, to count until it runs there.
        let paused_at = if live {
            let (paused_at, top_bytes) = self
                .send_live(&vm, to, &identity, &addr, &mut link, progress)
                .await?;
            sent += top_bytes;
            Some(paused_at)
        } else {
            progress(&format!(
                "sending the disk's top ({})",
                format_size(file_size(&top))
            ));
            sent += send_path(&mut link, "top", &top)
                .await
                .map_err(|e| failed(to, e))?;
            link.send(&MoveIn::Commit)
                .await
                .map_err(|e| failed(to, e))?;
            None
        };
        let done = expect::<_, MoveOut>(&mut link, "handing the VM over").await;
        // The other host says done once the guest runs there (and its agent answers): the
        // pause is at most this.
        let paused_ms = paused_at.map(|t| t.elapsed().as_millis() as u64);
        if !matches!(done, Ok(MoveOut::Done)) {
            let why = match done {
                Ok(MoveOut::Failed { why }) => why,
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(why) => why,
            };
            self.give_up(&vm, to, live, &why).await?;
        }
        let dir = self.paths(&vm.id).dir;
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%err, dir = %dir.display(), "could not remove a moved VM's directory");
        }
        self.collect_layers().await;
        let moved = Moved {
            vm: vm.name.clone(),
            from: me,
            to: to.to_string(),
            live,
            disk_bytes_sent: sent,
            paused_ms,
            total_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(vm = %vm.name, to, live, sent, ?paused_ms, "moved");
        Ok(moved)
    }

    /// After a hand-over that did not say it was done: the row decides. The other host's
    /// commit is conditional on the state it saw, so changing the state here (only while the
    /// row names this host) settles the race either way. `Ok` when the other host has it.
    async fn give_up(
        &self,
        vm: &VmRecord,
        to: &str,
        live: bool,
        why: &str,
    ) -> Result<(), ApiError> {
        let (state, reason) = if live {
            // Its QEMU is gone; its disk is whole here (the top is as it was at the pause).
            (
                VmState::Stopped,
                format!(
                    "the move to host '{to}' failed after its memory was sent ({why}); its disk is intact here, its memory is lost: start it again"
                ),
            )
        } else {
            let state = if vm.state == VmState::Stopped {
                VmState::Failed
            } else {
                VmState::Stopped
            };
            (
                state,
                format!("the move to host '{to}' failed ({why}); its disk is intact here"),
            )
        };
        match self
            .store
            .set_state_on(&vm.id, &self.cfg.host_name, state, Some(&reason))
            .await
        {
            Ok(true) => {
                tracing::warn!(vm = %vm.name, to, why, "a move failed; the VM stays here");
                Err(failed(to, why))
            }
            // The row names the other host: it took the VM after all.
            Ok(false) => Ok(()),
            Err(e) => Err(ApiError::new(
                ErrorCode::StoreUnavailable,
                format!(
                    "The move to host '{to}' may not have finished ({why}), and this host cannot reach the database to tell ({e}); `ls` shows where VM '{}' is once it can",
                    vm.name
                ),
            )),
        }
    }

    /// What `vm`'s disk is made of, for a peer to take (`top` bytes of top), and its layers.
    pub(super) async fn offer(
        &self,
        vm: &VmRecord,
        image: &Image,
        top: u64,
    ) -> Result<(MoveOffer, Vec<PathBuf>), ApiError> {
        let chain = self.trusted_chain(vm).await?;
        let below: Vec<PathBuf> = chain
            .iter()
            .skip(1)
            .filter(|f| self.layers.contains(f))
            .cloned()
            .collect();
        let vm_files = self.vm_files(&vm.id);
        let offer = MoveOffer {
            image: name_of(&image.dir),
            image_files: IMAGE_FILES
                .iter()
                .map(|f| (f.to_string(), file_size(&image.dir.join(f))))
                .collect(),
            layers: below.iter().map(|l| (name_of(l), file_size(l))).collect(),
            vm_files: vm_files
                .iter()
                .map(|f| (name_of(f), file_size(f)))
                .collect(),
            top,
        };
        Ok((offer, below))
    }

    /// Offers `offer` over `link` and sends what the peer asks for: the image build, layers
    /// (`below`, nearest first) and the VM's own files. Returns the bytes sent.
    pub(super) async fn send_what_is_wanted<S>(
        &self,
        link: &mut MoveLink<S>,
        vm_id: &str,
        offer: MoveOffer,
        image: &Image,
        below: &[PathBuf],
        progress: Progress<'_>,
    ) -> Result<u64, ApiError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let broke = |why: String| ApiError::new(ErrorCode::Internal, why);
        let vm_files: Vec<String> = offer.vm_files.iter().map(|f| f.0.clone()).collect();
        link.send(&MoveIn::Offer(offer)).await.map_err(broke)?;
        let (want_image, want_layers) =
            match expect(link, "asking what it lacks").await.map_err(broke)? {
                MoveOut::Want { image, layers } => (image, layers),
                MoveOut::Failed { why } => return Err(broke(why)),
                other => return Err(broke(format!("unexpected answer {other:?}"))),
            };
        let mut sent = 0u64;
        if want_image {
            for f in IMAGE_FILES {
                progress(&format!(
                    "sending the image build {} ({f})",
                    name_of(&image.dir)
                ));
                sent += send_path(link, &format!("image/{f}"), &image.dir.join(f))
                    .await
                    .map_err(broke)?;
            }
        }
        for layer in below.iter().filter(|l| want_layers.contains(&name_of(l))) {
            progress(&format!(
                "sending disk layer {} ({})",
                name_of(layer),
                format_size(file_size(layer))
            ));
            sent += send_path(link, &format!("layer/{}", name_of(layer)), layer)
                .await
                .map_err(broke)?;
        }
        for f in self
            .vm_files(vm_id)
            .iter()
            .filter(|f| vm_files.contains(&name_of(f)))
        {
            sent += send_path(link, &format!("vm/{}", name_of(f)), f)
                .await
                .map_err(broke)?;
        }
        Ok(sent)
    }

    /// Moves a running VM onto a fresh top over its current one, now a frozen layer.
    pub(super) async fn freeze_top(&self, vm: &VmRecord) -> Result<(), ApiError> {
        let qmp = self.live_qmp(vm)?;
        let _layers = self.layers_lock.lock().await;
        let next = self.paths(&vm.id).dir.join(NEXT_DISK);
        let (layer_store, disk, next_disk, size) = (
            self.layers.clone(),
            self.paths(&vm.id).disk(),
            next.clone(),
            vm.disk_bytes,
        );
        let uid = nix::unistd::geteuid()
            .is_root()
            .then(|| self.cfg.jail_uids.for_slot(vm.slot));
        let made = tokio::task::spawn_blocking(move || {
            let layer = layer_store.freeze(&disk)?;
            nook_storage::disk::create_overlay_on_qcow2(&layer, &next_disk, size)?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(&next_disk, Some(uid), Some(uid)).map_err(|e| {
                    nook_storage::StorageError::Io {
                        action: "give the VM its new disk top",
                        path: next_disk.clone(),
                        source: e,
                    }
                })?;
            }
            Ok::<_, nook_storage::StorageError>(())
        })
        .await;
        if let Err(err) = map_join(made, "freeze the disk")? {
            let _ = std::fs::remove_file(&next);
            return Err(errors::from_storage("freeze the disk", err));
        }
        let switched = fork::switch_disk(&qmp, DISK_DEVICE, &next).await;
        self.settle_next_disk(vm, Some(&qmp)).await;
        switched.map_err(|e| errors::from_vmm("switch the VM's disk", e))
    }

    /// The VM's own small files that go with it: its SSH keys.
    fn vm_files(&self, id: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.paths(id).dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| name_of(p).starts_with("ssh_") && plain_name(&name_of(p)))
            .collect();
        files.sort();
        files
    }

    /// The live part of a move: the receiver starts QEMU, the memory streams, and at the pause
    /// the top goes over; then this host's QEMU ends. Returns how long the guest was paused
    /// and the top's size.
    async fn send_live(
        &self,
        vm: &VmRecord,
        to: &str,
        identity: &nook_channel::HostIdentity,
        addr: &str,
        link: &mut MoveLink<nook_channel::Stream>,
        progress: Progress<'_>,
    ) -> Result<(Instant, u64), ApiError> {
        progress(&format!("starting the VM's QEMU on {to}"));
        link.send(&MoveIn::Launch)
            .await
            .map_err(|e| failed(to, e))?;
        let token = match expect(link, "starting QEMU there")
            .await
            .map_err(|e| failed(to, e))?
        {
            MoveOut::Listening { token } => token,
            MoveOut::Failed { why } => return Err(failed(to, why)),
            other => return Err(failed(to, format!("unexpected answer {other:?}"))),
        };
        let mut stream = nook_channel::memory(identity, to, addr, &vm.id, &token)
            .await
            .map_err(|e| failed(to, e))?;
        let (for_qemu, ours) =
            fork::stream_pair().map_err(|e| errors::from_vmm("send the memory", e))?;
        let qmp = self.live_qmp(vm)?;
        fork::attach(&qmp, for_qemu)
            .await
            .map_err(|e| errors::from_vmm("send the memory", e))?;
        let ours = std::os::unix::net::UnixStream::from(ours);
        ours.set_nonblocking(true)
            .map_err(|e| io_error("send the memory", e))?;
        let mut ours =
            tokio::net::UnixStream::from_std(ours).map_err(|e| io_error("send the memory", e))?;
        let carry = tokio::spawn(async move {
            let copied = tokio::io::copy(&mut ours, &mut stream).await;
            let _ = stream.shutdown().await;
            copied
        });
        progress("copying memory while the VM runs");
        let top = self.paths(&vm.id).disk();
        let mut top_bytes = 0u64;
        let mut top_error: Option<String> = None;
        let (bytes_out, error_out, top, top_link) =
            (&mut top_bytes, &mut top_error, &top, &mut *link);
        let sent = fork::send(
            &qmp,
            move || async move {
                // Paused, its disk flushed: the top is final here.
                match send_path(top_link, "top", top).await {
                    Ok(n) => *bytes_out = n,
                    Err(why) => {
                        *error_out = Some(why.clone());
                        return Err(nook_vmm::VmmError::Qmp(why));
                    }
                }
                match expect::<_, MoveOut>(top_link, "handing over the disk's top").await {
                    Ok(MoveOut::Took) => Ok(()),
                    Ok(MoveOut::Failed { why }) | Err(why) => {
                        *error_out = Some(why.clone());
                        Err(nook_vmm::VmmError::Qmp(why))
                    }
                    Ok(other) => Err(nook_vmm::VmmError::Qmp(format!(
                        "unexpected answer {other:?}"
                    ))),
                }
            },
            fork::Then::StayPaused,
        )
        .await;
        let paused_at = match sent {
            Ok(sent) => Instant::now() - sent.paused,
            Err(err) => {
                carry.abort();
                // `fork::send` let the guest go on where it paused.
                self.keep_fenced_paused(vm, &qmp).await;
                return Err(match top_error {
                    Some(why) => failed(to, why),
                    None => errors::from_vmm("send the VM's memory", err),
                });
            }
        };
        // What QEMU wrote must all reach the other side before it can say it holds the state.
        if tokio::time::timeout(MEMORY_WAIT, carry).await.is_err() {
            tracing::warn!(vm = %vm.name, "the memory stream did not drain in time");
        }
        progress(&format!("handing the VM over to {to}"));
        let held = async {
            link.send(&MoveIn::Commit).await?;
            match expect::<_, MoveOut>(link, "waiting for the other host to hold the VM's state")
                .await?
            {
                MoveOut::Received => Ok(()),
                MoveOut::Failed { why } => Err(why),
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        .await;
        if let Err(why) = held {
            // Nothing runs there: the VM goes on here, where it paused.
            fork::resume(&qmp).await;
            self.keep_fenced_paused(vm, &qmp).await;
            return Err(failed(to, why));
        }
        // The other host holds all of the state, paused: this QEMU ends and its lease goes,
        // and only then may the other host take the lease and let the guest run.
        self.halt(vm, false).await;
        if let Err(why) = link.send(&MoveIn::Released).await {
            self.give_up(vm, to, true, &why).await?;
        }
        Ok((paused_at, top_bytes))
    }

    /// After a failed live move let the guest go on here: if its lease ran down meanwhile
    /// (the host was fenced off the database while the guest sat paused for the move), it
    /// pauses again at once, and goes on with the next renewal as any fenced VM does.
    async fn keep_fenced_paused(&self, vm: &VmRecord, qmp: &Qmp) {
        if self.fleet.as_ref().is_some_and(|f| f.is_fenced(&vm.id))
            && let Err(err) = qmp.execute("stop", None).await
        {
            tracing::error!(vm = %vm.name, %err, "could not pause a fenced VM after a failed move; killing it");
            self.kill_for_lease(&vm.id, "stopped: its lease could not be renewed")
                .await;
        }
    }

    /// Takes over a VM a peer moves here (the peer's `move_vm`), answering over `link`.
    pub(crate) async fn take_vm(
        self: &Arc<Self>,
        peer: nook_channel::Peer,
        vm_id: &str,
        live: bool,
        mut link: MoveLink<PeerStream>,
    ) {
        let lock = self.op_lock(vm_id);
        let _guard = lock.lock().await;
        let mut arrival = Arrival::default();
        let outcome = self
            .receive(&peer, vm_id, live, &mut link, &mut arrival)
            .await;
        if let Err(why) = &outcome {
            tracing::warn!(
                vm = vm_id,
                why,
                "a VM moving here did not arrive; removing what came"
            );
            let _ = link.send(&MoveOut::Failed { why: why.clone() }).await;
            self.undo_arrival(vm_id, &arrival).await;
        }
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm_id);
    }

    async fn receive(
        self: &Arc<Self>,
        peer: &nook_channel::Peer,
        vm_id: &str,
        live: bool,
        link: &mut MoveLink<PeerStream>,
        arrival: &mut Arrival,
    ) -> Result<(), String> {
        let me = self.cfg.host_name.clone();
        let vm = self
            .store
            .get_by_id(vm_id)
            .await
            .map_err(|e| format!("cannot read the VM's row here: {e}"))?;
        if vm.host == me || vm.host.is_empty() {
            return Err(format!("VM '{}' is on host '{me}' already", vm.name));
        }
        // Only the host that holds a VM may hand it over.
        if !peer.is(&vm.host) {
            return Err(format!(
                "VM '{}' is not the sending host's to move",
                vm.name
            ));
        }
        if live {
            self.room_for(&vm).await?;
        }
        // The host's own limits (VM count, promised disk and memory) hold for arrivals too.
        self.host_takes(&vm, live).await.map_err(|e| e.message)?;
        if live != (vm.state == VmState::Running) {
            return Err(format!(
                "VM '{}' is {} by its row, not what the move says",
                vm.name,
                vm.state.as_str()
            ));
        }
        let Ok(MoveIn::Offer(offer)) = expect::<_, MoveIn>(link, "waiting for the offer").await
        else {
            return Err("the move did not begin with its offer".into());
        };
        let wants = self.wants(&vm, &offer)?;
        let image_dir = wants.image_dir.clone();
        let dir = self.paths(vm_id).dir;
        if self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(vm_id)
        {
            return Err(format!(
                "VM '{}' has a QEMU on host '{me}' already",
                vm.name
            ));
        }
        // Left by an earlier move that failed: the row names another host, so nothing here uses it.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        arrival.dir = true;
        std::fs::write(dir.join(ARRIVING), b"").map_err(|e| e.to_string())?;
        link.send(&MoveOut::Want {
            image: wants.image,
            layers: wants.layers.clone(),
        })
        .await?;

        let mut here = vm.clone();
        here.host = me.clone();
        here.image_dir = image_dir.display().to_string();
        let disk = self.paths(vm_id).disk();
        let mut qemu: Option<(u32, Qmp, Option<nook_vmm::GuestRam>, AgentClient)> = None;
        loop {
            match expect::<_, MoveIn>(link, "receiving").await? {
                MoveIn::File { name, size } if name == "top" => {
                    if size > vm.disk_bytes + TOP_OVERHEAD || !arrival.taken.insert(name.clone()) {
                        return Err(format!(
                            "the sending host sent a top of {size} bytes, or twice"
                        ));
                    }
                    if qemu.is_some() {
                        // The sender is paused: the real top replaces the placeholder in
                        // place (QEMU holds it open and re-reads it when the state is in).
                        // Until it names this host's layers again, no collection may run.
                        let _layers = self.layers_lock.lock().await;
                        self.write_in_place(link, size, &disk).await?;
                        self.point_at(
                            &disk,
                            offer.layers.first().map(|l| l.0.as_str()),
                            &image_dir,
                        )
                        .await?;
                        link.send(&MoveOut::Took).await?;
                    } else {
                        receive_file(link, size, &disk).await?;
                    }
                }
                MoveIn::File { name, size } => {
                    self.take_file(link, &name, size, &offer, &wants, &dir, arrival)
                        .await?;
                }
                MoveIn::Launch if live && qemu.is_none() => {
                    if offer.layers.is_empty() {
                        return Err("a running VM moves with at least one layer".into());
                    }
                    self.settle_arrival(
                        &offer,
                        &wants,
                        arrival,
                        Top::Overlay(&disk, vm.disk_bytes),
                    )
                    .await?;
                    let image = self.image_of(&here).map_err(|e| e.message)?;
                    let quiet = |_: &str| {};
                    // Marked first: a launch that fails midway may leave a QEMU or a tap.
                    arrival.launched = Some((here.slot, here.owner.clone()));
                    let Launched { pid, qmp, ram } = self
                        .launch(&here, &image, Launch::Arrival, &quiet)
                        .await
                        .map_err(|e| e.message)?;
                    // Connected before the state arrives: the guest's port never goes without
                    // a host, so output the sender's QEMU was part-way through is sent on (see
                    // `connect_clone_agent`).
                    let agent = AgentClient::connect(&self.paths(&here.id).agent_socket())
                        .await
                        .map_err(|e| format!("cannot connect to the guest agent: {e}"))?;
                    let token = hex::encode(rand::random::<[u8; 16]>());
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    self.arrivals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(vm_id.to_string(), (token.clone(), tx));
                    link.send(&MoveOut::Listening { token }).await?;
                    let stream = tokio::time::timeout(MEMORY_WAIT, rx)
                        .await
                        .map_err(|_| "the memory stream did not come in time".to_string())?
                        .map_err(|_| "the memory stream did not come".to_string())?;
                    let (for_qemu, ours) = fork::stream_pair().map_err(|e| e.to_string())?;
                    fork::listen(&qmp, for_qemu)
                        .await
                        .map_err(|e| e.to_string())?;
                    let ours = std::os::unix::net::UnixStream::from(ours);
                    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
                    let mut ours =
                        tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = tokio::io::copy(&mut stream, &mut ours).await;
                        let _ = ours.shutdown().await;
                    });
                    qemu = Some((pid, qmp, ram, agent));
                }
                MoveIn::Commit => break,
                other => return Err(format!("the move sent {other:?} out of turn")),
            }
        }

        let state = match &mut qemu {
            Some((pid, qmp, ram, agent)) => {
                fork::received(qmp)
                    .await
                    .map_err(|e| format!("the memory did not all arrive: {e}"))?;
                // It stays paused (`-S`) until this host holds the lease.
                link.send(&MoveOut::Received).await?;
                match expect::<_, MoveIn>(link, "waiting for the sender's QEMU to end").await? {
                    MoveIn::Released => {}
                    other => return Err(format!("the move sent {other:?} out of turn")),
                }
                self.take_released_lease(&here).await?;
                self.commit_arrival(&vm, &here, VmState::Running, Some(*pid), arrival)
                    .await?;
                let own_ram = ram.is_some();
                self.adopt(&here, qmp.clone(), Some(agent.clone()), ram.take());
                if let Err(err) = qmp.execute("cont", None).await {
                    tracing::error!(vm = %vm.name, %err, "a VM that moved here would not run");
                }
                // Shells and commands go through the agent: have it answer before saying done.
                // The guest never saw its old host go (connected before the state came), so
                // it is told: what the sender's sessions started must not wait on output
                // acknowledgements that will never come.
                let ready = agent.wait_ready(Duration::from_secs(10)).await;
                if let Err(err) = &ready {
                    tracing::warn!(vm = %vm.name, %err, "the guest agent of a VM that moved here does not answer yet");
                }
                let (name, agent) = (vm.name.clone(), agent.clone());
                tokio::spawn(async move {
                    if ready.is_err() {
                        let _ = agent.wait_ready(NEW_HOST_WAIT).await;
                    }
                    if let Err(err) = agent.new_host().await {
                        tracing::warn!(vm = %name, %err, "cannot tell the guest agent its host changed: what the old host's sessions started may wait on its output until the VM restarts");
                    }
                });
                // The live copy filled in every page of the memfd (see
                // `give_back_zero_pages_later`).
                if own_ram {
                    self.give_back_zero_pages_later(&here.id);
                }
                self.set_booted(&here.id, true);
                VmState::Running
            }
            None => {
                self.settle_arrival(&offer, &wants, arrival, Top::Rebase(&disk))
                    .await?;
                self.trusted_chain(&here).await.map_err(|e| e.message)?;
                self.commit_arrival(&vm, &here, vm.state, None, arrival)
                    .await?;
                vm.state
            }
        };
        tracing::info!(vm = %vm.name, from = %vm.host, state = state.as_str(), "a VM moved here");
        link.send(&MoveOut::Done).await
    }

    /// Refuses a running VM this host has no memory left for, counted as placement counts it.
    async fn room_for(&self, vm: &VmRecord) -> Result<(), String> {
        let me = &self.cfg.host_name;
        let hosts = self.store.hosts().await.map_err(|e| e.to_string())?;
        let mine: Vec<_> = hosts.into_iter().filter(|h| &h.host.name == me).collect();
        let placed = self
            .store
            .memory_placed()
            .await
            .map_err(|e| e.to_string())?;
        let need = u64::from(vm.memory_mib);
        if nook_store::place(&mine, &placed, me, need, i64::MAX).is_none() {
            let free = mine.first().map_or(0, |h| {
                h.host
                    .memory_mib
                    .saturating_sub(placed.get(me).copied().unwrap_or(0))
            });
            return Err(format!(
                "host '{me}' has {free} MiB of memory left for VMs and VM '{}' needs {need} MiB",
                vm.name
            ));
        }
        Ok(())
    }

    /// Takes the lease the sender released; a release the database did not get lapses within
    /// the lease's life, so keep trying that long.
    async fn take_released_lease(&self, vm: &VmRecord) -> Result<(), String> {
        let deadline = Instant::now() + fleet::LEASE_TTL + Duration::from_secs(5);
        loop {
            match self.take_lease(vm).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(vm = %vm.name, why = %e.message, "waiting for the moved VM's lease");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.message),
            }
        }
    }

    /// Records the VM as this host's (`here`), in `state`, if the sender still holds it as
    /// it was (`vm.state`). A commit whose answer was lost is found by reading the row again.
    async fn commit_arrival(
        &self,
        vm: &VmRecord,
        here: &VmRecord,
        state: VmState,
        pid: Option<u32>,
        arrival: &mut Arrival,
    ) -> Result<(), String> {
        let me = &self.cfg.host_name;
        let moved = self
            .store
            .move_vm(
                &vm.id,
                &nook_store::Handover {
                    from: &vm.host,
                    seen: vm.state,
                    to: me,
                    image_dir: &here.image_dir,
                    state,
                    pid,
                },
            )
            .await;
        let committed = match moved {
            Ok(done) => done,
            Err(err) => match self.row_after_unclear_commit(&vm.id).await {
                Some(row) => &row.host == me,
                None => {
                    arrival.unclear = true;
                    return Err(format!(
                        "cannot tell whether the hand-over was recorded: {err}"
                    ));
                }
            },
        };
        if !committed {
            return Err(format!(
                "VM '{}' was changed on host '{}' meanwhile (moved, started or given up)",
                vm.name, vm.host
            ));
        }
        arrival.committed = true;
        let _ = std::fs::remove_file(self.paths(&vm.id).dir.join(ARRIVING));
        Ok(())
    }

    /// The VM's row, read again after a commit whose answer was lost, for as long as a lease
    /// lives (past that this host is fenced off the database anyway).
    async fn row_after_unclear_commit(&self, id: &str) -> Option<VmRecord> {
        let deadline = Instant::now() + fleet::LEASE_TTL;
        loop {
            match self.store.get_by_id(id).await {
                Ok(row) => return Some(row),
                Err(err) if Instant::now() < deadline => {
                    tracing::warn!(vm = id, %err, "reading a moved VM's row again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// What of `offer` this host lacks for `vm`, and whether it has the room to take it.
    pub(super) fn wants(&self, vm: &VmRecord, offer: &MoveOffer) -> Result<Wants, String> {
        if !plain_name(&offer.image)
            || !offer.layers.iter().all(|l| plain_name(&l.0))
            || !offer.vm_files.iter().all(|f| plain_name(&f.0))
        {
            return Err("the offer names a file this host will not take".into());
        }
        let kind = ImageKind::from_str(&vm.image).map_err(|e| e.to_string())?;
        let image_dir = self.cfg.images_dir.join(&offer.image);
        let image = ImageStore::open_at(kind, &image_dir).is_err();
        let layers: Vec<String> = offer
            .layers
            .iter()
            .map(|l| l.0.clone())
            .filter(|l| !self.layers.dir().join(l).exists())
            .collect();
        let need: u64 = offer.top
            + offer
                .layers
                .iter()
                .filter(|l| layers.contains(&l.0))
                .map(|l| l.1)
                .sum::<u64>()
            + if image {
                offer.image_files.iter().map(|f| f.1).sum()
            } else {
                0
            };
        if let Some(free) = free_bytes(&self.cfg.data_dir)
            && free < need + (1 << 30)
        {
            return Err(format!(
                "host '{}' has {} free and the VM needs {} (and 1 GiB to spare)",
                self.cfg.host_name,
                format_size(free),
                format_size(need)
            ));
        }
        let incoming = self.layers.dir().join(INCOMING_LAYERS);
        std::fs::create_dir_all(&incoming)
            .map_err(|e| format!("cannot make {}: {e}", incoming.display()))?;
        let staging = self
            .cfg
            .images_dir
            .join(format!(".incoming-{}-{}", offer.image, vm.id));
        Ok(Wants {
            vm_id: vm.id.clone(),
            image,
            layers,
            image_dir,
            staging,
        })
    }

    /// Takes one file of the image build, a layer or the VM's own files (into `vm_dir`), each
    /// only if it was asked for.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn take_file<S>(
        &self,
        link: &mut MoveLink<S>,
        name: &str,
        size: u64,
        offer: &MoveOffer,
        wants: &Wants,
        vm_dir: &std::path::Path,
        arrival: &mut Arrival,
    ) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let offered =
            |files: &[(String, u64)], f: &str| files.iter().any(|(n, s)| n == f && *s == size);
        if !arrival.taken.insert(name.to_string()) {
            return Err(format!("the sending host sent {name:?} twice"));
        }
        let path = match name.split_once('/') {
            Some(("image", f))
                if wants.image && IMAGE_FILES.contains(&f) && offered(&offer.image_files, f) =>
            {
                std::fs::create_dir_all(&wants.staging).map_err(|e| e.to_string())?;
                arrival.staging = Some(wants.staging.clone());
                wants.staging.join(f)
            }
            Some(("layer", l))
                if wants.layers.iter().any(|w| w == l) && offered(&offer.layers, l) =>
            {
                arrival.layers.push(l.to_string());
                let staged = self.incoming_layer(&wants.vm_id, l);
                if let Some(dir) = staged.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                staged
            }
            Some(("vm", f)) if f.starts_with("ssh_") && offered(&offer.vm_files, f) => {
                vm_dir.join(f)
            }
            _ => {
                return Err(format!(
                    "the sending host sent {name:?} ({size} bytes), which was not asked for"
                ));
            }
        };
        receive_file(link, size, &path).await?;
        if name.starts_with("vm/") {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(())
    }

    /// Overwrites the placeholder top QEMU holds open with the `size` bytes coming over `link`.
    async fn write_in_place(
        &self,
        link: &mut MoveLink<PeerStream>,
        size: u64,
        path: &std::path::Path,
    ) -> Result<(), String> {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .await
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        link.recv_file(size, &mut file).await?;
        file.sync_all().await.map_err(|e| e.to_string())
    }

    /// Makes `file` name its backing file by this host's paths: the layer `layer`, or the
    /// image's base when there is none.
    async fn point_at(
        &self,
        file: &std::path::Path,
        layer: Option<&str>,
        image_dir: &std::path::Path,
    ) -> Result<(), String> {
        let backing = match layer {
            Some(l) => self.layers.dir().join(l),
            None => image_dir.join("rootfs.qcow2"),
        };
        let file = file.to_path_buf();
        let done = tokio::task::spawn_blocking(move || {
            // A header from another host is not opened with any name of its own in it.
            if nook_storage::layers::has_external_data_file(&file)? {
                return Err(nook_storage::StorageError::UntrustedChain {
                    disk: file.clone(),
                    what: "an external data file".into(),
                });
            }
            nook_storage::disk::set_backing(&file, &backing)
        })
        .await;
        done.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }

    /// Puts the files that arrived in their places: the image build under its name, each
    /// layer (backed by this host's paths) under its own; then makes or fixes `top` over the
    /// newest layer, all under the layers lock, so a collection never finds the layers
    /// unused in between.
    pub(super) async fn settle_arrival(
        &self,
        offer: &MoveOffer,
        wants: &Wants,
        arrival: &mut Arrival,
        top: Top<'_>,
    ) -> Result<(), String> {
        let image_dir = wants.image_dir.as_path();
        if let Some(staged) = arrival.staging.take() {
            match std::fs::rename(&staged, image_dir) {
                Ok(()) => {}
                // Another move brought the same build meanwhile.
                Err(_) if image_dir.join("manifest.json").exists() => {
                    let _ = std::fs::remove_dir_all(&staged);
                }
                Err(e) => {
                    return Err(format!(
                        "cannot place the image build {}: {e}",
                        image_dir.display()
                    ));
                }
            }
        }
        let _layers = self.layers_lock.lock().await;
        for (i, (name, _)) in offer.layers.iter().enumerate() {
            if !arrival.layers.contains(name) {
                continue;
            }
            let incoming = self.incoming_layer(&wants.vm_id, name);
            let placed = self.layers.dir().join(name);
            if placed.exists() {
                // Another arrival brought the same (immutable) layer meanwhile.
                let _ = std::fs::remove_file(&incoming);
                continue;
            }
            let next = offer.layers.get(i + 1).map(|l| l.0.as_str());
            self.point_at(&incoming, next, image_dir).await?;
            std::fs::rename(&incoming, &placed).map_err(|e| e.to_string())?;
            if nix::unistd::geteuid().is_root() {
                let _ = clone::freeze_ownership(&self.layers.dir().join(name));
            }
        }
        arrival.layers.clear();
        let _ = std::fs::remove_dir(self.incoming_layer(&wants.vm_id, "").as_path());
        let newest = offer.layers.first().map(|l| l.0.as_str());
        match top {
            Top::Overlay(path, size) => {
                let layer = newest
                    .map(|l| self.layers.dir().join(l))
                    .ok_or("no layer to put a top on")?;
                let path = path.to_path_buf();
                let made = tokio::task::spawn_blocking(move || {
                    nook_storage::disk::create_overlay_on_qcow2(&layer, &path, size)
                })
                .await;
                made.map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
            Top::Rebase(path) => self.point_at(path, newest, image_dir).await?,
        }
        Ok(())
    }

    /// Where a layer that is arriving is written until it is whole: apart from the layers,
    /// so that no collection takes it for an unused one.
    pub(super) fn incoming_layer(&self, vm_id: &str, name: &str) -> PathBuf {
        self.layers
            .dir()
            .join(INCOMING_LAYERS)
            .join(vm_id)
            .join(name)
    }

    /// After a move that did not arrive: the QEMU, the directory and the files that came.
    async fn undo_arrival(&self, vm_id: &str, arrival: &Arrival) {
        if arrival.committed {
            return;
        }
        if arrival.unclear {
            tracing::error!(
                vm = vm_id,
                "keeping a moved VM's files and ending its QEMU: whether it is this host's is unknown until the database answers"
            );
        }
        if let Some((slot, owner)) = &arrival.launched {
            kill_qemu_and_wait(&self.paths(vm_id)).await;
            self.release_runtime(vm_id, *slot, owner).await;
        }
        if arrival.unclear {
            return;
        }
        if arrival.dir {
            let _ = std::fs::remove_dir_all(self.paths(vm_id).dir);
        }
        if let Some(staged) = &arrival.staging {
            let _ = std::fs::remove_dir_all(staged);
        }
        for l in &arrival.layers {
            let _ = std::fs::remove_file(self.incoming_layer(vm_id, l));
        }
        self.collect_layers().await;
    }

    /// Hands a live move's memory stream to the move waiting for it.
    pub(crate) fn memory_arrived(
        &self,
        vm_id: &str,
        token: &str,
        stream: PeerStream,
    ) -> Result<(), String> {
        let mut waiting = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        match waiting.remove(vm_id) {
            Some((expected, tx)) if expected == token => {
                tx.send(stream).map_err(|_| "the move gave up".to_string())
            }
            Some(other) => {
                waiting.insert(vm_id.to_string(), other);
                Err("no move waits for that stream".into())
            }
            None => Err("no move waits for that stream".into()),
        }
    }

    /// Connects to the agent of a VM that moved here (or into a new QEMU), so shells and
    /// commands reach it.
    pub(super) async fn reconnect_agent(&self, vm: &VmRecord) {
        if let Err(err) = self.agent(vm).await {
            tracing::warn!(vm = %vm.name, error = %err.message, "the guest agent of a VM in its new QEMU does not answer");
        }
        self.set_booted(&vm.id, true);
    }
}

/// How long a VM that moved here may take to answer on its agent before the guest is told its
/// host changed (`AgentClient::new_host`) all the same.
const NEW_HOST_WAIT: Duration = Duration::from_secs(120);

/// Receives a file of `size` bytes into a new file at `path`, on disk before this returns.
async fn receive_file<S>(
    link: &mut MoveLink<S>,
    size: u64,
    path: &std::path::Path,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    link.recv_file(size, &mut file).await?;
    file.sync_all().await.map_err(|e| e.to_string())
}

/// How the top of a disk that arrived is made once its layers are in place.
pub(super) enum Top<'a> {
    /// A new empty top of this size over the newest layer.
    Overlay(&'a std::path::Path, u64),
    /// A top that came, renamed to back onto the newest layer (or the base) here.
    Rebase(&'a std::path::Path),
}

/// What a receiving host lacks of an offer.
pub(super) struct Wants {
    pub(super) vm_id: String,
    pub(super) image: bool,
    pub(super) layers: Vec<String>,
    /// Where the image build is (or goes) on this host.
    pub(super) image_dir: PathBuf,
    /// Where an image build that comes is put together.
    pub(super) staging: PathBuf,
}

/// What a move that is arriving has made here so far, to undo if it fails.
#[derive(Default)]
pub(super) struct Arrival {
    pub(super) dir: bool,
    pub(super) staging: Option<PathBuf>,
    /// Layers received and not yet in place.
    pub(super) layers: Vec<String>,
    /// Files taken so far, each at most once.
    pub(super) taken: HashSet<String>,
    /// The slot and owner of a QEMU launched (or tried) for it.
    pub(super) launched: Option<(u32, String)>,
    pub(super) committed: bool,
    /// Whether the hand-over was recorded could not be told: the files stay (the VM may be
    /// this host's now), its QEMU does not (nothing may run a VM two hosts might hold).
    pub(super) unclear: bool,
}
