//! The SSH front door's view of nook: accounts by key, where `user@HOST` leads, and lobby
//! commands. The SSH protocol itself lives in `nook-sshd`; this is the glue to the manager.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use nook_api::{ErrorCode, lobby::COMMANDS};
use nook_proto::{GuestMsg, PtySize, SpawnRequest, Stream};
use nook_sshd::{
    Account, Backend, Caller, GuestCommand, GuestInput, GuestOutput, GuestSession, GuestShell,
    LobbyIo, Route, VmEndpoint,
};
use nook_vmm::{Process, ProcessHandle};
use tokio::sync::mpsc;

use crate::lobby::{self, LobbyOutput};
use crate::manager::{Manager, Scope};

pub struct FrontDoor {
    manager: Arc<Manager>,
}

impl FrontDoor {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }

    async fn account(&self, key_openssh: &str) -> Option<nook_store::Account> {
        self.try_account(key_openssh).await.ok().flatten()
    }

    /// The key's account; `Err` when the store could not say (it is down), which must not be
    /// taken for "no account": that would tell a user to sign up again.
    async fn try_account(
        &self,
        key_openssh: &str,
    ) -> Result<Option<nook_store::Account>, nook_store::StoreError> {
        let Ok(key) = lobby::parse_public_key(key_openssh) else {
            return Ok(None);
        };
        self.manager.store().account_for_key(&key.fingerprint).await
    }
}

struct Io(LobbyIo);

impl LobbyOutput for Io {
    fn out(&self, bytes: &[u8]) {
        self.0.out(bytes);
    }
    fn err(&self, bytes: &[u8]) {
        self.0.err(bytes);
    }
    fn tty(&self) -> bool {
        self.0.tty()
    }
    fn writable(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.0.writable())
    }
}

/// Only `new --setup-script -`, `--prompt -` and `agent prompt VM -` read stdin; nothing else
/// may block waiting for it.
fn wants_stdin(argv: &[String]) -> bool {
    argv.windows(2)
        .any(|w| w[0] == "--setup-script" && w[1] == "-")
        || argv.iter().any(|a| a == "--setup-script=-")
        || lobby::agent_wants_stdin(argv)
}

impl Backend for FrontDoor {
    async fn account_for_key(&self, key_openssh: &str) -> Option<Account> {
        self.account(key_openssh).await.map(|a| Account {
            id: a.id,
            email: a.email,
        })
    }

    /// A user name that is one of the caller's VMs leads into it; anything else (including
    /// someone else's VM) leads to the lobby, so the two cannot be told apart.
    async fn route(&self, caller: &Caller) -> Route {
        let account = match self.try_account(&caller.key_openssh).await {
            Ok(Some(account)) => account,
            Ok(None) => return Route::Lobby,
            Err(e) => {
                let e = crate::errors::from_store("look up an SSH key's account", e);
                return Route::Unavailable(format!("{}\r\n", e.message));
            }
        };
        if nook_api::validate_name(&caller.user).is_err() {
            return Route::Lobby;
        }
        match vm_shell(&self.manager, &account, &caller.user).await {
            Ok((t, shell)) => Route::Vm(VmEndpoint {
                shell: Some(shell),
                name: t.name,
                sshd: t.sshd,
            }),
            Err(e) if e.code == ErrorCode::NotFound => Route::Lobby,
            Err(e) => Route::Unavailable(format!("{}\r\n", e.message)),
        }
    }

    async fn lobby(&self, caller: &Caller, argv: Vec<String>, io: LobbyIo) -> u32 {
        let account = self.account(&caller.key_openssh).await;
        let who = lobby::Caller {
            account,
            key_openssh: caller.key_openssh.clone(),
            fingerprint: caller.fingerprint.clone(),
            peer: Some(caller.peer),
            limits: None,
            admin: false,
        };
        let stdin = if wants_stdin(&argv) {
            Some(
                io.read_stdin_to_end(lobby::SETUP_SCRIPT_LIMIT)
                    .await
                    .map_err(|_| lobby::script_too_long()),
            )
        } else {
            None
        };
        lobby::run(&self.manager, &who, argv, stdin, &Io(io)).await
    }

