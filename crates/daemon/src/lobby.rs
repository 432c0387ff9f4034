//! The lobby: runs one command line for a caller of the SSH front door, the HTTPS API or the
//! dashboard (`crate::webapp`), using the grammar in `nook_api::lobby`. Output is text, or JSON with `--json`;
//! errors go to stderr with a non-zero status, as JSON `{"error": {code, message}}` with
//! `--json`.

use std::sync::Arc;

use base64::Engine;
use clap::Parser;
use nook_api::lobby::{CommandSet, LobbyCommand, LobbyLine, NewArgs, SshKeyCommand};
use nook_api::{ApiError, CreateVm, ErrorCode, VmInfo, VmState, format_size};
use nook_proto::{GuestMsg, Stream};
use nook_store::SshKey;
use serde_json::json;

use crate::errors;

mod agent;
mod forward;
mod identity;

use crate::manager::{ADMIN_OWNER, Manager, Scope, VmStat};
pub use agent::wants_stdin as agent_wants_stdin;
pub use forward::run_for_peer;
pub(crate) use identity::make_invite;

/// Where a command's output goes. The SSH front door implements it over a channel.
pub trait LobbyOutput: Send + Sync {
    fn out(&self, bytes: &[u8]);
    fn err(&self, bytes: &[u8]);
    fn tty(&self) -> bool;
    /// Resolves once the client has taken enough of what was written to take more. A
    /// command relaying a stream from a guest awaits it before each write, so a client that
    /// stops reading stops the stream (and the guest) instead of growing the daemon.
    fn writable(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
    /// The command failed with `err` (already printed): the HTTPS API answers with its status.
    fn failed(&self, _err: &ApiError) {}
    /// A step of a long command (`new`, `cp`, `start`): dimmed on a terminal, and not shown
    /// to a program that asked for JSON. The HTTPS API streams every step as an event.
    fn step(&self, step: &str, json: bool) {
        if self.tty() && !json {
            self.err(format!("\x1b[2m==> {step}\x1b[0m\r\n").as_bytes());
        }
    }
}

/// What a caller that came with a token (or a VM allowed to call the API) may do. A caller
/// with none may do whatever its account may.
#[derive(Debug, Clone)]
pub struct Limits {
    pub cmds: CommandSet,
    /// The only VMs it may name, when limited to some.
    pub vms: Option<Vec<String>>,
    /// Shown in refusals: "this token", "this VM".
    pub what: &'static str,
}

impl Limits {
    /// Refuses a command these limits do not allow, saying why.
    fn check(&self, command: &LobbyCommand) -> Result<(), ApiError> {
        let name = command.name();
        // A limited caller may not make access that outlives its limits: granting a VM the
        // API (how limits are made; a grant is not held to the token's VMs), sharing a VM with
        // someone (a collaborator gets a shell), links, making it public, or handing a VM an
        // integration's credential. Taking access away is fine.
        use nook_api::lobby::{IntegrationsCommand as I, ShareCommand as S};
        let grants = match command {
            LobbyCommand::Share(S::Api { .. }) => Some("change what VMs may do through the API"),
            LobbyCommand::Share(S::Add { .. } | S::AddLink { .. } | S::SetPublic { .. }) => {
                Some("give anyone access to a VM")
            }
            LobbyCommand::Integrations(I::Add(_) | I::Attach { .. }) => {
                Some("add integrations or attach them to VMs")
            }
            _ => None,
        };
        if let Some(what) = grants {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not {what}: do that over SSH or on the dashboard",
                    self.what
                ),
            ));
        }
        if !self.cmds.allows(name) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not run `{name}`; it may run: {}",
                    self.what,
                    self.cmds.to_list()
                ),
            ));
        }
        // `new --prompt` starts the agent, which spends LLM credit: that takes `agent` too.
        if matches!(command, LobbyCommand::New(args) if args.prompt.is_some())
            && !self.cmds.allows("agent")
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not start the agent (`new --prompt` needs `agent` too); it may run: {}",
                    self.what,
                    self.cmds.to_list()
                ),
            ));
        }
        let Some(allowed) = &self.vms else {
            return Ok(());
        };
        match command.vms() {
            None => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may act only on {}, and `{name}` is about the whole account",
                    self.what,
                    allowed.join(", ")
                ),
            )),
            Some(names) => match names.iter().find(|n| !allowed.iter().any(|a| a == *n)) {
                Some(other) => Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "{} may act only on {}, not on {other}",
                        self.what,
                        allowed.join(", ")
                    ),
                )),
                None => Ok(()),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Caller {
    pub account: Option<nook_store::Account>,
    /// "ssh-ed25519 AAAA…" of the key the caller authenticated with.
    pub key_openssh: String,
    pub fingerprint: String,
    /// The client's address, when it came over the network.
    pub peer: Option<std::net::IpAddr>,
    /// Set for callers with a token: what it allows.
    pub limits: Option<Limits>,
    /// The host's admin (`nook vm ...` on the daemon's unix socket): acts on every VM and is
    /// no account, so only the commands about VMs are open to it.
    pub admin: bool,
}

/// The most `new --setup-script -` reads from stdin. A setup script is a page or two of shell;
/// the bound keeps one SSH client from holding daemon memory without end.
pub const SETUP_SCRIPT_LIMIT: usize = 1 << 20;

/// The error for a setup script on stdin longer than [`SETUP_SCRIPT_LIMIT`].
pub fn script_too_long() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidArgument,
        format!(
            "--setup-script - reads at most {} MiB from stdin, and this script is longer",
            SETUP_SCRIPT_LIMIT >> 20
        ),
    )
}

/// The stdin a command was given: `None` when it reads none, else all of it or why not.
pub type CommandStdin = Option<Result<Vec<u8>, ApiError>>;

/// Runs one command; returns the exit status (0 ok, 1 failed, 2 usage). On a fleet, a
/// command about a VM another host holds (or a new VM placed there) runs on that host.
pub async fn run(
    m: &Arc<Manager>,
    caller: &Caller,
    argv: Vec<String>,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
) -> u32 {
    run_where(m, caller, argv, stdin, io, true).await
}

/// Runs one command here, whatever host its VM is on (one passed on by another host).
async fn run_here(
    m: &Arc<Manager>,
    caller: &Caller,
    argv: Vec<String>,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
) -> u32 {
    run_where(m, caller, argv, stdin, io, false).await
}

