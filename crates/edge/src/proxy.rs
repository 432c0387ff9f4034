//! Forwarding one request to a VM over HTTP/1.1 and streaming the answer back, including
//! protocol upgrades (WebSocket and anything else that answers 101).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;

/// What goes to a VM: the client's body, or none when a request is tried again.
pub(crate) type UpBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::auth;
use crate::backend::{UpstreamIo, User, Via};
use crate::body::EdgeBody;
use crate::error::UpstreamError;

pub(crate) struct Upstream {
    id: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
}

static NEXT_UPSTREAM_ID: AtomicUsize = AtomicUsize::new(0);

/// A pooled connection unused for this long is closed.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Connections kept per upstream address and thread.
const POOL_MAX_PER_TARGET: usize = 64;
/// How often (at a check-in) the whole pool is swept of closed and idle connections, so idle
/// ones are closed and stopped VMs leave nothing behind.
const POOL_SWEEP_EVERY: Duration = Duration::from_secs(10);

struct Pooled {
    sender: http1::SendRequest<UpBody>,
    returned: Instant,
}

type PoolKey = (usize, SocketAddr);

thread_local! {
    /// One pool of HTTP/1.1 connections per thread (and per edge): a connection's task runs on
    /// the thread that opened it, so a request and its upstream connection never wake each
    /// other across threads (examples/proxy_bench: cross-thread wake-ups dominated). A
    /// connection is put back as soon as its response head arrives; it is taken again only
    /// once it is ready, that is once that response's body has been read.
    static POOL: RefCell<HashMap<PoolKey, Vec<Pooled>>> = RefCell::new(HashMap::new());
    static LAST_SWEEP: Cell<Option<Instant>> = const { Cell::new(None) };
}

fn usable(c: &Pooled, now: Instant) -> bool {
    !c.sender.is_closed() && now.saturating_duration_since(c.returned) < POOL_IDLE
}

fn checkout(key: PoolKey) -> Option<http1::SendRequest<UpBody>> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let conns = pool.get_mut(&key)?;
        let now = Instant::now();
        conns.retain(|c| usable(c, now));
        // The most recently returned first: its socket is the warmest.
        let i = conns.iter().rposition(|c| c.sender.is_ready())?;
        Some(conns.swap_remove(i).sender)
    })
}

fn checkin(key: PoolKey, sender: http1::SendRequest<UpBody>) {
    let now = Instant::now();
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let conns = pool.entry(key).or_default();
        if conns.len() >= POOL_MAX_PER_TARGET {
            conns.remove(0);
        }
        conns.push(Pooled {
            sender,
            returned: now,
        });
        let due = LAST_SWEEP
            .get()
            .is_none_or(|at| now.saturating_duration_since(at) >= POOL_SWEEP_EVERY);
        if due {
            LAST_SWEEP.set(Some(now));
            pool.retain(|_, conns| {
                conns.retain(|c| usable(c, now));
                !conns.is_empty()
            });
        }
    });
}

/// Who is asking, as the VM will be told.
pub(crate) struct Forward<'a> {
    pub peer: IpAddr,
    /// The Host the client used (with port), for `X-Forwarded-Host` and the upstream Host.
    pub host: &'a str,
    pub user: Option<&'a User>,
    /// The client authenticated with a nook machine token in `Authorization`: it must not
    /// reach the VM.
    pub strip_authorization: bool,
    /// For a WebSocket: asks whether what let the request in still does. The tunnel closes
    /// once it answers no, so a revoked share, token or session ends the tunnels it opened.
    pub recheck: Option<Recheck>,
}

/// Whether the request that opened a tunnel would still be let in.
pub(crate) type Recheck =
    Box<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// How often an open tunnel's access is asked again (answers are memoized by the backend,
/// so this costs a lookup, not a query).
const RECHECK_EVERY: Duration = Duration::from_secs(2);

/// Copies both ways until either side closes or, with a `recheck`, access ends.
async fn tunnel<C, U>(client: &mut C, upstream: &mut U, recheck: Option<Recheck>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let copy = tokio::io::copy_bidirectional(client, upstream);
    let Some(recheck) = recheck else {
        let _ = copy.await;
        return;
    };
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut copy => return,
            _ = tick.tick() => {
                if !recheck().await {
                    tracing::info!("access ended: closing a WebSocket tunnel");
                    return;
                }
            }
        }
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_NOOK_USER_ID: HeaderName = HeaderName::from_static("x-nook-user-id");
const X_NOOK_USER_EMAIL: HeaderName = HeaderName::from_static("x-nook-user-email");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those the Connection header names. Returns the
/// Upgrade value when the message asks for (or agrees to) a protocol switch.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most messages carry none of them: one pass over the names instead of a hash lookup
    // per name (this runs twice per proxied request).
    if !headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k))
    {
        return None;
    }
    let upgrade = headers.remove(header::UPGRADE);
    let mut upgrade_requested = false;
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| {
            let t = t.trim();
            if t.eq_ignore_ascii_case("upgrade") {
                upgrade_requested = true;
            }
            HeaderName::from_bytes(t.as_bytes()).ok()
        })
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade_requested { upgrade } else { None }
}

