//! Integrations an account adds, and the grants that let its VMs use them.

use sqlx::Row;

use crate::edge::unix_now;
use crate::{Store, StoreError, now};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationRow {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub kind: String,
    /// JSON without secrets.
    pub config: String,
    /// Sealed by the daemon.
    pub secret: Option<Vec<u8>>,
    pub created_at: String,
}

/// A VM an integration is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub vm_id: String,
    pub expires_at: Option<i64>,
}

fn decode(r: &sqlx::any::AnyRow) -> Result<IntegrationRow, StoreError> {
    Ok(IntegrationRow {
        id: r.try_get("id")?,
        account_id: r.try_get("account_id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        config: r.try_get("config")?,
        secret: r.try_get("secret")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Adds an integration; `Ok(false)` when the account already has one of that name.
    pub async fn add_integration(&self, row: &IntegrationRow) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query(
            "INSERT INTO integrations (id, account_id, name, kind, config, secret, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (account_id, name) DO NOTHING",
        )
        .bind(&row.id)
        .bind(&row.account_id)
        .bind(&row.name)
        .bind(&row.kind)
        .bind(&row.config)
        .bind(&row.secret)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn integrations(&self, account_id: &str) -> Result<Vec<IntegrationRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM integrations WHERE account_id = $1 ORDER BY name")
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn integration(
        &self,
        account_id: &str,
        name: &str,
    ) -> Result<Option<IntegrationRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM integrations WHERE account_id = $1 AND name = $2")
            .bind(account_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Removes an integration and its grants; false when there was none.
    pub async fn remove_integration(
        &self,
        account_id: &str,
        name: &str,
    ) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("DELETE FROM integrations WHERE account_id = $1 AND name = $2")
            .bind(account_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Attaches (or re-attaches, with a new expiry) an integration to a VM.
    pub async fn grant_integration(
        &self,
        integration_id: &str,
        vm_id: &str,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "INSERT INTO integration_grants (integration_id, vm_id, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (integration_id, vm_id) DO UPDATE SET expires_at = excluded.expires_at",
        )
        .bind(integration_id)
        .bind(vm_id)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn revoke_integration(
        &self,
        integration_id: &str,
        vm_id: &str,
    ) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done =
            sqlx::query("DELETE FROM integration_grants WHERE integration_id = $1 AND vm_id = $2")
                .bind(integration_id)
                .bind(vm_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn grants(&self, integration_id: &str) -> Result<Vec<Grant>, StoreError> {
        let rows = sqlx::query("SELECT vm_id, expires_at FROM integration_grants WHERE integration_id = $1 ORDER BY vm_id")
            .bind(integration_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Grant {
                    vm_id: r.try_get("vm_id")?,
                    expires_at: r.try_get("expires_at")?,
                })
            })
            .collect()
    }

    /// The integration `name` of the account owning VM `vm_id`, if it is attached to that VM
    /// and the grant has not expired. Anything else (no such integration, another account's,
    /// not attached, expired) is `None`, alike.
    pub async fn integration_for_vm(
        &self,
        vm_id: &str,
        owner: &str,
        name: &str,
    ) -> Result<Option<IntegrationRow>, StoreError> {
        let row = sqlx::query(
            "SELECT i.* FROM integrations i JOIN integration_grants g ON g.integration_id = i.id \
             WHERE g.vm_id = $1 AND i.account_id = $2 AND i.name = $3 AND (g.expires_at IS NULL OR g.expires_at > $4)",
        )
        .bind(vm_id)
        .bind(owner)
        .bind(name)
        .bind(unix_now())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode).transpose()
    }

    /// The integrations of `kind` attached to `vm_id` and not expired.
    pub async fn attached_of_kind(
        &self,
        vm_id: &str,
        owner: &str,
        kind: &str,
    ) -> Result<Vec<IntegrationRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.* FROM integrations i JOIN integration_grants g ON g.integration_id = i.id \
             WHERE g.vm_id = $1 AND i.account_id = $2 AND i.kind = $3 AND (g.expires_at IS NULL OR g.expires_at > $4) ORDER BY i.name",
        )
        .bind(vm_id)
        .bind(owner)
        .bind(kind)
        .bind(unix_now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// The names of the integrations attached to `vm_id` and not expired.
    pub async fn integrations_of_vm(
        &self,
        vm_id: &str,
        owner: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.name FROM integrations i JOIN integration_grants g ON g.integration_id = i.id \
             WHERE g.vm_id = $1 AND i.account_id = $2 AND (g.expires_at IS NULL OR g.expires_at > $3) ORDER BY i.name",
        )
        .bind(vm_id)
        .bind(owner)
        .bind(unix_now())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }
}
