//! The daemon's side of the coding agent (`nook-agent`): its journal over the store, the VM
//! it acts on through the guest agent, the model it reaches through the daemon's own LLM
//! gateway (so every token is metered against the VM owner's credit, and no key is ever in
//! the VM), and one sandboxed chromium per VM for the `browser` tool.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use nook_agent::chromium::ChromiumConfig;
use nook_agent::{
    Agents, Api, BoxFuture, Browser, Conversation, Event, Exec, ExecOutput, Journal, JournalError,
    Message, Model, ModelReply, State, Workspace, WorkspaceError,
};
use nook_api::{ApiError, ErrorCode, VmState};
use nook_proto::{GuestMsg, SpawnRequest};
use nook_store::{Account, AgentConversation, Role, Store};

use crate::manager::{GUEST_USER, Manager};

/// Output a command may send ahead of the agent.
const EXEC_WINDOW: u32 = 1 << 20;
/// Stdin is written in pieces of this size.
const STDIN_CHUNK: usize = 64 << 10;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The agent runtime and what it needs from the host: the daemon holds one.
pub struct AgentHost {
    pub agents: Arc<Agents>,
    browsers: nook_agent::chromium::Pool,
}

impl AgentHost {
    pub fn new(store: Store) -> Arc<AgentHost> {
        Arc::new(AgentHost {
            agents: Agents::new(Arc::new(StoreJournal(store))),
            browsers: nook_agent::chromium::Pool::default(),
        })
    }

    /// The browser of a VM, started on first use (and again if it died).
    async fn browser(
        &self,
        m: &Manager,
        vm: &nook_store::VmRecord,
    ) -> Result<Arc<dyn Browser>, WorkspaceError> {
        let cfg = || {
            let Some(vm_ip) = m.guest_ip(vm) else {
                return Err(WorkspaceError(
                    "The browser needs the host's VM network (tap mode); this host runs VMs with user-mode networking".into(),
                ));
            };
            let block = m.config().egress_block.clone();
            Ok(ChromiumConfig {
                binary: m.config().coding_agent.browser.clone(),
                vm_ip,
                tag: browser_tag(m),
                allow: Arc::new(move |ip| match ip {
                    std::net::IpAddr::V4(v4) => !block.blocks(v4),
                    std::net::IpAddr::V6(_) => true,
                }),
                confine: m.browser_confinement(vm),
            })
        };
        let b: Arc<dyn Browser> = self.browsers.get(&vm.id, cfg).await?;
        Ok(b)
    }

    /// Closes the browsers nobody used lately, and those of VMs that are gone or stopped.
    pub async fn reap_browsers(&self, m: &Manager) {
        let mut running = Vec::new();
        for id in self.browsers.keys().await {
            if matches!(m.store().get_by_id(&id).await, Ok(vm) if vm.state == VmState::Running) {
                running.push(id);
            }
        }
        self.browsers.reap(&running).await;
        m.remove_browser_groups(&self.browsers.keys().await);
    }

    /// The VM and model a turn works with, acting for `account`: the conversation's own model
    /// (`model`), through the provider the host's `agent_model` names.
    pub fn tools_for(
        self: &Arc<Self>,
        m: &Arc<Manager>,
        vm: &nook_store::VmRecord,
        account: Account,
        model: &str,
    ) -> (Arc<dyn Workspace>, Arc<dyn Model>) {
        let ca = &m.config().coding_agent;
        let ws = Arc::new(VmWorkspace {
            manager: m.clone(),
            host: self.clone(),
            vm_id: vm.id.clone(),
            account,
        });
        let model = Arc::new(GatewayModel {
            manager: m.clone(),
            vm_id: vm.id.clone(),
            provider: ca.provider.clone(),
            model: model.to_string(),
            api: ca.api,
        });
        (ws, model)
    }

    /// Ends the browsers of this daemon's last life (a crash leaves them running).
    pub fn sweep_browsers(&self, m: &Manager) {
        let ended = nook_agent::chromium::sweep(&browser_tag(m));
        if ended > 0 {
            tracing::info!(ended, "ended browsers a previous daemon left running");
        }
    }

