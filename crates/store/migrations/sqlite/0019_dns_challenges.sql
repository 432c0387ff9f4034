-- ACME DNS-01 values each host of a fleet publishes for its own orders: a CA may ask any
-- host's DNS server, so every host answers all of them. Each lapses (the database's clock,
-- unix milliseconds) unless published again; a host rewrites its own only when they change.
CREATE TABLE dns_challenges (
    host          TEXT NOT NULL,
    domain        TEXT NOT NULL,
    value         TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (host, domain, value)
);
