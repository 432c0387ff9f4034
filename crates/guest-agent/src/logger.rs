//! The agent's log, written by a thread of its own so that logging never blocks the agent.
//!
//! stderr is the serial console in the tiny image and journald's stream socket under systemd.
//! journald runs at low CPU weight while a VM boots and drained that socket seconds late; a
//! fork taken then woke with the socket's buffer full, and the agent's next log line blocked the
//! thread that was to answer the host's `Identify` until the host gave up. Lines now go through
//! a bounded queue; when it is full they are counted, dropped, and the count is logged later.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};

/// Lines waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 256;

/// A bounded queue of lines and the thread that writes them out.
pub struct Logger {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl Logger {
    /// Starts a writer thread over `out`.
    pub fn start(mut out: impl Write + Send + 'static) -> std::io::Result<Logger> {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || {
                for line in rx {
                    let lost = counter.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(
                            out,
                            "nook-agent: {lost} log lines dropped (nobody read the log)"
                        );
                    }
                    let _ = writeln!(out, "nook-agent: {line}");
                }
            })?;
        Ok(Logger { tx, dropped })
    }

    /// Queues `text`, or drops and counts it when the queue is full; says which.
    pub fn line(&self, text: String) -> bool {
        let queued = self.tx.try_send(text).is_ok();
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Starts the agent's log on stderr. Until then (and in unit tests) lines go straight to
/// stderr.
pub fn start() {
    match Logger::start(std::io::stderr()) {
        Ok(logger) => {
            let _ = LOGGER.set(logger);
        }
        Err(e) => eprintln!("nook-agent: cannot start the log thread ({e}); logging may block"),
    }
}

/// Logs one line without waiting for the log's reader.
pub fn line(text: String) {
    match LOGGER.get() {
        Some(logger) => {
            logger.line(text);
        }
        None => eprintln!("nook-agent: {text}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A reader that never reads: the write end of a pipe whose read end is kept open and
    /// ignored, as journald's socket was while the guest booted.
    #[test]
    fn a_log_nobody_reads_never_blocks_the_caller() {
        let (read_end, write_end) = std::io::pipe().unwrap();
        let logger = Logger::start(write_end).unwrap();
        let started = Instant::now();
        // Far more than the pipe (64 KiB, about 500 of these lines) and the queue can hold.
        // The drops are counted here, not from the logger's counter: the writer zeroes that
        // when it next writes, and a writer starved of CPU while this loop runs may write its
        // first lines only after the loop ends.
        let dropped = (0..20_000)
            .filter(|i| !logger.line(format!("line {i} {}", "x".repeat(100))))
            .count();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "logging blocked for {:?}",
            started.elapsed()
        );
        assert!(
            dropped > 15_000,
            "only {dropped} of 20000 lines were dropped"
        );
        drop(read_end);
    }
}