    async fn completions(&self, caller: &Caller) -> Vec<String> {
        let mut words: Vec<String> = COMMANDS.iter().map(|c| c.to_string()).collect();
        if let Some(account) = self.account(&caller.key_openssh).await
            && let Ok(vms) = self.manager.list(Scope::Account(&account.id)).await
        {
            words.extend(vms.into_iter().map(|vm| vm.name));
        }
        words
    }
}

/// Output a guest may send ahead of the client, and stdin the host may send ahead of the
/// process: what one SSH session can hold in memory in each direction.
const SESSION_WINDOW: u32 = 1 << 20;
/// Chunks (of at most 64 KiB) queued between the agent and the SSH channel.
const SESSION_QUEUE: usize = 16;

/// Where `account` may open a shell in `vm`: its own VM, or one shared with it as a
/// collaborator. Any other VM is `NotFound`, exactly like one that does not exist. A VM
/// another host of the fleet runs is reached through the host channel.
pub(crate) async fn vm_shell(
    manager: &Arc<Manager>,
    account: &nook_store::Account,
    vm: &str,
) -> Result<(crate::manager::SshTarget, Arc<dyn GuestShell>), nook_api::ApiError> {
    let store = manager.store();
    let collaborator = match store.get(vm).await {
        Ok(row) => {
            row.owner != account.id
                && store.shared_role(&row.id, account).await.ok().flatten()
                    == Some(nook_store::Role::Collaborator)
        }
        Err(_) => false,
    };
    let scope = if collaborator {
        Scope::Admin
    } else {
        Scope::Account(&account.id)
    };
    let record = manager.record(vm, scope).await?;
    if let Some(host) = manager.lives_elsewhere(&record)? {
        if record.state != nook_api::VmState::Running {
            return Err(nook_api::ApiError::new(
                ErrorCode::NotRunning,
                format!(
                    "VM '{}' is {}: start it first",
                    record.name,
                    record.state.as_str()
                ),
            ));
        }
        // Through another host the guest agent serves every session (no relay to the
        // guest's sshd): shells and commands, not port forwarding.
        let target = crate::manager::SshTarget {
            name: record.name,
            sshd: None,
        };
        let shell = RemoteShell {
            manager: manager.clone(),
            host,
            vm_id: record.id,
        };
        return Ok((target, Arc::new(shell)));
    }
    let target = manager.ssh_target(vm, scope).await?;
    let shell = AgentShell {
        manager: manager.clone(),
        vm: target.name.clone(),
        account: (!collaborator).then(|| account.id.clone()),
    };
    Ok((target, Arc::new(shell)))
}

/// `ssh VM@HOST` for a VM another host runs: that host starts the process through its agent
/// (`shell_for_peer`), and the host channel carries the session.
struct RemoteShell {
    manager: Arc<Manager>,
    host: String,
    vm_id: String,
}

impl GuestShell for RemoteShell {
    fn start(
        &self,
        cmd: GuestCommand,
    ) -> Pin<Box<dyn Future<Output = Result<GuestSession, String>> + Send + '_>> {
        Box::pin(async move {
            let (identity, addr) = self
                .manager
                .channel_route(&self.host)
                .await
                .map_err(|why| format!("nook: {why}"))?;
            let request = nook_channel::ShellRequest {
                command: cmd.command,
                env: cmd.env,
                pty: cmd.pty.map(|p| nook_channel::ShellPty {
                    term: p.term,
                    cols: p.cols,
                    rows: p.rows,
                }),
            };
            let remote = nook_channel::shell(&identity, &self.host, &addr, &self.vm_id, request)
                .await
                .map_err(|e| format!("nook: {e}"))?;
            let (input, from_client) = mpsc::channel(SESSION_QUEUE);
            let (to_client, output) = mpsc::channel(SESSION_QUEUE);
            relay(
                from_client,
                remote.input,
                input_frames,
                Some(nook_channel::ShellIn::Hangup),
            );
            relay(remote.output, to_client, |out| vec![output_of(out)], None);
            Ok(GuestSession { input, output })
        })
    }
}

