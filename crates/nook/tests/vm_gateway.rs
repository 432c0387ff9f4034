//! The LLM gateway, end to end: real tiny guests call it with busybox wget, and the real
//! `openai` and `anthropic` SDKs call it from the host through a relay inside a guest (so the
//! gateway sees the VM's own address). The provider is tests/fake-llm/fake_llm.py, a real
//! HTTP server speaking both wire formats with deterministic usage.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Key};

const ANTHROPIC_KEY: &str = "sk-ant-host-secret-4f1d9c";
const OPENAI_KEY: &str = "sk-oai-host-secret-77e2ab";
/// fake-claude: $1 input, $2 output, $0.5 cache read, $4 cache write per million tokens, so
/// a request costs exactly input + 2 output + cache_read/2 + 4 cache_write micro-dollars.
/// fake-gpt: $1 input, $3 output, $0.25 cached input. fake-cheap: output only.
const PRICES: &str = r#"
[llm_prices.anthropic.fake-claude]
input = 1.0
output = 2.0
cache_read = 0.5
cache_write = 4.0

[llm_prices.openai.fake-gpt]
input = 1.0
output = 3.0
cache_read = 0.25

[llm_prices.openai.fake-cheap]
input = 0.0
output = 1000.0
"#;

/// The fake provider, on a free port, logging what it was sent.
struct Fake {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fake {
    fn start() -> Fake {
        Self::start_with(ANTHROPIC_KEY)
    }

