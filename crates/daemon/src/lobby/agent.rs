//! `agent ls|prompt|log|stop` and `new --prompt`: the coding agent from the lobby, the HTTPS
//! API and the dashboard.

use std::sync::Arc;

use futures::StreamExt;
use nook_agent::{Conversation, Event};
use nook_api::lobby::AgentCommand;
use nook_api::{ApiError, ErrorCode};
use serde_json::json;

use super::{LobbyOutput, Reply};
use crate::agent::{api_error, may_drive};
use crate::errors;
use crate::manager::Manager;

/// The VM `account` may drive the agent in: its own, or one shared with it as a collaborator.
/// Any other is "no such VM", like one that does not exist.
async fn drivable(
    m: &Manager,
    account: &nook_store::Account,
    name: &str,
) -> Result<nook_store::VmRecord, ApiError> {
    let not_found = || ApiError::new(ErrorCode::NotFound, format!("No VM named '{name}'"));
    let vm = m.store().get(name).await.map_err(|_| not_found())?;
    if may_drive(m.store(), &vm, account).await {
        Ok(vm)
    } else {
        Err(not_found())
    }
}

/// Where the chat of a conversation is.
pub fn chat_url(m: &Manager, vm: &str, conversation: &str) -> String {
    format!(
        "{}/vm/{vm}/agent?c={conversation}",
        m.config().web_origin(None)
    )
}

fn conversation_json(m: &Manager, vm: &str, c: &Conversation, running: bool) -> serde_json::Value {
    json!({
        "id": c.id,
        "vm": vm,
        "title": c.title,
        "model": c.model,
        "state": if running { "running" } else { c.state.as_str() },
        "events": c.last_seq,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
        "url": chat_url(m, vm, &c.id),
    })
}

/// The words of a prompt, or stdin for `-`.
fn prompt_text(words: &[String], stdin: super::CommandStdin) -> Result<String, ApiError> {
    if words.len() == 1 && words[0] == "-" {
        return match stdin {
            Some(Ok(bytes)) if !bytes.is_empty() => String::from_utf8(bytes).map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    "The prompt on stdin is not UTF-8 text",
                )
            }),
            Some(Err(e)) => Err(e),
            _ => Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "The prompt is `-`, which reads it from stdin, but stdin was empty",
            )),
        };
    }
    Ok(words.join(" "))
}

/// Starts a turn: in conversation `id`, or in a new one. Returns the conversation and the
/// number of its first event.
pub(super) async fn start(
    m: &Arc<Manager>,
    account: &nook_store::Account,
    vm: &nook_store::VmRecord,
    id: Option<&str>,
    text: &str,
) -> Result<(Conversation, u64), ApiError> {
    let host = m.agent_host().clone();
    let agents = host.agents.clone();
    let conversation = match id {
        Some(id) => agents
            .journal()
            .get(id)
            .await
            .map_err(|e| errors::internal("read the conversation", &e))?
            .filter(|c| c.vm_id == vm.id)
            .ok_or_else(|| api_error(nook_agent::AgentError::NoConversation(id.to_string())))?,
        None => {
            // Checked before the conversation is made, so a refused prompt leaves none behind.
            if text.trim().is_empty() {
                return Err(api_error(nook_agent::AgentError::EmptyPrompt));
            }
            if text.trim().len() > nook_agent::PROMPT_LIMIT {
                return Err(api_error(nook_agent::AgentError::PromptTooLong(
                    nook_agent::PROMPT_LIMIT >> 10,
                )));
            }
            agents
                .create(
                    &vm.id,
                    &account.id,
                    &m.config().coding_agent.model,
                    text,
                    time::OffsetDateTime::now_utc().unix_timestamp(),
                )
                .await
                .map_err(api_error)?
        }
    };
    let (ws, model) = host.tools_for(m, vm, account.clone(), &conversation.model);
    let started = agents
        .prompt(&conversation, text, &account.email, ws, model)
        .await
        .map_err(api_error)?;
    Ok((started.conversation, started.first_seq))
}

