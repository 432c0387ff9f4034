//! nook's SSH front door.
//!
//! One listener serves two things, chosen per connection by [`Backend::route`]:
//! - the **lobby**: `ssh HOST CMD` runs a lobby command, and `ssh HOST` opens a
//!   small REPL (`nook> `) with line editing, history and TAB completion;
//! - a **VM**: `ssh VM@HOST [CMD]` runs the shell or command through the VM's
//!   guest agent (the backend's [`GuestShell`]); what needs an SSH server (sftp,
//!   `-L`, `-R`, `-A`) is relayed 1:1 to the guest's own sshd, with nook acting
//!   as the SSH client.
//!
//! Authentication is by public key only; any key whose signature verifies gets
//! in (so an unknown key can `signup`), and the account behind the key is looked
//! up per lobby command.
//!
//! This crate wraps russh (pre-1.0, it changes often) so nothing else in nook
//! depends on it. It must not know about VMs, accounts or lobby commands beyond
//! the [`Backend`] trait: the daemon implements that.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

mod editor;
mod guest;
mod hostkey;
mod lobby;
mod relay;
mod server;
pub mod words;

pub use hostkey::{
    ClientKey, GuestHostKey, generate_client_key, generate_guest_host_keys, load_or_create_host_key,
};
pub use server::{serve, serve_listener};

/// Configuration of the SSH front door.
#[derive(Debug, Clone)]
pub struct SshServerConfig {
    pub listen: SocketAddr,
    /// An ed25519 key in OpenSSH format: created (mode 0600) if missing, reused after.
    pub host_key_path: PathBuf,
    /// The host name shown in messages, e.g. "localhost".
    pub banner_host: String,
}

/// A nook account, as the backend knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub email: String,
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The SSH user name (`VM` in `ssh VM@HOST`).
    pub user: String,
    /// The verified public key, `"ssh-ed25519 AAAA…"` without a comment.
    pub key_openssh: String,
    /// `"SHA256:…"`.
    pub fingerprint: String,
    /// The account owning the key, if any (looked up for each lobby command).
    pub account: Option<Account>,
    /// The client's address (for limits per source).
    pub peer: std::net::IpAddr,
}

/// A VM the caller may enter: its guest agent for shells and commands, and its sshd (if the
/// image has one) for everything else.
#[derive(Clone)]
pub struct VmEndpoint {
    pub name: String,
    /// Runs shells and commands; without one, every session is relayed to `sshd`.
    pub shell: Option<Arc<dyn GuestShell>>,
    pub sshd: Option<SshdEndpoint>,
}

impl std::fmt::Debug for VmEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEndpoint")
            .field("name", &self.name)
            .field("sshd", &self.sshd)
            .finish_non_exhaustive()
    }
}

/// Where the guest's sshd is and how nook logs in to it.
#[derive(Clone)]
pub struct SshdEndpoint {
    pub addr: SocketAddr,
    /// The login user in the guest.
    pub user: String,
    /// The private key nook holds for that VM (OpenSSH format).
    pub private_key_openssh: String,
    /// The guest's host keys (`ALGO BASE64`), which nook made: the guest must present one.
    pub host_keys: Vec<String>,
    /// How long a refused connection is tried again: nonzero while the guest's sshd is known
    /// to be restarting (a fork taking its own host keys), zero otherwise.
    pub refused_patience: std::time::Duration,
}

impl std::fmt::Debug for SshdEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshdEndpoint")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("private_key_openssh", &"<redacted>")
            .finish()
    }
}

/// A shell or command to start in a VM, as an SSH session asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    /// `None` starts the login user's interactive login shell; otherwise it runs
    /// `SHELL -c COMMAND`, as sshd does.
    pub command: Option<String>,
    /// From `SendEnv`/`SetEnv` (bounded in number and size).
    pub env: Vec<(String, String)>,
    pub pty: Option<GuestPty>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// From the client to a process in a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestInput {
    Data(Bytes),
    Eof,
    Resize {
        cols: u32,
        rows: u32,
    },
    /// A Linux signal number.
    Signal(i32),
    /// The client went away: SIGHUP, as sshd does.
    Hangup,
}

