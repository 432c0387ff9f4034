//! Publishing images: one build at a time per kind (flock), built in a scratch directory under
//! the root, published by renaming it into place and atomically swapping the `ROOT/<kind>`
//! symlink.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::recipe::{self, Ctx, INITRD_FILE, KERNEL_FILE, Progress, ROOTFS_FILE};
use crate::{BuildEvent, Image, ImageKind, StorageError, disk};

const MANIFEST_FILE: &str = "manifest.json";
const CACHE_DIR: &str = "cache";
const BUILD_PREFIX: &str = ".build-";

/// `manifest.json` in a published image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub recipe_version: u32,
    pub kind: ImageKind,
    pub kernel_version: String,
    /// RFC 3339, UTC.
    pub built_at: String,
    pub init: String,
    pub rootfs_virtual_bytes: u64,
    pub default_memory_mib: u32,
    pub default_disk_bytes: u64,
}

/// The images under one root directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The published image of `kind`; `NotBuilt` if there is none.
    pub fn image(&self, kind: ImageKind) -> Result<Image, StorageError> {
        let link = self.root.join(kind.name());
        let dir = match fs::canonicalize(&link) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotBuilt(kind));
            }
            Err(e) => return Err(io_err("read", &link)(e)),
        };
        let image = Self::open_at(kind, &dir)?;
        if image.recipe_version < recipe::RECIPE_VERSION {
            return Err(StorageError::Outdated(kind));
        }
        Ok(image)
    }

    /// The image of `kind` published in `dir`, current or not: VMs boot the image they were
    /// made from, even after a rebuild published a newer one.
    pub fn open_at(kind: ImageKind, dir: &Path) -> Result<Image, StorageError> {
        let dir = dir.to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match fs::read(&manifest_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotBuilt(kind));
            }
            Err(e) => return Err(io_err("read", &manifest_path)(e)),
        };
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|source| StorageError::BadManifest {
                path: manifest_path.clone(),
                source,
            })?;
        let image = Image {
            recipe_version: m.recipe_version,
            kind,
            rootfs: dir.join(ROOTFS_FILE),
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            dir,
            init: m.init,
            kernel_version: m.kernel_version,
            rootfs_virtual_bytes: m.rootfs_virtual_bytes,
            default_memory_mib: m.default_memory_mib,
            default_disk_bytes: m.default_disk_bytes,
        };
        for file in [&image.rootfs, &image.kernel, &image.initrd] {
            if !file.is_file() {
                return Err(StorageError::NotBuilt(kind));
            }
        }
        Ok(image)
    }

    /// The published images, in [`ImageKind::ALL`] order.
    pub fn list(&self) -> Vec<Image> {
        ImageKind::ALL
            .into_iter()
            .filter_map(|kind| match self.image(kind) {
                Ok(image) => Some(image),
                Err(StorageError::NotBuilt(_)) => None,
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "image unusable");
                    None
                }
            })
            .collect()
    }

    /// Builds an image of `kind` and publishes it, replacing the current one (whose files stay
    /// in place for the disks that use them). Blocks for seconds (tiny) to many minutes
    /// (default). Fails with `BuildInProgress` if another build of `kind` holds the lock.
    pub fn build(
        &self,
        kind: ImageKind,
        progress: &mut dyn FnMut(&BuildEvent),
    ) -> Result<Image, StorageError> {
        fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))?;
        let root = fs::canonicalize(&self.root).map_err(io_err("read", &self.root))?;
        let _lock = lock(&root, kind)?;
        remove_stale_builds(&root, kind);

        let work = BuildDir::new(&root, kind)?;
        let out = work.path().join("out");
        fs::create_dir(&out).map_err(io_err("create", &out))?;
        let mut ctx = Ctx {
            work: work.path().to_path_buf(),
            out: out.clone(),
            cache: root.join(CACHE_DIR),
            progress: Progress::new(progress),
        };
        let made = match kind {
            ImageKind::Tiny => recipe::tiny::build(&mut ctx),
            ImageKind::Default => recipe::default::build(&mut ctx),
        }?;

        ctx.progress.step("publishing");
        let manifest = Manifest {
            recipe_version: recipe::RECIPE_VERSION,
            kind,
            kernel_version: made.kernel_version,
            built_at: now_rfc3339(),
            init: made.init.to_string(),
            rootfs_virtual_bytes: disk::virtual_size(&out.join(ROOTFS_FILE))?,
            default_memory_mib: made.default_memory_mib,
            default_disk_bytes: made.default_disk_bytes,
        };
        let manifest_path = out.join(MANIFEST_FILE);
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| StorageError::BadManifest {
                path: manifest_path.clone(),
                source,
            })?;
        fs::write(&manifest_path, json).map_err(io_err("write", &manifest_path))?;
        for file in [ROOTFS_FILE, KERNEL_FILE, INITRD_FILE, MANIFEST_FILE] {
            sync_path(&out.join(file))?;
        }
        sync_path(&out)?;

        let published = unique_dir(&root, kind);
        fs::rename(&out, &published).map_err(io_err("publish", &published))?;
        let name = published
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp_link = root.join(format!(".{kind}.link"));
        let _ = fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&name, &tmp_link).map_err(io_err("create", &tmp_link))?;
        let link = root.join(kind.name());
        fs::rename(&tmp_link, &link).map_err(io_err("publish", &link))?;
        sync_path(&root)?;
        drop(work);
        tracing::info!(%kind, dir = %published.display(), "image published");
        self.image(kind)
    }
}

