-- Facts about the store as a whole, one row each. `secrets_key_check` is a value sealed with
-- the secrets key of the host that first used the store: a host whose key does not open it
-- would seal and unseal nothing another host can read, so it refuses to start.
CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
