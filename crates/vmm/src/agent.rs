//! The host end of the guest-agent protocol, over the unix socket QEMU exposes for the
//! virtio-serial port. One connection per VM; requests are multiplexed by id.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nook_proto::{
    FrameBuf, GuestFrame, GuestMetrics, GuestMsg, HostFrame, HostMsg, PROTOCOL_VERSION,
    SpawnRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc, watch};

use crate::VmmError;

type Routes = Arc<std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<GuestMsg>>>>;

#[derive(Clone)]
pub struct AgentClient {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    routes: Routes,
    next_id: Arc<AtomicU64>,
    closed: watch::Receiver<bool>,
}

/// What the agent said when it answered the readiness probe.
#[derive(Debug, Clone)]
pub struct AgentHello {
    pub agent_version: String,
    pub hostname: String,
    pub boot_id: String,
}

impl AgentClient {
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(VmmError::io(path))?;
        let (mut read, write) = stream.into_split();
        let (closed_tx, closed) = watch::channel(false);
        let client = Self {
            writer: Arc::new(Mutex::new(write)),
            routes: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            closed,
        };
        let routes = client.routes.clone();
        tokio::spawn(async move {
            let mut frames = FrameBuf::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => frames.push(&buf[..n]),
                }
                while let Some(body) = frames.next_body() {
                    match nook_proto::decode::<GuestFrame>(&body) {
                        Ok(frame) => route(&routes, frame),
                        Err(err) => tracing::warn!(%err, "undecodable frame from guest agent"),
                    }
                }
            }
            // Dropping the senders ends every open stream.
            if let Ok(mut routes) = routes.lock() {
                routes.clear();
            }
            let _ = closed_tx.send(true);
        });
        Ok(client)
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    async fn send(&self, frame: &HostFrame) -> Result<(), VmmError> {
        let bytes = nook_proto::encode(frame)?;
        let mut writer = self.writer.lock().await;
        writer
            .write_all(&bytes)
            .await
            .map_err(|_| VmmError::AgentClosed)
    }

    fn open_route(&self) -> (u64, mpsc::UnboundedReceiver<GuestMsg>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut routes) = self.routes.lock() {
            routes.insert(id, tx);
        }
        (id, rx)
    }

    fn close_route(&self, id: u64) {
        if let Ok(mut routes) = self.routes.lock() {
            routes.remove(&id);
        }
    }

    /// One request, one reply.
    async fn call(&self, msg: HostMsg) -> Result<GuestMsg, VmmError> {
        let (id, mut rx) = self.open_route();
        let sent = self.send(&HostFrame { id, msg }).await;
        let reply = match sent {
            Ok(()) => rx.recv().await.ok_or(VmmError::AgentClosed),
            Err(e) => Err(e),
        };
        self.close_route(id);
        match reply? {
            GuestMsg::Error { kind, message } => {
                Err(VmmError::Agent(format!("{kind:?}: {message}")))
            }
            other => Ok(other),
        }
    }

    /// Probes until the agent answers, which is the VM's readiness signal. Probes are repeated
    /// because frames sent before the guest opened its port may be lost.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentHello, VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (id, mut rx) = self.open_route();
        let result = loop {
            if self.is_closed() {
                break Err(VmmError::AgentClosed);
            }
            if let Err(e) = self
                .send(&HostFrame {
                    id,
                    msg: HostMsg::Hello {
                        version: PROTOCOL_VERSION,
                    },
                })
                .await
            {
                break Err(e);
            }
            let wait = tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(300)),
            );
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(GuestMsg::Hello { version, agent_version, hostname, boot_id }) => {
                        if version != PROTOCOL_VERSION {
                            break Err(VmmError::AgentVersion(version, PROTOCOL_VERSION));
                        }
                        break Ok(AgentHello { agent_version, hostname, boot_id });
                    }
                    Some(other) => break Err(VmmError::Agent(format!("unexpected reply to hello: {other:?}"))),
                    None => break Err(VmmError::AgentClosed),
                },
                () = wait => {
                    if tokio::time::Instant::now() >= deadline {
                        break Err(VmmError::Timeout(timeout));
                    }
                }
            }
        };
        self.close_route(id);
        result
    }

    pub async fn spawn(&self, request: SpawnRequest) -> Result<Process, VmmError> {
        let (id, mut rx) = self.open_route();
        if let Err(e) = self
            .send(&HostFrame {
                id,
                msg: HostMsg::Spawn(request),
            })
            .await
        {
            self.close_route(id);
            return Err(e);
        }
        match rx.recv().await {
            Some(GuestMsg::Spawned { pid }) => Ok(Process {
                id,
                pid,
                rx,
                client: self.clone(),
            }),
            Some(GuestMsg::Error { kind, message }) => {
                self.close_route(id);
                Err(VmmError::Agent(format!("{kind:?}: {message}")))
            }
            Some(other) => {
                self.close_route(id);
                Err(VmmError::Agent(format!(
                    "unexpected reply to spawn: {other:?}"
                )))
            }
            None => Err(VmmError::AgentClosed),
        }
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, VmmError> {
        let mut out = Vec::new();
        loop {
            let msg = HostMsg::ReadFile {
                path: path.to_string(),
                offset: out.len() as u64,
                len: nook_proto::CHUNK as u32,
            };
            match self.call(msg).await? {
                GuestMsg::FileData { data } if data.is_empty() => return Ok(out),
                GuestMsg::FileData { data } => out.extend_from_slice(&data),
                other => {
                    return Err(VmmError::Agent(format!(
                        "unexpected reply to read: {other:?}"
                    )));
                }
            }
        }
    }

    pub async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), VmmError> {
        let mut chunks = data.chunks(nook_proto::CHUNK).peekable();
        let mut append = false;
        if chunks.peek().is_none() {
            return self.write_chunk(path, &[], false, mode).await;
        }
        for chunk in chunks {
            self.write_chunk(path, chunk, append, mode).await?;
            append = true;
        }
        Ok(())
    }

    async fn write_chunk(
        &self,
        path: &str,
        data: &[u8],
        append: bool,
        mode: Option<u32>,
    ) -> Result<(), VmmError> {
        let msg = HostMsg::WriteFile {
            path: path.to_string(),
            data: data.to_vec(),
            append,
            mode,
        };
        match self.call(msg).await? {
            GuestMsg::Ok => Ok(()),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to write: {other:?}"
            ))),
        }
    }

    pub async fn metrics(&self) -> Result<GuestMetrics, VmmError> {
        match self.call(HostMsg::Metrics).await? {
            GuestMsg::Metrics(m) => Ok(m),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to metrics: {other:?}"
            ))),
        }
    }

    /// Tells the guest who it is; true when it found it had been another VM (a clone).
    pub async fn identify(&self, identity: nook_proto::Identity) -> Result<bool, VmmError> {
        match self.call(HostMsg::Identify(identity)).await? {
            GuestMsg::Identified { cloned } => Ok(cloned),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to identify: {other:?}"
            ))),
        }
    }

    /// Asks the guest to flush and power off; returns once the agent acknowledged.
    pub async fn shutdown(&self, reboot: bool) -> Result<(), VmmError> {
        match self.call(HostMsg::Shutdown { reboot }).await? {
            GuestMsg::Ok => Ok(()),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to shutdown: {other:?}"
            ))),
        }
    }
}

