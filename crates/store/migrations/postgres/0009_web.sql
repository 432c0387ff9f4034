-- Opaque tokens for the HTTPS API (`token create --api`). Only the SHA-256 of the secret is
-- kept. `cmds` is `all` or a comma-separated list of lobby commands; `vm_id`, when set, is the
-- only VM the token may act on (by id, so a rename does not move the grant).
CREATE TABLE exec_tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    cmds       TEXT NOT NULL,
    vm_id      TEXT REFERENCES vms(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- A VM allowed to call the API from inside, as its owner (`share api VM --cmds ...`).
CREATE TABLE vm_api_grants (
    vm_id TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    cmds  TEXT NOT NULL
);
