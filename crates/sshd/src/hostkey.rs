//! Host keys: the front door's own (an ed25519 key in OpenSSH format, made once), and the
//! ones nook makes for each VM's sshd.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::{EcdsaKeypair, Ed25519Keypair};

use crate::SshError;

/// Loads the host key at `path`, or creates it (ed25519, mode 0600, parent
/// directories included) if the file does not exist.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text).map_err(|source| SshError::ParseHostKey {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(SshError::ReadHostKey {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create(path: &Path) -> Result<PrivateKey, SshError> {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("nook host key");
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(SshError::EncodeHostKey)?;
    let write_err = |source| SshError::WriteHostKey {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    // Write under a temporary name and rename, so a crash never leaves half a key.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    // Another process may have won the race: keep its key.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            load_or_create_host_key(path)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(write_err(e))
        }
    }
}

/// One SSH host key pair for a guest's sshd, in OpenSSH format.
#[derive(Clone, PartialEq, Eq)]
pub struct GuestHostKey {
    /// The word in sshd's file names: `ed25519` or `ecdsa`.
    pub kind: &'static str,
    pub private_openssh: String,
    /// `ALGO BASE64 COMMENT`, as in `ssh_host_*_key.pub`.
    pub public_openssh: String,
}

impl std::fmt::Debug for GuestHostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHostKey")
            .field("kind", &self.kind)
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

/// Makes a VM's SSH host keys: ed25519, and ECDSA P-256 for clients that lack ed25519 (no RSA:
/// every current client has one of these). Done on the host, natively, because `ssh-keygen -A`
/// in a guest without KVM took 20 s of its boot.
pub fn generate_guest_host_keys(comment: &str) -> Result<Vec<GuestHostKey>, SshError> {
    let seed: [u8; 32] = rand::random();
    let ed25519 = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let ecdsa = loop {
        // A random 32-byte string is a valid P-256 scalar unless it is zero or above the
        // group order, which happens with probability about 2^-32: then draw again.
        let bytes: [u8; 32] = rand::random();
        if let Ok(secret) = p256::SecretKey::from_slice(&bytes) {
            let public = secret.public_key();
            break PrivateKey::from(EcdsaKeypair::NistP256 {
                private: secret.into(),
                public: public.into(),
            });
        }
    };
    [("ed25519", ed25519), ("ecdsa", ecdsa)]
        .into_iter()
        .map(|(kind, key)| {
            let (private_openssh, public_openssh) = encode(key, comment)?;
            Ok(GuestHostKey {
                kind,
                private_openssh,
                public_openssh,
            })
        })
        .collect()
}

/// An SSH key pair nook uses as a client, in OpenSSH format.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey {
    pub private_openssh: String,
    /// `ssh-ed25519 BASE64 COMMENT`, one `authorized_keys` line.
    pub public_openssh: String,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

/// Makes the ed25519 key nook's relay logs in to a guest's sshd with (what `ssh-keygen -t
/// ed25519` would make, without a process per VM).
pub fn generate_client_key(comment: &str) -> Result<ClientKey, SshError> {
    let seed: [u8; 32] = rand::random();
    let (private_openssh, public_openssh) =
        encode(PrivateKey::from(Ed25519Keypair::from_seed(&seed)), comment)?;
    Ok(ClientKey {
        private_openssh,
        public_openssh,
    })
}

/// The OpenSSH private and public texts of `key`, labelled `comment`.
fn encode(mut key: PrivateKey, comment: &str) -> Result<(String, String), SshError> {
    key.set_comment(comment);
    let private_openssh = key
        .to_openssh(LineEnding::LF)
        .map_err(SshError::EncodeHostKey)?
        .to_string();
    let public_openssh = key
        .public_key()
        .to_openssh()
        .map_err(SshError::EncodeHostKey)?;
    Ok((private_openssh, public_openssh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/host_ed25519");
        let a = load_or_create_host_key(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let b = load_or_create_host_key(&path).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.algorithm(), russh::keys::Algorithm::Ed25519);
    }

    #[test]
    fn guest_host_keys_are_fresh_and_parse() {
        let a = generate_guest_host_keys("root@vm").expect("generate");
        let b = generate_guest_host_keys("root@vm").expect("generate");
        let kinds: Vec<_> = a.iter().map(|k| k.kind).collect();
        assert_eq!(kinds, ["ed25519", "ecdsa"]);
        for (x, y) in a.iter().zip(&b) {
            assert_ne!(
                x.public_openssh, y.public_openssh,
                "keys must differ per call"
            );
            let parsed = PrivateKey::from_openssh(&x.private_openssh).expect("parse private");
            let public = parsed.public_key().to_openssh().expect("encode public");
            assert_eq!(public, x.public_openssh);
        }
        assert!(a[0].public_openssh.starts_with("ssh-ed25519 "));
        assert!(a[1].public_openssh.starts_with("ecdsa-sha2-nistp256 "));
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad");
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            load_or_create_host_key(&path),
            Err(SshError::ParseHostKey { .. })
        ));
    }
}
