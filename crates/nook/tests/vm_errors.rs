//! System tests (root, real QEMU guests): bad input gets a clear error and leaves nothing
//! half-made behind.

mod common;

use common::{Daemon, LoopMount, taps};

fn assert_nothing_left(d: &Daemon) {
    assert!(d.list().is_empty(), "rows left: {:?}", d.list());
    let dirs: Vec<_> = std::fs::read_dir(d.data_dir.join("vms"))
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "VM directories left: {dirs:?}");
    assert!(d.qemu_pids().is_empty(), "QEMU left running");
    assert!(taps().is_empty(), "taps left: {:?}", taps());
}

#[test]
fn vm_bad_requests_get_clear_errors() {
    let d = Daemon::start();
    let err = d.fails(&["vm", "create", "--image", "tiny", "--name", "Bad_Name"]);
    assert!(
        err.contains("Invalid VM name \"Bad_Name\"") && err.contains("lowercase letter"),
        "{err}"
    );
    let long = "a".repeat(64);
    let err = d.fails(&["vm", "create", "--image", "tiny", "--name", &long]);
    assert!(err.contains("Invalid VM name"), "{err}");
    let err = d.fails(&["vm", "create", "--image", "nosuch", "--name", "img"]);
    assert!(
        err.contains("Unknown image 'nosuch'") && err.contains("tiny"),
        "{err}"
    );
    let err = d.fails(&[
        "vm", "create", "--image", "tiny", "--name", "mem", "--memory", "12X",
    ]);
    assert!(err.contains("Invalid size \"12X\""), "{err}");
    let err = d.fails(&[
        "vm", "create", "--image", "tiny", "--name", "cpu", "--cpu", "0",
    ]);
    assert!(err.contains("--cpu 0"), "{err}");
    let err = d.fails(&[
        "vm", "create", "--image", "tiny", "--name", "mem", "--memory", "16M",
    ]);
    assert!(err.contains("at least 128M"), "{err}");
    let err = d.fails(&["vm", "exec", "ghost", "--", "true"]);
    assert!(err.contains("No VM named 'ghost'"), "{err}");
    // JSON errors carry a stable code.
    let err = d.fails(&[
        "vm", "create", "--image", "tiny", "--name", "9lives", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(err.trim()).expect("json error");
    assert_eq!(v["error"]["code"], "invalid_name");
    assert_nothing_left(&d);

    d.create_tiny("dup");
    let err = d.fails(&["vm", "create", "--image", "tiny", "--name", "dup"]);
    assert!(err.contains("A VM named 'dup' already exists"), "{err}");
    assert_eq!(d.list().len(), 1);
    assert_eq!(
        d.vm("dup")["state"],
        "running",
        "the original was disturbed"
    );
    assert_eq!(d.qemu_pids().len(), 1);
}

#[test]
fn vm_missing_qemu_is_named_and_nothing_is_made() {
    let d = Daemon::start_with(&["--qemu", "/nonexistent/qemu-system-x86_64"]);
    let err = d.fails(&["vm", "create", "--image", "tiny", "--name", "noqemu"]);
    assert!(
        err.contains("QEMU not found at /nonexistent/qemu-system-x86_64")
            && err.contains("apt-get install")
            && err.contains("--qemu")
            && !err.contains("qemu_binary"),
        "the message must name the real setting (--qemu): {err}"
    );
    assert_nothing_left(&d);
}

#[test]
fn vm_that_never_becomes_ready_times_out_with_console_tail() {
    let d = Daemon::start_with(&["--ready-timeout", "1"]);
    let err = d.fails(&["vm", "create", "--image", "tiny", "--name", "slowpoke"]);
    assert!(
        err.contains("VM 'slowpoke' did not become ready within 1s"),
        "{err}"
    );
    assert!(err.contains("Last console lines:"), "{err}");
    // The tail holds what the guest printed before the deadline.
    let tail = err.split("Last console lines:").nth(1).unwrap_or("");
    assert!(tail.trim().len() > 20, "console tail is empty: {err}");
    assert_nothing_left(&d);
}

#[test]
fn vm_create_on_a_full_disk_fails_cleanly_and_recovers() {
    let mount = LoopMount::new("48M");
    {
        let d = Daemon::start_in(mount.mnt().join("data"), None, &[]);
        mount.fill();
        let err = d.fails(&["vm", "create", "--image", "tiny", "--name", "full"]);
        assert!(err.contains("No space left"), "{err}");
        assert_nothing_left(&d);
        mount.unfill();
        d.create_tiny("roomy");
        assert_eq!(d.exec("roomy", "echo fine"), "fine\n");
    }
}

/// What a plain `cargo build` of the workspace used to leave beside `nook`: a dynamically
/// linked agent, with which every guest looped on "No such file or directory" until its ready
/// timeout. `nook serve` now refuses it at once and says what to do.
#[test]
fn vm_serve_refuses_a_dynamically_linked_agent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(common::nook_bin())
        .arg("serve")
        .env("NOOK_DATA_DIR", tmp.path().join("data"))
        .env("NOOK_IMAGES_DIR", common::images_dir())
        // The nook binary itself is a dynamically linked x86-64 executable.
        .env("NOOK_AGENT", common::nook_bin())
        .env("NOOK_SSH_ADDR", "off")
        .env("NOOK_HTTPS_ADDR", "127.0.0.1:0")
        .env("NOOK_VM_PORTS", "off")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run nook serve");
    assert!(!out.status.success());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dynamically linked") && err.contains("scripts/build-agent"),
        "{err}"
    );
}

/// A guest write that finds the host's disk full stops the guest instead of failing (nothing
/// it wrote is lost); `vm list` says why, and once space is freed the guest goes on by itself
/// and the write lands intact.
#[test]
fn vm_write_to_a_full_host_disk_pauses_says_why_and_goes_on_once_freed() {
    use std::time::{Duration, Instant};
    let mount = LoopMount::new("400M");
    let d = Daemon::start_in(mount.mnt().join("data"), None, &[]);
    d.create_tiny("writer");
    // 48 MiB that does not compress, in the guest's RAM, and its checksum.
    let sum = d.exec(
        "writer",
        "mkdir -p /mnt/ram && mount -t tmpfs -o size=64m tmpfs /mnt/ram && \
         head -c 50331648 /dev/urandom > /mnt/ram/data && sha256sum < /mnt/ram/data",
    );
    mount.fill();
    // In the background: the exec answers before the write reaches the disk and stops the VM.
    d.exec(
        "writer",
        "(sleep 1; cp /mnt/ram/data /root/data && sync && echo done > /root/done && sync) \
         >/dev/null 2>&1 &",
    );
    let wait_for = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let vm = d.vm("writer");
            if ok(&vm) {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never happened: {vm}\n--- daemon log ---\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let paused = wait_for("the pause on a full disk", &|vm| {
        vm["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("disk is full"))
    });
    assert_eq!(paused["state"], "running", "{paused}");
    assert!(
        d.log_text().contains("found the host's disk full"),
        "{}",
        d.log_text()
    );
    // Still paused while the disk stays full; nothing died.
    std::thread::sleep(Duration::from_secs(5));
    assert!(d.vm("writer")["state_reason"].is_string());
    assert_eq!(d.qemu_pids().len(), 1);

    mount.unfill();
    wait_for("going on once freed", &|vm| vm["state_reason"].is_null());
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.exec("writer", "cat /root/done 2>/dev/null || true") != "done\n" {
        assert!(Instant::now() < deadline, "the write never finished");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(d.exec("writer", "sha256sum < /root/data"), sum);
}