async fn run_where(
    m: &Arc<Manager>,
    caller: &Caller,
    argv: Vec<String>,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
    may_pass_on: bool,
) -> u32 {
    let wants_json = argv.iter().any(|a| a == "--json");
    let line = match LobbyLine::try_parse_from(&argv) {
        Ok(line) => line,
        Err(e) => {
            use clap::error::ErrorKind;
            let text = e.render().to_string();
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                | ErrorKind::DisplayVersion => {
                    io.out(text.as_bytes());
                    0
                }
                _ if wants_json => {
                    let first = text
                        .lines()
                        .next()
                        .unwrap_or("invalid command")
                        .trim_start_matches("error: ")
                        .to_string();
                    report(io, true, &ApiError::new(ErrorCode::Usage, first));
                    2
                }
                _ => {
                    io.err(text.as_bytes());
                    2
                }
            };
        }
    };
    let json = line.json;
    if let Some(limits) = &caller.limits
        && let Err(err) = limits.check(&line.command)
    {
        report(io, json, &err);
        return 1;
    }
    if may_pass_on {
        match forward::host_for(m, caller, &line.command).await {
            Ok(Some(host)) => return forward::run_on(m, caller, &host, argv, stdin, io).await,
            Ok(None) => {}
            Err(err) => {
                report(io, json, &err);
                return 1;
            }
        }
    }
    match execute(m, caller, line.command, stdin, io, json).await {
        Ok(reply) => {
            reply.print(io, json);
            0
        }
        Err(err) => {
            report(io, json, &err);
            1
        }
    }
}

pub(crate) fn report(io: &dyn LobbyOutput, json: bool, err: &ApiError) {
    io.failed(err);
    if json {
        io.err(format!("{}\n", json!({ "error": err })).as_bytes());
    } else {
        io.err(format!("error: {}\n", err.message).as_bytes());
    }
}

pub(crate) fn print_json(io: &dyn LobbyOutput, value: &serde_json::Value) {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    io.out(text.as_bytes());
}

pub(crate) fn println(io: &dyn LobbyOutput, text: &str) {
    io.out(format!("{text}\n").as_bytes());
}

/// What a command answers: one value that prints itself as JSON (with `--json`) or as text
/// for people. Every front end (SSH, the HTTPS API, the dashboard, `nook vm`) prints it the
/// same way, in [`run`].
pub(crate) struct Reply {
    json: serde_json::Value,
    text: Option<String>,
}

impl Reply {
    pub(crate) fn new(json: serde_json::Value, text: impl Into<String>) -> Self {
        Self {
            json,
            text: Some(text.into()),
        }
    }

    /// Nothing to print: `rm` that removed nothing (its errors are already said), and the
    /// branches that run before an account exists.
    pub(crate) fn printed() -> Self {
        Self {
            json: serde_json::Value::Null,
            text: None,
        }
    }

    fn print(&self, io: &dyn LobbyOutput, json: bool) {
        if json {
            if !self.json.is_null() {
                print_json(io, &self.json);
            }
        } else if let Some(text) = &self.text {
            println(io, text);
        }
    }
}

fn signed_up<'a>(m: &Manager, caller: &'a Caller) -> Result<&'a nook_store::Account, ApiError> {
    caller.account.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotSignedUp,
            format!(
                "This SSH key has no nook account yet. Sign up with: {} signup you@example.com",
                m.config().ssh_command(None)
            ),
        )
    })
}

async fn execute(
    m: &Arc<Manager>,
    caller: &Caller,
    command: LobbyCommand,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
    json: bool,
) -> Result<Reply, ApiError> {
    if caller.admin {
        return vm_command(
            m,
            caller,
            ADMIN_OWNER,
            Scope::Admin,
            command,
            stdin,
            io,
            json,
        )
        .await;
    }
    match &command {
        LobbyCommand::Signup { email, invite } => {
            return identity::signup(m, caller, email, invite.as_deref()).await;
        }
        LobbyCommand::SshKey(SshKeyCommand::Confirm { code }) => {
            return identity::confirm_key(m, caller, code).await;
        }
        _ => {}
    }
    let account = signed_up(m, caller)?;
    if !matches!(command, LobbyCommand::Whoami) {
        identity::check_confirmed(m, account)?;
    }
    if matches!(command, LobbyCommand::New(_) | LobbyCommand::Cp { .. }) {
        m.limits()
            .create
            .take(&account.id)
            .map_err(|wait| crate::limits::too_many("new VMs", wait))?;
    }
    let scope = Scope::Account(&account.id);
    match command {
        LobbyCommand::Signup { .. } => Ok(Reply::printed()),
        LobbyCommand::Invite { email } => identity::invite(m, account, &email).await,
        LobbyCommand::Whoami => {
            let env = envelope(m, &account.id).await?;
            let email = if account.email_verified {
                account.email.clone()
            } else {
                format!("{} (unconfirmed)", account.email)
            };
            let owner = if account.owner {
                " (owns this host)"
            } else {
                ""
            };
            let text = format!(
                "{email}{owner}\n  account  {}\n  key      {}\n{}",
                account.id,
                caller.fingerprint,
                format_envelope(&env)
            );
            Ok(Reply::new(
                json!({ "id": account.id, "email": account.email, "email_verified": account.email_verified, "owner": account.owner, "key": caller.fingerprint, "envelope": env }),
                text,
            ))
        }
        LobbyCommand::Stat { name: None } => {
            let mut env = envelope(m, &account.id).await?;
            let mut text = format_envelope(&env);
            // The host's memory tiers are the host owner's business only.
            if account.owner
                && let Some(tiers) = m.tier_stats().await
            {
                text.push('\n');
                text.push_str(&format_tiers(&tiers));
                env["host_memory_tiers"] = json!(tiers);
            }
            Ok(Reply::new(env, text))
        }
        LobbyCommand::Usage { vm, since } => llm_usage(m, &account.id, vm.as_deref(), &since).await,
        LobbyCommand::SshKey(cmd) => ssh_keys(m, account, caller, cmd).await,
        LobbyCommand::Integrations(cmd) => crate::integrations::command(m, account, cmd).await,
        LobbyCommand::Browser => {
            let token = m
                .store()
                .create_login_token(Some(&account.id), None, crate::web::LOGIN_TTL_SECS)
                .await
                .map_err(|e| crate::errors::from_store("make a login link", e))?;
            let url = format!("{}/__nook/login?token={token}", m.config().web_origin(None));
            Ok(Reply::new(
                json!({ "url": url, "expires_in_secs": crate::web::LOGIN_TTL_SECS }),
                format!(
                    "Open this link in your browser and press Sign in (once, within 15 minutes):\n{url}"
                ),
            ))
        }
        LobbyCommand::Token(cmd) => tokens(m, account, scope, cmd).await,
        LobbyCommand::Agent(cmd) => agent::command(m, account, cmd, stdin, io, json).await,
        command => vm_command(m, caller, &account.id, scope, command, stdin, io, json).await,
    }
}

