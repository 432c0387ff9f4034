//! The HTTPS edge's view of nook: `nook-edge` asks, per request, who a session or token is,
//! where a VM is and who may see it. The store's answers are remembered only while the store's
//! generation is unchanged (any write changes it, see `Store::generation`), so revoking a
//! share, a link, a token or a session still applies to the very next request, while a page
//! with fifty assets does not cost fifty rounds of SQLite lookups (about 0.3 ms each,
//! crates/store/examples/edge_lookups.rs).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nook_api::VmState;
use nook_edge::{
    Access, AppBody, AppRequest, BackendError, BackendResult, EdgeBackend, User, VmTarget,
};
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

/// Remembered answers also expire with age: sessions and tokens end with time, not a write.
const MEMO_MAX_AGE: Duration = Duration::from_secs(5);
/// Bounds each memo's memory; past it the memo starts over.
const MEMO_MAX_ENTRIES: usize = 10_000;

/// Answers of the store for one store generation.
struct Memo<K, V> {
    inner: Mutex<MemoInner<K, V>>,
}

struct MemoInner<K, V> {
    generation: u64,
    entries: HashMap<K, (Instant, V)>,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    fn new() -> Self {
        Self {
            inner: Mutex::new(MemoInner {
                generation: 0,
                entries: HashMap::new(),
            }),
        }
    }

    fn get<Q>(&self, generation: u64, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.generation != generation {
            return None;
        }
        inner
            .entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < MEMO_MAX_AGE)
            .map(|(_, v)| v.clone())
    }

    /// The remembered answer for `key`, else `load`'s, remembered for `generation` (read
    /// before `load` began).
    async fn get_or_load(
        &self,
        generation: u64,
        key: K,
        load: impl std::future::Future<Output = BackendResult<V>>,
    ) -> BackendResult<V> {
        if let Some(known) = self.get(generation, &key) {
            return Ok(known);
        }
        let value = load.await?;
        self.put(generation, key, value.clone());
        Ok(value)
    }

    /// Remembers `value`, looked up at `generation` (read before the lookup began). If the store
    /// changed meanwhile, the answer may be stale and is kept under a generation that is gone.
    fn put(&self, generation: u64, key: K, value: V) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if generation < inner.generation {
            return;
        }
        if generation > inner.generation || inner.entries.len() >= MEMO_MAX_ENTRIES {
            inner.entries.clear();
            inner.generation = generation;
        }
        inner.entries.insert(key, (Instant::now(), value));
    }
}

/// What the store says about a VM for the edge.
#[derive(Clone)]
struct VmFacts {
    id: String,
    name: String,
    /// The fleet host it lives on ("" before hosts had names).
    host: String,
    slot: u32,
    running: bool,
    http_port: Option<u16>,
    public: bool,
}

pub struct WebBackend {
    manager: Arc<Manager>,
    /// VM id → (when probed, default port found).
    probed: Mutex<HashMap<String, (Instant, u16)>>,
    vms: Memo<String, Option<VmFacts>>,
    sessions: Memo<(String, String), Option<User>>,
    access: Memo<(String, String), Access>,
    tokens: Memo<(String, String), Option<User>>,
    /// The dashboard, API and terminal: everything on the dashboard host but signing in.
    app: nook_web::Web<crate::webapp::DaemonWeb>,
}

impl WebBackend {
    pub fn new(manager: Arc<Manager>) -> Self {
        let app = nook_web::Web::new(
            Arc::new(crate::webapp::DaemonWeb::new(manager.clone())),
            manager.config().ssh_command(None),
            format!("{}/", manager.config().web_origin(Some("{}"))),
        );
        Self {
            app,
            manager,
            probed: Default::default(),
            vms: Memo::new(),
            sessions: Memo::new(),
            access: Memo::new(),
            tokens: Memo::new(),
        }
    }

