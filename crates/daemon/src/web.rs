//! The HTTPS edge's view of nook: `nook-edge` asks, per request, who a session or token is,
//! where a VM is and who may see it; the answers come from the store, never from a cache, so
//! revoking a share, a link, a token or a session applies to the very next request.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use nook_api::VmState;
use nook_edge::{Access, BackendError, BackendResult, DashboardVm, EdgeBackend, User, VmTarget};
use nook_net::VmLink;
use nook_store::{Account, Role, StoreError};

use crate::Manager;

/// Browser sessions last a month (the edge's cookie max-age matches).
pub const SESSION_TTL_SECS: i64 = 30 * 24 * 3600;
/// Login links are for the next quarter of an hour.
pub const LOGIN_TTL_SECS: i64 = 15 * 60;
/// How long the edge waits to learn whether a VM's port 80 is open, to choose 80 or 8000.
const PORT_PROBE: Duration = Duration::from_millis(300);

/// How long the answer of a port probe stands. Probing on every request would add a
/// connection to the VM (which its app sees) and a round trip to each proxied request.
const PORT_PROBE_TTL: Duration = Duration::from_secs(5);

pub struct WebBackend {
    manager: Arc<Manager>,
    /// VM id → (when probed, default port found).
    probed: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u16)>>,
}

impl WebBackend {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self {
            manager,
            probed: Default::default(),
        }
    }

    /// The default port of a running VM with none chosen, probed at most every few seconds.
    async fn probed_port(&self, vm_id: &str, ip: IpAddr) -> u16 {
        let fresh = |at: &std::time::Instant| at.elapsed() < PORT_PROBE_TTL;
        let known = self
            .probed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm_id)
            .filter(|(at, _)| fresh(at))
            .map(|(_, port)| *port);
        if let Some(port) = known {
            return port;
        }
        let port = default_port(ip).await;
        let mut probed = self.probed.lock().unwrap_or_else(|p| p.into_inner());
        probed.retain(|_, (at, _)| fresh(at));
        probed.insert(vm_id.to_string(), (std::time::Instant::now(), port));
        port
    }
}

fn backend_err(e: StoreError) -> BackendError {
    BackendError::new(e)
}

fn user(a: Account) -> User {
    User {
        id: a.id,
        email: a.email,
    }
}

/// The default web port of a VM with none chosen: 80, or 8000 when nothing answers on 80.
async fn default_port(ip: IpAddr) -> u16 {
    match tokio::time::timeout(PORT_PROBE, tokio::net::TcpStream::connect((ip, 80))).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => 8000,
        _ => 80,
    }
}

impl EdgeBackend for WebBackend {
    async fn vm(&self, name: &str) -> BackendResult<Option<VmTarget>> {
        let store = self.manager.store();
        let vm = match store.get(name).await {
            Ok(vm) => vm,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(backend_err(e)),
        };
        let web = store.web_settings(&vm.id).await.map_err(backend_err)?;
        let Ok(link) = VmLink::for_slot(vm.slot) else {
            return Ok(None);
        };
        let upstream = IpAddr::V4(link.guest_ip);
        let default_port = match web.http_port {
            Some(p) => p,
            None if vm.state == VmState::Running => self.probed_port(&vm.id, upstream).await,
            None => 80,
        };
        Ok(Some(VmTarget {
            id: vm.id,
            name: vm.name,
            upstream,
            default_port,
            public: web.public,
        }))
    }

    async fn access(&self, user_id: &str, vm_id: &str) -> BackendResult<Access> {
        let store = self.manager.store();
        let vm = match store.get_by_id(vm_id).await {
            Ok(vm) => vm,
            Err(StoreError::NotFound(_)) => return Ok(Access::None),
            Err(e) => return Err(backend_err(e)),
        };
        if vm.owner == user_id {
            return Ok(Access::Owner);
        }
        let Some(account) = store.account_by_id(user_id).await.map_err(backend_err)? else {
            return Ok(Access::None);
        };
        Ok(
            match store
                .shared_role(vm_id, &account)
                .await
                .map_err(backend_err)?
            {
                Some(Role::Collaborator) => Access::Collaborator,
                Some(Role::Viewer) => Access::Viewer,
                None => Access::None,
            },
        )
    }

