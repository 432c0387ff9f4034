//! The web terminal: xterm.js in the page, a WebSocket to the dashboard, a pty in the VM.
//!
//! Wire format on the socket: the browser sends text frames of JSON, `{"d": "keys"}` for
//! input and `{"r": [cols, rows]}` for a resize; nook sends binary frames of output and text
//! frames of JSON for control: `{"session": ID}` first, `{"exit": CODE}` last.
//!
//! A dropped connection does not end the shell: the session waits [`GRACE`] for the page to
//! come back with `?session=ID` (same account, same VM), replays the last [`REPLAY`] bytes of
//! output so the screen is whole again, and carries on. After the grace period the shell gets
//! SIGHUP, as with a dropped SSH connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::{Principal, PtyInput, PtyOutput, Web, WebBackend, WebBody, full, lock, text};

/// How long a shell outlives its dropped connection, waiting for the page to reconnect.
pub const GRACE: Duration = Duration::from_secs(60);
/// Output kept for a reconnecting page to redraw from.
const REPLAY: usize = 64 * 1024;
/// The largest frame a browser may send; the page splits bigger pastes.
const MAX_FRAME: usize = 1 << 20;
/// Input goes to the guest in pieces of at most this, so a big paste is flow-controlled.
const INPUT_CHUNK: usize = 16 * 1024;
/// Sessions one account may hold open at once (attached or waiting to be).
const MAX_SESSIONS_PER_ACCOUNT: usize = 32;

enum Out {
    Data(Bytes),
    Exit(Option<i32>),
}

struct Attached {
    generation: u64,
    tx: mpsc::Sender<Out>,
}

struct Session {
    account_id: String,
    vm: String,
    input: mpsc::Sender<PtyInput>,
    state: Mutex<State>,
    /// The task copying the pty's output; aborted if the shell outlives its hangup.
    pump: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct State {
    replay: VecDeque<u8>,
    attached: Option<Attached>,
    generation: u64,
    exited: bool,
    /// Hung up after its grace period: it can no longer be resumed.
    ended: bool,
}

/// How long a shell may take to end after its hangup before nook stops copying its output
/// and forgets it (a guest can ignore SIGHUP; its output then goes nowhere).
const HANGUP_DEADLINE: Duration = Duration::from_secs(10);

/// The live terminal sessions, by id.
#[derive(Default, Clone)]
pub struct Sessions {
    by_id: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

impl Sessions {
    fn get(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.by_id).get(id).cloned()
    }

    fn count_for(&self, account_id: &str) -> usize {
        lock(&self.by_id)
            .values()
            .filter(|s| s.account_id == account_id)
            .count()
    }

    /// Registers a new pty and starts copying its output.
    fn start(&self, who: &Principal, vm: &str, pty: crate::Pty) -> (String, Arc<Session>) {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let session = Arc::new(Session {
            account_id: who.account_id.clone(),
            vm: vm.to_string(),
            input: pty.input,
            state: Mutex::new(State::default()),
            pump: Mutex::new(None),
        });
        lock(&self.by_id).insert(id.clone(), session.clone());
        let pump = tokio::spawn(pump_output(
            self.clone(),
            id.clone(),
            session.clone(),
            pty.output,
        ));
        *lock(&session.pump) = Some(pump.abort_handle());
        (id, session)
    }

