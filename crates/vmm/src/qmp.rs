//! A small QMP client: one connection, commands tagged with ids, events broadcast.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::VmmError;

/// How long a command may take to be answered, and QEMU to greet a new connection. QEMU
/// answers from its main loop within milliseconds; one that does not for this long is stuck.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands waiting to be written.
const OUTBOX_LINES: usize = 16;

#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

type Reply = oneshot::Sender<Result<Value, VmmError>>;

/// A command line to write, with a descriptor to pass along with it (`getfd`, `add-fd`).
struct Outgoing {
    line: String,
    fd: Option<OwnedFd>,
}

/// Commands waiting for their answer, and whether the connection is gone. One lock guards
/// both, so a command is never registered after the reader has failed the waiting ones (its
/// answer would then be waited for forever).
#[derive(Default)]
struct Pending {
    map: HashMap<u64, Reply>,
    closed: bool,
}

impl Pending {
    fn insert(&mut self, id: u64, tx: Reply) -> Result<(), VmmError> {
        if self.closed {
            return Err(VmmError::QmpClosed);
        }
        self.map.insert(id, tx);
        Ok(())
    }

    /// Marks the connection gone and hands back every command still waiting.
    fn close(&mut self) -> Vec<Reply> {
        self.closed = true;
        self.map.drain().map(|(_, tx)| tx).collect()
    }
}

type SharedPending = Arc<std::sync::Mutex<Pending>>;

fn lock(pending: &SharedPending) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct Qmp {
    outbox: mpsc::Sender<Outgoing>,
    pending: SharedPending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    /// The reason of the last SHUTDOWN event, if QEMU said why it is going away.
    shutdown_reason: Arc<std::sync::Mutex<Option<String>>>,
    timeout: Duration,
}

/// What the reader task needs: not the outbox, so that dropping every [`Qmp`] ends the writer.
struct Inbox {
    pending: SharedPending,
    events: broadcast::Sender<QmpEvent>,
    shutdown_reason: Arc<std::sync::Mutex<Option<String>>>,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        Self::connect_within(path, QMP_TIMEOUT).await
    }

    /// Connects, with `timeout` for the greeting and for every command.
    pub async fn connect_within(path: &Path, timeout: Duration) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(VmmError::io(path))?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // The greeting comes first; anything else means this is not a QMP socket.
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| VmmError::QmpTimeout("(greeting)".into(), timeout))?
            .map_err(VmmError::io(path))?
            .ok_or(VmmError::QmpClosed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(VmmError::Qmp(format!("unexpected greeting: {greeting}")));
        }
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = watch::channel(false);
        let (outbox, queued) = mpsc::channel(OUTBOX_LINES);
        let inbox = Inbox {
            pending: SharedPending::default(),
            events,
            shutdown_reason: Arc::default(),
        };
        let qmp = Self {
            outbox,
            pending: inbox.pending.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            events: inbox.events.clone(),
            closed,
            shutdown_reason: inbox.shutdown_reason.clone(),
            timeout,
        };
        tokio::spawn(write_lines(write, queued));
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                inbox.dispatch(&line);
            }
            let waiting = lock(&inbox.pending).close();
            for tx in waiting {
                let _ = tx.send(Err(VmmError::QmpClosed));
            }
            let _ = closed_tx.send(true);
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command; fails with [`VmmError::QmpTimeout`] if QEMU does not answer in time.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        self.execute_passing(command, arguments, None).await
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`), for a later command that takes a
    /// descriptor by name, such as `migrate` to `fd:NAME`. A jailed QEMU can open no path of
    /// its own, so whatever it needs beyond its launch comes this way.
    pub async fn pass_fd(&self, name: &str, fd: OwnedFd) -> Result<(), VmmError> {
        self.execute_passing("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(|_| ())
    }

    async fn execute_passing(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx)?;
        let mut line = msg.to_string();
        line.push('\n');
        let answer = tokio::time::timeout(self.timeout, async {
            // Lines are written whole by one task, so a command that times out here never
            // leaves half a line that would garble the next one.
            self.outbox
                .send(Outgoing { line, fd })
                .await
                .map_err(|_| VmmError::QmpClosed)?;
            rx.await.map_err(|_| VmmError::QmpClosed)?
        })
        .await;
        match answer {
            Ok(result) => result,
            Err(_) => {
                lock(&self.pending).map.remove(&id);
                Err(VmmError::QmpTimeout(command.to_string(), self.timeout))
            }
        }
    }

    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once QEMU has closed the connection (it exited or was killed).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    pub fn shutdown_reason(&self) -> Option<String> {
        self.shutdown_reason.lock().ok().and_then(|r| r.clone())
    }
}

impl Inbox {
    fn dispatch(&self, line: &str) {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            tracing::warn!(line, "unparseable QMP message");
            return;
        };
        if let Some(event) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            if event == "SHUTDOWN"
                && let Ok(mut reason) = self.shutdown_reason.lock()
            {
                *reason = data
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            let _ = self.events.send(QmpEvent {
                event: event.to_string(),
                data,
            });
            return;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            return;
        };
        let Some(tx) = lock(&self.pending).map.remove(&id) else {
            return;
        };
        let result = match (msg.get("return"), msg.get("error")) {
            (Some(ret), _) => Ok(ret.clone()),
            (_, Some(err)) => Err(VmmError::Qmp(
                err.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string(),
            )),
            _ => Err(VmmError::Qmp(format!("malformed reply: {line}"))),
        };
        let _ = tx.send(result);
    }
}

/// Writes queued commands whole until every [`Qmp`] is dropped or QEMU goes away.
async fn write_lines(mut write: OwnedWriteHalf, mut queued: mpsc::Receiver<Outgoing>) {
    while let Some(Outgoing { line, fd }) = queued.recv().await {
        let mut rest = line.as_bytes();
        if let Some(fd) = fd {
            // The descriptor rides on the command's first bytes (SCM_RIGHTS); QEMU takes it
            // as the one the command refers to.
            match send_with_fd(&write, rest, &fd).await {
                Ok(n) => rest = &rest[n..],
                Err(_) => break,
            }
        }
        if write.write_all(rest).await.is_err() {
            break;
        }
    }
}

async fn send_with_fd(
    write: &OwnedWriteHalf,
    bytes: &[u8],
    fd: &OwnedFd,
) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let stream: &UnixStream = write.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(bytes)];
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match sent {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            other => return other,
        }
    }
}
