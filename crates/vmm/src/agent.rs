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
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::VmmError;
use crate::throttle::Throttle;

/// How long a request may wait for the agent's answer (and for room to send it) unless the
/// client was given another deadline. Identify, the slowest request, takes tens of seconds
/// on a loaded TCG host.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames waiting to be written. A guest that stops draining its port fills this, and then
/// senders wait (each until its deadline) instead of the host buffering without limit.
const OUTBOX_FRAMES: usize = 8;
/// How often the readiness probe is repeated while the agent has not answered.
const PROBE_EVERY: Duration = Duration::from_millis(300);
/// The output window of a spawn that asked for none: such a process's output is acknowledged
/// as [`Process::next`] hands it out, so a caller that reads slowly slows the process instead
/// of the host buffering what it prints.
pub const DEFAULT_WINDOW: u32 = 1 << 20;
/// How long a connection that moved to a VM's next QEMU goes on reading what the old one
/// wrote before it ended. The old QEMU is killed before the switch, so its end of file comes
/// at once; this only bounds a QEMU that takes long to die (the connection then ends).
const OLD_QEMU_DRAIN: Duration = Duration::from_secs(5);

/// The requests waiting for the guest, and whether the connection is gone. One lock guards
/// both, so a request can never be registered after the reader has given up on the
/// connection (its reply would then be waited for forever).
#[derive(Default)]
struct Routes {
    map: HashMap<u64, Route>,
    closed: bool,
}

type SharedRoutes = Arc<std::sync::Mutex<Routes>>;

fn lock(routes: &SharedRoutes) -> std::sync::MutexGuard<'_, Routes> {
    routes.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the connection gone; dropping the senders ends every open stream and call.
fn close_routes(routes: &SharedRoutes) {
    let mut routes = lock(routes);
    routes.closed = true;
    routes.map.clear();
}

/// Where the guest's frames for one request id go.
struct Route {
    tx: mpsc::UnboundedSender<(GuestMsg, usize)>,
    /// Stdin the process may still be sent, for spawns with a flow-control window.
    stdin_credit: Option<Arc<Credit>>,
    queue: Arc<QueueBudget>,
}

/// Frame bytes delivered to one request and not yet taken by its reader. A guest that keeps
/// to the protocol never passes the limit (one reply, or a spawn's window); one that does not
/// loses the request instead of growing the host's memory.
struct QueueBudget {
    queued: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl QueueBudget {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            queued: std::sync::atomic::AtomicUsize::new(0),
            limit,
        })
    }

    /// For one reply: any single frame fits.
    fn reply() -> Arc<Self> {
        Self::new(nook_proto::MAX_FRAME)
    }

    /// For a spawn's stream: its window, grown by base64 and framing, and one frame of slack.
    fn window(bytes: u32) -> Arc<Self> {
        Self::new(2 * bytes as usize + nook_proto::MAX_FRAME)
    }
}

/// The receiving end of a route, which gives back the budget of what it hands out.
struct RouteRx {
    rx: mpsc::UnboundedReceiver<(GuestMsg, usize)>,
    queue: Arc<QueueBudget>,
}

impl RouteRx {
    async fn recv(&mut self) -> Option<GuestMsg> {
        let (msg, cost) = self.rx.recv().await?;
        self.queue.queued.fetch_sub(cost, Ordering::Relaxed);
        Some(msg)
    }
}

/// Bytes that may be sent before the other side acknowledges more.
struct Credit {
    available: std::sync::Mutex<i64>,
    grown: tokio::sync::Notify,
}

impl Credit {
    fn new(bytes: u32) -> Self {
        Self {
            available: std::sync::Mutex::new(i64::from(bytes)),
            grown: tokio::sync::Notify::new(),
        }
    }

