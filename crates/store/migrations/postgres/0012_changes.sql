-- Hosts sharing this database remember answers while the store's generation holds, so a write
-- on any host must move every host's: each write statement notifies channel `nook_changed` at
-- its commit (NOTIFY is transactional; a rolled-back write says nothing), and every host
-- listens. The payload names the writer (each host's connections set `nook.writer`), so a host
-- can skip its own writes, which it has counted already. A table added later needs the same
-- trigger: the store's tests check every table.
CREATE FUNCTION nook_notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nook_changed', coalesce(current_setting('nook.writer', true), ''));
    RETURN NULL;
END;
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOR t IN
        SELECT tablename FROM pg_tables
        WHERE schemaname = current_schema() AND tablename <> '_sqlx_migrations'
    LOOP
        EXECUTE format(
            'CREATE TRIGGER nook_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I '
            'FOR EACH STATEMENT EXECUTE FUNCTION nook_notify_changed()',
            t
        );
    END LOOP;
END;
$$;
