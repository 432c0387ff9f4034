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

const AGENT_UNIT: &str = "\
[Unit]
Description=nook guest agent
After=local-fs.target
# Restart forever: the agent is how the host reaches this machine.
StartLimitIntervalSec=0

[Service]
ExecStart=@AGENT@
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

const SSH_KEYGEN_UNIT: &str = "\
[Unit]
Description=Generate missing SSH host keys
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

/// `x-systemd.growfs` grows the filesystem to fill a disk made larger than the base.
const FSTAB: &str = "/dev/vda / ext4 defaults,x-systemd.growfs 0 1\n";

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
    let units = etc.join("systemd/system");
    let wants = units.join("multi-user.target.wants");
    write_file(
        &units.join("nook-agent.service"),
        &AGENT_UNIT.replace("@AGENT@", initrd::AGENT_PATH),
        0o644,
    )?;
    symlink(
        "/etc/systemd/system/nook-agent.service",
        &wants.join("nook-agent.service"),
    )?;
    write_file(
        &units.join("nook-ssh-keygen.service"),
        SSH_KEYGEN_UNIT,
        0o644,
    )?;
    symlink(
        "/etc/systemd/system/nook-ssh-keygen.service",
        &wants.join("nook-ssh-keygen.service"),
    )?;
    // Nobody logs in on the console; and dozens of guests must not all run apt on a timer.
    for unit in [
        "serial-getty@ttyS0.service",
        "getty@tty1.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
    ] {
        symlink("/dev/null", &units.join(unit))?;
    }

    // Per-machine identity is made on first boot (and refreshed by the agent after a clone).
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
}
