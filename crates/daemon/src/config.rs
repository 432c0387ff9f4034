//! The daemon's one typed config: defaults, then a TOML file, then environment, then flags,
//! validated once into [`Config`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Every setting, all optional, as any one layer gives them. Later layers win field by field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub data_dir: Option<PathBuf>,
    /// Where built images live; defaults to `DATA_DIR/images`. Several daemons may share it.
    pub images_dir: Option<PathBuf>,
    /// The QEMU binary; `qemu-system-x86_64` on PATH when unset.
    pub qemu: Option<PathBuf>,
    /// The static guest-agent binary; defaults to `nook-guest-agent` beside the `nook` binary.
    pub agent: Option<PathBuf>,
    /// `auto` (probe by booting), `kvm` or `tcg`.
    pub accel: Option<String>,
    /// `auto`, `tap` (root: taps and nftables) or `user` (rootless, no egress).
    pub net: Option<String>,
    /// IPv4 networks VMs may not reach (`A.B.C.D/N` or an address), replacing
    /// `nook_net::DEFAULT_EGRESS_BLOCK`: cloud metadata, private and special ranges.
    pub egress_block: Option<Vec<String>>,
    /// The first uid (and gid) of the range VMs' QEMUs run as, one per VM
    /// [default: `nook_vmm::jail::DEFAULT_JAIL_UID_BASE`]. No user, group, subordinate id
    /// range or process on the host may use the range: startup checks.
    pub jail_uid_base: Option<u32>,
    /// Who may sign up: `open`, `email`, `invite` or `closed` (see [`SignupPolicy`]);
    /// `email` when SMTP is set up, else `invite`.
    pub signup: Option<String>,
    /// Seconds a new or started VM has to answer its agent's readiness probe.
    pub ready_timeout_secs: Option<u64>,
    /// The resolver VMs are told to use.
    pub dns: Option<String>,
    /// `RUST_LOG`-style filter.
    pub log: Option<String>,
    /// Where the SSH front door listens; `off` disables it.
    pub ssh_addr: Option<String>,
    /// The host name users type to reach this host, shown in instructions.
    pub public_host: Option<String>,
    /// The dashboard's domain: `https://DOMAIN/`; VMs are under it too without `vm_domain`.
    pub domain: Option<String>,
    /// A domain of the VMs' own: `https://VM.VM_DOMAIN/`.
    pub vm_domain: Option<String>,
    /// The envelope new accounts get: vCPUs, memory, total disk, number of VMs.
    pub plan_cpu: Option<f64>,
    pub plan_memory: Option<String>,
    pub plan_disk: Option<String>,
    pub plan_max_vms: Option<u32>,
    /// How far the nominal memory of an account's running VMs may exceed its envelope,
    /// relying on idle VMs giving memory back.
    pub memory_overcommit: Option<f64>,
    /// The most memory all running VMs of all accounts may be given together, e.g. `96G`
    /// [default: the host's RAM times `memory_overcommit`].
    pub host_memory: Option<String>,
    /// The most disk all VMs of all accounts may be given together (disks are thin, so this
    /// may pass the filesystem's size) [default: 4 times the data dir's filesystem].
    pub host_disk: Option<String>,
    /// Memory kept free on the host: a VM is not started when what it would touch, beside
    /// what the host really has left in RAM and swap, would eat into this, e.g. `1G`
    /// [default: 1/32 of RAM, at least 256M].
    pub host_memory_reserve: Option<String>,
    /// The most VMs on the host, all accounts together [default: 1000].
    pub host_max_vms: Option<u32>,
    /// Seconds of near-zero CPU and network before a VM's idle knobs turn on.
    pub idle_after_secs: Option<u64>,
    /// Seconds between replicas of a VM that has a replica host [default: 60].
    pub replicate_every_secs: Option<u64>,
    /// Serve Prometheus metrics over TCP too (they are always on the admin socket).
    pub metrics_addr: Option<String>,
    /// Memory reclaim (balloon free page reporting, KSM). On by default;
    /// off only to measure what it saves.
    pub reclaim: Option<bool>,
    /// Under TCG, each QEMU's translation cache in MiB (16 to 2048): more runs big guests
    /// faster, at up to that much memory per VM [default: 128].
    pub tcg_cache_mib: Option<u32>,
    /// Where the HTTPS edge listens (`https://VM.DOMAIN/`); `off` disables it.
    pub https_addr: Option<String>,
    /// VM web ports reachable as `https://VM.DOMAIN:PORT/` (`3000-9999`), or `off`.
    pub vm_ports: Option<String>,
    /// Where nook's authoritative DNS server for DOMAIN listens; off by default.
    pub dns_addr: Option<String>,
    /// The address DNS gives for DOMAIN and every VM name.
    pub public_ip: Option<String>,
    /// An ACME directory URL: get a wildcard certificate by DNS-01 (needs `dns_addr`).
    pub acme_directory: Option<String>,
    /// Contact email for the ACME account.
    pub acme_email: Option<String>,
    /// A PEM root to trust for the ACME server alone (a test CA such as Pebble).
    pub acme_root_ca: Option<PathBuf>,
    /// SMTP server for email login links; off when unset.
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    /// `none`, `starttls` or `tls`.
    pub smtp_security: Option<String>,
    pub smtp_from: Option<String>,
    pub smtp_user: Option<String>,
    pub smtp_password: Option<String>,
    /// Anthropic's API for the LLM gateway [default: https://api.anthropic.com].
    pub llm_anthropic_base_url: Option<String>,
    /// The host's Anthropic key; without it the gateway refuses Anthropic requests.
    pub llm_anthropic_key: Option<String>,
    /// OpenAI's API for the LLM gateway [default: https://api.openai.com].
    pub llm_openai_base_url: Option<String>,
    pub llm_openai_key: Option<String>,
    /// More providers, each with an OpenAI- or Anthropic-style API (file only).
    pub llm_providers: Option<Vec<crate::gateway::ProviderSettings>>,
    /// Prices per provider and model in dollars per million tokens, replacing the built-in
    /// table of that provider (file only). Only priced models may be used.
    pub llm_prices: Option<
        std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, crate::gateway::PriceSettings>,
        >,
    >,
    /// LLM credit a new account starts with, in dollars [default: 0].
    pub llm_initial_credit: Option<f64>,
    /// Gateway requests per minute per account, per VM, and tokens per minute per account
    /// (0: no limit).
    pub llm_account_rpm: Option<u32>,
    pub llm_vm_rpm: Option<u32>,
    pub llm_account_tpm: Option<u64>,
    /// The largest request body the gateway passes on [default: 16M].
    pub llm_max_body: Option<String>,
    /// Where GitHub integrations send git [default: https://github.com] and REST calls
    /// [default: https://api.github.com]; a GitHub Enterprise host, or a test's.
    pub github_url: Option<String>,
    pub github_api_url: Option<String>,
    /// IPv4 networks an http-proxy integration's target may be at although `egress_block`
    /// (or loopback) covers them, e.g. an API on the host's own network (file only).
    pub integrations_allow: Option<Vec<String>>,
    /// The coding agent's model, `PROVIDER/MODEL` through the gateway
    /// [default: anthropic/claude-sonnet-4-5].
    pub agent_model: Option<String>,
    /// The headless browser the agent's `browser` tool drives [default: /usr/bin/chromium].
    pub browser: Option<PathBuf>,
    /// How hard idle VMs' memory is packed: `off`, `balanced` or `dense` [default: off].
    pub pack: Option<String>,
    /// How `cp` forks a running VM's memory: instantly, sharing it, and then `own` (each
    /// side moves, in the background, into memory of its own, so its next fork is instant
    /// too) or `shared` (they go on sharing it; a fork of either copies); or `copy` (a live
    /// copy) [default: own].
    pub fork_memory: Option<String>,
    /// Where the host's state lives: `sqlite` (the embedded file in the data dir, the
    /// default) or a `postgres://` URL, a database several hosts can share.
    pub store: Option<String>,
    /// This host's name in the fleet [default: the machine's host name].
    pub host_name: Option<String>,
    /// Where other hosts reach this one, HOST:PORT [default: the host name].
    pub host_addr: Option<String>,
    /// The top cgroup this daemon's groups live under: another name lets several daemons
    /// share a machine, each in its own network namespace [default: nook].
    pub cgroup_top: Option<String>,
}