    async fn redeem_login_token(&self, token: &str) -> BackendResult<Option<User>> {
        let account = self
            .manager
            .store()
            .redeem_login_token(token)
            .await
            .map_err(backend_err)?;
        Ok(account.map(user))
    }

    async fn create_session(&self, user_id: &str, host: &str) -> BackendResult<String> {
        self.manager
            .store()
            .create_session(user_id, host, SESSION_TTL_SECS)
            .await
            .map_err(backend_err)
    }

    async fn session(&self, host: &str, secret: &str) -> BackendResult<Option<User>> {
        let account = self
            .manager
            .store()
            .session(host, secret)
            .await
            .map_err(backend_err)?;
        Ok(account.map(user))
    }

    async fn end_session(&self, _host: &str, secret: &str) -> BackendResult<()> {
        self.manager
            .store()
            .end_session(secret)
            .await
            .map_err(backend_err)
    }

    async fn token_user(&self, vm_id: &str, token: &str) -> BackendResult<Option<User>> {
        let account = self
            .manager
            .store()
            .api_token_account(vm_id, token)
            .await
            .map_err(backend_err)?;
        Ok(account.map(user))
    }

    async fn redeem_share_link(
        &self,
        vm_id: &str,
        token: &str,
        user_id: &str,
    ) -> BackendResult<bool> {
        self.manager
            .store()
            .redeem_share_link(vm_id, token, user_id)
            .await
            .map_err(backend_err)
    }

    /// Only people nook knows get a link: an account, or someone a VM was shared with (who
    /// gets an account on first login).
    async fn start_email_login(&self, email: &str) -> BackendResult<Option<String>> {
        let store = self.manager.store();
        let email = email.trim().to_ascii_lowercase();
        let account = store.account_by_email(&email).await.map_err(backend_err)?;
        let known = account.is_some() || store.is_shared_with(&email).await.map_err(backend_err)?;
        if !known {
            return Ok(None);
        }
        let token = store
            .create_login_token(
                account.as_ref().map(|a| a.id.as_str()),
                Some(&email),
                LOGIN_TTL_SECS,
            )
            .await
            .map_err(backend_err)?;
        Ok(Some(token))
    }

    async fn dashboard_vms(&self, user_id: &str) -> BackendResult<Vec<DashboardVm>> {
        let store = self.manager.store();
        let Some(account) = store.account_by_id(user_id).await.map_err(backend_err)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for vm in store.list().await.map_err(backend_err)? {
            let mine = vm.owner == account.id;
            if !mine
                && store
                    .shared_role(&vm.id, &account)
                    .await
                    .map_err(backend_err)?
                    .is_none()
            {
                continue;
            }
            let web = store.web_settings(&vm.id).await.map_err(backend_err)?;
            out.push(DashboardVm {
                name: vm.name,
                state: if mine {
                    vm.state.as_str().to_string()
                } else {
                    format!("{} (shared with you)", vm.state.as_str())
                },
                public: web.public,
            });
        }
        Ok(out)
    }
}

