-- What an account's VMs may reach with a credential they never hold. `config` is JSON without
-- secrets (target, header names, repositories, peer VM); `secret` is sealed by the daemon
-- (XChaCha20-Poly1305 under a key file in the data dir) and never leaves it in the clear.
CREATE TABLE integrations (
    id         TEXT PRIMARY KEY NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    config     TEXT NOT NULL,
    secret     BLOB,
    created_at TEXT NOT NULL,
    UNIQUE (account_id, name)
);

-- Which VMs may use an integration, until when (unix seconds; NULL: until detached).
CREATE TABLE integration_grants (
    integration_id TEXT NOT NULL REFERENCES integrations(id) ON DELETE CASCADE,
    vm_id          TEXT NOT NULL,
    expires_at     INTEGER,
    PRIMARY KEY (integration_id, vm_id)
);
CREATE INDEX integration_grants_vm ON integration_grants(vm_id);
