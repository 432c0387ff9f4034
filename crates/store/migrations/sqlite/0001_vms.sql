CREATE TABLE vms (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL UNIQUE,
    owner        TEXT NOT NULL,
    image        TEXT NOT NULL,
    -- Absolute path of the read-only base the disk overlay points at; kept so an image rebuild
    -- never changes what an existing VM boots.
    image_dir    TEXT NOT NULL,
    cpu          INTEGER NOT NULL,
    memory_mib   INTEGER NOT NULL,
    disk_bytes   INTEGER NOT NULL,
    -- The network slot: the VM's point-to-point link and tap. Unique among live VMs.
    slot         INTEGER NOT NULL UNIQUE,
    state        TEXT NOT NULL,
    state_reason TEXT,
    pid          INTEGER,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
