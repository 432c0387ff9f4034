//! Replicas: a VM's disk kept on a second host, so that `start VM --on HOST2` can bring it
//! back when its own host is gone (`replicate VM HOST`).
//!
//! Every `--replicate-every-secs` (and at once when asked) the VM's host freezes the VM's top
//! as a layer (as `cp` does; nothing is copied here) if it was written since the last replica,
//! and sends the replica host the layers it lacks over the host channel, as a move would.
//! The replica host keeps `replicas/ID/disk.qcow2`, an empty top over the newest layer, with
//! the VM's SSH keys and the name of its image build. Layers are immutable, so a replica is
//! always a whole, consistent disk as of one instant: the recovery point is the last
//! complete replica (`replicated_at_ms`), at most one period plus a transfer old.
//!
//! Restoring (`start VM --on HOST2`) is allowed only while the VM's host is down, and only
//! once its lease has lapsed (`take_lease` refuses until then): a host that is merely cut off
//! has paused the VM by then (fencing), and is refused its lease when it returns, so the VM
//! never runs twice.

use super::*;

use clone::NEXT_DISK;
use migrate::Arrival;
use nook_channel::{MoveIn, MoveLink, MoveOut, PeerStream};

/// Where this host keeps the replicas it holds for other hosts.
const REPLICAS_DIR: &str = "replicas";
/// The file in a replica naming the image build its chain ends in.
const IMAGE_NAME_FILE: &str = "image";
/// The file in a VM's directory holding its top's modification time right after the last
/// freeze for a replica: a top still at that time has nothing new to send.
const REPLICATED_TOP_FILE: &str = "replicated-top";

/// A replica's content, frozen and ready to send.
struct Prepared {
    offer: nook_channel::MoveOffer,
    below: Vec<PathBuf>,
    image: Image,
    started_ms: i64,
}

/// What one round of replication did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replicated {
    pub vm: String,
    pub host: String,
    /// Bytes sent this round (0: nothing was written since the last replica).
    pub bytes_sent: u64,
    /// When the replica now held was complete, in ms since the epoch.
    pub replicated_at_ms: i64,
    pub every_secs: u64,
}

fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

fn modified_ms(path: &std::path::Path) -> Option<i64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as i64,
    )
}

impl Manager {
    fn replicas_dir(&self) -> PathBuf {
        self.cfg.data_dir.join(REPLICAS_DIR)
    }

    fn replica_dir(&self, vm_id: &str) -> PathBuf {
        self.replicas_dir().join(vm_id)
    }

