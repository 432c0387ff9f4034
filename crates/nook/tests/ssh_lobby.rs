//! System tests (root, real QEMU guests, the real OpenSSH client): the SSH lobby: signup,
//! every VM command with text and JSON, exit codes, isolation between accounts, bad input.

mod common;

use common::{Daemon, Key};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vm_ssh_lobby_signup_commands_and_exit_codes() {
    let d = Daemon::start();
    let alice = Key::new("alice");

    // An unknown key is told how to sign up, and fails.
    let out = d.ssh(&alice, "lobby", &["whoami"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("signup you@example.com"),
        "{}",
        stderr(&out)
    );

    d.signup(&alice, "alice@example.com");
    let me: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["whoami", "--json"])).expect("json");
    assert_eq!(me["email"], "alice@example.com");
    let out = d.ssh(&alice, "lobby", &["signup", "again@example.com"]);
    assert!(
        !out.status.success() && stderr(&out).contains("already belongs"),
        "{}",
        stderr(&out)
    );

    let vm: serde_json::Value = serde_json::from_str(&d.lobby_ok(
        &alice,
        &["new", "--name", "web", "--image", "tiny", "--json"],
    ))
    .expect("new --json");
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["state"], "running");
    assert!(vm["ssh"].as_str().unwrap_or("").contains("web@"), "{vm}");

    assert!(d.lobby_ok(&alice, &["ls"]).contains("web"));
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&d.lobby_ok(&alice, &["ls", "--json"])).expect("ls --json");
    assert_eq!(ls.len(), 1);
    assert!(d.lobby_ok(&alice, &["ls", "-l", "w*"]).contains("10.200."));
    let stat: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["stat", "web", "--json"])).expect("stat");
    assert!(stat["uptime_secs"].as_f64().unwrap_or(0.0) > 0.0, "{stat}");
    assert!(
        stat["mem_total_kib"].as_u64().unwrap_or(0) > 100_000,
        "{stat}"
    );
    assert!(d.lobby_ok(&alice, &["stat", "web"]).contains("uptime"));

    d.lobby_ok(&alice, &["rename", "web", "site"]);
    assert!(d.lobby_ok(&alice, &["ls"]).contains("site"));
    let restarted: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["restart", "site", "--json"])).expect("restart");
    assert_eq!(restarted["state"], "running");
    assert_eq!(
        d.exec("site", "hostname"),
        "site\n",
        "the guest did not learn its new name"
    );

    // Exit codes and errors, in text and JSON.
    let out = d.ssh(&alice, "lobby", &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("frobnicate"));
    let out = d.ssh(&alice, "lobby", &["rm", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("No VM named 'nosuch'"),
        "{}",
        stderr(&out)
    );
    let out = d.ssh(&alice, "lobby", &["rm", "nosuch", "--json"]);
    let err: serde_json::Value =
        serde_json::from_str(stderr(&out).lines().next().unwrap_or("")).expect("json error");
    assert_eq!(err["error"]["code"], "vm_not_found");
    let out = d.ssh(&alice, "lobby", &["new", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));

    // A second account sees nothing of the first, and someone else's VM looks missing.
    let bob = Key::new("bob");
    d.signup(&bob, "bob@example.com");
    assert!(!d.lobby_ok(&bob, &["ls"]).contains("site"));
    let theirs = d.ssh(&bob, "lobby", &["stop", "site"]);
    let missing = d.ssh(&bob, "lobby", &["stop", "nothere"]);
    assert_eq!(theirs.status.code(), missing.status.code());
    assert_eq!(
        stderr(&theirs).replace("site", "X"),
        stderr(&missing).replace("nothere", "X")
    );
    assert_eq!(d.vm("site")["state"], "running", "bob stopped alice's VM");

    // Bad input gets clear errors and the front door keeps serving.
    let long = "a".repeat(64);
    for bad in [long.as_str(), "'a b'", "bløg", "UPPER"] {
        let out = d.ssh(&alice, "lobby", &["new", "--image", "tiny", "--name", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            stderr(&out).contains("Invalid VM name"),
            "{bad}: {}",
            stderr(&out)
        );
    }
    let out = d.ssh(&alice, "lobby", &["new", "--name", "'oops"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("quote"), "{}", stderr(&out));
    // A 1 MiB command line (as 16 words: one argv string may not exceed 128 KiB).
    let word = "x".repeat(64 << 10);
    let mut huge = vec!["new"];
    huge.extend(std::iter::repeat_n(word.as_str(), 16));
    let out = d.ssh(&alice, "lobby", &huge);
    assert!(!out.status.success());
    assert!(
        d.lobby_ok(&alice, &["whoami"])
            .contains("alice@example.com"),
        "the front door stopped serving"
    );

    d.lobby_ok(&alice, &["rm", "site"]);
    assert!(d.lobby_ok(&alice, &["ls", "--json"]).trim() == "[]");
}