fn lock(root: &Path, kind: ImageKind) -> Result<Flock<File>, StorageError> {
    let path = root.join(format!(".{kind}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("create", &path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => StorageError::BuildInProgress(kind),
        e => io_err("lock", &path)(e.into()),
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `ROOT/<kind>-YYYYMMDDTHHMMSSZ`, suffixed if a build in the same second exists.
fn unique_dir(root: &Path, kind: ImageKind) -> PathBuf {
    let t = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{kind}-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let mut candidate = root.join(&stamp);
    let mut n = 2;
    while candidate.symlink_metadata().is_ok() {
        candidate = root.join(format!("{stamp}-{n}"));
        n += 1;
    }
    candidate
}

fn sync_path(path: &Path) -> Result<(), StorageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
}

/// Scratch space for one build, under the root (so publishing is a rename on one
/// filesystem). Dropping it unmounts anything a tool left mounted inside, then deletes it.
struct BuildDir {
    path: PathBuf,
}

impl BuildDir {
    fn new(root: &Path, kind: ImageKind) -> Result<Self, StorageError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{BUILD_PREFIX}{kind}-"))
            .tempdir_in(root)
            .map_err(io_err("create a directory in", root))?;
        Ok(Self { path: dir.keep() })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        remove_build_dir(&self.path);
    }
}

/// Removes leftovers of builds of `kind` that were killed (we hold the lock, so none runs).
fn remove_stale_builds(root: &Path, kind: ImageKind) {
    let prefix = format!("{BUILD_PREFIX}{kind}-");
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            tracing::info!(dir = %entry.path().display(), "removing a stale build directory");
            remove_build_dir(&entry.path());
        }
    }
}

fn remove_build_dir(path: &Path) {
    if !unmount_under(path) {
        tracing::error!(dir = %path.display(), "mounts remain inside a build directory; not deleting it");
        return;
    }
    if let Err(e) = fs::remove_dir_all(path) {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove a build directory");
    }
}

