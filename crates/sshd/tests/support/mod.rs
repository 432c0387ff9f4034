//! Test harness: a test `Backend`, a real OpenSSH sshd standing in for a VM,
//! nook's SSH server, and helpers to drive the real OpenSSH client.
//! Every process started here is killed when its guard is dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nook_sshd::{
    Account, Backend, Caller, LobbyIo, Route, SshServerConfig, SshdEndpoint, VmEndpoint,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub const TIMEOUT: Duration = Duration::from_secs(120);

#[path = "../../../nook/tests/common/free_port.rs"]
mod free_port;
pub use free_port::free_port;

pub async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}

/// Runs a command to completion (it must succeed).
fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn keygen(path: &Path) -> String {
    run(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test"])
        .arg("-f")
        .arg(path));
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read pub");
    public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn fingerprint(path: &Path) -> String {
    let out = run(std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(path));
    out.split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string()
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// OpenSSH's sshd on 127.0.0.1, playing the VM.
pub struct Sshd {
    pub port: u16,
    /// Its host key, `ALGO BASE64 COMMENT`.
    pub host_key_pub: PathBuf,
    pub log: PathBuf,
    _proc: Proc,
}

impl Sshd {
    pub async fn start(dir: &Path, authorized_key: &str) -> Sshd {
        std::fs::create_dir_all("/run/sshd").expect("privsep dir");
        let host_key = dir.join("vm_host_key");
        keygen(&host_key);
        let authorized = dir.join("vm_authorized_keys");
        std::fs::write(&authorized, format!("{authorized_key}\n")).expect("write");
        let port = free_port();
        let cfg = dir.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
StrictModes no
AllowTcpForwarding yes
AllowAgentForwarding yes
AcceptEnv NOOK_*
Subsystem sftp /usr/lib/openssh/sftp-server
UsePAM no
PidFile none
LogLevel VERBOSE
",
                host_key = host_key.display(),
                authorized = authorized.display(),
            ),
        )
        .expect("write config");
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sshd");
        let proc = Proc(child);
        wait_for_port(port).await;
        Sshd {
            port,
            host_key_pub: host_key.with_extension("pub"),
            log,
            _proc: proc,
        }
    }
}

/// The lobby and routes of a tiny fake nook.
pub struct TestBackend {
    /// key_openssh -> account
    pub accounts: Mutex<HashMap<String, Account>>,
    pub vm: VmEndpoint,
    pub vm_owner: String,
    pub down_port: u16,
    /// Where `vmlate`'s sshd listens once a test opens it: a fork's sshd, restarting.
    pub late_port: u16,
    /// A host key that is not the test VM's.
    pub other_host_key: String,
}

fn no_such_vm(name: &str) -> Route {
    Route::Unavailable(format!("nook: no VM named {name} (see `ls`)"))
}

impl Backend for TestBackend {
    async fn account_for_key(&self, key_openssh: &str) -> Option<Account> {
        self.accounts.lock().unwrap().get(key_openssh).cloned()
    }

    async fn route(&self, caller: &Caller) -> Route {
        match caller.user.as_str() {
            "vmtest" => {
                if caller.account.as_ref().map(|a| a.id.as_str()) == Some(self.vm_owner.as_str()) {
                    Route::Vm(self.vm.clone())
                } else {
                    no_such_vm("vmtest")
                }
            }
            "vmdown" => Route::Vm(VmEndpoint {
                sshd: self.vm.sshd.clone().map(|sshd| SshdEndpoint {
                    addr: SocketAddr::from(([127, 0, 0, 1], self.down_port)),
                    ..sshd
                }),
                ..self.vm.clone()
            }),
            // A fork whose sshd is restarting: refused until the test opens `late_port`.
            "vmlate" => Route::Vm(VmEndpoint {
                sshd: self.vm.sshd.clone().map(|sshd| SshdEndpoint {
                    addr: SocketAddr::from(([127, 0, 0, 1], self.late_port)),
                    refused_patience: Duration::from_secs(10),
                    ..sshd
                }),
                ..self.vm.clone()
            }),
            // The VM's address answers with a host key nook did not make for it.
            "impostor" => Route::Vm(VmEndpoint {
                sshd: self.vm.sshd.clone().map(|sshd| SshdEndpoint {
                    host_keys: vec![self.other_host_key.clone()],
                    ..sshd
                }),
                ..self.vm.clone()
            }),
            "stopped" => Route::Unavailable(
                "nook: VM stopped is stopped; start it with `ssh HOST start stopped`".into(),
            ),
            "ghost" => no_such_vm("ghost"),
            _ => Route::Lobby,
        }
    }

