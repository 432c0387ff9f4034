//! The `default` image: Debian bookworm (debootstrap minbase) with systemd, OpenSSH, build
//! tools, python3 and chromium; the agent runs as a systemd service.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::{Ctx, RecipeOutput, mkdir, symlink, write_file};
use crate::error::io_err;
use crate::{StorageError, cmd, initrd};

const ROOTFS_BYTES: u64 = 8 << 30;
const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// What debootstrap installs: a bootable systemd base. debootstrap's resolver does not handle
/// virtual packages and alternatives, so everything else is installed with apt afterwards.
const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "procps",
];

/// Installed with `apt-get install --no-install-recommends` in the debootstrapped tree.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "procps",
    "openssh-server",
    "sudo",
    "git",
    "curl",
    "ca-certificates",
    "python3",
    "build-essential",
    "chromium",
    // Without recommends chromium gets no fonts, and screenshots show boxes for text.
    "fonts-liberation",
    "fonts-dejavu-core",
    "e2fsprogs",
    "linux-image-amd64",
    "busybox-static",
    "dbus-user-session",
    // Resolves the machine's own hostname whatever the agent sets it to (sudo needs that).
    "libnss-myhostname",
    "less",
    "nano",
];

// Booting fast under TCG (no KVM): a guest there runs maybe 20x slower than on hardware, and one
// vCPU does everything, so each unit that runs at boot delays the agent and sshd, which decide
// when the VM is ready. Measured with `bench/boot.sh` (create -> agent answers and sshd
// listens), one vCPU, on a 2-core host that was building Rust at the same time (load 3-5):
// 44-72 s before these changes, 12-17 s after (medians of 5: 14.1, 14.5, 15.1 s), as fast as
// a raw QEMU boot of the same image to the same marker. What each saved is noted where it is
// made; run-to-run noise on that host was +-2 s, so small savings were measured inside the
// guest instead (systemd's own timestamps).

/// The agent needs only what nook's initramfs already set up (the root filesystem mounted
/// read-write, /proc, /sys, devtmpfs on /dev) and `ip`, so it skips systemd's default
/// dependencies (basic.target, and before it all of sysinit) and starts with the first units
/// at boot: 4 s after systemd starts instead of 40 s. Its output still goes to the journal
/// (the unit waits for journald's socket, which systemd opens first).
const AGENT_UNIT: &str = "\
[Unit]
Description=nook guest agent
DefaultDependencies=no
# Restart forever: the agent is how the host reaches this machine.
StartLimitIntervalSec=0

[Service]
ExecStart=@AGENT@
Restart=always
RestartSec=1
Slice=nook.slice

[Install]
WantedBy=sysinit.target
";

/// The agent and sshd run in this slice, which gets ten times the CPU weight of init and
/// forty times that of the system services while booting (`StartupCPUWeight` lapses once boot
/// is done, and sessions that sshd opens move to user.slice). Boot-time work (udev's coldplug,
/// journald, logind, ...) otherwise shares the one vCPU evenly with the agent's set-up and
/// sshd's start. The slice alone took create to ready from 23.7 s to 18.8 s and sshd's start
/// from 2.5 to 0.5 s; holding back system.slice as well (below) took it from 23.7-29.4 s to
/// 17.1-22.1 s in interleaved runs on a host at load 6.
const NOOK_SLICE: &str = "\
[Unit]
Description=nook guest agent and sshd (first in line for the CPU while booting)
DefaultDependencies=no
Before=slices.target

[Slice]
StartupCPUWeight=1000
";

/// System services yield to init itself (which starts the units) and to nook.slice while
/// booting; after boot all slices weigh the same again.
const SYSTEM_SLICE_DROPIN: &str = "\
[Slice]
StartupCPUWeight=25
";

/// sshd without host keys of its own until the host sends them. The host makes the keys
/// (generating them in the guest under TCG took 21-35 s of CPU on the critical path, mostly
/// RSA) and the agent writes them and starts ssh.service after the host first identifies
/// itself; until then this condition skips the unit instead of letting it fail. On later boots
/// the keys exist and sshd starts with the first units at boot.
/// - `DefaultDependencies=no`: sshd needs no more than the agent does (its runtime directory
///   comes from `RuntimeDirectory=`, users are in /etc/passwd, PAM is only used at login), so
///   a start requested by the agent does not queue behind basic.target. The shutdown ordering
///   that default dependencies would give is kept.
/// - no `sshd -t` before the start: it loads sshd and every host key a second time (0.5-1 s
///   under TCG), only to repeat the check sshd makes itself (a reload still checks first).
const SSH_DROPIN: &str = "\
[Unit]
ConditionPathExists=/etc/ssh/ssh_host_ed25519_key
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStartPre=
Slice=nook.slice
";

