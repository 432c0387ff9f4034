//! The console follower against a real unix socket standing in for QEMU's console chardev:
//! a guest printing without end leaves at most two files of bounded size, and a daemon that
//! restarts appends to what the last one kept.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use nook_vmm::VmPaths;
use nook_vmm::console::{CONSOLE_LOG_MAX, follow, follow_bounded};

fn numbered(from: usize, to: usize) -> String {
    (from..to).map(|i| format!("line {i:07}\n")).collect()
}

/// Serves one client per entry of `outputs`, as QEMU serves its console socket: one client at
/// a time, and a new one once the last has gone.
fn fake_qemu(listener: UnixListener, outputs: Vec<Vec<u8>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for output in outputs {
            let Ok((mut client, _)) = listener.accept() else {
                return;
            };
            let _ = client.write_all(&output);
        }
    })
}

#[tokio::test]
async fn a_guest_flooding_its_console_leaves_at_most_two_bounded_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = VmPaths::new(dir.path());
    let listener = UnixListener::bind(paths.console_socket()).expect("bind");
    let text = numbered(0, 400_000); // 5 MiB
    let qemu = fake_qemu(listener, vec![text.clone().into_bytes()]);

    tokio::time::timeout(Duration::from_secs(60), follow(&paths))
        .await
        .expect("the follower did not end with the console")
        .expect("join");
    qemu.join().expect("fake qemu");

    let now = std::fs::read(paths.console_log()).expect("console.log");
    let old = std::fs::read(dir.path().join("console.log.1")).expect("console.log.1");
    assert!(now.len() as u64 <= CONSOLE_LOG_MAX, "{}", now.len());
    assert_eq!(old.len() as u64, CONSOLE_LOG_MAX);
    let mut kept = old;
    kept.extend_from_slice(&now);
    assert!(text.as_bytes().ends_with(&kept), "bytes lost at a rotation");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["console.log", "console.log.1", "console.sock"]);
    assert_eq!(
        paths.console_tail(2).await,
        "line 0399998\nline 0399999",
        "the tail is the end of what the guest printed"
    );
}

#[tokio::test]
async fn a_restarted_daemon_appends_to_the_console_it_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = VmPaths::new(dir.path());
    let listener = UnixListener::bind(paths.console_socket()).expect("bind");
    let first = numbered(0, 50);
    let second = numbered(50, 100);
    let qemu = fake_qemu(
        listener,
        vec![first.clone().into_bytes(), second.clone().into_bytes()],
    );

    // The first daemon follows the console, then dies without QEMU exiting.
    let daemon = follow_bounded(&paths, 1000);
    let log = paths.console_log();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&log).unwrap_or_default() != first {
        assert!(
            std::time::Instant::now() < deadline,
            "first output never logged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.abort();
    let _ = daemon.await;

    // The next one connects again (QEMU serves a new client) and appends, rotating by size.
    tokio::time::timeout(Duration::from_secs(30), follow_bounded(&paths, 1000))
        .await
        .expect("the second follower did not end")
        .expect("join");
    qemu.join().expect("fake qemu");
    let now = std::fs::read_to_string(&log).expect("console.log");
    let old = std::fs::read_to_string(dir.path().join("console.log.1")).expect("console.log.1");
    assert_eq!(old.len(), 1000);
    assert_eq!(format!("{old}{now}"), format!("{first}{second}"));
}
