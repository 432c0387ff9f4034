//! One helper shared by the workspace's test crates (each includes this file with
//! `#[path]`): a port for a process under test to bind.

/// A TCP port on 127.0.0.1 that nothing listens on and no other test has been given, for a
/// process under test to bind.
///
/// - It is taken below the kernel's ephemeral range (32768 and up): a port from binding
///   `127.0.0.1:0` is in that range, and any outgoing connection on the machine could take it
///   as its source port before the process binds it (CI lost a run to exactly that).
/// - Within one test process the ports walk on from one random start, so two calls never give
///   the same port (CI lost a run to a daemon given one port for both SSH and HTTPS, when each
///   call drew a fresh random start).
/// - Across test processes (nextest runs each test in its own), a port is held by a lock on
///   a file named for it until the process that took it exits, so a test never gets a port
///   another test has taken but not bound yet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Mutex, OnceLock};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    static LOCKS: OnceLock<std::path::PathBuf> = OnceLock::new();
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let next = NEXT.get_or_init(|| {
        let start = std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        AtomicU32::new(start % SPAN)
    });
    let locks = LOCKS.get_or_init(|| {
        let dir = std::env::temp_dir().join("nook-test-ports");
        std::fs::create_dir_all(&dir).expect("a directory for port locks");
        dir
    });
    for _ in 0..SPAN {
        let port = LOW + next.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(port).expect("below 32768");
        let Ok(lock) = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join(port.to_string()))
        else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    );
}
