//! The fence watch: a small process beside a fleet host's daemon that stops the host's leased
//! QEMUs (SIGSTOP) once their leases may have lapsed unrenewed.
//!
//! QEMUs outlive their daemon by design (a restart or an upgrade re-adopts them), and the
//! daemon is what fences a VM whose lease runs down (ARCHITECTURE.md, "Leases and fencing").
//! A daemon that died or hangs fences nothing, so once the leases lapse another host could
//! start a VM that still runs here (from a replica). The watch closes that: the daemon
//! writes, after every lease it takes, renews or drops, `DATA_DIR/fence.json` with each QEMU
//! under lease and its deadline (its last good renewal's send time plus [`WATCH_AFTER`],
//! inside the lease's life). Past its deadline, the watch stops a QEMU: a stopped process runs
//! no guest instruction. Only the daemon resumes one (SIGCONT), once it holds the lease again.
//! A QEMU once listed stays listed, with the deadline it last had, for as long as it lives,
//! until the daemon renews its lease: a restarted daemon that has not yet taken a lease back
//! (or cannot) leaves that QEMU guarded.
//!
//! The watch runs in a process group of its own (a signal to the daemon's group misses it),
//! one per data dir (an advisory lock), and ends when no QEMU it guards is left, or the data
//! dir is gone; the daemon starts it again when it next holds a lease.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The file the daemon keeps and the watch reads.
pub const FENCE_FILE: &str = "fence.json";
/// Held by the running watch: one per data dir.
const LOCK_FILE: &str = "fence-watch.lock";
/// Where the watch says what it did.
const LOG_FILE: &str = "fence-watch.log";
/// How long after a lease's last good renewal was sent the watch stops its QEMU: after the
/// daemon's own pause (10 s), before the lease can lapse (15 s from a grant that came after
/// the send).
pub const WATCH_AFTER: Duration = Duration::from_secs(12);
/// How often the watch looks.
const TICK: Duration = Duration::from_millis(200);

/// What the watch guards, as the daemon last wrote it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    pub qemus: Vec<Guarded>,
}

/// One QEMU: its pid and start time (so a reused pid is never signalled), and the
/// `CLOCK_BOOTTIME` millisecond past which it must not run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guarded {
    pub vm_id: String,
    pub pid: u32,
    pub start_time: u64,
    pub deadline_ms: u64,
}

impl Guarded {
    /// The process `pid` of `vm_id`, while it runs, allowed to run until `deadline_ms`.
    pub fn of(vm_id: &str, pid: u32, deadline_ms: u64) -> Option<Guarded> {
        Some(Guarded {
            vm_id: vm_id.to_string(),
            pid,
            start_time: start_time(pid)?,
            deadline_ms,
        })
    }

