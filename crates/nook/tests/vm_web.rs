//! System tests (root, real QEMU guests): the HTTPS edge in front of real VMs with the real
//! curl and git clients: private by default, login through a `browser` link, sharing with
//! people and links (revoked on the next request), public VMs, identity headers a client
//! cannot forge, host-bound cookies, machine tokens with git, VM ports, a VM that is down,
//! and email login links through a local SMTP sink.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Daemon, Key};

const DOMAIN: &str = "nook.localhost";
/// Where VMs are by default: a site of their own beside the dashboard's `nook.localhost`.
const VM_DOMAIN: &str = "nook-vm.localhost";

/// A web app in the VM: static files, a CGI script echoing what nook tells it, and a bare git
/// repository served over git's dumb HTTP protocol.
fn start_app(d: &Daemon, vm: &str, git_tar_b64: &str) {
    d.exec(
        vm,
        &format!(
            "mkdir -p /www/cgi-bin && echo hello-from-{vm} > /www/index.html && \
             printf '%s\\n' '#!/bin/sh' 'echo Content-Type: text/plain' 'echo' \
               'echo \"user=$HTTP_X_NOOK_USER_EMAIL id=$HTTP_X_NOOK_USER_ID proto=$HTTP_X_FORWARDED_PROTO host=$HTTP_X_FORWARDED_HOST xff=$HTTP_X_FORWARDED_FOR auth=$HTTP_AUTHORIZATION cookie=$HTTP_COOKIE\"' \
               > /www/cgi-bin/who && chmod +x /www/cgi-bin/who && \
             echo {git_tar_b64} | base64 -d | tar -C /www -xf - && \
             httpd -p 80 -h /www && httpd -p 8991 -h /www"
        ),
    );
}

