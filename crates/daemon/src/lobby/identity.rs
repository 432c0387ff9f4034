//! Lobby commands that prove who someone is: `signup` (under the host's signup policy),
//! `invite`, and adding an SSH key only with proof that the adder holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nook_api::{ApiError, ErrorCode};
use nook_store::{Account, Admission, SshKey, StoreError};
use serde_json::json;

use super::{Caller, Reply, parse_public_key, valid_email};
use crate::config::SignupPolicy;
use crate::errors;
use crate::manager::Manager;

/// One confirmation email per account per this long, so a key holder cannot flood the
/// inbox of the address it claimed.
const CONFIRM_MAIL_GAP: Duration = Duration::from_secs(60);
/// How long mailing a confirmation link may take before the lobby gives up on it.
const MAIL_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) async fn signup(
    m: &Arc<Manager>,
    caller: &Caller,
    email: &str,
    invite: Option<&str>,
) -> Result<Reply, ApiError> {
    let email = email.trim().to_ascii_lowercase();
    if let Some(account) = &caller.account {
        // Signing up again with the address an unconfirmed account gave mails its link again.
        if account.email == email && !account.email_verified && m.config().web.smtp.is_some() {
            mail_confirmation(m, account, &caller.fingerprint).await?;
            return Ok(report_unconfirmed(m, account));
        }
        return Err(ApiError::new(
            ErrorCode::KeyTaken,
            format!("This key already belongs to {}", account.email),
        ));
    }
    if !valid_email(&email) {
        let shown: String = email.chars().take(80).collect();
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{shown:?} is not an email address"),
        ));
    }
    let source = source(caller);
    m.limits()
        .signup
        .take(&source)
        .map_err(|wait| crate::limits::too_many("signups from your address", wait))?;
    if invite.is_some() {
        m.limits()
            .codes
            .take(&source)
            .map_err(|wait| crate::limits::too_many("codes tried from your address", wait))?;
    }
    let policy = m.config().signup;
    let admission = match (invite, policy) {
        (Some(code), _) => Admission::Invite(code),
        (None, SignupPolicy::Open | SignupPolicy::Email) => Admission::Unverified,
        (None, SignupPolicy::Invite | SignupPolicy::Closed) => Admission::FirstOnly,
    };
    let key = parse_public_key(&caller.key_openssh)?;
    let id = hex::encode(rand::random::<[u8; 8]>());
    let account = m
        .store()
        .create_account(&id, &email, &key, admission)
        .await
        .map_err(|e| match e {
            StoreError::EmailTaken(_) => ApiError::new(
                ErrorCode::EmailTaken,
                format!("An account for {email} already exists: from a key of that account, run `ssh-key add` with this key"),
            ),
            StoreError::KeyTaken => {
                ApiError::new(ErrorCode::KeyTaken, "This key already belongs to an account")
            }
            StoreError::SignupClosed => closed(m, policy, &email),
            StoreError::InvalidCode => ApiError::new(
                ErrorCode::InvalidCode,
                format!("That invite code is unknown, used, expired or not for {email}: ask for a new one"),
            ),
            other => errors::from_store("create the account", other),
        })?;
    tracing::info!(account = %account.id, owner = account.owner, verified = account.email_verified, "signed up");
    if account.email_verified {
        let ssh = m.config().ssh_command(None);
        let mut text = format!(
            "Welcome to nook, {}! Create your first VM with: {ssh} new",
            account.email
        );
        if account.owner {
            text.push_str(&format!(
                "\nYou own this host. Others sign up with an invite: {ssh} invite EMAIL"
            ));
        }
        return Ok(Reply::new(
            json!({ "id": account.id, "email": account.email, "email_verified": true, "owner": account.owner, "key": key.fingerprint }),
            text,
        ));
    }
    if m.config().web.smtp.is_some()
        && let Err(e) = mail_confirmation(m, &account, &key.fingerprint).await
    {
        tracing::warn!(account = %account.id, error = %e.message, "confirmation email not sent");
    }
    Ok(report_unconfirmed(m, &account))
}