impl Settings {
    /// Overlays `other` on `self`: any field `other` sets wins.
    pub fn merge(self, other: Settings) -> Settings {
        Settings {
            data_dir: other.data_dir.or(self.data_dir),
            images_dir: other.images_dir.or(self.images_dir),
            qemu: other.qemu.or(self.qemu),
            agent: other.agent.or(self.agent),
            accel: other.accel.or(self.accel),
            net: other.net.or(self.net),
            egress_block: other.egress_block.or(self.egress_block),
            jail_uid_base: other.jail_uid_base.or(self.jail_uid_base),
            signup: other.signup.or(self.signup),
            ready_timeout_secs: other.ready_timeout_secs.or(self.ready_timeout_secs),
            dns: other.dns.or(self.dns),
            log: other.log.or(self.log),
            ssh_addr: other.ssh_addr.or(self.ssh_addr),
            public_host: other.public_host.or(self.public_host),
            domain: other.domain.or(self.domain),
            vm_domain: other.vm_domain.or(self.vm_domain),
            plan_cpu: other.plan_cpu.or(self.plan_cpu),
            plan_memory: other.plan_memory.or(self.plan_memory),
            plan_disk: other.plan_disk.or(self.plan_disk),
            plan_max_vms: other.plan_max_vms.or(self.plan_max_vms),
            memory_overcommit: other.memory_overcommit.or(self.memory_overcommit),
            host_memory: other.host_memory.or(self.host_memory),
            host_disk: other.host_disk.or(self.host_disk),
            host_memory_reserve: other.host_memory_reserve.or(self.host_memory_reserve),
            host_max_vms: other.host_max_vms.or(self.host_max_vms),
            idle_after_secs: other.idle_after_secs.or(self.idle_after_secs),
            replicate_every_secs: other.replicate_every_secs.or(self.replicate_every_secs),
            metrics_addr: other.metrics_addr.or(self.metrics_addr),
            reclaim: other.reclaim.or(self.reclaim),
            tcg_cache_mib: other.tcg_cache_mib.or(self.tcg_cache_mib),
            https_addr: other.https_addr.or(self.https_addr),
            vm_ports: other.vm_ports.or(self.vm_ports),
            dns_addr: other.dns_addr.or(self.dns_addr),
            public_ip: other.public_ip.or(self.public_ip),
            acme_directory: other.acme_directory.or(self.acme_directory),
            acme_email: other.acme_email.or(self.acme_email),
            acme_root_ca: other.acme_root_ca.or(self.acme_root_ca),
            smtp_host: other.smtp_host.or(self.smtp_host),
            smtp_port: other.smtp_port.or(self.smtp_port),
            smtp_security: other.smtp_security.or(self.smtp_security),
            llm_anthropic_base_url: other.llm_anthropic_base_url.or(self.llm_anthropic_base_url),
            llm_anthropic_key: other.llm_anthropic_key.or(self.llm_anthropic_key),
            llm_openai_base_url: other.llm_openai_base_url.or(self.llm_openai_base_url),
            llm_openai_key: other.llm_openai_key.or(self.llm_openai_key),
            llm_providers: other.llm_providers.or(self.llm_providers),
            llm_prices: other.llm_prices.or(self.llm_prices),
            llm_initial_credit: other.llm_initial_credit.or(self.llm_initial_credit),
            llm_account_rpm: other.llm_account_rpm.or(self.llm_account_rpm),
            llm_vm_rpm: other.llm_vm_rpm.or(self.llm_vm_rpm),
            llm_account_tpm: other.llm_account_tpm.or(self.llm_account_tpm),
            llm_max_body: other.llm_max_body.or(self.llm_max_body),
            github_url: other.github_url.or(self.github_url),
            github_api_url: other.github_api_url.or(self.github_api_url),
            integrations_allow: other.integrations_allow.or(self.integrations_allow),
            agent_model: other.agent_model.or(self.agent_model),
            browser: other.browser.or(self.browser),
            pack: other.pack.or(self.pack),
            fork_memory: other.fork_memory.or(self.fork_memory),
            store: other.store.or(self.store),
            host_name: other.host_name.or(self.host_name),
            host_addr: other.host_addr.or(self.host_addr),
            cgroup_top: other.cgroup_top.or(self.cgroup_top),
            smtp_from: other.smtp_from.or(self.smtp_from),
            smtp_user: other.smtp_user.or(self.smtp_user),
            smtp_password: other.smtp_password.or(self.smtp_password),
        }
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e.to_string()))
    }
}