    fn grant(&self, bytes: u64) {
        if let Ok(mut available) = self.available.lock() {
            *available = available.saturating_add(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.grown.notify_waiters();
    }

    /// Waits until some credit is left, then spends `bytes` (which may overdraw it by one chunk).
    async fn spend(&self, bytes: usize) {
        loop {
            let grown = self.grown.notified();
            if let Ok(mut available) = self.available.lock()
                && *available > 0
            {
                *available -= bytes as i64;
                return;
            }
            grown.await;
        }
    }
}

/// What the guest answered to its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identified {
    /// It had been another VM until now.
    pub cloned: bool,
    /// It runs sshd, with nook's key in place.
    pub sshd: bool,
}

/// A connection to one VM's guest agent. Clones share it; when the last clone is dropped
/// its tasks end and the socket is closed, even while a write is stuck on a guest that does
/// not drain its port (QEMU accepts one client at a time, so a stuck old connection would
/// keep a new one from ever being served).
#[derive(Clone)]
pub struct AgentClient {
    outbox: mpsc::Sender<Vec<u8>>,
    routes: SharedRoutes,
    next_id: Arc<AtomicU64>,
    call_timeout: Duration,
    /// Spawns hold it shared until the guest answers, and the writer while it writes a frame;
    /// a VM about to change QEMU holds it alone ([`AgentClient::hold`]), so no spawn is lost
    /// in the change and nothing more reaches the old QEMU.
    spawns: Arc<tokio::sync::RwLock<()>>,
    /// The connection's socket, to see whether QEMU has read all that was written to it. It
    /// changes when the VM moves to its next QEMU ([`Held::switch`]).
    socket: Arc<std::sync::Mutex<Arc<std::os::fd::OwnedFd>>>,
    /// Tells the reader to stop, go on, or go on with the next QEMU's socket.
    reader: mpsc::UnboundedSender<ReaderCtl>,
    /// Hands the writer the next QEMU's socket.
    writer: mpsc::UnboundedSender<OwnedWriteHalf>,
    _alive: Arc<watch::Sender<()>>,
}

/// A connection to a VM's next QEMU (the successor that takes it over on this host), made
/// before that QEMU runs: the guest then never sees its host go away, so the processes it
/// streams keep their flow-control windows and nothing they print is lost.
pub struct NextConnection {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    socket: std::os::fd::OwnedFd,
}

impl NextConnection {
    pub async fn connect(path: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(VmmError::io(path))?;
        let socket = {
            use std::os::fd::AsFd;
            stream
                .as_fd()
                .try_clone_to_owned()
                .map_err(VmmError::io(path))?
        };
        let (read, write) = stream.into_split();
        Ok(Self {
            read,
            write,
            socket,
        })
    }
}

/// What the reader is told while its VM changes QEMU.
enum ReaderCtl {
    /// Read nothing more until told otherwise; answered once the reader has stopped.
    Pause(oneshot::Sender<()>),
    Resume,
    /// The old QEMU is gone: read what it left, then go on with its successor's socket.
    Switch(OwnedReadHalf),
}

/// A connection held still while its VM changes QEMU ([`AgentClient::hold`]): no process
/// starts through it, no frame is written to it, and nothing more is read from it. Reading
/// would let the old QEMU take more of the guest's output off its virtqueue after its device
/// state was taken: the successor would send the same bytes again, and the old QEMU's write
/// to the queue would land in memory an instant fork's two sides start from. Dropped, the
/// connection goes on as it was (the change was called off); [`Held::switch`] moves it to
/// the next QEMU.
pub struct Held {
    client: AgentClient,
    _spawns: tokio::sync::OwnedRwLockWriteGuard<()>,
    switched: bool,
}

impl Held {
    /// The VM runs in its next QEMU, which `next` reaches, and the old one has ended: the
    /// reader takes the rest of what the old QEMU wrote, then goes on with the next one, and
    /// the writer writes what waited (and all that follows) to the next one. Open requests
    /// and streams go on as if nothing happened.
    pub fn switch(mut self, next: NextConnection) {
        *self.client.socket.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(next.socket);
        // Both before the hold ends (when `self` drops), so no frame reaches the old socket.
        let _ = self.client.writer.send(next.write);
        let _ = self.client.reader.send(ReaderCtl::Switch(next.read));
        self.switched = true;
    }