/// `/tmp` is created at boot but not emptied. The VM is ready (agent and sshd) while systemd is
/// still booting, and Debian's `D /tmp` had `systemd-tmpfiles-setup` delete files a user wrote
/// there in the first seconds after `new`. `/tmp` is on the VM's persistent disk, so it now
/// keeps its files across reboots, as `/var/tmp` does.
const TMPFILES_TMP: &str = "d /tmp 1777 root root -\n";

/// No `/run/nologin` while booting. systemd's tmpfiles make it early in boot and
/// `systemd-user-sessions` removes it near the end; as the VM is ready before then, nook's own
/// logins to sshd (scp, sftp, `-L`) were refused in between. An empty file in /etc masks the
/// entry in /usr/lib/tmpfiles.d.
const TMPFILES_NOLOGIN: &str = "";

/// Units masked: nothing in a nook VM needs them, and each cost CPU at every boot.
const MASKED_UNITS: &[&str] = &[
    // Nobody logs in on the console.
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    // Dozens of guests must not all run apt on a timer.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    // Removes stale e2scrub snapshots of LVM volumes; there is no LVM. 24-38 s at every boot
    // (at idle CPU priority, but holding back multi-user.target).
    "e2scrub_reap.service",
    // Saves kernel crash records from EFI/ACPI pstore, which a VM does not have.
    "systemd-pstore.service",
    // Preloading these modules is for hardware a VM does not have (drm, efi_pstore) or for
    // features that load their module on first use anyway (/dev/fuse, /dev/loop-control and
    // /dev/mapper/control are static nodes that load it when opened; configfs is mounted by
    // whoever needs it). 2.3-4.9 s each under TCG, in parallel on one vCPU.
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@configfs.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "modprobe@dm_mod.service",
];

/// systemd runs every generator before it loads a single unit; masked here are the ones with
/// nothing to do in a nook VM (no encrypted, verity or integrity volumes, no GPT root to
/// discover, no hibernation, no console getty, and a kernel command line only nook writes, so
/// no `systemd.run=`/`systemd.mask=` words). Kept: fstab (a user's own mounts), rc-local and
/// sysv (a user's /etc/rc.local and init scripts). The generator phase went from 1.3-1.8 s to
/// 0.5-0.6 s (systemd's own debug log, two boots each).
const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-veritysetup-generator",
];

/// No entry for the root filesystem. nook's initramfs mounts it read-write, and the agent grows
/// it to fill its disk at boot (and `nook vm resize` grows it while running), so an fstab line
/// only made systemd wait for udev to announce /dev/vda (25 s under TCG) before fsck, remount
/// and growfs, all no-ops here.
const FSTAB: &str = "\
# The root filesystem is mounted by nook's initramfs and grown by the nook agent.
";

pub(crate) fn build(ctx: &mut Ctx<'_>) -> Result<RecipeOutput, StorageError> {
    let mirror = host_mirror();
    let tree = ctx.work.join("tree");
    let cache = ctx.cache.join("debootstrap");
    fs::create_dir_all(&cache).map_err(io_err("create", &cache))?;
    ctx.progress.step("debootstrap");
    ctx.progress.detail(&format!("{SUITE} from {mirror}"));
    let result = cmd::streamed(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(format!("--cache-dir={}", cache.display()))
            .arg("--components=main")
            .arg(SUITE)
            .arg(&tree)
            .arg(&mirror),
        "debootstrap",
        &ctx.work,
        &mut |line| ctx.progress.detail(line),
    );
    if let Err(StorageError::ToolFailed { tool, tail }) = result {
        let log = fs::read_to_string(tree.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let log = debootstrap_log_errors(&log);
        let tail = if log.is_empty() {
            tail
        } else {
            format!("{tail} / log: {log}")
        };
        return Err(StorageError::ToolFailed { tool, tail });
    }
    result?;

    write_file(
        &tree.join("etc/apt/sources.list"),
        &format!(
            "deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\ndeb {SECURITY_MIRROR} {SUITE}-security main\n"
        ),
        0o644,
    )?;
    install_packages(ctx, &tree)?;

    ctx.progress.step("configuring the image");
    configure(&tree)?;

    let kernel = super::find_kernel(&tree)?;
    let busybox = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .ok_or_else(|| StorageError::Build("busybox-static is not in the image".into()))?;
    super::boot_files(ctx, &kernel, &busybox)?;

    ctx.progress.step("cleaning the package cache");
    cmd::output(
        Command::new("chroot").arg(&tree).args(["apt-get", "clean"]),
        "coreutils",
        &tree,
    )?;

    super::root_disk(ctx, &tree, ROOTFS_BYTES)?;
    Ok(RecipeOutput {
        kernel_version: kernel.version,
        init: "/lib/systemd/systemd",
        default_memory_mib: 1024,
        default_disk_bytes: 10 << 30,
    })
}

/// The informative part of a failed debootstrap's log: its last error lines, else its tail.
fn debootstrap_log_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            l.starts_with("E:") || lower.contains("error") || lower.contains("depends on")
        })
        .collect();
    if errors.is_empty() {
        cmd::tail(log, 4)
    } else {
        cmd::tail(&errors.join("\n"), 4)
    }
}

