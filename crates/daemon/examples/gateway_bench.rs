//! nook's LLM gateway against LiteLLM's proxy, both in front of the same mock OpenAI provider,
//! measured by one Rust load generator in one run.
//!
//! ```text
//! cargo run --release -p nook-daemon --example gateway_bench
//! BENCH_SOAK_SECS=600 cargo run --release -p nook-daemon --example gateway_bench   # full soak
//! BENCH_LITELLM=0 cargo run --release -p nook-daemon --example gateway_bench       # nook only
//! ```
//!
//! Three child processes (the example re-executes itself for the first two):
//! - a mock OpenAI provider (hyper, one worker thread): `POST .../chat/completions` answers a
//!   fixed chat.completion with usage, or for `"stream": true` an SSE stream of 20
//!   chat.completion.chunk events (plus a usage chunk when `stream_options.include_usage` is
//!   set) and `data: [DONE]`, without delay; model `gpt-4o-mini-slow` streams one chunk every
//!   100 ms for 3 s instead;
//! - nook's gateway (`nook_gateway::Gateway` over the daemon's real `StoreBackend`: SQLite in a
//!   temporary directory, one reservation and one settlement per request), served by hyper on
//!   a multi-threaded tokio runtime with mimalloc, as the `nook` binary; every request is
//!   one fixed `Caller` (the daemon takes it from the VM's pinned source address);
//! - LiteLLM's proxy (`litellm --config`, installed with pip into
//!   /var/cache/nook-test/litellm-venv if missing), a master key (it refuses to start without
//!   one) sent as `Authorization: Bearer`, no database, one uvicorn
//!   worker per core, `LITELLM_LOG=ERROR` (no access log), `LITELLM_LOCAL_MODEL_COST_MAP=True`
//!   (no fetch of the price table at start), `LITELLM_TELEMETRY=False`.
//!
//! The method is GetBusbar/benchmarking's: added latency = a percentile through the gateway
//! minus the same percentile direct to the mock, at concurrency 1 on one keep-alive
//! connection. Measured, for direct, nook and LiteLLM:
//! - latency at concurrency 1 (BENCH_N requests after BENCH_WARMUP, in 5 interleaved rounds;
//!   a percentile is the median of the rounds' percentiles, as in proxy_bench);
//! - time to first byte of a stream at concurrency 1;
//! - a paced load of BENCH_RATE requests/s over 128 connections for BENCH_LOAD_SECS (achieved
//!   rate, latency from send, CPU per request of the serving processes), and the most a
//!   closed loop of 64 connections gets for 5 s;
//! - concurrent slow streams held without a stall (a gap over 1 s between chunks, or a stream
//!   that fails or loses chunks) for N in BENCH_STREAMS (64,128,256,512,1024);
//! - RSS of the serving processes over a soak of BENCH_SOAK_SECS (default 60) at
//!   BENCH_SOAK_RATE (default 500) requests/s, one in ten a stream;
//! - the median of each gateway's own overhead header (`x-nook-overhead-duration-ms`,
//!   `x-litellm-overhead-duration-ms`).
//!
//! Everything shares the machine's cores (the load generator is one thread): on a small machine
//! the absolute numbers include that contention for both gateways alike.
//! Other knobs: BENCH_LITELLM_WORKERS (default: cores), BENCH_LITELLM_VENV, and for diagnosis
//! only BENCH_NOOK_BACKEND=memory (a backend that does nothing in place of the store, to tell
//! the gateway's own cost from the store's).
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nook_daemon::gateway::StoreBackend;
use nook_gateway::backend::BoxFuture;
use nook_gateway::{
    ApiKind, BackendError, Caller, Gateway, GatewayBackend, GatewayConfig, Price, Provider,
    RateLimits, Reservation, UsageRecord,
};
use nook_store::{Admission, SshKey, Store};
use serde_json::{Value, json};

/// The same allocator as the `nook` binary that runs the gateway.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn Error + Send + Sync>;

const MODEL: &str = "gpt-4o-mini";
const SLOW_MODEL: &str = "gpt-4o-mini-slow";
const PRICE: Price = Price {
    input: 0.15,
    output: 0.6,
    cache_read: 0.075,
    cache_write: 0.0,
};
const NOOK_PATH: &str = "/gateway/llm/openai/v1/chat/completions";
const OPENAI_PATH: &str = "/v1/chat/completions";
const LITELLM_OVERHEAD: &str = "x-litellm-overhead-duration-ms";
const ACCOUNT: &str = "acct-bench";
/// Content chunks of a fast stream (plus a role chunk and a finish chunk: 20 events).
const FAST_CHUNKS: usize = 18;
/// Content chunks of a slow stream, one every [`SLOW_EVERY`].
const SLOW_CHUNKS: usize = 30;
const SLOW_EVERY: Duration = Duration::from_millis(100);
/// A gap between two chunks of a slow stream longer than this is a stall.
const STALL: Duration = Duration::from_secs(1);
const DEFAULT_VENV: &str = "/var/cache/nook-test/litellm-venv";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child ends when the bench does, even if the bench dies: its stdin is a pipe from us.
fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

// ---------------------------------------------------------------------------------------------
// The mock provider.