/// A bare repository with one commit, packed for `start_app`.
fn git_repo_tar_b64(dir: &std::path::Path) -> String {
    let run = |args: &[&str], cwd: &std::path::Path| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(cwd)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let work = dir.join("work");
    std::fs::create_dir_all(&work).expect("dir");
    run(&["git", "init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "cloned through nook\n").expect("write");
    run(&["git", "add", "README"], &work);
    run(&["git", "commit", "-q", "-m", "first"], &work);
    run(&["git", "clone", "-q", "--bare", "work", "repo.git"], dir);
    run(&["git", "update-server-info"], &dir.join("repo.git"));
    let tar = run(&["tar", "-cf", "-", "repo.git"], dir);
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(tar)
}

struct Web<'a> {
    d: &'a Daemon,
    ca: PathBuf,
    /// Where VMs are: DOMAIN, or the daemon's `--vm-domain`.
    vm_domain: &'static str,
}

impl Web<'_> {
    fn url(&self, host: Option<&str>, path: &str) -> String {
        match host {
            Some(vm) => format!(
                "https://{vm}.{}:{}{path}",
                self.vm_domain, self.d.https_port
            ),
            None => format!("https://{DOMAIN}:{}{path}", self.d.https_port),
        }
    }

    /// The real curl with nook's CA trusted and every nook host resolving to this machine.
    fn curl(&self, jar: Option<&std::path::Path>, args: &[&str]) -> Output {
        let port = self.d.https_port;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-m", "20", "--cacert"]).arg(&self.ca);
        for host in [
            DOMAIN.to_string(),
            format!("web.{DOMAIN}"),
            format!("web.{}", self.vm_domain),
            format!("other.{}", self.vm_domain),
        ] {
            for p in [port, 8991] {
                cmd.args(["--resolve", &format!("{host}:{p}:127.0.0.1")]);
            }
        }
        if let Some(jar) = jar {
            cmd.arg("-b").arg(jar).arg("-c").arg(jar);
        }
        cmd.args(args).output().expect("curl")
    }

    /// The status code alone (no redirects followed); "000" when there was no HTTP answer.
    fn status(&self, jar: Option<&std::path::Path>, extra: &[&str], url: &str) -> String {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        args.push(url);
        String::from_utf8_lossy(&self.curl(jar, &args).stdout).into_owned()
    }

    /// Follows redirects like a browser; returns (final status, body).
    fn browse(&self, jar: Option<&std::path::Path>, url: &str) -> (u16, String) {
        let out = self.curl(
            jar,
            &["-L", "-H", "Accept: text/html", "-w", "\n%{http_code}", url],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The real git client, trusting nook's CA, with web.DOMAIN resolving to this machine
    /// and no prompt for credentials.
    fn git_clone(&self, url: &str, dest: &std::path::Path) -> Output {
        let resolve = format!(
            "http.curloptResolve=web.{VM_DOMAIN}:{}:127.0.0.1",
            self.d.https_port
        );
        Command::new("git")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_SSL_CAINFO", &self.ca)
            .args(["-c", &resolve, "clone", "-q", url])
            .arg(dest)
            .output()
            .expect("git")
    }

    /// Logs `key`'s account in through a `browser` link, into a fresh cookie jar.
    fn login(&self, key: &Key, jar: &std::path::Path) {
        let link = self.d.lobby_ok(key, &["browser"]);
        let url = link
            .lines()
            .find(|l| l.starts_with("https://"))
            .expect("a login link")
            .trim()
            .to_string();
        let (code, page) = self.browse(Some(jar), &url);
        assert_eq!(code, 200, "login page: {page}");
        let (code, body) = self.press_sign_in(jar, &page);
        assert_eq!(code, 200, "after signing in: {body}");
    }

    /// Presses the sign-in button of the page a login link shows a signed-out browser: POSTs
    /// its form from the dashboard's own origin, as the browser would, following redirects.
    fn press_sign_in(&self, jar: &std::path::Path, page: &str) -> (u16, String) {
        let form = page.split("<form").nth(1).unwrap_or("");
        let form = form.split("</form>").next().unwrap_or("");
        let mut fields = Vec::new();
        for input in form.split("<input").skip(1) {
            let attr = |name: &str| {
                let key = format!("{name}=\"");
                let start = input.find(&key)? + key.len();
                let end = input[start..].find('"')? + start;
                Some(
                    input[start..end]
                        .replace("&quot;", "\"")
                        .replace("&#39;", "'")
                        .replace("&lt;", "<")
                        .replace("&gt;", ">")
                        .replace("&amp;", "&"),
                )
            };
            if let Some(name) = attr("name") {
                fields.push(format!("{name}={}", attr("value").unwrap_or_default()));
            }
        }
        assert!(
            fields.iter().any(|f| f.starts_with("token=")),
            "no sign-in form: {page}"
        );
        let origin = format!("Origin: {}", self.url(None, ""));
        let mut args = vec!["-L", "-H", "Accept: text/html", "-H", &origin];
        for f in &fields {
            args.extend(["--data-urlencode", f.as_str()]);
        }
        let url = self.url(None, "/__nook/login");
        args.extend(["-w", "\n%{http_code}", url.as_str()]);
        let out = self.curl(Some(jar), &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

fn who(web: &Web, jar: Option<&std::path::Path>) -> (u16, String) {
    web.browse(jar, &web.url(Some("web"), "/cgi-bin/who"))
}

#[test]
fn vm_web_private_by_default_shared_like_a_doc() {
    let d = Daemon::start_with(&["--vm-ports", "8990-8993"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = PathBuf::from(d.ok(&["ca", "path"]).trim());
    assert!(ca.is_file(), "{}", ca.display());
    let web = Web {
        d: &d,
        ca,
        vm_domain: VM_DOMAIN,
    };
    let (alice, bob) = (Key::new("alice"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "web"]);
    start_app(&d, "web", &git_repo_tar_b64(tmp.path()));

    // Anonymous: a browser is sent to log in, other clients get 401; nothing reaches the VM.
    let out = web.curl(
        None,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Accept: text/html",
            &web.url(Some("web"), "/cgi-bin/who"),
        ],
    );
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.starts_with("30"), "{status}");
    assert!(
        status.contains(&format!("{DOMAIN}:{}", d.https_port)),
        "{status}"
    );
    let code = web.status(None, &[], &web.url(Some("web"), "/"));
    assert_eq!(code, "401");

    // Alice logs in with a `browser` link; the handoff gives web.DOMAIN its own cookie.
    let alice_jar = tmp.path().join("alice.jar");
    web.login(&alice, &alice_jar);
    let (code, body) = who(&web, Some(&alice_jar));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user=alice@example.com"), "{body}");
    assert!(body.contains("proto=https"), "{body}");
    assert!(body.contains(&format!("host=web.{VM_DOMAIN}")), "{body}");
    assert!(body.contains("xff=127.0.0.1"), "{body}");
    assert!(
        body.contains("cookie= ") || body.ends_with("cookie=\n") || body.ends_with("cookie="),
        "nook's cookie reached the VM: {body}"
    );
    // Identity headers cannot be forged.
    let out = web.curl(
        Some(&alice_jar),
        &[
            "-H",
            "X-Nook-User-Email: mallory@example.com",
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            &web.url(Some("web"), "/cgi-bin/who"),
        ],
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("user=alice@example.com") && !body.contains("6.6.6.6"),
        "{body}"
    );
    // Host names in any case, with or without the port, name the same VM.
    let (code, body) = web.browse(
        Some(&alice_jar),
        &format!("https://WEB.Nook-VM.LocalHost:{}/cgi-bin/who", d.https_port),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user=alice@example.com"), "{body}");
    // Absurd input gets a status, and the edge carries on.
    let huge = format!("X-Huge: {}", "a".repeat(40 * 1024));
    let code = web.status(
        Some(&alice_jar),
        &["--http1.1", "-H", &huge],
        &web.url(Some("web"), "/"),
    );
    assert_eq!(code, "431");
    let code = web.status(
        None,
        &[
            "--resolve",
            &format!("a.b.{DOMAIN}:{}:127.0.0.1", d.https_port),
        ],
        &format!("https://a.b.{DOMAIN}:{}/", d.https_port),
    );
    assert!(
        code == "421" || code == "000",
        "a name two labels deep: {code}"
    );
    assert_eq!(who(&web, Some(&alice_jar)).0, 200);

    // The dashboard lists her VM.
    let (code, page) = web.browse(Some(&alice_jar), &web.url(None, "/"));
    assert_eq!(code, 200);
    assert!(page.contains("web"), "{page}");

    // The cookie of web.DOMAIN is no good on another host, even when sent by hand.
    let jar_text = std::fs::read_to_string(&alice_jar).expect("jar");
    let cookie = jar_text
        .lines()
        .find(|l| l.contains(&format!("web.{VM_DOMAIN}")) && l.contains("nook"))
        .and_then(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Some(format!("{}={}", f.get(5)?, f.get(6)?))
        })
        .expect("a session cookie for web.DOMAIN");
    d.lobby_ok(&alice, &["new", "--image", "tiny", "--name", "other"]);
    let code = web.status(
        None,
        &[
            "-H",
            &format!("Cookie: {cookie}"),
            "-H",
            "Accept: text/html",
        ],
        &web.url(Some("other"), "/"),
    );
    assert!(
        code.starts_with("30"),
        "other.DOMAIN accepted web's cookie: {code}"
    );
    let out = web.curl(
        None,
        &["-H", &format!("Cookie: {cookie}"), &web.url(None, "/")],
    );
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        !page.contains("alice@example.com"),
        "the dashboard accepted web's cookie: {page}"
    );

    // Bob is refused (like a VM that does not exist), let in by a share, refused again after.
    let bob_jar = tmp.path().join("bob.jar");
    web.login(&bob, &bob_jar);
    let (code, nothing) = who(&web, Some(&bob_jar));
    assert_eq!(code, 404);
    let (code_missing, missing) = web.browse(Some(&bob_jar), &web.url(Some("nosuchvm"), "/"));
    assert_eq!(
        (code_missing, missing.replace("nosuchvm", "web")),
        (404, nothing.clone()),
        "a foreign VM must look missing"
    );
    d.lobby_ok(&alice, &["share", "add", "web", "bob@example.com"]);
    let (code, body) = who(&web, Some(&bob_jar));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user=bob@example.com"), "{body}");
    let shown = d.lobby_ok(&alice, &["share", "show", "web"]);
    assert!(shown.contains("bob@example.com (viewer)"), "{shown}");
    d.lobby_ok(&alice, &["share", "remove", "web", "bob@example.com"]);
    assert_eq!(
        who(&web, Some(&bob_jar)).0,
        404,
        "revocation must apply to the next request"
    );

    // A share link: whoever opens it and logs in gets in, until it is removed.
    let out: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["share", "add-link", "web", "--json"]))
            .expect("json");
    let (link, token) = (
        out["url"].as_str().expect("url"),
        out["token"].as_str().expect("token"),
    );
    let (code, body) = web.browse(Some(&bob_jar), link);
    assert_eq!(code, 200, "{body}");
    assert_eq!(who(&web, Some(&bob_jar)).0, 200);
    d.lobby_ok(&alice, &["share", "remove-link", "web", token]);
    assert_eq!(who(&web, Some(&bob_jar)).0, 404);

    // Public: anyone, no login; identity only for those logged in.
    d.lobby_ok(&alice, &["share", "set-public", "web"]);
    let (code, body) = who(&web, None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user= "), "{body}");
    d.lobby_ok(&alice, &["share", "set-private", "web"]);
    let code = web.status(None, &[], &web.url(Some("web"), "/"));
    assert_eq!(code, "401");

    // A VM port (8991) on its own listener, for those with access.
    let out = web.curl(
        Some(&alice_jar),
        &[
            "-w",
            "\n%{http_code}",
            &format!("https://web.{VM_DOMAIN}:8991/cgi-bin/who"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("200") && text.contains("user=alice@example.com"),
        "{text}"
    );

    // `share port` moves the VM's main URL to another port, takes effect on the next request,
    // and `default` moves it back; a bad port is a clear error.
    d.exec(
        "web",
        "mkdir -p /www2 && echo from-8992 > /www2/index.html && httpd -p 8992 -h /www2",
    );
    d.lobby_ok(&alice, &["share", "port", "web", "8992"]);
    let (code, body) = web.browse(Some(&alice_jar), &web.url(Some("web"), "/"));
    assert_eq!((code, body.trim()), (200, "from-8992"), "{body}");
    d.lobby_ok(&alice, &["share", "port", "web", "default"]);
    let (code, body) = web.browse(Some(&alice_jar), &web.url(Some("web"), "/"));
    assert_eq!((code, body.trim()), (200, "hello-from-web"), "{body}");
    let out = d.ssh(&alice, "lobby", &["share", "port", "web", "0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a port"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A machine token: Bearer, basic-auth password, and the real git client.
    let tok: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["token", "create", "--vm", "web", "--json"]))
            .expect("json");
    let token = tok["token"].as_str().expect("token");
    let out = web.curl(
        None,
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            &web.url(Some("web"), "/cgi-bin/who"),
        ],
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("user=alice@example.com") && body.contains("auth= "),
        "{body}"
    );
    let out = web.curl(
        None,
        &[
            "-u",
            &format!("git:{token}"),
            &web.url(Some("web"), "/cgi-bin/who"),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("user=alice@example.com"));
    let clone_dir = tmp.path().join("clone");
    let out = web.git_clone(
        &format!(
            "https://git:{token}@web.{VM_DOMAIN}:{}/repo.git",
            d.https_port
        ),
        &clone_dir,
    );
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(clone_dir.join("README")).expect("README"),
        "cloned through nook\n"
    );
    // Without the token, git is refused.
    let out = web.git_clone(
        &format!("https://web.{VM_DOMAIN}:{}/repo.git", d.https_port),
        &tmp.path().join("refused"),
    );
    assert!(!out.status.success());

    // Tokens are listed without their secrets, and a revoked one stops working at once.
    let listed = d.lobby_ok(&alice, &["token", "list", "--json"]);
    let id = tok["id"].as_str().expect("id");
    assert!(
        listed.contains(id) && listed.contains("\"web\""),
        "{listed}"
    );
    assert!(!listed.contains(token), "a token's secret was listed");
    let bearer = |token: &str| {
        let out = web.curl(
            None,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &format!("Authorization: Bearer {token}"),
                &web.url(Some("web"), "/cgi-bin/who"),
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(bearer(token), "200");
    let out = d.ssh(&bob, "lobby", &["token", "revoke", id, "--json"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token_not_found"),
        "bob revoked alice's token"
    );
    d.lobby_ok(&alice, &["token", "revoke", id]);
    assert_ne!(bearer(token), "200", "a revoked token still works");
    let out = d.ssh(
        &alice,
        "lobby",
        &["token", "create", "--vm", "web", "--days", "0"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a token that never works was made"
    );

    // A VM that is down gets a friendly 502 page naming it (its address must not be routed
    // anywhere else while it is stopped).
    d.lobby_ok(&alice, &["stop", "web"]);
    let (code, page) = who(&web, Some(&alice_jar));
    assert_eq!(code, 502, "{page}");
    assert!(page.contains("<code>web</code>"), "{page}");

    // Logout ends the dashboard session.
    let (code, _) = web.browse(Some(&alice_jar), &web.url(None, "/__nook/logout"));
    assert!(code == 200 || code == 303, "{code}");
    let (_, page) = web.browse(Some(&alice_jar), &web.url(None, "/"));
    assert!(
        !page.contains("alice@example.com"),
        "still logged in: {page}"
    );
    // ... and her session on every VM host: web.DOMAIN sends the browser to sign in again
    // (before, its cookie still worked and reached the stopped VM: a 502).
    let (code, page) = who(&web, Some(&alice_jar));
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Sign in to nook"), "still signed in: {page}");
}

/// A local SMTP sink: accepts every message and hands over its text.
fn smtp_sink() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut out = conn.try_clone().expect("clone");
            let mut lines = BufReader::new(conn);
            let _ = out.write_all(b"220 sink\r\n");
            let (mut line, mut data, mut in_data) = (String::new(), String::new(), false);
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                let reply: &[u8] = if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        let _ = tx.send(std::mem::take(&mut data));
                        b"250 queued\r\n"
                    } else {
                        data.push_str(&line);
                        b""
                    }
                } else {
                    match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                        "DATA" => {
                            in_data = true;
                            b"354 go on\r\n"
                        }
                        "QUIT" => b"221 bye\r\n",
                        _ => b"250 ok\r\n",
                    }
                };
                let _ = out.write_all(reply);
                line.clear();
            }
        }
    });
    (port, rx)
}

