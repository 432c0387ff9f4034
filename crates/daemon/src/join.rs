//! The joining machine's side of `nook host join TOKEN`: checks its data dir can take a
//! fleet's state, asks the host the token names for it (`nook_channel::join`), and keeps
//! what it is given where `nook serve` reads it: the secrets key in `DATA_DIR/secrets.key`
//! and the store, host name and address in `DATA_DIR/nook.toml` (both mode 0600, as the
//! store's URL may carry a password).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::config::Settings;

/// The config file `nook serve` reads from the data dir when no `--config` is given.
pub const CONFIG_FILE: &str = "nook.toml";

/// What came of a join.
#[derive(Debug)]
pub struct Joined {
    /// The host the token named, which let this one in.
    pub through: String,
    pub host_name: String,
    pub config: std::path::PathBuf,
}

/// Joins the fleet `token` names as `host_name` (else the config file's, else the machine's
/// host name), reachable by its peers at `host_addr`, keeping what it is given in `data_dir`. Nothing is written unless the join is granted,
/// and the data dir is checked first, so a refusal costs no invitation.
pub async fn join_fleet(
    data_dir: &Path,
    token: &str,
    host_name: Option<&str>,
    host_addr: Option<&str>,
) -> Result<Joined, String> {
    let token = nook_channel::JoinToken::parse(token)?;
    let config = data_dir.join(CONFIG_FILE);
    let settings = if config.is_file() {
        Settings::from_file(&config).map_err(|e| e.to_string())?
    } else {
        Settings::default()
    };
    let host_name = match (host_name, settings.host_name.as_deref()) {
        (Some(flag), Some(file)) if flag != file => {
            return Err(format!(
                "--host-name {flag} differs from host_name = {file:?} in {}: use one",
                config.display()
            ));
        }
        (Some(name), _) | (None, Some(name)) => name.to_string(),
        (None, None) => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .ok_or("this machine has no host name: give one with --host-name")?,
    };
    let host_name = host_name.as_str();
    crate::config::check_host_name(host_name).map_err(|why| format!("--host-name {why}"))?;
    if let Some(store) = &settings.store {
        let scheme = store.split("://").next().unwrap_or("sqlite");
        return Err(format!(
            "{} already names a store ({scheme}): this data dir belongs to a host already. Join with a fresh --data-dir",
            config.display()
        ));
    }
    if crate::secrets::read_key(data_dir).is_ok() {
        return Err(format!(
            "{} has a secrets key of its own (nook ran here before): join with a fresh --data-dir, as this one's VMs and secrets would not come along",
            data_dir.display()
        ));
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot make {}: {e}", data_dir.display()))?;
    let grant = nook_channel::join(&token, host_name)
        .await
        .map_err(|e| match e {
            nook_channel::ChannelError::Refused { host, why } => {
                format!("host '{host}' refused: {why}")
            }
            other => format!("{other}; check the token's host is up and this machine reaches it"),
        })?;
    crate::secrets::write_key(data_dir, &grant.secrets_key)?;
    let mut lines = String::new();
    if !config.is_file() {
        lines.push_str("# Written by `nook host join`: this host's place in its fleet.\n");
    }
    let mut set = |key: &str, value: &str| {
        lines.push_str(&format!("{key} = {}\n", toml::Value::String(value.into())));
    };
    set("store", &grant.store);
    if settings.host_name.is_none() {
        set("host_name", host_name);
    }
    if let (Some(addr), None) = (host_addr, &settings.host_addr) {
        set("host_addr", addr);
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&config)
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    file.write_all(lines.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    // It was there before, perhaps readable by others; it names the store now.
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", config.display()))?;
    Ok(Joined {
        through: token.host,
        host_name: host_name.to_string(),
        config,
    })
}
