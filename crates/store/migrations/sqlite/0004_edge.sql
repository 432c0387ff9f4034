-- The HTTPS edge: who may reach a VM's web port, and the secrets that prove it. Every secret
-- is stored as its SHA-256 (hex), never as itself.

-- Public VMs need no login; `http_port` is the VM port `https://VM.DOMAIN/` goes to (NULL:
-- 80, or 8000 when nothing listens on 80).
ALTER TABLE vms ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN http_port INTEGER;

-- Shared with a person by email (they may not have an account yet).
CREATE TABLE shares (
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    email      TEXT NOT NULL,
    role       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (vm_id, email)
);

-- Share links: whoever opens one and logs in gets viewer access until the link is removed.
CREATE TABLE share_links (
    id         TEXT PRIMARY KEY NOT NULL,
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE link_grants (
    link_id    TEXT NOT NULL REFERENCES share_links(id) ON DELETE CASCADE,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    PRIMARY KEY (link_id, account_id)
);

-- One-time login links (`browser` in the lobby, or an email); `email` is set for email logins.
CREATE TABLE login_tokens (
    token_hash TEXT PRIMARY KEY NOT NULL,
    account_id TEXT REFERENCES accounts(id) ON DELETE CASCADE,
    email      TEXT,
    expires_at INTEGER NOT NULL
);

-- Browser sessions, each bound to exactly one host (the dashboard or one VM's).
CREATE TABLE sessions (
    secret_hash TEXT PRIMARY KEY NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    host        TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);

-- Machine tokens for one VM (Bearer, or the password of basic auth).
CREATE TABLE api_tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
