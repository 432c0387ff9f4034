//! Host networking for nook VMs.
//!
//! Every VM gets a *slot* (allocated by the daemon) and with it a
//! point-to-point /30 in `10.200.0.0/16`, a tap `nk<slot>` and a MAC. The
//! host owns [`METADATA_ADDR`] on a dummy interface, and one nftables table,
//! `inet nook`, isolates the VMs from the host, from each other and from
//! the networks of an [`EgressBlockList`] (private ranges and cloud metadata
//! endpoints by default) while masquerading their egress.
//!
//! Everything privileged lives in `host.rs`; the rest of this crate is pure.
//! The API is synchronous: the daemon calls it from `spawn_blocking`.

mod egress;
mod error;
mod host;
mod ruleset;

use std::net::Ipv4Addr;

pub use egress::{DEFAULT_EGRESS_BLOCK, EgressBlockList, Ipv4Net};
pub use error::NetError;
pub use host::{HostNet, probe_mode, taps_present};

/// The metadata (and gateway) address the daemon's HTTP server binds to.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The network holding every VM's /30.
pub const VM_NET: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Prefix length of [`VM_NET`].
pub const VM_NET_PREFIX: u8 = 16;
/// The highest slot: 16384 /30s fill the /16.
pub const MAX_SLOT: u32 = (1 << (32 - VM_NET_PREFIX as u32)) / 4 - 1;
/// Prefix of every tap's name; the rest is the slot in decimal.
pub const TAP_PREFIX: &str = "nk";

/// The host-side link of one VM, derived from its slot alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmLink {
    pub slot: u32,
    /// Host-side tap name, `nk<slot>`.
    pub tap: String,
    /// The host's end of the /30: the guest's default gateway.
    pub host_ip: Ipv4Addr,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    pub prefix_len: u8,
    /// The guest NIC's MAC: `02:6e:6b` ("nk", locally administered) and the
    /// slot in the last three bytes.
    pub mac: String,
    /// The tap's own MAC, the gateway's as the guest sees it: `02:6e:6c` and the slot. Fixed
    /// rather than the kernel's random one, so a VM that moves to another host (or whose tap
    /// is made again) finds its gateway where its ARP cache says.
    pub host_mac: String,
}

impl VmLink {
    pub fn for_slot(slot: u32) -> Result<VmLink, NetError> {
        if slot > MAX_SLOT {
            return Err(NetError::SlotOutOfRange(slot));
        }
        let base = u32::from(VM_NET) + 4 * slot;
        let [_, b1, b2, b3] = slot.to_be_bytes();
        Ok(VmLink {
            slot,
            tap: format!("{TAP_PREFIX}{slot}"),
            host_ip: Ipv4Addr::from(base + 1),
            guest_ip: Ipv4Addr::from(base + 2),
            prefix_len: 30,
            mac: format!("02:6e:6b:{b1:02x}:{b2:02x}:{b3:02x}"),
            host_mac: format!("02:6e:6c:{b1:02x}:{b2:02x}:{b3:02x}"),
        })
    }

    /// The guest's address with its prefix, e.g. `10.200.0.6/30`.
    pub fn guest_cidr(&self) -> String {
        format!("{}/{}", self.guest_ip, self.prefix_len)
    }

    /// The host's address with its prefix, e.g. `10.200.0.5/30`.
    pub fn host_cidr(&self) -> String {
        format!("{}/{}", self.host_ip, self.prefix_len)
    }

    /// The slot whose guest address is `ip`, if any. The daemon uses it to
    /// tell which VM a metadata request comes from (sources are anti-spoofed).
    pub fn slot_for_guest_ip(ip: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(ip).checked_sub(u32::from(VM_NET))?;
        let slot = offset / 4;
        (offset % 4 == 2 && slot <= MAX_SLOT).then_some(slot)
    }

    /// QEMU `-netdev` argument for this VM's tap.
    pub fn tap_netdev(&self, id: &str) -> String {
        format!(
            "tap,id={id},ifname={},script=no,downscript=no,vhost=off",
            self.tap
        )
    }
}

/// How VMs get a network on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// Root with `/dev/net/tun` and nftables: taps, isolation, egress, metadata.
    Tap,
    /// Rootless fallback: QEMU's slirp, see [`user_mode_netdev`].
    User,
}