#[test]
fn vm_web_email_magic_link_logs_in_through_smtp() {
    let (smtp_port, mails) = smtp_sink();
    let d = Daemon::start_with(&[
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        &smtp_port.to_string(),
        "--smtp-security",
        "none",
    ]);
    let tmp = tempfile::tempdir().expect("tmp");
    let web = Web {
        vm_domain: VM_DOMAIN,
        d: &d,
        ca: PathBuf::from(d.ok(&["ca", "path"]).trim()),
    };
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    let (_, page) = web.browse(None, &web.url(None, "/"));
    assert!(
        page.contains("email"),
        "the login page offers email: {page}"
    );

    // An address nook does not know gets the same page, and no mail.
    let post = |email: &str| {
        web.curl(
            None,
            &[
                "-H",
                &format!("Origin: {}", web.url(None, "")),
                "-w",
                "\n%{http_code}",
                "--data-urlencode",
                &format!("email={email}"),
                &web.url(None, "/__nook/email"),
            ],
        )
    };
    let unknown = String::from_utf8_lossy(&post("nobody@example.com").stdout).into_owned();
    let known = String::from_utf8_lossy(&post("alice@example.com").stdout).into_owned();
    assert_eq!(unknown, known);
    let mail = mails
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a login mail");
    assert!(mails.try_recv().is_err(), "mail sent to an unknown address");
    assert!(mail.contains("alice@example.com"), "{mail}");
    // Undo quoted-printable soft breaks and escapes, then take the link.
    let text = mail.replace("=\r\n", "").replace("=3D", "=");
    let link = text
        .split_whitespace()
        .find(|w| w.starts_with("https://") && w.contains("/__nook/login?token="))
        .unwrap_or_else(|| panic!("no login link in {text}"));
    let jar = tmp.path().join("jar");
    let (code, confirm) = web.browse(Some(&jar), link);
    assert_eq!(code, 200, "{confirm}");
    let (code, page) = web.press_sign_in(&jar, &confirm);
    assert_eq!(code, 200, "{page}");
    let (_, page) = web.browse(Some(&jar), &web.url(None, "/"));
    assert!(page.contains("alice@example.com"), "not logged in: {page}");
    // The link works once.
    let (code, _) = web.press_sign_in(&tmp.path().join("jar2"), &confirm);
    assert_eq!(code, 400);
}

