//! This host's end of the host channel (`nook-channel`): the fleet's CA, kept in the shared
//! store sealed with the fleet's secrets key; this host's certificate, issued at each start;
//! the listener other hosts reach this host's VMs through; and the way this host's front doors
//! reach VMs other hosts run.

use super::*;

use nook_channel::{FleetCa, HostIdentity};

/// The row the CA is sealed to (see `secrets.rs`).
const CA_ROW: &str = "nook:fleet-ca";
/// How long a peer's connection to a VM's port may take to open.
const VM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Manager {
    /// Loads the fleet's CA (the first host makes it), issues this host its certificate, and
    /// listens for the other hosts at `--host-addr`.
    pub(super) async fn start_channel(self: &Arc<Self>) -> Result<HostIdentity, ApiError> {
        let made = FleetCa::generate()
            .map_err(|e| errors::internal("make the fleet's CA", &e))?
            .to_pem();
        let stored = self
            .store
            .setting_or_insert("fleet_ca", &self.sealer.seal(CA_ROW, made.as_bytes()))
            .await
            .map_err(|e| errors::from_store("load the fleet's CA", e))?;
        let pem = self
            .sealer
            .unseal(CA_ROW, &stored)
            .and_then(|p| String::from_utf8(p).ok())
            // check_key ran first, so a key that opens nothing here was already refused.
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::HostMisconfigured,
                    "The fleet's CA in the store does not open with this host's secrets key: copy secrets.key from a host of the fleet",
                )
            })?;
        let identity = FleetCa::from_pem(&pem)
            .and_then(|ca| ca.issue(&self.cfg.host_name))
            .map_err(|e| errors::internal("issue this host's certificate", &e))?;
        let addr = listen_addr(&self.cfg.host_addr);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            ApiError::new(
                ErrorCode::HostMisconfigured,
                format!("Cannot listen for the fleet's hosts on {addr} ({e}): check --host-addr"),
            )
        })?;
        tracing::info!(%addr, "host channel listening (mutual TLS, the fleet's CA)");
        tokio::spawn(nook_channel::serve(
            listener,
            identity.clone(),
            Arc::new(Peers(self.clone())),
        ));
        Ok(identity)
    }

    /// How this host's front doors reach `vm` when another host runs it; `None` when it runs
    /// here (or there is no fleet).
    pub(crate) fn via(self: &Arc<Self>, vm_id: &str, vm_host: &str) -> Option<nook_edge::Via> {
        self.fleet.as_ref()?;
        if vm_host.is_empty() || vm_host == self.cfg.host_name {
            return None;
        }
        Some(nook_edge::Via(Arc::new(ThroughHost {
            manager: self.clone(),
            host: vm_host.to_string(),
            vm_id: vm_id.to_string(),
        })))
    }

    /// This host's channel identity and where `host` listens, or why it cannot be reached. A
    /// host not heard of yet (one that joined since the last look) is looked up at once.
    pub(crate) async fn channel_route(&self, host: &str) -> Result<(HostIdentity, String), String> {
        let Some(fleet) = &self.fleet else {
            return Err("this host is not part of a fleet".into());
        };
        if self.host_down(host).is_none() && fleet.addr_of(host).is_none() {
            self.look_at_hosts(fleet).await;
        }
        match (self.host_down(host), fleet.addr_of(host)) {
            (Some(down), _) => Err(down),
            (None, None) => Err(format!("host '{host}' is not in the fleet's list of hosts")),
            (None, Some(addr)) => match fleet.channel.get() {
                Some(identity) => Ok((identity.clone(), addr)),
                None => Err("this host has not joined the host channel yet".to_string()),
            },
        }
    }

    /// Whether this host is one of a fleet (a shared store).
    pub(crate) fn in_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// Refuses a host name that is not one of `hosts`, or one that is down; `what` says what
    /// asked for it (`--on h2`, `move to h2`).
    pub(crate) fn check_host(
        &self,
        hosts: &[nook_store::HostStatus],
        name: &str,
        what: &str,
    ) -> Result<(), ApiError> {
        let Some(host) = hosts.iter().find(|h| h.host.name == name) else {
            let names: Vec<&str> = hosts.iter().map(|h| h.host.name.as_str()).collect();
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{what}: there is no such host in the fleet (its hosts: {})",
                    names.join(", ")
                ),
            ));
        };
        if !self.host_is_up(host) {
            return Err(ApiError::new(
                ErrorCode::HostDown,
                format!(
                    "{what}: that host is down (no heartbeat for {} s); pick another",
                    host.since_heartbeat_ms.max(0) / 1000
                ),
            ));
        }
        Ok(())
    }

    /// [`Self::check_host`], and refuses a cordoned host too: for what puts a VM there.
    pub(crate) fn check_takes_vms(
        &self,
        hosts: &[nook_store::HostStatus],
        name: &str,
        what: &str,
    ) -> Result<(), ApiError> {
        self.check_host(hosts, name, what)?;
        if hosts.iter().any(|h| h.host.name == name && h.cordoned) {
            return Err(cordoned(name, what));
        }
        Ok(())
    }

    /// Checks the host an `--on` names: this one needs only not be cordoned (its own heartbeat
    /// may lag a busy database); another must be up too.
    fn check_on(&self, hosts: &[nook_store::HostStatus], on: &str) -> Result<(), ApiError> {
        let what = format!("--on {on}");
        if on == self.cfg.host_name {
            if hosts.iter().any(|h| h.host.name == on && h.cordoned) {
                return Err(cordoned(on, &what));
            }
            return Ok(());
        }
        self.check_takes_vms(hosts, on, &what)
    }

    /// Where a new VM goes: `on` when given, else the host with the most memory free for it
    /// (this one on a tie). `None`: here.
    pub(crate) async fn place(
        &self,
        image: Option<&str>,
        memory: Option<&str>,
        on: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        let me = self.cfg.host_name.as_str();
        if self.fleet.is_none() {
            return match on {
                Some(on) if on != me => Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "--on {on}: this host ('{me}') is not part of a fleet, so every VM lives here"
                    ),
                )),
                _ => Ok(None),
            };
        }
        let hosts = self
            .store
            .hosts()
            .await
            .map_err(|e| errors::from_store("list the fleet's hosts", e))?;
        if let Some(on) = on {
            self.check_on(&hosts, on)?;
            return Ok((on != me).then(|| on.to_string()));
        }
        // An image or size this host cannot make sense of is its own error to give.
        let need_mib = match memory {
            Some(m) => match nook_api::parse_size(m) {
                Ok(bytes) => bytes >> 20,
                Err(_) => return Ok(None),
            },
            None => match ImageKind::from_str(image.unwrap_or("default"))
                .ok()
                .and_then(|kind| self.images.image(kind).ok())
            {
                Some(image) => u64::from(image.default_memory_mib),
                None => return Ok(None),
            },
        };
        let placed = self
            .store
            .memory_placed()
            .await
            .map_err(|e| errors::from_store("count the fleet's memory", e))?;
        match nook_store::place(&hosts, &placed, me, need_mib, fleet::HOST_FRESH_MS) {
            Some(host) => Ok((host != me).then_some(host)),
            // No host has the room: this one's admission says what is short, unless it takes
            // no new VMs at all.
            None if hosts.iter().any(|h| h.host.name == me && h.cordoned) => Err(cordoned(
                me,
                &format!("no other host of the fleet has {need_mib} MiB free, and this one"),
            )),
            None => Ok(None),
        }
    }

    /// Where a clone of `src` goes, needing `need_mib` of memory there: here while this host
    /// is up, not cordoned and has the room (its layers are here), else the roomiest other
    /// host. `on` names the host instead. `None`: here.
    pub(crate) async fn place_clone(
        &self,
        src: &VmRecord,
        need_mib: u64,
        on: Option<&str>,
    ) -> Result<Option<Placed>, ApiError> {
        let me = self.cfg.host_name.as_str();
        if self.fleet.is_none() {
            self.place(None, None, on).await?;
            return Ok(None);
        }
        let hosts = self.hosts().await?;
        if let Some(on) = on {
            self.check_on(&hosts, on)?;
            return Ok((on != me).then(|| Placed {
                host: on.to_string(),
                why: "asked for".to_string(),
            }));
        }
        let placed = self
            .store
            .memory_placed()
            .await
            .map_err(|e| errors::from_store("count the fleet's memory", e))?;
        let mine: Vec<_> = hosts
            .iter()
            .filter(|h| h.host.name == me)
            .cloned()
            .collect();
        if nook_store::place(&mine, &placed, me, need_mib, fleet::HOST_FRESH_MS).is_some() {
            return Ok(None);
        }
        let why = match mine.first() {
            Some(h) if h.cordoned => format!("host '{me}' is cordoned"),
            Some(h) => format!(
                "host '{me}' has {} MiB free and the clone needs {need_mib} MiB",
                h.host
                    .memory_mib
                    .saturating_sub(placed.get(me).copied().unwrap_or(0))
            ),
            None => format!("host '{me}' is not in the fleet's list yet"),
        };
        let others: Vec<_> = hosts.into_iter().filter(|h| h.host.name != me).collect();
        match nook_store::place(&others, &placed, me, need_mib, fleet::HOST_FRESH_MS) {
            Some(host) => Ok(Some(Placed { host, why })),
            None => Err(ApiError::new(
                ErrorCode::HostShortOfMemory,
                format!(
                    "No host of the fleet has room for a clone of '{}' ({why}, and no other host that is up takes {need_mib} MiB more): stop a VM, or add a host",
                    src.name
                ),
            )),
        }
    }

    /// The host other than this one, up, with the most memory free for `memory_mib` more: where
    /// a VM moves when no host is named.
    pub(crate) async fn place_elsewhere(&self, memory_mib: u32) -> Result<String, ApiError> {
        let me = self.cfg.host_name.as_str();
        let others: Vec<_> = self
            .store
            .hosts()
            .await
            .map_err(|e| errors::from_store("list the fleet's hosts", e))?
            .into_iter()
            .filter(|h| h.host.name != me)
            .collect();
        let placed = self
            .store
            .memory_placed()
            .await
            .map_err(|e| errors::from_store("count the fleet's memory", e))?;
        nook_store::place(&others, &placed, me, u64::from(memory_mib), fleet::HOST_FRESH_MS)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::HostDown,
                    format!("No other host of the fleet is up with {memory_mib} MiB of memory free to take it: name a host (`move VM HOST`), or add one"),
                )
            })
    }

    /// The host `vm` lives on when that is not this one; refused while that host is down.
    pub(crate) fn lives_elsewhere(&self, vm: &VmRecord) -> Result<Option<String>, ApiError> {
        if self.fleet.is_none() || vm.host.is_empty() || vm.host == self.cfg.host_name {
            return Ok(None);
        }
        if let Some(down) = self.host_down(&vm.host) {
            return Err(ApiError::new(
                ErrorCode::HostDown,
                format!(
                    "VM '{}' is unavailable: {down}. Its disk is there, so it comes back when that host does",
                    vm.name
                ),
            ));
        }
        Ok(Some(vm.host.clone()))
    }
}

