//! One turn: the model answers, its tool calls run in the VM, their results go back, until
//! the model stops calling tools, the user presses stop, or something fails. Whatever
//! happens, the context it leaves is one the model accepts for the next turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::model::{self, Ask, ModelEvent, SseSplitter};
use crate::runtime::Emitter;
use crate::tools;
use crate::{Block, Event, Exec, Journal, Message, Model, Role, Workspace};

/// Model calls in one turn before it pauses for the user.
const MAX_STEPS: usize = 60;
/// Characters of context (about a quarter as many tokens) before older turns are compacted.
pub(crate) const CONTEXT_BUDGET: usize = 400_000;
/// A tool result is kept in the context and the chat up to this size.
const RESULT_LIMIT: usize = 64 << 10;
/// Screenshots kept in the context; older ones become a line of text.
const IMAGES_KEPT: usize = 3;
/// The most of an error answer read.
const ERROR_BODY_LIMIT: usize = 64 << 10;
const AGENTS_MD_LIMIT: usize = 32 << 10;
/// The model's answer may stall this long between two reads before the turn gives up.
const STREAM_IDLE: Duration = Duration::from_secs(300);

const SYSTEM: &str = "You are nook's coding agent. You work inside one persistent Linux VM (Debian, systemd, sudo without a password) through your tools, as its user, in its home directory. \
Build what the user asks, run it, and check it works: start servers with `shell` (they keep running), look at web pages with `browser` (localhost is the VM), and fix what you see. \
A web app on port 8000 (or 80) is what https://VM.DOMAIN/ shows; bind to 0.0.0.0. Keep the user's checklist current with `todo` for work of several steps. \
Be brief: say what you did, what works, and the link or command to try it.";

pub(crate) struct Turn {
    pub id: String,
    pub journal: Arc<dyn Journal>,
    pub emit: Emitter,
    pub ws: Arc<dyn Workspace>,
    pub model: Arc<dyn Model>,
    pub cancel: CancellationToken,
    pub context_budget: usize,
}

enum Step {
    /// The model called tools; go on.
    More,
    End(&'static str),
}

impl Turn {
    pub async fn run(self, user_text: Option<String>) {
        let reason = match self.run_inner(user_text).await {
            Ok(r) => r,
            Err(e) => {
                self.say(Event::Error {
                    message: format!("The agent could not keep its record: {e}"),
                })
                .await;
                "error"
            }
        };
        self.say(Event::TurnEnd {
            reason: reason.to_string(),
        })
        .await;
    }

    async fn say(&self, e: Event) {
        if let Err(err) = self.emit.emit(e).await {
            tracing::warn!(conversation = %self.id, error = %err, "agent event not kept");
        }
    }

    async fn run_inner(&self, user_text: Option<String>) -> Result<&'static str, String> {
        let mut msgs = self.journal.context(&self.id).await.map_err(|e| e.0)?;
        let resumed = user_text.is_none();
        close_open_calls(
            &mut msgs,
            if resumed {
                "interrupted: nook restarted while this ran; it may or may not have finished"
            } else {
                "not run: the turn ended before it"
            },
        );
        if let Some(text) = user_text {
            msgs.push(Message {
                role: Role::User,
                blocks: vec![Block::Text { text }],
            });
        } else if msgs.last().is_none_or(|m| m.role == Role::Assistant) {
            msgs.push(Message {
                role: Role::User,
                blocks: vec![Block::Text {
                    text: "(nook restarted during your turn; go on with the task)".into(),
                }],
            });
        }
        self.save(&msgs).await?;
        let system = self.system().await;
        let api = self.model.api();
        let specs = tools::specs(api);
        for _ in 0..MAX_STEPS {
            if self.cancel.is_cancelled() {
                return Ok("stopped");
            }
            if let Err(e) = self.ws.check().await {
                self.say(Event::Error { message: e.0 }).await;
                return Ok("error");
            }
            if let Some((n, chars)) = compact(&mut msgs, self.context_budget) {
                self.save(&msgs).await?;
                self.say(Event::Compacted { messages: n, chars }).await;
            }
            let body = model::request_body(
                api,
                &Ask {
                    model: self.model.model(),
                    system: &system,
                    tools: &specs,
                    messages: &msgs,
                    max_tokens: 8192,
                },
            );
            match self.step(&mut msgs, body).await? {
                Step::More => {}
                Step::End(reason) => return Ok(reason),
            }
        }
        self.say(Event::Error {
            message: format!(
                "Paused after {MAX_STEPS} model calls in one turn; send a message to go on"
            ),
        })
        .await;
        Ok("steps")
    }

