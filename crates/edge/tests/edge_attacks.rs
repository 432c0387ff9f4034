//! Attacks by hostile tenants and visitors on the edge, each driven with a real client (curl,
//! or rustls/hyper for what curl cannot send) against the real edge and a real upstream. Each
//! test is named after the attack it shows failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use nook_edge::{Access, VmTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Sends one raw HTTP/1.1 request over TLS and returns what came back within a few seconds
/// (the head, and whatever followed it).
async fn raw_exchange(h: &Harness, host: &str, request: &str) -> String {
    let mut tls = h.tls_connect(host).await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An upstream that agrees to any protocol upgrade (answering 101 with the protocol asked
/// for, or `switch_to` when set) and counts the requests it sees.
async fn start_any_upgrade_upstream(switch_to: Option<&'static str>) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(VM_IP, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let asked = text
                    .lines()
                    .find_map(|l| l.strip_prefix("upgrade:"))
                    .map(|p| p.trim().to_string());
                let Some(asked) = asked else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    return;
                };
                let proto = switch_to.map(str::to_string).unwrap_or(asked);
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {proto}\r\n\r\nTUNNEL-OPEN"
                );
                let _ = s.write_all(reply.as_bytes()).await;
                // Echo whatever comes through the tunnel.
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Django, Rack and PHP read `x_nook_user_email` as `HTTP_X_NOOK_USER_EMAIL`, the identity nook
/// vouches for: no header with an underscore may reach a VM, over HTTP/1.1 or HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_underscore_header_forges_identity() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.add_vm("pub", up, true);
    h.backend.grant("u1", "blog", Access::Viewer);
    let s = h.backend.session_for("u1", "blog.nook.localhost");
    let forged = [
        "x_nook_user_email: evil@x",
        "X_Nook_User_Id: admin",
        "x-nook_user-email: evil@x",
        "x_forwarded_for: 6.6.6.6",
        "remote_user: admin",
        "X-Keep-Me: 1",
    ];
    for proto in ["--http1.1", "--http2"] {
        for (host, session) in [
            ("blog.nook.localhost", Some(s.as_str())),
            ("pub.nook.localhost", None),
        ] {
            let mut c = h.curl().arg(proto);
            if let Some(s) = session {
                c = c.session(s);
            }
            for f in forged {
                c = c.header(f);
            }
            let r = c.get(&h.url(host, "/")).await;
            assert_eq!(r.status, 200, "{proto} {host}: {r:?}");
            let j = r.json();
            let seen: Vec<&String> = j["headers"].as_object().unwrap().keys().collect();
            assert!(
                seen.iter().all(|k| !k.contains('_')),
                "{proto} {host}: an underscore header reached the VM: {seen:?}"
            );
            assert_eq!(j["headers"]["x-keep-me"], "1", "{proto} {host}");
            let email = j["headers"]["x-nook-user-email"].as_str();
            match session {
                Some(_) => assert_eq!(email, Some("ann@example.com"), "{proto}"),
                None => assert_eq!(email, None, "{proto}"),
            }
        }
    }
}

/// An `Upgrade` to anything but a WebSocket (h2c, or a VM's own protocol) would open a raw
/// tunnel past every check the edge makes on requests: refused with a clear 400, and the VM
/// never sees it. A VM that answers a WebSocket request by switching to something else gets
/// no tunnel either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_non_websocket_upgrade_tunnels_past_the_edge() {
    let h = Harness::start().await;
    let (up, seen) = start_any_upgrade_upstream(None).await;
    h.backend.add_vm("pub", up, true);
    for proto in ["h2c", "TLS/1.2", "foo, websocket", "websocketx"] {
        let r = raw_exchange(
            &h,
            "pub.nook.localhost",
            &format!(
                "GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 400"), "{proto}: {r}");
        assert!(r.contains("WebSocket upgrades only"), "{proto}: {r}");
        assert!(!r.contains("TUNNEL-OPEN"), "{proto}: {r}");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a refused upgrade reached the VM"
    );

    // A WebSocket is still tunnelled (this upstream echoes).
    let r = raw_exchange(
        &h,
        "pub.nook.localhost",
        "GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");

    // Asked for a WebSocket, the VM switches to something else: no tunnel.
    let (up2, _) = start_any_upgrade_upstream(Some("h2c")).await;
    h.backend.add_vm("other", up2, true);
    let r = raw_exchange(
        &h,
        "other.nook.localhost",
        "GET / HTTP/1.1\r\nHost: other.nook.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(!r.contains("TUNNEL-OPEN"), "{r}");
}

