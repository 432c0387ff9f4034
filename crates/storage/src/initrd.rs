//! The initramfs every image boots through: busybox, the boot modules and an `/init` script
//! that mounts the root disk, installs the agent and hands over to the image's init.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::error::io_err;
use crate::kernel::BootModule;
use crate::{Image, StorageError};

/// Where the initramfs expects the agent, and where `/init` installs it on the root disk.
pub(crate) const AGENT_IN_INITRD: &str = "nook-agent";
pub const AGENT_PATH: &str = "/usr/lib/nook/nook-agent";

/// Initramfs files are padded to a multiple of this. QEMU's microvm (7.2 to 10.0 at least)
/// loads the initrd so that it ends in the last page below the top of low RAM, where the
/// firmware has already put the ACPI tables; an initrd ending less than a page below the top
/// overwrites them and the guest hangs at "ACPI: Core revision". A page-multiple size makes it
/// end exactly one page below the top, clear of the tables.
pub(crate) const PAGE: u64 = 4096;

/// Busybox applets `/init` uses; each becomes a symlink in `/bin`.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "cp",
    "chmod",
    "echo",
    "insmod",
    "mkdir",
    "mount",
    "mv",
    "poweroff",
    "sleep",
    "switch_root",
    "sync",
    "umount",
];

const INIT_TEMPLATE: &str = r#"#!/bin/sh
# nook initramfs: load the virtio and ext4 modules, mount the root disk read-write, install the
# agent shipped in this initramfs (if any) and hand over to the image's init.
export PATH=/bin

fail() {
	echo "nook-initramfs: $*"
	echo "nook-initramfs: powering off"
	sync
	poweroff -f
	exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

root=/dev/vda
init=/sbin/init
for word in $(cat /proc/cmdline); do
	case "$word" in
	root=*) root="${word#root=}" ;;
	nook.init=*) init="${word#nook.init=}" ;;
	esac
done

for m in @MODULES@; do
	out=$(insmod "/lib/modules/$m.ko" 2>&1) || case "$out" in
	*"File exists"*) ;;
	*) echo "nook-initramfs: cannot load module $m: $out" ;;
	esac
done

tries=0
while [ ! -b "$root" ]; do
	tries=$((tries + 1))
	[ "$tries" -gt 100 ] && fail "root disk $root did not appear within 10 s"
	sleep 0.1
done
mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root as ext4"

if [ -f /@AGENT@ ]; then
	{ mkdir -p "/newroot@AGENT_DIR@" &&
		cp /@AGENT@ "/newroot@AGENT_DIR@/.nook-agent.new" &&
		chmod 755 "/newroot@AGENT_DIR@/.nook-agent.new" &&
		mv -f "/newroot@AGENT_DIR@/.nook-agent.new" "/newroot@AGENT_PATH@"; } ||
		fail "cannot install the agent at @AGENT_PATH@"
fi

if [ ! -e "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
	fail "init $init is not on the root disk"
fi
for fs in dev proc sys; do
	mount --move "/$fs" "/newroot/$fs" 2>/dev/null || umount "/$fs"
done
exec switch_root /newroot "$init"
"#;

/// Checks that `path` is a guest agent that can run in any image: a static x86-64 ELF
/// executable. A workspace `cargo build` makes a dynamically linked one of the same name;
/// booted, it fails with "No such file or directory" on the guest's console and the VM never
/// becomes ready, so this is checked before anything boots.
pub fn check_agent(path: &Path) -> Result<(), StorageError> {
    let bytes = fs::read(path).map_err(|e| StorageError::AgentUnusable {
        path: path.to_path_buf(),
        why: format!("cannot be read ({e})"),
    })?;
    check_agent_bytes(path, &bytes)
}

fn check_agent_bytes(path: &Path, elf: &[u8]) -> Result<(), StorageError> {
    let unusable = |why: &str| StorageError::AgentUnusable {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit, little-endian ELF.
    if elf.get(..6) != Some(&b"\x7fELF\x02\x01"[..]) {
        return Err(unusable("is not a 64-bit ELF executable"));
    }
    if !matches!(u16_at(16), Some(ET_EXEC | ET_DYN)) {
        return Err(unusable("is not an executable"));
    }
    if u16_at(18) != Some(EM_X86_64) {
        return Err(unusable("is not built for x86-64"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err(unusable("is a truncated ELF file"));
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(i * usize::from(phentsize)));
        match at.and_then(u32_at) {
            Some(PT_INTERP) => {
                return Err(unusable(
                    "is dynamically linked (it needs a loader and a C library that images lack)",
                ));
            }
            Some(_) => {}
            None => return Err(unusable("is a truncated ELF file")),
        }
    }
    Ok(())
}

/// The `/init` script for an initramfs that loads `modules` in order.
pub(crate) fn init_script(modules: &[&str]) -> String {
    let agent_dir = AGENT_PATH.rsplit_once('/').map_or("/", |(d, _)| d);
    INIT_TEMPLATE
        .replace("@MODULES@", &modules.join(" "))
        .replace("@AGENT_DIR@", agent_dir)
        .replace("@AGENT_PATH@", AGENT_PATH)
        .replace("@AGENT@", AGENT_IN_INITRD)
}

/// Writes the image's initramfs (uncompressed cpio newc) to `out`.
pub(crate) fn build_initrd(
    busybox: &Path,
    modules: &[BootModule],
    out: &Path,
) -> Result<(), StorageError> {
    let busybox_bytes = fs::read(busybox).map_err(io_err("read", busybox))?;
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    let file = File::create(out).map_err(io_err("create", out))?;
    let write = || -> io::Result<()> {
        let mut w = CpioWriter::new(BufWriter::new(file));
        for dir in ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"] {
            w.dir(dir, 0o755)?;
        }
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, &busybox_bytes)?;
        for applet in APPLETS {
            w.symlink(&format!("bin/{applet}"), "busybox")?;
        }
        for m in modules {
            w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.data)?;
        }
        w.file("init", 0o755, init_script(&names).as_bytes())?;
        w.finish_aligned(PAGE)?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    };
    write().map_err(io_err("write", out))
}

