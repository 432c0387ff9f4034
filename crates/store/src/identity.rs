//! Proving who someone is: verified emails, signup invites, and SSH keys that join an account
//! only when their holder redeems a one-time code with them.

use sqlx::{Any, Row, Transaction};

use crate::edge::{hash_secret, unix_now};
use crate::{Account, SshKey, Store, StoreError, decode_account, insert_key, now};

/// How long a key claim's code lasts.
pub const CLAIM_TTL_SECS: i64 = 15 * 60;
/// How long an invite lasts.
pub const INVITE_TTL_SECS: i64 = 7 * 24 * 3600;

/// What lets a new account in (the host's first account always gets in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission<'a> {
    /// Anyone may sign up; the email stays unverified until proven.
    Unverified,
    /// The host's admin vouches for the email.
    Vouched,
    /// An invite code made for this email.
    Invite(&'a str),
    /// Only the host's first account.
    FirstOnly,
}

/// A one-time code: 80 random bits in lowercase base32, split for reading aloud.
fn new_code() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let bytes: [u8; 16] = rand::random();
    let chars: Vec<u8> = bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()])
        .collect();
    format!(
        "{}-{}-{}-{}",
        std::str::from_utf8(&chars[0..4]).unwrap_or_default(),
        std::str::from_utf8(&chars[4..8]).unwrap_or_default(),
        std::str::from_utf8(&chars[8..12]).unwrap_or_default(),
        std::str::from_utf8(&chars[12..16]).unwrap_or_default(),
    )
}

/// Codes are compared as typed, give or take case and surrounding space.
fn code_hash(code: &str) -> String {
    hash_secret(&code.trim().to_ascii_lowercase())
}

/// Consumes the invite `code` made for `email`.
pub(crate) async fn take_invite(
    tx: &mut Transaction<'_, Any>,
    code: &str,
    email: &str,
) -> Result<(), StoreError> {
    let row =
        sqlx::query("DELETE FROM invites WHERE code_hash = $1 AND email = $2 RETURNING expires_at")
            .bind(code_hash(code))
            .bind(email)
            .fetch_optional(&mut **tx)
            .await?;
    match row {
        Some(row) if row.try_get::<i64, _>("expires_at")? >= unix_now() => Ok(()),
        _ => Err(StoreError::InvalidCode),
    }
}

