//! QEMU command lines, launch, and finding a launched QEMU again.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{Accel, VmmError};

/// Where a VM's runtime files live. Everything a running VM needs from the host, apart from
/// its read-only image, is under this one directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The last `max_lines` lines of the serial console, for error messages.
    pub fn console_tail(&self, max_lines: usize) -> String {
        let text = std::fs::read(self.console_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }
}

#[derive(Debug, Clone)]
pub enum NetBackend {
    /// A host tap made by the network crate; the host tells VMs apart by tap.
    Tap { ifname: String, mac: String },
    /// A user-mode `-netdev` argument (rootless fallback).
    User { netdev: String, mac: String },
}

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Stable id; it appears in QEMU's command line so a re-adopting daemon can recognise it.
    pub id: String,
    pub paths: VmPaths,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub net: NetBackend,
    pub accel: Accel,
    /// Memory reclaim: a balloon with free page reporting, and a small TCG translation
    /// cache. Off only to measure what it saves.
    pub reclaim: bool,
    /// Start paused, waiting for a running VM's state to stream in (a fork's clone).
    pub incoming: bool,
}

/// The seam where another VMM (Cloud Hypervisor, Firecracker) would plug in.
pub trait Hypervisor: Send + Sync {
    /// Starts the VM detached from the caller; returns its pid once it is running.
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError>;
    /// Whether `pid` is still the VM launched for `spec_id`.
    fn is_running(&self, pid: u32, paths: &VmPaths) -> bool;
}

#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Qemu {
    /// Finds the binary: an explicit path, or `qemu-system-x86_64` on PATH.
    pub fn locate(configured: Option<&Path>) -> Result<Self, VmmError> {
        let wanted = configured
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        if wanted.components().count() > 1 {
            return if wanted.is_file() {
                Ok(Self { binary: wanted })
            } else {
                Err(VmmError::QemuMissing(wanted))
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(&wanted))
            .find(|candidate| candidate.is_file())
            .map(|binary| Self { binary })
            .ok_or(VmmError::QemuMissing(wanted))
    }

    pub fn args(spec: &LaunchSpec) -> Vec<String> {
        let p = &spec.paths;
        let s = |path: PathBuf| path.display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("nook-{}", spec.id),
            "-M".into(),
            "pc".into(),
            "-accel".into(),
            // TCG's translation cache defaults to 1 GiB, and it is resident memory that no
            // balloon can reclaim; 64 MiB costs little speed for a guest's hot code.
            match (spec.accel, spec.reclaim) {
                (Accel::Tcg, true) => "tcg,tb-size=64".into(),
                (Accel::Tcg, false) => "tcg".into(),
                (Accel::Kvm, _) => "kvm".into(),
            },
        ];
        if spec.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-smp".into(),
            spec.cpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
            // No image locks on the top: nook guarantees it has one writer, and after a fork
            // the source's old tops (now layers its clones read) must not block its own
            // re-activation. Layers opened as backing files keep QEMU's read locks.
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap,detect-zeroes=unmap,file.locking=off",
                s(p.disk())
            ),
            "-device".into(),
            "virtio-blk-pci,drive=root".into(),
        ]);
        let (netdev, mac) = match &spec.net {
            NetBackend::Tap { ifname, mac } => (
                format!("tap,id=net0,ifname={ifname},script=no,downscript=no"),
                mac,
            ),
            NetBackend::User { netdev, mac } => (netdev.clone(), mac),
        };
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={mac}"),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                s(p.agent_socket())
            ),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                nook_proto::PORT_NAME
            ),
            "-device".into(),
            "virtio-rng-pci".into(),
            // A new generation id on every QEMU start, the restore of a fork included: the
            // guest kernel reseeds its RNG when it changes, so clones never share random state.
            "-device".into(),
            "vmgenid,guid=auto".into(),
            // Free page reporting hands pages the guest frees back to the host at once, which
            // is what lets idle VMs cost little and memory be overcommitted.
        ]);
        if spec.reclaim {
            args.extend([
                "-device".into(),
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on".into(),
            ]);
        }
        if spec.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args.extend([
            "-chardev".into(),
            format!("file,id=console,path={}", s(p.console_log())),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", s(p.qmp_socket())),
            "-pidfile".into(),
            s(p.pidfile()),
            "-daemonize".into(),
        ]);
        args
    }
}

impl Hypervisor for Qemu {
    fn launch(&self, spec: &LaunchSpec) -> Result<u32, VmmError> {
        let p = &spec.paths;
        for stale in [p.qmp_socket(), p.agent_socket(), p.pidfile()] {
            let _ = std::fs::remove_file(stale);
        }
        // Keep the previous boot's console for post-mortems, and start this boot's afresh.
        let _ = std::fs::rename(p.console_log(), p.dir.join("console.log.1"));
        // With -daemonize the parent returns only once the VM is set up, so a bad argument or
        // a missing tap is reported here, with QEMU's own words.
        let output = std::process::Command::new(&self.binary)
            .args(Self::args(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    VmmError::QemuMissing(self.binary.clone())
                } else {
                    VmmError::LaunchFailed(e.to_string())
                }
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(VmmError::LaunchFailed(stderr.trim().to_string()));
        }
        read_pid(&p.pidfile())
    }

    fn is_running(&self, pid: u32, paths: &VmPaths) -> bool {
        // The pid may have been reused: only a process whose command line names this VM's
        // QMP socket is ours.
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let needle = paths.qmp_socket().display().to_string();
        String::from_utf8_lossy(&cmdline).contains(&needle)
    }
}

pub fn read_pid(pidfile: &Path) -> Result<u32, VmmError> {
    let text = std::fs::read_to_string(pidfile).map_err(VmmError::io(pidfile))?;
    text.trim()
        .parse()
        .map_err(|_| VmmError::LaunchFailed(format!("bad pidfile {}", pidfile.display())))
}

/// Last resort when QMP is gone: SIGKILL the process if it is still ours.
pub fn kill(hv: &dyn Hypervisor, pid: u32, paths: &VmPaths) {
    if hv.is_running(pid, paths) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_every_device_and_daemonizes() {
        let spec = LaunchSpec {
            id: "abc123".into(),
            paths: VmPaths::new("/d/vms/abc123"),
            cpus: 2,
            memory_mib: 256,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd".into(),
            cmdline: "console=ttyS0".into(),
            net: NetBackend::Tap {
                ifname: "nk3".into(),
                mac: "02:6e:6b:00:00:03".into(),
            },
            accel: Accel::Tcg,
            reclaim: true,
            incoming: false,
        };
        let line = Qemu::args(&spec).join(" ");
        for part in [
            "-name nook-abc123",
            "-M pc",
            "-accel tcg,tb-size=64",
            "-smp 2 -m 256M",
            "file=/d/vms/abc123/disk.qcow2,format=qcow2",
            "ifname=nk3,script=no",
            "mac=02:6e:6b:00:00:03",
            "path=/d/vms/abc123/agent.sock,server=on,wait=off",
            "name=org.nook.agent.0",
            "-qmp unix:/d/vms/abc123/qmp.sock,server=on,wait=off",
            "-daemonize",
            "free-page-reporting=on",
        ] {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
        assert!(!line.contains("-cpu host"));
    }
}
