//! Copy-on-write disk layers shared between clones.
//!
//! A VM's disk is a chain of qcow2 files: its own writable top (`disk.qcow2` in its directory),
//! then zero or more frozen layers under `LAYERS/`, then an image's read-only base. Cloning a
//! VM freezes its top as a new layer (a hard link, so the running QEMU keeps its file open) and
//! gives both the source and the clone a fresh empty top over it. Nothing is copied, so a clone
//! costs the same for a 1 GiB and a 20 GiB disk.
//!
//! Invariants:
//! - A layer is never written after it is frozen: only a VM's own top is writable, and only by
//!   that VM's QEMU (or `qemu-img` while it is stopped).
//! - Every chain names its backing files by absolute path, recorded in each qcow2 header, so
//!   the files themselves are the truth about which layer is in use: [`Layers::collect`]
//!   deletes exactly the layers no VM's chain reaches.
//! - The base images are outside `LAYERS/` and are never deleted here.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::StorageError;
use crate::error::io_err;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Longest backing-file name QEMU accepts in a qcow2 header.
const MAX_BACKING_NAME: u32 = 1023;
/// Chains never get deeper than this in practice (flattening keeps them shorter); a longer
/// one means a loop in the headers.
const MAX_CHAIN: usize = 4096;

/// The directory of frozen layers.
#[derive(Debug, Clone)]
pub struct Layers {
    dir: PathBuf,
}

impl Layers {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Freezes `top` as a new layer and returns the layer's path: a second name for the same
    /// file, so a QEMU with `top` open keeps using it. The caller must then move every writer
    /// of `top` onto an overlay of the returned layer.
    pub fn freeze(&self, top: &Path) -> Result<PathBuf, StorageError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let layer = self
            .dir
            .join(format!("{}.qcow2", hex::encode(rand::random::<[u8; 8]>())));
        fs::hard_link(top, &layer).map_err(io_err("freeze", top))?;
        Ok(layer)
    }

    /// Whether `path` is one of the frozen layers (as opposed to an image base).
    pub fn contains(&self, path: &Path) -> bool {
        path.parent() == Some(self.dir.as_path())
    }

    /// Deletes every layer no chain starting at `tops` reaches; returns what it deleted.
    ///
    /// The caller must hold off clones while this runs: a layer frozen a moment ago is
    /// unreachable until the clone's overlays name it.
    pub fn collect(&self, tops: &[PathBuf]) -> Result<Vec<PathBuf>, StorageError> {
        let mut reachable = HashSet::new();
        for top in tops {
            if !top.exists() {
                continue;
            }
            for file in chain(top)? {
                reachable.insert(file);
            }
        }
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "qcow2") && !reachable.contains(&path) {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

/// The backing file recorded in a qcow2 header, read directly (no `qemu-img` process): None
/// for a file with no backing file. Relative names are resolved against the file's directory.
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>, StorageError> {
    let mut file = fs::File::open(path).map_err(io_err("read", path))?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).map_err(io_err("read", path))?;
    if header[..4] != QCOW2_MAGIC {
        return Err(not_qcow2(path));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let size = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > MAX_BACKING_NAME {
        return Err(not_qcow2(path));
    }
    let mut name = vec![0u8; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut name, offset)
        .map_err(io_err("read", path))?;
    let name = PathBuf::from(String::from_utf8(name).map_err(|_| not_qcow2(path))?);
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// Every file of the chain from `top` down to its base, top first.
pub fn chain(top: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut files = vec![top.to_path_buf()];
    while let Some(next) = backing_file(files.last().map(PathBuf::as_path).unwrap_or(top))? {
        if files.len() >= MAX_CHAIN || files.contains(&next) {
            return Err(StorageError::Build(format!(
                "the backing chain of {} loops",
                top.display()
            )));
        }
        files.push(next);
    }
    Ok(files)
}

/// The chain from `top` down, checked before root (the daemon, `qemu-img`) opens any of it.
///
/// Every qcow2 header in a VM's chain is writable by that VM's QEMU at some point, so the
/// names in them are trusted only when each file below the top is a regular file among
/// `layers`, or is `base`, and no file uses an external data file (a second name qcow2 can
/// point anywhere, which `qemu-img resize` would grow and `rebase` would write through).
pub fn trusted_chain(
    top: &Path,
    layers: &Layers,
    base: &Path,
) -> Result<Vec<PathBuf>, StorageError> {
    let untrusted = |what: String| StorageError::UntrustedChain {
        disk: top.to_path_buf(),
        what,
    };
    let mut files = vec![top.to_path_buf()];
    loop {
        // Each name is checked before the file is opened, so a forged one is never read.
        let file = files.last().map(PathBuf::as_path).unwrap_or(top);
        if has_external_data_file(file)? {
            return Err(untrusted(format!(
                "an external data file (in {})",
                file.display()
            )));
        }
        let Some(next) = backing_file(file)? else {
            return Ok(files);
        };
        let regular = fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_file());
        if !regular || !(layers.contains(&next) || next == base) {
            return Err(untrusted(format!("the backing file {}", next.display())));
        }
        if files.len() >= MAX_CHAIN || files.contains(&next) {
            return Err(untrusted(format!("a loop through {}", next.display())));
        }
        files.push(next);
    }
}

/// Whether a qcow2 v3 header sets the "external data file" incompatible feature (bit 2).
pub fn has_external_data_file(path: &Path) -> Result<bool, StorageError> {
    let file = fs::File::open(path).map_err(io_err("read", path))?;
    let mut header = [0u8; 80];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)
        .map_err(io_err("read", path))?;
    let version = u32::from_be_bytes(header[4..8].try_into().unwrap_or_default());
    let incompatible = u64::from_be_bytes(header[72..80].try_into().unwrap_or_default());
    Ok(version >= 3 && incompatible & (1 << 2) != 0)
}

