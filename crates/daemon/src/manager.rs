//! VM lifecycle: the core operations every front end (admin CLI, SSH lobby, HTTP API) calls.
//!
//! Invariants:
//! - A VM row exists for every VM directory, tap and QEMU process this daemon made; a failed
//!   operation removes everything it made (`destroy` is idempotent and is the only teardown).
//! - Operations on one VM are serialised by its op lock; different VMs proceed in parallel.
//! - QEMU outlives the daemon. On start the daemon re-adopts running VMs instead of
//!   restarting them, and settles VMs left half-made by a crash.

use std::collections::HashMap;
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
    Accel, AgentClient, Hypervisor, LaunchSpec, NetBackend, Process, Qemu, Qmp, VmPaths,
};
use tokio::sync::OnceCell;

use crate::config::{AccelChoice, Config, NetChoice};
use crate::errors;
use crate::faults::{self, Fault};

mod clone;

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
    store: Store,
    images: ImageStore,
    net: Net,
    accel: OnceCell<Accel>,
    live: std::sync::Mutex<HashMap<String, Live>>,
    layers: nook_storage::layers::Layers,
    /// Held while a clone makes a layer and the overlays that name it, and while unused
    /// layers are collected, so a layer is never collected between the two.
    layers_lock: tokio::sync::Mutex<()>,
    op_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held for the daemon's life when it owns the host's VM network (see `take_host_lock`).
    _host_lock: Option<std::fs::File>,
}

/// One daemon per host owns the VM network: the `nk*` taps, the nftables table and the metadata
/// address are host-wide, and a second daemon's start-up sweep would delete the first one's
/// taps from under its running VMs.
const HOST_LOCK: &str = "/run/nook/host.lock";

