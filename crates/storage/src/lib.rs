//! Guest images and per-VM disks.
//!
//! An [`ImageStore`] builds and publishes images under its root: `ROOT/<kind>` is a symlink to
//! `ROOT/<kind>-<timestamp>/` holding `rootfs.qcow2` (the read-only base every VM disk is an
//! overlay of), `vmlinux`, `initrd.cpio` and `manifest.json`. [`disk`] makes those overlays;
//! [`initrd_with_agent`] adds the guest agent to an image's initramfs.
//!
//! Invariants: a published image directory is never modified or deleted by this crate (VM
//! disks name its `rootfs.qcow2` as their backing file by absolute path, forever); a rebuild
//! publishes a new directory and swaps the symlink atomically; a failed build leaves nothing.
//!
//! This crate does not run VMs, talk to guests or know about accounts; it shells out to the
//! standard tools (apt-get, dpkg-deb, debootstrap, mkfs.ext4, qemu-img, xz) and needs root to
//! build the default image.

mod cmd;
mod cpio;
mod debs;
pub mod disk;
mod error;
mod initrd;
mod kernel;
pub mod layers;
mod recipe;
mod rootfs;
mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use error::StorageError;
pub use initrd::AGENT_PATH;
pub use store::ImageStore;

/// The images nook can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// Busybox on Debian's kernel: boots in seconds in 96 MiB.
    Tiny,
    /// Debian bookworm with systemd, ssh, build tools, python3 and chromium.
    Default,
}

impl ImageKind {
    pub const ALL: [ImageKind; 2] = [ImageKind::Tiny, ImageKind::Default];

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Tiny => "tiny",
            ImageKind::Default => "default",
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageKind {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| StorageError::UnknownKind(s.to_string()))
    }
}

/// A step of an image build, for progress display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuildEvent {
    /// Short phase, e.g. "downloading the kernel".
    pub step: String,
    /// A line of tool output within the step.
    pub detail: Option<String>,
}

/// A published image. All paths are absolute and stay valid for as long as the store exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Image {
    pub kind: ImageKind,
    /// The published directory (`ROOT/<kind>-<timestamp>`), never `ROOT/<kind>` itself.
    pub dir: PathBuf,
    /// qcow2 base; never written after the build.
    pub rootfs: PathBuf,
    /// Uncompressed ELF kernel (boots through PVH with `-kernel`).
    pub kernel: PathBuf,
    /// Uncompressed cpio newc initramfs.
    pub initrd: PathBuf,
    /// What the initramfs executes after `switch_root` (pass as `nook.init=`).
    pub init: String,
    pub kernel_version: String,
    pub rootfs_virtual_bytes: u64,
    pub default_memory_mib: u32,
    pub default_disk_bytes: u64,
    /// The recipe version that built it; older than the current one means it lacks something
    /// this nook expects (see `RECIPE_VERSION`).
    pub recipe_version: u32,
}

pub use initrd::check_agent;

/// The image's initrd with a second cpio archive appended holding the agent as `/nook-agent`
/// (mode 0755); the initramfs installs it at [`AGENT_PATH`] on the root disk at every boot.
///
/// The result is cached in `cache_dir` under a hash of the image's initrd (path, size, mtime)
/// and the agent's contents, and reused when present. The agent must pass [`check_agent`].
pub fn initrd_with_agent(
    image: &Image,
    agent_binary: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, StorageError> {
    initrd::with_agent(image, agent_binary, cache_dir)
}

/// Test-only: fails (naming the Debian package) when a host tool a test needs is absent.
/// Skipping instead would let a missing tool hide a broken code path behind a green run.
#[cfg(test)]
pub(crate) fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "this test needs `{tool}` on PATH: apt-get install {package}"
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_display() {
        for kind in ImageKind::ALL {
            assert_eq!(kind.to_string().parse::<ImageKind>().unwrap(), kind);
        }
        let err = "huge".parse::<ImageKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "Unknown image 'huge': choose one of tiny, default"
        );
        assert_eq!(
            StorageError::NotBuilt(ImageKind::Default).to_string(),
            "Image 'default' is not built: run 'nook image build default'"
        );
    }
}
