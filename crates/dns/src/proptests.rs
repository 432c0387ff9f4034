//! Property tests of the wire format: parsing untrusted bytes never panics,
//! what the encoder writes parses back to what went in, and every reply the
//! zone gives is itself a well-formed message.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::wire::{
    self, CLASS_IN, EDNS_UDP_PAYLOAD, HEADER_LEN, Labels, Question, Record, Response, TYPE_A,
    TYPE_AAAA, TYPE_ANY, TYPE_NS, TYPE_OPT, TYPE_SOA, TYPE_TXT,
};
use crate::{Transport, Zone, ZoneConfig};

/// A query as a client could send it; [`QuerySpec::encode`] writes it.
#[derive(Debug, Clone)]
struct QuerySpec {
    id: u16,
    opcode: u8,
    rd: bool,
    cd: bool,
    labels: Labels,
    qtype: u16,
    qclass: u16,
    /// Records before the additional section, which a query rarely has
    /// but the parser must skip: (type, rdata).
    extra: Vec<(u16, Vec<u8>)>,
    /// (UDP payload, version, DO)
    edns: Option<(u16, u8, bool)>,
}

impl QuerySpec {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.id.to_be_bytes().to_vec();
        let mut flags = u16::from(self.opcode & 0xf) << 11;
        if self.rd {
            flags |= 0x0100;
        }
        if self.cd {
            flags |= 0x0010;
        }
        out.extend(flags.to_be_bytes());
        let an = self.extra.len() as u16;
        for count in [1, an, 0, u16::from(self.edns.is_some())] {
            out.extend(count.to_be_bytes());
        }
        out.extend(wire::encode_name(&self.labels));
        out.extend(self.qtype.to_be_bytes());
        out.extend(self.qclass.to_be_bytes());
        for (rtype, rdata) in &self.extra {
            // Owned by the question's name, compressed.
            out.extend([0xc0, 0x0c]);
            out.extend(rtype.to_be_bytes());
            out.extend(CLASS_IN.to_be_bytes());
            out.extend(60u32.to_be_bytes());
            out.extend((rdata.len() as u16).to_be_bytes());
            out.extend(rdata);
        }
        if let Some((payload, version, dnssec_ok)) = self.edns {
            out.push(0);
            out.extend(TYPE_OPT.to_be_bytes());
            out.extend(payload.to_be_bytes());
            let ttl = (u32::from(version) << 16) | if dnssec_ok { 0x8000 } else { 0 };
            out.extend(ttl.to_be_bytes());
            out.extend(0u16.to_be_bytes());
        }
        out
    }
}

/// Labels of any bytes (the wire allows them), 1 to 63 each, cut to fit
/// the 255-byte limit on a whole name.
fn labels() -> impl Strategy<Value = Labels> {
    vec(vec(any::<u8>(), 1..=63), 0..8).prop_map(|mut labels| {
        while labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1 > 255 {
            labels.pop();
        }
        labels
    })
}

fn query_spec() -> impl Strategy<Value = QuerySpec> {
    (
        (any::<u16>(), 0u8..16, any::<bool>(), any::<bool>()),
        labels(),
        (any::<u16>(), any::<u16>()),
        vec((any::<u16>(), vec(any::<u8>(), 0..40)), 0..3),
        proptest::option::of((any::<u16>(), any::<u8>(), any::<bool>())),
    )
        .prop_map(
            |((id, opcode, rd, cd), labels, (qtype, qclass), extra, edns)| QuerySpec {
                id,
                opcode,
                rd,
                cd,
                labels,
                qtype,
                qclass,
                // An OPT among the answers would be a second EDNS record.
                extra: extra.into_iter().filter(|(t, _)| *t != TYPE_OPT).collect(),
                edns,
            },
        )
}

/// Untrusted input: random bytes, random bytes behind a header that
/// claims one question (which pure noise almost never does), and real
/// queries with a few bytes changed and perhaps cut short.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let noise = vec(any::<u8>(), 0..600);
    let one_question = vec(any::<u8>(), 12..300).prop_map(|mut b| {
        b[4..6].copy_from_slice(&[0, 1]);
        b[2] &= 0x7f;
        b
    });
    let mangled = (
        query_spec(),
        vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        proptest::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(spec, changes, cut)| {
            let mut b = spec.encode();
            for (at, byte) in changes {
                let i = at.index(b.len());
                b[i] = byte;
            }
            if let Some(cut) = cut {
                b.truncate(cut.index(b.len()));
            }
            b
        });
    prop_oneof![noise, one_question, mangled]
}