/// A model's canned answers, built once.
struct Canned {
    json: Bytes,
    /// Role chunk, content chunks, finish chunk.
    events: Vec<Bytes>,
    usage: Bytes,
}

fn canned(model: &str, chunks: usize) -> Canned {
    const WORDS: [&str; 6] = ["Hello", "!", " How", " can", " I", " help?"];
    let chunk = |delta: Value, finish: Value| {
        let v = json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for i in 0..chunks {
        events.push(chunk(
            json!({"content": WORDS[i % WORDS.len()]}),
            Value::Null,
        ));
    }
    events.push(chunk(json!({}), json!("stop")));
    let usage =
        json!({"prompt_tokens": 22, "completion_tokens": chunks, "total_tokens": 22 + chunks});
    let usage_event = json!({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_bench", "choices": [], "usage": usage,
    });
    let whole = json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 22, "completion_tokens": 9, "total_tokens": 31},
    });
    Canned {
        json: Bytes::from(whole.to_string()),
        events,
        usage: Bytes::from(format!("data: {usage_event}\n\n")),
    }
}

type MockBody = UnsyncBoxBody<Bytes, Infallible>;

async fn mock_answer(
    canned: Arc<HashMap<String, Canned>>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let reply = |status: StatusCode, ct: &'static str, body: Bytes| {
        let mut r = Response::new(Full::new(body).boxed_unsync());
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        Ok(r)
    };
    let json_ct = "application/json";
    if req.method() != Method::POST || !req.uri().path().ends_with("/chat/completions") {
        return reply(
            StatusCode::NOT_FOUND,
            json_ct,
            Bytes::from_static(
                br#"{"error":{"message":"not found","type":"invalid_request_error"}}"#,
            ),
        );
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    let Some(c) = canned.get(model) else {
        return reply(
            StatusCode::NOT_FOUND,
            json_ct,
            Bytes::from_static(br#"{"error":{"message":"no such model","type":"invalid_request_error","code":"model_not_found"}}"#),
        );
    };
    if v.get("stream").and_then(Value::as_bool) != Some(true) {
        return reply(StatusCode::OK, json_ct, c.json.clone());
    }
    let mut frames = c.events.clone();
    if v.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true)
    {
        frames.push(c.usage.clone());
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let body: MockBody = if model == SLOW_MODEL {
        // The role chunk at once, then a chunk every SLOW_EVERY; finish, usage and [DONE]
        // after the last content chunk, together.
        let tail: Vec<u8> = frames.split_off(SLOW_CHUNKS + 1).concat();
        frames.push(Bytes::from(tail));
        let s = futures::stream::unfold((0usize, frames), |(i, frames)| async move {
            let f = frames.get(i)?.clone();
            if i > 0 {
                tokio::time::sleep(SLOW_EVERY).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(f)), (i + 1, frames)))
        });
        StreamBody::new(s).boxed_unsync()
    } else {
        StreamBody::new(futures::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, Infallible>(Frame::data(f))),
        ))
        .boxed_unsync()
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(r)
}

