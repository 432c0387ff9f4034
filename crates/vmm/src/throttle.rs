//! Rate limiting for warnings about what a guest sends: a guest controls how often they
//! happen, and must not be able to flood the host's log.

use std::time::{Duration, Instant};

/// At most one report per period; the events held back in between are counted, so the next
/// report can say how many there were.
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held: 0,
        }
    }

    /// Whether one more event may be reported now; if so, how many were held back before it.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        self.allow_n(1)
    }

    /// As [`Throttle::allow`] for an event that counts `n` (bytes, say).
    pub(crate) fn allow_n(&mut self, n: u64) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held = self.held.saturating_add(n);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_per_period_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        assert_eq!(t.allow_n(24), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow(), Some(1024));
        assert_eq!(t.allow(), None);
    }
}
