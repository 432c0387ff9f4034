//! nook's web: the dashboard (server-rendered pages that run lobby commands), the HTTPS API
//! (`POST /api/exec`: one lobby command line, its JSON and exit code) and the web terminal
//! (xterm.js over a WebSocket to a pty in the VM).
//!
//! A leaf: it knows no other nook crate. The daemon implements [`WebBackend`] (run a lobby
//! command as someone, resolve a token, open a pty) and hands requests for the dashboard host
//! to [`Web::handle`]; the edge has already terminated TLS and read the session cookie.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::sync::mpsc;

mod agent;
pub mod api;
mod assets;
pub mod ops;
mod pages;
pub mod signed;
pub mod terminal;

pub use signed::{Permissions, SignedToken, SignedTokenError};

/// Every answer's body: a page, or a stream (SSE, terminal).
pub type WebBody = UnsyncBoxBody<Bytes, Infallible>;

/// Who is asking, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub account_id: String,
    pub email: String,
    /// Set when the request came with a token or from a VM: what it allows.
    pub limits: Option<Limits>,
}

/// What a token or a VM's grant allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `all`, or lobby command names separated by commas.
    pub cmds: String,
    /// The only VMs it may name.
    pub vms: Option<Vec<String>>,
    /// How refusals name it: "This token", "This VM".
    pub what: &'static str,
}

/// One piece of a command's output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// A step of a long command (`new`, `cp`): "booting", "waiting for the guest agent".
    Step(String),
    /// The command failed with an error of this HTTP status (`vm_not_found` is 404).
    Failed(u16),
}

/// Where a running command writes. Bounded by [`EXEC_OUTPUT_LIMIT`] in total.
pub type ExecSink = mpsc::UnboundedSender<ExecEvent>;

/// The most output one API call returns; lobby commands print kilobytes.
pub const EXEC_OUTPUT_LIMIT: usize = 4 << 20;

