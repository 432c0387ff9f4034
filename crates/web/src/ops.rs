//! Long commands streamed as server-sent events that a client can pick up again.
//!
//! Each streamed command is an operation with an id. Its events are kept (bounded) while it
//! runs and for [`KEEP_AFTER`] after it ends, so a client whose connection dropped (a phone
//! changing networks; Chromium drops every request when the machine's network changes, as it
//! does when nook adds a VM's tap on the same host) reconnects to
//! `GET /api/ops/ID` with `Last-Event-ID` and gets the rest, ending with `exit`. The command
//! itself never depends on the client: it runs to its end either way.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, header};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::{WebBody, lock};

/// How long a finished operation's events stay for a client to collect.
const KEEP_AFTER: Duration = Duration::from_secs(300);
/// Events one operation keeps; past it, output events are dropped (the `exit` always stays).
const MAX_EVENTS: usize = 2000;
/// Bytes of event data one operation keeps (lobby commands print kilobytes).
const MAX_BYTES: usize = 1 << 20;
/// Operations one account may have running at once.
const MAX_PER_ACCOUNT: usize = 64;

struct Op {
    account_id: String,
    state: Mutex<OpState>,
    changed: Notify,
}

#[derive(Default)]
struct OpState {
    /// (event name, data); the event id is the index + 1.
    events: Vec<(String, String)>,
    bytes: usize,
    dropped: bool,
    done: bool,
}

/// The operations of this web app, by id.
#[derive(Default, Clone)]
pub struct Ops {
    by_id: Arc<Mutex<HashMap<String, Arc<Op>>>>,
}

/// The writing end of one operation.
pub struct OpWriter {
    op: Arc<Op>,
    ops: Ops,
    id: String,
}

impl Ops {
    /// Starts an operation for `account_id`; `None` when it has too many running.
    pub fn start(&self, account_id: &str) -> Option<(String, OpWriter)> {
        let mut by_id = lock(&self.by_id);
        let running = by_id
            .values()
            .filter(|o| o.account_id == account_id && !lock(&o.state).done)
            .count();
        if running >= MAX_PER_ACCOUNT {
            return None;
        }
        let id = hex::encode(rand::random::<[u8; 12]>());
        let op = Arc::new(Op {
            account_id: account_id.to_string(),
            state: Mutex::new(OpState::default()),
            changed: Notify::new(),
        });
        by_id.insert(id.clone(), op.clone());
        Some((
            id.clone(),
            OpWriter {
                op,
                ops: self.clone(),
                id,
            },
        ))
    }

    /// The SSE stream of operation `id` after event `after`, for its own account only.
    pub fn stream(&self, id: &str, account_id: &str, after: usize) -> Option<Response<WebBody>> {
        let op = lock(&self.by_id).get(id).cloned()?;
        (op.account_id == account_id).then(|| sse_response(id.to_string(), op, after))
    }
}

impl OpWriter {
    pub fn push(&self, event: &str, data: &Value) {
        let data = data.to_string();
        {
            let mut st = lock(&self.op.state);
            let last = event == "exit";
            if !last && (st.events.len() >= MAX_EVENTS || st.bytes + data.len() > MAX_BYTES) {
                if !st.dropped {
                    st.dropped = true;
                    st.events.push((
                        "stderr".into(),
                        json!({ "text": "(output cut: too much for one operation)\n" }).to_string(),
                    ));
                }
                return;
            }
            st.bytes += data.len();
            st.events.push((event.to_string(), data));
            if last {
                st.done = true;
            }
        }
        self.op.changed.notify_waiters();
    }
}

impl Drop for OpWriter {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.op.state);
            st.done = true;
        }
        self.op.changed.notify_waiters();
        let (ops, id) = (self.ops.clone(), self.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_AFTER).await;
            lock(&ops.by_id).remove(&id);
        });
    }
}

fn sse_response(id: String, op: Arc<Op>, after: usize) -> Response<WebBody> {
    let first = Frame::data(Bytes::from(format!(
        "event: op\ndata: {}\n\n",
        json!({ "id": id })
    )));
    let stream =
        futures::stream::unfold((Some(first), op, after), |(first, op, next)| async move {
            if let Some(f) = first {
                return Some((Ok::<_, Infallible>(f), (None, op, next)));
            }
            loop {
                let notified = op.changed.notified();
                {
                    let st = lock(&op.state);
                    if let Some((event, data)) = st.events.get(next) {
                        let frame = Frame::data(Bytes::from(format!(
                            "id: {}\nevent: {event}\ndata: {data}\n\n",
                            next + 1
                        )));
                        return Some((Ok(frame), (None, op.clone(), next + 1)));
                    }
                    if st.done {
                        return None;
                    }
                }
                notified.await;
            }
        });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_text(resp: Response<WebBody>) -> String {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn a_client_picks_up_where_it_left_off_and_only_its_own() {
        let ops = Ops::default();
        let (id, w) = ops.start("alice").expect("room");
        w.push("step", &json!({ "step": "booting" }));
        w.push("stdout", &json!({ "text": "hi" }));
        let reader = ops.stream(&id, "alice", 1).expect("alice's");
        assert!(ops.stream(&id, "bob", 0).is_none());
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            w.push("exit", &json!({ "exit": 0 }));
            drop(w);
        });
        let text = body_text(reader).await;
        writer.await.expect("writer");
        assert!(text.starts_with("event: op\n"), "{text}");
        assert!(!text.contains("booting"), "{text}");
        assert!(text.contains("id: 2\nevent: stdout"), "{text}");
        assert!(text.contains("id: 3\nevent: exit"), "{text}");
    }
}
