//! `Spawn` and the follow-ups addressed to a spawned process (`Stdin`, `CloseStdin`, `Resize`,
//! `Signal`).
//!
//! Each spawn gets threads: one per output stream (pipes, or the pty master), one feeding
//! stdin from a queue (so a child that does not read cannot block the port loop), and a waiter
//! that reaps the child, waits for the output threads to drain, then sends `Exit`.
//!
//! **Invariant:** a spawned child is always a session and process-group leader, and it stays in
//! the process table until it has exited. Signals go to its process group, and never after the
//! waiter has seen it exit, so a recycled pid can never be hit.

use crate::server::Shared;
use crate::sys::{self, Ids};
use crate::users::{self, Account};
use crate::{Failure, lock};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::{Pid, Uid};
use nook_proto::{ErrorKind, GuestMsg, PtySize, SpawnRequest, Stream};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

/// The default `PATH` of spawned processes.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest `Output` payload; well below `nook_proto::CHUNK` to keep latency low.
const READ_CHUNK: usize = 64 * 1024;
/// What `CloseStdin` sends to a pty: the default VEOF character (^D).
const PTY_EOF: u8 = 0x04;

/// A running spawned process, as the host addresses it by its spawn id.
pub(crate) struct Proc {
    pid: u32,
    /// Set by the waiter once the child has exited, before it is reaped.
    exited: Mutex<bool>,
    /// Queue to the stdin feeder; `None` when stdin is /dev/null or was closed.
    stdin: Mutex<Option<Sender<Input>>>,
    /// The pty master, for `Resize`.
    pty: Option<OwnedFd>,
    /// Output the host has not acknowledged yet may not pass this (`SpawnRequest::window`).
    window: Option<Arc<Window>>,
}

/// Output flow control: bytes the process may still send before the host acknowledges more.
/// Released (unlimited) when the host that asked for it is gone, so nothing waits forever.
pub(crate) struct Window {
    credit: Mutex<i64>,
    grown: Condvar,
    /// Set by `Hangup`: nobody reads the output any more.
    hung_up: std::sync::atomic::AtomicBool,
}