impl Store {
    /// Counts the account's email as proven. False when there is no such account.
    pub async fn verify_email(&self, account_id: &str) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query(
            "UPDATE accounts SET email_verified_at = COALESCE(email_verified_at, $1) WHERE id = $2",
        )
        .bind(now())
        .bind(account_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Makes a one-time signup code for `email` (shown once; only its hash is kept).
    pub async fn create_invite(&self, email: &str) -> Result<String, StoreError> {
        let _changed = self.change();
        let code = new_code();
        sqlx::query("DELETE FROM invites WHERE expires_at < $1")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO invites (code_hash, email, expires_at) VALUES ($1, $2, $3)")
            .bind(code_hash(&code))
            .bind(email)
            .bind(unix_now() + INVITE_TTL_SECS)
            .execute(&self.pool)
            .await?;
        Ok(code)
    }

    /// Records that `account_id` wants `key`; returns the code a client holding the key must
    /// redeem (shown once). Fails at once if the key already belongs to an account.
    pub async fn create_key_claim(
        &self,
        account_id: &str,
        key: &SshKey,
    ) -> Result<String, StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        crate::ensure_key_free(&mut tx, &key.fingerprint).await?;
        sqlx::query("DELETE FROM key_claims WHERE expires_at < $1")
            .bind(unix_now())
            .execute(&mut *tx)
            .await?;
        let code = new_code();
        sqlx::query(
            "INSERT INTO key_claims (code_hash, account_id, fingerprint, public_key, comment, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(code_hash(&code))
        .bind(account_id)
        .bind(&key.fingerprint)
        .bind(&key.public_key)
        .bind(&key.comment)
        .bind(unix_now() + CLAIM_TTL_SECS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(code)
    }

    /// Redeems a key claim by a client that proved it holds the key `fingerprint`: the key
    /// joins the claiming account. A code redeemed with any other key, or expired, is spent
    /// and fails, so a code cannot be guessed at with many keys.
    pub async fn redeem_key_claim(
        &self,
        code: &str,
        fingerprint: &str,
    ) -> Result<Account, StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "DELETE FROM key_claims WHERE code_hash = $1 \
             RETURNING account_id, fingerprint, public_key, comment, expires_at",
        )
        .bind(code_hash(code))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::InvalidCode);
        };
        let claimed: String = row.try_get("fingerprint")?;
        if claimed != fingerprint || row.try_get::<i64, _>("expires_at")? < unix_now() {
            tx.commit().await?;
            return Err(StoreError::InvalidCode);
        }
        let account_id: String = row.try_get("account_id")?;
        let key = SshKey {
            fingerprint: claimed,
            public_key: row.try_get("public_key")?,
            comment: row.try_get("comment")?,
        };
        // The claim is spent whatever happens next (commit, not a lingering rollback).
        if let Err(e) = crate::ensure_key_free(&mut tx, &key.fingerprint).await {
            tx.commit().await?;
            return Err(e);
        }
        insert_key(&mut tx, &account_id, &key, &now()).await?;
        let account = sqlx::query("SELECT * FROM accounts WHERE id = $1")
            .bind(&account_id)
            .fetch_one(&mut *tx)
            .await?;
        let account = decode_account(&account)?;
        tx.commit().await?;
        Ok(account)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::on_both_stores;

    fn key(n: &str) -> SshKey {
        SshKey {
            fingerprint: format!("SHA256:{n}"),
            public_key: format!("ssh-ed25519 {n}"),
            comment: String::new(),
        }
    }

    on_both_stores! {
    async fn the_first_account_is_the_verified_owner_and_later_ones_need_admission(store) {
        let first = store
            .create_account("a1", "ann@example.com", &key("k1"), Admission::FirstOnly)
            .await
            .unwrap();
        assert!(first.owner && first.email_verified);
        let closed = store
            .create_account("a2", "bob@example.com", &key("k2"), Admission::FirstOnly)
            .await;
        assert!(
            matches!(closed, Err(StoreError::SignupClosed)),
            "{closed:?}"
        );
        let open = store
            .create_account("a3", "cy@example.com", &key("k3"), Admission::Unverified)
            .await
            .unwrap();
        assert!(!open.owner && !open.email_verified);
        assert!(store.verify_email("a3").await.unwrap());
        let read = store
            .account_by_email("cy@example.com")
            .await
            .unwrap()
            .unwrap();
        assert!(read.email_verified);
    }
    }

    on_both_stores! {
    async fn an_invite_admits_its_email_once(store) {
        store
            .create_account("a1", "ann@example.com", &key("k1"), Admission::FirstOnly)
            .await
            .unwrap();
        let code = store.create_invite("bob@example.com").await.unwrap();
        let wrong_email = store
            .create_account(
                "a2",
                "eve@example.com",
                &key("k2"),
                Admission::Invite(&code),
            )
            .await;
        assert!(
            matches!(wrong_email, Err(StoreError::InvalidCode)),
            "{wrong_email:?}"
        );
        let bob = store
            .create_account(
                "a3",
                "bob@example.com",
                &key("k3"),
                Admission::Invite(&format!(" {} ", code.to_uppercase())),
            )
            .await
            .unwrap();
        assert!(bob.email_verified && !bob.owner);
        let again = store
            .create_account(
                "a4",
                "bob2@example.com",
                &key("k4"),
                Admission::Invite(&code),
            )
            .await;
        assert!(matches!(again, Err(StoreError::InvalidCode)), "{again:?}");
    }
    }

    on_both_stores! {
    async fn a_key_claim_needs_the_key_and_is_spent_by_any_try(store) {
        store
            .create_account("a1", "ann@example.com", &key("k1"), Admission::FirstOnly)
            .await
            .unwrap();
        let code = store.create_key_claim("a1", &key("k2")).await.unwrap();
        let wrong = store.redeem_key_claim(&code, "SHA256:k3").await;
        assert!(matches!(wrong, Err(StoreError::InvalidCode)), "{wrong:?}");
        let spent = store.redeem_key_claim(&code, "SHA256:k2").await;
        assert!(matches!(spent, Err(StoreError::InvalidCode)), "{spent:?}");
        assert!(store.account_for_key("SHA256:k2").await.unwrap().is_none());

        let code = store.create_key_claim("a1", &key("k2")).await.unwrap();
        let account = store.redeem_key_claim(&code, "SHA256:k2").await.unwrap();
        assert_eq!(account.id, "a1");
        assert_eq!(
            store
                .account_for_key("SHA256:k2")
                .await
                .unwrap()
                .unwrap()
                .id,
            "a1"
        );
        let taken = store.create_key_claim("a1", &key("k2")).await;
        assert!(matches!(taken, Err(StoreError::KeyTaken)), "{taken:?}");
    }
    }
}