/// Brings the debootstrapped tree up to date (updates and security included) and installs
/// [`PACKAGES`] with apt, inside a chroot with /proc, /sys and /dev/pts mounted and the
/// package cache bind-mounted from the store's cache (so rebuilds download little).
fn install_packages(ctx: &mut Ctx<'_>, tree: &Path) -> Result<(), StorageError> {
    ctx.progress.step("installing packages");
    let archives = ctx.cache.join("apt-archives");
    mkdir(&archives.join("partial"), 0o755)?;
    let policy = tree.join("usr/sbin/policy-rc.d");
    // Nothing may start services in the build chroot.
    write_file(&policy, "#!/bin/sh\nexit 101\n", 0o755)?;
    let mut mounts = ChrootMounts::new(tree);
    mounts.mount("proc", "proc", None)?;
    mounts.mount("sysfs", "sys", None)?;
    mounts.mount("devpts", "dev/pts", None)?;
    mounts.mount("", "var/cache/apt/archives", Some(&archives))?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(tree)
            .arg("apt-get")
            .args([
                "-y",
                "-o",
                "Dpkg::Use-Pty=0",
                "-o",
                "APT::Keep-Downloaded-Packages=true",
            ])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8")
            .env("INITRD", "No")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    };
    let mut relay = |line: &str| ctx.progress.detail(line);
    cmd::streamed(&mut apt(&["update"]), "apt", tree, &mut relay)?;
    cmd::streamed(&mut apt(&["dist-upgrade"]), "apt", tree, &mut relay)?;
    let mut install = apt(&["install", "--no-install-recommends"]);
    install.args(PACKAGES);
    cmd::streamed(&mut install, "apt", tree, &mut relay)?;
    mounts.unmount_all()?;
    fs::remove_file(&policy).map_err(io_err("remove", &policy))
}

/// Filesystems mounted into the build chroot; unmounted (lazily) when dropped, so a failed
/// build never deletes through a mount.
struct ChrootMounts {
    root: std::path::PathBuf,
    mounted: Vec<std::path::PathBuf>,
}

impl ChrootMounts {
    fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            mounted: Vec::new(),
        }
    }

    /// Mounts a `fstype` filesystem, or bind-mounts `bind` when given, at `root/at`.
    fn mount(&mut self, fstype: &str, at: &str, bind: Option<&Path>) -> Result<(), StorageError> {
        use nix::mount::{MsFlags, mount};
        let target = self.root.join(at);
        fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        let result = match bind {
            Some(src) => mount(
                Some(src),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            None => mount(
                Some(fstype),
                &target,
                Some(fstype),
                MsFlags::empty(),
                None::<&str>,
            ),
        };
        result.map_err(|e| io_err("mount", &target)(e.into()))?;
        self.mounted.push(target);
        Ok(())
    }

    fn unmount_all(&mut self) -> Result<(), StorageError> {
        while let Some(target) = self.mounted.pop() {
            nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| io_err("unmount", &target)(e.into()))?;
        }
        Ok(())
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            tracing::warn!(error = %e, "cannot unmount the build chroot");
        }
    }
}

