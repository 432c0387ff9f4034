//! A minimal HTTP/1.1 client for the daemon's admin socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use nook_api::ApiError;

pub struct Client {
    socket: PathBuf,
}

/// A reply that is either the success body or the daemon's typed error.
pub enum Reply {
    Ok(Response<Incoming>),
    Err(ApiError),
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the nook daemon at {}: is `nook serve` running?",
                    self.socket.display()
                )
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("http://nook{path}"))
            .header("host", "nook")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender
            .send_request(req)
            .await
            .context("talk to the nook daemon")?;
        if resp.status().is_success() {
            return Ok(Reply::Ok(resp));
        }
        let bytes = resp.into_body().collect().await?.to_bytes();
        let err: ApiError = serde_json::from_slice(&bytes)
            .map_err(|_| anyhow!("the daemon answered: {}", String::from_utf8_lossy(&bytes)))?;
        Ok(Reply::Err(err))
    }
}

/// Reads a whole body.
pub async fn body_bytes(resp: Response<Incoming>) -> anyhow::Result<Bytes> {
    Ok(resp.into_body().collect().await?.to_bytes())
}

/// Calls `each` with every NDJSON line of a streamed body.
pub async fn each_line<T: serde::de::DeserializeOwned>(
    resp: Response<Incoming>,
    mut each: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("read from the nook daemon")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            each(serde_json::from_slice(&line).context("parse the daemon's reply")?)?;
        }
    }
    Ok(())
}
