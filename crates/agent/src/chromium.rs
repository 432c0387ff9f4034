//! The `browser` tool's browser: headless chromium on the host, shut off from the host.
//!
//! Chromium runs as `nobody`, with its own sandbox, in a network namespace of its own that has
//! only a loopback device. The one thing listening there is this module's proxy, which
//! connects to the VM's address (for `localhost` too) and to public addresses, and to nothing
//! else: not the host's services, not other VMs, not the metadata address. nook drives it
//! over `--remote-debugging-pipe` (the DevTools protocol on two pipes), so no debugging port
//! is open anywhere.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Notify, oneshot};

use crate::{BoxFuture, Browser, BrowserAction, BrowserOutcome, WorkspaceError};

/// The user chromium runs as.
const NOBODY: u32 = 65534;
const VIEWPORT: (u32, u32) = (1280, 800);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const LOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// Console lines kept between two `console` actions.
const CONSOLE_LINES: usize = 200;
/// The largest DevTools message taken (a screenshot is a few hundred KiB).
const MAX_MESSAGE: usize = 32 << 20;
/// The biggest screenshot handed to the model: 3.5 MiB is under 5 MB once in base64.
const MAX_SCREENSHOT: usize = 3584 << 10;
const MAX_REQUEST_HEAD: usize = 32 << 10;

#[derive(Clone)]
pub struct ChromiumConfig {
    pub binary: PathBuf,
    /// The VM's address: `localhost` in the browser means this.
    pub vm_ip: Ipv4Addr,
    /// Names this daemon's browsers, so [`sweep`] after a crash touches only its own.
    pub tag: String,
    /// The host's egress policy for an address outside the VM (the daemon's block list):
    /// the browser reaches no more than the VM itself could.
    pub allow: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    /// Puts one of the browser's processes where its VM's account is held (the account's
    /// cgroup), so the envelope bounds the browser as it bounds the VM. None runs it
    /// unconfined (a VM outside any envelope). A failure stops the launch.
    pub confine: Option<Confine>,
}

pub type Confine = Arc<dyn Fn(u32) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for ChromiumConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromiumConfig")
            .field("binary", &self.binary)
            .field("vm_ip", &self.vm_ip)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// The profile lives in the browser's own /tmp (a tmpfs in its mount namespace), so it is
/// gone with the browser and no other browser can see it.
fn profile_prefix(tag: &str) -> String {
    format!("/tmp/nook-browser-{tag}-")
}

/// Ends the browsers a daemon that died left behind (found by their profile's name on their
/// command line). Returns how many it ended.
pub fn sweep(tag: &str) -> usize {
    let flag = format!("--user-data-dir={}", profile_prefix(tag));
    let mut ended = 0;
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let found = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg.starts_with(flag.as_bytes()));
            if found
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
            {
                ended += 1;
            }
        }
    }
    ended
}

/// Confines `unshare` (`pid`) and the shell it forked, before the shell becomes chromium:
/// every browser process comes after them and inherits the group. Waits for the shell:
/// `unshare` forks it right after making the namespaces.
async fn confine_sandbox(pid: u32, confine: &Confine) -> Result<(), WorkspaceError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let shell = loop {
        if let Some(child) = child_of(pid) {
            break child;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err("the browser's sandbox did not start"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for p in [pid, shell] {
        confine(p).map_err(|e| {
            err(format!(
                "could not hold the browser to the VM's envelope: {e}"
            ))
        })?;
    }
    Ok(())
}

/// A child of `pid`, found by its parent in `/proc/*/stat`.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let child: u32 = p.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
        // After the command name, which may hold spaces and parentheses: state, then ppid.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == pid).then_some(child)
    })
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

pub struct Chromium {
    child: tokio::sync::Mutex<Child>,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    next_id: AtomicU64,
    session: String,
    console: Arc<Mutex<VecDeque<String>>>,
    loaded: Arc<Notify>,
    proxy: tokio::task::JoinHandle<()>,
    /// Set when the DevTools stream ended: the browser is of no more use.
    dead: Arc<std::sync::atomic::AtomicBool>,
    stderr: Arc<Mutex<String>>,
}

