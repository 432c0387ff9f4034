//! Throughput and latency of the edge against Debian's nginx, both terminating TLS with the
//! same certificate in front of the same upstream, measured with `wrk` in one run.
//!
//! ```text
//! cargo run --release -p nook-edge --example proxy_bench            # needs nginx and wrk
//! BENCH_SECS=8 BENCH_ROUNDS=7 BENCH_CONNS=128 BENCH_EDGE_MODE=runtime cargo run --release -p nook-edge --example proxy_bench
//! ```
//!
//! The upstream runs in a child process so it does not share the edge's runtime. Each target
//! is measured twice: saturated (BENCH_CONNS connections, for requests/s) and with one
//! connection (for per-request latency; p99 overhead = p99 through the proxy minus p99 direct).
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::convert::Infallible;
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nook_edge::{
    Access, AppBody, AppRequest, BackendResult, Edge, EdgeBackend, EdgeConfig, ListenerRole,
    LocalCa, User, VmTarget,
};

/// The same allocator as the `nook` binary that runs the edge.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn Error + Send + Sync>;

const BODY_BYTES: usize = 1024;

/// One public VM pointing at the upstream; everything else is empty.
struct BenchBackend {
    upstream_port: u16,
}

impl EdgeBackend for BenchBackend {
    async fn vm(&self, name: &str) -> BackendResult<Option<VmTarget>> {
        Ok((name == "pub").then(|| VmTarget {
            id: "vm-pub".into(),
            name: "pub".into(),
            upstream: IpAddr::V4(Ipv4Addr::LOCALHOST),
            default_port: self.upstream_port,
            public: true,
            via: None,
        }))
    }
    async fn access(&self, _: &str, _: &str) -> BackendResult<Access> {
        Ok(Access::None)
    }
    async fn redeem_login_token(&self, _: &str) -> BackendResult<Option<User>> {
        Ok(None)
    }
    async fn create_session(&self, _: &str, _: &str) -> BackendResult<String> {
        Ok("x".into())
    }
    async fn session(&self, _: &str, _: &str) -> BackendResult<Option<User>> {
        Ok(None)
    }
    async fn end_session(&self, _: &str, _: &str) -> BackendResult<()> {
        Ok(())
    }
    async fn token_user(&self, _: &str, _: &str) -> BackendResult<Option<User>> {
        Ok(None)
    }
    async fn redeem_share_link(&self, _: &str, _: &str, _: &str) -> BackendResult<bool> {
        Ok(false)
    }
    async fn start_email_login(&self, _: &str) -> BackendResult<Option<String>> {
        Ok(None)
    }
    async fn app(
        &self,
        _: hyper::Request<hyper::body::Incoming>,
        _: AppRequest,
    ) -> hyper::Response<AppBody> {
        use http_body_util::BodyExt;
        let mut resp =
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()).boxed_unsync());
        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
        resp
    }
}

fn run_upstream(port: u16) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let body = Bytes::from(vec![b'x'; BODY_BYTES]);
        loop {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_ms(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn wrk(url: &str, conns: u32, secs: u32) -> Result<Stats, BoxError> {
    let threads = conns.clamp(1, 2);
    let out = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
        ])
        .args(["-H", "Host: pub.nook.localhost", url])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut st = Stats::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("Requests/sec:"), Some(v)) => st.rps = v.parse().unwrap_or(0.0),
            (Some("50%"), Some(v)) => st.p50_ms = parse_ms(v).unwrap_or(f64::NAN),
            (Some("99%"), Some(v)) => st.p99_ms = parse_ms(v).unwrap_or(f64::NAN),
            _ => {}
        }
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") || st.rps == 0.0 {
        println!("wrk output for {url}:\n{text}");
    }
    Ok(st)
}