    fn remove(&self, id: &str) {
        lock(&self.by_id).remove(id);
    }
}

/// Copies the pty's output into the replay buffer and to the attached page, if any. While a
/// page is attached, a slow one slows the shell (the send waits); while none is, output only
/// fills the replay buffer.
async fn pump_output(
    sessions: Sessions,
    id: String,
    session: Arc<Session>,
    mut output: mpsc::Receiver<PtyOutput>,
) {
    let mut code = None;
    while let Some(out) = output.recv().await {
        match out {
            PtyOutput::Data(data) => {
                let tx = {
                    let mut st = lock(&session.state);
                    st.replay.extend(data.iter());
                    let over = st.replay.len().saturating_sub(REPLAY);
                    st.replay.drain(..over);
                    st.attached.as_ref().map(|a| a.tx.clone())
                };
                if let Some(tx) = tx {
                    let _ = tx.send(Out::Data(data)).await;
                }
            }
            PtyOutput::Exit(c) => {
                code = c;
                break;
            }
        }
    }
    let tx = {
        let mut st = lock(&session.state);
        st.exited = true;
        st.attached.take().map(|a| a.tx)
    };
    if let Some(tx) = tx {
        let _ = tx.send(Out::Exit(code)).await;
    }
    sessions.remove(&id);
}

pub(crate) fn is_websocket<T>(req: &Request<T>) -> bool {
    if req.method() == Method::CONNECT {
        return req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    }
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Opens (or reattaches to) a terminal session and upgrades the request to a WebSocket.
pub(crate) async fn upgrade<B: WebBackend>(
    web: &Web<B>,
    mut req: Request<Incoming>,
    who: Principal,
    vm: &str,
) -> Response<WebBody> {
    let q = query(&req);
    let size = |k: &str, d: u16| {
        q.get(k)
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|v| (1..=1000).contains(v))
            .unwrap_or(d)
    };
    let (cols, rows) = (size("cols", 80), size("rows", 24));
    let h2 = req.method() == Method::CONNECT;
    // The handshake is checked before a shell starts, so a broken one leaves nothing behind.
    let accept = if h2 {
        None
    } else {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
            return text(
                StatusCode::BAD_REQUEST,
                "A WebSocket upgrade needs Sec-WebSocket-Key",
            );
        };
        Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
    };
    let sessions = &web.terminals;
    // A page coming back: the session must be this account's, on this VM, alive, and the
    // account must still be allowed in (a collaborator whose share was removed is not). Any
    // other id is treated as no id at all (a new shell), so ids reveal nothing.
    let resumed = q
        .get("session")
        .and_then(|id| sessions.get(id).map(|s| (id.clone(), s)))
        .filter(|(_, s)| {
            let st = lock(&s.state);
            s.account_id == who.account_id && s.vm == vm && !st.exited && !st.ended
        });
    let resumed = match resumed {
        Some(r) if web.backend().may_enter(&who, vm).await => Some(r),
        _ => None,
    };
    let (id, session, fresh) = match resumed {
        Some((id, s)) => {
            let _ = s.input.try_send(PtyInput::Resize { cols, rows });
            (id, s, false)
        }
        None => {
            if sessions.count_for(&who.account_id) >= MAX_SESSIONS_PER_ACCOUNT {
                return text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many open terminals: close some tabs, or wait a minute for dropped ones to end",
                );
            }
            match web.backend().terminal(&who, vm, cols, rows).await {
                Ok(pty) => {
                    let (id, s) = sessions.start(&who, vm, pty);
                    (id, s, true)
                }
                Err(message) => return text(StatusCode::NOT_FOUND, &message),
            }
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let sessions = sessions.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            // The connection never became a WebSocket: the shell gets its grace period.
            let generation = lock(&session.state).generation;
            detach(sessions, id, session, generation);
            return;
        };
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME);
        config.max_frame_size = Some(MAX_FRAME);
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve(sessions, id, session, ws, fresh).await;
    });
    let mut resp = full(
        if h2 {
            StatusCode::OK
        } else {
            StatusCode::SWITCHING_PROTOCOLS
        },
        "application/octet-stream",
        Bytes::new(),
    );
    resp.headers_mut().remove(header::CONTENT_TYPE);
    if let Some(accept) = accept {
        let h = resp.headers_mut();
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
    }
    resp
}

#[derive(serde::Deserialize)]
struct FromPage {
    d: Option<String>,
    r: Option<(u16, u16)>,
}

