//! The DNS wire format (RFC 1035, EDNS from RFC 6891), only as much as an
//! authoritative server for one small zone needs: parse a query, write a
//! response. Parsing works on untrusted bytes and reports every defect as
//! [`ParseError`]; it never indexes out of bounds.

/// A lowercased, label-by-label domain name. Comparisons are on this form,
/// which makes every lookup case-insensitive.
pub(crate) type Labels = Vec<Vec<u8>>;

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_NS: u16 = 2;
pub(crate) const TYPE_SOA: u16 = 6;
pub(crate) const TYPE_HINFO: u16 = 13;
pub(crate) const TYPE_TXT: u16 = 16;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_OPT: u16 = 41;
pub(crate) const TYPE_IXFR: u16 = 251;
pub(crate) const TYPE_AXFR: u16 = 252;
pub(crate) const TYPE_ANY: u16 = 255;
pub(crate) const CLASS_IN: u16 = 1;
pub(crate) const CLASS_ANY: u16 = 255;

pub(crate) const RCODE_NOERROR: u8 = 0;
pub(crate) const RCODE_FORMERR: u8 = 1;
pub(crate) const RCODE_NXDOMAIN: u8 = 3;
pub(crate) const RCODE_NOTIMP: u8 = 4;
pub(crate) const RCODE_REFUSED: u8 = 5;
/// BADVERS is an extended rcode (16): its upper 8 bits travel in the OPT record.
pub(crate) const EXT_RCODE_BADVERS: u8 = 1;

pub(crate) const HEADER_LEN: usize = 12;
const MAX_NAME_LEN: usize = 255;
const MAX_LABEL_LEN: usize = 63;
/// A name can't legitimately need more pointer hops than it has labels, and
/// a name has at most 127 labels; anything beyond that is a loop.
const MAX_POINTER_HOPS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Not even a header: there is no ID to answer to, so drop it.
    TooShort,
    /// A response, not a query: answering could start a loop between servers.
    NotAQuery,
    /// The header parsed, so the client gets a FORMERR with its ID.
    Malformed,
}

