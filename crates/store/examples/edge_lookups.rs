//! What the daemon's edge backend asks the store for each request to a private VM, timed:
//! the VM by name, its web settings, the viewer's session, and the viewer's access. Run on
//! the embedded SQLite, then on a PostgreSQL on this machine (a throwaway server on a Unix
//! socket, as the tests start it), with the ratio of the two.
//!
//! ```text
//! cargo run --release -p nook-store --features testing --example edge_lookups
//! ```
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use std::time::Duration;

use nook_store::testing::TempPostgres;
use nook_store::{Admission, Location, NewVm, SshKey, Store};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = per_request(Location::Sqlite(dir.path().join("nook.db"))).await;
    println!("store lookups per proxied request (owner of a private VM), sqlite:   {sqlite:?}");
    let postgres = TempPostgres::start();
    let pg = per_request(postgres.location()).await;
    println!("store lookups per proxied request (owner of a private VM), postgres: {pg:?}");
    println!(
        "postgres / sqlite: {:.2}",
        pg.as_secs_f64() / sqlite.as_secs_f64()
    );
}

async fn per_request(location: Location) -> Duration {
    let store = Store::connect(&location).await.unwrap();
    let key = SshKey {
        fingerprint: "SHA256:bench".into(),
        public_key: "ssh-ed25519 AAAA bench".into(),
        comment: "bench".into(),
    };
    let owner = store
        .create_account("acct-1", "ann@example.com", &key, Admission::Unverified)
        .await
        .unwrap();
    let vm = store
        .insert_vm(NewVm {
            id: "vm-1".into(),
            name: "blog".into(),
            owner: owner.id.clone(),
            image: "tiny".into(),
            image_dir: "/nowhere".into(),
            cpu: 1,
            memory_mib: 256,
            disk_bytes: 1 << 30,
            host: "h1".into(),
        })
        .await
        .unwrap();
    let host = "blog.nook.localhost";
    let secret = store.create_session(&owner.id, host, 3600).await.unwrap();

    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let found = store.get("blog").await.unwrap();
        store.web_settings(&found.id).await.unwrap();
        let viewer = store.session(host, &secret).await.unwrap().unwrap();
        let again = store.get_by_id(&vm.id).await.unwrap();
        assert_eq!(again.owner, viewer.id);
    }
    started.elapsed() / rounds
}