/// A page on a sibling host (another tenant's VM: same site, so the browser sends the
/// SameSite=Lax cookie) POSTs to, or opens a WebSocket on, a VM as its signed-in visitor.
/// Cookie-authenticated requests that change state, and every cookie-authenticated upgrade,
/// need `Origin` of the host itself or `Sec-Fetch-Site: same-origin|none`. Token requests
/// (which no browser sends by itself) and safe methods are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_cross_site_request_rides_the_visitors_cookie() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    let s = h.backend.session_for("u1", "blog.nook.localhost");
    let tok = h.backend.machine_token("u1", "blog");
    let own = format!("Origin: https://blog.nook.localhost:{}", h.port);
    let sibling = format!("Origin: https://evil.nook.localhost:{}", h.port);
    let other_port = "Origin: https://blog.nook.localhost:3000".to_string();
    let url = h.url("blog.nook.localhost", "/transfer");

    let post = |headers: Vec<String>, cookie: bool| {
        let mut c = h.curl().arg("-d").arg("amount=100");
        if cookie {
            c = c.session(&s);
        }
        for hd in headers {
            c = c.header(&hd);
        }
        c
    };
    // Refused: another origin, a mismatched port, no proof at all, a same-site fetch.
    for headers in [
        vec![sibling.clone()],
        vec![other_port.clone()],
        vec![],
        vec!["Origin: null".into()],
        vec![sibling.clone(), "Sec-Fetch-Site: same-site".into()],
        vec!["Sec-Fetch-Site: cross-site".into()],
    ] {
        let r = post(headers.clone(), true).get(&url).await;
        assert_eq!(r.status, 403, "{headers:?}: {r:?}");
        assert!(r.body.contains("Cross-site request refused"), "{}", r.body);
        assert!(
            r.header("content-type").unwrap().starts_with("text/html"),
            "the VM answered: {r:?}"
        );
    }
    // Accepted: from the host itself, or as the browser says so.
    for headers in [
        vec![own.clone()],
        vec!["Sec-Fetch-Site: same-origin".into()],
        vec!["Sec-Fetch-Site: none".into()],
    ] {
        let r = post(headers.clone(), true).get(&url).await;
        assert_eq!(r.status, 200, "{headers:?}: {r:?}");
        assert_eq!(r.json()["method"], "POST");
    }
    // Other state-changing methods too; safe ones pass from anywhere.
    for (method, want) in [("PUT", 403), ("DELETE", 403), ("PATCH", 403), ("GET", 200)] {
        let r = h
            .curl()
            .session(&s)
            .header(&sibling)
            .arg("-X")
            .arg(method)
            .get(&url)
            .await;
        assert_eq!(r.status, want, "{method}");
    }
    // A token is not a cookie: no Origin needed.
    let r = h
        .curl()
        .header(&format!("Authorization: Bearer {tok}"))
        .header(&sibling)
        .arg("-d")
        .arg("x=1")
        .get(&url)
        .await;
    assert_eq!(r.status, 200, "{r:?}");

    // WebSockets, HTTP/1.1: a cookie-authenticated upgrade needs the host's Origin.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_port = start_ws_upstream().await;
    h.backend.add_vm("ws", ws_port, false);
    h.backend.grant("u1", "ws", Access::Owner);
    let ws_s = h.backend.session_for("u1", "ws.nook.localhost");
    let ws_req = |origin: Option<String>| {
        let mut req = format!("wss://ws.nook.localhost:{}/socket", h.port)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "cookie",
            format!("__Host-nook_session={ws_s}").parse().unwrap(),
        );
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        req
    };
    for origin in [
        None,
        Some(format!("https://evil.nook.localhost:{}", h.port)),
    ] {
        let tls = h.tls_connect("ws.nook.localhost").await;
        match tokio_tungstenite::client_async(ws_req(origin.clone()), tls).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403, "{origin:?}")
            }
            other => panic!("{origin:?}: the upgrade was not refused: {other:?}"),
        }
    }
    let tls = h.tls_connect("ws.nook.localhost").await;
    let (_ws, resp) = tokio_tungstenite::client_async(
        ws_req(Some(format!("https://ws.nook.localhost:{}", h.port))),
        tls,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);

    // WebSockets over HTTP/2 (extended CONNECT) likewise.
    let (mut send, _driver) = h.h2_connect("ws.nook.localhost").await;
    send.ready().await.unwrap();
    let warm = hyper::Request::get(format!("https://ws.nook.localhost:{}/", h.port))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let _ = send.send_request(warm).await.unwrap();
    let connect = |origin: Option<String>| {
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(format!("https://ws.nook.localhost:{}/socket", h.port))
            .header("sec-websocket-version", "13")
            .header("cookie", format!("__Host-nook_session={ws_s}"));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let mut req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    let r = send
        .send_request(connect(Some(format!(
            "https://evil.nook.localhost:{}",
            h.port
        ))))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = send
        .send_request(connect(Some(format!(
            "https://ws.nook.localhost:{}",
            h.port
        ))))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The dashboard's POSTs (sign in, sign out, email) likewise.
    let r = h
        .curl()
        .header(&sibling)
        .arg("-d")
        .arg("token=x")
        .get(&h.url("nook.localhost", "/__nook/login"))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
}

