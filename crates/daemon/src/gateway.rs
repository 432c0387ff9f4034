//! The daemon's side of the LLM gateway: its settings, its backend over the store (credit and
//! usage), and its route on the metadata address, where the caller is the VM its pinned
//! address proves.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use nook_gateway::backend::BoxFuture;
use nook_gateway::{
    ApiKind, BackendError, Caller, GatewayBackend, GatewayConfig, Price, Provider, RateLimits,
    Reservation, UsageRecord,
};
use nook_store::{LlmUse, Store};
use serde::Deserialize;

use crate::config::{ConfigError, Settings};
use crate::manager::Manager;

/// One more provider, as the config file gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub name: String,
    /// `openai` or `anthropic`: the wire format it speaks.
    pub kind: String,
    pub base_url: String,
    pub key: Option<String>,
    #[serde(default)]
    pub models: BTreeMap<String, PriceSettings>,
}

/// Dollars per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSettings {
    pub input: f64,
    pub output: f64,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
}

/// The built-in price table (dollars per million tokens: input, output, cache read, cache
/// write), as the providers published it. A host replaces a provider's table with
/// `llm_prices.PROVIDER` in its config file.
const ANTHROPIC_PRICES: [(&str, [f64; 4]); 6] = [
    ("claude-opus-4-5", [5.0, 25.0, 0.5, 6.25]),
    ("claude-opus-4-1", [15.0, 75.0, 1.5, 18.75]),
    ("claude-sonnet-4-5", [3.0, 15.0, 0.3, 3.75]),
    ("claude-sonnet-4-0", [3.0, 15.0, 0.3, 3.75]),
    ("claude-haiku-4-5", [1.0, 5.0, 0.1, 1.25]),
    ("claude-3-5-haiku-latest", [0.8, 4.0, 0.08, 1.0]),
];
const OPENAI_PRICES: [(&str, [f64; 4]); 7] = [
    ("gpt-5", [1.25, 10.0, 0.125, 0.0]),
    ("gpt-5-codex", [1.25, 10.0, 0.125, 0.0]),
    ("gpt-5-mini", [0.25, 2.0, 0.025, 0.0]),
    ("gpt-5-nano", [0.05, 0.4, 0.005, 0.0]),
    ("gpt-4.1", [2.0, 8.0, 0.5, 0.0]),
    ("gpt-4.1-mini", [0.4, 1.6, 0.1, 0.0]),
    ("gpt-4o-mini", [0.15, 0.6, 0.075, 0.0]),
];

fn table(rows: &[(&str, [f64; 4])]) -> BTreeMap<String, Price> {
    rows.iter()
        .map(|(m, [i, o, r, w])| {
            (
                m.to_string(),
                Price {
                    input: *i,
                    output: *o,
                    cache_read: *r,
                    cache_write: *w,
                },
            )
        })
        .collect()
}

fn prices(
    provider: &str,
    given: &BTreeMap<String, PriceSettings>,
) -> Result<BTreeMap<String, Price>, ConfigError> {
    given
        .iter()
        .map(|(model, p)| {
            let price = Price {
                input: p.input,
                output: p.output,
                cache_read: p.cache_read.unwrap_or(p.input),
                cache_write: p.cache_write.unwrap_or(p.input),
            };
            let all = [price.input, price.output, price.cache_read, price.cache_write];
            if all.iter().any(|v| !v.is_finite() || *v < 0.0 || *v > 100_000.0) {
                return Err(ConfigError::Invalid(
                    "llm_prices",
                    format!("{provider}.{model}: prices are dollars per million tokens, from 0 to 100000"),
                ));
            }
            Ok((model.clone(), price))
        })
        .collect()
}