/// Starts a session in `vm`, which runs here, for another host of the fleet whose front door
/// let the user in (the channel proved it is one): the other end of a [`RemoteShell`].
pub(crate) async fn shell_for_peer(
    manager: &Arc<Manager>,
    vm: &str,
    request: nook_channel::ShellRequest,
) -> Result<nook_channel::ShellSession, String> {
    let shell = AgentShell {
        manager: manager.clone(),
        vm: vm.to_string(),
        account: None,
    };
    let session = shell
        .start(GuestCommand {
            command: request.command,
            env: request.env,
            pty: request.pty.map(|p| nook_sshd::GuestPty {
                term: p.term,
                cols: p.cols,
                rows: p.rows,
            }),
        })
        .await?;
    let (input, from_peer) = mpsc::channel(SESSION_QUEUE);
    let (to_peer, output) = mpsc::channel(SESSION_QUEUE);
    // The peer going away hangs up, as an SSH client going away does.
    relay(
        from_peer,
        session.input,
        |frame| vec![input_of(frame)],
        Some(GuestInput::Hangup),
    );
    relay(session.output, to_peer, output_frames, None);
    Ok(nook_channel::ShellSession { input, output })
}

/// Moves what `from` yields to `to`, each item as the frames `map` makes of it, until either
/// side closes; `last` follows when `from` closes first.
fn relay<A, B>(
    mut from: mpsc::Receiver<A>,
    to: mpsc::Sender<B>,
    map: fn(A) -> Vec<B>,
    last: Option<B>,
) where
    A: Send + 'static,
    B: Send + 'static,
{
    tokio::spawn(async move {
        while let Some(item) = from.recv().await {
            for frame in map(item) {
                if to.send(frame).await.is_err() {
                    return;
                }
            }
        }
        if let Some(last) = last {
            let _ = to.send(last).await;
        }
    });
}

/// Bytes as channel frames of at most [`nook_channel::CHUNK`].
fn chunked<T>(data: &[u8], frame: fn(Vec<u8>) -> T) -> Vec<T> {
    data.chunks(nook_channel::CHUNK)
        .map(|c| frame(c.to_vec()))
        .collect()
}

fn input_frames(input: GuestInput) -> Vec<nook_channel::ShellIn> {
    use nook_channel::ShellIn;
    match input {
        GuestInput::Data(data) => chunked(&data, ShellIn::Data),
        GuestInput::Eof => vec![ShellIn::Eof],
        GuestInput::Resize { cols, rows } => vec![ShellIn::Resize { cols, rows }],
        GuestInput::Signal(n) => vec![ShellIn::Signal(n)],
        GuestInput::Hangup => vec![ShellIn::Hangup],
    }
}

fn input_of(frame: nook_channel::ShellIn) -> GuestInput {
    use nook_channel::ShellIn;
    match frame {
        ShellIn::Data(d) => GuestInput::Data(d.into()),
        ShellIn::Eof => GuestInput::Eof,
        ShellIn::Resize { cols, rows } => GuestInput::Resize { cols, rows },
        ShellIn::Signal(n) => GuestInput::Signal(n),
        ShellIn::Hangup => GuestInput::Hangup,
    }
}

fn output_frames(out: GuestOutput) -> Vec<nook_channel::ShellOut> {
    use nook_channel::ShellOut;
    match out {
        GuestOutput::Stdout(d) => chunked(&d, ShellOut::Stdout),
        GuestOutput::Stderr(d) => chunked(&d, ShellOut::Stderr),
        GuestOutput::Exit { code, signal } => vec![ShellOut::Exit { code, signal }],
    }
}