/// Takes [`HOST_LOCK`] (released when the process ends, however it ends), or says who holds it.
fn take_host_lock(data_dir: &std::path::Path) -> Result<std::fs::File, ApiError> {
    use std::io::{Read, Seek, Write};
    let path = std::path::Path::new(HOST_LOCK);
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
                    "Another nook daemon ({}) is running on this host and owns its VM network (taps, nftables, {}). One host runs one nook daemon: stop that one first.",
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
        let store = Store::open(&cfg.database())
            .await
            .map_err(|e| errors::from_store("open the database", e))?;
        let mode = match cfg.net {
            NetChoice::Tap => NetMode::Tap,
            NetChoice::User => NetMode::User,
            NetChoice::Auto => nook_net::probe_mode(),
        };
        let mut host_lock = None;
        let net = match mode {
            NetMode::Tap => {
                host_lock = Some(take_host_lock(&cfg.data_dir)?);
                let running: Vec<VmLink> = store
                    .list()
                    .await
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
        let cgroups = match nook_cgroup::Cgroups::probe() {
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
        Ok(Arc::new(Manager {
            limits: Default::default(),
            host_admission: Default::default(),
            idle: Default::default(),
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
            _host_lock: host_lock,
        }))
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
        let mut locks = self.op_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn info(&self, vm: &VmRecord) -> VmInfo {
        let running = matches!(
            vm.state,
            VmState::Running | VmState::Starting | VmState::Stopping
        );
        let guest_ip = match (&self.net, running) {
            (Net::Tap(_), true) => VmLink::for_slot(vm.slot)
                .ok()
                .map(|l| l.guest_ip.to_string()),
            _ => None,
        };
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            image: vm.image.clone(),
            state: vm.state,
            state_reason: vm.state_reason.clone(),
            cpu: vm.cpu,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            guest_ip,
            created_at: vm.created_at.clone(),
        }
    }

    async fn record(&self, name: &str, scope: Scope<'_>) -> Result<VmRecord, ApiError> {
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
        let slot = VmLink::slot_for_guest_ip(ip)?;
        let vms = self.store.list().await.ok()?;
        vms.iter()
            .find(|vm| vm.slot == slot && matches!(vm.state, VmState::Running | VmState::Starting))
            .map(|vm| self.info(vm))
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
            .admit(owner, Ask::Create, cpu, memory_mib, disk_bytes)
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

    /// Boots `vm`, retrying a boot that hangs before the kernel prints anything: a rare
    /// TCG hang that a fresh QEMU does not repeat.
    async fn boot(
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
    async fn boot_once(
        self: &Arc<Self>,
        vm: &VmRecord,
        image: &Image,
        progress: Progress<'_>,
    ) -> Result<(), BootError> {
        let started = Instant::now();
        let paths = self.paths(&vm.id);
        let (pid, qmp) = self.launch(vm, image, false, progress).await?;
        let agent = AgentClient::connect(&paths.agent_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to the guest agent", e))?;
        self.adopt(vm, qmp.clone(), Some(agent.clone()));

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
        self.identify(vm, &agent).await?;
        self.store
            .set_state(&vm.id, VmState::Running, None, Some(pid))
            .await
            .map_err(|e| errors::from_store("record the VM as running", e))?;
        progress(&format!("ready in {:.1}s", started.elapsed().as_secs_f64()));
        tracing::info!(vm = %vm.name, secs = started.elapsed().as_secs_f64(), "running");
        Ok(())
    }

    /// Starts QEMU for `vm` (paused for an incoming fork with `incoming`), connected to its
    /// network and confined to its account's cgroup; returns its pid and QMP connection.
    async fn launch(
        &self,
        vm: &VmRecord,
        image: &Image,
        incoming: bool,
        progress: Progress<'_>,
    ) -> Result<(u32, Qmp), ApiError> {
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
        let net = match &self.net {
            Net::Tap(host) => {
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
            Net::User => NetBackend::User {
                netdev: nook_net::user_mode_netdev("net0"),
                mac: link.mac.clone(),
            },
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
            let (paths, kernel, initrd, root) = (
                paths.clone(),
                image.kernel.clone(),
                initrd.clone(),
                self.cfg.data_dir.join(JAIL_ROOT),
            );
            let slot = vm.slot;
            let made = tokio::task::spawn_blocking(move || {
                jail_for(slot, &paths, &kernel, &initrd, root, accel)
            })
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
            kernel: image.kernel.clone(),
            initrd,
            cmdline,
            net,
            accel,
            reclaim: self.cfg.reclaim,
            incoming,
            jail,
        };
        progress(&format!("starting QEMU ({})", accel.qemu_arg()));
        let launched = tokio::task::spawn_blocking(move || qemu.launch(&spec)).await;
        let pid =
            map_join(launched, "start QEMU")?.map_err(|e| errors::from_vmm("start QEMU", e))?;
        nook_vmm::console::follow(&paths);
        // A fork's clone stays `creating` until it is complete, so that a crash before then
        // removes it rather than re-adopting half a clone.
        let state = if incoming {
            VmState::Creating
        } else {
            VmState::Starting
        };
        self.store
            .set_state(&vm.id, state, None, Some(pid))
            .await
            .map_err(|e| errors::from_store("record the VM's process", e))?;
        self.confine(vm, pid).await?;
        let qmp = Qmp::connect(&paths.qmp_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to QMP", e))?;
        Ok((pid, qmp))
    }

    /// The name and address the guest gets, at boot on its command line and after a fork
    /// through the agent.
    fn guest_config(&self, vm: &VmRecord, link: &VmLink) -> BootConfig {
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

    /// Tells the guest who it is, with nook's key for its sshd, and waits for that sshd when the
    /// image runs one: "ready" includes SSH. True when it was another VM until now (a clone).
    async fn identify(&self, vm: &VmRecord, agent: &AgentClient) -> Result<bool, ApiError> {
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
            self.wait_for_sshd(vm).await;
        } else {
            // No sshd to relay to: the relay must not think there is one.
            let dir = self.paths(&vm.id).dir;
            let _ = std::fs::remove_file(dir.join(RELAY_KEY));
            let _ = std::fs::remove_file(dir.join(RELAY_KEY).with_extension("pub"));
        }
        Ok(answer.cloned)
    }

    async fn choose_accel(&self, qemu: &Qemu, image: &Image) -> Accel {
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

    /// Registers a running QEMU and watches it until it exits.
    fn adopt(self: &Arc<Self>, vm: &VmRecord, qmp: Qmp, agent: Option<AgentClient>) {
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
                },
            );
        }
        let (this, id, name, slot, owner) = (
            self.clone(),
            vm.id.clone(),
            vm.name.clone(),
            vm.slot,
            vm.owner.clone(),
        );
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

    /// Removes the tap and runtime sockets of a VM whose QEMU is gone. Idempotent.
    /// Puts a VM's QEMU into its account's cgroup, so the account's envelope bounds it.
    /// Admin VMs, and hosts without usable cgroups, run unconfined (logged at start).
    async fn confine(&self, vm: &VmRecord, pid: u32) -> Result<(), ApiError> {
        let Some(cg) = &self.cgroups else {
            return Ok(());
        };
        if vm.owner == ADMIN_OWNER {
            return Ok(());
        }
        let plan = self.plan_for(&vm.owner).await?;
        let limits = nook_cgroup::AccountLimits {
            cpus: plan.cpu,
            memory_bytes: u64::from(plan.memory_mib) << 20,
        };
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

    /// Re-applies an account's plan to its cgroup after the plan changed.
    pub async fn apply_plan(&self, account_id: &str) {
        let Some(cg) = &self.cgroups else { return };
        let Ok(plan) = self.plan_for(account_id).await else {
            return;
        };
        let limits = nook_cgroup::AccountLimits {
            cpus: plan.cpu,
            memory_bytes: u64::from(plan.memory_mib) << 20,
        };
        let (cg, id) = (cg.clone(), account_id.to_string());
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || cg.set_account(&id, limits)).await
        {
            tracing::warn!(%err, account = account_id, "could not apply the plan to the cgroup");
        }
    }

    /// CPU time and real memory of one confined VM.
    pub fn vm_usage(&self, owner: &str, id: &str) -> Option<nook_cgroup::Usage> {
        if owner == ADMIN_OWNER {
            return None;
        }
        self.cgroups.as_ref()?.vm_usage(owner, id).ok()
    }

    /// Running VMs that live in an account's cgroup (the ones idle detection looks after).
    pub async fn confined_vms(&self) -> Vec<VmRecord> {
        if self.cgroups.is_none() {
            return Vec::new();
        }
        let live: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        self.store
            .list()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|vm| {
                vm.owner != ADMIN_OWNER && vm.state == VmState::Running && live.contains(&vm.id)
            })
            .collect()
    }

    /// CPU nanoseconds and network bytes (both directions) a VM has used so far.
    pub fn activity(&self, vm: &VmRecord) -> Option<(u64, u64)> {
        let cpu = self
            .cgroups
            .as_ref()?
            .vm_usage(&vm.owner, &vm.id)
            .ok()?
            .cpu_usage_ns;
        let net = tap_counter(vm.slot, "rx_bytes").unwrap_or(0)
            + tap_counter(vm.slot, "tx_bytes").unwrap_or(0);
        Some((cpu, net))
    }

    /// Turns a VM's idle knobs on or off; a no-op when nothing changes.
    pub async fn set_idle(&self, vm: &VmRecord, idle: bool) {
        let changed = {
            let mut set = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle {
                set.insert(vm.id.clone())
            } else {
                set.remove(&vm.id)
            }
        };
        let Some(cg) = self.cgroups.clone().filter(|_| changed) else {
            return;
        };
        let knobs = if idle {
            // Weight 10 against the default 100; memory above a quarter of its size is the
            // first to go when the account presses on its cap.
            nook_cgroup::VmKnobs {
                cpu_weight: 10,
                memory_high: Some((u64::from(vm.memory_mib) << 20) / 4),
            }
        } else {
            nook_cgroup::VmKnobs {
                cpu_weight: 100,
                memory_high: None,
            }
        };
        let (owner, id, name) = (vm.owner.clone(), vm.id.clone(), vm.name.clone());
        match tokio::task::spawn_blocking(move || cg.set_vm(&owner, &id, knobs)).await {
            Ok(Ok(())) => {
                tracing::info!(vm = %name, idle, "idle knobs {}", if idle { "on" } else { "off" })
            }
            Ok(Err(err)) => tracing::warn!(vm = %name, %err, "could not change idle knobs"),
            Err(_) => {}
        }
    }

    pub fn is_idle(&self, id: &str) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// CPU time and real memory of an account's running VMs, when cgroups are in use.
    pub fn account_usage(&self, account_id: &str) -> Option<nook_cgroup::Usage> {
        self.cgroups.as_ref()?.account_usage(account_id).ok()
    }

    async fn release_runtime(&self, id: &str, slot: u32, owner: &str) {
        if let Some(cg) = &self.cgroups
            && owner != ADMIN_OWNER
        {
            let (cg, owner, vm) = (cg.clone(), owner.to_string(), id.to_string());
            if let Ok(Err(err)) =
                tokio::task::spawn_blocking(move || cg.remove_vm(&owner, &vm)).await
            {
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
        if let Ok(pid) = nook_vmm::qemu::read_pid(&paths.pidfile()) {
            let qemu = Qemu {
                binary: PathBuf::new(),
            };
            nook_vmm::qemu::kill(&qemu, pid, &paths);
            for _ in 0..50 {
                if !qemu.is_running(pid, &paths) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
        self.op_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.id);
    }

    /// Looks a VM up for `scope`, takes its op lock, and re-reads it by id under the lock:
    /// the operation then sees a state no concurrent one can change, and a rename or removal
    /// in between can never hand it another VM of the same name.
    async fn lock_vm(
        &self,
        name: &str,
        scope: Scope<'_>,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), ApiError> {
        let vm = self.record(name, scope).await?;
        let guard = self.op_lock(&vm.id).lock_owned().await;
        let vm = self.store.get_by_id(&vm.id).await.map_err(|e| match e {
            nook_store::StoreError::NotFound(_) => errors::not_found(name),
            other => errors::from_store("look up a VM", other),
        })?;
        Ok((guard, vm))
    }

    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        scope: Scope<'_>,
        progress: Progress<'_>,
    ) -> Result<VmInfo, ApiError> {
        let (_guard, vm) = self.lock_vm(name, scope).await?;
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
            .admit(&vm.owner, Ask::Start(&vm.id), vm.cpu, vm.memory_mib, 0)
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
        let (_guard, vm) = self.lock_vm(name, scope).await?;
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
        let (_guard, vm) = self.lock_vm(name, scope).await?;
        self.destroy(&vm).await;
        tracing::info!(vm = %vm.name, "removed");
        Ok(())
    }

    pub async fn console(&self, name: &str, scope: Scope<'_>) -> Result<String, ApiError> {
        let vm = self.record(name, scope).await?;
        Ok(self.paths(&vm.id).console_tail(usize::MAX).await)
    }

    /// The live agent connection of a running VM, reconnecting if it dropped.
    async fn agent(&self, vm: &VmRecord) -> Result<AgentClient, ApiError> {
        if vm.state != VmState::Running {
            return Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is not running: start it first", vm.name),
            ));
        }
        let existing = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            match live.get(&vm.id) {
                Some(l) => l.agent.clone(),
                None => {
                    return Err(ApiError::new(
                        ErrorCode::NotRunning,
                        format!("VM '{}' is not running", vm.name),
                    ));
                }
            }
        };
        if let Some(agent) = existing.filter(|a| !a.is_closed()) {
            return Ok(agent);
        }
        let agent = AgentClient::connect(&self.paths(&vm.id).agent_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to the guest agent", e))?;
        agent
            .wait_ready(Duration::from_secs(10))
            .await
            .map_err(|e| errors::from_vmm("reach the guest agent", e))?;
        if let Some(live) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&vm.id)
        {
            live.agent = Some(agent.clone());
        }
        Ok(agent)
    }

    pub async fn exec(
        &self,
        name: &str,
        scope: Scope<'_>,
        req: nook_api::ExecRequest,
    ) -> Result<Process, ApiError> {
        if req.argv.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "Nothing to run: give a command after --",
            ));
        }
        let vm = self.record(name, scope).await?;
        let agent = self.agent(&vm).await?;
        let spawn = SpawnRequest {
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            user: req.user,
            pty: None,
            stdin: req.stdin,
            ..Default::default()
        };
        agent
            .spawn(spawn)
            .await
            .map_err(|e| errors::from_vmm("start the command", e))
    }

    fn image_of(&self, vm: &VmRecord) -> Result<Image, ApiError> {
        let kind = ImageKind::from_str(&vm.image)
            .map_err(|e| errors::from_storage("open the VM's image", e))?;
        ImageStore::open_at(kind, std::path::Path::new(&vm.image_dir))
            .map_err(|e| errors::from_storage("open the VM's image", e))
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
        let (_guard, vm) = self.lock_vm(old, scope).await?;
        self.store
            .rename(&vm.id, new)
            .await
            .map_err(|e| errors::from_store("rename the VM", e))?;
        // The guest learns its new hostname now; the kernel command line carries it from the next boot.
        if vm.state == VmState::Running
            && let Ok(agent) = self.agent(&vm).await
        {
            let script = format!(
                "hostname {new} && echo {new} > /etc/hostname && sed -i 's/^127.0.1.1.*/127.0.1.1 {new}/' /etc/hosts"
            );
            let _ = run_to_end(&agent, vec!["sh".into(), "-c".into(), script]).await;
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
        let (_guard, vm) = self.lock_vm(name, scope).await?;
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
            .admit(&vm.owner, ask, cpu, memory_mib, disk_bytes)
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
                if let Ok(agent) = self.agent(vm).await {
                    let _ = run_to_end(
                        &agent,
                        vec![
                            "sh".into(),
                            "-c".into(),
                            "command -v resize2fs >/dev/null && resize2fs /dev/vda".into(),
                        ],
                    )
                    .await;
                }
            }
            None => {
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

    pub async fn stat(&self, name: &str, scope: Scope<'_>) -> Result<VmStat, ApiError> {
        let vm = self.record(name, scope).await?;
        let disk_host_bytes = std::fs::metadata(self.paths(&vm.id).disk())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        let metrics = match vm.state {
            VmState::Running => match self.agent(&vm).await {
                Ok(agent) => tokio::time::timeout(Duration::from_secs(5), agent.metrics())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            },
            _ => None,
        };
        let counter = |which: &str| tap_counter(vm.slot, which);
        let running = vm.state == VmState::Running;
        Ok(VmStat {
            vm: self.info(&vm),
            uptime_secs: metrics.as_ref().map(|m| m.uptime_secs),
            load_avg_1m: metrics.as_ref().map(|m| m.load_avg_1m),
            mem_total_kib: metrics.as_ref().map(|m| m.mem_total_kib),
            mem_available_kib: metrics.as_ref().map(|m| m.mem_available_kib),
            disk_total_kib: metrics.as_ref().map(|m| m.disk_total_kib),
            disk_available_kib: metrics.as_ref().map(|m| m.disk_available_kib),
            disk_host_bytes,
            // The tap's receive is the VM's transmit.
            net_rx_bytes: if running { counter("tx_bytes") } else { None },
            net_tx_bytes: if running { counter("rx_bytes") } else { None },
            processes: metrics.as_ref().map(|m| m.processes),
            idle: self.is_idle(&vm.id),
        })
    }

    /// Where the SSH front door takes `ssh name@HOST`: the running VM, and its own sshd (as
    /// [`GUEST_USER`]) when the image has one.
    pub async fn ssh_target(&self, name: &str, scope: Scope<'_>) -> Result<SshTarget, ApiError> {
        let vm = self.record(name, scope).await?;
        if vm.state != VmState::Running {
            return Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is {}: start it first", vm.name, vm.state.as_str()),
            ));
        }
        let dir = self.paths(&vm.id).dir;
        let sshd = match (std::fs::read_to_string(dir.join(RELAY_KEY)), &self.net) {
            (Ok(key), Net::Tap(_)) => {
                let ip = VmLink::for_slot(vm.slot)
                    .map_err(|e| errors::from_net("find the VM's address", e))?
                    .guest_ip;
                Some(nook_sshd::SshdEndpoint {
                    addr: (ip, 22).into(),
                    user: GUEST_USER.to_string(),
                    private_key_openssh: key,
                    host_keys: read_guest_host_keys(&dir)
                        .into_iter()
                        .map(|k| k.public_openssh)
                        .collect(),
                })
            }
            // No sshd in the image, or no network path to it (user-mode networking).
            _ => None,
        };
        Ok(SshTarget {
            name: vm.name,
            sshd,
        })
    }

    /// Starts a process in a running VM for the SSH front door, as [`GUEST_USER`], with output
    /// flow control so a slow client slows the process instead of filling host memory.
    pub async fn spawn_for_ssh(
        &self,
        name: &str,
        scope: Scope<'_>,
        spawn: SpawnRequest,
    ) -> Result<Process, ApiError> {
        let vm = self.record(name, scope).await?;
        let agent = self.agent(&vm).await?;
        agent
            .spawn(SpawnRequest {
                user: Some(GUEST_USER.to_string()),
                ..spawn
            })
            .await
            .map_err(|e| errors::from_vmm("start the command", e))
    }

    /// The VM's SSH host keys, made by the host on first need and kept in the VM's directory so
    /// they survive restarts; a clone has a directory of its own and so gets keys of its own.
    fn guest_host_keys(&self, vm: &VmRecord) -> Result<Vec<nook_proto::SshHostKey>, ApiError> {
        let dir = self.paths(&vm.id).dir;
        let existing = read_guest_host_keys(&dir);
        if !existing.is_empty() {
            return Ok(existing);
        }
        let made = nook_sshd::generate_guest_host_keys(&format!("root@{}", vm.name))
            .map_err(|e| errors::internal("make the VM's SSH host keys", &e))?;
        let mut keys = Vec::new();
        for key in made {
            let path = dir.join(format!("ssh_host_{}_key", key.kind));
            write_private(
                &path.with_extension("pub"),
                key.public_openssh.as_bytes(),
                0o644,
            )
            .and_then(|()| write_private(&path, key.private_openssh.as_bytes(), 0o600))
            .map_err(|e| io_error("save the VM's SSH host keys", e))?;
            keys.push(nook_proto::SshHostKey {
                kind: key.kind.to_string(),
                private_openssh: key.private_openssh,
                public_openssh: key.public_openssh,
            });
        }
        Ok(keys)
    }

    /// The public half of nook's per-VM key for the relay to the guest's sshd, made natively on
    /// first need and kept in the VM's directory (0600) so it survives restarts. A clone comes
    /// with its source's (see `share_ssh_key`), which its disk already authorizes.
    fn relay_key(&self, vm: &VmRecord) -> Result<String, ApiError> {
        let path = self.paths(&vm.id).dir.join(RELAY_KEY);
        let public = path.with_extension("pub");
        if path.is_file()
            && let Ok(text) = std::fs::read_to_string(&public)
        {
            return Ok(text);
        }
        let key = nook_sshd::generate_client_key(&format!("nook-{}", vm.id))
            .map_err(|e| errors::internal("make the VM's SSH key", &e))?;
        write_private(&path, key.private_openssh.as_bytes(), 0o600)
            .and_then(|()| write_private(&public, key.public_openssh.as_bytes(), 0o644))
            .map_err(|e| io_error("save the VM's SSH key", e))?;
        Ok(key.public_openssh)
    }

    /// The agent answers before systemd has started sshd; "ready" includes SSH, when there is
    /// a network path to it.
    pub(super) async fn wait_for_sshd(&self, vm: &VmRecord) {
        if let (Net::Tap(_), Ok(link)) = (&self.net, VmLink::for_slot(vm.slot)) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            // Each try is bounded: a SYN the guest never answers would otherwise wait out the
            // kernel's retries (over two minutes), far past the deadline.
            let accepts = || async {
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect((link.guest_ip, 22)),
                )
                .await
                .is_ok_and(|c| c.is_ok())
            };
            while !accepts().await {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(vm = %vm.name, "the guest's sshd did not come up within 60s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Runs a command in the guest as root with `env` added, feeding it `input`; returns its
    /// exit status and output, for setup work on behalf of the user.
    pub async fn run_in(
        &self,
        name: &str,
        scope: Scope<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        input: Option<Vec<u8>>,
    ) -> Result<Process, ApiError> {
        let vm = self.record(name, scope).await?;
        let agent = self.agent(&vm).await?;
        let spawn = SpawnRequest {
            argv,
            env,
            cwd: None,
            user: None,
            pty: None,
            stdin: input.is_some(),
            ..Default::default()
        };
        let process = agent
            .spawn(spawn)
            .await
            .map_err(|e| errors::from_vmm("start the command", e))?;
        if let Some(input) = input {
            let handle = process.handle();
            handle
                .stdin(&input)
                .await
                .map_err(|e| errors::from_vmm("send the script", e))?;
            handle
                .close_stdin()
                .await
                .map_err(|e| errors::from_vmm("send the script", e))?;
        }
        Ok(process)
    }

    /// The envelope of an account: its own plan, or the configured default.
    pub async fn plan_for(&self, account_id: &str) -> Result<nook_store::Plan, ApiError> {
        Ok(self
            .store
            .plan(account_id)
            .await
            .map_err(|e| errors::from_store("read the plan", e))?
            .unwrap_or(self.cfg.default_plan))
    }

    /// Refuses to create, start or resize a VM when that would push `owner` past its
    /// envelope. Each message says what to stop, remove or resize. VMs made through the admin
    /// socket belong to no plan.
    async fn admit(
        &self,
        owner: &str,
        ask: Ask<'_>,
        cpu: u32,
        memory_mib: u32,
        disk_bytes: u64,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
        let admitted = self.host_admission.lock().await;
        if owner == ADMIN_OWNER {
            return Ok(admitted);
        }
        let all = self
            .store
            .list()
            .await
            .map_err(|e| errors::from_store("list VMs", e))?;
        host_room(&self.cfg.host_limits, &all, ask, memory_mib, disk_bytes)?;
        let plan = self.plan_for(owner).await?;
        let size = |mib: u64| format_size(mib << 20);
        let refuse = |msg: String| Err(ApiError::new(ErrorCode::OverEnvelope, msg));
        if f64::from(cpu) > plan.cpu.ceil() {
            return refuse(format!(
                "A VM with {cpu} vCPUs does not fit your envelope of {} vCPUs: ask for fewer with --cpu",
                plan.cpu
            ));
        }
        if memory_mib > plan.memory_mib {
            return refuse(format!(
                "A VM with {} of memory does not fit your envelope of {}: ask for less with --memory",
                size(memory_mib.into()),
                size(plan.memory_mib.into())
            ));
        }
        let vms: Vec<VmRecord> = all
            .into_iter()
            .filter(|vm| vm.owner == owner && Some(vm.id.as_str()) != ask.existing())
            .collect();
        if matches!(ask, Ask::Create) && vms.len() as u32 >= plan.max_vms {
            return refuse(format!(
                "Your envelope allows {} VMs and you have {}: remove one with `rm NAME`",
                plan.max_vms,
                vms.len()
            ));
        }
        // A resize that keeps the disk is not refused for disks a lowered plan no longer
        // covers: it adds nothing to them.
        let adds_disk = match ask {
            Ask::Create => true,
            Ask::Start(_) => false,
            Ask::Resize { old_disk_bytes, .. } => disk_bytes > old_disk_bytes,
        };
        if adds_disk {
            let disk_used: u64 = vms.iter().map(|vm| vm.disk_bytes).sum();
            if disk_used + disk_bytes > plan.disk_bytes {
                return refuse(format!(
                    "A {} disk would bring your VMs' disks to {}, over your envelope's {}: remove a VM or ask for a smaller --disk",
                    format_size(disk_bytes),
                    format_size(disk_used + disk_bytes),
                    format_size(plan.disk_bytes)
                ));
            }
        }
        // A stopped VM's new memory is admitted when it starts, not now.
        if matches!(ask, Ask::Resize { runs: false, .. }) {
            return Ok(admitted);
        }
        let mut running: Vec<&VmRecord> = vms
            .iter()
            .filter(|vm| {
                matches!(
                    vm.state,
                    VmState::Running | VmState::Starting | VmState::Creating
                )
            })
            .collect();
        let running_mib: u64 = running.iter().map(|vm| u64::from(vm.memory_mib)).sum();
        let limit_mib = (f64::from(plan.memory_mib) * self.cfg.memory_overcommit) as u64;
        if running_mib + u64::from(memory_mib) > limit_mib {
            running.sort_by_key(|vm| std::cmp::Reverse(vm.memory_mib));
            let biggest: Vec<String> = running
                .iter()
                .take(3)
                .map(|vm| format!("{} ({})", vm.name, size(vm.memory_mib.into())))
                .collect();
            return refuse(format!(
                "Running another {} would bring your running VMs to {}, over the {} your {} envelope allows: stop one ({}) or resize it",
                size(memory_mib.into()),
                size(running_mib + u64::from(memory_mib)),
                size(limit_mib),
                size(plan.memory_mib.into()),
                biggest.join(", ")
            ));
        }
        Ok(admitted)
    }

    /// Settles every VM after a daemon start: re-adopts live QEMUs, finishes or undoes
    /// operations a crash interrupted, and removes leftovers no row owns.
    pub async fn recover(self: &Arc<Self>) -> Result<(), ApiError> {
        let vms = self
            .store
            .list()
            .await
            .map_err(|e| errors::from_store("list VMs", e))?;
        let qemu = Qemu {
            binary: PathBuf::new(),
        };
        for vm in &vms {
            let paths = self.paths(&vm.id);
            let pid = nook_vmm::qemu::read_pid(&paths.pidfile())
                .ok()
                .filter(|pid| qemu.is_running(*pid, &paths));
            match (vm.state, pid) {
                (VmState::Creating, _) => {
                    tracing::warn!(vm = %vm.name, "removing a VM whose creation was interrupted");
                    self.destroy(vm).await;
                }
                (VmState::Running | VmState::Starting | VmState::Stopping, Some(pid)) => {
                    match Qmp::connect(&paths.qmp_socket()).await {
                        Ok(qmp) => {
                            tracing::info!(vm = %vm.name, pid, "re-adopted running VM");
                            nook_vmm::console::follow(&paths);
                            // A clone the crash interrupted may have left it paused.
                            nook_vmm::fork::resume(&qmp).await;
                            self.settle_next_disk(vm, Some(&qmp)).await;
                            if let Err(err) = self.confine(vm, pid).await {
                                tracing::warn!(vm = %vm.name, error = %err.message, "could not confine a re-adopted VM");
                            }
                            let agent = AgentClient::connect(&paths.agent_socket()).await.ok();
                            self.adopt(vm, qmp, agent);
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
                (VmState::Stopped | VmState::Failed, _) => {
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

    async fn remove_orphans(&self, known: &[VmRecord]) {
        let Ok(entries) = std::fs::read_dir(self.cfg.vms_dir()) else {
            return;
        };
        let qemu = Qemu {
            binary: PathBuf::new(),
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if known.iter().any(|vm| vm.id == id) {
                continue;
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

/// The empty directory under the data dir that every QEMU's jail root is mounted on (in that
/// QEMU's own mount namespace; on the host it stays empty).
const JAIL_ROOT: &str = "jail";

/// Makes the files of `paths`' VM fit its jail and describes the jail: the VM's directory is
/// root's and only traversable, its disk top belongs to the VM's uid alone, and what lies
/// below the top (layers, base, kernel, initrd) is readable, never writable, by it.
fn jail_for(
    slot: u32,
    paths: &VmPaths,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    root: PathBuf,
    accel: Accel,
) -> Result<nook_vmm::Jail, ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let uid = nook_vmm::jail::uid_for_slot(slot);
    let fail = |what: &str, path: &std::path::Path, e: std::io::Error| {
        io_error(
            &format!("prepare QEMU's jail ({what} {})", path.display()),
            e,
        )
    };
    let set = |path: &std::path::Path, owner: u32, mode: u32| -> Result<(), ApiError> {
        std::os::unix::fs::chown(path, Some(owner), Some(owner))
            .map_err(|e| fail("give", path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail("set the mode of", path, e))
    };
    std::fs::create_dir_all(&root).map_err(|e| fail("make", &root, e))?;
    set(&paths.dir, 0, 0o711)?;
    let chain = nook_storage::layers::chain(&paths.disk())
        .map_err(|e| errors::from_storage("read the disk's chain", e))?;
    let (top, below) = chain
        .split_first()
        .ok_or_else(|| io_error("read the disk's chain", std::io::ErrorKind::NotFound.into()))?;
    set(top, uid, 0o600)?;
    let mut read_only: Vec<PathBuf> = below.to_vec();
    read_only.extend([kernel.to_path_buf(), initrd.to_path_buf()]);
    for file in &read_only {
        set(file, 0, 0o644)?;
    }
    let (devices, groups) = match accel {
        Accel::Kvm => {
            use std::os::unix::fs::MetadataExt;
            let kvm = PathBuf::from("/dev/kvm");
            let gid = std::fs::metadata(&kvm).map(|m| m.gid()).unwrap_or(0);
            (vec![kvm], vec![gid])
        }
        Accel::Tcg => (Vec::new(), Vec::new()),
    };
    Ok(nook_vmm::Jail {
        uid,
        groups,
        root,
        read_only,
        writable: vec![paths.dir.clone()],
        devices,
    })
}

/// A byte counter of a VM's tap (`rx_bytes`, `tx_bytes`), seen from the host side.
fn tap_counter(slot: u32, which: &str) -> Option<u64> {
    let tap = VmLink::for_slot(slot).ok()?.tap;
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{which}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes the empty groups of VMs and accounts that are gone. Groups still holding a QEMU
/// (a VM about to be re-adopted) refuse removal and stay.
fn sweep_cgroups(cg: &nook_cgroup::Cgroups) {
    for account in cg.list_accounts().unwrap_or_default() {
        for vm in cg.list_vms(&account).unwrap_or_default() {
            let _ = cg.remove_vm(&account, &vm);
        }
        let _ = cg.remove_account(&account);
    }
}

enum BootError {
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
async fn silent_console(paths: &VmPaths, after: Duration) {
    tokio::time::sleep(after).await;
    let printed = std::fs::metadata(paths.console_log())
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if printed {
        std::future::pending::<()>().await;
    }
}

/// The host keys saved in a VM's directory (`ssh_host_KIND_key` and `.pub`), in a fixed order.
fn read_guest_host_keys(dir: &std::path::Path) -> Vec<nook_proto::SshHostKey> {
    ["ed25519", "ecdsa"]
        .into_iter()
        .filter_map(|kind| {
            let path = dir.join(format!("ssh_host_{kind}_key"));
            Some(nook_proto::SshHostKey {
                kind: kind.to_string(),
                private_openssh: std::fs::read_to_string(&path).ok()?,
                public_openssh: std::fs::read_to_string(path.with_extension("pub"))
                    .ok()?
                    .trim()
                    .to_string(),
            })
        })
        .collect()
}

/// Writes a file whole under a temporary name, then renames it, so a crash leaves either the
/// old file or the new one.
fn write_private(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs a command through the agent and waits for it; its output is dropped.
async fn run_to_end(agent: &AgentClient, argv: Vec<String>) -> Result<i32, nook_vmm::VmmError> {
    let spawn = SpawnRequest {
        argv,
        env: vec![],
        cwd: None,
        user: None,
        pty: None,
        stdin: false,
        ..Default::default()
    };
    let mut process = agent.spawn(spawn).await?;
    loop {
        match process.next().await {
            Some(nook_proto::GuestMsg::Exit { code, .. }) => return Ok(code.unwrap_or(-1)),
            Some(_) => continue,
            None => return Err(nook_vmm::VmmError::AgentClosed),
        }
    }
}

fn io_error(context: &str, err: std::io::Error) -> ApiError {
    if err.kind() == std::io::ErrorKind::StorageFull {
        errors::no_space("the data dir")
    } else {
        errors::internal(context, &err)
    }
}

/// What [`Manager::admit`] is asked to let through.
#[derive(Clone, Copy)]
enum Ask<'a> {
    /// A new VM: one more VM, its disk, and (unless it stays stopped) its memory.
    Create,
    /// Booting the VM with this id: only its CPU and memory count.
    Start(&'a str),
    /// New sizes for the VM with this id: its disk counts when it grows, its memory only if
    /// it runs (a stopped VM is admitted again when it starts).
    Resize {
        id: &'a str,
        runs: bool,
        old_disk_bytes: u64,
    },
}

/// Whether the host, all accounts together, has room for what `ask` adds: a VM (count and
/// disk) and, when it will run, its memory. Says only that the host is full, never what other
/// accounts hold.
fn host_room(
    limits: &crate::config::HostLimits,
    all: &[VmRecord],
    ask: Ask<'_>,
    memory_mib: u32,
    disk_bytes: u64,
) -> Result<(), ApiError> {
    let others = || {
        all.iter()
            .filter(|vm| Some(vm.id.as_str()) != ask.existing())
    };
    let full = |what: &str| {
        Err(ApiError::new(
            ErrorCode::OverEnvelope,
            format!("This host is full ({what}): try again later, or ask its admin for room"),
        ))
    };
    if matches!(ask, Ask::Create) && others().count() as u64 >= u64::from(limits.max_vms) {
        return full("it holds as many VMs as it may");
    }
    let adds_disk = match ask {
        Ask::Create => true,
        Ask::Start(_) => false,
        Ask::Resize { old_disk_bytes, .. } => disk_bytes > old_disk_bytes,
    };
    let disks: u64 = others().map(|vm| vm.disk_bytes).sum();
    if adds_disk && disks.saturating_add(disk_bytes) > limits.disk_bytes {
        return full("its disks are all promised");
    }
    if matches!(ask, Ask::Resize { runs: false, .. }) {
        return Ok(());
    }
    let running: u64 = others()
        .filter(|vm| {
            matches!(
                vm.state,
                VmState::Running | VmState::Starting | VmState::Creating
            )
        })
        .map(|vm| u64::from(vm.memory_mib))
        .sum();
    if running + u64::from(memory_mib) > limits.memory_mib {
        return full("its memory is all promised to running VMs");
    }
    Ok(())
}

impl Ask<'_> {
    /// The VM already counted in the account, left out of the totals it is checked against.
    fn existing(&self) -> Option<&str> {
        match self {
            Ask::Create => None,
            Ask::Start(id) | Ask::Resize { id, .. } => Some(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, state: VmState, memory_mib: u32, disk_gib: u64) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: id.into(),
            owner: format!("owner-of-{id}"),
            image: "tiny".into(),
            image_dir: String::new(),
            cpu: 1,
            memory_mib,
            disk_bytes: disk_gib << 30,
            slot: 1,
            state,
            state_reason: None,
            pid: None,
            created_at: String::new(),
        }
    }

    #[test]
    fn the_host_limits_every_account_together() {
        let limits = crate::config::HostLimits {
            memory_mib: 1024,
            disk_bytes: 10 << 30,
            max_vms: 3,
        };
        let all = [
            vm("a", VmState::Running, 512, 4),
            vm("b", VmState::Stopped, 512, 4),
        ];
        assert!(host_room(&limits, &all, Ask::Create, 512, 1 << 30).is_ok());
        // Memory counts only running VMs; disk counts all.
        let err = host_room(&limits, &all, Ask::Create, 768, 1 << 30).expect_err("memory");
        assert!(err.message.contains("memory"), "{}", err.message);
        let err = host_room(&limits, &all, Ask::Create, 128, 3 << 30).expect_err("disk");
        assert!(err.message.contains("disks"), "{}", err.message);
        // Starting b adds its memory, not its disk or a VM.
        assert!(host_room(&limits, &all, Ask::Start("b"), 512, 0).is_ok());
        assert!(host_room(&limits, &all, Ask::Start("b"), 600, 0).is_err());
        let three = [
            vm("a", VmState::Stopped, 512, 1),
            vm("b", VmState::Stopped, 512, 1),
            vm("c", VmState::Stopped, 512, 1),
        ];
        let err = host_room(&limits, &three, Ask::Create, 128, 1 << 30).expect_err("count");
        assert!(err.message.contains("as many VMs"), "{}", err.message);
        // A resize of a stopped VM that keeps its disk adds nothing.
        let resize = Ask::Resize {
            id: "a",
            runs: false,
            old_disk_bytes: 1 << 30,
        };
        assert!(host_room(&limits, &three, resize, 4096, 1 << 30).is_ok());
        // The message names nothing of other accounts.
        let err = host_room(&limits, &all, Ask::Create, 768, 1 << 30).expect_err("memory");
        assert!(!err.message.contains("owner-of"), "{}", err.message);
    }
}