/// Any VM owner could learn the email of everyone who opens their public VM while signed in
/// to it. Let in only because the VM is public, a visitor is anonymous to the app; with a
/// role (here a share), the app is told who it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_public_vm_collects_visitor_identities() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u3", "cat@example.com");
    h.backend.add_vm("pub", up, true);
    let s = h.backend.session_for("u3", "pub.nook.localhost");
    let tok = h.backend.machine_token("u3", "pub");
    for auth in [
        format!("Cookie: __Host-nook_session={s}"),
        format!("Authorization: Bearer {tok}"),
    ] {
        let r = h
            .curl()
            .header(&auth)
            .get(&h.url("pub.nook.localhost", "/"))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.upstream_header("x-nook-user-email").is_none()
                && r.upstream_header("x-nook-user-id").is_none(),
            "{auth}: {r:?}"
        );
    }
    h.backend.grant("u3", "pub", Access::Viewer);
    let r = h
        .curl()
        .session(&s)
        .get(&h.url("pub.nook.localhost", "/"))
        .await;
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("cat@example.com")
    );
}

/// The dashboard must not be framed (clickjacking its sign-in button), sniffed, downgraded
/// to plain HTTP, or leak its URLs (which may hold a login token) in a Referer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_dashboard_is_framed_or_downgraded() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    for path in [
        "/",
        "/__nook/login?token=nope",
        "/nothing-here",
        "/__nook/logout",
    ] {
        for proto in ["--http1.1", "--http2"] {
            let r = h
                .curl()
                .arg(proto)
                .get(&h.url("nook.localhost", path))
                .await;
            let hsts = r.header("strict-transport-security").unwrap_or_default();
            assert!(hsts.starts_with("max-age="), "{path}: {r:?}");
            let max_age: u64 = hsts["max-age=".len()..]
                .split(';')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(max_age >= 180 * 24 * 3600, "{hsts}");
            assert!(
                r.header("content-security-policy")
                    .is_some_and(|c| c.contains("frame-ancestors 'none'")),
                "{path}: {r:?}"
            );
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            assert!(
                matches!(
                    r.header("referrer-policy"),
                    Some("no-referrer" | "same-origin")
                ),
                "{path}: {r:?}"
            );
        }
    }
    // A VM's own answers are the app's business.
    let r = h.curl().get(&h.url("pub.nook.localhost", "/")).await;
    assert!(r.header("strict-transport-security").is_none(), "{r:?}");
    assert!(r.header("content-security-policy").is_none(), "{r:?}");
}

