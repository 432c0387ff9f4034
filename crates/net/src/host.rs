//! Privileged host set-up: taps, the metadata interface, nftables and
//! forwarding. Everything here shells out to `ip` (iproute2) and `nft`
//! (nftables) and acts on the calling thread's network namespace. Every
//! operation is idempotent: absent things are fine to remove, present things
//! are fine to add again.

use std::io::{ErrorKind, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use tracing::{debug, info};

use crate::{EgressBlockList, METADATA_ADDR, NetError, NetMode, VmLink, is_tap_name, ruleset};

/// Dummy interface holding [`METADATA_ADDR`].
pub const METADATA_IFACE: &str = "nook-md";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Handle on the host networking that [`HostNet::setup`] put in place.
#[derive(Debug)]
pub struct HostNet {
    _private: (),
}

impl HostNet {
    /// Installs (or re-installs) the nftables table, the metadata interface
    /// and forwarding, and makes sure every link in `existing` is in place.
    ///
    /// Safe to call while VMs run (daemon restart): the table is replaced in
    /// one transaction whose source set holds exactly `existing`, existing
    /// taps are reused untouched, and conntrack keeps established flows.
    /// Taps not in `existing` are left alone (and can no longer send IP).
    ///
    /// VMs may not reach the networks of [`EgressBlockList::default`]; see
    /// [`HostNet::setup_with`] for another list.
    pub fn setup(existing: &[VmLink]) -> Result<HostNet, NetError> {
        HostNet::setup_with(existing, &EgressBlockList::default())
    }

    /// [`HostNet::setup`], with VMs kept from the networks in `block`
    /// instead of the default ones. Re-running it replaces the list.
    pub fn setup_with(existing: &[VmLink], block: &EgressBlockList) -> Result<HostNet, NetError> {
        nft(&ruleset::replace_batch(existing, block))?;
        ensure_metadata_iface()?;
        for link in existing {
            ensure_link(link)?;
        }
        // Each running VM's /30 route is more specific; an address with no VM behind it
        // (a stopped VM's) must fail at once here rather than leave by the default route
        // and reach whatever answers at that address outside.
        ip(&["route", "replace", "unreachable", &vm_net_cidr()])?;
        enable_forwarding()?;
        info!(vms = existing.len(), "host networking ready");
        Ok(HostNet { _private: () })
    }

    /// Creates the VM's tap (reusing one that exists, e.g. left by a crash or
    /// held by a running QEMU), addresses it, brings it up, and lets it send
    /// from the guest address.
    pub fn add_vm(&self, link: &VmLink) -> Result<(), NetError> {
        nft(&ruleset::add_elements(std::slice::from_ref(link)))?;
        ensure_link(link)?;
        debug!(tap = %link.tap, guest = %link.guest_ip, "VM link ready");
        Ok(())
    }

    /// Deletes the VM's tap and its source-set element. Absent ones are fine.
    pub fn remove_vm(&self, link: &VmLink) -> Result<(), NetError> {
        if link_exists(&link.tap)? {
            ip(&["link", "del", "dev", &link.tap])?;
        }
        if table_exists()? {
            nft(&ruleset::remove_elements(std::slice::from_ref(link)))?;
        }
        debug!(tap = %link.tap, "VM link removed");
        Ok(())
    }

    /// Removes the table, the metadata interface and every `nk*` tap.
    /// Idempotent. Leaves `net.ipv4.ip_forward` as it is, since other things
    /// on the host may rely on it.
    pub fn teardown() -> Result<(), NetError> {
        nft(&ruleset::delete_batch())?;
        let names = link_names()?;
        if names.iter().any(|n| n == METADATA_IFACE) {
            ip(&["link", "del", "dev", METADATA_IFACE])?;
        }
        for tap in names.iter().filter(|n| is_tap_name(n)) {
            ip(&["link", "del", "dev", tap])?;
        }
        // Absent already is fine.
        let _ = ip(&["route", "del", "unreachable", &vm_net_cidr()]);
        info!("host networking removed");
        Ok(())
    }

    /// The `table inet nook` definition that [`HostNet::setup_with`]
    /// installs for `block`, without set elements.
    pub fn ruleset_text(block: &EgressBlockList) -> String {
        ruleset::table(block)
    }
}

/// [`NetMode::Tap`] when running as root with `/dev/net/tun`, `ip` and a
/// working `nft`; [`NetMode::User`] otherwise.
pub fn probe_mode() -> NetMode {
    let ok = nix::unistd::geteuid().is_root()
        && Path::new("/dev/net/tun").exists()
        && run("ip", &["-V"], None).is_ok()
        && run("nft", &["list", "tables"], None).is_ok();
    if ok { NetMode::Tap } else { NetMode::User }
}

/// Names of the `nk<N>` links present, sorted (for leak checks).
pub fn taps_present() -> Result<Vec<String>, NetError> {
    let mut taps: Vec<String> = link_names()?
        .into_iter()
        .filter(|n| is_tap_name(n))
        .collect();
    taps.sort_by_key(|n| (n.len(), n.clone()));
    Ok(taps)
}

fn ensure_metadata_iface() -> Result<(), NetError> {
    if !link_exists(METADATA_IFACE)? {
        match ip(&["link", "add", METADATA_IFACE, "type", "dummy"]) {
            // Kernels without the dummy driver: a bridge with no ports holds
            // a local address just as well.
            Err(NetError::CommandFailed { stderr, .. })
                if stderr.contains("Unknown device type") =>
            {
                info!("no dummy interfaces in this kernel: {METADATA_IFACE} is a portless bridge");
                ip(&["link", "add", METADATA_IFACE, "type", "bridge"])?;
            }
            other => {
                other?;
            }
        }
    }
    ip(&[
        "addr",
        "replace",
        &format!("{METADATA_ADDR}/32"),
        "dev",
        METADATA_IFACE,
    ])?;
    ip(&["link", "set", "dev", METADATA_IFACE, "up"])?;
    Ok(())
}

/// Tap present (reused if it exists), host address set, link up.
fn ensure_link(link: &VmLink) -> Result<(), NetError> {
    if !link_exists(&link.tap)? {
        ip(&["tuntap", "add", "dev", &link.tap, "mode", "tap"])?;
    }
    // No IPv6 on the host side: the firewall drops it from VMs anyway.
    let v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", link.tap);
    if Path::new(&v6).exists() {
        write_sysctl(&v6)?;
    }
    ip(&["link", "set", "dev", &link.tap, "address", &link.host_mac])?;
    ip(&["addr", "replace", &link.host_cidr(), "dev", &link.tap])?;
    ip(&["link", "set", "dev", &link.tap, "up"])?;
    Ok(())
}

fn enable_forwarding() -> Result<(), NetError> {
    let on = std::fs::read_to_string(IP_FORWARD).is_ok_and(|s| s.trim() == "1");
    if !on {
        write_sysctl(IP_FORWARD)?;
        info!("enabled net.ipv4.ip_forward for VM egress");
    }
    Ok(())
}

fn write_sysctl(path: &str) -> Result<(), NetError> {
    std::fs::write(path, "1\n").map_err(|source| NetError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

fn table_exists() -> Result<bool, NetError> {
    let out = run("nft", &["list", "tables"], None)?;
    let line = format!("table inet {}", ruleset::TABLE);
    Ok(out.lines().any(|l| l.trim() == line))
}

fn link_exists(name: &str) -> Result<bool, NetError> {
    Ok(link_names()?.iter().any(|n| n == name))
}

fn link_names() -> Result<Vec<String>, NetError> {
    let out = ip(&["-j", "link", "show"])?;
    let bad = |source| NetError::BadOutput {
        cmd: "ip -j link show".into(),
        source,
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(bad)?;
    Ok(v.as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| l.get("ifname")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn vm_net_cidr() -> String {
    format!("{}/{}", crate::VM_NET, crate::VM_NET_PREFIX)
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args, None)
}

fn nft(batch: &str) -> Result<String, NetError> {
    run("nft", &["-f", "-"], Some(batch))
}

fn package(tool: &'static str) -> &'static str {
    match tool {
        "nft" => "nftables",
        "ip" => "iproute2",
        other => other,
    }
}

/// Runs `tool args`, feeding `stdin`, and returns its stdout.
fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let cmd = std::iter::once(tool)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    debug!(%cmd, "run");
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            ErrorKind::NotFound => NetError::ToolMissing {
                tool,
                package: package(tool),
            },
            _ => NetError::Spawn { tool, source },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its status tells why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetError::Spawn { tool, source })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("Operation not permitted") {
        return Err(NetError::NotPermitted { cmd });
    }
    Err(NetError::CommandFailed { cmd, stderr })
}
