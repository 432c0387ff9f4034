//! Turning a directory tree into the image's base disk: a sparse ext4 file made with
//! `mkfs.ext4 -d`, converted to qcow2.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use crate::StorageError;
use crate::cmd;
use crate::error::io_err;

/// Makes `out` (qcow2) holding an ext4 filesystem of `size` bytes with the contents of `tree`.
/// `scratch` holds the intermediate raw file (sparse, removed afterwards).
pub(crate) fn make_disk(
    tree: &Path,
    size: u64,
    scratch: &Path,
    out: &Path,
) -> Result<(), StorageError> {
    let raw = scratch.join("rootfs.raw");
    let file = File::create(&raw).map_err(io_err("create", &raw))?;
    file.set_len(size).map_err(io_err("size", &raw))?;
    drop(file);
    let result = (|| {
        cmd::output(
            Command::new("mkfs.ext4")
                .args(["-F", "-q", "-L", "nook-root", "-d"])
                .arg(tree)
                .arg(&raw),
            "e2fsprogs",
            scratch,
        )?;
        cmd::output(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(out),
            "qemu-utils",
            out,
        )?;
        Ok(())
    })();
    let _ = fs::remove_file(&raw);
    result
}