/// The commands about VMs, which the host's admin runs too (on every VM, as owner
/// [`ADMIN_OWNER`] for the VMs it makes); anything else is about an account.
#[allow(clippy::too_many_arguments)]
async fn vm_command(
    m: &Arc<Manager>,
    caller: &Caller,
    owner: &str,
    scope: Scope<'_>,
    command: LobbyCommand,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
    json: bool,
) -> Result<Reply, ApiError> {
    match command {
        LobbyCommand::New(args) => new_vm(m, owner, args, stdin, io, json).await,
        LobbyCommand::Ls { pattern, long } => {
            let vms: Vec<VmInfo> = m
                .list(scope)
                .await?
                .into_iter()
                .filter(|vm| pattern.as_deref().is_none_or(|p| matches(p, &vm.name)))
                .filter(|vm| {
                    let only = caller.limits.as_ref().and_then(|l| l.vms.as_ref());
                    only.is_none_or(|names| names.contains(&vm.name))
                })
                .collect();
            let text = if vms.is_empty() {
                if pattern.is_some() {
                    "No VMs match.".to_string()
                } else {
                    "No VMs yet. Make one with: new".to_string()
                }
            } else if long {
                std::iter::once(nook_api::vm_table_header("CREATED"))
                    .chain(
                        vms.iter()
                            .map(|vm| nook_api::vm_table_row(vm, &vm.created_at)),
                    )
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                vms.iter()
                    .map(|vm| {
                        // Why it failed, stopped by itself, or is paused.
                        let why = vm.state_reason.as_deref().map(|w| format!(" ({w})"));
                        // On a fleet, where each VM lives.
                        let host = vm.host.as_deref().map(|h| format!(" on {h}"));
                        format!(
                            "{:<24} {}{}{}",
                            vm.name,
                            vm.state.as_str(),
                            host.unwrap_or_default(),
                            why.unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            Ok(Reply::new(
                serde_json::to_value(&vms).unwrap_or_default(),
                text,
            ))
        }
        LobbyCommand::Rm { names } => {
            let mut failed = None;
            let mut removed = Vec::new();
            for name in &names {
                match m.remove(name, scope).await {
                    Ok(()) => removed.push(name.clone()),
                    Err(e) => {
                        report(io, json, &e);
                        failed = Some(e);
                    }
                }
            }
            let text = removed
                .iter()
                .map(|name| format!("Removed {name}"))
                .collect::<Vec<_>>()
                .join("\n");
            let reply = if removed.is_empty() && !json {
                Reply::printed()
            } else {
                Reply::new(json!({ "removed": removed }), text)
            };
            match failed {
                // Already reported, per name; what was removed is still said, and the status
                // still says something failed.
                Some(e) => {
                    reply.print(io, json);
                    Err(ApiError::new(
                        e.code,
                        format!(
                            "{} of {} VMs could not be removed",
                            names.len() - removed.len(),
                            names.len()
                        ),
                    ))
                }
                None => Ok(reply),
            }
        }
        LobbyCommand::Start { name, on: None } => {
            let vm = m.start(&name, scope, &progress(io, json)).await?;
            Ok(vm_reply(m, &vm))
        }
        LobbyCommand::Start { name, on: Some(_) } => {
            let (vm, as_of_ms) = m
                .start_from_replica(&name, scope, &progress(io, json))
                .await?;
            let age = (time::OffsetDateTime::now_utc().unix_timestamp() - as_of_ms / 1000).max(0);
            let mut v = serde_json::to_value(&vm).unwrap_or_default();
            v["ssh"] = json!(m.config().ssh_command(Some(&vm.name)));
            v["restored_from_replica_ms"] = json!(as_of_ms);
            let text = format!(
                "{} is {} on {}, restored from its replica of {age} s ago: what it wrote after that is lost",
                vm.name,
                vm.state.as_str(),
                m.config().host_name
            );
            Ok(Reply::new(v, text))
        }
        LobbyCommand::Replicate { name, host, off: _ } => {
            match m
                .set_replica(&name, host.as_deref(), scope, &progress(io, json))
                .await?
            {
                Some(r) => {
                    let text = format!(
                        "{} is replicated to {} every {} s (this round sent {}); if its host goes down, `start {} --on {}` brings it back as of its last replica",
                        r.vm,
                        r.host,
                        r.every_secs,
                        format_size(r.bytes_sent),
                        r.vm,
                        r.host
                    );
                    Ok(Reply::new(
                        serde_json::to_value(&r).unwrap_or_default(),
                        text,
                    ))
                }
                None => Ok(Reply::new(
                    json!({ "vm": name, "replica_host": null }),
                    format!("{name} is no longer replicated"),
                )),
            }
        }
        LobbyCommand::Stop { name } => {
            let vm = m.stop(&name, scope).await?;
            Ok(vm_reply(m, &vm))
        }
        LobbyCommand::Restart { name } => {
            let vm = m.restart(&name, scope, &progress(io, json)).await?;
            Ok(vm_reply(m, &vm))
        }
        LobbyCommand::Rename { old, new } => {
            let vm = m.rename(&old, &new, scope).await?;
            Ok(vm_reply(m, &vm))
        }
        LobbyCommand::Cp {
            source,
            new,
            stopped_only,
            on,
        } => {
            let req = nook_api::CloneVm {
                name: new,
                stopped_only,
                on,
            };
            let cloned = m.clone_vm(&source, req, scope, &progress(io, json)).await?;
            let ssh = m.config().ssh_command(Some(&cloned.vm.name));
            let mut v = serde_json::to_value(&cloned).unwrap_or_default();
            v["vm"]["ssh"] = json!(ssh);
            let mut text = nook_api::clone_summary(&cloned);
            if cloned.vm.state == VmState::Running {
                text.push_str(&format!("\n  ssh: {ssh}"));
            }
            Ok(Reply::new(v, text))
        }
        LobbyCommand::Move { name, host } => {
            let moved = m
                .move_vm(&name, host.as_deref(), scope, &progress(io, json))
                .await?;
            let text = moved.summary();
            Ok(Reply::new(
                serde_json::to_value(&moved).unwrap_or_default(),
                text,
            ))
        }
        LobbyCommand::Resize {
            name,
            cpu,
            memory,
            disk,
        } => {
            if cpu.is_none() && memory.is_none() && disk.is_none() {
                return Err(ApiError::new(
                    ErrorCode::Usage,
                    "Nothing to change: give --cpu, --memory or --disk",
                ));
            }
            let vm = m
                .resize(&name, scope, cpu, memory.as_deref(), disk.as_deref())
                .await?;
            let note = if vm.state == VmState::Running && (cpu.is_some() || memory.is_some()) {
                " (CPU and memory apply at the next restart)"
            } else {
                ""
            };
            let text = format!(
                "{}: {} vCPU, {} RAM, {} disk{note}",
                vm.name,
                vm.cpu,
                format_size(u64::from(vm.memory_mib) << 20),
                format_size(vm.disk_bytes)
            );
            Ok(Reply::new(
                serde_json::to_value(&vm).unwrap_or_default(),
                text,
            ))
        }
        LobbyCommand::Stat { name: Some(name) } => {
            let stat = m.stat(&name, scope).await?;
            Ok(Reply::new(
                serde_json::to_value(&stat).unwrap_or_default(),
                format_stat(&stat),
            ))
        }
        LobbyCommand::Share(cmd) => share(m, scope, cmd).await,
        other => Err(ApiError::new(
            ErrorCode::Usage,
            format!(
                "`{}` is about an account, and the host's admin is none: run it as the account, over SSH or the HTTPS API",
                other.name()
            ),
        )),
    }
}

async fn tokens(
    m: &Arc<Manager>,
    account: &nook_store::Account,
    scope: Scope<'_>,
    cmd: nook_api::lobby::TokenCommand,
) -> Result<Reply, ApiError> {
    use nook_api::lobby::TokenCommand as C;
    let store = m.store();
    match cmd {
        C::Create {
            vm,
            days,
            api,
            cmds,
            expires,
        } => {
            let ttl = match (days, expires.as_deref()) {
                (Some(days), _) => i64::from(days) * 86400,
                (None, Some(e)) => parse_age(e)
                    .filter(|s| (60..=3650 * 86400).contains(s))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!(
                                "Invalid --expires {e:?}: use a number with s, m, h or d between 1m and 3650d, e.g. 12h or 30d"
                            ),
                        )
                    })?,
                (None, None) => 90 * 86400,
            };
            let days = ttl / 86400;
            let lasts = lifetime(ttl);
            if api {
                return create_api_token(m, account, scope, vm.as_deref(), cmds.as_deref(), ttl)
                    .await;
            }
            let Some(vm) = vm else {
                return Err(ApiError::new(
                    ErrorCode::Usage,
                    "token create needs --vm VM (a token for that VM's web ports) or --api --cmds ...",
                ));
            };
            let vm = m.get(&vm, scope).await?;
            let (id, token) = store
                .create_api_token(&vm.id, &account.id, ttl)
                .await
                .map_err(|e| errors::from_store("make a token", e))?;
            let url = m.config().web_origin(Some(&vm.name));
            let text = format!(
                "Token {id} for {} (shown once; keep it secret; expires in {lasts}; `token revoke {id}` ends it):\n{token}\n  \
                 curl -H 'Authorization: Bearer {token}' {url}/   or   git clone https://x:{token}@{}/REPO",
                vm.name,
                url.trim_start_matches("https://")
            );
            Ok(Reply::new(
                json!({ "id": id, "vm": vm.name, "token": token, "url": url, "expires_in_days": days, "expires_in_secs": ttl }),
                text,
            ))
        }
        C::List => {
            let list = store
                .api_tokens(&account.id)
                .await
                .map_err(|e| errors::from_store("list tokens", e))?;
            let api = store
                .exec_tokens(&account.id)
                .await
                .map_err(|e| errors::from_store("list tokens", e))?;
            let mut rows: Vec<_> = list
                .iter()
                .map(|t| json!({ "id": t.id, "kind": "web", "vm": t.vm, "created_at": t.created_at, "expires_at": t.expires_at }))
                .collect();
            rows.extend(api.iter().map(|t| json!({ "id": t.id, "kind": "api", "vm": t.vm, "cmds": t.cmds, "created_at": t.created_at, "expires_at": t.expires_at })));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let mut lines: Vec<String> = list
                .iter()
                .map(|t| {
                    format!(
                        "{}  web  {}  made {}  expires in {}",
                        t.id,
                        t.vm,
                        t.created_at,
                        lifetime((t.expires_at - now).max(0))
                    )
                })
                .collect();
            lines.extend(api.iter().map(|t| {
                format!(
                    "{}  api  {}  {}  made {}  expires in {}",
                    t.id,
                    t.cmds,
                    t.vm.as_deref().unwrap_or("any VM"),
                    t.created_at,
                    lifetime((t.expires_at - now).max(0))
                )
            }));
            if lines.is_empty() {
                lines.push("No tokens".into());
            }
            Ok(Reply::new(json!(rows), lines.join("\n")))
        }
        C::Revoke { id } => {
            let revoked = store
                .revoke_api_token(&account.id, &id)
                .await
                .map_err(|e| errors::from_store("revoke the token", e))?
                || store
                    .revoke_exec_token(&account.id, &id)
                    .await
                    .map_err(|e| errors::from_store("revoke the token", e))?;
            if !revoked {
                return Err(ApiError::new(
                    ErrorCode::TokenNotFound,
                    format!("You have no token {id}: see token list"),
                ));
            }
            Ok(Reply::new(
                json!({ "revoked": id }),
                format!("Revoked token {id}"),
            ))
        }
    }
}

/// `90 days`, `12 hours`, `30 minutes`: how long a token lasts, for people.
fn lifetime(secs: i64) -> String {
    match secs {
        s if s >= 86400 => format!("{} days", s / 86400),
        s if s >= 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", (s / 60).max(1)),
    }
}

/// `token create --api --cmds ... [--vm VM]`: an opaque token for the HTTPS API.
#[allow(clippy::too_many_arguments)]
async fn create_api_token(
    m: &Arc<Manager>,
    account: &nook_store::Account,
    scope: Scope<'_>,
    vm: Option<&str>,
    cmds: Option<&str>,
    ttl: i64,
) -> Result<Reply, ApiError> {
    let cmds = CommandSet::parse(cmds.unwrap_or_default())
        .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e))?;
    let vm = match vm {
        Some(name) => Some(m.get(name, scope).await?),
        None => None,
    };
    let (id, token) = m
        .store()
        .create_exec_token(
            &account.id,
            &cmds.to_list(),
            vm.as_ref().map(|v| v.id.as_str()),
            ttl,
        )
        .await
        .map_err(|e| errors::from_store("make a token", e))?;
    let lasts = lifetime(ttl);
    let url = format!("{}/api/exec", m.config().web_origin(None));
    let vm_name = vm.map(|v| v.name);
    let only = vm_name
        .as_ref()
        .map_or(String::new(), |v| format!(" on {v} only"));
    let text = format!(
        "API token {id} for {}{only} (shown once; keep it secret; expires in {lasts}; `token revoke {id}` ends it):\n{token}\n  \
         curl -H 'Authorization: Bearer {token}' --data 'ls --json' {url}",
        cmds.to_list()
    );
    Ok(Reply::new(
        json!({ "id": id, "kind": "api", "token": token, "cmds": cmds.to_list(), "vm": vm_name, "url": url, "expires_in_secs": ttl }),
        text,
    ))
}

