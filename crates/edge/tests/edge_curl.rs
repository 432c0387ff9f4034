//! The edge in front of real upstream servers, driven by the real `curl` binary over TLS with
//! the local CA.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nook_edge::Access;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Follows the login flow step by step: anonymous visit, login page, login link, handoff, VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_visitor_logs_in_with_link_and_returns_to_vm() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    let jar = tempfile::NamedTempFile::new().unwrap();

    // 1. Anonymous browser: sent to the dashboard's login, with the page to come back to.
    let r = h
        .curl()
        .html()
        .jar(jar.path())
        .get(&h.url("blog.nook.localhost", "/post?id=7"))
        .await;
    assert_eq!(r.status, 302);
    let want = format!(
        "https://nook.localhost:{}/__nook/login?next={}&state=",
        h.port,
        enc(&format!("https://blog.nook.localhost:{}/post?id=7", h.port))
    );
    let location = r.header("location").unwrap();
    assert!(location.starts_with(&want), "{location}");
    // The browser is marked with the sign-in's state, which the handoff will ask for.
    let state = &location[want.len()..];
    assert_eq!(state.len(), 32, "{location}");
    assert!(
        r.set_cookie(&format!("__Host-nook_s{state}")).is_some(),
        "{r:?}"
    );
    let want = location.to_string();
    // Non-browser clients get a 401 with a basic-auth challenge instead.
    let r = h.curl().get(&h.url("blog.nook.localhost", "/")).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));

    // 2. The login page says how to log in and remembers where to go.
    let r = h.curl().html().jar(jar.path()).get(&want).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("ssh -p 2222 nook.localhost browser"),
        "{}",
        r.body
    );
    assert!(r.set_cookie("__Host-nook_next").is_some());
    let next_cookie = r.headers_named("set-cookie").join("\n");
    assert!(
        next_cookie.contains("Secure")
            && next_cookie.contains("HttpOnly")
            && !next_cookie.to_lowercase().contains("domain=")
    );

    // 3. The login link (from `ssh HOST browser`) opened in the same browser, which is not
    // signed in yet: it asks for a click first.
    let token = h.backend.login_token("u1");
    let page = h
        .curl()
        .jar(jar.path())
        .get(&h.url("nook.localhost", &format!("/__nook/login?token={token}")))
        .await;
    assert!(page.set_cookie("__Host-nook_session").is_none(), "{page:?}");
    let r = h.press_sign_in(jar.path(), &page, false).await;
    assert_eq!(r.status, 302, "{r:?}");
    let dash_cookie = r
        .headers_named("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("__Host-nook_session="))
        .unwrap();
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(dash_cookie.contains(attr), "{dash_cookie}");
    }
    assert!(
        !dash_cookie.to_lowercase().contains("domain"),
        "{dash_cookie}"
    );
    let handoff = r.header("location").unwrap().to_string();
    assert!(
        handoff.starts_with(&format!(
            "https://blog.nook.localhost:{}/__nook/handoff?code=",
            h.port
        )),
        "{handoff}"
    );
    // The link works once.
    let fresh = tempfile::NamedTempFile::new().unwrap();
    let again = h.press_sign_in(fresh.path(), &page, false).await;
    assert_eq!(again.status, 400);

    // 4. The handoff sets the VM host's own cookie and returns to the original page.
    let r = h.curl().jar(jar.path()).get(&handoff).await;
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(r.header("location"), Some("/post?id=7"));
    let vm_secret = r.set_cookie("__Host-nook_session").unwrap();
    // A handoff code is single use.
    let r2 = h.curl().get(&handoff).await;
    assert_eq!(r2.status, 400);

    // 5. The VM page, with identity headers.
    let r = h
        .curl()
        .jar(jar.path())
        .get(&h.url("blog.nook.localhost", "/post?id=7"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/post?id=7");
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("ann@example.com")
    );
    assert_eq!(r.upstream_header("x-nook-user-id").as_deref(), Some("u1"));
    // The VM never sees nook's cookie, and cannot plant one.
    assert!(
        r.upstream_header("cookie")
            .is_none_or(|c| !c.contains("nook"))
    );
    assert_eq!(r.headers_named("set-cookie"), vec!["app=1; Path=/"]);

    // The same flow in one go, as a browser following redirects (curl -L with a fresh jar).
    let jar2 = tempfile::NamedTempFile::new().unwrap();
    let r = h
        .curl()
        .html()
        .jar(jar2.path())
        .get(&h.url("blog.nook.localhost", "/x"))
        .await;
    let login = r.header("location").unwrap();
    let _ = h.curl().html().jar(jar2.path()).get(login).await;
    let token = h.backend.login_token("u1");
    let page = h
        .curl()
        .jar(jar2.path())
        .arg("-L")
        .get(&h.url("nook.localhost", &format!("/__nook/login?token={token}")))
        .await;
    let r = h.press_sign_in(jar2.path(), &page, true).await;
    assert!(r.body.contains("ann@example.com"), "{r:?}");

    // The dashboard lists the user's VMs.
    let dash = h
        .curl()
        .jar(jar.path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert_eq!(dash.status, 200);
    assert!(
        dash.body.contains("Your VMs")
            && dash
                .body
                .contains(&format!("https://blog.nook.localhost:{}/", h.port))
    );

    // Logout on the VM host ends that session and sends the browser on to the dashboard's.
    let r = h
        .curl()
        .jar(jar.path())
        .get(&h.url("blog.nook.localhost", "/__nook/logout"))
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://nook.localhost:{}/__nook/logout", h.port)
    );
    let r = h
        .curl()
        .session(&vm_secret)
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 401, "the old cookie must not work after logout");
    let r = h
        .curl()
        .jar(jar.path())
        .get(&h.url("nook.localhost", "/__nook/logout"))
        .await;
    assert_eq!(r.status, 302);
    let r = h
        .curl()
        .jar(jar.path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert!(r.body.contains("Sign in"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_forwarding_headers_cannot_be_forged() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.add_vm("pub", up, true);
    h.backend.grant("u1", "blog", Access::Viewer);
    let s = h.backend.session_for("u1", "blog.nook.localhost");
    let forged = [
        "X-Nook-User-Email: boss@example.com",
        "X-Nook-User-Id: admin",
        "X-Nook-Anything: 1",
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: evil.com",
        "Forwarded: for=6.6.6.6",
        "Connection: close, X-Drop-Me",
        "X-Drop-Me: 1",
        "Cookie: theme=dark",
    ];
    // HTTP/1.1, where Connection is a real header (curl drops it over HTTP/2).
    let mut c = h.curl().session(&s).arg("--http1.1");
    for f in forged {
        c = c.header(f);
    }
    let r = c.get(&h.url("blog.nook.localhost", "/")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    let hd = &j["headers"];
    assert_eq!(hd["x-nook-user-email"], "ann@example.com");
    assert_eq!(hd["x-nook-user-id"], "u1");
    assert!(hd.get("x-nook-anything").is_none());
    assert_eq!(hd["x-forwarded-for"], "127.0.0.1");
    assert_eq!(hd["x-forwarded-proto"], "https");
    assert_eq!(
        hd["x-forwarded-host"],
        format!("blog.nook.localhost:{}", h.port)
    );
    assert!(hd.get("forwarded").is_none());
    assert!(
        hd.get("x-drop-me").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    // Cookies of the app pass; nook's session cookie does not, wherever it sits.
    let cookie = hd["cookie"].as_str().unwrap();
    assert!(
        cookie.contains("theme=dark") && !cookie.contains("nook"),
        "{cookie}"
    );

    // Anonymous on a public VM: forged identity is dropped and none is added.
    let mut c = h.curl();
    for f in forged {
        c = c.header(f);
    }
    let r = c.get(&h.url("pub.nook.localhost", "/")).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert!(
        j["headers"].get("x-nook-user-email").is_none()
            && j["headers"].get("x-nook-user-id").is_none()
    );
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_cookie_works_only_on_its_own_host() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.add_vm("other", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    h.backend.grant("u1", "other", Access::Owner);
    let blog = h.backend.session_for("u1", "blog.nook.localhost");

    let r = h
        .curl()
        .session(&blog)
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 200);
    // VM A's cookie replayed on VM B (the user even has access there): refused.
    let r = h
        .curl()
        .session(&blog)
        .html()
        .get(&h.url("other.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 302);
    assert!(
        r.header("location")
            .unwrap()
            .contains("/__nook/login?next=")
    );
    let r = h
        .curl()
        .session(&blog)
        .get(&h.url("other.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 401);
    // ... and on the dashboard host.
    let r = h
        .curl()
        .session(&blog)
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Sign in") && !r.body.contains("Your VMs"));
    // The dashboard's cookie does not open a VM either.
    let dash = h.backend.session_for("u1", "nook.localhost");
    let r = h
        .curl()
        .session(&dash)
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 401);
    // A handoff code for VM A cannot be used on VM B.
    let jar = tempfile::NamedTempFile::new().unwrap();
    let r = h
        .curl()
        .session(&dash)
        .get(&h.url(
            "nook.localhost",
            &format!(
                "/__nook/login?next={}",
                enc(&h.url("blog.nook.localhost", "/"))
            ),
        ))
        .await;
    let loc = r
        .header("location")
        .unwrap()
        .replace("blog.nook.localhost", "other.nook.localhost");
    let r = h.curl().jar(jar.path()).get(&loc).await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_access_takes_effect_on_the_next_request() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u2", "bob@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u2", "blog", Access::Viewer);
    let s = h.backend.session_for("u2", "blog.nook.localhost");
    let tok = h.backend.machine_token("u2", "blog");
    assert_eq!(
        h.curl()
            .session(&s)
            .get(&h.url("blog.nook.localhost", "/"))
            .await
            .status,
        200
    );
    assert_eq!(
        h.curl()
            .header(&format!("Authorization: Bearer {tok}"))
            .get(&h.url("blog.nook.localhost", "/"))
            .await
            .status,
        200
    );
    h.backend.grant("u2", "blog", Access::None);
    let r = h
        .curl()
        .session(&s)
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        h.curl()
            .header(&format!("Authorization: Bearer {tok}"))
            .get(&h.url("blog.nook.localhost", "/"))
            .await
            .status,
        404
    );
    // Signed in without access looks exactly like a VM that does not exist.
    let ghost_s = h.backend.session_for("u2", "ghost.nook.localhost");
    let ghost = h
        .curl()
        .session(&ghost_s)
        .get(&h.url("ghost.nook.localhost", "/"))
        .await;
    assert_eq!(ghost.status, 404);
    assert_eq!(ghost.body.replace("ghost", "blog"), r.body);
    // Anonymous visitors cannot tell them apart either.
    let a = h
        .curl()
        .html()
        .get(&h.url("ghost.nook.localhost", "/"))
        .await;
    let b = h
        .curl()
        .html()
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!((a.status, b.status), (302, 302));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_vm_is_open_and_identifies_viewers_with_a_role() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u3", "cat@example.com");
    h.backend.add_vm("pub", up, true);
    let r = h
        .curl()
        .html()
        .get(&h.url("pub.nook.localhost", "/hello"))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.upstream_header("x-nook-user-id").is_none());
    // Signed in but without a role: still anonymous to the app (see edge_attacks.rs).
    let s = h.backend.session_for("u3", "pub.nook.localhost");
    let r = h
        .curl()
        .session(&s)
        .get(&h.url("pub.nook.localhost", "/hello"))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.upstream_header("x-nook-user-email").is_none(), "{r:?}");
    h.backend.grant("u3", "pub", Access::Viewer);
    let r = h
        .curl()
        .session(&s)
        .get(&h.url("pub.nook.localhost", "/hello"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("cat@example.com")
    );
    // An app's own Authorization passes through on a public VM when it is not a nook token.
    let r = h
        .curl()
        .header("Authorization: Bearer app-secret")
        .get(&h.url("pub.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("authorization").as_deref(),
        Some("Bearer app-secret")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_tokens_as_bearer_or_basic_password() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.add_vm("other", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    h.backend.grant("u1", "other", Access::Owner);
    let tok = h.backend.machine_token("u1", "blog");

    let r = h
        .curl()
        .header(&format!("Authorization: Bearer {tok}"))
        .get(&h.url("blog.nook.localhost", "/repo.git/info/refs"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.upstream_header("x-nook-user-id").as_deref(), Some("u1"));
    assert!(
        r.upstream_header("authorization").is_none(),
        "the token must not reach the VM"
    );

    // As git sends it: any user name, the token as password.
    let r = h
        .curl()
        .arg("-u")
        .arg(format!("git:{tok}"))
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("ann@example.com")
    );
    assert!(r.upstream_header("authorization").is_none());

    // Wrong token, or a token for another VM: 401 with a challenge, even for browsers.
    for (auth, host) in [
        ("Bearer nope".to_string(), "blog.nook.localhost"),
        (format!("Bearer {tok}"), "other.nook.localhost"),
    ] {
        let r = h
            .curl()
            .html()
            .header(&format!("Authorization: {auth}"))
            .get(&h.url(host, "/"))
            .await;
        assert_eq!(r.status, 401, "{auth} on {host}");
        assert!(r.header("www-authenticate").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_matched_carefully() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("blog", up, true);
    // Unknown domains and deeper names get a clear page.
    for host in ["example.com", "a.b.nook.localhost"] {
        let r = h
            .curl()
            .header(&format!("Host: {host}"))
            .arg("--http1.1")
            .get(&h.url("nook.localhost", "/"))
            .await;
        assert_eq!(r.status, 421, "{host}");
        assert!(r.body.contains("Unknown host"));
    }
    // Mixed case works.
    let r = h.curl().get(&h.url("BLOG.Nook.LocalHost", "/")).await;
    assert_eq!(r.status, 200);
    // Host header variants sent on the same connection target.
    for (host, status) in [
        ("blog.nook.localhost".to_string(), 200),
        (format!("blog.nook.localhost:{}", h.port), 200),
        ("BLOG.NOOK.LOCALHOST.".to_string(), 200),
        ("blog.nook.localhost:99999".to_string(), 421),
        ("blog.nook.localhost:22".to_string(), 400),
        ("nook.localhost.evil.com".to_string(), 421),
        ("".to_string(), 421),
    ] {
        let r = h
            .curl()
            .arg("--http1.1")
            .header(&format!("Host: {host}"))
            .get(&h.url("blog.nook.localhost", "/"))
            .await;
        assert_eq!(r.status, status, "Host: {host:?}: {r:?}");
    }
    // A nonsense Host is not proxied anywhere.
    let r = h
        .curl()
        .arg("--http1.1")
        .header("Host: 127.0.0.2")
        .get(&h.url("blog.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 421);
    // /__nook/ is reserved on VM hosts.
    let r = h
        .curl()
        .get(&h.url("blog.nook.localhost", "/__nook/whatever"))
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_ports_by_host_port_or_extra_listener() {
    // A port in 3000-9999 free on both addresses.
    let (p, listener) = loop {
        let p = 3000 + (rand_port() % 7000) as u16;
        if let Some(p) = start_upstream_on(p).await
            && let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", p)).await
        {
            break (p, l);
        }
    };
    let h = Harness::start().await;
    h.edge.spawn(listener, nook_edge::ListenerRole::VmPort);
    let main = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("ports", main, true);
    h.backend.grant("u1", "ports", Access::Owner);
    let s = h.backend.session_for("u1", "ports.nook.localhost");

    let r = h.curl().get(&h.url("ports.nook.localhost", "/")).await;
    assert_eq!(r.json()["port"], main);
    // Host names port P on the main listener (as after an nft redirect).
    let r = h
        .curl()
        .session(&s)
        .arg("--connect-to")
        .arg(format!("ports.nook.localhost:{p}:127.0.0.1:{}", h.port))
        .get(&format!("https://ports.nook.localhost:{p}/x"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["port"], p);
    // A connection to the extra listener on port P.
    let r = h
        .curl()
        .session(&s)
        .arg("--resolve")
        .arg(format!("ports.nook.localhost:{p}:127.0.0.1"))
        .get(&format!("https://ports.nook.localhost:{p}/y"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["port"], p);
    // Public covers only the default port: other ports need access.
    let r = h
        .curl()
        .arg("--resolve")
        .arg(format!("ports.nook.localhost:{p}:127.0.0.1"))
        .get(&format!("https://ports.nook.localhost:{p}/y"))
        .await;
    assert_eq!(r.status, 401);
}

fn rand_port() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        / 7
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_link_grants_access_after_login() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u4", "dan@example.com");
    h.backend.add_vm("blog", up, false);
    let link = h.backend.share_link("blog");
    let s = h.backend.session_for("u4", "blog.nook.localhost");
    assert_eq!(
        h.curl()
            .session(&s)
            .get(&h.url("blog.nook.localhost", "/"))
            .await
            .status,
        404
    );
    // Anonymous: log in first, coming back to the link.
    let r = h
        .curl()
        .get(&h.url("blog.nook.localhost", &format!("/doc?nook_share={link}")))
        .await;
    assert_eq!(r.status, 302);
    assert!(
        r.header("location")
            .unwrap()
            .contains(&enc(&format!("nook_share={link}")))
    );
    // Signed in: redeemed, and the token leaves the URL.
    let r = h
        .curl()
        .session(&s)
        .get(&h.url(
            "blog.nook.localhost",
            &format!("/doc?a=1&nook_share={link}"),
        ))
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("/doc?a=1"));
    let r = h
        .curl()
        .session(&s)
        .get(&h.url("blog.nook.localhost", "/doc?a=1"))
        .await;
    assert_eq!(r.status, 200);
    // A wrong link grants nothing.
    h.backend.add_user("u5", "eve@example.com");
    let s5 = h.backend.session_for("u5", "blog.nook.localhost");
    let r = h
        .curl()
        .session(&s5)
        .get(&h.url("blog.nook.localhost", "/?nook_share=wrong"))
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        h.curl()
            .session(&s5)
            .get(&h.url("blog.nook.localhost", "/"))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_a_502_page_naming_the_vm() {
    let h = Harness::start().await;
    let port = closed_port().await;
    h.backend.add_vm("down", port, true);
    let r = h.curl().get(&h.url("down.nook.localhost", "/")).await;
    assert_eq!(r.status, 502);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.contains("<code>down</code>"), "{}", r.body);
    for leak in ["refused", "127.0.0.2", "hyper", "error"] {
        assert!(
            !r.body.to_lowercase().contains(leak),
            "{leak} leaked: {}",
            r.body
        );
    }
}

/// The timeout the tests of the edge's timeouts set (the harness's are longer).
const SHORT_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_upstream_gives_a_504_page() {
    let h = Harness::start_with(|c| c.upstream_response_timeout = SHORT_TIMEOUT).await;
    let port = start_hanging_upstream().await;
    h.backend.add_vm("hang", port, true);
    let t = Instant::now();
    let r = h.curl().get(&h.url("hang.nook.localhost", "/")).await;
    assert_eq!(r.status, 504);
    assert!(r.body.contains("<code>hang</code>"));
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_a_clean_error() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    let big = format!("X-Big: {}", "a".repeat(64 * 1024));
    // The edge answers 431 and closes; curl may still be sending and see the close first.
    let out = h
        .curl()
        .header(&big)
        .arg("--http1.1")
        .run_raw(&h.url("pub.nook.localhost", "/"))
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 431")
            || (text.trim() == "0" && matches!(out.status.code(), Some(55 | 56))),
        "{out:?}"
    );
    let big40 = format!("X-Big: {}", "a".repeat(40 * 1024));
    let r = h
        .curl()
        .header(&big40)
        .arg("--http1.1")
        .get(&h.url("pub.nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 431, "{r:?}");
    // HTTP/2: the stream or connection is refused, but nothing crashes.
    let out = h
        .curl()
        .header(&big)
        .arg("--http2")
        .run_raw(&h.url("pub.nook.localhost", "/"))
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.starts_with("HTTP/2 431") || text.starts_with("HTTP/2 400"),
        "{text}"
    );
    // Many headers that together are too large.
    let mut c = h.curl().arg("--http1.1");
    for i in 0..120 {
        c = c.header(&format!("X-H{i}: {}", "b".repeat(300)));
    }
    assert_eq!(c.get(&h.url("pub.nook.localhost", "/")).await.status, 431);
    // The edge is still fine.
    assert_eq!(
        h.curl().get(&h.url("pub.nook.localhost", "/")).await.status,
        200
    );
}

/// Bytes trickled slower than the header timeout: the edge closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off() {
    let h = Harness::start_with(|c| {
        c.header_read_timeout = SHORT_TIMEOUT;
        c.handshake_timeout = SHORT_TIMEOUT;
    })
    .await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);

    // After the TLS handshake, a request head that never completes.
    let mut tls = h.tls_connect("pub.nook.localhost").await;
    let t = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nX-Slow: ";
    tls.write_all(head).await.unwrap();
    let closed_after = loop {
        if tls.write_all(b"a").await.is_err() || tls.flush().await.is_err() {
            break t.elapsed();
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break t.elapsed(),
            Ok(Ok(_)) => {} // a 408 may be sent before closing
            Err(_) => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slowloris connection still open"
        );
    };
    assert!(
        closed_after >= Duration::from_millis(1500),
        "{closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");

    // Before the TLS handshake: a client that sends half a ClientHello.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .unwrap();
    let t = Instant::now();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(8), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "handshake not cut: {r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_arrives_event_by_event() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    for proto in ["--http1.1", "--http2"] {
        let args = h
            .curl()
            .arg("-N")
            .arg(proto)
            .arg(h.url("pub.nook.localhost", "/sse"))
            .into_args();
        let mut child = tokio::process::Command::new("curl")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let t = Instant::now();
        let mut seen = Vec::new();
        let mut buf = String::new();
        let mut chunk = [0u8; 256];
        while seen.len() < 4 {
            let n = tokio::time::timeout(Duration::from_secs(5), out.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream ended early: {buf}");
            buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
            while let Some(i) = buf.find("\n\n") {
                let ev = buf[..i].to_string();
                buf.drain(..i + 2);
                seen.push((ev, t.elapsed()));
            }
        }
        let _ = child.wait().await;
        for (i, (ev, _)) in seen.iter().enumerate() {
            assert_eq!(ev, &format!("data: event{i}"));
        }
        // The upstream waits a second between events; buffering would bunch them up. (Half of
        // it is left for a loaded host to be late reading one event.)
        for w in seen.windows(2) {
            let gap = w[1].1 - w[0].1;
            assert!(
                gap >= SSE_EVENT_GAP / 2,
                "{proto}: events bunched: {seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_from_clients() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    let s = h.backend.session_for("u1", "blog.nook.localhost");
    let r = h
        .curl()
        .arg("--http2")
        .session(&s)
        .header("Sec-Fetch-Site: same-origin")
        .arg("-d")
        .arg("x=1")
        .get(&h.url("blog.nook.localhost", "/h2"))
        .await;
    assert_eq!(r.http_version, "2");
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body"], "x=1");
    assert_eq!(
        j["headers"]["host"],
        format!("blog.nook.localhost:{}", h.port)
    );
    assert_eq!(j["headers"]["x-nook-user-id"], "u1");
    let r = h
        .curl()
        .arg("--http2")
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert_eq!(r.http_version, "2");
    assert!(r.body.contains("Sign in"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let h = Harness::start().await;
    let ws_port = start_ws_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("ws", ws_port, false);
    h.backend.grant("u1", "ws", Access::Owner);
    let s = h.backend.session_for("u1", "ws.nook.localhost");
    let tls = h.tls_connect("ws.nook.localhost").await;
    let mut req = format!("wss://ws.nook.localhost:{}/socket", h.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "cookie",
        format!("__Host-nook_session={s}").parse().unwrap(),
    );
    // As a browser sends it (a cookie-authenticated upgrade needs it, see edge_attacks.rs).
    req.headers_mut().insert(
        "origin",
        format!("https://ws.nook.localhost:{}", h.port)
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();

    // Without a session the upgrade is refused before it reaches the VM.
    let tls = h.tls_connect("ws.nook.localhost").await;
    let req = format!("wss://ws.nook.localhost:{}/socket", h.port)
        .into_client_request()
        .unwrap();
    assert!(tokio_tungstenite::client_async(req, tls).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_can_be_replaced_at_runtime() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A different CA: the old CA no longer verifies the edge, the new one does.
    let ca2 = nook_edge::LocalCa::load_or_create(dir.path(), &[DOMAIN]).unwrap();
    h.edge
        .set_certificate(
            ca2.leaf_chain_pem().as_bytes(),
            ca2.leaf_key_pem().as_bytes(),
        )
        .unwrap();
    let out = h.curl().run_raw(&h.url("nook.localhost", "/")).await;
    assert!(!out.status.success());
    let r = Curl::new(h.port, ca2.ca_cert_path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert_eq!(r.status, 200);
    assert!(h.edge.set_certificate(b"junk", b"junk").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_both_ways() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    std::fs::write(&file, "z".repeat(3 * 1024 * 1024)).unwrap();
    for proto in ["--http1.1", "--http2"] {
        let r = h
            .curl()
            .arg(proto)
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .get(&h.url("pub.nook.localhost", "/upload"))
            .await;
        assert_eq!(r.status, 200, "{proto}");
        let j = r.json();
        assert_eq!(
            j["body"].as_str().unwrap().len(),
            3 * 1024 * 1024,
            "{proto}"
        );
    }
}

/// Garbage after the TLS handshake never takes the edge down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_do_not_hurt_the_edge() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    let inputs: [&[u8]; 9] = [
        b"CONNECT pub.nook.localhost:22 HTTP/1.1\r\nHost: pub.nook.localhost:22\r\n\r\n",
        b"\x00\x01\x02\x03garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nBad Header\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: pub.nook.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nHost: other.nook.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\xfe.nook.localhost\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: pub.nook.localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00garbage",
    ];
    for input in inputs {
        let mut tls = h.tls_connect("pub.nook.localhost").await;
        tls.write_all(input).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
        if input.starts_with(b"CONNECT") {
            assert!(
                buf.starts_with(b"HTTP/1.1 405"),
                "{}",
                String::from_utf8_lossy(&buf)
            );
        }
    }
    let r = h.curl().get(&h.url("pub.nook.localhost", "/")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_threads_serves_like_spawn() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    h.edge
        .serve_on_threads(listener, nook_edge::ListenerRole::Main, 2)
        .unwrap();
    for _ in 0..4 {
        let r = Curl::new(port, h.ca_path.clone())
            .get(&format!("https://pub.nook.localhost:{port}/t"))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/t");
    }
}

/// The local CA may only vouch for the development domain, and its key stays private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ca_is_name_constrained_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start().await;
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&h.ca_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("X509v3 Name Constraints: critical")
            || text.contains("X509v3 Name Constraints"),
        "{text}"
    );
    assert!(
        text.contains("Permitted:") && text.contains("DNS:nook.localhost"),
        "{text}"
    );
    assert!(text.contains("CA:TRUE"), "{text}");
    let key = h.ca_path.with_file_name("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        nook_edge::LocalCa::ca_cert_path_in(h.ca_path.parent().unwrap()),
        h.ca_path
    );
    // The served leaf covers the domain and one label under it.
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect 127.0.0.1:{} -servername x.nook.localhost 2>/dev/null | openssl x509 -noout -ext subjectAltName",
            h.port
        ))
        .output()
        .await
        .unwrap();
    let san = String::from_utf8_lossy(&out.stdout);
    assert!(
        san.contains("DNS:nook.localhost") && san.contains("DNS:*.nook.localhost"),
        "{san}"
    );
}

/// A handoff link works only in the browser that started the sign-in, so nobody can sign a
/// victim's browser into their own account on a VM host by sending them a link (login CSRF).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_link_signs_in_only_the_browser_that_asked() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_user("u2", "mallory@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);
    h.backend.grant("u2", "blog", Access::Viewer);
    let blog = h.url("blog.nook.localhost", "/");

    // Mallory starts a sign-in in her browser and stops at the handoff link.
    let mallory = tempfile::NamedTempFile::new().unwrap();
    let r = h.curl().html().jar(mallory.path()).get(&blog).await;
    let login = r.header("location").unwrap().to_string();
    let m_dash = h.backend.session_for("u2", "nook.localhost");
    let r = h.curl().session(&m_dash).get(&login).await;
    assert_eq!(r.status, 302, "{r:?}");
    let bound = r.header("location").unwrap().to_string();
    assert!(bound.contains("/__nook/handoff?code="), "{bound}");

    // Ann's browser, already signed in to the dashboard, is made to open it: no session for
    // Mallory's account is set; Ann is sent round to sign in as herself.
    let ann = tempfile::NamedTempFile::new().unwrap();
    let token = h.backend.login_token("u1");
    let page = h
        .curl()
        .jar(ann.path())
        .get(&h.url("nook.localhost", &format!("/__nook/login?token={token}")))
        .await;
    let r = h.press_sign_in(ann.path(), &page, false).await;
    assert_eq!(r.status, 302, "{r:?}");
    let r = h.curl().jar(ann.path()).get(&bound).await;
    assert_eq!(r.status, 302, "{r:?}");
    assert!(r.set_cookie("__Host-nook_session").is_none(), "{r:?}");
    assert!(
        r.header("location")
            .unwrap()
            .starts_with(&h.url("nook.localhost", "/__nook/login?next=")),
        "{r:?}"
    );

    // Nor can Mallory's login link switch Ann's signed-in browser to her account.
    let token = h.backend.login_token("u2");
    let r = h
        .curl()
        .jar(ann.path())
        .get(&h.url(
            "nook.localhost",
            &format!("/__nook/login?token={token}&next={}", enc(&blog)),
        ))
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.set_cookie("__Host-nook_session").is_none(), "{r:?}");
    assert!(r.body.contains("mallory@example.com"), "{}", r.body);
    let r = h
        .curl()
        .jar(ann.path())
        .get(&h.url("nook.localhost", "/"))
        .await;
    assert!(r.body.contains("ann@example.com"), "{}", r.body);

    // A code made without a browser's state (asked for straight from the dashboard) sends
    // whoever opens it round to sign in as themselves.
    let r = h
        .curl()
        .session(&m_dash)
        .get(&h.url(
            "nook.localhost",
            &format!("/__nook/login?next={}", enc(&blog)),
        ))
        .await;
    let unbound = r.header("location").unwrap().to_string();
    let r = h.curl().jar(ann.path()).arg("-L").get(&unbound).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("ann@example.com")
    );

    // In the browser that asked, the same steps sign in (the first code was used up above).
    let r = h.curl().html().jar(mallory.path()).get(&blog).await;
    let login = r.header("location").unwrap().to_string();
    let r = h.curl().session(&m_dash).get(&login).await;
    let bound = r.header("location").unwrap().to_string();
    let r = h.curl().jar(mallory.path()).arg("-L").get(&bound).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("mallory@example.com")
    );
}

/// A connection stays open while it is used, and is closed once no request has started on it
/// for the idle timeout, over HTTP/1.1 and HTTP/2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    // The header timeout (which also closes idle HTTP/1.1 connections) is set out of the way,
    // so only the idle timeout can close them here.
    // Requests come 400 ms apart, for well over the idle timeout; the timeout leaves 1.6 s for
    // a loaded host to stall between two of them (a 1 s timeout left 0.6 s).
    let h = Harness::start_with(|c| {
        c.idle_timeout = Duration::from_secs(2);
        c.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let up = start_upstream().await;
    h.backend.add_vm("pub", up, true);

    // HTTP/1.1: requests every 400 ms for 4.8 s on one connection, then silence.
    let mut tls = h.tls_connect("pub.nook.localhost").await;
    for _ in 0..12 {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: pub.nook.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed while in use");
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        let (headers, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut have = body.len();
        while have < length {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response");
            have += n;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "an idle HTTP/1.1 connection was kept open: {end:?}"
    );

    // HTTP/2: the edge sends GOAWAY and closes.
    let (mut send, driver) = h.h2_connect("pub.nook.localhost").await;
    let req = hyper::Request::get("https://pub.nook.localhost/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
}

/// A VM that closes its idle keep-alive connections: the edge does not reuse a closed one,
/// so the next request still gets through (no 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_is_not_an_error() {
    let h = Harness::start().await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(VM_IP, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = Vec::new();
                while !have.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Keep-alive was not refused, but the connection is dropped soon after.
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    h.backend.add_vm("pub", port, true);
    for _ in 0..3 {
        let r = h.curl().get(&h.url("pub.nook.localhost", "/")).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// A WebSocket over HTTP/2 (RFC 8441, as browsers send it when the server allows): the edge
/// takes the extended CONNECT and talks the HTTP/1.1 upgrade to the VM; messages echo both
/// ways. Without a session it never reaches the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_echoes_through_the_proxy() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let h = Harness::start().await;
    let ws_port = start_ws_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("ws", ws_port, false);
    h.backend.grant("u1", "ws", Access::Owner);
    let s = h.backend.session_for("u1", "ws.nook.localhost");

    let (mut send, _driver) = h.h2_connect("ws.nook.localhost").await;
    let connect = |cookie: Option<&str>| {
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri(format!("https://ws.nook.localhost:{}/socket", h.port))
            .header("sec-websocket-version", "13");
        if let Some(c) = cookie {
            req = req
                .header("cookie", format!("__Host-nook_session={c}"))
                .header("origin", format!("https://ws.nook.localhost:{}", h.port));
        }
        let mut req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    // The server's SETTINGS (which allow extended CONNECT) arrive with the first exchange.
    send.ready().await.unwrap();
    let warm = hyper::Request::get(format!("https://ws.nook.localhost:{}/", h.port))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let _ = send.send_request(warm).await.unwrap();

    let refused = send.send_request(connect(None)).await.unwrap();
    assert_eq!(refused.status(), 401);

    let resp = send.send_request(connect(Some(&s))).await.unwrap();
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    for i in 0..3 {
        ws.send(Message::text(format!("over h2 {i}")))
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("over h2 {i}"));
    }
    ws.close(None).await.unwrap();
}
