//! Per-VM disks: qcow2 overlays over an image's base (or over another disk).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use crate::StorageError;
use crate::cmd;
use crate::error::io_err;

const QEMU_UTILS: &str = "qemu-utils";

/// What `qemu-img info` says about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub format: String,
    pub virtual_size: u64,
    /// The backing file as recorded in the image (absolute for overlays made here).
    pub backing_file: Option<PathBuf>,
}

/// Reads a disk's format, size and backing file. Works on disks in use by a running QEMU.
pub fn info(path: &Path) -> Result<DiskInfo, StorageError> {
    if !path.exists() {
        return Err(StorageError::Io {
            action: "read",
            path: path.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let out = cmd::output(
        Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(path),
        QEMU_UTILS,
        path,
    )?;
    parse_info(&out).ok_or_else(|| StorageError::ToolFailed {
        tool: "qemu-img".into(),
        tail: format!("unexpected 'qemu-img info' output for {}", path.display()),
    })
}

fn parse_info(json: &[u8]) -> Option<DiskInfo> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    Some(DiskInfo {
        format: v.get("format")?.as_str()?.to_string(),
        virtual_size: v.get("virtual-size")?.as_u64()?,
        backing_file: v
            .get("full-backing-filename")
            .or_else(|| v.get("backing-filename"))
            .and_then(|b| b.as_str())
            .map(PathBuf::from),
    })
}

/// The disk's virtual size in bytes (`qemu-img info --output=json`).
pub fn virtual_size(path: &Path) -> Result<u64, StorageError> {
    Ok(info(path)?.virtual_size)
}

/// Creates a qcow2 overlay at `overlay` over `base` with a virtual size of `size_bytes`.
///
/// The backing file is recorded by absolute path. `size_bytes` below the base's virtual size
/// is an error, as is an existing `overlay` (it is never overwritten). On any failure nothing
/// is left at `overlay`.
pub fn create_overlay(base: &Path, overlay: &Path, size_bytes: u64) -> Result<(), StorageError> {
    let base = fs::canonicalize(base).map_err(io_err("read", base))?;
    let base_info = info(&base)?;
    if size_bytes < base_info.virtual_size {
        return Err(StorageError::DiskTooSmall {
            requested: size_bytes,
            minimum: base_info.virtual_size,
        });
    }
    write_overlay(&base, &base_info.format, overlay, size_bytes)
}

/// Creates a qcow2 overlay at `overlay` over the qcow2 file `backing` (named by absolute path),
/// without inspecting `backing`: the fast path for clones, whose layers nook made itself.
/// Never overwrites; on failure nothing is left at `overlay`.
pub fn create_overlay_on_qcow2(
    backing: &Path,
    overlay: &Path,
    size_bytes: u64,
) -> Result<(), StorageError> {
    write_overlay(backing, "qcow2", overlay, size_bytes)
}

fn write_overlay(
    base: &Path,
    base_format: &str,
    overlay: &Path,
    size_bytes: u64,
) -> Result<(), StorageError> {
    if overlay.symlink_metadata().is_ok() {
        return Err(StorageError::DiskExists {
            path: overlay.to_path_buf(),
        });
    }
    let dir = match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = overlay
        .file_name()
        .ok_or_else(|| StorageError::Io {
            action: "create",
            path: overlay.to_path_buf(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?
        .to_string_lossy();
    // qemu-img writes into a temporary name that is removed on any failure; the final name
    // appears only complete, and never replaces an existing file.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(io_err("create a file in", &dir))?
        .into_temp_path();
    cmd::output(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", base_format, "-b"])
            .arg(base)
            .arg(&*tmp)
            .arg(size_bytes.to_string()),
        QEMU_UTILS,
        &dir,
    )?;
    match renameat2(
        AT_FDCWD,
        &*tmp,
        AT_FDCWD,
        overlay,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {
            // The temp path is gone now; stop its guard from deleting whatever takes its name.
            let _ = tmp.keep();
            Ok(())
        }
        Err(nix::errno::Errno::EEXIST) => Err(StorageError::DiskExists {
            path: overlay.to_path_buf(),
        }),
        Err(e) => Err(io_err("create", overlay)(e.into())),
    }
}

/// Makes `base` the direct backing file of the stopped disk `top`, first copying into `top`
/// whatever the layers in between hold (`qemu-img rebase` in safe mode). A crash midway
/// leaves `top` on its old chain with some of that data already copied: still correct.
pub fn rebase(top: &Path, base: &Path) -> Result<(), StorageError> {
    cmd::output(
        Command::new("qemu-img")
            .args(["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(top),
        QEMU_UTILS,
        top,
    )?;
    Ok(())
}

/// Rewrites the backing file `top`'s header names to `backing` (a qcow2 file), leaving its
/// data alone (`qemu-img rebase -u`): for a file that arrived from another host, whose header
/// names that host's paths for the same contents.
pub fn set_backing(top: &Path, backing: &Path) -> Result<(), StorageError> {
    cmd::output(
        Command::new("qemu-img")
            .args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(backing)
            .arg(top),
        QEMU_UTILS,
        top,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info() {
        let json = br#"{"virtual-size": 1073741824, "filename": "o.qcow2", "format": "qcow2",
            "backing-filename": "/img/base.qcow2", "full-backing-filename": "/img/base.qcow2",
            "backing-filename-format": "qcow2", "dirty-flag": false}"#;
        let info = parse_info(json).unwrap();
        assert_eq!(info.virtual_size, 1 << 30);
        assert_eq!(info.format, "qcow2");
        assert_eq!(
            info.backing_file.as_deref(),
            Some(Path::new("/img/base.qcow2"))
        );
        assert!(parse_info(b"{}").is_none());
        assert!(parse_info(b"not json").is_none());
    }

    #[test]
    fn overlay_over_a_real_base() {
        crate::require_tool("qemu-img", "qemu-utils");
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap();
        assert!(status.success());

        // The backing file is recorded by absolute path.
        let overlay = dir.path().join("vm").join("disk.qcow2");
        fs::create_dir(dir.path().join("vm")).unwrap();
        create_overlay(&base, &overlay, 128 << 20).unwrap();
        let info = info(&overlay).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 128 << 20);
        assert_eq!(info.backing_file.unwrap(), fs::canonicalize(&base).unwrap());
        assert_eq!(virtual_size(&base).unwrap(), 64 << 20);

        // Never clobbers.
        let err = create_overlay(&base, &overlay, 128 << 20).unwrap_err();
        assert!(matches!(err, StorageError::DiskExists { .. }), "{err}");

        // Too small: an error, and nothing left behind.
        let small = dir.path().join("vm").join("small.qcow2");
        let err = create_overlay(&base, &small, 32 << 20).unwrap_err();
        assert!(
            matches!(err, StorageError::DiskTooSmall { minimum, .. } if minimum == 64 << 20),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("Disk size 33554432 bytes is smaller")
        );
        assert!(!small.exists());

        // A failing qemu-img (the size is not a size it accepts) leaves nothing either.
        let huge = dir.path().join("vm").join("huge.qcow2");
        assert!(create_overlay(&base, &huge, u64::MAX).is_err());
        let left: Vec<_> = fs::read_dir(dir.path().join("vm"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["disk.qcow2"]);

        // A missing base is a clear error.
        let err = create_overlay(&dir.path().join("nope.qcow2"), &huge, 1 << 30).unwrap_err();
        assert!(err.to_string().starts_with("Cannot read"), "{err}");
    }
}