fn output_of(out: nook_channel::ShellOut) -> GuestOutput {
    use nook_channel::ShellOut;
    match out {
        ShellOut::Stdout(d) => GuestOutput::Stdout(d.into()),
        ShellOut::Stderr(d) => GuestOutput::Stderr(d.into()),
        ShellOut::Exit { code, signal } => GuestOutput::Exit { code, signal },
    }
}

/// `ssh VM@HOST [CMD]` through the guest agent: shells and commands need no sshd in the guest.
pub(crate) struct AgentShell {
    manager: Arc<Manager>,
    vm: String,
    /// The owner's account; `None` for a collaborator, whose access the route checked.
    account: Option<String>,
}

impl GuestShell for AgentShell {
    fn start(
        &self,
        cmd: GuestCommand,
    ) -> Pin<Box<dyn Future<Output = Result<GuestSession, String>> + Send + '_>> {
        Box::pin(async move {
            let scope = match &self.account {
                Some(id) => Scope::Account(id),
                None => Scope::Admin,
            };
            let mut env = cmd.env;
            let pty = cmd.pty.map(|p| {
                env.retain(|(k, _)| k != "TERM");
                env.push(("TERM".to_string(), p.term));
                PtySize {
                    cols: clamp_u16(p.cols),
                    rows: clamp_u16(p.rows),
                }
            });
            let spawn = SpawnRequest {
                argv: cmd.command.into_iter().collect(),
                env,
                pty,
                stdin: true,
                shell: true,
                window: Some(SESSION_WINDOW),
                ..Default::default()
            };
            let process = self
                .manager
                .spawn_for_ssh(&self.vm, scope, spawn)
                .await
                .map_err(|e| format!("nook: {}", e.message))?;
            let handle = process.handle();
            let (input, input_rx) = mpsc::channel(SESSION_QUEUE);
            let (output_tx, output) = mpsc::channel(SESSION_QUEUE);
            tokio::spawn(pass_output(process, output_tx));
            tokio::spawn(pass_input(handle, input_rx));
            Ok(GuestSession { input, output })
        })
    }
}

fn clamp_u16(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Agent output to the SSH channel, acknowledging each chunk once the channel has taken it.
async fn pass_output(mut process: Process, to_client: mpsc::Sender<GuestOutput>) {
    let handle = process.handle();
    while let Some(msg) = process.next().await {
        match msg {
            GuestMsg::Output { stream, data } => {
                let bytes = data.len() as u64;
                let out = match stream {
                    Stream::Stdout => GuestOutput::Stdout(data.into()),
                    Stream::Stderr => GuestOutput::Stderr(data.into()),
                };
                if to_client.send(out).await.is_err() {
                    let _ = handle.hangup().await;
                    return;
                }
                if handle.output_ack(bytes).await.is_err() {
                    return;
                }
            }
            GuestMsg::Exit { code, signal } => {
                let _ = to_client.send(GuestOutput::Exit { code, signal }).await;
                return;
            }
            _ => {}
        }
    }
    // The agent connection dropped: closing `to_client` tells the session.
}

/// SSH channel input to the process. When the session ends (the client went away, or the
/// process exited), the process is hung up; for an exited one that is a no-op.
async fn pass_input(handle: ProcessHandle, mut from_client: mpsc::Receiver<GuestInput>) {
    while let Some(input) = from_client.recv().await {
        let sent = match input {
            GuestInput::Data(data) => handle.stdin(&data).await,
            GuestInput::Eof => handle.close_stdin().await,
            GuestInput::Resize { cols, rows } => {
                handle.resize(clamp_u16(cols), clamp_u16(rows)).await
            }
            GuestInput::Signal(n) => handle.signal(n).await,
            GuestInput::Hangup => break,
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = handle.hangup().await;
}