/// QEMU `-netdev` argument for a rootless (slirp) VM.
///
/// `restrict=on` isolates the guest completely: **no egress, no access to the
/// host and no metadata service**. The host can still reach the guest by
/// appending `,hostfwd=tcp:127.0.0.1:PORT-:22` and the like.
pub fn user_mode_netdev(id: &str) -> String {
    format!("user,id={id},restrict=on,ipv6=off,net=10.0.2.0/24")
}

/// The tap names this crate manages: `nk` followed by digits only.
fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_zero() -> Result<(), NetError> {
        let l = VmLink::for_slot(0)?;
        assert_eq!(l.tap, "nk0");
        assert_eq!(l.host_ip, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(l.guest_ip, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(l.prefix_len, 30);
        assert_eq!(l.mac, "02:6e:6b:00:00:00");
        assert_eq!(l.guest_cidr(), "10.200.0.2/30");
        assert_eq!(l.host_cidr(), "10.200.0.1/30");
        Ok(())
    }

    #[test]
    fn slot_math() -> Result<(), NetError> {
        let l = VmLink::for_slot(1)?;
        assert_eq!(l.host_ip, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(l.guest_ip, Ipv4Addr::new(10, 200, 0, 6));
        let l = VmLink::for_slot(300)?;
        assert_eq!(l.host_ip, Ipv4Addr::new(10, 200, 4, 177));
        assert_eq!(l.guest_ip, Ipv4Addr::new(10, 200, 4, 178));
        assert_eq!(l.mac, "02:6e:6b:00:01:2c");
        let l = VmLink::for_slot(MAX_SLOT)?;
        assert_eq!(MAX_SLOT, 16383);
        assert_eq!(l.tap, "nk16383");
        assert_eq!(l.host_ip, Ipv4Addr::new(10, 200, 255, 253));
        assert_eq!(l.guest_ip, Ipv4Addr::new(10, 200, 255, 254));
        assert_eq!(l.mac, "02:6e:6b:00:3f:ff");
        assert!(matches!(
            VmLink::for_slot(MAX_SLOT + 1),
            Err(NetError::SlotOutOfRange(16384))
        ));
        assert!(VmLink::for_slot(u32::MAX).is_err());
        Ok(())
    }

    #[test]
    fn guest_ip_round_trip() -> Result<(), NetError> {
        for slot in [0, 1, 2, 63, 64, 1000, MAX_SLOT] {
            let l = VmLink::for_slot(slot)?;
            assert_eq!(VmLink::slot_for_guest_ip(l.guest_ip), Some(slot));
            assert_eq!(VmLink::slot_for_guest_ip(l.host_ip), None);
        }
        for ip in [
            Ipv4Addr::new(10, 200, 0, 0),
            Ipv4Addr::new(10, 200, 0, 3),
            Ipv4Addr::new(10, 199, 255, 254),
            Ipv4Addr::new(10, 201, 0, 2),
            Ipv4Addr::new(0, 0, 0, 2),
            METADATA_ADDR,
        ] {
            assert_eq!(VmLink::slot_for_guest_ip(ip), None, "{ip}");
        }
        Ok(())
    }

    #[test]
    fn macs_are_unique_unicast_local() -> Result<(), NetError> {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..=MAX_SLOT {
            let l = VmLink::for_slot(slot)?;
            assert!(seen.insert(l.mac.clone()));
            assert!(seen.insert(l.host_mac.clone()));
            assert!(seen.len() as u32 == 2 * (slot + 1));
        }
        // 0x02: locally administered, unicast.
        assert!(seen.iter().all(|m| m.starts_with("02:")));
        Ok(())
    }

    #[test]
    fn tap_names() {
        assert!(is_tap_name("nk0"));
        assert!(is_tap_name("nk16383"));
        assert!(!is_tap_name("nk"));
        assert!(!is_tap_name("nkx"));
        assert!(!is_tap_name("nook-md"));
        assert!(!is_tap_name("eth0"));
    }

    #[test]
    fn netdev_strings() -> Result<(), NetError> {
        assert_eq!(
            VmLink::for_slot(7)?.tap_netdev("net0"),
            "tap,id=net0,ifname=nk7,script=no,downscript=no,vhost=off"
        );
        assert_eq!(
            user_mode_netdev("net0"),
            "user,id=net0,restrict=on,ipv6=off,net=10.0.2.0/24"
        );
        Ok(())
    }
}