    /// Goes on with the turns a stopped daemon left running; a conversation whose VM or
    /// person is gone is marked interrupted with an event that says why.
    pub async fn resume_all(self: &Arc<Self>, m: &Arc<Manager>) {
        let running = match self.agents.journal().running().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for interrupted agent turns");
                return;
            }
        };
        for c in running {
            let vm = m.store().get_by_id(&c.vm_id).await.ok();
            // The turn acts for whoever sent its prompt, as it did before the restart.
            let by = self.agents.last_prompter(&c).await.ok().flatten();
            let account = match by {
                Some(email) => m.store().account_by_email(&email).await.ok().flatten(),
                None => m.store().account_by_id(&c.account_id).await.ok().flatten(),
            };
            let (Some(vm), Some(account)) = (vm, account) else {
                let why = "the VM or the account that started it is gone";
                if let Err(e) = self.agents.interrupt(&c, why).await {
                    tracing::warn!(conversation = %c.id, error = %e, "could not mark the turn interrupted");
                }
                continue;
            };
            let (ws, model) = self.tools_for(m, &vm, account, &c.model);
            match self.agents.resume(&c, ws, model).await {
                Ok(Some(_)) => {
                    tracing::info!(conversation = %c.id, "agent turn resumed after restart")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(conversation = %c.id, error = %e, "agent turn not resumed");
                    let _ = self.agents.interrupt(&c, &e.to_string()).await;
                }
            }
        }
    }
}

/// Names this daemon's browser profiles: a hash of its data dir, so daemons with different
/// data dirs (tests) never sweep each other's.
fn browser_tag(m: &Manager) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(m.config().data_dir.display().to_string().as_bytes());
    hex::encode(&digest[..4])
}

/// Can `account` drive the agent in `vm`: its owner, or a collaborator it is shared with.
pub async fn may_drive(store: &Store, vm: &nook_store::VmRecord, account: &Account) -> bool {
    vm.owner == account.id
        || store.shared_role(&vm.id, account).await.ok().flatten() == Some(Role::Collaborator)
}

struct VmWorkspace {
    manager: Arc<Manager>,
    host: Arc<AgentHost>,
    vm_id: String,
    account: Account,
}

impl VmWorkspace {
    /// The VM, if the person the agent acts for may still use it and it runs.
    async fn vm(&self) -> Result<nook_store::VmRecord, WorkspaceError> {
        let store = self.manager.store();
        let vm = store
            .get_by_id(&self.vm_id)
            .await
            .map_err(|_| WorkspaceError("The VM was deleted; this conversation is over".into()))?;
        // Access is read afresh: a share taken away ends the agent's work at its next step.
        let account = store
            .account_by_id(&self.account.id)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| WorkspaceError("The account that started this turn is gone".into()))?;
        if !may_drive(store, &vm, &account).await {
            return Err(WorkspaceError(format!(
                "{} no longer has access to VM '{}': the agent stopped",
                account.email, vm.name
            )));
        }
        if vm.state != VmState::Running {
            return Err(WorkspaceError(format!(
                "VM '{}' is {}: start it (`start {}`), then send a message to go on",
                vm.name,
                vm.state.as_str(),
                vm.name
            )));
        }
        Ok(vm)
    }
}

/// Kills a command whose caller stopped waiting (the user pressed stop, or it timed out).
struct KillOnDrop(Option<nook_vmm::ProcessHandle>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            tokio::spawn(async move {
                let _ = h.signal(nix::libc::SIGKILL).await;
                let _ = h.hangup().await;
            });
        }
    }
}

