//! Conversations and their running turns: one turn at a time per conversation, its events
//! numbered, kept in the journal before anyone sees them, and handed out from a number on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::turn::{self, Turn};
use crate::{Conversation, Event, Journal, Model, State, Workspace};

/// Events kept in memory per conversation for readers that are nearly caught up; older ones
/// come from the journal.
const TAIL: usize = 4096;
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
    running: Option<CancellationToken>,
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

    /// Goes on with a turn the daemon's restart cut short.
    pub async fn resume(
        self: &Arc<Self>,
        c: &Conversation,
        ws: Arc<dyn Workspace>,
        model: Arc<dyn Model>,
    ) -> Result<Started, AgentError> {
        self.start(c, None, ws, model).await
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
        tokio::spawn(async move {
            t.run(text).await;
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

    /// Stops every running turn (the daemon is shutting down); they stay `running` in the
    /// journal, so the next start resumes them.
    pub fn abandon_all(&self) -> usize {
        let hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        hubs.values()
            .filter_map(|h| h.lock().running.clone())
            .map(|c| c.cancel())
            .count()
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
            h.tail.push_back((seq, Arc::new(event)));
            while h.tail.len() > TAIL {
                h.tail.pop_front();
            }
        }
        self.hub.notify.notify_waiters();
        Ok(seq)
    }
}