    async fn lobby(&self, caller: &Caller, argv: Vec<String>, io: LobbyIo) -> u32 {
        let Some((cmd, args)) = argv.split_first() else {
            io.err(b"usage: CMD [ARGS]\n");
            return 2;
        };
        match cmd.as_str() {
            "whoami" => {
                match &caller.account {
                    Some(a) => io.out(format!("{} ({})\n", a.email, caller.user).as_bytes()),
                    None => io.out(format!("anonymous {}\n", caller.fingerprint).as_bytes()),
                }
                0
            }
            "echo" => {
                io.out(format!("{}\n", args.join(" ")).as_bytes());
                0
            }
            "argv" => {
                io.out(format!("{}\n", serde_json::to_string(&argv).unwrap()).as_bytes());
                0
            }
            "fail" => {
                let n = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
                io.err(format!("failing with {n}\n").as_bytes());
                n
            }
            "signup" => {
                let Some(email) = args.first() else {
                    io.err(b"usage: signup EMAIL\n");
                    return 2;
                };
                let account = Account {
                    id: format!("acct-{email}"),
                    email: email.clone(),
                };
                self.accounts
                    .lock()
                    .unwrap()
                    .insert(caller.key_openssh.clone(), account);
                io.out(format!("welcome {email}\n").as_bytes());
                0
            }
            "tty" => {
                io.out(format!("tty={} width={}\n", io.tty(), io.width()).as_bytes());
                0
            }
            "cat" => {
                while let Some(chunk) = io.read_stdin().await {
                    io.out(&chunk);
                }
                0
            }
            "sleep" => {
                let secs = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                io.out(b"slept\n");
                0
            }
            "big" => {
                let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
                for chunk in vec![b'x'; n].chunks(10_000) {
                    io.out(chunk);
                }
                0
            }
            other => {
                io.err(format!("nook: unknown command: {other}\n").as_bytes());
                127
            }
        }
    }

    async fn completions(&self, _caller: &Caller) -> Vec<String> {
        [
            "whoami", "echo", "argv", "fail", "signup", "tty", "cat", "sleep", "big", "stop",
            "start", "vmtest",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Everything a test needs: nook's server, a VM sshd, and keys.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The key of the account owning `vmtest`.
    pub owner_key: PathBuf,
    /// A key with no account.
    pub stranger_key: PathBuf,
    pub backend: Arc<TestBackend>,
    pub vm: Sshd,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), nook_sshd::SshError>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.abort();
    }
}

impl Fixture {
    pub async fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("nook-sshd-test")
            .tempdir()
            .expect("tempdir");
        let owner_key = dir.path().join("owner");
        let owner_pub = keygen(&owner_key);
        let stranger_key = dir.path().join("stranger");
        keygen(&stranger_key);
        let vm_key = dir.path().join("vm_key");
        let vm_pub = keygen(&vm_key);
        let vm = Sshd::start(dir.path(), &vm_pub).await;

