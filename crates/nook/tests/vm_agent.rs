//! System test (root, real QEMU guests, the real gateway, a real headless chromium): the
//! coding agent. The model is tests/fake-llm/scripted_model.py, a real HTTP server speaking
//! the Anthropic Messages and OpenAI Responses streaming formats, which plays a script of
//! model turns and checks what the agent sends it (tools offered, tool results, images).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scripted::{ScriptedModel, daemon};
use common::{Daemon, Key};
use serde_json::{Value, json};

fn lobby_json(d: &Daemon, key: &Key, args: &[&str]) -> Value {
    let out = d.lobby_ok(key, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// The conversation's events, as `agent log --json` prints them.
fn events(d: &Daemon, key: &Key, vm: &str, id: &str) -> Vec<Value> {
    let out = d.ssh(key, "lobby", &["agent", "log", vm, id, "--json"]);
    assert!(
        out.status.success(),
        "agent log failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let all_tools = json!([
        "bash", "shell", "read", "write", "patch", "search", "browser", "logs", "todo"
    ]);
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
        &[
            "new",
            "--name",
            "app",
            "--prompt",
            "'Build me a hello app'",
            "--json",
        ],
    );
    let conv = made["agent"]["conversation"]
        .as_str()
        .expect("conversation")
        .to_string();
    assert!(
        made["agent"]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!("/vm/app/agent?c={conv}"))),
        "{made}"
    );
    let credit_before = 5_000_000;
    let ev = wait_turn_end(&d, &alice, "app", &conv, 1);
    let log = model.log();
    assert_eq!(
        log["failures"],
        json!([]),
        "the model saw what it should not:\n{log:#}"
    );
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
    assert!(
        ev.iter()
            .any(|e| e["type"] == "todo" && e["items"][1]["text"] == "serve it")
    );
    // The screenshot: a real PNG of that page, which the model got as an image block.
    let shot = result("browser")
        .into_iter()
        .find_map(|e| e["png"].as_str())
        .expect("a screenshot event");
    let png = b64(shot);
    assert_eq!(png_size(&png), (1280, 800));
    assert_browser_held_to_the_envelope();
    let images = log["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .flat_map(|r| r["images"].as_array().cloned().unwrap_or_default())
        .collect::<Vec<_>>();
    assert!(
        images
            .iter()
            .any(|i| i["png"] == true && i["width"] == 1280 && i["height"] == 800),
        "{images:?}"
    );
    // Bad tool calls come back as clear errors the model can act on.
    let patch = result("patch");
    assert_eq!(patch[0]["ok"], false);
    assert!(
        patch[0]["output"]
            .as_str()
            .expect("out")
            .contains("no match")
    );
    let bash = result("bash");
    let big = bash[0]["output"].as_str().expect("out");
    assert!(
        big.len() < 40_000 && big.contains("end-of-output") && big.contains("bytes cut"),
        "{}",
        &big[..200.min(big.len())]
    );
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
    let out = d.ssh(
        &alice,
        "lobby",
        &["agent", "prompt", "app", "--conversation", &conv, "thanks!"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// The conversation's events as `(number, type)`, once `done` says they are complete.
fn wait_for(
    d: &Daemon,
    key: &Key,
    vm: &str,
    id: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ev = events(d, key, vm, id);
        if done(&ev) {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; events:\n{}\n--- daemon log ---\n{}",
            serde_json::to_string_pretty(&ev).unwrap_or_default(),
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A tool call is running: more calls than results.
fn calling(ev: &[Value]) -> bool {
    let n = |t: &str| ev.iter().filter(|e| e["type"] == t).count();
    n("tool_call") > n("tool_result")
}

fn turn_ends(ev: &[Value]) -> usize {
    ev.iter().filter(|e| e["type"] == "turn_end").count()
}

fn last_error(ev: &[Value]) -> String {
    ev.iter()
        .rev()
        .find(|e| e["type"] == "error")
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Starts a turn without waiting; its conversation.
fn prompt_no_wait(d: &Daemon, key: &Key, vm: &str, conv: Option<&str>, text: &str) -> String {
    let mut args = vec!["agent", "prompt", vm, "--no-wait", "--json"];
    if let Some(c) = conv {
        args.extend(["--conversation", c]);
    }
    args.push(text);
    lobby_json(d, key, &args)["conversation"]
        .as_str()
        .expect("conversation")
        .to_string()
}

#[test]
fn vm_agent_through_openai_responses_and_every_failure_leaves_it_usable() {
    let model = ScriptedModel::start();
    let d = daemon(&model, "openai/fake-gpt");
    let (alice, bob) = (Key::new("alice"), Key::new("bob"));
    d.signup(&alice, "alice@example.com");
    d.signup(&bob, "bob@example.com");
    d.ok(&["account", "credit", "alice@example.com", "--set", "5"]);
    d.lobby_ok(&alice, &["new", "--name", "tiny", "--image", "tiny"]);
    let no_retry = json!({"x-should-retry": "false"});
    model.script(json!([
        {"expect": {"api": "openai", "tools_include": ["apply_patch", "shell", "browser", "todo"],
                    "system_contains": "Answer in haiku"},
         "reply": [{"tool": "apply_patch", "input": {"patch": "*** Begin Patch\n*** Add File: www/index.html\n+<title>Tiny App</title><h1>tiny app works</h1>\n*** End Patch\n"}}]},
        {"expect": {"tool_result_contains": "wrote www/index.html"},
         "reply": [{"tool": "shell", "input": {"command": "exec busybox httpd -f -p 8000 -h $HOME/www", "wait_secs": 2}}]},
        {"expect": {"tool_result_contains": "running: pid"},
         "reply": [{"tool": "browser", "input": {"action": "navigate", "url": "localhost:8000"}}]},
        {"expect": {"tool_result_contains": "Tiny App"},
         "reply": [{"tool": "browser", "input": {"action": "screenshot"}}]},
        // The browser cannot reach the host: not its metadata address (the LLM gateway's
        // model list is there), not the host's end of the VM's link.
        {"expect": {"has_image": true},
         "reply": [{"tool": "browser", "input": {"action": "navigate", "url": "http://169.254.169.254/gateway/llm/models"}}]},
        {"reply": [{"tool": "browser", "input": {"action": "eval", "js": "document.documentElement.innerText"}}]},
        {"reply": [{"tool": "browser", "input": {"action": "navigate", "url": "http://10.200.0.1:8080/"}}]},
        {"reply": [{"tool": "browser", "input": {"action": "eval", "js": "document.documentElement.innerText"}}]},
        // Nor the host's files.
        {"reply": [{"tool": "browser", "input": {"action": "navigate", "url": "file:///etc/hostname"}}]},
        {"reply": [{"tool": "apply_patch", "input": {"patch": "*** Begin Patch\n*** Update File: www/index.html\n@@\n-<h1>no such line</h1>\n+<h1>x</h1>\n*** End Patch\n"}}]},
        {"expect": {"tool_result_contains": "not in the file"},
         "reply": [{"text": "Served on port 8000."}]},
        // The model fails: said in the chat, and the next turn works.
        {"error": {"status": 500, "type": "server_error", "message": "upstream exploded", "headers": no_retry}},
        {"expect": {"last_user_contains": "again"}, "reply": [{"text": "Back."}]},
        // A long command the user stops.
        {"reply": [{"tool": "bash", "input": {"command": "sleep 60"}}]},
        {"expect": {"tool_result_contains": "stopped"}, "reply": [{"text": "Stopped, as you asked."}]},
        // A long command during which the VM is stopped.
        {"reply": [{"tool": "bash", "input": {"command": "sleep 60"}}]},
        // Bob, a collaborator, then not.
        // Its command ends only once the test has taken the share away (a fixed sleep could
        // end first on a loaded host), and at most after 2 minutes.
        {"reply": [{"tool": "bash", "input": {"command": "for i in $(seq 600); do [ -e /tmp/release ] && break; sleep 0.2; done; echo bob-was-here"}}]},
    ]));
    // The VM user's ~/AGENTS.md goes into the system prompt.
    let wrote = d.ssh(&alice, "tiny", &["echo 'Answer in haiku.' > ~/AGENTS.md"]);
    assert!(wrote.status.success(), "{wrote:?}");
    let conv = prompt_no_wait(&d, &alice, "tiny", None, "serve a page");
    let ev = wait_for(&d, &alice, "tiny", &conv, "the first turn's end", |e| {
        turn_ends(e) >= 1
    });
    assert_eq!(model.log()["failures"], json!([]), "{:#}", model.log());
    assert_eq!(ev.last().expect("events")["reason"], "done", "{ev:#?}");
    let shot = ev
        .iter()
        .find_map(|e| e["png"].as_str())
        .expect("a screenshot");
    assert_eq!(png_size(&b64(shot)), (1280, 800));
    let images: Vec<Value> = model.log()["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .flat_map(|r| r["images"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(
        images
            .iter()
            .any(|i| i["png"] == true && i["width"] == 1280),
        "{images:?}"
    );
    let seen: Vec<&str> = ev
        .iter()
        .filter(|e| e["type"] == "tool_result" && e["name"] == "browser")
        .filter_map(|e| e["output"].as_str())
        .collect();
    let host = &seen[seen.len() - 5..];
    assert!(
        host.iter()
            .all(|o| !o.contains("fake-gpt") && !o.contains("SSH-2.0")),
        "the browser reached the host: {host:#?}"
    );
    assert!(
        host[1].contains("private address")
            && host[3].contains("private address")
            && host[4].contains("http:// and https:// pages only"),
        "{host:#?}"
    );

    // The model errors.
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "break");
    let ev = wait_for(&d, &alice, "tiny", &conv, "the failed turn", |e| {
        turn_ends(e) >= 2
    });
    assert!(
        last_error(&ev).contains("upstream exploded"),
        "{}",
        last_error(&ev)
    );
    assert_eq!(ev.last().expect("events")["reason"], "error");
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "again");
    let ev = wait_for(&d, &alice, "tiny", &conv, "the turn after", |e| {
        turn_ends(e) >= 3
    });
    assert_eq!(ev.last().expect("events")["reason"], "done", "{ev:#?}");

    // Out of credit: the gateway's 402, said plainly; nothing reaches the model.
    let asked = model.log()["requests"].as_array().expect("requests").len();
    d.ok(&["account", "credit", "alice@example.com", "--set", "0"]);
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "more");
    let ev = wait_for(&d, &alice, "tiny", &conv, "the turn without credit", |e| {
        turn_ends(e) >= 4
    });
    assert!(
        last_error(&ev).starts_with("Out of LLM credit"),
        "{}",
        last_error(&ev)
    );
    assert_eq!(
        model.log()["requests"].as_array().expect("requests").len(),
        asked
    );
    d.ok(&["account", "credit", "alice@example.com", "--set", "5"]);

    // Stop mid-command: the turn ends `stopped`, and the model later hears the call was not finished.
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "wait a minute");
    wait_for(&d, &alice, "tiny", &conv, "the long command", calling);
    let stopped = lobby_json(&d, &alice, &["agent", "stop", "tiny", &conv, "--json"]);
    assert_eq!(stopped["stopped"], true);
    let ev = wait_for(&d, &alice, "tiny", &conv, "the stop", |e| turn_ends(e) >= 5);
    assert_eq!(ev.last().expect("events")["reason"], "stopped");
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "go on");
    let ev = wait_for(&d, &alice, "tiny", &conv, "the turn after the stop", |e| {
        turn_ends(e) >= 6
    });
    assert_eq!(ev.last().expect("events")["reason"], "done", "{ev:#?}");

    // The VM is stopped mid-command.
    prompt_no_wait(&d, &alice, "tiny", Some(&conv), "another minute");
    wait_for(&d, &alice, "tiny", &conv, "the long command", calling);
    d.lobby_ok(&alice, &["stop", "tiny"]);
    let ev = wait_for(&d, &alice, "tiny", &conv, "the turn on a stopped VM", |e| {
        turn_ends(e) >= 7
    });
    assert!(
        last_error(&ev).contains("start it (`start tiny`)"),
        "{ev:#?}"
    );
    d.lobby_ok(&alice, &["start", "tiny"]);

    // A collaborator drives the agent until the share is taken away.
    d.lobby_ok(
        &alice,
        &[
            "share",
            "add",
            "tiny",
            "bob@example.com",
            "--role",
            "collaborator",
        ],
    );
    let bobs = prompt_no_wait(&d, &bob, "tiny", None, "hello from bob");
    wait_for(&d, &bob, "tiny", &bobs, "bob's command", calling);
    d.lobby_ok(&alice, &["share", "remove", "tiny", "bob@example.com"]);
    d.exec("tiny", "touch /tmp/release");
    let ev = wait_for(&d, &alice, "tiny", &bobs, "the end of bob's turn", |e| {
        turn_ends(e) >= 1
    });
    assert!(last_error(&ev).contains("no longer has access"), "{ev:#?}");
    let denied = d.ssh(&bob, "lobby", &["agent", "log", "tiny", &bobs]);
    assert!(!denied.status.success());
    assert_eq!(model.log()["failures"], json!([]), "{:#}", model.log());
}

/// Logs `key` in to the dashboard; the curl cookie jar holding its session.
fn dashboard_session(d: &Daemon, key: &Key, jar: &std::path::Path) -> Vec<String> {
    let link = d.lobby_ok(key, &["browser"]);
    let url = link
        .lines()
        .find(|l| l.starts_with("https://"))
        .expect("a login link")
        .trim()
        .to_string();
    let origin = url.split("/__nook").next().expect("origin").to_string();
    let host = origin.trim_start_matches("https://").to_string();
    let resolve = format!("{}:127.0.0.1", host);
    let base = vec![
        "-sS".to_string(),
        "-k".to_string(),
        "--resolve".to_string(),
        resolve,
        "-b".to_string(),
        jar.display().to_string(),
        "-c".to_string(),
        jar.display().to_string(),
    ];
    let token = url.split("token=").nth(1).expect("token").to_string();
    let out = Command::new("curl")
        .args(&base)
        .args(["-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Origin: {origin}"))
        .args(["--data-urlencode", &format!("token={token}")])
        .arg(format!("{origin}/__nook/login"))
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code.starts_with('3') || code == "200", "login: {code}");
    let mut base = base;
    base.push(origin);
    base
}

