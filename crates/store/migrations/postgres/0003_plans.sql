-- An account's envelope. Absent rows mean the daemon's configured default plan.
CREATE TABLE plans (
    account_id TEXT PRIMARY KEY NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    cpu        DOUBLE PRECISION NOT NULL,
    memory_mib BIGINT NOT NULL,
    disk_bytes BIGINT NOT NULL,
    max_vms    BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
