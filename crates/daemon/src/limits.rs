//! Rate limits on what strangers and accounts can ask for: signups and code redemptions per
//! source address, VM creation per account. Token buckets, kept in memory (a restart forgets
//! them, which only ever errs towards letting someone in) and bounded in number.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nook_api::{ApiError, ErrorCode};

/// The most keys a limiter tracks; past it, the fullest buckets (those that would let a
/// request through anyway) are forgotten first.
const MAX_KEYS: usize = 10_000;

/// A token bucket per key: `burst` requests at once, refilled at one per `every`.
pub struct RateLimiter {
    burst: f64,
    every: Duration,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(burst: u32, every: Duration) -> Self {
        Self {
            burst: f64::from(burst),
            every,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for `key`; on refusal, how long until the next one would pass.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let refill = |(tokens, at): (f64, Instant)| {
            let gained = now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64();
            (tokens + gained).min(self.burst)
        };
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(*b) < self.burst);
            if buckets.len() >= MAX_KEYS {
                // Everyone tracked is still limited: the newcomer is refused rather than
                // letting the table grow without end.
                return Err(self.every);
            }
        }
        let tokens = buckets.get(key).map_or(self.burst, |b| refill(*b));
        if tokens < 1.0 {
            buckets.insert(key.to_string(), (tokens, now));
            return Err(self.every.mul_f64(1.0 - tokens));
        }
        buckets.insert(key.to_string(), (tokens - 1.0, now));
        Ok(())
    }
}

/// The limits the front doors apply.
pub struct Limits {
    /// `signup` per source address.
    pub signup: RateLimiter,
    /// One-time codes tried (`signup --invite`, `ssh-key confirm`) per source address.
    pub codes: RateLimiter,
    /// `new` and `cp` per account.
    pub create: RateLimiter,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            signup: RateLimiter::new(20, Duration::from_secs(180)),
            codes: RateLimiter::new(20, Duration::from_secs(180)),
            create: RateLimiter::new(30, Duration::from_secs(2)),
        }
    }
}

/// The error for a refused request: what was limited and when to come back.
pub fn too_many(what: &str, wait: Duration) -> ApiError {
    let secs = wait.as_secs().max(1);
    let when = if secs >= 120 {
        format!("{} minutes", secs.div_ceil(60))
    } else {
        format!("{secs} seconds")
    };
    ApiError::new(
        ErrorCode::RateLimited,
        format!("Too many {what}: try again in {when}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_burst_through_then_refills() {
        let limiter = RateLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take_at("a", t0).is_ok());
        }
        let wait = limiter.take_at("a", t0).expect_err("over the burst");
        assert!(
            wait <= Duration::from_secs(10) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(limiter.take_at("b", t0).is_ok(), "keys are separate");
        assert!(limiter.take_at("a", t0 + Duration::from_secs(11)).is_ok());
        assert!(limiter.take_at("a", t0 + Duration::from_secs(11)).is_err());
    }

    #[test]
    fn the_table_stays_bounded() {
        let limiter = RateLimiter::new(1, Duration::from_secs(3600));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            assert!(limiter.take_at(&i.to_string(), t0).is_ok());
        }
        assert!(limiter.take_at("one too many", t0).is_err());
        assert!(
            limiter.buckets.lock().map(|b| b.len()).unwrap_or(0) <= MAX_KEYS,
            "the table grew past its bound"
        );
        // Once the old buckets are full again they make room.
        let later = t0 + Duration::from_secs(3600);
        assert!(limiter.take_at("newcomer", later).is_ok());
    }
}
