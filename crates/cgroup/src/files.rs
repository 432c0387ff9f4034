//! Plain file operations on cgroupfs, mapped to [`CgroupError`].

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::CgroupError;

/// Writes `value` with a single `write(2)`, never creating the file (the
/// truncation, as in `echo > file`, only matters to the fake trees in tests).
pub(crate) fn try_write(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    tracing::trace!(path = %path.display(), value, "cgroup write");
    try_write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file holding one unsigned number.
pub(crate) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    read(path)?.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
    })
}

/// Reads `key value` lines (`cpu.stat`, `memory.stat`) and returns `key`'s value.
pub(crate) fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
        })
        .ok_or_else(|| CgroupError::Parse {
            path: path.to_owned(),
        })
}

/// Creates a directory; an existing one is fine.
pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "created cgroup");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Dir {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The processes in a group; an absent group has none.
pub(crate) fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CgroupError::Read { path, source }),
    };
    text.lines()
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| CgroupError::Parse { path: path.clone() })
        })
        .collect()
}

/// Child directories (child cgroups) of a group; an absent group has none.
pub(crate) fn children(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CgroupError::Read {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Removes an empty group; an absent one is fine. A group whose last process
/// has just been reaped can report `EBUSY` for a moment, so that is retried
/// briefly; `Ok(false)` means it stayed busy.
pub(crate) fn rmdir(path: &Path) -> Result<bool, CgroupError> {
    for attempt in 0..25 {
        match fs::remove_dir(path) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "removed cgroup");
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if attempt < 24 {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            Err(source) => {
                return Err(CgroupError::Dir {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(false)
}

/// Moves a whole process (all its threads) into the group at `dir`.
pub(crate) fn attach(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    match try_write(&path, &pid.to_string()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(CgroupError::NoSuchProcess { pid }),
        Err(source) => Err(CgroupError::Write {
            path,
            value: pid.to_string(),
            source,
        }),
    }
}