    /// A provider that takes `anthropic_key` (and the usual OpenAI key).
    fn start_with(anthropic_key: &str) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("requests.jsonl");
        let (child, port) = common::spawn_listening(
            Command::new("python3")
                .arg(common::repo_root().join("tests/fake-llm/fake_llm.py"))
                .args([
                    "--port",
                    "0",
                    "--anthropic-key",
                    anthropic_key,
                    "--openai-key",
                    OPENAI_KEY,
                    "--log",
                ])
                .arg(&log),
            "fake provider",
        );
        Fake {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon whose gateway reaches `fake`, with `more` added to its config file.
fn daemon(fake: &Fake, more: &str) -> Daemon {
    let tmp = tempfile::Builder::new()
        .prefix("nook-sys")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let url = format!("http://127.0.0.1:{}", fake.port);
    std::fs::write(
        data_dir.join("nook.toml"),
        format!(
            "llm_anthropic_base_url = \"{url}\"\nllm_anthropic_key = \"{ANTHROPIC_KEY}\"\nllm_openai_base_url = \"{url}\"\nllm_openai_key = \"{OPENAI_KEY}\"\n{more}\n{PRICES}"
        ),
    )
    .expect("nook.toml");
    Daemon::start_in(data_dir, Some(tmp), &[])
}

/// An account with `dollars` of credit and a running tiny VM of its own.
fn account_with_vm(d: &Daemon, who: &str, vm: &str, dollars: &str) -> Key {
    let key = Key::new(who);
    let email = format!("{who}@example.com");
    d.signup(&key, &email);
    d.ok(&["account", "credit", &email, "--set", dollars]);
    d.lobby_ok(&key, &["new", "--name", vm, "--image", "tiny"]);
    key
}

fn usage(d: &Daemon, key: &Key) -> serde_json::Value {
    serde_json::from_str(&d.lobby_ok(key, &["usage", "--json"])).expect("usage --json")
}

fn credit_micros(d: &Daemon, key: &Key) -> i64 {
    usage(d, key)["credit_micros"].as_i64().expect("credit")
}

/// One HTTP/1.1 request over a plain socket: (status, headers, body).
fn http(base: &str, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {}", String::from_utf8_lossy(&raw)));
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, headers, raw[split + 4..].to_vec())
}

fn wget_post(d: &Daemon, vm: &str, path: &str, body: &str) -> String {
    d.exec(
        vm,
        &format!(
            "wget -q -O - --header 'content-type: application/json' --post-data '{body}' http://169.254.169.254{path}"
        ),
    )
}

#[test]
fn vm_gateway_wget_from_a_tiny_guest_is_metered_exactly_and_holds_no_key() {
    let fake = Fake::start();
    let d = daemon(&fake, "");
    let key = account_with_vm(&d, "tok", "caller", "1");
    assert_eq!(credit_micros(&d, &key), 1_000_000);

    // Anthropic, not streamed: 5 words in, 3 out.
    let out = wget_post(
        &d,
        "caller",
        "/gateway/llm/anthropic/v1/messages",
        r#"{"model":"fake-claude","max_tokens":3,"messages":[{"role":"user","content":"one two three four five"}]}"#,
    );
    let msg: serde_json::Value = serde_json::from_str(&out).expect("message json");
    assert_eq!(msg["content"][0]["text"], "ok ok ok ", "{msg}");
    assert_eq!(msg["usage"]["input_tokens"], 5);
    // Anthropic, streamed, with a cache write: usage from message_start and message_delta.
    let sse = wget_post(
        &d,
        "caller",
        "/gateway/llm/anthropic/v1/messages",
        r#"{"model":"fake-claude","max_tokens":4,"stream":true,"messages":[{"role":"user","content":"stream this CACHEME"}]}"#,
    );
    assert!(sse.contains("event: message_stop"), "{sse}");
    // OpenAI chat, streamed without asking for usage: the gateway asks, and hides the answer.
    let chat = wget_post(
        &d,
        "caller",
        "/gateway/llm/openai/v1/chat/completions",
        r#"{"model":"fake-gpt","max_tokens":2,"stream":true,"messages":[{"role":"user","content":"a b c d"}]}"#,
    );
    assert!(chat.contains("data: [DONE]"), "{chat}");
    assert!(
        !chat.contains("\"choices\":[]") && !chat.contains("\"choices\": []"),
        "the usage chunk reached a client that did not ask: {chat}"
    );
    // OpenAI Responses, not streamed.
    let resp = wget_post(
        &d,
        "caller",
        "/gateway/llm/openai/v1/responses",
        r#"{"model":"fake-gpt","input":"x y","max_output_tokens":1}"#,
    );
    assert!(resp.contains("\"output_text\""), "{resp}");

    // Exact to the token: 5+2*3; 3+2*4+4*7; 4+3*2; 2+3*1 micro-dollars.
    let u = usage(&d, &key);
    let rows = u["usage"].as_array().expect("rows");
    let row = |model: &str| {
        rows.iter()
            .find(|r| r["model"] == model)
            .unwrap_or_else(|| panic!("no row for {model}: {u}"))
    };
    let claude = row("fake-claude");
    assert_eq!(
        [
            &claude["requests"],
            &claude["input_tokens"],
            &claude["output_tokens"],
            &claude["cache_write_tokens"]
        ],
        [2, 5 + 3, 3 + 4, 7],
        "{claude}"
    );
    let gpt = row("fake-gpt");
    assert_eq!(
        [
            &gpt["requests"],
            &gpt["input_tokens"],
            &gpt["output_tokens"]
        ],
        [2, 4 + 2, 2 + 1],
        "{gpt}"
    );
    let spent = (5 + 2 * 3) + (3 + 2 * 4 + 4 * 7) + (4 + 3 * 2) + (2 + 3);
    assert_eq!(u["credit_micros"], 1_000_000 - spent, "{u}");
    assert_eq!(
        claude["cost_micros"].as_i64().unwrap_or(0) + gpt["cost_micros"].as_i64().unwrap_or(0),
        spent
    );

    // Upstream got the host's keys, and the chat stream was asked for its usage.
    let sent = fake.requests();
    assert!(
        sent.iter()
            .filter(|r| r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/v1/messages")))
            .all(|r| r["headers"]["x-api-key"] == ANTHROPIC_KEY)
    );
    let chat_sent = sent
        .iter()
        .find(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/chat/completions"))
        })
        .expect("chat request upstream");
    assert_eq!(
        chat_sent["headers"]["authorization"],
        format!("Bearer {OPENAI_KEY}")
    );
    assert_eq!(chat_sent["body"]["stream_options"]["include_usage"], true);

    // Every response says what the gateway added; the models and the metadata are listed.
    let headers = d.exec(
        "caller",
        "wget -S -O /dev/null http://169.254.169.254/gateway/llm/models 2>&1",
    );
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("x-nook-overhead-duration-ms"),
        "{headers}"
    );
    let models = d.exec(
        "caller",
        "wget -q -O - http://169.254.169.254/gateway/llm/models",
    );
    assert!(
        models.contains("fake-claude") && models.contains("fake-cheap"),
        "{models}"
    );
    let meta = d.exec("caller", "wget -q -O - http://169.254.169.254/");
    assert!(
        meta.contains("\"llm\"") && meta.contains("/gateway/llm/anthropic"),
        "{meta}"
    );
    assert!(!meta.contains(ANTHROPIC_KEY) && !models.contains(OPENAI_KEY));