/// Takes the gateway's settings out of `s` and checks them.
pub fn config_from(s: &mut Settings) -> Result<(GatewayConfig, i64), ConfigError> {
    let mut given_prices = s.llm_prices.take().unwrap_or_default();
    let mut providers = Vec::new();
    for (name, kind, base, key, builtin) in [
        (
            "anthropic",
            ApiKind::Anthropic,
            s.llm_anthropic_base_url.take(),
            s.llm_anthropic_key.take(),
            &ANTHROPIC_PRICES[..],
        ),
        (
            "openai",
            ApiKind::OpenAi,
            s.llm_openai_base_url.take(),
            s.llm_openai_key.take(),
            &OPENAI_PRICES[..],
        ),
    ] {
        let models = match given_prices.remove(name) {
            Some(table) => prices(name, &table)?,
            None => table(builtin),
        };
        providers.push(Provider {
            name: name.into(),
            kind,
            base_url: base.unwrap_or_else(|| match kind {
                ApiKind::Anthropic => "https://api.anthropic.com".into(),
                ApiKind::OpenAi => "https://api.openai.com".into(),
            }),
            key: key.filter(|k| !k.is_empty()),
            models,
        });
    }
    for p in s.llm_providers.take().unwrap_or_default() {
        let kind = match p.kind.as_str() {
            "openai" => ApiKind::OpenAi,
            "anthropic" => ApiKind::Anthropic,
            other => {
                return Err(ConfigError::Invalid(
                    "llm_providers",
                    format!("{}: kind {other:?}: use openai or anthropic", p.name),
                ));
            }
        };
        let valid_name = !p.name.is_empty()
            && p.name.len() <= 32
            && p.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && p.name != "models";
        if !valid_name || providers.iter().any(|q: &Provider| q.name == p.name) {
            return Err(ConfigError::Invalid(
                "llm_providers",
                format!(
                    "{:?}: a provider needs a new name of lowercase letters, digits and '-'",
                    p.name
                ),
            ));
        }
        let mut models = prices(&p.name, &p.models)?;
        if let Some(more) = given_prices.remove(&p.name) {
            models.extend(prices(&p.name, &more)?);
        }
        providers.push(Provider {
            name: p.name,
            kind,
            base_url: p.base_url,
            key: p.key,
            models,
        });
    }
    if let Some(unknown) = given_prices.keys().next() {
        return Err(ConfigError::Invalid(
            "llm_prices",
            format!(
                "{unknown:?} is no provider: use anthropic, openai or a name from llm_providers"
            ),
        ));
    }
    for p in &providers {
        nook_gateway::BaseUrl::parse(&p.base_url)
            .map_err(|why| ConfigError::Invalid("llm_*_base_url", format!("{}: {why}", p.name)))?;
    }
    let max_body = match s.llm_max_body.take() {
        Some(text) => nook_api::parse_size(&text)
            .map_err(|e| ConfigError::Invalid("llm_max_body", e.message))?,
        None => 16 << 20,
    };
    if !(1024..=256 << 20).contains(&max_body) {
        return Err(ConfigError::Invalid(
            "llm_max_body",
            "use 1K to 256M".into(),
        ));
    }
    let credit = s.llm_initial_credit.take().unwrap_or(0.0);
    if !credit.is_finite() || !(0.0..=1_000_000.0).contains(&credit) {
        return Err(ConfigError::Invalid(
            "llm_initial_credit",
            "dollars, from 0 to 1000000".into(),
        ));
    }
    let cfg = GatewayConfig {
        providers,
        limits: RateLimits {
            account_rpm: s.llm_account_rpm.take().unwrap_or(1200),
            vm_rpm: s.llm_vm_rpm.take().unwrap_or(600),
            account_tpm: s.llm_account_tpm.take().unwrap_or(0),
        },
        max_body: max_body as usize,
        ..GatewayConfig::default()
    };
    Ok((cfg, (credit * 1e6).round() as i64))
}

/// Every account's LLM credit, kept in memory so a request's reservation and settlement cost
/// no database write; settled requests reach the store in batches (usage rows and balance
/// together, one transaction every [`FLUSH_EVERY`] at most).
///
/// What an account may spend is `stored − held − unflushed`: its balance as last written, less
/// what requests in flight reserved, less what settled requests cost that is not written yet.
/// A crash loses at most the last batch of settled usage (it is then not charged) and never
/// charges for a request that did not settle.
pub struct Ledger {
    store: Store,
    initial_micros: i64,
    accounts: std::sync::Mutex<HashMap<String, Entry>>,
    queue: std::sync::Mutex<Vec<LlmUse>>,
    wake: tokio::sync::Notify,
    /// Held while balances are written (a flush, an admin's change), so the stored balance an
    /// entry learns is never older than one it already has.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    stored: i64,
    held: i64,
    unflushed: i64,
}

