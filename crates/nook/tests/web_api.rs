//! System tests (root, real QEMU guests): the HTTPS API with the real curl, OpenSSH's
//! `ssh-keygen -Y sign` and busybox wget inside a guest. Tokens signed by an SSH key (allowed,
//! refused, expired, not yet valid, signed by a removed key), opaque API tokens until revoked,
//! a VM cloning itself through the metadata address once its owner allows it, byte-identical
//! JSON with the SSH lobby, and bad input: broken command lines and JSON, a 1 MiB body,
//! cross-site requests riding the session cookie, and terminals to VMs one may not see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use common::{Daemon, Key};

const DOMAIN: &str = "nook.localhost";

struct Api<'a> {
    d: &'a Daemon,
    ca: PathBuf,
}

/// A response: status, the `X-Nook-Exit` header, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    exit: Option<u32>,
    body: String,
}

impl Api<'_> {
    fn url(&self, path: &str) -> String {
        format!("https://{DOMAIN}:{}{path}", self.d.https_port)
    }

    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "-m", "120", "--cacert"])
            .arg(&self.ca)
            .args([
                "--resolve",
                &format!("{DOMAIN}:{}:127.0.0.1", self.d.https_port),
            ])
            .args(args)
            .output()
            .expect("curl")
    }

    /// POSTs `body` to /api/exec with these extra curl arguments.
    fn exec(&self, extra: &[&str], body: &str) -> Answer {
        let dir = tempfile::tempdir().expect("tmp");
        let headers = dir.path().join("headers");
        let mut args: Vec<&str> = vec!["-D"];
        let h = headers.display().to_string();
        args.push(&h);
        args.extend_from_slice(extra);
        args.extend(["--data-binary", body, "-w", "\n%{http_code}"]);
        let url = self.url("/api/exec");
        args.push(&url);
        let out = self.curl(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let headers = std::fs::read_to_string(&headers).unwrap_or_default();
        let exit = headers
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-nook-exit:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse().ok());
        let status = code.trim().parse().unwrap_or(0);
        Answer {
            status,
            exit,
            body: if status == 0 {
                format!("curl: {}", String::from_utf8_lossy(&out.stderr))
            } else {
                body.to_string()
            },
        }
    }

    fn with_token(&self, token: &str, body: &str) -> Answer {
        let auth = format!("Authorization: Bearer {token}");
        self.exec(&["-H", &auth], body)
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Makes a signed token exactly as docs/api.md says: the permissions in a file, signed with
/// `ssh-keygen -Y sign -n nook-api`, both base64'd after `nooksig.`.
fn signed_token(key: &Key, permissions: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let perms = dir.path().join("perms.json");
    std::fs::write(&perms, permissions).expect("write");
    let out = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "nook-api", "-f"])
        .arg(&key.path)
        .arg(&perms)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "{out:?}");
    let sig = std::fs::read(dir.path().join("perms.json.sig")).expect("sig");
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("nooksig.{}.{}", b64.encode(permissions), b64.encode(sig))
}

fn public_key(key: &Key) -> String {
    std::fs::read_to_string(key.path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_string()
}

fn fingerprint(key: &Key) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.path.with_extension("pub"))
        .output()
        .expect("ssh-keygen -l");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

/// Logs `key` in through a `browser` link into the cookie jar `jar`; returns nothing but a
/// jar holding the dashboard's session.
fn login(api: &Api, key: &Key, jar: &Path) {
    let link = api.d.lobby_ok(key, &["browser"]);
    let url = link
        .lines()
        .find(|l| l.starts_with("https://"))
        .expect("a login link")
        .trim()
        .to_string();
    let token = url.split("token=").nth(1).expect("token").to_string();
    let origin = format!("Origin: {}", api.url(""));
    let j = jar.display().to_string();
    let out = api.curl(&[
        "-b",
        &j,
        "-c",
        &j,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &origin,
        "--data-urlencode",
        &format!("token={token}"),
        &api.url("/__nook/login"),
    ]);
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code.starts_with('3') || code == "200", "login: {code}");
}

