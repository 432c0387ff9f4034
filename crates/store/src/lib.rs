//! Durable state for one nook host: VM records (and, later, accounts, keys and shares).
//!
//! SQLite is the embedded default; the schema lives in `migrations/` and runs at open.
//! This crate knows SQL and nothing about QEMU, networks or users' wording of errors beyond
//! the typed [`StoreError`].

mod agent;
mod changes;
mod credits;
mod edge;
mod fleet;
mod identity;
mod integrations;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod web;

pub use agent::AgentConversation;
pub use credits::{LlmUse, UsageRow};
pub use edge::{ApiToken, Role, Share, WebSettings, hash_secret, new_secret};
pub use fleet::{Handover, HostRow, HostStatus, Lease, LeaseHeld, place};
pub use identity::{Admission, CLAIM_TTL_SECS, INVITE_TTL_SECS};
pub use integrations::{Grant, IntegrationRow};
pub use web::{ExecGrant, ExecToken, VmApiGrant};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nook_api::VmState;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use sqlx::Row;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("A VM named '{0}' already exists")]
    NameTaken(String),
    #[error("No VM named '{0}'")]
    NotFound(String),
    #[error("No free network slot")]
    SlotsExhausted,
    #[error("Database is full: the disk holding the data dir has no space left")]
    NoSpace,
    #[error("Database error")]
    Db(#[source] sqlx::Error),
    /// The database could not be reached or refused us; the text is safe to show the host's
    /// operator (it never holds the URL's password).
    #[error("Cannot reach the {kind} store: {why}")]
    Connect { kind: &'static str, why: String },
    /// The database stopped answering (down, restarting, unreachable) after the host started.
    #[error("The database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("Database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("An account for {0} already exists")]
    EmailTaken(String),
    #[error("This key already belongs to an account")]
    KeyTaken,
    #[error("No such key")]
    KeyNotFound,
    #[error("An account must keep at least one key")]
    LastKey,
    #[error("Signup on this host needs an invite")]
    SignupClosed,
    #[error("That code is unknown, used or expired")]
    InvalidCode,
    #[error("Corrupt row for VM '{0}': {1}")]
    Corrupt(String, String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            // SQLITE_FULL (13) and friends, or PostgreSQL's disk_full (53100): the disk under
            // the database is full.
            if matches!(db.code().as_deref(), Some("13" | "53100"))
                || db.message().contains("database or disk is full")
            {
                return Self::NoSpace;
            }
        }
        if matches!(
            err,
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
        ) {
            return Self::Unavailable(err);
        }
        Self::Db(err)
    }
}

/// What a file path must not carry raw in a `sqlite://` URL.
const PATH_UNSAFE: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'?').add(b'#');

/// Highest slot; matches the /16 the network crate carves /30 links from.
pub const MAX_SLOT: i64 = 16383;

#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub image: String,
    pub image_dir: String,
    pub cpu: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub slot: u32,
    pub state: VmState,
    pub state_reason: Option<String>,
    pub pid: Option<u32>,
    pub created_at: String,
    /// The host it lives on (empty: made before hosts had names).
    pub host: String,
    /// The host that keeps a replica of its disk (empty: none).
    pub replica_host: String,
    /// When its last replica was complete, in ms since the epoch (0: not yet).
    pub replicated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: String,
    pub email: String,
    pub created_at: String,
    /// The email was proven (a mailed link, an invite, or the admin vouching for it). Until
    /// then it grants nothing: no shares addressed to it, no email login, no identity header.
    pub email_verified: bool,
    /// The host's owner: the first account made on it.
    pub owner: bool,
}

/// An account's compute envelope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub cpu: f64,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub max_vms: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SshKey {
    pub fingerprint: String,
    pub public_key: String,
    pub comment: String,
}

#[derive(Debug, Clone)]
pub struct NewVm {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub image: String,
    pub image_dir: String,
    pub cpu: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    /// The host it is made on.
    pub host: String,
}

/// Which SQL a store speaks, where the two differ (the clock, in `fleet.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// Changes whenever the data may have changed (see [`Store::generation`]).
    changes: changes::Changes,
    /// Hears other hosts' writes (PostgreSQL); stopped by [`Store::close`].
    listener: Option<Arc<tokio::task::JoinHandle<()>>>,
}

