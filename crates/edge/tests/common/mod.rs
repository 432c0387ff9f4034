//! Test harness: an in-memory backend, upstream servers standing in for VMs, the edge on an
//! ephemeral port, and a wrapper around the real `curl` binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nook_edge::{
    Access, AppBody, AppRequest, BackendResult, Edge, EdgeBackend, EdgeConfig, ListenerRole,
    LocalCa, User, VmTarget,
};
use tokio::net::TcpListener;

pub const DOMAIN: &str = "nook.localhost";
/// The address upstream servers ("VMs") listen on, distinct from the edge's 127.0.0.1 so a VM
/// port and an edge listener can share a port number.
pub const VM_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

#[derive(Default)]
pub struct State {
    pub users: HashMap<String, User>,
    pub vms: HashMap<String, VmTarget>,
    pub access: HashMap<(String, String), Access>,
    pub login_tokens: HashMap<String, String>,
    pub sessions: HashMap<String, (String, String)>,
    pub machine_tokens: HashMap<String, (String, String)>,
    pub share_links: HashSet<(String, String)>,
    pub counter: u64,
}

#[derive(Default, Clone)]
pub struct MemBackend(pub Arc<Mutex<State>>);

impl MemBackend {
    pub fn add_user(&self, id: &str, email: &str) {
        self.0.lock().unwrap().users.insert(
            id.into(),
            User {
                id: id.into(),
                email: email.into(),
                email_verified: true,
            },
        );
    }
    pub fn add_vm(&self, name: &str, port: u16, public: bool) {
        let id = format!("vm-{name}");
        self.0.lock().unwrap().vms.insert(
            name.into(),
            VmTarget {
                id,
                name: name.into(),
                upstream: VM_IP,
                default_port: port,
                public,
                via: None,
            },
        );
    }
    pub fn grant(&self, user: &str, vm: &str, access: Access) {
        self.0
            .lock()
            .unwrap()
            .access
            .insert((user.into(), format!("vm-{vm}")), access);
    }
    pub fn login_token(&self, user: &str) -> String {
        let mut s = self.0.lock().unwrap();
        s.counter += 1;
        let t = format!("login{}x{}", s.counter, user);
        s.login_tokens.insert(t.clone(), user.into());
        t
    }
    pub fn machine_token(&self, user: &str, vm: &str) -> String {
        let t = format!("tok-{user}-{vm}");
        self.0
            .lock()
            .unwrap()
            .machine_tokens
            .insert(t.clone(), (format!("vm-{vm}"), user.into()));
        t
    }
    pub fn share_link(&self, vm: &str) -> String {
        let t = format!("share-{vm}");
        self.0
            .lock()
            .unwrap()
            .share_links
            .insert((format!("vm-{vm}"), t.clone()));
        t
    }
    /// A session secret made directly (as if a handoff had happened).
    pub fn session_for(&self, user: &str, host: &str) -> String {
        let mut s = self.0.lock().unwrap();
        s.counter += 1;
        let secret = format!("sess{}", s.counter);
        s.sessions
            .insert(secret.clone(), (user.into(), host.into()));
        secret
    }
    pub fn session_count(&self) -> usize {
        self.0.lock().unwrap().sessions.len()
    }
}