/// A clone placed on another host than its source's, and why.
pub(crate) struct Placed {
    pub host: String,
    pub why: String,
}

/// `what` cannot go to `host`: it is cordoned.
fn cordoned(host: &str, what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::HostCordoned,
        format!(
            "{what}: host '{host}' is cordoned and takes no new VMs (`nook host uncordon {host}` lets it again)"
        ),
    )
}

/// Where the channel listens: the address other hosts are told, with the default port added.
fn listen_addr(host_addr: &str) -> String {
    let addr = nook_channel::with_port(host_addr);
    // A name rather than an address: every interface, on its port.
    match addr.parse::<std::net::SocketAddr>() {
        Ok(_) => addr,
        Err(_) => {
            let port = addr
                .rsplit_once(':')
                .map_or(nook_channel::DEFAULT_PORT.to_string(), |(_, p)| {
                    p.to_string()
                });
            format!("0.0.0.0:{port}")
        }
    }
}

/// One VM another host runs, as the edge dials it.
struct ThroughHost {
    manager: Arc<Manager>,
    host: String,
    vm_id: String,
}

impl nook_edge::Dial for ThroughHost {
    fn dial(&self, port: u16) -> nook_edge::Dialed {
        let (manager, host, vm_id) = (self.manager.clone(), self.host.clone(), self.vm_id.clone());
        Box::pin(async move {
            let (identity, addr) = manager
                .channel_route(&host)
                .await
                .map_err(std::io::Error::other)?;
            let stream = nook_channel::connect(&identity, &host, &addr, &vm_id, port)
                .await
                .map_err(std::io::Error::other)?;
            Ok(Box::new(stream) as Box<dyn nook_edge::UpstreamIo>)
        })
    }
}

