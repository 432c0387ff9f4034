//! nook's LLM gateway: VMs call `http://169.254.169.254/gateway/llm/PROVIDER/...` with no key,
//! and the gateway passes the provider's own API through, byte for byte, adding the key on
//! the way out and counting every token the provider reports against the account's credit.
//!
//! - It knows the calling VM only as the daemon proves it (by its pinned address): a
//!   [`Caller`] is an argument, never read from the request.
//! - A request reserves its most possible cost before it goes upstream ([`GatewayBackend`])
//!   and settles the true cost, once, however its response ends.
//! - Streams pass through chunk by chunk ([`body::GatewayBody`]), with hyper's backpressure:
//!   a client that stops reading stops the upstream read, so memory stays bounded.
//! - Every response carries the time the gateway added in `x-nook-overhead-duration-ms`.
//!
//! A leaf crate: it knows nothing of the daemon or the store.

pub mod backend;
pub mod body;
pub mod config;
pub mod integrations;
pub mod limit;
pub mod meter;
pub mod metrics;
mod reply;
pub mod resolve;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub use backend::{BackendError, Caller, GatewayBackend, Reservation, UsageRecord};
pub use body::GatewayBody;
pub use config::{ApiKind, BaseUrl, GatewayConfig, Price, Provider, RateLimits};
pub use integrations::{PEER_HEADER, Route};
pub use meter::Usage;
pub use metrics::Metrics;

use body::{Metered, Settlement, Watch};
use limit::Limiter;
use meter::StreamMeter;
use reply::Shape;

