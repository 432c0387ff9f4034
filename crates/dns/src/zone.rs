use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::DnsError;
use crate::wire::{
    self, CLASS_ANY, CLASS_IN, EDNS_UDP_PAYLOAD, EXT_RCODE_BADVERS, Labels, ParseError, Query,
    RCODE_FORMERR, RCODE_NOERROR, RCODE_NOTIMP, RCODE_NXDOMAIN, RCODE_REFUSED, Record, Response,
    TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_AXFR, TYPE_HINFO, TYPE_IXFR, TYPE_NS, TYPE_SOA, TYPE_TXT,
};

/// The label under the apex that holds DNS-01 challenge values. It serves
/// both `DOMAIN` and `*.DOMAIN`, which is why it holds several values.
pub const ACME_CHALLENGE_LABEL: &str = "_acme-challenge";

/// What the zone is built from; see [`Zone::new`].
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The zone apex, e.g. `nook.example.test` (a trailing dot is fine).
    pub domain: String,
    /// Public IPv4 address of this host: the apex and every `VM.DOMAIN`.
    pub ipv4: Option<Ipv4Addr>,
    /// Public IPv6 address of this host, if it has one.
    pub ipv6: Option<Ipv6Addr>,
    /// Names of the zone's name servers as delegated by the parent zone.
    /// Empty means `ns.DOMAIN`, which the wildcard already resolves to this
    /// host, so it needs no glue beyond what the parent has.
    pub nameservers: Vec<String>,
    /// TTL of A, AAAA, NS and SOA records.
    pub ttl: u32,
}

impl ZoneConfig {
    /// A zone with the usual defaults: `ns.DOMAIN`, TTL 300 s.
    pub fn new(domain: impl Into<String>, ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> Self {
        Self {
            domain: domain.into(),
            ipv4,
            ipv6,
            nameservers: Vec::new(),
            ttl: 300,
        }
    }
}

/// Challenge values change within seconds; a short TTL keeps a resolver
/// from holding on to an old one across a retry.
const TXT_TTL: u32 = 10;
/// SOA MINIMUM, i.e. how long a resolver caches "no such name". Short,
/// because new VM names and challenge records appear at runtime.
const NEGATIVE_TTL: u32 = 30;
/// HINFO rdata for ANY queries (RFC 8482 4.2): CPU "RFC8482", OS empty.
const RFC8482_HINFO: &[u8] = b"\x07RFC8482\x00";
/// A TXT string is at most 255 bytes; a challenge value is 43.
const MAX_TXT_LEN: usize = 255;
/// More than this many pending challenge values is a bug in the caller, and
/// the cap keeps a response within a UDP datagram.
const MAX_TXT_VALUES: usize = 16;

/// Addresses a name resolves to when it is pinned to a particular host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Addrs {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

impl Addrs {
    fn from_ips(ips: &[IpAddr]) -> Self {
        let mut addrs = Addrs::default();
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => addrs.v4.push(*v4),
                IpAddr::V6(v6) => addrs.v6.push(*v6),
            }
        }
        addrs
    }
}

struct ZoneData {
    apex: Labels,
    nameservers: Vec<Labels>,
    default: Addrs,
    ttl: u32,
    serial: u32,
    /// Per-name overrides of the wildcard, keyed by the lowercased label.
    hosts: BTreeMap<Vec<u8>, Addrs>,
    challenges: BTreeSet<String>,
    /// Values other hosts of a fleet published (their own orders' challenges): a CA may ask
    /// any host's server, so each answers all of them.
    shared_challenges: BTreeSet<String>,
}

/// The zone's records, shared between the DNS server tasks and whoever
/// changes them at runtime (the daemon, the ACME client). Cloning is cheap
/// and every clone sees the same records.
#[derive(Clone)]
pub struct Zone {
    inner: Arc<RwLock<ZoneData>>,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("domain", &self.domain())
            .finish()
    }
}

