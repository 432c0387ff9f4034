//! The gateway's own answers, shaped like the provider's errors so SDKs show their message.

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use crate::body::GatewayBody;
use crate::config::ApiKind;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Shape {
    Anthropic,
    OpenAi,
    /// Before a provider is known: OpenAI's shape, which most clients read.
    Generic,
}

impl Shape {
    pub(crate) fn of(kind: ApiKind) -> Shape {
        match kind {
            ApiKind::Anthropic => Shape::Anthropic,
            ApiKind::OpenAi => Shape::OpenAi,
        }
    }
}

pub(crate) fn json(status: StatusCode, v: &Value) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::from(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn error(
    shape: Shape,
    status: StatusCode,
    kind: &str,
    message: &str,
) -> Response<GatewayBody> {
    let body = match shape {
        Shape::Anthropic => json!({
            "type": "error",
            "error": { "type": kind, "message": message },
        }),
        Shape::OpenAi | Shape::Generic => json!({
            "error": { "message": message, "type": kind, "param": null, "code": kind },
        }),
    };
    json(status, &body)
}
