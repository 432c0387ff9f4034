use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nook",
    version,
    about = "Perfect little computers: persistent VMs for people and their agents"
)]
pub struct Cli {
    /// Where nook keeps its state [default: /var/lib/nook as root, else ~/.local/share/nook]
    #[arg(long, global = true, env = "NOOK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where built images live [default: DATA_DIR/images]
    #[arg(long, global = true, env = "NOOK_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
// Parsed once per process; boxing `serve`'s many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the daemon
    Serve(ServeArgs),
    /// Build and list guest images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage VMs through the running daemon
    #[command(subcommand)]
    Vm(VmCommand),
    /// Manage accounts' envelopes
    #[command(subcommand)]
    Account(AccountCommand),
    /// The hosts sharing this host's store
    #[command(subcommand)]
    Host(HostCommand),
    /// Print the daemon's Prometheus metrics (per account and per VM)
    Metrics,
    /// nook's local certificate authority for https://VM.DOMAIN/
    #[command(subcommand)]
    Ca(CaCommand),
    /// (Started by a fleet host's daemon.) Stops the host's leased QEMUs when the daemon
    /// stops renewing their leases
    #[command(hide = true)]
    FenceWatch { data_dir: PathBuf },
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// List hosts: up or down, address, version, load and leases
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Cordon a host, then move every VM off it, each to the other host with the most memory
    /// free (running ones live), e.g. before taking it down. It stays cordoned
    Drain { host: String },
    /// Place no new VMs on a host (new, cp, move and --on go elsewhere); its VMs stay
    Cordon { host: String },
    /// Let a cordoned host take new VMs again
    Uncordon { host: String },
    /// Make a one-time token with which a new machine joins this host's fleet
    /// (`nook host join TOKEN` there)
    Invite {
        /// How long the token works: e.g. 30m, 2h, 7d (at most 7 days)
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The store URL the new host is given, when this host's own (say, on localhost)
        /// would not reach the database from there
        #[arg(long)]
        store: Option<String>,
    },
    /// Join a fleet with a token from `nook host invite`: keeps the store's URL and the
    /// fleet's secrets key in the data dir, so `nook serve` starts as a host of the fleet
    Join {
        token: String,
        /// This host's name in the fleet [default: the machine's host name]
        #[arg(long)]
        host_name: Option<String>,
        /// Where the other hosts reach this one (ADDR or ADDR:PORT) [default: its name]
        #[arg(long)]
        host_addr: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Print the path of the CA certificate, for browsers and curl to trust
    Path,
}

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Set an account's envelope; fields not given keep their values
    SetPlan {
        email: String,
        /// vCPUs, e.g. 2 or 0.5
        #[arg(long)]
        cpu: Option<f64>,
        /// e.g. 8G
        #[arg(long)]
        memory: Option<String>,
        /// total disk of all its VMs, e.g. 100G
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        max_vms: Option<u32>,
    },
    /// Show an account's envelope
    Plan { email: String },
    /// List accounts, with whether each email is confirmed
    List,
    /// Add an account with a confirmed email (you vouch for it) and one SSH key
    Add {
        email: String,
        /// The account's public key file, e.g. ~/.ssh/id_ed25519.pub
        #[arg(long)]
        key: PathBuf,
    },
    /// Confirm an account's email (you vouch for it): shares sent to it now reach the account
    Verify { email: String },
    /// Make a one-time signup code for an email (valid 7 days)
    Invite { email: String },
    /// Show or change an account's LLM credit (dollars), which the gateway spends
    #[command(group = clap::ArgGroup::new("change").args(["add", "set", "show"]).required(true))]
    Credit {
        email: String,
        /// Dollars to add (negative to take away), e.g. 10 or 2.50
        #[arg(long, allow_negative_numbers = true)]
        add: Option<f64>,
        /// Dollars to set the balance to
        #[arg(long)]
        set: Option<f64>,
        #[arg(long)]
        show: bool,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML config file [default: DATA_DIR/nook.toml when present]
    #[arg(long, env = "NOOK_CONFIG")]
    pub config: Option<PathBuf>,
    /// QEMU binary [default: qemu-system-x86_64 on PATH]
    #[arg(long, env = "NOOK_QEMU")]
    pub qemu: Option<PathBuf>,
    /// Static guest-agent binary [default: nook-guest-agent beside this binary]
    #[arg(long, env = "NOOK_AGENT")]
    pub agent: Option<PathBuf>,
    /// auto, kvm or tcg
    #[arg(long, env = "NOOK_ACCEL")]
    pub accel: Option<String>,
    /// auto, tap or user
    #[arg(long, env = "NOOK_NET")]
    pub net: Option<String>,
    /// Seconds a booting VM has to become ready
    #[arg(long, env = "NOOK_READY_TIMEOUT")]
    pub ready_timeout: Option<u64>,
    /// Resolver address given to VMs
    #[arg(long, env = "NOOK_DNS")]
    pub dns: Option<String>,
    /// SSH front door address, or `off`
    #[arg(long, env = "NOOK_SSH_ADDR")]
    pub ssh_addr: Option<String>,
    /// Host name users reach this machine by, shown in instructions
    #[arg(long, env = "NOOK_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Anthropic's API for the LLM gateway [default: https://api.anthropic.com]
    #[arg(long, env = "NOOK_LLM_ANTHROPIC_BASE_URL")]
    pub llm_anthropic_base_url: Option<String>,
    /// The host's Anthropic key (VMs never see it)
    #[arg(long, env = "NOOK_LLM_ANTHROPIC_KEY", hide_env_values = true)]
    pub llm_anthropic_key: Option<String>,
    /// OpenAI's API for the LLM gateway [default: https://api.openai.com]
    #[arg(long, env = "NOOK_LLM_OPENAI_BASE_URL")]
    pub llm_openai_base_url: Option<String>,
    /// The host's OpenAI key (VMs never see it)
    #[arg(long, env = "NOOK_LLM_OPENAI_KEY", hide_env_values = true)]
    pub llm_openai_key: Option<String>,
    /// Where GitHub integrations send git [default: https://github.com]
    #[arg(long, env = "NOOK_GITHUB_URL")]
    pub github_url: Option<String>,
    /// Where GitHub integrations send REST calls [default: https://api.github.com]
    #[arg(long, env = "NOOK_GITHUB_API_URL")]
    pub github_api_url: Option<String>,
    /// How hard idle VMs' memory is packed: off, balanced (a quarter stays in RAM, the rest
    /// goes to compressed swap) or dense (only what they touch stays; compressed swap, then a
    /// swap file) [default: off]
    #[arg(long, env = "NOOK_PACK")]
    pub pack: Option<String>,
    /// How `cp` forks a running VM's memory: instantly, sharing it, and then own (each side
    /// moves into memory of its own in the background, so its next fork is instant too) or
    /// shared (they go on sharing it; a fork of either copies); or copy (a live copy, with
    /// guest RAM in QEMU's anonymous memory, which KSM can merge) [default: own]
    #[arg(long, env = "NOOK_FORK_MEMORY")]
    pub fork_memory: Option<String>,
    /// Where the host's state lives: sqlite (a file in the data dir) or a postgres:// URL
    /// that several hosts can share [default: sqlite]
    #[arg(long, env = "NOOK_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// This host's name among the hosts sharing a PostgreSQL store [default: the machine's
    /// host name]
    #[arg(long, env = "NOOK_HOST_NAME")]
    pub host_name: Option<String>,
    /// Where other hosts reach this one, HOST:PORT [default: the host name]
    #[arg(long, env = "NOOK_HOST_ADDR")]
    pub host_addr: Option<String>,
    /// The top cgroup this daemon's groups live under; another name lets several daemons
    /// share a machine, each in its own network namespace [default: nook]
    #[arg(long, env = "NOOK_CGROUP_TOP")]
    pub cgroup_top: Option<String>,
    /// The coding agent's model, PROVIDER/MODEL [default: anthropic/claude-sonnet-4-5]
    #[arg(long, env = "NOOK_AGENT_MODEL")]
    pub agent_model: Option<String>,
    /// The headless browser the coding agent drives [default: /usr/bin/chromium]
    #[arg(long, env = "NOOK_BROWSER")]
    pub browser: Option<std::path::PathBuf>,
    /// LLM credit a new account starts with, in dollars [default: 0]
    #[arg(long, env = "NOOK_LLM_INITIAL_CREDIT")]
    pub llm_initial_credit: Option<f64>,
    /// First uid of the range VMs' QEMUs run as (one per VM); no user, group, subordinate
    /// id range or process may use the range
    #[arg(long, env = "NOOK_JAIL_UID_BASE")]
    pub jail_uid_base: Option<u32>,
    /// The dashboard's domain (https://DOMAIN/); VMs are served under it too unless
    /// --vm-domain is set
    #[arg(long, env = "NOOK_DOMAIN")]
    pub domain: Option<String>,
    /// A domain of their own for VMs (https://VM.VM_DOMAIN/), a different registrable domain
    /// from --domain so that no VM is the same site as the dashboard
    #[arg(long, env = "NOOK_VM_DOMAIN")]
    pub vm_domain: Option<String>,
    /// HTTPS edge address (https://VM.DOMAIN/), or `off`
    #[arg(long, env = "NOOK_HTTPS_ADDR")]
    pub https_addr: Option<String>,
    /// VM ports served as https://VM.DOMAIN:PORT/, e.g. 3000-9999, or `off`
    #[arg(long, env = "NOOK_VM_PORTS")]
    pub vm_ports: Option<String>,
    /// Address of nook's authoritative DNS server for DOMAIN (off by default)
    #[arg(long, env = "NOOK_DNS_ADDR")]
    pub dns_addr: Option<String>,
    /// The IP address DNS answers for DOMAIN and VM names
    #[arg(long, env = "NOOK_PUBLIC_IP")]
    pub public_ip: Option<String>,
    /// ACME directory URL for a wildcard certificate by DNS-01 (needs --dns-addr)
    #[arg(long, env = "NOOK_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// Contact email for the ACME account
    #[arg(long, env = "NOOK_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// A PEM root CA trusted for the ACME server only (e.g. Pebble's)
    #[arg(long, env = "NOOK_ACME_ROOT_CA")]
    pub acme_root_ca: Option<PathBuf>,
    /// The most memory running VMs of all accounts may have together, e.g. 96G
    /// [default: RAM times memory_overcommit]
    #[arg(long, env = "NOOK_HOST_MEMORY")]
    pub host_memory: Option<String>,
    /// The most disk all VMs may have together, e.g. 2T [default: 4 times the data dir's filesystem]
    #[arg(long, env = "NOOK_HOST_DISK")]
    pub host_disk: Option<String>,
    /// Memory kept free on the host: new VMs are refused rather than eat into it, e.g. 1G
    /// [default: 1/32 of RAM, at least 256M]
    #[arg(long, env = "NOOK_HOST_MEMORY_RESERVE")]
    pub host_memory_reserve: Option<String>,
    /// The most VMs on this host, all accounts together [default: 1000]
    #[arg(long, env = "NOOK_HOST_MAX_VMS")]
    pub host_max_vms: Option<u32>,
    /// Who may sign up: open, email, invite or closed [default: email with SMTP, else invite]
    #[arg(long, env = "NOOK_SIGNUP")]
    pub signup: Option<String>,
    /// SMTP server for email login links
    #[arg(long, env = "NOOK_SMTP_HOST")]
    pub smtp_host: Option<String>,
    #[arg(long, env = "NOOK_SMTP_PORT")]
    pub smtp_port: Option<u16>,
    /// none, starttls or tls
    #[arg(long, env = "NOOK_SMTP_SECURITY")]
    pub smtp_security: Option<String>,
    /// From address of login emails
    #[arg(long, env = "NOOK_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// Also serve Prometheus metrics over TCP here (unauthenticated: keep it on localhost)
    #[arg(long, env = "NOOK_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Seconds of near-zero CPU and network before a VM counts as idle
    #[arg(long, env = "NOOK_IDLE_AFTER")]
    pub idle_after: Option<u64>,
    /// Under TCG (no KVM), each QEMU's translation cache in MiB, 16 to 2048: more runs big
    /// guests faster, at up to that much memory per VM [default: 128]
    #[arg(long, env = "NOOK_TCG_CACHE_MIB")]
    pub tcg_cache_mib: Option<u32>,
    /// Seconds between replicas of a VM kept on a second host (`replicate VM HOST`): the most
    /// a VM restored from its replica can have lost [default: 60]
    #[arg(long, env = "NOOK_REPLICATE_EVERY_SECS")]
    pub replicate_every_secs: Option<u64>,
    /// Log filter, e.g. info or nook_daemon=debug
    #[arg(long, env = "NOOK_LOG")]
    pub log: Option<String>,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build (or rebuild) an image: tiny or default
    Build { name: String },
    /// List built images
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
#[command(
    after_help = "Every lobby command about VMs works here too, with the same grammar and \
output as `ssh HOST CMD`, on every VM of the host: new (or create), ls (or list), rm, start, \
stop, restart, rename, cp, resize, stat NAME, share ...; each takes --json. \
See `nook vm new --help`."
)]
pub enum VmCommand {
    /// Run a command in a VM; its exit status becomes ours
    Exec {
        name: String,
        /// Run as this user instead of root
        #[arg(long)]
        user: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a VM's serial console log
    Console { name: String },
    /// A lobby command about VMs (new, ls, rm, start, stop, restart, rename, cp, resize,
    /// stat, share), parsed and run by the daemon exactly as the lobby runs it
    #[command(external_subcommand)]
    Lobby(Vec<String>),
}
