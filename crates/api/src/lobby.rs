//! The lobby's command grammar: one clap parser for `ssh HOST CMD`, the interactive REPL, the
//! HTTPS API (`POST /api/exec`) and the dashboard's actions, so they can never disagree about
//! what a command means.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nook",
    no_binary_name = true,
    disable_version_flag = true,
    help_template = "{about}\n\n{usage-heading} {usage}\n\n{all-args}",
    about = "nook lobby: your VMs. Every command takes --json."
)]
pub struct LobbyLine {
    /// Print machine-readable JSON (errors too, with a stable `code`)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: LobbyCommand,
}

#[derive(Debug, Subcommand)]
pub enum LobbyCommand {
    /// Create an account for the SSH key you connected with
    Signup {
        email: String,
        /// The code from an invite (`nook account invite EMAIL` on the host)
        #[arg(long)]
        invite: Option<String>,
    },
    /// Make an invite code for someone to sign up with (the host's owner only)
    Invite { email: String },
    /// Show your account
    Whoami,
    /// Create a VM and wait until it is ready
    #[command(alias = "create")]
    New(NewArgs),
    /// List your VMs
    #[command(alias = "list")]
    Ls {
        /// Only names matching this (`*` is a wildcard; otherwise a substring)
        pattern: Option<String>,
        /// Long format: resources, address, age
        #[arg(short = 'l')]
        long: bool,
    },
    /// Delete VMs and their disks
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Boot a stopped VM
    Start {
        name: String,
        /// Bring it back on this host from the replica kept there, while its own host is
        /// down (as of that replica: what it wrote later is lost)
        #[arg(long, value_name = "HOST")]
        on: Option<String>,
    },
    /// Power a VM off cleanly
    Stop { name: String },
    /// Stop and start a VM
    Restart { name: String },
    /// Rename a VM
    Rename { old: String, new: String },
    /// Clone a VM: its disk, and when it is running its memory and processes too
    Cp {
        source: String,
        /// The clone's name (a friendly one is made up when absent)
        new: Option<String>,
        /// Clone only the disk and boot the clone afresh, even when the source is running
        #[arg(long)]
        stopped_only: bool,
        /// The host of the fleet to put the clone on [default: the source's, while it has
        /// room]; it is made there, then moved with the layers that host lacks
        #[arg(long, value_name = "HOST")]
        on: Option<String>,
    },
    /// Move a VM to another host of the fleet: live when it runs (its processes go on,
    /// paused for a moment), else its disk
    Move {
        name: String,
        /// The host to move it to (`nook host ls` lists them); without one, the other host
        /// with the most memory free
        host: Option<String>,
    },
    /// Keep a replica of a VM's disk on another host, renewed every minute or so, so
    /// `start VM --on HOST` can bring it back if its host goes down
    Replicate {
        name: String,
        /// The host to keep it on
        #[arg(required_unless_present = "off", conflicts_with = "off")]
        host: Option<String>,
        /// Stop keeping a replica
        #[arg(long)]
        off: bool,
    },
    /// Change a VM's CPUs or memory (applied at the next start) or grow its disk (at once)
    Resize {
        name: String,
        #[arg(long)]
        cpu: Option<u32>,
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        disk: Option<String>,
    },
    /// A VM's CPU, memory, disk, network and uptime; without a name, your whole envelope
    /// and LLM credit
    Stat { name: Option<String> },
    /// LLM tokens and cost through the gateway, per VM and model
    Usage {
        /// Only this VM
        vm: Option<String>,
        /// How far back: a number with s, m, h or d, e.g. 24h or 7d
        #[arg(long, default_value = "30d")]
        since: String,
    },
    /// Manage the SSH keys of your account
    #[command(subcommand, name = "ssh-key")]
    SshKey(SshKeyCommand),
    /// Print a one-time link that logs your browser in (valid 15 minutes)
    Browser,
    /// Who may open a VM's web ports at https://VM.DOMAIN/ (private by default), and whether
    /// the VM may call the API itself
    #[command(subcommand)]
    Share(ShareCommand),
    /// Tokens: for a VM's web ports (Bearer, or the basic-auth password), or with --api for
    /// the HTTPS API
    #[command(subcommand)]
    Token(TokenCommand),
    /// Services your VMs reach at http://NAME.int.VM_DOMAIN/ with a credential they never see
    #[command(subcommand)]
    Integrations(IntegrationsCommand),
    /// The coding agent: it works in a VM from what you ask, with its shell, files and a browser
    #[command(subcommand)]
    Agent(AgentCommand),
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// A VM's conversations with the agent
    Ls { vm: String },
    /// Ask the agent to do something in a VM and follow its answer (it goes on if you leave)
    Prompt {
        vm: String,
        /// Go on with this conversation (a new one when absent)
        #[arg(long, value_name = "ID")]
        conversation: Option<String>,
        /// Start the turn and return at once with the conversation's id and chat link
        #[arg(long)]
        no_wait: bool,
        /// What to do; `-` reads it from stdin
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// A conversation's events: the chat as text, or one JSON object per line with --json
    Log {
        vm: String,
        id: String,
        /// Only events after this number
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Stop the turn running in a conversation
    Stop { vm: String, id: String },
}

impl AgentCommand {
    pub fn vm(&self) -> &str {
        match self {
            Self::Ls { vm }
            | Self::Prompt { vm, .. }
            | Self::Log { vm, .. }
            | Self::Stop { vm, .. } => vm,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum IntegrationsCommand {
    /// Add an integration (its secret is never shown again)
    #[command(subcommand)]
    Add(IntegrationKind),
    /// List your integrations and the VMs they are attached to
    List,
    /// Remove an integration: every VM loses it at once
    Remove { name: String },
    /// Let a VM use an integration, for good or for a while
    Attach {
        name: String,
        vm: String,
        /// How long, e.g. 2h or 7d (a number with s, m, h or d)
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Take an integration away from a VM
    Detach { name: String, vm: String },
}

#[derive(Debug, Subcommand)]
pub enum IntegrationKind {
    /// Any HTTP API: the target gets these headers or this bearer token; or, with --peer,
    /// another of your VMs, which learns the caller from X-Nook-Peer-VM
    HttpProxy {
        #[arg(long)]
        name: String,
        /// e.g. https://api.example.com/v1
        #[arg(long, required_unless_present = "peer", conflicts_with = "peer")]
        target: Option<String>,
        /// KEY:VALUE added to every request (repeatable)
        #[arg(long = "header", value_name = "KEY:VALUE")]
        headers: Vec<String>,
        /// Sent as Authorization: Bearer TOKEN
        #[arg(long)]
        bearer: Option<String>,
        /// Another of your VMs
        #[arg(long, value_name = "VM")]
        peer: Option<String>,
        /// The peer VM's port
        #[arg(long, default_value_t = 80, requires = "peer")]
        port: u16,
    },
    /// Your own LLM provider key: the gateway's /gateway/llm/PROVIDER uses it for the VMs it
    /// is attached to, instead of the host's key and your credit
    Llm {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["anthropic", "openai"])]
        provider: String,
        #[arg(long)]
        key: String,
    },
    /// GitHub: git clone/fetch/push at /OWNER/REPO.git and the REST API at /api/...
    Github {
        #[arg(long)]
        name: String,
        /// A personal access or installation token
        #[arg(long)]
        token: String,
        /// owner/repo to limit it to (repeatable); all the token reaches when absent
        #[arg(long = "repository", value_name = "OWNER/REPO")]
        repositories: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Show who a VM is shared with
    Show { vm: String },
    /// Anyone may open the VM's web port, without logging in
    SetPublic { vm: String },
    /// Only you and the people it is shared with
    SetPrivate { vm: String },
    /// Share with someone by email (collaborators may also `ssh VM@HOST`)
    Add {
        vm: String,
        email: String,
        #[arg(long, default_value = "viewer", value_parser = ["viewer", "collaborator"])]
        role: String,
    },
    /// Stop sharing with someone
    Remove { vm: String, email: String },
    /// Make a link that gives access to whoever opens it and logs in
    AddLink { vm: String },
    /// Revoke a link (and the access it gave)
    RemoveLink { vm: String, token: String },
    /// The VM port https://VM.DOMAIN/ goes to (`default`: 80, or 8000 if 80 is closed)
    Port { vm: String, port: String },
    /// Let the VM itself call the API at http://169.254.169.254/api/exec, as you, with no
    /// token inside it, for these commands only (`--off` takes it back)
    Api {
        vm: String,
        /// Comma-separated, e.g. ls,cp (`all` for every one)
        #[arg(
            long,
            value_name = "CMD,...",
            required_unless_present = "off",
            conflicts_with = "off"
        )]
        cmds: Option<String>,
        /// Let it act on every VM of yours, not only on itself (and the clones it makes)
        #[arg(long, conflicts_with = "off")]
        any_vm: bool,
        #[arg(long)]
        off: bool,
    },
}

impl ShareCommand {
    /// The VM every share command is about.
    pub fn vm(&self) -> &str {
        match self {
            Self::Show { vm }
            | Self::SetPublic { vm }
            | Self::SetPrivate { vm }
            | Self::Add { vm, .. }
            | Self::Remove { vm, .. }
            | Self::AddLink { vm }
            | Self::RemoveLink { vm, .. }
            | Self::Port { vm, .. }
            | Self::Api { vm, .. } => vm,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token (shown once): for one VM's web ports, or with --api for the HTTPS API
    Create {
        /// The VM whose web ports it opens; with --api, the only VM it may act on
        #[arg(long, required_unless_present = "api")]
        vm: Option<String>,
        /// Days until it stops working (1 to 3650)
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650), conflicts_with = "expires")]
        days: Option<u32>,
        /// A token for `POST https://DOMAIN/api/exec` instead of for a VM's web ports
        #[arg(long, requires = "cmds")]
        api: bool,
        /// With --api: the commands it may run, comma-separated (e.g. ls,new,cp; `all` for every one)
        #[arg(long, requires = "api", value_name = "CMD,...")]
        cmds: Option<String>,
        /// How long it works, e.g. 12h or 30d (a number with s, m, h or d; default 90d)
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List your tokens (ids, VMs, expiry; never the secrets)
    List,
    /// Revoke a token by its id (see `token list`); it stops working at once
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct NewArgs {
    #[arg(long)]
    pub name: Option<String>,
    /// default (Debian with systemd and dev tools) or tiny (busybox)
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long)]
    pub cpu: Option<u32>,
    /// e.g. 512M, 2G
    #[arg(long)]
    pub memory: Option<String>,
    /// e.g. 20G
    #[arg(long)]
    pub disk: Option<String>,
    /// KEY=VALUE added to the VM's /etc/environment and to the setup script's environment (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A shell script to run as root once the VM is ready; `-` reads it from stdin
    #[arg(long, value_name = "SCRIPT|-")]
    pub setup_script: Option<String>,
    /// Return as soon as the VM is created, without waiting for it to boot
    #[arg(long, conflicts_with = "prompt")]
    pub no_wait: bool,
    /// Once it is ready, have the coding agent build this in it (`-` reads it from stdin);
    /// prints the chat's link
    #[arg(long, value_name = "TEXT|-")]
    pub prompt: Option<String>,
    /// On a fleet: the host to put it on [default: the one with the most memory free]
    #[arg(long, value_name = "HOST")]
    pub on: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SshKeyCommand {
    /// List your keys
    List,
    /// Add a public key (`ssh-ed25519 AAAA... comment`, quoted); it joins your account once
    /// a client holding it runs the `ssh-key confirm CODE` this prints
    Add { key: Vec<String> },
    /// Run with the new key: proves you hold it and adds it to the account that asked
    Confirm { code: String },
    /// Remove a key by its fingerprint (SHA256:...)
    Remove { fingerprint: String },
}

impl LobbyCommand {
    /// The command's name as typed (`share`, `ssh-key`, ...): what API tokens and VM grants
    /// allow or refuse.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Signup { .. } => "signup",
            Self::Invite { .. } => "invite",
            Self::Whoami => "whoami",
            Self::New(_) => "new",
            Self::Ls { .. } => "ls",
            Self::Rm { .. } => "rm",
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
            Self::Restart { .. } => "restart",
            Self::Rename { .. } => "rename",
            Self::Cp { .. } => "cp",
            Self::Resize { .. } => "resize",
            Self::Move { .. } => "move",
            Self::Replicate { .. } => "replicate",
            Self::Stat { .. } => "stat",
            Self::Usage { .. } => "usage",
            Self::SshKey(_) => "ssh-key",
            Self::Browser => "browser",
            Self::Share(_) => "share",
            Self::Token(_) => "token",
            Self::Integrations(_) => "integrations",
            Self::Agent(_) => "agent",
        }
    }

    /// The existing VMs the command acts on or reads (for `cp`, the source; for `rename`,
    /// the old name). `None` for commands about the account as a whole (`whoami`,
    /// `ssh-key`, `token list`, ...), which a token limited to some VMs may not run unless
    /// they read only what it may see (`ls` is filtered instead).
    pub fn vms(&self) -> Option<Vec<&str>> {
        match self {
            Self::Rm { names } => Some(names.iter().map(String::as_str).collect()),
            Self::Start { name, .. }
            | Self::Replicate { name, .. }
            | Self::Stop { name }
            | Self::Restart { name }
            | Self::Resize { name, .. }
            | Self::Move { name, .. }
            | Self::Stat { name: Some(name) } => Some(vec![name]),
            Self::Rename { old, .. } => Some(vec![old]),
            Self::Cp { source, .. } => Some(vec![source]),
            Self::Usage { vm: Some(vm), .. } => Some(vec![vm]),
            Self::Share(cmd) => Some(vec![cmd.vm()]),
            Self::Agent(cmd) => Some(vec![cmd.vm()]),
            Self::Ls { .. } => Some(Vec::new()),
            _ => None,
        }
    }
}

/// What an API token or a VM's grant allows: every command, or some by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSet {
    All,
    Only(Vec<String>),
}