    /// The connection ends here, its open requests and streams with it: the VM runs in
    /// another QEMU that no connection was made to beforehand. (The reader goes on to the old
    /// QEMU's end of file, and ends.)
    pub fn close(self) {
        self.client.close();
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.switched {
            let _ = self.client.reader.send(ReaderCtl::Resume);
        }
    }
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
        let NextConnection {
            read,
            write,
            socket,
        } = NextConnection::connect(path).await?;
        let (alive, alive_rx) = watch::channel(());
        let (outbox, queued) = mpsc::channel(OUTBOX_FRAMES);
        let (reader, reader_ctl) = mpsc::unbounded_channel();
        let (writer, next_writes) = mpsc::unbounded_channel();
        let routes = SharedRoutes::default();
        let spawns = Arc::<tokio::sync::RwLock<()>>::default();
        tokio::spawn(read_frames(
            read,
            routes.clone(),
            alive_rx.clone(),
            reader_ctl,
        ));
        tokio::spawn(write_frames(
            write,
            queued,
            next_writes,
            routes.clone(),
            spawns.clone(),
            alive_rx,
        ));
        Ok(Self {
            outbox,
            routes,
            socket: Arc::new(std::sync::Mutex::new(Arc::new(socket))),
            reader,
            writer,
            // The guest keys running processes by request id, and processes outlive the
            // connection that started them: a clone carries its source's, and a restarted
            // daemon finds its own. Each connection counts from a random start, so its ids
            // do not collide with theirs (below 2^53: exact in any JSON reader).
            next_id: Arc::new(AtomicU64::new(rand::random_range(1 << 20..1 << 52))),
            call_timeout: CALL_TIMEOUT,
            spawns,
            _alive: Arc::new(alive),
        })
    }

    /// Holds the connection still, for a VM about to change QEMU (see [`Held`]): a spawn
    /// waiting meanwhile goes ahead once the hold ends, on the next QEMU if the connection
    /// moved to it. None while a spawn waits for the guest's answer or a frame is being
    /// written (the guest may be paused): the change must wait.
    pub async fn hold(&self) -> Option<Held> {
        let spawns = self.spawns.clone().try_write_owned().ok()?;
        // Made first: if this future is dropped while the reader stops, the hold's end
        // still tells the reader to go on.
        let held = Held {
            client: self.clone(),
            _spawns: spawns,
            switched: false,
        };
        let (stopped, reader_stopped) = oneshot::channel();
        if self.reader.send(ReaderCtl::Pause(stopped)).is_ok() {
            // An error means the reader has ended: nothing reads either way.
            let _ = reader_stopped.await;
        }
        Some(held)
    }

    /// The socket of the QEMU the connection reaches now.
    fn socket(&self) -> Arc<std::os::fd::OwnedFd> {
        self.socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a hold would likely fail now: a spawn waits for the guest's answer, a frame
    /// is being written, or QEMU has not read all that was written (as while a process
    /// takes an upload slower than it comes). A cheap look before a change of QEMU that
    /// would otherwise copy a VM's memory only to be called off.
    pub fn looks_busy(&self) -> bool {
        self.spawns.try_write().is_err()
            || crate::sys::unread_by_peer(&self.socket()).map_or(true, |unread| unread > 0)
    }

    /// Waits, up to `within`, until QEMU has read everything written to the connection; false
    /// if it has not. With the connection held ([`AgentClient::hold`]) and the VM paused,
    /// nothing more can then reach the guest: a QEMU that is being replaced must not write
    /// into guest memory after its device state was taken (virtio-serial delivers even to a
    /// paused guest, and after an instant fork that memory is what both sides start from).
    pub async fn drained(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let Ok(unread) = crate::sys::unread_by_peer(&self.socket()) else {
                return false;
            };
            if unread == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Ends the connection here, its open requests and streams with it: its VM runs in
    /// another QEMU now.
    pub fn close(&self) {
        close_routes(&self.routes);
    }

    /// The same connection, with another deadline for each request.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.routes).closed
    }

    /// Queues one frame for the writer, waiting for room until `deadline`. Frames are written
    /// whole by one task, so a sender that gives up never leaves half a frame on the wire.
    async fn send_by(&self, frame: &HostFrame, deadline: Instant) -> Result<(), VmmError> {
        let bytes = nook_proto::encode(frame)?;
        match tokio::time::timeout_at(deadline, self.outbox.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(VmmError::AgentClosed),
            Err(_) => Err(VmmError::AgentTimeout(self.call_timeout)),
        }
    }

    async fn send(&self, frame: &HostFrame) -> Result<(), VmmError> {
        self.send_by(frame, Instant::now() + self.call_timeout)
            .await
    }

    fn open_route(&self) -> Result<(u64, RouteRx), VmmError> {
        self.open_route_with(None, QueueBudget::reply())
    }

    fn open_route_with(
        &self,
        stdin_credit: Option<Arc<Credit>>,
        queue: Arc<QueueBudget>,
    ) -> Result<(u64, RouteRx), VmmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut routes = lock(&self.routes);
        if routes.closed {
            return Err(VmmError::AgentClosed);
        }
        routes.map.insert(
            id,
            Route {
                tx,
                stdin_credit,
                queue: queue.clone(),
            },
        );
        Ok((id, RouteRx { rx, queue }))
    }

