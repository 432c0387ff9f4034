//! Harness for system tests: a real `nook serve` on a private data dir, the real CLI, real
//! QEMU guests. Images are built once per machine into a shared cache dir (see scripts/test).
//!
//! Everything a test starts is torn down on drop, including QEMU processes the daemon left
//! running on purpose. On failure the daemon log and VM consoles are printed.

#![allow(dead_code)]

mod free_port;
pub mod scripted;

pub use free_port::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn nook_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nook"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The static guest agent, built by scripts/build-agent.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NOOK_TEST_AGENT") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/x86_64-unknown-linux-gnu/release/nook-guest-agent");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-agent first",
        p.display()
    );
    p
}

/// Shared image cache: building images is slow, so all tests (and CI runs) share it.
pub fn images_dir() -> PathBuf {
    std::env::var_os("NOOK_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nook-test/images"))
}

pub struct Daemon {
    pub data_dir: PathBuf,
    pub ssh_port: u16,
    pub https_port: u16,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    /// Test runs wait their turn for the host (see `host_turn`); a fleet test holds it once
    /// for all its hosts.
    _host_turn: Option<std::fs::File>,
    /// Where the daemon's front doors listen and clients reach them.
    pub addr: String,
    /// The network namespace (under /run/netns) the daemon runs in, if not the machine's.
    netns: Option<String>,
    log: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// The daemon's store when the run asks for PostgreSQL (`NOOK_TEST_STORE=postgres`);
    /// otherwise it is the SQLite file in the data dir. Outlives restarts, as that file does.
    postgres: Option<nook_store::testing::TempPostgres>,
}

/// Whether this run's daemons keep their state in PostgreSQL rather than SQLite.
pub fn store_is_postgres() -> bool {
    match std::env::var("NOOK_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("NOOK_TEST_STORE={other}: expected sqlite or postgres"),
    }
}

/// A daemon owns the host's VM network, and a second one refuses to start. nextest runs this
/// crate's system tests one at a time; this lock also queues them behind those of another run
/// on the same host (a second checkout's suite, say) instead of failing both.
pub fn host_turn() -> std::fs::File {
    std::fs::create_dir_all("/run/nook").expect("/run/nook");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/nook/system-tests.lock")
        .expect("open /run/nook/system-tests.lock");
    file.lock().expect("lock /run/nook/system-tests.lock");
    file
}

