//! The guest's network link, configured with the kernel's socket ioctls instead of the `ip`
//! tool. Under TCG every exec of a dynamically linked tool costs 100–200 ms, and boot set-up
//! plus an identity change ran up to a dozen of them on the path to "ready"; these calls take
//! microseconds. IPv4 only: nook gives each VM one IPv4 address and a default route.
//!
//! `unsafe` is allowed here (as in `sys`) because the ioctls are raw libc calls; each one
//! passes a fully initialised struct that lives across the call.
#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An IPv4 address with its prefix length, as in `10.200.0.6/30`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = s.trim().split_once('/')?;
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(Self {
            addr: addr.parse().ok()?,
            prefix,
        })
    }

    pub fn netmask(self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A datagram socket to issue interface ioctls on.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(dev: &str) -> io::Result<libc::ifreq> {
    let name = dev.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {dev:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to a live, initialised struct of the type
    // `request` expects.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) })
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux, and the kernel reads it
    // back as sockaddr_in for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ipv4_of(sa: &libc::sockaddr) -> Ipv4Addr {
    // SAFETY: as above; the kernel filled an AF_INET address.
    let sin = unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(*sa) };
    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
}

/// Brings `dev` up (a no-op when it is).
pub fn set_up(dev: &str) -> io::Result<()> {
    set_link_up(&control_socket()?, dev, true)
}

/// Sets or clears `IFF_UP` on `dev`, leaving its other flags as they are.
fn set_link_up(fd: &OwnedFd, dev: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq(dev)?;
    ioctl(fd, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let want = if up {
        flags | libc::IFF_UP as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    if want == flags {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = want;
    ioctl(fd, libc::SIOCSIFFLAGS, (&raw mut req).cast())
}

/// The primary IPv4 address of `dev` with its prefix; `None` when it has none.
pub fn ipv4(dev: &str) -> io::Result<Option<Cidr>> {
    let fd = control_socket()?;
    let mut req = ifreq(dev)?;
    match ioctl(&fd, libc::SIOCGIFADDR, (&raw mut req).cast()) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(None),
        other => other?,
    }
    // SAFETY: SIOCGIFADDR filled the address member.
    let addr = ipv4_of(unsafe { &req.ifr_ifru.ifru_addr });
    ioctl(&fd, libc::SIOCGIFNETMASK, (&raw mut req).cast())?;
    // SAFETY: SIOCGIFNETMASK filled the netmask member.
    let mask = u32::from(ipv4_of(unsafe { &req.ifr_ifru.ifru_netmask }));
    Ok(Some(Cidr {
        addr,
        prefix: mask.leading_ones() as u8,
    }))
}

/// Makes `cidr` the primary IPv4 address of `dev`, replacing the one it had (a forked source's,
/// on a link that is no longer its). The kernel drops the routes of the old address with it.
pub fn set_ipv4(dev: &str, cidr: Cidr) -> io::Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(dev)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(cidr.addr);
    ioctl(&fd, libc::SIOCSIFADDR, (&raw mut req).cast())?;
    // SIOCSIFADDR gives the address its classful mask; the host's prefix replaces it (and the
    // broadcast address follows the mask).
    let mut req = ifreq(dev)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(cidr.netmask());
    ioctl(&fd, libc::SIOCSIFNETMASK, (&raw mut req).cast())
}

/// `struct rtentry` from `<linux/route.h>`, which the libc crate leaves out for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn default_route(gateway: Ipv4Addr, dev: &mut [libc::c_char]) -> RtEntry {
    RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    }
}

/// The IPv4 default routes in the text of `/proc/net/route`: (interface, gateway).
pub fn default_routes(proc_net_route: &str) -> Vec<(String, Ipv4Addr)> {
    proc_net_route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            // Fields are in host byte order as the kernel printed them (little-endian here).
            let (dst, gw, mask) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(7)?)?);
            (dst == 0 && mask == 0).then(|| (f[0].to_string(), Ipv4Addr::from(gw.swap_bytes())))
        })
        .collect()
}

/// Makes `gateway` on `dev` the only IPv4 default route; a no-op when it already is.
pub fn set_default_route(dev: &str, gateway: Ipv4Addr) -> io::Result<()> {
    // thread-self: `/proc/net` follows the process's first thread, which may sit in another
    // network namespace than the calling one (the tests move a thread).
    let routes = default_routes(&fs::read_to_string("/proc/thread-self/net/route")?);
    if routes.len() == 1 && routes[0].0 == dev && routes[0].1 == gateway {
        return Ok(());
    }
    let fd = control_socket()?;
    let mut name: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
    name.push(0);
    for (old_dev, old_gw) in routes {
        let mut old_name: Vec<libc::c_char> = old_dev.bytes().map(|b| b as libc::c_char).collect();
        old_name.push(0);
        let mut old = default_route(old_gw, &mut old_name);
        match ioctl(&fd, libc::SIOCDELRT, (&raw mut old).cast()) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
            _ => {}
        }
    }
    let mut route = default_route(gateway, &mut name);
    ioctl(&fd, libc::SIOCADDRT, (&raw mut route).cast())
}