#[derive(Debug, Clone)]
pub(crate) struct Question {
    /// The name exactly as it came in; echoed back so that clients using
    /// 0x20 case randomisation see the case they sent.
    pub raw_name: Vec<u8>,
    pub labels: Labels,
    pub qtype: u16,
    pub qclass: u16,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Edns {
    pub udp_payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub id: u16,
    pub opcode: u8,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// Exactly one question, or `None` when the count was not one (FORMERR).
    pub question: Option<Question>,
    pub edns: Option<Edns>,
}

/// Reads just enough of a header to send a FORMERR back.
pub(crate) fn header_id_and_flags(msg: &[u8]) -> Result<(u16, u8, bool), ParseError> {
    if msg.len() < HEADER_LEN {
        return Err(ParseError::TooShort);
    }
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let opcode = ((flags >> 11) & 0xf) as u8;
    let rd = flags & 0x0100 != 0;
    Ok((u16::from_be_bytes([msg[0], msg[1]]), opcode, rd))
}

pub(crate) fn parse_query(msg: &[u8]) -> Result<Query, ParseError> {
    let (id, opcode, recursion_desired) = header_id_and_flags(msg)?;
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let nscount = u16::from_be_bytes([msg[8], msg[9]]);
    let arcount = u16::from_be_bytes([msg[10], msg[11]]);
    let mut query = Query {
        id,
        opcode,
        recursion_desired,
        checking_disabled: flags & 0x0010 != 0,
        question: None,
        edns: None,
    };
    if qdcount != 1 {
        return Ok(query);
    }
    let mut pos = HEADER_LEN;
    let (labels, end) = read_name(msg, pos)?;
    let raw = msg.get(pos..end).ok_or(ParseError::Malformed)?;
    // A compressed question name (legal, if odd) points into the query's
    // header, which the response does not share: write it out instead.
    let raw_name = if raw.len() == labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1 {
        raw.to_vec()
    } else {
        encode_name(&labels)
    };
    pos = end;
    let qtype = read_u16(msg, pos)?;
    let qclass = read_u16(msg, pos + 2)?;
    pos += 4;
    query.question = Some(Question {
        raw_name,
        labels,
        qtype,
        qclass,
    });
    // Queries normally carry no answer or authority records, but skipping
    // them properly is what finds the OPT record if a client sends some.
    for _ in 0..(ancount as usize + nscount as usize) {
        pos = skip_record(msg, pos)?.0;
    }
    for _ in 0..arcount {
        let (next, rtype, class, ttl) = skip_record(msg, pos)?;
        if rtype == TYPE_OPT {
            if query.edns.is_some() {
                return Err(ParseError::Malformed);
            }
            query.edns = Some(Edns {
                udp_payload: class,
                version: ((ttl >> 16) & 0xff) as u8,
                dnssec_ok: ttl & 0x8000 != 0,
            });
        }
        pos = next;
    }
    Ok(query)
}

fn read_u16(msg: &[u8], pos: usize) -> Result<u16, ParseError> {
    match msg.get(pos..pos + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(ParseError::Malformed),
    }
}

fn read_u32(msg: &[u8], pos: usize) -> Result<u32, ParseError> {
    match msg.get(pos..pos + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(ParseError::Malformed),
    }
}

/// Returns (position after the record, type, class, ttl).
fn skip_record(msg: &[u8], pos: usize) -> Result<(usize, u16, u16, u32), ParseError> {
    let (_, mut pos) = read_name(msg, pos)?;
    let rtype = read_u16(msg, pos)?;
    let class = read_u16(msg, pos + 2)?;
    let ttl = read_u32(msg, pos + 4)?;
    let rdlen = read_u16(msg, pos + 8)? as usize;
    pos += 10;
    if msg.len() < pos + rdlen {
        return Err(ParseError::Malformed);
    }
    Ok((pos + rdlen, rtype, class, ttl))
}

/// Reads a possibly compressed name at `pos`. Returns the lowercased labels
/// and the position just after the name's bytes at `pos` (not after any
/// pointer target).
pub(crate) fn read_name(msg: &[u8], mut pos: usize) -> Result<(Labels, usize), ParseError> {
    let mut labels = Vec::new();
    let mut total = 0usize;
    let mut end = None;
    let mut hops = 0usize;
    loop {
        let len = *msg.get(pos).ok_or(ParseError::Malformed)? as usize;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((labels, end.unwrap_or(pos + 1)));
                }
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(ParseError::Malformed)?;
                total += len + 1;
                if total + 1 > MAX_NAME_LEN {
                    return Err(ParseError::Malformed);
                }
                labels.push(label.to_ascii_lowercase());
                pos += 1 + len;
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(ParseError::Malformed)? as usize;
                let target = ((len & 0x3f) << 8) | low;
                // Only pointers to earlier bytes are allowed, which with the
                // hop limit rules out loops.
                if target >= pos || hops >= MAX_POINTER_HOPS {
                    return Err(ParseError::Malformed);
                }
                hops += 1;
                end.get_or_insert(pos + 2);
                pos = target;
            }
            // 0x40 and 0x80 are obsolete/reserved label types.
            _ => return Err(ParseError::Malformed),
        }
    }
}

/// Encodes labels (already validated to be ≤ 63 bytes each) as an
/// uncompressed wire name.
pub(crate) fn encode_name(labels: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1);
    for label in labels {
        debug_assert!(label.len() <= MAX_LABEL_LEN);
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// Splits and validates a presentation-format name ("a.b.c", trailing dot
/// optional) into lowercased labels.
pub(crate) fn parse_text_name(name: &str) -> Option<Labels> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Some(Vec::new());
    }
    let labels: Labels = name
        .split('.')
        .map(|l| l.as_bytes().to_ascii_lowercase())
        .collect();
    let total: usize = labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1;
    let ok = total <= MAX_NAME_LEN
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= MAX_LABEL_LEN
                && l.iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
        });
    ok.then_some(labels)
}

/// One resource record ready to be written; `name` is wire format (possibly
/// a compression pointer).
pub(crate) struct Record {
    pub name: Vec<u8>,
    pub rtype: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
}