/// The repository's root, for the test fakes under `tests/`.
#[allow(dead_code)]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Daemon {
    /// Starts a relay inside `vm`: each connection to its port 8080 becomes a connection
    /// from the guest to the metadata address (so the gateway sees the VM). Returns the
    /// address the host reaches it at, once it listens.
    #[allow(dead_code)]
    pub fn gateway_relay(&self, vm: &str) -> String {
        self.exec(
            vm,
            "(nc -ll -p 8080 -e nc 169.254.169.254 80 </dev/null >/dev/null 2>&1 &) ; sleep 0.2",
        );
        let ip = self.vm(vm)["guest_ip"]
            .as_str()
            .expect("guest ip")
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(format!("{ip}:8080")).is_err() {
            assert!(
                Instant::now() < deadline,
                "the relay in {vm} never listened"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("http://{ip}:8080")
    }
}

/// Where each host of a fleet test answers DNS, on its own address.
pub const FLEET_DNS_PORT: u16 = 5353;

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let tmp = sys_tempdir();
        let data_dir = tmp.path().join("data");
        Self::start_in(data_dir, Some(tmp), extra)
    }

    pub fn start_in(data_dir: PathBuf, tmp: Option<tempfile::TempDir>, extra: &[&str]) -> Daemon {
        let postgres = store_is_postgres().then(nook_store::testing::TempPostgres::start);
        Self::start_on(data_dir, tmp, extra, postgres)
    }

    /// A daemon whose store is a fresh PostgreSQL, whatever the run's `NOOK_TEST_STORE`.
    pub fn start_on_postgres(extra: &[&str]) -> Daemon {
        let tmp = sys_tempdir();
        let data_dir = tmp.path().join("data");
        let postgres = nook_store::testing::TempPostgres::start();
        Self::start_on(data_dir, Some(tmp), extra, Some(postgres))
    }

    /// Whether `needle` is anywhere in the daemon's store, in the clear: the SQLite file and
    /// its WAL, or everything PostgreSQL holds (text as is, bytea as hex).
    pub fn store_holds(&self, needle: &str) -> bool {
        if let Some(pg) = &self.postgres {
            let dump = pg.dump();
            let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
            return dump.contains(needle) || dump.contains(&hex);
        }
        ["nook.sqlite", "nook.sqlite-wal"].iter().any(|file| {
            std::fs::read(self.data_dir.join(file))
                .is_ok_and(|db| db.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
    }

    /// The daemon's PostgreSQL, when it has one.
    pub fn postgres(&mut self) -> Option<&mut nook_store::testing::TempPostgres> {
        self.postgres.as_mut()
    }

    fn start_on(
        data_dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        extra: &[&str],
        postgres: Option<nook_store::testing::TempPostgres>,
    ) -> Daemon {
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let log = data_dir
            .parent()
            .unwrap_or(&data_dir)
            .join(format!("daemon-{}.log", std::process::id()));
        let (ssh_port, https_port) = (free_port(), free_port());
        let host_turn = host_turn();
        let mut d = Daemon {
            _host_turn: Some(host_turn),
            addr: "127.0.0.1".into(),
            netns: None,
            data_dir,
            ssh_port,
            https_port,
            _tmp: tmp,
            child: None,
            log,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            postgres,
        };
        d.spawn();
        d
    }

    /// A second host of this daemon's fleet on this machine's own network (this daemon must
    /// have a `--host-name` and a `--host-addr` on 127.0.0.1): joined with a token from
    /// `nook host invite`, with its own ports, cgroup top and `extra` flags. VMs on both would
    /// need taps of their own, so `extra` should hold `--net user`.
    pub fn join_here(&self, name: &str, channel_port: u16, extra: &[&str]) -> Daemon {
        let token = self.ok(&["host", "invite"]).trim().to_string();
        let tmp = sys_tempdir();
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let addr = format!("127.0.0.1:{channel_port}");
        let out = join_with(Command::new(nook_bin()), &data_dir, &token, name, &addr);
        assert!(
            out.status.success(),
            "nook host join as {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut args: Vec<String> = ["--host-name", name, "--cgroup-top", &format!("nook-{name}")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Daemon {
            _host_turn: None,
            addr: "127.0.0.1".into(),
            netns: None,
            data_dir,
            ssh_port: free_port(),
            https_port: free_port(),
            log: tmp.path().join(format!("daemon-{name}.log")),
            _tmp: Some(tmp),
            child: None,
            extra: args,
            env: Vec::new(),
            postgres: None,
        };
        d.spawn();
        d
    }

    /// One host of a fleet test (its DNS server on its address, port [`FLEET_DNS_PORT`]): `nook serve` in the network namespace `netns`, reached at
    /// `addr`, with its own cgroup top (`nook-NAME`). The caller holds [`host_turn`] for all
    /// of them. The first host is given the shared PostgreSQL (`Store`); the others join
    /// with a token from `nook host invite` (`Join`), which gives them the store and the
    /// fleet's secrets key.
    pub fn start_fleet_host(netns: &str, addr: &str, name: &str, how: FleetEntry) -> Daemon {
        let tmp = sys_tempdir();
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let env = match how {
            FleetEntry::Store(store) => vec![("NOOK_STORE".to_string(), store.to_string())],
            FleetEntry::Join(token) => {
                let out = join_fleet(netns, &data_dir, token, name, addr);
                assert!(
                    out.status.success(),
                    "nook host join as {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Vec::new()
            }
        };
        let log = tmp.path().join(format!("daemon-{name}.log"));
        let mut d = Daemon {
            _host_turn: None,
            addr: addr.into(),
            netns: Some(netns.into()),
            data_dir,
            ssh_port: 2222,
            https_port: 8443,
            _tmp: Some(tmp),
            child: None,
            log,
            extra: [
                "--host-name",
                name,
                "--cgroup-top",
                &format!("nook-{name}"),
                "--host-addr",
                addr,
                "--dns-addr",
                &format!("{addr}:{FLEET_DNS_PORT}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env,
            postgres: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}")).arg(nook_bin());
                cmd
            }
            None => Command::new(nook_bin()),
        };
        cmd.arg("serve")
            .env("NOOK_DATA_DIR", &self.data_dir)
            .env("NOOK_IMAGES_DIR", images_dir())
            .env("NOOK_AGENT", agent_bin())
            .env(
                "NOOK_ACCEL",
                std::env::var("NOOK_TEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            )
            .env("NOOK_LOG", "info,nook_daemon=debug")
            .env("NOOK_SSH_ADDR", format!("{}:{}", self.addr, self.ssh_port))
            .env(
                "NOOK_HTTPS_ADDR",
                format!("{}:{}", self.addr, self.https_port),
            )
            .env("NOOK_VM_PORTS", "off")
            .envs(
                self.postgres
                    .as_ref()
                    .map(|pg| ("NOOK_STORE", pg.url("nook"))),
            )
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn nook serve");
        self.child = Some(child);
        let socket = self.data_dir.join("nook.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("nook serve exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash would: no cleanup runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sets (or with None, clears) an environment variable for the next daemon start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(self.data_dir.join("nook.sock"));
        self.spawn();
    }

    /// Runs `nook ARGS` against this daemon.
    pub fn nook(&self, args: &[&str]) -> Output {
        Command::new(nook_bin())
            .args(args)
            .env("NOOK_DATA_DIR", &self.data_dir)
            .env("NOOK_IMAGES_DIR", images_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run nook")
    }

    /// Runs `nook ARGS` and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.nook(args);
        assert!(
            out.status.success(),
            "nook {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `nook ARGS` expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.nook(args);
        assert!(
            !out.status.success(),
            "nook {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn create_tiny(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["vm", "create", "--image", "tiny", "--name", name, "--json"]);
        serde_json::from_str(&out).expect("create --json output")
    }

    pub fn exec(&self, name: &str, cmd: &str) -> String {
        self.ok(&["vm", "exec", name, "--", "sh", "-c", cmd])
    }

    pub fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["vm", "list", "--json"])).expect("list --json")
    }

    pub fn vm(&self, name: &str) -> serde_json::Value {
        self.list()
            .into_iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no VM {name}"))
    }

    /// PIDs of QEMU processes whose command line mentions this daemon's data dir.
    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids_under(&self.data_dir)
    }
}

/// The shared memory process `pid` holds (`RssShmem`: a QEMU's RAM memfd), in MiB; None once
/// it has gone.
pub fn rss_shmem_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(kib >> 10)
}

/// PIDs of the QEMU processes of the VM with this id (each carries `-name nook-ID`; a fork's
/// successor names no file of the VM's directory on its command line).
pub fn qemu_pids_of_vm(id: &str) -> Vec<u32> {
    qemu_pids_whose_cmdline_has(&format!("\0nook-{id}\0"))
}

pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    qemu_pids_whose_cmdline_has(&dir.display().to_string())
}

fn qemu_pids_whose_cmdline_has(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
            for entry in std::fs::read_dir(self.data_dir.join("vms"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let console =
                    std::fs::read_to_string(entry.path().join("console.log")).unwrap_or_default();
                let tail: Vec<&str> = console.lines().collect();
                eprintln!(
                    "--- console of {} ---\n{}",
                    entry.path().display(),
                    tail[tail.len().saturating_sub(30)..].join("\n")
                );
                let qemu =
                    std::fs::read_to_string(entry.path().join("qemu.log")).unwrap_or_default();
                if !qemu.trim().is_empty() {
                    eprintln!(
                        "--- QEMU's stderr in {} ---\n{qemu}",
                        entry.path().display()
                    );
                }
            }
        }
        // Remove VMs through the daemon so taps and rules go too; then make sure.
        if self.child.is_some() {
            for vm in serde_json::from_slice::<Vec<serde_json::Value>>(
                &self.nook(&["vm", "list", "--json"]).stdout,
            )
            .unwrap_or_default()
            {
                if let Some(name) = vm["name"].as_str() {
                    let _ = self.nook(&["vm", "rm", name]);
                }
            }
        }
        self.kill9();
        for pid in self.qemu_pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// A directory for one test's daemon (its data dir and log), removed with it.
/// How a fleet test's host comes into the fleet ([`Daemon::start_fleet_host`]).
pub enum FleetEntry<'a> {
    Store(&'a str),
    Join(&'a str),
}

/// `nook host join TOKEN --host-name NAME --host-addr ADDR` in network namespace `netns`,
/// keeping what it is given in `data_dir`.
pub fn join_fleet(netns: &str, data_dir: &Path, token: &str, name: &str, addr: &str) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}")).arg(nook_bin());
    join_with(cmd, data_dir, token, name, addr)
}

fn join_with(mut cmd: Command, data_dir: &Path, token: &str, name: &str, addr: &str) -> Output {
    cmd.args([
        "host",
        "join",
        token,
        "--host-name",
        name,
        "--host-addr",
        addr,
    ])
    .env("NOOK_DATA_DIR", data_dir)
    .stdin(Stdio::null())
    .output()
    .expect("run nook host join")
}

pub fn sys_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nook-sys")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn taps() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("nk") && n[2..].chars().all(|c| c.is_ascii_digit()))
        .collect()
}

pub fn nft_sources() -> String {
    let out = Command::new("nft")
        .args(["list", "set", "inet", "nook", "vm_sources"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An SSH identity for the real OpenSSH client.
pub struct Key {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Key {
    pub fn new(name: &str) -> Key {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(name);
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen");
        assert!(ok.success());
        Key { path, _dir: dir }
    }
}

impl Daemon {
    /// The OpenSSH client's common options for this daemon's front door.
    pub fn ssh_opts(&self, key: &Key) -> Vec<String> {
        [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([key.path.display().to_string()])
        .collect()
    }

    /// `ssh -p PORT USER@127.0.0.1 ARGS...` with the real client.
    pub fn ssh(&self, key: &Key, user: &str, args: &[&str]) -> Output {
        Command::new("ssh")
            .args(self.ssh_opts(key))
            .args([
                "-p",
                &self.ssh_port.to_string(),
                &format!("{user}@{}", self.addr),
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ssh")
    }

    /// Signs `key` up as `email` the way the default signup policy (invite) lets people in:
    /// the host's first account signs up straight away; later ones with an invite the admin
    /// made (`nook account invite`), which also confirms their email.
    pub fn signup(&self, key: &Key, email: &str) -> String {
        let accounts = self.ok(&["account", "list"]);
        if accounts.trim().is_empty() {
            return self.lobby_ok(key, &["signup", email]);
        }
        let invite = self.ok(&["account", "invite", email]);
        let code = invite
            .split_whitespace()
            .skip_while(|w| *w != "--invite")
            .nth(1)
            .unwrap_or_else(|| panic!("no code in the invite: {invite}"))
            .to_string();
        self.lobby_ok(key, &["signup", email, "--invite", &code])
    }

    /// Runs a lobby command and insists on success; returns stdout.
    pub fn lobby_ok(&self, key: &Key, args: &[&str]) -> String {
        let out = self.ssh(key, "lobby", args);
        assert!(
            out.status.success(),
            "ssh lobby {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A small ext4 filesystem on a loop device, to run out of space on purpose.
pub struct LoopMount {
    dir: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(size: &str) -> LoopMount {
        let dir = tempfile::Builder::new()
            .prefix("nook-full")
            .tempdir_in("/tmp")
            .expect("tmp");
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mnt");
        let run = |cmd: String| {
            let out = Command::new("sh").args(["-c", &cmd]).output().expect("sh");
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(format!(
            "truncate -s {size} {0} && mkfs.ext4 -q -F {0} && mount -o loop {0} {1}",
            img.display(),
            mnt.display()
        ));
        LoopMount { dir }
    }

    pub fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    pub fn fill(&self) {
        // dd stops at ENOSPC; its failure is the point.
        let _ = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}/filler", self.mnt().display()),
                "bs=1M",
                "status=none",
            ])
            .status();
    }

    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.mnt().join("filler"));
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
    }
}

/// Starts one of the fake servers under `tests/` (`cmd` with its stdout piped), which print
/// `listening PORT` first, and returns it with that port; `what` names it in a failure.
pub fn spawn_listening(cmd: &mut Command, what: &str) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{what}'s first line: {e}"));
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{what} said {line:?}"));
    (child, port)
}
