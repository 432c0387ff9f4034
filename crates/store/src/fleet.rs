//! Hosts and VM leases (migration 0013). Every time here is the database's clock in unix
//! milliseconds, so a host with a wrong clock can neither keep nor take a lease early.

use sqlx::Row;

use nook_api::VmState;

use crate::{Dialect, Store, StoreError};

/// The database's clock, in unix milliseconds, as SQL.
macro_rules! now_ms {
    (postgres) => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
    (sqlite) => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
}

/// The same statement for each dialect, differing only in how it reads the clock.
macro_rules! by_dialect {
    ($dialect:expr, $($part:tt),+) => {
        match $dialect {
            Dialect::Postgres => concat!($(by_dialect!(@postgres $part)),+),
            Dialect::Sqlite => concat!($(by_dialect!(@sqlite $part)),+),
        }
    };
    (@postgres NOW) => { now_ms!(postgres) };
    (@sqlite NOW) => { now_ms!(sqlite) };
    // `vm_id` is one of the comma-separated ids in $2 (VM ids are hex: no commas).
    (@postgres IN_IDS) => { "vm_id = ANY(string_to_array($2, ','))" };
    (@sqlite IN_IDS) => { "instr(',' || $2 || ',', ',' || vm_id || ',') > 0" };
    (@$d:ident $s:literal) => { $s };
}

/// A host of the fleet, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub name: String,
    /// The host's id (kept in its data dir): the same across restarts.
    pub instance: String,
    pub addr: String,
    pub version: String,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub cpus: u32,
    pub memory_mib: u64,
    pub running_vms: u32,
    pub memory_used_mib: u64,
}

/// A host's listing: its row, how long ago (by the database's clock) it last beat, and the
/// leases it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    pub host: HostRow,
    pub since_heartbeat_ms: i64,
    pub leases: u32,
    /// The admin cordoned it (`nook host drain`, `nook host cordon`): no new VMs go there.
    pub cordoned: bool,
}

/// A lease held: the VM runs on `host` until the database's clock passes `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub vm_id: String,
    pub host: String,
    pub epoch: i64,
    pub expires_at_ms: i64,
}

/// Why a lease was not granted: another host holds it, for this much longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHeld {
    pub host: String,
    pub remaining_ms: i64,
}