/// What all accounts together may be given on this host: each account's envelope bounds it,
/// and these bound the sum, so many accounts cannot together promise more than the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Running VMs' memory, all accounts together.
    pub memory_mib: u64,
    /// All VMs' disks, all accounts together.
    pub disk_bytes: u64,
    pub max_vms: u32,
    /// Memory the host keeps free from new VMs, measured against what it really has left.
    pub memory_reserve_bytes: u64,
    /// `memory_mib` was worked out from the host's RAM (no `host_memory`), so packing idle
    /// VMs stretches it as it stretches each envelope.
    pub memory_from_ram: bool,
}

/// The host's RAM in MiB, from `/proc/meminfo`.
fn host_ram_mib() -> Option<u64> {
    let total = nook_memory::HostMemory::read().total_bytes;
    (total > 0).then_some(total >> 20)
}

/// The size of the filesystem that holds `dir` (or its nearest existing parent).
fn filesystem_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    let fs = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(fs.blocks() * fs.fragment_size())
}

/// Who may make an account with `signup`. Whatever the policy, the first account on a fresh
/// host is made (it becomes the host's owner), and the admin can always add one with
/// `nook account add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignupPolicy {
    /// Anyone; the email counts only once a mailed link proves it (with SMTP), or the admin
    /// vouches for it.
    Open,
    /// Anyone, but the account can do nothing until it follows the link mailed to its email.
    Email,
    /// Only with a code from `nook account invite EMAIL`.
    Invite,
    /// Nobody: the admin adds accounts.
    Closed,
}

impl SignupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SignupPolicy::Open => "open",
            SignupPolicy::Email => "email",
            SignupPolicy::Invite => "invite",
            SignupPolicy::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetChoice {
    Auto,
    Tap,
    User,
}

/// A host name is what its channel certificate carries and what users see in `ls`.
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "{name:?}: use 1 to 63 letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

/// The validated runtime config.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub images_dir: PathBuf,
    pub qemu: Option<PathBuf>,
    pub agent: PathBuf,
    pub accel: AccelChoice,
    pub net: NetChoice,
    /// What VMs on taps may not reach; see [`Settings::egress_block`].
    pub egress_block: nook_net::EgressBlockList,
    /// The uids VMs' QEMUs run as when the daemon is root.
    pub jail_uids: nook_vmm::jail::JailUids,
    pub signup: SignupPolicy,
    pub ready_timeout: Duration,
    pub dns: String,
    pub log: String,
    pub ssh_addr: Option<std::net::SocketAddr>,
    pub public_host: String,
    /// The dashboard's domain.
    pub domain: String,
    /// The domain VMs are one label under: `vm_domain` when set, else `domain`.
    pub vm_domain: String,
    pub default_plan: nook_store::Plan,
    pub memory_overcommit: f64,
    /// What all accounts together may use on this host.
    pub host_limits: HostLimits,
    pub idle_after: Duration,
    /// How often a VM with a replica host is replicated (the recovery point's bound).
    pub replicate_every: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub reclaim: bool,
    /// Each TCG QEMU's translation cache, MiB.
    pub tcg_cache_mib: u32,
    pub web: WebConfig,
    /// The LLM gateway's providers, prices and limits.
    pub gateway: nook_gateway::GatewayConfig,
    /// LLM credit a new account starts with, in micro-dollars.
    pub llm_initial_credit_micros: i64,
    pub github_url: String,
    pub github_api_url: String,
    pub coding_agent: CodingAgentConfig,
    /// How hard idle VMs' memory is packed into the tiers below RAM.
    pub pack: nook_memory::Pack,
    /// Whether a VM and its fork each move into memory of their own after an instant fork.
    pub fork_memory: ForkMemory,
    pub store: nook_store::Location,
    /// This host's name among the hosts sharing the store.
    pub host_name: String,
    pub host_addr: String,
    /// The top cgroup of this daemon's groups.
    pub cgroup_top: String,
}

