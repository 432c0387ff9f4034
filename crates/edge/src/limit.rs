//! Limits on how often an anonymous client may make the edge do work on its behalf (send a
//! sign-in email, for now).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many sign-in emails may be asked for, per window, from one source address and for one
/// email address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmailLimits {
    pub per_source: u32,
    pub per_email: u32,
    pub window: Duration,
}

impl Default for EmailLimits {
    fn default() -> Self {
        Self {
            per_source: 10,
            per_email: 3,
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Keys tracked at most per counter: past it, the expired ones are dropped, and if the rest
/// are all live the request is refused rather than the memory grown.
const MAX_KEYS: usize = 100_000;
/// Sign-in emails being looked up or sent at once; more are dropped (and logged).
const MAX_IN_FLIGHT: usize = 32;

/// Fixed-window counters per key.
struct Counter {
    max: u32,
    window: Duration,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Counter {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key`; false when `key` has used up this window's allowance.
    fn allow(&self, key: String) -> bool {
        let now = Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_KEYS && !counts.contains_key(&key) {
            counts.retain(|_, (start, _)| now.saturating_duration_since(*start) < self.window);
            if counts.len() >= MAX_KEYS {
                return false;
            }
        }
        let (start, n) = counts.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(*start) >= self.window {
            (*start, *n) = (now, 0);
        }
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }
}

pub(crate) struct EmailLimiter {
    sources: Counter,
    emails: Counter,
    pub(crate) in_flight: Arc<tokio::sync::Semaphore>,
}

impl EmailLimiter {
    pub(crate) fn new(limits: EmailLimits) -> Self {
        Self {
            sources: Counter::new(limits.per_source, limits.window),
            emails: Counter::new(limits.per_email, limits.window),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub(crate) fn allow_source(&self, ip: IpAddr) -> bool {
        self.sources.allow(source_key(ip))
    }

    /// `email` is already trimmed and lowercase.
    pub(crate) fn allow_email(&self, email: &str) -> bool {
        self.emails.allow(email.to_string())
    }
}

/// An IPv4 address, or an IPv6 address's /64: one customer usually holds a whole /64, so
/// counting single IPv6 addresses would limit nothing.
fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_window() {
        let c = Counter::new(2, Duration::from_millis(200));
        assert!(c.allow("a".into()) && c.allow("a".into()));
        assert!(!c.allow("a".into()));
        assert!(c.allow("b".into()));
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.allow("a".into()));
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1");
    }
}
