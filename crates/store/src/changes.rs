//! The store's generation when several hosts share one PostgreSQL: every write statement on
//! any host notifies channel `nook_changed` at its commit (a trigger per table, migration
//! 0012), and each host listens and moves its own generation on every notification.
//!
//! A host that is not sure it hears every notification (not yet connected, connection lost,
//! or a liveness ping unanswered) must not trust anything it remembers: while `deaf` is set,
//! [`Changes::generation`] returns a new value on every call, so the edge caches nothing and
//! asks the database each time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;

/// The channel every write notifies (see migrations/postgres/0012_changes.sql).
const CHANNEL: &str = "nook_changed";
/// How long the connection may be quiet before the listener proves it still hears.
const QUIET: Duration = Duration::from_secs(10);
/// How long a ping to ourselves may take before the connection counts as lost (a partition
/// drops packets without closing anything).
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Between attempts to listen again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct Changes {
    generation: Arc<AtomicU64>,
    deaf: Arc<AtomicBool>,
    /// What this store's connections put in their notifications (the `nook.writer` setting),
    /// so that its own writes, already counted by their guards, are not counted twice.
    writer: Arc<str>,
}

impl Changes {
    /// Local writes only: one process owns the database (SQLite).
    pub(crate) fn local() -> Self {
        Self {
            generation: Arc::new(AtomicU64::new(0)),
            deaf: Arc::new(AtomicBool::new(false)),
            writer: Arc::from(""),
        }
    }

    /// Local writes, plus every other writer's through `LISTEN nook_changed` on `url`. Deaf
    /// until the first listen succeeds, which happens in the background. Connections that
    /// write must say `writer` (see [`Self::writer`]).
    pub(crate) fn shared(url: &str) -> (Self, tokio::task::JoinHandle<()>) {
        let changes = Self {
            generation: Arc::new(AtomicU64::new(0)),
            deaf: Arc::new(AtomicBool::new(true)),
            writer: Arc::from(hex::encode(rand::random::<[u8; 8]>())),
        };
        let task = tokio::spawn(changes.clone().listen(url.to_string()));
        (changes, task)
    }

    /// This store's name in notifications: each pooled connection sets `nook.writer` to it.
    pub(crate) fn writer(&self) -> Arc<str> {
        self.writer.clone()
    }

    pub(crate) fn counter(&self) -> &AtomicU64 {
        &self.generation
    }

    pub(crate) fn generation(&self) -> u64 {
        if self.deaf.load(Ordering::Acquire) {
            return self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        }
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn hears_other_hosts(&self) -> bool {
        !self.deaf.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::Release);
        // Whatever was remembered may predate notifications this host missed.
        self.bump();
    }

    async fn listen(self, url: String) {
        // A channel of this listener's own, for pings no other host hears.
        let ping_channel = format!("nook_ping_{}", hex::encode(rand::random::<[u8; 8]>()));
        loop {
            match self.hear(&url, &ping_channel).await {
                Ok(()) => tracing::warn!(
                    "lost the store's change notifications; every edge lookup goes to the database until they are back"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot hear the store's change notifications; every edge lookup goes to the database until it can"
                ),
            }
            self.set_deaf(true);
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Listens until the connection is lost; `Ok` when it was lost without an error.
    async fn hear(&self, url: &str, ping_channel: &str) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect(url).await?;
        // Report a lost connection at once rather than wait inside `try_recv` until the
        // database is back: until then this host must count as deaf.
        listener.eager_reconnect(false);
        listener.listen_all([CHANNEL, ping_channel]).await?;
        if !self.hears_other_hosts() {
            tracing::info!("hearing the store's change notifications");
        }
        self.set_deaf(false);
        let mut pinged = false;
        loop {
            let wait = if pinged { PING_TIMEOUT } else { QUIET };
            match tokio::time::timeout(wait, listener.try_recv()).await {
                Ok(Ok(Some(note))) => {
                    if note.channel() == ping_channel {
                        pinged = false;
                    } else if note.payload() != &*self.writer {
                        self.bump();
                    }
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) if pinged => {
                    return Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to a ping on the notification connection",
                    )));
                }
                Err(_) => {
                    // Quiet for a while: prove the connection still carries notifications by
                    // sending one to ourselves over it.
                    // Bounded too: a partition can hold a send as long as TCP retries.
                    let ping = sqlx::query("SELECT pg_notify($1, '')")
                        .bind(ping_channel)
                        .execute(&mut listener);
                    match tokio::time::timeout(PING_TIMEOUT, ping).await {
                        Ok(sent) => sent?,
                        Err(_) => {
                            return Err(sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "a ping on the notification connection could not be sent",
                            )));
                        }
                    };
                    pinged = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sqlx::Row;