/// Bumps the store's generation when made, before a writing method starts, and again when
/// dropped, at its end whatever its outcome and after its commit. The first bump stales every
/// answer remembered before the write could be seen; the second every answer read while it ran.
struct Changed<'a>(&'a AtomicU64);

impl<'a> Changed<'a> {
    fn new(generation: &'a AtomicU64) -> Self {
        generation.fetch_add(1, Ordering::AcqRel);
        Self(generation)
    }
}

impl Drop for Changed<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Migrations, applied under the database's lock (two hosts starting at once apply each
/// once). A schema a newer release has moved on is no error: in a rolling upgrade the hosts
/// not yet upgraded keep running, and restarting, on it. So every migration keeps the release
/// before it working: it adds tables and columns (with defaults), and never drops or renames
/// what that release reads.
fn migrator(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

pub(crate) fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where a host keeps its state: the embedded SQLite file (the default), or a PostgreSQL
/// database that several hosts can share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` URL.
    Postgres(String),
}

impl Location {
    /// The kind of database, for logs and `stat`; never the URL, which may hold a password.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

impl Store {
    /// Opens (creating if need be) the embedded SQLite database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::connect(&Location::Sqlite(path.to_path_buf())).await
    }

    /// Connects to the store at `location` and brings its schema up to date. One schema, in
    /// two dialects: `migrations/sqlite` and `migrations/postgres` hold the same versions.
    pub async fn connect(location: &Location) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (pool, changes, listener) = match location {
            Location::Sqlite(path) => {
                // `mode=rwc` creates the file; the path is percent-encoded so that a `?` or `#`
                // in it stays part of the name.
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    utf8_percent_encode(&path.to_string_lossy(), PATH_UNSAFE)
                );
                let pool = AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers go on during a write; FULL makes a commit
                            // survive a power cut. The busy timeout (5 s) is sqlx's default.
                            sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
                                .execute(conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                migrator(sqlx::migrate!("./migrations/sqlite"))
                    .run(&pool)
                    .await?;
                (pool, changes::Changes::local(), None)
            }
            Location::Postgres(url) => {
                let (changes, listener) = changes::Changes::shared(url);
                let writer = changes.writer();
                // A request needs a few queries: with the database down, each waits this long
                // before failing, so keep it short enough for a person at a prompt.
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(std::time::Duration::from_secs(3))
                    .after_connect(move |conn, _| {
                        let writer = writer.clone();
                        Box::pin(async move {
                            // Named in this connection's change notifications (see changes.rs).
                            sqlx::query("SELECT set_config('nook.writer', $1, false)")
                                .bind(&*writer)
                                .execute(conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await
                    .map_err(|e| {
                        listener.abort();
                        StoreError::Connect {
                            kind: location.kind(),
                            why: e.to_string(),
                        }
                    })?;
                if let Err(e) = migrator(sqlx::migrate!("./migrations/postgres"))
                    .run(&pool)
                    .await
                {
                    listener.abort();
                    return Err(e.into());
                }
                (pool, changes, Some(Arc::new(listener)))
            }
        };
        let dialect = match location {
            Location::Sqlite(_) => Dialect::Sqlite,
            Location::Postgres(_) => Dialect::Postgres,
        };
        Ok(Self {
            pool,
            dialect,
            changes,
            listener,
        })
    }

    /// A number that changes whenever the stored data may have changed: before and after
    /// every writing method of this process, and, on a shared PostgreSQL, at every commit of
    /// any host's (as its notification arrives, see `changes.rs`). A value read before a
    /// lookup and still current after it vouches that the lookup's answer is current, which
    /// is what lets the edge keep answers in memory and still see a revocation on the very
    /// next request.
    pub fn generation(&self) -> u64 {
        self.changes.generation()
    }

    /// Whether other hosts may share this store (PostgreSQL), so VMs need leases.
    pub fn is_shared(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    /// Whether this host hears other hosts' writes now: always with SQLite (there are none),
    /// and with PostgreSQL while its notification connection is up.
    pub fn hears_other_hosts(&self) -> bool {
        self.changes.hears_other_hosts()
    }

    /// Serialises the transactions that read before they write on `what` (the lowest free
    /// slot, the first account, an account's last key). SQLite needs nothing: one writer at a
    /// time, and a write after a stale read fails. PostgreSQL's default isolation would let
    /// two such transactions both act on what they read, so they take a lock first.
    async fn serialise(&self, tx: &mut AnyConnection, what: &str) -> Result<(), StoreError> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(what)
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    fn change(&self) -> Changed<'_> {
        Changed::new(self.changes.counter())
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at `BEGIN`
    /// (`IMMEDIATE`): a deferred transaction that read first and then writes while another
    /// connection holds the lock fails at once with "database is locked", without the busy
    /// timeout, because waiting could deadlock. Taking the lock up front makes it wait instead.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// Inserts a VM in state `creating`, giving it the lowest free network slot.
    pub async fn insert_vm(&self, vm: NewVm) -> Result<VmRecord, StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        self.serialise(&mut tx, "vms").await?;
        let taken = sqlx::query("SELECT 1 FROM vms WHERE name = $1")
            .bind(&vm.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(StoreError::NameTaken(vm.name));
        }
        let slot: i64 = sqlx::query(
            "SELECT COALESCE((SELECT MIN(v.slot + 1) FROM vms v WHERE NOT EXISTS \
             (SELECT 1 FROM vms w WHERE w.slot = v.slot + 1)), 0) AS free, \
             CASE WHEN EXISTS(SELECT 1 FROM vms WHERE slot = 0) THEN 1 ELSE 0 END AS zero_taken",
        )
        .fetch_one(&mut *tx)
        .await
        .map(|row| {
            if row.get::<i64, _>("zero_taken") != 0 {
                row.get("free")
            } else {
                0
            }
        })?;
        if slot > MAX_SLOT {
            return Err(StoreError::SlotsExhausted);
        }
        let at = now();
        let inserted = sqlx::query(
            "INSERT INTO vms (id, name, owner, image, image_dir, cpu, memory_mib, disk_bytes, slot, state, created_at, updated_at, host) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'creating', $10, $11, $12)",
        )
        .bind(&vm.id)
        .bind(&vm.name)
        .bind(&vm.owner)
        .bind(&vm.image)
        .bind(&vm.image_dir)
        .bind(vm.cpu as i64)
        .bind(vm.memory_mib as i64)
        .bind(vm.disk_bytes as i64)
        .bind(slot)
        .bind(&at)
        .bind(&at)
        .bind(&vm.host)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            return Err(StoreError::NameTaken(vm.name));
        }
        inserted?;
        tx.commit().await?;
        self.get_by_id(&vm.id).await
    }

    pub async fn get(&self, name: &str) -> Result<VmRecord, StoreError> {
        let row = sqlx::query("SELECT * FROM vms WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode(&r))
            .unwrap_or_else(|| Err(StoreError::NotFound(name.to_string())))
    }

    pub async fn get_by_id(&self, id: &str) -> Result<VmRecord, StoreError> {
        let row = sqlx::query("SELECT * FROM vms WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode(&r))
            .unwrap_or_else(|| Err(StoreError::NotFound(id.to_string())))
    }

    pub async fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vms ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// The store-wide setting `name`: the stored value, which is `value` if no one set it
    /// before (the first writer wins, also when hosts start together).
    pub async fn setting_or_insert(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let _changed = self.change();
        sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// The VMs that live on `host`, and those made before hosts had names.
    pub async fn list_on_host(&self, host: &str) -> Result<Vec<VmRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vms WHERE host = $1 OR host = '' ORDER BY name")
            .bind(host)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// The VMs holding network slot `slot` (one, but a row left from a crash may share it).
    pub async fn by_slot(&self, slot: u32) -> Result<Vec<VmRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM vms WHERE slot = $1")
            .bind(i64::from(slot))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn set_state(
        &self,
        id: &str,
        state: VmState,
        reason: Option<&str>,
        pid: Option<u32>,
    ) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "UPDATE vms SET state = $1, state_reason = $2, pid = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(pid.map(i64::from))
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM vms WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // A VM's grants go with it: no later VM inherits them.
        sqlx::query("DELETE FROM integration_grants WHERE vm_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn rename(&self, id: &str, new_name: &str) -> Result<(), StoreError> {
        let _changed = self.change();
        let done = sqlx::query("UPDATE vms SET name = $1, updated_at = $2 WHERE id = $3")
            .bind(new_name)
            .bind(now())
            .bind(id)
            .execute(&self.pool)
            .await;
        match done {
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Err(StoreError::NameTaken(new_name.to_string()))
            }
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    pub async fn set_resources(
        &self,
        id: &str,
        cpu: u32,
        memory_mib: u32,
        disk_bytes: u64,
    ) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "UPDATE vms SET cpu = $1, memory_mib = $2, disk_bytes = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(cpu as i64)
        .bind(memory_mib as i64)
        .bind(disk_bytes as i64)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Creates an account holding one key, atomically, if `admission` lets it in. The first
    /// account on a host is let in whatever the admission, becomes the owner, and has its email
    /// counted as verified: it is the person who just set the host up.
    pub async fn create_account(
        &self,
        id: &str,
        email: &str,
        key: &SshKey,
        admission: Admission<'_>,
    ) -> Result<Account, StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        self.serialise(&mut tx, "accounts").await?;
        ensure_key_free(&mut tx, &key.fingerprint).await?;
        let first = sqlx::query("SELECT 1 FROM accounts LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .is_none();
        let verified = match admission {
            _ if first => true,
            Admission::FirstOnly => return Err(StoreError::SignupClosed),
            Admission::Unverified => false,
            Admission::Vouched => true,
            Admission::Invite(code) => {
                // A failure after a write rolls back at once: a transaction merely dropped
                // rolls back only when its connection is next used, and until then it holds
                // the database's write lock against every other connection.
                if let Err(e) = identity::take_invite(&mut tx, code, email).await {
                    tx.rollback().await?;
                    return Err(e);
                }
                true
            }
        };
        let at = now();
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, email, created_at, email_verified_at, owner) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(email)
        .bind(&at)
        .bind(verified.then_some(&at))
        .bind(i64::from(first))
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            tx.rollback().await?;
            return Err(StoreError::EmailTaken(email.to_string()));
        }
        inserted?;
        insert_key(&mut tx, id, key, &at).await?;
        tx.commit().await?;
        Ok(Account {
            id: id.to_string(),
            email: email.to_string(),
            created_at: at,
            email_verified: verified,
            owner: first,
        })
    }

    pub async fn account_for_key(&self, fingerprint: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query("SELECT a.* FROM accounts a JOIN ssh_keys k ON k.account_id = a.id WHERE k.fingerprint = $1")
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode_account(&r)).transpose()
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let rows = sqlx::query("SELECT * FROM accounts ORDER BY email")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_account).collect()
    }

    pub async fn account_by_email(&self, email: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query("SELECT * FROM accounts WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode_account(&r)).transpose()
    }

    pub async fn add_key(&self, account_id: &str, key: &SshKey) -> Result<(), StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        ensure_key_free(&mut tx, &key.fingerprint).await?;
        insert_key(&mut tx, account_id, key, &now()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn keys(&self, account_id: &str) -> Result<Vec<SshKey>, StoreError> {
        let rows = sqlx::query("SELECT * FROM ssh_keys WHERE account_id = $1 ORDER BY created_at")
            .bind(account_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SshKey {
                    fingerprint: r.try_get("fingerprint")?,
                    public_key: r.try_get("public_key")?,
                    comment: r.try_get("comment")?,
                })
            })
            .collect()
    }

    /// Removes a key of this account, refusing to remove its last one (it would lock the
    /// account out for good).
    pub async fn remove_key(&self, account_id: &str, fingerprint: &str) -> Result<(), StoreError> {
        let _changed = self.change();
        let mut tx = self.write_tx().await?;
        self.serialise(&mut tx, &format!("keys:{account_id}"))
            .await?;
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ssh_keys WHERE account_id = $1")
            .bind(account_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        let found =
            sqlx::query("SELECT 1 FROM ssh_keys WHERE account_id = $1 AND fingerprint = $2")
                .bind(account_id)
                .bind(fingerprint)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(StoreError::KeyNotFound);
        }
        if count <= 1 {
            return Err(StoreError::LastKey);
        }
        sqlx::query("DELETE FROM ssh_keys WHERE account_id = $1 AND fingerprint = $2")
            .bind(account_id)
            .bind(fingerprint)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The account's own plan, if one was set (else the caller applies the default).
    pub async fn plan(&self, account_id: &str) -> Result<Option<Plan>, StoreError> {
        let row = sqlx::query("SELECT * FROM plans WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(Plan {
                cpu: r.try_get("cpu")?,
                memory_mib: r.try_get::<i64, _>("memory_mib")? as u32,
                disk_bytes: r.try_get::<i64, _>("disk_bytes")? as u64,
                max_vms: r.try_get::<i64, _>("max_vms")? as u32,
            })
        })
        .transpose()
    }

    pub async fn set_plan(&self, account_id: &str, plan: &Plan) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query(
            "INSERT INTO plans (account_id, cpu, memory_mib, disk_bytes, max_vms, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT(account_id) DO UPDATE SET cpu = excluded.cpu, memory_mib = excluded.memory_mib, \
             disk_bytes = excluded.disk_bytes, max_vms = excluded.max_vms, updated_at = excluded.updated_at",
        )
        .bind(account_id)
        .bind(plan.cpu)
        .bind(plan.memory_mib as i64)
        .bind(plan.disk_bytes as i64)
        .bind(plan.max_vms as i64)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
        self.pool.close().await;
    }
}