/// From a process in a VM to the client, ending with `Exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// A process started by a [`GuestShell`]. Both channels are bounded: a slow client slows the
/// process down instead of growing a buffer.
pub struct GuestSession {
    pub input: mpsc::Sender<GuestInput>,
    pub output: mpsc::Receiver<GuestOutput>,
}

/// Starts shells and commands in one VM (the daemon does it through the guest agent).
pub trait GuestShell: Send + Sync + 'static {
    /// Starts `cmd`; the error is a message for the user.
    fn start(
        &self,
        cmd: GuestCommand,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<GuestSession, String>> + Send + '_>>;
}

/// Where `user@HOST` leads.
#[derive(Clone, Debug)]
pub enum Route {
    Lobby,
    Vm(VmEndpoint),
    /// The user named a VM the caller may enter but it can't be entered now
    /// (stopped, no sshd): the message for the user.
    Unavailable(String),
}

/// One piece of lobby output, in the order it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LobbyOutput {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

/// Stdin bytes buffered for a lobby command beyond this are discarded.
const STDIN_BUDGET: usize = 4 << 20;
/// Output queued for a client beyond this makes a command that relays a stream wait
/// ([`LobbyIo::writable`]): a client that stops reading then stops the stream instead of
/// growing the daemon's memory.
pub const OUTPUT_BUDGET: usize = 256 << 10;

/// How much output is queued and not yet taken by the session, and a wake-up for a command
/// waiting for it to shrink.
#[derive(Debug, Default)]
struct Backlog {
    bytes: AtomicUsize,
    /// Set when the session stops taking output: nothing waits on it any more.
    gone: AtomicBool,
    drained: tokio::sync::Notify,
}

/// The session's end of a [`LobbyIo`]'s output, which keeps its backlog count.
#[derive(Debug)]
pub struct OutputQueue {
    rx: mpsc::UnboundedReceiver<LobbyOutput>,
    backlog: Arc<Backlog>,
}

impl OutputQueue {
    pub async fn recv(&mut self) -> Option<LobbyOutput> {
        let output = self.rx.recv().await?;
        self.taken(&output);
        Some(output)
    }

    pub fn try_recv(&mut self) -> Option<LobbyOutput> {
        let output = self.rx.try_recv().ok()?;
        self.taken(&output);
        Some(output)
    }

    fn taken(&self, output: &LobbyOutput) {
        let (LobbyOutput::Out(bytes) | LobbyOutput::Err(bytes)) = output;
        self.backlog.bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
        self.backlog.drained.notify_waiters();
    }
}

impl Drop for OutputQueue {
    fn drop(&mut self) {
        self.backlog.gone.store(true, Ordering::Relaxed);
        self.backlog.drained.notify_waiters();
    }
}

#[derive(Debug)]
struct Stdin {
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    /// Set once bytes were dropped over the budget, so a reader that wants all of stdin can
    /// refuse a stream with a hole in it instead of using it.
    overflowed: Arc<AtomicBool>,
}

/// Stdin was longer than [`LobbyIo::read_stdin_to_end`] was allowed to read.
#[derive(Debug, thiserror::Error)]
#[error("stdin is longer than {limit} bytes")]
pub struct StdinTooLong {
    pub limit: usize,
}

/// The terminal side of one lobby command.
///
/// Writes never block: output is queued and sent to the SSH channel (under
/// SSH flow control) by the session. A command that relays a stream of any length awaits
/// [`LobbyIo::writable`] between writes, which bounds the queue. Clones share the same streams.
#[derive(Debug, Clone)]
pub struct LobbyIo {
    tty: bool,
    width: Arc<AtomicU16>,
    tx: mpsc::UnboundedSender<LobbyOutput>,
    backlog: Arc<Backlog>,
    stdin: Option<Arc<Stdin>>,
}

