//! System test (root, real QEMU guests, network namespaces): VMs reach the internet and the
//! metadata address, and nothing else on the host or each other.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use common::Daemon;

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace standing in for the internet at 203.0.113.10, with an HTTP server.
struct Internet {
    ns: String,
    veth: String,
    server: std::process::Child,
}

impl Internet {
    fn new() -> Internet {
        let id = std::process::id() % 100000;
        let (ns, veth) = (format!("nkinet{id}"), format!("vinet{id}"));
        must(&format!("ip netns add {ns}"));
        must(&format!("ip link add {veth} type veth peer name {veth}n"));
        must(&format!("ip link set {veth}n netns {ns}"));
        must(&format!(
            "ip addr add 203.0.113.1/24 dev {veth} && ip link set {veth} up"
        ));
        must(&format!(
            "ip -n {ns} addr add 203.0.113.10/24 dev {veth}n && ip -n {ns} link set {veth}n up && ip -n {ns} link set lo up && ip -n {ns} route add default via 203.0.113.1"
        ));
        let dir = tempfile::tempdir().expect("tmp").keep();
        std::fs::write(dir.join("index.html"), "hello from the internet\n").expect("write");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "/usr/bin/python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                "203.0.113.10",
                "--directory",
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("http server");
        let internet = Internet { ns, veth, server };
        common::wait_until(
            "the internet server",
            std::time::Duration::from_secs(20),
            || {
                sh("curl -s -m 1 -o /dev/null http://203.0.113.10/")
                    .status
                    .success()
            },
        );
        internet
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = sh(&format!("ip link del {}", self.veth));
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}

/// A plain HTTP server on the host, answering anyone who connects.
fn host_server(addr: &str) -> u16 {
    let listener = TcpListener::bind((addr, 0)).expect("bind host server");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-secret\n");
        }
    });
    port
}

fn host_address() -> String {
    let out = sh("ip -4 -o route get 203.0.113.77 2>/dev/null || ip -4 -o addr show scope global");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Prefer the address of the interface carrying the default route.
    let out = sh(
        "ip -4 -o addr show scope global | grep -v ' nk' | grep -v vinet | awk '{print $4}' | cut -d/ -f1 | head -1",
    );
    let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!addr.is_empty(), "no global host address: {text}");
    addr
}

/// Seconds a fetch that must succeed may take, and one that must be dropped is given.
const ANSWERS: u32 = 30;
const DROPPED: u32 = 4;

/// Fetches `url` from inside `vm`: `Some(body)` if it answered, `None` if the connection was
/// refused, dropped or timed out. Anything else (a crashed tool) fails the test, so a `None`
/// always means the network said no. `secs` bounds the fetch: long where it must answer (a
/// TCG guest's wget on a loaded host can take seconds), short where a drop is expected.
fn fetch(d: &Daemon, vm: &str, url: &str, secs: u32) -> Option<String> {
    let script = format!("timeout {secs} wget -q -O - {url}; echo \"rc=$?\" >&2");
    let out = d.nook(&["vm", "exec", vm, "--", "sh", "-c", &script]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rc = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("rc="))
        .unwrap_or("?")
        .to_string();
    match rc.as_str() {
        "0" => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        // wget's own failure (refused, unreachable) or timeout's kill.
        "1" | "124" | "143" => None,
        other => panic!("fetching {url} in {vm} failed oddly (rc {other}): {stderr}"),
    }
}

#[test]
fn vm_network_isolation_egress_and_metadata() {
    let internet = Internet::new();
    let d = Daemon::start();
    let a = d.create_tiny("neta");
    let b = d.create_tiny("netb");
    let b_ip = b["guest_ip"].as_str().expect("b ip").to_string();
    let a_ip = a["guest_ip"].as_str().expect("a ip").to_string();

    // Metadata: the VM learns who it is.
    let md = fetch(&d, "neta", "http://169.254.169.254/", ANSWERS).expect("metadata reachable");
    let md: serde_json::Value = serde_json::from_str(&md).expect("metadata JSON");
    assert_eq!(md["name"], "neta");
    assert_eq!(md["owner"], "admin");

    // Egress to the "internet", masqueraded.
    let page = fetch(&d, "neta", "http://203.0.113.10/", ANSWERS);
    assert_eq!(page.as_deref(), Some("hello from the internet\n"));

    // B serves HTTP; the host can reach it (so the server is really up) but A cannot.
    d.exec(
        "netb",
        "mkdir -p /srv && echo b-page > /srv/index.html && httpd -p 8080 -h /srv",
    );
    let from_host = sh(&format!("curl -s -m 5 http://{b_ip}:8080/"));
    assert_eq!(
        String::from_utf8_lossy(&from_host.stdout),
        "b-page\n",
        "host cannot reach VM B"
    );
    assert_eq!(
        fetch(&d, "neta", &format!("http://{b_ip}:8080/"), DROPPED),
        None,
        "VM A reached VM B"
    );

    // Host services: on the host's own address, and on the tap's host end.
    let host = host_address();
    let port = host_server("0.0.0.0");
    assert_eq!(
        String::from_utf8_lossy(&sh(&format!("curl -s -m 3 http://{host}:{port}/")).stdout),
        "host-secret\n"
    );
    let gateway = a_ip
        .rsplit_once('.')
        .map(|(net, last)| format!("{net}.{}", last.parse::<u8>().expect("octet") - 1))
        .expect("gw");
    for target in [
        host.as_str(),
        gateway.as_str(),
        "127.0.0.1",
        "169.254.169.254",
    ] {
        let url = format!("http://{target}:{port}/");
        assert_eq!(
            fetch(&d, "neta", &url, DROPPED),
            None,
            "VM reached host service at {url}"
        );
    }
    drop(internet);
}