pub(super) async fn command(
    m: &Arc<Manager>,
    account: &nook_store::Account,
    cmd: AgentCommand,
    stdin: super::CommandStdin,
    io: &dyn LobbyOutput,
    json: bool,
) -> Result<Reply, ApiError> {
    let vm = drivable(m, account, cmd.vm()).await?;
    let agents = m.agent_host().agents.clone();
    match cmd {
        AgentCommand::Ls { .. } => {
            let list = agents
                .journal()
                .list(&vm.id)
                .await
                .map_err(|e| errors::internal("list conversations", &e))?;
            let values: Vec<serde_json::Value> = list
                .iter()
                .map(|c| conversation_json(m, &vm.name, c, agents.is_running(&c.id)))
                .collect();
            let mut text = String::new();
            if list.is_empty() {
                text = format!(
                    "No conversations in {} yet: agent prompt {} 'what to build'",
                    vm.name, vm.name
                );
            }
            for v in &values {
                text.push_str(&format!(
                    "{}  {:<11} {:>5} events  {}\n",
                    v["id"].as_str().unwrap_or_default(),
                    v["state"].as_str().unwrap_or_default(),
                    v["events"],
                    v["title"].as_str().unwrap_or_default(),
                ));
            }
            Ok(Reply::new(json!(values), text.trim_end().to_string()))
        }
        AgentCommand::Prompt {
            conversation,
            no_wait,
            text,
            ..
        } => {
            let text = prompt_text(&text, stdin)?;
            let (c, first) = start(m, account, &vm, conversation.as_deref(), &text).await?;
            let url = chat_url(m, &vm.name, &c.id);
            if no_wait {
                return Ok(Reply::new(
                    json!({"conversation": c.id, "url": url, "first_event": first}),
                    format!(
                        "The agent is working in conversation {}.\n  chat: {url}\n  follow: agent log {} {} --after {}",
                        c.id,
                        vm.name,
                        c.id,
                        first - 1
                    ),
                ));
            }
            if !json {
                io.err(format!("conversation {} · {url}\r\n", c.id).as_bytes());
            }
            let end = follow(&agents, &c, first - 1, true, io, json).await?;
            match end.as_deref() {
                Some("error") => Err(ApiError::new(
                    ErrorCode::GuestError,
                    format!(
                        "The turn ended with an error; the conversation goes on: agent prompt {} --conversation {} TEXT",
                        vm.name, c.id
                    ),
                )),
                _ => Ok(Reply::printed()),
            }
        }
        AgentCommand::Log { id, after, .. } => {
            let c = agents
                .journal()
                .get(&id)
                .await
                .map_err(|e| errors::internal("read the conversation", &e))?
                .filter(|c| c.vm_id == vm.id)
                .ok_or_else(|| api_error(nook_agent::AgentError::NoConversation(id.clone())))?;
            follow(&agents, &c, after, false, io, json).await?;
            Ok(Reply::printed())
        }
        AgentCommand::Stop { id, .. } => {
            let c = agents
                .journal()
                .get(&id)
                .await
                .map_err(|e| errors::internal("read the conversation", &e))?
                .filter(|c| c.vm_id == vm.id)
                .ok_or_else(|| api_error(nook_agent::AgentError::NoConversation(id.clone())))?;
            let stopped = agents.stop(&c.id);
            Ok(Reply::new(
                json!({"conversation": c.id, "stopped": stopped}),
                if stopped {
                    format!("Stopping the turn in {}", c.id)
                } else {
                    format!("Nothing is running in {}", c.id)
                },
            ))
        }
    }
}

/// Prints a conversation's events after `after`: to the end of the running turn when
/// `to_turn_end`, else what there is. Returns how the last turn seen ended.
async fn follow(
    agents: &Arc<nook_agent::Agents>,
    c: &Conversation,
    after: u64,
    to_turn_end: bool,
    io: &dyn LobbyOutput,
    json: bool,
) -> Result<Option<String>, ApiError> {
    let events = agents.events(c, after, to_turn_end);
    tokio::pin!(events);
    let mut ended = None;
    while let Some(item) = events.next().await {
        let (seq, event) = item
            .map_err(|e| errors::internal("read the conversation", &nook_agent::JournalError(e)))?;
        io.writable().await;
        if json {
            let mut v = serde_json::to_value(&*event).unwrap_or_default();
            v["seq"] = json!(seq);
            print_line_json(io, &v);
        } else {
            io.out(event.to_text().as_bytes());
        }
        if let Event::TurnEnd { reason } = &*event {
            ended = Some(reason.clone());
            if to_turn_end {
                break;
            }
        }
    }
    Ok(ended)
}

fn print_line_json(io: &dyn LobbyOutput, v: &serde_json::Value) {
    let mut line = v.to_string();
    line.push('\n');
    io.out(line.as_bytes());
}

/// `new --prompt`: after the VM is ready, starts the agent and says where its chat is.
pub(super) async fn after_new(
    m: &Arc<Manager>,
    owner: &str,
    vm_name: &str,
    text: &str,
) -> Result<serde_json::Value, ApiError> {
    let account = m
        .store()
        .account_by_id(owner)
        .await
        .map_err(|e| errors::from_store("read the account", e))?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                "--prompt needs an account to act for: run it from your own account",
            )
        })?;
    let vm = m
        .store()
        .get(vm_name)
        .await
        .map_err(|e| errors::from_store("read the VM", e))?;
    let (c, _) = start(m, &account, &vm, None, text).await?;
    Ok(json!({"conversation": c.id, "url": chat_url(m, vm_name, &c.id)}))
}

/// Reads `--prompt -` and `agent prompt VM -` from stdin, like `--setup-script -`.
pub fn wants_stdin(argv: &[String]) -> bool {
    let prompt_dash = argv.windows(2).any(|w| w[0] == "--prompt" && w[1] == "-")
        || argv.iter().any(|a| a == "--prompt=-");
    let agent_dash = argv.first().is_some_and(|a| a == "agent")
        && argv.get(1).is_some_and(|a| a == "prompt")
        && argv.last().is_some_and(|a| a == "-");
    prompt_dash || agent_dash
}