/// The protocol switch a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpgradeAsk {
    None,
    /// An HTTP/1.1 `Upgrade: websocket` or an HTTP/2 WebSocket CONNECT.
    WebSocket,
    /// Any other protocol (h2c, TLS, a VM's own): never tunnelled, since the edge cannot tell
    /// what it would carry past its checks.
    Other,
}

pub(crate) fn upgrade_ask<B>(req: &Request<B>) -> UpgradeAsk {
    if is_websocket_connect(req) {
        return UpgradeAsk::WebSocket;
    }
    let headers = req.headers();
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asked {
        return UpgradeAsk::None;
    }
    let mut values = headers.get_all(header::UPGRADE).iter();
    match (values.next(), values.next()) {
        (None, _) => UpgradeAsk::None,
        (Some(v), None) if is_websocket(v) => UpgradeAsk::WebSocket,
        _ => UpgradeAsk::Other,
    }
}

fn is_websocket(v: &HeaderValue) -> bool {
    v.to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441).
pub(crate) fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == hyper::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns an HTTP/2 WebSocket CONNECT into the HTTP/1.1 upgrade request VMs understand: a GET
/// asking to upgrade, with the key HTTP/2 does without.
fn websocket_connect_to_upgrade(parts: &mut hyper::http::request::Parts) -> HeaderValue {
    use base64::Engine;
    use rand::RngCore;
    let websocket = HeaderValue::from_static("websocket");
    parts.method = hyper::Method::GET;
    let mut key = [0u8; 16];
    rand::rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    if let Ok(key) = HeaderValue::from_str(&key) {
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    parts
        .headers
        .entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    websocket
}

/// Clients cannot forge identity or forwarding headers: drop every copy they sent.
///
/// Names with an underscore go too, whatever they say: CGI-style servers (Django, Rack/Puma,
/// PHP) map both `X-Nook-User-Email` and `X_Nook_User_Email` to `HTTP_X_NOOK_USER_EMAIL`, so
/// a client's `x_nook_user_email` could otherwise stand in for the identity nook vouches for.
fn strip_forgeable(headers: &mut HeaderMap) {
    let forgeable = |k: &HeaderName| {
        let k = k.as_str();
        k.contains('_')
            || k.starts_with("x-nook-")
            || k.starts_with("x-forwarded-")
            || k == "forwarded"
            || k == "x-real-ip"
    };
    if !headers.keys().any(forgeable) {
        return;
    }
    let forged: Vec<HeaderName> = headers.keys().filter(|k| forgeable(k)).cloned().collect();
    for name in forged {
        headers.remove(name);
    }
}

impl Upstream {
    pub(crate) fn new(connect_timeout: Duration, response_timeout: Duration) -> Self {
        Self {
            id: NEXT_UPSTREAM_ID.fetch_add(1, Ordering::Relaxed),
            connect_timeout,
            response_timeout,
        }
    }

    async fn connect(
        &self,
        target: SocketAddr,
        via: Option<&Via>,
    ) -> Result<http1::SendRequest<UpBody>, UpstreamError> {
        let dial = async {
            match via {
                // Another host runs the VM: through the host channel.
                Some(via) => via.0.dial(target.port()).await,
                None => {
                    let tcp = tokio::net::TcpStream::connect(target).await?;
                    let _ = tcp.set_nodelay(true);
                    Ok(Box::new(tcp) as Box<dyn UpstreamIo>)
                }
            }
        };
        let io = match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(UpstreamError::Unreachable(e.into())),
            Err(_) => {
                return Err(UpstreamError::Unreachable(
                    std::io::Error::from(std::io::ErrorKind::TimedOut).into(),
                ));
            }
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Unreachable(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` on a pooled connection to `target`, or a new one. A pooled connection the
    /// VM closed meanwhile gives the request back unsent; it is then tried on the next one.
    async fn send(
        &self,
        target: SocketAddr,
        via: Option<&Via>,
        mut req: Request<UpBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // (A VM's address is unique in the fleet, so it keys the pool however it is reached.)
        let key = (self.id, target);
        loop {
            let (mut sender, pooled) = match checkout(key) {
                Some(s) => (s, true),
                None => (self.connect(target, via).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                        checkin(key, sender);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(UpstreamError::Unreachable(e.into_error().into())),
                },
            }
        }
    }

    pub(crate) async fn forward(
        &self,
        mut req: Request<UpBody>,
        target: SocketAddr,
        via: Option<&Via>,
        fwd: Forward<'_>,
    ) -> Result<Response<EdgeBody>, UpstreamError> {
        let websocket_connect = is_websocket_connect(&req);
        let client_upgrade = (websocket_connect
            || (req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)))
        .then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.extensions = Default::default();
        let mut upgrade = strip_hop_by_hop(&mut parts.headers);
        if websocket_connect {
            upgrade = Some(websocket_connect_to_upgrade(&mut parts));
        }
        let headers = &mut parts.headers;
        strip_forgeable(headers);
        auth::strip_nook_cookies(headers);
        if fwd.strip_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(up) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, up.clone());
        }
        if let Ok(v) = HeaderValue::from_str(fwd.host) {
            headers.insert(header::HOST, v.clone());
            headers.insert(X_FORWARDED_HOST, v);
        }
        if let Ok(v) = HeaderValue::from_str(&fwd.peer.to_string()) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        if let Some(user) = fwd.user {
            // An identity that cannot be expressed as a header value is left out rather than
            // mangled; the VM then sees an anonymous request. An email nobody proved is not
            // passed on: the app would take it for the viewer's.
            if let (Ok(id), Ok(email)) = (
                HeaderValue::from_str(&user.id),
                HeaderValue::from_str(&user.email),
            ) {
                headers.insert(X_NOOK_USER_ID, id);
                if user.email_verified {
                    headers.insert(X_NOOK_USER_EMAIL, email);
                }
            }
        }
        // Origin form (`/path?query`): HTTP/2 requests arrive in absolute form.
        let origin = parts.uri.path_and_query().cloned();
        parts.uri = origin.map_or_else(|| Uri::from_static("/"), Uri::from);
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        let mut resp =
            match tokio::time::timeout(self.response_timeout, self.send(target, via, upstream_req))
                .await
            {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(result) => result?,
            };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                // The VM switched protocols though the client never asked (or asked over HTTP/2,
                // where this kind of upgrade does not exist).
                return Err(UpstreamError::UnexpectedUpgrade);
            };
            if resp
                .headers()
                .get_all(header::UPGRADE)
                .iter()
                .any(|u| !is_websocket(u))
            {
                // Only WebSockets are tunnelled, whatever the VM switches to.
                return Err(UpstreamError::UnexpectedUpgrade);
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let recheck = fwd.recheck;
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        tunnel(&mut client, &mut upstream, recheck).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            let (mut parts, body) = resp.into_parts();
            let up = strip_hop_by_hop(&mut parts.headers);
            strip_nook_set_cookies(&mut parts.headers);
            if websocket_connect {
                // HTTP/2 accepts the tunnel with a 200 and no key proof (RFC 8441).
                parts.status = StatusCode::OK;
                parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
                return Ok(Response::from_parts(parts, EdgeBody::from(Bytes::new())));
            }
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(up) = up.or_else(|| upgrade.clone()) {
                parts.headers.insert(header::UPGRADE, up);
            }
            return Ok(Response::from_parts(parts, EdgeBody::Upstream(body)));
        }
        if websocket_connect && resp.status().is_success() {
            // A success without the switch would open a tunnel to nothing.
            return Err(UpstreamError::WebSocketRefused);
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        strip_nook_set_cookies(&mut parts.headers);
        Ok(Response::from_parts(parts, EdgeBody::Upstream(body)))
    }
}

/// A VM may not set (and so overwrite or fixate) the edge's own session cookie on its host.
fn strip_nook_set_cookies(headers: &mut HeaderMap) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            !v.as_bytes()
                .trim_ascii_start()
                .starts_with(auth::NOOK_COOKIE_PREFIX.as_bytes())
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let up = strip_hop_by_hop(&mut h);
        assert_eq!(up.unwrap(), "websocket");
        assert!(h.get("x-secret").is_none() && h.get(header::TE).is_none());
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn strips_forged_identity() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-nook-user-email",
            HeaderValue::from_static("boss@example.com"),
        );
        h.insert("X-Forwarded-For", HeaderValue::from_static("1.2.3.4"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_forgeable(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn vm_cannot_set_nook_cookie() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("__Host-nook_session=x; Path=/"),
        );
        h.append(header::SET_COOKIE, HeaderValue::from_static("app=1"));
        strip_nook_set_cookies(&mut h);
        assert_eq!(h.get_all(header::SET_COOKIE).iter().count(), 1);
    }
}