/// How many frozen layers sit between `top` and its image base.
pub fn depth(layers: &Layers, top: &Path) -> Result<usize, StorageError> {
    Ok(chain(top)?.iter().filter(|f| layers.contains(f)).count())
}

fn not_qcow2(path: &Path) -> StorageError {
    StorageError::ToolFailed {
        tool: "qcow2 reader".into(),
        tail: format!("{} is not a qcow2 image nook made", path.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qcow2(path: &Path, backing: Option<&Path>) {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            cmd.args(["-u", "-F", "qcow2", "-b"]).arg(b);
        }
        assert!(cmd.arg(path).arg("64M").status().unwrap().success());
    }

    #[test]
    fn reads_chains_and_collects_only_unreachable_layers() {
        crate::require_tool("qemu-img", "qemu-utils");
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qcow2(&base, None);
        let layers = Layers::new(dir.path().join("layers"));
        let vm_a = dir.path().join("a.qcow2");
        qcow2(&vm_a, Some(&base));
        assert_eq!(backing_file(&vm_a).unwrap().unwrap(), base);
        assert_eq!(backing_file(&base).unwrap(), None);

        // Clone a into b: a's top is frozen, both get overlays over it.
        let l1 = layers.freeze(&vm_a).unwrap();
        let next = dir.path().join("a.next.qcow2");
        qcow2(&next, Some(&l1));
        fs::rename(&next, &vm_a).unwrap();
        let vm_b = dir.path().join("b.qcow2");
        qcow2(&vm_b, Some(&l1));
        assert_eq!(
            chain(&vm_b).unwrap(),
            [vm_b.clone(), l1.clone(), base.clone()]
        );
        assert_eq!(depth(&layers, &vm_a).unwrap(), 1);

        // A stray layer nobody uses goes; the shared one stays while either VM exists.
        let stray = layers.freeze(&base).unwrap();
        let tops = [vm_a.clone(), vm_b.clone()];
        assert_eq!(layers.collect(&tops).unwrap(), [stray]);
        fs::remove_file(&vm_a).unwrap();
        assert!(layers.collect(&tops).unwrap().is_empty());
        assert!(l1.exists());
        fs::remove_file(&vm_b).unwrap();
        assert_eq!(layers.collect(&tops).unwrap(), [l1]);
        assert!(base.exists());

        // Not a qcow2 file: a clear error.
        let junk = dir.path().join("junk");
        fs::write(&junk, b"hello world, not an image").unwrap();
        assert!(backing_file(&junk).is_err());
    }

    #[test]
    fn a_chain_naming_a_host_file_or_a_data_file_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let layers = Layers::new(dir.path().join("layers"));
        let base = dir.path().join("base.qcow2");
        qcow2(&base, None);
        let layer = layers.freeze(&base).unwrap();
        let top = dir.path().join("top.qcow2");
        qcow2(&top, Some(&layer));
        assert_eq!(
            trusted_chain(&top, &layers, &base).unwrap(),
            vec![top.clone(), layer.clone()]
        );
        // A header rewritten to name a file outside the layers.
        let stranger = dir.path().join("stranger.qcow2");
        qcow2(&stranger, None);
        qcow2(&top, Some(&stranger));
        let err = trusted_chain(&top, &layers, &base).unwrap_err();
        assert!(err.to_string().contains("stranger.qcow2"), "{err}");
        // A top with an external data file.
        let data = dir.path().join("top.data");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", data.display()))
            .arg(&top)
            .arg("64M")
            .status()
            .unwrap();
        assert!(made.success());
        let err = trusted_chain(&top, &layers, &base).unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
    }
}
