//! The nftables ruleset, as text. Pure: nothing here touches the host.

use std::fmt::Write as _;

use crate::{EgressBlockList, METADATA_ADDR, VM_NET, VM_NET_PREFIX, VmLink};

/// Name of the one table nook owns, in family `inet`.
pub(crate) const TABLE: &str = "nook";
/// Set of `ifname . ipv4_addr` pairs a VM may send from.
pub(crate) const SOURCES_SET: &str = "vm_sources";

/// The full `table inet nook` definition, without set elements.
///
/// `block` only filters forwarded traffic. The metadata address is the
/// host's own, so VMs reach it through the input chain whatever the list
/// holds, and nothing else on the host at all.
pub(crate) fn table(block: &EgressBlockList) -> String {
    let md = METADATA_ADDR;
    let nets = block.minimal();
    // nft rejects an empty set; with nothing to block there is no rule.
    let block_rule = if nets.is_empty() {
        String::new()
    } else {
        let list = nets.iter().map(ToString::to_string).collect::<Vec<_>>();
        format!(
            "\n\t\tiifname \"nk*\" ip daddr {{ {} }} drop",
            list.join(", ")
        )
    };
    format!(
        r#"table inet {TABLE} {{
	# Addresses each tap may send from: "nkN" . 10.200.x.2.
	set {SOURCES_SET} {{
		type ifname . ipv4_addr
	}}

	# Anti-spoofing, before conntrack. ARP is not in the inet family, so it
	# passes; IPv6 from VMs is dropped.
	chain prerouting {{
		type filter hook prerouting priority raw; policy accept;
		iifname "nk*" meta nfproto ipv6 drop
		iifname "nk*" iifname . ip saddr != @{SOURCES_SET} drop
	}}

	# VMs reach the metadata address (HTTP, DNS) and nothing else on the host.
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname != "nk*" accept
		ct state established,related accept
		ip daddr {md} tcp dport 80 accept
		ip daddr {md} meta l4proto {{ tcp, udp }} th dport 53 accept
		drop
	}}

	# VMs reach the internet, never each other nor private networks.
	chain forward {{
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		iifname "nk*" oifname "nk*" drop{block_rule}
		iifname "nk*" accept
		oifname "nk*" drop
	}}

	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr {VM_NET}/{VM_NET_PREFIX} oifname != "nk*" masquerade
	}}
}}
"#
    )
}

/// `{ "nk0" . 10.200.0.2, ... }`
fn elements(links: &[VmLink]) -> String {
    let mut s = String::from("{ ");
    for (i, l) in links.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "\"{}\" . {}", l.tap, l.guest_ip);
    }
    s.push_str(" }");
    s
}

/// One transaction that replaces the table atomically (creating it first so
/// the delete cannot fail) and refills the source set.
pub(crate) fn replace_batch(existing: &[VmLink], block: &EgressBlockList) -> String {
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    s.push_str(&table(block));
    if !existing.is_empty() {
        s.push_str(&add_elements(existing));
    }
    s
}

pub(crate) fn add_elements(links: &[VmLink]) -> String {
    format!(
        "add element inet {TABLE} {SOURCES_SET} {}\n",
        elements(links)
    )
}

/// Removes elements whether or not they are present: adding an existing
/// element is a no-op, so add-then-delete in one transaction never fails.
pub(crate) fn remove_elements(links: &[VmLink]) -> String {
    let e = elements(links);
    format!(
        "add element inet {TABLE} {SOURCES_SET} {e}\ndelete element inet {TABLE} {SOURCES_SET} {e}\n"
    )
}