impl Record {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&self.ttl.to_be_bytes());
        // rdata sizes are bounded by construction (TXT values are checked on
        // insertion), so this never truncates.
        out.extend_from_slice(&(self.rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.rdata);
    }
}

pub(crate) struct Response {
    pub id: u16,
    pub opcode: u8,
    pub rcode: u8,
    pub authoritative: bool,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub question: Option<Question>,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    /// `Some((extended rcode, dnssec_ok))` when the query had EDNS.
    pub edns: Option<(u8, bool)>,
}

/// The payload size we advertise and honour at most, the value the DNS
/// flag day 2020 settled on to avoid IP fragmentation.
pub(crate) const EDNS_UDP_PAYLOAD: u16 = 1232;

impl Response {
    /// Serialises the response; if it exceeds `limit`, drops all records
    /// but the OPT and sets TC, so the client retries over TCP.
    pub fn encode(&self, limit: usize) -> Vec<u8> {
        let full = self.encode_sections(false);
        if full.len() <= limit {
            return full;
        }
        self.encode_sections(true)
    }

    fn encode_sections(&self, truncated: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&self.id.to_be_bytes());
        let mut flags: u16 = 0x8000 | (u16::from(self.opcode & 0xf) << 11);
        if self.authoritative {
            flags |= 0x0400;
        }
        if truncated {
            flags |= 0x0200;
        }
        if self.recursion_desired {
            flags |= 0x0100;
        }
        if self.checking_disabled {
            flags |= 0x0010;
        }
        flags |= u16::from(self.rcode & 0xf);
        out.extend_from_slice(&flags.to_be_bytes());
        let (an, ns, ar): (&[Record], &[Record], &[Record]) = if truncated {
            (&[], &[], &[])
        } else {
            (&self.answers, &self.authority, &self.additional)
        };
        let qd = u16::from(self.question.is_some());
        let opt = u16::from(self.edns.is_some());
        for count in [qd, an.len() as u16, ns.len() as u16, ar.len() as u16 + opt] {
            out.extend_from_slice(&count.to_be_bytes());
        }
        if let Some(q) = &self.question {
            out.extend_from_slice(&q.raw_name);
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&q.qclass.to_be_bytes());
        }
        for r in an.iter().chain(ns).chain(ar) {
            r.write(&mut out);
        }
        if let Some((ext_rcode, dnssec_ok)) = self.edns {
            out.push(0); // root name
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&EDNS_UDP_PAYLOAD.to_be_bytes());
            let ttl: u32 = (u32::from(ext_rcode) << 24) | if dnssec_ok { 0x8000 } else { 0 };
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pointer_loops_are_malformed() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg.extend_from_slice(&[0xc0, 12]);
        assert_eq!(read_name(&msg, 12).err(), Some(ParseError::Malformed));
    }

    #[test]
    fn compressed_names_are_followed() {
        let mut msg = vec![0u8; HEADER_LEN];
        msg.extend_from_slice(&encode_name(&[b"Foo".to_vec(), b"bar".to_vec()]));
        let second = msg.len();
        msg.extend_from_slice(&[1, b'x', 0xc0, 12]);
        let (labels, end) = read_name(&msg, second).unwrap();
        assert_eq!(
            labels,
            vec![b"x".to_vec(), b"foo".to_vec(), b"bar".to_vec()]
        );
        assert_eq!(end, msg.len());
    }

    #[test]
    fn overlong_names_are_malformed() {
        let mut msg = vec![0u8; HEADER_LEN];
        for _ in 0..5 {
            msg.push(63);
            msg.extend_from_slice(&[b'a'; 63]);
        }
        msg.push(0);
        assert_eq!(read_name(&msg, 12).err(), Some(ParseError::Malformed));
    }

    #[test]
    fn text_names() {
        assert_eq!(
            parse_text_name("Nook.Example.TEST."),
            Some(vec![
                b"nook".to_vec(),
                b"example".to_vec(),
                b"test".to_vec()
            ])
        );
        assert_eq!(parse_text_name("a..b"), None);
        assert_eq!(parse_text_name("a b"), None);
    }
}
