//! System test (root; no guest needed, but it runs a whole daemon): `nook serve` with its own
//! DNS server and ACME DNS-01 against Pebble (Let's Encrypt's test CA, Debian's `pebble`).
//! The daemon's DNS answers are checked with the real `dig`, and the edge ends up serving the
//! wildcard certificate Pebble issued, which the real curl verifies against Pebble's root.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Daemon, free_port, wait_until};

const DOMAIN: &str = "nook.example.test";

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Pebble {
    child: Child,
    directory: String,
    mgmt_port: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pebble on free ports, validating DNS-01 against `dns_port`. Debian ships no certificate
/// for its HTTPS listeners, so a throwaway CA in `dir` signs one (its root: `listener-ca.pem`).
fn start_pebble(dir: &Path, dns_port: u16) -> Pebble {
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
           -keyout listener-ca.key -out listener-ca.pem -subj /CN=listener-ca -days 2 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem \
           -out leaf.csr -subj /CN=localhost 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext && \
         openssl x509 -req -in leaf.csr -CA listener-ca.pem -CAkey listener-ca.key -CAcreateserial \
           -out cert.pem -days 2 -extfile san.ext 2>/dev/null"
    ));
    let (port, mgmt_port) = (free_port(), free_port());
    let config = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
        "certificate": dir.join("cert.pem"),
        "privateKey": dir.join("key.pem"),
        "httpPort": free_port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(dir.join("pebble.json"), config.to_string()).expect("config");
    let log = std::fs::File::create(dir.join("pebble.log")).expect("log");
    let child = Command::new("pebble")
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("pebble (apt-get install pebble)");
    wait_until("pebble to listen", Duration::from_secs(20), || {
        [port, mgmt_port]
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
    });
    Pebble {
        child,
        directory: format!("https://127.0.0.1:{port}/dir"),
        mgmt_port,
    }
}

/// Pebble's root (new at every Pebble start), from its management API, saved in `dir`.
fn pebble_root(dir: &Path, pebble: &Pebble) -> std::path::PathBuf {
    let root = dir.join("pebble-root.pem");
    sh(&format!(
        "curl -sSf --cacert {} https://127.0.0.1:{}/roots/0 -o {}",
        dir.join("listener-ca.pem").display(),
        pebble.mgmt_port,
        root.display()
    ));
    root
}

/// `curl https://HOST:PORT/` on this machine, trusting only `root`.
fn fetch_trusting(root: &Path, host: &str, port: u16) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .arg(format!("https://{host}:{port}/"))
        .output()
        .expect("curl")
}

fn dig(dns_port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &dns_port.to_string(), "+norecurse"])
        .args(args)
        .output()
        .expect("dig (apt-get install dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vm_web_acme_wildcard_certificate_through_nooks_own_dns() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dns_port = free_port();
    let pebble = start_pebble(tmp.path(), dns_port);
    let d = Daemon::start_with(&[
        "--domain",
        DOMAIN,
        "--public-ip",
        "127.0.0.1",
        "--dns-addr",
        &format!("127.0.0.1:{dns_port}"),
        "--acme-directory",
        &pebble.directory,
        "--acme-email",
        "admin@example.test",
        "--acme-root-ca",
        &tmp.path().join("listener-ca.pem").display().to_string(),
    ]);

    // nook's DNS: the apex and any VM name point at this host, authoritatively.
    let apex = dig(dns_port, &[DOMAIN, "A"]);
    assert!(apex.contains("flags: qr aa"), "{apex}");
    assert!(
        apex.contains(&format!("{DOMAIN}.\t")) && apex.contains("127.0.0.1"),
        "{apex}"
    );
    let vm = dig(dns_port, &["+short", &format!("MyVm.{DOMAIN}"), "A"]);
    assert_eq!(vm.trim(), "127.0.0.1");
    let soa = dig(dns_port, &["+short", DOMAIN, "SOA"]);
    assert!(soa.contains(&format!("ns.{DOMAIN}.")), "{soa}");
    let outside = dig(dns_port, &["example.com", "A"]);
    assert!(outside.contains("status: REFUSED"), "{outside}");

    let root = pebble_root(tmp.path(), &pebble);
    // The edge switches from nook's local CA to the issued wildcard certificate.
    let fetch = |host: &str| fetch_trusting(&root, host, d.https_port);
    wait_until(
        "the edge to serve Pebble's certificate",
        Duration::from_secs(60),
        || fetch(DOMAIN).status.success(),
    );
    // The wildcard covers VM names too.
    let out = fetch(&format!("anyvm.{DOMAIN}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The challenge records are gone once the certificate is issued.
    let txt = dig(
        dns_port,
        &["+short", &format!("_acme-challenge.{DOMAIN}"), "TXT"],
    );
    assert_eq!(txt.trim(), "", "challenge TXT records left behind");
    assert!(d.log_text().contains("serving the ACME certificate"));
}

/// Two hosts of one fleet (one PostgreSQL), each with its own DNS server, and a CA that asks
/// only the first host's: the second host's order is still proven, because every host
/// answers every host's challenge values (shared through the store).
#[test]
fn vm_web_acme_fleet_any_hosts_dns_proves_any_hosts_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (dns_a, dns_b) = (free_port(), free_port());
    let pebble = start_pebble(tmp.path(), dns_a);
    let port_a = free_port().to_string();
    let ha = Daemon::start_on_postgres(&[
        "--host-name",
        "ha",
        "--host-addr",
        &format!("127.0.0.1:{port_a}"),
        "--net",
        "user",
        "--domain",
        DOMAIN,
        "--public-ip",
        "127.0.0.1",
        "--dns-addr",
        &format!("127.0.0.1:{dns_a}"),
    ]);
    let root_ca = tmp.path().join("listener-ca.pem").display().to_string();
    let hb = ha.join_here(
        "hb",
        free_port(),
        &[
            "--net",
            "user",
            "--domain",
            DOMAIN,
            "--public-ip",
            "127.0.0.1",
            "--dns-addr",
            &format!("127.0.0.1:{dns_b}"),
            "--acme-directory",
            &pebble.directory,
            "--acme-email",
            "admin@example.test",
            "--acme-root-ca",
            &root_ca,
        ],
    );

    let root = pebble_root(tmp.path(), &pebble);
    wait_until(
        "hb's edge to serve the certificate proven through ha's DNS",
        Duration::from_secs(90),
        || {
            fetch_trusting(&root, DOMAIN, hb.https_port)
                .status
                .success()
        },
    );
    assert!(hb.log_text().contains("serving the ACME certificate"));
    // Once the order is over, hb withdraws its values, and ha stops answering them.
    wait_until(
        "the challenge values to leave ha's DNS",
        Duration::from_secs(10),
        || {
            dig(
                dns_a,
                &["+short", &format!("_acme-challenge.{DOMAIN}"), "TXT"],
            )
            .trim()
            .is_empty()
        },
    );
}
