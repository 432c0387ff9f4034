use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use nook_dns::{Zone, Zones};

use crate::{AcmeConfig, AcmeError, Certificate, state};

/// Bounds a whole issuance, since the HTTP client has no timeouts of its
/// own and a stalled CA must not stall renewal forever.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the CA may take to validate or to sign.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(120));
/// Retry delays of the renewal loop after a failed attempt.
const BACKOFF_FIRST: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);

/// The stored certificate if it is still good for a while (see
/// [`Certificate::renew_at`]), names `DOMAIN` and `*.DOMAIN` and came from
/// the configured directory URL; otherwise a newly issued one.
pub async fn load_or_obtain(
    cfg: &AcmeConfig,
    zones: impl Into<Zones>,
) -> Result<Certificate, AcmeError> {
    match state::load_matching(cfg) {
        Ok(Some(cert)) if !cert.needs_renewal(SystemTime::now()) => {
            tracing::info!(
                names = ?cert.names,
                not_after = %humantime::format_rfc3339_seconds(cert.not_after),
                "reusing stored certificate"
            );
            return Ok(cert);
        }
        Ok(Some(cert)) => {
            tracing::info!(
                renew_at = %humantime::format_rfc3339_seconds(cert.renew_at()),
                "stored certificate is due for renewal"
            );
        }
        Ok(None) => {}
        // A pair left half-written by a crash, or edited by hand: a new
        // certificate is the fix, so don't make the caller handle it.
        Err(e @ AcmeError::BadCertificate(_)) => {
            tracing::warn!(error = %e, "ignoring unusable stored certificate");
        }
        Err(e) => return Err(e),
    }
    obtain(cfg, zones).await
}

/// Issues a new certificate for `DOMAIN` and `*.DOMAIN` with DNS-01 through
/// `zone`, stores it in the state directory and returns it.
pub async fn obtain(cfg: &AcmeConfig, zones: impl Into<Zones>) -> Result<Certificate, AcmeError> {
    let zones = zones.into();
    let domain = cfg.domain_normalised();
    let started = Instant::now();
    let cert = tokio::time::timeout(ISSUE_TIMEOUT, issue(cfg, &zones))
        .await
        .map_err(|_| AcmeError::Timeout {
            domain: domain.clone(),
            secs: ISSUE_TIMEOUT.as_secs(),
        })??;
    state::save_cert(cfg, &cert)?;
    tracing::info!(
        names = ?cert.names,
        not_after = %humantime::format_rfc3339_seconds(cert.not_after),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "certificate issued"
    );
    Ok(cert)
}