    async fn vm_facts(&self, name: &str) -> BackendResult<Option<VmFacts>> {
        let store = self.manager.store();
        let load = async {
            let vm = match store.get(name).await {
                Ok(vm) => vm,
                Err(StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(backend_err(e)),
            };
            let web = store.web_settings(&vm.id).await.map_err(backend_err)?;
            Ok(Some(VmFacts {
                running: vm.state == VmState::Running,
                slot: vm.slot,
                id: vm.id,
                name: vm.name,
                host: vm.host,
                http_port: web.http_port,
                public: web.public,
            }))
        };
        self.vms
            .get_or_load(store.generation(), name.to_string(), load)
            .await
    }

    async fn lookup_access(&self, user_id: &str, vm_id: &str) -> BackendResult<Access> {
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

    /// The default port of a running VM with none chosen, probed at most every few seconds.
    async fn probed_port(&self, vm_id: &str, ip: IpAddr) -> u16 {
        let fresh = |at: &Instant| at.elapsed() < PORT_PROBE_TTL;
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
        probed.insert(vm_id.to_string(), (Instant::now(), port));
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
        email_verified: a.email_verified,
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
        let Some(vm) = self.vm_facts(name).await? else {
            return Ok(None);
        };
        let Ok(link) = VmLink::for_slot(vm.slot) else {
            return Ok(None);
        };
        let upstream = IpAddr::V4(link.guest_ip);
        // Another host runs it: reached through the host channel. (Its default port is not
        // probed from here.)
        let via = self.manager.via(&vm.id, &vm.host);
        let default_port = match vm.http_port {
            Some(p) => p,
            None if vm.running && via.is_none() => self.probed_port(&vm.id, upstream).await,
            None => 80,
        };
        Ok(Some(VmTarget {
            id: vm.id,
            name: vm.name,
            upstream,
            default_port,
            public: vm.public,
            via,
        }))
    }

    async fn access(&self, user_id: &str, vm_id: &str) -> BackendResult<Access> {
        let key = (user_id.to_string(), vm_id.to_string());
        let load = self.lookup_access(user_id, vm_id);
        self.access
            .get_or_load(self.manager.store().generation(), key, load)
            .await
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
        let store = self.manager.store();
        let key = (host.to_string(), secret.to_string());
        let load = async {
            Ok(store
                .session(host, secret)
                .await
                .map_err(backend_err)?
                .map(user))
        };
        self.sessions
            .get_or_load(store.generation(), key, load)
            .await
    }

    async fn end_session(&self, _host: &str, secret: &str) -> BackendResult<()> {
        self.manager
            .store()
            .end_all_sessions(secret)
            .await
            .map_err(backend_err)
    }

    async fn token_user(&self, vm_id: &str, token: &str) -> BackendResult<Option<User>> {
        let store = self.manager.store();
        let key = (vm_id.to_string(), token.to_string());
        let load = async {
            Ok(store
                .api_token_account(vm_id, token)
                .await
                .map_err(backend_err)?
                .map(user))
        };
        self.tokens.get_or_load(store.generation(), key, load).await
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
        let known = match &account {
            // An account whose email nobody proved gets no email login: its key holder only
            // claimed the address, and the address's owner must not be signed in to it.
            Some(a) => a.email_verified,
            None => store.is_shared_with(&email).await.map_err(backend_err)?,
        };
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

    async fn app(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        ctx: AppRequest,
    ) -> hyper::Response<AppBody> {
        let user = ctx.user.map(|u| nook_web::Principal {
            account_id: u.id,
            email: u.email,
            limits: None,
        });
        let visitor = nook_web::Visitor {
            user,
            same_origin: ctx.same_origin,
        };
        self.app.handle(req, visitor).await
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
    let vm_domain = (cfg.vm_domain != domain).then(|| cfg.vm_domain.clone());
    if vm_domain.is_none() {
        tracing::warn!(
            domain,
            "VMs are served under the dashboard's own domain, so every VM is the same site as the dashboard and as each other: set --vm-domain to a domain of their own"
        );
    }
    let ca_dir = cfg.ca_dir();
    let ca_domains = [domain.clone(), cfg.vm_domain.clone()];
    let ca = tokio::task::spawn_blocking(move || {
        nook_edge::LocalCa::load_or_create(&ca_dir, &[&ca_domains[0], &ca_domains[1]])
    })
    .await
    .map_err(|e| ServeError::Web(e.to_string()))?
    .map_err(|e| ServeError::Web(format!("the local CA in {}: {e}", cfg.ca_dir().display())))?;
    let edge_cfg = nook_edge::EdgeConfig {
        domain: domain.clone(),
        vm_domain: vm_domain.clone(),
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
    let zone_for = |d: &String| {
        nook_dns::Zone::new(nook_dns::ZoneConfig::new(d.clone(), v4, v6))
            .map_err(|e| ServeError::Web(format!("the DNS zone for {d}: {e}")))
    };
    let mut zones = vec![zone_for(&domain)?];
    if let Some(vm) = &vm_domain {
        zones.push(zone_for(vm)?);
    }
    let zone = nook_dns::Zones::new(zones).map_err(|e| ServeError::Web(e.to_string()))?;
    let udp = tokio::net::UdpSocket::bind(dns_addr)
        .await
        .map_err(|e| ServeError::Listen(format!("{dns_addr} (udp)"), e))?;
    let tcp = tokio::net::TcpListener::bind(dns_addr)
        .await
        .map_err(|e| ServeError::Listen(format!("{dns_addr} (tcp)"), e))?;
    tokio::spawn(nook_dns::serve(zone.clone(), udp, tcp));
    tracing::info!(addr = %dns_addr, domain, ip = %web.public_ip, "DNS server listening");
    let shared = manager.store().is_shared();
    if shared {
        tokio::spawn(share_dns_challenges(manager.clone(), zone.clone()));
    }
    if let Some(acme) = &web.acme {
        let acme_cfg = nook_acme::AcmeConfig {
            directory_url: acme.directory.clone(),
            contact_email: acme.email.clone(),
            domain: domain.clone(),
            vm_domain: vm_domain.clone(),
            state_dir: cfg.acme_dir(),
            extra_root_ca_pem: acme.root_ca.clone(),
            // Other hosts learn a new value within a look (`CHALLENGE_LOOK`) of its commit.
            propagation_wait: if shared {
                CHALLENGE_PROPAGATION
            } else {
                Duration::ZERO
            },
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

/// How often a fleet host compares its own ACME challenge values with what it published,
/// and looks for other hosts' (at once, too, when the store says something changed).
const CHALLENGE_LOOK: Duration = Duration::from_millis(250);
/// How long a published challenge value is kept by the store without being published again:
/// longer than any order takes (`nook_acme` gives one 300 s).
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// How long an ACME order on a fleet host waits after publishing a value before asking the
/// CA to look: a few looks, so every host's DNS answers it by then.
const CHALLENGE_PROPAGATION: Duration = Duration::from_secs(2);

/// On a fleet, every host's DNS answers every host's ACME DNS-01 values (a CA may ask any of
/// them): this host publishes its own through the store when they change, and answers the
/// others'. Runs for the daemon's life.
async fn share_dns_challenges(manager: Arc<Manager>, zones: nook_dns::Zones) {
    let store = manager.store().clone();
    let me = manager.config().host_name.clone();
    let mut published: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen_generation = None;
    let mut tick = tokio::time::interval(CHALLENGE_LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_full_look = 0u32;
    // Said once per outage, not at every look.
    let mut failing = false;
    loop {
        tick.tick().await;
        for zone in zones.iter() {
            let domain = zone.domain();
            let own = zone.acme_challenges();
            if published.get(&domain) != Some(&own) {
                let ttl = CHALLENGE_TTL.as_millis() as i64;
                match store.publish_dns_challenges(&me, &domain, &own, ttl).await {
                    Ok(()) => {
                        published.insert(domain, own);
                        failing = false;
                    }
                    Err(err) => {
                        if !failing {
                            tracing::warn!(%err, "cannot publish this host's ACME challenges to the fleet; trying again");
                        }
                        failing = true;
                    }
                }
            }
        }
        // Others' values are read when the store changed, and every second besides (a host
        // deaf to notifications still learns them within an order's wait).
        since_full_look += 1;
        let generation = store.generation();
        if seen_generation == Some(generation) && since_full_look < 4 {
            continue;
        }
        seen_generation = Some(generation);
        since_full_look = 0;
        for zone in zones.iter() {
            match store.dns_challenges(&me, &zone.domain()).await {
                Ok(values) => zone.set_shared_acme_challenges(&values),
                Err(err) => {
                    tracing::debug!(%err, "cannot read the fleet's ACME challenges");
                    seen_generation = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod memo_tests {
    use super::Memo;

    #[test]
    fn answers_only_for_the_generation_they_were_looked_up_in() {
        let memo: Memo<String, u32> = Memo::new();
        memo.put(3, "a".into(), 1);
        assert_eq!(memo.get(3, "a"), Some(1));
        // Any write moves the generation on: the answer is gone.
        assert_eq!(memo.get(4, "a"), None);
        // A lookup that began before a write (older generation) is not kept.
        memo.put(5, "b".into(), 2);
        memo.put(4, "a".into(), 9);
        assert_eq!(memo.get(5, "a"), None);
        assert_eq!(memo.get(5, "b"), Some(2));
        // A newer generation starts over.
        memo.put(6, "c".into(), 3);
        assert_eq!(memo.get(6, "b"), None);
        assert_eq!(memo.get(6, "c"), Some(3));
    }
}
