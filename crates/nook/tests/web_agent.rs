//! System test (root, real QEMU guests, the real gateway, a real browser): the coding agent's
//! chat page driven by Playwright in Debian's chromium (tests/web/agent.mjs), at desktop and
//! phone sizes: a VM made from the dashboard with a prompt, the agent's turn streaming in
//! (text, tool calls, its screenshot of the app it served, its checklist), a reload that
//! replays it all, Stop during a long command, and a turn after the stop. The model is
//! tests/fake-llm/scripted_model.py (see vm_agent.rs). It writes the chat's screenshots in
//! docs/screenshots, so they stay true.

mod common;

use std::process::Command;

use common::scripted::{ScriptedModel, daemon};
use common::{Daemon, Key, repo_root};
use serde_json::{Value, json};

/// What the user types and what the model says back, shared with agent.mjs (as NOOK_CHAT) so
/// the script and the browser's checks cannot drift apart.
const BUILD: &str = "Build a page that says hello";
const FIRST_WORDS: &str = "Building it.";
const PAGE_TITLE: &str = "Hello Page";
const DONE: &str = "It is up on port 8000. The page says hello in large letters; open the VM's address to see it for yourself.";
const WAIT: &str = "Now wait a minute";
const GO_ON: &str = "Go on";
const CONTINUING: &str = "Continuing. The long command was stopped before it finished, and the page is still served on port 8000.";
/// The model waits this long between the pieces of its last words in a turn, so the page shows
/// them arriving.
const DELTA_DELAY_MS: u64 = 150;

fn login_link(d: &Daemon, key: &Key) -> String {
    d.lobby_ok(key, &["browser"])
        .lines()
        .find(|l| l.starts_with("https://"))
        .expect("a login link")
        .trim()
        .to_string()
}

/// The model's side of one run of agent.mjs (one VM, one conversation, three turns).
fn one_run() -> Vec<Value> {
    let html = format!(
        "<!doctype html><html><head><title>{PAGE_TITLE}</title></head>\
         <body style=\"background:#fff;font-family:sans-serif\"><h1 style=\"font-size:64px\">Hello!</h1>\
         <p>Served by busybox httpd in a nook VM.</p></body></html>"
    );
    vec![
        // The turn `new --prompt` starts: the app written, served, looked at.
        json!({"expect": {"last_user_contains": BUILD,
                          "tools_include": ["bash", "shell", "read", "write", "patch", "search",
                                            "browser", "logs", "todo"]},
               "reply": [{"text": FIRST_WORDS},
                         {"tool": "todo", "input": {"items": [
                             {"text": "write the page", "done": true},
                             {"text": "serve it on port 8000"},
                             {"text": "look at it"}]}},
                         {"tool": "write", "input": {"path": "www/index.html", "content": html}}]}),
        json!({"expect": {"tool_result_contains": "wrote www/index.html"},
               "reply": [{"tool": "shell", "input": {
                   "command": "exec busybox httpd -f -p 8000 -h $HOME/www", "wait_secs": 2}}]}),
        json!({"expect": {"tool_result_contains": "running: pid"},
               "reply": [{"tool": "browser", "input": {"action": "navigate", "url": "http://localhost:8000/"}}]}),
        json!({"expect": {"tool_result_contains": PAGE_TITLE},
               "reply": [{"tool": "browser", "input": {"action": "screenshot"}}]}),
        json!({"expect": {"has_image": true},
               "reply": [{"text": DONE}], "delta_delay_ms": DELTA_DELAY_MS}),
        // A command long enough to be stopped from the page.
        json!({"expect": {"last_user_contains": WAIT},
               "reply": [{"tool": "bash", "input": {"command": "sleep 60"}}]}),
        // The next turn tells the model the stopped call never finished.
        json!({"expect": {"last_user_contains": GO_ON, "tool_result_contains": "stopped"},
               "reply": [{"text": CONTINUING}], "delta_delay_ms": DELTA_DELAY_MS}),
    ]
}

#[test]
fn web_agent_chat_in_a_real_browser_at_desktop_and_phone_sizes() {
    let model = ScriptedModel::start();
    let d = daemon(&model, "anthropic/fake-claude");
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.ok(&["account", "credit", "alice@example.com", "--set", "5"]);
    // agent.mjs runs at desktop size, then at phone size, each with the same turns.
    model.script(Value::Array([one_run(), one_run()].concat()));
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
    let chat = json!({
        "build": BUILD, "firstWords": FIRST_WORDS, "done": DONE,
        "wait": WAIT, "goOn": GO_ON, "continuing": CONTINUING, "deltaDelayMs": DELTA_DELAY_MS,
    });
    let out = Command::new("node")
        .arg(repo_root().join("tests/web/agent.mjs"))
        .env(
            "NOOK_URL",
            format!("https://nook.localhost:{}", d.https_port),
        )
        .env("NOOK_LOGIN_DESKTOP", login_link(&d, &alice))
        .env("NOOK_LOGIN_PHONE", login_link(&d, &alice))
        .env("NOOK_CHAT", chat.to_string())
        .env("NOOK_SHOTS", &shots)
        .env("NOOK_PLAYWRIGHT", &playwright)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = model.log();
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}\n--- model failures ---\n{:#}\n--- daemon log ---\n{}",
        log["failures"],
        d.log_tail()
    );
    println!("{stdout}");
    assert_eq!(
        log["failures"],
        json!([]),
        "the model saw what it should not:\n{log:#}"
    );
    assert_eq!(log["remaining"], 0, "turns the agent never asked for");
    for size in ["desktop", "phone"] {
        assert!(shots.join(format!("{size}-agent.png")).is_file());
    }
}