/// How long settled usage may wait before it is written.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Ledger {
    pub fn new(store: Store, initial_micros: i64) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger {
            store,
            initial_micros,
            accounts: Default::default(),
            queue: Default::default(),
            wake: Default::default(),
            writing: Default::default(),
        });
        // One writer: it wakes when a request settles (a wake-up before it waits is kept),
        // lets more gather for a moment, and writes them all in one transaction.
        let flusher = ledger.clone();
        tokio::spawn(async move {
            loop {
                flusher.wake.notified().await;
                tokio::time::sleep(FLUSH_EVERY).await;
                if let Err(err) = flusher.flush().await {
                    tracing::error!(error = %err, "could not write LLM usage; retrying");
                    tokio::time::sleep(FLUSH_EVERY * 10).await;
                    flusher.wake.notify_one();
                }
            }
        });
        ledger
    }

    async fn loaded(&self, account: &str) -> Result<(), nook_store::StoreError> {
        if self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(account)
        {
            return Ok(());
        }
        let _writing = self.writing.lock().await;
        let stored = self.store.credit(account, self.initial_micros).await?;
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(account.to_string())
            .or_insert(Entry {
                stored,
                ..Entry::default()
            });
        Ok(())
    }

    /// Takes `micros` if anything is left; else the balance.
    pub async fn reserve(
        &self,
        account: &str,
        micros: u64,
    ) -> Result<Result<(), i64>, nook_store::StoreError> {
        self.loaded(account).await?;
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let e = accounts.entry(account.to_string()).or_default();
        let left = e.stored - e.held - e.unflushed;
        if left <= 0 {
            return Ok(Err(left));
        }
        e.held = e
            .held
            .saturating_add(i64::try_from(micros).unwrap_or(i64::MAX));
        Ok(Ok(()))
    }

    /// Releases a reservation and queues the request's usage and cost.
    pub fn settle(&self, used: LlmUse, reserved: u64) {
        {
            let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
            let e = accounts.entry(used.account_id.clone()).or_default();
            e.held -= i64::try_from(reserved).unwrap_or(i64::MAX);
            e.unflushed += i64::try_from(used.cost_micros).unwrap_or(i64::MAX);
        }
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(used);
        self.wake.notify_one();
    }

    /// Writes every settled request now.
    pub async fn flush(&self) -> Result<(), nook_store::StoreError> {
        let _writing = self.writing.lock().await;
        self.flush_locked().await
    }

    async fn flush_locked(&self) -> Result<(), nook_store::StoreError> {
        let rows = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        if rows.is_empty() {
            return Ok(());
        }
        let balances = match self.store.record_usage(&rows, self.initial_micros).await {
            Ok(b) => b,
            Err(err) => {
                // Put them back, first, for the next try.
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let later = std::mem::replace(&mut *queue, rows);
                queue.extend(later);
                return Err(err);
            }
        };
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        for u in &rows {
            if let Some(e) = accounts.get_mut(&u.account_id) {
                e.unflushed -= i64::try_from(u.cost_micros).unwrap_or(i64::MAX);
            }
        }
        for (account, stored) in balances {
            accounts.entry(account).or_default().stored = stored;
        }
        Ok(())
    }

    /// The balance, with everything settled counted (reservations in flight are not).
    pub async fn balance(&self, account: &str) -> Result<i64, nook_store::StoreError> {
        self.loaded(account).await?;
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        Ok(accounts.get(account).map_or(0, |e| e.stored - e.unflushed))
    }

    /// An admin's `--add` (or `--set`, when `set`): written at once, after every settled
    /// request, so `--set` means what it says.
    pub async fn change(
        &self,
        account: &str,
        micros: i64,
        set: bool,
    ) -> Result<i64, nook_store::StoreError> {
        let _writing = self.writing.lock().await;
        self.flush_locked().await?;
        let stored = self
            .store
            .change_credit(account, self.initial_micros, micros, set)
            .await?;
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let e = accounts.entry(account.to_string()).or_default();
        e.stored = stored;
        Ok(stored - e.unflushed)
    }
}

/// Own keys by (VM, provider), and the store generation they were read in.
type OwnKeys = (u64, HashMap<(String, String), Option<String>>);

