//! ROOT-ONLY: exercises the real `ip`/`nft` set-up inside throwaway network
//! namespaces, so the host's own networking is never touched. Skips (passes
//! with a note) when not root or when `ip netns`/`nft` are unavailable.
//!
//! Topology per test (names carry the pid, so runs never collide):
//!
//! ```text
//!   guest ns A (10.200.0.14) ──veth── nk3 ┐
//!                                         ├─ host ns H (HostNet, nook-md 169.254.169.254)
//!   guest ns B (10.200.0.30) ──veth── nk7 ┘        │ up0 203.0.113.1
//!                                                  │
//!                      inet ns I: 203.0.113.10, 192.168.77.10 (a "private" net),
//!                      cloud endpoints (168.63.129.16, 100.100.100.200, ...)
//!                      and an impostor at 169.254.169.254
//! ```
//!
//! A tap without a reader has no carrier, so a guest is emulated by a veth
//! pair named like the tap; `add_vm` reuses an existing `nkN` link as it would
//! a tap left by a crash. The real tap path is covered by
//! `root_netns_tap_lifecycle`. Code runs "in" a namespace on a thread that has
//! `setns`-ed into it: sockets and spawned commands inherit it.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nook_net::{EgressBlockList, HostNet, METADATA_ADDR, VmLink, taps_present};

const TIMEOUT: Duration = Duration::from_millis(1000);