#[test]
fn web_api_tokens_allow_what_they_say_and_nothing_else() {
    let d = Daemon::start();
    let api = Api {
        d: &d,
        ca: PathBuf::from(d.ok(&["ca", "path"]).trim()),
    };
    let (alice, alice2, bob) = (Key::new("alice"), Key::new("alice2"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "box"]);

    // No credentials: 401 with a pointer to what to do.
    let a = api.exec(&[], "ls --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("token create --api"), "{a:?}");

    // A token signed by alice's key that allows `ls`: the same bytes as the lobby's `ls`.
    let exp = now() + 3600;
    let ls_only = signed_token(&alice, &format!("{{\"exp\": {exp}, \"cmds\": [\"ls\"]}}\n"));
    let a = api.with_token(&ls_only, "ls --json");
    assert_eq!((a.status, a.exit), (200, Some(0)), "{a:?}");
    let lobby = d.lobby_ok(&alice, &["ls", "--json"]);
    assert_eq!(a.body, lobby, "API and lobby JSON differ");
    assert!(a.body.contains("\"box\""));
    // `rm` is refused with a clear error, and the VM is still there.
    let a = api.with_token(&ls_only, "rm box --json");
    assert_eq!((a.status, a.exit), (403, Some(1)), "{a:?}");
    assert!(
        a.body.contains("may not run `rm`") && a.body.contains("\"forbidden\""),
        "{a:?}"
    );
    assert!(d.lobby_ok(&alice, &["ls"]).contains("box"));
    // GET /api/vms is `ls --json` too.
    let auth = format!("Authorization: Bearer {ls_only}");
    let out = api.curl(&["-H", &auth, &api.url("/api/vms")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), lobby);

    // Expired, not yet valid, tampered with, signed for another namespace: refused.
    let expired = signed_token(
        &alice,
        &format!("{{\"exp\": {}, \"cmds\": [\"ls\"]}}", now() - 5),
    );
    let a = api.with_token(&expired, "ls --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("expired"), "{a:?}");
    let later = signed_token(
        &alice,
        &format!(
            "{{\"exp\": {exp}, \"nbf\": {}, \"cmds\": [\"ls\"]}}",
            now() + 600
        ),
    );
    let a = api.with_token(&later, "ls --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("not valid before"), "{a:?}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let widened = format!(
        "nooksig.{}.{}",
        b64.encode(format!("{{\"exp\": {exp}, \"cmds\": [\"all\"]}}\n")),
        ls_only.rsplit_once('.').expect("dot").1
    );
    let a = api.with_token(&widened, "rm box --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("does not verify"), "{a:?}");

    // A token limited to one VM may not name another, nor act on the whole account.
    let one_vm = signed_token(
        &alice,
        &format!("{{\"exp\": {exp}, \"cmds\": [\"all\"], \"vms\": [\"box\"]}}"),
    );
    let a = api.with_token(&one_vm, "stat other --json");
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.body.contains("only on box"), "{a:?}");
    let a = api.with_token(&one_vm, "whoami --json");
    assert_eq!(a.status, 403, "{a:?}");
    let a = api.with_token(&one_vm, "stat box --json");
    assert_eq!(a.status, 200, "{a:?}");

    // A token signed by a second key of alice's works until that key is removed.
    let claim = d.lobby_ok(&alice, &["ssh-key", "add", &public_key(&alice2)]);
    let code = claim
        .lines()
        .find(|l| l.contains("ssh-key confirm"))
        .and_then(|l| l.split_whitespace().last())
        .expect("confirm code")
        .to_string();
    d.lobby_ok(&alice2, &["ssh-key", "confirm", &code]);
    let by_second = signed_token(&alice2, &format!("{{\"exp\": {exp}, \"cmds\": [\"ls\"]}}"));
    assert_eq!(api.with_token(&by_second, "ls --json").status, 200);
    d.lobby_ok(&alice, &["ssh-key", "remove", &fingerprint(&alice2)]);
    let a = api.with_token(&by_second, "ls --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("not a key of any account"), "{a:?}");
    // A stranger's key signs nothing for alice.
    let strangers = signed_token(
        &Key::new("eve"),
        &format!("{{\"exp\": {exp}, \"cmds\": [\"ls\"]}}"),
    );
    assert_eq!(api.with_token(&strangers, "ls --json").status, 401);

    // An opaque token works until `token revoke`; only its hash is stored.
    let made = d.lobby_ok(
        &alice,
        &["token", "create", "--api", "--cmds", "ls,stat", "--json"],
    );
    let made: serde_json::Value = serde_json::from_str(&made).expect("json");
    let token = made["token"].as_str().expect("token").to_string();
    let id = made["id"].as_str().expect("id").to_string();
    assert_eq!(api.with_token(&token, "ls --json").body, lobby);
    assert_eq!(api.with_token(&token, "rm box").status, 403);
    assert!(!d.store_holds(&token), "the token is stored in the clear");
    let listed = d.lobby_ok(&alice, &["token", "list"]);
    assert!(
        listed.contains(&id) && listed.contains("ls,stat"),
        "{listed}"
    );
    d.lobby_ok(&alice, &["token", "revoke", &id]);
    let a = api.with_token(&token, "ls --json");
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("revoked"), "{a:?}");
    // A token may not widen itself by granting a VM API access.
    let sharer = signed_token(
        &alice,
        &format!("{{\"exp\": {exp}, \"cmds\": [\"share\"], \"vms\": [\"box\"]}}"),
    );
    let a = api.with_token(&sharer, "share api box --cmds all --json");
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.body.contains("over SSH or on the dashboard"), "{a:?}");
    let a = api.with_token(
        &sharer,
        "share add box mallory@example.com --role collaborator",
    );
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(api.with_token(&sharer, "share add-link box").status, 403);
    assert_eq!(api.with_token(&sharer, "share show box --json").status, 200);
    // A token may not mint tokens, keys or logins.
    let a = d.ssh(
        &alice,
        "lobby",
        &["token", "create", "--api", "--cmds", "token", "--json"],
    );
    assert!(!a.status.success());
    assert!(String::from_utf8_lossy(&a.stderr).contains("not a command a token may be given"));

    // Bob's token sees none of alice's VMs, and `box` looks like no VM at all.
    let bobs = signed_token(&bob, &format!("{{\"exp\": {exp}, \"cmds\": [\"all\"]}}"));
    let a = api.with_token(&bobs, "stat box --json");
    let b = api.with_token(&bobs, "stat nothing-here --json");
    assert_eq!((a.status, b.status), (404, 404), "{a:?} {b:?}");
    assert_eq!(
        a.body.replace("box", "X"),
        b.body.replace("nothing-here", "X")
    );
}

#[test]
fn web_api_a_vm_allowed_by_its_owner_clones_itself_from_inside() {
    let d = Daemon::start();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "box"]);
    let call = |line: &str| {
        d.exec(
            "box",
            &format!(
                "wget -q -O - --header 'Content-Type: text/plain' --post-data '{line}' \
                 http://169.254.169.254/api/exec 2>&1; echo \" status=$?\""
            ),
        )
    };
    // Without the owner's grant: refused.
    let out = call("ls --json");
    assert!(out.contains("403") && out.contains("status=1"), "{out}");
    // With it: `ls` and `cp` work, as the owner, and nothing else does.
    d.lobby_ok(&alice, &["share", "api", "box", "--cmds", "ls,cp"]);
    let shown = d.lobby_ok(&alice, &["share", "show", "box"]);
    assert!(shown.contains("cp,ls"), "{shown}");
    let out = call("ls --json");
    assert!(out.contains("\"box\"") && out.contains("status=0"), "{out}");
    let out = call("cp box box-try --json");
    assert!(
        out.contains("\"box-try\"") && out.contains("status=0"),
        "{out}"
    );
    assert!(d.lobby_ok(&alice, &["ls"]).contains("box-try"));
    let out = call("rm box-try");
    assert!(out.contains("403") && out.contains("status=1"), "{out}");
    // By default the grant reaches the VM itself only: not the clone it just made.
    let out = call("ls --json");
    assert!(!out.contains("box-try"), "{out}");
    let out = call("cp box-try other --json");
    assert!(out.contains("403"), "{out}");
    // With --any-vm, every VM of its owner.
    d.lobby_ok(&alice, &["share", "api", "box", "--cmds", "ls", "--any-vm"]);
    let out = call("ls --json");
    assert!(out.contains("box-try") && out.contains("status=0"), "{out}");
    // The grant taken back: refused again.
    d.lobby_ok(&alice, &["share", "api", "box", "--off"]);
    let out = call("ls --json");
    assert!(out.contains("403"), "{out}");
}

