//! Per-request decisions: which site, who is asking, whether they may, and then a page, a
//! redirect or the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::auth::{self, NEXT_COOKIE, SESSION_COOKIE};
use crate::backend::{Access, EdgeBackend, User};
use crate::body::EdgeBody;
use crate::error::{BackendError, UpstreamError};
use crate::host::{self, HostName, Site};
use crate::pages::{self, Page};
use crate::proxy::{Forward, UpgradeAsk};
use crate::{ConnInfo, Inner, SHARE_PARAM};

/// How long a request the VM never answered waits before it goes again (once): long enough
/// for a VM that moved to be recorded where it runs now.
const RETRY_AFTER_CUT: Duration = Duration::from_millis(500);

type Resp = Response<EdgeBody>;

/// Internal outcome of a handler that could not produce a response itself.
enum Failure {
    Backend(BackendError),
    Page(Page),
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Failure::Backend(e)
    }
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn query_param<T>(req: &Request<T>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A small urlencoded form body; anything slow or large is refused.
async fn read_form(body: Incoming) -> Result<Bytes, Failure> {
    let body = http_body_util::Limited::new(body, 8 * 1024);
    match tokio::time::timeout(Duration::from_secs(10), body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        _ => Err(Failure::Page(Page::BadForm)),
    }
}

/// A POSTed form's body (bounded as [`read_form`]) and the request's head, to read cookies.
async fn read_posted(req: Request<Incoming>) -> Result<(Request<()>, Form), Failure> {
    let (parts, body) = req.into_parts();
    let form = read_form(body).await?;
    Ok((Request::from_parts(parts, ()), Form(form)))
}

/// An urlencoded form body.
struct Form(Bytes);

impl Form {
    fn field(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(&self.0)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Where to go after signing in, and the sign-in state of the VM host that sent the browser:
/// from the request if it says, else from the cookie the login page left.
fn login_next<T>(
    req: &Request<T>,
    next: Option<String>,
    state: Option<String>,
) -> (Option<String>, Option<String>) {
    let remembered = auth::cookie(req.headers(), NEXT_COOKIE).map(|c| {
        let (state, next) = match c.split_once('.') {
            Some((s, n)) if auth::is_state(s) => (Some(s.to_string()), n),
            _ => (None, c),
        };
        let next = percent_encoding::percent_decode_str(next)
            .decode_utf8_lossy()
            .into_owned();
        (state, next)
    });
    let (next, state) = match next {
        Some(next) => (Some(next), state),
        None => match remembered {
            Some((state, next)) => (Some(next), state),
            None => (None, None),
        },
    };
    (next, state.filter(|s| auth::is_state(s)))
}

fn redirect(location: &str) -> Resp {
    let mut r = Response::new(EdgeBody::from(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A same-origin path to return to: absolute path, no scheme-relative `//` or backslash
/// tricks, no control characters.
fn safe_path(next: Option<&str>) -> &str {
    match next {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && !p.bytes().any(|b| b.is_ascii_control() || b == b' ') =>
        {
            p
        }
        _ => "/",
    }
}

/// A `next` URL on a VM host of this domain, split into authority (as typed, with port) and
/// path. Anything else is not a place the dashboard sends people.
fn vm_next(next: &str, sites: &host::Sites) -> Option<(String, String, String)> {
    let rest = next.strip_prefix("https://")?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let h = host::parse_host(authority)?;
    let Site::Vm(_) = host::site(&h.name, sites) else {
        return None;
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let path = safe_path(Some(&path)).to_string();
    Some((authority.to_ascii_lowercase(), h.name, path))
}

/// Whether the browser says the request comes from the site it is for: `Origin` names this
/// host (scheme, name and port), or `Sec-Fetch-Site` is `same-origin` or `none` (typed or
/// bookmarked). Browsers send one or the other on every request that needs the check; a
/// request with neither gets no benefit of the doubt.
fn from_same_origin<T>(req: &Request<T>, host: &HostName) -> bool {
    let headers = req.headers();
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    if matches!(fetch_site.as_deref(), Some("same-origin" | "none")) {
        return true;
    }
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        return false;
    };
    origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("https://"))
        .and_then(host::parse_host)
        .is_some_and(|o| o.name == host.name && o.port.unwrap_or(443) == host.port.unwrap_or(443))
}

/// What every dashboard answer carries. The dashboard is where accounts sign in, so: HTTPS
/// only from now on (HSTS), never inside another site's frame (clickjacking the sign-in
/// button), no content sniffing, and no URL (which may hold a login token) in a Referer.
/// VM hosts get none of these from nook: each app decides its own.
fn dashboard_headers(h: &mut hyper::HeaderMap) {
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    // Appended: a page of the dashboard's app keeps its own policy too (both apply).
    h.append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Methods that must not change anything, so need no proof of where they came from.
fn is_safe_method(m: &Method) -> bool {
    *m == Method::GET || *m == Method::HEAD || *m == Method::OPTIONS
}

fn wants_html(req: &Request<Incoming>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
}

impl<B: EdgeBackend> Inner<B> {
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> Resp {
        // HTTP/2 carries the host in :authority; HTTP/1.1 in Host.
        let raw_host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
        // The edge is not a forward proxy: no tunnels to arbitrary places. The one CONNECT it
        // takes is HTTP/2's WebSocket (RFC 8441), which it proxies as an HTTP/1.1 upgrade.
        if req.method() == Method::CONNECT && !crate::proxy::is_websocket_connect(&req) {
            return Page::MethodNotAllowed.response();
        }
        let Some(host) = raw_host.as_deref().and_then(host::parse_host) else {
            return Page::UnknownHost.response();
        };
        let site = host::site(&host.name, &self.sites);
        let on_dashboard = site == Site::Dashboard;
        let result = match site {
            Site::Dashboard => self.dashboard(req, &host, conn).await,
            Site::Vm(name) => self.vm(req, &name, &host, conn).await,
            Site::Unknown => Err(Failure::Page(Page::UnknownHost)),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(Failure::Page(p)) => p.response(),
            Err(Failure::Backend(e)) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), host = %host.name, "backend failed");
                Page::Internal.response()
            }
        };
        if on_dashboard {
            dashboard_headers(resp.headers_mut());
        }
        resp
    }

    pub(crate) fn dashboard_origin(&self) -> String {
        match self.config.public_port {
            443 => format!("https://{}", self.config.domain),
            p => format!("https://{}:{p}", self.config.domain),
        }
    }

    pub(crate) fn login_url(&self, token: &str) -> String {
        format!(
            "{}/__nook/login?token={}",
            self.dashboard_origin(),
            enc(token)
        )
    }

    pub(crate) fn vm_url(&self, name: &str) -> String {
        match self.config.public_port {
            443 => format!("https://{name}.{}/", self.sites.vms),
            p => format!("https://{name}.{}:{p}/", self.sites.vms),
        }
    }

    async fn session_user<T>(
        &self,
        req: &Request<T>,
        host: &str,
    ) -> Result<Option<User>, BackendError> {
        match auth::cookie(req.headers(), SESSION_COOKIE) {
            Some(secret) if !secret.is_empty() => self.backend.session(host, secret).await,
            _ => Ok(None),
        }
    }

    fn with_cookie(&self, mut resp: Resp, value: HeaderValue) -> Resp {
        resp.headers_mut().append(header::SET_COOKIE, value);
        resp
    }

    async fn new_session_cookie(&self, user_id: &str, host: &str) -> Result<HeaderValue, Failure> {
        let secret = self.backend.create_session(user_id, host).await?;
        auth::set_cookie(SESSION_COOKIE, &secret, self.config.session_max_age).ok_or_else(|| {
            tracing::error!("backend returned a session secret that is not cookie-safe");
            Failure::Page(Page::Internal)
        })
    }

    // ---- the dashboard host ----

    async fn dashboard(
        self: &Arc<Self>,
        req: Request<Incoming>,
        host: &HostName,
        conn: ConnInfo,
    ) -> Result<Resp, Failure> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let is_get = method == Method::GET || method == Method::HEAD;
        let on_nook = path == "/" || path.starts_with("/__nook/");
        // Every POST to /__nook/ signs someone in or out, or sends mail: only the dashboard's
        // own pages may make a browser send one (another site's form would be login CSRF).
        // The app checks its own requests, since API clients with a token send no Origin.
        if on_nook && method == Method::POST && !from_same_origin(&req, host) {
            return Err(Failure::Page(Page::CrossSite));
        }
        if !path.starts_with("/__nook/") {
            let user = self.session_user(&req, &host.name).await?;
            if path == "/" && is_get && user.is_none() {
                return Ok(pages::login_page(
                    &self.config.ssh_login_hint,
                    self.mailer.is_some(),
                    None,
                ));
            }
            let ctx = crate::backend::AppRequest {
                user,
                same_origin: from_same_origin(&req, host),
            };
            let resp = self.backend.app(req, ctx).await;
            return Ok(resp.map(EdgeBody::App));
        }
        match path.as_str() {
            "/__nook/login" if is_get => self.login(req, host).await,
            "/__nook/login" if method == Method::POST => {
                let (req, form) = read_posted(req).await?;
                let Some(token) = form.field("token") else {
                    return Err(Failure::Page(Page::LoginLinkInvalid));
                };
                let (next, state) = login_next(&req, form.field("next"), form.field("state"));
                self.redeem_login(&req, host, &token, next, state).await
            }
            // The click on [`pages::handoff_confirm_page`]: a same-origin POST (checked above).
            "/__nook/continue" if method == Method::POST => {
                let (req, form) = read_posted(req).await?;
                let Some(user) = self.session_user(&req, &host.name).await? else {
                    return Ok(redirect("/"));
                };
                let state = form.field("state").filter(|s| auth::is_state(s));
                Ok(self.hand_over(form.field("next").as_deref(), state.as_deref(), &user))
            }
            "/__nook/email" if method == Method::POST && self.mailer.is_some() => {
                self.email_login(req, conn).await
            }
            "/__nook/logout" if is_get || method == Method::POST => {
                if let Some(secret) = auth::cookie(req.headers(), SESSION_COOKIE) {
                    self.backend.end_session(&host.name, secret).await?;
                }
                Ok(self.with_cookie(redirect("/"), auth::clear_cookie(SESSION_COOKIE)))
            }
            "/__nook/login" | "/__nook/logout" | "/__nook/continue" => {
                Err(Failure::Page(Page::MethodNotAllowed))
            }
            _ => Err(Failure::Page(Page::NotFound)),
        }
    }

    /// `/__nook/login?token=T[&next=URL]` is a login link; without a token it either
    /// continues to `next` (already signed in) or shows the login page and remembers `next`.
    ///
    /// A browser signed in to the dashboard uses the link at once (it cannot be switched to
    /// another account by it, see [`Self::redeem_login`]). A signed-out browser is asked to
    /// confirm with a click that POSTs the token back: otherwise anyone could sign a victim's
    /// browser in to their own account by making it open a link (login CSRF), and whatever
    /// the victim then did or typed would land in that account.
    ///
    /// A VM host sends browsers here with the sign-in `state` it set on them (see
    /// [`auth::random_state`]); the handoff code is bound to it. While the user signs in out of
    /// band, `next` and the state wait in a cookie as `STATE.NEXT`.
    async fn login(&self, req: Request<Incoming>, host: &HostName) -> Result<Resp, Failure> {
        let query_next = query_param(&req, "next");
        let query_state = query_param(&req, "state");
        if let Some(token) = query_param(&req, "token") {
            if self.session_user(&req, &host.name).await?.is_none() {
                return Ok(pages::login_confirm_page(
                    &token,
                    query_next.as_deref(),
                    query_state.as_deref().filter(|s| auth::is_state(s)),
                ));
            }
            let (next, state) = login_next(&req, query_next, query_state);
            return self.redeem_login(&req, host, &token, next, state).await;
        }
        let (next, state) = login_next(&req, query_next, query_state);
        if let Some(user) = self.session_user(&req, &host.name).await? {
            return self
                .continue_to(next.as_deref(), state.as_deref(), &user)
                .await;
        }
        let next = next.filter(|n| vm_next(n, &self.sites).is_some());
        let resp = pages::login_page(
            &self.config.ssh_login_hint,
            self.mailer.is_some(),
            next.as_deref(),
        );
        let remember = next.map(|n| match &state {
            Some(s) => format!("{s}.{}", enc(&n)),
            None => enc(&n),
        });
        Ok(
            match remember.and_then(|r| auth::set_cookie(NEXT_COOKIE, &r, Duration::from_secs(900)))
            {
                Some(c) => self.with_cookie(resp, c),
                None => resp,
            },
        )
    }

    /// Uses up a login token and signs this browser in to the dashboard, then continues to
    /// `next`. A browser signed in as someone else is never silently switched.
    async fn redeem_login<T>(
        &self,
        req: &Request<T>,
        host: &HostName,
        token: &str,
        next: Option<String>,
        state: Option<String>,
    ) -> Result<Resp, Failure> {
        let current = self.session_user(req, &host.name).await?;
        let Some(user) = self.backend.redeem_login_token(token).await? else {
            return Err(Failure::Page(Page::LoginLinkInvalid));
        };
        if let Some(current) = current.filter(|c| c.id != user.id) {
            return Err(Failure::Page(Page::LoginLinkForAnotherAccount {
                signed_in: current.email,
                link_for: user.email,
            }));
        }
        let cookie = self.new_session_cookie(&user.id, &host.name).await?;
        let resp = self
            .continue_to(next.as_deref(), state.as_deref(), &user)
            .await?;
        let resp = self.with_cookie(resp, cookie);
        Ok(self.with_cookie(resp, auth::clear_cookie(NEXT_COOKIE)))
    }

    /// Sends a signed-in user on to `next`, as [`Self::hand_over`] does, but first asks with a
    /// click when `next` is a public VM on which they have no role, such as one a link lured
    /// them to: its owner gets no session for them unless they meant to go.
    async fn continue_to(
        &self,
        next: Option<&str>,
        state: Option<&str>,
        user: &User,
    ) -> Result<Resp, Failure> {
        if let Some(n) = next
            && let Some((_, vm_host, _)) = vm_next(n, &self.sites)
            && let Site::Vm(name) = host::site(&vm_host, &self.sites)
            && let Some(vm) = self.backend.vm(&name).await?
            // Only a public VM: a private one the user has no role on answers as a missing
            // one after the handoff, and asking here would tell the two apart.
            && vm.public
            && self.backend.access(&user.id, &vm.id).await? == Access::None
        {
            return Ok(pages::handoff_confirm_page(&vm_host, &user.email, n, state));
        }
        Ok(self.hand_over(next, state, user))
    }

    /// Sends a signed-in user on to `next`: through a handoff when it is a VM URL (each VM host
    /// gets its own cookie), else to the dashboard.
    fn hand_over(&self, next: Option<&str>, state: Option<&str>, user: &User) -> Resp {
        match next.and_then(|n| vm_next(n, &self.sites)) {
            Some((authority, vm_host, path)) => {
                let code = self.handoffs.issue(&user.id, &vm_host, state);
                redirect(&format!(
                    "https://{authority}/__nook/handoff?code={code}&next={}",
                    enc(&path)
                ))
            }
            None => redirect("/"),
        }
    }

    /// Asks for a sign-in email. The answer is the same page, at once, whether or not the
    /// address belongs to anyone: the lookup and the mail happen afterwards, so neither the
    /// page nor its timing tells who has an account. Limits per source address and per email
    /// keep it from being used to flood someone's inbox or to probe at speed.
    async fn email_login(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Resp, Failure> {
        let form = read_form(req.into_body()).await?;
        let mut email = None;
        let mut next = None;
        for (k, v) in form_urlencoded::parse(&form) {
            match &*k {
                "email" => email = Some(v.trim().to_ascii_lowercase()),
                "next" => next = Some(v.into_owned()),
                _ => {}
            }
        }
        if !self.email_limits.allow_source(conn.peer.ip()) {
            return Err(Failure::Page(Page::TooManyEmails));
        }
        let Some(email) = email.filter(|e| e.contains('@') && e.len() <= 254) else {
            return Ok(pages::email_sent_page());
        };
        if !self.email_limits.allow_email(&email) {
            return Err(Failure::Page(Page::TooManyEmails));
        }
        let Ok(permit) = self.email_limits.in_flight.clone().try_acquire_owned() else {
            tracing::warn!("too many sign-in emails in flight; one was dropped");
            return Ok(pages::email_sent_page());
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = this.send_login_email(&email, next).await {
                tracing::warn!(error = %e, source = ?e.source(), "login email not sent");
            }
        });
        Ok(pages::email_sent_page())
    }

    async fn send_login_email(
        &self,
        email: &str,
        next: Option<String>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(token) = self.backend.start_email_login(email).await? else {
            return Ok(());
        };
        let mut link = self.login_url(&token);
        if let Some(n) = next.filter(|n| vm_next(n, &self.sites).is_some()) {
            link.push_str(&format!("&next={}", enc(&n)));
        }
        if let Some(mailer) = &self.mailer {
            mailer.send_login_link(email, &link).await?;
        }
        Ok(())
    }

    // ---- VM hosts ----

    fn login_redirect(&self, req: &Request<Incoming>, authority: &str) -> Resp {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        self.sign_in_redirect(authority, pq)
    }

    /// Sends the browser to sign in on the dashboard and come back to `pq` on this VM host,
    /// marking it with a fresh sign-in state that the handoff will ask for.
    fn sign_in_redirect(&self, authority: &str, pq: &str) -> Resp {
        let here = format!("https://{authority}{pq}");
        let state = auth::random_state();
        let resp = redirect(&format!(
            "{}/__nook/login?next={}&state={state}",
            self.dashboard_origin(),
            enc(&here)
        ));
        match auth::set_cookie(&auth::state_cookie_name(&state), "1", auth::STATE_MAX_AGE) {
            Some(c) => self.with_cookie(resp, c),
            None => resp,
        }
    }

    /// Asks again, for an open WebSocket, what let it in: the same token or session, its
    /// role on the VM, or the VM still being public. A backend error keeps the tunnel (a
    /// passing store hiccup must not cut every WebSocket); a definite no closes it.
    fn tunnel_recheck(
        &self,
        vm: &crate::backend::VmTarget,
        host: &str,
        token: Option<String>,
        session: Option<String>,
        default_port: bool,
    ) -> crate::proxy::Recheck {
        let backend = self.backend.clone();
        let (vm_id, vm_name, host) = (vm.id.clone(), vm.name.clone(), host.to_string());
        Box::new(move || {
            let (backend, vm_id, vm_name, host) = (
                backend.clone(),
                vm_id.clone(),
                vm_name.clone(),
                host.clone(),
            );
            let (token, session) = (token.clone(), session.clone());
            Box::pin(async move {
                let still = async {
                    let vm = match backend.vm(&vm_name).await? {
                        Some(vm) if vm.id == vm_id => vm,
                        _ => return Ok(false),
                    };
                    let user = match (&token, &session) {
                        (Some(t), _) => backend.token_user(&vm_id, t).await?,
                        (None, Some(s)) => backend.session(&host, s).await?,
                        (None, None) => None,
                    };
                    let access = match &user {
                        Some(u) => backend.access(&u.id, &vm_id).await?,
                        None => Access::None,
                    };
                    Ok::<_, crate::error::BackendError>(
                        access >= Access::Viewer || (vm.public && default_port),
                    )
                };
                still.await.unwrap_or(true)
            })
        })
    }

    async fn vm(
        &self,
        req: Request<Incoming>,
        name: &str,
        host: &HostName,
        conn: ConnInfo,
    ) -> Result<Resp, Failure> {
        let authority = match host.port {
            Some(p) => format!("{}:{p}", host.name),
            None => host.name.clone(),
        };
        let path = req.uri().path();
        if let Some(reserved) = path.strip_prefix("/__nook/") {
            return match reserved {
                "handoff" => self.handoff(&req, host, &authority).await,
                "logout" => {
                    if let Some(secret) = auth::cookie(req.headers(), SESSION_COOKIE) {
                        self.backend.end_session(&host.name, secret).await?;
                    }
                    let to = format!("{}/__nook/logout", self.dashboard_origin());
                    Ok(self.with_cookie(redirect(&to), auth::clear_cookie(SESSION_COOKIE)))
                }
                _ => Err(Failure::Page(Page::NotFound)),
            };
        }

        let upgrade = crate::proxy::upgrade_ask(&req);
        if upgrade == UpgradeAsk::Other {
            return Err(Failure::Page(Page::UpgradeNotSupported));
        }
        let port = host::vm_port(
            conn.role,
            conn.local_port,
            host.port,
            self.config.public_port,
        )
        .map_err(|()| Failure::Page(Page::BadPort))?;
        let vm = self.backend.vm(name).await?;
        let mut user = self.session_user(&req, &host.name).await?;
        let mut token_used = false;
        let mut used_token = None;
        let mut bad_credentials = false;
        let mut nook_token = false;
        if let Some(token) = auth::authorization_token(req.headers()) {
            nook_token = token.starts_with(auth::TOKEN_PREFIX);
            match &vm {
                Some(vm) => match self.backend.token_user(&vm.id, &token).await? {
                    Some(u) => {
                        user = Some(u);
                        token_used = true;
                        used_token = Some(token);
                    }
                    // Possibly the app's own credentials: passed through if the request is
                    // otherwise allowed.
                    None => bad_credentials = true,
                },
                None => bad_credentials = true,
            }
        }

        // A missing VM and a VM the viewer may not see must look identical, including to
        // anonymous visitors (who are sent to log in either way).
        let Some(vm) = vm else {
            return Ok(self.deny(&req, user.as_ref(), bad_credentials, name, &authority));
        };

        if let Some(share) = query_param(&req, SHARE_PARAM) {
            let Some(u) = &user else {
                return Ok(self.login_redirect(&req, &authority));
            };
            self.backend
                .redeem_share_link(&vm.id, &share, &u.id)
                .await?;
            return Ok(redirect(&without_param(&req, SHARE_PARAM)));
        }

        // A browser's cookie goes with requests that other sites (a sibling VM, say) make it
        // send: what such a request could change, or a WebSocket it opens, needs proof that it
        // comes from this site itself. Tokens are never sent by a browser on its own.
        let by_cookie = user.is_some() && !token_used;
        if by_cookie
            && (!is_safe_method(req.method()) || upgrade == UpgradeAsk::WebSocket)
            && !from_same_origin(&req, host)
        {
            return Err(Failure::Page(Page::CrossSite));
        }

        let default_port = port.is_none();
        let access = match &user {
            Some(u) => self.backend.access(&u.id, &vm.id).await?,
            None => Access::None,
        };
        let allowed = access >= Access::Viewer || (vm.public && default_port);
        if !allowed {
            return Ok(self.deny(&req, user.as_ref(), bad_credentials, name, &authority));
        }

        let target = SocketAddr::new(vm.upstream, port.unwrap_or(vm.default_port));
        let recheck = (upgrade == UpgradeAsk::WebSocket).then(|| {
            let session = auth::cookie(req.headers(), SESSION_COOKIE)
                .filter(|_| !token_used)
                .map(str::to_string);
            self.tunnel_recheck(&vm, &host.name, used_token, session, default_port)
        });
        let fwd = Forward {
            peer: conn.peer.ip(),
            host: &authority,
            // Let in only because the VM is public: the app learns nothing about the visitor,
            // or any public VM could collect the email of everyone who opens it.
            user: user.as_ref().filter(|_| access >= Access::Viewer),
            // A nook token is a secret for nook: the VM it was not made for (or made for, but
            // it authenticated the request to nook) must not be able to replay it.
            strip_authorization: token_used || nook_token,
            recheck,
        };
        let vm_port = target.port();
        // A request with nothing to send and nothing to change may go again once if the VM
        // never answered it: a VM that moved to another host meanwhile (its old path ends with
        // its old QEMU) is reached where it is now.
        let again = (is_safe_method(req.method())
            && upgrade == UpgradeAsk::None
            && hyper::body::Body::is_end_stream(req.body()))
        .then(|| {
            let mut copy = Request::new(());
            *copy.method_mut() = req.method().clone();
            *copy.uri_mut() = req.uri().clone();
            *copy.version_mut() = req.version();
            *copy.headers_mut() = req.headers().clone();
            copy
        });
        // (Only a request with no WebSocket goes again, so it has nothing to recheck.)
        let fwd_again = Forward {
            peer: fwd.peer,
            host: fwd.host,
            user: fwd.user,
            strip_authorization: fwd.strip_authorization,
            recheck: None,
        };
        let req = req.map(|body| body.boxed());
        let mut sent = self
            .upstream
            .forward(req, target, vm.via.as_ref(), fwd)
            .await;
        let cut = matches!(sent, Err(UpstreamError::Unreachable(_)));
        if let (true, Some(copy)) = (cut, again) {
            tokio::time::sleep(RETRY_AFTER_CUT).await;
            if let Some(now) = self.backend.vm(name).await?.filter(|now| now.id == vm.id) {
                let target = SocketAddr::new(now.upstream, target.port());
                let req = copy.map(|()| {
                    http_body_util::Empty::<Bytes>::new()
                        .map_err(|never| -> hyper::Error { match never {} })
                        .boxed()
                });
                sent = self
                    .upstream
                    .forward(req, target, now.via.as_ref(), fwd_again)
                    .await;
            }
        }
        match sent {
            Ok(resp) => Ok(resp),
            Err(UpstreamError::Timeout) => Err(Failure::Page(Page::VmTimeout {
                name: vm.name,
                port: vm_port,
            })),
            Err(
                e @ (UpstreamError::Unreachable(_)
                | UpstreamError::UnexpectedUpgrade
                | UpstreamError::WebSocketRefused),
            ) => {
                tracing::debug!(vm = %vm.name, port = vm_port, error = %e, source = ?std::error::Error::source(&e), "upstream failed");
                Err(Failure::Page(Page::VmUnreachable {
                    name: vm.name,
                    port: vm_port,
                }))
            }
        }
    }

    /// The answer when the viewer may not open this VM (or it does not exist).
    fn deny(
        &self,
        req: &Request<Incoming>,
        user: Option<&User>,
        bad_credentials: bool,
        name: &str,
        authority: &str,
    ) -> Resp {
        if user.is_some() {
            return Page::NoSuchVm {
                name: name.to_string(),
            }
            .response();
        }
        if !bad_credentials && wants_html(req) {
            // A browser: log in, then come back here.
            return self.login_redirect(req, authority);
        }
        Page::Unauthorized.response()
    }

    /// Redeems a handoff code from the dashboard, but only in the browser it was made for.
    async fn handoff(
        &self,
        req: &Request<Incoming>,
        host: &HostName,
        authority: &str,
    ) -> Result<Resp, Failure> {
        let code = query_param(req, "code").unwrap_or_default();
        let Some(redeemed) = self.handoffs.redeem(&code, &host.name) else {
            return Err(Failure::Page(Page::HandoffInvalid));
        };
        let next = query_param(req, "next");
        let next = safe_path(next.as_deref());
        let Some(state) = redeemed.state else {
            // Signed in out of band (a link opened elsewhere, say): this browser never started
            // a sign-in here, so it goes round once more and comes back with its own state.
            return Ok(self.sign_in_redirect(authority, next));
        };
        let state_cookie = auth::state_cookie_name(&state);
        if auth::cookie(req.headers(), &state_cookie).is_none() {
            // Made for another browser (or this one's mark expired): go round to sign in as
            // whoever this browser is signed in as on the dashboard.
            return Ok(self.sign_in_redirect(authority, next));
        }
        let cookie = self
            .new_session_cookie(&redeemed.user_id, &host.name)
            .await?;
        let resp = self.with_cookie(redirect(next), cookie);
        Ok(self.with_cookie(resp, auth::clear_cookie(&state_cookie)))
    }
}

/// The request's path and query without one parameter (after a share link was redeemed).
fn without_param(req: &Request<Incoming>, name: &str) -> String {
    let path = req.uri().path();
    let kept: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k != name)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let path = safe_path(Some(path));
    if kept.is_empty() {
        path.to_string()
    } else {
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(kept)
            .finish();
        format!("{path}?{q}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn next_urls_must_be_vm_hosts() {
        let d = &host::Sites {
            dashboard: "nook.localhost".into(),
            vms: "nook.localhost".into(),
        };
        assert_eq!(
            vm_next("https://Blog.nook.localhost:8443/a?b=1", d),
            Some((
                "blog.nook.localhost:8443".into(),
                "blog.nook.localhost".into(),
                "/a?b=1".into()
            ))
        );
        assert_eq!(
            vm_next("https://blog.nook.localhost", d).map(|v| v.2),
            Some("/".into())
        );
        assert_eq!(vm_next("https://evil.com/", d), None);
        assert_eq!(vm_next("http://blog.nook.localhost/", d), None);
        assert_eq!(vm_next("https://nook.localhost/", d), None);
        assert_eq!(vm_next("https://blog.nook.localhost@evil.com/", d), None);
        assert_eq!(
            vm_next("https://blog.nook.localhost//evil.com", d).map(|v| v.2),
            Some("/".into())
        );
    }

    #[test]
    fn safe_paths() {
        assert_eq!(safe_path(Some("/x?y")), "/x?y");
        assert_eq!(safe_path(Some("//evil.com")), "/");
        assert_eq!(safe_path(Some("/\\evil.com")), "/");
        assert_eq!(safe_path(Some("https://evil.com")), "/");
        assert_eq!(safe_path(None), "/");
    }
}