/// A renamed VM's old name, registered by someone else, receives the requests its scripts
/// still send, with their nook tokens: the new owner's app could replay them. A `nook_`
/// token never reaches a VM, valid for it or not; nook's cookies never do either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_renamed_vm_name_harvests_tokens() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_user("u2", "mallory@example.com");
    let token = "nook_0123456789abcdef0123456789abcdef";
    {
        let mut st = h.backend.0.lock().unwrap();
        // Ann's token was made for her VM (id vm-old), then called "blog".
        st.machine_tokens
            .insert(token.into(), ("vm-old".into(), "u1".into()));
        // Now "blog" is Mallory's public VM.
        st.vms.insert(
            "blog".into(),
            VmTarget {
                id: "vm-new".into(),
                name: "blog".into(),
                upstream: VM_IP,
                default_port: up,
                public: true,
                via: None,
            },
        );
        st.access
            .insert(("u2".into(), "vm-new".into()), Access::Owner);
    }
    for args in [
        vec!["-H".to_string(), format!("Authorization: Bearer {token}")],
        vec!["-u".to_string(), format!("git:{token}")],
        vec![
            "-H".to_string(),
            format!("Authorization: bearer   {token}  "),
        ],
    ] {
        let mut c = h.curl();
        for a in &args {
            c = c.arg(a.as_str());
        }
        let r = c.get(&h.url("blog.nook.localhost", "/")).await;
        assert_eq!(r.status, 200, "{args:?}: {r:?}");
        assert!(
            r.upstream_header("authorization").is_none(),
            "{args:?}: a nook token reached another VM: {r:?}"
        );
        assert!(r.upstream_header("x-nook-user-id").is_none(), "{r:?}");
    }
    // nook's cookies never reach the VM, whoever sends them.
    let m = h.backend.session_for("u2", "blog.nook.localhost");
    let r = h
        .curl()
        .header(&format!(
            "Cookie: a=1; __Host-nook_session={m}; __Host-nook_next=x; __Host-nook_s0=1"
        ))
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.upstream_header("cookie").as_deref(), Some("a=1"));
    // An app's own credentials still pass.
    let r = h
        .curl()
        .header("Authorization: Bearer app-secret")
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(
        r.upstream_header("authorization").as_deref(),
        Some("Bearer app-secret")
    );
}