async fn share(
    m: &Arc<Manager>,
    scope: Scope<'_>,
    cmd: nook_api::lobby::ShareCommand,
) -> Result<Reply, ApiError> {
    use nook_api::lobby::ShareCommand as C;
    let store_err = |what: &'static str| move |e| crate::errors::from_store(what, e);
    // Only the owner manages sharing: someone else's VM looks like no VM.
    let vm = m.get(cmd.vm(), scope).await?;
    let store = m.store();
    let url = m.config().web_origin(Some(&vm.name));
    match cmd {
        C::Show { .. } => {}
        C::SetPublic { .. } => store
            .set_public(&vm.id, true)
            .await
            .map_err(store_err("share the VM"))?,
        C::SetPrivate { .. } => store
            .set_public(&vm.id, false)
            .await
            .map_err(store_err("share the VM"))?,
        C::Add { email, role, .. } => {
            let email = email.trim().to_ascii_lowercase();
            if !email.contains('@') || email.len() > 254 || email.chars().any(char::is_whitespace) {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("'{email}' is not an email address"),
                ));
            }
            let role = nook_store::Role::parse(&role).unwrap_or(nook_store::Role::Viewer);
            store
                .add_share(&vm.id, &email, role)
                .await
                .map_err(store_err("share the VM"))?;
        }
        C::Remove { email, .. } => {
            let email = email.trim().to_ascii_lowercase();
            if !store
                .remove_share(&vm.id, &email)
                .await
                .map_err(store_err("unshare the VM"))?
            {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("{} is not shared with {email}", vm.name),
                ));
            }
        }
        C::AddLink { .. } => {
            let token = store
                .add_share_link(&vm.id)
                .await
                .map_err(store_err("make a share link"))?;
            let link = format!("{url}/?{}={token}", nook_edge::SHARE_PARAM);
            let text = format!(
                "Anyone who opens this link and logs in can see {name}:\n{link}\n\
                 Revoke it with: share remove-link {name} {token}",
                name = vm.name
            );
            return Ok(Reply::new(
                json!({ "vm": vm.name, "url": link, "token": token }),
                text,
            ));
        }
        C::RemoveLink { token, .. } => {
            if !store
                .remove_share_link(&vm.id, &token)
                .await
                .map_err(store_err("revoke a share link"))?
            {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("{} has no share link with that token", vm.name),
                ));
            }
        }
        C::Api {
            cmds, off, any_vm, ..
        } => {
            let cmds = match (cmds, off) {
                (_, true) => None,
                (Some(list), false) => Some(
                    CommandSet::parse(&list)
                        .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e))?
                        .to_list(),
                ),
                (None, false) => None,
            };
            store
                .set_vm_api_grant(&vm.id, cmds.as_deref(), any_vm)
                .await
                .map_err(store_err("change the VM's API access"))?;
        }
        C::Port { port, .. } => {
            let port = match port.as_str() {
                "default" => None,
                p => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("'{p}' is not a port: give 1-65535 or 'default'"),
                    )
                })?),
            };
            store
                .set_http_port(&vm.id, port)
                .await
                .map_err(store_err("set the web port"))?;
        }
    }
    let web = store
        .web_settings(&vm.id)
        .await
        .map_err(store_err("read sharing"))?;
    let people = store
        .shares(&vm.id)
        .await
        .map_err(store_err("read sharing"))?;
    let links = store
        .share_link_count(&vm.id)
        .await
        .map_err(store_err("read sharing"))?;
    let api = store
        .vm_api_grant(&vm.id)
        .await
        .map_err(store_err("read sharing"))?;
    let port = web
        .http_port
        .map_or("default (80, or 8000)".to_string(), |p| p.to_string());
    let mut lines = vec![
        format!("{}: {url}", vm.name),
        format!(
            "  access: {}",
            if web.public {
                "public (anyone with the URL)"
            } else {
                "private (you and the people below)"
            }
        ),
        format!("  port:   {port}"),
    ];
    lines.extend(
        people
            .iter()
            .map(|s| format!("  {} ({})", s.email, s.role.as_str())),
    );
    if links > 0 {
        lines.push(format!("  {links} share link(s)"));
    }
    if let Some(grant) = &api {
        let on = if grant.any_vm {
            "on any of your VMs"
        } else {
            "on itself"
        };
        lines.push(format!(
            "  api:    the VM may run {} {on} at http://169.254.169.254/api/exec",
            grant.cmds
        ));
    }
    let people: Vec<_> = people
        .iter()
        .map(|s| json!({ "email": s.email, "role": s.role.as_str() }))
        .collect();
    Ok(Reply::new(
        json!({ "vm": vm.name, "url": url, "public": web.public, "port": web.http_port, "people": people, "links": links, "api": api.as_ref().map(|g| g.cmds.clone()), "api_any_vm": api.as_ref().is_some_and(|g| g.any_vm) }),
        lines.join("\n"),
    ))
}

