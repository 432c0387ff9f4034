//! On a fleet, a lobby command about a VM another host holds (its disk and QEMU are there),
//! or a new VM placed on another host, is passed on to that host over the host channel and
//! run there for the same caller; what it prints comes back as it is printed. This host has
//! already authenticated the caller and checked its token's limits; the other host checks
//! everything else (sign-up, envelope, ownership) against the shared store as usual.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use nook_channel::{LobbyOut, LobbyRequest};

use super::*;

/// Output a peer's command may queue ahead of the channel before it waits
/// ([`LobbyOutput::writable`]).
const PEER_BACKLOG: usize = 256 << 10;

/// The host that should run `command`, when that is not this one.
pub(super) async fn host_for(
    m: &Arc<Manager>,
    caller: &Caller,
    command: &LobbyCommand,
) -> Result<Option<String>, ApiError> {
    if !m.in_fleet() {
        if let LobbyCommand::New(args) = command {
            // Refuses an --on that names another host.
            m.place(None, None, args.on.as_deref()).await?;
        }
        return Ok(None);
    }
    let scope = match (&caller.account, caller.admin) {
        (_, true) => Scope::Admin,
        (Some(account), false) => Scope::Account(&account.id),
        (None, false) => return Ok(None),
    };
    let names: Vec<&str> = match command {
        LobbyCommand::New(args) => {
            return m
                .place(
                    args.image.as_deref(),
                    args.memory.as_deref(),
                    args.on.as_deref(),
                )
                .await;
        }
        // Restoring from a replica runs where the replica is.
        LobbyCommand::Start { on: Some(on), .. } => {
            return Ok((on != &m.config().host_name).then(|| on.clone()));
        }
        LobbyCommand::Start { name, .. }
        | LobbyCommand::Replicate { name, .. }
        | LobbyCommand::Stop { name }
        | LobbyCommand::Restart { name }
        | LobbyCommand::Resize { name, .. }
        | LobbyCommand::Move { name, .. }
        | LobbyCommand::Stat { name: Some(name) } => vec![name],
        LobbyCommand::Rename { old, .. } => vec![old],
        // A clone goes where its source's layers are.
        LobbyCommand::Cp { source, .. } => vec![source],
        LobbyCommand::Rm { names } => names.iter().map(String::as_str).collect(),
        LobbyCommand::Agent(cmd) => {
            // Collaborators may drive the agent too: the VM's host decides who may, so the
            // command goes there whoever asks (it answers a stranger as for a missing VM).
            return match m.store().get(cmd.vm()).await {
                Ok(vm) => m.lives_elsewhere(&vm),
                Err(_) => Ok(None),
            };
        }
        // (It also rewrites the guest's /etc/hosts.)
        LobbyCommand::Integrations(
            nook_api::lobby::IntegrationsCommand::Attach { vm, .. }
            | nook_api::lobby::IntegrationsCommand::Detach { vm, .. },
        ) => vec![vm],
        _ => return Ok(None),
    };
    let mut hosts = BTreeSet::new();
    for name in &names {
        // A VM this caller cannot see is this host's to refuse, in its own words.
        let host = match m.record(name, scope).await {
            Ok(vm) => m.lives_elsewhere(&vm)?,
            Err(_) => None,
        };
        hosts.insert(host);
    }
    if hosts.len() > 1 {
        let named: Vec<String> = hosts
            .iter()
            .map(|h| h.clone().unwrap_or_else(|| m.config().host_name.clone()))
            .collect();
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!(
                "These VMs live on different hosts ({}): name the VMs of one host at a time",
                named.join(", ")
            ),
        ));
    }
    Ok(hosts.into_iter().next().flatten())
}

/// Runs the command on `host` and relays what it prints; returns its exit status.
pub(super) async fn run_on(
    m: &Arc<Manager>,
    caller: &Caller,
    host: &str,
    argv: Vec<String>,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
) -> u32 {
    let json = argv.iter().any(|a| a == "--json");
    let failed = |io: &dyn LobbyOutput, why: String| {
        report(io, json, &ApiError::new(ErrorCode::HostDown, why));
        1
    };
    let stdin = match stdin {
        Some(Err(err)) => {
            report(io, json, &err);
            return 1;
        }
        Some(Ok(bytes)) => Some(bytes),
        None => None,
    };
    let (identity, addr) = match m.channel_route(host).await {
        Ok(route) => route,
        Err(why) => {
            return failed(
                io,
                format!("This needs host '{host}', which cannot be reached: {why}"),
            );
        }
    };
    let request = LobbyRequest {
        account_id: caller.account.as_ref().map(|a| a.id.clone()),
        admin: caller.admin,
        key_openssh: caller.key_openssh.clone(),
        fingerprint: caller.fingerprint.clone(),
        peer: caller.peer,
        tty: io.tty(),
        argv,
        stdin,
    };
    let mut output = match nook_channel::lobby(&identity, host, &addr, request).await {
        Ok(output) => output,
        Err(err) => {
            tracing::warn!(host, %err, "could not pass a lobby command on");
            return failed(
                io,
                format!(
                    "This needs host '{host}', which cannot be reached right now: try again in a minute"
                ),
            );
        }
    };
    while let Some(out) = output.recv().await {
        // Each frame waits for the client to take what came before: a client that stops
        // reading stops the command's output at the other host, not in this one's memory.
        match out {
            LobbyOut::Out(bytes) => {
                io.writable().await;
                io.out(&bytes);
            }
            LobbyOut::Err(bytes) => {
                io.writable().await;
                io.err(&bytes);
            }
            LobbyOut::Step { step, json } => {
                io.writable().await;
                io.step(&step, json);
            }
            LobbyOut::Failed { error } => {
                if let Ok(err) = serde_json::from_value::<ApiError>(error) {
                    io.failed(&err);
                }
            }
            LobbyOut::Exit(code) => return code,
        }
    }
    failed(
        io,
        format!(
            "Host '{host}' went away before the command finished: see `ls` for where it got to"
        ),
    )
}

