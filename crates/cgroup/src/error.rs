use std::io;
use std::path::PathBuf;

use crate::MAX_NAME_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("Cgroups are not usable: {0}")]
    NotAvailable(String),

    #[error(
        "Invalid cgroup name {0:?}: use 1 to {max} characters from a-z, 0-9, '-' and '_'",
        max = MAX_NAME_LEN
    )]
    InvalidName(String),

    #[error("Invalid limit: {0}")]
    InvalidLimit(String),

    #[error("Cgroup {group} does not exist: {hint}")]
    Missing { group: String, hint: &'static str },

    #[error("Cgroup {group} is busy: {reason}")]
    Busy { group: String, reason: &'static str },

    #[error("Process {pid} does not exist: attach it while it runs")]
    NoSuchProcess { pid: u32 },

    #[error("Cannot enable the cpu and memory controllers in {path}: it must hold no processes")]
    InternalProcesses { path: PathBuf },

    #[error("Cannot write {value:?} to {path}: run as root with cgroups mounted read-write")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },

    #[error("Cannot read {path}: is the cgroup filesystem mounted?")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("Cannot create or remove cgroup {path}: run as root with cgroups mounted read-write")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("Unexpected content in {path}: is this a cgroup filesystem?")]
    Parse { path: PathBuf },
}