    /// The tops the layer collector must treat as in use: each replica held here.
    pub(super) fn replica_tops(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.replicas_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("disk.qcow2"))
            .collect()
    }

    /// `replicate VM HOST`: keeps a replica of `name`'s disk on `host`, the first one made at
    /// once; `replicate VM --off` (`host` None) stops.
    pub async fn set_replica(
        self: &Arc<Self>,
        name: &str,
        host: Option<&str>,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<Option<Replicated>, ApiError> {
        if self.fleet.is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "This host is not part of a fleet (its store is SQLite): there is no other host to keep a replica",
            ));
        }
        let vm = self.lock_vm(name, scope).await?;
        let Some(host) = host else {
            self.store
                .set_replica(&vm.id, "")
                .await
                .map_err(|e| errors::from_store("stop the replicas", e))?;
            return Ok(None);
        };
        if host == self.cfg.host_name {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "VM '{}' lives on host '{host}': its replica must be on another host",
                    vm.name
                ),
            ));
        }
        let hosts = self.hosts().await?;
        self.check_host(&hosts, host, &format!("a replica on {host}"))?;
        self.store
            .set_replica(&vm.id, host)
            .await
            .map_err(|e| errors::from_store("record the replica's host", e))?;
        let vm = self
            .store
            .get_by_id(&vm.id)
            .await
            .map_err(|e| errors::from_store("read the VM", e))?;
        progress(&format!("sending the first replica to {host}"));
        self.replicate_once(&vm).await.map(Some)
    }

    /// Sends `vm`'s replica host what it lacks of the disk as it is now. The caller holds the
    /// VM's op lock, and may let it go between [`Self::prepare_replica`] and
    /// [`Self::send_replica`]: what is sent is frozen layers, which nothing changes.
    async fn replicate_once(&self, vm: &VmRecord) -> Result<Replicated, ApiError> {
        match self.prepare_replica(vm).await? {
            Some(prepared) => self.send_replica(vm, prepared).await,
            None => Ok(self.replicated(vm, 0, vm.replicated_at_ms)),
        }
    }

    fn replicated(&self, vm: &VmRecord, bytes_sent: u64, at_ms: i64) -> Replicated {
        Replicated {
            vm: vm.name.clone(),
            host: vm.replica_host.clone(),
            bytes_sent,
            replicated_at_ms: at_ms,
            every_secs: self.cfg.replicate_every.as_secs(),
        }
    }

    /// Freezes the VM's top if it was written since the last replica (`None`: it was not),
    /// and says what the replica is made of.
    async fn prepare_replica(&self, vm: &VmRecord) -> Result<Option<Prepared>, ApiError> {
        let paths = self.paths(&vm.id);
        let (top, seen_file) = (paths.disk(), paths.dir.join(REPLICATED_TOP_FILE));
        // The top as it was right after the last freeze: unchanged since means nothing new.
        let seen = std::fs::read_to_string(&seen_file).ok();
        let now = modified_ms(&top).map(|m| m.to_string());
        if vm.replicated_at_ms > 0 && seen.is_some() && seen == now {
            return Ok(None);
        }
        let started_ms = now_ms();
        match vm.state {
            VmState::Running => self.freeze_top(vm).await?,
            VmState::Stopped | VmState::Failed => self.freeze_stopped(vm).await?,
            other => {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "VM '{}' is {}: it is replicated once it is running or stopped",
                        vm.name,
                        other.as_str()
                    ),
                ));
            }
        }
        if let Some(m) = modified_ms(&top) {
            let _ = std::fs::write(&seen_file, m.to_string());
        }
        let image = self.image_of(vm)?;
        let (offer, below) = self.offer(vm, &image, 0).await?;
        Ok(Some(Prepared {
            offer,
            below,
            image,
            started_ms,
        }))
    }

    async fn send_replica(&self, vm: &VmRecord, p: Prepared) -> Result<Replicated, ApiError> {
        let to = vm.replica_host.clone();
        let failed = |why: String| {
            ApiError::new(
                ErrorCode::Internal,
                format!("Replicating VM '{}' to host '{to}' failed: {why}", vm.name),
            )
        };
        let (identity, addr) = self
            .channel_route(&to)
            .await
            .map_err(|why| failed(format!("cannot reach it: {why}")))?;
        let mut link = nook_channel::start_replica(&identity, &to, &addr, &vm.id)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let sent = self
            .send_what_is_wanted(
                &mut link,
                &vm.id,
                p.offer,
                &p.image,
                &p.below,
                &|_: &str| {},
            )
            .await
            .map_err(|e| failed(e.message))?;
        link.send(&MoveIn::Commit).await.map_err(failed)?;
        match migrate::expect::<_, MoveOut>(&mut link, "finishing the replica").await {
            Ok(MoveOut::Done) => {}
            Ok(MoveOut::Failed { why }) | Err(why) => return Err(failed(why)),
            Ok(other) => return Err(failed(format!("unexpected answer {other:?}"))),
        }
        // The replica is of the instant the top was frozen, which came after `started_ms`.
        self.store
            .replicated(&vm.id, &to, p.started_ms)
            .await
            .map_err(|e| errors::from_store("record the replica", e))?;
        tracing::info!(vm = %vm.name, to, sent, "replicated");
        Ok(self.replicated(vm, sent, p.started_ms))
    }

    /// Freezes a stopped VM's top as a layer under a fresh empty top.
    async fn freeze_stopped(&self, vm: &VmRecord) -> Result<(), ApiError> {
        let _layers = self.layers_lock.lock().await;
        let paths = self.paths(&vm.id);
        let (layer_store, disk, next, size) = (
            self.layers.clone(),
            paths.disk(),
            paths.dir.join(NEXT_DISK),
            vm.disk_bytes,
        );
        let root = nix::unistd::geteuid().is_root();
        let made = tokio::task::spawn_blocking(move || {
            let layer = layer_store.freeze(&disk)?;
            nook_storage::disk::create_overlay_on_qcow2(&layer, &next, size)?;
            std::fs::rename(&next, &disk).map_err(|e| nook_storage::StorageError::Io {
                action: "move the VM onto its new disk top",
                path: disk.clone(),
                source: e,
            })?;
            if root && let Err(e) = clone::freeze_ownership(&layer) {
                tracing::warn!(%e, layer = %layer.display(), "could not make a new layer root's");
            }
            Ok::<_, nook_storage::StorageError>(())
        })
        .await;
        map_join(made, "freeze the disk")?.map_err(|e| errors::from_storage("freeze the disk", e))
    }

    /// Every period: each VM here with a replica host that is up gets a round; replicas held
    /// here for VMs that no longer name this host are deleted.
    pub(super) async fn replicate_round(self: &Arc<Self>) {
        let me = self.cfg.host_name.clone();
        let Ok(vms) = self.store.list_on_host(&me).await else {
            return;
        };
        for vm in vms.iter().filter(|v| !v.replica_host.is_empty()) {
            if self.host_down(&vm.replica_host).is_some() {
                continue;
            }
            let lock = self.op_lock(&vm.id);
            // A VM busy with something else gets its replica next round.
            let Ok(guard) = lock.try_lock() else {
                continue;
            };
            let Ok(vm) = self.store.get_by_id(&vm.id).await else {
                continue;
            };
            if vm.host != me || vm.replica_host.is_empty() {
                continue;
            }
            let prepared = self.prepare_replica(&vm).await;
            // Only frozen layers travel: the VM's own commands need not wait for the network.
            drop(guard);
            let sent = match prepared {
                Ok(Some(prepared)) => self.send_replica(&vm, prepared).await.map(|_| ()),
                Ok(None) => Ok(()),
                Err(err) => Err(err),
            };
            if let Err(err) = sent {
                tracing::warn!(vm = %vm.name, error = %err.message, "replication failed; trying again next round");
            }
            // Each round that froze added a layer: keep the chain short.
            self.flatten_later(&vm.id);
        }
        let mut swept = false;
        for entry in std::fs::read_dir(self.replicas_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let lock = self.op_lock(&id);
            let _guard = lock.lock().await;
            let stale = match self.store.get_by_id(&id).await {
                Ok(vm) => vm.replica_host != me,
                Err(nook_store::StoreError::NotFound(_)) => true,
                Err(_) => false,
            };
            if stale {
                let _layers = self.layers_lock.lock().await;
                let _ = std::fs::remove_dir_all(entry.path());
                swept = true;
            }
        }
        if swept {
            self.collect_layers().await;
        }
    }

    /// Keeps the replica a peer sends (the peer's `replicate_once`), answering over `link`.
    pub(crate) async fn take_replica(
        &self,
        peer: nook_channel::Peer,
        vm_id: &str,
        mut link: MoveLink<PeerStream>,
    ) {
        let lock = self.op_lock(vm_id);
        let _guard = lock.lock().await;
        let mut arrival = Arrival::default();
        let outcome = self
            .receive_replica(&peer, vm_id, &mut link, &mut arrival)
            .await;
        if let Err(why) = &outcome {
            tracing::warn!(vm = vm_id, why, "a replica sent here did not arrive whole");
            let _ = link.send(&MoveOut::Failed { why: why.clone() }).await;
            if let Some(staged) = &arrival.staging {
                let _ = std::fs::remove_dir_all(staged);
            }
            for l in &arrival.layers {
                let _ = std::fs::remove_file(self.incoming_layer(vm_id, l));
            }
        }
        let _ = std::fs::remove_dir_all(self.replicas_dir().join(format!(".{vm_id}.new")));
    }

    async fn receive_replica(
        &self,
        peer: &nook_channel::Peer,
        vm_id: &str,
        link: &mut MoveLink<PeerStream>,
        arrival: &mut Arrival,
    ) -> Result<(), String> {
        let me = &self.cfg.host_name;
        let vm = self
            .store
            .get_by_id(vm_id)
            .await
            .map_err(|e| format!("cannot read the VM's row here: {e}"))?;
        if &vm.replica_host != me || &vm.host == me || !peer.is(&vm.host) {
            return Err(format!(
                "host '{me}' is not VM '{}''s replica host",
                vm.name
            ));
        }
        let Ok(MoveIn::Offer(offer)) =
            migrate::expect::<_, MoveIn>(link, "waiting for the offer").await
        else {
            return Err("the replica did not begin with its offer".into());
        };
        if offer.layers.is_empty() {
            return Err("a replica has at least one layer".into());
        }
        let wants = self.wants(&vm, &offer)?;
        let new = self.replicas_dir().join(format!(".{vm_id}.new"));
        let _ = std::fs::remove_dir_all(&new);
        std::fs::create_dir_all(&new).map_err(|e| format!("cannot make {}: {e}", new.display()))?;
        link.send(&MoveOut::Want {
            image: wants.image,
            layers: wants.layers.clone(),
        })
        .await?;
        loop {
            match migrate::expect::<_, MoveIn>(link, "receiving").await? {
                MoveIn::File { name, size } => {
                    self.take_file(link, &name, size, &offer, &wants, &new, arrival)
                        .await?;
                }
                MoveIn::Commit => break,
                other => return Err(format!("the replica sent {other:?} out of turn")),
            }
        }
        self.settle_arrival(
            &offer,
            &wants,
            arrival,
            migrate::Top::Overlay(&new.join("disk.qcow2"), vm.disk_bytes),
        )
        .await?;
        std::fs::write(new.join(IMAGE_NAME_FILE), &offer.image).map_err(|e| e.to_string())?;
        // The new replica takes the old one's place whole, or not at all.
        let dir = self.replica_dir(vm_id);
        let old = self.replicas_dir().join(format!(".{vm_id}.old"));
        {
            // A collection between the renames would see neither replica.
            let _layers = self.layers_lock.lock().await;
            let _ = std::fs::remove_dir_all(&old);
            let _ = std::fs::rename(&dir, &old);
            std::fs::rename(&new, &dir).map_err(|e| format!("cannot keep the replica: {e}"))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        self.collect_layers().await;
        link.send(&MoveOut::Done).await
    }

    /// `start VM --on HOST`, run on HOST: brings back a VM whose host is down from the replica
    /// kept here, as of that replica.
    pub async fn start_from_replica(
        self: &Arc<Self>,
        name: &str,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<(VmInfo, i64), ApiError> {
        let me = self.cfg.host_name.clone();
        let vm = self.record(name, scope).await?;
        if vm.host.is_empty() || vm.host == me {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "VM '{}' lives on host '{me}' already: start it without --on",
                    vm.name
                ),
            ));
        }
        if vm.replica_host != me || !self.replica_dir(&vm.id).join("disk.qcow2").is_file() {
            let kept = if vm.replica_host.is_empty() {
                "it has no replica (`replicate VM HOST` keeps one)".to_string()
            } else {
                format!("its replica is on host '{}'", vm.replica_host)
            };
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("VM '{}' cannot start on host '{me}': {kept}", vm.name),
            ));
        }
        if self.host_down(&vm.host).is_none() {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "VM '{}' lives on host '{}', which is up: start it there, or `move` it here",
                    vm.name, vm.host
                ),
            ));
        }
        let lock = self.op_lock(&vm.id);
        let _guard = lock.lock().await;
        // Refused while the old host's lease lasts: a host that is only cut off has paused
        // the VM by now, and is refused the lease when it is back.
        self.take_lease(&vm).await?;
        let restored = async {
            let replica = self.replica_dir(&vm.id);
            let image_name = std::fs::read_to_string(replica.join(IMAGE_NAME_FILE))
                .map_err(|e| io_error("read the replica", e))?;
            let image_dir = self.cfg.images_dir.join(image_name.trim());
            let dir = self.paths(&vm.id).dir;
            if dir.exists() {
                // What an earlier move or replica left: the row names another host.
                let _ = std::fs::remove_dir_all(&dir);
            }
            {
                // A collection must see the replica's top in one place or the other.
                let _layers = self.layers_lock.lock().await;
                std::fs::rename(&replica, &dir).map_err(|e| io_error("take up the replica", e))?;
            }
            let moved = self
                .store
                .move_vm(
                    &vm.id,
                    &nook_store::Handover {
                        from: &vm.host,
                        seen: vm.state,
                        to: &me,
                        image_dir: &image_dir.display().to_string(),
                        state: VmState::Stopped,
                        pid: None,
                    },
                )
                .await;
            let taken = match moved {
                Ok(moved) => moved,
                // A commit whose answer was lost: the row says.
                Err(e) => match self.store.get_by_id(&vm.id).await {
                    Ok(row) => row.host == me,
                    Err(_) => return Err(errors::from_store("take the VM over", e)),
                },
            };
            if !taken {
                // Not this host's: the replica goes back to being one.
                let _layers = self.layers_lock.lock().await;
                let _ = std::fs::rename(&dir, &replica);
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!("VM '{}' was moved, started or removed meanwhile", vm.name),
                ));
            }
            let _ = std::fs::remove_file(dir.join(IMAGE_NAME_FILE));
            Ok(())
        }
        .await;
        self.drop_lease(&vm.id).await;
        restored?;
        drop(_guard);
        tracing::warn!(vm = %vm.name, from = %vm.host, as_of_ms = vm.replicated_at_ms, "restored a VM from its replica");
        progress(&format!(
            "{} now lives on {me}, restored from its replica; starting it",
            vm.name
        ));
        let info = self.start(name, scope, progress).await?;
        Ok((info, vm.replicated_at_ms))
    }
}