/// The backend over the ledger and the store.
pub struct StoreBackend {
    pub ledger: Arc<Ledger>,
    pub store: Store,
    /// Opens the keys of `llm` integrations.
    pub sealer: Arc<crate::secrets::Sealer>,
    /// `own_key` answers by (VM, provider), good while the store's generation holds.
    own_keys: std::sync::Mutex<OwnKeys>,
}

impl StoreBackend {
    pub fn new(ledger: Arc<Ledger>, store: Store, sealer: Arc<crate::secrets::Sealer>) -> Self {
        Self {
            ledger,
            store,
            sealer,
            own_keys: std::sync::Mutex::new((u64::MAX, HashMap::new())),
        }
    }

    async fn look_up_own_key(
        &self,
        caller: &Caller,
        provider: &str,
    ) -> Result<Option<String>, BackendError> {
        let rows = self
            .store
            .attached_of_kind(&caller.vm_id, &caller.account_id, "llm")
            .await
            .map_err(BackendError::new)?;
        for row in rows {
            let config: serde_json::Value = serde_json::from_str(&row.config).unwrap_or_default();
            if config["provider"].as_str() != Some(provider) {
                continue;
            }
            let Some(plain) = row
                .secret
                .as_deref()
                .and_then(|s| self.sealer.unseal(&row.id, s))
            else {
                tracing::error!(integration = %row.name, "an llm integration's key does not open");
                continue;
            };
            let secret: serde_json::Value = serde_json::from_slice(&plain).unwrap_or_default();
            if let Some(key) = secret["key"].as_str() {
                return Ok(Some(key.to_string()));
            }
        }
        Ok(None)
    }
}

impl GatewayBackend for StoreBackend {
    fn reserve<'a>(
        &'a self,
        caller: &'a Caller,
        micros: u64,
    ) -> BoxFuture<'a, Result<Reservation, BackendError>> {
        Box::pin(async move {
            match self
                .ledger
                .reserve(&caller.account_id, micros)
                .await
                .map_err(BackendError::new)?
            {
                Ok(()) => Ok(Reservation::Taken),
                Err(balance_micros) => Ok(Reservation::Exhausted { balance_micros }),
            }
        })
    }

    fn own_key<'a>(
        &'a self,
        caller: &'a Caller,
        provider: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        Box::pin(async move {
            // The generation moves with every commit, so a grant, detach or expiry written
            // since is seen; an expiry passing by itself is seen once anything commits, and
            // usage commits every few milliseconds while the gateway is busy.
            let generation = self.store.generation();
            let cache_key = (caller.vm_id.clone(), provider.to_string());
            {
                let cache = self.own_keys.lock().unwrap_or_else(|p| p.into_inner());
                if cache.0 == generation
                    && let Some(known) = cache.1.get(&cache_key)
                {
                    return Ok(known.clone());
                }
            }
            let found = self.look_up_own_key(caller, provider).await?;
            let mut cache = self.own_keys.lock().unwrap_or_else(|p| p.into_inner());
            if cache.0 != generation {
                *cache = (generation, HashMap::new());
            }
            cache.1.insert(cache_key, found.clone());
            Ok(found)
        })
    }

    fn settle(&self, r: UsageRecord) -> BoxFuture<'static, Result<(), BackendError>> {
        let used = LlmUse {
            account_id: r.caller.account_id,
            vm_id: r.caller.vm_id,
            vm_name: r.caller.vm_name,
            provider: r.provider,
            model: r.model,
            input_tokens: r.usage.input,
            output_tokens: r.usage.output,
            cache_read_tokens: r.usage.cache_read,
            cache_write_tokens: r.usage.cache_write,
            cost_micros: r.cost_micros,
            status: r.status,
        };
        self.ledger.settle(used, r.reserved_micros);
        Box::pin(async { Ok(()) })
    }
}

/// `/gateway/llm/...` on the metadata address.
pub async fn llm(
    State(m): State<Arc<Manager>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let vm = match crate::metadata::calling_vm(m.as_ref(), peer).await {
        Ok(vm) => vm,
        Err(refused) => return refused,
    };
    let caller = Caller {
        account_id: vm.owner,
        vm_id: vm.id,
        vm_name: vm.name,
    };
    m.gateway().handle(caller, req).await.map(Body::new)
}
