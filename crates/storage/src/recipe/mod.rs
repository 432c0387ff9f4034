//! The image recipes, and what they share: progress reporting, finding the kernel in a tree,
//! and producing `vmlinux`, `initrd.cpio` and `rootfs.qcow2` in the output directory.

pub(crate) mod default;
pub(crate) mod tiny;

use std::cmp::Ordering;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::io_err;
use crate::{BuildEvent, StorageError, initrd, kernel, rootfs};

/// Bumped whenever a recipe changes what it produces; recorded in each image's manifest.
/// 2: the initramfs loads virtio_balloon (memory reclaim) and virtio_rng (entropy at boot).
/// 3: default boots fast under TCG: no SSH host keys made in the guest (the host sends them),
///    the agent and sshd start first and get the CPU while booting, fewer units and generators,
///    no root in fstab.
pub(crate) const RECIPE_VERSION: u32 = 3;

pub(crate) const ROOTFS_FILE: &str = "rootfs.qcow2";
pub(crate) const KERNEL_FILE: &str = "vmlinux";
pub(crate) const INITRD_FILE: &str = "initrd.cpio";

/// Reports build steps and tool output to the caller and to tracing.
pub(crate) struct Progress<'a> {
    sink: &'a mut dyn FnMut(&BuildEvent),
    step: String,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(sink: &'a mut dyn FnMut(&BuildEvent)) -> Self {
        Self {
            sink,
            step: String::new(),
        }
    }

    pub(crate) fn step(&mut self, step: &str) {
        tracing::info!(step, "image build");
        self.step = step.to_string();
        (self.sink)(&BuildEvent {
            step: self.step.clone(),
            detail: None,
        });
    }

    pub(crate) fn detail(&mut self, detail: &str) {
        tracing::debug!(step = %self.step, detail);
        (self.sink)(&BuildEvent {
            step: self.step.clone(),
            detail: Some(detail.to_string()),
        });
    }
}

/// Where a recipe works: `work` is scratch space (deleted afterwards), `out` receives the
/// image files, `cache` persists across builds.
pub(crate) struct Ctx<'a> {
    pub work: PathBuf,
    pub out: PathBuf,
    pub cache: PathBuf,
    pub progress: Progress<'a>,
}

/// What a recipe reports about the image it made, besides the files in `out`.
pub(crate) struct RecipeOutput {
    pub kernel_version: String,
    pub init: &'static str,
    pub default_memory_mib: u32,
    pub default_disk_bytes: u64,
}

/// A kernel found in a root tree.
pub(crate) struct TreeKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Compares version strings with digit runs as numbers (`6.1.0-9` < `6.1.0-41`).
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, sa), (db, sb)) in ca.iter().zip(cb.iter()) {
        let ord = if *da && *db {
            let (ta, tb) = (sa.trim_start_matches('0'), sb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The newest kernel in `tree` that has both `/boot/vmlinuz-V` and `/lib/modules/V`.
pub(crate) fn find_kernel(tree: &Path) -> Result<TreeKernel, StorageError> {
    let mut found: Vec<TreeKernel> = Vec::new();
    for modules_root in [tree.join("usr/lib/modules"), tree.join("lib/modules")] {
        let Ok(entries) = fs::read_dir(&modules_root) else {
            continue;
        };
        for entry in entries.flatten() {
            let version = entry.file_name().to_string_lossy().into_owned();
            let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
            let modules = entry.path();
            let is_file = vmlinuz.symlink_metadata().is_ok_and(|m| m.is_file());
            if is_file
                && modules.join("kernel").is_dir()
                && !found.iter().any(|k| k.version == version)
            {
                found.push(TreeKernel {
                    version,
                    vmlinuz,
                    modules,
                });
            }
        }
    }
    found
        .into_iter()
        .max_by(|a, b| natural_cmp(&a.version, &b.version))
        .ok_or_else(|| {
            StorageError::Build(format!("no kernel with modules under {}", tree.display()))
        })
}

/// Extracts `out/vmlinux` from the kernel and writes `out/initrd.cpio` with `busybox` and the
/// kernel's boot modules.
pub(crate) fn boot_files(
    ctx: &mut Ctx<'_>,
    kernel: &TreeKernel,
    busybox: &Path,
) -> Result<(), StorageError> {
    ctx.progress.step("extracting the kernel");
    ctx.progress.detail(&kernel.vmlinuz.to_string_lossy());
    kernel::extract_vmlinux(&kernel.vmlinuz, &ctx.out.join(KERNEL_FILE))?;
    ctx.progress.step("building the initramfs");
    let modules = kernel::boot_modules(&kernel.modules, &kernel.version, &mut |n| {
        ctx.progress.detail(n)
    })?;
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    ctx.progress
        .detail(&format!("modules: {}", names.join(" ")));
    initrd::build_initrd(busybox, &modules, &ctx.out.join(INITRD_FILE))
}

/// Writes the tree into `out/rootfs.qcow2` as an ext4 filesystem of `size` bytes.
pub(crate) fn root_disk(ctx: &mut Ctx<'_>, tree: &Path, size: u64) -> Result<(), StorageError> {
    ctx.progress.step("making the root filesystem");
    rootfs::make_disk(tree, size, &ctx.work, &ctx.out.join(ROOTFS_FILE))
}

/// Writes `contents` to `path` (creating parent directories) with permission bits `mode`.
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), StorageError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    fs::write(path, contents).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Makes a symlink at `link` pointing to `target`, replacing whatever was there.
pub(crate) fn symlink(target: &str, link: &Path) -> Result<(), StorageError> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).map_err(io_err("replace", link))?;
    }
    std::os::unix::fs::symlink(target, link).map_err(io_err("create", link))
}

/// Makes a directory (and its parents) with permission bits `mode`.
pub(crate) fn mkdir(path: &Path, mode: u32) -> Result<(), StorageError> {
    fs::create_dir_all(path).map_err(io_err("create", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_naturally() {
        assert_eq!(
            natural_cmp("6.1.0-9-amd64", "6.1.0-41-amd64"),
            Ordering::Less
        );
        assert_eq!(natural_cmp("6.12.0", "6.1.0"), Ordering::Greater);
        assert_eq!(natural_cmp("6.1", "6.1"), Ordering::Equal);
        assert_eq!(natural_cmp("6.1", "6.1.1"), Ordering::Less);
        assert_eq!(natural_cmp("", "1"), Ordering::Less);
    }

    #[test]
    fn finds_the_newest_kernel_in_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        for v in ["6.1.0-9-amd64", "6.1.0-41-amd64", "6.1.0-50-amd64"] {
            fs::create_dir_all(tree.join(format!("usr/lib/modules/{v}/kernel"))).unwrap();
        }
        fs::create_dir_all(tree.join("boot")).unwrap();
        fs::write(tree.join("boot/vmlinuz-6.1.0-9-amd64"), b"k").unwrap();
        fs::write(tree.join("boot/vmlinuz-6.1.0-41-amd64"), b"k").unwrap();
        // 6.1.0-50 has modules but no vmlinuz: ignored.
        let k = find_kernel(tree).unwrap();
        assert_eq!(k.version, "6.1.0-41-amd64");
        assert!(find_kernel(&tree.join("boot")).is_err());
    }
}
