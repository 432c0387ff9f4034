-- Invitations for new hosts (`nook host invite`, answered by `nook host join TOKEN`): the
-- SHA-256 of the token's secret (the secret itself is never stored), when it lapses (the
-- database's clock, unix milliseconds), and the store URL the new host is given, sealed with
-- the fleet's secrets key (it may carry a password). Each is taken once.
CREATE TABLE host_invites (
    digest        TEXT PRIMARY KEY NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    store_sealed  BYTEA NOT NULL
);

CREATE TRIGGER nook_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON host_invites
    FOR EACH STATEMENT EXECUTE FUNCTION nook_notify_changed();