    // Metrics: tokens, cost and latency per account and model.
    let metrics = d.ok(&["metrics"]);
    assert!(
        metrics.contains("model=\"fake-claude\",kind=\"output\"} 7")
            && metrics.contains("nook_gateway_latency_micros_total{account=")
            && metrics.contains("nook_gateway_in_flight 0"),
        "{metrics}"
    );

    // No key ever reached the guest: search its disk.
    let id = d.vm("caller")["id"].as_str().expect("id").to_string();
    d.lobby_ok(&key, &["stop", "caller"]);
    let disk = std::fs::read(d.data_dir.join("vms").join(id).join("disk.qcow2")).expect("disk");
    for secret in [ANTHROPIC_KEY, OPENAI_KEY] {
        assert!(
            !disk.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is on the guest's disk"
        );
    }
}

#[test]
fn vm_gateway_real_sdks_stream_and_count_through_a_guest() {
    let python = std::env::var("NOOK_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("NOOK_TEST_PYTHON is unset: scripts/test makes a Python with the openai and anthropic SDKs and points it there")
    });
    let fake = Fake::start();
    let d = daemon(&fake, "");
    let key = account_with_vm(&d, "sdk", "sdkvm", "1");
    let base = d.gateway_relay("sdkvm");
    let out = Command::new(&python)
        .arg(common::repo_root().join("tests/gateway/sdk_calls.py"))
        .arg(&base)
        .output()
        .expect("run the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls: std::collections::HashMap<String, serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["call"].as_str().unwrap_or("").to_string(), v))
        .collect();
    let call = |name: &str| {
        calls
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in:\n{stdout}"))
    };
    assert_eq!(call("anthropic")["text"], "ok ok ok ok ");
    assert_eq!(call("anthropic")["cache_write"], 7);
    assert_eq!(call("anthropic-stream")["text"], "ok ok ok ok ok ");
    assert_eq!(call("anthropic-stream")["cache_read"], 7);
    assert_eq!(call("anthropic-count")["input"], 3);
    assert_eq!(call("openai-chat")["output"], 3);
    assert_eq!(call("openai-chat-stream")["output"], 5);
    assert_eq!(call("openai-chat-stream-no-usage")["usage_chunks"], 0);
    assert_eq!(call("openai-responses")["output"], 4);
    assert_eq!(call("openai-responses-stream")["output"], 5);
    assert_eq!(call("unknown-model")["status"], 404);
    assert!(
        call("unknown-model")["message"]
            .as_str()
            .unwrap_or("")
            .contains("not offered")
    );

    // What the SDKs saw is what was billed, call by call, to the token.
    let u = usage(&d, &key);
    let rows = u["usage"].as_array().expect("rows");
    let sum = |model: &str, field: &str| -> i64 {
        rows.iter()
            .filter(|r| r["model"] == model)
            .map(|r| r[field].as_i64().unwrap_or(0))
            .sum()
    };
    let seen = |names: &[&str], field: &str| -> i64 {
        names
            .iter()
            .map(|n| call(n)[field].as_i64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        sum("fake-claude", "requests"),
        2,
        "count_tokens is free: {u}"
    );
    assert_eq!(
        sum("fake-claude", "output_tokens"),
        seen(&["anthropic", "anthropic-stream"], "output")
    );
    assert_eq!(
        sum("fake-claude", "input_tokens"),
        seen(&["anthropic", "anthropic-stream"], "input")
    );
    assert_eq!(sum("fake-claude", "cache_write_tokens"), 7);
    assert_eq!(sum("fake-claude", "cache_read_tokens"), 7);
    assert_eq!(sum("fake-gpt", "requests"), 5, "{u}");
    assert_eq!(
        sum("fake-gpt", "output_tokens"),
        seen(
            &[
                "openai-chat",
                "openai-chat-stream",
                "openai-responses",
                "openai-responses-stream"
            ],
            "output"
        ) + 2
    );
    let cost: i64 = rows
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(u["credit_micros"], 1_000_000 - cost);

    // With nothing left: 402, saying how much is left and what to do.
    d.ok(&["account", "credit", "sdk@example.com", "--set", "0"]);
    let (status, _, body) = http(
        &base,
        "POST",
        "/gateway/llm/openai/v1/chat/completions",
        br#"{"model":"fake-gpt","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 402, "{body}");
    assert!(
        body.contains("$0.000000") && body.contains("nook account credit"),
        "{body}"
    );
}

#[test]
fn vm_gateway_fifty_concurrent_requests_against_ten_stop_at_ten_or_eleven() {
    let fake = Fake::start();
    let d = daemon(&fake, "");
    // fake-cheap: 5 output tokens at $1000 per million is 5000 micro-dollars a request.
    let key = account_with_vm(&d, "rush", "rushvm", "0.05");
    // All 50 leave the guest at once (busybox wget in the background), as an agent's
    // parallel calls would.
    let out = d.exec(
        "rushvm",
        r#"body='{"model":"fake-cheap","max_tokens":5,"messages":[{"role":"user","content":"go"}]}'
           for i in $(seq 50); do
             (wget -q -O /dev/null --header 'content-type: application/json' --post-data "$body" \
                http://169.254.169.254/gateway/llm/openai/v1/chat/completions >/tmp/out$i 2>&1; echo $? >/tmp/rc$i) &
           done
           wait
           echo ok=$(cat /tmp/rc* | grep -c '^0$') refused=$(cat /tmp/out* | grep -c '402')"#,
    );
    let count = |what: &str| -> usize {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(what))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what} in {out:?}"))
    };
    let (ok, refused) = (count("ok="), count("refused="));
    assert!((10..=11).contains(&ok), "{ok} went through: {out}");
    assert_eq!(ok + refused, 50, "{out}");
    let u = usage(&d, &key);
    assert_eq!(u["usage"][0]["requests"].as_u64(), Some(ok as u64), "{u}");
    assert_eq!(
        u["credit_micros"].as_i64(),
        Some(50_000 - 5000 * ok as i64),
        "{u}"
    );
}

#[test]
fn vm_gateway_bad_input_and_broken_upstreams_get_clear_errors_and_exact_accounting() {
    let fake = Fake::start();
    // A provider nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let down = closed.local_addr().expect("addr").port();
    drop(closed);
    let d = daemon(
        &fake,
        &format!(
            "[[llm_providers]]\nname = \"down\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{down}\"\nkey = \"k\"\n[llm_providers.models.m]\ninput = 1.0\noutput = 1.0\n"
        ),
    );
    let key = account_with_vm(&d, "bad", "badvm", "1");
    let base = d.gateway_relay("badvm");
    let post = |path: &str, body: &[u8]| {
        let (status, _, body) = http(&base, "POST", path, body);
        (status, String::from_utf8_lossy(&body).to_string())
    };
    let (s, b) = post("/gateway/llm/anthropic/v1/messages", b"{not json");
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("not valid JSON") && b.contains("\"type\":\"error\""),
        "{b}"
    );
    let (s, b) = post("/gateway/llm/mistery/v1/chat/completions", b"{}");
    assert_eq!(s, 404, "{b}");
    assert!(
        b.contains("No LLM provider \\\"mistery\\\"") && b.contains("anthropic"),
        "{b}"
    );
    let (s, b) = post(
        "/gateway/llm/openai/v1/chat/completions",
        br#"{"model":"gpt-nope","messages":[]}"#,
    );
    assert_eq!(s, 404, "{b}");
    assert!(
        b.contains("not offered") && b.contains("/gateway/llm/models"),
        "{b}"
    );
    let big = format!(
        "{{\"model\":\"fake-gpt\",\"pad\":\"{}\"}}",
        "x".repeat(20 << 20)
    );
    let (s, b) = post("/gateway/llm/openai/v1/chat/completions", big.as_bytes());
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("16 MiB"), "{b}");
    let (s, b) = post(
        "/gateway/llm/down/v1/chat/completions",
        br#"{"model":"m","messages":[]}"#,
    );
    assert_eq!(s, 502, "{b}");
    assert!(b.contains("cannot be reached"), "{b}");
    // Slow to start is fine.
    let (s, b) = post(
        "/gateway/llm/anthropic/v1/messages",
        br#"{"model":"fake-claude","max_tokens":2,"messages":[{"role":"user","content":"SLOWSTART please"}]}"#,
    );
    assert_eq!(s, 200, "{b}");
    // A provider that resets mid-stream: the client sees a broken stream (no message_stop),
    // and the input the provider reported is billed.
    let (s, b) = post(
        "/gateway/llm/anthropic/v1/messages",
        br#"{"model":"fake-claude","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"RESETMID now"}]}"#,
    );
    assert_eq!(s, 200);
    assert!(
        b.contains("message_start") && !b.contains("message_stop"),
        "{b}"
    );
    // A client that hangs up mid-stream is billed for what the provider reported.
    {
        let addr = base.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let body = br#"{"model":"fake-claude","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"SLOWSTREAM BIGSTREAM go"}]}"#;
        let head = format!(
            "POST /gateway/llm/anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body).expect("write");
        let mut first = [0u8; 512];
        let n = s.read(&mut first).expect("first bytes");
        assert!(n > 0);
        drop(s);
    }
    // Settlements land asynchronously; wait for the hang-up's row.
    let deadline = Instant::now() + Duration::from_secs(20);
    let u = loop {
        let u = usage(&d, &key);
        let requests: u64 = u["usage"]
            .as_array()
            .map_or(0, |r| r.iter().filter_map(|r| r["requests"].as_u64()).sum());
        if requests >= 4 || Instant::now() > deadline {
            break u;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let rows = u["usage"].as_array().expect("rows");
    let claude = rows
        .iter()
        .find(|r| r["model"] == "fake-claude")
        .expect("claude row");
    // SLOWSTART (2 words, 2 out), RESETMID (2 words), the hang-up (3 words).
    assert_eq!(claude["requests"], 3, "{u}");
    assert_eq!(claude["input_tokens"], 2 + 2 + 3, "{u}");
    let down_row = rows.iter().find(|r| r["model"] == "m").expect("down row");
    assert_eq!(
        (
            down_row["requests"].as_u64(),
            down_row["cost_micros"].as_u64()
        ),
        (Some(1), Some(0))
    );
    // Nothing is lost or held: the credit is exactly what was billed.
    let cost: i64 = rows
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(u["credit_micros"].as_i64(), Some(1_000_000 - cost), "{u}");
}

/// Claude Code and Codex, from npm, each complete a turn through the gateway, set up as
/// docs/gateway.md says (run on the host, through a relay in the guest that carries the VM's
/// address).
#[test]
fn vm_gateway_claude_code_and_codex_complete_a_turn() {
    let bin = std::env::var("NOOK_TEST_AGENTS").unwrap_or_else(|_| {
        panic!("NOOK_TEST_AGENTS is unset: scripts/test installs Claude Code and Codex from npm and points it at their bin directory")
    });
    let fake = Fake::start();
    let d = daemon(&fake, "");
    let key = account_with_vm(&d, "agents", "agentvm", "1");
    let base = d.gateway_relay("agentvm");
    let home = tempfile::tempdir().expect("home");

    let claude = Command::new(Path::new(&bin).join("claude"))
        .args(["-p", "say hi"])
        .env("HOME", home.path())
        .env(
            "ANTHROPIC_BASE_URL",
            format!("{base}/gateway/llm/anthropic"),
        )
        .env("ANTHROPIC_API_KEY", "nook")
        .env("ANTHROPIC_MODEL", "fake-claude")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run claude");
    let said = String::from_utf8_lossy(&claude.stdout);
    assert!(
        claude.status.success() && said.contains("ok ok"),
        "claude: {said}\n{}",
        String::from_utf8_lossy(&claude.stderr)
    );

    std::fs::create_dir_all(home.path().join(".codex")).expect(".codex");
    std::fs::write(
        home.path().join(".codex/config.toml"),
        format!(
            "model = \"fake-gpt\"\nmodel_provider = \"nook\"\n\n[model_providers.nook]\nname = \"nook gateway\"\nbase_url = \"{base}/gateway/llm/openai/v1\"\nwire_api = \"responses\"\nenv_key = \"NOOK_GATEWAY_KEY\"\n"
        ),
    )
    .expect("config.toml");
    let codex = Command::new(Path::new(&bin).join("codex"))
        .args(["exec", "--skip-git-repo-check", "say hi"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env("NOOK_GATEWAY_KEY", "nook")
        .stdin(Stdio::null())
        .output()
        .expect("run codex");
    let said = String::from_utf8_lossy(&codex.stdout);
    assert!(
        codex.status.success() && said.contains("ok ok"),
        "codex: {said}\n{}",
        String::from_utf8_lossy(&codex.stderr)
    );

    // Both were billed to the VM's owner, and the provider saw only the host's keys.
    let u = usage(&d, &key);
    let rows = u["usage"].as_array().expect("rows");
    for model in ["fake-claude", "fake-gpt"] {
        assert!(
            rows.iter().any(|r| r["model"] == model
                && r["vm"] == "agentvm"
                && r["output_tokens"].as_u64() > Some(0)),
            "no usage of {model}: {u}"
        );
    }
    for r in fake.requests() {
        let h = &r["headers"];
        assert!(
            h["x-api-key"] == ANTHROPIC_KEY || h["authorization"] == format!("Bearer {OPENAI_KEY}"),
            "{r}"
        );
    }
}

/// An `llm` integration: the account's own key goes upstream instead of the host's, and the
/// account's credit is not charged. The key never reaches the VM.
#[test]
fn vm_gateway_an_llm_integration_uses_the_accounts_own_key_and_no_credit() {
    const OWN: &str = "sk-ant-own-key-0d9a21";
    let fake = Fake::start_with(OWN);
    let d = daemon(&fake, "");
    let key = account_with_vm(&d, "own", "ownvm", "1");
    let ask =
        r#"{"model":"fake-claude","max_tokens":2,"messages":[{"role":"user","content":"mine"}]}"#;
    // The host's key is not what this provider takes.
    let out = d.exec(
        "ownvm",
        &format!("wget -q -O - --header 'content-type: application/json' --post-data '{ask}' http://169.254.169.254/gateway/llm/anthropic/v1/messages 2>&1 || true"),
    );
    assert!(out.contains("401"), "{out}");
    d.lobby_ok(
        &key,
        &[
            "integrations",
            "add",
            "llm",
            "--name",
            "mykey",
            "--provider",
            "anthropic",
            "--key",
            OWN,
        ],
    );
    d.lobby_ok(&key, &["integrations", "attach", "mykey", "ownvm"]);
    let out = wget_post(&d, "ownvm", "/gateway/llm/anthropic/v1/messages", ask);
    assert!(out.contains("ok ok"), "{out}");
    let sent = fake.requests();
    assert_eq!(
        sent.last().map(|r| r["headers"]["x-api-key"].clone()),
        Some(serde_json::json!(OWN))
    );
    let u = usage(&d, &key);
    assert_eq!(
        u["credit_micros"], 1_000_000,
        "the own key's call was charged: {u}"
    );
    let id = d.vm("ownvm")["id"].as_str().expect("id").to_string();
    d.lobby_ok(&key, &["stop", "ownvm"]);
    let disk = std::fs::read(d.data_dir.join("vms").join(id).join("disk.qcow2")).expect("disk");
    assert!(
        !disk.windows(OWN.len()).any(|w| w == OWN.as_bytes()),
        "the own key is on the guest's disk"
    );
}

/// A client that asks for a 200 MiB stream and stops reading: the gateway reads upstream only
/// as fast as the client takes, so the daemon's memory stays flat.
#[test]
fn vm_gateway_a_stalled_stream_reader_keeps_the_daemon_bounded() {
    let fake = Fake::start();
    let d = daemon(&fake, "");
    let _key = account_with_vm(&d, "stall", "stallvm", "1");
    let base = d.gateway_relay("stallvm");
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| {
                v.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0)
            >> 10
    };
    let before = rss();
    let addr = base.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    let body = br#"{"model":"fake-claude","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"HUGESTREAM now"}]}"#;
    let head = format!(
        "POST /gateway/llm/anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    // Take the first bytes, then stop reading for a while.
    let mut first = [0u8; 4096];
    assert!(s.read(&mut first).expect("first bytes") > 0);
    let mut peak = before;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_secs(1));
        peak = peak.max(rss());
    }
    eprintln!(
        "daemon RSS {before} MiB -> peak {peak} MiB while a reader stalls on a 200 MiB stream"
    );
    assert!(
        peak < before + 32,
        "the daemon grew from {before} to {peak} MiB"
    );
    drop(s);
}