/// With SMTP the default signup policy is `email`: an account is held until the link mailed to
/// its address is followed, so claiming someone else's address gets nothing, and that address
/// gets no email login into the claimed account.
#[test]
fn vm_web_attack_signup_as_someone_elses_email_is_held_until_the_mail_is_followed() {
    let (smtp_port, mails) = smtp_sink();
    let d = Daemon::start_with(&[
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        &smtp_port.to_string(),
        "--smtp-security",
        "none",
    ]);
    let tmp = tempfile::tempdir().expect("tmp");
    let web = Web {
        vm_domain: VM_DOMAIN,
        d: &d,
        ca: PathBuf::from(d.ok(&["ca", "path"]).trim()),
    };
    let (owner, mallory) = (Key::new("owner"), Key::new("mallory"));
    d.signup(&owner, "owner@example.com");

    let made = d.lobby_ok(&mallory, &["signup", "victim@example.com"]);
    assert!(made.contains("confirm the address"), "{made}");
    let confirm_mail = mails
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a confirmation mail");
    assert!(
        confirm_mail.contains("victim@example.com"),
        "{confirm_mail}"
    );
    let out = d.ssh(&mallory, "lobby", &["new", "--image", "tiny", "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("email_unconfirmed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Asking again within a minute mails nothing more.
    let again = d.ssh(&mallory, "lobby", &["signup", "victim@example.com"]);
    assert!(!again.status.success());

    // The address's owner asking for an email login gets no link into Mallory's account.
    let post = web.curl(
        None,
        &[
            "-H",
            &format!("Origin: {}", web.url(None, "")),
            "--data-urlencode",
            "email=victim@example.com",
            &web.url(None, "/__nook/email"),
        ],
    );
    assert!(post.status.success());
    assert!(
        mails
            .recv_timeout(std::time::Duration::from_secs(3))
            .is_err(),
        "an email login was mailed for an unconfirmed account"
    );

    // Following the mailed link confirms the address (here, as if Mallory owned it).
    let text = confirm_mail.replace("=\r\n", "").replace("=3D", "=");
    let link = text
        .split_whitespace()
        .find(|w| w.starts_with("https://") && w.contains("/__nook/login?token="))
        .unwrap_or_else(|| panic!("no link in {text}"));
    let jar = tmp.path().join("jar");
    let (code, confirm) = web.browse(Some(&jar), link);
    assert_eq!(code, 200, "{confirm}");
    let (code, page) = web.press_sign_in(&jar, &confirm);
    assert_eq!(code, 200, "{page}");
    let me: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&mallory, &["whoami", "--json"])).expect("whoami");
    assert_eq!(me["email_verified"], true, "{me}");
    d.lobby_ok(&mallory, &["ls"]);
}