/// Starts the HTTPS edge (with the local CA's certificate, later ACME's), its VM-port
/// listeners, and nook's DNS server and ACME renewal when configured.
pub async fn start(manager: &Arc<Manager>) -> Result<(), crate::ServeError> {
    use crate::ServeError;
    let cfg = manager.config().clone();
    let web = &cfg.web;
    let Some(https_addr) = web.https_addr else {
        return Ok(());
    };
    let domain = cfg.domain.clone();
    let ca_dir = cfg.ca_dir();
    let ca_domain = domain.clone();
    let ca = tokio::task::spawn_blocking(move || {
        nook_edge::LocalCa::load_or_create(&ca_dir, &ca_domain)
    })
    .await
    .map_err(|e| ServeError::Web(e.to_string()))?
    .map_err(|e| ServeError::Web(format!("the local CA in {}: {e}", cfg.ca_dir().display())))?;
    let edge_cfg = nook_edge::EdgeConfig {
        domain: domain.clone(),
        public_port: https_addr.port(),
        ssh_login_hint: format!("{} browser", cfg.ssh_command(None)),
        smtp: web.smtp.clone(),
        session_max_age: Duration::from_secs(SESSION_TTL_SECS as u64),
        ..Default::default()
    };
    let edge = nook_edge::Edge::new(edge_cfg, Arc::new(WebBackend::new(manager.clone())))
        .map_err(|e| ServeError::Web(e.to_string()))?;
    edge.set_certificate(ca.leaf_chain_pem().as_bytes(), ca.leaf_key_pem().as_bytes())
        .map_err(|e| ServeError::Web(e.to_string()))?;
    // The main listener gets the edge's thread-per-core mode: on the daemon's work-stealing
    // runtime, cross-thread wake-ups cost more than the proxying (see proxy_bench).
    let listener = std::net::TcpListener::bind(https_addr)
        .map_err(|e| ServeError::Listen(https_addr.to_string(), e))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    edge.serve_on_threads(listener, nook_edge::ListenerRole::Main, threads)
        .map_err(|e| ServeError::Listen(https_addr.to_string(), e))?;
    tracing::info!(addr = %https_addr, domain, ca = %ca.ca_cert_path().display(), "HTTPS edge listening");
    if let Some((first, last)) = web.vm_ports {
        let (mut bound, mut busy) = (0, 0);
        for port in (first..=last).filter(|p| *p != https_addr.port()) {
            match tokio::net::TcpListener::bind((https_addr.ip(), port)).await {
                Ok(l) => {
                    edge.spawn(l, nook_edge::ListenerRole::VmPort);
                    bound += 1;
                }
                Err(_) => busy += 1,
            }
        }
        tracing::info!(
            first,
            last,
            bound,
            busy,
            "VM ports listening (ports in use elsewhere are skipped)"
        );
    }
    let Some(dns_addr) = web.dns_addr else {
        return Ok(());
    };
    let (v4, v6) = match web.public_ip {
        IpAddr::V4(ip) => (Some(ip), None),
        IpAddr::V6(ip) => (None, Some(ip)),
    };
    let zone = nook_dns::Zone::new(nook_dns::ZoneConfig::new(domain.clone(), v4, v6))
        .map_err(|e| ServeError::Web(format!("the DNS zone for {domain}: {e}")))?;
    let udp = tokio::net::UdpSocket::bind(dns_addr)
        .await
        .map_err(|e| ServeError::Listen(format!("{dns_addr} (udp)"), e))?;
    let tcp = tokio::net::TcpListener::bind(dns_addr)
        .await
        .map_err(|e| ServeError::Listen(format!("{dns_addr} (tcp)"), e))?;
    tokio::spawn(nook_dns::serve(zone.clone(), udp, tcp));
    tracing::info!(addr = %dns_addr, domain, ip = %web.public_ip, "DNS server listening");
    if let Some(acme) = &web.acme {
        let acme_cfg = nook_acme::AcmeConfig {
            directory_url: acme.directory.clone(),
            contact_email: acme.email.clone(),
            domain: domain.clone(),
            state_dir: cfg.acme_dir(),
            extra_root_ca_pem: acme.root_ca.clone(),
        };
        let edge = edge.clone();
        tokio::spawn(nook_acme::renew_loop(
            acme_cfg,
            zone,
            move |cert: nook_acme::Certificate| match cert.certified_key() {
                Ok(key) => {
                    edge.set_certified_key(key);
                    tracing::info!(domain = %cert.names.join(", "), "serving the ACME certificate");
                }
                Err(err) => tracing::error!(%err, "the ACME certificate is unusable"),
            },
        ));
    }
    Ok(())
}
