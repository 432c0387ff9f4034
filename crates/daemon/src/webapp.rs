//! nook-web's view of nook: runs lobby commands for the dashboard and the HTTPS API, resolves
//! API tokens and signing keys to accounts, and opens terminals through the guest agent. Every
//! command goes through `lobby::run`, the one grammar and the one place that checks what a
//! token may do, so the API, the dashboard and `ssh HOST CMD` cannot disagree.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use nook_api::lobby::CommandSet;
use nook_api::{ApiError, ErrorCode};
use nook_sshd::{GuestCommand, GuestInput, GuestOutput, GuestPty};
use nook_web::{
    BackendError, EXEC_OUTPUT_LIMIT, ExecEvent, ExecSink, Principal, Pty, PtyInput, PtyOutput,
};
use tokio::sync::mpsc;

use crate::Manager;
use crate::lobby::{self, LobbyOutput};

/// The daemon's implementation of [`nook_web::WebBackend`].
pub struct DaemonWeb {
    manager: Arc<Manager>,
}

impl DaemonWeb {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }
}

/// A command's output as events, at most [`EXEC_OUTPUT_LIMIT`] bytes of it.
struct ApiIo {
    tx: ExecSink,
    sent: AtomicUsize,
}

impl ApiIo {
    fn send(&self, bytes: &[u8], event: fn(Bytes) -> ExecEvent) {
        let before = self.sent.fetch_add(bytes.len(), Ordering::Relaxed);
        if before + bytes.len() <= EXEC_OUTPUT_LIMIT {
            let _ = self.tx.send(event(Bytes::copy_from_slice(bytes)));
        } else if before <= EXEC_OUTPUT_LIMIT {
            // Said once, so a cut answer is never mistaken for a whole one.
            let note = format!(
                "nook: the output was cut at {} MiB\n",
                EXEC_OUTPUT_LIMIT >> 20
            );
            let _ = self.tx.send(ExecEvent::Stderr(Bytes::from(note)));
        }
    }
}

