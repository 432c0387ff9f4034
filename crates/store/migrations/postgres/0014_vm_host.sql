-- The host a VM lives on: its disk, and its QEMU when it runs. Empty for VMs made before
-- hosts had names (one host then, which takes them as its own).
ALTER TABLE vms ADD COLUMN host TEXT NOT NULL DEFAULT '';
