//! A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, run from a temp
//! dir as the unprivileged `postgres` user (PostgreSQL refuses to run as root), listening only
//! on a Unix socket in that dir. It is killed, and its files removed, when dropped.
//!
//! A missing PostgreSQL fails the test with what to install: the store's tests run against
//! both dialects or not at all.

use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Location;

pub struct TempPostgres {
    dir: tempfile::TempDir,
    server: Child,
    /// Where it also takes TCP connections (any client there is trusted), if anywhere.
    tcp: Option<std::net::SocketAddr>,
}

/// The newest `/usr/lib/postgresql/N/bin`, where Debian and Ubuntu put the server's programs.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((n, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             the store's tests need it; run scripts/install-deps or apt-get install postgresql"
        ),
    }
}

/// Runs `program` as the `postgres` user when we are root, else as ourselves. The process
/// itself changes user (no `runuser` in between), so killing it kills the server.
fn as_db_user(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = db_user_ids() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn db_user_ids() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("no `postgres` user: install Debian's postgresql package");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

impl TempPostgres {
    /// Starts a fresh server with an empty database `nook`, on a Unix socket only.
    pub fn start() -> Self {
        Self::start_on(None)
    }

    /// As [`Self::start`], also taking TCP connections at `tcp` from anyone, trusted: for
    /// tests whose clients sit in other network namespaces (and can be cut off by a firewall).
    pub fn start_on(tcp: Option<std::net::SocketAddr>) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("nook-pg-")
            .tempdir()
            .expect("temp dir");
        if let Some((uid, gid)) = db_user_ids() {
            chown(dir.path(), Some(uid), Some(gid)).expect("chown the temp dir to postgres");
        }
        let data = dir.path().join("data");
        let out = as_db_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "--auth=trust",
                "-U",
                "nook",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if tcp.is_some() {
            let hba = data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            rules.push_str("host all all 0.0.0.0/0 trust\n");
            std::fs::write(&hba, rules).expect("write pg_hba.conf");
        }
        let server = spawn_server(&bin, dir.path(), tcp);
        let pg = Self { dir, server, tcp };
        pg.wait_ready(&bin);
        let out = as_db_user(&bin.join("createdb"))
            .env("PGPORT", pg.port())
            .arg("-h")
            .arg(pg.dir.path())
            .args(["-U", "nook", "nook"])
            .output()
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn wait_ready(&self, bin: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = as_db_user(&bin.join("pg_isready"))
                .env("PGPORT", self.port())
                .arg("-h")
                .arg(self.dir.path())
                .arg("-q")
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start in 30 s: {}",
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's port (its Unix socket's name carries it too).
    fn port(&self) -> String {
        self.tcp.map_or(5432, |a| a.port()).to_string()
    }

    /// The socket directory: `psql -h` takes it.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for database `db` (`nook` exists; make others with [`Self::create_db`]): over
    /// TCP when the server takes it, else its Unix socket.
    pub fn url(&self, db: &str) -> String {
        match self.tcp {
            Some(addr) => format!("postgres://nook@{addr}/{db}"),
            None => format!(
                "postgres://nook@localhost/{db}?host={}",
                self.dir.path().display()
            ),
        }
    }

    /// Everything in database `nook`, as `pg_dump` prints it (bytea in hex).
    pub fn dump(&self) -> String {
        let out = as_db_user(&bin_dir().join("pg_dump"))
            .env("PGPORT", self.port())
            .arg("-h")
            .arg(self.dir.path())
            .args(["-U", "nook", "--data-only", "nook"])
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sql` in database `nook` as its owner; what `psql` printed (unaligned, no headers).
    pub fn psql(&self, sql: &str) -> String {
        let out = as_db_user(&bin_dir().join("psql"))
            .env("PGPORT", self.port())
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-U",
                "nook",
                "-d",
                "nook",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn location(&self) -> Location {
        Location::Postgres(self.url("nook"))
    }

    /// Stops the server the way a crash would (SIGKILL), leaving its files.
    pub fn kill(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }

    /// Starts the server again on the same files and socket, after [`Self::kill`].
    pub fn start_again(&mut self) {
        let bin = bin_dir();
        // A killed postmaster's backends exit on their own once they notice; until then the
        // old shared memory is in use and a new postmaster refuses to start.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.server = spawn_server(&bin, self.dir.path(), self.tcp);
            std::thread::sleep(Duration::from_millis(300));
            match self.server.try_wait() {
                Ok(None) => break,
                _ if Instant::now() < deadline => continue,
                _ => panic!(
                    "postgres did not start again: {}",
                    std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
                ),
            }
        }
        self.wait_ready(&bin);
    }
}

fn spawn_server(bin: &Path, dir: &Path, tcp: Option<std::net::SocketAddr>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .expect("log file");
    as_db_user(&bin.join("postgres"))
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-k")
        .arg(dir)
        .args(["-c", "fsync=off"])
        .arg("-c")
        .arg(match tcp {
            Some(addr) => format!("listen_addresses={}", addr.ip()),
            None => "listen_addresses=".to_string(),
        })
        .args(["-p", &tcp.map_or(5432, |a| a.port()).to_string()])
        .args(["-c", "max_connections=50"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start postgres")
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh, empty store for one test, and what must live as long as it.
pub struct TestStore {
    pub store: crate::Store,
    _dir: Option<tempfile::TempDir>,
    _postgres: Option<TempPostgres>,
}

impl TestStore {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::Store::open(&dir.path().join("db.sqlite"))
            .await
            .expect("open sqlite");
        Self {
            store,
            _dir: Some(dir),
            _postgres: None,
        }
    }

    pub async fn postgres() -> Self {
        let pg = TempPostgres::start();
        let store = crate::Store::connect(&pg.location())
            .await
            .expect("connect to postgres");
        // Until it hears other writers, a store's generation moves on every read.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.hears_other_hosts() {
            assert!(
                Instant::now() < deadline,
                "the store never heard its notifications"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            store,
            _dir: None,
            _postgres: Some(pg),
        }
    }
}

/// Defines a test that runs twice, once on each kind of store: `NAME::sqlite` and
/// `NAME::postgres`. The body gets the store as `$store`.
#[cfg(test)]
macro_rules! on_both_stores {
    ($(#[$meta:meta])* async fn $name:ident($store:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($store: $crate::Store) $body

            #[tokio::test]
            async fn sqlite() {
                let t = $crate::testing::TestStore::sqlite().await;
                run(t.store.clone()).await;
            }

            #[tokio::test]
            async fn postgres() {
                let t = $crate::testing::TestStore::postgres().await;
                run(t.store.clone()).await;
            }
        }
    };
}
#[cfg(test)]
pub(crate) use on_both_stores;

/// A VM row for tests: `id-NAME`, owned by `admin`, on host `h1`.
#[cfg(test)]
pub(crate) fn new_vm(name: &str) -> crate::NewVm {
    crate::NewVm {
        id: format!("id-{name}"),
        name: name.into(),
        owner: "admin".into(),
        image: "tiny".into(),
        image_dir: "/img".into(),
        cpu: 1,
        memory_mib: 256,
        disk_bytes: 1 << 30,
        host: "h1".into(),
    }
}
