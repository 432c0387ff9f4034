//! Calls into a running guest through its agent: commands, the console, and what the SSH
//! front door needs to relay a user into the VM (host keys, nook's relay key, sshd).

use super::*;

/// How long a short script nook runs in a guest (e.g. to update /etc/hosts) may take.
const GUEST_SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

impl Manager {
    pub async fn console(&self, name: &str, scope: Scope<'_>) -> Result<String, ApiError> {
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        Ok(self.paths(&vm.id).console_tail(usize::MAX).await)
    }

    /// Runs `script` with `sh -c` as root in a running guest, to its end (bounded by
    /// `GUEST_SCRIPT_TIMEOUT`); its exit status.
    pub(crate) async fn guest_sh(&self, vm: &VmRecord, script: &str) -> Result<i32, ApiError> {
        let run = async {
            let spawn = SpawnRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            };
            let process = self.spawn_on(vm, spawn).await?;
            exit_code(process)
                .await
                .map_err(|e| errors::from_vmm("run a command in the guest", e))
        };
        match tokio::time::timeout(GUEST_SCRIPT_TIMEOUT, run).await {
            Ok(done) => done,
            Err(_) => Err(ApiError::new(
                ErrorCode::AgentUnavailable,
                format!("VM '{}' did not finish a command in time", vm.name),
            )),
        }
    }

    /// The live agent connection of a running VM, reconnecting if it dropped.
    pub(super) async fn agent(&self, vm: &VmRecord) -> Result<AgentClient, ApiError> {
        if vm.state != VmState::Running {
            return Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is not running: start it first", vm.name),
            ));
        }
        if let Some(agent) = self.open_agent(vm)? {
            return Ok(agent);
        }
        // One connector at a time: whoever waited here finds the connection made.
        let lock = self.agent_lock(&vm.id);
        let _connecting = lock.lock().await;
        if let Some(agent) = self.open_agent(vm)? {
            return Ok(agent);
        }
        let agent = AgentClient::connect(&self.paths(&vm.id).agent_socket())
            .await
            .map_err(|e| errors::from_vmm("connect to the guest agent", e))?;
        agent
            .wait_ready(Duration::from_secs(10))
            .await
            .map_err(|e| errors::from_vmm("reach the guest agent", e))?;
        self.keep_agent(&vm.id, agent.clone());
        Ok(agent)
    }

    /// Runs `change` on the running VM `id`'s live state; None when it is not running here.
    pub(super) fn with_live<R>(&self, id: &str, change: impl FnOnce(&mut Live) -> R) -> Option<R> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
            .map(change)
    }

    /// Keeps `agent` as the running VM `id`'s agent connection.
    pub(super) fn keep_agent(&self, id: &str, agent: AgentClient) {
        self.with_live(id, |live| live.agent = Some(agent));
    }

    /// Records whether `id`'s guest has finished booting (`cp` waits for that before a fork).
    pub(super) fn set_booted(&self, id: &str, booted: bool) {
        self.with_live(id, |live| live.booted = booted);
    }

    /// The VM's agent connection when it is open.
    pub(super) fn open_agent(&self, vm: &VmRecord) -> Result<Option<AgentClient>, ApiError> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(&vm.id) {
            Some(l) => Ok(l.agent.clone().filter(|a| !a.is_closed())),
            None => Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is not running", vm.name),
            )),
        }
    }

    /// Starts a process through the VM's agent. A spawn held off while the VM changed QEMU
    /// (`successor.rs`) was never sent, and goes to the new QEMU's agent.
    async fn spawn_on(&self, vm: &VmRecord, spawn: SpawnRequest) -> Result<Process, ApiError> {
        let started = match self.agent(vm).await?.spawn(spawn.clone()).await {
            Err(nook_vmm::VmmError::AgentMoved) => self.agent(vm).await?.spawn(spawn).await,
            other => other,
        };
        started.map_err(|e| errors::from_vmm("start the command", e))
    }

    /// Starts a process in a running VM that the caller has already checked access to.
    pub(crate) async fn spawn_in(
        &self,
        vm: &VmRecord,
        spawn: SpawnRequest,
    ) -> Result<Process, ApiError> {
        self.spawn_on(vm, spawn).await
    }

    /// The VM's address on its tap link; `None` with user-mode networking.
    pub(crate) fn guest_ip(&self, vm: &VmRecord) -> Option<std::net::Ipv4Addr> {
        match &self.net {
            Net::Tap(_) => VmLink::for_slot(vm.slot).ok().map(|l| l.guest_ip),
            Net::User => None,
        }
    }

    pub async fn exec(
        &self,
        name: &str,
        scope: Scope<'_>,
        req: nook_api::ExecRequest,
    ) -> Result<Process, ApiError> {
        if req.argv.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "Nothing to run: give a command after --",
            ));
        }
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        let spawn = SpawnRequest {
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            user: req.user,
            pty: None,
            stdin: req.stdin,
            ..Default::default()
        };
        self.spawn_on(&vm, spawn).await
    }

    /// Where the SSH front door takes `ssh name@HOST`: the running VM, and its own sshd (as
    /// [`GUEST_USER`]) when the image has one.
    pub async fn ssh_target(&self, name: &str, scope: Scope<'_>) -> Result<SshTarget, ApiError> {
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        if vm.state != VmState::Running {
            return Err(ApiError::new(
                ErrorCode::NotRunning,
                format!("VM '{}' is {}: start it first", vm.name, vm.state.as_str()),
            ));
        }
        let dir = self.paths(&vm.id).dir;
        let sshd = match (std::fs::read_to_string(dir.join(RELAY_KEY)), &self.net) {
            (Ok(key), Net::Tap(_)) => {
                let ip = VmLink::for_slot(vm.slot)
                    .map_err(|e| errors::from_net("find the VM's address", e))?
                    .guest_ip;
                Some(nook_sshd::SshdEndpoint {
                    addr: (ip, 22).into(),
                    user: GUEST_USER.to_string(),
                    private_key_openssh: key,
                    host_keys: read_guest_host_keys(&dir)
                        .into_iter()
                        .map(|k| k.public_openssh)
                        .collect(),
                    refused_patience: self.sshd_restart_patience(&vm.id),
                })
            }
            // No sshd in the image, or no network path to it (user-mode networking).
            _ => None,
        };
        Ok(SshTarget {
            name: vm.name,
            sshd,
        })
    }

    /// Starts a process in a running VM for the SSH front door, as [`GUEST_USER`], with output
    /// flow control so a slow client slows the process instead of filling host memory.
    pub async fn spawn_for_ssh(
        &self,
        name: &str,
        scope: Scope<'_>,
        spawn: SpawnRequest,
    ) -> Result<Process, ApiError> {
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        self.spawn_on(
            &vm,
            SpawnRequest {
                user: Some(GUEST_USER.to_string()),
                ..spawn
            },
        )
        .await
    }

    /// The VM's SSH host keys, made by the host on first need and kept in the VM's directory so
    /// they survive restarts; a clone has a directory of its own and so gets keys of its own.
    pub(super) fn guest_host_keys(
        &self,
        vm: &VmRecord,
    ) -> Result<Vec<nook_proto::SshHostKey>, ApiError> {
        let dir = self.paths(&vm.id).dir;
        let existing = read_guest_host_keys(&dir);
        if !existing.is_empty() {
            return Ok(existing);
        }
        let made = nook_sshd::generate_guest_host_keys(&format!("root@{}", vm.name))
            .map_err(|e| errors::internal("make the VM's SSH host keys", &e))?;
        let mut keys = Vec::new();
        for key in made {
            let path = dir.join(format!("ssh_host_{}_key", key.kind));
            write_private(
                &path.with_extension("pub"),
                key.public_openssh.as_bytes(),
                0o644,
            )
            .and_then(|()| write_private(&path, key.private_openssh.as_bytes(), 0o600))
            .map_err(|e| io_error("save the VM's SSH host keys", e))?;
            keys.push(nook_proto::SshHostKey {
                kind: key.kind.to_string(),
                private_openssh: key.private_openssh,
                public_openssh: key.public_openssh,
            });
        }
        Ok(keys)
    }

    /// The public half of nook's per-VM key for the relay to the guest's sshd, made natively on
    /// first need and kept in the VM's directory (0600) so it survives restarts. A clone comes
    /// with its source's (see `share_ssh_key`), which its disk already authorizes.
    pub(super) fn relay_key(&self, vm: &VmRecord) -> Result<String, ApiError> {
        let path = self.paths(&vm.id).dir.join(RELAY_KEY);
        let public = path.with_extension("pub");
        if path.is_file()
            && let Ok(text) = std::fs::read_to_string(&public)
        {
            return Ok(text);
        }
        let key = nook_sshd::generate_client_key(&format!("nook-{}", vm.id))
            .map_err(|e| errors::internal("make the VM's SSH key", &e))?;
        write_private(&path, key.private_openssh.as_bytes(), 0o600)
            .and_then(|()| write_private(&public, key.public_openssh.as_bytes(), 0o644))
            .map_err(|e| io_error("save the VM's SSH key", e))?;
        Ok(key.public_openssh)
    }

    /// How much longer the VM's sshd may be restarting after a fork (`launch::Sshd::Restarting`).
    fn sshd_restart_patience(&self, id: &str) -> Duration {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|live| live.sshd_restarting_until)
            .map(|until| until.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_default()
    }

    /// The agent answers before systemd has started sshd; "ready" includes SSH, when there is
    /// a network path to it.
    pub(super) async fn wait_for_sshd(&self, vm: &VmRecord) {
        if let (Net::Tap(_), Ok(link)) = (&self.net, VmLink::for_slot(vm.slot))
            && !sshd_accepts_within(link.guest_ip, Duration::from_secs(60)).await
        {
            tracing::warn!(vm = %vm.name, "the guest's sshd did not come up within 60s");
        }
    }

    /// Runs a command in the guest as root with `env` added, feeding it `input`; returns its
    /// exit status and output, for setup work on behalf of the user.
    pub async fn run_in(
        &self,
        name: &str,
        scope: Scope<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        input: Option<Vec<u8>>,
    ) -> Result<Process, ApiError> {
        let vm = self.record(name, scope).await?;
        self.ensure_here(&vm)?;
        let spawn = SpawnRequest {
            argv,
            env,
            cwd: None,
            user: None,
            pty: None,
            stdin: input.is_some(),
            ..Default::default()
        };
        let process = self.spawn_on(&vm, spawn).await?;
        if let Some(input) = input {
            let handle = process.handle();
            handle
                .stdin(&input)
                .await
                .map_err(|e| errors::from_vmm("send the script", e))?;
            handle
                .close_stdin()
                .await
                .map_err(|e| errors::from_vmm("send the script", e))?;
        }
        Ok(process)
    }
}