impl LobbyOutput for ApiIo {
    fn out(&self, bytes: &[u8]) {
        self.send(bytes, ExecEvent::Stdout);
    }
    fn err(&self, bytes: &[u8]) {
        self.send(bytes, ExecEvent::Stderr);
    }
    fn tty(&self) -> bool {
        false
    }
    fn writable(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
    fn step(&self, step: &str, _json: bool) {
        let _ = self.tx.send(ExecEvent::Step(step.to_string()));
    }
    fn failed(&self, err: &ApiError) {
        let _ = self.tx.send(ExecEvent::Failed(err.code.status()));
    }
}

fn backend_err(e: nook_store::StoreError) -> BackendError {
    BackendError(e.to_string())
}

/// Commands that prove something about the SSH key of the connection: only over SSH.
fn needs_ssh(argv: &[String]) -> bool {
    let words: Vec<&str> = argv
        .iter()
        .map(String::as_str)
        .filter(|w| !w.starts_with('-'))
        .collect();
    matches!(
        words.as_slice(),
        ["signup", ..] | ["ssh-key", "confirm", ..]
    )
}

fn refuse(io: &ApiIo, argv: &[String], err: &ApiError) -> u32 {
    lobby::report(io, argv.iter().any(|a| a == "--json"), err);
    1
}

impl nook_web::WebBackend for DaemonWeb {
    async fn exec(
        &self,
        who: &Principal,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
        out: ExecSink,
    ) -> u32 {
        let io = ApiIo {
            tx: out,
            sent: AtomicUsize::new(0),
        };
        if needs_ssh(&argv) {
            let err = ApiError::new(
                ErrorCode::Forbidden,
                "signup and ssh-key confirm prove you hold an SSH key: run them over SSH with that key",
            );
            return refuse(&io, &argv, &err);
        }
        let account = match self.manager.store().account_by_id(&who.account_id).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                let err = ApiError::new(ErrorCode::NotSignedUp, "This account no longer exists");
                return refuse(&io, &argv, &err);
            }
            Err(e) => {
                return refuse(
                    &io,
                    &argv,
                    &crate::errors::from_store("find the account", e),
                );
            }
        };
        let limits = match &who.limits {
            None => None,
            Some(l) => match CommandSet::parse(&l.cmds) {
                Ok(cmds) => Some(lobby::Limits {
                    cmds,
                    vms: l.vms.clone(),
                    what: l.what,
                }),
                Err(e) => {
                    let err = ApiError::new(
                        ErrorCode::Forbidden,
                        format!("{} lists commands it can't have: {e}", l.what),
                    );
                    return refuse(&io, &argv, &err);
                }
            },
        };
        let caller = lobby::Caller {
            account: Some(account),
            key_openssh: String::new(),
            fingerprint: String::new(),
            peer: None,
            limits,
            admin: false,
        };
        lobby::run(&self.manager, &caller, argv, stdin.map(Ok), &io).await
    }

    async fn account_for_key(&self, fingerprint: &str) -> Result<Option<Principal>, BackendError> {
        let account = self
            .manager
            .store()
            .account_for_key(fingerprint)
            .await
            .map_err(backend_err)?;
        Ok(account.map(|a| Principal {
            account_id: a.id,
            email: a.email,
            limits: None,
        }))
    }

    async fn exec_token(&self, token: &str) -> Result<Option<Principal>, BackendError> {
        let grant = self
            .manager
            .store()
            .exec_token(token)
            .await
            .map_err(backend_err)?;
        Ok(grant.map(|g| Principal {
            account_id: g.account.id,
            email: g.account.email,
            limits: Some(nook_web::Limits {
                cmds: g.cmds,
                vms: g.vm.map(|v| vec![v]),
                what: "This token",
            }),
        }))
    }

    async fn shared_vms(&self, who: &Principal) -> Vec<(String, String)> {
        let store = self.manager.store();
        let Ok(Some(account)) = store.account_by_id(&who.account_id).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for vm in store.list().await.unwrap_or_default() {
            if vm.owner == account.id {
                continue;
            }
            if let Ok(Some(role)) = store.shared_role(&vm.id, &account).await {
                out.push((vm.name, role.as_str().to_string()));
            }
        }
        out.sort();
        out
    }

    async fn may_enter(&self, who: &Principal, vm: &str) -> bool {
        let Ok(Some(account)) = self.manager.store().account_by_id(&who.account_id).await else {
            return false;
        };
        crate::frontdoor::vm_shell(&self.manager, &account, vm)
            .await
            .is_ok()
    }

    async fn agent_events(
        &self,
        who: &Principal,
        vm: &str,
        conversation: &str,
        after: u64,
    ) -> Result<nook_web::AgentEvents, String> {
        let not_found = || format!("There is no conversation {conversation} in a VM {vm} of yours");
        let store = self.manager.store();
        let account = store
            .account_by_id(&who.account_id)
            .await
            .ok()
            .flatten()
            .ok_or_else(not_found)?;
        let record = store.get(vm).await.map_err(|_| not_found())?;
        if !crate::agent::may_drive(store, &record, &account).await {
            return Err(not_found());
        }
        let agents = self.manager.agent_host().agents.clone();
        let c = agents
            .journal()
            .get(conversation)
            .await
            .ok()
            .flatten()
            .filter(|c| c.vm_id == record.id)
            .ok_or_else(not_found)?;
        let events = agents
            .events(&c, after, true)
            .filter_map(|item| async move {
                match item {
                    Ok((seq, event)) => serde_json::to_string(&*event).ok().map(|j| (seq, j)),
                    Err(e) => {
                        tracing::warn!(error = %e, "agent events could not be read");
                        None
                    }
                }
            });
        Ok(Box::pin(events))
    }

    async fn may_use_agent(&self, who: &Principal, vm: &str) -> bool {
        let store = self.manager.store();
        let (Ok(Some(account)), Ok(record)) = (
            store.account_by_id(&who.account_id).await,
            store.get(vm).await,
        ) else {
            return false;
        };
        crate::agent::may_drive(store, &record, &account).await
    }

    async fn terminal(
        &self,
        who: &Principal,
        vm: &str,
        cols: u16,
        rows: u16,
    ) -> Result<Pty, String> {
        let not_found = || format!("There is no VM named {vm} that you can open a terminal in");
        let account = self
            .manager
            .store()
            .account_by_id(&who.account_id)
            .await
            .ok()
            .flatten()
            .ok_or_else(not_found)?;
        let (_, shell) = crate::frontdoor::vm_shell(&self.manager, &account, vm)
            .await
            .map_err(|e| {
                if e.code == ErrorCode::NotFound {
                    not_found()
                } else {
                    e.message
                }
            })?;
        let session = shell
            .start(GuestCommand {
                command: None,
                env: vec![("LANG".into(), "C.UTF-8".into())],
                pty: Some(GuestPty {
                    term: "xterm-256color".into(),
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
            })
            .await?;
        let (input, mut input_rx) = mpsc::channel::<PtyInput>(16);
        let (output_tx, output) = mpsc::channel::<PtyOutput>(16);
        let to_guest = session.input;
        // Set once the web side is gone (it dropped the output's receiver), so neither task
        // waits on a guest that stopped reading or writing.
        let (gone_tx, mut gone) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let i = tokio::select! {
                    i = input_rx.recv() => i,
                    _ = gone.wait_for(|g| *g) => None,
                };
                let Some(i) = i else { break };
                let msg = match i {
                    PtyInput::Data(d) => GuestInput::Data(d),
                    PtyInput::Resize { cols, rows } => GuestInput::Resize {
                        cols: u32::from(cols),
                        rows: u32::from(rows),
                    },
                    PtyInput::Hangup => GuestInput::Hangup,
                };
                let sent = tokio::select! {
                    r = to_guest.send(msg) => r.is_ok(),
                    _ = gone.wait_for(|g| *g) => false,
                };
                if !sent {
                    break;
                }
            }
            let _ = to_guest.try_send(GuestInput::Hangup);
        });
        let mut from_guest = session.output;
        tokio::spawn(async move {
            loop {
                // Ends as soon as the web side stops listening, even if the guest says nothing.
                let o = tokio::select! {
                    o = from_guest.recv() => o,
                    () = output_tx.closed() => None,
                };
                let Some(o) = o else {
                    let _ = gone_tx.send(true);
                    return;
                };
                let msg = match o {
                    GuestOutput::Stdout(d) | GuestOutput::Stderr(d) => PtyOutput::Data(d),
                    GuestOutput::Exit { code, signal } => {
                        PtyOutput::Exit(code.or(signal.map(|s| 128 + s)))
                    }
                };
                if output_tx.send(msg).await.is_err() {
                    let _ = gone_tx.send(true);
                    return;
                }
            }
        });
        Ok(Pty { input, output })
    }
}