/// Where the gateway's routes start, on the metadata address.
pub const PREFIX: &str = "/gateway/llm/";
/// The response header naming the time the gateway added, in milliseconds.
pub const OVERHEAD_HEADER: &str = "x-nook-overhead-duration-ms";

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("LLM provider {name}: {why}")]
    Provider { name: String, why: String },
    #[error("cannot load the system's CA certificates for HTTPS to providers")]
    Roots(#[source] std::io::Error),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;
type StreamBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
/// For integrations, whose request bodies (a git push) are streamed, not read first.
type StreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, StreamBody>;
/// For targets a VM's owner names: only addresses the policy allows are ever connected to.
type GuardedClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<resolve::PublicOnly>>, StreamBody>;

pub struct Gateway {
    cfg: GatewayConfig,
    bases: HashMap<String, BaseUrl>,
    client: HttpsClient,
    stream_client: StreamClient,
    guarded_client: GuardedClient,
    backend: Arc<dyn GatewayBackend>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
}

/// What the gateway read from a request body.
struct Ask {
    model: String,
    stream: bool,
    max_output: u64,
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        backend: Arc<dyn GatewayBackend>,
    ) -> Result<Gateway, GatewayError> {
        let mut bases = HashMap::new();
        for p in &cfg.providers {
            let base = BaseUrl::parse(&p.base_url).map_err(|why| GatewayError::Provider {
                name: p.name.clone(),
                why,
            })?;
            bases.insert(p.name.clone(), base);
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(GatewayError::Roots)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(https.clone());
        let stream_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(https);
        let mut guarded = HttpConnector::new_with_resolver(resolve::PublicOnly {
            allowed: cfg.target_policy.clone(),
        });
        guarded.enforce_http(false);
        let guarded = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(GatewayError::Roots)?
            .https_or_http()
            .enable_http1()
            .wrap_connector(guarded);
        let guarded_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(guarded);
        Ok(Gateway {
            limiter: Arc::new(Limiter::new(cfg.limits)),
            cfg,
            bases,
            client,
            stream_client,
            guarded_client,
            backend,
            metrics: Arc::default(),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The models `GET /gateway/llm/models` lists, as JSON.
    pub fn models(&self) -> Value {
        let data: Vec<Value> = self
            .cfg
            .providers
            .iter()
            .flat_map(|p| {
                p.models.iter().map(|(id, price)| {
                    serde_json::json!({
                        "id": id,
                        "object": "model",
                        "provider": p.name,
                        "base_url": format!("http://169.254.169.254{PREFIX}{}", p.name),
                        "price_per_million_tokens": {
                            "input": price.input, "output": price.output,
                            "cache_read": price.cache_read, "cache_write": price.cache_write,
                        },
                    })
                })
            })
            .collect();
        serde_json::json!({ "object": "list", "data": data })
    }

    /// Answers one request to `/gateway/llm/...` from `caller`.
    pub async fn handle<B>(&self, caller: Caller, req: Request<B>) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let mut resp = self.route(caller, req, started).await;
        let added = resp
            .extensions_mut()
            .remove::<Added>()
            .map_or_else(|| started.elapsed(), |a| a.0);
        let micros = added.as_micros() as u64;
        self.metrics.overhead(micros);
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", micros as f64 / 1000.0)) {
            resp.headers_mut()
                .insert(HeaderName::from_static(OVERHEAD_HEADER), v);
        }
        resp
    }

    async fn route<B>(
        &self,
        caller: Caller,
        req: Request<B>,
        started: Instant,
    ) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return self.refuse(
                Shape::Generic,
                StatusCode::NOT_FOUND,
                "not_found",
                "No such gateway route: use /gateway/llm/PROVIDER/...".into(),
            );
        };
        if rest == "models" {
            return reply::json(StatusCode::OK, &self.models());
        }
        let (name, api_path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let Some(provider) = self.cfg.provider(name) else {
            let known: Vec<&str> = self.cfg.providers.iter().map(|p| p.name.as_str()).collect();
            return self.refuse(
                Shape::Generic,
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!(
                    "No LLM provider {name:?} on this host; it offers: {}",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        };
        let shape = Shape::of(provider.kind);
        let own_key = match self.backend.own_key(&caller, name).await {
            Ok(k) => k,
            Err(err) => {
                tracing::error!(error = %err, "gateway could not look up an own key");
                return self.refuse(
                    shape,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "The gateway cannot reach its accounts right now; try again".into(),
                );
            }
        };
        // With the account's own key the provider bills the account: nook counts, not charges.
        let own = own_key.is_some();
        let Some(key) = own_key.or_else(|| provider.key.clone()) else {
            return self.refuse(
                shape,
                StatusCode::SERVICE_UNAVAILABLE,
                "provider_not_configured",
                format!(
                    "The host has no key for {name}: its admin sets one (NOOK_LLM_{}_KEY), or attach your own (integrations add llm)",
                    name.to_ascii_uppercase()
                ),
            );
        };
        if req.method() != Method::GET && req.method() != Method::POST {
            return self.refuse(
                shape,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "The gateway passes on GET and POST only".into(),
            );
        }
        if let Some(refused) = self.over_limit(shape, &caller) {
            return refused;
        }
        let (parts, body) = req.into_parts();
        let body = match read_bounded(body, self.cfg.max_body).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return self.refuse(
                    shape,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!(
                        "The request body is over the gateway's limit of {} MiB",
                        self.cfg.max_body >> 20
                    ),
                );
            }
            Err(err) => {
                return self.refuse(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("Could not read the request body: {err}"),
                );
            }
        };
        let api_path = if api_path.is_empty() { "/" } else { api_path };
        let billable = parts.method == Method::POST && !api_path.ends_with("/count_tokens");
        let mut body = body;
        let mut ask = None;
        let mut drop_usage_chunk = false;
        if parts.method == Method::POST {
            let mut json: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(err) => {
                    return self.refuse(
                        shape,
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        format!("The request body is not valid JSON: {err}"),
                    );
                }
            };
            let Some(model) = json
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return self.refuse(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "The request names no model".into(),
                );
            };
            if provider.price(&model).is_none() {
                return self.refuse(
                    shape,
                    StatusCode::NOT_FOUND,
                    "model_not_allowed",
                    format!("Model {model:?} is not offered by this host's {name} gateway: GET http://169.254.169.254/gateway/llm/models lists the models this VM may use"),
                );
            }
            let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
            let max_output = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                .iter()
                .find_map(|k| json.get(*k).and_then(Value::as_u64))
                .unwrap_or(self.cfg.default_max_output);
            // An OpenAI chat stream reports usage only when asked; ask, and hide the answer
            // from a client that did not.
            if provider.kind == ApiKind::OpenAi && stream && api_path.ends_with("/chat/completions")
            {
                let asked = json
                    .pointer("/stream_options/include_usage")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !asked && let Some(obj) = json.as_object_mut() {
                    let opts = obj
                        .entry("stream_options")
                        .or_insert_with(|| Value::Object(Default::default()));
                    if let Some(opts) = opts.as_object_mut() {
                        opts.insert("include_usage".into(), Value::Bool(true));
                        drop_usage_chunk = true;
                        body = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
                    }
                }
            }
            ask = Some(Ask {
                model,
                stream,
                max_output,
            });
        }

        let price = ask
            .as_ref()
            .and_then(|a| provider.price(&a.model))
            .filter(|_| !own)
            .unwrap_or_default();
        let mut settlement = None;
        if billable && let Some(ask) = &ask {
            // The most this request can cost: every byte of the body an input token at the
            // dearer of the input and cache-write prices, plus every output token allowed.
            let input_bound = body.len() as f64 * price.input.max(price.cache_write);
            let reserve = (input_bound + ask.max_output as f64 * price.output).ceil() as u64;
            let reserved = if own {
                Ok(Reservation::Taken)
            } else {
                self.backend.reserve(&caller, reserve).await
            };
            match reserved {
                Ok(Reservation::Taken) => {}
                Ok(Reservation::Exhausted { balance_micros }) => {
                    return self.refuse(
                        shape,
                        StatusCode::PAYMENT_REQUIRED,
                        "insufficient_credit",
                        format!(
                            "This account has {} of LLM credit left, so the gateway stopped; ask this host's admin to add some (nook account credit EMAIL --add 10)",
                            dollars(balance_micros)
                        ),
                    );
                }
                Err(err) => {
                    tracing::error!(error = %err, "gateway could not reserve credit");
                    return self.refuse(
                        shape,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "api_error",
                        "The gateway cannot reach its accounts right now; try again".into(),
                    );
                }
            }
            self.metrics.started();
            settlement = Some(Settlement {
                backend: self.backend.clone(),
                limiter: self.limiter.clone(),
                metrics: self.metrics.clone(),
                record: UsageRecord {
                    caller: caller.clone(),
                    provider: provider.name.clone(),
                    model: ask.model.clone(),
                    usage: Usage::default(),
                    cost_micros: 0,
                    reserved_micros: reserve,
                    status: 0,
                },
                price,
                started,
            });
        }

        let Some(base) = self.bases.get(name) else {
            return self.refuse(
                shape,
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("No LLM provider {name:?}"),
            );
        };
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let uri = format!(
            "{}://{}{}{api_path}{query}",
            if base.https { "https" } else { "http" },
            base.authority,
            base.prefix
        );
        let mut upstream = Request::builder().method(parts.method.clone()).uri(&uri);
        if let Some(h) = upstream.headers_mut() {
            copy_request_headers(&parts.headers, h);
            match provider.kind {
                ApiKind::Anthropic => {
                    if let Ok(v) = HeaderValue::from_str(&key) {
                        h.insert("x-api-key", v);
                    }
                    h.entry("anthropic-version")
                        .or_insert(HeaderValue::from_static("2023-06-01"));
                }
                ApiKind::OpenAi => {
                    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                        h.insert(header::AUTHORIZATION, v);
                    }
                }
            }
        }
        let upstream = match upstream.body(Full::new(body)) {
            Ok(r) => r,
            Err(err) => {
                if let Some(s) = settlement {
                    Metered::abandon(s, 400);
                }
                return self.refuse(
                    shape,
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("Cannot pass this request on: {err}"),
                );
            }
        };
        let before_upstream = started.elapsed();
        let answer =
            tokio::time::timeout(self.cfg.upstream_timeout, self.client.request(upstream)).await;
        let head_at = Instant::now();
        let resp = match answer {
            Ok(Ok(resp)) => resp,
            Ok(Err(err)) => {
                tracing::warn!(provider = %name, error = %err, "LLM provider unreachable");
                if let Some(s) = settlement {
                    Metered::abandon(s, 502);
                }
                return self.refuse(
                    shape,
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    format!("The provider {name} cannot be reached; try again later"),
                );
            }
            Err(_) => {
                if let Some(s) = settlement {
                    Metered::abandon(s, 504);
                }
                return self.refuse(
                    shape,
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    format!(
                        "The provider {name} did not answer within {} s",
                        self.cfg.upstream_timeout.as_secs()
                    ),
                );
            }
        };
        let (mut head, incoming) = resp.into_parts();
        let streamed = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if let Some(s) = settlement.as_mut() {
            s.record.status = head.status.as_u16();
        }
        let watch = if streamed || ask.as_ref().is_some_and(|a| a.stream) {
            Watch::Stream(StreamMeter::new(
                provider.kind,
                drop_usage_chunk && streamed,
            ))
        } else {
            Watch::Json {
                kind: provider.kind,
                copy: Default::default(),
            }
        };
        strip_response_headers(&mut head.headers, drop_usage_chunk);
        let body = Metered::new(incoming, watch, settlement, self.cfg.upstream_timeout);
        let mut resp = Response::from_parts(head, GatewayBody::Metered(Box::new(body)));
        resp.extensions_mut()
            .insert(Added(before_upstream + head_at.elapsed()));
        resp
    }

    /// Counts a request against the caller's rate limits; the 429 (with `Retry-After`) to
    /// answer when one is reached.
    fn over_limit(&self, shape: Shape, caller: &Caller) -> Option<Response<GatewayBody>> {
        let Err(limited) = self.limiter.admit(&caller.account_id, &caller.vm_id) else {
            return None;
        };
        let secs = limited.retry_after.as_secs().max(1);
        let mut resp = self.refuse(
            shape,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("Too many {}: try again in {secs} s", limited.what),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        Some(resp)
    }

    fn refuse(
        &self,
        shape: Shape,
        status: StatusCode,
        kind: &str,
        message: String,
    ) -> Response<GatewayBody> {
        self.metrics.refused();
        reply::error(shape, status, kind, &message)
    }
}

