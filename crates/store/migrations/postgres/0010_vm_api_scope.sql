-- Whether a VM's API grant reaches every VM of its owner (`share api VM --any-vm`) or only the
-- VM itself, the default.
ALTER TABLE vm_api_grants ADD COLUMN any_vm BIGINT NOT NULL DEFAULT 0;
