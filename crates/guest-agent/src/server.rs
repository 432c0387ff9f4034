//! The dispatch core: frames in, frames out, over any byte stream.

use crate::{Failure, files, lock, metrics, process};
use nook_proto::{ErrorKind, FrameBuf, GuestFrame, GuestMsg, HostFrame, HostMsg};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

/// What `Shutdown` finally does, given `reboot`. The real one is [`crate::power::power_off`];
/// tests pass a recorder.
pub type PowerHook = Arc<dyn Fn(bool) + Send + Sync>;

/// Where frames go: the current connection, shared by the port loop and every spawn's threads.
struct Out {
    writer: Option<Box<dyn Write + Send>>,
    /// A write failed since the writer was set; later failures are not logged again.
    failed: bool,
}

pub(crate) struct Shared {
    out: Mutex<Out>,
    pub procs: Mutex<HashMap<u64, Arc<process::Proc>>>,
    power: PowerHook,
}

impl Shared {
    /// Writes one frame whole, under the writer lock. A failed write (no host) is logged once
    /// per connection and otherwise dropped.
    pub fn send(&self, id: u64, msg: GuestMsg) {
        let bytes = match nook_proto::encode(&GuestFrame { id, msg }) {
            Ok(b) => b,
            Err(e) => {
                log!("cannot encode a reply to {id}: {e}");
                return;
            }
        };
        let mut out = lock(&self.out);
        let Some(writer) = out.writer.as_mut() else {
            return;
        };
        if let Err(e) = writer.write_all(&bytes).and_then(|()| writer.flush())
            && !out.failed
        {
            out.failed = true;
            log!("cannot write to the host: {e}");
        }
    }

    fn fail(&self, id: u64, failure: Failure) {
        self.send(
            id,
            GuestMsg::Error {
                kind: failure.kind,
                message: failure.message,
            },
        );
    }
}

/// The agent: its process table and its current connection. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    /// An agent whose `Shutdown` really powers the machine off.
    pub fn new() -> Self {
        Self::with_power_hook(crate::power::power_off)
    }

    /// An agent whose `Shutdown` calls `hook(reboot)` (after replying `Ok`) instead.
    pub fn with_power_hook(hook: impl Fn(bool) + Send + Sync + 'static) -> Self {
        Self {
            shared: Arc::new(Shared {
                out: Mutex::new(Out {
                    writer: None,
                    failed: false,
                }),
                procs: Mutex::new(HashMap::new()),
                power: Arc::new(hook),
            }),
        }
    }

    /// Sends all later frames, including output of processes already running, to `writer`.
    pub fn set_writer(&self, writer: impl Write + Send + 'static) {
        {
            let mut out = lock(&self.shared.out);
            out.writer = Some(Box::new(writer));
            out.failed = false;
        }
        self.host_gone();
    }

    /// The host end closed (the daemon restarted, or a new connection replaces it): nobody
    /// will acknowledge the output of the processes running now, so let them run free instead
    /// of waiting forever.
    pub fn host_gone(&self) {
        self.host_gone_but(&[]);
    }

    /// [`Agent::host_gone`] for the processes the new host did not start: those in `started`
    /// keep their windows.
    fn host_gone_but(&self, started: &[u64]) {
        for (id, proc) in lock(&self.shared.procs).iter() {
            if !started.contains(id) {
                proc.release_window();
            }
        }
    }

    /// Drops the current writer; frames are discarded until the next [`Agent::set_writer`].
    pub fn disconnect(&self) {
        lock(&self.shared.out).writer = None;
    }

    /// Serves one connection: replies go to `writer`, requests are read from `reader` until it
    /// reports end of file. Spawned processes outlive the connection.
    pub fn serve(&self, reader: impl Read, writer: impl Write + Send + 'static) -> io::Result<()> {
        self.set_writer(writer);
        self.read_frames(reader, &mut FrameBuf::new())
    }

    /// Reads and handles frames until end of file (`Ok`) or a read error.
    pub fn read_frames(&self, mut reader: impl Read, frames: &mut FrameBuf) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            frames.push(&buf[..n]);
            while let Some(body) = frames.next_body() {
                self.handle_body(&body);
            }
        }
    }

    /// Handles one frame body. One that does not decode is answered with `InvalidRequest`,
    /// under its id when the body still shows one, else id 0.
    pub fn handle_body(&self, body: &[u8]) {
        match nook_proto::decode::<HostFrame>(body) {
            Ok(frame) => self.dispatch(frame),
            Err(e) => {
                let id = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64())
                    .unwrap_or(0);
                log!("undecodable frame (id {id}): {e}");
                self.shared.fail(
                    id,
                    Failure::new(ErrorKind::InvalidRequest, format!("Undecodable frame: {e}")),
                );
            }
        }
    }

    /// Handles one request. Follow-ups to a process (`Stdin`, `CloseStdin`, `Resize`, `Signal`)
    /// are answered only when they fail.
    pub fn dispatch(&self, frame: HostFrame) {
        let shared = &self.shared;
        let id = frame.id;
        let result = match frame.msg {
            HostMsg::Hello { version: _ } => {
                shared.send(id, hello());
                Ok(())
            }
            HostMsg::Spawn(req) => process::spawn(shared, id, req),
            HostMsg::Stdin { data } => process::write_stdin(shared, id, data),
            HostMsg::CloseStdin => process::close_stdin(shared, id),
            HostMsg::Resize { cols, rows } => process::resize(shared, id, cols, rows),
            HostMsg::Signal { signal } => process::signal(shared, id, signal),
            HostMsg::OutputAck { bytes } => process::output_ack(shared, id, bytes),
            HostMsg::Hangup => process::hangup(shared, id),
            HostMsg::NewHost { started } => {
                self.host_gone_but(&started);
                shared.send(id, GuestMsg::Ok);
                Ok(())
            }
            HostMsg::ReadFile { path, offset, len } => files::read(&path, offset, len)
                .map(|data| shared.send(id, GuestMsg::FileData { data })),
            HostMsg::WriteFile {
                path,
                data,
                append,
                mode,
            } => files::write(&path, &data, append, mode).map(|()| shared.send(id, GuestMsg::Ok)),
            HostMsg::Identify(identity) => {
                let applied = crate::identity::apply(&identity);
                if applied.cloned {
                    // What runs through the agent now was started by the source's sessions,
                    // which stream on from the source: here nobody will read it, as if their
                    // connection had dropped.
                    process::hangup_all(shared);
                }
                shared.send(
                    id,
                    GuestMsg::Identified {
                        cloned: applied.cloned,
                        sshd: applied.sshd,
                    },
                );
                Ok(())
            }
            HostMsg::Metrics => {
                shared.send(id, GuestMsg::Metrics(metrics::collect()));
                Ok(())
            }
            HostMsg::Shutdown { reboot } => {
                shared.send(id, GuestMsg::Ok);
                log!(
                    "{} requested by the host",
                    if reboot { "reboot" } else { "power-off" }
                );
                let power = Arc::clone(&shared.power);
                // Off the port loop, so the agent keeps answering until the end.
                if let Err(e) = std::thread::Builder::new()
                    .name("shutdown".into())
                    .spawn(move || power(reboot))
                {
                    log!("cannot start the shutdown thread ({e}); shutting down inline");
                    (shared.power)(reboot);
                }
                Ok(())
            }
        };
        if let Err(failure) = result {
            shared.fail(id, failure);
        }
    }
}

fn hello() -> GuestMsg {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    GuestMsg::Hello {
        version: nook_proto::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname,
        boot_id,
    }
}
