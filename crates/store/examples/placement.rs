//! What placing one new VM costs a front door: the fleet's hosts, the memory their VMs were
//! given, and the choice, with 100 hosts and 10,000 VMs in the store. Run on a PostgreSQL on
//! this machine (a throwaway server on a Unix socket, as the tests start it), the fleet's store,
//! and on the embedded SQLite for comparison.
//!
//! ```text
//! cargo run --release -p nook-store --features testing --example placement
//! ```
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nook_store::testing::TempPostgres;
use nook_store::{HostRow, Location, NewVm, Store, place};

const HOSTS: usize = 100;
const VMS: usize = 10_000;
const ROUNDS: usize = 200;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let postgres = TempPostgres::start();
    let pg = per_placement(postgres.location()).await;
    println!(
        "placing a VM among {HOSTS} hosts and {VMS} VMs, postgres: median {pg:?} over {ROUNDS}"
    );
    let dir = tempfile::tempdir().unwrap();
    let sqlite = per_placement(Location::Sqlite(dir.path().join("nook.db"))).await;
    println!(
        "placing a VM among {HOSTS} hosts and {VMS} VMs, sqlite:   median {sqlite:?} over {ROUNDS}"
    );
    println!(
        "postgres / sqlite: {:.2}",
        pg.as_secs_f64() / sqlite.as_secs_f64()
    );
}

async fn per_placement(location: Location) -> Duration {
    let store = Store::connect(&location).await.unwrap();
    let beat = |h: usize| HostRow {
        name: format!("h{h:03}"),
        instance: format!("i{h}"),
        addr: format!("10.0.{}.{}:2280", h / 250, h % 250),
        version: "bench".into(),
        started_at_ms: 0,
        heartbeat_at_ms: 0,
        cpus: 64,
        memory_mib: 256 << 10,
        running_vms: (VMS / HOSTS) as u32,
        memory_used_mib: 0,
    };
    let started = Instant::now();
    for v in 0..VMS {
        store
            .insert_vm(NewVm {
                id: format!("vm-{v}"),
                name: format!("vm{v}"),
                owner: format!("acct-{}", v % 500),
                image: "tiny".into(),
                image_dir: "/nowhere".into(),
                cpu: 1,
                memory_mib: 256 + (v % 7) as u32 * 256,
                disk_bytes: 1 << 30,
                host: format!("h{:03}", v % HOSTS),
            })
            .await
            .unwrap();
    }
    println!("  (filled in {:.1} s)", started.elapsed().as_secs_f64());
    // Fresh heartbeats, as live hosts would have written meanwhile.
    for h in 0..HOSTS {
        store.heartbeat(&beat(h)).await.unwrap();
    }
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let hosts = store.hosts().await.unwrap();
        let placed = store.memory_placed().await.unwrap();
        let chosen = place(&hosts, &placed, "h000", 1024, 15_000);
        times.push(t.elapsed());
        assert!(chosen.is_some());
    }
    times.sort();
    times[ROUNDS / 2]
}
