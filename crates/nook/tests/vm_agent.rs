//! System test (root, real QEMU guests, the real gateway, a real headless chromium): the
//! coding agent. The model is tests/fake-llm/scripted_model.py, a real HTTP server speaking
//! the Anthropic Messages and OpenAI Responses streaming formats, which plays a script of
//! model turns and checks what the agent sends it (tools offered, tool results, images).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Key};
use serde_json::{Value, json};

const ANTHROPIC_KEY: &str = "sk-ant-agent-host-1c7e";
const OPENAI_KEY: &str = "sk-oai-agent-host-93ab";
const PRICES: &str = r#"
[llm_prices.anthropic.fake-claude]
input = 1.0
output = 2.0

[llm_prices.openai.fake-gpt]
input = 1.0
output = 3.0
"#;

/// The scripted model server.
struct ScriptedModel {
    child: Child,
    port: u16,
}

impl ScriptedModel {
    fn start() -> ScriptedModel {
        let mut child = Command::new("python3")
            .arg(common::repo_root().join("tests/fake-llm/scripted_model.py"))
            .args(["--port", "0", "--anthropic-key", ANTHROPIC_KEY])
            .args(["--openai-key", OPENAI_KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 scripted_model.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("scripted model said {line:?}"));
        ScriptedModel { child, port }
    }

    fn curl(&self, args: &[&str]) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scripted model answered {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn script(&self, steps: Value) {
        let v = self.curl(&[
            "-X",
            "POST",
            "--data-binary",
            &json!({ "steps": steps }).to_string(),
            &format!("http://127.0.0.1:{}/__script", self.port),
        ]);
        assert_eq!(v["ok"], true, "script refused: {v}");
    }

    fn log(&self) -> Value {
        self.curl(&[&format!("http://127.0.0.1:{}/__log", self.port)])
    }
}

impl Drop for ScriptedModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon whose agent talks to `model` as `agent_model`.
fn daemon(model: &ScriptedModel, agent_model: &str) -> Daemon {
    let tmp = tempfile::Builder::new()
        .prefix("nook-sys")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let url = format!("http://127.0.0.1:{}", model.port);
    std::fs::write(
        data_dir.join("nook.toml"),
        format!(
            "llm_anthropic_base_url = \"{url}\"\nllm_anthropic_key = \"{ANTHROPIC_KEY}\"\n\
             llm_openai_base_url = \"{url}\"\nllm_openai_key = \"{OPENAI_KEY}\"\n\
             agent_model = \"{agent_model}\"\n{PRICES}"
        ),
    )
    .expect("nook.toml");
    Daemon::start_in(data_dir, Some(tmp), &[])
}

fn lobby_json(d: &Daemon, key: &Key, args: &[&str]) -> Value {
    let out = d.lobby_ok(key, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// The conversation's events, as `agent log --json` prints them.
fn events(d: &Daemon, key: &Key, vm: &str, id: &str) -> Vec<Value> {
    let out = d.ssh(key, "lobby", &["agent", "log", vm, id, "--json"]);
    assert!(out.status.success(), "agent log failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Waits for the conversation's turn to end; its events.
fn wait_turn_end(d: &Daemon, key: &Key, vm: &str, id: &str, turns: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ev = events(d, key, vm, id);
        if ev.iter().filter(|e| e["type"] == "turn_end").count() >= turns {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "the turn never ended; events so far:\n{}\n--- daemon log ---\n{}",
            serde_json::to_string_pretty(&ev).unwrap_or_default(),
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let n = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    (n(16), n(20))
}

fn b64(s: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(s.as_bytes())
        .expect("write");
    child.wait_with_output().expect("base64 -d").stdout
}

fn credit_micros(d: &Daemon, key: &Key) -> i64 {
    lobby_json(d, key, &["usage", "--json"])["credit_micros"]
        .as_i64()
        .expect("credit")
}

/// The page at `url`, as headless chromium renders it (through the edge, with its local CA
/// not trusted: this is about what the app shows).
fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile");
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--ignore-certificate-errors"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=5000", "--dump-dom", url])
        .output()
        .expect("chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const APP_HTML: &str = "<!doctype html><html><head><title>Nook Agent App</title></head><body style=\"background:#fff\"><h1 id=\"t\">Hello from the agent</h1><script>console.log('app loaded')</script></body></html>";

#[test]
fn vm_agent_builds_runs_and_screenshots_an_app_through_anthropic() {
    let model = ScriptedModel::start();
    let d = daemon(&model, "anthropic/fake-claude");
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.ok(&["account", "credit", "alice@example.com", "--set", "5"]);
    let all_tools = json!(["bash", "shell", "read", "write", "patch", "search", "browser", "logs", "todo"]);
    model.script(json!([
        {"expect": {"api": "anthropic", "tools_include": all_tools, "last_user_contains": "hello app",
                    "system_contains": "nook's coding agent"},
         "reply": [{"text": "I'll build it."},
                   {"tool": "todo", "input": {"items": [{"text": "write the page"}, {"text": "serve it"}]}},
                   {"tool": "write", "input": {"path": "app/index.html", "content": APP_HTML}}]},
        {"expect": {"tool_result_contains": "wrote app/index.html"},
         "reply": [{"tool": "shell", "input": {"command": "cd ~/app && exec python3 -m http.server 8000", "wait_secs": 3}}]},
        {"expect": {"tool_result_contains": "running: pid"},
         "reply": [{"tool": "browser", "input": {"action": "navigate", "url": "http://localhost:8000/"}}]},
        {"expect": {"tool_result_contains": "Nook Agent App"},
         "reply": [{"tool": "browser", "input": {"action": "screenshot"}},
                   {"tool": "browser", "input": {"action": "console"}}]},
        {"expect": {"has_image": true, "tool_result_contains": "app loaded"},
         "reply": [{"tool": "patch", "input": {"path": "app/index.html", "old": "Goodbye", "new": "Hi"}}]},
        {"expect": {"tool_result_contains": "no match"},
         "reply": [{"tool": "frobnicate", "input": {}}]},
        {"expect": {"tool_result_contains": "there is no tool `frobnicate`"},
         "reply": [{"tool": "bash", "input": {"command": "head -c 100000000 /dev/zero | tr '\\0' x; echo; echo end-of-output"}}]},
        {"expect": {"tool_result_contains": "bytes cut"},
         "reply": [{"text": "Your app runs on port 8000."}]},
        {"expect": {"last_user_contains": "thanks"},
         "reply": [{"text": "You're welcome."}]},
    ]));

    // New VM from a prompt: the VM, then the agent at work, and the chat's link.
    let made = lobby_json(
        &d,
        &alice,
        &["new", "--name", "app", "--prompt", "'Build me a hello app'", "--json"],
    );
    let conv = made["agent"]["conversation"].as_str().expect("conversation").to_string();
    assert!(
        made["agent"]["url"].as_str().is_some_and(|u| u.ends_with(&format!("/vm/app/agent?c={conv}"))),
        "{made}"
    );
    let credit_before = 5_000_000;
    let ev = wait_turn_end(&d, &alice, "app", &conv, 1);
    let log = model.log();
    assert_eq!(log["failures"], json!([]), "the model saw what it should not:\n{log:#}");
    let last = ev.last().expect("events");
    assert_eq!(last["type"], "turn_end");
    assert_eq!(last["reason"], "done", "{ev:#?}");
    // Events are numbered 1, 2, 3, ... with none twice.
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["seq"], json!(i + 1), "{e}");
    }
    let result = |name: &str| -> Vec<&Value> {
        ev.iter()
            .filter(|e| e["type"] == "tool_result" && e["name"] == name)
            .collect()
    };
    assert!(ev.iter().any(|e| e["type"] == "todo" && e["items"][1]["text"] == "serve it"));
    // The screenshot: a real PNG of that page, which the model got as an image block.
    let shot = result("browser")
        .into_iter()
        .find_map(|e| e["png"].as_str())
        .expect("a screenshot event");
    let png = b64(shot);
    assert_eq!(png_size(&png), (1280, 800));
    let images = log["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .flat_map(|r| r["images"].as_array().cloned().unwrap_or_default())
        .collect::<Vec<_>>();
    assert!(
        images.iter().any(|i| i["png"] == true && i["width"] == 1280 && i["height"] == 800),
        "{images:?}"
    );
    // Bad tool calls come back as clear errors the model can act on.
    let patch = result("patch");
    assert_eq!(patch[0]["ok"], false);
    assert!(patch[0]["output"].as_str().expect("out").contains("no match"));
    let bash = result("bash");
    let big = bash[0]["output"].as_str().expect("out");
    assert!(big.len() < 40_000 && big.contains("end-of-output") && big.contains("bytes cut"), "{}", &big[..200.min(big.len())]);
    // Tokens were metered against alice's credit.
    let credit = credit_micros(&d, &alice);
    assert!(credit < credit_before, "credit {credit}");
    let usage = lobby_json(&d, &alice, &["usage", "app", "--json"]);
    assert!(usage.to_string().contains("fake-claude"), "{usage}");

    // The app is what https://app.DOMAIN/ shows, through the edge, in a browser.
    d.lobby_ok(&alice, &["share", "set-public", "app"]);
    let url = made["url"].as_str().expect("url");
    let dom = chromium_dom(url);
    assert!(dom.contains("Hello from the agent"), "{url} showed:\n{dom}");

    // A second turn in the same conversation streams to the terminal.
    let out = d.ssh(&alice, "lobby", &["agent", "prompt", "app", "--conversation", &conv, "thanks!"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("You're welcome."), "{text}");
    let listed = lobby_json(&d, &alice, &["agent", "ls", "app", "--json"]);
    assert_eq!(listed[0]["id"], json!(conv));
    assert_eq!(listed[0]["state"], "idle");
    // Someone else sees no such VM, and no conversation.
    let mallory = Key::new("mallory");
    d.signup(&mallory, "mallory@example.com");
    let denied = d.ssh(&mallory, "lobby", &["agent", "log", "app", &conv]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("No VM named 'app'"));
}