impl Zone {
    pub fn new(config: ZoneConfig) -> Result<Zone, DnsError> {
        let apex = wire::parse_text_name(&config.domain)
            .filter(|l| !l.is_empty() && l.iter().all(|l| !l.contains(&b'*')))
            .ok_or_else(|| DnsError::InvalidName(config.domain.clone()))?;
        let nameservers = if config.nameservers.is_empty() {
            let mut ns = vec![b"ns".to_vec()];
            ns.extend(apex.iter().cloned());
            vec![ns]
        } else {
            config
                .nameservers
                .iter()
                .map(|n| {
                    wire::parse_text_name(n)
                        .filter(|l| !l.is_empty())
                        .ok_or_else(|| DnsError::InvalidName(n.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        // Unix time as the initial serial makes a restarted server's serial
        // larger than the one it had before, as secondaries expect.
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(Zone {
            inner: Arc::new(RwLock::new(ZoneData {
                apex,
                nameservers,
                default: Addrs {
                    v4: config.ipv4.into_iter().collect(),
                    v6: config.ipv6.into_iter().collect(),
                },
                ttl: config.ttl,
                serial,
                hosts: BTreeMap::new(),
                challenges: BTreeSet::new(),
                shared_challenges: BTreeSet::new(),
            })),
        })
    }

    // A panic while holding the lock can only come from a bug in this
    // module, and every write leaves the data consistent, so a poisoned
    // lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, ZoneData> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, ZoneData> {
        let mut data = self.inner.write().unwrap_or_else(|e| e.into_inner());
        data.serial = data.serial.wrapping_add(1);
        data
    }

    /// The apex, lowercased, without a trailing dot.
    pub fn domain(&self) -> String {
        labels_to_string(&self.read().apex)
    }

    /// The SOA serial; it goes up with every change.
    pub fn serial(&self) -> u32 {
        self.read().serial
    }

    /// Changes the addresses of the apex and of every name without an
    /// override (e.g. after the host's public address changed).
    pub fn set_default_addrs(&self, ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) {
        self.write().default = Addrs {
            v4: ipv4.into_iter().collect(),
            v6: ipv6.into_iter().collect(),
        };
    }

    /// Points `name.DOMAIN` at `ips` instead of this host (a VM living on
    /// another host of a fleet). `name` is one label; a name with no IPv6
    /// address in `ips` has no AAAA record, rather than this host's one.
    pub fn set_host(&self, name: &str, ips: &[IpAddr]) -> Result<(), DnsError> {
        let label = single_label(name)?;
        self.write().hosts.insert(label, Addrs::from_ips(ips));
        Ok(())
    }

    /// Undoes [`Zone::set_host`]: the name falls back to the wildcard.
    pub fn remove_host(&self, name: &str) -> Result<(), DnsError> {
        let label = single_label(name)?;
        self.write().hosts.remove(&label);
        Ok(())
    }

    /// Publishes a TXT value at `_acme-challenge.DOMAIN`. Several values
    /// can be live at once (apex and wildcard authorizations share the name).
    pub fn add_acme_challenge(&self, value: &str) -> Result<(), DnsError> {
        if value.is_empty() || value.len() > MAX_TXT_LEN {
            return Err(DnsError::InvalidTxt(value.len()));
        }
        let mut data = self.write();
        if data.challenges.len() >= MAX_TXT_VALUES && !data.challenges.contains(value) {
            return Err(DnsError::TooManyChallenges(MAX_TXT_VALUES));
        }
        data.challenges.insert(value.to_owned());
        Ok(())
    }

    /// Removes one TXT value; removing an absent value is not an error, so
    /// cleanup can run unconditionally.
    pub fn remove_acme_challenge(&self, value: &str) {
        self.write().challenges.remove(value);
    }

    /// The TXT values currently published by this host's own orders.
    pub fn acme_challenges(&self) -> Vec<String> {
        self.read().challenges.iter().cloned().collect()
    }

    /// Replaces the TXT values other hosts of a fleet publish at `_acme-challenge.DOMAIN`
    /// (answered beside this host's own). Values that could not be TXT strings are skipped,
    /// and at most [`MAX_TXT_VALUES`] are kept.
    pub fn set_shared_acme_challenges(&self, values: &[String]) {
        let shared: BTreeSet<String> = values
            .iter()
            .filter(|v| !v.is_empty() && v.len() <= MAX_TXT_LEN)
            .take(MAX_TXT_VALUES)
            .cloned()
            .collect();
        if self.read().shared_challenges != shared {
            self.write().shared_challenges = shared;
        }
    }

    /// Answers one DNS message. Over UDP the response is cut to the client's
    /// EDNS size (512 without EDNS, at most 1232) by setting TC. Returns
    /// `None` for messages that deserve no answer at all (not a query, or
    /// too short to have an ID).
    pub fn respond(&self, msg: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.respond_within(msg, transport, false)
    }

    /// The reply to `msg` with every record left out and TC set: what a
    /// rate-limited client gets now and then, to move it to TCP.
    pub(crate) fn respond_truncated(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.respond_within(msg, Transport::Udp, true)
    }

    fn respond_within(&self, msg: &[u8], transport: Transport, truncate: bool) -> Option<Vec<u8>> {
        let query = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(ParseError::TooShort | ParseError::NotAQuery) => return None,
            Err(ParseError::Malformed) => {
                let (id, opcode, rd) = wire::header_id_and_flags(msg).ok()?;
                let resp = Response {
                    id,
                    opcode,
                    rcode: RCODE_FORMERR,
                    authoritative: false,
                    recursion_desired: rd,
                    checking_disabled: false,
                    question: None,
                    answers: Vec::new(),
                    authority: Vec::new(),
                    additional: Vec::new(),
                    edns: None,
                };
                return Some(resp.encode(512));
            }
        };
        let limit = match transport {
            // Nothing fits in 0 bytes, so `encode` writes the truncated form.
            _ if truncate => 0,
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => match query.edns {
                Some(e) => usize::from(e.udp_payload.clamp(512, EDNS_UDP_PAYLOAD)),
                None => 512,
            },
        };
        Some(self.answer(query).encode(limit))
    }

    fn answer(&self, query: Query) -> Response {
        let mut resp = Response {
            id: query.id,
            opcode: query.opcode,
            rcode: RCODE_NOERROR,
            authoritative: false,
            recursion_desired: query.recursion_desired,
            checking_disabled: query.checking_disabled,
            question: query.question.clone(),
            answers: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            edns: query.edns.map(|e| (0, e.dnssec_ok)),
        };
        if let Some(edns) = query.edns
            && edns.version != 0
        {
            resp.edns = Some((EXT_RCODE_BADVERS, edns.dnssec_ok));
            return resp;
        }
        if query.opcode != 0 {
            resp.rcode = RCODE_NOTIMP;
            return resp;
        }
        let Some(q) = query.question else {
            resp.rcode = RCODE_FORMERR;
            return resp;
        };
        let data = self.read();
        let Some(relative) = strip_apex(&q.labels, &data.apex) else {
            resp.rcode = RCODE_REFUSED;
            return resp;
        };
        // Zone transfers are refused rather than answered as NODATA: there
        // are no secondaries, and the VM list is not for the public.
        if q.qclass != CLASS_IN && q.qclass != CLASS_ANY
            || q.qtype == TYPE_AXFR
            || q.qtype == TYPE_IXFR
        {
            resp.rcode = RCODE_REFUSED;
            return resp;
        }
        resp.authoritative = true;
        // Answers are owned by the name the client asked for; a pointer to
        // the question keeps its case and saves bytes.
        let owner = vec![0xc0, 0x0c];
        let exists = matches!(relative, [] | [_]);
        // ANY gets one small synthesized HINFO record instead of every
        // RRset at the name (RFC 8482 4.2), over UDP and TCP alike: a
        // reflection attack gains nothing from it, and no client needs more.
        if q.qtype == TYPE_ANY && exists {
            resp.answers.push(Record {
                name: owner,
                rtype: TYPE_HINFO,
                ttl: data.ttl,
                rdata: RFC8482_HINFO.to_vec(),
            });
            return resp;
        }
        match relative {
            [] => {
                if q.qtype == TYPE_SOA {
                    resp.answers.push(data.soa(owner.clone()));
                }
                if q.qtype == TYPE_NS {
                    for ns in &data.nameservers {
                        resp.answers.push(Record {
                            name: owner.clone(),
                            rtype: TYPE_NS,
                            ttl: data.ttl,
                            rdata: wire::encode_name(ns),
                        });
                    }
                    data.glue(&mut resp.additional);
                }
                data.push_addrs(&data.default, &owner, q.qtype, &mut resp.answers);
            }
            [label] if label == ACME_CHALLENGE_LABEL.as_bytes() => {
                if q.qtype == TYPE_TXT {
                    for value in data.challenges.union(&data.shared_challenges) {
                        let mut rdata = Vec::with_capacity(value.len() + 1);
                        rdata.push(value.len() as u8);
                        rdata.extend_from_slice(value.as_bytes());
                        resp.answers.push(Record {
                            name: owner.clone(),
                            rtype: TYPE_TXT,
                            ttl: TXT_TTL,
                            rdata,
                        });
                    }
                }
            }
            // The wildcard `*.DOMAIN` covers exactly one label: a VM name.
            [label] => {
                let addrs = data.hosts.get(label).unwrap_or(&data.default);
                data.push_addrs(addrs, &owner, q.qtype, &mut resp.answers);
            }
            _ => resp.rcode = RCODE_NXDOMAIN,
        }
        // NXDOMAIN and NODATA both carry the SOA so resolvers know how long
        // to cache the negative answer (RFC 2308).
        if resp.answers.is_empty() {
            resp.authority.push(data.soa(wire::encode_name(&data.apex)));
        }
        resp
    }
}

impl ZoneData {
    fn soa(&self, owner: Vec<u8>) -> Record {
        let mut rdata = wire::encode_name(&self.nameservers[0]);
        let mut rname = vec![b"hostmaster".to_vec()];
        rname.extend(self.apex.iter().cloned());
        rdata.extend_from_slice(&wire::encode_name(&rname));
        for v in [self.serial, 3600, 600, 86400, NEGATIVE_TTL] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        Record {
            name: owner,
            rtype: TYPE_SOA,
            ttl: self.ttl,
            rdata,
        }
    }

    fn push_addrs(&self, addrs: &Addrs, owner: &[u8], qtype: u16, out: &mut Vec<Record>) {
        if qtype == TYPE_A {
            out.extend(addrs.v4.iter().map(|ip| Record {
                name: owner.to_vec(),
                rtype: TYPE_A,
                ttl: self.ttl,
                rdata: ip.octets().to_vec(),
            }));
        }
        if qtype == TYPE_AAAA {
            out.extend(addrs.v6.iter().map(|ip| Record {
                name: owner.to_vec(),
                rtype: TYPE_AAAA,
                ttl: self.ttl,
                rdata: ip.octets().to_vec(),
            }));
        }
    }

    /// Addresses of in-zone name servers, so a resolver needs no second query.
    fn glue(&self, out: &mut Vec<Record>) {
        for ns in &self.nameservers {
            let Some(relative) = strip_apex(ns, &self.apex) else {
                continue;
            };
            let addrs = match relative {
                [] => &self.default,
                [label] => self.hosts.get(label).unwrap_or(&self.default),
                _ => continue,
            };
            let owner = wire::encode_name(ns);
            self.push_addrs(addrs, &owner, TYPE_A, out);
            self.push_addrs(addrs, &owner, TYPE_AAAA, out);
        }
    }
}

/// Which transport a message came over; decides the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The labels of `name` below `apex`, or `None` when `name` is outside.
/// Zones served from one socket, such as the dashboard's domain and the VMs' own: each query
/// is answered by the zone its name lies in (by the first, which refuses it, when none).
#[derive(Debug, Clone)]
pub struct Zones(Vec<Zone>);

impl Zones {
    /// Fails when `zones` is empty.
    pub fn new(zones: Vec<Zone>) -> Result<Zones, DnsError> {
        if zones.is_empty() {
            return Err(DnsError::InvalidName("(no zone)".into()));
        }
        Ok(Zones(zones))
    }

    /// The zone whose apex is `domain`.
    pub fn get(&self, domain: &str) -> Option<&Zone> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().find(|z| z.domain() == domain)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Zone> {
        self.0.iter()
    }

    /// [`Zone::respond`] of the zone the question's name lies in.
    pub fn respond(&self, msg: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.pick(msg).respond(msg, transport)
    }

    pub(crate) fn respond_truncated(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.pick(msg).respond_truncated(msg)
    }

    fn pick(&self, msg: &[u8]) -> &Zone {
        if self.0.len() > 1
            && let Ok(query) = wire::parse_query(msg)
            && let Some(q) = query.question
            && let Some(zone) = self
                .0
                .iter()
                .find(|z| strip_apex(&q.labels, &z.read().apex).is_some())
        {
            return zone;
        }
        &self.0[0]
    }
}

impl From<Zone> for Zones {
    fn from(zone: Zone) -> Zones {
        Zones(vec![zone])
    }
}

impl From<&Zone> for Zones {
    fn from(zone: &Zone) -> Zones {
        Zones(vec![zone.clone()])
    }
}

impl From<&Zones> for Zones {
    fn from(zones: &Zones) -> Zones {
        zones.clone()
    }
}

fn strip_apex<'a>(name: &'a [Vec<u8>], apex: &[Vec<u8>]) -> Option<&'a [Vec<u8>]> {
    let split = name.len().checked_sub(apex.len())?;
    (name[split..] == *apex).then_some(&name[..split])
}

fn single_label(name: &str) -> Result<Vec<u8>, DnsError> {
    match wire::parse_text_name(name) {
        Some(mut labels)
            if labels.len() == 1
                && labels[0] != ACME_CHALLENGE_LABEL.as_bytes()
                && labels[0] != b"*" =>
        {
            Ok(labels.remove(0))
        }
        _ => Err(DnsError::InvalidName(name.to_owned())),
    }
}

fn labels_to_string(labels: &[Vec<u8>]) -> String {
    labels
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn zone() -> Zone {
        Zone::new(ZoneConfig::new(
            "Nook.Example.Test.",
            Some(Ipv4Addr::new(192, 0, 2, 1)),
            None,
        ))
        .unwrap()
    }

    fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        q.extend(wire::encode_name(&wire::parse_text_name(name).unwrap()));
        q.extend(qtype.to_be_bytes());
        q.extend(CLASS_IN.to_be_bytes());
        if edns {
            q.extend([0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        q
    }

    fn rcode(resp: &[u8]) -> u8 {
        resp[3] & 0xf
    }

    fn ancount(resp: &[u8]) -> u16 {
        u16::from_be_bytes([resp[6], resp[7]])
    }

    #[test]
    fn domain_is_normalised() {
        assert_eq!(zone().domain(), "nook.example.test");
        assert!(Zone::new(ZoneConfig::new("", None, None)).is_err());
        assert!(Zone::new(ZoneConfig::new("*.x.test", None, None)).is_err());
    }

    #[test]
    fn answers() {
        let z = zone();
        let r = z
            .respond(
                &query("vm.nook.example.test", TYPE_A, false),
                Transport::Udp,
            )
            .unwrap();
        assert_eq!((rcode(&r), ancount(&r)), (RCODE_NOERROR, 1));
        assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 1]);
        assert_ne!(r[2] & 0x04, 0, "AA");
        let r = z
            .respond(
                &query("a.vm.nook.example.test", TYPE_A, false),
                Transport::Udp,
            )
            .unwrap();
        assert_eq!((rcode(&r), ancount(&r)), (RCODE_NXDOMAIN, 0));
        let r = z
            .respond(&query("example.test", TYPE_A, false), Transport::Udp)
            .unwrap();
        assert_eq!(rcode(&r), RCODE_REFUSED);
        assert_eq!(r[2] & 0x04, 0, "no AA outside the zone");
        // No IPv6 configured: NODATA for AAAA.
        let r = z
            .respond(&query("nook.example.test", TYPE_AAAA, true), Transport::Udp)
            .unwrap();
        assert_eq!((rcode(&r), ancount(&r)), (RCODE_NOERROR, 0));
    }

    #[test]
    fn serial_increases_on_change() {
        let z = zone();
        let s = z.serial();
        z.add_acme_challenge("abc").unwrap();
        assert!(z.serial() > s);
        assert!(z.add_acme_challenge("").is_err());
        assert!(z.add_acme_challenge(&"x".repeat(256)).is_err());
    }

    #[test]
    fn other_hosts_challenges_are_answered_beside_this_ones() {
        let z = zone();
        let txt = || {
            let r = z
                .respond(
                    &query("_acme-challenge.nook.example.test", TYPE_TXT, false),
                    Transport::Udp,
                )
                .unwrap();
            ancount(&r)
        };
        z.add_acme_challenge("mine").unwrap();
        z.set_shared_acme_challenges(&["theirs".into(), "mine".into(), String::new()]);
        assert_eq!(
            txt(),
            2,
            "one answer per distinct value, the empty one skipped"
        );
        assert_eq!(
            z.acme_challenges(),
            ["mine"],
            "shared values are not this host's own"
        );
        let many: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
        z.set_shared_acme_challenges(&many);
        assert_eq!(txt(), 1 + MAX_TXT_VALUES as u16);
        z.set_shared_acme_challenges(&[]);
        z.remove_acme_challenge("mine");
        assert_eq!(txt(), 0);
    }

    #[test]
    fn queries_that_get_no_answer() {
        let z = zone();
        assert!(z.respond(&[1, 2, 3], Transport::Udp).is_none());
        let mut q = query("nook.example.test", TYPE_A, false);
        q[2] |= 0x80; // a response
        assert!(z.respond(&q, Transport::Udp).is_none());
        let mut q = query("nook.example.test", TYPE_A, false);
        q.truncate(q.len() - 3);
        let r = z.respond(&q, Transport::Udp).unwrap();
        assert_eq!(rcode(&r), RCODE_FORMERR);
    }

    #[test]
    fn compressed_question_is_written_out() {
        // The question name is a pointer to byte 11 of the header, a zero:
        // the root name. The reply must not copy a pointer into its own header.
        let q = [
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 11, 0, 1, 0, 1,
        ];
        let r = zone().respond(&q, Transport::Udp).unwrap();
        assert_eq!(rcode(&r), RCODE_REFUSED);
        assert_eq!(&r[12..17], &[0, 0, 1, 0, 1]);
    }

    /// Random bytes, and valid queries with random bytes changed, must never
    /// panic and must yield either nothing or a well-formed header.
    #[test]
    fn fuzz_respond() {
        let z = zone();
        z.add_acme_challenge("value-one").unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6f6f6b);
        let seeds = [
            query("vm.nook.example.test", TYPE_A, true),
            query("_acme-challenge.nook.example.test", TYPE_TXT, false),
            query("nook.example.test", TYPE_NS, true),
            query("nook.example.test", TYPE_ANY, false),
        ];
        for i in 0..200_000 {
            let msg: Vec<u8> = if i % 4 == 0 {
                let len = rng.random_range(0..300);
                (0..len).map(|_| rng.random()).collect()
            } else {
                let mut m = seeds[i % seeds.len()].clone();
                for _ in 0..rng.random_range(1..6) {
                    let pos = rng.random_range(0..m.len());
                    m[pos] = rng.random();
                }
                if rng.random_bool(0.1) {
                    m.truncate(rng.random_range(0..m.len()));
                }
                m
            };
            let transport = if i % 2 == 0 {
                Transport::Udp
            } else {
                Transport::Tcp
            };
            if let Some(r) = z.respond(&msg, transport) {
                assert!(r.len() >= wire::HEADER_LEN);
                assert_eq!(r[..2], msg[..2], "reply carries the query ID");
                assert_ne!(r[2] & 0x80, 0, "QR set");
                if transport == Transport::Udp {
                    assert!(r.len() <= usize::from(EDNS_UDP_PAYLOAD));
                }
            }
        }
    }
}