impl Window {
    fn new(bytes: u32) -> Self {
        Self {
            credit: Mutex::new(i64::from(bytes)),
            grown: Condvar::new(),
            hung_up: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Blocks while no credit is left.
    fn wait(&self) {
        let mut credit = lock(&self.credit);
        while *credit <= 0 {
            credit = self
                .grown
                .wait(credit)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn spend(&self, bytes: usize) {
        *lock(&self.credit) -= bytes as i64;
    }

    fn grant(&self, bytes: u64) {
        let mut credit = lock(&self.credit);
        *credit = credit.saturating_add(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.grown.notify_all();
    }
}

impl Proc {
    /// Lifts flow control: the host that asked for it is gone.
    pub(crate) fn release_window(&self) {
        if let Some(w) = &self.window {
            w.grant(u64::MAX);
        }
    }
}

enum Input {
    Data(Vec<u8>),
    Close,
}

fn no_such_process(id: u64) -> Failure {
    Failure::new(
        ErrorKind::NoSuchProcess,
        format!("No running process for id {id}"),
    )
}

fn get(shared: &Shared, id: u64) -> Result<Arc<Proc>, Failure> {
    lock(&shared.procs)
        .get(&id)
        .cloned()
        .ok_or_else(|| no_such_process(id))
}

/// The account a spawn runs as, and whether the agent must switch to it.
fn account_for(user: Option<&str>) -> Result<(Account, Option<Ids>), Failure> {
    match user {
        Some(name) => {
            let (account, groups) = users::lookup(name).ok_or_else(|| {
                Failure::new(ErrorKind::NotFound, format!("No such user: {name}"))
            })?;
            let ids = Ids {
                uid: account.uid,
                gid: account.gid,
                groups,
            };
            Ok((account, Some(ids)))
        }
        None => {
            let root = users::lookup("root").map(|(a, _)| a).unwrap_or(Account {
                name: "root".into(),
                uid: 0,
                gid: 0,
                home: "/root".into(),
                shell: "/bin/sh".into(),
            });
            Ok((root, None))
        }
    }
}

fn build_env(req: &SpawnRequest, account: &Account) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(entry) = env.iter_mut().find(|(key, _)| key == k) {
            entry.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    set("PATH", DEFAULT_PATH);
    set("HOME", &account.home);
    set("USER", &account.name);
    set("LOGNAME", &account.name);
    set("SHELL", &account.shell);
    if req.pty.is_some() {
        set("TERM", "xterm-256color");
    }
    for (k, v) in &req.env {
        set(k, v);
    }
    env
}

/// A new pty of `size`: `(master, slave)`, both close-on-exec.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::pty::posix_openpt(flags)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(name.as_str(), flags, Mode::empty())?;
    let master = OwnedFd::from(master);
    sys::set_winsize(master.as_fd(), size.cols, size.rows)?;
    Ok((master, slave))
}

fn start_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match thread::Builder::new().name(name.to_string()).spawn(f) {
        Ok(h) => Some(h),
        Err(e) => {
            log!("cannot start {name} thread: {e}");
            None
        }
    }
}

/// Starts `req` and its helper threads; `Spawned` is sent before any output. On error nothing
/// was started and the caller reports the failure.
pub(crate) fn spawn(shared: &Arc<Shared>, id: u64, req: SpawnRequest) -> Result<(), Failure> {
    if !req.shell && req.argv.is_empty() {
        return Err(Failure::new(ErrorKind::InvalidRequest, "Empty argv"));
    }
    if req.shell && req.argv.len() > 1 {
        return Err(Failure::new(
            ErrorKind::InvalidRequest,
            "A shell spawn takes one command line, or none for a login shell",
        ));
    }
    if lock(&shared.procs).contains_key(&id) {
        return Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!("Id {id} is already running a process"),
        ));
    }
    let (account, ids) = account_for(req.user.as_deref())?;
    let cwd = match &req.cwd {
        Some(cwd) => cwd.clone(),
        None if Path::new(&account.home).is_dir() => account.home.clone(),
        None => "/".to_string(),
    };

    let (mut cmd, program) = if req.shell {
        // As sshd does: the account's shell, as a login shell (argv[0] "-bash") when
        // interactive, else `SHELL -c COMMAND`.
        let shell = if Path::new(&account.shell).is_file() {
            account.shell.clone()
        } else {
            "/bin/sh".to_string()
        };
        let mut cmd = Command::new(&shell);
        match req.argv.first() {
            Some(command) => {
                cmd.arg("-c").arg(command);
            }
            None => {
                let name = shell.rsplit('/').next().unwrap_or("sh");
                std::os::unix::process::CommandExt::arg0(&mut cmd, format!("-{name}"));
            }
        }
        (cmd, shell)
    } else {
        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..]);
        (cmd, req.argv[0].clone())
    };
    cmd.env_clear()
        .envs(build_env(&req, &account))
        .current_dir(&cwd);

    // Output sources, stdin sink and pty master, all prepared before the fork so nothing can
    // fail once the child runs.
    let mut pty_reader = None;
    let mut stdin_sink: Option<Box<dyn Write + Send>> = None;
    let mut pty_master = None;
    if let Some(size) = req.pty {
        let pty_err = |e: io::Error| Failure::io("allocate a pty", &e);
        let (master, slave) = open_pty(size).map_err(pty_err)?;
        if let Some(ids) = &ids {
            // As login does: the user owns their terminal (group stays, mode 620), so programs
            // that reopen it by name work.
            nix::unistd::fchown(&slave, Some(Uid::from_raw(ids.uid)), None)
                .map_err(|e| pty_err(e.into()))?;
            nix::sys::stat::fchmod(&slave, Mode::from_bits_truncate(0o620))
                .map_err(|e| pty_err(e.into()))?;
        }
        pty_reader = Some(File::from(master.try_clone().map_err(pty_err)?));
        stdin_sink = Some(Box::new(File::from(master.try_clone().map_err(pty_err)?)));
        cmd.stdin(Stdio::from(slave.try_clone().map_err(pty_err)?))
            .stdout(Stdio::from(slave.try_clone().map_err(pty_err)?))
            .stderr(Stdio::from(slave));
        pty_master = Some(master);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    sys::configure_child(&mut cmd, req.pty.is_some(), ids);

    let mut child = cmd
        .spawn()
        .map_err(|e| Failure::io(format!("Cannot run {program}"), &e))?;
    // Drops the parent's copies of the pty slave, so the master sees EOF when the child is done.
    drop(cmd);
    let pid = child.id();

    if let Some(pipe) = child.stdin.take() {
        stdin_sink = Some(Box::new(pipe));
    }
    let is_pty = pty_master.is_some();
    let ack_to = req.window.map(|_| Arc::clone(shared));
    let stdin_tx = stdin_sink.and_then(|sink| {
        let (tx, rx) = mpsc::channel();
        start_thread("stdin", move || feed(sink, rx, is_pty, ack_to, id)).map(|_| tx)
    });
    let window = req.window.map(|bytes| Arc::new(Window::new(bytes)));
    let proc = Arc::new(Proc {
        pid,
        exited: Mutex::new(false),
        stdin: Mutex::new(stdin_tx),
        pty: pty_master,
        window: window.clone(),
    });
    lock(&shared.procs).insert(id, Arc::clone(&proc));
    shared.send(id, GuestMsg::Spawned { pid });

    let mut sources: Vec<(Box<dyn Read + Send>, Stream)> = Vec::new();
    if let Some(r) = pty_reader {
        sources.push((Box::new(r), Stream::Stdout));
    }
    if let Some(r) = child.stdout.take() {
        sources.push((Box::new(r), Stream::Stdout));
    }
    if let Some(r) = child.stderr.take() {
        sources.push((Box::new(r), Stream::Stderr));
    }
    let readers = sources
        .into_iter()
        .filter_map(|(r, stream)| {
            let shared = Arc::clone(shared);
            let window = window.clone();
            start_thread("output", move || pump(&shared, id, r, stream, window))
        })
        .collect();
    let waiter_shared = Arc::clone(shared);
    let waiter_proc = Arc::clone(&proc);
    let waiter = start_thread("wait", move || {
        wait(&waiter_shared, id, child, &waiter_proc, readers)
    });
    if waiter.is_none() {
        // Without a waiter nobody would reap the child: stop it rather than leak a zombie.
        // (Its `Child` moved into the failed closure and was dropped; reap by pid.)
        let _ = sys::signal(pid, libc::SIGKILL, true);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        lock(&shared.procs).remove(&id);
        shared.send(
            id,
            GuestMsg::Exit {
                code: None,
                signal: Some(libc::SIGKILL),
            },
        );
    }
    Ok(())
}