/// Mount points strictly under `dir`, deepest first, from `/proc/self/mountinfo` text.
pub(crate) fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount under `dir`. True when none remain.
fn unmount_under(dir: &Path) -> bool {
    let read = || fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mount in mounts_under(&read(), dir) {
        if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %mount.display(), error = %e, "cannot unmount");
        }
    }
    mounts_under(&read(), dir).is_empty()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_under_a_build_dir_deepest_first() {
        let info = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
30 22 0:5 / /img/.build-default-x/tree/proc rw - proc proc rw
31 22 0:6 / /img/.build-default-x/tree/dev/pts rw - devpts devpts rw
32 22 0:7 / /img/.build-default-x/tree/dev rw - tmpfs nodev rw
33 22 0:8 / /img/.build-default-xy rw - tmpfs t rw
34 22 0:9 / /img/.build-default-x/with\\040space rw - tmpfs t rw
";
        let dir = Path::new("/img/.build-default-x");
        let found = mounts_under(info, dir);
        assert_eq!(found[0], Path::new("/img/.build-default-x/tree/dev/pts"));
        assert_eq!(found.len(), 4);
        assert!(found.contains(&PathBuf::from("/img/.build-default-x/with space")));
        assert!(!found.contains(&PathBuf::from("/img/.build-default-xy")));
    }

    #[test]
    fn manifest_round_trips() {
        let m = Manifest {
            recipe_version: recipe::RECIPE_VERSION,
            kind: ImageKind::Tiny,
            kernel_version: "6.1.0-41-amd64".into(),
            built_at: "2026-11-28T14:00:00Z".into(),
            init: "/sbin/init".into(),
            rootfs_virtual_bytes: 512 << 20,
            default_memory_mib: 256,
            default_disk_bytes: 1 << 30,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"kind\":\"tiny\""));
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }

    /// Publishes a hand-made image directory the way `build` does and reads it back.
    #[test]
    fn reads_a_published_image_and_reports_missing_ones() {
        let root = tempfile::tempdir().unwrap();
        let store = ImageStore::new(root.path());
        assert!(matches!(
            store.image(ImageKind::Tiny),
            Err(StorageError::NotBuilt(ImageKind::Tiny))
        ));
        assert!(store.list().is_empty());

        let dir = root.path().join("tiny-20261128T140000Z");
        fs::create_dir(&dir).unwrap();
        for f in [ROOTFS_FILE, KERNEL_FILE, INITRD_FILE] {
            fs::write(dir.join(f), b"x").unwrap();
        }
        let m = Manifest {
            recipe_version: recipe::RECIPE_VERSION,
            kind: ImageKind::Tiny,
            kernel_version: "6.1.0-41-amd64".into(),
            built_at: now_rfc3339(),
            init: "/sbin/init".into(),
            rootfs_virtual_bytes: 512 << 20,
            default_memory_mib: 256,
            default_disk_bytes: 1 << 30,
        };
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        std::os::unix::fs::symlink("tiny-20261128T140000Z", root.path().join("tiny")).unwrap();
        let image = store.image(ImageKind::Tiny).unwrap();
        assert_eq!(image.dir, fs::canonicalize(&dir).unwrap());
        assert!(
            image.rootfs.is_absolute()
                && image.rootfs.ends_with("tiny-20261128T140000Z/rootfs.qcow2")
        );
        assert_eq!(image.init, "/sbin/init");
        assert_eq!(store.list().len(), 1);

        fs::write(dir.join(MANIFEST_FILE), b"{").unwrap();
        assert!(matches!(
            store.image(ImageKind::Tiny),
            Err(StorageError::BadManifest { .. })
        ));
    }

    #[test]
    fn a_second_build_of_the_same_kind_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let _held = lock(root.path(), ImageKind::Tiny).unwrap();
        let store = ImageStore::new(root.path());
        let err = store.build(ImageKind::Tiny, &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, StorageError::BuildInProgress(ImageKind::Tiny)),
            "{err}"
        );
        // Another kind is not blocked by it.
        assert!(lock(root.path(), ImageKind::Default).is_ok());
    }

    #[test]
    fn unique_dirs_do_not_collide() {
        let root = tempfile::tempdir().unwrap();
        let a = unique_dir(root.path(), ImageKind::Tiny);
        fs::create_dir(&a).unwrap();
        let b = unique_dir(root.path(), ImageKind::Tiny);
        assert_ne!(a, b);
    }
}