/// The coding agent: the model it talks to through the gateway, and its browser.
#[derive(Debug, Clone)]
pub struct CodingAgentConfig {
    /// A provider of the gateway's.
    pub provider: String,
    pub model: String,
    pub api: nook_agent::Api,
    pub browser: PathBuf,
}

/// The HTTPS edge, its DNS server and certificates.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub https_addr: Option<std::net::SocketAddr>,
    /// First and last VM port served on their own listeners.
    pub vm_ports: Option<(u16, u16)>,
    pub dns_addr: Option<std::net::SocketAddr>,
    pub public_ip: std::net::IpAddr,
    pub acme: Option<AcmeSettings>,
    pub smtp: Option<nook_edge::SmtpConfig>,
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    pub root_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("Invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// The default model of the coding agent.
pub const DEFAULT_AGENT_MODEL: &str = "anthropic/claude-sonnet-4-5";

fn coding_agent_from(
    gateway: &nook_gateway::GatewayConfig,
    model: Option<String>,
    browser: Option<PathBuf>,
) -> Result<CodingAgentConfig, ConfigError> {
    let setting = model.unwrap_or_else(|| DEFAULT_AGENT_MODEL.into());
    let Some((provider, model)) = setting
        .split_once('/')
        .filter(|(p, m)| !p.is_empty() && !m.is_empty())
    else {
        return Err(ConfigError::Invalid(
            "agent_model",
            format!("{setting:?}: write PROVIDER/MODEL, e.g. {DEFAULT_AGENT_MODEL}"),
        ));
    };
    let Some(p) = gateway.provider(provider) else {
        let known: Vec<&str> = gateway.providers.iter().map(|p| p.name.as_str()).collect();
        return Err(ConfigError::Invalid(
            "agent_model",
            format!(
                "{setting:?}: the gateway has no provider {provider:?} (it has: {})",
                known.join(", ")
            ),
        ));
    };
    let api = match p.kind {
        nook_gateway::ApiKind::Anthropic => nook_agent::Api::Anthropic,
        nook_gateway::ApiKind::OpenAi => nook_agent::Api::OpenAi,
    };
    Ok(CodingAgentConfig {
        provider: provider.to_string(),
        model: model.to_string(),
        api,
        browser: browser.unwrap_or_else(|| PathBuf::from("/usr/bin/chromium")),
    })
}

/// `/var/lib/nook` for root, else `~/.local/share/nook`.
/// The embedded SQLite file for `sqlite` or no setting, else a checked `postgres://` URL.
fn store_location(
    setting: Option<&str>,
    data_dir: &Path,
) -> Result<nook_store::Location, ConfigError> {
    let Some(url) = setting.filter(|s| *s != "sqlite") else {
        return Ok(nook_store::Location::Sqlite(data_dir.join("nook.sqlite")));
    };
    let scheme_ok = ["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if !scheme_ok {
        // The URL may hold a password: the message names the scheme only.
        let scheme = url.split_once("://").map_or("(none)", |(scheme, _)| scheme);
        return Err(ConfigError::Invalid(
            "store",
            format!(
                "expected `sqlite` or a postgres://USER:PASSWORD@HOST/DB URL, got scheme {scheme}"
            ),
        ));
    }
    Ok(nook_store::Location::Postgres(url.to_string()))
}

/// What an instant fork's two VMs do with the memory they share (see `manager/successor.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkMemory {
    /// No instant fork: `cp` copies a running VM's memory, and guest RAM is QEMU's anonymous
    /// memory (KSM can merge it).
    Copy,
    /// The default: each moves into memory of its own, so every fork is instant; they share
    /// nothing after.
    Own,
    /// They keep sharing it; a fork of either copies.
    Shared,
}

pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/nook");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/nook")
}