/// One address in each network the issue named for the default block list.
const BLOCKED_BY_DEFAULT: &[Ipv4Addr] = &[
    Ipv4Addr::new(168, 63, 129, 16),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(169, 254, 1, 1),
    Ipv4Addr::new(100, 64, 0, 10),
    Ipv4Addr::new(192, 0, 0, 10),
    Ipv4Addr::new(198, 18, 0, 10),
];

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !(root && tools && Path::new("/dev/net/tun").exists()) {
        eprintln!("skipping: needs root, /dev/net/tun, iproute2 and nftables");
        return false;
    }
    true
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(out.status.success(), "{args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Named network namespaces, deleted on drop (their links go with them).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(tag: &str, roles: &[&str]) -> Namespaces {
        let pid = std::process::id();
        let names: Vec<String> = roles.iter().map(|r| format!("nkt{pid}{tag}{r}")).collect();
        let mut guard = Namespaces(Vec::new());
        for n in &names {
            sh(&["ip", "netns", "add", n]);
            guard.0.push(n.clone());
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        guard
    }
    fn get(&self, i: usize) -> &str {
        &self.0[i]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let fd = File::open(&path).expect("open netns");
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A TCP server: greets each client with the address it sees, then echoes.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str, addr: SocketAddr) -> Server {
        let listener = in_ns(ns, || TcpListener::bind(addr)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = writeln!(s, "{}", peer.ip());
                            let mut buf = [0u8; 256];
                            while let Ok(n @ 1..) = s.read(&mut buf) {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Connects from `ns`; returns the stream and the peer address the server saw.
fn connect(ns: &str, dst: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    let s = in_ns(ns, || TcpStream::connect_timeout(&dst, TIMEOUT))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((s, line.trim().to_owned()))
}

fn seen_by(ns: &str, dst: SocketAddr) -> String {
    match connect(ns, dst) {
        Ok((_, seen)) => seen,
        Err(e) => panic!("{ns} -> {dst}: expected to connect, got {e}"),
    }
}

fn assert_dropped(ns: &str, dst: SocketAddr) {
    match connect(ns, dst) {
        Ok(_) => panic!("{ns} -> {dst}: connected, expected a drop"),
        // A drop, not a refusal: nothing answered at all.
        Err(e) => assert_eq!(e.kind(), ErrorKind::TimedOut, "{ns} -> {dst}: {e}"),
    }
}

fn net(ns: &str, existing: &[VmLink]) -> HostNet {
    in_ns(ns, || HostNet::setup(existing)).expect("setup")
}

/// Veth pair emulating a VM: `nkN` in the host ns, `eth0` in the guest ns.
fn plug_guest(host: &str, guest: &str, link: &VmLink) {
    sh(&[
        "ip", "-n", host, "link", "add", &link.tap, "type", "veth", "peer", "name", "eth0",
        "netns", guest,
    ]);
    sh(&[
        "ip",
        "-n",
        guest,
        "addr",
        "add",
        &link.guest_cidr(),
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", guest, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        guest,
        "route",
        "add",
        "default",
        "via",
        &link.host_ip.to_string(),
    ]);
}

fn assert_clean(host: &str) {
    in_ns(host, || {
        assert_eq!(taps_present().expect("taps"), Vec::<String>::new());
    });
    let tables = sh_out(&["ip", "netns", "exec", host, "nft", "list", "tables"]);
    assert!(!tables.contains("inet nook"), "table left: {tables}");
    let links = sh_out(&["ip", "-n", host, "-o", "link", "show"]);
    assert!(!links.contains("nook-md"), "dummy left: {links}");
}

fn root_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default()
}

#[test]
fn root_netns_isolation_and_egress() {
    if !can_run() {
        return;
    }
    let host_forward = root_ip_forward();
    let ns = Namespaces::new("x", &["h", "a", "b", "i"]);
    let (h, a, b, i) = (ns.get(0), ns.get(1), ns.get(2), ns.get(3));
    let inet = Ipv4Addr::new(203, 0, 113, 10);
    let uplink = Ipv4Addr::new(203, 0, 113, 1);
    let private = Ipv4Addr::new(192, 168, 77, 10);

    // Make our nft rule, not reverse-path filtering, the thing that stops spoofing.
    in_ns(h, || {
        for c in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{c}/rp_filter"), "0")
                .expect("rp_filter");
        }
    });
    // The "internet": replies route back via the host even without NAT, so
    // the address the server sees tells whether masquerade worked.
    sh(&[
        "ip", "-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", i,
    ]);
    sh(&["ip", "-n", h, "addr", "add", "203.0.113.1/24", "dev", "up0"]);
    sh(&["ip", "-n", h, "link", "set", "up0", "up"]);
    sh(&[
        "ip",
        "-n",
        h,
        "route",
        "add",
        "192.168.77.0/24",
        "via",
        "203.0.113.10",
    ]);
    sh(&[
        "ip",
        "-n",
        i,
        "addr",
        "add",
        "203.0.113.10/24",
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        i,
        "addr",
        "add",
        "192.168.77.10/24",
        "dev",
        "eth0",
    ]);
    // Cloud metadata and control endpoints, and the special ranges the
    // default block list holds, all living out on the "internet". One of
    // them impersonates a cloud's metadata service at nook's own address.
    for addr in BLOCKED_BY_DEFAULT
        .iter()
        .chain([&METADATA_ADDR])
        .map(ToString::to_string)
    {
        sh(&[
            "ip",
            "-n",
            i,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", h, "route", "add", &addr, "via", "203.0.113.10"]);
    }
    sh(&["ip", "-n", i, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        i,
        "route",
        "add",
        "default",
        "via",
        "203.0.113.1",
    ]);

    let hn = net(h, &[]);
    let la = VmLink::for_slot(3).expect("slot");
    let lb = VmLink::for_slot(7).expect("slot");
    plug_guest(h, a, &la);
    plug_guest(h, b, &lb);
    in_ns(h, || {
        hn.add_vm(&la)?;
        hn.add_vm(&la)?; // idempotent
        hn.add_vm(&lb)
    })
    .expect("add_vm");

    let _metadata = Server::start(h, sa(METADATA_ADDR, 80));
    let _host_svc = Server::start(h, sa(Ipv4Addr::UNSPECIFIED, 8080));
    let _guest_b_svc = Server::start(b, sa(Ipv4Addr::UNSPECIFIED, 8080));
    let _inet_svc = Server::start(i, sa(Ipv4Addr::UNSPECIFIED, 8080));
    let _inet_web = Server::start(i, sa(Ipv4Addr::UNSPECIFIED, 80));
    let dns = in_ns(h, || UdpSocket::bind(sa(METADATA_ADDR, 53))).expect("bind 53");
    dns.set_read_timeout(Some(TIMEOUT)).expect("timeout");

    // Metadata is reachable, and the daemon sees the guest's own address.
    assert_eq!(seen_by(a, sa(METADATA_ADDR, 80)), la.guest_ip.to_string());
    assert_eq!(seen_by(b, sa(METADATA_ADDR, 80)), lb.guest_ip.to_string());
    assert_eq!(
        VmLink::slot_for_guest_ip(la.guest_ip.to_string().parse().expect("ip")),
        Some(3)
    );
    // Egress is masqueraded behind the host's uplink address.
    assert_eq!(seen_by(a, sa(inet, 8080)), uplink.to_string());
    // Nothing else on the host, no other guest, no private network.
    assert_dropped(a, sa(la.host_ip, 8080));
    assert_dropped(a, sa(la.host_ip, 80));
    assert_dropped(a, sa(METADATA_ADDR, 8080));
    assert_dropped(a, sa(uplink, 8080));
    assert_dropped(a, sa(lb.host_ip, 8080));
    assert_dropped(a, sa(lb.guest_ip, 8080));
    assert_dropped(a, sa(private, 8080));
    // Nor the cloud's metadata and control endpoints, while nook's own
    // metadata address, inside 169.254.0.0/16, stays the host's (the server
    // on the host sees the guest; the impostor outside would see the uplink).
    for &blocked in BLOCKED_BY_DEFAULT {
        assert_dropped(a, sa(blocked, 8080));
    }
    assert_eq!(seen_by(a, sa(METADATA_ADDR, 80)), la.guest_ip.to_string());
    // The host can still reach a guest.
    assert_eq!(seen_by(h, sa(lb.guest_ip, 8080)), lb.host_ip.to_string());

    // Anti-spoofing: A sends as itself (arrives), then as B (dropped).
    sh(&[
        "ip",
        "-n",
        a,
        "addr",
        "add",
        &format!("{}/32", lb.guest_ip),
        "dev",
        "eth0",
    ]);
    let send_from = |src: Ipv4Addr| {
        in_ns(a, || {
            let s = UdpSocket::bind(sa(src, 0)).expect("bind src");
            s.send_to(b"hi", sa(METADATA_ADDR, 53)).expect("send");
        })
    };
    let mut buf = [0u8; 16];
    send_from(la.guest_ip);
    let (_, from) = dns.recv_from(&mut buf).expect("own source must arrive");
    assert_eq!(from.ip(), la.guest_ip);
    send_from(lb.guest_ip);
    let spoofed = dns.recv_from(&mut buf);
    assert!(spoofed.is_err(), "spoofed packet arrived: {spoofed:?}");

    // Daemon restart: re-running setup keeps established flows and the
    // sources it is told about.
    let (mut flow, _) = connect(a, sa(inet, 8080)).expect("flow");
    let _restarted = net(h, &[la.clone(), lb.clone()]);
    flow.write_all(b"ping\n").expect("write");
    let mut echo = String::new();
    BufReader::new(&flow)
        .read_line(&mut echo)
        .expect("flow survives setup");
    assert_eq!(echo, "ping\n");
    assert_eq!(seen_by(b, sa(METADATA_ADDR, 80)), lb.guest_ip.to_string());
    drop(flow);

    // A source the daemon did not mention can no longer send, until re-added.
    let hn = net(h, std::slice::from_ref(&la));
    assert_dropped(b, sa(METADATA_ADDR, 80));
    in_ns(h, || hn.add_vm(&lb)).expect("re-add");
    assert_eq!(seen_by(b, sa(METADATA_ADDR, 80)), lb.guest_ip.to_string());

    // Another block list replaces the default one: what it leaves out
    // becomes reachable, what it adds is dropped, and nook's own address
    // stays reachable even when the list covers it.
    let custom = EgressBlockList::parse(&["203.0.113.10/32", "169.254.0.0/16"]).expect("list");
    in_ns(h, || {
        HostNet::setup_with(&[la.clone(), lb.clone()], &custom)
    })
    .expect("setup");
    assert_dropped(a, sa(inet, 8080));
    let open = Ipv4Addr::new(198, 18, 0, 10);
    assert_eq!(seen_by(a, sa(open, 8080)), uplink.to_string());
    assert_dropped(a, sa(Ipv4Addr::new(169, 254, 1, 1), 8080));
    assert_eq!(seen_by(a, sa(METADATA_ADDR, 80)), la.guest_ip.to_string());
    // Back to the defaults.
    let hn = net(h, &[la.clone(), lb.clone()]);
    assert_dropped(a, sa(open, 8080));
    assert_eq!(seen_by(a, sa(inet, 8080)), uplink.to_string());

    // Removal is idempotent and takes the link away.
    in_ns(h, || {
        hn.remove_vm(&lb)?;
        hn.remove_vm(&lb)?;
        assert_eq!(taps_present()?, vec![la.tap.clone()]);
        HostNet::teardown()?;
        HostNet::teardown()
    })
    .expect("teardown");
    assert_clean(h);
    assert_eq!(
        root_ip_forward(),
        host_forward,
        "host's own ip_forward changed"
    );
}

#[test]
fn root_netns_tap_lifecycle() {
    if !can_run() {
        return;
    }
    assert_eq!(nook_net::probe_mode(), nook_net::NetMode::Tap);
    let ns = Namespaces::new("t", &["h"]);
    let h = ns.get(0);
    let link = VmLink::for_slot(9).expect("slot");
    let other = VmLink::for_slot(12).expect("slot");
    // Teardown before anything exists is fine.
    in_ns(h, HostNet::teardown).expect("teardown on empty");
    let hn = net(h, &[]);
    in_ns(h, || {
        hn.add_vm(&link)?;
        hn.add_vm(&link)?;
        hn.add_vm(&other)
    })
    .expect("add_vm");
    let detail = sh_out(&["ip", "-n", h, "-d", "link", "show", "dev", &link.tap]);
    assert!(detail.contains("tun type tap"), "{detail}");
    let addrs = sh_out(&["ip", "-n", h, "-o", "addr", "show", "dev", &link.tap]);
    assert!(addrs.contains(&link.host_cidr()), "{addrs}");
    let set = sh_out(&[
        "ip",
        "netns",
        "exec",
        h,
        "nft",
        "list",
        "set",
        "inet",
        "nook",
        "vm_sources",
    ]);
    assert!(set.contains("\"nk9\" . 10.200.0.38"), "{set}");
    let md = sh_out(&["ip", "-n", h, "-o", "addr", "show", "dev", "nook-md"]);
    assert!(md.contains("169.254.169.254/32"), "{md}");
    assert_eq!(
        in_ns(h, taps_present).expect("taps"),
        vec!["nk9".to_owned(), "nk12".to_owned()]
    );

    // Re-setup leaves the taps alone and keeps their sources.
    let hn = net(h, &[link.clone(), other.clone()]);
    let set = sh_out(&[
        "ip",
        "netns",
        "exec",
        h,
        "nft",
        "list",
        "set",
        "inet",
        "nook",
        "vm_sources",
    ]);
    assert!(set.contains("\"nk12\" . 10.200.0.50"), "{set}");

    in_ns(h, || {
        hn.remove_vm(&link)?;
        hn.remove_vm(&link)
    })
    .expect("remove_vm");
    let set = sh_out(&[
        "ip",
        "netns",
        "exec",
        h,
        "nft",
        "list",
        "set",
        "inet",
        "nook",
        "vm_sources",
    ]);
    assert!(!set.contains("nk9"), "{set}");
    assert_eq!(
        in_ns(h, taps_present).expect("taps"),
        vec!["nk12".to_owned()]
    );

    in_ns(h, HostNet::teardown).expect("teardown");
    // remove_vm after teardown (no table) is still fine.
    in_ns(h, || hn.remove_vm(&other)).expect("remove after teardown");
    in_ns(h, HostNet::teardown).expect("teardown again");
    assert_clean(h);
}
