//! The `tiny` image: Debian's kernel and a busybox root filesystem run by busybox init, which
//! respawns the agent. Boots in a few seconds in 96 MiB; for tests and dense fleets.

use std::path::Path;
use std::process::Command;

use super::{Ctx, RecipeOutput, mkdir, symlink, write_file};
use crate::{StorageError, cmd, debs, initrd};

const ROOTFS_BYTES: u64 = 512 << 20;

const INITTAB: &str = "\
# busybox init for the nook tiny image
::sysinit:/etc/init.d/rcS
::respawn:@AGENT@
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
";

const RCS: &str = r#"#!/bin/sh
# Early boot of the nook tiny image (run once by busybox init).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
grep -q '^[^ ]* /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
grep -q ' /dev/pts ' /proc/mounts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
hostname -F /etc/hostname
ip link set lo up
echo "nook-tiny: rcS done"
"#;

const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
nook:x:1000:1000:nook:/home/nook:/bin/sh
";
const SHADOW: &str = "\
root:*:19000:0:99999:7:::
nook:*:19000:0:99999:7:::
";
const GROUP: &str = "\
root:x:0:
tty:x:5:
nook:x:1000:
";
const PROFILE: &str = "\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\\u@\\h:\\w\\$ '
";

pub(crate) fn build(ctx: &mut Ctx<'_>) -> Result<RecipeOutput, StorageError> {
    let debs_dir = ctx.cache.join("debs");
    ctx.progress.step("downloading the kernel");
    let meta = debs::fetch("linux-image-amd64", &debs_dir, &mut |n| {
        ctx.progress.detail(n)
    })?;
    let depends = debs::field(&meta, "Depends")?;
    let real = debs::first_dependency(&depends)
        .ok_or_else(|| {
            StorageError::Build(format!(
                "linux-image-amd64 depends on nothing ('{depends}')"
            ))
        })?
        .to_string();
    let kernel_deb = debs::fetch(&real, &debs_dir, &mut |n| ctx.progress.detail(n))?;
    ctx.progress.step("downloading busybox");
    let busybox_deb = debs::fetch("busybox-static", &debs_dir, &mut |n| ctx.progress.detail(n))?;

    ctx.progress.step("unpacking packages");
    let kernel_tree = ctx.work.join("kernel");
    debs::extract(&kernel_deb, &kernel_tree)?;
    let busybox_tree = ctx.work.join("busybox");
    debs::extract(&busybox_deb, &busybox_tree)?;
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| busybox_tree.join(p))
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .ok_or_else(|| StorageError::Build("busybox-static holds no busybox binary".into()))?;

    let kernel = super::find_kernel(&kernel_tree)?;
    super::boot_files(ctx, &kernel, &busybox)?;

    ctx.progress.step("assembling the root tree");
    let tree = ctx.work.join("rootfs");
    assemble(&tree, &busybox)?;
    super::root_disk(ctx, &tree, ROOTFS_BYTES)?;

    Ok(RecipeOutput {
        kernel_version: kernel.version,
        init: "/sbin/init",
        default_memory_mib: 256,
        default_disk_bytes: 1 << 30,
    })
}

fn assemble(tree: &Path, busybox: &Path) -> Result<(), StorageError> {
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/lib/nook",
        "etc/init.d",
        "dev",
        "proc",
        "sys",
        "run",
        "mnt",
        "var/log",
        "lib",
        "home",
    ] {
        mkdir(&tree.join(dir), 0o755)?;
    }
    mkdir(&tree.join("tmp"), 0o1777)?;
    mkdir(&tree.join("root"), 0o700)?;
    let home = tree.join("home/nook");
    mkdir(&home, 0o755)?;
    std::os::unix::fs::chown(&home, Some(1000), Some(1000))
        .map_err(crate::error::io_err("chown", &home))?;

    let bin = tree.join("bin/busybox");
    std::fs::copy(busybox, &bin).map_err(crate::error::io_err("write", &bin))?;
    let list = cmd::output(
        Command::new(busybox).arg("--list-full"),
        "busybox-static",
        tree,
    )?;
    for applet in String::from_utf8_lossy(&list).lines().map(str::trim) {
        if applet.is_empty() || applet.contains("..") || applet == "bin/busybox" {
            continue;
        }
        symlink("/bin/busybox", &tree.join(applet))?;
    }

    let etc = tree.join("etc");
    write_file(
        &etc.join("inittab"),
        &INITTAB.replace("@AGENT@", initrd::AGENT_PATH),
        0o644,
    )?;
    write_file(&etc.join("init.d/rcS"), RCS, 0o755)?;
    write_file(&etc.join("passwd"), PASSWD, 0o644)?;
    write_file(&etc.join("shadow"), SHADOW, 0o600)?;
    write_file(&etc.join("group"), GROUP, 0o644)?;
    write_file(&etc.join("hostname"), "nook\n", 0o644)?;
    write_file(
        &etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
        0o644,
    )?;
    write_file(&etc.join("profile"), PROFILE, 0o644)?;
    write_file(&etc.join("fstab"), "/dev/vda / ext4 defaults 0 1\n", 0o644)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inittab_respawns_the_agent() {
        let tab = INITTAB.replace("@AGENT@", initrd::AGENT_PATH);
        assert!(tab.contains("::respawn:/usr/lib/nook/nook-agent\n"));
        assert!(tab.contains("::sysinit:/etc/init.d/rcS\n"));
    }
}
