//! Issues real certificates from a real Pebble (Debian package `pebble`)
//! that validates DNS-01 against nook's real DNS server, all on ephemeral
//! loopback ports.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nook_acme::{AcmeConfig, AcmeError, Certificate};
use nook_dns::{Zone, ZoneConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const DOMAIN: &str = "nook.example.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("nook_acme=debug,nook_dns=debug")
        .with_test_writer()
        .try_init();
}

#[path = "../../nook/tests/common/free_port.rs"]
mod free_port;
use free_port::free_port;

struct Pebble {
    child: Child,
    dir: tempfile::TempDir,
    directory_url: String,
    mgmt_port: u16,
    /// Root of Pebble's HTTPS listeners (our own test CA), not of the
    /// certificates it issues.
    listener_root: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.path().join("pebble.log"))
        {
            eprintln!("--- pebble.log ---\n{log}");
        }
    }
}

impl Pebble {
    async fn start(dns_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // Pebble serves HTTPS only; Debian ships no test certificate, so
        // make a CA and a localhost certificate for its listeners.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nook test listener CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let listener_root = dir.path().join("listener-ca.pem");
        std::fs::write(&listener_root, ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();

        let port = free_port();
        let mgmt_port = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                // Only used by http-01/tls-alpn-01 validation, never bound.
                "httpPort": free_port(),
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `pebble` ({e}): install the Debian package pebble (apt-get install -y pebble)")
            });
        let pebble = Pebble {
            child,
            dir,
            directory_url: format!("https://127.0.0.1:{port}/dir"),
            mgmt_port,
            listener_root,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in [port, mgmt_port] {
            while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
                assert!(Instant::now() < deadline, "pebble did not listen on {p}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        pebble
    }

    fn config(&self, domain: &str, state_dir: &Path) -> AcmeConfig {
        AcmeConfig {
            vm_domain: None,
            directory_url: self.directory_url.clone(),
            contact_email: Some("admin@example.test".into()),
            domain: domain.into(),
            state_dir: state_dir.to_owned(),
            extra_root_ca_pem: Some(self.listener_root.clone()),
            propagation_wait: Duration::ZERO,
        }
    }

    /// The root Pebble signs with; it is new on every start.
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.listener_root).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(("127.0.0.1", self.mgmt_port))
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // HTTP/1.0 keeps Go's server from chunking the body.
        tls.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp).await;
        let resp = String::from_utf8(resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
            "{resp}"
        );
        let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
        CertificateDer::from_pem_slice(body.as_bytes()).unwrap()
    }
}

async fn start_dns(zone: impl Into<nook_dns::Zones>) -> u16 {
    let zone = zone.into();
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await else {
            continue;
        };
        tokio::spawn(nook_dns::serve(zone, udp, tcp));
        return port;
    }
    panic!("no free port for both UDP and TCP");
}

fn zone() -> Zone {
    Zone::new(ZoneConfig::new(
        DOMAIN,
        Some(Ipv4Addr::new(127, 0, 0, 1)),
        None,
    ))
    .unwrap()
}