impl Workspace for VmWorkspace {
    fn check(&self) -> BoxFuture<'_, Result<(), WorkspaceError>> {
        Box::pin(async move { self.vm().await.map(|_| ()) })
    }

    fn exec(&self, exec: Exec) -> BoxFuture<'_, Result<ExecOutput, WorkspaceError>> {
        Box::pin(async move {
            let vm = self.vm().await?;
            // bash where the image has it (the default image), else sh.
            let argv = vec![
                "sh".to_string(),
                "-c".to_string(),
                r#"if command -v bash >/dev/null 2>&1; then exec bash -lc "$0"; else exec sh -lc "$0"; fi"#.to_string(),
                exec.script.clone(),
            ];
            let (user, home) = if exec.root {
                (None, "/root".to_string())
            } else {
                (Some(GUEST_USER.to_string()), format!("/home/{GUEST_USER}"))
            };
            let spawn = SpawnRequest {
                argv,
                env: vec![
                    ("HOME".into(), home.clone()),
                    ("TERM".into(), "dumb".into()),
                ],
                cwd: Some(home),
                user,
                stdin: exec.stdin.is_some(),
                window: Some(EXEC_WINDOW),
                ..Default::default()
            };
            let mut process = self
                .manager
                .spawn_in(&vm, spawn)
                .await
                .map_err(|e| WorkspaceError(e.message))?;
            let handle = process.handle();
            let mut guard = KillOnDrop(Some(handle.clone()));
            if let Some(stdin) = exec.stdin {
                let h = handle.clone();
                tokio::spawn(async move {
                    for piece in stdin.chunks(STDIN_CHUNK) {
                        if h.stdin(piece).await.is_err() {
                            return;
                        }
                    }
                    let _ = h.close_stdin().await;
                });
            }
            let mut out = ExecOutput::default();
            let mut tail = std::collections::VecDeque::new();
            let deadline = tokio::time::sleep(exec.timeout);
            tokio::pin!(deadline);
            loop {
                let msg = tokio::select! {
                    _ = &mut deadline => { out.timed_out = true; break; }
                    m = process.next() => m,
                };
                match msg {
                    Some(GuestMsg::Output { data, .. }) => {
                        out.total += data.len() as u64;
                        let room = exec.keep.saturating_sub(out.head.len());
                        let (to_head, rest) = data.split_at(room.min(data.len()));
                        out.head.extend_from_slice(to_head);
                        tail.extend(rest.iter().copied());
                        while tail.len() > exec.keep {
                            tail.pop_front();
                        }
                        if handle.output_ack(data.len() as u64).await.is_err() {
                            break;
                        }
                    }
                    Some(GuestMsg::Exit { code, .. }) => {
                        out.status = code;
                        guard.0 = None;
                        break;
                    }
                    Some(_) => {}
                    None => {
                        return Err(WorkspaceError(format!(
                            "VM '{}' stopped answering mid-command (it may have been stopped)",
                            vm.name
                        )));
                    }
                }
            }
            out.tail = tail.into_iter().collect();
            Ok(out)
        })
    }

    fn browser(&self) -> BoxFuture<'_, Result<Arc<dyn Browser>, WorkspaceError>> {
        Box::pin(async move {
            let vm = self.vm().await?;
            self.host.browser(&self.manager, &vm).await
        })
    }
}

struct GatewayModel {
    manager: Arc<Manager>,
    vm_id: String,
    provider: String,
    model: String,
    api: Api,
}

impl Model for GatewayModel {
    fn api(&self) -> Api {
        self.api
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn post(&self, body: Vec<u8>) -> BoxFuture<'_, Result<ModelReply, String>> {
        Box::pin(async move {
            // The VM's owner pays, as when the VM itself calls the gateway.
            let vm = self
                .manager
                .store()
                .get_by_id(&self.vm_id)
                .await
                .map_err(|_| "the VM was deleted".to_string())?;
            let caller = nook_gateway::Caller {
                account_id: vm.owner.clone(),
                vm_id: vm.id.clone(),
                vm_name: vm.name.clone(),
            };
            let req = hyper::Request::builder()
                .method("POST")
                .uri(format!(
                    "{}{}{}",
                    nook_gateway::PREFIX,
                    self.provider,
                    self.api.path()
                ))
                .header("content-type", "application/json")
                .header("anthropic-version", "2023-06-01")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = self.manager.gateway().handle(caller, req).await;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .into_data_stream()
                .map(|r| r.map_err(|e| e.to_string()));
            Ok(ModelReply {
                status,
                body: Box::pin(body),
            })
        })
    }
}