    /// Whether this process is still the one that was listed.
    fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// The clock both processes read: it runs on through a suspend, as the database's does.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// A process's start time (clock ticks since boot), field 22 of `/proc/PID/stat`.
fn start_time(pid: u32) -> Option<u64> {
    proc_stat_field(pid, 22)?.parse().ok()
}

/// Whether the process is stopped by a signal (state `T`).
pub fn is_stopped(pid: u32) -> bool {
    proc_stat_field(pid, 3).as_deref() == Some("T")
}

/// Field `n` (1-based, as proc(5) numbers them) of `/proc/PID/stat`.
fn proc_stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

/// Lists `held` (the QEMUs under lease now, with their new deadlines) for the watch, beside
/// every QEMU listed before that still runs and is not among them, which keeps its old
/// deadline. Written whole or not at all (a rename), one writer at a time.
pub fn publish(data_dir: &Path, held: Vec<Guarded>) -> std::io::Result<()> {
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let mut qemus = held;
    if let Some(before) = read(data_dir) {
        let kept: Vec<Guarded> = before
            .qemus
            .into_iter()
            .filter(|old| old.alive() && !qemus.iter().any(|q| q.pid == old.pid))
            .collect();
        qemus.extend(kept);
    }
    let path = data_dir.join(FENCE_FILE);
    let tmp = data_dir.join(format!("{FENCE_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec(&Fence { qemus }).map_err(std::io::Error::other)?)?;
    drop(file);
    std::fs::rename(&tmp, &path)
}

fn read(data_dir: &Path) -> Option<Fence> {
    let bytes = std::fs::read(data_dir.join(FENCE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Resumes the QEMU if a fence watch stopped it. For the daemon, once it holds the VM's lease.
pub fn resume(guarded: &Guarded) -> bool {
    if guarded.alive() && is_stopped(guarded.pid) {
        return kill(Pid::from_raw(guarded.pid as i32), Signal::SIGCONT).is_ok();
    }
    false
}

/// Starts the watch for `data_dir` unless one runs: `exe fence-watch DATA_DIR`.
pub fn ensure_running(data_dir: &Path, exe: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    // The watch holds the lock for its life: if it can be taken, none runs.
    match lock(data_dir)? {
        Some(free) => drop(free),
        None => return Ok(()),
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(data_dir.join(LOG_FILE))?;
    let mut watch = std::process::Command::new(exe)
        .arg("fence-watch")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()?;
    // Reaped when it ends while this daemon lives (after, init reaps it).
    std::thread::spawn(move || watch.wait());
    Ok(())
}

fn lock(data_dir: &Path) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(data_dir.join(LOCK_FILE))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(held)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// The watch's loop (`nook fence-watch DATA_DIR`). Returns when there is nothing to guard.
pub fn run(data_dir: PathBuf) -> std::io::Result<()> {
    let Some(_held) = lock(&data_dir)? else {
        // Another watch guards this data dir.
        return Ok(());
    };
    let say = |what: &str| eprintln!("{} fence watch: {what}", boottime_ms());
    say(&format!("guarding {}", data_dir.display()));
    // A file that cannot be read (a full disk, a hand edit) changes nothing: the last good
    // one stands.
    let mut fence = Fence::default();
    loop {
        if !data_dir.is_dir() {
            say("the data dir is gone; ending");
            return Ok(());
        }
        if let Some(now) = read(&data_dir) {
            fence = now;
        }
        let live: Vec<&Guarded> = fence.qemus.iter().filter(|q| q.alive()).collect();
        if live.is_empty() {
            say("no QEMU under lease is left to guard; ending");
            return Ok(());
        }
        let now = boottime_ms();
        for q in live
            .into_iter()
            .filter(|q| now >= q.deadline_ms && !is_stopped(q.pid))
        {
            let said = match kill(Pid::from_raw(q.pid as i32), Signal::SIGSTOP) {
                Ok(()) => format!(
                    "stopped QEMU {} of VM {}: its lease was not renewed in time (is the daemon down?)",
                    q.pid, q.vm_id
                ),
                Err(e) => format!("cannot stop QEMU {} of VM {}: {e}", q.pid, q.vm_id),
            };
            say(&said);
        }
        std::thread::sleep(TICK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_pid_and_start_time() {
        let me = std::process::id();
        let g = Guarded::of("vm", me, 0).expect("this process");
        assert!(g.alive());
        assert!(!is_stopped(me));
        let reused = Guarded {
            start_time: g.start_time + 1,
            ..g.clone()
        };
        assert!(
            !reused.alive(),
            "a pid with another start time is another process"
        );
        assert!(!resume(&reused));
    }

    #[test]
    fn the_watch_stops_each_qemu_past_its_deadline_and_ends_when_none_is_left() {
        let dir = tempfile::tempdir().expect("dir");
        let sleeper = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep")
        };
        let (mut child, mut other) = (sleeper(), sleeper());
        let guarded = Guarded::of("vm", child.id(), boottime_ms() + 300).expect("child");
        let renewed = Guarded::of("vm2", other.id(), boottime_ms() + 60_000).expect("other");
        publish(dir.path(), vec![guarded.clone(), renewed]).expect("publish");
        let data_dir = dir.path().to_path_buf();
        let watch = std::thread::spawn(move || run(data_dir));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!is_stopped(child.id()), "stopped before its deadline");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_stopped(child.id()) {
            assert!(std::time::Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Each QEMU has its own deadline: the one renewed later runs on.
        assert!(!is_stopped(other.id()));
        // A second watch for the same data dir leaves at once.
        assert!(run(dir.path().to_path_buf()).is_ok());
        // A publish that leaves a live QEMU out (a restarted daemon that holds no lease yet)
        // keeps it, with its old deadline.
        publish(dir.path(), Vec::new()).expect("publish");
        let listed = read(dir.path()).expect("fence").qemus;
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed.contains(&guarded), "{listed:?}");
        // Renewed, then resumed (in the daemon's order): the watch leaves it running.
        let again = Guarded {
            deadline_ms: boottime_ms() + 60_000,
            ..guarded
        };
        publish(dir.path(), vec![again.clone()]).expect("publish");
        std::thread::sleep(Duration::from_millis(300));
        assert!(resume(&again));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!is_stopped(child.id()));
        // An unreadable file changes nothing; once no listed QEMU lives, the watch ends.
        std::fs::write(dir.path().join(FENCE_FILE), b"{not json").expect("garble");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!watch.is_finished(), "the watch left while its QEMUs ran");
        for c in [&mut child, &mut other] {
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
        watch.join().expect("watch").expect("ends cleanly");
    }
}