/// See the crate-level [`crate::initrd_with_agent`].
pub(crate) fn with_agent(
    image: &Image,
    agent_binary: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, StorageError> {
    let agent = fs::read(agent_binary).map_err(io_err("read the agent binary", agent_binary))?;
    check_agent_bytes(agent_binary, &agent)?;
    let initrd = fs::canonicalize(&image.initrd).map_err(io_err("read", &image.initrd))?;
    let meta = fs::metadata(&initrd).map_err(io_err("read", &initrd))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut key = Sha256::new();
    key.update(b"nook initrd+agent v2\0");
    key.update(initrd.as_os_str().as_encoded_bytes());
    key.update(b"\0");
    key.update(meta.len().to_le_bytes());
    key.update(mtime.as_nanos().to_le_bytes());
    key.update(Sha256::digest(&agent));
    let key = hex::encode(key.finalize());
    let path = cache_dir.join(format!("initrd-{}.cpio", &key[..32]));
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(cache_dir).map_err(io_err("create", cache_dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".initrd-")
        .tempfile_in(cache_dir)
        .map_err(io_err("create a file in", cache_dir))?;
    let mut src = File::open(&initrd).map_err(io_err("read", &initrd))?;
    let mut write = |tmp: &mut File| -> io::Result<()> {
        let offset = io::copy(&mut src, tmp)?;
        let mut w = CpioWriter::at_offset(BufWriter::new(tmp), offset);
        w.file(AGENT_IN_INITRD, 0o755, &agent)?;
        w.finish_aligned(PAGE)?.flush()
    };
    write(tmp.as_file_mut()).map_err(io_err("write", &path))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
        .map_err(io_err("chmod", tmp.path()))?;
    tmp.persist(&path)
        .map_err(|e| io_err("write", &path)(e.error))?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::check_agent;

    #[test]
    fn only_a_static_x86_64_executable_is_an_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Any system binary is dynamically linked: what a plain `cargo build` makes.
        let err = check_agent(std::path::Path::new("/bin/true")).expect_err("dynamic");
        let text = err.to_string();
        assert!(text.contains("dynamically linked"), "{text}");
        assert!(text.contains("scripts/build-agent"), "{text}");
        let script = dir.path().join("agent.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        let err = check_agent(&script).expect_err("script");
        assert!(err.to_string().contains("not a 64-bit ELF"), "{err}");
        let err = check_agent(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("cannot be read"), "{err}");
        // A static one, where the build put it (present after scripts/build-agent).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let agent = root.join("target/x86_64-unknown-linux-gnu/release/nook-guest-agent");
        if agent.is_file() {
            check_agent(&agent).expect("the static agent passes");
        }
    }

    use super::*;

    #[test]
    fn init_script_loads_modules_in_order_and_installs_agent() {
        let s = init_script(&["virtio_ring", "virtio", "ext4"]);
        assert!(s.contains("for m in virtio_ring virtio ext4; do"));
        assert!(s.contains("if [ -f /nook-agent ]; then"));
        assert!(s.contains("cp /nook-agent \"/newroot/usr/lib/nook/.nook-agent.new\""));
        assert!(s.contains(
            "mv -f \"/newroot/usr/lib/nook/.nook-agent.new\" \"/newroot/usr/lib/nook/nook-agent\""
        ));
        assert!(!s.contains('@'), "unreplaced placeholder in:\n{s}");
    }

    #[test]
    fn init_script_is_valid_shell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init");
        fs::write(&path, init_script(&["ext4"])).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}
