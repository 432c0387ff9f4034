//! nook's authoritative DNS server for its own domain.
//!
//! It answers for one zone, `DOMAIN`: SOA and NS at the apex, A/AAAA for the
//! apex and for every one-label name below it (`VM.DOMAIN`, through a
//! wildcard with per-name overrides for VMs on other hosts), and TXT at
//! `_acme-challenge.DOMAIN` for ACME DNS-01. The records live in a [`Zone`],
//! a cheap-to-clone handle that other tasks change at runtime.
//!
//! It must not recurse, forward, or answer for names outside the zone
//! (those get REFUSED), and it never binds sockets itself: the daemon passes
//! in bound sockets, so it alone decides addresses and privileges.
//!
//! Being public, it bounds what any client can make it spend or send: ANY
//! gets one small record (RFC 8482), UDP responses are rate limited per
//! source, and TCP clients are limited in number, size and idle time (see
//! [`Limits`]).

#[cfg(test)]
mod proptests;
mod ratelimit;
mod server;
mod wire;
mod zone;

pub use ratelimit::RateLimit;
pub use server::{Limits, serve, serve_tcp, serve_udp, serve_with};
pub use zone::{ACME_CHALLENGE_LABEL, Transport, Zone, ZoneConfig, Zones};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("Invalid DNS name {0:?}: use letters, digits and hyphens, one label for a host")]
    InvalidName(String),
    #[error("Invalid TXT value of {0} bytes: it must be 1 to 255 bytes")]
    InvalidTxt(usize),
    #[error("Too many pending ACME challenges (limit {0}): a previous order was not cleaned up")]
    TooManyChallenges(usize),
    #[error("DNS {transport} socket failed")]
    Socket {
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
}
