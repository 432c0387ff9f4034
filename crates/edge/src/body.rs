//! The response body type: either a page the edge made or an upstream body streamed through
//! frame by frame (no buffering, so SSE events arrive as the VM sends them).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

#[derive(Debug)]
pub enum EdgeBody {
    Full(Full<Bytes>),
    Upstream(Incoming),
    App(crate::backend::AppBody),
}

impl From<Bytes> for EdgeBody {
    fn from(b: Bytes) -> Self {
        EdgeBody::Full(Full::new(b))
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            EdgeBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            EdgeBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            EdgeBody::App(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Full(b) => b.is_end_stream(),
            EdgeBody::Upstream(b) => b.is_end_stream(),
            EdgeBody::App(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Full(b) => b.size_hint(),
            EdgeBody::Upstream(b) => b.size_hint(),
            EdgeBody::App(b) => b.size_hint(),
        }
    }
}
