//! What the HTTPS edge needs: sharing (public flag, people, links), login links, per-host
//! sessions and machine tokens. Secrets are stored only as SHA-256 hashes, so a leaked
//! database does not leak a working session or token.

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::{Account, Store, StoreError, decode_account, now};

/// What a share gives: viewers reach the VM's web ports, collaborators may also SSH in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Collaborator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Collaborator => "collaborator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "collaborator" => Some(Role::Collaborator),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub email: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WebSettings {
    pub public: bool,
    pub http_port: Option<u16>,
}

/// The hex SHA-256 of a secret: what is stored and looked up.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret (256 bits, URL-safe hex).
pub fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub(crate) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A machine token as its owner sees it (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiToken {
    pub id: String,
    /// The VM's current name.
    pub vm: String,
    pub created_at: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Store {
    pub async fn web_settings(&self, vm_id: &str) -> Result<WebSettings, StoreError> {
        let row = sqlx::query("SELECT public, http_port FROM vms WHERE id = $1")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(vm_id.to_string()))?;
        Ok(WebSettings {
            public: row.try_get::<i64, _>("public")? != 0,
            http_port: row
                .try_get::<Option<i64>, _>("http_port")?
                .map(|p| p as u16),
        })
    }

    pub async fn set_public(&self, vm_id: &str, public: bool) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE vms SET public = $1 WHERE id = $2")
            .bind(public as i64)
            .bind(vm_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_http_port(&self, vm_id: &str, port: Option<u16>) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE vms SET http_port = $1 WHERE id = $2")
            .bind(port.map(i64::from))
            .bind(vm_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn shares(&self, vm_id: &str) -> Result<Vec<Share>, StoreError> {
        let rows = sqlx::query("SELECT email, role FROM shares WHERE vm_id = $1 ORDER BY email")
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                Ok(Share {
                    email: r.try_get("email")?,
                    role: Role::parse(&role).unwrap_or(Role::Viewer),
                })
            })
            .collect()
    }

    /// Shares with `email` (replacing an earlier role).
    pub async fn add_share(&self, vm_id: &str, email: &str, role: Role) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "INSERT INTO shares (vm_id, email, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT(vm_id, email) DO UPDATE SET role = excluded.role",
        )
        .bind(vm_id)
        .bind(email)
        .bind(role.as_str())
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether any VM is shared with `email`.
    pub async fn is_shared_with(&self, email: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM shares WHERE email = $1 LIMIT 1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// False when the VM was not shared with `email`.
    pub async fn remove_share(&self, vm_id: &str, email: &str) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("DELETE FROM shares WHERE vm_id = $1 AND email = $2")
            .bind(vm_id)
            .bind(email)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The role `account` has on a VM through a share or a redeemed link (owners are the
    /// caller's business). Checked on every request, so a revocation applies at once.
    pub async fn shared_role(
        &self,
        vm_id: &str,
        account: &Account,
    ) -> Result<Option<Role>, StoreError> {
        // A share names an email, so it reaches only an account that proved that email.
        let row = if account.email_verified {
            sqlx::query("SELECT role FROM shares WHERE vm_id = $1 AND email = $2")
                .bind(vm_id)
                .bind(&account.email)
                .fetch_optional(&self.pool)
                .await?
        } else {
            None
        };
        if let Some(row) = row {
            let role: String = row.try_get("role")?;
            return Ok(Role::parse(&role));
        }
        let via_link = sqlx::query(
            "SELECT 1 FROM link_grants g JOIN share_links l ON l.id = g.link_id \
             WHERE l.vm_id = $1 AND g.account_id = $2",
        )
        .bind(vm_id)
        .bind(&account.id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(via_link.map(|_| Role::Viewer))
    }

    /// Makes a share link; returns its secret token (shown once).
    pub async fn add_share_link(&self, vm_id: &str) -> Result<String, StoreError> {
        let _changed = self.change();
        let token = new_secret();
        sqlx::query(
            "INSERT INTO share_links (id, vm_id, token_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hex::encode(rand::random::<[u8; 8]>()))
        .bind(vm_id)
        .bind(hash_secret(&token))
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// Revokes a link and the access it gave; false when no such link exists for the VM.
    pub async fn remove_share_link(&self, vm_id: &str, token: &str) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("DELETE FROM share_links WHERE vm_id = $1 AND token_hash = $2")
            .bind(vm_id)
            .bind(hash_secret(token))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn share_link_count(&self, vm_id: &str) -> Result<u32, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM share_links WHERE vm_id = $1")
            .bind(vm_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("n")? as u32)
    }

    /// Records that `account` opened a valid link of this VM; false for an unknown token.
    pub async fn redeem_share_link(
        &self,
        vm_id: &str,
        token: &str,
        account_id: &str,
    ) -> Result<bool, StoreError> {
        // A wrong token writes nothing, so it does not move the generation (see
        // `redeem_login_token`).
        let Some(row) =
            sqlx::query("SELECT id FROM share_links WHERE vm_id = $1 AND token_hash = $2")
                .bind(vm_id)
                .bind(hash_secret(token))
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(false);
        };
        let _changed = self.change();
        let link_id: String = row.try_get("id")?;
        sqlx::query(
            "INSERT INTO link_grants (link_id, account_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(link_id)
        .bind(account_id)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// A one-time login link for an account, valid for `ttl_secs`; returns its token. Expired
    /// links are swept on the way, so links nobody opened do not pile up.
    pub async fn create_login_token(
        &self,
        account_id: Option<&str>,
        email: Option<&str>,
        ttl_secs: i64,
    ) -> Result<String, StoreError> {
        let _changed = self.change();
        sqlx::query("DELETE FROM login_tokens WHERE expires_at < $1")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        let token = new_secret();
        sqlx::query(
            "INSERT INTO login_tokens (token_hash, account_id, email, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_secret(&token))
        .bind(account_id)
        .bind(email)
        .bind(unix_now() + ttl_secs)
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// Uses up a login token: the account it logs in (made on the spot for an email login
    /// of someone without one), or None when it is unknown, used or expired.
    ///
    /// An unknown token writes nothing: anyone may send one, and every write moves the store's
    /// generation, which empties the edge's remembered answers (a flood of junk tokens would
    /// otherwise make every request go to SQLite). Any DELETE moves the generation, even
    /// one that matches no row, hence the look first.
    pub async fn redeem_login_token(&self, token: &str) -> Result<Option<Account>, StoreError> {
        let known = sqlx::query("SELECT 1 FROM login_tokens WHERE token_hash = $1")
            .bind(hash_secret(token))
            .fetch_optional(&self.pool)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "DELETE FROM login_tokens WHERE token_hash = $1 RETURNING account_id, email, expires_at",
        )
        .bind(hash_secret(token))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if row.try_get::<i64, _>("expires_at")? < unix_now() {
            tx.commit().await?;
            return Ok(None);
        }
        let account_id: Option<String> = row.try_get("account_id")?;
        let email: Option<String> = row.try_get("email")?;
        let account = match (account_id, email) {
            (Some(id), mailed) => {
                // A link that went by mail proves the address it went to.
                if let Some(email) = &mailed {
                    sqlx::query(
                        "UPDATE accounts SET email_verified_at = COALESCE(email_verified_at, $1) \
                         WHERE id = $2 AND email = $3",
                    )
                    .bind(now())
                    .bind(&id)
                    .bind(email)
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query("SELECT * FROM accounts WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| decode_account(&r))
                    .transpose()?
            }
            (None, Some(email)) => {
                let existing = sqlx::query("SELECT * FROM accounts WHERE email = $1")
                    .bind(&email)
                    .fetch_optional(&mut *tx)
                    .await?;
                match existing {
                    // Someone claimed this address (unproven) since the link was sent: the
                    // link's holder does not get that account.
                    Some(r) if !decode_account(&r)?.email_verified => None,
                    Some(r) => Some(decode_account(&r)?),
                    None => {
                        let account = Account {
                            id: hex::encode(rand::random::<[u8; 8]>()),
                            email,
                            created_at: now(),
                            email_verified: true,
                            owner: false,
                        };
                        sqlx::query(
                            "INSERT INTO accounts (id, email, created_at, email_verified_at) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(&account.id)
                        .bind(&account.email)
                        .bind(&account.created_at)
                        .bind(&account.created_at)
                        .execute(&mut *tx)
                        .await?;
                        Some(account)
                    }
                }
            }
            (None, None) => None,
        };
        tx.commit().await?;
        Ok(account)
    }

    /// A session for `account` on exactly `host`; returns its secret (the cookie value).
    /// Expired sessions are swept on the way.
    pub async fn create_session(
        &self,
        account_id: &str,
        host: &str,
        ttl_secs: i64,
    ) -> Result<String, StoreError> {
        let _changed = self.change();
        sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        let secret = new_secret();
        sqlx::query(
            "INSERT INTO sessions (secret_hash, account_id, host, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_secret(&secret))
        .bind(account_id)
        .bind(host)
        .bind(unix_now() + ttl_secs)
        .execute(&self.pool)
        .await?;
        Ok(secret)
    }

    /// The account of a live session on `host`; a session of another host is no session.
    pub async fn session(&self, host: &str, secret: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(
            "SELECT a.* FROM sessions s JOIN accounts a ON a.id = s.account_id \
             WHERE s.secret_hash = $1 AND s.host = $2 AND s.expires_at > $3",
        )
        .bind(hash_secret(secret))
        .bind(host)
        .bind(unix_now())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| decode_account(&r)).transpose()
    }

    /// Signs out everywhere: ends the session `secret` and every other session of its account,
    /// on every host. Each VM host has a session of its own, so ending only the one at hand
    /// would leave the account signed in to every other VM it visited, in a browser its owner
    /// believes signed out. Ending one that does not exist (anyone can send a made-up cookie
    /// to the logout page) writes nothing, so it does not move the generation.
    pub async fn end_all_sessions(&self, secret: &str) -> Result<(), StoreError> {
        let Some(row) = sqlx::query("SELECT account_id FROM sessions WHERE secret_hash = $1")
            .bind(hash_secret(secret))
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(());
        };
        let account_id: String = row.try_get("account_id")?;
        let _changed = self.change();
        sqlx::query("DELETE FROM sessions WHERE account_id = $1")
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A machine token for one VM; returns its secret (shown once).
    /// Makes a machine token for `vm_id` acting as `account_id`, valid for `ttl_secs`;
    /// returns its id and its secret (shown once; only its hash is kept). Expired tokens are
    /// swept on the way.
    pub async fn create_api_token(
        &self,
        vm_id: &str,
        account_id: &str,
        ttl_secs: i64,
    ) -> Result<(String, String), StoreError> {
        let _changed = self.change();
        sqlx::query("DELETE FROM api_tokens WHERE expires_at <= $1")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        let token = format!("nook_{}", new_secret());
        let id = hex::encode(rand::random::<[u8; 4]>());
        sqlx::query(
            "INSERT INTO api_tokens (id, token_hash, vm_id, account_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(hash_secret(&token))
        .bind(vm_id)
        .bind(account_id)
        .bind(now())
        .bind(unix_now() + ttl_secs)
        .execute(&self.pool)
        .await?;
        Ok((id, token))
    }

    /// The live machine tokens `account_id` made, oldest first.
    pub async fn api_tokens(&self, account_id: &str) -> Result<Vec<ApiToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, v.name, t.created_at, t.expires_at FROM api_tokens t \
             JOIN vms v ON v.id = t.vm_id WHERE t.account_id = $1 AND t.expires_at > $2 \
             ORDER BY t.created_at",
        )
        .bind(account_id)
        .bind(unix_now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiToken {
                    id: r.try_get("id")?,
                    vm: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                })
            })
            .collect()
    }

    /// Revokes `account_id`'s token `id`; false when it has none by that id.
    pub async fn revoke_api_token(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1 AND account_id = $2")
            .bind(id)
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The account a live machine token of this VM acts as.
    pub async fn api_token_account(
        &self,
        vm_id: &str,
        token: &str,
    ) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(
            "SELECT a.* FROM api_tokens t JOIN accounts a ON a.id = t.account_id \
             WHERE t.token_hash = $1 AND t.vm_id = $2 AND t.expires_at > $3",
        )
        .bind(hash_secret(token))
        .bind(vm_id)
        .bind(unix_now())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| decode_account(&r)).transpose()
    }

    pub async fn account_by_id(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query("SELECT * FROM accounts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode_account(&r)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::on_both_stores;

    async fn count(store: &Store, table: &'static str) -> i64 {
        let sql = match table {
            "login_tokens" => "SELECT COUNT(*) AS n FROM login_tokens",
            "sessions" => "SELECT COUNT(*) AS n FROM sessions",
            other => panic!("no count for {other}"),
        };
        sqlx::query(sql)
            .fetch_one(&store.pool)
            .await
            .expect("count")
            .try_get("n")
            .expect("n")
    }

    async fn account(store: &Store, id: &str) {
        sqlx::query("INSERT INTO accounts (id, email, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(format!("{id}@example.com"))
            .bind(now())
            .execute(&store.pool)
            .await
            .expect("account");
    }

    on_both_stores! {
    /// Anyone can send a junk login token, session cookie or share token; if that moved the
    /// generation, a stream of them would flush every answer the edge remembers.
    async fn failed_anonymous_attempts_do_not_move_the_generation(store) {
        account(&store, "a1").await;
        let vm_id = "vm1";
        let g = store.generation();
        assert!(
            store
                .redeem_login_token("junk")
                .await
                .expect("redeem")
                .is_none()
        );
        store.end_all_sessions("junk").await.expect("end");
        assert!(
            !store
                .redeem_share_link(vm_id, "junk", "a1")
                .await
                .expect("link")
        );
        assert_eq!(
            store.generation(),
            g,
            "a failed attempt moved the generation"
        );

        // Real ones still do, and still work.
        let token = store
            .create_login_token(Some("a1"), None, 60)
            .await
            .expect("token");
        let secret = store.create_session("a1", "h", 60).await.expect("session");
        let g = store.generation();
        let who = store.redeem_login_token(&token).await.expect("redeem");
        assert_eq!(who.map(|a| a.id).as_deref(), Some("a1"));
        assert!(store.generation() > g);
        let g = store.generation();
        store.end_all_sessions(&secret).await.expect("end");
        assert!(store.generation() > g);
        assert!(store.session("h", &secret).await.expect("gone").is_none());
    }
    }

    on_both_stores! {
    /// Signing out on one host signs the account out on every host, and no one else.
    async fn logout_ends_every_session_of_the_account(store) {
        account(&store, "a1").await;
        account(&store, "a2").await;
        let dash = store
            .create_session("a1", "nook.test", 60)
            .await
            .expect("s");
        let vm1 = store
            .create_session("a1", "a.nook.test", 60)
            .await
            .expect("s");
        let vm2 = store
            .create_session("a1", "b.nook.test", 60)
            .await
            .expect("s");
        let other = store
            .create_session("a2", "a.nook.test", 60)
            .await
            .expect("s");
        store.end_all_sessions(&vm1).await.expect("end");
        for (host, secret) in [
            ("nook.test", &dash),
            ("a.nook.test", &vm1),
            ("b.nook.test", &vm2),
        ] {
            assert!(
                store.session(host, secret).await.expect("read").is_none(),
                "{host} is still signed in"
            );
        }
        assert!(
            store
                .session("a.nook.test", &other)
                .await
                .expect("read")
                .is_some()
        );
    }
    }

    on_both_stores! {
    async fn expired_rows_are_swept(store) {
        account(&store, "a1").await;
        for _ in 0..3 {
            store
                .create_login_token(Some("a1"), None, -10)
                .await
                .expect("token");
            store.create_session("a1", "h", -10).await.expect("session");
        }
        let live_token = store
            .create_login_token(Some("a1"), None, 60)
            .await
            .expect("token");
        let live = store.create_session("a1", "h", 60).await.expect("session");
        assert_eq!(count(&store, "login_tokens").await, 1);
        assert_eq!(count(&store, "sessions").await, 1);
        assert!(store.session("h", &live).await.expect("live").is_some());
        assert!(
            store
                .redeem_login_token(&live_token)
                .await
                .expect("live")
                .is_some()
        );
    }
    }
}
