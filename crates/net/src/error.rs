use std::io;

use crate::MAX_SLOT;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Slot {0} is out of range: use 0 to {max}", max = MAX_SLOT)]
    SlotOutOfRange(u32),

    #[error("Invalid egress block entry {value:?}: {reason}")]
    BadCidr { value: String, reason: String },

    #[error("{tool} is missing: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },

    #[error("Cannot run {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("`{cmd}` was refused: run as root, or use user-mode networking")]
    NotPermitted { cmd: String },

    #[error("`{cmd}` failed: {stderr}")]
    CommandFailed { cmd: String, stderr: String },

    #[error("Unexpected output from `{cmd}`")]
    BadOutput {
        cmd: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("Cannot write {path}: run as root with a writable /proc/sys")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}