fn err(m: impl Into<String>) -> WorkspaceError {
    WorkspaceError(m.into())
}

impl Chromium {
    pub async fn launch(cfg: &ChromiumConfig) -> Result<Arc<Chromium>, WorkspaceError> {
        if !cfg.binary.exists() {
            return Err(err(format!(
                "The browser is not installed on this host ({}); its admin installs chromium",
                cfg.binary.display()
            )));
        }
        let profile = format!(
            "{}{}",
            profile_prefix(&cfg.tag),
            hex::encode(rand::random::<[u8; 6]>())
        );
        // In namespaces of its own (network, mount, PID): the shell brings loopback up,
        // covers every place on the host's disk that holds users' or nook's files with an
        // empty tmpfs, makes the profile in its private /tmp, learns the proxy's port from its
        // first line of input, and becomes chromium as nobody, with the rest of its input on
        // fd 3 and its output on fd 4. /proc is its own (--mount-proc): no host process shows.
        let script = format!(
            r#"ip link set lo up || exit 1
for d in /tmp /var/tmp /dev/shm /home /run /mnt /media /srv /var/lib /var/log /var/cache /opt /root; do
  [ -d "$d" ] && {{ mount -t tmpfs -o mode=1777,size=512m,nosuid,nodev tmpfs "$d" || exit 1; }}
done
mkdir -m 700 "$1" && chown {NOBODY}:{NOBODY} "$1" || exit 1
read port || exit 1
exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --reset-env -- \
  env HOME="$1" "$0" --headless=new --remote-debugging-pipe --user-data-dir="$1" \
  --proxy-server="http://127.0.0.1:$port" --proxy-bypass-list="<-loopback>" \
  --force-webrtc-ip-handling-policy=disable_non_proxied_udp \
  --no-first-run --no-default-browser-check --disable-sync --disable-background-networking \
  --disable-component-update --disable-extensions --disable-dev-shm-usage --mute-audio \
  --hide-scrollbars --window-size={w},{h} about:blank 3<&0 4>&1 0</dev/null 1>/dev/null"#,
            w = VIEWPORT.0,
            h = VIEWPORT.1,
        );
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
            ])
            .args(["--", "sh", "-c", &script])
            .arg(&cfg.binary)
            .arg(&profile)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err(format!("could not start the browser: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| err("the browser exited at once"))?;
        let mut stdin = child.stdin.take().ok_or_else(|| err("no browser stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err("no browser stdout"))?;
        let stderr_pipe = child
            .stderr
            .take()
            .ok_or_else(|| err("no browser stderr"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        tokio::spawn(keep_tail(stderr_pipe, stderr.clone()));
        // Until the shell reads its first line (the proxy's port, below), nothing has become
        // chromium yet.
        if let Some(confine) = &cfg.confine
            && let Err(e) = confine_sandbox(pid, confine).await
        {
            let _ = child.kill().await;
            return Err(e);
        }

        let listener = match listen_in_netns_of(pid).await {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        let port = listener
            .local_addr()
            .map_err(|e| err(format!("proxy address: {e}")))?
            .port();
        let policy = Policy {
            vm: cfg.vm_ip,
            allow: cfg.allow.clone(),
            local: local_addresses(),
        };
        let proxy = tokio::spawn(serve_proxy(listener, Arc::new(policy)));
        stdin
            .write_all(format!("{port}\n").as_bytes())
            .await
            .map_err(|e| err(format!("could not start the browser: {e}")))?;

        let pending: Pending = Arc::default();
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let loaded = Arc::new(Notify::new());
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(read_messages(
            stdout,
            pending.clone(),
            console.clone(),
            loaded.clone(),
            dead.clone(),
        ));
        let mut c = Chromium {
            child: tokio::sync::Mutex::new(child),
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            next_id: AtomicU64::new(1),
            session: String::new(),
            console,
            loaded,
            proxy,
            dead,
            stderr,
        };
        let target = c
            .call("Target.createTarget", json!({"url": "about:blank"}), false)
            .await
            .map_err(|e| c.failed(e))?;
        let target_id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = c
            .call(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
                false,
            )
            .await
            .map_err(|e| c.failed(e))?;
        c.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        for (method, params) in [
            ("Page.enable", json!({})),
            ("Runtime.enable", json!({})),
            (
                "Emulation.setDeviceMetricsOverride",
                json!({"width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false}),
            ),
        ] {
            c.call(method, params, true)
                .await
                .map_err(|e| c.failed(e))?;
        }
        Ok(Arc::new(c))
    }

    /// An error, with what chromium said last.
    fn failed(&self, e: String) -> WorkspaceError {
        let said = self
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let said: Vec<&str> = said
            .lines()
            .filter(|l| !l.contains("dbus"))
            .rev()
            .take(3)
            .collect();
        if said.is_empty() {
            err(format!("the browser failed: {e}"))
        } else {
            err(format!("the browser failed: {e} ({})", said.join(" / ")))
        }
    }

    async fn call(&self, method: &str, params: Value, in_page: bool) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if in_page {
            msg["sessionId"] = json!(self.session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        {
            let mut stdin = self.stdin.lock().await;
            if let Err(e) = stdin.write_all(&bytes).await {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(format!("the browser has gone ({e})"));
            }
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the browser has gone".into()),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(format!("{method} took over {} s", CALL_TIMEOUT.as_secs()))
            }
        }
    }

    async fn eval(&self, js: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true, "timeout": 10000}),
                true,
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let text = ex
                .pointer("/exception/description")
                .and_then(Value::as_str)
                .or_else(|| ex.get("text").and_then(Value::as_str))
                .unwrap_or("an exception");
            return Err(format!("the script threw: {text}"));
        }
        Ok(r.pointer("/result/value").cloned().unwrap_or(Value::Null))
    }

    async fn navigate(&self, url: &str) -> Result<String, String> {
        let url = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let scheme = url
            .split("://")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "the browser opens http:// and https:// pages only, not {scheme}:"
            ));
        }
        let loaded = self.loaded.notified();
        tokio::pin!(loaded);
        loaded.as_mut().enable();
        let r = self
            .call("Page.navigate", json!({"url": url}), true)
            .await?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            return Err(format!(
                "could not load {url}: {e} (is the server running and listening on 0.0.0.0?)"
            ));
        }
        let waited = tokio::time::timeout(LOAD_TIMEOUT, loaded).await.is_ok();
        let title = self
            .eval("document.title")
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(format!(
            "loaded {url}{}; title: {title:?}",
            if waited { "" } else { " (still loading)" }
        ))
    }

    async fn capture(&self, params: Value) -> Result<Vec<u8>, String> {
        let r = self.call("Page.captureScreenshot", params, true).await?;
        let data = r["data"].as_str().ok_or("no screenshot data")?;
        B64.decode(data)
            .map_err(|e| format!("the screenshot was not base64: {e}"))
    }

    async fn screenshot(&self) -> Result<BrowserOutcome, String> {
        let mut png = self.capture(json!({"format": "png"})).await?;
        let mut size = VIEWPORT;
        // A page of noise makes a PNG too big for the model's image limit (5 MB of base64
        // with Anthropic): such a page is taken again at half the size.
        if png.len() > MAX_SCREENSHOT {
            size = (VIEWPORT.0 / 2, VIEWPORT.1 / 2);
            png = self
                .capture(json!({
                    "format": "png",
                    "clip": {"x": 0, "y": 0, "width": VIEWPORT.0, "height": VIEWPORT.1, "scale": 0.5},
                }))
                .await?;
            if png.len() > MAX_SCREENSHOT {
                return Err(format!(
                    "the screenshot is {} KiB even at half size, over the {} KiB a model takes",
                    png.len() >> 10,
                    MAX_SCREENSHOT >> 10
                ));
            }
        }
        let url = self
            .eval("location.href")
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(BrowserOutcome {
            text: format!(
                "screenshot of {url} ({}x{}, {} KiB)",
                size.0,
                size.1,
                png.len() >> 10
            ),
            png: Some(png),
        })
    }

    async fn act_inner(&self, action: BrowserAction) -> Result<BrowserOutcome, String> {
        let text = |t: String| BrowserOutcome { text: t, png: None };
        match action {
            BrowserAction::Navigate { url } => self.navigate(&url).await.map(text),
            BrowserAction::Screenshot => self.screenshot().await,
            BrowserAction::Console => {
                let lines: Vec<String> = self
                    .console
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..)
                    .collect();
                Ok(text(if lines.is_empty() {
                    "the console is empty (since the last look)".into()
                } else {
                    lines.join("\n")
                }))
            }
            BrowserAction::Eval { js } => {
                let v = self.eval(&js).await?;
                let s = serde_json::to_string_pretty(&v).unwrap_or_default();
                Ok(text(s.chars().take(32 << 10).collect()))
            }
            BrowserAction::Click { selector } => {
                let js = format!(
                    "(() => {{ const e = document.querySelector({sel}); if (!e) return 'nothing matches ' + {sel}; e.scrollIntoView(); e.click(); return 'clicked ' + e.tagName.toLowerCase(); }})()",
                    sel = json!(selector)
                );
                let v = self.eval(&js).await?;
                Ok(text(v.as_str().unwrap_or("clicked").to_string()))
            }
        }
    }

    /// Ends chromium (its profile goes with its private /tmp) and its proxy's connections.
    pub async fn close(&self) {
        let _ = self.child.lock().await.kill().await;
        self.proxy.abort();
    }

    /// True once chromium has exited, or can no longer be driven.
    pub async fn exited(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
            || matches!(self.child.lock().await.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The child is killed on drop (kill_on_drop); the proxy's tasks go with its JoinSet.
        self.proxy.abort();
    }
}