    fn close_route(&self, id: u64) {
        lock(&self.routes).map.remove(&id);
    }

    /// One request, one reply, within the client's call timeout.
    async fn call(&self, msg: HostMsg) -> Result<GuestMsg, VmmError> {
        let deadline = Instant::now() + self.call_timeout;
        let (id, rx) = self.open_route()?;
        let sent = self.send_by(&HostFrame { id, msg }, deadline).await;
        self.reply(id, rx, sent, deadline).await
    }

    /// The reply to the request with route `id`, once it was `sent`; closes the route.
    async fn reply(
        &self,
        id: u64,
        mut rx: RouteRx,
        sent: Result<(), VmmError>,
        deadline: Instant,
    ) -> Result<GuestMsg, VmmError> {
        let reply = async {
            sent?;
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => Ok(reply),
                Ok(None) => Err(VmmError::AgentClosed),
                Err(_) => Err(VmmError::AgentTimeout(self.call_timeout)),
            }
        }
        .await;
        self.close_route(id);
        match reply? {
            GuestMsg::Error { kind, message } => {
                Err(VmmError::Agent(format!("{kind:?}: {message}")))
            }
            other => Ok(other),
        }
    }

    /// Probes until the agent answers, which is the VM's readiness signal. Probes are repeated
    /// because frames sent before the guest opened its port may be lost. Returns
    /// [`VmmError::Timeout`] at `timeout` whatever the guest does: a guest that never opens its
    /// port stops QEMU from reading the socket, and a probe then never finishes being written.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentHello, VmmError> {
        let deadline = Instant::now() + timeout;
        let (id, mut rx) = self.open_route()?;
        let probe = nook_proto::encode(&HostFrame {
            id,
            msg: HostMsg::Hello {
                version: PROTOCOL_VERSION,
            },
        })?;
        let answer = async {
            loop {
                // A full outbox means the guest is not draining yet: that probe would only
                // queue behind the others, so it is skipped rather than waited for.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    self.outbox.try_send(probe.clone())
                {
                    return Err(VmmError::AgentClosed);
                }
                tokio::select! {
                    msg = rx.recv() => return match msg {
                        Some(GuestMsg::Hello { version, agent_version, hostname, boot_id }) => {
                            if version != PROTOCOL_VERSION {
                                Err(VmmError::AgentVersion(version, PROTOCOL_VERSION))
                            } else {
                                Ok(AgentHello { agent_version, hostname, boot_id })
                            }
                        }
                        Some(other) => Err(VmmError::Agent(format!("unexpected reply to hello: {other:?}"))),
                        None => Err(VmmError::AgentClosed),
                    },
                    () = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
        };
        let result = tokio::time::timeout_at(deadline, answer)
            .await
            .unwrap_or(Err(VmmError::Timeout(timeout)));
        self.close_route(id);
        result
    }

    /// Starts a process. With `request.window`, the guest sends at most that much output ahead
    /// of [`ProcessHandle::output_ack`], and [`ProcessHandle::stdin`] waits until the process
    /// has taken what it was sent, so memory on both ends stays bounded.
    ///
    /// Without a window, the process gets [`DEFAULT_WINDOW`] and [`Process::next`]
    /// acknowledges its output as it hands it out.
    pub async fn spawn(&self, mut request: SpawnRequest) -> Result<Process, VmmError> {
        let deadline = Instant::now() + self.call_timeout;
        let _spawning = tokio::time::timeout_at(deadline, self.spawns.read())
            .await
            .map_err(|_| VmmError::AgentTimeout(self.call_timeout))?;
        if self.is_closed() {
            return Err(VmmError::AgentMoved);
        }
        let credit = request.window.map(|w| Arc::new(Credit::new(w)));
        let auto_ack = request.window.is_none();
        let window = *request.window.get_or_insert(DEFAULT_WINDOW);
        let (id, mut rx) = self.open_route_with(credit.clone(), QueueBudget::window(window))?;
        if let Err(e) = self
            .send_by(
                &HostFrame {
                    id,
                    msg: HostMsg::Spawn(request),
                },
                deadline,
            )
            .await
        {
            self.close_route(id);
            return Err(e);
        }
        let Ok(answer) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            self.close_route(id);
            return Err(VmmError::AgentTimeout(self.call_timeout));
        };
        match answer {
            Some(GuestMsg::Spawned { pid }) => Ok(Process {
                id,
                pid,
                rx,
                client: self.clone(),
                stdin_credit: credit,
                auto_ack,
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

    /// Tells the guest who it is; the answer says whether it had been another VM (a clone) and
    /// whether it runs sshd with nook's key.
    pub async fn identify(&self, identity: nook_proto::Identity) -> Result<Identified, VmmError> {
        match self.call(HostMsg::Identify(identity)).await? {
            GuestMsg::Identified { cloned, sshd } => Ok(Identified { cloned, sshd }),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to identify: {other:?}"
            ))),
        }
    }

    /// Tells the guest this connection is a new host's, which started only what it started
    /// itself. A VM that moved here from another host still runs what that host's sessions
    /// started; their users went with that host's connection, and without this their output
    /// would wait for acknowledgements that never come. Returns once the guest has let them
    /// run free.
    pub async fn new_host(&self) -> Result<(), VmmError> {
        let deadline = Instant::now() + self.call_timeout;
        let (id, rx) = self.open_route()?;
        let sent = async {
            // A place in the queue first (it cannot be awaited under the lock below).
            let permit = match tokio::time::timeout_at(deadline, self.outbox.reserve()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(VmmError::AgentClosed),
                Err(_) => return Err(VmmError::AgentTimeout(self.call_timeout)),
            };
            // The list is taken, and the frame queued, under the routes' lock: a spawn missing
            // from the list opens its route after it, so its frame is queued after this one
            // and the guest starts it only after this.
            let routes = lock(&self.routes);
            let started = routes.map.keys().copied().filter(|k| *k != id).collect();
            permit.send(nook_proto::encode(&HostFrame {
                id,
                msg: HostMsg::NewHost { started },
            })?);
            Ok(())
        }
        .await;
        match self.reply(id, rx, sent, deadline).await? {
            GuestMsg::Ok => Ok(()),
            other => Err(VmmError::Agent(format!(
                "unexpected reply to new host: {other:?}"
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

/// The guest's bytes on their way to its requests: frames are cut from them and routed, and
/// what does not fit is logged, at most every 10 s (a guest can send garbage at full speed).
struct Inbound {
    routes: SharedRoutes,
    frames: FrameBuf,
    undecodable: Throttle,
    noise: Throttle,
    overrun: Throttle,
}

impl Inbound {
    fn new(routes: SharedRoutes) -> Self {
        Self {
            routes,
            frames: FrameBuf::new(),
            undecodable: Throttle::new(Duration::from_secs(10)),
            noise: Throttle::new(Duration::from_secs(10)),
            overrun: Throttle::new(Duration::from_secs(10)),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
        let skipped_before = self.frames.skipped();
        while let Some(body) = self.frames.next_body() {
            match nook_proto::decode::<GuestFrame>(&body) {
                Ok(frame) => {
                    if let Overrun::Dropped(id) = route(&self.routes, frame, body.len())
                        && let Some(more) = self.overrun.allow()
                    {
                        tracing::warn!(
                            id,
                            similar_since_last = more,
                            "guest agent sent more than a request's window; dropped the request"
                        );
                    }
                }
                Err(err) => {
                    if let Some(more) = self.undecodable.allow() {
                        tracing::warn!(%err, similar_since_last = more, "undecodable frame from guest agent");
                    }
                }
            }
        }
        let skipped = self.frames.skipped() - skipped_before;
        if skipped > 0
            && let Some(more) = self.noise.allow_n(skipped)
        {
            tracing::warn!(
                bytes = skipped,
                bytes_since_last = more,
                "skipped bytes from guest agent that were not frames"
            );
        }
    }
}

/// What a held reader does next.
enum AfterHold {
    Resume,
    Switch(OwnedReadHalf),
    End,
}

/// Reads the guest's frames and hands each to its request, until the guest closes the
/// connection or the last client handle is dropped. While its VM changes QEMU it stops
/// reading when told, and then goes on, or takes the rest of the old QEMU's output and goes
/// on with the next QEMU's socket: the guest's bytes arrive whole and in order across the
/// change (a frame may even be cut between the two).
async fn read_frames(
    mut read: OwnedReadHalf,
    routes: SharedRoutes,
    mut alive: watch::Receiver<()>,
    mut ctl: mpsc::UnboundedReceiver<ReaderCtl>,
) {
    let mut inbound = Inbound::new(routes.clone());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Reads are cancel-safe: a read dropped for a control message took nothing.
        let read_now = tokio::select! {
            r = read.read(&mut buf) => r,
            c = ctl.recv() => {
                let after = match c {
                    Some(ReaderCtl::Pause(stopped)) => {
                        let _ = stopped.send(());
                        held(&mut ctl, &mut alive).await
                    }
                    Some(ReaderCtl::Resume) => AfterHold::Resume,
                    Some(ReaderCtl::Switch(next)) => AfterHold::Switch(next),
                    None => AfterHold::End,
                };
                match after {
                    AfterHold::Resume => continue,
                    AfterHold::Switch(next) => {
                        let old = std::mem::replace(&mut read, next);
                        if drain_old(old, &mut inbound, &mut buf).await {
                            continue;
                        }
                        // Part of the old QEMU's output may be missing: the stream cannot go
                        // on whole, so the connection ends (and a new one is made).
                        break;
                    }
                    AfterHold::End => break,
                }
            }
            _ = alive.changed() => break,
        };
        match read_now {
            Ok(0) | Err(_) => break,
            Ok(n) => inbound.push(&buf[..n]),
        }
    }
    close_routes(&routes);
}

/// Waits, reading nothing, until the hold ends or the connection moves.
async fn held(
    ctl: &mut mpsc::UnboundedReceiver<ReaderCtl>,
    alive: &mut watch::Receiver<()>,
) -> AfterHold {
    loop {
        tokio::select! {
            c = ctl.recv() => match c {
                Some(ReaderCtl::Resume) => return AfterHold::Resume,
                Some(ReaderCtl::Switch(next)) => return AfterHold::Switch(next),
                // A second hold cannot be taken while this one lasts; nothing to stop.
                Some(ReaderCtl::Pause(stopped)) => { let _ = stopped.send(()); }
                None => return AfterHold::End,
            },
            _ = alive.changed() => return AfterHold::End,
        }
    }
}

/// Takes what the old QEMU wrote before it ended, up to its end of file; false if it did
/// not end in time or the read failed.
async fn drain_old(mut old: OwnedReadHalf, inbound: &mut Inbound, buf: &mut [u8]) -> bool {
    let deadline = Instant::now() + OLD_QEMU_DRAIN;
    loop {
        match tokio::time::timeout_at(deadline, old.read(buf)).await {
            Ok(Ok(0)) => return true,
            Ok(Ok(n)) => inbound.push(&buf[..n]),
            Ok(Err(err)) => {
                tracing::warn!(%err, "could not read the rest of the agent output of a VM's old QEMU; its agent connection ends");
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    "the old QEMU of a VM that changed QEMU did not end; its agent connection ends"
                );
                return false;
            }
        }
    }
}

/// Writes queued frames whole, one after the other, until every client handle is dropped;
/// a failed write ends the connection. After a change of QEMU it writes to the next QEMU's
/// socket, which it is handed while the connection is held.
async fn write_frames(
    mut write: OwnedWriteHalf,
    mut queued: mpsc::Receiver<Vec<u8>>,
    mut next_writes: mpsc::UnboundedReceiver<OwnedWriteHalf>,
    routes: SharedRoutes,
    hold: Arc<tokio::sync::RwLock<()>>,
    mut alive: watch::Receiver<()>,
) {
    loop {
        let frame = tokio::select! {
            f = queued.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = alive.changed() => break,
        };
        // Held while the VM changes QEMU: the frame waits, and goes to the old QEMU if the
        // change is called off, or to the next one if the connection moved to it.
        let _writing = tokio::select! {
            g = hold.read() => g,
            _ = alive.changed() => break,
        };
        while let Ok(next) = next_writes.try_recv() {
            write = next;
        }
        if lock(&routes).closed {
            break;
        }
        let written = tokio::select! {
            w = write.write_all(&frame) => w,
            _ = alive.changed() => break,
        };
        if written.is_err() {
            close_routes(&routes);
            break;
        }
    }
}

enum Overrun {
    No,
    /// The request with this id was sent more than its budget and was dropped.
    Dropped(u64),
}

/// Hands one frame, `cost` bytes on the wire, to its request.
fn route(routes: &SharedRoutes, frame: GuestFrame, cost: usize) -> Overrun {
    let mut routes = lock(routes);
    let routes = &mut routes.map;
    let finished = matches!(frame.msg, GuestMsg::Exit { .. });
    if let GuestMsg::StdinAck { bytes } = frame.msg {
        if let Some(credit) = routes.get(&frame.id).and_then(|r| r.stdin_credit.as_ref()) {
            credit.grant(bytes);
        }
        return Overrun::No;
    }
    if let Some(route) = routes.get(&frame.id) {
        let queued = route.queue.queued.load(Ordering::Relaxed);
        if queued.saturating_add(cost) > route.queue.limit {
            // Its reader sees the stream end, as if the connection had dropped.
            routes.remove(&frame.id);
            return Overrun::Dropped(frame.id);
        }
        route.queue.queued.fetch_add(cost, Ordering::Relaxed);
        let _ = route.tx.send((frame.msg, cost));
    }
    if finished {
        routes.remove(&frame.id);
    }
    Overrun::No
}

/// A process running in the guest. Output arrives through [`Process::next`] until `Exit`.
pub struct Process {
    id: u64,
    pub pid: u32,
    rx: RouteRx,
    client: AgentClient,
    stdin_credit: Option<Arc<Credit>>,
    /// The spawn asked for no window: output is acknowledged here as it is handed out.
    auto_ack: bool,
}

impl Process {
    /// The next output chunk or the final `Exit`; `None` if the agent connection dropped.
    pub async fn next(&mut self) -> Option<GuestMsg> {
        let msg = self.rx.recv().await?;
        if self.auto_ack
            && let GuestMsg::Output { data, .. } = &msg
            && !data.is_empty()
        {
            // A lost acknowledgement would stall the process for good; one that cannot be
            // sent means the connection is going, which the stream's end reports.
            let _ = self.handle().output_ack(data.len() as u64).await;
        }
        Some(msg)
    }

    /// A sender for stdin that can move into another task while output is read here.
    pub fn handle(&self) -> ProcessHandle {
        ProcessHandle {
            id: self.id,
            client: self.client.clone(),
            stdin_credit: self.stdin_credit.clone(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.client.close_route(self.id);
        if self.auto_ack {
            // Nobody reads this output any more; as before windows were the default, the
            // process may go on printing, and what it prints is dropped on arrival.
            let release = HostFrame {
                id: self.id,
                msg: HostMsg::OutputAck { bytes: u64::MAX },
            };
            if let Ok(bytes) = nook_proto::encode(&release)
                && let Err(mpsc::error::TrySendError::Full(bytes)) =
                    self.client.outbox.try_send(bytes)
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let outbox = self.client.outbox.clone();
                runtime.spawn(async move {
                    let _ = tokio::time::timeout(CALL_TIMEOUT, outbox.send(bytes)).await;
                });
            }
        }
    }
}

#[derive(Clone)]
pub struct ProcessHandle {
    id: u64,
    client: AgentClient,
    stdin_credit: Option<Arc<Credit>>,
}

impl ProcessHandle {
    /// Sends stdin; with a flow-control window, waits while the process has not taken what it
    /// was sent before.
    pub async fn stdin(&self, data: &[u8]) -> Result<(), VmmError> {
        for chunk in data.chunks(nook_proto::CHUNK) {
            if let Some(credit) = &self.stdin_credit {
                credit.spend(chunk.len()).await;
            }
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

    /// Tells the guest that `bytes` of output were passed on (see [`AgentClient::spawn`]).
    pub async fn output_ack(&self, bytes: u64) -> Result<(), VmmError> {
        self.client
            .send(&HostFrame {
                id: self.id,
                msg: HostMsg::OutputAck { bytes },
            })
            .await
    }

    /// The process's user went away: SIGHUP, stdin closed, output no longer read.
    pub async fn hangup(&self) -> Result<(), VmmError> {
        self.client
            .send(&HostFrame {
                id: self.id,
                msg: HostMsg::Hangup,
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
