//! Conversations and their running turns: one turn at a time per conversation, its events
//! numbered, kept in the journal before anyone sees them, and handed out from a number on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::turn::{self, Turn};
use crate::{Conversation, Event, Journal, Model, State, Workspace};

/// Events kept in memory per conversation for readers that are nearly caught up, by count
/// and by size (screenshots are large); older ones come from the journal.
const TAIL: usize = 4096;
const TAIL_BYTES: usize = 8 << 20;
/// Events read from the journal at a time.
const PAGE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("A turn is already running in conversation {0}: wait for it, or stop it first")]
    Busy(String),
    #[error("No conversation {0} on this VM: `agent ls VM` lists them")]
    NoConversation(String),
    #[error("The prompt is empty: say what the agent should do")]
    EmptyPrompt,
    #[error("The prompt is over {0} KiB")]
    PromptTooLong(usize),
    #[error("The agent's journal failed: {0}")]
    Journal(String),
}

impl From<crate::JournalError> for AgentError {
    fn from(e: crate::JournalError) -> Self {
        AgentError::Journal(e.0)
    }
}

/// The longest prompt taken.
pub const PROMPT_LIMIT: usize = 64 << 10;

/// A turn that was started: where its events begin.
#[derive(Debug, Clone)]
pub struct Started {
    pub conversation: Conversation,
    /// The number of the turn's first event (the user's words).
    pub first_seq: u64,
}

pub(crate) struct Hub {
    inner: Mutex<HubInner>,
    notify: Notify,
}

struct HubInner {
    /// The last event published (persisted and in `tail`).
    published: u64,
    tail: VecDeque<(u64, Arc<Event>)>,
    tail_bytes: usize,
    running: Option<CancellationToken>,
}

