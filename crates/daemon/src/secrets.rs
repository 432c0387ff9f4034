//! Secrets at rest: integration tokens are sealed with XChaCha20-Poly1305 under a key that
//! lives only in `DATA_DIR/secrets.key` (mode 0600), bound to the row they belong to, so a
//! copied database alone reveals nothing and a sealed value moved to another row does not open.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const KEY_FILE: &str = "secrets.key";
/// What the store's key check seals, and the row it is bound to.
const KEY_CHECK: (&str, &[u8]) = ("nook:secrets-key-check", b"nook secrets key check");
const NONCE_LEN: usize = 24;

/// Refuses a secrets key that does not open what the store holds: the first host to use a
/// store leaves a value sealed with its key there, and a host with another key (a fleet's new
/// host given none, or a replaced key file) would seal secrets no other host can open and
/// fail to open every secret already stored.
pub async fn check_key(
    sealer: &Sealer,
    store: &nook_store::Store,
    data_dir: &Path,
) -> Result<(), nook_api::ApiError> {
    let (row, plain) = KEY_CHECK;
    let stored = store
        .setting_or_insert("secrets_key_check", &sealer.seal(row, plain))
        .await
        .map_err(|e| crate::errors::from_store("check the secrets key", e))?;
    if sealer.unseal(row, &stored).as_deref() == Some(plain) {
        return Ok(());
    }
    Err(nook_api::ApiError::new(
        nook_api::ErrorCode::HostMisconfigured,
        format!(
            "{} does not open the secrets this store holds. Hosts sharing a store must share \
             its key: copy secrets.key (mode 0600) from a host already using this store into \
             the data dir, or restore this host's own if it was replaced, then start again",
            data_dir.join(KEY_FILE).display()
        ),
    ))
}

/// The fleet's secrets key in `data_dir`, as a joining host is given it.
pub fn read_key(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(data_dir.join(KEY_FILE))
}

/// Keeps the fleet's secrets key given to a joining host in `data_dir` (mode 0600). A key
/// already there stays if it is the same; another one is an error, as replacing it would
/// lose every secret it sealed.
pub fn write_key(data_dir: &Path, key: &[u8]) -> Result<(), String> {
    let path = data_dir.join(KEY_FILE);
    if key.len() != 32 {
        return Err("the fleet's secrets key is not 32 bytes".into());
    }
    match std::fs::read(&path) {
        Ok(held) if held == key => return Ok(()),
        Ok(_) => {
            return Err(format!(
                "{} holds another secrets key: this data dir belongs to another store. Join with an empty --data-dir, or move that file away if nothing it sealed matters",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(key)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    /// Loads the data dir's key, making it on first use.
    pub fn open(data_dir: &Path) -> std::io::Result<Sealer> {
        let path = data_dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = XChaCha20Poly1305::generate_key(&mut OsRng);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                key.to_vec()
            }
            Err(e) => return Err(e),
        };
        let cipher = XChaCha20Poly1305::new_from_slice(&key).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a 32-byte key", path.display()),
            )
        })?;
        Ok(Sealer { cipher })
    }

    /// `nonce ++ ciphertext` of `plain`, bound to `row`.
    pub fn seal(&self, row: &str, plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: row.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The plain text, if `sealed` was sealed for `row` under this key.
    pub fn unseal(&self, row: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: row.as_bytes(),
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_secrets_open_only_for_their_row_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sealer::open(dir.path()).expect("open");
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = s.seal("row1", b"ghp_secret");
        assert!(!sealed.windows(10).any(|w| w == b"ghp_secret"));
        assert_eq!(
            s.unseal("row1", &sealed).as_deref(),
            Some(&b"ghp_secret"[..])
        );
        assert_eq!(s.unseal("row2", &sealed), None);
        // The same key file opens it again; another key does not.
        let again = Sealer::open(dir.path()).expect("reopen");
        assert_eq!(
            again.unseal("row1", &sealed).as_deref(),
            Some(&b"ghp_secret"[..])
        );
        let other = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            Sealer::open(other.path())
                .expect("other")
                .unseal("row1", &sealed),
            None
        );
    }
}