fn configure(tree: &Path) -> Result<(), StorageError> {
    let etc = tree.join("etc");

    cmd::output(
        Command::new("chroot").arg(tree).args([
            "useradd",
            "--create-home",
            "--uid",
            "1000",
            "--user-group",
            "--shell",
            "/bin/bash",
            "--groups",
            "sudo",
            "nook",
        ]),
        "coreutils",
        tree,
    )?;
    write_file(
        &etc.join("sudoers.d/nook"),
        "nook ALL=(ALL) NOPASSWD:ALL\n",
        0o440,
    )?;

    mkdir(&tree.join("usr/lib/nook"), 0o755)?;
    systemd_units(tree)?;

    // Per-machine identity: the machine-id is made on first boot, the SSH host keys come from
    // the host (both refreshed by the agent after a clone).
    let ssh = etc.join("ssh");
    for entry in fs::read_dir(&ssh).map_err(io_err("read", &ssh))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
        }
    }
    write_file(&etc.join("machine-id"), "", 0o444)?;
    let dbus_id = tree.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok_and(|m| m.is_file()) {
        fs::remove_file(&dbus_id).map_err(io_err("remove", &dbus_id))?;
    }
    write_file(&etc.join("hostname"), "nook\n", 0o644)?;
    write_file(
        &etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    // debootstrap copied the build host's resolver; the guest's comes from nook.dns.
    let resolv = etc.join("resolv.conf");
    if resolv.symlink_metadata().is_ok() {
        fs::remove_file(&resolv).map_err(io_err("remove", &resolv))?;
    }
    write_file(&resolv, "# written at boot from nook.dns\n", 0o644)?;
    write_file(&etc.join("fstab"), FSTAB, 0o644)?;
    Ok(())
}

/// The agent's units, and the systemd configuration that makes the image boot fast (see the
/// constants above for what each part does and what it saved).
fn systemd_units(tree: &Path) -> Result<(), StorageError> {
    let units = tree.join("etc/systemd/system");
    write_file(
        &units.join("nook-agent.service"),
        &AGENT_UNIT.replace("@AGENT@", initrd::AGENT_PATH),
        0o644,
    )?;
    symlink(
        "/etc/systemd/system/nook-agent.service",
        &units.join("sysinit.target.wants/nook-agent.service"),
    )?;
    write_file(&units.join("nook.slice"), NOOK_SLICE, 0o644)?;
    write_file(&units.join("ssh.service.d/nook.conf"), SSH_DROPIN, 0o644)?;
    write_file(&tree.join("etc/tmpfiles.d/tmp.conf"), TMPFILES_TMP, 0o644)?;
    write_file(
        &tree.join("etc/tmpfiles.d/systemd-nologin.conf"),
        TMPFILES_NOLOGIN,
        0o644,
    )?;
    write_file(
        &units.join("system.slice.d/nook.conf"),
        SYSTEM_SLICE_DROPIN,
        0o644,
    )?;
    for unit in MASKED_UNITS {
        symlink("/dev/null", &units.join(unit))?;
        // Packages enable some of them; a masked unit's enablement links only draw warnings.
        for wants in [
            "getty.target.wants",
            "multi-user.target.wants",
            "sysinit.target.wants",
            "timers.target.wants",
        ] {
            let link = units.join(wants).join(unit);
            if link.symlink_metadata().is_ok() {
                fs::remove_file(&link).map_err(io_err("remove", &link))?;
            }
        }
    }
    let generators = tree.join("etc/systemd/system-generators");
    for generator in MASKED_GENERATORS {
        symlink("/dev/null", &generators.join(generator))?;
    }
    Ok(())
}

/// The host's Debian mirror, so builds use the same (perhaps local) mirror as apt.
fn host_mirror() -> String {
    let mut texts = Vec::new();
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok());
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|p| fs::read_to_string(p).ok()));
    }
    texts
        .iter()
        .find_map(|t| mirror_from_sources(t))
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

fn is_debian_mirror(uri: &str) -> bool {
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && uri.trim_end_matches('/').ends_with("/debian")
}