impl CommandSet {
    /// Parses `ls,new,cp` or `all`; every name must be a lobby command that may be granted.
    pub fn parse(list: &str) -> Result<Self, String> {
        let names: Vec<String> = list
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Err("no commands given: name at least one, e.g. ls,cp (or all)".into());
        }
        if names.iter().any(|n| n == "all") {
            return Ok(Self::All);
        }
        for n in &names {
            if !GRANTABLE.contains(&n.as_str()) {
                return Err(format!(
                    "`{n}` is not a command a token may be given; choose from: {}",
                    GRANTABLE.join(", ")
                ));
            }
        }
        let mut names = names;
        names.sort();
        names.dedup();
        Ok(Self::Only(names))
    }

    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::All => GRANTABLE.contains(&name),
            Self::Only(names) => names.iter().any(|n| n == name),
        }
    }

    /// `all`, or the names joined by commas: how it is stored and shown.
    pub fn to_list(&self) -> String {
        match self {
            Self::All => "all".to_string(),
            Self::Only(names) => names.join(","),
        }
    }
}

/// The commands an API token or a VM grant may carry. Not `signup` (a token already has an
/// account), not `ssh-key`, `token`, `invite` or `browser`: those would let a token mint
/// more credentials than it was given.
pub const GRANTABLE: &[&str] = &[
    "whoami",
    "new",
    "ls",
    "rm",
    "start",
    "stop",
    "restart",
    "rename",
    "cp",
    "resize",
    "move",
    "replicate",
    "stat",
    "usage",
    "share",
    "integrations",
    "agent",
];