    async fn save(&self, msgs: &[Message]) -> Result<(), String> {
        self.journal
            .save_context(&self.id, msgs)
            .await
            .map_err(|e| e.0)
    }

    /// The system prompt, with the VM user's `~/AGENTS.md` when there is one.
    async fn system(&self) -> String {
        let read = self
            .ws
            .exec(Exec {
                script: "cat ~/AGENTS.md 2>/dev/null".into(),
                timeout: Duration::from_secs(10),
                keep: AGENTS_MD_LIMIT / 2,
                ..Default::default()
            })
            .await;
        match read {
            Ok(out) if out.status == Some(0) && out.total > 0 => format!(
                "{SYSTEM}\n\nThe user's ~/AGENTS.md in the VM says:\n\n{}",
                out.text()
            ),
            _ => SYSTEM.to_string(),
        }
    }

    /// One model call and the tools it asks for.
    async fn step(&self, msgs: &mut Vec<Message>, body: Value) -> Result<Step, String> {
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let reply = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(Step::End("stopped")),
            r = self.model.post(bytes) => r,
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.say(Event::Error {
                    message: format!("Could not reach the model: {e}"),
                })
                .await;
                return Ok(Step::End("error"));
            }
        };
        let mut body = reply.body;
        if reply.status != 200 {
            let mut err = Vec::new();
            while let Ok(Some(Ok(chunk))) =
                tokio::time::timeout(Duration::from_secs(30), body.next()).await
            {
                err.extend_from_slice(&chunk);
                if err.len() > ERROR_BODY_LIMIT {
                    break;
                }
            }
            self.say(Event::Error {
                message: model::error_message(reply.status, &err),
            })
            .await;
            return Ok(Step::End("error"));
        }
        let mut parser = model::parser(self.model.api());
        let mut sse = SseSplitter::default();
        let mut text = String::new();
        let mut calls: Vec<(String, String, Value)> = Vec::new();
        let mut failure: Option<String> = None;
        let mut stopped = false;
        let mut finished = false;
        let mut usage = (0, 0);
        'read: loop {
            let chunk = tokio::select! {
                _ = self.cancel.cancelled() => { stopped = true; break 'read; }
                c = tokio::time::timeout(STREAM_IDLE, body.next()) => c,
            };
            let chunk = match chunk {
                Err(_) => {
                    failure = Some(format!(
                        "The model sent nothing for {} s",
                        STREAM_IDLE.as_secs()
                    ));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    failure = Some(format!("The model's answer broke off: {e}"));
                    break;
                }
                Ok(Some(Ok(c))) => c,
            };
            let events = match sse.push(&chunk) {
                Ok(e) => e,
                Err(e) => {
                    failure = Some(format!("The model's answer was refused: {e}"));
                    break;
                }
            };
            for e in events {
                for me in parser.event(&e.name, &e.data) {
                    match me {
                        ModelEvent::Text(delta) if !delta.is_empty() => {
                            text.push_str(&delta);
                            self.say(Event::Text { delta }).await;
                        }
                        ModelEvent::Text(_) => {}
                        ModelEvent::ToolUse { id, name, input } => {
                            self.say(Event::ToolCall {
                                id: id.clone(),
                                name: name.clone(),
                                input: input.clone(),
                            })
                            .await;
                            calls.push((id, name, input));
                        }
                        ModelEvent::Usage { input, output } => usage = (input, output),
                        ModelEvent::Error(m) => {
                            failure = Some(format!("The model failed mid-answer: {m}"));
                            break 'read;
                        }
                        ModelEvent::Done => {
                            finished = true;
                            break 'read;
                        }
                    }
                }
            }
        }
        if !stopped && failure.is_none() && !finished {
            failure = Some("The model's answer ended before it was complete".into());
        }
        if usage != (0, 0) {
            self.say(Event::Usage {
                input: usage.0,
                output: usage.1,
            })
            .await;
        }
        // A call the model did not finish is not kept: it was never made.
        if failure.is_some() {
            calls.clear();
        }
        let mut blocks = Vec::new();
        if !text.trim().is_empty() {
            blocks.push(Block::Text { text });
        }
        for (id, name, input) in &calls {
            blocks.push(Block::ToolUse {
                id: id.clone(),
                name: name.clone(),
                input: input.clone(),
            });
        }
        if !blocks.is_empty() {
            msgs.push(Message {
                role: Role::Assistant,
                blocks,
            });
        }
        if let Some(message) = failure {
            self.save(msgs).await?;
            self.say(Event::Error { message }).await;
            return Ok(Step::End("error"));
        }
        if stopped || calls.is_empty() {
            close_open_calls(msgs, "not run: the user stopped the turn");
            self.save(msgs).await?;
            return Ok(Step::End(if stopped { "stopped" } else { "done" }));
        }
        self.save(msgs).await?;
        let mut results = Vec::new();
        for (id, name, input) in calls {
            let started = Instant::now();
            let outcome = if stopped {
                None
            } else {
                tokio::select! {
                    _ = self.cancel.cancelled() => None,
                    o = tools::run(self.ws.as_ref(), &name, &input) => Some(o),
                }
            };
            let Some(outcome) = outcome else {
                // The chat and the log show the call ended; the model hears the same.
                let why = if stopped {
                    "not run: the user stopped the turn"
                } else {
                    "stopped by the user while it ran"
                };
                stopped = true;
                self.say(Event::ToolResult {
                    id: id.clone(),
                    name: name.clone(),
                    ok: false,
                    output: why.to_string(),
                    png: None,
                    ms: started.elapsed().as_millis() as u64,
                })
                .await;
                results.push(Block::ToolResult {
                    id,
                    text: why.to_string(),
                    png: None,
                    is_error: true,
                });
                continue;
            };
            if let Some(items) = outcome.todo.clone() {
                self.say(Event::Todo { items }).await;
            }
            // Both APIs refuse an empty text block, and a command often prints nothing.
            let text = if outcome.text.trim().is_empty() {
                "(no output)".to_string()
            } else {
                cap(&outcome.text, RESULT_LIMIT)
            };
            let png = outcome.png.as_ref().map(|p| B64.encode(p));
            self.say(Event::ToolResult {
                id: id.clone(),
                name: name.clone(),
                ok: outcome.ok,
                output: text.clone(),
                png: png.clone(),
                ms: started.elapsed().as_millis() as u64,
            })
            .await;
            results.push(Block::ToolResult {
                id,
                text,
                png,
                is_error: !outcome.ok,
            });
        }
        msgs.push(Message {
            role: Role::User,
            blocks: results,
        });
        if stopped {
            close_open_calls(msgs, "not run: the user stopped the turn");
            self.save(msgs).await?;
            return Ok(Step::End("stopped"));
        }
        self.save(msgs).await?;
        Ok(Step::More)
    }
}

