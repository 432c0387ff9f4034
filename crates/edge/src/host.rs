//! Which site a request is for: the dashboard (`DOMAIN`), a VM (`NAME.DOMAIN`) or neither, and
//! which port of the VM it should reach.

/// Ports of a VM that users may open directly (`https://VM.DOMAIN:PORT`).
pub const VM_PORTS: std::ops::RangeInclusive<u16> = 3000..=9999;

/// The site a Host header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Site {
    Dashboard,
    Vm(String),
    Unknown,
}

/// A parsed Host (or `:authority`): lowercase name without trailing dot, and the port if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostName {
    pub name: String,
    pub port: Option<u16>,
}

/// Parses `name[:port]`. IP literals, empty names and malformed ports yield `None`.
pub(crate) fn parse_host(raw: &str) -> Option<HostName> {
    let raw = raw.trim();
    if raw.is_empty() || raw.starts_with('[') || raw.len() > 255 {
        return None;
    }
    let (name, port) = match raw.rsplit_once(':') {
        Some((n, p)) => (n, Some(p.parse::<u16>().ok()?)),
        None => (raw, None),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return None;
    }
    Some(HostName { name, port })
}

/// The names the edge serves under: the dashboard's host, and the domain whose one-label
/// subdomains are VMs. With `--vm-domain` they are different registrable domains, so no VM
/// is the same site as the dashboard: a VM's `Domain=` cookies and SameSite requests stop at
/// the VM domain and never reach the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sites {
    pub dashboard: String,
    pub vms: String,
}

/// Classifies a host name (already lowercase).
pub(crate) fn site(name: &str, sites: &Sites) -> Site {
    if name == sites.dashboard {
        return Site::Dashboard;
    }
    match name
        .strip_suffix(&sites.vms)
        .and_then(|p| p.strip_suffix('.'))
    {
        Some(label) if !label.is_empty() && !label.contains('.') => Site::Vm(label.to_string()),
        _ => Site::Unknown,
    }
}

/// How a connection was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerRole {
    /// The main HTTPS listener: the VM port comes from the Host header, else the VM's default.
    Main,
    /// A listener on one of the VM ports (3000–9999): its local port is the VM port.
    VmPort,
}

/// The VM port a request goes to. `None` means the VM's default port.
///
/// `public_port` is the port users type for the main listener (443, or 8443 in development);
/// a Host port equal to it is the main site, not a VM port. This also covers a daemon that
/// redirects 3000–9999 to the main listener with nftables: the Host header keeps the port.
pub(crate) fn vm_port(
    role: ListenerRole,
    local_port: u16,
    host_port: Option<u16>,
    public_port: u16,
) -> Result<Option<u16>, ()> {
    if role == ListenerRole::VmPort {
        return if VM_PORTS.contains(&local_port) {
            Ok(Some(local_port))
        } else {
            Err(())
        };
    }
    match host_port {
        None => Ok(None),
        Some(p) if p == public_port || p == local_port || p == 443 => Ok(None),
        Some(p) if VM_PORTS.contains(&p) => Ok(Some(p)),
        Some(_) => Err(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts() {
        assert_eq!(
            parse_host("Blog.Nook.LOCALHOST:8443"),
            Some(HostName {
                name: "blog.nook.localhost".into(),
                port: Some(8443)
            })
        );
        assert_eq!(
            parse_host("nook.localhost."),
            Some(HostName {
                name: "nook.localhost".into(),
                port: None
            })
        );
        assert_eq!(parse_host("a:b"), None);
        assert_eq!(parse_host("a:99999"), None);
        assert_eq!(parse_host("[::1]:80"), None);
        assert_eq!(parse_host("a b"), None);
        assert_eq!(parse_host(""), None);
    }

    fn one(domain: &str) -> Sites {
        Sites {
            dashboard: domain.into(),
            vms: domain.into(),
        }
    }

    #[test]
    fn classifies_sites() {
        let d = &one("nook.localhost");
        assert_eq!(site("nook.localhost", d), Site::Dashboard);
        assert_eq!(site("blog.nook.localhost", d), Site::Vm("blog".into()));
        assert_eq!(site("a.blog.nook.localhost", d), Site::Unknown);
        assert_eq!(site("evilnook.localhost", d), Site::Unknown);
        assert_eq!(site(".nook.localhost", d), Site::Unknown);
        assert_eq!(site("example.com", d), Site::Unknown);
        // With a VM domain of their own, VMs exist only there.
        let split = &Sites {
            dashboard: "nook.example".into(),
            vms: "nookvm.example".into(),
        };
        assert_eq!(site("nook.example", split), Site::Dashboard);
        assert_eq!(site("blog.nookvm.example", split), Site::Vm("blog".into()));
        assert_eq!(site("blog.nook.example", split), Site::Unknown);
        assert_eq!(site("nookvm.example", split), Site::Unknown);
    }

    #[test]
    fn chooses_ports() {
        assert_eq!(vm_port(ListenerRole::Main, 8443, None, 8443), Ok(None));
        assert_eq!(
            vm_port(ListenerRole::Main, 8443, Some(8443), 8443),
            Ok(None)
        );
        assert_eq!(
            vm_port(ListenerRole::Main, 8443, Some(3000), 8443),
            Ok(Some(3000))
        );
        assert_eq!(vm_port(ListenerRole::Main, 8443, Some(22), 8443), Err(()));
        assert_eq!(
            vm_port(ListenerRole::VmPort, 5000, None, 8443),
            Ok(Some(5000))
        );
        assert_eq!(
            vm_port(ListenerRole::VmPort, 5000, Some(8443), 8443),
            Ok(Some(5000))
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const LABEL: &str = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";

    proptest! {
        /// A Host header is the visitor's to choose.
        #[test]
        fn any_host_header_parses_or_is_refused_without_panicking(raw in any::<String>()) {
            if let Some(host) = parse_host(&raw) {
                prop_assert!(!host.name.is_empty());
                prop_assert!(!host.name.ends_with('.'));
                prop_assert!(host.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
            }
        }

        #[test]
        fn names_and_ports_round_trip(name in "[a-zA-Z0-9]([a-zA-Z0-9.-]{0,40}[a-zA-Z0-9])?", port in proptest::option::of(any::<u16>()), dot in any::<bool>()) {
            let raw = match port {
                Some(p) => format!("{name}{}:{p}", if dot { "." } else { "" }),
                None => format!("{name}{}", if dot { "." } else { "" }),
            };
            let host = parse_host(&raw).expect("a valid host parses");
            prop_assert_eq!(host.name, name.to_ascii_lowercase());
            prop_assert_eq!(host.port, port);
        }

        /// Exactly one label under the domain is a VM; nothing else is, so `a.b.DOMAIN` and
        /// `evilDOMAIN` never reach a VM.
        #[test]
        fn only_one_label_under_the_domain_is_a_vm(label in LABEL, other in LABEL, domain in "[a-z]{1,10}\\.[a-z]{2,5}") {
            let sites = Sites { dashboard: domain.clone(), vms: domain.clone() };
            prop_assert_eq!(site(&format!("{label}.{domain}"), &sites), Site::Vm(label.clone()));
            prop_assert_eq!(site(&domain, &sites), Site::Dashboard);
            prop_assert_eq!(site(&format!("{other}.{label}.{domain}"), &sites), Site::Unknown);
            prop_assert_eq!(site(&format!("{label}{domain}"), &sites), Site::Unknown);
        }
    }
}
