//! nook's coding agent: a conversation with a model that acts on one VM through tools
//! (`bash`, `shell`, `read`, `write`, `patch`, `search`, `browser`, `logs`, `todo`).
//!
//! A leaf behind four traits, so the loop runs without a daemon:
//! - [`Workspace`]: run a command in the VM (the daemon goes through the guest agent, so no
//!   model key and no nook credential is ever in the VM);
//! - [`Model`]: post a request body to the model's API (the daemon goes through its own LLM
//!   gateway, so every token is metered against the account's credit);
//! - [`Browser`]: a headless browser that reaches the VM and nothing of the host's
//!   ([`chromium`] is the real one);
//! - [`Journal`]: where conversations, their context and their events are kept.
//!
//! [`Agents`] runs turns, one at a time per conversation, and hands out their events in order
//! with numbers, so a client that reconnects with the last number it saw misses nothing and
//! sees nothing twice.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod chromium;
pub mod model;
mod patch;
mod runtime;
mod text;
mod tools;
mod turn;

pub use model::{Api, ModelReply};
pub use runtime::{AgentError, Agents, PROMPT_LIMIT, Started};
pub use tools::TOOL_NAMES;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A command for the VM: `bash -lc script`, as the VM's user in its home unless `root`.
#[derive(Debug, Clone, Default)]
pub struct Exec {
    pub script: String,
    pub stdin: Option<Vec<u8>>,
    pub root: bool,
    /// Killed (its process group hung up) after this long.
    pub timeout: std::time::Duration,
    /// Output kept: this many bytes from the start and as many from the end.
    pub keep: usize,
}

/// What a command printed (stdout and stderr interleaved as they came), cut in the middle
/// when it was longer than twice [`Exec::keep`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when it was killed by a signal or the timeout.
    pub status: Option<i32>,
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    /// Every byte it printed, kept or not.
    pub total: u64,
    pub timed_out: bool,
}

impl ExecOutput {
    /// The output as text, with a note on what was cut.
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        let kept = (self.head.len() + self.tail.len()) as u64;
        if self.total > kept {
            s.push_str(&format!(
                "\n[... {} bytes cut: {} in all; showing the first {} and the last {} ...]\n",
                self.total - kept,
                self.total,
                self.head.len(),
                self.tail.len()
            ));
        }
        s.push_str(&String::from_utf8_lossy(&self.tail));
        s
    }
}

/// Why the VM could not run a tool's command. The message is for the model and the user.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct WorkspaceError(pub String);

/// "Run this in the VM". The daemon re-checks on every call that the person the agent acts for
/// may still use the VM, so lost access stops the agent at its next step.
pub trait Workspace: Send + Sync {
    fn exec(&self, exec: Exec) -> BoxFuture<'_, Result<ExecOutput, WorkspaceError>>;
    /// May the turn go on? `Err` says why not (access lost, VM gone or stopped).
    fn check(&self) -> BoxFuture<'_, Result<(), WorkspaceError>>;
    /// The browser for this VM, started on first use.
    fn browser(&self) -> BoxFuture<'_, Result<std::sync::Arc<dyn Browser>, WorkspaceError>>;
}

/// What the `browser` tool asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrowserAction {
    Navigate { url: String },
    Screenshot,
    Console,
    Eval { js: String },
    Click { selector: String },
}

#[derive(Debug, Clone, Default)]
pub struct BrowserOutcome {
    pub text: String,
    pub png: Option<Vec<u8>>,
}

pub trait Browser: Send + Sync {
    fn act(&self, action: BrowserAction) -> BoxFuture<'_, Result<BrowserOutcome, WorkspaceError>>;
}

/// "Call the model": posts a request body to the provider's API and gives back the status
/// and the streamed body.
pub trait Model: Send + Sync {
    fn api(&self) -> Api;
    fn model(&self) -> &str;
    fn post(&self, body: Vec<u8>) -> BoxFuture<'_, Result<ModelReply, String>>;
}

/// One conversation, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub vm_id: String,
    /// The account that started it.
    pub account_id: String,
    pub title: String,
    pub model: String,
    pub state: State,
    /// The number of the last event.
    pub last_seq: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    Running,
    /// The daemon stopped mid-turn; it goes on when the daemon is back.
    Interrupted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Running => "running",
            State::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> State {
        match s {
            "running" => State::Running,
            "interrupted" => State::Interrupted,
            _ => State::Idle,
        }
    }
}

/// A message of the model's context, in a form both APIs can be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        id: String,
        text: String,
        /// A PNG, base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        png: Option<String>,
        is_error: bool,
    },
}

/// What happens in a conversation, numbered in order. The chat shows these; the SSE stream
/// and `agent log` give them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The user's words, starting a turn.
    User {
        text: String,
        by: String,
    },
    /// A piece of the model's answer.
    Text {
        delta: String,
    },
    ToolCall {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        id: String,
        name: String,
        ok: bool,
        output: String,
        /// A screenshot, base64 PNG.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        png: Option<String>,
        ms: u64,
    },
    Todo {
        items: Vec<TodoItem>,
    },
    /// Older turns were shortened to fit the model's context.
    Compacted {
        messages: usize,
        chars: usize,
    },
    /// Something went wrong; the conversation is still usable.
    Error {
        message: String,
    },
    /// Something the user should know that is not an error (a resumed turn).
    Notice {
        message: String,
    },
    Usage {
        input: u64,
        output: u64,
    },
    /// The turn is over: `done`, `stopped`, `error`, `interrupted`, `steps`.
    TurnEnd {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TodoItem {
    pub text: String,
    #[serde(default)]
    pub done: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JournalError(pub String);

/// Where conversations are kept (the daemon's database).
pub trait Journal: Send + Sync {
    fn create(&self, c: &Conversation) -> BoxFuture<'_, Result<(), JournalError>>;
    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Conversation>, JournalError>>;
    fn list(&self, vm_id: &str) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>>;
    /// Conversations a daemon that stopped left `running`.
    fn running(&self) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>>;
    fn set_state(&self, id: &str, state: State) -> BoxFuture<'_, Result<(), JournalError>>;
    /// Appends event `seq`; the conversation's `last_seq` becomes `seq`.
    fn append(&self, id: &str, seq: u64, event: &Event) -> BoxFuture<'_, Result<(), JournalError>>;
    /// Events after `after`, in order, at most `limit`.
    fn events(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(u64, Event)>, JournalError>>;
    fn context(&self, id: &str) -> BoxFuture<'_, Result<Vec<Message>, JournalError>>;
    fn save_context(
        &self,
        id: &str,
        messages: &[Message],
    ) -> BoxFuture<'_, Result<(), JournalError>>;
}