/// The other end of [`run_on`]: runs a command another host passed on, here.
pub async fn run_for_peer(
    m: &Arc<Manager>,
    request: LobbyRequest,
    out: tokio::sync::mpsc::Sender<LobbyOut>,
) {
    let account = match &request.account_id {
        Some(id) => match m.store().account_by_id(id).await {
            Ok(account) => account,
            Err(e) => {
                let err = crate::errors::from_store("look up an account", e);
                let _ = out
                    .send(LobbyOut::Err(format!("{}\n", err.message).into_bytes()))
                    .await;
                let _ = out.send(LobbyOut::Exit(1)).await;
                return;
            }
        },
        None => None,
    };
    let caller = Caller {
        account,
        key_openssh: request.key_openssh,
        fingerprint: request.fingerprint,
        peer: request.peer,
        limits: None,
        admin: request.admin,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let io = PeerIo {
        tx,
        tty: request.tty,
        backlog: backlog.clone(),
    };
    let relay = async {
        while let Some((frame, size)) = rx.recv().await {
            let done = matches!(frame, LobbyOut::Exit(_));
            if out.send(frame).await.is_err() {
                // The asking host went away: the command runs on, unheard.
                backlog.gone();
                return;
            }
            backlog.taken(size);
            if done {
                return;
            }
        }
    };
    let stdin = request.stdin.map(Ok);
    let run = async {
        let code = run_here(m, &caller, request.argv, stdin, &io).await;
        let _ = io.tx.send((LobbyOut::Exit(code), 0));
    };
    tokio::join!(run, relay);
}

#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    gone: std::sync::atomic::AtomicBool,
    drained: tokio::sync::Notify,
}

impl Backlog {
    fn taken(&self, size: usize) {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.drained.notify_waiters();
    }

    fn gone(&self) {
        self.gone.store(true, Ordering::Relaxed);
        self.drained.notify_waiters();
    }
}

/// What a passed-on command prints, on its way back to the host that asked.
struct PeerIo {
    tx: tokio::sync::mpsc::UnboundedSender<(LobbyOut, usize)>,
    tty: bool,
    backlog: Arc<Backlog>,
}

impl PeerIo {
    fn send(&self, bytes: &[u8], frame: fn(Vec<u8>) -> LobbyOut) {
        for chunk in bytes.chunks(nook_channel::CHUNK) {
            self.backlog.bytes.fetch_add(chunk.len(), Ordering::Relaxed);
            let _ = self.tx.send((frame(chunk.to_vec()), chunk.len()));
        }
    }
}

impl LobbyOutput for PeerIo {
    fn out(&self, bytes: &[u8]) {
        self.send(bytes, LobbyOut::Out);
    }

    fn err(&self, bytes: &[u8]) {
        self.send(bytes, LobbyOut::Err);
    }

    fn tty(&self) -> bool {
        self.tty
    }

    fn writable(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let drained = self.backlog.drained.notified();
                if self.backlog.bytes.load(Ordering::Relaxed) < PEER_BACKLOG
                    || self.backlog.gone.load(Ordering::Relaxed)
                {
                    return;
                }
                drained.await;
            }
        })
    }

    fn failed(&self, err: &ApiError) {
        if let Ok(error) = serde_json::to_value(err) {
            let _ = self.tx.send((LobbyOut::Failed { error }, 0));
        }
    }

    fn step(&self, step: &str, json: bool) {
        // Counted like output: a command makes a handful of steps, but nothing here may grow
        // without the client taking it.
        self.backlog.bytes.fetch_add(step.len(), Ordering::Relaxed);
        let _ = self.tx.send((
            LobbyOut::Step {
                step: step.to_string(),
                json,
            },
            step.len(),
        ));
    }
}
