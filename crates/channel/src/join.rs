//! Joining a fleet. An admin of a host makes a one-time token (`nook host invite`); the new
//! machine, holding nothing else, runs `nook host join TOKEN` and gets from that host what a
//! host of the fleet needs: the store's URL and the fleet's secrets key, with which it issues
//! itself a channel certificate at its first start.
//!
//! The token carries the inviting host's name and channel address, the SHA-256 of the
//! fleet CA's certificate, and a 256-bit secret. The new host dials the address with TLS and
//! the ALPN protocol [`JOIN_ALPN`], presenting no certificate; the inviting host answers with
//! its certificate and the CA's, and the new host accepts them only if the CA's hash is the
//! token's and it issued a certificate for the token's host name. So the secret and what it
//! buys go only to the host the token names, and only a holder of the secret gets them. The
//! inviting host keeps only the secret's hash, and takes it at the first use.
//!
//! A join connection carries one [`JoinRequest`] line of at most [`MAX_JOIN_LINE`] bytes and
//! one [`JoinReply`] line; anyone who can reach the port may open one, so it shares the
//! small, short-lived slots of connections still proving themselves.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::{ChannelError, HANDSHAKE_TIMEOUT, read_line};

/// The ALPN protocol of a join connection; every other connection is a host's.
pub const JOIN_ALPN: &[u8] = b"nook-join/1";
/// The longest join request or reply line.
pub const MAX_JOIN_LINE: usize = 8 << 10;
const TOKEN_PREFIX: &str = "nookjoin1_";

/// What `nook host invite` prints and `nook host join` takes.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The inviting host's name (its certificate's) and channel address (HOST:PORT).
    pub host: String,
    pub addr: String,
    /// SHA-256 of the fleet CA's certificate (DER).
    pub ca_sha256: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("host", &self.host)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    host: String,
    addr: String,
    ca: String,
    secret: String,
}

impl JoinToken {
    /// A new token, with a fresh secret, for joining through `host` at `addr`.
    pub fn new(host: &str, addr: &str, ca_sha256: [u8; 32]) -> JoinToken {
        JoinToken {
            host: host.to_string(),
            addr: addr.to_string(),
            ca_sha256,
            secret: rand::random(),
        }
    }

    pub fn encode(&self) -> String {
        let body = TokenBody {
            host: self.host.clone(),
            addr: self.addr.clone(),
            ca: URL_SAFE_NO_PAD.encode(self.ca_sha256),
            secret: URL_SAFE_NO_PAD.encode(self.secret),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// The token in `text`, or why it is not one (in words for the user).
    pub fn parse(text: &str) -> Result<JoinToken, String> {
        let bad = |why: &str| {
            format!(
                "that is not a join token ({why}): copy the whole token `nook host invite` printed"
            )
        };
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad(&format!("it does not start with {TOKEN_PREFIX}")))?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("it is cut short or changed"))?;
        let body: TokenBody =
            serde_json::from_slice(&json).map_err(|_| bad("it is cut short or changed"))?;
        let bytes32 =
            |b64: &str| -> Option<[u8; 32]> { URL_SAFE_NO_PAD.decode(b64).ok()?.try_into().ok() };
        let (Some(ca_sha256), Some(secret)) = (bytes32(&body.ca), bytes32(&body.secret)) else {
            return Err(bad("it is cut short or changed"));
        };
        Ok(JoinToken {
            host: body.host,
            addr: body.addr,
            ca_sha256,
            secret,
        })
    }
}

/// What the inviting host keeps of a secret: its SHA-256, hex.
pub fn secret_digest(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// What a joining host sends.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    #[serde(with = "nook_proto::b64")]
    pub secret: Vec<u8>,
    /// The name it will run under, so the inviting host can refuse one in use.
    pub host_name: String,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("host_name", &self.host_name)
            .finish_non_exhaustive()
    }
}

/// What a host of the fleet gives one that joins.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JoinGrant {
    /// The store's URL (it may carry a password).
    pub store: String,
    #[serde(with = "nook_proto::b64")]
    pub secrets_key: Vec<u8>,
}

impl std::fmt::Debug for JoinGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinGrant").finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum JoinReply {
    Granted(JoinGrant),
    Refused { why: String },
}

/// Joins the fleet `token` names, as host `host_name`: the grant, or why not.
pub async fn join(token: &JoinToken, host_name: &str) -> Result<JoinGrant, ChannelError> {
    let host = token.host.as_str();
    let unreachable = |source| ChannelError::Unreachable {
        host: host.to_string(),
        addr: token.addr.clone(),
        source,
    };
    let protocol = |why: String| ChannelError::Protocol {
        host: host.to_string(),
        why,
    };
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| ChannelError::BadName(host.into()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            ca_sha256: token.ca_sha256,
            provider,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let request = JoinRequest {
        secret: token.secret.to_vec(),
        host_name: host_name.to_string(),
    };
    let mut line = serde_json::to_vec(&request).map_err(|e| protocol(e.to_string()))?;
    line.push(b'\n');
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, async {
        let tcp = TcpStream::connect(&token.addr).await.map_err(unreachable)?;
        let mut tls = connector.connect(name, tcp).await.map_err(unreachable)?;
        tls.write_all(&line)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        tls.flush().await.map_err(|e| protocol(e.to_string()))?;
        read_line(&mut tls, MAX_JOIN_LINE).await.map_err(protocol)
    })
    .await
    .map_err(|_| ChannelError::Timeout {
        host: host.to_string(),
    })??;
    match serde_json::from_slice::<JoinReply>(&reply).map_err(|e| protocol(e.to_string()))? {
        JoinReply::Granted(grant) => Ok(grant),
        JoinReply::Refused { why } => Err(ChannelError::Refused {
            host: host.to_string(),
            why,
        }),
    }
}

/// Accepts a server whose chain holds a CA certificate with the pinned hash and whose own
/// certificate that CA issued for the name dialled.
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the host is not of the fleet the token was made for (its CA differs)".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?
        .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves one join connection after its handshake: one request, one reply.
pub(crate) async fn serve_join<S, H>(tls: &mut S, handler: &H) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: crate::Handler,
{
    let request = tokio::time::timeout(crate::PROVE_TIMEOUT, read_line(tls, MAX_JOIN_LINE))
        .await
        .map_err(|_| "no join request in time".to_string())??;
    let request: JoinRequest =
        serde_json::from_slice(&request).map_err(|e| format!("bad join request: {e}"))?;
    let reply = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handler.join(request)).await {
        Ok(Ok(grant)) => JoinReply::Granted(grant),
        Ok(Err(why)) => JoinReply::Refused { why },
        Err(_) => JoinReply::Refused {
            why: "the host took too long to answer; try again".into(),
        },
    };
    let mut line = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
    line.push(b'\n');
    tls.write_all(&line).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_a_changed_one_is_refused() {
        let token = JoinToken::new("h1", "10.0.0.1:2280", [7; 32]);
        let text = token.encode();
        assert_eq!(
            JoinToken::parse(&format!(" {text}\n")).expect("parse"),
            token
        );
        assert!(!format!("{token:?}").contains("secret:"));
        let cut = &text[..text.len() - 5];
        let err = JoinToken::parse(cut).expect_err("cut");
        assert!(err.contains("cut short or changed"), "{err}");
        let err = JoinToken::parse("hello").expect_err("not one");
        assert!(err.contains("does not start with nookjoin1_"), "{err}");
        // Another token's secret differs.
        assert_ne!(JoinToken::new("h1", "a", [7; 32]).secret, token.secret);
    }
}