/// The host keys saved in a VM's directory (`ssh_host_KIND_key` and `.pub`), in a fixed order.
pub(super) fn read_guest_host_keys(dir: &std::path::Path) -> Vec<nook_proto::SshHostKey> {
    ["ed25519", "ecdsa"]
        .into_iter()
        .filter_map(|kind| {
            let path = dir.join(format!("ssh_host_{kind}_key"));
            Some(nook_proto::SshHostKey {
                kind: kind.to_string(),
                private_openssh: std::fs::read_to_string(&path).ok()?,
                public_openssh: std::fs::read_to_string(path.with_extension("pub"))
                    .ok()?
                    .trim()
                    .to_string(),
            })
        })
        .collect()
}

/// Writes a file whole under a temporary name, then renames it, so a crash leaves either the
/// old file or the new one.
pub(super) fn write_private(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs a command through the agent and waits for it; its output is dropped.
pub(super) async fn run_to_end(
    agent: &AgentClient,
    argv: Vec<String>,
) -> Result<i32, nook_vmm::VmmError> {
    let spawn = SpawnRequest {
        argv,
        env: vec![],
        cwd: None,
        user: None,
        pty: None,
        stdin: false,
        ..Default::default()
    };
    exit_code(agent.spawn(spawn).await?).await
}

/// Waits for `process` to end, dropping its output; its exit status.
async fn exit_code(mut process: Process) -> Result<i32, nook_vmm::VmmError> {
    loop {
        match process.next().await {
            Some(nook_proto::GuestMsg::Exit { code, .. }) => return Ok(code.unwrap_or(-1)),
            Some(_) => continue,
            None => return Err(nook_vmm::VmmError::AgentClosed),
        }
    }
}

/// Tries the guest's port 22 until it accepts a connection or `within` has passed; says
/// whether it did.
pub(super) async fn sshd_accepts_within(ip: std::net::Ipv4Addr, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // Each try is bounded: a SYN the guest never answers would otherwise wait out the
        // kernel's retries (over two minutes), far past the deadline.
        let accepts = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect((ip, 22)),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if accepts {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