fn cap(s: &str, limit: usize) -> String {
    if s.len() <= limit {
        return s.to_string();
    }
    let mut head = limit / 2;
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = s.len() - limit / 2;
    while !s.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[... {} bytes cut ...]\n{}",
        &s[..head],
        tail - head,
        &s[tail..]
    )
}

/// Every tool call without a result gets one saying why, so the model's next request is valid
/// (both APIs refuse a call without its result).
pub(crate) fn close_open_calls(msgs: &mut Vec<Message>, why: &str) {
    let Some(last) = msgs.last() else { return };
    if last.role != Role::Assistant {
        // Results may be missing from the last user message (a stop mid-tools).
        let n = msgs.len();
        if n < 2 || msgs[n - 2].role != Role::Assistant {
            return;
        }
        let open: Vec<String> = open_calls(&msgs[n - 2], &msgs[n - 1]);
        for id in open {
            msgs[n - 1].blocks.push(Block::ToolResult {
                id,
                text: why.to_string(),
                png: None,
                is_error: true,
            });
        }
        return;
    }
    let ids: Vec<String> = last
        .blocks
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    if !ids.is_empty() {
        msgs.push(Message {
            role: Role::User,
            blocks: ids
                .into_iter()
                .map(|id| Block::ToolResult {
                    id,
                    text: why.to_string(),
                    png: None,
                    is_error: true,
                })
                .collect(),
        });
    }
}

fn open_calls(assistant: &Message, user: &Message) -> Vec<String> {
    assistant
        .blocks
        .iter()
        .filter_map(|b| match b {
            Block::ToolUse { id, .. } => Some(id.clone()),
            _ => None,
        })
        .filter(|id| {
            !user
                .blocks
                .iter()
                .any(|b| matches!(b, Block::ToolResult { id: r, .. } if r == id))
        })
        .collect()
}

fn size(m: &Message) -> usize {
    m.blocks
        .iter()
        .map(|b| match b {
            Block::Text { text } => text.len(),
            Block::ToolUse { input, .. } => input.to_string().len(),
            // An image costs the model about as much as 6 KB of text.
            Block::ToolResult { text, png, .. } => text.len() + png.as_ref().map_or(0, |_| 6000),
        })
        .sum()
}

