//! The kernel side of an image: the uncompressed `vmlinux` taken out of a Debian `vmlinuz`, and
//! the few modules the initramfs must load before it can see the root disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::StorageError;
use crate::cmd;
use crate::error::io_err;

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What the initramfs loads, in this order (each after its dependencies). The Debian kernel
/// builds all of these as modules; `crc32c_generic` is only a soft dependency of ext4, so it is
/// named explicitly.
pub(crate) const BOOT_MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "jbd2",
    "mbcache",
    "crc16",
    "ext4",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_balloon",
    "virtio_rng",
];

/// Without these the guest cannot mount its root disk, so their absence fails the build.
const CRITICAL_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "ext4"];

/// Offsets of every xz stream magic in `data`.
pub(crate) fn xz_offsets(data: &[u8]) -> Vec<usize> {
    data.windows(XZ_MAGIC.len())
        .enumerate()
        .filter(|(_, w)| *w == XZ_MAGIC)
        .map(|(i, _)| i)
        .collect()
}

/// Writes the ELF kernel inside the bzImage `vmlinuz` to `out`.
pub(crate) fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<(), StorageError> {
    let data = fs::read(vmlinuz).map_err(io_err("read", vmlinuz))?;
    if data.starts_with(ELF_MAGIC) {
        return fs::write(out, &data).map_err(io_err("write", out));
    }
    for offset in xz_offsets(&data) {
        if xz_decompress_to(&data[offset..], out)? && file_starts_with(out, ELF_MAGIC)? {
            return Ok(());
        }
    }
    let _ = fs::remove_file(out);
    Err(StorageError::Build(format!(
        "{} holds no xz-compressed ELF kernel",
        vmlinuz.display()
    )))
}

fn file_starts_with(path: &Path, magic: &[u8]) -> Result<bool, StorageError> {
    use std::io::Read;
    let mut head = vec![0u8; magic.len()];
    let mut f = File::open(path).map_err(io_err("read", path))?;
    Ok(f.read_exact(&mut head).is_ok() && head == magic)
}

/// Decompresses the first xz stream of `input` into `out`. Ok(false) when `input` is not a
/// valid stream (a false magic match).
fn xz_decompress_to(input: &[u8], out: &Path) -> Result<bool, StorageError> {
    let file = File::create(out).map_err(io_err("create", out))?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::ToolMissing {
                tool: "xz".into(),
                package: "xz-utils".into(),
            },
            _ => StorageError::Io {
                action: "run",
                path: "xz".into(),
                source: e,
            },
        })?;
    let stdin = child.stdin.take();
    let result = std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(mut stdin) = stdin {
                // xz stops reading after the stream; the broken pipe that follows is expected.
                let _ = stdin.write_all(input);
            }
        });
        child.wait_with_output()
    });
    let output = result.map_err(io_err("run", Path::new("xz")))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No space left on device") {
        return Err(StorageError::NoSpace {
            path: crate::error::containing_dir(out),
        });
    }
    Ok(output.status.success())
}

/// Normalises a module file name or a `depends=` entry to the kernel's module name.
pub(crate) fn module_name(file_name: &str) -> String {
    let stem = file_name
        .strip_suffix(".ko")
        .or_else(|| file_name.strip_suffix(".ko.xz"))
        .or_else(|| file_name.strip_suffix(".ko.zst"))
        .or_else(|| file_name.strip_suffix(".ko.gz"))
        .unwrap_or(file_name);
    stem.replace('-', "_")
}

/// The `depends=` list from the `.modinfo` section of a 64-bit little-endian ELF module, or
/// `None` when `elf` is not such a file or has no `.modinfo`.
pub(crate) fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?)).ok()
    };
    if !elf.starts_with(ELF_MAGIC) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let hdr = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(hdr)?;
        let offset = u64_at(hdr + 24)?;
        let size = u64_at(hdr + 32)?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    let modinfo = (0..shnum).find_map(|i| {
        let (name, data) = section(i)?;
        let name = names.get(name as usize..)?;
        let end = name.iter().position(|&b| b == 0)?;
        (&name[..end] == b".modinfo").then_some(data)
    })?;
    let depends = modinfo
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .unwrap_or(b"");
    Some(
        String::from_utf8_lossy(depends)
            .split(',')
            .filter(|d| !d.is_empty())
            .map(module_name)
            .collect(),
    )
}

/// Orders `wanted` so every module follows its dependencies. Built-in modules are skipped;
/// modules that are neither known nor built in are returned as missing.
pub(crate) fn order_modules(
    wanted: &[&str],
    deps: &BTreeMap<String, Vec<String>>,
    builtin: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    fn visit(
        name: &str,
        deps: &BTreeMap<String, Vec<String>>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        missing: &mut Vec<String>,
    ) {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return;
        }
        let Some(own) = deps.get(name) else {
            missing.push(name.to_string());
            return;
        };
        for dep in own {
            visit(dep, deps, builtin, seen, order, missing);
        }
        order.push(name.to_string());
    }
    let (mut order, mut missing, mut seen) = (Vec::new(), Vec::new(), BTreeSet::new());
    for name in wanted {
        visit(
            &module_name(name),
            deps,
            builtin,
            &mut seen,
            &mut order,
            &mut missing,
        );
    }
    (order, missing)
}

/// A module ready to go into an initramfs: its name and uncompressed bytes.
pub(crate) struct BootModule {
    pub name: String,
    pub data: Vec<u8>,
}