fn progress(io: &dyn LobbyOutput, json: bool) -> impl Fn(&str) + Send + Sync + '_ {
    move |step: &str| io.step(step, json)
}

/// A VM as `start`, `stop`, `restart`, `rename` and `new` answer it.
fn vm_reply(m: &Manager, vm: &VmInfo) -> Reply {
    let mut v = serde_json::to_value(vm).unwrap_or_default();
    v["ssh"] = json!(m.config().ssh_command(Some(&vm.name)));
    v["url"] = json!(format!("{}/", m.config().web_origin(Some(&vm.name))));
    Reply::new(v, format!("{} is {}", vm.name, vm.state.as_str()))
}

/// `*` matches any run of characters; without one, the pattern is a substring.
fn matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

pub(crate) fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && !domain.contains('@')
}

async fn new_vm(
    m: &Arc<Manager>,
    owner: &str,
    args: NewArgs,
    stdin: CommandStdin,
    io: &dyn LobbyOutput,
    json: bool,
) -> Result<Reply, ApiError> {
    let mut env_lines = String::new();
    let mut env_pairs = Vec::new();
    for pair in &args.env {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("Invalid --env {pair:?}: use KEY=VALUE"),
            ));
        };
        let key_ok = !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if !key_ok || value.contains('\n') || value.contains('"') {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "Invalid --env {pair:?}: KEY is letters, digits and _, and VALUE has no quotes or newlines"
                ),
            ));
        }
        env_lines.push_str(&format!("{key}=\"{value}\"\n"));
        env_pairs.push((key.to_string(), value.to_string()));
    }
    if args.setup_script.as_deref() == Some("-") && args.prompt.as_deref() == Some("-") {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            "Only one of --setup-script and --prompt can read stdin (`-`): give the other as text",
        ));
    }
    let (stdin, prompt) = match args.prompt.as_deref() {
        Some("-") => match stdin {
            Some(Ok(bytes)) if !bytes.is_empty() => (
                None,
                Some(String::from_utf8(bytes).map_err(|_| {
                    ApiError::new(
                        ErrorCode::InvalidArgument,
                        "The prompt on stdin is not UTF-8 text",
                    )
                })?),
            ),
            Some(Err(err)) => return Err(err),
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "--prompt - reads the prompt from stdin, but stdin was empty",
                ));
            }
        },
        Some(text) if text.trim().is_empty() => {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "--prompt is empty: say what the agent should build",
            ));
        }
        Some(text) => (stdin, Some(text.to_string())),
        None => (stdin, None),
    };
    let script = match args.setup_script.as_deref() {
        Some("-") => match stdin {
            Some(Ok(bytes)) if !bytes.is_empty() => Some(bytes),
            Some(Err(err)) => return Err(err),
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "--setup-script - reads the script from stdin, but stdin was empty",
                ));
            }
        },
        Some(text) => Some(text.as_bytes().to_vec()),
        None => None,
    };
    if args.no_wait && (script.is_some() || !env_lines.is_empty()) {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            "--no-wait cannot be combined with --env or --setup-script",
        ));
    }
    let req = CreateVm {
        name: args.name,
        image: args.image,
        cpu: args.cpu,
        memory: args.memory,
        disk: args.disk,
    };
    let vm = m
        .create(req, owner, !args.no_wait, &progress(io, json))
        .await?;
    let scope = if owner == ADMIN_OWNER {
        Scope::Admin
    } else {
        Scope::Account(owner)
    };
    if !env_lines.is_empty() {
        let mut p = m
            .run_in(
                &vm.name,
                scope,
                vec!["sh".into(), "-c".into(), "cat >> /etc/environment".into()],
                vec![],
                Some(env_lines.into_bytes()),
            )
            .await?;
        while let Some(msg) = p.next().await {
            if matches!(msg, GuestMsg::Exit { .. }) {
                break;
            }
        }
    }
    let mut setup_status = None;
    if let Some(script) = script {
        if !json {
            io.err(b"==> running the setup script\r\n");
        }
        let mut p = m
            .run_in(
                &vm.name,
                scope,
                vec!["sh".into(), "-s".into()],
                // /etc/environment is read at login, not by this shell: the script gets the
                // variables itself, as `--env` promises it.
                env_pairs,
                Some(script),
            )
            .await?;
        while let Some(msg) = p.next().await {
            io.writable().await;
            match msg {
                // The script's output is for the user, but stdout stays clean for --json.
                GuestMsg::Output {
                    data,
                    stream: Stream::Stdout,
                } if !json => io.out(&data),
                GuestMsg::Output { data, .. } => io.err(&data),
                GuestMsg::Exit { code, signal } => {
                    setup_status = Some(code.unwrap_or(128 + signal.unwrap_or(0)));
                    break;
                }
                _ => {}
            }
        }
    }
    let ssh = m.config().ssh_command(Some(&vm.name));
    let url = format!("{}/", m.config().web_origin(Some(&vm.name)));
    let mut v = serde_json::to_value(&vm).unwrap_or_default();
    v["ssh"] = json!(ssh);
    v["url"] = json!(url);
    if let Some(status) = setup_status {
        v["setup_script_status"] = json!(status);
    }
    let mut agent_line = String::new();
    if let Some(prompt) = prompt.filter(|_| setup_status.is_none_or(|s| s == 0)) {
        let started = agent::after_new(m, owner, &vm.name, &prompt).await?;
        agent_line = format!(
            "\n  agent: {} (conversation {})",
            started["url"].as_str().unwrap_or_default(),
            started["conversation"].as_str().unwrap_or_default()
        );
        v["agent"] = started;
    }
    let state = if vm.state == VmState::Running {
        "is ready"
    } else {
        "is being created"
    };
    let reply = Reply::new(
        v,
        format!(
            "{} {state} ({}, {} vCPU, {} RAM, {} disk)\n  shell: {ssh}\n  web:   {url}{agent_line}",
            vm.name,
            vm.image,
            vm.cpu,
            format_size(u64::from(vm.memory_mib) << 20),
            format_size(vm.disk_bytes)
        ),
    );
    match setup_status {
        // The VM is made and kept: say so, then fail.
        Some(status) if status != 0 => {
            reply.print(io, json);
            Err(ApiError::new(
                ErrorCode::GuestError,
                format!(
                    "The setup script exited with status {status}; the VM '{}' is kept",
                    vm.name
                ),
            ))
        }
        _ => Ok(reply),
    }
}