/// User plus system CPU time of a process, in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// The processes serving a target: the edge lives in this process; nginx in its workers.
fn serving_pids(target: usize, nginx_master: u32) -> Vec<u32> {
    match target {
        1 => vec![std::process::id()],
        2 => std::fs::read_to_string(format!("/proc/{nginx_master}/task/{nginx_master}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        _ => Vec::new(),
    }
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("upstream") {
        return run_upstream(args[2].parse()?);
    }
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let conns: u32 = std::env::var("BENCH_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);

    let dir = tempfile::tempdir()?;
    let ca = LocalCa::load_or_create(&dir.path().join("ca"), &["nook.localhost"])?;
    let chain = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&chain, ca.leaf_chain_pem())?;
    std::fs::write(&key, ca.leaf_key_pem())?;

    let up_port = free_port();
    let mut upstream = Command::new(std::env::current_exe()?)
        .args(["upstream", &up_port.to_string()])
        .stdin(Stdio::null())
        .spawn()?;

    // nginx, configured the way one would put it in front of an app: TLS + HTTP/2, keep-alive
    // upstream pool, no buffering (so streaming works, as with the edge), no access log.
    let nginx_port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "worker_processes {workers};\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\ndaemon off;\n\
events {{ worker_connections 4096; }}\n\
http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
 upstream vm {{ server 127.0.0.1:{up_port}; keepalive 128; }}\n\
 server {{\n  listen 127.0.0.1:{nginx_port} ssl http2;\n  ssl_certificate {chain};\n  ssl_certificate_key {key};\n\
  location / {{\n   proxy_pass http://vm;\n   proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_set_header Host $host;\n\
   proxy_set_header X-Forwarded-For $remote_addr;\n   proxy_set_header X-Forwarded-Proto https;\n   proxy_buffering off;\n  }}\n }}\n}}\n",
        chain = chain.display(),
        key = key.display(),
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut nginx = Command::new("nginx")
        .args([
            "-c",
            &conf_path.display().to_string(),
            "-p",
            &d.to_string(),
            "-e",
            &format!("{d}/nginx-error.log"),
        ])
        .stdin(Stdio::null())
        .spawn()?;

    // BENCH_EDGE_MODE=runtime serves on one multi-threaded tokio runtime instead of one
    // single-threaded runtime per worker thread (Edge::serve_on_threads).
    let mode = std::env::var("BENCH_EDGE_MODE").unwrap_or_else(|_| "threads".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let edge_port = rt.block_on(async {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let config = EdgeConfig {
            public_port: port,
            ..Default::default()
        };
        let edge = Edge::new(
            config,
            Arc::new(BenchBackend {
                upstream_port: up_port,
            }),
        )?;
        edge.set_certificate(ca.leaf_chain_pem().as_bytes(), ca.leaf_key_pem().as_bytes())?;
        if mode == "runtime" {
            listener.set_nonblocking(true)?;
            edge.spawn(
                tokio::net::TcpListener::from_std(listener)?,
                ListenerRole::Main,
            );
        } else {
            edge.serve_on_threads(listener, ListenerRole::Main, workers)?;
        }
        Ok::<_, BoxError>(port)
    })?;
    println!("edge mode: {mode}");

    // Wait until all three answer.
    for port in [up_port, nginx_port, edge_port] {
        for _ in 0..100 {
            if std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let targets = [
        ("direct (http)", format!("http://127.0.0.1:{up_port}/")),
        ("nook-edge", format!("https://127.0.0.1:{edge_port}/")),
        ("nginx", format!("https://127.0.0.1:{nginx_port}/")),
    ];
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "{BODY_BYTES}-byte responses, {workers} workers each, wrk over HTTP/1.1 keep-alive; \
{rounds} interleaved rounds of {secs} s per target and mode, medians shown"
    );
    // Rounds interleave the targets so that background load on a shared machine hits all of
    // them alike; medians then discard the rounds it disturbed most.
    for (_, url) in &targets {
        let _ = wrk(url, conns, 2)?; // warm-up: pools, TLS sessions, page cache
    }
    let mut samples: Vec<(Vec<Stats>, Vec<Stats>)> = vec![(Vec::new(), Vec::new()); targets.len()];
    let mut cpu = vec![(0u64, 0f64); targets.len()]; // (ticks, requests) under load
    for _ in 0..rounds {
        for (i, (_, url)) in targets.iter().enumerate() {
            let pids = serving_pids(i, nginx.id());
            let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            let st = wrk(url, conns, secs)?;
            let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            cpu[i].0 += after.saturating_sub(before);
            cpu[i].1 += st.rps * f64::from(secs);
            samples[i].0.push(st);
            samples[i].1.push(wrk(url, 1, secs)?);
        }
    }
    let median = |v: &[Stats]| -> Stats {
        let pick = |f: fn(&Stats) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(|a, b| a.total_cmp(b));
            x[x.len() / 2]
        };
        Stats {
            rps: pick(|s| s.rps),
            p50_ms: pick(|s| s.p50_ms),
            p99_ms: pick(|s| s.p99_ms),
        }
    };
    let mut results = Vec::new();
    for (i, (name, _)) in targets.iter().enumerate() {
        let (load, single) = (median(&samples[i].0), median(&samples[i].1));
        println!(
            "{name:<14} {conns:>3} conns: {:>9.0} req/s p50 {:>6.3} ms p99 {:>6.3} ms | 1 conn: {:>7.0} req/s p50 {:>6.3} ms p99 {:>6.3} ms",
            load.rps, load.p50_ms, load.p99_ms, single.rps, single.p50_ms, single.p99_ms
        );
        results.push((load, single));
    }
    let (direct, edge, nginx_r) = (results[0], results[1], results[2]);
    // CPU per request is what the background load on a shared machine disturbs least.
    let us_per_req = |i: usize| cpu[i].0 as f64 * 10_000.0 / cpu[i].1.max(1.0);
    println!();
    println!(
        "CPU per request under load: edge {:.1} us, nginx {:.1} us (edge/nginx {:.2}x)",
        us_per_req(1),
        us_per_req(2),
        us_per_req(1) / us_per_req(2)
    );
    println!("throughput edge/nginx: {:.2}x", edge.0.rps / nginx_r.0.rps);
    println!(
        "p50 (loaded) edge/nginx: {:.2}x  p99 (loaded) edge/nginx: {:.2}x",
        edge.0.p50_ms / nginx_r.0.p50_ms,
        edge.0.p99_ms / nginx_r.0.p99_ms
    );
    println!(
        "1-conn p99 overhead over direct: edge {:+.3} ms, nginx {:+.3} ms (p50: edge {:+.3} ms, nginx {:+.3} ms)",
        edge.1.p99_ms - direct.1.p99_ms,
        nginx_r.1.p99_ms - direct.1.p99_ms,
        edge.1.p50_ms - direct.1.p50_ms,
        nginx_r.1.p50_ms - direct.1.p50_ms,
    );

    // SIGTERM, not SIGKILL: nginx's workers outlive a killed master.
    let _ = Command::new("kill")
        .args(["-TERM", &nginx.id().to_string()])
        .status();
    let _ = nginx.wait();
    let _ = upstream.kill();
    let _ = upstream.wait();
    Ok(())
}