/// Deletes the table whether or not it exists.
pub(crate) fn delete_batch() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetError;

    #[test]
    fn table_snapshot() {
        let expected = r#"table inet nook {
	# Addresses each tap may send from: "nkN" . 10.200.x.2.
	set vm_sources {
		type ifname . ipv4_addr
	}

	# Anti-spoofing, before conntrack. ARP is not in the inet family, so it
	# passes; IPv6 from VMs is dropped.
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		iifname "nk*" meta nfproto ipv6 drop
		iifname "nk*" iifname . ip saddr != @vm_sources drop
	}

	# VMs reach the metadata address (HTTP, DNS) and nothing else on the host.
	chain input {
		type filter hook input priority filter; policy accept;
		iifname != "nk*" accept
		ct state established,related accept
		ip daddr 169.254.169.254 tcp dport 80 accept
		ip daddr 169.254.169.254 meta l4proto { tcp, udp } th dport 53 accept
		drop
	}

	# VMs reach the internet, never each other nor private networks.
	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		iifname "nk*" oifname "nk*" drop
		iifname "nk*" ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 168.63.129.16/32, 169.254.0.0/16, 172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/4, 240.0.0.0/4 } drop
		iifname "nk*" accept
		oifname "nk*" drop
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.200.0.0/16 oifname != "nk*" masquerade
	}
}
"#;
        let default = EgressBlockList::default();
        assert_eq!(table(&default), expected);
        assert_eq!(crate::HostNet::ruleset_text(&default), expected);
    }

    /// The forward chain's drop rule, the one line the block list decides.
    fn block_rule(block: &EgressBlockList) -> Option<String> {
        table(block)
            .lines()
            .find(|l| l.contains("ip daddr {") && l.ends_with("drop"))
            .map(|l| l.trim().to_owned())
    }

    #[test]
    fn block_list_is_configurable() -> Result<(), NetError> {
        let custom = EgressBlockList::parse(&["203.0.113.0/24", "198.51.100.7"])?;
        assert_eq!(
            block_rule(&custom).as_deref(),
            Some(r#"iifname "nk*" ip daddr { 198.51.100.7/32, 203.0.113.0/24 } drop"#)
        );
        // Nothing to block: no rule (nft refuses an empty set), and the rest
        // of the isolation stays.
        let none = EgressBlockList::parse::<&str>(&[])?;
        assert_eq!(block_rule(&none), None);
        let t = table(&none);
        assert!(
            t.contains("iifname \"nk*\" oifname \"nk*\" drop\n\t\tiifname \"nk*\" accept"),
            "{t}"
        );
        assert!(
            t.contains("ip daddr 169.254.169.254 tcp dport 80 accept"),
            "{t}"
        );
        // The batch carries the list it is given.
        assert!(replace_batch(&[], &custom).contains("198.51.100.7/32, 203.0.113.0/24"));
        Ok(())
    }

    /// The metadata address sits inside a blocked range, and stays reachable
    /// because the input chain, which the block list is not part of, takes it.
    #[test]
    fn metadata_stays_reachable_inside_a_blocked_range() {
        let default = EgressBlockList::default();
        assert!(default.blocks(METADATA_ADDR));
        let t = table(&default);
        let input = t
            .split("chain input {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .unwrap_or_default();
        assert!(!input.contains("ip daddr {"), "{input}");
        assert!(input.contains(&format!("ip daddr {METADATA_ADDR} tcp dport 80 accept")));
    }

    #[test]
    fn batches() -> Result<(), NetError> {
        let links = [VmLink::for_slot(0)?, VmLink::for_slot(1)?];
        let b = replace_batch(&links, &EgressBlockList::default());
        assert!(b.starts_with("table inet nook\ndelete table inet nook\ntable inet nook {"));
        assert!(b.ends_with(
            "add element inet nook vm_sources { \"nk0\" . 10.200.0.2, \"nk1\" . 10.200.0.6 }\n"
        ));
        assert!(!replace_batch(&[], &EgressBlockList::default()).contains("add element"));
        assert_eq!(
            remove_elements(&links[1..]),
            "add element inet nook vm_sources { \"nk1\" . 10.200.0.6 }\n\
             delete element inet nook vm_sources { \"nk1\" . 10.200.0.6 }\n"
        );
        assert_eq!(delete_batch(), "table inet nook\ndelete table inet nook\n");
        Ok(())
    }
}