impl Browser for Chromium {
    fn act(&self, action: BrowserAction) -> BoxFuture<'_, Result<BrowserOutcome, WorkspaceError>> {
        Box::pin(async move { self.act_inner(action).await.map_err(WorkspaceError) })
    }
}

async fn keep_tail(pipe: tokio::process::ChildStderr, into: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut s = into.lock().unwrap_or_else(|p| p.into_inner());
        s.push_str(&line);
        s.push('\n');
        if s.len() > 8192 {
            let cut = s.len() - 4096;
            let cut = (cut..s.len())
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(s.len());
            s.drain(..cut);
        }
    }
}

/// DevTools messages from fd 4: answers to calls, console lines, page loads.
async fn read_messages(
    stdout: tokio::process::ChildStdout,
    pending: Pending,
    console: Arc<Mutex<VecDeque<String>>>,
    loaded: Arc<Notify>,
    dead: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut r = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut r)
            .take(MAX_MESSAGE as u64)
            .read_until(0, &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.last() != Some(&0) {
            // Over the limit: the stream cannot be followed any more.
            break;
        }
        buf.pop();
        let Ok(msg) = serde_json::from_slice::<Value>(&buf) else {
            continue;
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let tx = pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(tx) = tx {
                let r = match msg.get("error") {
                    Some(e) => Err(e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the browser refused")
                        .to_string()),
                    None => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
                };
                let _ = tx.send(r);
            }
            continue;
        }
        let line = match msg.get("method").and_then(Value::as_str) {
            Some("Page.loadEventFired") => {
                loaded.notify_waiters();
                None
            }
            Some("Runtime.consoleAPICalled") => {
                let kind = msg
                    .pointer("/params/type")
                    .and_then(Value::as_str)
                    .unwrap_or("log");
                let args: Vec<String> = msg
                    .pointer("/params/args")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|v| match v.get("value") {
                                Some(Value::String(s)) => s.clone(),
                                Some(other) => other.to_string(),
                                None => v
                                    .get("description")
                                    .and_then(Value::as_str)
                                    .unwrap_or("?")
                                    .to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(format!("[{kind}] {}", args.join(" ")))
            }
            Some("Runtime.exceptionThrown") => Some(format!(
                "[exception] {}",
                msg.pointer("/params/exceptionDetails/exception/description")
                    .or_else(|| msg.pointer("/params/exceptionDetails/text"))
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            )),
            _ => None,
        };
        if let Some(line) = line {
            let mut c = console.lock().unwrap_or_else(|p| p.into_inner());
            c.push_back(line.chars().take(2000).collect());
            while c.len() > CONSOLE_LINES {
                c.pop_front();
            }
        }
    }
    // Chromium has gone, or sent what cannot be followed: every caller waiting hears so, and
    // the next use starts a new one.
    dead.store(true, Ordering::Relaxed);
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// A listener on 127.0.0.1 inside the network namespace process `pid` has entered. A thread
/// of its own joins that namespace (the namespace is per thread), binds, and ends; the socket
/// stays in the namespace it was made in.
async fn listen_in_netns_of(pid: u32) -> Result<TcpListener, WorkspaceError> {
    let ours = std::fs::read_link("/proc/self/ns/net")
        .map_err(|e| err(format!("cannot read this process's network namespace: {e}")))?;
    let theirs = format!("/proc/{pid}/ns/net");
    let mut entered = false;
    for _ in 0..200 {
        match std::fs::read_link(&theirs) {
            Ok(ns) if ns != ours => {
                entered = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(err(format!("the browser's sandbox did not start: {e}"))),
        }
    }
    if !entered {
        return Err(err("the browser's network namespace was not made in 2 s"));
    }
    let std_listener = std::thread::spawn(move || -> Result<std::net::TcpListener, String> {
        let ns = std::fs::File::open(&theirs).map_err(|e| e.to_string())?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(l)
    })
    .join()
    .map_err(|_| err("the browser's proxy thread failed"))?
    .map_err(|e| err(format!("could not give the browser its proxy: {e}")))?;
    TcpListener::from_std(std_listener).map_err(|e| err(format!("proxy listener: {e}")))
}

/// Connections one browser's proxy holds at once.
const MAX_CONNECTIONS: usize = 256;
/// A connection with no byte either way for this long is closed.
const CONNECTION_IDLE: Duration = Duration::from_secs(120);

/// Where the browser may go.
pub(crate) struct Policy {
    vm: Ipv4Addr,
    allow: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    /// The host's own addresses (every interface): never, whatever else allows them.
    local: Vec<IpAddr>,
}

impl Policy {
    fn permits(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.vm)
            || (is_public(ip) && !self.local.contains(&ip) && (self.allow)(ip))
    }
}

fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(sa) = a.address {
                if let Some(v4) = sa.as_sockaddr_in() {
                    out.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    out.push(IpAddr::V6(v6.ip()));
                }
            }
        }
    }
    out
}

