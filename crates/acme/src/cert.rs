use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use crate::AcmeError;

/// Renew when this much of the lifetime is left at the latest...
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// ...or, for short-lived certificates, when a third of it is left, so a
/// 6-day certificate is not renewed continuously.
const RENEW_FRACTION: u32 = 3;

/// An issued certificate with its private key.
#[derive(Clone)]
pub struct Certificate {
    /// Leaf first, then the intermediates, as PEM.
    pub chain_pem: String,
    /// The leaf's private key as PKCS#8 PEM.
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DNS names in the leaf's subjectAltName, lowercased.
    pub names: Vec<String>,
}

impl std::fmt::Debug for Certificate {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("names", &self.names)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Certificate {
    /// Parses a chain and key, checking that the key belongs to the leaf.
    pub fn from_pem(chain_pem: String, key_pem: String) -> Result<Certificate, AcmeError> {
        let chain = parse_chain(&chain_pem)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| AcmeError::BadCertificate(format!("leaf does not parse: {e}")))?;
        let validity = leaf.validity();
        let names = match leaf.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => {
                return Err(AcmeError::BadCertificate(format!(
                    "bad subjectAltName: {e}"
                )));
            }
        };
        let cert = Certificate {
            not_before: unix_to_system(validity.not_before.timestamp()),
            not_after: unix_to_system(validity.not_after.timestamp()),
            names,
            chain_pem,
            key_pem,
        };
        cert.certified_key()?;
        Ok(cert)
    }

    /// The chain and key in the form a rustls `ResolvesServerCert` hands
    /// out, using the workspace's one crypto provider (aws-lc-rs).
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, AcmeError> {
        let chain = parse_chain(&self.chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| AcmeError::BadCertificate(format!("private key does not parse: {e}")))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| AcmeError::BadCertificate(format!("private key unusable: {e}")))?;
        let certified = CertifiedKey::new(chain, key);
        certified.keys_match().map_err(|e| {
            AcmeError::BadCertificate(format!("key does not match the certificate: {e}"))
        })?;
        Ok(Arc::new(certified))
    }

    /// Whether the leaf names exactly what nook needs (`DOMAIN`, `*.DOMAIN`).
    pub fn covers(&self, names: &[String]) -> bool {
        names
            .iter()
            .all(|n| self.names.iter().any(|have| have.eq_ignore_ascii_case(n)))
    }

    /// When to renew: 30 days before expiry, or with a third of the
    /// lifetime left if that is sooner.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let margin = RENEW_BEFORE.min(lifetime / RENEW_FRACTION);
        self.not_after
            .checked_sub(margin)
            .unwrap_or(self.not_before)
    }

    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        now >= self.renew_at()
    }
}

fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, AcmeError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AcmeError::BadCertificate(format!("chain does not parse: {e}")))?;
    if chain.is_empty() {
        return Err(AcmeError::BadCertificate(
            "no certificate in the chain".into(),
        ));
    }
    Ok(chain)
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(lifetime_days: u64) -> Certificate {
        let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Certificate {
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before: start,
            not_after: start + Duration::from_secs(lifetime_days * 86400),
            names: vec!["nook.example.test".into(), "*.nook.example.test".into()],
        }
    }

    #[test]
    fn renewal_time() {
        let days = |n: u64| Duration::from_secs(n * 86400);
        let c = cert(90);
        assert_eq!(c.renew_at(), c.not_after - days(30));
        assert!(!c.needs_renewal(c.not_before + days(59)));
        assert!(c.needs_renewal(c.not_before + days(60)));
        let short = cert(6);
        assert_eq!(short.renew_at(), short.not_after - days(2));
    }

    #[test]
    fn coverage_is_case_insensitive() {
        let c = cert(90);
        assert!(c.covers(&["NOOK.example.test".into(), "*.nook.example.test".into()]));
        assert!(!c.covers(&["other.test".into()]));
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Certificate::from_pem("nope".into(), "nope".into()).is_err());
    }
}