/// Runs one attachment of a page to a session until either side ends it.
async fn serve<S>(
    sessions: Sessions,
    id: String,
    session: Arc<Session>,
    ws: WebSocketStream<S>,
    fresh: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Out>(16);
    // Attach: a page already attached (another tab, or a connection not yet seen to drop)
    // is replaced, and gets nothing more.
    let (generation, replay) = {
        let mut st = lock(&session.state);
        st.generation += 1;
        st.attached = Some(Attached {
            generation: st.generation,
            tx,
        });
        (st.generation, Vec::from(st.replay.clone()))
    };
    let hello = serde_json::json!({ "session": id, "resumed": !fresh }).to_string();
    // The replay goes to a new page too: it holds what the shell printed (its prompt) before
    // the page was attached.
    if sink.send(Message::Text(hello.into())).await.is_err()
        || (!replay.is_empty() && sink.send(Message::Binary(replay.into())).await.is_err())
    {
        detach(sessions, id, session, generation);
        return;
    }
    // Input runs in a task of its own: a shell that stops reading its input (or a big paste)
    // then holds up only the input, while output and the page's going away are still seen.
    let mut input = tokio::spawn(feed_input(stream, session.input.clone()));
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Data(data)) => {
                    if sink.send(Message::Binary(data)).await.is_err() {
                        break;
                    }
                }
                Some(Out::Exit(code)) => {
                    let bye = serde_json::json!({ "exit": code }).to_string();
                    let _ = sink.send(Message::Text(bye.into())).await;
                    let _ = sink.close().await;
                    input.abort();
                    return;
                }
                // Another page took the session over.
                None => {
                    let _ = sink.close().await;
                    input.abort();
                    return;
                }
            },
            _ = &mut input => break,
        }
    }
    input.abort();
    detach(sessions, id, session, generation);
}

/// The page's frames to the shell, until the page closes the socket.
async fn feed_input<S>(
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
    input: mpsc::Sender<PtyInput>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let send = |b: Bytes| {
        let input = input.clone();
        async move {
            for chunk in b.chunks(INPUT_CHUNK) {
                if input
                    .send(PtyInput::Data(b.slice_ref(chunk)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            true
        }
    };
    while let Some(msg) = stream.next().await {
        let ok = match msg {
            Ok(Message::Text(t)) => {
                let Ok(m) = serde_json::from_str::<FromPage>(t.as_str()) else {
                    continue;
                };
                if let Some((cols, rows)) = m.r {
                    let _ = input.try_send(PtyInput::Resize {
                        cols: cols.clamp(1, 1000),
                        rows: rows.clamp(1, 1000),
                    });
                }
                match m.d {
                    Some(d) => send(Bytes::from(d.into_bytes())).await,
                    None => true,
                }
            }
            Ok(Message::Binary(b)) => send(b).await,
            Ok(Message::Close(_)) | Err(_) => false,
            Ok(_) => true,
        };
        if !ok {
            return;
        }
    }
}

/// The page went away: keep the shell for [`GRACE`], then hang it up unless a page came back.
fn detach(sessions: Sessions, id: String, session: Arc<Session>, generation: u64) {
    {
        let mut st = lock(&session.state);
        if st
            .attached
            .as_ref()
            .is_some_and(|a| a.generation == generation)
        {
            st.attached = None;
        }
    }
    tokio::spawn(async move {
        tokio::time::sleep(GRACE).await;
        let abandoned = {
            let st = lock(&session.state);
            st.generation == generation && st.attached.is_none() && !st.exited
        };
        if !abandoned {
            return;
        }
        lock(&session.state).ended = true;
        // Never waits on the guest: a shell that stopped reading its input still hears this
        // once the queue moves, and is forgotten at the deadline below either way.
        let _ = session.input.try_send(PtyInput::Hangup);
        tokio::time::sleep(HANGUP_DEADLINE).await;
        if let Some(pump) = lock(&session.pump).take() {
            pump.abort();
        }
        sessions.remove(&id);
    });
}
