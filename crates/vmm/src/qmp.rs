//! A small QMP client: one connection, commands tagged with ids, events broadcast.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot, watch};

use crate::VmmError;

#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, VmmError>>>>>;

#[derive(Clone)]
pub struct Qmp {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    /// The reason of the last SHUTDOWN event, if QEMU said why it is going away.
    shutdown_reason: Arc<std::sync::Mutex<Option<String>>>,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(VmmError::io(path))?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // The greeting comes first; anything else means this is not a QMP socket.
        let greeting = lines
            .next_line()
            .await
            .map_err(VmmError::io(path))?
            .ok_or(VmmError::QmpClosed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(VmmError::Qmp(format!("unexpected greeting: {greeting}")));
        }
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = watch::channel(false);
        let qmp = Self {
            writer: Arc::new(Mutex::new(write)),
            pending: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            events,
            closed,
            shutdown_reason: Arc::default(),
        };
        let reader = qmp.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                reader.dispatch(&line);
            }
            let waiting: Vec<_> = reader
                .pending
                .lock()
                .map(|mut p| p.drain().collect())
                .unwrap_or_default();
            for (_, tx) in waiting {
                let _ = tx.send(Err(VmmError::QmpClosed));
            }
            let _ = closed_tx.send(true);
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

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
        let Some(tx) = self.pending.lock().ok().and_then(|mut p| p.remove(&id)) else {
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

    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        if self.is_closed() {
            return Err(VmmError::QmpClosed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id, tx);
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut writer = self.writer.lock().await;
            if writer.write_all(line.as_bytes()).await.is_err() {
                return Err(VmmError::QmpClosed);
            }
        }
        rx.await.map_err(|_| VmmError::QmpClosed)?
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
