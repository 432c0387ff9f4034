//! Running the standard tools (apt-get, dpkg-deb, debootstrap, mkfs.ext4, qemu-img, xz) and
//! turning their failures into [`StorageError`]s that carry the tail of their output.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

use crate::StorageError;

/// How many lines of a failed tool's output go into the error.
const TAIL_LINES: usize = 6;

fn tool_name(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

fn spawn_error(cmd: &Command, package: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::ToolMissing {
            tool: tool_name(cmd),
            package: package.to_string(),
        }
    } else {
        StorageError::Io {
            action: "run",
            path: Path::new(cmd.get_program()).to_path_buf(),
            source: e,
        }
    }
}

/// The last few non-empty lines of `text`, joined on one line.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let mut kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Tools that retry repeat their messages; keep the last of each.
    let mut seen = std::collections::HashSet::new();
    kept.reverse();
    kept.retain(|l| seen.insert(*l));
    kept.reverse();
    kept[kept.len().saturating_sub(lines)..].join(" / ")
}

fn failure(tool: String, status: ExitStatus, output: &str, space: &Path) -> StorageError {
    if output.contains("No space left on device") || output.contains("Disk quota exceeded") {
        return StorageError::NoSpace {
            path: crate::error::containing_dir(space),
        };
    }
    let mut tail = tail(output, TAIL_LINES);
    if tail.is_empty() {
        tail = format!("exited with {status}");
    }
    StorageError::ToolFailed { tool, tail }
}

/// Runs `cmd` to completion with no stdin and returns its stdout. `package` is what provides
/// the tool (for the "is missing" message); `space` is where it writes (for "No space left").
pub(crate) fn output(
    cmd: &mut Command,
    package: &str,
    space: &Path,
) -> Result<Vec<u8>, StorageError> {
    tracing::debug!(?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, package, e))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        if text.trim().is_empty() {
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        return Err(failure(tool_name(cmd), out.status, &text, space));
    }
    Ok(out.stdout)
}

/// Runs `cmd`, handing each line of its stdout and stderr to `on_line` as it arrives.
pub(crate) fn streamed(
    cmd: &mut Command,
    package: &str,
    space: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), StorageError> {
    tracing::debug!(?cmd, "running");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, package, e))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut last: VecDeque<String> = VecDeque::new();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<String>();
        let pump = |stream: Option<Box<dyn Read + Send>>, tx: mpsc::Sender<String>| {
            move || {
                let Some(stream) = stream else { return };
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        };
        s.spawn(pump(stdout.map(|o| Box::new(o) as _), tx.clone()));
        s.spawn(pump(stderr.map(|e| Box::new(e) as _), tx));
        for line in rx {
            if line.is_empty() {
                continue;
            }
            on_line(&line);
            if last.len() == 40 {
                last.pop_front();
            }
            last.push_back(line);
        }
    });
    let status = child.wait().map_err(|e| spawn_error(cmd, package, e))?;
    if !status.success() {
        let text = Vec::from(last).join("\n");
        return Err(failure(tool_name(cmd), status, &text, space));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_nonempty_lines() {
        assert_eq!(tail("a\n\nb\n c \n\n", 2), "b / c");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("x\ny\nx\ny\nz\n", 5), "x / y / z");
    }

    #[test]
    fn missing_tool_names_its_package() {
        let err = output(
            &mut Command::new("/nonexistent/frob"),
            "frobnicator",
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "frob is missing: apt-get install frobnicator"
        );
    }

    #[test]
    fn failure_carries_stderr_tail_and_detects_enospc() {
        let err = output(
            Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]),
            "dash",
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "sh failed: one / two");
        let err = output(
            Command::new("sh").args(["-c", "echo 'write: No space left on device' >&2; exit 1"]),
            "dash",
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::NoSpace { .. }), "{err:?}");
    }

    #[test]
    fn streamed_relays_both_streams() {
        let mut lines = Vec::new();
        streamed(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            "dash",
            Path::new("/tmp"),
            &mut |l| lines.push(l.to_string()),
        )
        .unwrap();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
    }
}