async fn ensure_key_free(tx: &mut AnyConnection, fingerprint: &str) -> Result<(), StoreError> {
    let taken = sqlx::query("SELECT 1 FROM ssh_keys WHERE fingerprint = $1")
        .bind(fingerprint)
        .fetch_optional(tx)
        .await?;
    if taken.is_some() {
        Err(StoreError::KeyTaken)
    } else {
        Ok(())
    }
}

async fn insert_key(
    tx: &mut AnyConnection,
    account_id: &str,
    key: &SshKey,
    at: &str,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO ssh_keys (fingerprint, account_id, public_key, comment, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&key.fingerprint)
        .bind(account_id)
        .bind(&key.public_key)
        .bind(&key.comment)
        .bind(at)
        .execute(tx)
        .await?;
    Ok(())
}

fn decode_account(row: &AnyRow) -> Result<Account, StoreError> {
    Ok(Account {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        created_at: row.try_get("created_at")?,
        email_verified: row
            .try_get::<Option<String>, _>("email_verified_at")?
            .is_some(),
        owner: row.try_get::<i64, _>("owner")? != 0,
    })
}

fn decode(row: &AnyRow) -> Result<VmRecord, StoreError> {
    let name: String = row.try_get("name")?;
    let state: String = row.try_get("state")?;
    let state = VmState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(name.clone(), format!("unknown state {state:?}")))?;
    Ok(VmRecord {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        image: row.try_get("image")?,
        image_dir: row.try_get("image_dir")?,
        cpu: row.try_get::<i64, _>("cpu")? as u32,
        memory_mib: row.try_get::<i64, _>("memory_mib")? as u32,
        disk_bytes: row.try_get::<i64, _>("disk_bytes")? as u64,
        slot: row.try_get::<i64, _>("slot")? as u32,
        state,
        state_reason: row.try_get("state_reason")?,
        pid: row.try_get::<Option<i64>, _>("pid")?.map(|p| p as u32),
        created_at: row.try_get("created_at")?,
        host: row.try_get("host")?,
        replica_host: row.try_get("replica_host")?,
        replicated_at_ms: row.try_get("replicated_at_ms")?,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_vm, on_both_stores};

    on_both_stores! {
    async fn every_write_moves_the_generation_and_reads_do_not(store) {
        let a = store.insert_vm(new_vm("aa")).await.expect("aa");
        let g = store.generation();
        store.get("aa").await.expect("get");
        store.web_settings(&a.id).await.expect("web");
        assert_eq!(store.generation(), g, "a read moved the generation");
        // Two steps each: before the write starts and after it ends. The first alone would
        // leave a reader a window to remember rows read while the write ran.
        store.set_public(&a.id, true).await.expect("public");
        let g2 = store.generation();
        assert!(
            g2 >= g + 2,
            "{g} -> {g2}: a writing method without its guard"
        );
        store
            .add_share(&a.id, "b@example.com", Role::Viewer)
            .await
            .expect("share");
        let g3 = store.generation();
        assert!(
            g3 >= g2 + 2,
            "{g2} -> {g3}: a writing method without its guard"
        );
        // A write that fails still counts: it may have changed something before failing.
        assert!(store.insert_vm(new_vm("aa")).await.is_err());
        assert!(store.generation() > g3);
    }
    }

    on_both_stores! {
    async fn slots_are_lowest_free_and_names_unique(store) {
        let a = store.insert_vm(new_vm("aa")).await.expect("aa");
        let b = store.insert_vm(new_vm("bb")).await.expect("bb");
        let c = store.insert_vm(new_vm("cc")).await.expect("cc");
        assert_eq!((a.slot, b.slot, c.slot), (0, 1, 2));
        assert!(matches!(
            store.insert_vm(new_vm("bb")).await,
            Err(StoreError::NameTaken(_))
        ));
        store.delete(&b.id).await.expect("delete");
        assert_eq!(store.insert_vm(new_vm("dd")).await.expect("dd").slot, 1);
        store.delete(&a.id).await.expect("delete");
        assert_eq!(store.insert_vm(new_vm("ee")).await.expect("ee").slot, 0);
        store
            .set_state(&c.id, VmState::Running, None, Some(42))
            .await
            .expect("state");
        let c = store.get("cc").await.expect("get");
        assert_eq!((c.state, c.pid), (VmState::Running, Some(42)));
        assert!(matches!(
            store.get("zz").await,
            Err(StoreError::NotFound(_))
        ));
        let names: Vec<_> = store
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["cc", "dd", "ee"]);
    }
    }

    on_both_stores! {
    async fn accounts_own_keys_and_keep_at_least_one(store) {
        let key = |n: &str| SshKey {
            fingerprint: format!("SHA256:{n}"),
            public_key: format!("ssh-ed25519 {n}"),
            comment: String::new(),
        };
        let alice = store
            .create_account("a1", "alice@example.com", &key("k1"), Admission::Unverified)
            .await
            .expect("alice");
        assert!(matches!(
            store
                .create_account("a2", "alice@example.com", &key("k2"), Admission::Unverified)
                .await,
            Err(StoreError::EmailTaken(_))
        ));
        assert!(matches!(
            store
                .create_account("a3", "bob@example.com", &key("k1"), Admission::Unverified)
                .await,
            Err(StoreError::KeyTaken)
        ));
        assert_eq!(
            store.account_for_key("SHA256:k1").await.expect("q"),
            Some(alice.clone())
        );
        assert_eq!(store.account_for_key("SHA256:k2").await.expect("q"), None);
        assert!(matches!(
            store.remove_key("a1", "SHA256:k1").await,
            Err(StoreError::LastKey)
        ));
        store.add_key("a1", &key("k2")).await.expect("add");
        assert!(matches!(
            store.add_key("a1", &key("k2")).await,
            Err(StoreError::KeyTaken)
        ));
        store.remove_key("a1", "SHA256:k1").await.expect("remove");
        assert!(matches!(
            store.remove_key("a1", "SHA256:k1").await,
            Err(StoreError::KeyNotFound)
        ));
        assert_eq!(store.keys("a1").await.expect("keys").len(), 1);
        assert_eq!(store.plan("a1").await.expect("plan"), None);
        let plan = Plan {
            cpu: 2.0,
            memory_mib: 8192,
            disk_bytes: 100 << 30,
            max_vms: 20,
        };
        store.set_plan("a1", &plan).await.expect("set");
        store
            .set_plan("a1", &Plan { cpu: 1.5, ..plan })
            .await
            .expect("update");
        assert_eq!(
            store.plan("a1").await.expect("plan"),
            Some(Plan { cpu: 1.5, ..plan })
        );
    }
    }
}
