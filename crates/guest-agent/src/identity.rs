//! Taking on the identity the host assigns: name, address, MAC, and after a clone a new
//! machine-id, new SSH host keys and fresh entropy. Services that care can react to a clone
//! through `/run/nook/cloned` and executables in `/etc/nook/on-clone.d/`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nook_proto::{AuthorizedKey, Identity, SshHostKey};

use crate::{boot, link, users};

/// The VM id this disk last belonged to. A different one at `Identify` means a clone.
const VM_ID_FILE: &str = "/etc/nook/vm-id";
/// Present (holding the previous VM id) once this machine has been cloned, until reboot.
const CLONED_MARKER: &str = "/run/nook/cloned";
const HOOKS_DIR: &str = "/etc/nook/on-clone.d";

/// What applying an identity found.
pub struct Applied {
    /// The machine was another VM until now.
    pub cloned: bool,
    /// The image runs sshd and the identity's authorized key is in place.
    pub sshd: bool,
}

/// Applies `id`. sshd is (re)started first, with its keys, so that its start under TCG
/// overlaps the rest of the work instead of following it.
pub fn apply(id: &Identity) -> Applied {
    mix_entropy(&id.seed);
    let sshd = id
        .authorized_key
        .as_ref()
        .is_some_and(install_authorized_key);
    if install_ssh_host_keys(&id.ssh_host_keys) {
        reload_sshd();
    }
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
    Applied { cloned, sshd }
}

/// Where sshd lives in the images nook knows; without it there is nothing to authorize for.
const SSHD: &str = "/usr/sbin/sshd";

/// Makes `key` the only line of its user's `~/.ssh/authorized_keys` (nook's relay key); false
/// when the image has no sshd or no such user.
fn install_authorized_key(key: &AuthorizedKey) -> bool {
    if !Path::new(SSHD).exists() {
        return false;
    }
    let Some((account, _)) = users::lookup(&key.user) else {
        log!("no user {:?} for nook's SSH key", key.user);
        return false;
    };
    let dir = Path::new(&account.home).join(".ssh");
    let file = dir.join("authorized_keys");
    let content = format!("{}\n", key.public_openssh.trim_end());
    if fs::read(&file).is_ok_and(|c| c == content.as_bytes()) {
        return true;
    }
    let (uid, gid) = (Some(account.uid), Some(account.gid));
    let result = fs::create_dir_all(&dir)
        .and_then(|()| std::os::unix::fs::lchown(&dir, uid, gid))
        .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
        .and_then(|()| write_atomically(&file, content.as_bytes(), 0o600))
        .and_then(|()| std::os::unix::fs::lchown(&file, uid, gid));
    match result {
        Ok(()) => true,
        Err(e) => {
            log!("cannot install nook's SSH key in {}: {e}", file.display());
            false
        }
    }
}

const SSH_DIR: &str = "/etc/ssh";

/// Installs the host keys the host made for this machine, replacing any other `ssh_host_*`
/// files; true when anything changed. Images without `/etc/ssh` (no sshd) are left alone.
fn install_ssh_host_keys(keys: &[SshHostKey]) -> bool {
    let dir = Path::new(SSH_DIR);
    if keys.is_empty() || !dir.is_dir() {
        return false;
    }
    let mut wanted: Vec<(String, String, u32)> = Vec::new();
    for key in keys {
        // The kind becomes part of a file name: only plain words.
        if key.kind.is_empty() || !key.kind.bytes().all(|b| b.is_ascii_alphanumeric()) {
            log!("ignoring an SSH host key of kind {:?}", key.kind);
            continue;
        }
        let name = format!("ssh_host_{}_key", key.kind);
        let public = format!("{}\n", key.public_openssh.trim_end());
        wanted.push((name.clone(), key.private_openssh.clone(), 0o600));
        wanted.push((format!("{name}.pub"), public, 0o644));
    }
    let mut changed = false;
    for (name, content, mode) in &wanted {
        let path = dir.join(name);
        if fs::read(&path).is_ok_and(|c| c == content.as_bytes()) {
            continue;
        }
        if let Err(e) = write_atomically(&path, content.as_bytes(), *mode) {
            log!("cannot write {}: {e}", path.display());
            continue;
        }
        changed = true;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("ssh_host_") && !wanted.iter().any(|(w, _, _)| *w == name) {
                let _ = fs::remove_file(entry.path());
                changed = true;
            }
        }
    }
    if changed {
        log!("installed the SSH host keys from the host");
    }
    changed
}

/// Replaces `path` in one rename, so sshd never reads half a key. No fsync: the host holds these
/// keys and sends them at every boot, so a crash can lose nothing, and under TCG each fsync
/// (a journal commit) cost tens of milliseconds on the way to "ready".
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("nook-tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(data)?;
    fs::rename(&tmp, path)
}

/// Makes sshd serve the current host keys. A running sshd gets SIGHUP straight away (it
/// re-executes itself and reads them): a `systemctl reload` would queue behind the jobs of a
/// boot still in progress, which held a fresh clone for over 20 s. One not running yet (the
/// image holds it back until the first keys arrive) is started, without waiting, as systemd may
/// still be starting what it comes after; the host waits for port 22 anyway.
fn reload_sshd() {
    let running = fs::read_to_string("/run/sshd.pid")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    if let Some(pid) = running {
        if let Err(e) = crate::sys::signal(pid, libc::SIGHUP, false) {
            log!("cannot signal sshd ({pid}): {e}");
        }
        return;
    }
    if Path::new("/run/systemd/system").is_dir() {
        if !boot::run_tool("systemctl", &["start", "--no-block", "ssh.service"]) {
            log!("cannot start ssh.service");
        }
    } else {
        boot::run_tool("pkill", &["-HUP", "-o", "-x", "sshd"]);
    }
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
    let Some(bytes) = link::parse_mac(mac) else {
        log!("ignoring the MAC address {mac:?} from the host");
        return;
    };
    let dev = boot::nic();
    if link::mac(&dev).is_ok_and(|current| current.eq_ignore_ascii_case(mac)) {
        return;
    }
    match link::set_mac(&dev, bytes) {
        Ok(()) => log!("{dev} now has MAC {mac}"),
        Err(e) => log!("cannot give {dev} the MAC {mac}: {e}"),
    }
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
