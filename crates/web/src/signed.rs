//! API tokens signed by one of the account's SSH keys, with nothing stored on the server.
//!
//! A token is `nooksig.` + base64(permissions JSON) + `.` + base64(the armored signature that
//! `ssh-keygen -Y sign -n nook-api` made of exactly those JSON bytes). nook verifies the
//! signature, then the daemon checks that the signing key belongs to an account, so removing
//! the key revokes every token it signed.

use base64::Engine;
use serde::Deserialize;
use ssh_key::{HashAlg, SshSig};

/// The namespace the signature must be made in (`ssh-keygen -Y sign -n nook-api`), so a
/// signature made for anything else (git commits, files) is never a token.
pub const NAMESPACE: &str = "nook-api";
/// Every signed token starts with this.
pub const PREFIX: &str = "nooksig.";
/// The longest token accepted; a real one is well under 2 KiB (RSA-4096 keys included).
const MAX_TOKEN: usize = 16 * 1024;
/// How far ahead of its use (or of its `nbf`) a token's `exp` may be. Nothing records when a
/// token was signed, so this bounds what is accepted now: a token signed with a far `exp` is
/// refused until that `exp` is within reach.
const MAX_LIFETIME_SECS: i64 = 366 * 86400;

/// What the signer allows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    /// Not valid after (unix seconds). Required.
    pub exp: i64,
    /// Not valid before (unix seconds).
    #[serde(default)]
    pub nbf: Option<i64>,
    /// Lobby commands it may run (`["all"]` for every one an API token may carry).
    pub cmds: Vec<String>,
    /// The only VMs it may act on.
    #[serde(default)]
    pub vms: Option<Vec<String>>,
}

/// A token whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedToken {
    pub permissions: Permissions,
    /// `SHA256:...` of the signing key, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedTokenError {
    #[error("the token is not of the form nooksig.BASE64(JSON).BASE64(SIGNATURE): see docs/api.md")]
    Malformed,
    #[error("the token's permissions are not valid JSON with exp and cmds: {0}")]
    BadPermissions(String),
    #[error("the token's signature does not verify (sign with ssh-keygen -Y sign -n nook-api)")]
    BadSignature,
    #[error("the token expired at {0} (unix seconds)")]
    Expired(i64),
    #[error("the token is not valid before {0} (unix seconds)")]
    NotYetValid(i64),
    #[error("the token is valid for more than 366 days; sign one with a nearer exp")]
    TooLong,
}

fn decode(part: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let trimmed = part.trim_end_matches('=');
    STANDARD
        .decode(part)
        .ok()
        .or_else(|| URL_SAFE_NO_PAD.decode(trimmed).ok())
}

