-- A cordoned host takes no new VMs (`nook host drain` cordons before it moves VMs off, and
-- `nook host uncordon` ends it); the VMs it holds stay and may start and stop there. It is the
-- admin's word, so a heartbeat or a restart leaves it as it is.
ALTER TABLE hosts ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