/// Keeps the context within `budget` characters: drops all but the last few screenshots, then
/// replaces the oldest whole turns with a summary. `Some((messages, summary chars))` when it
/// dropped turns.
pub(crate) fn compact(msgs: &mut Vec<Message>, budget: usize) -> Option<(usize, usize)> {
    let mut seen = 0;
    for m in msgs.iter_mut().rev() {
        for b in m.blocks.iter_mut().rev() {
            if let Block::ToolResult { png, text, .. } = b
                && png.is_some()
            {
                seen += 1;
                if seen > IMAGES_KEPT {
                    *png = None;
                    text.push_str("\n[screenshot dropped from the context]");
                }
            }
        }
    }
    let total: usize = msgs.iter().map(size).sum();
    if total <= budget {
        return None;
    }
    // Cut where a turn starts (a user message with text), so no call loses its result, and
    // keep at least the last turn.
    let starts: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.role == Role::User && m.blocks.iter().any(|b| matches!(b, Block::Text { .. }))
        })
        .map(|(i, _)| i)
        .collect();
    let mut cut = 0;
    let mut summary = String::new();
    for &s in starts.iter().skip(1) {
        let dropped: usize = msgs[..s].iter().map(size).sum();
        cut = s;
        summary = summarize(&msgs[..s]);
        if total - dropped + summary.len() <= budget / 2 {
            break;
        }
    }
    if cut == 0 {
        return None;
    }
    let chars = summary.len();
    msgs.drain(..cut);
    if let Some(first) = msgs.first_mut() {
        first.blocks.insert(0, Block::Text { text: summary });
    }
    Some((cut, chars))
}

/// What the dropped turns said and did, briefly.
fn summarize(msgs: &[Message]) -> String {
    let short = |s: &str, n: usize| -> String {
        let t: String = s.chars().take(n).collect();
        if t.len() < s.len() {
            format!("{t}…")
        } else {
            t
        }
    };
    let mut out = String::from(
        "[Earlier turns of this conversation were compacted to fit the context. What they said and did:]\n",
    );
    for m in msgs {
        for b in &m.blocks {
            let line = match (m.role, b) {
                (Role::User, Block::Text { text }) => format!("- The user: {}", short(text, 400)),
                (Role::Assistant, Block::Text { text }) => format!("- You: {}", short(text, 300)),
                (_, Block::ToolUse { name, input, .. }) => {
                    format!("- You ran {name} {}", short(&input.to_string(), 150))
                }
                _ => continue,
            };
            out.push_str(&line);
            out.push('\n');
            if out.len() > 12_000 {
                out.push_str("- (more, not shown)\n");
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(t: &str) -> Message {
        Message {
            role: Role::User,
            blocks: vec![Block::Text { text: t.into() }],
        }
    }

    #[test]
    fn calls_left_open_get_a_result() {
        let mut msgs = vec![
            user("go"),
            Message {
                role: Role::Assistant,
                blocks: vec![Block::ToolUse {
                    id: "a".into(),
                    name: "bash".into(),
                    input: json!({}),
                }],
            },
        ];
        close_open_calls(&mut msgs, "stopped");
        assert_eq!(msgs.len(), 3);
        assert!(
            matches!(&msgs[2].blocks[0], Block::ToolResult { id, is_error: true, .. } if id == "a")
        );
        close_open_calls(&mut msgs, "again");
        assert_eq!(msgs.len(), 3, "nothing left open");
    }

    #[test]
    fn compaction_drops_whole_old_turns_and_keeps_the_last() {
        let mut msgs = Vec::new();
        for i in 0..10 {
            msgs.push(user(&format!("turn {i} {}", "x".repeat(5000))));
            msgs.push(Message {
                role: Role::Assistant,
                blocks: vec![Block::Text {
                    text: "y".repeat(5000),
                }],
            });
        }
        let (dropped, _) = compact(&mut msgs, 20_000).expect("compacted");
        assert!(dropped >= 10, "{dropped}");
        assert_eq!(msgs[0].role, Role::User);
        let Block::Text { text } = &msgs[0].blocks[0] else {
            panic!("no summary")
        };
        assert!(text.contains("The user: turn 0"), "{text}");
        assert!(msgs.iter().map(size).sum::<usize>() <= 20_000);
        assert!(compact(&mut msgs, 20_000).is_none());
    }

    #[test]
    fn cutting_keeps_both_ends_and_says_how_much_went() {
        let s = format!("{}{}", "a".repeat(100), "b".repeat(100));
        let c = cap(&s, 50);
        assert!(c.starts_with("aaaa") && c.ends_with("bbbb") && c.contains("150 bytes cut"));
    }
}
