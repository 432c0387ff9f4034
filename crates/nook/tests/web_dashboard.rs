//! System test (root, real QEMU guests, a real browser): the dashboard driven by Playwright
//! in Debian's chromium (tests/web/dashboard.mjs), at desktop and phone sizes: sign in with a
//! login link, create a VM and see it run, a terminal (a command, a resize, a reconnect to the
//! same shell, a large paste), sharing by email and by link opened in a second browser,
//! clone, delete. It writes the screenshots in docs/screenshots, so they stay true.

mod common;

use std::process::Command;

use common::{Daemon, Key, repo_root};

fn login_link(d: &Daemon, key: &Key) -> String {
    d.lobby_ok(key, &["browser"])
        .lines()
        .find(|l| l.starts_with("https://"))
        .expect("a login link")
        .trim()
        .to_string()
}

#[test]
fn web_dashboard_in_a_real_browser_at_desktop_and_phone_sizes() {
    let d = Daemon::start();
    let (alice, bob) = (Key::new("alice"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    let playwright = std::env::var("NOOK_TEST_PLAYWRIGHT")
        .unwrap_or_else(|_| "/var/cache/nook-test/playwright/node_modules".into());
    assert!(
        std::path::Path::new(&playwright)
            .join("playwright-core")
            .is_dir(),
        "playwright-core is not in {playwright}: run scripts/test (it installs it), or set NOOK_TEST_PLAYWRIGHT"
    );
    let shots = repo_root().join("docs/screenshots");
    std::fs::create_dir_all(&shots).expect("docs/screenshots");
    let out = Command::new("node")
        .arg(repo_root().join("tests/web/dashboard.mjs"))
        .env(
            "NOOK_URL",
            format!("https://nook.localhost:{}", d.https_port),
        )
        .env("NOOK_LOGIN_ALICE", login_link(&d, &alice))
        .env("NOOK_LOGIN_BOB", login_link(&d, &bob))
        .env("NOOK_LOGIN_ALICE_PHONE", login_link(&d, &alice))
        .env("NOOK_LOGIN_BOB_PHONE", login_link(&d, &bob))
        .env("NOOK_SHOTS", &shots)
        .env("NOOK_PLAYWRIGHT", &playwright)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        d.log_tail()
    );
    println!("{stdout}");
    for shot in ["vms", "vm", "terminal"] {
        for size in ["desktop", "phone"] {
            assert!(shots.join(format!("{size}-{shot}.png")).is_file());
        }
    }
}
