//! Needs a browser: Debian's headless chromium follows the login link through the handoff to
//! a private VM page. The local CA is trusted through an NSS database in a throwaway HOME
//! (`certutil` from libnss3-tools), exactly as a user would trust it; no certificate errors
//! are ignored. Each VM host name resolves to loopback because chromium treats `*.localhost`
//! as local.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nook_edge::Access;

async fn chromium_dump_dom(home: &Path, profile: &Path, url: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("chromium")
            .env("HOME", home)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                &format!("--user-data-dir={}", profile.display()),
                "--dump-dom",
                url,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium timed out")
    .expect("chromium is installed (apt-get install chromium)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
    let profile = home.path().join("profile");

    // An anonymous visit lands on the login page (and the dashboard remembers the page).
    let vm_url = h.url("blog.nook.localhost", "/secret/page");
    let dom = chromium_dump_dom(home.path(), &profile, &vm_url).await;
    assert!(
        dom.contains("Sign in to nook"),
        "expected the login page, got: {dom}"
    );

    // The login link, opened in the same browser profile, ends on the VM page.
    let token = h.backend.login_token("u1");
    let dom = chromium_dump_dom(
        home.path(),
        &profile,
        &h.url("nook.localhost", &format!("/__nook/login?token={token}")),
    )
    .await;
    assert!(
        dom.contains("\"path\":\"/secret/page\""),
        "expected the VM's page, got: {dom}"
    );
    assert!(
        dom.contains("\"x-nook-user-email\":\"ann@example.com\""),
        "{dom}"
    );
    // The browser sent no nook cookie to the VM.
    assert!(!dom.contains("__Host-nook"), "{dom}");

    // Same profile, later visit: the VM host's own cookie is enough.
    let dom = chromium_dump_dom(
        home.path(),
        &profile,
        &h.url("blog.nook.localhost", "/again"),
    )
    .await;
    assert!(dom.contains("\"path\":\"/again\""), "{dom}");
}
