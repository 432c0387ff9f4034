//! Boot set-up from the kernel command line: hostname, network, DNS, devpts, and growing the
//! root filesystem to its disk. Every step is best-effort, logged, and idempotent, since the
//! agent's supervisor may restart it.

use crate::{SYSTEM_PATH, find_tool, link};
use nook_proto::BootConfig;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The root disk, which the host grows when a VM is given more space.
const ROOT_DEV: &str = "/dev/vda";
/// Grow the root filesystem only when the disk has at least this much more room.
const GROW_SLACK: u64 = 16 * 1024 * 1024;
/// How long boot set-up waits for the network device to appear.
const NIC_WAIT: Duration = Duration::from_secs(10);
const LINK_ATTEMPTS: u32 = 10;

/// Where the identity the host last gave this boot is kept, in the kernel command line's
/// words. It lives in `/run`, so it outlasts an agent restart but not a reboot, and a forked
/// clone re-reads its own identity rather than its source's command line.
pub const CURRENT: &str = "/run/nook/boot";

/// Reads the current identity (see [`CURRENT`]), or else `/proc/cmdline`, and applies it.
/// Does nothing without `nook.hostname`, so running the agent by hand outside a nook VM cannot
/// reconfigure that machine.
pub fn setup() {
    let cmdline = match fs::read_to_string(CURRENT).or_else(|_| fs::read_to_string("/proc/cmdline"))
    {
        Ok(c) => c,
        Err(e) => {
            log!("cannot read /proc/cmdline: {e}; skipping boot set-up");
            return;
        }
    };
    let cfg = BootConfig::from_cmdline(&cmdline);
    if cfg.hostname.is_empty() {
        log!("no nook.hostname on the kernel command line; skipping boot set-up");
        return;
    }
    apply(&cfg);
}

/// Applies `cfg`. Growing the filesystem runs in the background so it cannot delay readiness.
pub fn apply(cfg: &BootConfig) {
    set_hostname(&cfg.hostname);
    configure_network(cfg);
    if let Some(dns) = &cfg.dns {
        write_if_changed(
            Path::new("/etc/resolv.conf"),
            &format!("nameserver {dns}\n"),
        );
    }
    ensure_devpts();
    report_free_memory_finely();
    if let Err(e) = std::thread::Builder::new()
        .name("grow-root".into())
        .spawn(grow_root)
    {
        log!("cannot start growing the root filesystem: {e}");
    }
}

/// The guest's free page reporting (virtio-balloon) hands free memory back to the host only in
/// blocks of 2^order pages; the kernel's default order is 9 (2 MiB). After a boot most of a
/// small guest's free memory lies in 256 KiB–1 MiB blocks, so about 28 of a tiny 128 MiB
/// guest's 45 MiB free stayed on the host, to be swapped and compressed when it idles
/// (measured here). Order 5 (128 KiB) returns nearly all of it, in reports still 32 pages long.
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const REPORTING_ORDER: u32 = 5;

fn report_free_memory_finely() {
    let Ok(now) = fs::read_to_string(PAGE_REPORTING_ORDER) else {
        return; // a kernel without free page reporting
    };
    if now
        .trim()
        .parse::<u32>()
        .is_ok_and(|o| o <= REPORTING_ORDER)
    {
        return;
    }
    if let Err(e) = fs::write(PAGE_REPORTING_ORDER, REPORTING_ORDER.to_string()) {
        log!("cannot set {PAGE_REPORTING_ORDER}: {e}");
    }
}

/// Writes `content` unless the file already holds it; a symlink (to a resolver's stub file,
/// say) is replaced by a plain file.
fn write_if_changed(path: &Path, content: &str) {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link && fs::read_to_string(path).is_ok_and(|old| old == content) {
        return;
    }
    if is_link && let Err(e) = fs::remove_file(path) {
        log!("cannot replace the symlink {}: {e}", path.display());
    }
    match fs::write(path, content) {
        Ok(()) => log!("wrote {}", path.display()),
        Err(e) => log!("cannot write {}: {e}", path.display()),
    }
}

fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        log!("sethostname {name}: {e}");
    }
    write_if_changed(Path::new("/etc/hostname"), &format!("{name}\n"));
    let hosts = fs::read_to_string("/etc/hosts").unwrap_or_default();
    write_if_changed(Path::new("/etc/hosts"), &hosts_with_name(&hosts, name));
}

/// `/etc/hosts` with exactly one `127.0.1.1` line, naming `name`, after the `127.0.0.1` line
/// (which is added when missing).
pub fn hosts_with_name(hosts: &str, name: &str) -> String {
    let mut lines: Vec<String> = hosts
        .lines()
        .filter(|l| l.split_whitespace().next() != Some("127.0.1.1"))
        .map(str::to_string)
        .collect();
    let at = match lines
        .iter()
        .position(|l| l.split_whitespace().next() == Some("127.0.0.1"))
    {
        Some(i) => i + 1,
        None => {
            lines.insert(0, "127.0.0.1\tlocalhost".to_string());
            1
        }
    };
    lines.insert(at, format!("127.0.1.1\t{name}"));
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Runs a system tool quietly; true when it succeeded.
fn run(tool: &Path, args: &[&str]) -> bool {
    let shown = format!("{} {}", tool.display(), args.join(" "));
    match Command::new(tool)
        .args(args)
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            log!("{shown}: {} {}", out.status, err.trim());
            false
        }
        Err(e) => {
            log!("{shown}: {e}");
            false
        }
    }
}