/// `usage [VM] [--since 7d]`: the gateway's usage table, summed per VM and model.
async fn llm_usage(
    m: &Arc<Manager>,
    account_id: &str,
    vm: Option<&str>,
    since: &str,
) -> Result<Reply, ApiError> {
    let secs = parse_age(since).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("Invalid --since {since:?}: use a number with s, m, h or d, e.g. 24h or 7d"),
        )
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // What settled a moment ago is in the table too.
    m.ledger()
        .flush()
        .await
        .map_err(|e| crate::errors::from_store("read the usage", e))?;
    let rows = m
        .store()
        .usage(account_id, now.saturating_sub(secs), vm)
        .await
        .map_err(|e| crate::errors::from_store("read the usage", e))?;
    let credit = m
        .ledger()
        .balance(account_id)
        .await
        .map_err(|e| crate::errors::from_store("read the credit", e))?;
    let dollars = |micros: u64| nook_gateway::dollars(i64::try_from(micros).unwrap_or(i64::MAX));
    let value = {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "vm": r.vm_name, "provider": r.provider, "model": r.model, "requests": r.requests,
                    "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
                    "cache_read_tokens": r.cache_read_tokens, "cache_write_tokens": r.cache_write_tokens,
                    "cost": dollars(r.cost_micros), "cost_micros": r.cost_micros,
                })
            })
            .collect();
        json!({ "since_secs": secs, "usage": rows, "credit": nook_gateway::dollars(credit), "credit_micros": credit })
    };
    let mut text = format!(
        "{:<20} {:<28} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12}\n",
        "VM", "MODEL", "REQUESTS", "INPUT", "OUTPUT", "CACHE RD", "CACHE WR", "COST"
    );
    for r in &rows {
        text.push_str(&format!(
            "{:<20} {:<28} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12}\n",
            r.vm_name,
            format!("{}/{}", r.provider, r.model),
            r.requests,
            r.input_tokens,
            r.output_tokens,
            r.cache_read_tokens,
            r.cache_write_tokens,
            dollars(r.cost_micros)
        ));
    }
    if rows.is_empty() {
        text.push_str("(no gateway requests in that time)\n");
    }
    text.push_str(&format!(
        "LLM credit left: {}",
        nook_gateway::dollars(credit)
    ));
    Ok(Reply::new(value, text))
}

