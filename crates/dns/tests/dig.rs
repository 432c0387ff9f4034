//! Queries the real server with the real `dig` (Debian package `dnsutils`)
//! over UDP and TCP on ephemeral loopback ports.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is the failure report.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use nook_dns::{Zone, ZoneConfig};
use tokio::net::{TcpListener, UdpSocket};

const DOMAIN: &str = "nook.example.test";
const HOST_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// Binds UDP and TCP on the same free port, so `dig -p` works for both.
async fn start(zone: Zone) -> u16 {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await else {
            continue;
        };
        tokio::spawn(nook_dns::serve(zone, udp, tcp));
        return port;
    }
    panic!("no free port for both UDP and TCP");
}

fn zone() -> Zone {
    Zone::new(ZoneConfig::new(DOMAIN, Some(HOST_V4), Some(HOST_V6))).unwrap()
}

#[derive(Debug, Default)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answer: Vec<Vec<String>>,
    authority: Vec<Vec<String>>,
    additional: Vec<Vec<String>>,
    raw: String,
}

impl Dig {
    fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The rdata of answer records of `rtype`, as dig prints them.
    fn rdata(&self, rtype: &str) -> Vec<String> {
        self.answer
            .iter()
            .filter(|r| r.get(3).map(String::as_str) == Some(rtype))
            .map(|r| r[4..].join(" "))
            .collect()
    }
}

async fn dig(port: u16, args: &[&str]) -> Dig {
    let mut cmd = Command::new("dig");
    cmd.args([
        "@127.0.0.1",
        "-p",
        &port.to_string(),
        "+norecurse",
        "+time=2",
        "+tries=1",
    ]);
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!("cannot run `dig` ({e}): install the Debian package dnsutils (apt-get install -y dnsutils)")
        });
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dig {args:?} failed:\n{raw}");
    let mut d = Dig {
        raw: raw.clone(),
        ..Dig::default()
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        }
        if let Some(name) = line
            .strip_prefix(";; ")
            .and_then(|l| l.strip_suffix(" SECTION:"))
        {
            section = match name {
                "ANSWER" => "answer",
                "AUTHORITY" => "authority",
                "ADDITIONAL" => "additional",
                _ => "",
            };
            continue;
        }
        if line.is_empty() || line.starts_with(';') {
            if line.is_empty() {
                section = "";
            }
            continue;
        }
        let rr: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match section {
            "answer" => d.answer.push(rr),
            "authority" => d.authority.push(rr),
            "additional" => d.additional.push(rr),
            _ => {}
        }
    }
    d
}