/// The guest's network interface: `eth0`, or the first other one backed by a device (for
/// images that rename interfaces).
fn find_interface() -> Option<String> {
    if Path::new("/sys/class/net/eth0").exists() {
        return Some("eth0".into());
    }
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Waits a little for the network device, which may still be probing when the agent starts.
fn interface() -> String {
    let deadline = Instant::now() + NIC_WAIT;
    loop {
        if let Some(name) = find_interface() {
            return name;
        }
        if Instant::now() >= deadline {
            log!("no network interface after {NIC_WAIT:?}; trying eth0 anyway");
            return "eth0".into();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn configure_network(cfg: &BootConfig) {
    if let Err(e) = link::set_up("lo") {
        log!("network: cannot bring lo up: {e}");
    }
    let Some(addr) = &cfg.ip else {
        return;
    };
    let Some(want) = link::Cidr::parse(addr) else {
        log!("network: {addr:?} from the host is not an IPv4 address with a prefix; skipping");
        return;
    };
    // An image whose udev renames interfaces may do so between finding the link and using it;
    // the link is found again until the address is on it.
    let mut dev = interface();
    let mut placed = false;
    for attempt in 1..=LINK_ATTEMPTS {
        let result = link::set_up(&dev).and_then(|()| match link::ipv4(&dev)? {
            Some(have) if have == want => Ok(()),
            _ => link::set_ipv4(&dev, want),
        });
        if let Err(e) = &result {
            log!("network: {want} on {dev} (attempt {attempt}): {e}");
        }
        if link::ipv4(&dev).is_ok_and(|have| have == Some(want)) {
            placed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        // No second wait for a device: `interface` already gave it time to appear.
        dev = find_interface().unwrap_or(dev);
    }
    if !placed {
        log!("network: could not put {want} on {dev}; the host cannot reach this machine");
        return;
    }
    if let Some(gw) = &cfg.gateway {
        match gw.parse() {
            Ok(gw) => {
                if let Err(e) = link::set_default_route(&dev, gw) {
                    log!("network: cannot route through {gw}: {e}");
                }
            }
            Err(_) => log!("network: gateway {gw:?} from the host is not an IPv4 address"),
        }
    }
    log!("network: {want} on {dev}, gateway {:?}", cfg.gateway);
}

/// The network interface the host's link is on, for callers outside boot set-up.
pub(crate) fn nic() -> String {
    interface()
}

/// Runs a system tool by name; true when it succeeded (false when it is not installed).
pub(crate) fn run_tool(name: &str, args: &[&str]) -> bool {
    match find_tool(name) {
        Some(tool) => run(&tool, args),
        None => false,
    }
}

/// Mounts devpts when init has not, since pty spawns need it.
fn ensure_devpts() {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/dev/pts"))
    {
        return;
    }
    if let Err(e) = fs::create_dir_all("/dev/pts") {
        log!("cannot create /dev/pts: {e}");
        return;
    }
    match nix::mount::mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    ) {
        Ok(()) => log!("mounted /dev/pts"),
        Err(e) => log!("cannot mount /dev/pts: {e}"),
    }
}

/// Size in bytes of an ext2/3/4 filesystem, from its superblock (the 1024 bytes at offset 1024
/// of the device); `None` when it is not one.
pub fn ext_fs_bytes(sb: &[u8]) -> Option<u64> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(sb.get(off..off + 4)?.try_into().ok()?))
    };
    let magic = u16::from_le_bytes(sb.get(0x38..0x3a)?.try_into().ok()?);
    if magic != 0xEF53 {
        return None;
    }
    let log_block = u32_at(0x18)?;
    if log_block > 6 {
        return None;
    }
    let block_size = 1024u64 << log_block;
    let mut blocks = u64::from(u32_at(0x04)?);
    const INCOMPAT_64BIT: u32 = 0x80;
    if u32_at(0x60)? & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    Some(blocks * block_size)
}

fn grow_root() {
    let Some(resize2fs) = find_tool("resize2fs") else {
        return;
    };
    let dev_name = ROOT_DEV.trim_start_matches("/dev/");
    let Some(dev_bytes) = fs::read_to_string(format!("/sys/class/block/{dev_name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
    else {
        return;
    };
    let mut sb = vec![0u8; 1024];
    let fs_bytes = fs::File::open(ROOT_DEV)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .ok()
        .and_then(|()| ext_fs_bytes(&sb));
    let Some(fs_bytes) = fs_bytes else {
        log!("{ROOT_DEV} holds no ext filesystem I can read; not growing it");
        return;
    };
    if dev_bytes < fs_bytes + GROW_SLACK {
        return;
    }
    log!("growing {ROOT_DEV} from {fs_bytes} to {dev_bytes} bytes");
    if run(&resize2fs, &[ROOT_DEV]) {
        log!("grew {ROOT_DEV}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hosts_gets_exactly_one_name_line() {
        let debian = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1 localhost ip6-localhost\n";
        let out = hosts_with_name(debian, "blog");
        assert_eq!(
            out,
            "127.0.0.1\tlocalhost\n127.0.1.1\tblog\n\n::1 localhost ip6-localhost\n"
        );
        assert_eq!(hosts_with_name(&out, "blog"), out, "idempotent");
        assert_eq!(
            hosts_with_name("", "tiny"),
            "127.0.0.1\tlocalhost\n127.0.1.1\ttiny\n"
        );
    }

    fn superblock(blocks: u64, log_block: u32, bit64: bool) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log_block.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        if bit64 {
            sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        sb
    }

    #[test]
    fn reads_ext_superblocks() {
        assert_eq!(
            ext_fs_bytes(&superblock(262_144, 2, false)),
            Some(1024 * 1024 * 1024)
        );
        let huge = (1u64 << 32) + 5;
        assert_eq!(ext_fs_bytes(&superblock(huge, 2, true)), Some(huge * 4096));
        let mut not_ext = superblock(100, 2, false);
        not_ext[0x38] = 0;
        assert_eq!(ext_fs_bytes(&not_ext), None);
        assert_eq!(ext_fs_bytes(&[0u8; 10]), None);
    }

    #[test]
    fn reads_a_real_ext4_image_made_by_mkfs() {
        // Fails rather than skips: a missing tool must not pass for a working superblock reader.
        let mkfs = find_tool("mkfs.ext4")
            .expect("this test needs mkfs.ext4 (looked in /sbin and /usr/sbin too): apt-get install e2fsprogs");
        let path = std::env::temp_dir().join(format!("nook-sb-{}.img", std::process::id()));
        let f = fs::File::create(&path).unwrap();
        f.set_len(64 * 1024 * 1024).unwrap();
        drop(f);
        let ok = Command::new(mkfs)
            .args(["-q", "-F", "-b", "4096"])
            .arg(&path)
            .arg("12M")
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let mut sb = vec![0u8; 1024];
        fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut sb, 1024)
            .unwrap();
        assert_eq!(ext_fs_bytes(&sb), Some(12 * 1024 * 1024));
        fs::remove_file(&path).unwrap();
    }
}
