//! The listener, the per-connection russh handler and session-channel dispatch.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use russh::keys::HashAlg;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet, Pty};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::relay::{self, Upstream};
use crate::{Backend, Caller, Route, SshError, SshServerConfig, SshdEndpoint, guest, lobby};

/// Time allowed from TCP accept to a successful login.
const LOGIN_GRACE: Duration = Duration::from_secs(60);
/// Time allowed for an upstream global request (`ssh -R`) to be answered.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);
/// Data a client may send on a session channel before its shell/exec request.
const EARLY_DATA_BUDGET: usize = 1 << 20;
/// Channels (sessions and `-L` connections) a client may have open at once.
const MAX_CHANNELS: usize = 64;

/// Binds `cfg.listen` and serves until `shutdown` resolves.
pub async fn serve<B: Backend>(
    cfg: SshServerConfig,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SshError> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| SshError::Bind {
            addr: cfg.listen,
            source,
        })?;
    serve_listener(listener, cfg, backend, shutdown).await
}

/// Serves on an already bound listener (`cfg.listen` is ignored) until
/// `shutdown` resolves; then disconnects every client.
pub async fn serve_listener<B: Backend>(
    listener: TcpListener,
    cfg: SshServerConfig,
    backend: Arc<B>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SshError> {
    let key = crate::load_or_create_host_key(&cfg.host_key_path)?;
    let config = Arc::new(server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-nook".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let banner_host: Arc<str> = cfg.banner_host.into();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let span = info_span!(
                        "ssh",
                        %peer,
                        user = tracing::field::Empty,
                        key = tracing::field::Empty
                    );
                    conns.spawn(
                        connection(
                            config.clone(),
                            socket,
                            peer.ip(),
                            backend.clone(),
                            banner_host.clone(),
                            stop_rx.clone(),
                        )
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    warn!("SSH connection task panicked");
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    conns.abort_all();
    Ok(())
}

async fn connection<B: Backend>(
    config: Arc<server::Config>,
    socket: TcpStream,
    peer: std::net::IpAddr,
    backend: Arc<B>,
    banner_host: Arc<str>,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState {
        span: Span::current(),
        peer,
        channels: AtomicUsize::new(0),
        banner_host,
        identity: OnceLock::new(),
        down: OnceLock::new(),
        route: OnceCell::new(),
        upstream: OnceCell::new(),
        agent_requested: Arc::new(AtomicBool::new(false)),
    });
    let handler = ConnHandler {
        ctx: Ctx {
            backend,
            state: state.clone(),
        },
    };
    let start = tokio::time::timeout(LOGIN_GRACE, server::run_stream(config, socket, handler));
    let mut session = match start.await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            debug!(error = %e, "SSH handshake failed");
            return;
        }
        Err(_) => {
            debug!("SSH handshake timed out");
            return;
        }
    };
    let handle = session.handle();
    let grace = tokio::time::sleep(LOGIN_GRACE);
    tokio::pin!(grace);
    let mut grace_done = false;
    loop {
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    debug!(error = %e, "SSH connection ended with an error");
                }
                break;
            }
            _ = &mut grace, if !grace_done => {
                grace_done = true;
                if state.identity.get().is_none() {
                    debug!("login grace time exceeded");
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "login timed out".into(), "en".into())
                        .await;
                }
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), "en".into())
                        .await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
                    break;
                }
            }
        }
    }
    if let Some(Ok(up)) = state.upstream.get() {
        up.disconnect().await;
    }
    debug!("SSH connection closed");
}

/// The verified identity of a connection.
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) key_openssh: String,
    pub(crate) fingerprint: String,
}

/// State shared by a connection's handler and its channel tasks.
pub(crate) struct ConnState {
    /// The connection's span (russh runs handlers in tasks of its own).
    pub(crate) span: Span,
    /// The client's address.
    pub(crate) peer: std::net::IpAddr,
    /// Open client-initiated channels, for `MAX_CHANNELS`.
    channels: AtomicUsize,
    pub(crate) banner_host: Arc<str>,
    pub(crate) identity: OnceLock<Identity>,
    /// Handle to the client's session, to send it things from tasks.
    pub(crate) down: OnceLock<server::Handle>,
    route: OnceCell<Route>,
    upstream: OnceCell<Result<Arc<Upstream>, String>>,
    /// The client asked for agent forwarding (so upstream agent channels may be relayed).
    pub(crate) agent_requested: Arc<AtomicBool>,
}

/// A slot counted against `MAX_CHANNELS`, freed on drop.
struct ChannelSlot(Arc<ConnState>);