/// Seconds in `30d`, `12h`, `15m` or `90s`.
pub fn parse_age(text: &str) -> Option<i64> {
    let (n, unit) = text.trim().split_at(text.trim().len().checked_sub(1)?);
    let n: i64 = n.parse().ok().filter(|n| *n > 0)?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// The account's plan against what its VMs use.
async fn envelope(m: &Arc<Manager>, account_id: &str) -> Result<serde_json::Value, ApiError> {
    let plan = m.plan_for(account_id).await?;
    let vms = m.list(Scope::Account(account_id)).await?;
    let running: Vec<&VmInfo> = vms
        .iter()
        .filter(|vm| vm.state == VmState::Running)
        .collect();
    let usage = m.account_usage(account_id);
    let credit = m
        .ledger()
        .balance(account_id)
        .await
        .map_err(|e| crate::errors::from_store("read the credit", e))?;
    Ok(json!({
        "plan": { "cpu": plan.cpu, "memory_mib": plan.memory_mib, "disk_bytes": plan.disk_bytes, "max_vms": plan.max_vms },
        "vms": vms.len(),
        "running": running.len(),
        "running_memory_mib": running.iter().map(|vm| u64::from(vm.memory_mib)).sum::<u64>(),
        "disk_bytes": vms.iter().map(|vm| vm.disk_bytes).sum::<u64>(),
        "memory_used_bytes": usage.map(|u| u.memory_bytes),
        "cpu_used_ns": usage.map(|u| u.cpu_usage_ns),
        "llm_credit": nook_gateway::dollars(credit),
        "llm_credit_micros": credit,
    }))
}

fn format_tiers(t: &nook_memory::HostTiers) -> String {
    let ratio = if t.compressed_stored_bytes == 0 {
        String::new()
    } else {
        format!(", {:.1}:1", t.ratio())
    };
    format!(
        "  host     packing {}: compressed {} in {} of RAM{ratio}; on disk {} of {}",
        t.pack,
        format_size(t.compressed_original_bytes),
        format_size(t.compressed_ram_bytes),
        format_size(t.disk_swap_used_bytes),
        format_size(t.disk_swap_size_bytes),
    )
}

fn format_envelope(env: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let plan = &env["plan"];
    let real = match env["memory_used_bytes"].as_u64() {
        Some(bytes) => format!(", {} really in use", format_size(bytes)),
        None => String::new(),
    };
    format!(
        "  envelope {} vCPU, {} memory, {} disk, up to {} VMs\n  VMs      {} ({} running)\n  memory   {} nominal in running VMs{real}\n  disk     {} of {}\n  LLM      {} of credit (see `usage`)",
        plan["cpu"],
        format_size(n(&plan["memory_mib"]) << 20),
        format_size(n(&plan["disk_bytes"])),
        n(&plan["max_vms"]),
        n(&env["vms"]),
        n(&env["running"]),
        format_size(n(&env["running_memory_mib"]) << 20),
        format_size(n(&env["disk_bytes"])),
        format_size(n(&plan["disk_bytes"])),
        env["llm_credit"].as_str().unwrap_or("?"),
    )
}

fn format_stat(s: &VmStat) -> String {
    let kib = |v: Option<u64>| {
        v.map(|k| format_size(k * 1024))
            .unwrap_or_else(|| "-".into())
    };
    let used = |total: Option<u64>, avail: Option<u64>| match (total, avail) {
        (Some(t), Some(a)) => format!(
            "{} used of {}",
            format_size(t.saturating_sub(a) * 1024),
            format_size(t * 1024)
        ),
        _ => "-".into(),
    };
    let uptime = s
        .uptime_secs
        .map(|u| humanize_secs(u as u64))
        .unwrap_or_else(|| "-".into());
    format!(
        "{} ({}, {})\n  cpu      {} vCPU, load {}\n  memory   {} (plan {}; on the host {})\n  disk     {} (plan {}; {} on the host)\n  network  rx {} tx {}\n  uptime   {uptime}\n  procs    {}\n  idle     {}",
        s.vm.name,
        s.vm.state.as_str(),
        s.vm.image,
        s.vm.cpu,
        s.load_avg_1m.map(|l| format!("{l:.2}")).unwrap_or_else(|| "-".into()),
        used(s.mem_total_kib, s.mem_available_kib),
        format_size(u64::from(s.vm.memory_mib) << 20),
        match (s.memory_resident_bytes, s.memory_swapped_bytes) {
            (Some(r), Some(w)) if w > 0 => format!("{} in RAM, {} swapped out", format_size(r), format_size(w)),
            (Some(r), _) => format!("{} in RAM", format_size(r)),
            _ => "-".into(),
        },
        used(s.disk_total_kib, s.disk_available_kib),
        format_size(s.vm.disk_bytes),
        format_size(s.disk_host_bytes),
        s.net_rx_bytes.map(format_size).unwrap_or_else(|| "-".into()),
        s.net_tx_bytes.map(format_size).unwrap_or_else(|| "-".into()),
        s.processes.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        if s.idle { "yes (low CPU weight, soft memory limit)" } else { "no" },
    )
    .replace(&kib(None), "-")
}

fn humanize_secs(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Parses `TYPE BASE64 [COMMENT]` and computes its OpenSSH SHA256 fingerprint.
pub fn parse_public_key(line: &str) -> Result<SshKey, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidArgument,
            "Not an SSH public key: give the whole line, like 'ssh-ed25519 AAAA... you@laptop'",
        )
    };
    let mut parts = line.split_whitespace();
    let (kind, data) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    let comment: String = parts
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    const KINDS: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !KINDS.contains(&kind) {
        return Err(bad());
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| bad())?;
    // The blob starts with its own type as an SSH string; it must agree with the prefix.
    let len = blob
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(bad)?;
    if blob.get(4..4 + len) != Some(kind.as_bytes()) {
        return Err(bad());
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&blob);
    let fingerprint = format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    Ok(SshKey {
        fingerprint,
        public_key: format!("{kind} {data}"),
        comment,
    })
}

