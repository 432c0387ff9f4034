//! What the gateway needs from the daemon: whose credit to spend, and where usage goes. The
//! daemon implements [`GatewayBackend`] over its store.

use std::future::Future;
use std::pin::Pin;

use crate::meter::Usage;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The VM a request came from, as the network proved it (its pinned address), never as the
/// request claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    pub vm_id: String,
    pub vm_name: String,
}

/// The answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Taken from the balance; settle it.
    Taken,
    /// Nothing left: the balance (in micro-dollars, zero or less).
    Exhausted { balance_micros: i64 },
}

/// One finished (or abandoned) request, for the usage table and the settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub caller: Caller,
    pub provider: String,
    pub model: String,
    pub usage: Usage,
    pub cost_micros: u64,
    /// What [`GatewayBackend::reserve`] took; the difference goes back to the balance.
    pub reserved_micros: u64,
    /// The status the client got.
    pub status: u16,
}

/// A failure in the daemon's store. The gateway answers 503 and logs it.
#[derive(Debug, thiserror::Error)]
#[error("gateway backend failed")]
pub struct BackendError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl BackendError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(e.into())
    }
}

pub trait GatewayBackend: Send + Sync + 'static {
    /// Takes `micros` from the caller's account if its balance is above zero, atomically:
    /// concurrent requests can then overspend by at most one request's reservation.
    fn reserve<'a>(
        &'a self,
        caller: &'a Caller,
        micros: u64,
    ) -> BoxFuture<'a, Result<Reservation, BackendError>>;

    /// The account's own key for `provider`, when it attached one to the caller's VM (an
    /// `llm` integration): then the gateway uses it instead of the host's, and bills nothing.
    fn own_key<'a>(
        &'a self,
        caller: &'a Caller,
        provider: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>>;

    /// Records the usage and returns `reserved - cost` to the balance. Called exactly once per
    /// taken reservation, even when the client went away mid-stream.
    fn settle(&self, record: UsageRecord) -> BoxFuture<'static, Result<(), BackendError>>;
}
