//! The coding agent's conversations, their context and their numbered events.

use sqlx::Row;

use crate::{Store, StoreError};

/// One conversation's row (its context apart: see [`Store::agent_context`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConversation {
    pub id: String,
    pub vm_id: String,
    pub account_id: String,
    pub title: String,
    pub model: String,
    /// `idle`, `running` or `interrupted`.
    pub state: String,
    pub last_seq: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The columns [`decode`] reads (a macro, so queries stay static strings).
macro_rules! columns {
    () => {
        "id, vm_id, account_id, title, model, state, last_seq, created_at, updated_at"
    };
}

fn decode(r: &sqlx::any::AnyRow) -> Result<AgentConversation, sqlx::Error> {
    Ok(AgentConversation {
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        account_id: r.try_get("account_id")?,
        title: r.try_get("title")?,
        model: r.try_get("model")?,
        state: r.try_get("state")?,
        last_seq: r.try_get("last_seq")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    pub async fn agent_create(&self, c: &AgentConversation) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "INSERT INTO agent_conversations (id, vm_id, account_id, title, model, state, last_seq, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&c.id)
        .bind(&c.vm_id)
        .bind(&c.account_id)
        .bind(&c.title)
        .bind(&c.model)
        .bind(&c.state)
        .bind(c.last_seq)
        .bind(c.created_at)
        .bind(c.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn agent_get(&self, id: &str) -> Result<Option<AgentConversation>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM agent_conversations WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(decode).transpose()?)
    }

    /// A VM's conversations, the latest first.
    pub async fn agent_list(&self, vm_id: &str) -> Result<Vec<AgentConversation>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM agent_conversations WHERE vm_id = $1 ORDER BY updated_at DESC, id"
        ))
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    pub async fn agent_in_state(&self, state: &str) -> Result<Vec<AgentConversation>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM agent_conversations WHERE state = $1 ORDER BY id"
        ))
        .bind(state)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    pub async fn agent_set_state(&self, id: &str, state: &str, now: i64) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE agent_conversations SET state = $1, updated_at = $2 WHERE id = $3")
            .bind(state)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends event `seq` (its JSON) and makes it the conversation's last.
    pub async fn agent_append(
        &self,
        id: &str,
        seq: i64,
        body: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO agent_events (conversation_id, seq, body) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(seq)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agent_conversations SET last_seq = $1, updated_at = $2 WHERE id = $3")
            .bind(seq)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events after `after`, in order (their numbers and JSON).
    pub async fn agent_events(
        &self,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM agent_events WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("seq")?, r.try_get("body")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn agent_context(&self, id: &str) -> Result<String, StoreError> {
        let row = sqlx::query("SELECT context FROM agent_conversations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(r.try_get("context")?),
            None => Ok("[]".to_string()),
        }
    }

    pub async fn agent_save_context(&self, id: &str, context: &str) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE agent_conversations SET context = $1 WHERE id = $2")
            .bind(context)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