/// What limits per source count against: the client's address, else its key.
fn source(caller: &Caller) -> String {
    caller
        .peer
        .map_or_else(|| caller.fingerprint.clone(), |ip| ip.to_string())
}

fn closed(m: &Manager, policy: SignupPolicy, email: &str) -> ApiError {
    let message = match policy {
        SignupPolicy::Closed => format!(
            "This host takes no signups: ask its admin to add you with `nook account add {email} --key YOUR_KEY.pub`"
        ),
        _ => format!(
            "Signing up on this host needs an invite: ask its owner for one, then run: {} signup {email} --invite CODE",
            m.config().ssh_command(None)
        ),
    };
    ApiError::new(ErrorCode::SignupClosed, message)
}

fn report_unconfirmed(m: &Manager, account: &Account) -> Reply {
    let mailed = m.config().web.smtp.is_some();
    let how = if mailed {
        format!(
            "open the link mailed to {} (run this signup again for another)",
            account.email
        )
    } else {
        format!(
            "ask the host's admin to run `nook account verify {}`",
            account.email
        )
    };
    let text = if m.config().signup == SignupPolicy::Email {
        format!(
            "Account made for {}. To use it, confirm the address: {how}.",
            account.email
        )
    } else {
        format!(
            "Welcome to nook, {}! Create your first VM with: {} new\n\
             Your email is unconfirmed, so VMs shared with it do not reach you yet. To confirm it, {how}.",
            account.email,
            m.config().ssh_command(None)
        )
    };
    Reply::new(
        json!({ "id": account.id, "email": account.email, "email_verified": false, "owner": false, "confirmation_mailed": mailed }),
        text,
    )
}

/// Under the `email` policy an account can do nothing until its email is confirmed.
pub(super) fn check_confirmed(m: &Manager, account: &Account) -> Result<(), ApiError> {
    if m.config().signup != SignupPolicy::Email || account.email_verified {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::EmailUnconfirmed,
        format!(
            "Confirm {} first: open the link mailed to it (run `signup {}` again for another)",
            account.email, account.email
        ),
    ))
}

/// Mails `account` a one-time link that signs in and, being mailed, proves the address.
async fn mail_confirmation(
    m: &Manager,
    account: &Account,
    fingerprint: &str,
) -> Result<(), ApiError> {
    static LAST_MAILED: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    {
        let mut last = LAST_MAILED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.retain(|_, at| at.elapsed() < CONFIRM_MAIL_GAP);
        if last.contains_key(&account.id) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "A link went to {} less than a minute ago: wait for it, or try again in a minute",
                    account.email
                ),
            ));
        }
        last.insert(account.id.clone(), Instant::now());
    }
    let Some(smtp) = &m.config().web.smtp else {
        return Ok(());
    };
    let token = m
        .store()
        .create_login_token(
            Some(&account.id),
            Some(&account.email),
            crate::web::LOGIN_TTL_SECS,
        )
        .await
        .map_err(|e| errors::from_store("make a confirmation link", e))?;
    let link = format!("{}/__nook/login?token={token}", m.config().web_origin(None));
    let mailer = nook_edge::Mailer::new(smtp).map_err(|e| errors::internal("set up SMTP", &e))?;
    let sent = tokio::time::timeout(
        MAIL_TIMEOUT,
        mailer.send_confirm_link(&account.email, &link, fingerprint),
    )
    .await;
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(errors::internal("mail the confirmation link", &e)),
        Err(_) => Err(ApiError::new(
            ErrorCode::Internal,
            "The mail server did not take the confirmation link in time: try again later",
        )),
    }
}