impl EdgeBackend for MemBackend {
    async fn vm(&self, name: &str) -> BackendResult<Option<VmTarget>> {
        Ok(self.0.lock().unwrap().vms.get(name).cloned())
    }
    async fn access(&self, user_id: &str, vm_id: &str) -> BackendResult<Access> {
        let s = self.0.lock().unwrap();
        Ok(s.access
            .get(&(user_id.to_string(), vm_id.to_string()))
            .copied()
            .unwrap_or(Access::None))
    }
    async fn redeem_login_token(&self, token: &str) -> BackendResult<Option<User>> {
        let mut s = self.0.lock().unwrap();
        let user = s.login_tokens.remove(token);
        Ok(user.and_then(|u| s.users.get(&u).cloned()))
    }
    async fn create_session(&self, user_id: &str, host: &str) -> BackendResult<String> {
        let mut s = self.0.lock().unwrap();
        s.counter += 1;
        let secret = format!("sess{}r{}", s.counter, rand_hex());
        s.sessions
            .insert(secret.clone(), (user_id.into(), host.into()));
        Ok(secret)
    }
    async fn session(&self, host: &str, secret: &str) -> BackendResult<Option<User>> {
        let s = self.0.lock().unwrap();
        Ok(match s.sessions.get(secret) {
            Some((u, h)) if h == host => s.users.get(u).cloned(),
            _ => None,
        })
    }
    async fn end_session(&self, host: &str, secret: &str) -> BackendResult<()> {
        let mut s = self.0.lock().unwrap();
        if s.sessions.get(secret).is_some_and(|(_, h)| h == host) {
            s.sessions.remove(secret);
        }
        Ok(())
    }
    async fn token_user(&self, vm_id: &str, token: &str) -> BackendResult<Option<User>> {
        let s = self.0.lock().unwrap();
        Ok(match s.machine_tokens.get(token) {
            Some((v, u)) if v == vm_id => s.users.get(u).cloned(),
            _ => None,
        })
    }
    async fn redeem_share_link(
        &self,
        vm_id: &str,
        token: &str,
        user_id: &str,
    ) -> BackendResult<bool> {
        let mut s = self.0.lock().unwrap();
        if s.share_links
            .contains(&(vm_id.to_string(), token.to_string()))
        {
            s.access
                .entry((user_id.into(), vm_id.into()))
                .or_insert(Access::Viewer);
            return Ok(true);
        }
        Ok(false)
    }
    async fn start_email_login(&self, email: &str) -> BackendResult<Option<String>> {
        let mut s = self.0.lock().unwrap();
        let Some(user) = s.users.values().find(|u| u.email == email).cloned() else {
            return Ok(None);
        };
        s.counter += 1;
        let t = format!("mail{}", s.counter);
        s.login_tokens.insert(t.clone(), user.id);
        Ok(Some(t))
    }
    /// The dashboard's app as nook-web would answer `/`: the signed-in user's VMs.
    async fn app(&self, req: Request<Incoming>, ctx: AppRequest) -> Response<AppBody> {
        let Some(user) = ctx.user else {
            let mut resp = Response::new(Full::new(Bytes::from("sign in")).boxed_unsync());
            *resp.status_mut() = hyper::StatusCode::UNAUTHORIZED;
            return resp;
        };
        // HTTP/2 carries the port in :authority, HTTP/1.1 in Host.
        let port = req
            .uri()
            .port_u16()
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
            })
            .map(|p| p.to_string())
            .unwrap_or_default();
        let s = self.0.lock().unwrap();
        let mut names: Vec<String> = s
            .vms
            .values()
            .filter(|v| {
                s.access
                    .get(&(user.id.clone(), v.id.clone()))
                    .is_some_and(|a| *a >= Access::Viewer)
            })
            .map(|v| format!("https://{}.nook.localhost:{port}/", v.name))
            .collect();
        names.sort();
        let body = format!("<h1>Your VMs</h1>{} {}", user.email, names.join(" "));
        Response::new(Full::new(Bytes::from(body)).boxed_unsync())
    }
}

fn rand_hex() -> String {
    use std::time::SystemTime;
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{n:08x}")
}

pub mod cdp;

// ---- upstream servers ----

/// An HTTP/1.1 server on VM_IP: `/sse` streams four events `SSE_EVENT_GAP` apart; everything else
/// answers a JSON dump of the request (method, path, headers).
pub async fn start_upstream() -> u16 {
    start_upstream_on(0).await.unwrap()
}

pub async fn start_upstream_on(port: u16) -> Option<u16> {
    let listener = TcpListener::bind(SocketAddr::new(VM_IP, port)).await.ok()?;
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(upstream_reply(req, port).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Some(port)
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// How long the upstream's `/sse` waits between its events.
pub const SSE_EVENT_GAP: Duration = Duration::from_secs(1);

async fn upstream_reply(req: Request<Incoming>, port: u16) -> Response<UpBody> {
    if req.uri().path() == "/sse" {
        let events = futures::stream::unfold(0u32, |i| async move {
            if i >= 4 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(SSE_EVENT_GAP).await;
            }
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: event{i}\n\n")))),
                i + 1,
            ))
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(BodyExt::boxed(StreamBody::new(events)))
            .unwrap();
    }
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(" | ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), serde_json::Value::String(v));
            }
        }
    }
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "port": port, "method": method, "path": path, "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("set-cookie", "__Host-nook_session=planted; Path=/; Secure")
        .header("set-cookie", "app=1; Path=/")
        .body(BodyExt::boxed(Full::new(Bytes::from(json.to_string()))))
        .unwrap()
}

/// Accepts connections and never answers.
pub async fn start_hanging_upstream() -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(VM_IP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    port
}