/// `POST http://169.254.169.254/api/exec` from inside a VM: the HTTPS API with no token, as
/// the VM's owner, for the commands the owner granted it (`share api VM --cmds ...`). The VM
/// is known by its source address, which nook pins to its tap.
pub async fn from_vm(
    axum::extract::State(m): axum::extract::State<Arc<Manager>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let vm = match crate::metadata::calling_vm(m.as_ref(), peer).await {
        Ok(vm) => vm,
        Err(refused) => return refused,
    };
    let refuse = |status: hyper::StatusCode, code: &str, message: &str| {
        nook_web::api::error(status, code, message).map(axum::body::Body::new)
    };
    let store = m.store();
    let grant = match store.vm_api_grant(&vm.id).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, vm = %vm.name, "reading a VM's API grant failed");
            return refuse(
                hyper::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error; try again",
            );
        }
    };
    let Some(grant) = grant else {
        return refuse(
            hyper::StatusCode::FORBIDDEN,
            "forbidden",
            &format!(
                "This VM may not call the API. Its owner can allow it with: share api {} --cmds ls,cp",
                vm.name
            ),
        );
    };
    let owner = match store.account_by_id(&vm.owner).await {
        Ok(Some(a)) => a,
        _ => {
            return refuse(
                hyper::StatusCode::FORBIDDEN,
                "forbidden",
                "This VM has no owner",
            );
        }
    };
    let (is_json, events) = nook_web::api::body_kind(req.headers());
    let body = match nook_web::api::read_body(req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return resp.map(axum::body::Body::new),
    };
    let who = Principal {
        account_id: owner.id,
        email: owner.email,
        limits: Some(nook_web::Limits {
            cmds: grant.cmds,
            // Only itself (by its name now) unless its owner said --any-vm: a clone it makes
            // is then out of its reach.
            vms: (!grant.any_vm).then(|| vec![vm.name.clone()]),
            what: "This VM",
        }),
    };
    let backend = Arc::new(DaemonWeb::new(m.clone()));
    // One registry for every VM's calls, so the per-account bound on commands running at once
    // holds for calls from inside VMs too.
    static VM_OPS: std::sync::OnceLock<nook_web::ops::Ops> = std::sync::OnceLock::new();
    let ops = VM_OPS.get_or_init(nook_web::ops::Ops::default);
    nook_web::api::exec_response(&backend, ops, &who, &body, is_json, events)
        .await
        .map(axum::body::Body::new)
}