/// Checks a `nooksig.` token's signature and validity at `now` (unix seconds). The caller
/// must still check that [`SignedToken::fingerprint`] is a key of an account.
pub fn verify(token: &str, now: i64) -> Result<SignedToken, SignedTokenError> {
    if token.len() > MAX_TOKEN {
        return Err(SignedTokenError::Malformed);
    }
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(SignedTokenError::Malformed)?;
    let (perms_b64, sig_b64) = rest.split_once('.').ok_or(SignedTokenError::Malformed)?;
    let message = decode(perms_b64).ok_or(SignedTokenError::Malformed)?;
    let armored = decode(sig_b64).ok_or(SignedTokenError::Malformed)?;
    let armored = std::str::from_utf8(&armored).map_err(|_| SignedTokenError::Malformed)?;
    let sig = SshSig::from_pem(armored.trim()).map_err(|_| SignedTokenError::Malformed)?;
    if sig.namespace() != NAMESPACE {
        return Err(SignedTokenError::BadSignature);
    }
    let key = ssh_key::PublicKey::from(sig.public_key().clone());
    key.verify(NAMESPACE, &message, &sig)
        .map_err(|_| SignedTokenError::BadSignature)?;
    let permissions: Permissions = serde_json::from_slice(&message)
        .map_err(|e| SignedTokenError::BadPermissions(e.to_string()))?;
    if permissions.exp <= now {
        return Err(SignedTokenError::Expired(permissions.exp));
    }
    if let Some(nbf) = permissions.nbf
        && nbf > now
    {
        return Err(SignedTokenError::NotYetValid(nbf));
    }
    if permissions.exp - permissions.nbf.unwrap_or(now).max(now) > MAX_LIFETIME_SECS {
        return Err(SignedTokenError::TooLong);
    }
    Ok(SignedToken {
        permissions,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Signs `json` with a fresh key of `kind` through the real `ssh-keygen`, as docs/api.md
    /// tells users to; returns the token and the key's fingerprint.
    fn sign(kind: &str, json: &str, namespace: &str) -> (String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id");
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen runs");
        assert!(ok.success());
        let perms = dir.path().join("perms.json");
        std::fs::write(&perms, json).expect("write");
        let ok = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&key)
            .arg(&perms)
            .output()
            .expect("ssh-keygen -Y sign runs");
        assert!(ok.status.success(), "{ok:?}");
        let sig = std::fs::read(dir.path().join("perms.json.sig")).expect("sig");
        let fp = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub"))
            .output()
            .expect("ssh-keygen -l");
        let fp = String::from_utf8_lossy(&fp.stdout)
            .split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_string();
        let b64 = base64::engine::general_purpose::STANDARD;
        (
            format!("{PREFIX}{}.{}", b64.encode(json), b64.encode(sig)),
            fp,
        )
    }

    #[test]
    fn a_token_signed_by_ssh_keygen_verifies_and_names_its_key() {
        for kind in ["ed25519", "ecdsa", "rsa"] {
            let json = "{\"exp\": 2000000000, \"cmds\": [\"ls\"], \"vms\": [\"blog\"]}\n";
            let (token, fp) = sign(kind, json, NAMESPACE);
            let t = verify(&token, 1_990_000_000).expect(kind);
            assert_eq!(t.fingerprint, fp);
            assert_eq!(t.permissions.cmds, ["ls"]);
            assert_eq!(t.permissions.vms, Some(vec!["blog".to_string()]));
        }
    }

    #[test]
    fn time_namespace_and_tampering_are_checked() {
        let json = "{\"exp\": 2000000000, \"nbf\": 1995000000, \"cmds\": [\"ls\"]}";
        let (token, _) = sign("ed25519", json, NAMESPACE);
        assert_eq!(
            verify(&token, 1_990_000_000),
            Err(SignedTokenError::NotYetValid(1_995_000_000))
        );
        assert_eq!(
            verify(&token, 2_000_000_000),
            Err(SignedTokenError::Expired(2_000_000_000))
        );
        assert!(verify(&token, 1_996_000_000).is_ok());

        // The same JSON signed for git (another namespace) is not a token.
        let (other, _) = sign("ed25519", json, "git");
        assert_eq!(
            verify(&other, 1_996_000_000),
            Err(SignedTokenError::BadSignature)
        );

        // Widening the permissions breaks the signature.
        let b64 = base64::engine::general_purpose::STANDARD;
        let sig_part = token.rsplit_once('.').expect("dot").1;
        let forged = format!(
            "{PREFIX}{}.{sig_part}",
            b64.encode(json.replace("\"ls\"", "\"rm\""))
        );
        assert_eq!(
            verify(&forged, 1_996_000_000),
            Err(SignedTokenError::BadSignature)
        );

        let (long, _) = sign(
            "ed25519",
            "{\"exp\": 1990000000, \"cmds\": [\"ls\"]}",
            NAMESPACE,
        );
        assert_eq!(verify(&long, 1_900_000_000), Err(SignedTokenError::TooLong));
        assert_eq!(verify("nooksig.x", 0), Err(SignedTokenError::Malformed));
        assert_eq!(verify("bearer", 0), Err(SignedTokenError::Malformed));
    }
}
