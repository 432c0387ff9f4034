//! Errors of the edge library (what the daemon sees). What a browser sees comes from
//! [`crate::pages`], never from a `Display` of these.

use std::path::PathBuf;

/// Set-up and certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("Cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Certificate generation failed")]
    Certificate(#[source] rcgen::Error),
    #[error("Invalid certificate or key: {0}")]
    InvalidPem(&'static str),
    #[error("TLS configuration rejected")]
    Tls(#[source] rustls::Error),
    #[error("Invalid edge configuration: {0}")]
    Config(String),
    #[error("Cannot send email")]
    Mail(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A failure inside the daemon's [`crate::EdgeBackend`] (a database error, say). The edge logs
/// it and shows a generic error page.
#[derive(Debug, thiserror::Error)]
#[error("Backend failed")]
pub struct BackendError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl BackendError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(e.into())
    }
}

/// Why a proxied request did not get an upstream response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("Upstream unreachable")]
    Unreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("Upstream timed out")]
    Timeout,
    #[error("Upstream switched protocols unasked")]
    UnexpectedUpgrade,
    #[error("Upstream did not accept the WebSocket")]
    WebSocketRefused,
}