/// A pty in a VM, as the web terminal drives it. Both channels are bounded: a slow browser
/// slows the shell down instead of growing a buffer.
pub struct Pty {
    pub input: mpsc::Sender<PtyInput>,
    pub output: mpsc::Receiver<PtyOutput>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyInput {
    Data(Bytes),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// The session is over (closed, or its grace period ran out): SIGHUP.
    Hangup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyOutput {
    Data(Bytes),
    Exit(Option<i32>),
}

/// A conversation's events: each one's number and JSON.
pub type AgentEvents = std::pin::Pin<Box<dyn futures::Stream<Item = (u64, String)> + Send>>;

/// A failure of the backend itself (the store is down): logged, shown as "internal error".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// The daemon's side of the web.
pub trait WebBackend: Send + Sync + 'static {
    /// Runs one lobby command line (already split into words) as `who`, writing what it prints
    /// to `out` (stdout, stderr and steps); returns the exit status: 0 ok, 1 failed, 2 usage.
    fn exec(
        &self,
        who: &Principal,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        out: ExecSink,
    ) -> impl Future<Output = u32> + Send;

    /// The account holding the SSH key with this `SHA256:...` fingerprint.
    fn account_for_key(
        &self,
        fingerprint: &str,
    ) -> impl Future<Output = Result<Option<Principal>, BackendError>> + Send;

    /// What a live opaque API token (`token create --api`) allows; `None` when it is unknown,
    /// revoked or expired.
    fn exec_token(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Option<Principal>, BackendError>> + Send;

    /// VMs others shared with `who`: (name, role), role being `viewer` or `collaborator`.
    fn shared_vms(&self, who: &Principal) -> impl Future<Output = Vec<(String, String)>> + Send;

    /// Whether `who` may (still) open a terminal in `vm`: checked again when a page resumes a
    /// session, so access taken away ends it.
    fn may_enter(&self, who: &Principal, vm: &str) -> impl Future<Output = bool> + Send;

    /// A conversation's events after `after` and then as they happen, as `(number, JSON)`,
    /// for its VM's owner or a collaborator. The error is a message for the user, and the
    /// same for a VM `who` may not see as for none at all.
    fn agent_events(
        &self,
        who: &Principal,
        vm: &str,
        conversation: &str,
        after: u64,
    ) -> impl Future<Output = Result<AgentEvents, String>> + Send;

    /// Whether `who` may (still) use the agent in `vm`: re-checked while a chat is open.
    fn may_use_agent(&self, who: &Principal, vm: &str) -> impl Future<Output = bool> + Send;

    /// Starts a login shell with a pty in `vm`, for its owner or a collaborator. The error is
    /// a message for the user, and the same for a VM `who` may not enter as for none at all.
    fn terminal(
        &self,
        who: &Principal,
        vm: &str,
        cols: u16,
        rows: u16,
    ) -> impl Future<Output = Result<Pty, String>> + Send;
}

/// What the edge tells us about a request (see `nook_edge::AppRequest`).
#[derive(Debug, Clone)]
pub struct Visitor {
    /// Signed in by the dashboard's session cookie.
    pub user: Option<Principal>,
    /// The browser vouches that the request comes from the dashboard's own pages.
    pub same_origin: bool,
}

/// The web app: routes requests for the dashboard host.
pub struct Web<B> {
    backend: Arc<B>,
    terminals: terminal::Sessions,
    pub(crate) ops: ops::Ops,
    /// How the lobby is reached by SSH (`ssh -p 2222 HOST`), shown on pages.
    ssh_command: String,
    /// A VM's URL with `{}` for its name: `https://{}.nook-vm.localhost:8443/`.
    vm_url: String,
}

impl<B: WebBackend> Web<B> {
    /// `ssh_command` is how the lobby is reached (`ssh -p 2222 HOST`); `vm_url` is a VM's
    /// URL with `{}` for its name.
    pub fn new(backend: Arc<B>, ssh_command: String, vm_url: String) -> Self {
        Self {
            backend,
            terminals: terminal::Sessions::default(),
            ops: ops::Ops::default(),
            ssh_command,
            vm_url,
        }
    }

    pub(crate) fn vm_url(&self, name: &str) -> String {
        self.vm_url.replace("{}", name)
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Answers one request for the dashboard host.
    pub async fn handle(&self, req: Request<Incoming>, visitor: Visitor) -> Response<WebBody> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if let Some(rest) = path.strip_prefix("/api/") {
            return api::handle(self, req, &visitor, rest).await;
        }
        if let Some(asset) = path.strip_prefix("/static/") {
            return assets::serve(asset);
        }
        if path == "/favicon.ico" {
            return assets::serve("favicon.svg");
        }
        // Every page below is for a signed-in browser.
        let Some(user) = visitor.user.clone() else {
            return pages::sign_in_first(&path);
        };
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let is_get = method == Method::GET || method == Method::HEAD;
        let websocket = terminal::is_websocket(&req);
        match (segments.as_slice(), is_get || websocket) {
            ([""], true) => pages::vm_list(self, &user).await,
            (["account"], true) => pages::account(self, &user).await,
            (["vm", name], true) => pages::vm_page(self, &user, name).await,
            (["vm", name, "terminal"], true) if websocket => {
                if !visitor.same_origin {
                    return text(
                        StatusCode::FORBIDDEN,
                        "A terminal opens only from nook's own pages.",
                    );
                }
                terminal::upgrade(self, req, user, name).await
            }
            (["vm", name, "terminal"], true) => pages::terminal(&user, name),
            (["vm", name, "agent"], true) => {
                agent::page(self, &user, name, req.uri().query()).await
            }
            (["vm", name, "agent", conversation, "events"], true) => {
                agent::events(self, req, user, name, conversation).await
            }
            (_, false) => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "The dashboard changes things through POST /api/exec.",
            ),
            _ => pages::not_found(),
        }
    }

    pub(crate) fn ssh_command(&self) -> &str {
        &self.ssh_command
    }

    /// Runs a command line and collects what it printed (for pages).
    pub(crate) async fn run(&self, who: &Principal, argv: &[&str]) -> Collected {
        let (tx, rx) = mpsc::unbounded_channel();
        let argv = argv.iter().map(|s| (*s).to_string()).collect();
        let status = self.backend.exec(who, argv, None, tx).await;
        let (stdout, stderr, _) = api::collect(rx);
        Collected {
            status,
            stdout,
            stderr,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Collected {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Collected {
    pub fn json(&self) -> Option<serde_json::Value> {
        (self.status == 0)
            .then(|| serde_json::from_slice(&self.stdout).ok())
            .flatten()
    }

    /// The error message the command printed with `--json`.
    pub fn error(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.stderr)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.stderr).trim().to_string())
    }
}

pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<WebBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

pub(crate) fn text(status: StatusCode, body: &str) -> Response<WebBody> {
    full(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

/// A lock that a panic elsewhere does not poison: the state it guards stays consistent
/// between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