/// Login CSRF: Mallory sends Ann (signed out) her own login link; opening it must not sign
/// Ann's browser in to Mallory's account. A signed-out browser gets a page with a button that
/// POSTs the token back (from the dashboard's own origin only), and nothing is used up before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_login_link_signs_in_a_signed_out_browser() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u2", "mallory@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u2", "blog", Access::Owner);
    let token = h.backend.login_token("u2");
    let link = h.url("nook.localhost", &format!("/__nook/login?token={token}"));

    // Opened (even followed through redirects) in a signed-out browser: a question, no cookie.
    let ann = tempfile::NamedTempFile::new().unwrap();
    let r = h.curl().html().jar(ann.path()).arg("-L").get(&link).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.set_cookie("__Host-nook_session").is_none(), "{r:?}");
    assert!(
        r.body.contains("method=\"post\"") && r.body.contains("action=\"/__nook/login\""),
        "{}",
        r.body
    );
    assert!(r.body.contains("If someone sent it to you"), "{}", r.body);
    let dash = h
        .curl()
        .jar(ann.path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert!(dash.body.contains("Sign in to nook"), "{}", dash.body);

    // Another site cannot press the button for her.
    let sibling = format!("Origin: https://blog.nook.localhost:{}", h.port);
    for origin in [Some(sibling.as_str()), None] {
        let mut c = h
            .curl()
            .jar(ann.path())
            .arg("--data-urlencode")
            .arg(format!("token={token}"));
        if let Some(o) = origin {
            c = c.header(o);
        }
        let r = c.get(&h.url("nook.localhost", "/__nook/login")).await;
        assert_eq!(r.status, 403, "{origin:?}: {r:?}");
        assert!(r.set_cookie("__Host-nook_session").is_none());
    }

    // Her own click (a same-origin POST) signs in, and the link was not used up before.
    let r = h
        .curl()
        .jar(ann.path())
        .header(&format!("Origin: https://nook.localhost:{}", h.port))
        .arg("--data-urlencode")
        .arg(format!("token={token}"))
        .get(&h.url("nook.localhost", "/__nook/login"))
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(r.set_cookie("__Host-nook_session").is_some(), "{r:?}");
    let dash = h
        .curl()
        .jar(ann.path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert!(dash.body.contains("mallory@example.com"), "{}", dash.body);

    // A signed-in browser uses a link for its own account at once, as before.
    let again = h.backend.login_token("u2");
    let r = h
        .curl()
        .jar(ann.path())
        .get(&h.url(
            "nook.localhost",
            &format!(
                "/__nook/login?token={again}&next={}",
                enc(&h.url("blog.nook.localhost", "/"))
            ),
        ))
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(
        r.header("location")
            .unwrap()
            .contains("/__nook/handoff?code="),
        "{r:?}"
    );
}

/// Opens an authenticated WebSocket to `ws.nook.localhost` with session `s`.
async fn open_websocket(
    h: &Harness,
    s: &str,
) -> tokio_tungstenite::WebSocketStream<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = h.tls_connect("ws.nook.localhost").await;
    let mut req = format!("wss://ws.nook.localhost:{}/socket", h.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "cookie",
        format!("__Host-nook_session={s}").parse().unwrap(),
    );
    req.headers_mut().insert(
        "origin",
        format!("https://ws.nook.localhost:{}", h.port)
            .parse()
            .unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// True when the socket still echoes; false once the edge has closed it.
async fn echoes<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    if ws.send(Message::text("ping?")).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "ping?"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_revoked_viewer_keeps_an_open_websocket() {
    let h = Harness::start().await;
    let ws_port = start_ws_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("ws", ws_port, false);
    h.backend.grant("u1", "ws", Access::Viewer);
    let s = h.backend.session_for("u1", "ws.nook.localhost");
    let mut revoked = open_websocket(&h, &s).await;
    assert!(echoes(&mut revoked).await);

    // The share is revoked while the socket is open: the edge closes it within seconds.
    h.backend.grant("u1", "ws", Access::None);
    let mut closed = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !echoes(&mut revoked).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a WebSocket outlived the share that opened it");
    // A socket whose access holds outlives several checks.
    h.backend.grant("u1", "ws", Access::Viewer);
    let mut fresh = open_websocket(&h, &s).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        echoes(&mut fresh).await,
        "a WebSocket with access was closed"
    );
}

/// A silent handoff: Mallory lures Ann, signed in to the dashboard, to
/// `/__nook/login?next=https://pub.DOMAIN/` for her public VM. Ann has no role there, so she
/// gets a question naming the site instead of a session on Mallory's host; only her own click
/// (a same-origin POST) hands her on, and another site cannot press it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_lure_to_a_public_vm_asks_before_the_handoff() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_user("u2", "mallory@example.com");
    h.backend.add_vm("pub", up, true);
    h.backend.grant("u2", "pub", Access::Owner);
    h.backend.add_vm("mine", up, false);
    h.backend.grant("u1", "mine", Access::Owner);
    let ann = h.backend.session_for("u1", "nook.localhost");
    let lure = |vm: &str| {
        h.url(
            "nook.localhost",
            &format!(
                "/__nook/login?next={}",
                enc(&h.url(&format!("{vm}.nook.localhost"), "/"))
            ),
        )
    };

    let r = h.curl().html().session(&ann).get(&lure("pub")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("location").is_none(), "{r:?}");
    assert!(
        r.body.contains("Continue to pub.nook.localhost?"),
        "{}",
        r.body
    );
    assert!(r.body.contains("action=\"/__nook/continue\""), "{}", r.body);
    let next = h.url("pub.nook.localhost", "/");

    // Another site (Mallory's VM itself) cannot press the button.
    let r = h
        .curl()
        .session(&ann)
        .header(&format!("Origin: https://pub.nook.localhost:{}", h.port))
        .arg("--data-urlencode")
        .arg(format!("next={next}"))
        .get(&h.url("nook.localhost", "/__nook/continue"))
        .await;
    assert_eq!(r.status, 403, "{r:?}");

    // Ann's own click hands her on.
    let r = h
        .curl()
        .session(&ann)
        .header(&format!("Origin: https://nook.localhost:{}", h.port))
        .arg("--data-urlencode")
        .arg(format!("next={next}"))
        .get(&h.url("nook.localhost", "/__nook/continue"))
        .await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(
        r.header("location").unwrap().contains("pub.nook.localhost")
            && r.header("location")
                .unwrap()
                .contains("/__nook/handoff?code="),
        "{r:?}"
    );

    // Her own VM needs no click; nor does a private VM she has no role on, which must answer
    // exactly as a missing one does (after the handoff), not with a question that names it.
    h.backend.add_vm("secret", up, false);
    h.backend.grant("u2", "secret", Access::Owner);
    for vm in ["mine", "secret", "nosuchvm"] {
        let r = h.curl().session(&ann).get(&lure(vm)).await;
        assert_eq!(r.status, 302, "{vm}: {r:?}");
        assert!(
            r.header("location")
                .unwrap()
                .contains("/__nook/handoff?code="),
            "{vm}: {r:?}"
        );
    }
}
