//! Files in the state directory. Every write goes to a temporary file that
//! is renamed into place, so a crash never leaves half a key behind, and
//! secrets are created 0600 rather than chmod-ed after the fact.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;

use crate::{AcmeConfig, AcmeError, Certificate};

const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
/// The directory URL the stored certificate came from, so that switching
/// from a staging CA to the real one replaces its untrusted certificate.
const SOURCE_FILE: &str = "cert.directory";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AcmeError + '_ {
    move |source| AcmeError::State {
        path: path.to_owned(),
        source,
    }
}

fn ensure_dir(dir: &Path) -> Result<(), AcmeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AcmeError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_optional(path: &Path) -> Result<Option<String>, AcmeError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The stored account, if it was registered at `directory_url`: an account
/// from another CA (or staging vs production) is useless here.
pub(crate) fn load_account(cfg: &AcmeConfig) -> Result<Option<AccountCredentials>, AcmeError> {
    let path = cfg.state_dir.join(ACCOUNT_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    let parse_err = |source| AcmeError::AccountFile {
        path: path.clone(),
        source,
    };
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(parse_err)?;
    if value.get("directory_url").and_then(|v| v.as_str()) != Some(cfg.directory_url.as_str()) {
        return Ok(None);
    }
    let creds = value
        .get_mut("credentials")
        .map(serde_json::Value::take)
        .unwrap_or_default();
    serde_json::from_value(creds).map(Some).map_err(parse_err)
}

pub(crate) fn save_account(cfg: &AcmeConfig, creds: &AccountCredentials) -> Result<(), AcmeError> {
    ensure_dir(&cfg.state_dir)?;
    let path = cfg.state_dir.join(ACCOUNT_FILE);
    let json = serde_json::json!({
        "directory_url": cfg.directory_url,
        "credentials": creds,
    });
    let text = serde_json::to_vec_pretty(&json).map_err(|source| AcmeError::AccountFile {
        path: path.clone(),
        source,
    })?;
    write_atomic(&path, &text, 0o600)
}

/// The stored certificate and key, if both exist; an error if they don't
/// parse or don't belong together.
pub fn load(cfg: &AcmeConfig) -> Result<Option<Certificate>, AcmeError> {
    let (Some(chain), Some(key)) = (
        read_optional(&cert_path(cfg))?,
        read_optional(&key_path(cfg))?,
    ) else {
        return Ok(None);
    };
    Certificate::from_pem(chain, key).map(Some)
}

/// A crash between the two writes leaves a key that doesn't match the
/// certificate; [`crate::load_or_obtain`] treats such a pair as missing.
pub(crate) fn save_cert(cfg: &AcmeConfig, cert: &Certificate) -> Result<(), AcmeError> {
    ensure_dir(&cfg.state_dir)?;
    write_atomic(&key_path(cfg), cert.key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert_path(cfg), cert.chain_pem.as_bytes(), 0o644)?;
    let source = cfg.state_dir.join(SOURCE_FILE);
    write_atomic(&source, cfg.directory_url.as_bytes(), 0o644)
}

/// The stored certificate if it came from `cfg.directory_url` and names
/// what `cfg` asks for; `None` if there is none or it is for something else.
pub(crate) fn load_matching(cfg: &AcmeConfig) -> Result<Option<Certificate>, AcmeError> {
    let source = cfg.state_dir.join(SOURCE_FILE);
    if read_optional(&source)?.as_deref() != Some(cfg.directory_url.as_str()) {
        return Ok(None);
    }
    Ok(load(cfg)?.filter(|c| {
        let covers = c.covers(&cfg.names());
        if !covers {
            tracing::info!(names = ?c.names, "stored certificate names other domains");
        }
        covers
    }))
}

pub(crate) fn cert_path(cfg: &AcmeConfig) -> PathBuf {
    cfg.state_dir.join(CERT_FILE)
}

pub(crate) fn key_path(cfg: &AcmeConfig) -> PathBuf {
    cfg.state_dir.join(KEY_FILE)
}
