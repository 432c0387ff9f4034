//! Response rate limiting for UDP, where source addresses can be forged: a
//! token bucket per source, so the server cannot be used to flood a victim
//! with answers to queries sent in its name.
//!
//! Memory is bounded: at most [`RateLimit::max_sources`] buckets, the one
//! touched longest ago evicted first. A source under attack is touched on
//! every query, so a flood of other sources does not easily reset its bucket.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Instant;

/// How many UDP responses each source gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Responses per second a source gets once its burst is spent.
    pub per_second: f64,
    /// Responses a quiet source may get at once.
    pub burst: f64,
    /// Of the responses over the limit, every `slip`-th goes out as an
    /// empty truncated one (TC set), so a real client behind a forged flood
    /// retries over TCP, which cannot be forged; the others are dropped.
    /// 0 drops them all.
    pub slip: u32,
    /// Sources tracked at once; the least recently seen one makes room.
    pub max_sources: usize,
}

impl Default for RateLimit {
    /// Resolvers cache answers for the zone's TTL, so even one serving many
    /// users asks far less than this; a flood is cut to a trickle.
    fn default() -> Self {
        RateLimit {
            per_second: 20.0,
            burst: 40.0,
            slip: 2,
            max_sources: 16_384,
        }
    }
}

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Answer,
    /// Send an empty, truncated response instead.
    Slip,
    Drop,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Key of this source in [`RateLimiter::by_age`].
    seq: u64,
    over: u32,
}

pub(crate) struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<IpAddr, Bucket>,
    /// Sources by the order they were last seen, oldest first.
    by_age: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Spends one token of `source`'s bucket, if it has one.
    pub(crate) fn check(&mut self, source: IpAddr, now: Instant) -> Verdict {
        let key = source_key(source);
        let seq = self.next_seq;
        self.next_seq += 1;
        let limit = self.limit;
        let bucket = match self.buckets.get_mut(&key) {
            Some(b) => {
                self.by_age.remove(&b.seq);
                let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
                b.last = now;
                b.seq = seq;
                b
            }
            None => {
                while self.buckets.len() >= limit.max_sources.max(1) {
                    let Some((_, oldest)) = self.by_age.pop_first() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
                self.buckets.entry(key).or_insert(Bucket {
                    tokens: limit.burst,
                    last: now,
                    seq,
                    over: 0,
                })
            }
        };
        self.by_age.insert(seq, key);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.over = 0;
            return Verdict::Answer;
        }
        bucket.over = bucket.over.wrapping_add(1);
        if limit.slip > 0 && bucket.over % limit.slip == 0 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// IPv4 sources count by address (an IPv4-mapped IPv6 one, from a
/// dual-stack socket, as the IPv4 address it is); IPv6 ones by their /64,
/// since one host is routinely given a whole /64 to pick addresses from.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !(u128::MAX >> 64);
                IpAddr::V6(bits.into())
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn limiter(max_sources: usize) -> RateLimiter {
        RateLimiter::new(RateLimit {
            per_second: 10.0,
            burst: 5.0,
            slip: 2,
            max_sources,
        })
    }

    #[test]
    fn a_bucket_empties_slips_and_refills() {
        let mut rl = limiter(8);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..9).map(|_| rl.check(v4(1), t0)).collect();
        use Verdict::*;
        assert_eq!(
            verdicts,
            [
                Answer, Answer, Answer, Answer, Answer, Drop, Slip, Drop, Slip
            ]
        );
        // Another source has its own bucket.
        assert_eq!(rl.check(v4(2), t0), Answer);
        // 10 per second: a tenth of a second buys one answer, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(rl.check(v4(1), t1), Answer);
        assert_ne!(rl.check(v4(1), t1), Answer);
        // A long rest refills up to the burst and no further.
        let t2 = t1 + Duration::from_secs(60);
        let answered = (0..20).filter(|_| rl.check(v4(1), t2) == Answer).count();
        assert_eq!(answered, 5);
    }

    #[test]
    fn tracked_sources_are_capped_and_the_stalest_goes() {
        let mut rl = limiter(3);
        let t = Instant::now();
        for _ in 0..10 {
            rl.check(v4(1), t);
        }
        assert_ne!(rl.check(v4(1), t), Verdict::Answer);
        for i in 2..200 {
            rl.check(v4(i), t);
            // Source 1 stays the most recently seen but one: it survives.
            rl.check(v4(1), t);
            assert!(rl.tracked() <= 3);
            assert_eq!(rl.by_age.len(), rl.tracked());
        }
        assert_ne!(
            rl.check(v4(1), t),
            Verdict::Answer,
            "source 1 kept its empty bucket"
        );
        // Three new sources push source 1 out: it starts over with a burst.
        for i in 200..203 {
            rl.check(v4(i), t);
        }
        assert_eq!(rl.check(v4(1), t), Verdict::Answer);
        assert_eq!(rl.tracked(), 3);
    }

    #[test]
    fn sources_are_keyed_by_host() {
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(source_key(mapped), v4(1));
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a.into()), source_key(b.into()));
        assert_ne!(source_key(a.into()), source_key(c.into()));
        let mut rl = limiter(8);
        let t = Instant::now();
        let spent = (0..10)
            .filter(|i| rl.check(if i % 2 == 0 { a } else { b }.into(), t) == Verdict::Answer)
            .count();
        assert_eq!(spent, 5, "one /64 shares one bucket");
    }
}
