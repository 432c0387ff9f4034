//! `console_tail` reads the end of the log, not all of it. Alone in its binary, because it
//! counts the bytes this process reads (`rchar` in /proc/self/io).

use nook_vmm::VmPaths;

fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("rchar")
}

#[tokio::test]
async fn console_tail_reads_only_the_end_of_a_large_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = VmPaths::new(dir.path());
    // A log left large (by an older nook, say): 256 MiB of hole, then the last lines.
    let file = std::fs::File::create(paths.console_log()).expect("create");
    file.set_len(256 << 20).expect("set_len");
    drop(file);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(paths.console_log())
        .expect("open");
    std::io::Write::write_all(&mut file, b"\nbooting\nlogin: ").expect("write");

    let before = bytes_read();
    let tail = paths.console_tail(2).await;
    let read = bytes_read() - before;
    assert_eq!(tail, "booting\nlogin: ");
    assert!(read < 1 << 20, "read {read} bytes for two lines");
}