impl Config {
    pub fn validate(mut s: Settings) -> Result<Config, ConfigError> {
        let (gateway, llm_initial_credit_micros) = crate::gateway::config_from(&mut s)?;
        let data_dir = s.data_dir.unwrap_or_else(default_data_dir);
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir", "must not be empty".into()));
        }
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| ConfigError::Invalid("data_dir", e.to_string()))?;
        let images_dir = match s.images_dir {
            Some(dir) => std::path::absolute(&dir)
                .map_err(|e| ConfigError::Invalid("images_dir", e.to_string()))?,
            None => data_dir.join("images"),
        };
        let agent = match s.agent {
            Some(path) => path,
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("nook-guest-agent")))
                .unwrap_or_else(|| PathBuf::from("nook-guest-agent")),
        };
        let accel = match s.accel.as_deref().unwrap_or("auto") {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            other => {
                return Err(ConfigError::Invalid(
                    "accel",
                    format!("{other:?}: use auto, kvm or tcg"),
                ));
            }
        };
        let net = match s.net.as_deref().unwrap_or("auto") {
            "auto" => NetChoice::Auto,
            "tap" => NetChoice::Tap,
            "user" => NetChoice::User,
            other => {
                return Err(ConfigError::Invalid(
                    "net",
                    format!("{other:?}: use auto, tap or user"),
                ));
            }
        };
        let egress_block = match &s.egress_block {
            None => nook_net::EgressBlockList::default(),
            Some(list) => nook_net::EgressBlockList::parse(list)
                .map_err(|e| ConfigError::Invalid("egress_block", e.to_string()))?,
        };
        let jail_uids = nook_vmm::jail::JailUids {
            base: s
                .jail_uid_base
                .unwrap_or(nook_vmm::jail::DEFAULT_JAIL_UID_BASE),
            count: nook_net::MAX_SLOT + 1,
        };
        // Above the ids of users, `nobody` and the 16-bit world; below systemd's foreign range
        // (0x7ffe0000) and the sign bit some tools mishandle.
        let highest = 0x7ffe_0000 - u64::from(jail_uids.count);
        if !(65_536..=highest).contains(&u64::from(jail_uids.base)) {
            return Err(ConfigError::Invalid(
                "jail_uid_base",
                format!(
                    "{}: use a free range of {} ids between 65536 and {highest}",
                    jail_uids.base, jail_uids.count
                ),
            ));
        }
        let allow = match &s.integrations_allow {
            None => nook_net::EgressBlockList::parse::<&str>(&[]),
            Some(list) => nook_net::EgressBlockList::parse(list),
        }
        .map_err(|e| ConfigError::Invalid("integrations_allow", e.to_string()))?;
        let mut gateway = gateway;
        let block = egress_block.clone();
        // What VMs may not reach by their own network, plus the host itself and the VMs'
        // network, whatever egress_block says: an integration must not be a way around it.
        gateway.target_policy = nook_gateway::resolve::public_only(move |ip| {
            let vm_net = u32::from(ip) >> (32 - u32::from(nook_net::VM_NET_PREFIX))
                == u32::from(nook_net::VM_NET) >> (32 - u32::from(nook_net::VM_NET_PREFIX));
            (block.blocks(ip) || ip.is_loopback() || ip.is_unspecified() || vm_net)
                && !allow.blocks(ip)
        });
        let ready = s.ready_timeout_secs.unwrap_or(120);
        if ready == 0 || ready > 3600 {
            return Err(ConfigError::Invalid(
                "ready_timeout_secs",
                format!("{ready}: use 1 to 3600"),
            ));
        }
        let dns = s.dns.unwrap_or_else(|| "1.1.1.1".into());
        if dns.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(ConfigError::Invalid(
                "dns",
                format!("{dns:?} is not an IPv4 address"),
            ));
        }
        let ssh_addr = match s.ssh_addr.as_deref().unwrap_or("0.0.0.0:2222") {
            "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                ConfigError::Invalid("ssh_addr", format!("{addr:?}: use HOST:PORT or off"))
            })?),
        };
        let domain_name = |setting: &'static str, d: String| {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d.is_empty()
                || d.split('.').any(|l| {
                    l.is_empty() || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            {
                return Err(ConfigError::Invalid(
                    setting,
                    format!("{d:?} is not a domain name"),
                ));
            }
            Ok(d)
        };
        let domain = domain_name(
            "domain",
            s.domain.unwrap_or_else(|| "nook.localhost".into()),
        )?;
        let vm_domain = match s.vm_domain {
            Some(v) => domain_name("vm_domain", v)?,
            // Names under .localhost cost nothing and reach this machine from any browser, so
            // the local default gives VMs a site of their own (`nook-vm.localhost`). A real
            // domain's owner must name a second domain they own: until then VMs share it.
            None => match domain.strip_suffix(".localhost") {
                Some(first) if !first.contains('.') => format!("{first}-vm.localhost"),
                _ => domain.clone(),
            },
        };
        if vm_domain != domain
            && (vm_domain.ends_with(&format!(".{domain}"))
                || domain.ends_with(&format!(".{vm_domain}")))
        {
            return Err(ConfigError::Invalid(
                "vm_domain",
                format!(
                    "{vm_domain:?} lies inside {domain:?} (or the other way round), so VMs would share the dashboard's site: use a domain of its own, e.g. {domain} and {}-vms.{}",
                    domain.split('.').next().unwrap_or("nook"),
                    domain.split_once('.').map_or("example", |(_, rest)| rest)
                ),
            ));
        }
        let size =
            |name: &'static str, v: Option<String>, default: u64| -> Result<u64, ConfigError> {
                match v {
                    Some(text) => nook_api::parse_size(&text)
                        .map_err(|e| ConfigError::Invalid(name, e.message)),
                    None => Ok(default),
                }
            };
        let default_plan = nook_store::Plan {
            cpu: s.plan_cpu.unwrap_or(2.0),
            memory_mib: (size("plan_memory", s.plan_memory, 8 << 30)? >> 20) as u32,
            disk_bytes: size("plan_disk", s.plan_disk, 100 << 30)?,
            max_vms: s.plan_max_vms.unwrap_or(50),
        };
        if !(0.1..=1024.0).contains(&default_plan.cpu)
            || default_plan.memory_mib < 128
            || default_plan.max_vms == 0
        {
            return Err(ConfigError::Invalid(
                "plan_*",
                "the default plan needs at least 0.1 CPU, 128M and one VM".into(),
            ));
        }
        let memory_overcommit = s.memory_overcommit.unwrap_or(4.0);
        if !(1.0..=100.0).contains(&memory_overcommit) {
            return Err(ConfigError::Invalid(
                "memory_overcommit",
                format!("{memory_overcommit}: use 1 to 100"),
            ));
        }
        let size =
            |key: &'static str, value: &Option<String>| -> Result<Option<u64>, ConfigError> {
                value
                    .as_deref()
                    .map(|v| {
                        nook_api::parse_size(v)
                            .map_err(|e| ConfigError::Invalid(key, format!("{v:?}: {}", e.message)))
                    })
                    .transpose()
            };
        let host_limits = HostLimits {
            memory_mib: match size("host_memory", &s.host_memory)? {
                Some(bytes) => bytes >> 20,
                None => (host_ram_mib().unwrap_or(8192) as f64 * memory_overcommit) as u64,
            },
            disk_bytes: match size("host_disk", &s.host_disk)? {
                Some(bytes) => bytes,
                None => filesystem_bytes(&data_dir)
                    .unwrap_or(100 << 30)
                    .saturating_mul(4),
            },
            max_vms: s.host_max_vms.unwrap_or(1000),
            memory_from_ram: s.host_memory.is_none(),
            memory_reserve_bytes: match size("host_memory_reserve", &s.host_memory_reserve)? {
                Some(bytes) => bytes,
                None => nook_memory::default_reserve(host_ram_mib().unwrap_or(8192) << 20),
            },
        };
        if host_limits.memory_mib < 128 || host_limits.max_vms == 0 {
            return Err(ConfigError::Invalid(
                "host_memory",
                "the host must allow at least one VM: host_memory at least 128M and host_max_vms at least 1".into(),
            ));
        }
        let idle_after = Duration::from_secs(s.idle_after_secs.unwrap_or(60).max(1));
        let tcg_cache_mib = match s.tcg_cache_mib.unwrap_or(nook_vmm::TCG_CACHE_MIB) {
            // QEMU caps an x86-64 host's cache at 2 GiB.
            mib @ 16..=2048 => mib,
            other => {
                return Err(ConfigError::Invalid(
                    "tcg_cache_mib",
                    format!("{other}: give the translation cache in MiB, from 16 to 2048"),
                ));
            }
        };
        let replicate_every = match s.replicate_every_secs.unwrap_or(60) {
            0 => {
                return Err(ConfigError::Invalid(
                    "replicate_every_secs",
                    "0: give the seconds between replicas, at least 1".into(),
                ));
            }
            secs => Duration::from_secs(secs),
        };
        let metrics_addr = match s.metrics_addr.as_deref() {
            None | Some("off") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                ConfigError::Invalid("metrics_addr", format!("{addr:?}: use HOST:PORT or off"))
            })?),
        };
        let addr =
            |name: &'static str, v: Option<&str>, default: Option<&str>| match v.or(default) {
                None | Some("off") => Ok(None),
                Some(a) => a.parse::<std::net::SocketAddr>().map(Some).map_err(|_| {
                    ConfigError::Invalid(name, format!("{a:?}: use HOST:PORT or off"))
                }),
            };
        let https_addr = addr("https_addr", s.https_addr.as_deref(), Some("0.0.0.0:8443"))?;
        let dns_addr = addr("dns_addr", s.dns_addr.as_deref(), None)?;
        let vm_ports = match s.vm_ports.as_deref().unwrap_or("3000-9999") {
            "off" => None,
            range => {
                let parsed = range
                    .split_once('-')
                    .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                    .filter(|(a, b)| 3000 <= *a && a <= b && *b <= 9999);
                Some(parsed.ok_or_else(|| {
                    ConfigError::Invalid(
                        "vm_ports",
                        format!("{range:?}: use FIRST-LAST within 3000-9999, or off"),
                    )
                })?)
            }
        };
        let public_ip = match s.public_ip.as_deref() {
            Some(ip) => ip.parse().map_err(|_| {
                ConfigError::Invalid("public_ip", format!("{ip:?} is not an IP address"))
            })?,
            None => match https_addr.map(|a| a.ip()) {
                Some(ip) if !ip.is_unspecified() => ip,
                _ => std::net::IpAddr::from([127, 0, 0, 1]),
            },
        };
        let acme = match s.acme_directory {
            None => None,
            Some(directory) if dns_addr.is_none() => {
                return Err(ConfigError::Invalid(
                    "acme_directory",
                    format!("{directory}: ACME DNS-01 needs nook's DNS server: set dns_addr too"),
                ));
            }
            Some(directory) => Some(AcmeSettings {
                directory,
                email: s.acme_email,
                root_ca: s.acme_root_ca,
            }),
        };
        let smtp = match s.smtp_host {
            None => None,
            Some(host) => {
                let security = match s.smtp_security.as_deref().unwrap_or("starttls") {
                    "none" => nook_edge::SmtpSecurity::None,
                    "starttls" => nook_edge::SmtpSecurity::StartTls,
                    "tls" => nook_edge::SmtpSecurity::Tls,
                    other => {
                        return Err(ConfigError::Invalid(
                            "smtp_security",
                            format!("{other:?}: use none, starttls or tls"),
                        ));
                    }
                };
                let port = s.smtp_port.unwrap_or(match security {
                    nook_edge::SmtpSecurity::Tls => 465,
                    nook_edge::SmtpSecurity::StartTls => 587,
                    nook_edge::SmtpSecurity::None => 25,
                });
                Some(nook_edge::SmtpConfig {
                    host,
                    port,
                    security,
                    credentials: s.smtp_user.zip(s.smtp_password),
                    from: s
                        .smtp_from
                        .unwrap_or_else(|| format!("nook <nook@{domain}>")),
                })
            }
        };
        let signup = match s.signup.as_deref() {
            None if smtp.is_some() => SignupPolicy::Email,
            None => SignupPolicy::Invite,
            Some("open") => SignupPolicy::Open,
            Some("email") if smtp.is_some() => SignupPolicy::Email,
            Some("email") => {
                return Err(ConfigError::Invalid(
                    "signup",
                    "email needs SMTP (smtp_host) to mail the links: set it up, or use invite"
                        .into(),
                ));
            }
            Some("invite") => SignupPolicy::Invite,
            Some("closed") => SignupPolicy::Closed,
            Some(other) => {
                return Err(ConfigError::Invalid(
                    "signup",
                    format!("{other:?}: use open, email, invite or closed"),
                ));
            }
        };
        let web = WebConfig {
            https_addr,
            vm_ports,
            dns_addr,
            public_ip,
            acme,
            smtp,
        };
        let github = |setting: &'static str, v: Option<String>, default: &str| {
            let url = v.unwrap_or_else(|| default.into());
            nook_gateway::BaseUrl::parse(&url)
                .map(|_| url)
                .map_err(|why| ConfigError::Invalid(setting, why))
        };
        let github_url = github("github_url", s.github_url, "https://github.com")?;
        let github_api_url = github("github_api_url", s.github_api_url, "https://api.github.com")?;
        let coding_agent = coding_agent_from(&gateway, s.agent_model, s.browser)?;
        let pack = nook_memory::Pack::parse(s.pack.as_deref().unwrap_or("off"))
            .map_err(|why| ConfigError::Invalid("pack", why))?;
        let fork_memory = match s.fork_memory.as_deref() {
            Some("copy") => ForkMemory::Copy,
            None | Some("own") => ForkMemory::Own,
            Some("shared") => ForkMemory::Shared,
            Some(other) => {
                return Err(ConfigError::Invalid(
                    "fork_memory",
                    format!("{other:?}: use copy, own or shared"),
                ));
            }
        };
        let store = store_location(s.store.as_deref(), &data_dir)?;
        let host_name = match s.host_name {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
        };
        check_host_name(&host_name).map_err(|why| ConfigError::Invalid("host_name", why))?;
        let host_addr = s.host_addr.unwrap_or_else(|| host_name.clone());
        let cgroup_top = s.cgroup_top.unwrap_or_else(|| nook_cgroup::TOP.to_string());
        if cgroup_top.is_empty()
            || cgroup_top.len() > 32
            || !cgroup_top
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::Invalid(
                "cgroup_top",
                format!("{cgroup_top:?}: use 1 to 32 lowercase letters, digits and '-'"),
            ));
        }
        Ok(Config {
            cgroup_top,
            store,
            host_name,
            host_addr,
            pack,
            fork_memory,
            coding_agent,
            web,
            github_url,
            github_api_url,
            gateway,
            llm_initial_credit_micros,
            reclaim: s.reclaim.unwrap_or(true),
            tcg_cache_mib,
            metrics_addr,
            idle_after,
            replicate_every,
            default_plan,
            memory_overcommit,
            host_limits,
            ssh_addr,
            public_host: s.public_host.unwrap_or_else(|| "localhost".into()),
            domain,
            vm_domain,
            data_dir,
            images_dir,
            qemu: s.qemu,
            agent,
            accel,
            net,
            egress_block,
            jail_uids,
            signup,
            ready_timeout: Duration::from_secs(ready),
            dns,
            log: s.log.unwrap_or_else(|| "info".into()),
        })
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("nook.sock")
    }

    /// Frozen disk layers that clones share (see `nook_storage::layers`).
    pub fn layers_dir(&self) -> PathBuf {
        self.data_dir.join("layers")
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }

    /// `https://DOMAIN[:PORT]` (the dashboard) or `https://NAME.VM_DOMAIN[:PORT]` (a VM), as
    /// users reach the edge.
    pub fn web_origin(&self, name: Option<&str>) -> String {
        let host = match name {
            Some(n) => format!("{n}.{}", self.vm_domain),
            None => self.domain.clone(),
        };
        match self.web.https_addr.map(|a| a.port()) {
            Some(443) | None => format!("https://{host}"),
            Some(p) => format!("https://{host}:{p}"),
        }
    }

    /// nook's local certificate authority for the edge (`nook ca path`).
    pub fn ca_dir(&self) -> PathBuf {
        self.data_dir.join("ca")
    }

    pub fn acme_dir(&self) -> PathBuf {
        self.data_dir.join("acme")
    }

    pub fn ssh_host_key(&self) -> PathBuf {
        self.data_dir.join("ssh_host_ed25519_key")
    }

    /// How users reach the lobby, e.g. `ssh -p 2222 localhost`.
    pub fn ssh_command(&self, user: Option<&str>) -> String {
        let port = self.ssh_addr.map(|a| a.port()).unwrap_or(22);
        let port = if port == 22 {
            String::new()
        } else {
            format!("-p {port} ")
        };
        match user {
            Some(u) => format!("ssh {port}{u}@{}", self.public_host),
            None => format!("ssh {port}{}", self.public_host),
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.data_dir.join("cache")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_and_bad_values_are_named() {
        let file: Settings =
            toml::from_str("data_dir = \"/srv/nook\"\naccel = \"tcg\"\nready_timeout_secs = 30")
                .expect("toml");
        let flags = Settings {
            accel: Some("kvm".into()),
            ..Settings::default()
        };
        let cfg = Config::validate(Settings::default().merge(file).merge(flags)).expect("valid");
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/nook"));
        assert_eq!(cfg.images_dir, PathBuf::from("/srv/nook/images"));
        assert_eq!(cfg.accel, AccelChoice::Kvm);
        assert_eq!(cfg.ready_timeout, Duration::from_secs(30));

        let err = Config::validate(Settings {
            accel: Some("xen".into()),
            ..Settings::default()
        })
        .expect_err("xen");
        assert!(err.to_string().contains("accel"), "{err}");
        assert!(
            toml::from_str::<Settings>("colour = 1").is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn tcg_cache_defaults_and_a_size_out_of_range_names_the_range() {
        let cfg = Config::validate(Settings::default()).expect("defaults");
        assert_eq!(cfg.tcg_cache_mib, nook_vmm::TCG_CACHE_MIB);
        let file: Settings = toml::from_str("tcg_cache_mib = 512").expect("toml");
        let cfg = Config::validate(Settings::default().merge(file)).expect("512");
        assert_eq!(cfg.tcg_cache_mib, 512);
        for bad in [0, 8, 5000] {
            let err = Config::validate(Settings {
                tcg_cache_mib: Some(bad),
                ..Settings::default()
            })
            .expect_err("out of range")
            .to_string();
            assert!(
                err.contains("tcg_cache_mib") && err.contains("16 to 2048"),
                "{err}"
            );
        }
    }

    #[test]
    fn jail_uids_default_and_stay_clear_of_users_and_systemds_foreign_range() {
        let cfg = Config::validate(Settings::default()).expect("defaults");
        assert_eq!(cfg.jail_uids.base, nook_vmm::jail::DEFAULT_JAIL_UID_BASE);
        assert_eq!(cfg.jail_uids.count, nook_net::MAX_SLOT + 1);
        for bad in [1000, 0x7ffe_0000 - 100, 3_000_000_000] {
            let err = Config::validate(Settings {
                jail_uid_base: Some(bad),
                ..Settings::default()
            })
            .expect_err("out of range")
            .to_string();
            assert!(
                err.contains("jail_uid_base") && err.contains("65536"),
                "{err}"
            );
        }
    }

    #[test]
    fn egress_block_defaults_and_names_a_bad_entry() {
        let cfg = Config::validate(Settings::default()).expect("defaults");
        assert_eq!(cfg.egress_block, nook_net::EgressBlockList::default());
        let file: Settings =
            toml::from_str("egress_block = [\"10.0.0.0/8\", \"168.63.129.16\"]").expect("toml");
        let cfg = Config::validate(file).expect("valid");
        let nets: Vec<String> = cfg
            .egress_block
            .nets()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "168.63.129.16/32"]);
        let file: Settings =
            toml::from_str("egress_block = [\"10.0.0.0/8\", \"10.1.2.3/8\"]").expect("toml");
        let err = Config::validate(file).expect_err("host bits").to_string();
        assert!(
            err.contains("egress_block") && err.contains("\"10.1.2.3/8\""),
            "{err}"
        );
    }

    #[test]
    fn vms_get_a_domain_of_their_own_and_one_inside_the_dashboards_is_refused() {
        let domains = |domain: Option<&str>, vm: Option<&str>| {
            Config::validate(Settings {
                domain: domain.map(str::to_string),
                vm_domain: vm.map(str::to_string),
                ..Settings::default()
            })
            .map(|c| (c.domain, c.vm_domain))
        };
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            domains(None, None).expect("defaults"),
            pair("nook.localhost", "nook-vm.localhost")
        );
        assert_eq!(
            domains(Some("Nook.Example.com."), Some("nook-vms.example.net")).expect("two"),
            pair("nook.example.com", "nook-vms.example.net")
        );
        // A real domain without a second one: VMs share it (the daemon warns at start).
        assert_eq!(
            domains(Some("nook.example.com"), None).expect("one"),
            pair("nook.example.com", "nook.example.com")
        );
        for (d, vm) in [
            ("example.com", "vms.example.com"),
            ("a.example.com", "example.com"),
        ] {
            let err = domains(Some(d), Some(vm)).expect_err(vm).to_string();
            assert!(
                err.contains("vm_domain") && err.contains("share the dashboard's site"),
                "{err}"
            );
        }
        let err = domains(None, Some("bad domain"))
            .expect_err("bad")
            .to_string();
        assert!(err.contains("vm_domain"), "{err}");
    }
}