/// The MAC address of `dev`, as `aa:bb:cc:dd:ee:ff`.
pub fn mac(dev: &str) -> io::Result<String> {
    let fd = control_socket()?;
    let mut req = ifreq(dev)?;
    ioctl(&fd, libc::SIOCGIFHWADDR, (&raw mut req).cast())?;
    // SAFETY: SIOCGIFHWADDR filled the hardware address member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Gives `dev` the hardware address `mac`. virtio-net takes one while up when the device
/// offers it; otherwise the link is taken down for the change and brought back up.
pub fn set_mac(dev: &str, mac: [u8; 6]) -> io::Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(dev)?;
    let mut addr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    if ioctl(&fd, libc::SIOCSIFHWADDR, (&raw mut req).cast()).is_ok() {
        return Ok(());
    }
    set_link_up(&fd, dev, false)?;
    let changed = ioctl(&fd, libc::SIOCSIFHWADDR, (&raw mut req).cast());
    set_link_up(&fd, dev, true)?;
    changed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_addresses_and_masks() {
        let c = Cidr::parse("10.200.0.6/30").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(c.to_string(), "10.200.0.6/30");
        assert_eq!(
            Cidr::parse("1.2.3.4/0").unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            Cidr::parse("1.2.3.4/32").unwrap().netmask(),
            Ipv4Addr::BROADCAST
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "10.0.0/8", ""] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_default_routes_from_proc() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100C80A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000C80A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        assert_eq!(
            default_routes(text),
            vec![("eth0".to_string(), Ipv4Addr::new(10, 200, 0, 1))]
        );
        assert!(default_routes("Iface\tDestination\n").is_empty());
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Configures a link in a network namespace of its own (this thread's), checks the
    /// result with the real `ip` tool, then moves it the way a clone's identity change does.
    #[test]
    fn root_configures_a_link_by_ioctl() {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root: it makes a network namespace (run the suite as root)");
        }
        std::thread::spawn(|| {
            // SAFETY: a plain syscall; CLONE_NEWNET moves only this thread, and the `ip`
            // children it forks inherit that namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // A veth pair rather than a dummy link: not every host kernel has the dummy module.
            ip(&["link", "add", "nk0", "type", "veth", "peer", "name", "nk1"]);
            ip(&["link", "set", "nk1", "up"]);
            set_up("lo").unwrap();
            set_up("nk0").unwrap();
            assert_eq!(ipv4("nk0").unwrap(), None);

            let first = Cidr::parse("10.200.0.2/30").unwrap();
            set_ipv4("nk0", first).unwrap();
            set_default_route("nk0", Ipv4Addr::new(10, 200, 0, 1)).unwrap();
            assert_eq!(ipv4("nk0").unwrap(), Some(first));
            assert!(ip(&["-4", "-o", "addr", "show", "dev", "nk0"]).contains("inet 10.200.0.2/30"));
            assert!(ip(&["link", "show", "nk0"]).contains("UP"));
            assert_eq!(
                ip(&["route", "show", "default"]).trim(),
                "default via 10.200.0.1 dev nk0"
            );
            // Idempotent.
            set_default_route("nk0", Ipv4Addr::new(10, 200, 0, 1)).unwrap();

            // A clone: new address, new gateway, new MAC; nothing of the old one stays.
            let second = Cidr::parse("10.200.0.6/30").unwrap();
            set_ipv4("nk0", second).unwrap();
            set_default_route("nk0", Ipv4Addr::new(10, 200, 0, 5)).unwrap();
            let addrs = ip(&["-4", "-o", "addr", "show", "dev", "nk0"]);
            assert!(addrs.contains("inet 10.200.0.6/30"), "{addrs}");
            assert!(!addrs.contains("10.200.0.2"), "{addrs}");
            assert_eq!(
                ip(&["route", "show", "default"]).trim(),
                "default via 10.200.0.5 dev nk0"
            );
            set_mac("nk0", parse_mac("52:54:00:12:34:56").unwrap()).unwrap();
            assert_eq!(mac("nk0").unwrap(), "52:54:00:12:34:56");
            assert!(ip(&["link", "show", "nk0"]).contains("UP"));
        })
        .join()
        .unwrap();
    }
}