/// The command names, for help and completion.
pub const COMMANDS: &[&str] = &[
    "signup",
    "invite",
    "whoami",
    "new",
    "ls",
    "rm",
    "start",
    "stop",
    "restart",
    "rename",
    "cp",
    "resize",
    "move",
    "replicate",
    "stat",
    "usage",
    "ssh-key",
    "browser",
    "share",
    "token",
    "integrations",
    "agent",
    "help",
    "exit",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_sets_name_only_grantable_commands() {
        assert_eq!(CommandSet::parse("all"), Ok(CommandSet::All));
        let set = CommandSet::parse(" cp,LS,cp ").expect("set");
        assert_eq!(set.to_list(), "cp,ls");
        assert!(set.allows("ls") && !set.allows("rm"));
        assert!(CommandSet::parse("ls,token").is_err());
        assert!(CommandSet::parse(",").is_err());
        assert!(!CommandSet::All.allows("token"));
    }

    #[test]
    fn every_command_parses_with_json() {
        // The SSH front door splits lines into words; here they are split on spaces.
        let parse = |line: &str| LobbyLine::try_parse_from(line.split_whitespace());
        let l = parse("new --name blog --env A=1 --env B=2 --json").expect("new");
        assert!(l.json);
        let LobbyCommand::New(args) = l.command else {
            panic!("not new")
        };
        assert_eq!(args.env, ["A=1", "B=2"]);
        assert!(matches!(
            parse("ls -l b*").expect("ls").command,
            LobbyCommand::Ls { long: true, .. }
        ));
        assert!(matches!(
            parse("ssh-key list --json").expect("keys").command,
            LobbyCommand::SshKey(SshKeyCommand::List)
        ));
        assert_eq!(parse("cp a b").expect("cp").command.vms(), Some(vec!["a"]));
        assert_eq!(parse("whoami").expect("whoami").command.vms(), None);
        assert!(parse("token create --api --cmds ls").is_ok());
        assert!(parse("token create --cmds ls --vm a").is_err());
        assert!(parse("token create").is_err());
        assert!(parse("share api a --cmds ls,cp").is_ok());
        assert!(parse("share api a").is_err());
        assert!(parse("rm").is_err());
        let LobbyCommand::Agent(AgentCommand::Prompt { text, .. }) =
            parse("agent prompt box --conversation c1 make -a site")
                .expect("prompt")
                .command
        else {
            panic!("not agent prompt")
        };
        assert_eq!(text, ["make", "-a", "site"]);
        assert!(parse("new --prompt hi --no-wait").is_err());
        assert!(parse("frobnicate").is_err());
        assert!(parse("new --bogus").is_err());
    }
}
