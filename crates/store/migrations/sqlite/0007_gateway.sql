-- LLM credit per account, in micro-dollars. A request reserves its most possible cost and
-- settles the true cost after; the balance can go below zero by at most one reservation.
CREATE TABLE credits (
    account_id     TEXT PRIMARY KEY NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    balance_micros INTEGER NOT NULL
);

-- One row per request the gateway passed on, as the provider counted it.
CREATE TABLE llm_usage (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    at                 INTEGER NOT NULL,
    account_id         TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    vm_id              TEXT NOT NULL,
    vm_name            TEXT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_micros        INTEGER NOT NULL,
    status             INTEGER NOT NULL
);
CREATE INDEX llm_usage_account_at ON llm_usage(account_id, at);
