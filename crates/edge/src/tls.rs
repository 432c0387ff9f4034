//! TLS termination with a certificate that can be replaced at runtime (local CA at start, an
//! ACME wildcard later) without restarting listeners.

use std::sync::{Arc, RwLock};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::EdgeError;

/// Hands every handshake the currently installed certificate. Every name the edge serves is
/// `DOMAIN` or `*.DOMAIN`, so one certificate covers all of them.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    pub(crate) fn new() -> Self {
        Self {
            current: RwLock::new(None),
        }
    }

    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Arc; the value is
        // still a whole Arc, so keep going.
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(key);
    }

    pub(crate) fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// Parses a PEM chain (leaf first) and a PEM private key into a signing certificate.
pub fn certified_key_from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, EdgeError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| EdgeError::InvalidPem("unreadable certificate chain"))?;
    if chain.is_empty() {
        return Err(EdgeError::InvalidPem("no certificate in chain"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| EdgeError::InvalidPem("unreadable private key"))?;
    let provider = aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(EdgeError::Tls)?;
    Ok(certified)
}

pub(crate) fn server_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, EdgeError> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(EdgeError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
