//! `nook-guest-agent`: the agent that runs inside every VM and answers the host daemon over one
//! virtio-serial port (see `nook-proto` for the framing and the message set).
//!
//! It does boot set-up from the kernel command line ([`boot::setup`]), then serves the port
//! ([`port::run`]): readiness, process spawning with or without a pty, file reads and writes,
//! metrics and shutdown. The dispatch core ([`Agent::serve`]) works on any byte stream, so tests
//! drive it over a `UnixStream` pair on the host.
//!
//! It must not: depend on an async runtime or on NSS (it is linked statically, so users come
//! from parsing `/etc/passwd` and `/etc/group`), exit on bad input from the host, or leave
//! zombies behind (every spawned child is waited for by its own thread).

/// Logs one line to stderr (the serial console, or the journal), never blocking: see [`logger`].
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::logger::line(format!($($arg)*))
    };
}

pub mod boot;
mod files;
mod identity;
pub mod link;
pub mod logger;
pub mod metrics;
pub mod port;
pub mod power;
mod process;
mod server;
mod sys;
pub mod users;

pub use server::{Agent, PowerHook};

use nook_proto::ErrorKind;
use std::io;
use std::path::PathBuf;

/// A request that failed, as it goes back to the host in `GuestMsg::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// An I/O error while doing `what`, with its kind mapped onto the wire's.
    pub fn io(what: impl std::fmt::Display, err: &io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{what}: {err}"))
    }
}

/// Directories searched for system tools (`ip`, `resize2fs`, `poweroff`), whatever the agent's
/// own `PATH` is: init may start it with none.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The full path of a system tool, if it is installed.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    SYSTEM_PATH
        .split(':')
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.is_file())
}

/// Locks a mutex, ignoring poisoning: a panicked thread must not take the agent down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
