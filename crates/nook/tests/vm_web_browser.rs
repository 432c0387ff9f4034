//! System test (root, a real default-image guest): headless Debian chromium logs in through a
//! `browser` link (pressing its sign-in button) and opens a private VM's page, whose script
//! talks WebSocket to the VM through the edge; an SSE stream arrives event by event through
//! the edge with the real curl. The local CA is trusted through an NSS database, as a user would; no certificate error is
//! ignored. `*.localhost` resolves to loopback in chromium by itself. A collaborator may SSH
//! into the VM; a viewer may not.

mod common;
// The DevTools-protocol driver the edge's own browser test uses (std and serde_json only).
#[path = "../../edge/tests/common/cdp.rs"]
mod cdp;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Key};

/// The app in the VM: a page showing who nook says the viewer is, a WebSocket echo and an SSE
/// stream of three events half a second apart. Python's standard library only.
const APP: &str = r#"
import base64, hashlib, http.server, time
PAGE = """<!doctype html><html><body><p id="user">USER</p><p id="ws">pending</p>
<script>
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onopen = () => ws.send("hello");
ws.onmessage = (e) => { document.getElementById("ws").textContent = e.data; };
</script></body></html>"""
class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/ws":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
            self.end_headers()
            self.wfile.flush()
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                op, n = head[0] & 15, head[1] & 127
                if n == 126:
                    n = int.from_bytes(self.rfile.read(2), "big")
                mask = self.rfile.read(4) if head[1] & 128 else bytes(4)
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
                if op == 8:
                    return
                if op == 1:
                    out = b"echo:" + data
                    self.wfile.write(bytes([0x81, len(out)]) + out)
                    self.wfile.flush()
        elif self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(3):
                self.wfile.write(f"data: tick {i}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.5)
            self.close_connection = True
        else:
            body = PAGE.replace("USER", self.headers.get("X-Nook-User-Email", "nobody")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
http.server.ThreadingHTTPServer(("", 80), App).serve_forever()
"#;

/// A throwaway HOME whose NSS database trusts `ca` for web sites.
fn trusting_home(ca: &Path) -> tempfile::TempDir {
    let home = tempfile::tempdir().expect("tmp");
    let nssdb = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).expect("nssdb");
    let db = format!("sql:{}", nssdb.display());
    for args in [
        vec!["-N", "-d", &db, "--empty-password"],
        vec!["-A", "-d", &db, "-t", "C,,", "-n", "nook-local-ca", "-i"],
    ] {
        let mut cmd = Command::new("certutil");
        cmd.args(&args);
        if args[0] == "-A" {
            cmd.arg(ca);
        }
        assert!(
            cmd.status()
                .expect("certutil (apt-get install libnss3-tools)")
                .success()
        );
    }
    home
}

#[test]
fn vm_web_browser_websocket_and_sse_through_a_real_guest() {
    let d = Daemon::start();
    let ca = d.ok(&["ca", "path"]).trim().to_string();
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--name", "app"]);
    d.exec(
        "app",
        &format!(
            "cat > /root/app.py <<'EOF'\n{APP}\nEOF\nsetsid python3 /root/app.py </dev/null >/root/app.log 2>&1 &"
        ),
    );
    let port = d.https_port;
    let vm_url = |path: &str| format!("https://app.nook-vm.localhost:{port}{path}");

    // A real browser: the login link, then the private page, whose script's WebSocket
    // echo comes back through the edge.
    let home = trusting_home(Path::new(&ca));
    let link = d.lobby_ok(&alice, &["browser"]);
    let link = link
        .lines()
        .find(|l| l.starts_with("https://"))
        .expect("a login link")
        .trim();
    let mut browser = cdp::Browser::launch(home.path());
    // A signed-out browser is asked to confirm the link with a click.
    browser.goto(link);
    browser.wait_for("id=\"sign-in\"");
    browser.click("#sign-in");
    browser.wait_for("Your VMs");
    let mut dom = String::new();
    for _ in 0..10 {
        browser.goto(&vm_url("/"));
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !dom.contains("echo:hello") {
            std::thread::sleep(Duration::from_millis(200));
            dom = browser.html();
        }
        if dom.contains("echo:hello") {
            break;
        }
    }
    drop(browser);
    assert!(
        dom.contains(r#"<p id="user">alice@example.com</p>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<p id="ws">echo:hello</p>"#), "{dom}");

    // A collaborator may also SSH in; a viewer may not.
    let bob = Key::new("bob");
    d.signup(&bob, "bob@example.com");
    d.lobby_ok(&alice, &["share", "add", "app", "bob@example.com"]);
    let out = d.ssh(&bob, "app", &["hostname"]);
    assert!(!out.status.success(), "a viewer got a shell");
    d.lobby_ok(
        &alice,
        &[
            "share",
            "add",
            "app",
            "bob@example.com",
            "--role",
            "collaborator",
        ],
    );
    let out = d.ssh(&bob, "app", &["hostname"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "app\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SSE through the edge: each event arrives as the VM sends it, not all at the end.
    let token: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&alice, &["token", "create", "--vm", "app", "--json"]))
            .expect("json");
    let token = token["token"].as_str().expect("token");
    let mut curl = Command::new("curl")
        .args(["-sSN", "--cacert", &ca])
        .args([
            "--resolve",
            &format!("app.nook-vm.localhost:{port}:127.0.0.1"),
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(vm_url("/events"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let started = Instant::now();
    let mut arrivals = Vec::new();
    for line in std::io::BufReader::new(curl.stdout.take().expect("stdout")).lines() {
        let line = line.expect("line");
        if let Some(event) = line.strip_prefix("data: ") {
            arrivals.push((event.to_string(), started.elapsed()));
        }
    }
    assert!(curl.wait().expect("curl").success());
    let events: Vec<&str> = arrivals.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(events, ["tick 0", "tick 1", "tick 2"]);
    // The VM waits 0.5 s between events; buffered, they would all arrive together.
    let spread = arrivals[2].1 - arrivals[0].1;
    assert!(spread >= Duration::from_millis(800), "{arrivals:?}");
}
