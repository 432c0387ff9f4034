//! LLM credit and usage: what the gateway reserves, settles and records.

use sqlx::Row;

use crate::edge::unix_now;
use crate::{Store, StoreError};

/// One request, as the gateway settled it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LlmUse {
    pub account_id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_micros: u64,
    pub status: u16,
}

/// Usage summed over one VM and model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageRow {
    pub vm_name: String,
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_micros: u64,
}

impl Store {
    /// The account's balance in micro-dollars; an account never credited has `initial`.
    pub async fn credit(&self, account_id: &str, initial: i64) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT balance_micros FROM credits WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("balance_micros")?,
            None => initial,
        })
    }

    /// Adds `delta` (or sets the balance to it with `set`); returns the new balance.
    pub async fn change_credit(
        &self,
        account_id: &str,
        initial: i64,
        delta: i64,
        set: bool,
    ) -> Result<i64, StoreError> {
        let _changed = self.change();
        let row = sqlx::query(
            "INSERT INTO credits (account_id, balance_micros) VALUES ($1, CASE WHEN $3 THEN $2 ELSE $4 + $2 END) \
             ON CONFLICT(account_id) DO UPDATE SET balance_micros = CASE WHEN $3 THEN $2 ELSE credits.balance_micros + $2 END \
             RETURNING balance_micros",
        )
        .bind(account_id)
        .bind(delta)
        .bind(set)
        .bind(initial)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("balance_micros")?)
    }

    /// Writes settled requests in one transaction: their usage rows, and each account's
    /// balance lowered by the sum of its costs. Returns every touched account's new balance.
    pub async fn record_usage(
        &self,
        rows: &[LlmUse],
        initial: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let _changed = self.change();
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut debits: std::collections::BTreeMap<&str, i64> = Default::default();
        for u in rows {
            *debits.entry(u.account_id.as_str()).or_default() += n(u.cost_micros);
        }
        let mut tx = self.write_tx().await?;
        for u in rows {
            sqlx::query(
                "INSERT INTO llm_usage (at, account_id, vm_id, vm_name, provider, model, input_tokens, output_tokens, \
                 cache_read_tokens, cache_write_tokens, cost_micros, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(unix_now())
            .bind(&u.account_id)
            .bind(&u.vm_id)
            .bind(&u.vm_name)
            .bind(&u.provider)
            .bind(&u.model)
            .bind(n(u.input_tokens))
            .bind(n(u.output_tokens))
            .bind(n(u.cache_read_tokens))
            .bind(n(u.cache_write_tokens))
            .bind(n(u.cost_micros))
            .bind(i64::from(u.status))
            .execute(&mut *tx)
            .await?;
        }
        let mut balances = Vec::with_capacity(debits.len());
        for (account, cost) in debits {
            let row = sqlx::query(
                "INSERT INTO credits (account_id, balance_micros) VALUES ($1, $3 - $2) \
                 ON CONFLICT(account_id) DO UPDATE SET balance_micros = credits.balance_micros - $2 \
                 RETURNING balance_micros",
            )
            .bind(account)
            .bind(cost)
            .bind(initial)
            .fetch_one(&mut *tx)
            .await?;
            balances.push((account.to_string(), row.try_get("balance_micros")?));
        }
        tx.commit().await?;
        Ok(balances)
    }

    /// The account's usage since `since` (unix seconds), per VM and model, optionally of one
    /// VM only (by name).
    pub async fn usage(
        &self,
        account_id: &str,
        since: i64,
        vm_name: Option<&str>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT vm_name, provider, model, COUNT(*) AS requests, \
             CAST(SUM(input_tokens) AS BIGINT) AS i, CAST(SUM(output_tokens) AS BIGINT) AS o, \
             CAST(SUM(cache_read_tokens) AS BIGINT) AS cr, CAST(SUM(cache_write_tokens) AS BIGINT) AS cw, \
             CAST(SUM(cost_micros) AS BIGINT) AS cost \
             FROM llm_usage WHERE account_id = $1 AND at >= $2 AND ($3 IS NULL OR vm_name = $3) \
             GROUP BY vm_name, provider, model ORDER BY vm_name, provider, model",
        )
        .bind(account_id)
        .bind(since)
        .bind(vm_name)
        .fetch_all(&self.pool)
        .await?;
        let u = |r: &sqlx::any::AnyRow, k: &str| -> Result<u64, StoreError> {
            Ok(r.try_get::<i64, _>(k)?.max(0) as u64)
        };
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    vm_name: r.try_get("vm_name")?,
                    provider: r.try_get("provider")?,
                    model: r.try_get("model")?,
                    requests: u(r, "requests")?,
                    input_tokens: u(r, "i")?,
                    output_tokens: u(r, "o")?,
                    cache_read_tokens: u(r, "cr")?,
                    cache_write_tokens: u(r, "cw")?,
                    cost_micros: u(r, "cost")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;
    use crate::testing::on_both_stores;

    async fn with_account(store: &Store) -> String {
        let id = "acct1".to_string();
        sqlx::query(
            "INSERT INTO accounts (id, email, created_at) VALUES ($1, 'a@example.com', 'now')",
        )
        .bind(&id)
        .execute(&store.pool)
        .await
        .expect("account");
        id
    }

    on_both_stores! {
        async fn usage_is_recorded_and_charged_in_one_write(store) {
            let id = with_account(&store).await;
            assert_eq!(store.credit(&id, 100).await.expect("credit"), 100);
            let used = crate::LlmUse {
                account_id: id.clone(),
                vm_name: "web".into(),
                model: "m".into(),
                input_tokens: 3,
                cost_micros: 10,
                ..Default::default()
            };
            let balances = store
                .record_usage(&[used.clone(), used.clone()], 100)
                .await
                .expect("record");
            assert_eq!(balances, vec![(id.clone(), 80)]);
            assert_eq!(store.credit(&id, 100).await.expect("credit"), 80);
            let rows = store.usage(&id, 0, None).await.expect("usage");
            assert_eq!(rows.len(), 1);
            assert_eq!(
                (rows[0].requests, rows[0].input_tokens, rows[0].cost_micros),
                (2, 6, 20)
            );
            assert!(
                store
                    .usage(&id, 0, Some("other"))
                    .await
                    .expect("usage")
                    .is_empty()
            );
            assert_eq!(store.change_credit(&id, 0, 7, true).await.expect("set"), 7);
            assert_eq!(
                store.change_credit(&id, 0, -10, false).await.expect("add"),
                -3
            );
        }
    }
}
