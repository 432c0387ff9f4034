//! The destinations VMs may not reach through the host, as a typed and
//! validated list. Pure: the ruleset renders it, the daemon's config builds it.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::NetError;

/// What [`EgressBlockList::default`] holds, and why each is there.
///
/// `169.254.0.0/16` includes nook's own metadata address on purpose: VMs
/// reach that one on the host itself (the ruleset's input chain accepts it),
/// and block-list rules only see forwarded traffic. Blocking the whole range
/// is what keeps a request for `169.254.169.254` from ever being forwarded to
/// a cloud provider's metadata service, e.g. while the metadata interface is
/// missing.
pub const DEFAULT_EGRESS_BLOCK: &[&str] = &[
    // "This" network.
    "0.0.0.0/8",
    // Private networks: the host's LAN and other tenants' services.
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    // Shared address space (carrier-grade NAT, Tailscale); Alibaba Cloud's
    // metadata service lives at 100.100.100.200 inside it, listed on its own
    // so the list still names it if someone narrows the range.
    "100.64.0.0/10",
    "100.100.100.200/32",
    "127.0.0.0/8",
    // Link-local: AWS, GCP, Azure, OpenStack and DigitalOcean metadata.
    "169.254.0.0/16",
    // Azure's wire server (and DNS/DHCP/health endpoint): a public address.
    "168.63.129.16/32",
    // IETF protocol assignments (DS-Lite, NAT64 discovery and the like).
    "192.0.0.0/24",
    // Benchmarking; some providers use it for internal services.
    "198.18.0.0/15",
    // Multicast and reserved, which includes broadcast.
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// An IPv4 network: an address with no host bits set, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `None` when `prefix` is over 32 or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        let net = Ipv4Net { addr, prefix };
        (prefix <= 32 && u32::from(addr) & !net.mask() == 0).then_some(net)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;

    /// `A.B.C.D/N`, or a bare address for a /32.
    fn from_str(s: &str) -> Result<Ipv4Net, NetError> {
        let bad = |reason: String| NetError::BadCidr {
            value: s.to_owned(),
            reason,
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            // VMs get no IPv6 at all (the ruleset drops it), so there is
            // nothing for an IPv6 entry to do: say so rather than ignore it.
            if addr.contains(':') {
                bad("VMs have no IPv6 egress; use IPv4 networks".into())
            } else {
                bad("use an IPv4 network such as 10.0.0.0/8".into())
            }
        })?;
        let prefix = match prefix {
            None => 32,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| bad("the prefix length must be 0 to 32".into()))?,
        };
        Ipv4Net::new(addr, prefix).ok_or_else(|| {
            // nft would quietly mask the host bits away; a typo there more
            // likely means a different network than the one blocked.
            let net = Ipv4Addr::from(u32::from(addr) & Ipv4Net { addr, prefix }.mask());
            bad(format!("host bits are set: did you mean {net}/{prefix}?"))
        })
    }
}

/// Networks whose forwarded traffic from VMs is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressBlockList {
    nets: Vec<Ipv4Net>,
}

impl Default for EgressBlockList {
    /// [`DEFAULT_EGRESS_BLOCK`].
    fn default() -> Self {
        // The defaults are constants checked by a unit test; skipping a bad
        // one (impossible) beats panicking in a daemon.
        EgressBlockList {
            nets: DEFAULT_EGRESS_BLOCK
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        }
    }
}

impl EgressBlockList {
    /// Parses every entry; the first bad one is an error naming it. An empty
    /// list is allowed and blocks nothing beyond the host and other VMs.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<EgressBlockList, NetError> {
        let nets = entries
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()?;
        Ok(EgressBlockList { nets })
    }

    /// The networks as configured, in order.
    pub fn nets(&self) -> &[Ipv4Net] {
        &self.nets
    }

    /// Whether forwarded traffic to `ip` is dropped.
    pub fn blocks(&self, ip: Ipv4Addr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The list with duplicates and networks inside others removed, in
    /// address order. nft refuses overlapping intervals in a set in some
    /// versions, and 100.100.100.200 sits inside 100.64.0.0/10 by default.
    pub(crate) fn minimal(&self) -> Vec<Ipv4Net> {
        let mut nets = self.nets.clone();
        // Wider networks first at each address, so a covering one is kept.
        nets.sort_by_key(|n| (u32::from(n.addr), n.prefix));
        let mut out: Vec<Ipv4Net> = Vec::with_capacity(nets.len());
        for n in nets {
            if !out.iter().any(|kept| kept.covers(&n)) {
                out.push(n);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        match s.parse() {
            Ok(n) => n,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn defaults_all_parse_and_cover_the_metadata_endpoints() {
        let list = EgressBlockList::default();
        assert_eq!(list.nets().len(), DEFAULT_EGRESS_BLOCK.len());
        for ip in [
            [168, 63, 129, 16],
            [100, 100, 100, 200],
            [169, 254, 0, 1],
            [169, 254, 169, 253],
            [169, 254, 255, 255],
            [100, 64, 0, 1],
            [100, 127, 255, 254],
            [192, 0, 0, 1],
            [192, 0, 0, 255],
            [198, 18, 0, 1],
            [198, 19, 255, 254],
            [10, 1, 2, 3],
            [127, 0, 0, 1],
        ] {
            assert!(list.blocks(Ipv4Addr::from(ip)), "{ip:?} must be blocked");
        }
        for ip in [
            [1, 1, 1, 1],
            [8, 8, 8, 8],
            [168, 63, 129, 17],
            [100, 128, 0, 1],
            [192, 0, 1, 1],
            [198, 20, 0, 1],
            [203, 0, 113, 10],
        ] {
            assert!(!list.blocks(Ipv4Addr::from(ip)), "{ip:?} must pass");
        }
    }

    #[test]
    fn parsing_names_the_bad_value() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("168.63.129.16").to_string(), "168.63.129.16/32");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for (bad, why) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("10.0.0.0/33", "0 to 32"),
            ("10.0.0.0/", "0 to 32"),
            ("10.0.0/8", "IPv4 network"),
            ("metadata", "IPv4 network"),
            ("", "IPv4 network"),
            ("fd00::/8", "no IPv6"),
        ] {
            let err = match EgressBlockList::parse(&["1.2.3.4/32", bad]) {
                Ok(l) => panic!("{bad:?} parsed as {l:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert_eq!(
            EgressBlockList::parse::<&str>(&[])
                .map(|l| l.nets().len())
                .ok(),
            Some(0)
        );
    }

    #[test]
    fn minimal_drops_covered_networks() {
        let list = EgressBlockList::parse(&[
            "100.100.100.200",
            "100.64.0.0/10",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.0.0.0/8",
            "9.0.0.0/8",
        ])
        .map(|l| l.minimal());
        let shown = list.map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>());
        assert_eq!(
            shown.ok(),
            Some(vec![
                "9.0.0.0/8".to_owned(),
                "10.0.0.0/8".to_owned(),
                "100.64.0.0/10".to_owned()
            ])
        );
        assert!(!net("10.0.0.0/8").covers(&net("0.0.0.0/0")));
        assert!(net("0.0.0.0/0").covers(&net("10.0.0.0/8")));
    }
}