        let mut accounts = HashMap::new();
        accounts.insert(
            owner_pub,
            Account {
                id: "acct-owner".into(),
                email: "owner@example.com".into(),
            },
        );
        let backend = Arc::new(TestBackend {
            accounts: Mutex::new(accounts),
            // No guest shell: every session goes through the relay to this real sshd (the
            // guest-agent path is covered by the system tests, against real guests).
            vm: VmEndpoint {
                name: "vmtest".into(),
                shell: None,
                sshd: Some(SshdEndpoint {
                    addr: SocketAddr::from(([127, 0, 0, 1], vm.port)),
                    user: "root".into(),
                    private_key_openssh: std::fs::read_to_string(&vm_key).expect("read key"),
                    host_keys: vec![std::fs::read_to_string(&vm.host_key_pub).expect("host key")],
                    refused_patience: Duration::ZERO,
                }),
            },
            vm_owner: "acct-owner".into(),
            down_port: free_port(),
            late_port: free_port(),
            other_host_key: keygen(&dir.path().join("other_host_key")),
        });
        let port = free_port();
        let cfg = SshServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            host_key_path: dir.path().join("nook_host_key"),
            banner_host: "localhost".into(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(nook_sshd::serve(cfg, backend.clone(), async move {
            let _ = rx.await;
        }));
        wait_for_port(port).await;
        Fixture {
            dir,
            port,
            owner_key,
            stranger_key,
            backend,
            vm,
            shutdown: Some(tx),
            server,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Common OpenSSH client options (`-p`/`-P` is added by the caller).
    pub fn opts(&self, key: &Path) -> Vec<String> {
        let mut v: Vec<String> = [
            "-F",
            "/dev/null",
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
            "ConnectTimeout=20",
            "-i",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(key.display().to_string());
        v
    }

    /// An `ssh` command to `user@127.0.0.1` (arguments are appended by the caller).
    pub fn ssh(&self, key: &Path, user: &str) -> Command {
        self.ssh_port(key, user, self.port)
    }

    /// Like [`Fixture::ssh`], to another port.
    pub fn ssh_port(&self, key: &Path, user: &str, port: u16) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.opts(key))
            .arg("-p")
            .arg(port.to_string())
            .arg(format!("{user}@127.0.0.1"))
            .env_remove("SSH_AUTH_SOCK")
            .kill_on_drop(true);
        cmd
    }
}

#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `cmd`, feeding it `stdin` in pieces (with a pause after each), then EOF.
pub async fn run_with_input(mut cmd: Command, stdin: &[&[u8]], pause: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut child_in = child.stdin.take().expect("stdin");
    let mut child_out = child.stdout.take().expect("stdout");
    let mut child_err = child.stderr.take().expect("stderr");
    let pieces: Vec<Vec<u8>> = stdin.iter().map(|p| p.to_vec()).collect();
    let feed = async move {
        for piece in pieces {
            if child_in.write_all(&piece).await.is_err() {
                return;
            }
            let _ = child_in.flush().await;
            tokio::time::sleep(pause).await;
        }
        drop(child_in);
    };
    let read_out = async move {
        let mut v = Vec::new();
        let _ = child_out.read_to_end(&mut v).await;
        v
    };
    let read_err = async move {
        let mut v = Vec::new();
        let _ = child_err.read_to_end(&mut v).await;
        v
    };
    let all = async {
        let ((), stdout, stderr) = tokio::join!(feed, read_out, read_err);
        let status = child.wait().await.expect("wait");
        Output {
            status: status.code(),
            stdout,
            stderr,
        }
    };
    tokio::time::timeout(TIMEOUT, all)
        .await
        .expect("command timed out")
}

pub async fn run_cmd(cmd: Command) -> Output {
    run_with_input(cmd, &[], Duration::ZERO).await
}

/// A TCP echo server on 127.0.0.1; returns its port.
pub async fn echo_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (port, task)
}

/// Connects to `port` and checks that `payload` comes back unchanged.
/// Retries while the forward is being set up.
pub async fn check_echo(port: u16, payload: &[u8]) {
    let mut last_err = String::new();
    for _ in 0..100 {
        match try_echo(port, payload).await {
            Ok(()) => return,
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("echo through port {port} failed: {last_err}");
}

async fn try_echo(port: u16, payload: &[u8]) -> Result<(), String> {
    let sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut r, mut w) = sock.into_split();
    let data = payload.to_vec();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&data).await;
        let _ = w.shutdown().await;
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = writer.await;
    if got == payload {
        Ok(())
    } else {
        Err(format!("got {} bytes, want {}", got.len(), payload.len()))
    }
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
