-- Proven identities. An account's email counts (for shares, collaborator SSH, email login and
-- the identity apps receive) only once it is verified: by a link mailed to it, by an invite
-- the host's admin made for it, or by the admin vouching for it.
ALTER TABLE accounts ADD COLUMN email_verified_at TEXT;
-- The first account on a host is its owner.
ALTER TABLE accounts ADD COLUMN owner BIGINT NOT NULL DEFAULT 0;

-- `ssh-key add` makes a claim; the key joins the account only when a client holding it
-- redeems the claim's one-time code, which proves possession.
CREATE TABLE key_claims (
    code_hash   TEXT PRIMARY KEY NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    comment     TEXT NOT NULL DEFAULT '',
    expires_at  BIGINT NOT NULL
);
CREATE INDEX key_claims_account ON key_claims(account_id);

-- One-time signup codes the admin made for an email (`nook account invite`).
CREATE TABLE invites (
    code_hash  TEXT PRIMARY KEY NOT NULL,
    email      TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