/// Names inside, at and around the test zone, in any case.
fn zone_name() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9-]{1,20}\\.",
        Just("_acme-challenge.".to_owned()),
        "[a-z]{1,5}\\.[a-z]{1,5}\\.",
    ];
    let apex = prop_oneof![
        Just("nook.example.test"),
        Just("NOOK.Example.TEST"),
        Just("example.test"),
        Just("other.test"),
    ];
    (host, apex).prop_map(|(h, a)| format!("{h}{a}"))
}

fn zone() -> Zone {
    let zone = Zone::new(ZoneConfig::new(
        "nook.example.test",
        Some([192, 0, 2, 1].into()),
        Some("2001:db8::1".parse().unwrap()),
    ))
    .unwrap();
    zone.add_acme_challenge("challenge-value").unwrap();
    zone
}

/// The reply with QR cleared, through the query parser: it walks the
/// header, the question and every record, so it fails on any defect. Returns
/// the header counts too.
fn reparse(reply: &[u8]) -> (wire::Query, [u16; 4]) {
    let mut copy = reply.to_vec();
    copy[2] &= 0x7f;
    let counts = [4, 6, 8, 10].map(|i| u16::from_be_bytes([copy[i], copy[i + 1]]));
    match wire::parse_query(&copy) {
        Ok(q) => (q, counts),
        Err(e) => panic!("reply does not parse ({e:?}): {reply:02x?}"),
    }
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in hostile_bytes()) {
        let _ = wire::parse_query(&bytes);
        let _ = wire::header_id_and_flags(&bytes);
        for pos in 0..bytes.len().min(64) {
            if let Ok((labels, end)) = wire::read_name(&bytes, pos) {
                prop_assert!(end > pos && end <= bytes.len());
                prop_assert!(labels.iter().map(|l| l.len() + 1).sum::<usize>() < 255);
            }
        }
    }

    #[test]
    fn queries_round_trip(spec in query_spec()) {
        let msg = spec.encode();
        let q = wire::parse_query(&msg).unwrap();
        prop_assert_eq!(q.id, spec.id);
        prop_assert_eq!(q.opcode, spec.opcode);
        prop_assert_eq!(q.recursion_desired, spec.rd);
        prop_assert_eq!(q.checking_disabled, spec.cd);
        let question = q.question.unwrap();
        let lower: Labels = spec.labels.iter().map(|l| l.to_ascii_lowercase()).collect();
        prop_assert_eq!(question.labels, lower);
        // The name goes back out exactly as it came, case and all.
        prop_assert_eq!(question.raw_name, wire::encode_name(&spec.labels));
        prop_assert_eq!((question.qtype, question.qclass), (spec.qtype, spec.qclass));
        let edns = q.edns.map(|e| (e.udp_payload, e.version, e.dnssec_ok));
        prop_assert_eq!(edns, spec.edns);
        // Any strict prefix is missing something, and says so.
        for cut in [msg.len() - 1, msg.len() / 2, HEADER_LEN + 1] {
            if cut < msg.len() && cut > HEADER_LEN {
                prop_assert!(wire::parse_query(&msg[..cut]).is_err(), "cut at {}", cut);
            }
        }
    }

    #[test]
    fn responses_round_trip(
        (id, opcode, rcode, rd, cd) in (any::<u16>(), 0u8..16, 0u8..16, any::<bool>(), any::<bool>()),
        labels in labels(),
        qtype in any::<u16>(),
        records in vec((any::<u16>(), any::<u32>(), vec(any::<u8>(), 0..300)), 0..6),
        split in (0usize..6, 0usize..6),
        edns in proptest::option::of((any::<u8>(), any::<bool>())),
        limit in prop_oneof![Just(usize::from(u16::MAX)), 0usize..2000],
    ) {
        let record = |(rtype, ttl, rdata): (u16, u32, Vec<u8>)| Record {
            // Records point at the question name, as the zone writes them.
            name: vec![0xc0, 0x0c],
            // An OPT record among them would be a second EDNS record.
            rtype: if rtype == TYPE_OPT { TYPE_A } else { rtype },
            ttl,
            rdata,
        };
        let mut records: Vec<Record> = records.into_iter().map(record).collect();
        let additional = records.split_off(split.1.min(records.len()));
        let authority = records.split_off(split.0.min(records.len()));
        let raw_name = wire::encode_name(&labels);
        let resp = Response {
            id,
            opcode,
            rcode,
            authoritative: true,
            recursion_desired: rd,
            checking_disabled: cd,
            question: Some(Question { raw_name: raw_name.clone(), labels: labels.clone(), qtype, qclass: CLASS_IN }),
            answers: records,
            authority,
            additional,
            edns,
        };
        let bytes = resp.encode(limit);
        let truncated = bytes[2] & 0x02 != 0;
        // Cut exactly when the whole would not fit.
        let whole = resp.encode(usize::from(u16::MAX)).len();
        prop_assert_eq!(truncated, whole > limit);
        prop_assert_eq!(&bytes[..2], &id.to_be_bytes()[..]);
        prop_assert_ne!(bytes[2] & 0x80, 0, "QR");
        prop_assert_eq!(bytes[3] & 0xf, rcode & 0xf);
        let (q, [qd, an, ns, ar]) = reparse(&bytes);
        prop_assert_eq!(q.opcode, opcode);
        prop_assert_eq!((q.recursion_desired, q.checking_disabled), (rd, cd));
        prop_assert_eq!(qd, 1);
        let question = q.question.unwrap();
        prop_assert_eq!(question.raw_name, raw_name);
        prop_assert_eq!(question.qtype, qtype);
        let sent = [resp.answers.len(), resp.authority.len(), resp.additional.len()];
        if truncated {
            prop_assert_eq!((an, ns, ar), (0, 0, u16::from(edns.is_some())));
        } else {
            prop_assert_eq!(
                [usize::from(an), usize::from(ns), usize::from(ar)],
                [sent[0], sent[1], sent[2] + usize::from(edns.is_some())]
            );
        }
        let got = q.edns.map(|e| (e.udp_payload, e.dnssec_ok));
        prop_assert_eq!(got, edns.map(|(_, dnssec_ok)| (EDNS_UDP_PAYLOAD, dnssec_ok)));
    }

    /// Whatever comes in, a reply is a well-formed message for the asker.
    #[test]
    fn zone_replies_to_arbitrary_bytes_are_well_formed(
        bytes in hostile_bytes(),
        tcp in any::<bool>(),
    ) {
        check_reply(&zone(), &bytes, tcp)?;
    }

    /// The same for real queries at and around the zone, where the answers
    /// have records in them.
    #[test]
    fn zone_replies_to_queries_are_well_formed(
        name in zone_name(),
        qtype in prop_oneof![
            Just(TYPE_A), Just(TYPE_AAAA), Just(TYPE_NS), Just(TYPE_SOA),
            Just(TYPE_TXT), Just(TYPE_ANY), any::<u16>()
        ],
        spec in query_spec(),
        tcp in any::<bool>(),
    ) {
        let labels = wire::parse_text_name(&name).unwrap();
        let spec = QuerySpec { labels, qtype, qclass: CLASS_IN, opcode: 0, ..spec };
        let msg = spec.encode();
        let reply = check_reply(&zone(), &msg, tcp)?.unwrap();
        // The question comes back as asked, case and all.
        let (q, _) = reparse(&reply);
        if let Some(question) = q.question {
            prop_assert_eq!(question.raw_name, wire::encode_name(&spec.labels));
        }
    }
}

fn check_reply(zone: &Zone, msg: &[u8], tcp: bool) -> Result<Option<Vec<u8>>, TestCaseError> {
    let transport = if tcp { Transport::Tcp } else { Transport::Udp };
    let Some(reply) = zone.respond(msg, transport) else {
        return Ok(None);
    };
    prop_assert!(reply.len() >= HEADER_LEN);
    prop_assert_eq!(&reply[..2], &msg[..2], "reply carries the query ID");
    prop_assert_ne!(reply[2] & 0x80, 0, "QR set");
    if !tcp {
        prop_assert!(reply.len() <= usize::from(EDNS_UDP_PAYLOAD));
    }
    reparse(&reply);
    Ok(Some(reply))
}
