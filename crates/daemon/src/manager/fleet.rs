//! Hosts sharing one PostgreSQL store: this host's heartbeat, and the leases that let it run
//! its VMs (ARCHITECTURE.md, "Leases and fencing").
//!
//! A VM's QEMU starts only under a lease this host took (`take_lease`, in `launch`). Every
//! `RENEW_EVERY` the host renews its leases at their epochs. A renewal the database refuses
//! means another host took the VM over: the VM is killed at once. A renewal that cannot be
//! made (the database is unreachable) lets the lease run down; before it can lapse
//! (`FENCE_AFTER`, counted from when the last good renewal was *sent*) the VM is paused, so
//! it never runs once another host may start it, and it goes on at the next good renewal.
//! With SQLite there is one host and no leases.

use super::*;
use nook_vmm::fence_watch;

/// How long a lease lasts past its last renewal.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often leases are renewed and the heartbeat written.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long after its last good renewal was sent a VM is paused: well inside `LEASE_TTL`, so
/// it is paused before another host may take the lease, with room for this host's clock to
/// run slow and for a pause that takes a while.
const FENCE_AFTER: Duration = Duration::from_secs(10);
/// A renewal (or heartbeat) that takes longer than this counts as failed.
const RENEW_TIMEOUT: Duration = Duration::from_secs(3);
/// A VM whose pause does not answer within this is killed instead.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// What `ls` and `stat` say about a VM paused for want of its lease.
pub(crate) const FENCED_REASON: &str = "paused: this host cannot reach the fleet's database, so it cannot prove it still owns the VM; it goes on once it can";

/// A lease this host holds.
struct Held {
    epoch: i64,
    /// When the last renewal the database granted was sent.
    renewed: Instant,
}

/// This host's part of the fleet.
pub(crate) struct Fleet {
    name: String,
    /// This host's id: random, kept in `DATA_DIR/host-id`, so a restart is the same host and
    /// another machine under the same name is not (see `Store::claim_host`).
    instance: String,
    addr: String,
    started_at_ms: i64,
    held: std::sync::Mutex<HashMap<String, Held>>,
    /// VMs paused because their lease is running down.
    fenced: std::sync::Mutex<HashSet<String>>,
    /// Other hosts that missed their heartbeats, as of the last renewal round: how long
    /// since each last beat, and when that was learnt.
    down: std::sync::Mutex<HashMap<String, (Duration, Instant)>>,
    /// Where each host of the fleet takes channel connections, as of the last round.
    addrs: std::sync::Mutex<HashMap<String, String>>,
    /// This host's certificate for the host channel, once it listens.
    pub(super) channel: std::sync::OnceLock<nook_channel::HostIdentity>,
}

impl Fleet {
    pub(crate) fn new(name: &str, addr: &str, instance: String) -> Self {
        Self {
            name: name.to_string(),
            instance,
            addr: addr.to_string(),
            started_at_ms: time::OffsetDateTime::now_utc().unix_timestamp() * 1000,
            held: Default::default(),
            fenced: Default::default(),
            down: Default::default(),
            addrs: Default::default(),
            channel: Default::default(),
        }
    }

    /// Where `host` takes channel connections.
    pub(super) fn addr_of(&self, host: &str) -> Option<String> {
        self.addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .map(|a| nook_channel::with_port(a))
    }

    /// Takes in the fleet's hosts as the store lists them.
    fn saw_hosts(&self, hosts: &[nook_store::HostStatus]) {
        let now = Instant::now();
        let down = hosts
            .iter()
            .filter(|h| h.host.name != self.name && !host_is_up(h))
            .map(|h| {
                let age = Duration::from_millis(h.since_heartbeat_ms.max(0) as u64);
                (h.host.name.clone(), (age, now))
            })
            .collect();
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = down;
        *self.addrs.lock().unwrap_or_else(|p| p.into_inner()) = hosts
            .iter()
            .map(|h| (h.host.name.clone(), h.host.addr.clone()))
            .collect();
    }

    pub(crate) fn is_fenced(&self, vm_id: &str) -> bool {
        // (Also asked before any other `cont`: a fenced VM runs no instruction.)
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(vm_id)
    }

    fn set_fenced(&self, vm_id: &str, fenced: bool) -> bool {
        let mut set = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if fenced {
            set.insert(vm_id.to_string())
        } else {
            set.remove(vm_id)
        }
    }

