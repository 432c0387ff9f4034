//! Integrations, end to end: a VM reaches GitHub (git and REST), any HTTP API and its owner's
//! other VMs through the gateway, with the credential added on the way out. The GitHub is
//! tests/fake-github/fake_github.py (git-http-backend behind a token, and a REST slice);
//! git runs on the host through a relay inside the guest, so the gateway sees the VM.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::{Daemon, Key, wait_until};

const TOKEN: &str = "ghp_nooktest_5b0c7e1d";

fn git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The fake GitHub, with bare repositories acme/app (one commit) and acme/other.
struct FakeGithub {
    child: Child,
    port: u16,
    repos: tempfile::TempDir,
}

impl FakeGithub {
    fn start() -> FakeGithub {
        let repos = tempfile::tempdir().expect("repos");
        for name in ["app", "other"] {
            let bare = repos.path().join(format!("acme/{name}.git"));
            std::fs::create_dir_all(&bare).expect("mkdir");
            ok(&git(&bare, &["init", "-q", "--bare", "-b", "main"]));
            let work = tempfile::tempdir().expect("work");
            ok(&git(work.path(), &["init", "-q", "-b", "main"]));
            std::fs::write(work.path().join("README"), format!("{name}\n")).expect("write");
            ok(&git(work.path(), &["add", "README"]));
            ok(&git(work.path(), &["commit", "-q", "-m", "first"]));
            ok(&git(
                work.path(),
                &["push", "-q", bare.to_str().expect("path"), "main"],
            ));
        }
        let (child, port) = common::spawn_listening(
            Command::new("python3")
                .arg(common::repo_root().join("tests/fake-github/fake_github.py"))
                .args([
                    "--host",
                    "127.0.0.3",
                    "--port",
                    "0",
                    "--token",
                    TOKEN,
                    "--repos",
                ])
                .arg(repos.path()),
            "fake github",
        );
        FakeGithub { child, port, repos }
    }
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon(gh: &FakeGithub) -> Daemon {
    let tmp = tempfile::Builder::new()
        .prefix("nook-sys")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let url = format!("http://127.0.0.3:{}", gh.port);
    std::fs::write(
        data_dir.join("nook.toml"),
        // The fake runs on the host's loopback, which integrations may not reach unless allowed.
        format!("github_url = \"{url}\"\ngithub_api_url = \"{url}\"\nintegrations_allow = [\"127.0.0.3/32\"]\n"),
    )
    .expect("nook.toml");
    Daemon::start_in(data_dir, Some(tmp), &[])
}

fn account(d: &Daemon, who: &str, vms: &[&str]) -> Key {
    let key = Key::new(who);
    d.signup(&key, &format!("{who}@example.com"));
    for vm in vms {
        d.lobby_ok(&key, &["new", "--name", vm, "--image", "tiny"]);
    }
    key
}

/// `wget` in the guest: the body, or the error wget printed.
fn wget(d: &Daemon, vm: &str, args: &str) -> String {
    d.exec(vm, &format!("wget -q -O - {args} 2>&1 || true"))
}

fn disk_holds(d: &Daemon, key: &Key, vm: &str, secret: &str) -> bool {
    let id = d.vm(vm)["id"].as_str().expect("id").to_string();
    d.lobby_ok(key, &["stop", vm]);
    let disk = std::fs::read(d.data_dir.join("vms").join(id).join("disk.qcow2")).expect("disk");
    disk.windows(secret.len()).any(|w| w == secret.as_bytes())
}

#[test]
fn vm_integrations_github_clone_push_and_rest_with_no_token_in_the_vm() {
    let gh = FakeGithub::start();
    let d = daemon(&gh);
    let alice = account(&d, "alice", &["dev"]);
    let added = d.lobby_ok(
        &alice,
        &[
            "integrations",
            "add",
            "github",
            "--name",
            "gh",
            "--token",
            TOKEN,
            "--repository",
            "acme/app",
        ],
    );
    assert!(
        added.contains("http://gh.int.nook-vm.localhost/"),
        "{added}"
    );
    assert!(!added.contains(TOKEN), "the token was shown again: {added}");
    let listed = d.lobby_ok(&alice, &["integrations", "list", "--json"]);
    assert!(!listed.contains(TOKEN), "{listed}");
    // Not attached yet: 404, as for one that does not exist.
    let out = wget(
        &d,
        "dev",
        "http://169.254.169.254/gateway/int/gh/api/repos/acme/app",
    );
    assert!(out.contains("404"), "{out}");
    d.lobby_ok(&alice, &["integrations", "attach", "gh", "dev"]);

    // REST, by the integration's host name (the guest's /etc/hosts points it at the gateway).
    let out = wget(
        &d,
        "dev",
        "http://gh.int.nook-vm.localhost/api/repos/acme/app",
    );
    assert!(out.contains("\"full_name\": \"acme/app\""), "{out}");
    let out = wget(
        &d,
        "dev",
        "http://gh.int.nook-vm.localhost/api/repos/acme/other",
    );
    assert!(
        out.contains("403"),
        "a repository outside the integration: {out}"
    );

    // git clone and push, from the host through the VM.
    let base = d.gateway_relay("dev");
    let work = tempfile::tempdir().expect("work");
    ok(&git(
        work.path(),
        &[
            "clone",
            "-q",
            &format!("{base}/gateway/int/gh/acme/app.git"),
            "app",
        ],
    ));
    let app = work.path().join("app");
    std::fs::write(app.join("NEW"), "pushed through nook\n").expect("write");
    ok(&git(&app, &["add", "NEW"]));
    ok(&git(&app, &["commit", "-q", "-m", "through the gateway"]));
    ok(&git(&app, &["push", "-q", "origin", "main"]));
    let log = ok(&git(
        &gh.repos.path().join("acme/app.git"),
        &["log", "--format=%s", "main"],
    ));
    assert!(log.contains("through the gateway"), "{log}");
    let refused = git(
        work.path(),
        &[
            "clone",
            "-q",
            &format!("{base}/gateway/int/gh/acme/other.git"),
            "other",
        ],
    );
    assert!(
        !refused.status.success(),
        "cloned a repository outside the integration"
    );

    // Another account's VM cannot use alice's integration, whatever it asks for.
    let _mallory = account(&d, "mallory", &["snoop"]);
    let out = wget(
        &d,
        "snoop",
        "http://169.254.169.254/gateway/int/gh/api/repos/acme/app",
    );
    assert!(out.contains("404"), "{out}");

    // A grant for a while ends on time; detaching ends it at once.
    d.lobby_ok(&alice, &["integrations", "detach", "gh", "dev"]);
    let out = wget(
        &d,
        "dev",
        "http://169.254.169.254/gateway/int/gh/api/repos/acme/app",
    );
    assert!(out.contains("404"), "detached: {out}");
    // The grant is long enough for a fetch through a TCG guest on a loaded host (a 3 s grant
    // could lapse before the first fetch arrived); its end is then watched for, and must come
    // neither early nor late.
    const GRANT: Duration = Duration::from_secs(15);
    let granted_at = std::time::Instant::now();
    d.lobby_ok(
        &alice,
        &["integrations", "attach", "gh", "dev", "--for", "15s"],
    );
    let out = wget(
        &d,
        "dev",
        "http://169.254.169.254/gateway/int/gh/api/repos/acme/app",
    );
    assert!(out.contains("acme/app"), "{out}");
    assert!(
        granted_at.elapsed() < GRANT,
        "the first fetch took the whole grant"
    );
    wait_until("the grant to lapse", GRANT * 3, || {
        wget(
            &d,
            "dev",
            "http://169.254.169.254/gateway/int/gh/api/repos/acme/app",
        )
        .contains("404")
    });
    let lapsed_after = granted_at.elapsed();
    assert!(
        lapsed_after >= GRANT && lapsed_after < GRANT * 2,
        "a {GRANT:?} grant ended after {lapsed_after:?}"
    );

    // The token is sealed in the database and never reached the guest's disk.
    assert!(
        !d.store_holds(TOKEN),
        "the token is in the database in the clear"
    );
    assert!(
        !disk_holds(&d, &alice, "dev", TOKEN),
        "the token is on the guest's disk"
    );
}

#[test]
fn vm_integrations_http_proxy_adds_its_header_and_a_peer_learns_the_caller() {
    let gh = FakeGithub::start();
    let d = daemon(&gh);
    let bob = account(&d, "bob", &["front", "back"]);
    // Any HTTP API: the fake GitHub's /user wants the bearer token.
    let target = format!("http://127.0.0.3:{}", gh.port);
    d.lobby_ok(
        &bob,
        &[
            "integrations",
            "add",
            "http-proxy",
            "--name",
            "api",
            "--target",
            &target,
            "--bearer",
            TOKEN,
        ],
    );
    d.lobby_ok(&bob, &["integrations", "attach", "api", "front"]);
    let out = wget(&d, "front", "http://api.int.nook-vm.localhost/user");
    assert!(out.contains("nook-test"), "{out}");
    let out = wget(&d, "back", "http://169.254.169.254/gateway/int/api/user");
    assert!(out.contains("404"), "a VM without the attachment: {out}");
    // An owner cannot aim an integration at the host or another VM, by address or by name.
    let back_ip = d.vm("back")["guest_ip"].as_str().expect("ip").to_string();
    for (i, target) in [
        format!("http://127.0.0.2:{}", gh.port),
        format!("http://localhost:{}", gh.port),
        format!("http://{back_ip}"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("sneak{i}");
        d.lobby_ok(
            &bob,
            &[
                "integrations",
                "add",
                "http-proxy",
                "--name",
                &name,
                "--target",
                target,
                "--bearer",
                "x",
            ],
        );
        d.lobby_ok(&bob, &["integrations", "attach", &name, "front"]);
        let out = wget(
            &d,
            "front",
            &format!("http://169.254.169.254/gateway/int/{name}/user"),
        );
        assert!(out.contains("403"), "{target}: {out}");
    }

    // A peer: `back` answers with the request head it got.
    d.exec(
        "back",
        "printf '#!/bin/sh\\nwhile read -r l; do l=${l%%\\r}; [ -z \"$l\" ] && break; echo \"$l\"; done > /tmp/head\\nprintf \"HTTP/1.0 200 OK\\\\r\\\\nContent-Type: text/plain\\\\r\\\\n\\\\r\\\\n\"\\ncat /tmp/head\\n' > /tmp/echo.sh; chmod +x /tmp/echo.sh; (nc -ll -p 80 -e /tmp/echo.sh </dev/null >/dev/null 2>&1 &); sleep 0.2",
    );
    d.lobby_ok(
        &bob,
        &[
            "integrations",
            "add",
            "http-proxy",
            "--name",
            "back",
            "--peer",
            "back",
        ],
    );
    d.lobby_ok(&bob, &["integrations", "attach", "back", "front"]);
    let out = wget(
        &d,
        "front",
        "--header 'X-Nook-Peer-VM: forged' --header 'X_Nook_Peer_VM: forged' http://back.int.nook-vm.localhost/hello",
    );
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("x-nook-peer-vm: front"), "{out}");
    assert!(
        !lower.contains("forged"),
        "a forged caller header reached the peer: {out}"
    );
    assert!(
        !disk_holds(&d, &bob, "front", TOKEN),
        "the token is on the guest's disk"
    );
}