/// The first Debian mirror serving `bookworm` in a one-line or deb822 sources file.
pub(crate) fn mirror_from_sources(text: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut words = rest.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next())
            && suite == SUITE
            && is_debian_mirror(uri)
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    for paragraph in text.split("\n\n") {
        let field = |name: &str| {
            paragraph
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let has_suite = field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == SUITE));
        if is_deb
            && has_suite
            && let Some(uri) =
                field("URIs").and_then(|u| u.split_whitespace().find(|u| is_debian_mirror(u)))
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mirror_in_deb822_sources() {
        let text = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_sources(text).unwrap(),
            "http://deb.debian.org/debian"
        );
        let other = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n";
        assert!(mirror_from_sources(other).is_none());
    }

    #[test]
    fn finds_the_mirror_in_one_line_sources() {
        let text = "# comment\ndeb http://deb.debian.org/debian bookworm-backports main\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_sources(text).unwrap(),
            "http://mirror.example/debian"
        );
        assert!(
            mirror_from_sources(
                "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main"
            )
            .is_none()
        );
    }

    #[test]
    fn debootstrap_errors_are_picked_from_its_log() {
        let log = "Setting up a\ndpkg: dependency problems prevent configuration of dconf-service:\n dconf-service depends on default-dbus-session-bus | dbus-session-bus; however:\nchromium\n";
        assert_eq!(
            debootstrap_log_errors(log),
            "dconf-service depends on default-dbus-session-bus | dbus-session-bus; however:"
        );
        assert_eq!(debootstrap_log_errors("a\nb\n"), "a / b");
    }

    #[test]
    fn agent_unit_restarts_forever() {
        let unit = AGENT_UNIT.replace("@AGENT@", initrd::AGENT_PATH);
        assert!(unit.contains("ExecStart=/usr/lib/nook/nook-agent\n"));
        assert!(unit.contains("Restart=always\nRestartSec=1\n"));
        assert!(unit.contains("StartLimitIntervalSec=0\n"));
    }

    #[test]
    fn agent_starts_with_the_first_units_at_boot() {
        assert!(AGENT_UNIT.contains("DefaultDependencies=no\n"));
        assert!(AGENT_UNIT.contains("WantedBy=sysinit.target\n"));
        assert!(AGENT_UNIT.contains("Slice=nook.slice\n"));
        // Nothing to wait for: no ordering after any target or mount.
        assert!(!AGENT_UNIT.contains("After="), "{AGENT_UNIT}");
        assert!(NOOK_SLICE.contains("StartupCPUWeight=1000\n"));
        assert!(SYSTEM_SLICE_DROPIN.contains("StartupCPUWeight=25\n"));
    }

    #[test]
    fn sshd_waits_for_host_keys_from_the_host_but_nothing_else() {
        assert!(SSH_DROPIN.contains("ConditionPathExists=/etc/ssh/ssh_host_ed25519_key\n"));
        assert!(SSH_DROPIN.contains("DefaultDependencies=no\n"));
        assert!(SSH_DROPIN.contains("Conflicts=shutdown.target\nBefore=shutdown.target\n"));
        assert!(SSH_DROPIN.contains("[Service]\nExecStartPre=\n"));
        assert!(SSH_DROPIN.contains("Slice=nook.slice\n"));
    }

    #[test]
    fn fstab_names_no_root_filesystem() {
        // A root line makes systemd wait for udev to announce /dev/vda before fsck and growfs.
        let entries: Vec<&str> = FSTAB
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .collect();
        assert!(entries.is_empty(), "{entries:?}");
    }

    #[test]
    fn units_are_written_masked_and_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        let units = tree.join("etc/systemd/system");
        // As the packages leave them: e2scrub_reap, pstore and the tty1 getty enabled.
        for (wants, unit) in [
            ("multi-user.target.wants", "e2scrub_reap.service"),
            ("sysinit.target.wants", "systemd-pstore.service"),
            ("getty.target.wants", "getty@tty1.service"),
        ] {
            symlink(
                &format!("/lib/systemd/system/{unit}"),
                &units.join(wants).join(unit),
            )
            .unwrap();
        }
        systemd_units(tree).unwrap();
        systemd_units(tree).unwrap(); // idempotent

        let agent = fs::read_to_string(units.join("nook-agent.service")).unwrap();
        assert!(agent.contains(&format!("ExecStart={}\n", initrd::AGENT_PATH)));
        assert_eq!(
            fs::read_link(units.join("sysinit.target.wants/nook-agent.service")).unwrap(),
            Path::new("/etc/systemd/system/nook-agent.service")
        );
        assert!(
            !units
                .join("multi-user.target.wants/nook-agent.service")
                .exists()
        );
        assert!(units.join("nook.slice").is_file());
        assert_eq!(
            fs::read_to_string(units.join("ssh.service.d/nook.conf")).unwrap(),
            SSH_DROPIN
        );
        assert_eq!(
            fs::read_to_string(units.join("system.slice.d/nook.conf")).unwrap(),
            SYSTEM_SLICE_DROPIN
        );
        assert!(!units.join("nook-ssh-keygen.service").exists());
        for unit in MASKED_UNITS {
            assert_eq!(
                fs::read_link(units.join(unit)).unwrap(),
                Path::new("/dev/null"),
                "{unit}"
            );
        }
        for link in [
            "multi-user.target.wants/e2scrub_reap.service",
            "sysinit.target.wants/systemd-pstore.service",
            "getty.target.wants/getty@tty1.service",
        ] {
            assert!(units.join(link).symlink_metadata().is_err(), "{link}");
        }
        for generator in MASKED_GENERATORS {
            let link = tree.join("etc/systemd/system-generators").join(generator);
            assert_eq!(fs::read_link(link).unwrap(), Path::new("/dev/null"));
        }
        // A user's own fstab mounts still work.
        assert!(!MASKED_GENERATORS.contains(&"systemd-fstab-generator"));
    }
}