/// Collects the boot modules and their dependencies from `modules_dir` (`/lib/modules/<ver>`),
/// in load order. Missing non-critical modules are reported through `note`.
pub(crate) fn boot_modules(
    modules_dir: &Path,
    version: &str,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<BootModule>, StorageError> {
    let mut files = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut files)?;
    let builtin: BTreeSet<String> = match fs::read_to_string(modules_dir.join("modules.builtin")) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .map(module_name)
            .collect(),
        Err(_) => BTreeSet::new(),
    };
    let mut deps = BTreeMap::new();
    let mut data = BTreeMap::new();
    let mut queue: Vec<String> = BOOT_MODULES.iter().map(|m| module_name(m)).collect();
    while let Some(name) = queue.pop() {
        if deps.contains_key(&name) || builtin.contains(&name) {
            continue;
        }
        let Some(path) = files.get(&name) else {
            continue;
        };
        let bytes = read_module(path)?;
        let own = modinfo_depends(&bytes).ok_or_else(|| {
            StorageError::Build(format!("{} is not a kernel module", path.display()))
        })?;
        queue.extend(own.iter().cloned());
        deps.insert(name.clone(), own);
        data.insert(name, bytes);
    }
    let (order, missing) = order_modules(BOOT_MODULES, &deps, &builtin);
    for name in missing {
        if CRITICAL_MODULES.contains(&name.as_str()) {
            return Err(StorageError::ModuleMissing {
                name,
                version: version.to_string(),
            });
        }
        note(&format!(
            "module {name} is not in kernel {version}; skipped"
        ));
    }
    Ok(order
        .into_iter()
        .filter_map(|name| data.remove(&name).map(|data| BootModule { name, data }))
        .collect())
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<(), StorageError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("read", &path))?;
        if kind.is_dir() {
            index_modules(&path, out)?;
        } else if let Some(file) = path.file_name().and_then(|f| f.to_str())
            && file.contains(".ko")
        {
            out.insert(module_name(file), path);
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>, StorageError> {
    let name = path.to_string_lossy();
    let (tool, package) = if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        return fs::read(path).map_err(io_err("read", path));
    };
    cmd::output(
        Command::new(tool).arg("-dc").arg(path),
        package,
        Path::new("/tmp"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE file with a null section, `.shstrtab` and `.modinfo`.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_depends_from_modinfo() {
        let elf = fake_module(b"license=GPL\0depends=jbd2,mbcache,crc16\0vermagic=6.1\0");
        assert_eq!(modinfo_depends(&elf).unwrap(), ["jbd2", "mbcache", "crc16"]);
        let elf = fake_module(b"license=GPL\0depends=\0");
        assert!(modinfo_depends(&elf).unwrap().is_empty());
        let elf = fake_module(b"depends=virtio-ring\0");
        assert_eq!(modinfo_depends(&elf).unwrap(), ["virtio_ring"]);
        assert!(modinfo_depends(b"not an elf").is_none());
        assert!(modinfo_depends(&elf[..70]).is_none());
    }

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(module_name("virtio-blk.ko"), "virtio_blk");
        assert_eq!(module_name("ext4.ko.xz"), "ext4");
        assert_eq!(module_name("crc32c_generic.ko.zst"), "crc32c_generic");
    }

    #[test]
    fn modules_follow_their_dependencies() {
        let deps: BTreeMap<String, Vec<String>> = [
            ("ext4", vec!["jbd2", "mbcache", "crc16"]),
            ("jbd2", vec![]),
            ("mbcache", vec![]),
            ("crc16", vec![]),
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
            ("virtio", vec![]),
            ("virtio_ring", vec![]),
            ("virtio_net", vec!["net_failover"]),
            ("net_failover", vec!["failover"]),
            ("failover", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let builtin: BTreeSet<String> = ["crc16".to_string()].into();
        let (order, missing) = order_modules(
            &["ext4", "virtio_net", "virtio_blk", "nope"],
            &deps,
            &builtin,
        );
        assert_eq!(
            order,
            [
                "jbd2",
                "mbcache",
                "ext4",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio",
                "virtio_ring",
                "virtio_blk"
            ]
        );
        assert_eq!(missing, ["nope"]);
    }

    #[test]
    fn finds_every_xz_magic() {
        let mut data = vec![0u8; 10];
        data.extend_from_slice(XZ_MAGIC);
        data.extend_from_slice(b"junk");
        data.extend_from_slice(XZ_MAGIC);
        assert_eq!(xz_offsets(&data), [10, 20]);
        assert!(xz_offsets(b"\xfd7zX").is_empty());
    }

    #[test]
    fn extracts_an_xz_payload_after_a_false_magic() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("payload");
        fs::write(&payload, b"\x7fELF and the rest of a kernel").unwrap();
        crate::require_tool("xz", "xz-utils");
        let status = Command::new("xz").arg("-k").arg(&payload).status().unwrap();
        assert!(status.success());
        let mut bz = b"setup code".to_vec();
        bz.extend_from_slice(XZ_MAGIC); // a false match before the real stream
        bz.extend_from_slice(b"garbage");
        bz.extend_from_slice(&fs::read(dir.path().join("payload.xz")).unwrap());
        bz.extend_from_slice(b"\x00\x01trailer");
        let vmlinuz = dir.path().join("vmlinuz");
        fs::write(&vmlinuz, &bz).unwrap();
        let out = dir.path().join("vmlinux");
        extract_vmlinux(&vmlinuz, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"\x7fELF and the rest of a kernel");

        fs::write(&vmlinuz, b"no kernel here").unwrap();
        assert!(extract_vmlinux(&vmlinuz, &out).is_err());
        assert!(!out.exists());
    }
}