fn run_mock(port: u16) -> Result<(), BoxError> {
    exit_with_parent();
    let canned: Arc<HashMap<String, Canned>> = Arc::new(
        [
            (MODEL.to_string(), canned(MODEL, FAST_CHUNKS)),
            (SLOW_MODEL.to_string(), canned(SLOW_MODEL, SLOW_CHUNKS)),
        ]
        .into(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        // A deep backlog: the mock must never be what limits the stream test.
        let listener = socket.listen(4096)?;
        loop {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            let canned = canned.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| mock_answer(canned.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// nook's gateway, in a process of its own so that its RSS is its own.

/// For diagnosis only (BENCH_NOOK_BACKEND=memory): a backend that does nothing, to tell the
/// gateway's own cost from the store's. Not what the daemon runs.
struct MemoryBackend;

impl GatewayBackend for MemoryBackend {
    fn reserve<'a>(
        &'a self,
        _: &'a Caller,
        _: u64,
    ) -> BoxFuture<'a, Result<Reservation, BackendError>> {
        Box::pin(async { Ok(Reservation::Taken) })
    }
    fn own_key<'a>(
        &'a self,
        _: &'a Caller,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        Box::pin(async { Ok(None) })
    }
    fn settle(&self, _: UsageRecord) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }
}

fn run_gateway(port: u16, mock_port: u16, db: &Path, memory: bool) -> Result<(), BoxError> {
    exit_with_parent();
    // As the daemon: tokio's multi-threaded runtime, one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = Store::open(db).await?;
        let key = SshKey {
            fingerprint: "SHA256:gateway-bench".into(),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJlbmNo bench".into(),
            comment: "bench".into(),
        };
        let account = store
            .create_account(ACCOUNT, "bench@example.com", &key, Admission::Vouched)
            .await?;
        // A million dollars: no request of the bench is ever refused for credit.
        store
            .change_credit(&account.id, 0, 1_000_000_000_000, true)
            .await?;
        let cfg = GatewayConfig {
            providers: vec![Provider {
                name: "openai".into(),
                kind: ApiKind::OpenAi,
                base_url: format!("http://127.0.0.1:{mock_port}"),
                key: Some("sk-bench-dummy".into()),
                models: [(MODEL.to_string(), PRICE), (SLOW_MODEL.to_string(), PRICE)].into(),
            }],
            limits: RateLimits {
                account_rpm: 0,
                vm_rpm: 0,
                account_tpm: 0,
            },
            ..GatewayConfig::default()
        };
        // The VM has no `llm` integration of its own: every request uses the host's key and is
        // billed (the per-request lookup of an own key still runs).
        let sealer = nook_daemon::secrets::Sealer::open(db.parent().unwrap_or(Path::new(".")))?;
        let backend: Arc<dyn GatewayBackend> = if memory {
            Arc::new(MemoryBackend)
        } else {
            let ledger = nook_daemon::gateway::Ledger::new(store.clone(), 0);
            Arc::new(StoreBackend::new(ledger, store, Arc::new(sealer)))
        };
        let gateway = Arc::new(Gateway::new(cfg, backend)?);
        let caller = Caller {
            account_id: account.id,
            vm_id: "vm-bench".into(),
            vm_name: "bench".into(),
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            let (gateway, caller) = (gateway.clone(), caller.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (gateway, caller) = (gateway.clone(), caller.clone());
                    async move { Ok::<_, Infallible>(gateway.handle(caller, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A child process, ended with the bench (its whole process group when `group`).
struct Kid {
    child: Child,
    group: bool,
}

impl Kid {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        if self.group {
            let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..50 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_self(args: &[&str]) -> Result<Kid, BoxError> {
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()?;
    Ok(Kid {
        child,
        group: false,
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if StdTcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        for (c, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*c);
            queue.push_back(*c);
        }
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS of a process and its descendants, in MB (10^6 bytes).
fn tree_rss_mb(pid: u32) -> f64 {
    tree(pid).iter().map(|p| rss_kib(*p)).sum::<u64>() as f64 * 1024.0 / 1e6
}

/// User plus system CPU time of a process tree, in clock ticks (USER_HZ, 100 on Linux).
fn tree_cpu_ticks(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .map(|p| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                return 0;
            };
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// A plain blocking GET, for LiteLLM's readiness: the status code.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = StdTcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// LiteLLM's proxy in front of the mock, installed first if need be. `Err` says why not.
/// LiteLLM's proxy, running.
struct LiteLlm {
    kid: Kid,
    port: u16,
    version: String,
    /// Its master key: LiteLLM refuses to start without one.
    key: String,
}

fn start_litellm(dir: &Path, mock_port: u16, workers: usize) -> Result<LiteLlm, String> {
    let venv =
        PathBuf::from(std::env::var("BENCH_LITELLM_VENV").unwrap_or_else(|_| DEFAULT_VENV.into()));
    let bin = venv.join("bin/litellm");
    if !bin.exists() {
        if !venv.join("bin/pip").exists() {
            println!("LiteLLM: creating a venv at {}", venv.display());
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .map_err(|e| format!("cannot run python3 -m venv: {e}"))?;
            if !ok.success() {
                return Err(format!("python3 -m venv {} failed: {ok}", venv.display()));
            }
        }
        println!("LiteLLM: pip install 'litellm[proxy]' (a few minutes the first time)");
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "--progress-bar", "off", "litellm[proxy]"])
            .status()
            .map_err(|e| format!("cannot run pip: {e}"))?;
        if !ok.success() || !bin.exists() {
            return Err(format!("pip install 'litellm[proxy]' failed: {ok}"));
        }
    }
    let version = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into());

    // Both models priced as nook prices them, so LiteLLM does its usual cost tracking too.
    let per_token = |per_million: f64| per_million / 1e6;
    let mut config = String::from("model_list:\n");
    for model in [MODEL, SLOW_MODEL] {
        config.push_str(&format!(
            "  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n      \
             api_base: http://127.0.0.1:{mock_port}/v1\n      api_key: sk-bench-dummy\n    \
             model_info:\n      input_cost_per_token: {:e}\n      output_cost_per_token: {:e}\n",
            per_token(PRICE.input),
            per_token(PRICE.output),
        ));
    }
    let config_path = dir.join("litellm.yaml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log = dir.join("litellm.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let port = free_port();
    let key = format!(
        "sk-{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config_path)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--num_workers", &workers.to_string()])
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_TELEMETRY", "False")
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_MASTER_KEY", &key)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut kid = Kid { child, group: true };
    println!(
        "LiteLLM {version}: starting on port {port} with {workers} workers (log: {})",
        log.display()
    );
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = kid.child.try_wait() {
            return Err(format!(
                "litellm exited ({status}) while starting; its log ends:\n{}",
                tail(&log, 20)
            ));
        }
        if http_get_status(port, "/health/liveliness") == Some(200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(format!(
                "litellm did not answer within 180 s; its log ends:\n{}",
                tail(&log, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "LiteLLM: ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(LiteLlm {
        kid,
        port,
        version,
        key,
    })
}

// ---------------------------------------------------------------------------------------------
// The load generator: hyper's client connection, HTTP/1.1 keep-alive.

#[derive(Clone)]
struct Target {
    name: &'static str,
    port: u16,
    path: &'static str,
    host: HeaderValue,
    /// `authorization`, for LiteLLM's master key.
    auth: Option<HeaderValue>,
    /// Requests answered 200, over the whole run.
    ok: Arc<AtomicU64>,
}

impl Target {
    fn new(name: &'static str, port: u16, path: &'static str) -> Target {
        Target {
            name,
            port,
            path,
            host: HeaderValue::from_str(&format!("127.0.0.1:{port}")).unwrap(),
            auth: None,
            ok: Arc::default(),
        }
    }

    fn request(&self, body: Bytes) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = hyper::Uri::from_static(self.path);
        req.headers_mut().insert(HOST, self.host.clone());
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        req
    }
}

fn chat_body(model: &str, stream: bool) -> Bytes {
    let mut v = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 64,
    });
    if stream {
        v["stream"] = json!(true);
    }
    Bytes::from(v.to_string())
}

async fn connect(port: u16) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

#[derive(Debug, Default)]
struct Reply {
    status: u16,
    /// To the end of the body.
    total: Duration,
    /// To the first byte of the body.
    first: Duration,
    /// The longest wait between two pieces of the body.
    max_gap: Duration,
    body: Vec<u8>,
    /// The gateway's own overhead header, in ms.
    overhead_ms: Option<f64>,
}

impl Reply {
    fn events(&self) -> usize {
        self.body.windows(5).filter(|w| *w == b"data:").count()
    }
    fn done(&self) -> bool {
        self.body.windows(6).any(|w| w == b"[DONE]")
    }
}

async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Reply, BoxError> {
    let t0 = Instant::now();
    let resp = send.send_request(req).await?;
    let mut r = Reply {
        status: resp.status().as_u16(),
        overhead_ms: resp
            .headers()
            .get(nook_gateway::OVERHEAD_HEADER)
            .or_else(|| resp.headers().get(LITELLM_OVERHEAD))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok()),
        ..Reply::default()
    };
    let mut body = resp.into_body();
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => r.first = now - t0,
            Some(prev) => r.max_gap = r.max_gap.max(now - prev),
        }
        last = Some(now);
        r.body.extend_from_slice(&data);
    }
    r.total = t0.elapsed();
    Ok(r)
}

/// One keep-alive connection to a target, reopened after an error.
struct Lane {
    t: Target,
    send: Option<SendRequest<Full<Bytes>>>,
}

impl Lane {
    fn new(t: &Target) -> Lane {
        Lane {
            t: t.clone(),
            send: None,
        }
    }

    async fn open(&mut self) -> Result<(), BoxError> {
        if self.send.as_ref().is_none_or(|s| s.is_closed()) {
            self.send = Some(connect(self.t.port).await?);
        }
        Ok(())
    }

    async fn call(&mut self, body: Bytes) -> Result<Reply, BoxError> {
        self.open().await?;
        let req = self.t.request(body);
        let send = self.send.as_mut().unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(60), async {
            send.ready().await?;
            exchange(send, req).await
        })
        .await;
        match outcome {
            Ok(Ok(r)) => {
                if r.status == 200 {
                    self.t.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r)
            }
            Ok(Err(e)) => {
                self.send = None;
                Err(e)
            }
            Err(_) => {
                self.send = None;
                Err("no answer within 60 s".into())
            }
        }
    }
}

/// A percentile of nanoseconds, in microseconds (`v` sorted).
fn pct_us(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i] as f64 / 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rounds of the concurrency-1 measures: each round measures every target in turn.
const ROUNDS: usize = 5;

#[derive(Default)]
struct Seq {
    /// Nanoseconds to the end of the answer, per round, sorted.
    total: Vec<Vec<u64>>,
    /// Nanoseconds to its first byte, per round, sorted.
    first: Vec<Vec<u64>>,
    overhead_ms: Vec<f64>,
    errors: u64,
}

impl Seq {
    /// A percentile (µs) as the median over the rounds of each round's percentile: a round
    /// that something else on the machine disturbed does not decide the result.
    fn pct(&self, q: f64, first: bool) -> f64 {
        let rounds = if first { &self.first } else { &self.total };
        median(&mut rounds.iter().map(|r| pct_us(r, q)).collect::<Vec<_>>())
    }

    /// A percentile (µs) over all rounds pooled.
    fn pooled(&self, q: f64, first: bool) -> f64 {
        let rounds = if first { &self.first } else { &self.total };
        let mut all: Vec<u64> = rounds.concat();
        all.sort_unstable();
        pct_us(&all, q)
    }
}

/// `n` requests one after another on one connection per target, after `warm` unmeasured
/// ones, in [`ROUNDS`] interleaved rounds so that a disturbance hits all targets alike.
async fn sequential(targets: &[Target], body: &Bytes, warm: usize, n: usize) -> Vec<Seq> {
    let mut lanes: Vec<Lane> = targets.iter().map(Lane::new).collect();
    let mut out: Vec<Seq> = targets.iter().map(|_| Seq::default()).collect();
    for lane in &mut lanes {
        for _ in 0..warm {
            let _ = lane.call(body.clone()).await;
        }
    }
    for round in 0..ROUNDS {
        let count = n / ROUNDS + usize::from(round < n % ROUNDS);
        for (lane, seq) in lanes.iter_mut().zip(&mut out) {
            let (mut total, mut first) = (Vec::with_capacity(count), Vec::with_capacity(count));
            for _ in 0..count {
                if lane.open().await.is_err() {
                    seq.errors += 1;
                    continue;
                }
                match lane.call(body.clone()).await {
                    Ok(r) if r.status == 200 => {
                        total.push(r.total.as_nanos() as u64);
                        first.push(r.first.as_nanos() as u64);
                        seq.overhead_ms.extend(r.overhead_ms);
                    }
                    _ => seq.errors += 1,
                }
            }
            total.sort_unstable();
            first.sort_unstable();
            seq.total.push(total);
            seq.first.push(first);
        }
    }
    out
}

#[derive(Default)]
struct Load {
    ok: u64,
    errors: u64,
    /// From the start to the last answer.
    elapsed: Duration,
    /// From send to the end of the answer.
    lat: Vec<u64>,
    /// From the time the schedule gave the request to the end of its answer (open loop).
    sched: Vec<u64>,
}

impl Load {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Requests at `rate` per second (infinite: a closed loop) for `secs`, over `conns`
/// connections; `bodies` in turn.
async fn paced(t: &Target, bodies: &[Bytes], rate: f64, secs: f64, conns: usize) -> Load {
    let bodies: Arc<Vec<Bytes>> = Arc::new(bodies.to_vec());
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + Duration::from_secs_f64(secs);
    let ticket = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (t, bodies, ticket) = (t.clone(), bodies.clone(), ticket.clone());
        set.spawn(async move {
            let mut lane = Lane::new(&t);
            let _ = lane.open().await;
            let mut out = Load::default();
            let mut last_done = start;
            loop {
                let i = ticket.fetch_add(1, Ordering::Relaxed);
                let at = if rate.is_finite() {
                    start + Duration::from_secs_f64(i as f64 / rate)
                } else {
                    start.max(Instant::now())
                };
                if at >= end || Instant::now() >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let body = bodies[i as usize % bodies.len()].clone();
                let sent = Instant::now();
                match lane.call(body).await {
                    Ok(r) if r.status == 200 => {
                        out.ok += 1;
                        let done = Instant::now();
                        out.lat.push((done - sent).as_nanos() as u64);
                        out.sched.push((done - at).as_nanos() as u64);
                        last_done = done;
                    }
                    _ => out.errors += 1,
                }
            }
            out.elapsed = last_done.saturating_duration_since(start);
            out
        });
    }
    let mut all = Load::default();
    while let Some(Ok(part)) = set.join_next().await {
        all.ok += part.ok;
        all.errors += part.errors;
        all.elapsed = all.elapsed.max(part.elapsed);
        all.lat.extend(part.lat);
        all.sched.extend(part.sched);
    }
    all.lat.sort_unstable();
    all.sched.sort_unstable();
    all
}

#[derive(Debug, Default)]
struct Hold {
    failed: usize,
    stalled: usize,
    max_gap: Duration,
    /// The slowest first chunk.
    first_max: Duration,
}

/// `n` slow streams opened at once, each on its own connection.
async fn hold_streams(t: &Target, n: usize) -> Hold {
    let body = chat_body(SLOW_MODEL, true);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (t, body) = (t.clone(), body.clone());
        set.spawn(async move {
            let mut lane = Lane::new(&t);
            lane.call(body).await
        });
    }
    let mut h = Hold::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(r)) if r.status == 200 && r.done() && r.events() > SLOW_CHUNKS => {
                if r.max_gap > STALL {
                    h.stalled += 1;
                }
                h.max_gap = h.max_gap.max(r.max_gap);
                h.first_max = h.first_max.max(r.first);
            }
            _ => h.failed += 1,
        }
    }
    h
}