async fn ssh_keys(
    m: &Arc<Manager>,
    account: &nook_store::Account,
    caller: &Caller,
    cmd: SshKeyCommand,
) -> Result<Reply, ApiError> {
    let store = m.store();
    match cmd {
        SshKeyCommand::List => {
            let keys = store
                .keys(&account.id)
                .await
                .map_err(|e| errors::from_store("list keys", e))?;
            let text = keys
                .iter()
                .map(|k| {
                    let current = if k.fingerprint == caller.fingerprint {
                        " (this session)"
                    } else {
                        ""
                    };
                    format!("{} {}{current}", k.fingerprint, k.comment)
                })
                .collect::<Vec<_>>()
                .join("\n");
            let keys: Vec<_> = keys
                .iter()
                .map(|k| json!({ "fingerprint": k.fingerprint, "key": k.public_key, "comment": k.comment, "current": k.fingerprint == caller.fingerprint }))
                .collect();
            Ok(Reply::new(json!(keys), text))
        }
        SshKeyCommand::Add { key } => {
            let key = parse_public_key(&key.join(" "))?;
            identity::claim_key(m, account, &key).await
        }
        // Handled before an account is needed: the new key runs it.
        SshKeyCommand::Confirm { .. } => Ok(Reply::printed()),
        SshKeyCommand::Remove { fingerprint } => {
            store
                .remove_key(&account.id, &fingerprint)
                .await
                .map_err(|e| match e {
                    nook_store::StoreError::KeyNotFound => ApiError::new(
                        ErrorCode::KeyNotFound,
                        format!("Your account has no key {fingerprint}: see ssh-key list"),
                    ),
                    nook_store::StoreError::LastKey => ApiError::new(
                        ErrorCode::InvalidArgument,
                        "That is your account's last key: add another first",
                    ),
                    other => errors::from_store("remove the key", other),
                })?;
            Ok(Reply::new(
                json!({ "removed": fingerprint }),
                format!("Removed {fingerprint}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_globs_and_substrings() {
        assert!(matches("blog", "my-blog-2"));
        assert!(matches("b*", "blog"));
        assert!(matches("*-2", "my-blog-2"));
        assert!(matches("m*b*2", "my-blog-2"));
        assert!(!matches("b*", "abc"));
        assert!(!matches("x", "blog"));
    }

    #[test]
    fn public_keys_are_checked_and_fingerprinted_like_openssh() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("k");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen (openssh-client) is needed for this test");
        assert!(made.success());
        let line = std::fs::read_to_string(path.with_extension("pub")).expect("pub");
        let printed = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(path.with_extension("pub"))
            .output()
            .expect("ssh-keygen -l");
        let expected = String::from_utf8_lossy(&printed.stdout)
            .split_whitespace()
            .nth(1)
            .expect("fingerprint")
            .to_string();
        let key = parse_public_key(&line).expect("valid");
        assert_eq!(key.fingerprint, expected);
        assert_eq!(key.comment, "me@laptop");
        let data = line.split_whitespace().nth(1).expect("data");
        assert!(
            parse_public_key(&format!("ssh-rsa {data}")).is_err(),
            "type must match the blob"
        );
        assert!(parse_public_key("hello").is_err());
        assert!(parse_public_key("ssh-ed25519 !!!").is_err());
    }

    #[test]
    fn emails_are_sanity_checked() {
        assert!(valid_email("a@example.com"));
        assert!(!valid_email("a@b"));
        assert!(!valid_email("@example.com"));
        assert!(!valid_email("a b@example.com"));
        assert!(!valid_email("a@@example.com"));
    }
}
