//! Hosts joining the fleet: the invitations an admin makes (`nook host invite`) and this
//! host's answer to a new one that shows one (`nook host join TOKEN`, over the channel; see
//! `nook_channel::join`). What a joining host gets is what a host needs and nothing a VM
//! ever sees: the store's URL and the fleet's secrets key.

use super::*;

use nook_channel::{JoinGrant, JoinRequest, JoinToken};

/// How long an invitation lasts unless told otherwise, and at most.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(3600);
pub const MAX_INVITE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The row an invitation's store URL is sealed to: its own, so it opens for no other.
fn invite_row(digest: &str) -> String {
    format!("nook:host-invite:{digest}")
}

impl Manager {
    /// A one-time token with which a new machine joins this host's fleet within `ttl`,
    /// given `store` as the store's URL (this host's own when `None`: a URL naming
    /// `localhost` or a socket reaches nothing from another machine, so say another then).
    pub async fn invite_host(
        &self,
        ttl: Duration,
        store: Option<String>,
    ) -> Result<String, ApiError> {
        let (Some(fleet), nook_store::Location::Postgres(own)) = (&self.fleet, &self.cfg.store)
        else {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "This host keeps its state in SQLite, which no other host can share: start it with --store postgres://... to grow a fleet",
            ));
        };
        if ttl < Duration::from_secs(60) || ttl > MAX_INVITE_TTL {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "An invitation lasts from a minute to {} days",
                    MAX_INVITE_TTL.as_secs() / 86_400
                ),
            ));
        }
        let store = store.unwrap_or_else(|| own.clone());
        if !store.starts_with("postgres://") && !store.starts_with("postgresql://") {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "--store must be a postgres:// URL the new host can reach",
            ));
        }
        let identity = fleet.channel.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::HostMisconfigured,
                "This host's channel is not listening yet; try again in a moment",
            )
        })?;
        let token = JoinToken::new(
            &self.cfg.host_name,
            &nook_channel::with_port(&self.cfg.host_addr),
            identity.ca_sha256(),
        );
        let digest = nook_channel::secret_digest(&token.secret);
        self.store
            .add_host_invite(
                &digest,
                ttl.as_millis() as i64,
                &self.sealer.seal(&invite_row(&digest), store.as_bytes()),
            )
            .await
            .map_err(|e| errors::from_store("record the invitation", e))?;
        tracing::info!(
            ttl_secs = ttl.as_secs(),
            "made an invitation for a new host"
        );
        Ok(token.encode())
    }

    /// The grant for a host that shows an invitation's secret, taken once; or why not.
    pub(super) async fn grant_join(&self, request: JoinRequest) -> Result<JoinGrant, String> {
        let name = &request.host_name;
        crate::config::check_host_name(name).map_err(|why| format!("--host-name {why}"))?;
        // Checked before the invitation is taken, so a name in use costs no token.
        let hosts = self
            .store
            .hosts()
            .await
            .map_err(|_| "this host cannot reach the store; try again".to_string())?;
        if hosts
            .iter()
            .any(|h| &h.host.name == name && self.host_is_up(h))
        {
            return Err(format!(
                "host '{name}' is up already: give this one its own --host-name"
            ));
        }
        let digest = nook_channel::secret_digest(&request.secret);
        let sealed = self
            .store
            .take_host_invite(&digest)
            .await
            .map_err(|_| "this host cannot reach the store; try again".to_string())?
            .ok_or_else(|| {
                tracing::warn!(host = %name, "a host showed an invitation that is used, lapsed or unknown");
                "the invitation is used, lapsed or unknown: ask for a new one (`nook host invite`)".to_string()
            })?;
        let store = self
            .sealer
            .unseal(&invite_row(&digest), &sealed)
            .and_then(|s| String::from_utf8(s).ok())
            .ok_or_else(|| "the invitation does not open with this host's key".to_string())?;
        let secrets_key = crate::secrets::read_key(&self.cfg.data_dir)
            .map_err(|_| "this host cannot read its secrets key".to_string())?;
        tracing::info!(host = %name, "a new host joined the fleet with an invitation");
        Ok(JoinGrant { store, secrets_key })
    }
}
