//! VM lifecycle: the core operations every front end (admin CLI, SSH lobby, HTTP API) calls.
//!
//! Invariants:
//! - A VM row exists for every VM directory, tap and QEMU process this daemon made; a failed
//!   operation removes everything it made (`destroy` is idempotent and is the only teardown).
//! - Operations on one VM are serialised by its op lock; different VMs proceed in parallel.
//! - QEMU outlives the daemon. On start the daemon re-adopts running VMs instead of
//!   restarting them, and settles VMs left half-made by a crash.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nook_api::{ApiError, CreateVm, ErrorCode, VmInfo, VmState, format_size};
use nook_net::{HostNet, NetMode, VmLink};
use nook_proto::{BootConfig, SpawnRequest};
use nook_storage::{Image, ImageKind, ImageStore};
use nook_store::{NewVm, Store, VmRecord};
use nook_vmm::{
    Accel, AgentClient, GuestRam, Hypervisor, LaunchSpec, NetBackend, Process, Qemu, Qmp,
    RamMapping, VmPaths,
};
use tokio::sync::OnceCell;

use crate::config::{AccelChoice, Config, NetChoice};
use crate::errors;
use crate::faults::{self, Fault};

mod channel;
mod clone;
mod envelope;
mod fleet;
mod guest;
mod join;
mod launch;
mod migrate;
mod recovery;
mod replica;
mod successor;

use envelope::*;
use guest::*;
pub use join::{DEFAULT_INVITE_TTL, MAX_INVITE_TTL};
use launch::{Launch, Launched};
pub use migrate::Moved;
use recovery::sweep_cgroups;
pub use replica::Replicated;

/// A VM whose op lock this operation holds, read from the store under that lock: while it
/// lives, no other operation can change the VM, and its record cannot go stale.
struct LockedVm {
    record: VmRecord,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl std::ops::Deref for LockedVm {
    type Target = VmRecord;
    fn deref(&self) -> &VmRecord {
        &self.record
    }
}

/// The owner recorded for VMs made through the local admin socket.
pub const ADMIN_OWNER: &str = "admin";

pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Whose VMs an operation may see. Someone else's VM is reported exactly like a missing one.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The local admin socket: every VM.
    Admin,
    /// An account: only the VMs it owns.
    Account(&'a str),
}

impl Scope<'_> {
    fn allows(&self, vm: &VmRecord) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Account(id) => vm.owner == *id,
        }
    }
}

/// What `stat` reports about one VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmStat {
    pub vm: VmInfo,
    pub uptime_secs: Option<f64>,
    pub load_avg_1m: Option<f64>,
    pub mem_total_kib: Option<u64>,
    pub mem_available_kib: Option<u64>,
    pub disk_total_kib: Option<u64>,
    pub disk_available_kib: Option<u64>,
    /// Bytes the VM's disk layer takes on the host.
    pub disk_host_bytes: u64,
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    pub processes: Option<u32>,
    /// Whether the idle knobs (low CPU weight, soft memory limit) are on.
    pub idle: bool,
    /// The VM's memory on the host: in RAM, and moved out to swap (`--pack`).
    pub memory_resident_bytes: Option<u64>,
    pub memory_swapped_bytes: Option<u64>,
}

/// Where `ssh VM@HOST` leads: the running VM, and its own sshd when the image has one.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub name: String,
    pub sshd: Option<nook_sshd::SshdEndpoint>,
}

/// How long a guest has to apply the identity it is given (name, address, host keys). It takes
/// milliseconds to a second; generous, as a guest forked while its own boot is still running
/// shares one slow vCPU with that boot. Only a broken agent takes longer.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a stopped VM's cgroup may keep its exiting QEMU before it is left behind (and
/// swept at the daemon's next start).
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(5);

/// The user every image has, and whom `ssh VM@HOST` lands as.
pub const GUEST_USER: &str = "nook";
/// nook's key for the relay into a VM's sshd, in the VM's directory (`.pub` beside it).
const RELAY_KEY: &str = "ssh_key";

enum Net {
    Tap(Arc<HostNet>),
    User,
}

struct Live {
    qmp: Qmp,
    agent: Option<AgentClient>,
    /// Set before the daemon itself stops QEMU, so the supervisor does not report a failure.
    intended_exit: Arc<AtomicBool>,
    /// The guest's boot is known to have finished (see `Manager::settle_boot`).
    booted: bool,
    /// Until then the guest's sshd may be restarting (a fork taking its own host keys), and
    /// the SSH relay tries a refused connection again.
    sshd_restarting_until: Option<std::time::Instant>,
    /// Its RAM, when its QEMU maps a memfd of its own shared and a fork may share it (see
    /// `clone.rs`); None for a fork's successor or clone until it restarts.
    ram: Option<GuestRam>,
}

