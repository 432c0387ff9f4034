//! What the edge needs from the daemon's store. The daemon implements [`EdgeBackend`]; the edge
//! calls it on every request and caches nothing, so a revoked share, a deleted token or an
//! ended session stops working on the very next request.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::BackendError;

pub type BackendResult<T> = Result<T, BackendError>;

/// A signed-in person (an account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    /// The email was proven; an unproven one is never passed to apps as the viewer's.
    pub email_verified: bool,
}

/// Where requests for `NAME.DOMAIN` go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTarget {
    pub id: String,
    pub name: String,
    /// The VM's address as seen from the host (its tap address).
    pub upstream: IpAddr,
    /// The port `https://NAME.DOMAIN/` reaches (the VM's chosen port; 80 unless changed).
    pub default_port: u16,
    /// Anyone may open the default port, signed in or not.
    pub public: bool,
    /// For a VM another host runs: how to reach it (the host channel). `None`: it runs here,
    /// at `upstream`.
    pub via: Option<Via>,
}

/// A byte stream to a VM, however it is reached.
pub trait UpstreamIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> UpstreamIo for T {}

/// A dialled connection to a port of a VM on another host.
pub type Dialed = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn UpstreamIo>>> + Send>>;

/// How the edge reaches one VM that another host runs.
pub trait Dial: Send + Sync {
    /// A connection to `port` of the VM.
    fn dial(&self, port: u16) -> Dialed;
}

/// A VM's way in through another host (see [`VmTarget::via`]).
#[derive(Clone)]
pub struct Via(pub Arc<dyn Dial>);

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Via(..)")
    }
}

impl PartialEq for Via {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Via {}

/// A viewer's role on one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Viewer,
    Collaborator,
    Owner,
}

/// The body of an answer from the dashboard's app: any body, streamed as it comes (SSE).
pub type AppBody =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

/// What the edge knows of a request it hands to the dashboard's app.
#[derive(Debug, Clone)]
pub struct AppRequest {
    /// Signed in on the dashboard host by the session cookie.
    pub user: Option<User>,
    /// The browser says the request comes from the dashboard's own pages (`Origin` or
    /// `Sec-Fetch-Site`). A request that rides the session cookie and changes anything, or
    /// opens a WebSocket, must have this; a request with a bearer token needs no such proof.
    pub same_origin: bool,
}

/// The daemon's side of the edge. All methods are called per request; none may be cached.
///
/// Secrets (login tokens, session secrets, machine tokens, share tokens) are passed as the
/// client sent them; the backend should store only hashes and compare in constant time.
pub trait EdgeBackend: Send + Sync + 'static {
    /// The VM named `name` (lowercase, as it appears in the host name), if it exists.
    fn vm(&self, name: &str) -> impl Future<Output = BackendResult<Option<VmTarget>>> + Send;

    /// The role of `user_id` on `vm_id` (owner, collaborator or viewer through a share).
    fn access(
        &self,
        user_id: &str,
        vm_id: &str,
    ) -> impl Future<Output = BackendResult<Access>> + Send;

    /// Redeems a one-time login token (from the lobby's `browser` command or an email link).
    /// Must succeed at most once per token, and only within its short lifetime.
    fn redeem_login_token(
        &self,
        token: &str,
    ) -> impl Future<Output = BackendResult<Option<User>>> + Send;

    /// Creates a session valid only on `host` (a lowercase host name without port) and returns
    /// its secret, which becomes the cookie value.
    fn create_session(
        &self,
        user_id: &str,
        host: &str,
    ) -> impl Future<Output = BackendResult<String>> + Send;

    /// The user of the session `secret`, only if that session was created for `host`.
    fn session(
        &self,
        host: &str,
        secret: &str,
    ) -> impl Future<Output = BackendResult<Option<User>>> + Send;

    /// Ends the session `secret` on `host`; nook's daemon ends every other session of the
    /// same account too (logout on any host signs the account out of all of them). Ending an
    /// unknown session is not an error.
    fn end_session(
        &self,
        host: &str,
        secret: &str,
    ) -> impl Future<Output = BackendResult<()>> + Send;

    /// The user owning machine token `token`, if it is valid for `vm_id`.
    fn token_user(
        &self,
        vm_id: &str,
        token: &str,
    ) -> impl Future<Output = BackendResult<Option<User>>> + Send;

    /// Grants `user_id` access to `vm_id` if `token` is a live share link of that VM.
    fn redeem_share_link(
        &self,
        vm_id: &str,
        token: &str,
        user_id: &str,
    ) -> impl Future<Output = BackendResult<bool>> + Send;

    /// Creates a one-time login token for the account with `email`, or `None` when there is no
    /// such account. The edge mails the link; the page it shows does not depend on the answer.
    fn start_email_login(
        &self,
        email: &str,
    ) -> impl Future<Output = BackendResult<Option<String>>> + Send;

    /// Everything on the dashboard host except signing in and out (`/__nook/...`): the
    /// dashboard itself, the HTTPS API and the web terminal. `/` reaches it only when signed in.
    fn app(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        ctx: AppRequest,
    ) -> impl Future<Output = hyper::Response<AppBody>> + Send;
}