/// The writing end of a [`LobbyIo`]'s stdin.
#[derive(Debug)]
pub(crate) struct StdinWriter {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    overflowed: Arc<AtomicBool>,
}

impl StdinWriter {
    /// Queues `data`; drops it once the command has `STDIN_BUDGET` bytes unread.
    pub(crate) fn push(&self, data: &[u8]) {
        // An empty chunk would read as end of input to a reader taking one chunk at a time.
        if data.is_empty() {
            return;
        }
        let queued = self.queued.load(Ordering::Relaxed);
        if queued + data.len() > STDIN_BUDGET {
            self.overflowed.store(true, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(data.len(), Ordering::Relaxed);
        let _ = self.tx.send(data.to_vec());
    }
}

impl LobbyIo {
    /// A `LobbyIo` whose output is read from the returned queue and whose
    /// stdin is empty. For running lobby commands outside SSH (tests, the HTTP API).
    pub fn channel(tty: bool, width: u16) -> (Self, OutputQueue) {
        let (io, queue, _) = Self::for_session(tty, Arc::new(AtomicU16::new(width)), false);
        (io, queue)
    }

    pub(crate) fn for_session(
        tty: bool,
        width: Arc<AtomicU16>,
        with_stdin: bool,
    ) -> (Self, OutputQueue, Option<StdinWriter>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let (stdin, writer) = if with_stdin {
            let (stx, srx) = mpsc::unbounded_channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let overflowed = Arc::new(AtomicBool::new(false));
            let stdin = Stdin {
                rx: tokio::sync::Mutex::new(srx),
                queued: queued.clone(),
                overflowed: overflowed.clone(),
            };
            let writer = StdinWriter {
                tx: stx,
                queued,
                overflowed,
            };
            (Some(Arc::new(stdin)), Some(writer))
        } else {
            (None, None)
        };
        (
            Self {
                tty,
                width,
                tx,
                backlog: backlog.clone(),
                stdin,
            },
            OutputQueue { rx, backlog },
            writer,
        )
    }

    /// Whether the client asked for a terminal (draw progress bars, colours).
    pub fn tty(&self) -> bool {
        self.tty
    }

    /// The terminal width in columns (80 without a pty); follows window changes.
    pub fn width(&self) -> u16 {
        self.width.load(Ordering::Relaxed)
    }

    /// Writes to stdout. With a tty, `\n` is sent as `\r\n`.
    pub fn out(&self, bytes: &[u8]) {
        self.queue(LobbyOutput::Out(bytes.to_vec()));
    }

    /// Writes to stderr. With a tty, `\n` is sent as `\r\n`.
    pub fn err(&self, bytes: &[u8]) {
        self.queue(LobbyOutput::Err(bytes.to_vec()));
    }

    fn queue(&self, output: LobbyOutput) {
        let (LobbyOutput::Out(bytes) | LobbyOutput::Err(bytes)) = &output;
        let len = bytes.len();
        if len == 0 {
            return;
        }
        // Counted before it is sent, so the session's subtraction never comes first.
        self.backlog.bytes.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(output).is_err() {
            self.backlog.bytes.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// Resolves once less than [`OUTPUT_BUDGET`] bytes wait for the client (or the client is
    /// gone). A command relaying a stream awaits it before each write.
    pub async fn writable(&self) {
        loop {
            // Made before the check, so a drain between the check and the wait is not missed.
            let drained = self.backlog.drained.notified();
            if self.backlog.gone.load(Ordering::Relaxed)
                || self.backlog.bytes.load(Ordering::Relaxed) < OUTPUT_BUDGET
            {
                return;
            }
            drained.await;
        }
    }

    /// The next chunk of the client's stdin, or `None` at end of input.
    /// Only `ssh HOST CMD` has stdin; in the REPL this returns `None` at once.
    pub async fn read_stdin(&self) -> Option<Vec<u8>> {
        let stdin = self.stdin.as_ref()?;
        let chunk = stdin.rx.lock().await.recv().await?;
        stdin.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        Some(chunk)
    }

    /// All of the client's stdin up to its end, at most `limit` bytes (empty without stdin).
    /// Longer input is refused rather than cut short: a truncated script would run half-way.
    pub async fn read_stdin_to_end(&self, limit: usize) -> Result<Vec<u8>, StdinTooLong> {
        let mut all = Vec::new();
        let too_long = StdinTooLong { limit };
        while let Some(chunk) = self.read_stdin().await {
            if all.len() + chunk.len() > limit {
                return Err(too_long);
            }
            all.extend_from_slice(&chunk);
        }
        let overflowed = self
            .stdin
            .as_ref()
            .is_some_and(|s| s.overflowed.load(Ordering::Relaxed));
        if overflowed {
            return Err(too_long);
        }
        Ok(all)
    }
}

/// What the daemon provides to the SSH front door.
pub trait Backend: Send + Sync + 'static {
    /// The account owning this key (`"ssh-ed25519 AAAA…"`), if any.
    fn account_for_key(&self, key_openssh: &str) -> impl Future<Output = Option<Account>> + Send;
    /// Where `user@HOST` leads for this caller.
    fn route(&self, caller: &Caller) -> impl Future<Output = Route> + Send;
    /// Runs one lobby command (argv already split like a shell would, without
    /// a program name). Returns the exit status.
    fn lobby(
        &self,
        caller: &Caller,
        argv: Vec<String>,
        io: LobbyIo,
    ) -> impl Future<Output = u32> + Send;
    /// Words the REPL completes: command names and the caller's VM names.
    fn completions(&self, caller: &Caller) -> impl Future<Output = Vec<String>> + Send;
}

/// Errors that stop the SSH front door.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("Bind SSH listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Read host key {path}")]
    ReadHostKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Parse host key {path}")]
    ParseHostKey {
        path: PathBuf,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("Write host key {path}")]
    WriteHostKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Encode host key")]
    EncodeHostKey(#[source] russh::keys::ssh_key::Error),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod stdin_tests {
    use super::*;

    fn session() -> (LobbyIo, StdinWriter) {
        let (io, _out, writer) = LobbyIo::for_session(false, Arc::new(AtomicU16::new(80)), true);
        (io, writer.unwrap())
    }

    #[tokio::test]
    async fn an_empty_chunk_is_not_end_of_input() {
        let (io, w) = session();
        w.push(b"");
        w.push(b"echo hi\n");
        drop(w);
        assert_eq!(io.read_stdin().await.unwrap(), b"echo hi\n");
        assert_eq!(io.read_stdin().await, None);
    }

    #[tokio::test]
    async fn reads_every_chunk_to_the_end() {
        let (io, w) = session();
        let reader = tokio::spawn(async move { io.read_stdin_to_end(1 << 20).await });
        for i in 0..100u8 {
            w.push(&[i; 1000]);
        }
        drop(w);
        let all = reader.await.unwrap().unwrap();
        assert_eq!(all.len(), 100_000);
        assert!(all.chunks(1000).enumerate().all(|(i, c)| c[0] == i as u8));
    }

    #[tokio::test]
    async fn refuses_input_over_the_limit() {
        let (io, w) = session();
        w.push(&[b'x'; 600]);
        w.push(&[b'x'; 600]);
        drop(w);
        let err = io.read_stdin_to_end(1000).await.unwrap_err();
        assert_eq!(err.limit, 1000);
    }

    #[tokio::test]
    async fn refuses_input_the_budget_dropped() {
        let (io, w) = session();
        w.push(&vec![b'x'; STDIN_BUDGET]);
        w.push(b"lost");
        drop(w);
        assert!(io.read_stdin_to_end(usize::MAX).await.is_err());
    }
}