async fn serve_proxy(listener: TcpListener, policy: Arc<Policy>) {
    // The connections live in this set: aborting the proxy's task drops it, which ends them.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { return };
                if conns.len() >= MAX_CONNECTIONS {
                    continue;
                }
                let policy = policy.clone();
                conns.spawn(async move {
                    if let Err(e) = proxy_one(conn, &policy).await {
                        tracing::debug!(error = %e, "browser proxy connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Where the browser may go: the VM (which `localhost` means), and public addresses the
/// host's egress policy allows; never the host itself.
async fn resolve(host: &str, port: u16, policy: &Policy) -> Result<SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "::1" {
        return Ok(SocketAddr::new(IpAddr::V4(policy.vm), port));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let first = addrs
        .first()
        .copied()
        .ok_or(format!("{host} has no address"))?;
    for a in &addrs {
        if !policy.permits(a.ip()) {
            return Err(format!(
                "{host} is a private address: the browser reaches only this VM and the internet"
            ));
        }
    }
    Ok(first)
}

/// Copies both ways until both ends are done, or nothing moves for [`CONNECTION_IDLE`].
async fn relay(a: &mut TcpStream, b: &mut TcpStream) -> Result<(), String> {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut abuf = vec![0u8; 16 << 10];
    let mut bbuf = vec![0u8; 16 << 10];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let step = tokio::time::timeout(CONNECTION_IDLE, async {
            tokio::select! {
                n = ar.read(&mut abuf), if a_open => {
                    let n = n.map_err(|e| e.to_string())?;
                    if n == 0 {
                        a_open = false;
                        let _ = bw.shutdown().await;
                    } else {
                        bw.write_all(&abuf[..n]).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                }
                n = br.read(&mut bbuf), if b_open => {
                    let n = n.map_err(|e| e.to_string())?;
                    if n == 0 {
                        b_open = false;
                        let _ = aw.shutdown().await;
                    } else {
                        aw.write_all(&bbuf[..n]).await.map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }
            }
        })
        .await;
        match step {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 240
                || (o[0] == 198 && (o[1] & 0xfe) == 18))
        }
        IpAddr::V6(v6) => {
            // Global unicast only, and not the ranges that tunnel to IPv4 (6to4, Teredo) or
            // are for documentation; NAT64 (64:ff9b::/96) is outside 2000::/3.
            let s = v6.segments();
            (s[0] & 0xe000) == 0x2000
                && s[0] != 0x2002
                && !(s[0] == 0x2001 && (s[1] == 0 || s[1] == 0x0db8))
        }
    }
}

async fn proxy_one(mut conn: TcpStream, policy: &Policy) -> Result<(), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Err("request head too large".into());
        }
        let n = conn.read(&mut byte).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let mut parts = first.split_whitespace();
    let (method, target, version) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or("HTTP/1.1").to_string(),
    );
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(&target, 443);
        let upstream = match resolve(&host, port, policy).await {
            Ok(a) => TcpStream::connect(a).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let mut upstream = match upstream {
            Ok(u) => u,
            Err(e) => {
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\n\r\n{e}",
                            e.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                return Err(e);
            }
        };
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        return relay(&mut conn, &mut upstream).await;
    }
    let Some(rest) = target.strip_prefix("http://") else {
        let _ = conn
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
        return Err(format!("not a proxy request: {first}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, 80);
    let upstream = match resolve(&host, port, policy).await {
        Ok(a) => TcpStream::connect(a).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            let _ = conn
                .write_all(format!("HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{e}", e.len()).as_bytes())
                .await;
            return Err(e);
        }
    };
    // One request per connection: the browser may send its next one on this connection for
    // another host, so only this request's body goes up (by its Content-Length), never more.
    let mut out = format!("{method} {path} {version}\r\n");
    let mut body_len: u64 = 0;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let name = name.trim().to_ascii_lowercase();
        if name == "connection" || name == "proxy-connection" || name == "keep-alive" {
            continue;
        }
        if name == "content-length" {
            body_len = value.trim().parse().unwrap_or(0);
        }
        if name == "transfer-encoding" {
            let _ = conn
                .write_all(b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            return Err("a chunked request body through the browser's proxy".into());
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream
        .write_all(out.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let (cr, mut cw) = conn.split();
    let (mut ur, mut uw) = upstream.split();
    let mut body = cr.take(body_len);
    let up = tokio::io::copy(&mut body, &mut uw);
    let down = async {
        let r = tokio::io::copy(&mut ur, &mut cw).await;
        let _ = cw.shutdown().await;
        r
    };
    let both = async {
        let (_, down) = tokio::join!(up, down);
        down
    };
    match tokio::time::timeout(CONNECTION_IDLE * 5, both).await {
        Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
        Err(_) => Ok(()),
    }
}

fn split_host_port(authority: &str, default: u16) -> (String, u16) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            return (h.to_string(), p.parse().unwrap_or(default));
        }
        return (rest.trim_end_matches(']').to_string(), default);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(default)),
        None => (authority.to_string(), default),
    }
}

/// A browser nobody used for this long is closed.
const BROWSER_IDLE: Duration = Duration::from_secs(600);
/// Browsers open on a host at once (each is a few hundred MiB); past it, the one used least
/// recently is closed to make room.
const MAX_BROWSERS: usize = 8;

/// The host's browsers, one per VM (by key), started on first use.
#[derive(Default)]
pub struct Pool {
    browsers: tokio::sync::Mutex<HashMap<String, (Arc<Chromium>, std::time::Instant)>>,
}

impl Pool {
    /// The browser for `key`, started with `cfg` if there is none or it died.
    pub async fn get(
        &self,
        key: &str,
        cfg: impl FnOnce() -> Result<ChromiumConfig, WorkspaceError>,
    ) -> Result<Arc<Chromium>, WorkspaceError> {
        let mut browsers = self.browsers.lock().await;
        if let Some((b, used)) = browsers.get_mut(key)
            && !b.exited().await
        {
            *used = std::time::Instant::now();
            return Ok(b.clone());
        }
        let cfg = cfg()?;
        if let Some((b, _)) = browsers.remove(key) {
            b.close().await;
        }
        while browsers.len() >= MAX_BROWSERS {
            let Some(oldest) = browsers
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((b, _)) = browsers.remove(&oldest) {
                b.close().await;
            }
        }
        let b = Chromium::launch(&cfg).await?;
        browsers.insert(key.to_string(), (b.clone(), std::time::Instant::now()));
        Ok(b)
    }

    /// The keys that have a browser.
    pub async fn keys(&self) -> Vec<String> {
        self.browsers.lock().await.keys().cloned().collect()
    }

    /// Closes the browsers nobody used lately, and those whose key `keep` refuses.
    pub async fn reap(&self, keep: &[String]) {
        let mut browsers = self.browsers.lock().await;
        let gone: Vec<String> = browsers
            .iter()
            .filter(|(k, (_, used))| !keep.contains(k) || used.elapsed() > BROWSER_IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some((b, _)) = browsers.remove(&k) {
                b.close().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001::1",
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        assert!(is_public("1.1.1.1".parse().expect("ip")));
        assert!(is_public("2606:4700::1111".parse().expect("ip")));
    }

    #[tokio::test]
    async fn localhost_is_the_vm_and_the_host_is_out_of_reach() {
        let vm = Ipv4Addr::new(10, 200, 0, 6);
        let policy = Policy {
            vm,
            allow: Arc::new(|ip| ip != IpAddr::from([9, 9, 9, 9])),
            local: vec![IpAddr::from([1, 2, 3, 4])],
        };
        assert_eq!(
            resolve("localhost", 8000, &policy).await,
            Ok(SocketAddr::from((vm, 8000)))
        );
        assert!(resolve("10.200.0.6", 80, &policy).await.is_ok());
        assert!(resolve("10.200.0.5", 80, &policy).await.is_err());
        assert!(resolve("169.254.169.254", 80, &policy).await.is_err());
        // The host's own public address, and what the host's egress policy blocks.
        assert!(resolve("1.2.3.4", 80, &policy).await.is_err());
        assert!(resolve("9.9.9.9", 80, &policy).await.is_err());
        assert!(resolve("8.8.8.8", 80, &policy).await.is_ok());
        assert_eq!(split_host_port("[::1]:8080", 80), ("::1".into(), 8080));
        assert_eq!(
            split_host_port("example.com", 443),
            ("example.com".into(), 443)
        );
    }
}