impl ChannelSlot {
    fn take(state: &Arc<ConnState>) -> Option<Self> {
        let taken = state
            .channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CHANNELS).then_some(n + 1)
            });
        taken.ok().map(|_| Self(state.clone()))
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.channels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What channel tasks need: the backend and the connection state.
pub(crate) struct Ctx<B> {
    pub(crate) backend: Arc<B>,
    pub(crate) state: Arc<ConnState>,
}

impl<B> Clone for Ctx<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            state: self.state.clone(),
        }
    }
}

impl<B: Backend> Ctx<B> {
    /// The caller, with its account looked up now (it changes after `signup`).
    pub(crate) async fn caller(&self) -> Caller {
        let (user, key_openssh, fingerprint) = match self.state.identity.get() {
            Some(id) => (
                id.user.clone(),
                id.key_openssh.clone(),
                id.fingerprint.clone(),
            ),
            None => Default::default(),
        };
        let account = if key_openssh.is_empty() {
            None
        } else {
            self.backend.account_for_key(&key_openssh).await
        };
        Caller {
            user,
            key_openssh,
            fingerprint,
            account,
            peer: self.state.peer,
        }
    }

    /// The connection's route, asked of the backend once.
    pub(crate) async fn route(&self) -> Route {
        self.state
            .route
            .get_or_init(|| async {
                let caller = self.caller().await;
                let route = self.backend.route(&caller).await;
                match &route {
                    Route::Lobby => info!(parent: &self.state.span, "route: lobby"),
                    Route::Vm(ep) => info!(parent: &self.state.span, vm = %ep.name, "route: VM"),
                    Route::Unavailable(_) => info!(parent: &self.state.span, "route: unavailable"),
                }
                route
            })
            .await
            .clone()
    }

    /// The connection to the guest's sshd, opened on first use.
    pub(crate) async fn upstream(&self, ep: &SshdEndpoint) -> Result<Arc<Upstream>, String> {
        self.state
            .upstream
            .get_or_init(|| async {
                let Some(down) = self.state.down.get().cloned() else {
                    return Err("nook: not logged in".to_string());
                };
                let up = relay::connect(
                    ep,
                    down,
                    self.state.agent_requested.clone(),
                    self.state.span.clone(),
                )
                .await;
                if let Err(reason) = &up {
                    warn!(parent: &self.state.span, addr = %ep.addr, %reason, "cannot reach the VM's sshd");
                }
                up.map(Arc::new)
            })
            .await
            .clone()
    }
}

struct ConnHandler<B> {
    ctx: Ctx<B>,
}

/// What the lobby needs from a `pty-req` (the request itself is replayed to VMs).
#[derive(Debug, Clone)]
pub(crate) struct PtyReq {
    pub(crate) cols: u32,
}

