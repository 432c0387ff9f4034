//! Taking on the identity the host assigns: name, address, MAC, and after a clone a new
//! machine-id, new SSH host keys and fresh entropy. Services that care can react to a clone
//! through `/run/nook/cloned` and executables in `/etc/nook/on-clone.d/`.

use std::fs;
use std::io::Write;
use std::path::Path;

use nook_proto::Identity;

use crate::boot;

/// The VM id this disk last belonged to. A different one at `Identify` means a clone.
const VM_ID_FILE: &str = "/etc/nook/vm-id";
/// Present (holding the previous VM id) once this machine has been cloned, until reboot.
const CLONED_MARKER: &str = "/run/nook/cloned";
const HOOKS_DIR: &str = "/etc/nook/on-clone.d";

/// Applies `id`; true when the machine was another VM until now.
pub fn apply(id: &Identity) -> bool {
    mix_entropy(&id.seed);
    if let Some(mac) = &id.mac {
        set_mac(mac);
    }
    let boot = id.boot_config();
    boot::apply(&boot);
    if let Err(e) =
        fs::create_dir_all("/run/nook").and_then(|()| fs::write(boot::CURRENT, boot.to_cmdline()))
    {
        log!("cannot save the identity in {}: {e}", boot::CURRENT);
    }
    let previous = fs::read_to_string(VM_ID_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let cloned = previous.as_deref().is_some_and(|p| p != id.vm_id);
    if cloned {
        log!(
            "this machine was VM {} and is now VM {}: renewing its identity",
            previous.as_deref().unwrap_or_default(),
            id.vm_id
        );
        renew_machine_id();
        renew_ssh_host_keys();
        if let Err(e) = fs::write(CLONED_MARKER, previous.as_deref().unwrap_or_default()) {
            log!("cannot write {CLONED_MARKER}: {e}");
        }
        run_hooks();
    }
    if previous.as_deref() != Some(id.vm_id.as_str())
        && let Err(e) = fs::create_dir_all("/etc/nook")
            .and_then(|()| fs::write(VM_ID_FILE, format!("{}\n", id.vm_id)))
    {
        log!("cannot write {VM_ID_FILE}: {e}");
    }
    cloned
}

/// Writing to `/dev/urandom` mixes bytes into the pool (without crediting entropy, which is
/// right for bytes that crossed a channel).
fn mix_entropy(seed: &[u8]) {
    if seed.is_empty() {
        return;
    }
    if let Err(e) = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .and_then(|mut f| f.write_all(seed))
    {
        log!("cannot mix the host's seed into /dev/urandom: {e}");
    }
}

fn set_mac(mac: &str) {
    let dev = boot::nic();
    let current = fs::read_to_string(format!("/sys/class/net/{dev}/address")).unwrap_or_default();
    if current.trim().eq_ignore_ascii_case(mac) {
        return;
    }
    // virtio-net takes a new address while up when the device offers it; else bounce the link.
    if !boot::run_tool("ip", &["link", "set", "dev", &dev, "address", mac]) {
        boot::run_tool("ip", &["link", "set", "dev", &dev, "down"]);
        boot::run_tool("ip", &["link", "set", "dev", &dev, "address", mac]);
        boot::run_tool("ip", &["link", "set", "dev", &dev, "up"]);
    }
    log!("{dev} now has MAC {mac}");
}

fn renew_machine_id() {
    let id = hex(&random_bytes(16));
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        let p = Path::new(path);
        // An empty /etc/machine-id is systemd's "make one at next boot"; leave that alone.
        let is_set = fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0);
        if is_set && let Err(e) = fs::write(p, format!("{id}\n")) {
            log!("cannot write {path}: {e}");
        }
    }
}

fn renew_ssh_host_keys() {
    let Ok(entries) = fs::read_dir("/etc/ssh") else {
        return;
    };
    let mut had_keys = false;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            had_keys = true;
            let _ = fs::remove_file(entry.path());
        }
    }
    if !had_keys {
        return;
    }
    if !boot::run_tool("ssh-keygen", &["-A"]) {
        log!("ssh-keygen -A failed: sshd may have no host keys");
        return;
    }
    // sshd reads its host keys when it (re)starts; a reload re-executes it.
    if !boot::run_tool("systemctl", &["try-reload-or-restart", "ssh.service"]) {
        boot::run_tool("pkill", &["-HUP", "-o", "-x", "sshd"]);
    }
    log!("new SSH host keys");
}

fn run_hooks() {
    let Ok(entries) = fs::read_dir(HOOKS_DIR) else {
        return;
    };
    let mut hooks: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    hooks.sort();
    for hook in hooks {
        match std::process::Command::new(&hook)
            .env("PATH", crate::SYSTEM_PATH)
            .stdin(std::process::Stdio::null())
            .status()
        {
            Ok(status) if status.success() => log!("ran {}", hook.display()),
            Ok(status) => log!("{}: {status}", hook.display()),
            Err(e) => log!("cannot run {}: {e}", hook.display()),
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_err()
    {
        log!("cannot read /dev/urandom");
    }
    buf
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