#[test]
fn web_api_bad_input_gets_clear_errors() {
    let d = Daemon::start();
    let api = Api {
        d: &d,
        ca: PathBuf::from(d.ok(&["ca", "path"]).trim()),
    };
    let (alice, bob) = (Key::new("alice"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    let exp = now() + 3600;
    let token = signed_token(&alice, &format!("{{\"exp\": {exp}, \"cmds\": [\"all\"]}}"));

    // A broken command line, unknown command, broken JSON.
    let a = api.with_token(&token, "new --name 'x");
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("unterminated"), "{a:?}");
    let a = api.with_token(&token, "frobnicate --json");
    assert_eq!((a.status, a.exit), (400, Some(2)), "{a:?}");
    assert!(a.body.contains("\"usage\""), "{a:?}");
    let a = api.exec(
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/json",
        ],
        "{\"cmd\": \"ls\"",
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("not valid JSON"), "{a:?}");
    let a = api.exec(
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/json",
        ],
        "{\"argv\": [\"ls\", \"--json\"]}",
    );
    assert_eq!(a.status, 200, "{a:?}");
    // A garbage bearer.
    let a = api.with_token("nooksig.@@@.###", "ls");
    assert_eq!(a.status, 401, "{a:?}");

    // A 1 MiB body: 413 before anything runs.
    let dir = tempfile::tempdir().expect("tmp");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'a'; 1 << 20]).expect("write");
    let out = api.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "--data-binary",
        &format!("@{}", big.display()),
        &api.url("/api/exec"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");

    // The dashboard's session works from the dashboard's own pages, and never cross-site.
    let jar = dir.path().join("jar");
    login(&api, &alice, &jar);
    let j = jar.display().to_string();
    let own = format!("Origin: {}", api.url(""));
    let a = api.exec(&["-b", &j, "-H", &own], "whoami --json");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.contains("alice@example.com"), "{a:?}");
    let a = api.exec(
        &["-b", &j, "-H", "Origin: https://evil.example"],
        "ls --json",
    );
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.body.contains("cross_site"), "{a:?}");
    let a = api.exec(&["-b", &j], "ls --json");
    assert_eq!(a.status, 403, "a POST with no Origin at all: {a:?}");
    // signup and ssh-key confirm prove an SSH key: never over HTTPS.
    let a = api.exec(&["-b", &j, "-H", &own], "ssh-key confirm 123456 --json");
    assert_eq!(a.status, 403, "{a:?}");

    // A terminal to a VM one may not see looks exactly like one to a VM that does not exist.
    d.lobby_ok(&bob, &["new", "--image", "tiny", "--name", "bobs"]);
    let ws = |vm: &str| {
        let out = api.curl(&[
            "--http1.1",
            "-b",
            &j,
            "-H",
            &own,
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-w",
            "\n%{http_code}",
            &api.url(&format!("/vm/{vm}/terminal")),
        ]);
        String::from_utf8_lossy(&out.stdout).replace(vm, "VM")
    };
    let (theirs, none) = (ws("bobs"), ws("nothing-here"));
    assert!(theirs.ends_with("404"), "{theirs}");
    assert_eq!(theirs, none);
    // A terminal opened from another site is refused before anything starts.
    let out = api.curl(&[
        "--http1.1",
        "-b",
        &j,
        "-H",
        "Origin: https://evil.example",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &api.url("/vm/bobs/terminal"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}
