//! What the HTTPS API needs: opaque exec tokens and the VMs allowed to call it from inside.

use sqlx::Row;

use crate::edge::{hash_secret, new_secret, unix_now};
use crate::{Account, Store, StoreError, decode_account, now};

/// One live API token, as `token list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecToken {
    pub id: String,
    /// `all` or `ls,cp,...`.
    pub cmds: String,
    /// The current name of the one VM it may act on.
    pub vm: Option<String>,
    pub created_at: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// What a VM may do through the API from inside (`share api`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmApiGrant {
    /// `all` or `ls,cp,...`.
    pub cmds: String,
    /// Every VM of its owner; otherwise only itself (and clones it makes, which are new).
    pub any_vm: bool,
}

/// Who an API token acts as, and what it may do.
#[derive(Debug, Clone)]
pub struct ExecGrant {
    pub account: Account,
    pub cmds: String,
    /// The current name of the one VM it may act on.
    pub vm: Option<String>,
}

impl Store {
    /// Makes an API token for `account_id`; returns its id and secret (shown once).
    pub async fn create_exec_token(
        &self,
        account_id: &str,
        cmds: &str,
        vm_id: Option<&str>,
        ttl_secs: i64,
    ) -> Result<(String, String), StoreError> {
        let _changed = self.change();
        sqlx::query("DELETE FROM exec_tokens WHERE expires_at <= $1")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        let token = format!("nookapi_{}", new_secret());
        let id = hex::encode(rand::random::<[u8; 4]>());
        sqlx::query(
            "INSERT INTO exec_tokens (id, token_hash, account_id, cmds, vm_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(hash_secret(&token))
        .bind(account_id)
        .bind(cmds)
        .bind(vm_id)
        .bind(now())
        .bind(unix_now() + ttl_secs)
        .execute(&self.pool)
        .await?;
        Ok((id, token))
    }

    /// The live API tokens of `account_id`, oldest first.
    pub async fn exec_tokens(&self, account_id: &str) -> Result<Vec<ExecToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.cmds, v.name, t.created_at, t.expires_at FROM exec_tokens t \
             LEFT JOIN vms v ON v.id = t.vm_id WHERE t.account_id = $1 AND t.expires_at > $2 \
             ORDER BY t.created_at, t.id",
        )
        .bind(account_id)
        .bind(unix_now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExecToken {
                    id: r.try_get("id")?,
                    cmds: r.try_get("cmds")?,
                    vm: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                })
            })
            .collect()
    }

    /// Revokes `account_id`'s API token `id`; false when it has none by that id.
    pub async fn revoke_exec_token(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("DELETE FROM exec_tokens WHERE id = $1 AND account_id = $2")
            .bind(id)
            .bind(account_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// What a live API token may do, or `None` for an unknown, revoked or expired one.
    pub async fn exec_token(&self, token: &str) -> Result<Option<ExecGrant>, StoreError> {
        let row = sqlx::query(
            "SELECT a.*, t.cmds AS grant_cmds, v.name AS grant_vm, t.vm_id AS grant_vm_id \
             FROM exec_tokens t JOIN accounts a ON a.id = t.account_id \
             LEFT JOIN vms v ON v.id = t.vm_id \
             WHERE t.token_hash = $1 AND t.expires_at > $2",
        )
        .bind(hash_secret(token))
        .bind(unix_now())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        // A token bound to a VM whose row is gone must not become a token for any VM.
        let vm_id: Option<String> = r.try_get("grant_vm_id")?;
        let vm_name: Option<String> = r.try_get("grant_vm")?;
        if vm_id.is_some() && vm_name.is_none() {
            return Ok(None);
        }
        Ok(Some(ExecGrant {
            account: decode_account(&r)?,
            cmds: r.try_get("grant_cmds")?,
            vm: r.try_get("grant_vm")?,
        }))
    }

    /// Lets `vm_id` call the API from inside as its owner, for `cmds`, on itself only or on
    /// every VM of its owner (`any_vm`); `None` takes it back.
    pub async fn set_vm_api_grant(
        &self,
        vm_id: &str,
        cmds: Option<&str>,
        any_vm: bool,
    ) -> Result<(), StoreError> {
        let _changed = self.change();
        match cmds {
            Some(cmds) => {
                sqlx::query(
                    "INSERT INTO vm_api_grants (vm_id, cmds, any_vm) VALUES ($1, $2, $3) \
                     ON CONFLICT(vm_id) DO UPDATE SET cmds = excluded.cmds, any_vm = excluded.any_vm",
                )
                .bind(vm_id)
                .bind(cmds)
                .bind(i64::from(any_vm))
                .execute(&self.pool)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM vm_api_grants WHERE vm_id = $1")
                    .bind(vm_id)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// What `vm_id` may do through the API from inside, if its owner allowed anything.
    pub async fn vm_api_grant(&self, vm_id: &str) -> Result<Option<VmApiGrant>, StoreError> {
        let row = sqlx::query("SELECT cmds, any_vm FROM vm_api_grants WHERE vm_id = $1")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(VmApiGrant {
                cmds: r.try_get("cmds")?,
                any_vm: r.try_get::<i64, _>("any_vm")? != 0,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::on_both_stores;

    on_both_stores! {
    async fn exec_tokens_work_until_revoked_or_expired(store) {
        let account = store
            .create_account(
                "a1",
                "a@example.com",
                &crate::SshKey {
                    fingerprint: "SHA256:k".into(),
                    public_key: "ssh-ed25519 k".into(),
                    comment: String::new(),
                },
                crate::Admission::FirstOnly,
            )
            .await
            .expect("account");
        let (id, secret) = store
            .create_exec_token(&account.id, "ls,cp", None, 3600)
            .await
            .expect("token");
        let grant = store.exec_token(&secret).await.expect("q").expect("live");
        assert_eq!(grant.account.id, account.id);
        assert_eq!(grant.cmds, "ls,cp");
        assert_eq!(store.exec_tokens(&account.id).await.expect("list").len(), 1);
        assert!(
            store
                .exec_token("nookapi_wrong")
                .await
                .expect("q")
                .is_none()
        );
        assert!(
            store
                .revoke_exec_token(&account.id, &id)
                .await
                .expect("revoke")
        );
        assert!(store.exec_token(&secret).await.expect("q").is_none());
        let (_, old) = store
            .create_exec_token(&account.id, "ls", None, -1)
            .await
            .expect("token");
        assert!(store.exec_token(&old).await.expect("q").is_none());
    }
    }
}
