//! The response body: a reply the gateway made, or the provider's body passed on frame by
//! frame while its usage is counted, and settled exactly once however it ends.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::backend::{GatewayBackend, UsageRecord};
use crate::config::{ApiKind, Price};
use crate::limit::Limiter;
use crate::meter::{StreamMeter, Usage, usage_of_body};
use crate::metrics::Metrics;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The largest non-streamed response kept (beside passing it on) to read its usage from.
const MAX_JSON_COPY: usize = 16 << 20;

pub enum GatewayBody {
    Full(Full<Bytes>),
    Metered(Box<Metered>),
    /// An integration's answer, passed on as it comes.
    Passthrough(Incoming),
}

impl From<Bytes> for GatewayBody {
    fn from(b: Bytes) -> Self {
        GatewayBody::Full(Full::new(b))
    }
}

/// How the usage is found in the body.
pub(crate) enum Watch {
    Stream(StreamMeter),
    /// A whole JSON body: a bounded copy, parsed at its end.
    Json {
        kind: ApiKind,
        copy: BytesMut,
    },
}

/// What settles the request once the body ends.
pub(crate) struct Settlement {
    pub backend: Arc<dyn GatewayBackend>,
    pub limiter: Arc<Limiter>,
    pub metrics: Arc<Metrics>,
    pub record: UsageRecord,
    pub price: Price,
    pub started: std::time::Instant,
}

impl Settlement {
    pub(crate) fn settle(mut self, usage: Option<Usage>, broken: bool) {
        let usage = usage.unwrap_or_default();
        self.record.usage = usage;
        self.record.cost_micros = usage.cost_micros(&self.price);
        self.limiter
            .add_tokens(&self.record.caller.account_id, usage.total());
        self.metrics
            .finished(&self.record, broken, self.started.elapsed());
        let (backend, record) = (self.backend, self.record);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(account = %record.caller.account_id, "no runtime to settle a gateway request on");
            return;
        };
        runtime.spawn(async move {
            if let Err(err) = backend.settle(record).await {
                tracing::error!(error = %err, "could not settle a gateway request");
            }
        });
    }
}

pub struct Metered {
    upstream: Incoming,
    watch: Watch,
    settlement: Option<Settlement>,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Bytes the meter still holds back at the end of the stream.
    tail: Option<Bytes>,
}

impl Metered {
    pub(crate) fn new(
        upstream: Incoming,
        watch: Watch,
        settlement: Option<Settlement>,
        idle: Duration,
    ) -> Self {
        Self {
            upstream,
            watch,
            settlement,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            tail: None,
        }
    }

    /// Settles a reservation whose request never got a response body: nothing is billed.
    pub(crate) fn abandon(mut settlement: Settlement, status: u16) {
        settlement.record.status = status;
        settlement.settle(None, true);
    }

    fn usage(&self) -> Option<Usage> {
        match &self.watch {
            Watch::Stream(meter) => meter.usage(),
            Watch::Json { kind, copy } => usage_of_body(*kind, copy),
        }
    }

    fn settle(&mut self, broken: bool) {
        if let Some(s) = self.settlement.take() {
            let usage = self.usage();
            s.settle(usage, broken);
        }
    }
}

impl Drop for Metered {
    /// The client went away (or the body was never read): bill what the provider reported.
    fn drop(&mut self) {
        self.settle(true);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let m = match self.get_mut() {
            GatewayBody::Full(b) => {
                return Pin::new(b).poll_frame(cx).map_err(|never| match never {});
            }
            GatewayBody::Metered(m) => m,
            GatewayBody::Passthrough(b) => {
                return Pin::new(b)
                    .poll_frame(cx)
                    .map_err(|e| Box::new(e) as BodyError);
            }
        };
        if let Some(tail) = m.tail.take() {
            return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
        }
        loop {
            match Pin::new(&mut m.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + m.idle;
                    m.timer.as_mut().reset(deadline);
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let out = match &mut m.watch {
                        Watch::Stream(meter) => meter.feed(data),
                        Watch::Json { copy, .. } => {
                            if copy.len() + data.len() <= MAX_JSON_COPY {
                                copy.extend_from_slice(&data);
                            }
                            data
                        }
                    };
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(err))) => {
                    m.settle(true);
                    return Poll::Ready(Some(Err(Box::new(err))));
                }
                Poll::Ready(None) => {
                    let rest = match &mut m.watch {
                        Watch::Stream(meter) => meter.finish(),
                        Watch::Json { .. } => Bytes::new(),
                    };
                    m.settle(false);
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    m.tail = Some(Bytes::new());
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Pending => {
                    if m.timer.as_mut().poll(cx).is_ready() {
                        m.settle(true);
                        return Poll::Ready(Some(Err("the provider stopped sending".into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(b) => b.is_end_stream(),
            GatewayBody::Metered(_) => false,
            GatewayBody::Passthrough(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(b) => b.size_hint(),
            GatewayBody::Passthrough(b) => b.size_hint(),
            GatewayBody::Metered(m) => match m.watch {
                // Dropping a chunk changes the length.
                Watch::Stream(_) => SizeHint::default(),
                Watch::Json { .. } => m.upstream.size_hint(),
            },
        }
    }
}
