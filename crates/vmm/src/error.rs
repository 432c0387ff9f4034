use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    // Names the real knobs (`--qemu`, `qemu` in nook.toml) so the user can act on it.
    #[error(
        "QEMU not found at {0}: install it (apt-get install qemu-system-x86) or point nook at it with --qemu (or `qemu` in nook.toml)"
    )]
    QemuMissing(PathBuf),
    #[error("QEMU failed to start: {0}")]
    LaunchFailed(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("QMP connection closed")]
    QmpClosed,
    #[error("Guest agent connection closed")]
    AgentClosed,
    /// The VM changed QEMU before the request went out: its new agent connection takes it.
    #[error("The VM moved to a new QEMU before the request was sent")]
    AgentMoved,
    #[error("Guest agent speaks protocol {0}, this host speaks {1}")]
    AgentVersion(u32, u32),
    #[error("Guest agent: {0}")]
    Agent(String),
    #[error("Guest agent did not answer within {0:?}")]
    AgentTimeout(std::time::Duration),
    #[error("QMP command {0} got no answer within {1:?}")]
    QmpTimeout(String, std::time::Duration),
    #[error("Timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Malformed frame from the guest")]
    Frame(#[from] nook_proto::FrameError),
}

impl VmmError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_missing_names_the_real_setting() {
        let msg = VmmError::QemuMissing("/nope/qemu".into()).to_string();
        assert!(msg.contains("/nope/qemu"), "{msg}");
        assert!(msg.contains("--qemu"), "{msg}");
        assert!(!msg.contains("qemu_binary"), "{msg}");
    }
}