/// The agent's journal in the daemon's database.
struct StoreJournal(Store);

fn jerr(e: impl std::fmt::Display) -> JournalError {
    JournalError(e.to_string())
}

fn from_row(r: AgentConversation) -> Conversation {
    Conversation {
        id: r.id,
        vm_id: r.vm_id,
        account_id: r.account_id,
        title: r.title,
        model: r.model,
        state: State::parse(&r.state),
        last_seq: u64::try_from(r.last_seq).unwrap_or(0),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

impl Journal for StoreJournal {
    fn create(&self, c: &Conversation) -> BoxFuture<'_, Result<(), JournalError>> {
        let row = AgentConversation {
            id: c.id.clone(),
            vm_id: c.vm_id.clone(),
            account_id: c.account_id.clone(),
            title: c.title.clone(),
            model: c.model.clone(),
            state: c.state.as_str().to_string(),
            last_seq: c.last_seq as i64,
            created_at: c.created_at,
            updated_at: c.updated_at,
        };
        Box::pin(async move { self.0.agent_create(&row).await.map_err(jerr) })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Conversation>, JournalError>> {
        let id = id.to_string();
        Box::pin(async move { Ok(self.0.agent_get(&id).await.map_err(jerr)?.map(from_row)) })
    }

    fn list(&self, vm_id: &str) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>> {
        let vm_id = vm_id.to_string();
        Box::pin(async move {
            Ok(self
                .0
                .agent_list(&vm_id)
                .await
                .map_err(jerr)?
                .into_iter()
                .map(from_row)
                .collect())
        })
    }

    fn running(&self) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>> {
        Box::pin(async move {
            Ok(self
                .0
                .agent_in_state(State::Running.as_str())
                .await
                .map_err(jerr)?
                .into_iter()
                .map(from_row)
                .collect())
        })
    }

    fn set_state(&self, id: &str, state: State) -> BoxFuture<'_, Result<(), JournalError>> {
        let id = id.to_string();
        Box::pin(async move {
            self.0
                .agent_set_state(&id, state.as_str(), now())
                .await
                .map_err(jerr)
        })
    }

    fn append(&self, id: &str, seq: u64, event: &Event) -> BoxFuture<'_, Result<(), JournalError>> {
        let id = id.to_string();
        let body = serde_json::to_string(event);
        Box::pin(async move {
            let body = body.map_err(jerr)?;
            self.0
                .agent_append(&id, seq as i64, &body, now())
                .await
                .map_err(jerr)
        })
    }

    fn events(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, Event)>, JournalError>> {
        let id = id.to_string();
        Box::pin(async move {
            let rows = self
                .0
                .agent_events(&id, after as i64, limit as i64)
                .await
                .map_err(jerr)?;
            rows.into_iter()
                .map(|(seq, body)| {
                    let e: Event = serde_json::from_str(&body).map_err(jerr)?;
                    Ok((seq as u64, e))
                })
                .collect()
        })
    }

    fn context(&self, id: &str) -> BoxFuture<'_, Result<Vec<Message>, JournalError>> {
        let id = id.to_string();
        Box::pin(async move {
            let text = self.0.agent_context(&id).await.map_err(jerr)?;
            serde_json::from_str(&text).map_err(jerr)
        })
    }

    fn save_context(
        &self,
        id: &str,
        messages: &[Message],
    ) -> BoxFuture<'_, Result<(), JournalError>> {
        let id = id.to_string();
        let text = serde_json::to_string(messages);
        Box::pin(async move {
            self.0
                .agent_save_context(&id, &text.map_err(jerr)?)
                .await
                .map_err(jerr)
        })
    }
}

/// The agent's errors as the lobby shows them.
pub fn api_error(e: nook_agent::AgentError) -> ApiError {
    use nook_agent::AgentError as E;
    let code = match &e {
        E::Busy(_) => ErrorCode::Busy,
        E::NoConversation(_) => ErrorCode::NotFound,
        E::EmptyPrompt | E::PromptTooLong(_) => ErrorCode::InvalidArgument,
        E::Journal(_) => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}
