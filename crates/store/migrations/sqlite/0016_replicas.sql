-- The host that keeps a replica of a VM's disk (empty: none), and when its last replica was
-- complete (milliseconds since the epoch, by the sending host's clock; 0: not yet).
ALTER TABLE vms ADD COLUMN replica_host TEXT NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN replicated_at_ms BIGINT NOT NULL DEFAULT 0;