    use crate::Store;
    use crate::testing::{TempPostgres, new_vm};

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_write_on_one_host_moves_every_hosts_generation_and_a_read_does_not() {
        let pg = TempPostgres::start();
        let a = Store::connect(&pg.location()).await.expect("host a");
        let b = Store::connect(&pg.location()).await.expect("host b");
        until("b hears", || b.hears_other_hosts()).await;
        until("a hears", || a.hears_other_hosts()).await;

        let g = b.generation();
        let made = a.insert_vm(new_vm("web")).await.expect("insert");
        let started = Instant::now();
        until("b sees a's insert", || b.generation() != g).await;
        let latency = started.elapsed();
        assert!(latency < Duration::from_secs(1), "{latency:?}");

        // Reads do not notify: B's remembered answers stay good while A only reads.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let g = b.generation();
        a.get("web").await.expect("read");
        a.web_settings(&made.id).await.expect("read");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            b.generation(),
            g,
            "a read on host a moved host b's generation"
        );

        // A failed write notifies nothing either (it rolled back), a later one does.
        assert!(a.insert_vm(new_vm("web")).await.is_err());
        let g = b.generation();
        a.set_public(&made.id, true).await.expect("public");
        until("b sees a's update", || b.generation() != g).await;
    }

    #[tokio::test]
    /// Except the fleet's own bookkeeping, written every few seconds and remembered by no one.
    async fn every_table_notifies_its_writes() {
        let pg = TempPostgres::start();
        let store = Store::connect(&pg.location()).await.expect("connect");
        let rows = sqlx::query(
            "SELECT t.tablename::text AS tablename FROM pg_tables t WHERE t.schemaname = current_schema() \
             AND t.tablename NOT IN ('_sqlx_migrations', 'hosts', 'vm_leases') AND NOT EXISTS (SELECT 1 FROM pg_trigger g \
             JOIN pg_class c ON c.oid = g.tgrelid WHERE c.relname = t.tablename \
             AND g.tgname = 'nook_changed')",
        )
        .fetch_all(&store.pool)
        .await
        .expect("query");
        let silent: Vec<String> = rows.iter().map(|r| r.get("tablename")).collect();
        assert!(
            silent.is_empty(),
            "tables whose writes other hosts would not hear of (add the nook_changed trigger): {silent:?}"
        );
    }

    #[tokio::test]
    async fn a_host_that_cannot_hear_trusts_nothing_it_remembers() {
        let mut pg = TempPostgres::start();
        let store = Store::connect(&pg.location()).await.expect("connect");
        until("hears", || store.hears_other_hosts()).await;
        let g = store.generation();
        assert_eq!(store.generation(), g, "settled while hearing");

        pg.kill();
        until("deaf after the database died", || {
            !store.hears_other_hosts()
        })
        .await;
        let g = store.generation();
        assert_ne!(
            store.generation(),
            g,
            "a deaf host's generation must move on every read"
        );

        pg.start_again();
        until("hears again", || store.hears_other_hosts()).await;
        let g = store.generation();
        assert_eq!(store.generation(), g, "settled again");
    }
}
