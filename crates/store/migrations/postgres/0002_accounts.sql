-- Accounts are identified by email; an SSH public key belongs to exactly one account.
CREATE TABLE accounts (
    id         TEXT PRIMARY KEY NOT NULL,
    email      TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE ssh_keys (
    -- "SHA256:..." of the key, as OpenSSH prints it.
    fingerprint TEXT PRIMARY KEY NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    -- "ssh-ed25519 AAAA..." without the comment.
    public_key  TEXT NOT NULL,
    comment     TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL
);
CREATE INDEX ssh_keys_account ON ssh_keys(account_id);