/// A port on VM_IP where nothing listens.
pub async fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind(SocketAddr::new(VM_IP, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// A WebSocket echo server.
pub async fn start_ws_upstream() -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(VM_IP, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        use futures::SinkExt;
                        if ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    port
}

// ---- the edge ----

pub struct Harness {
    pub backend: MemBackend,
    pub port: u16,
    pub ca_path: PathBuf,
    pub ca_pem: String,
    pub edge: Edge<MemBackend>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut EdgeConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("ca"), &[DOMAIN]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut config = EdgeConfig {
            domain: DOMAIN.into(),
            public_port: port,
            // Roomy, so that a loaded host's slow curl never trips them; the tests of these
            // timeouts set short ones (`SHORT_TIMEOUT`).
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            upstream_response_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        tweak(&mut config);
        let backend = MemBackend::default();
        let edge = Edge::new(config, Arc::new(backend.clone())).unwrap();
        edge.set_certificate(ca.leaf_chain_pem().as_bytes(), ca.leaf_key_pem().as_bytes())
            .unwrap();
        edge.spawn(listener, ListenerRole::Main);
        Harness {
            backend,
            port,
            ca_path: ca.ca_cert_path(),
            ca_pem: ca.ca_cert_pem().to_string(),
            edge,
            _dir: dir,
        }
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    pub fn curl(&self) -> Curl {
        Curl::new(self.port, self.ca_path.clone())
    }

    /// A rustls client that trusts the local CA.
    pub fn tls_connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    pub async fn tls_connect(
        &self,
        host: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        self.tls_connect_alpn(host, b"http/1.1").await
    }

    async fn tls_connect_alpn(
        &self,
        host: &str,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
        self.tls_connector(&[alpn])
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// An HTTP/2 client connection to `host`; the task driving it ends when the connection does.
    pub async fn h2_connect(
        &self,
        host: &str,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ) {
        let tls = self.tls_connect_alpn(host, b"h2").await;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        (send, tokio::spawn(conn))
    }
}

// ---- curl ----

pub const HOSTS: [&str; 12] = [
    "nook.localhost",
    "blog.nook.localhost",
    "other.nook.localhost",
    "pub.nook.localhost",
    "ghost.nook.localhost",
    "down.nook.localhost",
    "hang.nook.localhost",
    "ws.nook.localhost",
    "a.b.nook.localhost",
    "example.com",
    "BLOG.Nook.LocalHost",
    "ports.nook.localhost",
];

pub struct Curl {
    args: Vec<String>,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub http_version: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// A header the upstream saw, from its JSON dump.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
    /// The value of a cookie set by this reply.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers_named("set-cookie").into_iter().find_map(|c| {
            c.split(';')
                .next()?
                .trim()
                .strip_prefix(&format!("{name}="))
                .map(str::to_string)
        })
    }
}

impl Curl {
    pub fn new(port: u16, ca: PathBuf) -> Self {
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "--max-time".into(),
            "15".into(),
        ];
        for h in HOSTS {
            args.push("--resolve".into());
            args.push(format!("{h}:{port}:127.0.0.1"));
        }
        Curl { args }
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn into_args(self) -> Vec<String> {
        self.args
    }
    pub fn header(self, h: &str) -> Self {
        self.arg("-H").arg(h)
    }
    pub fn html(self) -> Self {
        self.header("Accept: text/html,application/xhtml+xml")
    }
    pub fn session(self, secret: &str) -> Self {
        self.header(&format!("Cookie: __Host-nook_session={secret}"))
    }
    pub fn jar(self, path: &std::path::Path) -> Self {
        let p = path.display().to_string();
        self.arg("-b").arg(p.clone()).arg("-c").arg(p)
    }

    pub async fn get(self, url: &str) -> Reply {
        let out = self.run_raw(url).await;
        parse_reply(&out)
    }

    pub async fn run_raw(self, url: &str) -> std::process::Output {
        let mut args = self.args;
        args.extend([
            "-i".into(),
            "-w".into(),
            "\n%{http_version}".into(),
            url.into(),
        ]);
        tokio::process::Command::new("curl")
            .args(&args)
            .output()
            .await
            .unwrap()
    }
}

fn parse_reply(out: &std::process::Output) -> Reply {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("HTTP/"),
        "curl failed: status {:?} stderr {} stdout {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        text
    );
    // The last line is the -w output.
    let (text, version) = text.rsplit_once('\n').unwrap();
    let (mut head, mut body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    // With -L, every hop's head precedes the final body: keep the last one.
    while body.starts_with("HTTP/") {
        (head, body) = body.split_once("\r\n\r\n").unwrap_or((body, ""));
    }
    let mut lines = head.lines();
    let status_line = lines.next().unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
        http_version: version.trim().to_string(),
    }
}

// ---- forms ----

/// The hidden and named inputs of the first form in an edge page, unescaped.
pub fn form_fields(html: &str) -> Vec<(String, String)> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    let attr = |tag: &str, name: &str| {
        let key = format!("{name}=\"");
        let start = tag.find(&key)? + key.len();
        let end = tag[start..].find('"')? + start;
        Some(unescape(&tag[start..end]))
    };
    let form = html.split("<form").nth(1).unwrap_or("");
    let form = form.split("</form>").next().unwrap_or("");
    form.split("<input")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next()?;
            Some((attr(tag, "name")?, attr(tag, "value").unwrap_or_default()))
        })
        .collect()
}

impl Harness {
    /// Presses the sign-in button of a login-link page, as the browser holding `jar` would:
    /// a POST of the form's fields from the dashboard's own origin. `follow` follows the
    /// redirects that come after (to the VM, say).
    pub async fn press_sign_in(&self, jar: &std::path::Path, page: &Reply, follow: bool) -> Reply {
        assert_eq!(page.status, 200, "not a login page: {page:?}");
        let fields = form_fields(&page.body);
        assert!(
            fields.iter().any(|(k, _)| k == "token"),
            "no sign-in form: {}",
            page.body
        );
        let mut c = self
            .curl()
            .jar(jar)
            .header(&format!("Origin: https://{DOMAIN}:{}", self.port));
        for (k, v) in fields {
            c = c.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        if follow {
            // A browser follows a 302 after a POST with a GET.
            c = c.arg("-L");
        }
        c.get(&self.url(DOMAIN, "/__nook/login")).await
    }
}
