//! A local certificate authority for development domains such as `nook.localhost`.
//!
//! The CA key and certificate persist in a directory so a user trusts the CA once; the leaf
//! certificate for `DOMAIN` and `*.DOMAIN` is reissued at every load (it is cheap, and a short
//! validity keeps browsers happy).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::EdgeError;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const CA_DOMAIN: &str = "ca-domain";

/// A persisted local CA and the leaf certificate it issued for one domain.
pub struct LocalCa {
    dir: PathBuf,
    domain: String,
    ca_cert_pem: String,
    leaf_chain_pem: String,
    leaf_key_pem: String,
}

impl std::fmt::Debug for LocalCa {
    // The key material stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// The CA's parameters are a pure function of the domains, so the issuer can be rebuilt from
/// the persisted key alone: same subject and same key identifier as the persisted certificate.
fn ca_params(domains: &[String]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nook");
    dn.push(
        DnType::CommonName,
        format!("nook local CA for {}", domains.join(", ")),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A leaked CA key can then only mint certificates for the development domains.
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: domains
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    params
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EdgeError + '_ {
    move |source| EdgeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LocalCa {
    /// Loads the CA from `dir`, creating the directory, key (mode 0600) and certificate on first
    /// use (or when the domains changed, since the name constraints would no longer fit), and
    /// issues a fresh leaf for each of `domains` (the dashboard's, the VMs') and `*.` each.
    pub fn load_or_create(dir: &Path, domains: &[&str]) -> Result<Self, EdgeError> {
        let mut domains: Vec<String> = domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        domains.dedup();
        if domains.is_empty() {
            return Err(EdgeError::Config("the local CA needs a domain".into()));
        }
        let domain = domains.join(" ");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let domain_path = dir.join(CA_DOMAIN);
        let existing = match (
            fs::read_to_string(&cert_path),
            fs::read_to_string(&key_path),
            fs::read_to_string(&domain_path),
        ) {
            (Ok(cert), Ok(key), Ok(d)) if d.trim() == domain => Some((cert, key)),
            _ => None,
        };
        let (ca_cert_pem, ca_key) = match existing {
            Some((cert, key)) => (
                cert,
                KeyPair::from_pem(&key).map_err(EdgeError::Certificate)?,
            ),
            None => {
                let key = KeyPair::generate().map_err(EdgeError::Certificate)?;
                let cert = ca_params(&domains)
                    .self_signed(&key)
                    .map_err(EdgeError::Certificate)?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                write_atomic(&cert_path, cert.pem().as_bytes())?;
                write_atomic(&domain_path, domain.as_bytes())?;
                (cert.pem(), key)
            }
        };
        let issuer = Issuer::new(ca_params(&domains), ca_key);

        let leaf_key = KeyPair::generate().map_err(EdgeError::Certificate)?;
        let mut leaf = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, domains[0].clone());
        leaf.distinguished_name = dn;
        for d in &domains {
            for name in [d.clone(), format!("*.{d}")] {
                leaf.subject_alt_names.push(SanType::DnsName(
                    name.try_into().map_err(EdgeError::Certificate)?,
                ));
            }
        }
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        // Under the 398-day ceiling browsers apply to leaf certificates.
        leaf.not_after = OffsetDateTime::now_utc() + Duration::days(390);
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .map_err(EdgeError::Certificate)?;

        Ok(Self {
            dir: dir.to_path_buf(),
            leaf_chain_pem: format!("{}{}", leaf_cert.pem(), ca_cert_pem),
            leaf_key_pem: leaf_key.serialize_pem(),
            ca_cert_pem,
            domain,
        })
    }

    /// Where the CA certificate lives (what `nook ca path` prints, and what users trust).
    pub fn ca_cert_path(&self) -> PathBuf {
        Self::ca_cert_path_in(&self.dir)
    }

    /// Where [`LocalCa::load_or_create`] keeps the CA certificate in `dir`, without touching it
    /// (for `nook ca path` when the daemon is not running).
    pub fn ca_cert_path_in(dir: &Path) -> PathBuf {
        dir.join(CA_CERT)
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The leaf certificate followed by the CA certificate, PEM.
    pub fn leaf_chain_pem(&self) -> &str {
        &self.leaf_chain_pem
    }

    /// The leaf's private key, PEM (PKCS#8).
    pub fn leaf_key_pem(&self) -> &str {
        &self.leaf_key_pem
    }

    /// The domain the CA is constrained to.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// Writes a secret through a temporary file created 0600, so the key is never readable by others
/// even for a moment, then renames it into place.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), EdgeError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EdgeError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn persists_ca_and_reissues_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalCa::load_or_create(dir.path(), &["Nook.Localhost"]).unwrap();
        let b = LocalCa::load_or_create(dir.path(), &["nook.localhost"]).unwrap();
        assert_eq!(a.ca_cert_pem(), b.ca_cert_pem());
        assert_ne!(a.leaf_key_pem(), b.leaf_key_pem());
        let mode = fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.ca_cert_path(), dir.path().join("ca.pem"));
        let c = LocalCa::load_or_create(dir.path(), &["other.localhost"]).unwrap();
        assert_ne!(a.ca_cert_pem(), c.ca_cert_pem());
    }
}