/// `--vm-domain` puts VMs on a registrable domain of the admin's choosing (the default is
/// `nook-vm.localhost`): they are another site than the dashboard (and `VM.DOMAIN` is nothing
/// at all), while signing in, the handoff, the certificate and the URLs nook prints all follow
/// them there.
#[test]
fn vm_web_vm_domain_puts_vms_on_a_site_of_their_own() {
    const BOXES: &str = "boxes.localhost";
    let d = Daemon::start_with(&["--vm-domain", BOXES]);
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = PathBuf::from(d.ok(&["ca", "path"]).trim());
    let web = Web {
        d: &d,
        ca,
        vm_domain: BOXES,
    };
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    let made = d.lobby_ok(
        &alice,
        &["new", "--image", "tiny", "--name", "web", "--json"],
    );
    let made: serde_json::Value = serde_json::from_str(&made).expect("new --json");
    assert_eq!(
        made["url"],
        format!("https://web.{BOXES}:{}/", d.https_port),
        "{made}"
    );
    start_app(&d, "web", &git_repo_tar_b64(tmp.path()));

    let jar = tmp.path().join("alice.jar");
    web.login(&alice, &jar);
    let (code, body) = who(&web, Some(&jar));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("user=alice@example.com"), "{body}");
    assert!(body.contains(&format!("host=web.{BOXES}")), "{body}");

    // Under the dashboard's domain there are no VMs any more.
    let code = web.status(
        Some(&jar),
        &[],
        &format!("https://web.{DOMAIN}:{}/", d.https_port),
    );
    assert_ne!(code, "200", "web.{DOMAIN} still reaches the VM");
    let (code, page) = web.browse(Some(&jar), &web.url(None, "/"));
    assert_eq!(code, 200);
    assert!(page.contains(&format!("web.{BOXES}")), "{page}");
}