impl Store {
    /// Records this host's heartbeat (and registers it the first time).
    pub async fn heartbeat(&self, h: &HostRow) -> Result<(), StoreError> {
        let sql = by_dialect!(
            self.dialect,
            "INSERT INTO hosts (name, addr, version, started_at, heartbeat_at, cpus, memory_mib, \
             running_vms, memory_used_mib, instance) VALUES ($1, $2, $3, $4, ",
            NOW,
            ", $5, $6, $7, $8, $9) ON CONFLICT (name) DO UPDATE SET addr = excluded.addr, \
             instance = excluded.instance, \
             version = excluded.version, started_at = excluded.started_at, \
             heartbeat_at = excluded.heartbeat_at, cpus = excluded.cpus, \
             memory_mib = excluded.memory_mib, running_vms = excluded.running_vms, \
             memory_used_mib = excluded.memory_used_mib"
        );
        sqlx::query(sql)
            .bind(&h.name)
            .bind(&h.addr)
            .bind(&h.version)
            .bind(h.started_at_ms)
            .bind(i64::from(h.cpus))
            .bind(h.memory_mib as i64)
            .bind(i64::from(h.running_vms))
            .bind(h.memory_used_mib as i64)
            .bind(&h.instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Registers `h` as a live host, unless a host with another id beat under that name
    /// within `fresh_ms`: then `Err` with how long ago (two live hosts under one name would
    /// both take that name's leases, and could run one VM twice).
    pub async fn claim_host(
        &self,
        h: &HostRow,
        fresh_ms: i64,
    ) -> Result<Result<(), i64>, StoreError> {
        let sql = by_dialect!(
            self.dialect,
            "SELECT instance, ",
            NOW,
            " - heartbeat_at AS since FROM hosts WHERE name = $1"
        );
        let row = sqlx::query(sql)
            .bind(&h.name)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            let instance: String = row.try_get("instance")?;
            let since: i64 = row.try_get("since")?;
            if instance != h.instance && since < fresh_ms {
                return Ok(Err(since));
            }
        }
        self.heartbeat(h).await?;
        Ok(Ok(()))
    }

    /// Every host, by name, with the time since its heartbeat and its leases' count.
    pub async fn hosts(&self) -> Result<Vec<HostStatus>, StoreError> {
        let sql = by_dialect!(
            self.dialect,
            "SELECT h.*, ",
            NOW,
            " - h.heartbeat_at AS since, (SELECT COUNT(*) FROM vm_leases l WHERE l.host = h.name \
             AND l.expires_at > ",
            NOW,
            ") AS leases FROM hosts h ORDER BY h.name"
        );
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(HostStatus {
                    host: HostRow {
                        name: r.try_get("name")?,
                        instance: r.try_get("instance")?,
                        addr: r.try_get("addr")?,
                        version: r.try_get("version")?,
                        started_at_ms: r.try_get("started_at")?,
                        heartbeat_at_ms: r.try_get("heartbeat_at")?,
                        cpus: r.try_get::<i64, _>("cpus")? as u32,
                        memory_mib: r.try_get::<i64, _>("memory_mib")? as u64,
                        running_vms: r.try_get::<i64, _>("running_vms")? as u32,
                        memory_used_mib: r.try_get::<i64, _>("memory_used_mib")? as u64,
                    },
                    since_heartbeat_ms: r.try_get("since")?,
                    leases: r.try_get::<i64, _>("leases")? as u32,
                    cordoned: r.try_get::<i64, _>("cordoned")? != 0,
                })
            })
            .collect()
    }

    /// Cordons the host `name` (or ends its cordon). `false` when there is no such host.
    pub async fn set_cordoned(&self, name: &str, cordoned: bool) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query("UPDATE hosts SET cordoned = $1 WHERE name = $2")
            .bind(i64::from(cordoned))
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Takes the VM's lease for `host` for `ttl_ms`: granted when no one holds it, when it has
    /// expired, or when `host` holds it already. Each grant has the next epoch.
    pub async fn acquire_lease(
        &self,
        vm_id: &str,
        host: &str,
        ttl_ms: i64,
    ) -> Result<Result<Lease, LeaseHeld>, StoreError> {
        let sql = by_dialect!(
            self.dialect,
            "INSERT INTO vm_leases (vm_id, host, epoch, expires_at) VALUES ($1, $2, 1, ",
            NOW,
            " + $3) ON CONFLICT (vm_id) DO UPDATE SET host = excluded.host, \
             epoch = vm_leases.epoch + 1, expires_at = excluded.expires_at \
             WHERE vm_leases.host = excluded.host OR vm_leases.expires_at <= ",
            NOW,
            " RETURNING epoch, expires_at"
        );
        let granted = sqlx::query(sql)
            .bind(vm_id)
            .bind(host)
            .bind(ttl_ms)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = granted {
            return Ok(Ok(Lease {
                vm_id: vm_id.to_string(),
                host: host.to_string(),
                epoch: row.try_get("epoch")?,
                expires_at_ms: row.try_get("expires_at")?,
            }));
        }
        let sql = by_dialect!(
            self.dialect,
            "SELECT host, expires_at - ",
            NOW,
            " AS remaining FROM vm_leases WHERE vm_id = $1"
        );
        let row = sqlx::query(sql)
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Err(LeaseHeld {
                host: row.try_get("host")?,
                remaining_ms: row.try_get("remaining")?,
            })),
            // Released between the two statements: ask again.
            None => Box::pin(self.acquire_lease(vm_id, host, ttl_ms)).await,
        }
    }

    /// Extends, by `ttl_ms` from now, the leases `host` holds for `vm_ids`, in one statement;
    /// returns each renewed one's VM id and epoch. A lease missing from the answer is no
    /// longer `host`'s: another host took it over, or it was released.
    pub async fn renew_leases(
        &self,
        host: &str,
        vm_ids: &[String],
        ttl_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        if vm_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = by_dialect!(
            self.dialect,
            "UPDATE vm_leases SET expires_at = ",
            NOW,
            " + $3 WHERE host = $1 AND expires_at > 0 AND ",
            IN_IDS,
            " RETURNING vm_id, epoch"
        );
        let rows = sqlx::query(sql)
            .bind(host)
            .bind(vm_ids.join(","))
            .bind(ttl_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("vm_id")?, r.try_get("epoch")?)))
            .collect()
    }

    /// Gives a lease up (the VM stopped), if it is still `host`'s at `epoch`. The row stays,
    /// expired, so the next holder's epoch is still higher than every earlier one's: a late
    /// renewal of an old epoch can never match a new lease.
    pub async fn release_lease(
        &self,
        vm_id: &str,
        host: &str,
        epoch: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE vm_leases SET expires_at = 0 WHERE vm_id = $1 AND host = $2 AND epoch = $3",
        )
        .bind(vm_id)
        .bind(host)
        .bind(epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Hands VM `id` over as `h` says. False, and nothing changed, when the row no longer
    /// names `h.from` or is no longer `h.seen` (another move, a start, the sender giving up
    /// or a removal came first).
    pub async fn move_vm(&self, id: &str, h: &Handover<'_>) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query(
            "UPDATE vms SET host = $1, image_dir = $2, state = $3, state_reason = NULL, pid = $4, updated_at = $5, \
             replica_host = CASE WHEN replica_host = $1 THEN '' ELSE replica_host END, \
             replicated_at_ms = CASE WHEN replica_host = $1 THEN 0 ELSE replicated_at_ms END \
             WHERE id = $6 AND host = $7 AND state = $8",
        )
        .bind(h.to)
        .bind(h.image_dir)
        .bind(h.state.as_str())
        .bind(h.pid.map(i64::from))
        .bind(crate::now())
        .bind(id)
        .bind(h.from)
        .bind(h.seen.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records VM `id` in `state` only while its row names `host`: a host giving up on a VM
    /// it was handing over must not overwrite the row once the other host owns it.
    pub async fn set_state_on(
        &self,
        id: &str,
        host: &str,
        state: VmState,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let _changed = self.change();
        let done = sqlx::query(
            "UPDATE vms SET state = $1, state_reason = $2, pid = NULL, updated_at = $3 WHERE id = $4 AND host = $5",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(crate::now())
        .bind(id)
        .bind(host)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Names the host that keeps VM `id`'s replica (empty: none); its replicas start over.
    /// Records an invitation for a new host: the SHA-256 `digest` of its secret, lapsing
    /// `ttl_ms` from now by the database's clock, and the sealed store URL it hands over.
    /// Lapsed invitations go at the same time.
    pub async fn add_host_invite(
        &self,
        digest: &str,
        ttl_ms: i64,
        store_sealed: &[u8],
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(by_dialect!(
            self.dialect,
            "DELETE FROM host_invites WHERE expires_at_ms <= ",
            NOW
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(by_dialect!(
            self.dialect,
            "INSERT INTO host_invites (digest, expires_at_ms, store_sealed) VALUES ($1, ",
            NOW,
            " + $2, $3)"
        ))
        .bind(digest)
        .bind(ttl_ms)
        .bind(store_sealed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Publishes this host's ACME DNS-01 `values` for `domain`, replacing the ones it published
    /// before; they lapse `ttl_ms` from now unless published again.
    pub async fn publish_dns_challenges(
        &self,
        host: &str,
        domain: &str,
        values: &[String],
        ttl_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(by_dialect!(
            self.dialect,
            "DELETE FROM dns_challenges WHERE (host = $1 AND domain = $2) OR expires_at_ms <= ",
            NOW
        ))
        .bind(host)
        .bind(domain)
        .execute(&mut *tx)
        .await?;
        for value in values {
            sqlx::query(by_dialect!(
                self.dialect,
                "INSERT INTO dns_challenges (host, domain, value, expires_at_ms) VALUES ($1, $2, $3, ",
                NOW,
                " + $4)"
            ))
            .bind(host)
            .bind(domain)
            .bind(value)
            .bind(ttl_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The ACME DNS-01 values hosts other than `host` publish for `domain`, while they last.
    pub async fn dns_challenges(
        &self,
        host: &str,
        domain: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(by_dialect!(
            self.dialect,
            "SELECT DISTINCT value FROM dns_challenges WHERE host <> $1 AND domain = $2 \
             AND expires_at_ms > ",
            NOW,
            " ORDER BY value"
        ))
        .bind(host)
        .bind(domain)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("value")?))
            .collect()
    }

    /// Takes the invitation whose secret has SHA-256 `digest`, once: its sealed store URL
    /// while it has not lapsed, `None` when there is no such invitation (any more).
    pub async fn take_host_invite(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(by_dialect!(
            self.dialect,
            "SELECT store_sealed, expires_at_ms, ",
            NOW,
            " AS now_ms FROM host_invites WHERE digest = $1"
        ))
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM host_invites WHERE digest = $1")
            .bind(digest)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let live = row.try_get::<i64, _>("expires_at_ms")? > row.try_get::<i64, _>("now_ms")?;
        Ok(live.then(|| row.try_get("store_sealed")).transpose()?)
    }

    pub async fn set_replica(&self, id: &str, host: &str) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE vms SET replica_host = $1, replicated_at_ms = 0 WHERE id = $2")
            .bind(host)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a replica of VM `id` complete on `host` as of `at_ms`, if `host` still keeps it.
    pub async fn replicated(&self, id: &str, host: &str, at_ms: i64) -> Result<(), StoreError> {
        let _changed = self.change();
        sqlx::query("UPDATE vms SET replicated_at_ms = $1 WHERE id = $2 AND replica_host = $3")
            .bind(at_ms)
            .bind(id)
            .bind(host)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The VM's lease, expired or not.
    pub async fn lease(&self, vm_id: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query("SELECT * FROM vm_leases WHERE vm_id = $1")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(Lease {
                vm_id: r.try_get("vm_id")?,
                host: r.try_get("host")?,
                epoch: r.try_get("epoch")?,
                expires_at_ms: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }
}

impl Store {
    /// The memory (MiB) the VMs placed on each host may use: those running, starting,
    /// stopping or being made. Read from the VMs themselves rather than the heartbeats, which lag by seconds, so
    /// placements made one after another see each other.
    pub async fn memory_placed(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT host, CAST(SUM(memory_mib) AS BIGINT) AS placed FROM vms \
             WHERE state IN ('running', 'starting', 'stopping', 'creating') GROUP BY host",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("host")?,
                    r.try_get::<i64, _>("placed")?.max(0) as u64,
                ))
            })
            .collect()
    }
}

/// Where a new VM that needs `need_mib` goes: among the hosts that are up (a heartbeat under
/// `fresh_ms` old), not cordoned, and have that much memory free, the one with the most free; `me` wins a
/// tie (no hop). `None` when no host has room: the caller then tries its own host, whose
/// admission says what is short.
pub fn place(
    hosts: &[HostStatus],
    placed_mib: &std::collections::HashMap<String, u64>,
    me: &str,
    need_mib: u64,
    fresh_ms: i64,
) -> Option<String> {
    hosts
        .iter()
        .filter(|h| h.since_heartbeat_ms < fresh_ms && !h.cordoned)
        .map(|h| {
            let placed = placed_mib.get(&h.host.name).copied().unwrap_or(0);
            (h, h.host.memory_mib.saturating_sub(placed))
        })
        .filter(|(_, free)| *free >= need_mib)
        .max_by(|(a, a_free), (b, b_free)| {
            a_free
                .cmp(b_free)
                .then_with(|| (a.host.name == me).cmp(&(b.host.name == me)))
                .then_with(|| b.host.running_vms.cmp(&a.host.running_vms))
                .then_with(|| b.host.name.cmp(&a.host.name))
        })
        .map(|(h, _)| h.host.name.clone())
}

/// A VM passing from one host to another ([`Store::move_vm`]).
#[derive(Debug, Clone, Copy)]
pub struct Handover<'a> {
    /// The host that holds it, in the state it was seen in there.
    pub from: &'a str,
    pub seen: VmState,
    /// The host that holds its disk now (in the image build `image_dir` there), and the
    /// state and process it has there.
    pub to: &'a str,
    pub image_dir: &'a str,
    pub state: VmState,
    pub pid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_vm, on_both_stores};

    async fn vm(store: &Store, name: &str) -> String {
        store.insert_vm(new_vm(name)).await.expect("vm").id
    }

    on_both_stores! {
    async fn a_host_invite_is_taken_once_and_not_after_it_lapses(store) {
        store.add_host_invite("d1", 60_000, b"sealed").await.expect("add");
        store.add_host_invite("d2", -1, b"old").await.expect("add lapsed");
        assert_eq!(store.take_host_invite("d1").await.expect("take").as_deref(), Some(&b"sealed"[..]));
        assert_eq!(store.take_host_invite("d1").await.expect("again"), None, "taken twice");
        assert_eq!(store.take_host_invite("d2").await.expect("lapsed"), None, "lapsed yet taken");
        assert_eq!(store.take_host_invite("nope").await.expect("unknown"), None);
    }
    }

    on_both_stores! {
    async fn a_lease_has_one_holder_until_it_expires_and_each_holder_a_new_epoch(store) {
        let id = vm(&store, "web").await;
        let a = store.acquire_lease(&id, "h1", 60_000).await.expect("q").expect("free");
        assert_eq!((a.host.as_str(), a.epoch), ("h1", 1));
        // The holder may take it again (a restart); the epoch moves on.
        let again = store.acquire_lease(&id, "h1", 60_000).await.expect("q").expect("own");
        assert_eq!(again.epoch, 2);
        // Another host is refused while it lasts, and told who holds it.
        let held = store.acquire_lease(&id, "h2", 60_000).await.expect("q").expect_err("held");
        assert_eq!(held.host, "h1");
        assert!(held.remaining_ms > 50_000 && held.remaining_ms <= 60_000, "{held:?}");
        // Renewal is the holder's, for the VMs it names, and says at which epoch.
        let ids = [id.clone(), "id-other".to_string()];
        let renew = |host: &'static str, ttl: i64| {
            let (store, ids) = (store.clone(), ids.clone());
            async move { store.renew_leases(host, &ids, ttl).await.expect("renew") }
        };
        assert_eq!(renew("h1", 60_000).await, [(id.clone(), 2)]);
        assert!(renew("h2", 60_000).await.is_empty(), "renewed another host's lease");
        assert!(store.renew_leases("h1", &[], 60_000).await.expect("none").is_empty());

        // Expired: another host takes it over, and the old holder's renewal finds nothing.
        assert_eq!(renew("h1", -1).await.len(), 1);
        let b = store.acquire_lease(&id, "h2", 60_000).await.expect("q").expect("expired");
        assert_eq!((b.host.as_str(), b.epoch), ("h2", 3));
        assert!(renew("h1", 60_000).await.is_empty(), "renewed a lease taken over");
        // A release by the old holder does nothing; the holder's own ends it, and a renewal
        // cannot bring it back.
        store.release_lease(&id, "h1", 2).await.expect("release");
        assert_eq!(store.lease(&id).await.expect("q").map(|l| l.expires_at_ms > 0), Some(true));
        store.release_lease(&id, "h2", 3).await.expect("release");
        assert_eq!(store.lease(&id).await.expect("q").map(|l| l.expires_at_ms), Some(0));
        assert!(renew("h2", 60_000).await.is_empty(), "renewed a released lease");
        // The next holder's epoch is higher than every earlier one's.
        let c = store.acquire_lease(&id, "h1", 60_000).await.expect("q").expect("released");
        assert_eq!(c.epoch, 4);
        // A removed VM takes its lease with it.
        store.delete(&id).await.expect("rm");
        assert_eq!(store.lease(&id).await.expect("q"), None);
    }
    }

    on_both_stores! {
    async fn a_move_names_the_new_host_only_if_the_old_one_still_holds_it(store) {
        let id = vm(&store, "web").await;
        let from = store.get_by_id(&id).await.expect("get").host;
        assert!(store.move_vm(&id, &Handover { from: &from, seen: VmState::Creating, to: "h2", image_dir: "/img/b", state: VmState::Running, pid: Some(7) }).await.expect("move"));
        let moved = store.get_by_id(&id).await.expect("get");
        assert_eq!(
            (moved.host.as_str(), moved.image_dir.as_str(), moved.state, moved.pid),
            ("h2", "/img/b", VmState::Running, Some(7))
        );
        // A replica kept by the host it moves to is its disk now, no replica.
        store.set_replica(&id, "h3").await.expect("replica");
        store.replicated(&id, "h3", 99).await.expect("replicated");
        store.replicated(&id, "h4", 100).await.expect("not h4's");
        let kept = store.get_by_id(&id).await.expect("get");
        assert_eq!((kept.replica_host.as_str(), kept.replicated_at_ms), ("h3", 99));
        assert!(store.move_vm(&id, &Handover { from: "h2", seen: VmState::Running, to: "h3", image_dir: "/img/b", state: VmState::Stopped, pid: None }).await.expect("move"));
        let moved = store.get_by_id(&id).await.expect("get");
        assert_eq!((moved.replica_host.as_str(), moved.replicated_at_ms), ("", 0));
        // A second move from the old host (a retry, or a race) changes nothing.
        assert!(!store.move_vm(&id, &Handover { from: &from, seen: VmState::Running, to: "h4", image_dir: "/img/c", state: VmState::Stopped, pid: None }).await.expect("move"));
        assert_eq!(store.get_by_id(&id).await.expect("get").host, "h3");
        // Nor one from the right host that saw another state (the VM was started meanwhile).
        assert!(!store.move_vm(&id, &Handover { from: "h3", seen: VmState::Running, to: "h4", image_dir: "/img/c", state: VmState::Stopped, pid: None }).await.expect("move"));
        // A host giving up changes the row only while it names that host.
        assert!(!store.set_state_on(&id, "h2", VmState::Failed, Some("gave up")).await.expect("state"));
        assert!(store.set_state_on(&id, "h3", VmState::Failed, Some("gave up")).await.expect("state"));
        assert_eq!(store.get_by_id(&id).await.expect("get").state, VmState::Failed);
    }
    }

    on_both_stores! {
    async fn placement_counts_what_each_host_was_given_and_picks_the_roomiest(store) {
        for (name, host, mib, state) in [
            ("a", "h1", 1024, VmState::Running),
            ("b", "h1", 512, VmState::Creating),
            ("c", "h2", 2048, VmState::Starting),
            ("d", "h2", 4096, VmState::Stopped),
            ("e", "h3", 256, VmState::Failed),
        ] {
            let id = store
                .insert_vm(crate::NewVm {
                    host: host.into(),
                    memory_mib: mib,
                    ..new_vm(name)
                })
                .await
                .expect("vm")
                .id;
            store.set_state(&id, state, None, None).await.expect("state");
        }
        let placed = store.memory_placed().await.expect("placed");
        assert_eq!(placed.get("h1"), Some(&1536));
        assert_eq!(placed.get("h2"), Some(&2048));
        assert_eq!(placed.get("h3"), None);

        let host = |name: &str, mib: u64, since: i64| HostStatus {
            host: HostRow {
                name: name.into(),
                instance: "i".into(),
                addr: String::new(),
                version: String::new(),
                started_at_ms: 0,
                heartbeat_at_ms: 0,
                cpus: 2,
                memory_mib: mib,
                running_vms: 0,
                memory_used_mib: 0,
            },
            since_heartbeat_ms: since,
            leases: 0,
            cordoned: false,
        };
        let hosts = [host("h1", 4096, 0), host("h2", 4096, 0), host("h3", 1024, 0)];
        // Free: h1 2560, h2 2048, h3 1024.
        assert_eq!(place(&hosts, &placed, "h2", 256, 15_000).as_deref(), Some("h1"));
        assert_eq!(place(&hosts, &placed, "h2", 2048, 15_000).as_deref(), Some("h1"));
        assert_eq!(place(&hosts, &placed, "h1", 3000, 15_000), None);
        // A tie goes to the asking host; a down host gets nothing.
        let even = [host("h1", 2048, 0), host("h3", 2048, 0)];
        let none = std::collections::HashMap::new();
        assert_eq!(place(&even, &none, "h3", 256, 15_000).as_deref(), Some("h3"));
        let down = [host("h1", 8192, 20_000), host("h3", 2048, 0)];
        assert_eq!(place(&down, &none, "h2", 256, 15_000).as_deref(), Some("h3"));
        // Nor does a cordoned one, however roomy.
        let cordoned = [
            HostStatus { cordoned: true, ..host("h1", 8192, 0) },
            host("h3", 2048, 0),
        ];
        assert_eq!(place(&cordoned, &none, "h1", 256, 15_000).as_deref(), Some("h3"));
    }
    }

    on_both_stores! {
    async fn each_host_sees_the_others_dns_challenges_until_they_lapse(store) {
        let (d, vm_d) = ("nook.example.test", "vm.example.test");
        store.publish_dns_challenges("h1", d, &["a".into(), "b".into()], 60_000).await.expect("h1");
        store.publish_dns_challenges("h2", d, &["c".into()], 60_000).await.expect("h2");
        store.publish_dns_challenges("h2", vm_d, &["v".into()], 60_000).await.expect("h2 vm");
        assert_eq!(store.dns_challenges("h3", d).await.expect("q"), ["a", "b", "c"]);
        assert_eq!(store.dns_challenges("h1", d).await.expect("q"), ["c"]);
        assert_eq!(store.dns_challenges("h1", vm_d).await.expect("q"), ["v"]);
        // A host's new values replace its old ones; an empty list withdraws them.
        store.publish_dns_challenges("h1", d, &["b2".into()], 60_000).await.expect("h1 again");
        assert_eq!(store.dns_challenges("h2", d).await.expect("q"), ["b2"]);
        store.publish_dns_challenges("h1", d, &[], 60_000).await.expect("withdrawn");
        assert!(store.dns_challenges("h2", d).await.expect("q").is_empty());
        // Lapsed values are not answered.
        store.publish_dns_challenges("h1", d, &["old".into()], -1).await.expect("lapsed");
        assert!(store.dns_challenges("h2", d).await.expect("q").is_empty());
    }
    }

    on_both_stores! {
    async fn hosts_register_beat_and_count_their_live_leases(store) {
        let row = |name: &str, vms: u32| HostRow {
            name: name.into(),
            instance: "i1".into(),
            addr: format!("{name}.example:7000"),
            version: "0.1.0".into(),
            started_at_ms: 1,
            heartbeat_at_ms: 0,
            cpus: 2,
            memory_mib: 8192,
            running_vms: vms,
            memory_used_mib: 512,
        };
        store.heartbeat(&row("h2", 0)).await.expect("beat");
        store.heartbeat(&row("h1", 0)).await.expect("beat");
        store.heartbeat(&row("h1", 1)).await.expect("beat again");
        let a = vm(&store, "a").await;
        let b = vm(&store, "b").await;
        store.acquire_lease(&a, "h1", 60_000).await.expect("q").expect("a");
        store.acquire_lease(&b, "h1", -1).await.expect("q").expect("b, expired at once");
        let hosts = store.hosts().await.expect("hosts");
        let names: Vec<_> = hosts.iter().map(|h| h.host.name.as_str()).collect();
        assert_eq!(names, ["h1", "h2"]);
        assert_eq!((hosts[0].host.running_vms, hosts[0].leases), (1, 1));
        assert!(hosts[0].since_heartbeat_ms >= 0 && hosts[0].since_heartbeat_ms < 10_000, "{hosts:?}");
        assert!(hosts[0].host.heartbeat_at_ms > 1_700_000_000_000, "{hosts:?}");

        // A second daemon under a live host's name is refused; the same daemon, or one
        // after the name went quiet, is not.
        let other = HostRow { instance: "i2".into(), ..row("h1", 0) };
        assert!(store.claim_host(&other, 15_000).await.expect("q").is_err());
        assert!(store.claim_host(&row("h1", 1), 15_000).await.expect("q").is_ok());
        assert!(store.claim_host(&other, 0).await.expect("q").is_ok());

        // A cordon is the admin's: heartbeats and restarts leave it until it is lifted.
        assert!(!store.hosts().await.expect("hosts")[0].cordoned);
        assert!(store.set_cordoned("h1", true).await.expect("cordon"));
        store.heartbeat(&row("h1", 2)).await.expect("beat");
        assert!(store.claim_host(&row("h1", 0), 0).await.expect("q").is_ok());
        let hosts = store.hosts().await.expect("hosts");
        assert!(hosts[0].cordoned && !hosts[1].cordoned, "{hosts:?}");
        assert!(store.set_cordoned("h1", false).await.expect("uncordon"));
        assert!(!store.hosts().await.expect("hosts")[0].cordoned);
        assert!(!store.set_cordoned("h9", true).await.expect("no such host"));
    }
    }
}
