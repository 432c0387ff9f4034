//! A VM's serial console, kept on disk within a fixed size.
//!
//! QEMU does not write the console to a file itself: a file chardev grows for as long as the
//! guest prints. It serves the console on a unix socket instead (`-chardev socket,server`),
//! and the daemon follows that socket into `console.log`, which is rotated to `console.log.1`
//! when it reaches [`CONSOLE_LOG_MAX`], so a VM's console never takes more than twice that.
//! A daemon that restarts while QEMU runs connects again and appends: QEMU listens for a new
//! client once the old one is gone. What the guest prints while no daemon is connected is
//! dropped by QEMU, which is what bounds the disk when nobody is there to rotate.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::VmPaths;
use crate::throttle::Throttle;

/// Size at which `console.log` is rotated.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// How long to keep trying to reach a console socket that is not there yet.
const CONNECT_FOR: Duration = Duration::from_secs(5);

/// Follows the console of the QEMU launched for `paths` until it exits, in a task of its own.
/// Call it once per QEMU process per daemon: right after the launch, and on re-adoption.
pub fn follow(paths: &VmPaths) -> tokio::task::JoinHandle<()> {
    follow_bounded(paths, CONSOLE_LOG_MAX)
}

/// [`follow`], rotating at `max` bytes.
pub fn follow_bounded(paths: &VmPaths, max: u64) -> tokio::task::JoinHandle<()> {
    let socket = paths.console_socket();
    let log = ConsoleLog::new(paths.console_log(), max);
    tokio::spawn(async move {
        let Some(stream) = connect(&socket).await else {
            tracing::warn!(socket = %socket.display(), "cannot follow the VM's console");
            return;
        };
        pump(stream, log).await;
    })
}

async fn connect(socket: &Path) -> Option<UnixStream> {
    let deadline = tokio::time::Instant::now() + CONNECT_FOR;
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Some(stream),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Copies the console into the log until QEMU closes it. The socket is always drained, even
/// when the log cannot be written (a full disk): a console that backs up stalls the guest.
async fn pump(mut stream: UnixStream, log: ConsoleLog) {
    let mut log = Some(log);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Some(mut current) = log.take() else {
            return;
        };
        let chunk = buf[..n].to_vec();
        // Writing and renaming files blocks: keep it off the async workers.
        log = tokio::task::spawn_blocking(move || {
            current.append(&chunk);
            current
        })
        .await
        .ok();
    }
}

/// `console.log` and its one rotation.
struct ConsoleLog {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    len: u64,
    failures: Throttle,
}

impl ConsoleLog {
    fn new(path: PathBuf, max: u64) -> Self {
        Self {
            path,
            max: max.max(1),
            file: None,
            len: 0,
            failures: Throttle::new(Duration::from_secs(60)),
        }
    }

    fn rotated(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    fn append(&mut self, mut bytes: &[u8]) {
        if let Err(err) = self.try_append(&mut bytes) {
            // The bytes are dropped; the file is opened again for the next ones.
            self.file = None;
            if let Some(more) = self.failures.allow() {
                tracing::warn!(path = %self.path.display(), %err, failures_since_last = more, "cannot write the VM's console log");
            }
        }
    }

    fn try_append(&mut self, bytes: &mut &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.file.is_none() {
                // Appending to what is there: a daemon that restarted picks up where the
                // last one stopped.
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.len = file.metadata()?.len();
                self.file = Some(file);
            }
            if self.len >= self.max {
                std::fs::rename(&self.path, self.rotated())?;
                self.file = None;
                continue;
            }
            let room = usize::try_from(self.max - self.len).unwrap_or(usize::MAX);
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            if let Some(file) = self.file.as_mut() {
                file.write_all(now)?;
            }
            self.len += now.len() as u64;
            *bytes = later;
        }
        Ok(())
    }
}

/// The last `max_lines` lines of the log at `path`, read from its end: at most `max_bytes`
/// of it are read, whatever its size.
pub fn tail(path: &Path, max_lines: usize, max_bytes: u64) -> std::io::Result<String> {
    const BLOCK: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let floor = len.saturating_sub(max_bytes);
    let mut start = len;
    let mut held: Vec<u8> = Vec::new();
    while start > floor {
        let step = (start - floor).min(BLOCK);
        start -= step;
        let mut block = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&held);
        held = block;
        // Enough once the bytes hold max_lines whole lines after a line end.
        let body = held.strip_suffix(b"\n").unwrap_or(&held);
        if body.iter().filter(|&&b| b == b'\n').count() >= max_lines {
            break;
        }
    }
    let mut text = &held[..];
    if start > 0 {
        // The first line was cut by where reading began.
        text = text
            .iter()
            .position(|&b| b == b'\n')
            .map_or(&[][..], |i| &text[i + 1..]);
    }
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(max_lines)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(from: usize, to: usize) -> String {
        (from..to).map(|i| format!("line {i:07}\n")).collect()
    }

    #[test]
    fn rotates_at_the_limit_and_keeps_one_older_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::new(path.clone(), 100);
        let text = numbered(0, 100);
        for piece in text.as_bytes().chunks(37) {
            log.append(piece);
        }
        let now = std::fs::read(&path).expect("log");
        let old = std::fs::read(dir.path().join("console.log.1")).expect("rotated");
        assert!(now.len() <= 100 && old.len() == 100);
        let mut kept = old.clone();
        kept.extend_from_slice(&now);
        assert!(text.as_bytes().ends_with(&kept), "bytes lost at a rotation");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
    }

    #[test]
    fn tail_reads_whole_lines_from_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, numbered(0, 20_000)).expect("write");
        let last: Vec<String> = (19_975..20_000).map(|i| format!("line {i:07}")).collect();
        assert_eq!(tail(&path, 25, 1 << 20).expect("tail"), last.join("\n"));
        // Fewer bytes than the lines asked for: only whole lines, none cut.
        let short = tail(&path, 25, 100).expect("tail");
        assert!(
            !short.is_empty() && short.lines().all(|l| l.len() == 12),
            "{short}"
        );
        assert!(short.ends_with("line 0019999"));
        // A file shorter than asked for is given whole.
        std::fs::write(&path, "a\nb").expect("write");
        assert_eq!(tail(&path, 25, 1 << 20).expect("tail"), "a\nb");
    }
}
