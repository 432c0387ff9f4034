-- The fleet: hosts sharing one database, and which host runs each VM. Times are unix
-- milliseconds by the database's clock, so hosts' clocks need not agree.
CREATE TABLE hosts (
    name            TEXT PRIMARY KEY NOT NULL,
    -- The host's id, kept in its data dir: a name a live host with another id holds is taken.
    instance        TEXT NOT NULL,
    addr            TEXT NOT NULL,
    version         TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    heartbeat_at    INTEGER NOT NULL,
    cpus            INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    running_vms     INTEGER NOT NULL,
    memory_used_mib INTEGER NOT NULL
);

-- A VM runs only on the host holding its lease, until `expires_at`. Each new holder gets the
-- next `epoch`: a renewal names its epoch, so a host whose lease was taken over learns it at
-- its next renewal and stops the VM (see ARCHITECTURE.md, "Leases and fencing").
CREATE TABLE vm_leases (
    vm_id      TEXT PRIMARY KEY NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    host       TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX vm_leases_host ON vm_leases(host);