/// About what an event takes in memory.
fn weight(e: &Event) -> usize {
    match e {
        Event::ToolResult { output, png, .. } => {
            256 + output.len() + png.as_ref().map_or(0, String::len)
        }
        Event::User { text, .. } => 256 + text.len(),
        Event::Text { delta } => 64 + delta.len(),
        _ => 256,
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The agent runtime: the daemon holds one.
pub struct Agents {
    journal: Arc<dyn Journal>,
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    /// Characters of context before older turns are compacted.
    pub(crate) context_budget: usize,
}

impl Agents {
    pub fn new(journal: Arc<dyn Journal>) -> Arc<Agents> {
        Arc::new(Agents {
            journal,
            hubs: Mutex::default(),
            context_budget: turn::CONTEXT_BUDGET,
        })
    }

    /// With a smaller context budget (tests of compaction).
    pub fn with_context_budget(journal: Arc<dyn Journal>, chars: usize) -> Arc<Agents> {
        Arc::new(Agents {
            journal,
            hubs: Mutex::default(),
            context_budget: chars,
        })
    }

    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.journal
    }

    fn hub(&self, c: &Conversation) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        hubs.entry(c.id.clone())
            .or_insert_with(|| {
                Arc::new(Hub {
                    inner: Mutex::new(HubInner {
                        published: c.last_seq,
                        tail: VecDeque::new(),
                        tail_bytes: 0,
                        running: None,
                    }),
                    notify: Notify::new(),
                })
            })
            .clone()
    }

    /// A new, empty conversation.
    pub async fn create(
        &self,
        vm_id: &str,
        account_id: &str,
        model: &str,
        title: &str,
        now: i64,
    ) -> Result<Conversation, AgentError> {
        let c = Conversation {
            id: format!("c{}", hex::encode(rand::random::<[u8; 5]>())),
            vm_id: vm_id.to_string(),
            account_id: account_id.to_string(),
            title: title_of(title),
            model: model.to_string(),
            state: State::Idle,
            last_seq: 0,
            created_at: now,
            updated_at: now,
        };
        self.journal.create(&c).await?;
        Ok(c)
    }

    /// Starts a turn with the user's words; its events follow on [`Agents::events`].
    pub async fn prompt(
        self: &Arc<Self>,
        c: &Conversation,
        text: &str,
        by: &str,
        ws: Arc<dyn Workspace>,
        model: Arc<dyn Model>,
    ) -> Result<Started, AgentError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AgentError::EmptyPrompt);
        }
        if text.len() > PROMPT_LIMIT {
            return Err(AgentError::PromptTooLong(PROMPT_LIMIT >> 10));
        }
        self.start(c, Some((text.to_string(), by.to_string())), ws, model)
            .await
    }

    /// Goes on with a turn the daemon's restart cut short. A turn that had ended (the daemon
    /// stopped between its last event and marking it idle) is only marked idle.
    pub async fn resume(
        self: &Arc<Self>,
        c: &Conversation,
        ws: Arc<dyn Workspace>,
        model: Arc<dyn Model>,
    ) -> Result<Option<Started>, AgentError> {
        let last = self
            .journal
            .events(&c.id, c.last_seq.saturating_sub(1), 1)
            .await?;
        if matches!(last.last(), Some((_, Event::TurnEnd { .. }))) {
            self.journal.set_state(&c.id, State::Idle).await?;
            return Ok(None);
        }
        self.start(c, None, ws, model).await.map(Some)
    }

    /// Ends a turn that cannot go on after a restart, saying why; the conversation stays,
    /// and a new prompt continues it.
    pub async fn interrupt(&self, c: &Conversation, why: &str) -> Result<(), AgentError> {
        let emit = Emitter {
            id: c.id.clone(),
            journal: self.journal.clone(),
            hub: self.hub(c),
        };
        emit.emit(Event::Error {
            message: format!("This turn could not go on after nook restarted: {why}"),
        })
        .await
        .map_err(AgentError::Journal)?;
        emit.emit(Event::TurnEnd {
            reason: "interrupted".into(),
        })
        .await
        .map_err(AgentError::Journal)?;
        self.journal.set_state(&c.id, State::Interrupted).await?;
        Ok(())
    }

    /// Who sent the last prompt in a conversation (the `by` of its last `user` event): whom a
    /// resumed turn acts for.
    pub async fn last_prompter(&self, c: &Conversation) -> Result<Option<String>, AgentError> {
        let mut after = 0;
        let mut by = None;
        loop {
            let page = self.journal.events(&c.id, after, PAGE).await?;
            let Some((last, _)) = page.last() else {
                return Ok(by);
            };
            after = *last;
            for (_, e) in &page {
                if let Event::User { by: who, .. } = e {
                    by = Some(who.clone());
                }
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        c: &Conversation,
        user: Option<(String, String)>,
        ws: Arc<dyn Workspace>,
        model: Arc<dyn Model>,
    ) -> Result<Started, AgentError> {
        let hub = self.hub(c);
        let cancel = CancellationToken::new();
        {
            let mut h = hub.lock();
            if h.running.is_some() {
                return Err(AgentError::Busy(c.id.clone()));
            }
            h.running = Some(cancel.clone());
        }
        let fail = |e: AgentError| {
            hub.lock().running = None;
            e
        };
        self.journal
            .set_state(&c.id, State::Running)
            .await
            .map_err(|e| fail(e.into()))?;
        let emit = Emitter {
            id: c.id.clone(),
            journal: self.journal.clone(),
            hub: hub.clone(),
        };
        let first_seq = match &user {
            Some((text, by)) => emit
                .emit(Event::User {
                    text: text.clone(),
                    by: by.clone(),
                })
                .await
                .map_err(|e| fail(AgentError::Journal(e)))?,
            None => emit
                .emit(Event::Notice {
                    message: "nook restarted during this turn; going on from where it was".into(),
                })
                .await
                .map_err(|e| fail(AgentError::Journal(e)))?,
        };
        let t = Turn {
            id: c.id.clone(),
            journal: self.journal.clone(),
            emit,
            ws,
            model,
            cancel,
            context_budget: self.context_budget,
        };
        let text = user.map(|(t, _)| t);
        let journal = self.journal.clone();
        let id = c.id.clone();
        let last_words = Emitter {
            id: c.id.clone(),
            journal: self.journal.clone(),
            hub: hub.clone(),
        };
        tokio::spawn(async move {
            // A bug in the turn must not leave the conversation busy for good.
            let ran =
                futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(t.run(text))).await;
            if ran.is_err() {
                tracing::error!(conversation = %id, "an agent turn panicked");
                let _ = last_words
                    .emit(Event::Error {
                        message: "The agent failed unexpectedly; the conversation goes on".into(),
                    })
                    .await;
                let _ = last_words
                    .emit(Event::TurnEnd {
                        reason: "error".into(),
                    })
                    .await;
            }
            if let Err(e) = journal.set_state(&id, State::Idle).await {
                tracing::warn!(conversation = %id, error = %e, "could not mark the turn done");
            }
            let mut h = hub.lock();
            h.running = None;
            drop(h);
            hub.notify.notify_waiters();
        });
        let mut conversation = c.clone();
        conversation.state = State::Running;
        Ok(Started {
            conversation,
            first_seq,
        })
    }

    /// Stops the running turn, if any: `false` when none ran.
    pub fn stop(&self, id: &str) -> bool {
        let hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        match hubs.get(id).and_then(|h| h.lock().running.clone()) {
            Some(cancel) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn is_running(&self, id: &str) -> bool {
        let hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        hubs.get(id).is_some_and(|h| h.lock().running.is_some())
    }

    /// The events after `after`; with `follow`, then every later one as it happens (the
    /// stream never ends), else only those there are now.
    pub fn events(
        self: &Arc<Self>,
        c: &Conversation,
        after: u64,
        follow: bool,
    ) -> impl Stream<Item = Result<(u64, Arc<Event>), String>> + Send + 'static {
        let hub = self.hub(c);
        let journal = self.journal.clone();
        let id = c.id.clone();
        futures::stream::unfold(
            (after, VecDeque::<(u64, Arc<Event>)>::new(), false),
            move |(mut after, mut ready, done)| {
                let hub = hub.clone();
                let journal = journal.clone();
                let id = id.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(next) = ready.pop_front() {
                            after = next.0;
                            return Some((Ok(next), (after, ready, false)));
                        }
                        let notified = hub.notify.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let (published, from_tail) = {
                            let h = hub.lock();
                            let covered = h.tail.front().is_some_and(|(s, _)| *s <= after + 1);
                            let from_tail: Vec<_> = if covered {
                                h.tail.iter().filter(|(s, _)| *s > after).cloned().collect()
                            } else {
                                Vec::new()
                            };
                            (h.published, from_tail)
                        };
                        if !from_tail.is_empty() {
                            ready.extend(from_tail);
                            continue;
                        }
                        if published > after {
                            match journal.events(&id, after, PAGE).await {
                                Ok(page) if !page.is_empty() => {
                                    ready.extend(page.into_iter().map(|(s, e)| (s, Arc::new(e))));
                                    continue;
                                }
                                Ok(_) => {}
                                Err(e) => return Some((Err(e.0), (after, ready, true))),
                            }
                        }
                        if !follow {
                            return None;
                        }
                        notified.await;
                    }
                }
            },
        )
    }
}