pub struct Manager {
    cfg: Config,
    limits: crate::limits::Limits,
    /// Held from a host-wide admission check until what it admitted shows in the store, so
    /// two accounts cannot both take the host's last room.
    host_admission: tokio::sync::Mutex<()>,
    cgroups: Option<Arc<nook_cgroup::Cgroups>>,
    /// VMs whose idle knobs are on.
    idle: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Running VMs that QEMU stopped because a disk write found the host's disk full, with
    /// what `ls` and `stat` say about it (see `Manager::watch_for_a_full_disk`).
    disk_full: std::sync::Mutex<HashMap<String, String>>,
    /// VMs with zero pages still to give back (see `Manager::give_back_zero_pages_later`),
    /// each with whether another copy asked for it while it ran.
    give_backs: std::sync::Mutex<HashMap<String, bool>>,
    store: Store,
    images: ImageStore,
    net: Net,
    accel: OnceCell<Accel>,
    live: std::sync::Mutex<HashMap<String, Live>>,
    layers: nook_storage::layers::Layers,
    /// Held while a clone makes a layer and the overlays that name it, and while unused
    /// layers are collected, so a layer is never collected between the two.
    layers_lock: tokio::sync::Mutex<()>,
    op_locks: KeyedLocks,
    /// Held while a VM's agent is connected to: its QEMU serves one connection at a time, so
    /// a second connector would wait unserved in the socket's backlog and time out.
    agent_locks: KeyedLocks,
    /// The LLM gateway VMs reach on the metadata address.
    gateway: Arc<nook_gateway::Gateway>,
    /// Accounts' LLM credit, as the gateway spends it.
    ledger: Arc<crate::gateway::Ledger>,
    /// `by_guest_ip`'s answers, and the store generation they hold for.
    by_ip: std::sync::Mutex<(u64, HashMap<std::net::Ipv4Addr, Option<VmInfo>>)>,
    /// Seals integrations' secrets at rest.
    sealer: Arc<crate::secrets::Sealer>,
    /// The coding agent's conversations and running turns.
    agent_host: Arc<crate::agent::AgentHost>,
    /// The memory tiers idle VMs are packed into (`--pack`).
    tiers: nook_memory::Tiers,
    /// Held for the daemon's life when it owns the host's VM network (see `take_host_lock`).
    _host_lock: Option<std::fs::File>,
    /// This host's leases and heartbeat, when it shares its store with other hosts.
    fleet: Option<fleet::Fleet>,
    /// Live moves to this host waiting for their memory stream.
    arrivals: migrate::Arrivals,
}

/// Sets up the tiers `--pack` asks for, as far as this kernel and host allow, and says what
/// is on. Packing needs root (sysfs, swapon); a tier that cannot be set up is left off.
fn memory_tiers(cfg: &Config) -> nook_memory::Tiers {
    let probe = nook_memory::probe();
    let offers = format!(
        "zram {}, zswap {}, DAMON {}, swap areas {}",
        if probe.zram { "yes" } else { "no" },
        match probe.zswap {
            Some(true) => "on",
            Some(false) => "off",
            None => "absent",
        },
        if probe.damon { "yes" } else { "no" },
        probe.swaps.len()
    );
    let off = nook_memory::Tiers::off();
    if cfg.pack == nook_memory::Pack::Off {
        tracing::info!(kernel = %offers, "memory packing off (--pack balanced|dense packs idle VMs)");
        return off;
    }
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!("--pack needs root (it sets up swap): idle VMs keep their memory");
        return off;
    }
    let host_ram = nook_memory::HostMemory::read().total_bytes;
    match nook_memory::Tiers::setup(cfg.pack, host_ram, &cfg.data_dir) {
        Ok(t) => {
            tracing::info!(kernel = %offers, "memory tiers: {}", t.describe());
            for why in &t.missing {
                tracing::warn!("memory tier left out: {why}");
            }
            t
        }
        Err(err) => {
            tracing::warn!(%err, kernel = %offers, "memory tiers could not be set up: idle VMs keep their memory");
            off
        }
    }
}

/// One daemon per network namespace owns its VM network: the `nk*` taps, the nftables table
/// and the metadata address live in the namespace, and a second daemon's start-up sweep would
/// delete the first one's taps from under its running VMs. So the lock is named after the
/// namespace (its inode), and several hosts can share a machine, each in a namespace of its
/// own. (Which namespace is the machine's own cannot be told from a container.)
fn host_lock_path() -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/net") {
        Ok(ns) => format!("/run/nook/host-netns-{}.lock", ns.ino()).into(),
        Err(_) => "/run/nook/host.lock".into(),
    }
}

