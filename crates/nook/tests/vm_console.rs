//! System test (root, a real QEMU guest on the tiny image): a guest that floods its serial
//! console leaves at most two console files of bounded size, before and after the daemon
//! restarts and re-adopts it, and `vm console` shows the end of what it printed.

mod common;

use std::time::Duration;

use common::{Daemon, wait_until};

const CONSOLE_LOG_MAX: u64 = 1 << 20;

fn console_files(d: &Daemon, id: &str) -> Vec<(String, u64)> {
    let dir = d.data_dir.join("vms").join(id);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .expect("vm dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("console") && !n.ends_with(".sock"))
        .map(|n| {
            let len = std::fs::metadata(dir.join(&n))
                .map(|m| m.len())
                .unwrap_or(0);
            (n, len)
        })
        .collect();
    files.sort();
    files
}

/// Prints `mib` MiB of `tag` lines on the guest's serial console, then a last line.
fn flood(d: &Daemon, vm: &str, tag: &str, mib: u32) {
    d.exec(
        vm,
        &format!(
            "yes {tag}-flood-line | head -c {} > /dev/ttyS0; echo {tag}-flood-done > /dev/ttyS0",
            mib << 20
        ),
    );
}

#[test]
fn vm_console_flood_keeps_the_log_bounded_across_readoption() {
    let mut d = Daemon::start();
    let id = d.create_tiny("chatty")["id"]
        .as_str()
        .expect("id")
        .to_string();

    flood(&d, "chatty", "first", 3);
    wait_until(
        "the flood's end on the console",
        Duration::from_secs(60),
        || {
            d.ok(&["vm", "console", "chatty"])
                .contains("first-flood-done")
        },
    );
    let files = console_files(&d, &id);
    assert_eq!(
        files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        ["console.log", "console.log.1"],
        "{files:?}"
    );
    assert!(
        files.iter().all(|f| f.1 <= CONSOLE_LOG_MAX),
        "a console file passed its bound: {files:?}"
    );

    // QEMU outlives the daemon; the next daemon follows the console again.
    d.kill9();
    d.restart();
    assert_eq!(d.vm("chatty")["state"], "running");
    flood(&d, "chatty", "second", 2);
    wait_until(
        "the second flood's end on the console",
        Duration::from_secs(60),
        || {
            d.ok(&["vm", "console", "chatty"])
                .contains("second-flood-done")
        },
    );
    let files = console_files(&d, &id);
    assert!(
        files.len() == 2 && files.iter().all(|f| f.1 <= CONSOLE_LOG_MAX),
        "{files:?}"
    );
}