fn has_soa_authority(d: &Dig) -> bool {
    d.authority
        .iter()
        .any(|r| r[0] == format!("{DOMAIN}.") && r[3] == "SOA")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apex_and_vm_names_over_udp_and_tcp() {
    let port = start(zone()).await;
    for transport in ["+notcp", "+tcp"] {
        let d = dig(port, &[transport, DOMAIN, "A"]).await;
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert!(d.has_flag("aa"), "{}", d.raw);
        assert!(!d.has_flag("ra"), "{}", d.raw);
        assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);

        let d = dig(port, &[transport, &format!("vm1.{DOMAIN}"), "A"]).await;
        assert!(d.has_flag("aa"), "{}", d.raw);
        assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);

        let d = dig(port, &[transport, &format!("vm1.{DOMAIN}"), "AAAA"]).await;
        assert_eq!(d.rdata("AAAA"), vec![HOST_V6.to_string()], "{}", d.raw);

        // Mixed case resolves, and the answer echoes the case asked for.
        let d = dig(port, &[transport, "My-VM.NoOk.Example.TEST", "A"]).await;
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);
        assert_eq!(d.answer[0][0], "My-VM.NoOk.Example.TEST.", "{}", d.raw);

        let d = dig(port, &[transport, DOMAIN, "SOA"]).await;
        let soa = d.rdata("SOA");
        assert_eq!(soa.len(), 1, "{}", d.raw);
        assert!(
            soa[0].starts_with(&format!("ns.{DOMAIN}. hostmaster.{DOMAIN}. ")),
            "{}",
            d.raw
        );

        let d = dig(port, &[transport, DOMAIN, "NS"]).await;
        assert!(d.has_flag("aa"), "{}", d.raw);
        assert_eq!(d.rdata("NS"), vec![format!("ns.{DOMAIN}.")], "{}", d.raw);
        // Glue for the in-zone name server.
        assert!(
            d.additional.iter().any(|r| r[0] == format!("ns.{DOMAIN}.")
                && r[3] == "A"
                && r[4] == HOST_V4.to_string()),
            "{}",
            d.raw
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers() {
    let port = start(zone()).await;
    for transport in ["+notcp", "+tcp"] {
        // The wildcard covers one label only.
        let d = dig(port, &[transport, &format!("a.b.{DOMAIN}"), "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
        assert!(d.has_flag("aa"), "{}", d.raw);
        assert!(d.answer.is_empty(), "{}", d.raw);
        assert!(has_soa_authority(&d), "{}", d.raw);

        // A name that exists, with no record of the type: NODATA.
        let d = dig(port, &[transport, &format!("vm1.{DOMAIN}"), "MX"]).await;
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert!(d.has_flag("aa"), "{}", d.raw);
        assert!(d.answer.is_empty(), "{}", d.raw);
        assert!(has_soa_authority(&d), "{}", d.raw);

        for outside in ["example.com", "example.test", "xnook.example.test", "."] {
            let d = dig(port, &[transport, outside, "A"]).await;
            assert_eq!(d.status, "REFUSED", "{outside}: {}", d.raw);
            assert!(!d.has_flag("aa"), "{}", d.raw);
            assert!(d.answer.is_empty(), "{}", d.raw);
        }

        // Only IN (and ANY) class data lives here.
        let d = dig(port, &[transport, "-c", "CH", DOMAIN, "TXT"]).await;
        assert_eq!(d.status, "REFUSED", "{}", d.raw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenge_txt_records_change_at_runtime() {
    let zone = zone();
    let port = start(zone.clone()).await;
    let name = format!("_acme-challenge.{DOMAIN}");

    let d = dig(port, &[&name, "TXT"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.answer.is_empty(), "{}", d.raw);
    assert!(has_soa_authority(&d), "{}", d.raw);

    let apex = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let wildcard = "gHbJ3n2Y2sVyNq5TdX7qZtq0pV6pQ2l7zR4sI0wXj6U";
    zone.add_acme_challenge(apex).unwrap();
    zone.add_acme_challenge(wildcard).unwrap();
    for transport in ["+notcp", "+tcp"] {
        let d = dig(port, &[transport, &name.to_uppercase(), "TXT"]).await;
        assert!(d.has_flag("aa"), "{}", d.raw);
        let mut got = d.rdata("TXT");
        got.sort();
        let mut want = vec![format!("\"{apex}\""), format!("\"{wildcard}\"")];
        want.sort();
        assert_eq!(got, want, "{}", d.raw);
    }

    zone.remove_acme_challenge(apex);
    let d = dig(port, &[&name, "TXT"]).await;
    assert_eq!(d.rdata("TXT"), vec![format!("\"{wildcard}\"")], "{}", d.raw);
    zone.remove_acme_challenge(wildcard);
    let d = dig(port, &[&name, "TXT"]).await;
    assert!(d.answer.is_empty(), "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_name_overrides() {
    let zone = zone();
    let port = start(zone.clone()).await;
    let other = Ipv4Addr::new(198, 51, 100, 9);
    zone.set_host("Moved", &[IpAddr::V4(other)]).unwrap();

    let d = dig(port, &[&format!("moved.{DOMAIN}"), "A"]).await;
    assert_eq!(d.rdata("A"), vec![other.to_string()], "{}", d.raw);
    // The other host has no IPv6: no AAAA rather than this host's.
    let d = dig(port, &[&format!("moved.{DOMAIN}"), "AAAA"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.answer.is_empty(), "{}", d.raw);
    let d = dig(port, &[&format!("stays.{DOMAIN}"), "A"]).await;
    assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);

    zone.remove_host("moved").unwrap();
    let d = dig(port, &[&format!("moved.{DOMAIN}"), "A"]).await;
    assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);

    assert!(zone.set_host("a.b", &[]).is_err());
    assert!(zone.set_host("_acme-challenge", &[]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_and_truncation() {
    let zone = zone();
    let port = start(zone.clone()).await;

    let d = dig(port, &[DOMAIN, "SOA"]).await;
    assert!(d.raw.contains("EDNS: version: 0"), "{}", d.raw);
    assert!(d.raw.contains("udp: 1232"), "{}", d.raw);

    let d = dig(port, &["+edns=1", "+noednsnegotiation", DOMAIN, "SOA"]).await;
    assert_eq!(d.status, "BADVERS", "{}", d.raw);

    let d = dig(port, &["+noedns", DOMAIN, "SOA"]).await;
    assert!(!d.raw.contains("OPT PSEUDOSECTION"), "{}", d.raw);
    assert!(d.has_flag("aa"), "{}", d.raw);

    // 16 values of 43 bytes need ~900 bytes: more than 512.
    for i in 0..16 {
        zone.add_acme_challenge(&format!("{i:02}{}", "x".repeat(41)))
            .unwrap();
    }
    let name = format!("_acme-challenge.{DOMAIN}");
    let d = dig(port, &["+noedns", "+ignore", &name, "TXT"]).await;
    assert!(d.has_flag("tc"), "{}", d.raw);
    assert!(d.answer.is_empty(), "{}", d.raw);
    // Without +ignore dig retries over TCP and gets everything.
    let d = dig(port, &["+noedns", &name, "TXT"]).await;
    assert!(!d.has_flag("tc"), "{}", d.raw);
    assert_eq!(d.rdata("TXT").len(), 16, "{}", d.raw);
    // With EDNS the 1232-byte limit fits it over UDP.
    let d = dig(port, &["+ignore", &name, "TXT"]).await;
    assert!(!d.has_flag("tc"), "{}", d.raw);
    assert_eq!(d.rdata("TXT").len(), 16, "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_does_not_stop_the_server() {
    use rand::Rng;
    let port = start(zone()).await;
    // From another source address than dig's: the replies to garbage count
    // against the sender's rate limit, and this test is not about that one.
    let sock = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let mut rng = rand::rng();
    for _ in 0..500 {
        let len = rng.random_range(0..600);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        sock.send_to(&junk, ("127.0.0.1", port)).await.unwrap();
    }
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let _ = tcp.write_all(&[0, 40, 1, 2, 3]).await;
    drop(tcp);

    let d = dig(port, &[&format!("vm1.{DOMAIN}"), "A"]).await;
    assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);
    let d = dig(port, &["+tcp", &format!("vm1.{DOMAIN}"), "A"]).await;
    assert_eq!(d.rdata("A"), vec![HOST_V4.to_string()], "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_gets_one_hinfo_record_as_rfc8482_says() {
    let zone = zone();
    zone.add_acme_challenge("challenge-value").unwrap();
    let port = start(zone).await;
    let vm = format!("vm1.{DOMAIN}");
    let acme = format!("_acme-challenge.{DOMAIN}");
    for transport in ["+notcp", "+tcp"] {
        // The apex holds SOA, NS, A and AAAA (and NS glue), yet ANY gets
        // none of them: a small answer is no use to an amplification attack.
        for name in [DOMAIN, &vm, &acme] {
            let d = dig(port, &[transport, name, "ANY"]).await;
            assert_eq!(d.status, "NOERROR", "{}", d.raw);
            assert!(d.has_flag("aa"), "{}", d.raw);
            assert_eq!(d.answer.len(), 1, "{}", d.raw);
            assert_eq!(d.rdata("HINFO"), vec!["\"RFC8482\" \"\""], "{}", d.raw);
            assert!(d.authority.is_empty(), "{}", d.raw);
            assert!(d.additional.is_empty(), "{}", d.raw);
        }
        // A name that does not exist still does not.
        let d = dig(port, &[transport, &format!("a.b.{DOMAIN}"), "ANY"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
        assert!(d.answer.is_empty(), "{}", d.raw);
        // Names outside the zone are still refused.
        let d = dig(port, &[transport, "example.com", "ANY"]).await;
        assert_eq!(d.status, "REFUSED", "{}", d.raw);
    }
}