    /// The leases to renew: VM id and epoch.
    fn held(&self) -> Vec<(String, i64)> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, h)| (id.clone(), h.epoch))
            .collect()
    }

    /// Each VM held, and when its last good renewal was sent.
    fn renewals(&self) -> Vec<(String, Instant)> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, h)| (id.clone(), h.renewed))
            .collect()
    }

    /// The VMs whose last good renewal was sent longer than `FENCE_AFTER` ago.
    fn overdue(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| h.renewed.elapsed() > FENCE_AFTER)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn renewed(&self, vm_id: &str, epoch: i64, sent: Instant) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get_mut(vm_id).filter(|h| h.epoch == epoch) {
            h.renewed = sent;
        }
    }

    fn down_names(&self) -> HashSet<String> {
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn forget(&self, vm_id: &str, epoch: i64) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(vm_id).is_some_and(|h| h.epoch == epoch) {
            held.remove(vm_id);
            return true;
        }
        false
    }
}

/// This host's id, made on first use and kept in the data dir.
pub(crate) fn host_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(rand::random::<[u8; 8]>());
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

impl Manager {
    /// Takes the VM's lease for this host before its QEMU starts; refuses, saying where it
    /// runs, while another host holds it.
    pub(super) async fn take_lease(&self, vm: &VmRecord) -> Result<(), ApiError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let sent = Instant::now();
        let ttl = LEASE_TTL.as_millis() as i64;
        match self.store.acquire_lease(&vm.id, &fleet.name, ttl).await {
            Ok(Ok(lease)) => {
                fleet.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    vm.id.clone(),
                    Held {
                        epoch: lease.epoch,
                        renewed: sent,
                    },
                );
                fleet.set_fenced(&vm.id, false);
                self.publish_fence();
                Ok(())
            }
            Ok(Err(held)) => Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "VM '{}' is running on host '{}' (its lease there has {} s to run); it can start here once that host stops it or its lease lapses",
                    vm.name,
                    held.host,
                    (held.remaining_ms.max(0) as u64).div_ceil(1000)
                ),
            )),
            Err(e) => Err(errors::from_store("take the VM's lease", e)),
        }
    }

    /// Gives up the lease of a VM whose QEMU is gone.
    pub(super) async fn drop_lease(&self, vm_id: &str) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let epoch = fleet
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm_id)
            .map(|h| h.epoch);
        fleet.set_fenced(vm_id, false);
        self.publish_fence();
        if let Some(epoch) = epoch
            && let Err(err) = self.store.release_lease(vm_id, &fleet.name, epoch).await
        {
            // It lapses by itself within LEASE_TTL.
            tracing::warn!(%err, vm = vm_id, "could not release a VM's lease");
        }
    }

    /// Tells the fence watch which QEMUs run under this host's leases, and until when they
    /// may (see `crate::fence_watch`), starting the watch when there is something to guard.
    pub(super) fn publish_fence(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let now = fence_watch::boottime_ms();
        let qemus: Vec<fence_watch::Guarded> = fleet
            .renewals()
            .into_iter()
            .filter_map(|(id, sent)| {
                let pid = self.qemu_pid(&id)?;
                let left = fence_watch::WATCH_AFTER.saturating_sub(sent.elapsed());
                fence_watch::Guarded::of(&id, pid, now + left.as_millis() as u64)
            })
            .collect();
        let guards = !qemus.is_empty();
        let data_dir = &self.cfg.data_dir;
        if let Err(err) = fence_watch::publish(data_dir, qemus) {
            tracing::error!(%err, "cannot write the fence watch's file: if this daemon dies, its VMs run on unfenced");
            return;
        }
        if guards {
            let started =
                std::env::current_exe().and_then(|exe| fence_watch::ensure_running(data_dir, &exe));
            if let Err(err) = started {
                tracing::error!(%err, "cannot start the fence watch: if this daemon dies, its VMs run on unfenced");
            }
        }
    }

    /// The pid of VM `id`'s QEMU, while one runs (its pidfile alone is not trusted).
    pub(super) fn qemu_pid(&self, id: &str) -> Option<u32> {
        let paths = self.paths(id);
        let pid = nook_vmm::qemu::read_pid(&paths.pidfile()).ok()?;
        let qemu = Qemu {
            binary: PathBuf::new(),
        };
        qemu.is_running(pid, &paths).then_some(pid)
    }

    /// Lets a QEMU the fence watch stopped go on, now that its lease is held again.
    pub(super) fn resume_from_watch(&self, id: &str) {
        let Some(pid) = self.qemu_pid(id) else {
            return;
        };
        if let Some(guarded) = fence_watch::Guarded::of(id, pid, 0)
            && fence_watch::resume(&guarded)
        {
            tracing::warn!(
                vm = id,
                pid,
                "resumed a QEMU the fence watch had stopped (its lease is held again)"
            );
        }
    }

    /// Registers this host, refusing a name another live daemon holds, and runs the fleet's
    /// duties for the daemon's life: heartbeats, renewals, fencing.
    pub async fn start_fleet(self: &Arc<Self>) -> Result<(), ApiError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let row = self.host_row(fleet).await;
        let fresh = (3 * RENEW_EVERY).as_millis() as i64;
        match self.store.claim_host(&row, fresh).await {
            Ok(Ok(())) => {}
            Ok(Err(since_ms)) => {
                return Err(ApiError::new(
                    ErrorCode::HostMisconfigured,
                    format!(
                        "Another nook host named '{}' is up (it beat {} s ago): give this one its own --host-name",
                        fleet.name,
                        since_ms.max(0) / 1000
                    ),
                ));
            }
            Err(e) => return Err(errors::from_store("register this host", e)),
        }
        let identity = self.start_channel().await?;
        let _ = fleet.channel.set(identity);
        self.look_at_hosts(fleet).await;
        every(self, Duration::from_secs(1), |m| async move {
            m.fence_overdue().await
        });
        every(self, RENEW_EVERY, |m| async move { m.renew_round().await });
        every(self, self.cfg.replicate_every, |m| async move {
            m.replicate_round().await
        });
        // Apart from the renewals, so a slow listing never delays one.
        every(self, RENEW_EVERY, |m| async move {
            if let Some(fleet) = &m.fleet {
                m.look_at_hosts(fleet).await;
            }
        });
        Ok(())
    }

    /// Pauses every VM whose lease may lapse before the next renewal could land, all at
    /// once: a pause that does not answer within `PAUSE_TIMEOUT` is a kill.
    async fn fence_overdue(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let overdue: Vec<String> = fleet
            .overdue()
            .into_iter()
            .filter(|id| !fleet.is_fenced(id))
            .collect();
        futures::future::join_all(overdue.iter().map(|id| self.fence(fleet, id))).await;
    }

    async fn fence(&self, fleet: &Fleet, id: &str) {
        let Some(qmp) = self.live_qmp_by_id(id) else {
            return;
        };
        // The fence watch got there first (this daemon was stalled): the QEMU runs nothing,
        // and would not answer QMP; the next good renewal lets it go on.
        if self.qemu_pid(id).is_some_and(fence_watch::is_stopped) {
            fleet.set_fenced(id, true);
            tracing::warn!(vm = %id, "VM stopped by the fence watch: its lease could not be renewed in time");
            return;
        }
        match tokio::time::timeout(PAUSE_TIMEOUT, qmp.execute("stop", None)).await {
            Ok(Ok(_)) => {
                fleet.set_fenced(id, true);
                tracing::warn!(vm = %id, "VM paused: its lease cannot be renewed (the fleet's database is unreachable)");
            }
            Ok(Err(err)) => {
                tracing::error!(vm = %id, %err, "could not pause a VM whose lease runs down; killing it");
                self.kill_for_lease(id, "stopped: its lease could not be renewed")
                    .await;
            }
            Err(_) => {
                tracing::error!(vm = %id, "pausing a VM whose lease runs down took too long; killing it");
                self.kill_for_lease(id, "stopped: its lease could not be renewed")
                    .await;
            }
        }
    }

    /// One round: the heartbeat, then every lease renewed at once. The heartbeat has its own
    /// time limit, so a slow one never eats into the renewal's.
    async fn renew_round(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let ttl = LEASE_TTL.as_millis() as i64;
        let held = fleet.held();
        let ids: Vec<String> = held.iter().map(|(id, _)| id.clone()).collect();
        let sent = Instant::now();
        let renewal = tokio::time::timeout(
            RENEW_TIMEOUT,
            self.store.renew_leases(&fleet.name, &ids, ttl),
        )
        .await;
        match renewal {
            Ok(Ok(renewed)) => {
                let renewed: HashMap<String, i64> = renewed.into_iter().collect();
                let mut kept = Vec::new();
                for (id, epoch) in held {
                    if renewed.get(&id).is_some_and(|e| *e >= epoch) {
                        fleet.renewed(&id, epoch, sent);
                        kept.push(id);
                    } else {
                        self.lost(fleet, &id, epoch).await;
                    }
                }
                // The watch learns of the renewal before any QEMU it stopped goes on.
                self.publish_fence();
                for id in kept {
                    self.resume_from_watch(&id);
                    if fleet.is_fenced(&id) {
                        self.unfence(&id).await;
                    }
                }
            }
            Ok(Err(err)) => tracing::warn!(%err, "could not renew the VMs' leases"),
            Err(_) => tracing::warn!("renewing the VMs' leases timed out; they run down"),
        }
        let row = self.host_row(fleet).await;
        match tokio::time::timeout(RENEW_TIMEOUT, self.store.heartbeat(&row)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
    }

    /// Learns which other hosts are down. Without an answer the last one stands: a host
    /// that cannot reach the database cannot tell, and says nothing new.
    pub(super) async fn look_at_hosts(&self, fleet: &Fleet) {
        match tokio::time::timeout(RENEW_TIMEOUT, self.store.hosts()).await {
            Ok(Ok(hosts)) => {
                let was: HashSet<String> = fleet.down_names();
                fleet.saw_hosts(&hosts);
                let now = fleet.down_names();
                for name in now.difference(&was) {
                    tracing::warn!(host = %name, "host missed its heartbeats: its VMs are unavailable");
                }
                for name in was.difference(&now) {
                    tracing::info!(host = %name, "host is back");
                }
            }
            Ok(Err(err)) => tracing::debug!(%err, "could not list the hosts"),
            Err(_) => tracing::debug!("listing the hosts timed out"),
        }
    }

    /// Why a VM on `host` cannot be reached, when that host is down.
    pub(crate) fn host_down(&self, host: &str) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        let down = fleet.down.lock().unwrap_or_else(|p| p.into_inner());
        let (age, learnt) = down.get(host)?;
        Some(format!(
            "its host '{host}' is down (no heartbeat for {} s)",
            (*age + learnt.elapsed()).as_secs()
        ))
    }

    /// A renewal did not find the lease at this epoch. Unless it was taken again here
    /// meanwhile (a restart racing the renewal), another host has the VM: it dies here.
    async fn lost(&self, fleet: &Fleet, id: &str, epoch: i64) {
        let holder = match self.store.lease(id).await {
            Ok(Some(lease))
                if lease.host == fleet.name && lease.epoch >= epoch && lease.expires_at_ms > 0 =>
            {
                return;
            }
            Ok(Some(lease)) if lease.host != fleet.name => format!("host '{}'", lease.host),
            Ok(_) => "another host".to_string(),
            // Unknown: the next round asks again; fencing covers the meantime.
            Err(_) => return,
        };
        if !fleet.forget(id, epoch) {
            return; // Taken again meanwhile: a new epoch.
        }
        tracing::error!(vm = %id, %holder, "VM's lease was taken over; stopping it here");
        self.kill_for_lease(id, &format!("stopped: {holder} took it over"))
            .await;
    }

    async fn unfence(&self, id: &str) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        if self.is_disk_full(id) {
            // Paused for the disk too: the disk watcher lets it go on once there is room.
            fleet.set_fenced(id, false);
            return;
        }
        if let Some(qmp) = self.live_qmp_by_id(id) {
            // Bounded, so one QEMU that does not answer cannot hold back the next renewal.
            match tokio::time::timeout(PAUSE_TIMEOUT, qmp.execute("cont", None)).await {
                Ok(Ok(_)) => {
                    fleet.set_fenced(id, false);
                    tracing::info!(vm = %id, "VM goes on: its lease is renewed");
                }
                Ok(Err(err)) => tracing::warn!(vm = %id, %err, "could not resume a VM"),
                Err(_) => {
                    tracing::warn!(vm = %id, "resuming a VM took too long; trying again at the next renewal")
                }
            }
        } else {
            fleet.set_fenced(id, false);
        }
    }

    /// Kills a VM this host may no longer run, and records why.
    pub(super) async fn kill_for_lease(&self, id: &str, reason: &str) {
        if let Some(fleet) = &self.fleet {
            fleet
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            fleet.set_fenced(id, false);
        }
        match self.store.get_by_id(id).await {
            Ok(vm) if !vm.host.is_empty() && vm.host != self.cfg.host_name => {
                // Another host has taken the VM over, row and all: its QEMU here just goes.
                self.halt(&vm, false).await;
            }
            Ok(vm) => {
                self.halt(&vm, false).await;
                self.record_state_or_log(
                    &vm.name,
                    &vm.id,
                    VmState::Stopped,
                    Some(reason),
                    None,
                    "its lease's loss",
                )
                .await;
            }
            Err(err) => {
                // The row is out of reach: kill the process all the same.
                tracing::warn!(%err, vm = %id, "killing a VM whose row cannot be read");
                let paths = self.paths(id);
                if let Ok(pid) = nook_vmm::qemu::read_pid(&paths.pidfile()) {
                    let qemu = Qemu {
                        binary: PathBuf::new(),
                    };
                    nook_vmm::qemu::kill(&qemu, pid, &paths);
                }
                self.live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
            }
        }
    }

    pub(super) fn live_qmp_by_id(&self, id: &str) -> Option<Qmp> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|l| l.qmp.clone())
    }

    /// This host as its heartbeat reports it: capacity, and the VMs running here.
    async fn host_row(&self, fleet: &Fleet) -> nook_store::HostRow {
        let running: Vec<VmRecord> = self
            .store
            .list_on_host(&fleet.name)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|vm| vm.state == VmState::Running)
            .collect();
        let running_vms = running.len() as u32;
        let memory_used_mib = running.iter().map(|vm| u64::from(vm.memory_mib)).sum();
        nook_store::HostRow {
            name: fleet.name.clone(),
            instance: fleet.instance.clone(),
            addr: fleet.addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: fleet.started_at_ms,
            heartbeat_at_ms: 0,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib: self.cfg.host_limits.memory_mib,
            running_vms,
            memory_used_mib,
        }
    }

    /// The fleet's hosts, for `nook host ls`. A host on SQLite writes no heartbeat (there is
    /// no one to tell), so it lists itself as it is now.
    /// The names of the VMs that live on `host`, for draining it; an unknown host is an error
    /// that lists the fleet's.
    pub async fn vms_on_host(&self, host: &str) -> Result<Vec<String>, ApiError> {
        let hosts = self.hosts().await?;
        if !hosts.iter().any(|h| h.host.name == host) {
            let names: Vec<&str> = hosts.iter().map(|h| h.host.name.as_str()).collect();
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "There is no host '{host}' in the fleet (its hosts: {})",
                    names.join(", ")
                ),
            ));
        }
        let vms = self
            .store
            .list_on_host(host)
            .await
            .map_err(|e| errors::from_store("list the host's VMs", e))?;
        Ok(vms.into_iter().map(|v| v.name).collect())
    }

    pub async fn hosts(&self) -> Result<Vec<nook_store::HostStatus>, ApiError> {
        match &self.fleet {
            Some(_) => self
                .store
                .hosts()
                .await
                .map_err(|e| errors::from_store("list the hosts", e)),
            None => {
                let me = fleet::Fleet::new(
                    &self.cfg.host_name,
                    &self.cfg.host_addr,
                    "local".to_string(),
                );
                let host = self.host_row(&me).await;
                // One host needs no leases.
                Ok(vec![nook_store::HostStatus {
                    leases: 0,
                    host,
                    since_heartbeat_ms: 0,
                    cordoned: false,
                }])
            }
        }
    }

    /// `nook host cordon|uncordon HOST`: whether new VMs may be placed on `name`.
    pub async fn cordon_host(&self, name: &str, cordoned: bool) -> Result<(), ApiError> {
        if self.fleet.is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "This host is not part of a fleet (its store is SQLite): there is no other host to place VMs on",
            ));
        }
        let known = self
            .store
            .set_cordoned(name, cordoned)
            .await
            .map_err(|e| errors::from_store("cordon the host", e))?;
        if !known {
            let hosts = self.hosts().await?;
            let names: Vec<&str> = hosts.iter().map(|h| h.host.name.as_str()).collect();
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "There is no host '{name}' in the fleet (its hosts: {})",
                    names.join(", ")
                ),
            ));
        }
        tracing::info!(host = name, cordoned, "host cordon changed");
        Ok(())
    }

    /// See [`host_is_up`].
    pub fn host_is_up(&self, h: &nook_store::HostStatus) -> bool {
        host_is_up(h)
    }
}

/// Runs `duty` every `period` for the daemon's life; a round that overruns delays the next.
fn every<F, Fut>(m: &Arc<Manager>, period: Duration, duty: F)
where
    F: Fn(Arc<Manager>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let m = m.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            duty(m.clone()).await;
        }
    });
}

/// A host counts as up while its heartbeats come: missing two renewal rounds and more
/// (well before its leases could lapse) marks it down.
pub(super) const HOST_FRESH_MS: i64 = 3 * RENEW_EVERY.as_millis() as i64;

fn host_is_up(h: &nook_store::HostStatus) -> bool {
    h.since_heartbeat_ms < HOST_FRESH_MS
}