struct Soak {
    start_mb: f64,
    end_mb: f64,
    peak_mb: f64,
    load: Load,
}

/// A steady load at `rate` for `secs`, one request in ten a stream, sampling the RSS of `pid`'s
/// process tree every second.
async fn soak(t: &Target, pid: u32, rate: f64, secs: f64) -> Soak {
    let mut bodies = vec![chat_body(MODEL, false); 9];
    bodies.push(chat_body(MODEL, true));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = vec![tree_rss_mb(pid)];
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                samples.push(tree_rss_mb(pid));
            }
            samples
        })
    };
    let load = paced(t, &bodies, rate, secs, 32).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampler.await.unwrap_or_default();
    samples.push(tree_rss_mb(pid));
    Soak {
        start_mb: samples[0],
        end_mb: *samples.last().unwrap(),
        peak_mb: samples.iter().copied().fold(0.0, f64::max),
        load,
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

/// The first three fields of /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        Some(_) => "n/a".into(),
        None => "–".into(),
    }
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("mock") => return run_mock(args[2].parse()?),
        Some("gateway") => {
            let memory = args.get(5).is_some_and(|b| b == "memory");
            return run_gateway(
                args[2].parse()?,
                args[3].parse()?,
                Path::new(&args[4]),
                memory,
            );
        }
        _ => {}
    }

    // 1024 streams through a proxy take ~3000 descriptors in the proxy; raise the limit
    // (the children inherit it).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.max(65_536);
        if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
        let now = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |l| l.0);
        println!("RLIMIT_NOFILE: {soft} -> {now}");
    }

    let n: usize = env_or("BENCH_N", 2000);
    let warm: usize = env_or("BENCH_WARMUP", 200);
    let rate: f64 = env_or("BENCH_RATE", 2000.0);
    let load_secs: f64 = env_or("BENCH_LOAD_SECS", 10.0);
    let soak_secs: f64 = env_or("BENCH_SOAK_SECS", 60.0);
    let soak_rate: f64 = env_or("BENCH_SOAK_RATE", 500.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ll_workers: usize = env_or("BENCH_LITELLM_WORKERS", cores);
    let stream_ns: Vec<usize> = std::env::var("BENCH_STREAMS")
        .unwrap_or_else(|_| "64,128,256,512,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let want_litellm = std::env::var("BENCH_LITELLM").map_or(true, |v| v != "0");
    let memory_backend = std::env::var("BENCH_NOOK_BACKEND").is_ok_and(|v| v == "memory");

    let load_before = loadavg();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("nook.sqlite");
    let mock_port = free_port();
    let mut mock = spawn_self(&["mock", &mock_port.to_string()])?;
    let gw_port = free_port();
    let mut gateway = spawn_self(&[
        "gateway",
        &gw_port.to_string(),
        &mock_port.to_string(),
        &db.display().to_string(),
        if memory_backend { "memory" } else { "store" },
    ])?;
    if !wait_port(mock_port, Duration::from_secs(10))
        || !wait_port(gw_port, Duration::from_secs(30))
    {
        return Err("the mock or nook's gateway did not start".into());
    }
    let nook_idle_mb = tree_rss_mb(gateway.pid());

    let mut litellm: Option<LiteLlm> = None;
    let mut litellm_why = String::from("skipped (BENCH_LITELLM=0)");
    if want_litellm {
        match start_litellm(dir.path(), mock_port, ll_workers) {
            Ok(l) => litellm = Some(l),
            Err(why) => {
                println!("LiteLLM unavailable: {why}");
                litellm_why = why;
            }
        }
    }
    let litellm_idle_mb = litellm.as_ref().map(|l| tree_rss_mb(l.kid.pid()));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let direct = Target::new("direct", mock_port, OPENAI_PATH);
    let nook = Target::new("nook", gw_port, NOOK_PATH);
    let mut ll = litellm.as_ref().map(|l| {
        let mut t = Target::new("LiteLLM", l.port, OPENAI_PATH);
        t.auth = Some(HeaderValue::from_str(&format!("Bearer {}", l.key)).unwrap());
        t
    });

    // Every target must answer a plain and a streamed request before it is measured.
    let probe = |t: &Target| {
        rt.block_on(async {
            for stream in [false, true] {
                let why = match Lane::new(t).call(chat_body(MODEL, stream)).await {
                    Ok(r) if r.status == 200 && (r.done() || !stream) => continue,
                    Ok(r) => format!(
                        "answered {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ),
                    Err(e) => format!("failed: {e}"),
                };
                return Err(format!("a probe (stream: {stream}) {why}"));
            }
            Ok(())
        })
    };
    for t in [&direct, &nook] {
        if let Err(why) = probe(t) {
            return Err(format!("{}: {why}", t.name).into());
        }
    }
    if let Some(t) = &ll
        && let Err(why) = probe(t)
    {
        println!("LiteLLM unavailable: {why}");
        litellm_why = why;
        ll = None;
        if let Some(mut l) = litellm.take() {
            l.kid.stop();
        }
    }

    let mut targets = vec![direct.clone(), nook.clone()];
    targets.extend(ll.clone());
    let pids: Vec<Option<u32>> = vec![
        Some(mock.pid()),
        Some(gateway.pid()),
        litellm.as_ref().map(|l| l.kid.pid()),
    ];

    let results = rt.block_on(async {
        // Warm every target up with some parallel load: pools, both LiteLLM workers, caches.
        for t in &targets {
            let _ = paced(t, &[chat_body(MODEL, false)], f64::INFINITY, 2.0, 16).await;
        }

        println!(
            "latency at concurrency 1: {warm} warm-up + {n} requests per target in {ROUNDS} rounds (median of the rounds' percentiles)"
        );
        let seq = sequential(&targets, &chat_body(MODEL, false), warm, n).await;
        for (t, s) in targets.iter().zip(&seq) {
            println!(
                "  {:<8} p50 {:>8.1} us  p99 {:>8.1} us  (pooled: p99 {:>8.1} us, p99.9 {:>8.1} us)  errors {}",
                t.name,
                s.pct(0.5, false),
                s.pct(0.99, false),
                s.pooled(0.99, false),
                s.pooled(0.999, false),
                s.errors
            );
        }

        let sn = (n / 4).max(100);
        println!(
            "stream TTFB at concurrency 1: {} warm-up + {sn} streams per target",
            warm / 4
        );
        let ttfb = sequential(&targets, &chat_body(MODEL, true), warm / 4, sn).await;
        for (t, s) in targets.iter().zip(&ttfb) {
            println!(
                "  {:<8} TTFB p50 {:>8.1} us  p99 {:>8.1} us  whole stream p50 {:>8.1} us  errors {}",
                t.name,
                s.pct(0.5, true),
                s.pct(0.99, true),
                s.pct(0.5, false),
                s.errors
            );
        }

        println!("paced load: {rate} requests/s for {load_secs} s over 128 connections");
        let mut loads = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let pid = pids[i].unwrap_or(0);
            let before = tree_cpu_ticks(pid);
            let l = paced(t, &[chat_body(MODEL, false)], rate, load_secs, 128).await;
            let ticks = tree_cpu_ticks(pid).saturating_sub(before);
            let cpu_us = ticks as f64 * 10_000.0 / (l.ok as f64).max(1.0);
            println!(
                "  {:<8} {:>7.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms (open-loop p99 {:>8.2} ms)  errors {}  CPU {:.0} us/req",
                t.name,
                l.rps(),
                pct_us(&l.lat, 0.5) / 1000.0,
                pct_us(&l.lat, 0.99) / 1000.0,
                pct_us(&l.sched, 0.99) / 1000.0,
                l.errors,
                cpu_us
            );
            loads.push((l, cpu_us));
        }

        println!("closed loop: 64 connections for 5 s");
        let mut maxes = Vec::new();
        for t in &targets {
            let l = paced(t, &[chat_body(MODEL, false)], f64::INFINITY, 5.0, 64).await;
            println!(
                "  {:<8} {:>7.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms  errors {}",
                t.name,
                l.rps(),
                pct_us(&l.lat, 0.5) / 1000.0,
                pct_us(&l.lat, 0.99) / 1000.0,
                l.errors
            );
            maxes.push(l);
        }

        // Before the stream test, so that its connections do not count in the soak's start.
        println!("soak: {soak_rate} requests/s for {soak_secs} s (one in ten a stream)");
        let mut soaks = Vec::new();
        for (i, t) in targets.iter().enumerate().skip(1) {
            let Some(pid) = pids[i] else { continue };
            let s = soak(t, pid, soak_rate, soak_secs).await;
            println!(
                "  {:<8} RSS start {:.1} MB  end {:.1} MB  peak {:.1} MB  ({:.0} req/s, p99 {:.2} ms, errors {})",
                t.name,
                s.start_mb,
                s.end_mb,
                s.peak_mb,
                s.load.rps(),
                pct_us(&s.load.lat, 0.99) / 1000.0,
                s.load.errors
            );
            soaks.push(s);
        }

        println!(
            "concurrent slow streams ({SLOW_CHUNKS} chunks, one per {} ms; stall: a gap over {} s)",
            SLOW_EVERY.as_millis(),
            STALL.as_secs()
        );
        let mut held = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let mut best = 0usize;
            let mut rss_after = 0f64;
            for &sn in &stream_ns {
                let started = Instant::now();
                let h = hold_streams(t, sn).await;
                rss_after = rss_after.max(pids[i].map_or(0.0, tree_rss_mb));
                println!(
                    "  {:<8} N={sn:<5} failed {:<4} stalled {:<4} max gap {:>6.0} ms  slowest first chunk {:>6.0} ms  ({:.1} s)",
                    t.name,
                    h.failed,
                    h.stalled,
                    h.max_gap.as_secs_f64() * 1000.0,
                    h.first_max.as_secs_f64() * 1000.0,
                    started.elapsed().as_secs_f64()
                );
                // Let the proxies' connections close before the next size.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if h.failed + h.stalled > 0 {
                    break;
                }
                best = sn;
            }
            held.push((best, rss_after));
        }
        (seq, ttfb, loads, maxes, held, soaks)
    });
    let (seq, ttfb, loads, maxes, held, soaks) = results;

    // Did every request go through the store? Settlements are spawned; give them a moment.
    std::thread::sleep(Duration::from_secs(2));
    gateway.stop();
    let settled = rt.block_on(async {
        let store = Store::open(&db).await.ok()?;
        let rows = store.usage(ACCOUNT, 0, None).await.ok()?;
        Some(rows.iter().map(|r| r.requests).sum::<u64>())
    });
    if let Some(l) = litellm.as_mut() {
        l.kid.stop();
    }
    mock.stop();

    // ---- the table: one row per measure; columns direct, nook, LiteLLM.
    let p = |s: &[Seq], q: f64, first: bool| -> Vec<Option<f64>> {
        (0..3).map(|i| s.get(i).map(|x| x.pct(q, first))).collect()
    };
    let added = |v: &[Option<f64>]| -> Vec<Option<f64>> {
        v.iter()
            .enumerate()
            .map(|(i, x)| {
                if i == 0 {
                    None
                } else {
                    x.zip(v[0]).map(|(x, d)| x - d)
                }
            })
            .collect()
    };
    let (p50, p99) = (p(&seq, 0.5, false), p(&seq, 0.99, false));
    let (t50, t99) = (p(&ttfb, 0.5, true), p(&ttfb, 0.99, true));
    let overhead: Vec<Option<f64>> = (0..3)
        .map(|i| {
            seq.get(i)
                .filter(|_| i > 0)
                .map(|s| median(&mut s.overhead_ms.clone()) * 1000.0)
        })
        .collect();
    let of_load = |f: &dyn Fn(&(Load, f64)) -> f64| -> Vec<Option<f64>> {
        (0..3).map(|i| loads.get(i).map(f)).collect()
    };
    let of_max = |f: &dyn Fn(&Load) -> f64| -> Vec<Option<f64>> {
        (0..3).map(|i| maxes.get(i).map(f)).collect()
    };
    // The soak and RSS rows have no direct column.
    let of_soak = |f: &dyn Fn(&Soak) -> f64| -> Vec<Option<f64>> {
        vec![None, soaks.first().map(f), soaks.get(1).map(f)]
    };
    let p99_ms = |l: &Load| pct_us(&l.lat, 0.99) / 1000.0;
    let max_n = stream_ns.iter().max().copied().unwrap_or(0);
    let rows: Vec<(String, Vec<Option<f64>>, usize)> = vec![
        ("latency p50, concurrency 1 (µs)".into(), p50.clone(), 0),
        ("latency p99, concurrency 1 (µs)".into(), p99.clone(), 0),
        ("**added p50**, concurrency 1 (µs)".into(), added(&p50), 0),
        (
            "**added p99**, concurrency 1 (µs; goal ≤ 150)".into(),
            added(&p99),
            0,
        ),
        ("own overhead header, median (µs)".into(), overhead, 0),
        ("stream TTFB p50, concurrency 1 (µs)".into(), t50.clone(), 0),
        ("**added TTFB p50** (µs)".into(), added(&t50), 0),
        ("**added TTFB p99** (µs)".into(), added(&t99), 0),
        (
            format!("achieved req/s, target {rate:.0}/s"),
            of_load(&|x| x.0.rps()),
            0,
        ),
        (
            format!("p99 at target {rate:.0}/s (ms, from send)"),
            of_load(&|x| p99_ms(&x.0)),
            2,
        ),
        (
            format!("errors at target {rate:.0}/s"),
            of_load(&|x| x.0.errors as f64),
            0,
        ),
        (
            "CPU per request at that load (µs)".into(),
            of_load(&|x| x.1),
            0,
        ),
        (
            "most req/s, closed loop of 64 connections".into(),
            of_max(&|x| x.rps()),
            0,
        ),
        ("p99 in that closed loop (ms)".into(), of_max(&p99_ms), 2),
        (
            format!("concurrent streams held, no stall (of {max_n}; goal ≥ 512)"),
            (0..3).map(|i| held.get(i).map(|h| h.0 as f64)).collect(),
            0,
        ),
        (
            "RSS idle, before any request (MB)".into(),
            vec![None, Some(nook_idle_mb), litellm_idle_mb],
            1,
        ),
        (
            format!("RSS at soak start (MB; soak {soak_secs:.0} s at {soak_rate:.0}/s)"),
            of_soak(&|s| s.start_mb),
            1,
        ),
        (
            "RSS at soak end (MB; goal flat, < 50)".into(),
            of_soak(&|s| s.end_mb),
            1,
        ),
        (
            "RSS peak during soak (MB)".into(),
            of_soak(&|s| s.peak_mb),
            1,
        ),
        ("soak achieved req/s".into(), of_soak(&|s| s.load.rps()), 0),
        ("soak p99 (ms)".into(), of_soak(&|s| p99_ms(&s.load)), 2),
        (
            "RSS right after the stream test (MB)".into(),
            vec![None, held.get(1).map(|h| h.1), held.get(2).map(|h| h.1)],
            1,
        ),
    ];

    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    println!();
    println!(
        "Machine: {cores} cores ({cpu}), Linux {kernel}; mock, gateways and load generator share them."
    );
    println!(
        "Load average (1, 5, 15 min) before the run: {load_before}; after: {}. Anything else running disturbs the numbers.",
        loadavg()
    );
    let backend_note = if memory_backend {
        "BENCH_NOOK_BACKEND=memory: a backend that does nothing, for diagnosis only (not the daemon's path)".to_string()
    } else {
        format!(
            "the daemon's StoreBackend (SQLite in {}, WAL, synchronous=FULL)",
            dir.path().display()
        )
    };
    println!(
        "nook: nook_gateway over {backend_note}; hyper http1, tokio with {cores} workers, mimalloc."
    );
    match &litellm {
        Some(l) => println!(
            "LiteLLM {}: `litellm --config` (uvicorn + uvloop, {ll_workers} workers), master key, no database, LITELLM_LOG=ERROR.",
            l.version
        ),
        None => println!(
            "LiteLLM: unavailable: {}",
            litellm_why.lines().next().unwrap_or("")
        ),
    }
    println!();
    println!("| | direct | nook | LiteLLM | LiteLLM / nook |");
    println!("|---|---:|---:|---:|---:|");
    let has_litellm = ll.is_some();
    for (what, v, decimals) in &rows {
        let ratio = match (v[1], v[2]) {
            (Some(n), Some(l)) if n.is_finite() && l.is_finite() && n > 0.0 && has_litellm => {
                format!("{:.1}×", l / n)
            }
            (_, Some(_)) if has_litellm => "n/a".into(),
            _ => "–".into(),
        };
        let litellm = if has_litellm {
            fmt(v[2], *decimals)
        } else {
            "unavailable".into()
        };
        println!(
            "| {what} | {} | {} | {litellm} | {ratio} |",
            fmt(v[0], *decimals),
            fmt(v[1], *decimals),
        );
    }
    println!();
    let through_nook = nook.ok.load(Ordering::Relaxed);
    match settled {
        Some(usage_rows) if !memory_backend => println!(
            "nook's store holds {usage_rows} usage rows for {through_nook} requests answered 200 through it."
        ),
        Some(_) => {}
        None => println!("could not read nook's usage rows back"),
    }
    Ok(())
}
