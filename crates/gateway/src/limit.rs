//! Requests and tokens per minute, per account and per VM, in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimits;

const WINDOW: Duration = Duration::from_secs(60);
/// Windows kept before old ones are swept (one per account and per VM that called lately).
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    requests: u32,
    tokens: u64,
}

impl Window {
    fn current(&mut self, now: Instant) -> &mut Self {
        if self.start.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            *self = Window {
                start: Some(now),
                ..Window::default()
            };
        }
        self
    }

    fn retry_after(&self, now: Instant) -> Duration {
        self.start
            .map_or(WINDOW, |s| WINDOW.saturating_sub(now.duration_since(s)))
    }
}

/// Which limit a request hit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub what: &'static str,
    pub retry_after: Duration,
}

#[derive(Debug, Default)]
pub struct Limiter {
    limits: RateLimits,
    windows: Mutex<HashMap<String, Window>>,
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            windows: Mutex::default(),
        }
    }

    /// Counts one request of `account` from `vm`, unless a limit is reached.
    pub fn admit(&self, account: &str, vm: &str) -> Result<(), Limited> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() > MAX_KEYS {
            windows.retain(|_, w| w.start.is_some_and(|s| now.duration_since(s) < WINDOW));
        }
        let l = self.limits;
        let acct_key = format!("a:{account}");
        let vm_key = format!("v:{vm}");
        {
            let a = windows.entry(acct_key.clone()).or_default().current(now);
            if l.account_tpm > 0 && a.tokens >= l.account_tpm {
                return Err(Limited {
                    what: "tokens per minute for this account",
                    retry_after: a.retry_after(now),
                });
            }
            if l.account_rpm > 0 && a.requests >= l.account_rpm {
                return Err(Limited {
                    what: "requests per minute for this account",
                    retry_after: a.retry_after(now),
                });
            }
        }
        let v = windows.entry(vm_key).or_default().current(now);
        if l.vm_rpm > 0 && v.requests >= l.vm_rpm {
            return Err(Limited {
                what: "requests per minute for this VM",
                retry_after: v.retry_after(now),
            });
        }
        v.requests += 1;
        if let Some(a) = windows.get_mut(&acct_key) {
            a.requests += 1;
        }
        Ok(())
    }

    /// Counts tokens a finished request used against its account's minute.
    pub fn add_tokens(&self, account: &str, tokens: u64) {
        if self.limits.account_tpm == 0 {
            return;
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows
            .entry(format!("a:{account}"))
            .or_default()
            .current(now);
        w.tokens = w.tokens.saturating_add(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_tokens_per_minute_are_held() {
        let l = Limiter::new(RateLimits {
            account_rpm: 3,
            vm_rpm: 2,
            account_tpm: 100,
        });
        assert!(l.admit("a", "v1").is_ok());
        assert!(l.admit("a", "v1").is_ok());
        let err = l.admit("a", "v1").expect_err("vm limit");
        assert_eq!(err.what, "requests per minute for this VM");
        assert!(l.admit("a", "v2").is_ok());
        let err = l.admit("a", "v3").expect_err("account limit");
        assert_eq!(err.what, "requests per minute for this account");
        l.add_tokens("b", 100);
        let err = l.admit("b", "v4").expect_err("tokens");
        assert_eq!(err.what, "tokens per minute for this account");
        assert!(err.retry_after <= WINDOW);
        assert!(Limiter::new(RateLimits::default()).admit("x", "y").is_ok());
    }
}