/// Reads a request body of at most `max` bytes; `None` when it is longer. The rest of a long
/// body is read and dropped (up to three times `max`), so the client is reading when the
/// refusal comes instead of having its connection reset under it.
async fn read_bounded<B>(
    body: B,
    max: usize,
) -> Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>>
where
    B: Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Into::into)?.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= max {
            kept.extend_from_slice(&data);
        } else if seen > max.saturating_mul(4) {
            break;
        }
    }
    Ok((seen <= max).then(|| kept.freeze()))
}

/// The time the gateway itself spent on a request that went upstream.
#[derive(Clone, Copy)]
struct Added(std::time::Duration);

/// `$12.345678` (or `-$0.000012`): dollars from micro-dollars, to the micro-dollar.
pub fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}${}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Headers that never pass: hop-by-hop ones, the client's own credentials (the VM has none of
/// value, and a provider key the guest sends must not reach the provider as if nook's),
/// nook's own, and `accept-encoding` (the gateway reads the body, so it asks for it plain).
fn copy_request_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        let dropped = matches!(
            n,
            "host"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "content-length"
                | "authorization"
                | "x-api-key"
                | "api-key"
                | "cookie"
                | "forwarded"
                | "accept-encoding"
        ) || n.starts_with("proxy-")
            || n.starts_with("x-forwarded-")
            || n.starts_with("x-nook");
        if !dropped {
            to.append(name.clone(), value.clone());
        }
    }
}

pub(crate) fn strip_response_headers(h: &mut HeaderMap, length_changes: bool) {
    for name in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "proxy-authenticate",
    ] {
        h.remove(name);
    }
    if length_changes {
        h.remove(header::CONTENT_LENGTH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_shown_to_the_micro_dollar() {
        assert_eq!(dollars(0), "$0.000000");
        assert_eq!(dollars(10_500_000), "$10.500000");
        assert_eq!(dollars(-12), "-$0.000012");
    }

    #[test]
    fn the_clients_credentials_and_hop_headers_never_pass() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-guest"),
            ("x-api-key", "guest"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
            ("x-nook-user", "forged"),
            ("accept-encoding", "gzip"),
            ("proxy-authorization", "x"),
        ] {
            from.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut to = HeaderMap::new();
        copy_request_headers(&from, &mut to);
        let mut names: Vec<&str> = to.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["anthropic-version", "content-type"]);
    }
}
