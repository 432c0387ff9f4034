//! Name resolution that refuses private addresses, for integration targets a VM owner names:
//! otherwise `--target http://127.0.0.1:…` (or a name resolving there, even after a first
//! answer that looked public) would reach the host and the network VMs are kept off.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// Whether an owner-named target may be reached at an address.
pub type AddressPolicy = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Resolves with the system's resolver and keeps only addresses `allowed` accepts; none left
/// is an error naming the host. The connection is then made to exactly those addresses.
#[derive(Clone)]
pub struct PublicOnly {
    pub allowed: AddressPolicy,
}

impl tower_service::Service<Name> for PublicOnly {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allowed = self.allowed.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allowed(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves only to addresses VMs may not reach"),
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// A policy for the common case: global unicast addresses only (IPv4 as `blocked4` says).
pub fn public_only(
    blocked4: impl Fn(std::net::Ipv4Addr) -> bool + Send + Sync + 'static,
) -> AddressPolicy {
    Arc::new(move |ip| match ip {
        IpAddr::V4(v4) => !blocked4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => !blocked4(v4),
            None => {
                let first = v6.segments()[0];
                // Global unicast (2000::/3) only: no loopback, link-local, ULA or multicast.
                (0x2000..0x4000).contains(&first)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_v6_local_addresses_are_refused() {
        let policy = public_only(|ip| ip.is_private() || ip.is_loopback());
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!policy(bad.parse().expect("ip")), "{bad}");
        }
        for good in ["1.1.1.1", "2606:4700::1111"] {
            assert!(policy(good.parse().expect("ip")), "{good}");
        }
    }
}