/// What the daemon's TLS listener does: hand out the current certificate.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A real TLS handshake to `sni`, trusting only Pebble's issuing root:
/// proves chain, name and that the key matches the certificate.
async fn handshake(
    cert: &Certificate,
    root: &CertificateDer<'static>,
    sni: &str,
) -> Result<(), String> {
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(cert.certified_key().unwrap())));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let _ = tls.write_all(b"hello").await;
            let _ = tls.shutdown().await;
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await;
    let out = match result {
        Ok(mut tls) => {
            let mut buf = Vec::new();
            let _ = tls.read_to_end(&mut buf).await;
            if buf == b"hello" {
                Ok(())
            } else {
                Err(format!("read {buf:?}"))
            }
        }
        Err(e) => Err(e.to_string()),
    };
    server.abort();
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_and_reuses_a_wildcard_certificate() {
    init_tracing();
    let zone = zone();
    let dns_port = start_dns(zone.clone()).await;
    let pebble = Pebble::start(dns_port).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = pebble.config(DOMAIN, state.path());

    let started = Instant::now();
    let cert = nook_acme::obtain(&cfg, &zone).await.unwrap();
    eprintln!("issuance against Pebble took {:?}", started.elapsed());

    let mut names = cert.names.clone();
    names.sort();
    assert_eq!(names, vec![format!("*.{DOMAIN}"), DOMAIN.to_owned()]);
    assert!(cert.not_after > SystemTime::now() + Duration::from_secs(24 * 3600));
    assert!(zone.acme_challenges().is_empty(), "TXT records left behind");

    let root = pebble.issuing_root().await;
    handshake(&cert, &root, &format!("vm1.{DOMAIN}"))
        .await
        .unwrap();
    handshake(&cert, &root, DOMAIN).await.unwrap();
    // The wildcard covers one label, like the DNS wildcard.
    assert!(
        handshake(&cert, &root, &format!("a.b.{DOMAIN}"))
            .await
            .is_err()
    );
    // And the check can fail: a root of our own does not verify it.
    let other_root = CertificateDer::from_pem_file(&pebble.listener_root).unwrap();
    assert!(handshake(&cert, &other_root, DOMAIN).await.is_err());

    for (file, want) in [
        ("account.json", 0o600),
        ("key.pem", 0o600),
        ("cert.pem", 0o644),
    ] {
        assert_eq!(mode(&state.path().join(file)), want, "{file}");
    }

    // A second start reuses what is stored instead of ordering again.
    let again = nook_acme::load_or_obtain(&cfg, &zone).await.unwrap();
    assert_eq!(again.chain_pem, cert.chain_pem);
    assert_eq!(again.key_pem, cert.key_pem);

    // A certificate from another CA (say, staging) is not reused.
    let mut elsewhere = cfg.clone();
    elsewhere.directory_url = format!("https://127.0.0.1:{}/dir", free_port());
    let err = nook_acme::load_or_obtain(&elsewhere, &zone)
        .await
        .unwrap_err();
    assert!(matches!(err, AcmeError::Unreachable { .. }), "{err:?}");

    // The renewal loop hands the stored certificate over straight away.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(nook_acme::renew_loop(cfg.clone(), zone.clone(), move |c| {
        let _ = tx.send(c);
    }));
    let delivered = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivered.chain_pem, cert.chain_pem);
    task.abort();

    // With the stored pair damaged, load_or_obtain issues a new one with the
    // stored account.
    std::fs::write(
        state.path().join("key.pem"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let account_before = std::fs::read(state.path().join("account.json")).unwrap();
    let fresh = nook_acme::load_or_obtain(&cfg, &zone).await.unwrap();
    assert_ne!(fresh.chain_pem, cert.chain_pem);
    assert_eq!(
        std::fs::read(state.path().join("account.json")).unwrap(),
        account_before
    );
    handshake(&fresh, &root, &format!("vm2.{DOMAIN}"))
        .await
        .unwrap();
    assert!(zone.acme_challenges().is_empty());

    // A stored certificate close to expiry is served at once and then
    // replaced by a renewed one.
    let expiring_key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![DOMAIN.to_owned(), format!("*.{DOMAIN}")]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let expiring = params.self_signed(&expiring_key).unwrap();
    std::fs::write(state.path().join("cert.pem"), expiring.pem()).unwrap();
    std::fs::write(state.path().join("key.pem"), expiring_key.serialize_pem()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(nook_acme::renew_loop(cfg.clone(), zone.clone(), move |c| {
        let _ = tx.send(c);
    }));
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.chain_pem, expiring.pem());
    let renewed = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    handshake(&renewed, &root, &format!("vm3.{DOMAIN}"))
        .await
        .unwrap();
    assert!(renewed.not_after > first.not_after);
    task.abort();
    assert_eq!(
        nook_acme::load(&cfg).unwrap().unwrap().chain_pem,
        renewed.chain_pem
    );
    assert!(zone.acme_challenges().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_our_dns_cannot_answer_fails_with_the_name() {
    init_tracing();
    // Pebble asks a second server for the same zone that never sees the
    // challenge values, as when the parent zone delegates elsewhere.
    let zone = zone();
    start_dns(zone.clone()).await;
    let stale_port = start_dns(self::zone()).await;
    let pebble = Pebble::start(stale_port).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = pebble.config(DOMAIN, state.path());
    let err = nook_acme::obtain(&cfg, &zone).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("error as shown: {msg}");
    assert!(matches!(err, AcmeError::Challenge { .. }), "{err:?}");
    assert!(msg.starts_with("DNS-01 challenge for "), "{msg}");
    assert!(msg.contains(DOMAIN), "{msg}");
    assert!(zone.acme_challenges().is_empty(), "TXT records left behind");
    assert!(!state.path().join("cert.pem").exists());
}

#[tokio::test]
async fn an_unreachable_ca_is_named() {
    let state = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}/dir", free_port());
    let cfg = AcmeConfig {
        vm_domain: None,
        directory_url: url.clone(),
        contact_email: None,
        domain: DOMAIN.into(),
        state_dir: state.path().to_owned(),
        extra_root_ca_pem: None,
        propagation_wait: Duration::ZERO,
    };
    let err = nook_acme::obtain(&cfg, &zone()).await.unwrap_err();
    assert!(matches!(err, AcmeError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn a_zone_for_another_domain_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let cfg = AcmeConfig {
        vm_domain: None,
        directory_url: "https://127.0.0.1:1/dir".into(),
        contact_email: None,
        domain: "other.example.test".into(),
        state_dir: state.path().to_owned(),
        extra_root_ca_pem: None,
        propagation_wait: Duration::ZERO,
    };
    let err = nook_acme::obtain(&cfg, &zone()).await.unwrap_err();
    assert!(matches!(err, AcmeError::DomainMismatch { .. }), "{err:?}");
}

/// With a VM domain of its own (`--vm-domain`), one certificate covers both sites: each name
/// is proven in its own zone, served from the same DNS socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_one_certificate_for_the_dashboard_and_the_vm_domain() {
    init_tracing();
    const VM_DOMAIN: &str = "nookvm.example.test";
    let dashboard = zone();
    let vms = Zone::new(ZoneConfig::new(
        VM_DOMAIN,
        Some(Ipv4Addr::new(127, 0, 0, 1)),
        None,
    ))
    .unwrap();
    let zones = nook_dns::Zones::new(vec![dashboard.clone(), vms.clone()]).unwrap();
    let dns_port = start_dns(zones.clone()).await;
    let pebble = Pebble::start(dns_port).await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = pebble.config(DOMAIN, state.path());
    cfg.vm_domain = Some(VM_DOMAIN.into());

    let cert = nook_acme::obtain(&cfg, &zones).await.unwrap();
    let mut names = cert.names.clone();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("*.{DOMAIN}"),
            format!("*.{VM_DOMAIN}"),
            DOMAIN.to_owned(),
            VM_DOMAIN.to_owned()
        ]
    );
    assert!(dashboard.acme_challenges().is_empty() && vms.acme_challenges().is_empty());
    let root = pebble.issuing_root().await;
    handshake(&cert, &root, DOMAIN).await.unwrap();
    handshake(&cert, &root, &format!("blog.{VM_DOMAIN}"))
        .await
        .unwrap();

    // A VM domain nook serves no zone for is refused before anything is ordered.
    let err = nook_acme::obtain(&cfg, &dashboard).await.unwrap_err();
    assert!(err.to_string().contains(VM_DOMAIN), "{err}");
}