fn route(routes: &Routes, frame: GuestFrame) {
    let Ok(mut routes) = routes.lock() else {
        return;
    };
    let finished = matches!(frame.msg, GuestMsg::Exit { .. });
    if let Some(tx) = routes.get(&frame.id) {
        let _ = tx.send(frame.msg);
    }
    if finished {
        routes.remove(&frame.id);
    }
}

/// A process running in the guest. Output arrives through [`Process::next`] until `Exit`.
pub struct Process {
    id: u64,
    pub pid: u32,
    rx: mpsc::UnboundedReceiver<GuestMsg>,
    client: AgentClient,
}

impl Process {
    /// The next output chunk or the final `Exit`; `None` if the agent connection dropped.
    pub async fn next(&mut self) -> Option<GuestMsg> {
        self.rx.recv().await
    }

    /// A sender for stdin that can move into another task while output is read here.
    pub fn handle(&self) -> ProcessHandle {
        ProcessHandle {
            id: self.id,
            client: self.client.clone(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.client.close_route(self.id);
    }
}

#[derive(Clone)]
pub struct ProcessHandle {
    id: u64,
    client: AgentClient,
}

impl ProcessHandle {
    pub async fn stdin(&self, data: &[u8]) -> Result<(), VmmError> {
        for chunk in data.chunks(nook_proto::CHUNK) {
            self.client
                .send(&HostFrame {
                    id: self.id,
                    msg: HostMsg::Stdin {
                        data: chunk.to_vec(),
                    },
                })
                .await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&self) -> Result<(), VmmError> {
        self.client
            .send(&HostFrame {
                id: self.id,
                msg: HostMsg::CloseStdin,
            })
            .await
    }

    pub async fn signal(&self, signal: i32) -> Result<(), VmmError> {
        self.client
            .send(&HostFrame {
                id: self.id,
                msg: HostMsg::Signal { signal },
            })
            .await
    }

    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), VmmError> {
        self.client
            .send(&HostFrame {
                id: self.id,
                msg: HostMsg::Resize { cols, rows },
            })
            .await
    }
}