/// Feeds queued stdin to the child. Write errors (the child closed its stdin) drop further data.
/// With flow control (`ack_to`), each chunk is acknowledged once written (or dropped), so the
/// host sends no more than the child takes.
fn feed(
    mut sink: Box<dyn Write + Send>,
    rx: Receiver<Input>,
    pty: bool,
    ack_to: Option<Arc<Shared>>,
    id: u64,
) {
    let mut broken = false;
    while let Ok(input) = rx.recv() {
        match input {
            Input::Data(data) => {
                if !broken {
                    broken = sink.write_all(&data).is_err();
                }
                if let Some(shared) = &ack_to {
                    let bytes = data.len() as u64;
                    shared.send(id, GuestMsg::StdinAck { bytes });
                }
            }
            Input::Close if pty => broken = broken || sink.write_all(&[PTY_EOF]).is_err(),
            Input::Close => return,
        }
    }
}

/// Forwards one output stream as `Output` frames until EOF (or EIO, as a pty master reports it),
/// within the flow-control window if there is one.
fn pump(
    shared: &Shared,
    id: u64,
    mut source: Box<dyn Read + Send>,
    stream: Stream,
    window: Option<Arc<Window>>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if let Some(w) = &window {
            w.wait();
        }
        match source.read(&mut buf) {
            Ok(0) => return,
            // Hung up: dropping the read end makes the process's next write fail (EPIPE).
            Ok(_)
                if window
                    .as_ref()
                    .is_some_and(|w| w.hung_up.load(Ordering::Relaxed)) =>
            {
                return;
            }
            Ok(n) => {
                if let Some(w) = &window {
                    w.spend(n);
                }
                shared.send(
                    id,
                    GuestMsg::Output {
                        stream,
                        data: buf[..n].to_vec(),
                    },
                );
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reaps the child, lets the output drain, then reports `Exit`.
fn wait(
    shared: &Shared,
    id: u64,
    mut child: Child,
    proc: &Arc<Proc>,
    readers: Vec<JoinHandle<()>>,
) {
    let pid = Pid::from_raw(proc.pid as i32);
    // Wait without reaping, so the pid cannot be recycled before `exited` is set.
    while let Err(Errno::EINTR) = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
    {
    }
    *lock(&proc.exited) = true;
    let status = child.wait();
    {
        let mut procs = lock(&shared.procs);
        if procs.get(&id).is_some_and(|p| Arc::ptr_eq(p, proc)) {
            procs.remove(&id);
        }
    }
    // Closing the stdin queue lets the feeder thread end.
    lock(&proc.stdin).take();
    for r in readers {
        let _ = r.join();
    }
    let (code, signal) = match status {
        Ok(status) => (status.code(), status.signal()),
        Err(e) => {
            log!("wait for pid {pid}: {e}");
            (None, None)
        }
    };
    shared.send(id, GuestMsg::Exit { code, signal });
}

pub(crate) fn write_stdin(shared: &Shared, id: u64, data: Vec<u8>) -> Result<(), Failure> {
    let proc = get(shared, id)?;
    let stdin = lock(&proc.stdin);
    match stdin.as_ref().map(|tx| tx.send(Input::Data(data))) {
        Some(Ok(())) => Ok(()),
        _ => Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!("Stdin of process {id} is closed"),
        )),
    }
}

/// Closes a pipe stdin; on a pty, sends the end-of-file character instead (closing the master
/// would hang the terminal up).
pub(crate) fn close_stdin(shared: &Shared, id: u64) -> Result<(), Failure> {
    let proc = get(shared, id)?;
    let mut stdin = lock(&proc.stdin);
    if let Some(tx) = stdin.as_ref() {
        let _ = tx.send(Input::Close);
        if proc.pty.is_none() {
            stdin.take();
        }
    }
    Ok(())
}

/// The host passed on `bytes` of output: the process may send that much more.
pub(crate) fn output_ack(shared: &Shared, id: u64, bytes: u64) -> Result<(), Failure> {
    // An ack racing the process's exit is normal: nothing to report.
    if let Ok(proc) = get(shared, id)
        && let Some(w) = &proc.window
    {
        w.grant(bytes);
    }
    Ok(())
}

/// The process's user went away: SIGHUP its group, close its stdin, stop reading its output.
pub(crate) fn hangup(shared: &Shared, id: u64) -> Result<(), Failure> {
    let Ok(proc) = get(shared, id) else {
        return Ok(());
    };
    if let Some(w) = &proc.window {
        w.hung_up.store(true, Ordering::Relaxed);
        w.grant(u64::MAX);
    }
    if let Some(tx) = lock(&proc.stdin).take() {
        let _ = tx.send(Input::Close);
    }
    match signal(shared, id, libc::SIGHUP) {
        Err(f) if f.kind == ErrorKind::NoSuchProcess => Ok(()),
        other => other,
    }
}

/// [`hangup`] for every process running through the agent.
pub(crate) fn hangup_all(shared: &Shared) {
    let ids: Vec<u64> = lock(&shared.procs).keys().copied().collect();
    for id in ids {
        if let Err(f) = hangup(shared, id) {
            log!("cannot hang up process {id}: {}", f.message);
        }
    }
}

pub(crate) fn resize(shared: &Shared, id: u64, cols: u16, rows: u16) -> Result<(), Failure> {
    let proc = get(shared, id)?;
    let Some(master) = &proc.pty else {
        return Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!("Process {id} has no pty"),
        ));
    };
    sys::set_winsize(master.as_fd(), cols, rows).map_err(|e| Failure::io("resize pty", &e))
}

/// Signals the process group of the spawn (its own, unless the child left it).
pub(crate) fn signal(shared: &Shared, id: u64, signal: i32) -> Result<(), Failure> {
    let proc = get(shared, id)?;
    let exited = lock(&proc.exited);
    if *exited {
        return Err(no_such_process(id));
    }
    let result = match sys::signal(proc.pid, signal, true) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => sys::signal(proc.pid, signal, false),
        other => other,
    };
    result.map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => no_such_process(id),
        Some(libc::EINVAL) => Failure::new(
            ErrorKind::InvalidRequest,
            format!("Invalid signal {signal}"),
        ),
        _ => Failure::io(format!("signal process {id}"), &e),
    })
}
