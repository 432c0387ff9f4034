//! Needs a browser: Debian's headless chromium opens a login link, presses its sign-in button
//! and follows the handoff to a private VM page. The local CA is trusted through an NSS
//! database in a throwaway HOME (`certutil` from libnss3-tools), exactly as a user would trust
//! it; no certificate errors are ignored. Each VM host name resolves to loopback because
//! chromium treats `*.localhost` as local.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nook_edge::Access;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_chromium_login_link_reaches_private_vm() {
    let h = Harness::start().await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);

    let home = tempfile::tempdir().unwrap();
    let nssdb = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    let st = std::process::Command::new("certutil")
        .args(["-N", "-d", &db, "--empty-password"])
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("certutil")
        .args(["-A", "-d", &db, "-t", "C,,", "-n", "nook-local-ca", "-i"])
        .arg(&h.ca_path)
        .status()
        .unwrap();
    assert!(st.success());

    // One browser for the whole visit, driven over the DevTools protocol (blocking, so on a
    // thread of its own).
    let vm_url = h.url("blog.nook.localhost", "/secret/page");
    let login = h.url(
        "nook.localhost",
        &format!("/__nook/login?token={}", h.backend.login_token("u1")),
    );
    let again = h.url("blog.nook.localhost", "/again");
    let home_path = home.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut b = cdp::Browser::launch(&home_path);

        // An anonymous visit lands on the login page (and the dashboard remembers the page).
        b.goto(&vm_url);
        b.wait_for("Sign in to nook");

        // The login link, opened in the same browser, asks for a click; then it ends on the
        // VM page.
        b.goto(&login);
        b.wait_for("id=\"sign-in\"");
        b.click("#sign-in");
        let dom = b.wait_for("\"path\":\"/secret/page\"");
        assert!(
            dom.contains("\"x-nook-user-email\":\"ann@example.com\""),
            "{dom}"
        );
        // The browser sent no nook cookie to the VM.
        assert!(!dom.contains("__Host-nook"), "{dom}");

        // Later visit: the VM host's own cookie is enough.
        b.goto(&again);
        b.wait_for("\"path\":\"/again\"");
    })
    .await
    .unwrap();
}
