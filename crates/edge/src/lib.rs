//! The HTTPS edge of nook: TLS termination, the dashboard (`https://DOMAIN/`), login and
//! per-host sessions, and an identity-aware reverse proxy from `https://VM.DOMAIN[:PORT]/` to
//! the VM.
//!
//! The daemon owns the data: it implements [`EdgeBackend`] and hands the edge already-bound
//! listeners. The edge must not keep any authorisation state of its own beyond one-time
//! handoff codes: every request asks the backend afresh, so revocation is immediate. It never
//! sets a cookie with a Domain attribute, never forwards its own cookies or a nook machine
//! token to a VM, and never shows an internal error's text to a client.

mod auth;
mod backend;
mod body;
mod ca;
mod error;
mod host;
mod limit;
mod mail;
mod pages;
mod proxy;
mod router;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use backend::{
    Access, AppBody, AppRequest, BackendResult, Dial, Dialed, EdgeBackend, UpstreamIo, User, Via,
    VmTarget,
};
pub use ca::LocalCa;
pub use error::{BackendError, EdgeError};
pub use host::{ListenerRole, VM_PORTS};
pub use limit::EmailLimits;
pub use mail::{Mailer, SmtpConfig, SmtpSecurity};
pub use tls::certified_key_from_pem;

/// The query parameter that carries a share-link token: `https://VM.DOMAIN/?nook_share=T`.
pub const SHARE_PARAM: &str = "nook_share";

/// Settings of the edge. Build with `EdgeConfig { domain: .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The dashboard's host name; VMs are `NAME.DOMAIN` unless `vm_domain` is set.
    pub domain: String,
    /// The domain VMs are served under (`NAME.VM_DOMAIN`), a different registrable domain from
    /// `domain` so that no VM is the same site as the dashboard. None puts VMs under `domain`.
    pub vm_domain: Option<String>,
    /// The port users type for the main listener (443 is left out of URLs). A Host header
    /// with this port means the VM's default port.
    pub public_port: u16,
    /// The lobby command the login page suggests, e.g. `ssh -p 2222 nook.localhost browser`.
    pub ssh_login_hint: String,
    /// Time allowed for a client to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a client to send a request's headers (slowloris defence).
    pub header_read_timeout: Duration,
    /// A connection on which no request has started for this long is closed gracefully
    /// (requests in flight, such as a long SSE stream, finish first). HTTP/2 clients that hold
    /// connections open forever would otherwise pin memory and descriptors.
    pub idle_timeout: Duration,
    /// Largest request head accepted; larger ones get 431 (HTTP/1.1) or a reset (HTTP/2).
    pub max_header_bytes: usize,
    pub upstream_connect_timeout: Duration,
    /// Time the VM has to send response headers before the client gets a 504 page.
    pub upstream_response_timeout: Duration,
    /// Lifetime of session cookies in the browser (the backend may end sessions earlier).
    pub session_max_age: Duration,
    /// Lifetime of a dashboard-to-VM handoff code.
    pub handoff_ttl: Duration,
    /// SMTP for email login links; `None` hides the email form.
    pub smtp: Option<SmtpConfig>,
    /// How often sign-in emails may be asked for.
    pub email_limits: EmailLimits,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            domain: "nook.localhost".into(),
            vm_domain: None,
            public_port: 8443,
            ssh_login_hint: "ssh -p 2222 nook.localhost browser".into(),
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 32 * 1024,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            session_max_age: Duration::from_secs(30 * 24 * 3600),
            handoff_ttl: Duration::from_secs(60),
            smtp: None,
            email_limits: EmailLimits::default(),
        }
    }
}

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub local_port: u16,
    pub role: ListenerRole,
}

pub(crate) struct Inner<B> {
    config: EdgeConfig,
    sites: host::Sites,
    backend: Arc<B>,
    certs: Arc<tls::CertStore>,
    acceptor: TlsAcceptor,
    upstream: proxy::Upstream,
    handoffs: auth::Handoffs,
    mailer: Option<mail::Mailer>,
    email_limits: limit::EmailLimiter,
    server: auto::Builder<TokioExecutor>,
}