/// `invite EMAIL`: the host's owner makes a one-time signup code.
pub(super) async fn invite(m: &Manager, account: &Account, email: &str) -> Result<Reply, ApiError> {
    if !account.owner {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "Only the host's owner can invite; ask them, or its admin (`nook account invite EMAIL`)",
        ));
    }
    let (email, code) = make_invite(m, email).await?;
    Ok(invite_reply(m, &email, &code))
}

/// Makes an invite for `email`; returns the normalized address and the code.
pub(crate) async fn make_invite(m: &Manager, email: &str) -> Result<(String, String), ApiError> {
    let email = email.trim().to_ascii_lowercase();
    if !valid_email(&email) {
        let shown: String = email.chars().take(80).collect();
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{shown:?} is not an email address"),
        ));
    }
    let existing = m
        .store()
        .account_by_email(&email)
        .await
        .map_err(|e| errors::from_store("look up the account", e))?;
    if existing.is_some() {
        return Err(ApiError::new(
            ErrorCode::EmailTaken,
            format!("{email} already has an account: no invite is needed"),
        ));
    }
    let code = m
        .store()
        .create_invite(&email)
        .await
        .map_err(|e| errors::from_store("make the invite", e))?;
    tracing::info!("invite made");
    Ok((email, code))
}

fn invite_reply(m: &Manager, email: &str, code: &str) -> Reply {
    let command = format!(
        "{} signup {email} --invite {code}",
        m.config().ssh_command(None)
    );
    Reply::new(
        json!({ "email": email, "code": code, "expires_in_secs": nook_store::INVITE_TTL_SECS, "signup": command }),
        format!("Invite for {email} (once, within 7 days). They sign up with:\n  {command}"),
    )
}

/// `ssh-key add KEY`: records the wish; the key joins only when its holder confirms.
pub(super) async fn claim_key(
    m: &Manager,
    account: &Account,
    key: &SshKey,
) -> Result<Reply, ApiError> {
    let code = m
        .store()
        .create_key_claim(&account.id, key)
        .await
        .map_err(|e| match e {
            StoreError::KeyTaken => ApiError::new(
                ErrorCode::KeyTaken,
                "That key already belongs to an account",
            ),
            other => errors::from_store("add the key", other),
        })?;
    let command = format!("{} ssh-key confirm {code}", m.config().ssh_command(None));
    Ok(Reply::new(
        json!({ "fingerprint": key.fingerprint, "code": code, "expires_in_secs": nook_store::CLAIM_TTL_SECS, "confirm": command }),
        format!(
            "To add {}, run this once from a client holding that key, within 15 minutes:\n  {command}",
            key.fingerprint
        ),
    ))
}

/// `ssh-key confirm CODE`, run with the new key: the key the caller proved it holds joins the
/// account that asked for it.
pub(super) async fn confirm_key(
    m: &Manager,
    caller: &Caller,
    code: &str,
) -> Result<Reply, ApiError> {
    if let Some(account) = &caller.account {
        return Err(ApiError::new(
            ErrorCode::KeyTaken,
            format!(
                "This key already belongs to {}: confirm with the key you added",
                account.email
            ),
        ));
    }
    m.limits()
        .codes
        .take(&source(caller))
        .map_err(|wait| crate::limits::too_many("codes tried from your address", wait))?;
    let account = m
        .store()
        .redeem_key_claim(code, &caller.fingerprint)
        .await
        .map_err(|e| match e {
            StoreError::InvalidCode => ApiError::new(
                ErrorCode::InvalidCode,
                "That code is unknown, used, expired or for another key: run `ssh-key add` again",
            ),
            StoreError::KeyTaken => ApiError::new(
                ErrorCode::KeyTaken,
                "This key already belongs to an account",
            ),
            other => errors::from_store("add the key", other),
        })?;
    tracing::info!(account = %account.id, "key added with proof of possession");
    Ok(Reply::new(
        json!({ "added": caller.fingerprint, "email": account.email }),
        format!("Added {} to {}", caller.fingerprint, account.email),
    ))
}