fn title_of(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    let mut t: String = line.chars().take(80).collect();
    if t.len() < line.len() {
        t.push('…');
    }
    if t.is_empty() {
        "New conversation".to_string()
    } else {
        t
    }
}

/// Numbers a turn's events, keeps them in the journal, then publishes them.
pub(crate) struct Emitter {
    id: String,
    journal: Arc<dyn Journal>,
    hub: Arc<Hub>,
}

impl Emitter {
    pub(crate) async fn emit(&self, event: Event) -> Result<u64, String> {
        // One writer per conversation (its turn), so the number cannot race.
        let seq = self.hub.lock().published + 1;
        self.journal
            .append(&self.id, seq, &event)
            .await
            .map_err(|e| e.0)?;
        {
            let mut h = self.hub.lock();
            h.published = seq;
            h.tail_bytes += weight(&event);
            h.tail.push_back((seq, Arc::new(event)));
            while h.tail.len() > TAIL || (h.tail_bytes > TAIL_BYTES && h.tail.len() > 1) {
                if let Some((_, old)) = h.tail.pop_front() {
                    h.tail_bytes = h.tail_bytes.saturating_sub(weight(&old));
                }
            }
        }
        self.hub.notify.notify_waiters();
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    //! The loop without a daemon: a journal in memory, a model that plays Anthropic streams,
    //! and a VM whose commands sleep or echo.
    use super::*;
    use crate::{
        Api, BoxFuture, Browser, Exec, ExecOutput, JournalError, Message, ModelReply,
        WorkspaceError,
    };
    use bytes::Bytes;
    use futures::StreamExt;
    use std::time::Duration;

    #[derive(Default)]
    struct MemJournal {
        convs: Mutex<HashMap<String, Conversation>>,
        events: Mutex<HashMap<String, Vec<(u64, Event)>>>,
        context: Mutex<HashMap<String, Vec<Message>>>,
    }

    fn ok<T: Send + 'static>(v: T) -> BoxFuture<'static, Result<T, JournalError>> {
        Box::pin(async move { Ok(v) })
    }

    impl Journal for MemJournal {
        fn create(&self, c: &Conversation) -> BoxFuture<'_, Result<(), JournalError>> {
            self.convs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(c.id.clone(), c.clone());
            ok(())
        }
        fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Conversation>, JournalError>> {
            ok(self
                .convs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned())
        }
        fn list(&self, _vm: &str) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>> {
            ok(self
                .convs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect())
        }
        fn running(&self) -> BoxFuture<'_, Result<Vec<Conversation>, JournalError>> {
            ok(Vec::new())
        }
        fn set_state(&self, id: &str, state: State) -> BoxFuture<'_, Result<(), JournalError>> {
            if let Some(c) = self
                .convs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(id)
            {
                c.state = state;
            }
            ok(())
        }
        fn append(&self, id: &str, seq: u64, e: &Event) -> BoxFuture<'_, Result<(), JournalError>> {
            let mut all = self.events.lock().unwrap_or_else(|p| p.into_inner());
            let list = all.entry(id.to_string()).or_default();
            assert_eq!(
                list.last().map_or(0, |(s, _)| *s) + 1,
                seq,
                "numbers in order"
            );
            list.push((seq, e.clone()));
            ok(())
        }
        fn events(
            &self,
            id: &str,
            after: u64,
            limit: usize,
        ) -> BoxFuture<'_, Result<Vec<(u64, Event)>, JournalError>> {
            let all = self.events.lock().unwrap_or_else(|p| p.into_inner());
            let list = all.get(id).cloned().unwrap_or_default();
            ok(list
                .into_iter()
                .filter(|(s, _)| *s > after)
                .take(limit)
                .collect())
        }
        fn context(&self, id: &str) -> BoxFuture<'_, Result<Vec<Message>, JournalError>> {
            ok(self
                .context
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
                .unwrap_or_default())
        }
        fn save_context(&self, id: &str, m: &[Message]) -> BoxFuture<'_, Result<(), JournalError>> {
            self.context
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string(), m.to_vec());
            ok(())
        }
    }

    /// Plays one Anthropic stream per request: a tool call while `tools` lasts, then text.
    struct Scripted {
        tools: Mutex<Vec<&'static str>>,
    }

    fn sse(events: &[serde_json::Value]) -> String {
        events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
            .collect()
    }

    impl Model for Scripted {
        fn api(&self) -> Api {
            Api::Anthropic
        }
        fn model(&self) -> &str {
            "m"
        }
        fn post(&self, _body: Vec<u8>) -> BoxFuture<'_, Result<ModelReply, String>> {
            let next = self.tools.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let block = match next {
                Some(cmd) => {
                    serde_json::json!({"type": "tool_use", "id": format!("t-{cmd}"), "name": "bash", "input": {}})
                }
                None => serde_json::json!({"type": "text", "text": ""}),
            };
            let mut events = vec![
                serde_json::json!({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
                serde_json::json!({"type": "content_block_start", "index": 0, "content_block": block}),
            ];
            match next {
                Some(cmd) => events.push(serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": format!("{{\"command\":\"{cmd}\"}}")}})),
                None => events.push(serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": "all done"}})),
            }
            events.push(serde_json::json!({"type": "content_block_stop", "index": 0}));
            events
                .push(serde_json::json!({"type": "message_delta", "usage": {"output_tokens": 2}}));
            events.push(serde_json::json!({"type": "message_stop"}));
            let body = sse(&events);
            Box::pin(async move {
                let chunks: Vec<Result<Bytes, String>> = body
                    .as_bytes()
                    .chunks(7)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Ok(ModelReply {
                    status: 200,
                    body: Box::pin(futures::stream::iter(chunks)),
                })
            })
        }
    }

    /// `sleep` takes a minute; anything else echoes itself.
    struct Vm;

    impl Workspace for Vm {
        fn exec(&self, e: Exec) -> BoxFuture<'_, Result<ExecOutput, WorkspaceError>> {
            Box::pin(async move {
                if e.script == "sleep" {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok(ExecOutput {
                    status: Some(0),
                    head: e.script.into_bytes(),
                    ..Default::default()
                })
            })
        }
        fn check(&self) -> BoxFuture<'_, Result<(), WorkspaceError>> {
            Box::pin(async { Ok(()) })
        }
        fn browser(&self) -> BoxFuture<'_, Result<Arc<dyn Browser>, WorkspaceError>> {
            Box::pin(async { Err(WorkspaceError("no browser here".into())) })
        }
    }

    async fn collect(agents: &Arc<Agents>, c: &Conversation, after: u64) -> Vec<(u64, Event)> {
        agents
            .events(c, after, false)
            .map(|e| {
                let (s, e) = e.expect("event");
                (s, (*e).clone())
            })
            .collect()
            .await
    }

    async fn wait_idle(agents: &Agents, id: &str) {
        for _ in 0..500 {
            if !agents.is_running(id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the turn never ended");
    }

    #[tokio::test]
    async fn a_turn_runs_tools_then_answers_and_its_events_resume_by_number() {
        let journal = Arc::new(MemJournal::default());
        let agents = Agents::new(journal.clone());
        let c = agents
            .create("vm1", "acct", "m", "hello", 0)
            .await
            .expect("create");
        let model = Arc::new(Scripted {
            tools: Mutex::new(vec!["echo two", "echo one"]),
        });
        let started = agents
            .prompt(&c, "hello", "a@example.com", Arc::new(Vm), model)
            .await
            .expect("prompt");
        assert_eq!(started.first_seq, 1);
        wait_idle(&agents, &c.id).await;
        let all = collect(&agents, &c, 0).await;
        let kinds: Vec<&str> = all
            .iter()
            .map(|(_, e)| match e {
                Event::User { .. } => "user",
                Event::ToolCall { .. } => "call",
                Event::ToolResult { .. } => "result",
                Event::Text { .. } => "text",
                Event::Usage { .. } => "usage",
                Event::TurnEnd { .. } => "end",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "user", "call", "usage", "result", "call", "usage", "result", "text", "usage",
                "end"
            ]
        );
        assert!(all.iter().enumerate().all(|(i, (s, _))| *s == i as u64 + 1));
        // A reader that saw up to 4 gets the rest, once each.
        let rest = collect(&agents, &c, 4).await;
        assert_eq!(rest.first().map(|(s, _)| *s), Some(5));
        assert_eq!(rest.len(), all.len() - 4);
        // The context pairs each call with its result.
        let ctx = journal.context.lock().unwrap_or_else(|p| p.into_inner())[&c.id].clone();
        assert_eq!(ctx.len(), 6);
        assert!(
            matches!(&ctx[2].blocks[0], crate::Block::ToolResult { text, .. } if text == "echo one")
        );
    }

    #[tokio::test]
    async fn stop_ends_a_running_tool_and_a_busy_conversation_refuses_a_second_turn() {
        let journal = Arc::new(MemJournal::default());
        let agents = Agents::new(journal.clone());
        let c = agents
            .create("vm1", "acct", "m", "wait", 0)
            .await
            .expect("create");
        let model = Arc::new(Scripted {
            tools: Mutex::new(vec!["sleep"]),
        });
        agents
            .prompt(&c, "wait", "a@example.com", Arc::new(Vm), model.clone())
            .await
            .expect("prompt");
        // Until the call starts.
        for _ in 0..500 {
            if collect(&agents, &c, 0)
                .await
                .iter()
                .any(|(_, e)| matches!(e, Event::ToolCall { .. }))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let again = agents
            .prompt(&c, "more", "a@example.com", Arc::new(Vm), model.clone())
            .await;
        assert!(matches!(again, Err(AgentError::Busy(_))));
        assert!(agents.stop(&c.id));
        wait_idle(&agents, &c.id).await;
        let all = collect(&agents, &c, 0).await;
        assert!(matches!(all.last(), Some((_, Event::TurnEnd { reason })) if reason == "stopped"));
        let ctx = journal.context.lock().unwrap_or_else(|p| p.into_inner())[&c.id].clone();
        assert!(matches!(ctx.last().and_then(|m| m.blocks.last()),
            Some(crate::Block::ToolResult { is_error: true, text, .. }) if text.contains("stopped")));
        // The conversation goes on.
        agents
            .prompt(&c, "go on", "a@example.com", Arc::new(Vm), model)
            .await
            .expect("again");
        wait_idle(&agents, &c.id).await;
        assert!(!agents.stop(&c.id), "nothing runs");
    }
}
