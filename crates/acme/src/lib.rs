//! Obtains and renews nook's one TLS certificate, for `DOMAIN` and
//! `*.DOMAIN`, from an ACME CA (Let's Encrypt, or Pebble in tests) with the
//! DNS-01 challenge, publishing the challenge values through nook's own
//! authoritative DNS ([`nook_dns::Zone`]).
//!
//! A single wildcard certificate means no certificate per VM, no VM names
//! in Certificate Transparency logs and no rate-limit pressure.
//!
//! State lives in `state_dir`: `account.json` (the ACME account key, 0600),
//! `cert.pem` (the chain), `key.pem` (0600) and `cert.directory` (which CA
//! issued it). This crate must not serve TLS or choose certificates per
//! connection; it hands a [`Certificate`] to the caller, who installs it
//! (e.g. with [`Certificate::certified_key`]).
//!
//! Wiring it into a daemon (the DNS server must answer before issuance):
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, RwLock};
//! use rustls::sign::CertifiedKey;
//!
//! let zone = nook_dns::Zone::new(nook_dns::ZoneConfig::new(
//!     "nook.example.test",
//!     Some([203, 0, 113, 7].into()),
//!     None,
//! ))?;
//! let udp = tokio::net::UdpSocket::bind("0.0.0.0:53").await?;
//! let tcp = tokio::net::TcpListener::bind("0.0.0.0:53").await?;
//! tokio::spawn(nook_dns::serve(zone.clone(), udp, tcp));
//!
//! let cfg = nook_acme::AcmeConfig {
//!     vm_domain: None,
//!     directory_url: "https://acme-v02.api.letsencrypt.org/directory".into(),
//!     contact_email: Some("admin@example.test".into()),
//!     domain: "nook.example.test".into(),
//!     state_dir: "/var/lib/nook/acme".into(),
//!     extra_root_ca_pem: None,
//!     propagation_wait: std::time::Duration::ZERO,
//! };
//! // What the TLS listener's `ResolvesServerCert::resolve` reads from.
//! let current: Arc<RwLock<Option<Arc<CertifiedKey>>>> = Arc::default();
//! let slot = current.clone();
//! tokio::spawn(nook_acme::renew_loop(cfg, zone, move |cert| {
//!     match cert.certified_key() {
//!         Ok(key) => *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(key),
//!         Err(e) => tracing::error!(error = %e, "new certificate unusable"),
//!     }
//! }));
//! # Ok(()) }
//! ```

mod cert;
mod issue;
mod state;

use std::path::PathBuf;

pub use cert::Certificate;
pub use issue::{load_or_obtain, obtain, renew_loop};
pub use state::load;

/// Where and for what to get the certificate.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The CA's directory, e.g.
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// Contact for expiry and policy mail from the CA; optional for most CAs.
    pub contact_email: Option<String>,
    /// The zone apex nook serves; the certificate covers it and `*.` it.
    pub domain: String,
    /// The VMs' own domain when it is not `domain` (`--vm-domain`): the certificate covers it
    /// and `*.` it too, proven through its own zone.
    pub vm_domain: Option<String>,
    /// Directory for the account key and the issued certificate.
    pub state_dir: PathBuf,
    /// PEM file with the root CA that the ACME server's own HTTPS
    /// certificate chains to. When set, it is the *only* root trusted for
    /// talking to the ACME server (Pebble's self-signed listener); when
    /// unset, the system's roots are used.
    pub extra_root_ca_pem: Option<PathBuf>,
    /// How long a published challenge value is given to reach every server that answers for
    /// the zone before the CA is asked to look (zero when this process's zone is the only one;
    /// a fleet's hosts learn each other's values through their store).
    pub propagation_wait: std::time::Duration,
}

impl AcmeConfig {
    /// The names the certificate covers: `DOMAIN` and `*.DOMAIN`, and the same for the VM
    /// domain when there is one.
    pub fn names(&self) -> Vec<String> {
        self.domains()
            .into_iter()
            .flat_map(|d| [d.clone(), format!("*.{d}")])
            .collect()
    }

    /// Every zone apex the certificate covers names in.
    pub fn domains(&self) -> Vec<String> {
        let mut domains = vec![self.domain_normalised()];
        if let Some(vm) = &self.vm_domain {
            let vm = vm.trim_end_matches('.').to_ascii_lowercase();
            if !domains.contains(&vm) {
                domains.push(vm);
            }
        }
        domains
    }

    fn domain_normalised(&self) -> String {
        self.domain.trim_end_matches('.').to_ascii_lowercase()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error(
        "ACME server at {url} unreachable: check the directory URL and that this host can reach it"
    )]
    Unreachable {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("Cannot load the ACME server's root CA from {path}")]
    RootCa {
        path: PathBuf,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME account registration at {url} failed")]
    Account {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME order for {domain} and *.{domain} failed")]
    Order {
        domain: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error(
        "DNS-01 challenge for {name} failed: {detail}. Check that the parent zone delegates {domain} \
         (NS and glue records) to this host and that UDP and TCP port 53 reach nook's DNS server"
    )]
    Challenge {
        name: String,
        domain: String,
        detail: String,
    },
    #[error("ACME server offered no DNS-01 challenge for {name}; nook needs DNS-01 for a wildcard")]
    NoDns01 { name: String },
    #[error(
        "ACME domain {domain} is not the DNS zone {zone} that nook serves: set both to the same domain"
    )]
    DomainMismatch { domain: String, zone: String },
    #[error("Cannot publish the DNS-01 challenge value")]
    Zone(#[from] nook_dns::DnsError),
    #[error("ACME finalisation for {domain} failed: the CA did not issue the certificate")]
    Finalize {
        domain: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME issuance for {domain} did not finish within {secs} s; it is retried later")]
    Timeout { domain: String, secs: u64 },
    #[error("Cannot read or write ACME state at {path}: check the state directory's permissions")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Stored ACME account at {path} is unreadable: remove it to register a new account")]
    AccountFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Certificate is unusable: {0}")]
    BadCertificate(String),
}