/// The event numbers an SSE client gets in `secs`, starting after `last`.
fn sse_ids(session: &[String], path: &str, last: Option<u64>, secs: u32) -> Vec<u64> {
    let (origin, base) = session.split_last().expect("session");
    let mut cmd = Command::new("curl");
    cmd.args(base).args(["-N", "--max-time", &secs.to_string()]);
    if let Some(n) = last {
        cmd.args(["-H", &format!("Last-Event-ID: {n}")]);
    }
    let out = cmd.arg(format!("{origin}{path}")).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("id: ").and_then(|n| n.trim().parse().ok()))
        .collect()
}

#[test]
fn vm_agent_turn_goes_on_after_a_daemon_restart_and_its_stream_resumes_by_number() {
    let model = ScriptedModel::start();
    let mut d = daemon(&model, "anthropic/fake-claude");
    let alice = Key::new("alice");
    d.signup(&alice, "alice@example.com");
    d.ok(&["account", "credit", "alice@example.com", "--set", "5"]);
    d.lobby_ok(&alice, &["new", "--name", "box", "--image", "tiny"]);
    model.script(json!([
        {"expect": {"last_user_contains": "count"},
         "reply": [{"text": "Counting."}, {"tool": "bash", "input": {"command": "sleep 600; echo slept"}}]},
        {"expect": {"tool_result_contains": "interrupted"},
         "reply": [{"text": "Resumed after the restart."}]},
    ]));
    let conv = prompt_no_wait(&d, &alice, "box", None, "count to three");
    wait_for(&d, &alice, "box", &conv, "the command", calling);
    d.restart();
    let ev = wait_for(&d, &alice, "box", &conv, "the resumed turn", |e| {
        turn_ends(e) >= 1
    });
    assert_eq!(model.log()["failures"], json!([]), "{:#}", model.log());
    assert_eq!(ev.last().expect("events")["reason"], "done", "{ev:#?}");
    assert!(ev.iter().any(|e| e["type"] == "notice"), "{ev:#?}");
    let text: String = ev.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(text, "Counting.Resumed after the restart.");
    let n = ev.len() as u64;
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["seq"], json!(i + 1), "{e}");
    }

    // The chat's stream: from the start, and after a reconnect from the last number seen,
    // nothing missed and nothing twice.
    let jar = tempfile::NamedTempFile::new().expect("jar");
    let session = dashboard_session(&d, &alice, jar.path());
    let path = format!("/vm/box/agent/{conv}/events");
    assert_eq!(
        sse_ids(&session, &path, None, 3),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(
        sse_ids(&session, &path, Some(3), 3),
        (4..=n).collect::<Vec<_>>()
    );
    // The page itself, and nobody else's view of it.
    let (origin, base) = session.split_last().expect("session");
    let page = Command::new("curl")
        .args(base)
        .arg(format!("{origin}/vm/box/agent?c={conv}"))
        .output()
        .expect("curl");
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.contains(&format!("data-conversation=\"{conv}\"")),
        "{page}"
    );
    let stranger = Key::new("stranger");
    d.signup(&stranger, "stranger@example.com");
    let jar2 = tempfile::NamedTempFile::new().expect("jar");
    let other = dashboard_session(&d, &stranger, jar2.path());
    assert!(sse_ids(&other, &path, None, 2).is_empty());
}

/// Every process of the agent's browser runs in its VM's account's cgroup (a `browser-<vm>`
/// group beside the account's VMs), so the envelope bounds it as it bounds the VM.
fn assert_browser_held_to_the_envelope() {
    let mut found = 0;
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !cmdline
            .split(|b| *b == 0)
            .any(|a| a.starts_with(b"--user-data-dir=/tmp/nook-browser-"))
        {
            continue;
        }
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue; // exited meanwhile
        };
        assert!(
            cgroups
                .lines()
                .any(|l| l.contains("/nook/") && l.contains("/browser-")),
            "a browser process outside its account's cgroup ({}):\n{cgroups}",
            String::from_utf8_lossy(&cmdline).replace('\0', " ")
        );
        found += 1;
    }
    assert!(found > 0, "no browser process found");
}