/// The edge. Cheap to clone; all clones share certificate, handoff codes and upstream pool.
pub struct Edge<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Edge<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B: EdgeBackend> Edge<B> {
    /// Validates the configuration. Install a certificate ([`Edge::set_certificate`]) before
    /// serving; until then handshakes fail.
    pub fn new(mut config: EdgeConfig, backend: Arc<B>) -> Result<Self, EdgeError> {
        let normal = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
        let valid =
            |d: &str| host::parse_host(d).is_some_and(|h| h.port.is_none() && h.name.contains('.'));
        config.domain = normal(&config.domain);
        let vm_domain = normal(config.vm_domain.as_deref().unwrap_or(&config.domain));
        for d in [&config.domain, &vm_domain] {
            if !valid(d) {
                return Err(EdgeError::Config(format!("invalid domain {d:?}")));
            }
        }
        if vm_domain != config.domain
            && (vm_domain.ends_with(&format!(".{}", config.domain))
                || config.domain.ends_with(&format!(".{vm_domain}")))
        {
            return Err(EdgeError::Config(format!(
                "the VM domain {vm_domain:?} lies inside the dashboard's {:?} (or the other way round), so VMs would be the same site: use a domain of its own",
                config.domain
            )));
        }
        let sites = host::Sites {
            dashboard: config.domain.clone(),
            vms: vm_domain,
        };
        if config.max_header_bytes < 8192 {
            return Err(EdgeError::Config(
                "max_header_bytes must be at least 8192".into(),
            ));
        }
        let certs = Arc::new(tls::CertStore::new());
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(certs.clone())?));
        let mailer = config.smtp.as_ref().map(mail::Mailer::new).transpose()?;
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_header_bytes);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_header_bytes as u32)
            // WebSockets over HTTP/2 (RFC 8441), so browsers need no second connection.
            .enable_connect_protocol()
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Ok(Self {
            inner: Arc::new(Inner {
                upstream: proxy::Upstream::new(
                    config.upstream_connect_timeout,
                    config.upstream_response_timeout,
                ),
                handoffs: auth::Handoffs::new(config.handoff_ttl),
                email_limits: limit::EmailLimiter::new(config.email_limits),
                config,
                sites,
                backend,
                certs,
                acceptor,
                mailer,
                server,
            }),
        })
    }

    /// Installs (or replaces) the certificate for `DOMAIN` and `*.DOMAIN`: a PEM chain, leaf
    /// first, and its PEM private key. New handshakes use it at once.
    pub fn set_certificate(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), EdgeError> {
        let key = tls::certified_key_from_pem(chain_pem, key_pem)?;
        self.inner.certs.set(Arc::new(key));
        Ok(())
    }

    /// Installs an already-parsed certificate.
    pub fn set_certified_key(&self, key: Arc<rustls::sign::CertifiedKey>) {
        self.inner.certs.set(key);
    }

    pub fn config(&self) -> &EdgeConfig {
        &self.inner.config
    }

    /// The link the lobby's `browser` command prints for a fresh login token.
    pub fn login_url(&self, token: &str) -> String {
        self.inner.login_url(token)
    }

    /// `https://NAME.DOMAIN[:PORT]/`.
    pub fn vm_url(&self, name: &str) -> String {
        self.inner.vm_url(name)
    }

    /// Accepts connections on `listener` until the task is dropped or aborted. Accept errors
    /// (such as running out of file descriptors) are logged and retried after a pause.
    pub async fn serve(&self, listener: TcpListener, role: ListenerRole) {
        let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = ConnInfo {
                peer,
                local_port,
                role,
            };
            let inner = self.inner.clone();
            tokio::spawn(async move { inner.serve_connection(stream, conn).await });
        }
    }

    /// Serves `listener` on `threads` dedicated worker threads, each running its own
    /// single-threaded runtime, plus one thread that accepts and deals connections out round
    /// robin. A connection, its TLS state, its requests and their upstream connections then all
    /// live on one thread, as in nginx's worker model: with a work-stealing runtime,
    /// cross-thread wake-ups cost more than the proxying itself, and with every worker
    /// accepting for itself the connections spread unevenly (see examples/proxy_bench.rs).
    /// The threads run until the process exits.
    pub fn serve_on_threads(
        &self,
        listener: std::net::TcpListener,
        role: ListenerRole,
        threads: usize,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        listener.set_nonblocking(false)?;
        let local_port = listener.local_addr()?.port();
        let mut handles = Vec::new();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
            workers.push(tx);
            let inner = self.inner.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("nook-edge-{i}"))
                    .spawn(move || {
                        rt.block_on(async move {
                            while let Some((stream, peer)) = rx.recv().await {
                                let stream = match tokio::net::TcpStream::from_std(stream) {
                                    Ok(s) => s,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cannot register a connection");
                                        continue;
                                    }
                                };
                                let conn = ConnInfo {
                                    peer,
                                    local_port,
                                    role,
                                };
                                let inner = inner.clone();
                                tokio::spawn(
                                    async move { inner.serve_connection(stream, conn).await },
                                );
                            }
                        })
                    })?,
            );
        }
        handles.push(
            std::thread::Builder::new()
                .name("nook-edge-accept".into())
                .spawn(move || {
                    let mut next = 0usize;
                    loop {
                        let (stream, peer) = match listener.accept() {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        };
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        // A worker only stops if its thread died; skip it then.
                        let mut item = (stream, peer);
                        for _ in 0..workers.len() {
                            next = (next + 1) % workers.len();
                            match workers[next].send(item) {
                                Ok(()) => break,
                                Err(e) => item = e.0,
                            }
                        }
                    }
                })?,
        );
        Ok(handles)
    }

    /// Spawns [`Edge::serve`] on the current runtime.
    pub fn spawn(&self, listener: TcpListener, role: ListenerRole) -> tokio::task::JoinHandle<()> {
        let edge = self.clone();
        tokio::spawn(async move { edge.serve(listener, role).await })
    }
}

impl<B: EdgeBackend> Inner<B> {
    async fn serve_connection(self: Arc<Self>, stream: tokio::net::TcpStream, conn: ConnInfo) {
        let tls =
            match tokio::time::timeout(self.config.handshake_timeout, self.acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
                    return;
                }
            };
        let inner = self.clone();
        let opened = tokio::time::Instant::now();
        // Milliseconds from `opened` to the start of the latest request.
        let last_request = Arc::new(AtomicU64::new(0));
        let mark = last_request.clone();
        let service = service_fn(move |req| {
            let inner = inner.clone();
            mark.store(millis_since(opened), Ordering::Relaxed);
            async move { Ok::<_, std::convert::Infallible>(inner.handle(req, conn).await) }
        });
        let served = self
            .server
            .serve_connection_with_upgrades(TokioIo::new(tls), service);
        tokio::pin!(served);
        let idle = self.config.idle_timeout;
        let result = loop {
            let idle_at =
                opened + Duration::from_millis(last_request.load(Ordering::Relaxed)) + idle;
            tokio::select! {
                result = served.as_mut() => break result,
                () = tokio::time::sleep_until(idle_at) => {
                    let quiet = millis_since(opened)
                        .saturating_sub(last_request.load(Ordering::Relaxed));
                    if Duration::from_millis(quiet) >= idle {
                        served.as_mut().graceful_shutdown();
                        break served.await;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        }
    }
}

fn millis_since(t: tokio::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}
