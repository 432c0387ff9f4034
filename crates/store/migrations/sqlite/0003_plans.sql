-- An account's envelope. Absent rows mean the daemon's configured default plan.
CREATE TABLE plans (
    account_id TEXT PRIMARY KEY NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    cpu        REAL NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    max_vms    INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