/// What this host does for the other hosts: connects them to its running VMs.
struct Peers(Arc<Manager>);

impl nook_channel::Handler for Peers {
    async fn connect(&self, vm_id: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
        let m = &self.0;
        let vm = m.vm_for_peer(vm_id).await?;
        let running = vm.state == VmState::Running
            && m.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&vm.id);
        if !running {
            return Err(format!("VM '{}' is not running", vm.name));
        }
        let link = VmLink::for_slot(vm.slot).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            VM_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((link.guest_ip, port)),
        )
        .await
        {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(format!("VM '{}' port {port}: {e}", vm.name)),
            Err(_) => Err(format!("VM '{}' port {port}: no answer", vm.name)),
        }
    }

    async fn shell(
        &self,
        vm_id: &str,
        shell: nook_channel::ShellRequest,
    ) -> Result<nook_channel::ShellSession, String> {
        let vm = self.0.vm_for_peer(vm_id).await?;
        crate::frontdoor::shell_for_peer(&self.0, &vm.name, shell).await
    }

    async fn lobby(
        &self,
        request: nook_channel::LobbyRequest,
        out: tokio::sync::mpsc::Sender<nook_channel::LobbyOut>,
    ) {
        crate::lobby::run_for_peer(&self.0, request, out).await;
    }

    async fn take_vm(
        &self,
        peer: nook_channel::Peer,
        vm_id: &str,
        live: bool,
        link: nook_channel::MoveLink<nook_channel::PeerStream>,
    ) {
        self.0.take_vm(peer, vm_id, live, link).await;
    }

    async fn join(
        &self,
        request: nook_channel::JoinRequest,
    ) -> Result<nook_channel::JoinGrant, String> {
        self.0.grant_join(request).await
    }

    async fn take_replica(
        &self,
        peer: nook_channel::Peer,
        vm_id: &str,
        link: nook_channel::MoveLink<nook_channel::PeerStream>,
    ) {
        self.0.take_replica(peer, vm_id, link).await;
    }

    async fn memory(
        &self,
        vm_id: &str,
        token: &str,
        stream: nook_channel::PeerStream,
    ) -> Result<(), String> {
        self.0.memory_arrived(vm_id, token, stream)
    }
}

impl Manager {
    /// A VM a peer asks for: it must live here.
    async fn vm_for_peer(&self, vm_id: &str) -> Result<VmRecord, String> {
        let vm = match self.store.get_by_id(vm_id).await {
            Ok(vm) => vm,
            Err(nook_store::StoreError::NotFound(_)) => return Err("no such VM".into()),
            Err(_) => return Err("this host cannot reach its database right now".into()),
        };
        if self.ensure_here(&vm).is_err() {
            return Err(format!(
                "VM '{}' does not live on host '{}'",
                vm.name, self.cfg.host_name
            ));
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_channel_listens_where_other_hosts_are_told_to_go() {
        let port = nook_channel::DEFAULT_PORT;
        assert_eq!(super::listen_addr("10.0.0.5"), format!("10.0.0.5:{port}"));
        assert_eq!(super::listen_addr("10.0.0.5:9000"), "10.0.0.5:9000");
        assert_eq!(
            super::listen_addr("h1.example.com"),
            format!("0.0.0.0:{port}")
        );
        assert_eq!(super::listen_addr("h1.example.com:9000"), "0.0.0.0:9000");
    }
}