/// The request that starts a session channel.
#[derive(Debug, Clone)]
pub(crate) enum Start {
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

/// What a client sent on a session channel before starting it.
pub(crate) struct Prelude {
    pub(crate) pty: Option<PtyReq>,
    /// pty-req, env, auth-agent-req and window-change, in order (replayed upstream).
    pub(crate) requests: Vec<ChannelMsg>,
    pub(crate) data: Vec<Bytes>,
    pub(crate) eof: bool,
}

impl Prelude {
    fn push_request(&mut self, msg: ChannelMsg) {
        // A client spamming requests before starting gets the first ones only.
        if self.requests.len() < 256 {
            self.requests.push(msg);
        }
    }
}

impl<B: Backend> server::Handler for ConnHandler<B> {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Ok(openssh) = key.public_key.to_openssh() else {
            return Ok(Auth::reject());
        };
        // "ALGO BASE64 [comment]" -> "ALGO BASE64"
        let key_openssh = openssh
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let fingerprint = key.public_key.fingerprint(HashAlg::Sha256).to_string();
        let span = &self.ctx.state.span;
        span.record("user", user);
        span.record("key", fingerprint.as_str());
        info!(parent: span, "login");
        let _ = self.ctx.state.identity.set(Identity {
            user: user.to_string(),
            key_openssh,
            fingerprint,
        });
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let _ = self.ctx.state.down.set(session.handle());
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = ChannelSlot::take(&self.ctx.state) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        reply.accept().await;
        let ctx = self.ctx.clone();
        let span = ctx.state.span.clone();
        tokio::spawn(
            async move {
                session_channel(ctx, channel).await;
                drop(slot);
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = ChannelSlot::take(&self.ctx.state) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let ctx = self.ctx.clone();
        let span = ctx.state.span.clone();
        let host = host_to_connect.to_string();
        let orig = originator_address.to_string();
        tokio::spawn(
            async move {
                let _slot = slot;
                let Route::Vm(crate::VmEndpoint { sshd: Some(ep), .. }) = ctx.route().await else {
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                    return;
                };
                let Ok(up) = ctx.upstream(&ep).await else {
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                };
                match up
                    .open_direct_tcpip(&host, port_to_connect, &orig, originator_port)
                    .await
                {
                    Ok(upstream) => {
                        reply.accept().await;
                        relay::relay_stream(channel, upstream).await;
                    }
                    Err(reason) => reply.reject(reason).await,
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let ask = async {
            let Route::Vm(crate::VmEndpoint { sshd: Some(ep), .. }) = self.ctx.route().await else {
                return None;
            };
            let up = self.ctx.upstream(&ep).await.ok()?;
            up.tcpip_forward(address, *port).await
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, ask).await {
            Ok(Some(bound)) => {
                if *port == 0 {
                    *port = bound;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let ask = async {
            let Route::Vm(crate::VmEndpoint { sshd: Some(ep), .. }) = self.ctx.route().await else {
                return false;
            };
            match self.ctx.upstream(&ep).await {
                Ok(up) => up.cancel_tcpip_forward(address, port).await,
                Err(_) => false,
            }
        };
        Ok(tokio::time::timeout(FORWARD_TIMEOUT, ask)
            .await
            .unwrap_or(false))
    }

    // Channel requests are answered at once (russh keeps a single "wants
    // reply" flag per channel, so answering later could answer the wrong
    // request). The channel task then does the real work, and reports a
    // failure on stderr with exit status 1.

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Relayed upstream by the channel task (in order with the other requests).
        self.ctx
            .state
            .agent_requested
            .store(true, Ordering::Relaxed);
        Ok(true)
    }
}

/// Runs one session channel: collects its set-up requests, then hands it to
/// the lobby, the VM relay, or prints why it can't go anywhere.
async fn session_channel<B: Backend>(ctx: Ctx<B>, channel: Channel<Msg>) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let mut prelude = Prelude {
        pty: None,
        requests: Vec::new(),
        data: Vec::new(),
        eof: false,
    };
    let mut early_bytes = 0usize;
    let start = loop {
        let Some(msg) = reader.wait().await else {
            return;
        };
        match msg {
            ChannelMsg::RequestPty { col_width, .. } => {
                prelude.pty = Some(PtyReq { cols: col_width });
                prelude.push_request(msg);
            }
            ChannelMsg::WindowChange { col_width, .. } => {
                if let Some(pty) = prelude.pty.as_mut() {
                    pty.cols = col_width;
                }
                prelude.push_request(msg);
            }
            ChannelMsg::SetEnv { .. } | ChannelMsg::AgentForward { .. } => {
                prelude.push_request(msg);
            }
            ChannelMsg::RequestShell { .. } => break Start::Shell,
            ChannelMsg::Exec { command, .. } => break Start::Exec(command),
            ChannelMsg::RequestSubsystem { name, .. } => break Start::Subsystem(name),
            ChannelMsg::Data { data } => {
                early_bytes += data.len();
                if early_bytes <= EARLY_DATA_BUDGET {
                    prelude.data.push(data);
                }
            }
            ChannelMsg::Eof => prelude.eof = true,
            ChannelMsg::Close => return,
            _ => {}
        }
    };
    match ctx.route().await {
        Route::Lobby => lobby::run(ctx, reader, writer, start, prelude).await,
        Route::Vm(crate::VmEndpoint {
            shell: Some(shell), ..
        }) if guest::can_serve(&start, &prelude) => {
            let down = ctx.state.down.get().cloned();
            guest::session(&*shell, down, id, reader, writer, start, prelude).await;
        }
        Route::Vm(crate::VmEndpoint {
            sshd: Some(sshd), ..
        }) => {
            relay::session(ctx, id, sshd, reader, writer, start, prelude).await;
        }
        Route::Vm(ep) => {
            let what = match &start {
                Start::Subsystem(name) => format!("the {name} subsystem"),
                _ => "agent forwarding (-A)".to_string(),
            };
            let message = format!(
                "nook: VM '{}' runs an image without an SSH server, so {what} is not available: use the default image",
                ep.name
            );
            lobby::refuse(&writer, prelude.pty.is_some(), &message).await;
        }
        Route::Unavailable(message) => {
            lobby::refuse(&writer, prelude.pty.is_some(), &message).await;
        }
    }
}