/// Keeps a valid certificate for ever: hands the stored certificate (if
/// any is still valid) to `on_new_cert` at once, obtains a new one when it
/// is due (or at once when there is none) and hands that over, and repeats.
/// Failed attempts are logged and retried with exponential backoff (1 min
/// to 6 h) while the old certificate keeps being served. Never returns;
/// stop it by aborting its task.
pub async fn renew_loop(
    cfg: AcmeConfig,
    zones: impl Into<Zones>,
    on_new_cert: impl Fn(Certificate),
) {
    let zones = zones.into();
    let mut current = match state::load_matching(&cfg) {
        Ok(Some(cert)) if SystemTime::now() < cert.not_after => {
            tracing::info!(
                names = ?cert.names,
                not_after = %humantime::format_rfc3339_seconds(cert.not_after),
                "using stored certificate"
            );
            on_new_cert(cert.clone());
            Some(cert)
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %ErrorChain(&e), "ignoring unusable stored certificate");
            None
        }
    };
    let mut backoff = BACKOFF_FIRST;
    loop {
        if let Some(cert) = &current {
            let renew_at = cert.renew_at();
            if renew_at > SystemTime::now() {
                tracing::info!(
                    renew_at = %humantime::format_rfc3339_seconds(renew_at),
                    "next certificate renewal scheduled"
                );
            }
            sleep_until(renew_at).await;
        }
        match obtain(&cfg, &zones).await {
            Ok(cert) => {
                backoff = BACKOFF_FIRST;
                on_new_cert(cert.clone());
                current = Some(cert);
            }
            Err(e) => {
                // Log the whole chain here: this is where the error is handled.
                tracing::warn!(
                    error = %ErrorChain(&e),
                    retry_in_s = backoff.as_secs(),
                    current_valid_until = current
                        .as_ref()
                        .map(|c| humantime::format_rfc3339_seconds(c.not_after).to_string()),
                    "certificate renewal failed"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sleeps in bounded steps against the wall clock, because a suspended
/// host or a clock step would make one long monotonic sleep wrong.
async fn sleep_until(when: SystemTime) {
    loop {
        let Ok(left) = when.duration_since(SystemTime::now()) else {
            return;
        };
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(3600))).await;
    }
}

struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Removes published challenge values however issuance ends (success,
/// error, or the future being dropped by a timeout).
struct Published {
    values: Vec<(Zone, String)>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for (zone, v) in &self.values {
            zone.remove_acme_challenge(v);
        }
    }
}

async fn account(cfg: &AcmeConfig, fresh: bool) -> Result<Account, AcmeError> {
    let url = cfg.directory_url.clone();
    let builder = || match &cfg.extra_root_ca_pem {
        Some(path) => Account::builder_with_root(path).map_err(|source| AcmeError::RootCa {
            path: path.clone(),
            source,
        }),
        None => Account::builder().map_err(|source| AcmeError::Unreachable {
            url: url.clone(),
            source,
        }),
    };
    if !fresh && let Some(creds) = state::load_account(cfg)? {
        return builder()?
            .from_credentials(creds)
            .await
            .map_err(|source| classify(source, &url));
    }
    let contact = cfg.contact_email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            url.clone(),
            None,
        )
        .await
        .map_err(|source| classify(source, &url))?;
    state::save_account(cfg, &creds)?;
    tracing::info!(id = account.id(), directory = %url, "ACME account registered");
    Ok(account)
}

/// An answer from the CA means it was reachable; anything else means it
/// was not (DNS, TCP, TLS, or a non-ACME reply).
fn classify(source: instant_acme::Error, url: &str) -> AcmeError {
    match source {
        instant_acme::Error::Api(_) => AcmeError::Account {
            url: url.to_owned(),
            source,
        },
        _ => AcmeError::Unreachable {
            url: url.to_owned(),
            source,
        },
    }
}

fn is_unknown_account(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist"))
}

async fn issue(cfg: &AcmeConfig, zones: &Zones) -> Result<Certificate, AcmeError> {
    let domain = cfg.domain_normalised();
    let order_err = |source| AcmeError::Order {
        domain: domain.clone(),
        source,
    };
    for wanted in cfg.domains() {
        if zones.get(&wanted).is_none() {
            return Err(AcmeError::DomainMismatch {
                domain: wanted,
                zone: zones
                    .iter()
                    .map(Zone::domain)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let identifiers: Vec<Identifier> = cfg.names().into_iter().map(Identifier::Dns).collect();
    tracing::info!(names = ?cfg.names(), directory = %cfg.directory_url, "requesting certificate");

    let mut account = account(cfg, false).await?;
    let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
        // The CA forgot the stored account (a reset test CA, or a
        // deactivated account): register again rather than fail for ever.
        Err(e) if is_unknown_account(&e) => {
            tracing::warn!("ACME server does not know the stored account; registering a new one");
            account = account_fresh(cfg).await?;
            account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map_err(order_err)?
        }
        r => r.map_err(order_err)?,
    };

    let mut published = Published { values: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(order_err)?;
        let name = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Pending => {}
            // Reused from an earlier order: nothing to prove.
            AuthorizationStatus::Valid => continue,
            status => {
                return Err(AcmeError::Challenge {
                    name,
                    domain: domain.clone(),
                    detail: format!("authorization is {status:?}"),
                });
            }
        }
        let mut challenge = authz
            .challenge(ChallengeType::Dns01)
            .ok_or_else(|| AcmeError::NoDns01 { name: name.clone() })?;
        let value = challenge.key_authorization().dns_value();
        // `name` and `*.name` are both proven at `_acme-challenge.name`, in name's own zone.
        let apex = name.strip_prefix("*.").unwrap_or(&name);
        let zone = zones.get(apex).ok_or_else(|| AcmeError::Challenge {
            name: name.clone(),
            domain: domain.clone(),
            detail: "no zone of nook's holds this name".into(),
        })?;
        zone.add_acme_challenge(&value)?;
        published.values.push((zone.clone(), value));
        if !cfg.propagation_wait.is_zero() {
            tracing::info!(%name, wait_ms = cfg.propagation_wait.as_millis() as u64, "published DNS-01 challenge; giving it time to reach every server of the zone");
            tokio::time::sleep(cfg.propagation_wait).await;
        }
        tracing::info!(%name, "published DNS-01 challenge; asking the CA to validate");
        challenge.set_ready().await.map_err(order_err)?;
    }

    let status = match order.poll_ready(&POLL).await {
        Ok(status) => status,
        Err(instant_acme::Error::Api(problem)) => {
            return Err(challenge_failure(&mut order, &domain, Some(problem.to_string())).await);
        }
        Err(e) => return Err(order_err(e)),
    };
    if status != OrderStatus::Ready {
        return Err(challenge_failure(&mut order, &domain, None).await);
    }
    // Validation is over; the CA never looks at the records again.
    drop(published);

    let key_pem = order
        .finalize()
        .await
        .map_err(|source| AcmeError::Finalize {
            domain: domain.clone(),
            source,
        })?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(|source| AcmeError::Finalize {
            domain: domain.clone(),
            source,
        })?;
    let cert = Certificate::from_pem(chain_pem, key_pem)?;
    if !cert.covers(&cfg.names()) {
        return Err(AcmeError::BadCertificate(format!(
            "the CA issued a certificate for {:?}, not {:?}",
            cert.names,
            cfg.names()
        )));
    }
    Ok(cert)
}

async fn account_fresh(cfg: &AcmeConfig) -> Result<Account, AcmeError> {
    account(cfg, true).await
}

/// Finds which authorization failed and why, so the error names `*.DOMAIN`
/// or `DOMAIN` and carries the CA's own explanation.
async fn challenge_failure(
    order: &mut instant_acme::Order,
    domain: &str,
    order_problem: Option<String>,
) -> AcmeError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        if state.status == AuthorizationStatus::Valid {
            continue;
        }
        let name = state.identifier().to_string();
        let detail = state
            .challenges
            .iter()
            .find_map(|c| c.error.as_ref().map(|p| p.to_string()))
            .or_else(|| order_problem.clone())
            .unwrap_or_else(|| format!("authorization is {:?}", state.status));
        return AcmeError::Challenge {
            name,
            domain: domain.to_owned(),
            detail,
        };
    }
    AcmeError::Challenge {
        name: format!("{domain} and *.{domain}"),
        domain: domain.to_owned(),
        detail: order_problem.unwrap_or_else(|| "the order became invalid".into()),
    }
}