/// Takes the network namespace's lock (released when the process ends, however it ends), or
/// says who holds it.
fn take_host_lock(data_dir: &std::path::Path) -> Result<std::fs::File, ApiError> {
    use std::io::{Read, Seek, Write};
    let path = host_lock_path();
    let path = path.as_path();
    let open = || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    };
    let mut file = open().map_err(|e| io_error("open the host lock", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(ApiError::new(
                ErrorCode::HostMisconfigured,
                format!(
                    "Another nook daemon ({}) is running on this host and owns its VM network (taps, nftables, {}). One network namespace runs one nook daemon: stop that one first, or run this one in a network namespace of its own with its own --cgroup-top.",
                    if holder.is_empty() {
                        "pid unknown"
                    } else {
                        holder
                    },
                    nook_net::METADATA_ADDR
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error("take the host lock", e)),
    }
    let note = format!(
        "pid {}, data dir {}\n",
        std::process::id(),
        data_dir.display()
    );
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(note.as_bytes()));
    Ok(file)
}

fn map_join<T>(r: Result<T, tokio::task::JoinError>, context: &str) -> Result<T, ApiError> {
    r.map_err(|e| errors::internal(context, &e))
}

impl Manager {
    pub async fn open(cfg: Config) -> Result<Arc<Manager>, ApiError> {
        for dir in [&cfg.data_dir, &cfg.vms_dir(), &cfg.cache_dir()] {
            std::fs::create_dir_all(dir)
                .map_err(|e| errors::internal("create the data dir", &e))?;
        }
        let store = Store::connect(&cfg.store)
            .await
            .map_err(|e| errors::from_store("open the database", e))?;
        // Before anything on the host changes: a key that cannot open the store's secrets
        // stops the start here.
        let sealer = Arc::new(
            crate::secrets::Sealer::open(&cfg.data_dir)
                .map_err(|e| errors::internal("open the secrets key", &e))?,
        );
        crate::secrets::check_key(&sealer, &store, &cfg.data_dir).await?;
        if nix::unistd::geteuid().is_root() {
            let uids = cfg.jail_uids;
            let checked = tokio::task::spawn_blocking(move || uids.check_unused()).await;
            map_join(checked, "check the jails' uids")?
                .map_err(|e| ApiError::new(ErrorCode::HostMisconfigured, e.to_string()))?;
        }
        let mode = match cfg.net {
            NetChoice::Tap => NetMode::Tap,
            NetChoice::User => NetMode::User,
            NetChoice::Auto => nook_net::probe_mode(),
        };
        let mut host_lock = None;
        let net = match mode {
            NetMode::Tap => {
                host_lock = Some(take_host_lock(&cfg.data_dir)?);
                let mine = if store.is_shared() {
                    store.list_on_host(&cfg.host_name).await
                } else {
                    store.list().await
                };
                let running: Vec<VmLink> = mine
                    .map_err(|e| errors::from_store("list VMs", e))?
                    .iter()
                    .filter(|vm| {
                        matches!(
                            vm.state,
                            VmState::Running | VmState::Stopping | VmState::Starting
                        )
                    })
                    .filter_map(|vm| VmLink::for_slot(vm.slot).ok())
                    .collect();
                let block = cfg.egress_block.clone();
                let host =
                    tokio::task::spawn_blocking(move || HostNet::setup_with(&running, &block))
                        .await;
                Net::Tap(Arc::new(
                    map_join(host, "set up networking")?
                        .map_err(|e| errors::from_net("set up networking", e))?,
                ))
            }
            NetMode::User => {
                tracing::warn!(
                    "user-mode networking: VMs get no egress and no metadata service (run as root for taps)"
                );
                Net::User
            }
        };
        tracing::info!(net = ?mode, data_dir = %cfg.data_dir.display(), "manager ready");
        let images = ImageStore::new(cfg.images_dir.clone());
        match if cfg.reclaim {
            nook_cgroup::enable_ksm()
        } else {
            Ok(false)
        } {
            _ if !cfg.reclaim => tracing::warn!(
                "memory reclaim is off (reclaim = false): idle VMs keep their memory"
            ),
            Ok(true) => tracing::info!("KSM on: identical guest pages are shared"),
            Ok(false) => tracing::info!("this kernel has no KSM"),
            Err(err) => tracing::warn!(%err, "could not turn KSM on"),
        }
        let tiers = memory_tiers(&cfg);
        let cgroups = match nook_cgroup::Cgroups::probe().and_then(|cg| cg.under(&cfg.cgroup_top)) {
            Ok(cg) => {
                tracing::info!(flavor = ?cg.flavor(), "cgroups in use: accounts' VMs are held to their envelopes");
                sweep_cgroups(&cg);
                Some(Arc::new(cg))
            }
            Err(err) => {
                tracing::warn!(%err, "no usable cgroups: VMs run without envelope limits");
                None
            }
        };
        let layers = nook_storage::layers::Layers::new(cfg.layers_dir());
        let ledger = crate::gateway::Ledger::new(store.clone(), cfg.llm_initial_credit_micros);
        let backend =
            crate::gateway::StoreBackend::new(ledger.clone(), store.clone(), sealer.clone());
        let gateway =
            nook_gateway::Gateway::new(cfg.gateway.clone(), Arc::new(backend)).map_err(|e| {
                ApiError::new(
                    ErrorCode::HostMisconfigured,
                    format!("{e}: apt-get install ca-certificates"),
                )
            })?;
        let fleet = if store.is_shared() {
            let id = fleet::host_id(&cfg.data_dir)
                .map_err(|e| errors::internal("read this host's id", &e))?;
            Some(fleet::Fleet::new(&cfg.host_name, &cfg.host_addr, id))
        } else {
            None
        };
        Ok(Arc::new(Manager {
            fleet,
            ledger,
            by_ip: std::sync::Mutex::new((u64::MAX, HashMap::new())),
            gateway: Arc::new(gateway),
            sealer,
            agent_host: crate::agent::AgentHost::new(store.clone()),
            tiers,
            limits: Default::default(),
            host_admission: Default::default(),
            idle: Default::default(),
            disk_full: Default::default(),
            give_backs: Default::default(),
            cgroups,
            cfg,
            store,
            images,
            net,
            accel: OnceCell::new(),
            live: Default::default(),
            layers,
            layers_lock: Default::default(),
            op_locks: Default::default(),
            agent_locks: Default::default(),
            _host_lock: host_lock,
            arrivals: Default::default(),
        }))
    }

    pub fn ledger(&self) -> &crate::gateway::Ledger {
        &self.ledger
    }

    pub fn sealer(&self) -> &crate::secrets::Sealer {
        &self.sealer
    }

    pub fn tiers(&self) -> &nook_memory::Tiers {
        &self.tiers
    }

    /// The memory tiers' sizes now, or `None` when nothing is packed (they are read from
    /// sysfs and procfs, on a blocking thread).
    pub async fn tier_stats(&self) -> Option<nook_memory::HostTiers> {
        if self.tiers.pack == nook_memory::Pack::Off {
            return None;
        }
        let tiers = self.tiers.clone();
        tokio::task::spawn_blocking(move || tiers.stats())
            .await
            .ok()
    }

    pub fn agent_host(&self) -> &Arc<crate::agent::AgentHost> {
        &self.agent_host
    }

    pub fn gateway(&self) -> &nook_gateway::Gateway {
        &self.gateway
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Rate limits on signups, codes and VM creation.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    pub fn net_mode(&self) -> NetMode {
        match self.net {
            Net::Tap(_) => NetMode::Tap,
            Net::User => NetMode::User,
        }
    }

    pub fn accel(&self) -> Option<Accel> {
        self.accel.get().copied()
    }

    fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.cfg.vms_dir().join(id))
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.op_locks.get(id)
    }

    fn agent_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.agent_locks.get(id)
    }

    fn info(&self, vm: &VmRecord) -> VmInfo {
        let running = matches!(
            vm.state,
            VmState::Running | VmState::Starting | VmState::Stopping
        );
        let here = vm.host.is_empty() || vm.host == self.cfg.host_name;
        let guest_ip = match (&self.net, running && here) {
            (Net::Tap(_), true) => VmLink::for_slot(vm.slot)
                .ok()
                .map(|l| l.guest_ip.to_string()),
            _ => None,
        };
        if let Some(down) = self.host_down(&vm.host) {
            return VmInfo {
                state: VmState::Unavailable,
                state_reason: Some(format!("{down}; it was {} there", vm.state.as_str())),
                guest_ip: None,
                ..self.recorded_info(vm)
            };
        }
        VmInfo {
            guest_ip,
            ..self.recorded_info(vm)
        }
    }

    /// The VM as its row and this host's own knowledge say.
    fn recorded_info(&self, vm: &VmRecord) -> VmInfo {
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            image: vm.image.clone(),
            state: vm.state,
            state_reason: self
                .disk_full
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&vm.id)
                .filter(|_| vm.state == VmState::Running)
                .cloned()
                .or_else(|| {
                    self.fleet
                        .as_ref()
                        .filter(|f| vm.state == VmState::Running && f.is_fenced(&vm.id))
                        .map(|_| fleet::FENCED_REASON.to_string())
                })
                .or_else(|| vm.state_reason.clone()),
            cpu: vm.cpu,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            guest_ip: None,
            created_at: vm.created_at.clone(),
            host: (self.fleet.is_some() && !vm.host.is_empty()).then(|| vm.host.clone()),
        }
    }

    pub(crate) async fn record(&self, name: &str, scope: Scope<'_>) -> Result<VmRecord, ApiError> {
        let vm = self
            .store
            .get(name)
            .await
            .map_err(|e| errors::from_store("look up a VM", e))?;
        if scope.allows(&vm) {
            Ok(vm)
        } else {
            Err(errors::not_found(name))
        }
    }

    pub async fn list(&self, scope: Scope<'_>) -> Result<Vec<VmInfo>, ApiError> {
        let vms = self
            .store
            .list()
            .await
            .map_err(|e| errors::from_store("list VMs", e))?;
        Ok(vms
            .iter()
            .filter(|vm| scope.allows(vm))
            .map(|vm| self.info(vm))
            .collect())
    }

    pub async fn get(&self, name: &str, scope: Scope<'_>) -> Result<VmInfo, ApiError> {
        Ok(self.info(&self.record(name, scope).await?))
    }

    /// Looks a VM up by the guest address a request came from (the metadata service).
    pub async fn by_guest_ip(&self, ip: std::net::Ipv4Addr) -> Option<VmInfo> {
        // Every gateway request asks this; answers hold while the store's generation does
        // (any write moves it, so a stopped, removed or renamed VM is seen at once).
        let generation = self.store.generation();
        {
            let cache = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
            if cache.0 == generation
                && let Some(known) = cache.1.get(&ip)
            {
                return known.clone();
            }
        }
        let slot = VmLink::slot_for_guest_ip(ip)?;
        let vms = self.store.by_slot(slot).await.ok()?;
        let found = vms
            .iter()
            .find(|vm| vm.slot == slot && matches!(vm.state, VmState::Running | VmState::Starting))
            .map(|vm| self.info(vm));
        let mut cache = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != generation {
            *cache = (generation, HashMap::new());
        }
        cache.1.insert(ip, found.clone());
        found
    }

    /// Creates a VM owned by `owner`. With `wait`, returns once it is ready (or fails and is
    /// gone); without, returns as soon as its record exists and finishes in the background.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateVm,
        owner: &str,
        wait: bool,
        progress: Progress<'_>,
    ) -> Result<VmInfo, ApiError> {
        let kind = ImageKind::from_str(req.image.as_deref().unwrap_or("default"))
            .map_err(|e| errors::from_storage("choose an image", e))?;
        if let Some(name) = &req.name {
            nook_api::validate_name(name)?;
        }
        let cpu = req.cpu.unwrap_or(1);
        if !(1..=64).contains(&cpu) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("Invalid --cpu {cpu}: use 1 to 64"),
            ));
        }
        let memory_mib = match &req.memory {
            Some(m) => (nook_api::parse_size(m)? >> 20) as u32,
            None => 0,
        };
        if req.memory.is_some() && !(128..=1 << 20).contains(&memory_mib) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "Invalid --memory {}: use at least 128M",
                    req.memory.as_deref().unwrap_or_default()
                ),
            ));
        }
        let disk_bytes = match &req.disk {
            Some(d) => Some(nook_api::parse_size(d)?),
            None => None,
        };
        // Fail fast on a missing QEMU, before anything is made.
        Qemu::locate(self.cfg.qemu.as_deref()).map_err(|e| errors::from_vmm("find QEMU", e))?;
        let image = self
            .images
            .image(kind)
            .map_err(|e| errors::from_storage("open the image", e))?;
        let memory_mib = if memory_mib == 0 {
            image.default_memory_mib
        } else {
            memory_mib
        };
        let disk_bytes = disk_bytes
            .unwrap_or(image.default_disk_bytes)
            .max(image.rootfs_virtual_bytes);
        if req.disk.is_some() && disk_bytes > 16 << 40 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "Invalid --disk: at most 16T",
            ));
        }

        // Admission and insertion happen under the account's lock, so two concurrent
        // creates cannot both squeeze into the last bit of an envelope.
        let account_lock = self.op_lock(&format!("account:{owner}"));
        let _account_guard = account_lock.lock().await;
        let admitted = self
            .admit(
                owner,
                Ask::Create,
                image.kind,
                Wants {
                    cpu,
                    memory_mib,
                    disk_bytes,
                },
            )
            .await?;
        let template = NewVm {
            id: String::new(),
            name: String::new(),
            owner: owner.to_string(),
            image: kind.to_string(),
            image_dir: image.dir.display().to_string(),
            cpu,
            memory_mib,
            disk_bytes,
            host: self.cfg.host_name.clone(),
        };
        let record = self.insert_vm(template, req.name.as_deref()).await?;
        drop(admitted);
        if !wait {
            let info = self.info(&record);
            let this = self.clone();
            tokio::spawn(async move {
                let _ = this.finish_create(&record, &image, &|_| {}).await;
            });
            return Ok(info);
        }
        self.finish_create(&record, &image, progress).await
    }

    /// Records a new VM (state `creating`) with a fresh id and `name`, or with a made-up
    /// friendly name, retried a few times should one be taken already.
    async fn insert_vm(&self, mut new: NewVm, name: Option<&str>) -> Result<VmRecord, ApiError> {
        new.id = hex::encode(rand::random::<[u8; 6]>());
        let mut attempt = 0;
        loop {
            new.name = name.map_or_else(crate::names::friendly, str::to_string);
            match self.store.insert_vm(new.clone()).await {
                Err(nook_store::StoreError::NameTaken(_)) if name.is_none() && attempt < 8 => {
                    attempt += 1
                }
                other => return other.map_err(|e| errors::from_store("record the VM", e)),
            }
        }
    }

    async fn finish_create(
        self: &Arc<Self>,
        record: &VmRecord,
        image: &Image,
        progress: Progress<'_>,
    ) -> Result<VmInfo, ApiError> {
        let lock = self.op_lock(&record.id);
        let _guard = lock.lock().await;
        tracing::info!(vm = %record.name, id = %record.id, "creating");
        let made = self.make_and_boot(record, image, progress).await;
        match made {
            Ok(()) => self.get(&record.name, Scope::Admin).await,
            Err(err) => {
                tracing::warn!(vm = %record.name, code = err.code.as_str(), error = %err.message, "create failed; removing what was made");
                self.destroy(record).await;
                Err(err)
            }
        }
    }

    async fn make_and_boot(
        self: &Arc<Self>,
        vm: &VmRecord,
        image: &Image,
        progress: Progress<'_>,
    ) -> Result<(), ApiError> {
        let paths = self.paths(&vm.id);
        progress("creating the disk");
        std::fs::create_dir_all(&paths.dir).map_err(|e| io_error("create the VM directory", e))?;
        let (base, disk, size) = (image.rootfs.clone(), paths.disk(), vm.disk_bytes);
        let made = tokio::task::spawn_blocking(move || {
            nook_storage::disk::create_overlay(&base, &disk, size)
        })
        .await;
        map_join(made, "create the disk")?
            .map_err(|e| errors::from_storage("create the disk", e))?;
        self.boot(vm, image, progress).await
    }

    /// Records a VM's state where no caller can act on a failed write: the supervisor of a
    /// VM that exited, recovery after a daemon restart, and the cleanup after a failed start
    /// (whose own error is what the user needs). The failure is logged, not swallowed, so a
    /// row that disagrees with reality can be explained from the log.
    async fn record_state_or_log(
        &self,
        name: &str,
        id: &str,
        state: VmState,
        reason: Option<&str>,
        pid: Option<u32>,
        what: &str,
    ) {
        if let Err(err) = self.store.set_state(id, state, reason, pid).await {
            tracing::error!(
                vm = %name,
                state = state.as_str(),
                %err,
                "could not record {what} in the database; the VM's row may show a stale state"
            );
        }
    }

    /// Frees what a VM's QEMU held once it is gone: its lease, its cgroup and its tap.
    async fn release_runtime(&self, id: &str, slot: u32, owner: &str) {
        self.drop_lease(id).await;
        if let Some(cg) = &self.cgroups
            && owner != ADMIN_OWNER
        {
            let (cg, owner, vm) = (cg.clone(), owner.to_string(), id.to_string());
            // A QEMU whose QMP socket has closed (a live move's sender, a VM that exited) can
            // still be in its group for a moment while it exits; a group left behind then
            // stayed until the daemon's next start swept it.
            let removed = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + CGROUP_EMPTY_WAIT;
                loop {
                    match cg.remove_vm(&owner, &vm) {
                        Err(nook_cgroup::CgroupError::Busy { .. }) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        other => return other,
                    }
                }
            })
            .await;
            if let Ok(Err(err)) = removed {
                tracing::warn!(%err, "removing a VM's cgroup failed");
            }
        }
        if let (Net::Tap(host), Ok(link)) = (&self.net, VmLink::for_slot(slot)) {
            let host = host.clone();
            let removed = tokio::task::spawn_blocking(move || host.remove_vm(&link)).await;
            if let Ok(Err(err)) = removed {
                tracing::warn!(%err, "removing a tap failed");
            }
        }
        let paths = self.paths(id);
        for f in [paths.qmp_socket(), paths.agent_socket(), paths.pidfile()] {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Stops QEMU: a clean guest power-off when `graceful`, then QMP `quit`, then SIGKILL.
    async fn halt(&self, vm: &VmRecord, graceful: bool) {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.id);
        let paths = self.paths(&vm.id);
        if let Some(live) = live {
            live.intended_exit.store(true, Ordering::SeqCst);
            let qmp = live.qmp;
            if graceful && let Some(agent) = live.agent.filter(|a| !a.is_closed()) {
                let asked =
                    tokio::time::timeout(Duration::from_secs(5), agent.shutdown(false)).await;
                if matches!(asked, Ok(Ok(()))) {
                    let _ = tokio::time::timeout(Duration::from_secs(30), qmp.closed()).await;
                }
            }
            if !qmp.is_closed() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), qmp.execute("quit", None)).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), qmp.closed()).await;
            }
        }
        // Whatever QMP said, make sure the process is gone.
        kill_qemu_and_wait(&paths).await;
        self.release_runtime(&vm.id, vm.slot, &vm.owner).await;
    }

    /// Removes every trace of a VM: process, tap, files, row. Safe to call on anything half-made.
    async fn destroy(&self, vm: &VmRecord) {
        self.halt(vm, false).await;
        let dir = self.paths(&vm.id).dir;
        if let Err(err) = std::fs::remove_dir_all(&dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%err, dir = %dir.display(), "removing VM directory failed");
        }
        if let Err(err) = self.store.delete(&vm.id).await {
            tracing::error!(%err, vm = %vm.name, "deleting VM row failed; it will be retried at the next start");
        }
        self.collect_layers().await;
        self.op_locks.forget(&vm.id);
        self.agent_locks.forget(&vm.id);
    }

    /// Refuses to act on a VM that lives on another host of the fleet: its disk and QEMU are
    /// there. (Routing such requests to that host is not built yet.)
    pub(crate) fn ensure_here(&self, vm: &VmRecord) -> Result<(), ApiError> {
        if vm.host.is_empty() || vm.host == self.cfg.host_name || !self.store.is_shared() {
            return Ok(());
        }
        self.lives_elsewhere(vm)?;
        Err(ApiError::new(
            ErrorCode::Busy,
            format!(
                "VM '{}' lives on host '{}': run this there (this host cannot yet pass it on)",
                vm.name, vm.host
            ),
        ))
    }

    /// Looks a VM up for `scope`, takes its op lock, and re-reads it by id under the lock:
    /// the operation then sees a state no concurrent one can change, and a rename or removal
    /// in between can never hand it another VM of the same name.
    async fn lock_vm(&self, name: &str, scope: Scope<'_>) -> Result<LockedVm, ApiError> {
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        let guard = self.op_lock(&vm.id).lock_owned().await;
        let record = self.store.get_by_id(&vm.id).await.map_err(|e| match e {
            nook_store::StoreError::NotFound(_) => errors::not_found(name),
            other => errors::from_store("look up a VM", other),
        })?;
        Ok(LockedVm {
            record,
            _guard: guard,
        })
    }

    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<VmInfo, ApiError> {
        let vm = self.lock_vm(name, scope).await?;
        if !matches!(vm.state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::new(
                ErrorCode::AlreadyRunning,
                format!("VM '{}' is already {}", vm.name, vm.state.as_str()),
            ));
        }
        // As in create, admission and the boot that makes it count happen under the
        // account's lock, so two starts cannot both squeeze into the last of an envelope.
        // Taken after the VM's lock (as clone does): create holds the account lock while it
        // waits for a new VM's lock, but that VM is `creating`, which was refused above.
        let account_lock = self.op_lock(&format!("account:{}", vm.owner));
        let _account_guard = account_lock.lock().await;
        let image = self.image_of(&vm)?;
        let admitted = self
            .admit(
                &vm.owner,
                Ask::Start(&vm.id),
                image.kind,
                Wants {
                    cpu: vm.cpu,
                    memory_mib: vm.memory_mib,
                    disk_bytes: 0,
                },
            )
            .await?;
        // `starting` from here on counts the VM's memory against the host's room.
        self.store
            .set_state(&vm.id, VmState::Starting, None, None)
            .await
            .map_err(|e| errors::from_store("record the start", e))?;
        drop(admitted);
        if let Err(err) = self.boot(&vm, &image, progress).await {
            self.halt(&vm, false).await;
            self.record_state_or_log(
                &vm.name,
                &vm.id,
                VmState::Stopped,
                Some(&err.message),
                None,
                "the failed start",
            )
            .await;
            return Err(err);
        }
        self.get(name, Scope::Admin).await
    }

    pub async fn stop(&self, name: &str, scope: Scope<'_>) -> Result<VmInfo, ApiError> {
        let vm = self.lock_vm(name, scope).await?;
        if matches!(vm.state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is not running", vm.name),
            ));
        }
        self.store
            .set_state(&vm.id, VmState::Stopping, None, vm.pid)
            .await
            .map_err(|e| errors::from_store("record the stop", e))?;
        self.halt(&vm, true).await;
        self.store
            .set_state(&vm.id, VmState::Stopped, None, None)
            .await
            .map_err(|e| errors::from_store("record the stop", e))?;
        tracing::info!(vm = %vm.name, "stopped");
        self.get(name, Scope::Admin).await
    }

    pub async fn remove(&self, name: &str, scope: Scope<'_>) -> Result<(), ApiError> {
        let vm = self.lock_vm(name, scope).await?;
        self.destroy(&vm).await;
        tracing::info!(vm = %vm.name, "removed");
        Ok(())
    }

    /// The VM's disk chain, checked before root opens it: see
    /// [`nook_storage::layers::trusted_chain`].
    async fn trusted_chain(&self, vm: &VmRecord) -> Result<Vec<std::path::PathBuf>, ApiError> {
        let base = self.image_of(vm)?.rootfs;
        let (top, layers) = (self.paths(&vm.id).disk(), self.layers.clone());
        let checked = tokio::task::spawn_blocking(move || {
            nook_storage::layers::trusted_chain(&top, &layers, &base)
        })
        .await;
        map_join(checked, "read the disk's chain")?
            .map_err(|e| errors::from_storage("read the disk's chain", e))
    }

    fn image_of(&self, vm: &VmRecord) -> Result<Image, ApiError> {
        ImageStore::open_at(self.image_kind_of(vm)?, std::path::Path::new(&vm.image_dir))
            .map_err(|e| errors::from_storage("open the VM's image", e))
    }

    fn image_kind_of(&self, vm: &VmRecord) -> Result<ImageKind, ApiError> {
        ImageKind::from_str(&vm.image).map_err(|e| errors::from_storage("open the VM's image", e))
    }

    pub async fn restart(
        self: &Arc<Self>,
        name: &str,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<VmInfo, ApiError> {
        let vm = self.record(name, scope).await?;
        if matches!(vm.state, VmState::Running | VmState::Starting) {
            progress("stopping");
            self.stop(name, scope).await?;
        }
        self.start(name, scope, progress).await
    }

    pub async fn rename(&self, old: &str, new: &str, scope: Scope<'_>) -> Result<VmInfo, ApiError> {
        nook_api::validate_name(new)?;
        let vm = self.lock_vm(old, scope).await?;
        self.store
            .rename(&vm.id, new)
            .await
            .map_err(|e| errors::from_store("rename the VM", e))?;
        // The guest learns its new hostname now; the kernel command line carries it from the next boot.
        if vm.state == VmState::Running {
            let script = format!(
                "hostname {new} && echo {new} > /etc/hostname && sed -i 's/^127.0.1.1.*/127.0.1.1 {new}/' /etc/hosts"
            );
            let _ = self.guest_sh(&vm, &script).await;
        }
        tracing::info!(vm = %old, new, "renamed");
        self.get(new, Scope::Admin).await
    }

    /// CPU and memory apply from the next start; a disk only grows, and at once.
    pub async fn resize(
        &self,
        name: &str,
        scope: Scope<'_>,
        cpu: Option<u32>,
        memory: Option<&str>,
        disk: Option<&str>,
    ) -> Result<VmInfo, ApiError> {
        let vm = self.lock_vm(name, scope).await?;
        if vm.state == VmState::Creating {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "VM '{}' is still being created: resize it once it is running",
                    vm.name
                ),
            ));
        }
        let cpu = cpu.unwrap_or(vm.cpu);
        if !(1..=64).contains(&cpu) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("Invalid --cpu {cpu}: use 1 to 64"),
            ));
        }
        let memory_mib = match memory {
            Some(m) => (nook_api::parse_size(m)? >> 20) as u32,
            None => vm.memory_mib,
        };
        if memory_mib < 128 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "Invalid --memory: use at least 128M",
            ));
        }
        let disk_bytes = match disk {
            Some(d) => nook_api::parse_size(d)?,
            None => vm.disk_bytes,
        };
        if disk_bytes < vm.disk_bytes {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "Disks only grow: '{}' has {}, ask for more",
                    vm.name,
                    nook_api::format_size(vm.disk_bytes)
                ),
            ));
        }
        if disk_bytes > 16 << 40 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "Invalid --disk: at most 16T",
            ));
        }
        // The same envelope as create, under the same account lock (taken after the VM's,
        // as in start), so a resize cannot grow past the plan nor race another VM's growth.
        let account_lock = self.op_lock(&format!("account:{}", vm.owner));
        let _account_guard = account_lock.lock().await;
        let ask = Ask::Resize {
            id: &vm.id,
            runs: matches!(vm.state, VmState::Running | VmState::Starting),
            old_disk_bytes: vm.disk_bytes,
        };
        let _admitted = self
            .admit(
                &vm.owner,
                ask,
                self.image_kind_of(&vm)?,
                Wants {
                    cpu,
                    memory_mib,
                    disk_bytes,
                },
            )
            .await?;
        if disk_bytes > vm.disk_bytes {
            self.grow_disk(&vm, disk_bytes).await?;
        }
        self.store
            .set_resources(&vm.id, cpu, memory_mib, disk_bytes)
            .await
            .map_err(|e| errors::from_store("record the new size", e))?;
        self.get(name, Scope::Admin).await
    }

    async fn grow_disk(&self, vm: &VmRecord, bytes: u64) -> Result<(), ApiError> {
        let live_qmp = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm.id)
            .map(|l| l.qmp.clone());
        match live_qmp {
            Some(qmp) => {
                qmp.execute(
                    "block_resize",
                    Some(serde_json::json!({ "device": "root", "size": bytes })),
                )
                .await
                .map_err(|e| errors::from_vmm("grow the disk", e))?;
                // Grow the filesystem online too; tiny images have no resize2fs and grow at next boot.
                let _ = self
                    .guest_sh(vm, "command -v resize2fs >/dev/null && resize2fs /dev/vda")
                    .await;
            }
            None => {
                // qemu-img runs as root: it would grow whatever a forged header names.
                self.trusted_chain(vm).await?;
                let disk = self.paths(&vm.id).disk();
                let out = tokio::process::Command::new("qemu-img")
                    .arg("resize")
                    .arg(&disk)
                    .arg(bytes.to_string())
                    .output()
                    .await
                    .map_err(|e| io_error("grow the disk", e))?;
                if !out.status.success() {
                    let err = std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    );
                    return Err(errors::internal("grow the disk", &err));
                }
            }
        }
        Ok(())
    }
}

/// What an unprivileged writer (QEMU, jailed) may still put on `dir`'s filesystem; None when
/// it cannot be told.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|fs| fs.blocks_available() * fs.fragment_size())
}

fn io_error(context: &str, err: std::io::Error) -> ApiError {
    if err.kind() == std::io::ErrorKind::StorageFull {
        errors::no_space("the data dir")
    } else {
        errors::internal(context, &err)
    }
}

/// Kills the QEMU whose pidfile is in `paths` (if it runs) and waits up to 5 s for it to go.
pub(crate) async fn kill_qemu_and_wait(paths: &VmPaths) {
    let Ok(pid) = nook_vmm::qemu::read_pid(&paths.pidfile()) else {
        return;
    };
    let qemu = Qemu {
        binary: PathBuf::new(),
    };
    nook_vmm::qemu::kill(&qemu, pid, paths);
    for _ in 0..50 {
        if !qemu.is_running(pid, paths) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One async lock per key (a VM's id, an account's), made on first use.
#[derive(Default)]
struct KeyedLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    fn forget(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
