//! One helper shared by the workspace's test crates (each includes this file with
//! `#[path]`): a port for a process under test to bind.

/// A TCP port on 127.0.0.1 that nothing listens on, for a process under test to bind. It is
/// taken below the kernel's ephemeral range (32768 and up): a port from binding
/// `127.0.0.1:0` is in that range, and any outgoing connection on the machine could take it
/// as its source port before the process binds it (CI lost a run to exactly that).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static TRIES: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..SPAN {
        let port = LOW + (seed.wrapping_add(TRIES.fetch_add(1, Ordering::Relaxed)) % SPAN);
        let port = u16::try_from(port).expect("below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    );
}
