-- The coding agent's conversations (one VM each), the model's context as JSON (rewritten as a
-- turn goes on), and every event of the chat, numbered from 1 per conversation: the chat's
-- history, and what a client that reconnects with its last number is given.
CREATE TABLE agent_conversations (
    id         TEXT PRIMARY KEY NOT NULL,
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    title      TEXT NOT NULL,
    model      TEXT NOT NULL,
    state      TEXT NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    context    TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX agent_conversations_vm ON agent_conversations(vm_id, updated_at);

CREATE TABLE agent_events (
    conversation_id TEXT NOT NULL REFERENCES agent_conversations(id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    body            TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
