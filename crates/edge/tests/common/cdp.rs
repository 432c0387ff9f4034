//! Debian's headless chromium, driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: JSON messages ending in a NUL byte, read from fd 3 and written
//! to fd 4), for what `--dump-dom` cannot do: press a button, and keep one browser (with its
//! cookies) across pages. Only std and serde_json, so crates/nook's tests include this file too.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
}

impl Browser {
    /// Starts chromium with `home` as HOME (where its NSS database trusts the test CA) and a
    /// profile kept under it, and opens one blank tab.
    pub fn launch(home: &Path) -> Browser {
        // The shell hands our pipes to chromium as fds 3 and 4 (std cannot map fds itself).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec chromium "$@" 3<&0 4>&1 </dev/null >/dev/null 2>/dev/null"#)
            .arg("sh")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                &format!("--user-data-dir={}", home.join("profile").display()),
                "about:blank",
            ])
            .env("HOME", home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("chromium is installed (apt-get install chromium)");
        let to = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match out.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
                            continue;
                        };
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to,
            from,
            next_id: 0,
            session: String::new(),
        };
        let target = b.call(false, "Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            false,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// One DevTools call (on the tab when `on_tab`), returning its result.
    fn call(&mut self, on_tab: bool, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if on_tab {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("chromium did not answer {method}: {e}"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    pub fn goto(&mut self, url: &str) {
        self.call(true, "Page.navigate", json!({"url": url}));
    }

    /// Evaluates `expr` in the tab and returns its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            true,
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    pub fn html(&mut self) -> String {
        self.eval("document.documentElement ? document.documentElement.outerHTML : ''")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the page's HTML contains `needle`, and returns that HTML.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let html = self.html();
            if html.contains(needle) {
                return html;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the page: {html}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the first element matching a CSS selector, as a user would.
    pub fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
        ));
        assert_eq!(found, json!(true), "nothing matches {selector}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask it to close (it takes its helper processes with it); kill it if it will not.
        let msg = b"{\"id\":999999,\"method\":\"Browser.close\",\"params\":{}}\0";
        let _ = self.to.write_all(msg);
        let _ = self.to.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
