use std::io;
use std::path::{Path, PathBuf};

use crate::ImageKind;

/// Everything that can go wrong with images and disks. Messages are short and say what to do;
/// the underlying cause, where there is one, is the error's `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("Image '{0}' is not built: run 'nook image build {0}'")]
    NotBuilt(ImageKind),
    #[error("Image '{0}' was built by an older nook: run 'nook image build {0}'")]
    Outdated(ImageKind),
    #[error("Unknown image '{0}': choose one of tiny, default")]
    UnknownKind(String),
    #[error("Image '{0}' is already being built: wait for that build to finish")]
    BuildInProgress(ImageKind),
    #[error("Image manifest {} is unreadable: rebuild the image", path.display())]
    BadManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{tool} is missing: apt-get install {package}")]
    ToolMissing { tool: String, package: String },
    #[error("{tool} failed: {tail}")]
    ToolFailed { tool: String, tail: String },
    #[error("Package {0} is not in the apt lists: run 'apt-get update'")]
    PackageNotFound(String),
    #[error("No space left in {}", path.display())]
    NoSpace { path: PathBuf },
    #[error("Cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Kernel {version} has no module {name}: the image cannot boot")]
    ModuleMissing { name: String, version: String },
    #[error("Image build failed: {0}")]
    Build(String),
    #[error(
        "Disk size {requested} bytes is smaller than its base's {minimum} bytes: ask for at least {minimum}"
    )]
    DiskTooSmall { requested: u64, minimum: u64 },
    #[error("Disk {} already exists: delete it or choose another path", path.display())]
    DiskExists { path: PathBuf },
    #[error(
        "The guest agent {} {why}, so VMs could never become ready: build the static agent with 'scripts/build-agent' (or 'scripts/build'), or point --agent at it",
        path.display()
    )]
    AgentUnusable { path: PathBuf, why: String },
    /// A qcow2 header, which the VM's QEMU can write, names a file nook did not make for
    /// this disk: root must not open it.
    #[error("Disk {} names {what}, which nook did not make for it", disk.display())]
    UntrustedChain { disk: PathBuf, what: String },
}

/// Maps an I/O error on `path` to [`StorageError`], turning a full disk into `NoSpace`.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| {
        if is_no_space(&source) {
            StorageError::NoSpace {
                path: containing_dir(&path),
            }
        } else {
            StorageError::Io {
                action,
                path,
                source,
            }
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The directory a path lives in (the path itself when it is a directory), for `NoSpace`.
pub(crate) fn containing_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => path.to_path_buf(),
    }
}
