//! Root-only tests against the real kernel: CPU quotas, memory caps, knob
//! files, attach and removal. They skip (with a note) when not run as root,
//! and run one at a time so their CPU measurements do not disturb each other.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nook_cgroup::{AccountLimits, CgroupError, Cgroups, Flavor, VmKnobs};

const MIB: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());

/// Owns the test's groups and processes; dropping it kills and reaps the
/// processes, then removes the groups.
struct Fixture {
    cg: Cgroups,
    accounts: Vec<String>,
    children: Vec<Child>,
    /// The top group's CPU weight file and its value before the test.
    boosted: Option<(PathBuf, String)>,
    _serial: MutexGuard<'static, ()>,
}

impl Fixture {
    /// `None` (after a note) when not root.
    fn new() -> Option<Fixture> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: cgroup tests need root");
            return None;
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let cg = Cgroups::probe().expect("probe cgroups");
        eprintln!("cgroups: {:?} at {:?}", cg.flavor(), cg.roots());
        Some(Fixture {
            cg,
            accounts: Vec::new(),
            children: Vec::new(),
            boosted: None,
            _serial: serial,
        })
    }

    /// A unique account name, removed on drop.
    fn account(&mut self, tag: &str, limits: AccountLimits) -> String {
        let name = format!("t{:x}-{tag}", std::process::id());
        self.accounts.push(name.clone());
        self.cg.set_account(&name, limits).expect("set_account");
        self.boost_top();
        // Likewise against other accounts that may be busy in `nook`.
        for dir in self.cg.group_dirs(&name, None).expect("dirs") {
            for (file, value) in [("cpu.shares", "10240"), ("cpu.weight", "1000")] {
                if dir.join(file).exists() {
                    std::fs::write(dir.join(file), value).expect("boost account weight");
                }
            }
        }
        name
    }

    /// Shields the measurements from unrelated load on the host (such as
    /// parallel builds): `nook` as a whole competes with the host's other
    /// tasks by its weight, so raise it tenfold for the test (not more: a
    /// broken quota must not starve the host) and restore it on drop.
    fn boost_top(&mut self) {
        if self.boosted.is_some() {
            return;
        }
        let (file, max) = match self.cg.flavor() {
            Flavor::V1 => ("cpu.shares", "10240"),
            Flavor::V2 => ("cpu.weight", "1000"),
        };
        let path = self.cg.roots()[0].join("nook").join(file);
        let old = std::fs::read_to_string(&path).expect("read top weight");
        std::fs::write(&path, max).expect("boost top weight");
        self.boosted = Some((path, old.trim().to_owned()));
    }

    fn spawn(&mut self, cmd: &mut Command) -> usize {
        let child = cmd.spawn().expect("spawn child");
        self.children.push(child);
        self.children.len() - 1
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }

    /// A single-threaded busy loop, attached to `account/vm`.
    fn hog(&mut self, account: &str, vm: &str) -> u32 {
        let i = self.spawn(Command::new("sh").args(["-c", "while :; do :; done"]));
        let pid = self.pid(i);
        self.cg.attach(account, vm, pid).expect("attach hog");
        assert!(self.cg.contains(account, vm, pid));
        pid
    }

    /// Runs `python3 -c code` in `account/vm`: the shell waits for a line on
    /// stdin, so it is attached before python allocates anything.
    fn python(&mut self, account: &str, vm: &str, code: &str) -> usize {
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let script = format!("read _ && exec {python} -c '{code}'");
        let i = self.spawn(
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::null()),
        );
        self.cg
            .attach(account, vm, self.pid(i))
            .expect("attach python");
        let mut stdin = self.children[i].stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release child");
        i
    }

    fn wait(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.children[i].try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "child still running after {timeout:?}"
            );
            sleep(Duration::from_millis(50));
        }
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.kill_all();
        for a in &self.accounts {
            for vm in self.cg.list_vms(a).unwrap_or_default() {
                if let Err(e) = self.cg.remove_vm(a, &vm) {
                    eprintln!("cleanup: remove_vm {a}/{vm}: {e}");
                }
            }
            if let Err(e) = self.cg.remove_account(a) {
                eprintln!("cleanup: remove_account {a}: {e}");
            }
        }
        if let Some((path, old)) = self.boosted.take()
            && let Err(e) = std::fs::write(&path, old)
        {
            eprintln!("cleanup: restore {}: {e}", path.display());
        }
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let (_, rest) = stat.rsplit_once(')').expect("stat format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, so utime (14) and stime (15) are 11 and 12.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .expect("sysconf")
        .expect("CLK_TCK");
    ticks as f64 / hz as f64
}

/// Each process's share of one CPU over `secs` seconds.
fn measure(pids: &[u32], secs: f64) -> Vec<f64> {
    sleep(Duration::from_millis(300)); // let the quota settle
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let start = Instant::now();
    sleep(Duration::from_secs_f64(secs));
    let after: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let wall = start.elapsed().as_secs_f64();
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) / wall)
        .collect()
}

fn limits(cpus: f64, memory_bytes: u64) -> AccountLimits {
    AccountLimits {
        cpus,
        memory_bytes,
        swap_bytes: 0,
    }
}

/// The first of the group's directories holding `file`.
fn knob(dirs: &[PathBuf], file: &str) -> String {
    let path = dirs
        .iter()
        .map(|d| d.join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {file} in {dirs:?}"));
    std::fs::read_to_string(path)
        .expect("read knob")
        .trim()
        .to_owned()
}

#[test]
fn root_cpu_quota_holds_a_hog() {
    let Some(mut fx) = Fixture::new() else { return };
    let acct = fx.account("cpu", limits(0.2, 512 * MIB));
    fx.cg
        .set_vm(&acct, "vm", VmKnobs::default())
        .expect("set_vm");
    let pid = fx.hog(&acct, "vm");

    let capped = measure(&[pid], 3.0)[0];
    eprintln!("hog at cpus=0.2: {:.1}% of a CPU", capped * 100.0);
    assert!(
        (0.10..=0.35).contains(&capped),
        "capped hog used {capped:.3} CPUs"
    );

    fx.cg
        .set_account(&acct, limits(1.0, 512 * MIB))
        .expect("raise quota");
    let full = measure(&[pid], 3.0)[0];
    eprintln!("hog at cpus=1.0: {:.1}% of a CPU", full * 100.0);
    assert!(
        (0.80..=1.10).contains(&full),
        "uncapped hog used {full:.3} CPUs"
    );

    let usage = fx.cg.vm_usage(&acct, "vm").expect("vm_usage");
    let acct_usage = fx.cg.account_usage(&acct).expect("account_usage");
    eprintln!("vm usage {usage:?}, account usage {acct_usage:?}");
    if fx.cg.flavor() == Flavor::V2 || usage.cpu_usage_ns > 0 {
        // About 0.2*3.3 + 1.0*3.3 s of CPU; at least 2 s.
        assert!(usage.cpu_usage_ns > 2_000_000_000, "{usage:?}");
        assert!(acct_usage.cpu_usage_ns >= usage.cpu_usage_ns);
    }
}

#[test]
fn root_accounts_are_isolated() {
    let Some(mut fx) = Fixture::new() else { return };
    let a = fx.account("iso-a", limits(0.5, 512 * MIB));
    let b = fx.account("iso-b", limits(1.0, 512 * MIB));
    for (acct, vm) in [(&a, "v1"), (&a, "v2"), (&b, "v1")] {
        fx.cg.set_vm(acct, vm, VmKnobs::default()).expect("set_vm");
    }
    let pids = [fx.hog(&a, "v1"), fx.hog(&a, "v2"), fx.hog(&b, "v1")];
    let shares = measure(&pids, 3.0);
    let a_total = shares[0] + shares[1];
    eprintln!(
        "account A hogs: {:.1}% + {:.1}% = {:.1}% (cap 50%); account B hog: {:.1}% (cap 100%)",
        shares[0] * 100.0,
        shares[1] * 100.0,
        a_total * 100.0,
        shares[2] * 100.0
    );
    assert!(
        (0.30..=0.65).contains(&a_total),
        "account A used {a_total:.3} CPUs"
    );
    assert!(
        shares[2] >= 0.70,
        "account B's hog got only {:.3} CPUs",
        shares[2]
    );
}

#[test]
fn root_memory_cap_kills_the_greedy() {
    let Some(mut fx) = Fixture::new() else { return };
    let acct = fx.account("mem", limits(1.0, 64 * MIB));
    fx.cg
        .set_vm(&acct, "vm", VmKnobs::default())
        .expect("set_vm");

    let greedy = fx.python(&acct, "vm", "b = b\"x\" * (200 << 20)");
    let status = fx.wait(greedy, Duration::from_secs(30));
    eprintln!("200 MiB under a 64 MiB cap: {status:?}");
    assert_eq!(status.signal(), Some(libc_sigkill()), "{status:?}");

    let modest = fx.python(
        &acct,
        "vm",
        "import time; b = b\"x\" * (16 << 20); time.sleep(2)",
    );
    sleep(Duration::from_millis(1200));
    let acct_usage = fx.cg.account_usage(&acct).expect("account_usage");
    let vm_usage = fx.cg.vm_usage(&acct, "vm").expect("vm_usage");
    eprintln!("16 MiB child running: account {acct_usage:?}, vm {vm_usage:?}");
    assert!(acct_usage.memory_bytes > 16 * MIB, "{acct_usage:?}");
    assert!(acct_usage.memory_bytes <= 64 * MIB, "{acct_usage:?}");
    assert!(vm_usage.memory_bytes > 16 * MIB, "{vm_usage:?}");
    let status = fx.wait(modest, Duration::from_secs(30));
    eprintln!("16 MiB under a 64 MiB cap: {status:?}");
    assert!(status.success(), "{status:?}");
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

#[test]
fn root_knobs_attach_and_removal() {
    let Some(mut fx) = Fixture::new() else { return };
    let cg = fx.cg.clone();
    let acct = fx.account("knobs", limits(1.0, 256 * MIB));
    let dirs = cg.group_dirs(&acct, None).expect("dirs");
    let knobs = VmKnobs {
        cpu_weight: 250,
        memory_high: Some(32 * MIB),
    };
    cg.set_vm(&acct, "vm", knobs).expect("set_vm");
    cg.set_vm(&acct, "vm", knobs).expect("set_vm again");
    let vm_dirs = cg.group_dirs(&acct, Some("vm")).expect("dirs");
    assert!(vm_dirs.iter().all(|d| d.is_dir()), "{vm_dirs:?}");

    match cg.flavor() {
        Flavor::V1 => {
            assert_eq!(knob(&dirs, "cpu.cfs_period_us"), "100000");
            assert_eq!(knob(&dirs, "cpu.cfs_quota_us"), "100000");
            assert_eq!(
                knob(&dirs, "memory.limit_in_bytes"),
                (256 * MIB).to_string()
            );
            assert_eq!(knob(&dirs, "memory.use_hierarchy"), "1");
            assert_eq!(knob(&vm_dirs, "cpu.shares"), "2560");
            assert_eq!(
                knob(&vm_dirs, "memory.soft_limit_in_bytes"),
                (32 * MIB).to_string()
            );
            // Lower, then raise, the cap: memsw must follow in the right order.
            for cap in [128 * MIB, 512 * MIB] {
                cg.set_account(&acct, limits(0.5, cap)).expect("change cap");
                assert_eq!(knob(&dirs, "memory.limit_in_bytes"), cap.to_string());
                if dirs
                    .iter()
                    .any(|d| d.join("memory.memsw.limit_in_bytes").exists())
                {
                    assert_eq!(knob(&dirs, "memory.memsw.limit_in_bytes"), cap.to_string());
                }
            }
            assert_eq!(knob(&dirs, "cpu.cfs_quota_us"), "50000");
            cg.set_vm(&acct, "vm", VmKnobs::default())
                .expect("reset knobs");
            assert_eq!(knob(&vm_dirs, "cpu.shares"), "1024");
            let soft: u64 = knob(&vm_dirs, "memory.soft_limit_in_bytes")
                .parse()
                .expect("number");
            assert!(soft > 1 << 60, "soft limit not cleared: {soft}");
        }
        Flavor::V2 => {
            assert_eq!(knob(&dirs, "cpu.max"), "100000 100000");
            assert_eq!(knob(&dirs, "memory.max"), (256 * MIB).to_string());
            assert_eq!(knob(&vm_dirs, "cpu.weight"), "250");
            assert_eq!(knob(&vm_dirs, "memory.high"), (32 * MIB).to_string());
            cg.set_vm(&acct, "vm", VmKnobs::default())
                .expect("reset knobs");
            assert_eq!(knob(&vm_dirs, "cpu.weight"), "100");
            assert_eq!(knob(&vm_dirs, "memory.high"), "max");
        }
    }

    // Bad names and missing groups.
    for bad in ["..", "a/b", "Upper", ""] {
        assert!(matches!(
            cg.set_account(bad, limits(1.0, MIB)),
            Err(CgroupError::InvalidName(_))
        ));
        assert!(matches!(
            cg.remove_vm(&acct, bad),
            Err(CgroupError::InvalidName(_))
        ));
    }
    assert!(matches!(
        cg.set_vm("t-no-such-account", "vm", VmKnobs::default()),
        Err(CgroupError::Missing { .. })
    ));
    assert!(matches!(
        cg.attach(&acct, "nope", std::process::id()),
        Err(CgroupError::Missing { .. })
    ));
    let i = fx.spawn(&mut Command::new("true"));
    let gone = fx.pid(i);
    fx.wait(i, Duration::from_secs(10));
    let err = cg
        .attach(&acct, "vm", gone)
        .expect_err("attach a reaped pid");
    assert!(matches!(err, CgroupError::NoSuchProcess { .. }), "{err}");

    // Attach, contains, and refusal to remove while busy.
    let i = fx.spawn(Command::new("sleep").arg("60"));
    let pid = fx.pid(i);
    assert!(!cg.contains(&acct, "vm", pid));
    cg.attach(&acct, "vm", pid).expect("attach");
    cg.attach(&acct, "vm", pid).expect("attach again");
    assert!(cg.contains(&acct, "vm", pid));
    assert!(!cg.contains(&acct, "vm", std::process::id()));
    assert!(!cg.contains(&acct, "other", pid));
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
    eprintln!("/proc/{pid}/cgroup:\n{own}");
    let err = cg.remove_vm(&acct, "vm").expect_err("busy VM");
    assert!(matches!(err, CgroupError::Busy { .. }), "{err}");
    eprintln!("remove_vm while busy: {err}");
    let err = cg.remove_account(&acct).expect_err("busy account");
    assert!(matches!(err, CgroupError::Busy { .. }), "{err}");
    eprintln!("remove_account with a VM group: {err}");
    assert!(
        vm_dirs.iter().all(|d| d.is_dir()),
        "nothing removed while busy"
    );
    assert_eq!(cg.list_vms(&acct).expect("list"), vec!["vm".to_owned()]);
    assert!(cg.list_accounts().expect("list").contains(&acct));

    fx.kill_all();
    cg.remove_vm(&acct, "vm").expect("remove_vm");
    cg.remove_vm(&acct, "vm").expect("remove_vm again");
    assert!(vm_dirs.iter().all(|d| !d.exists()));
    assert!(matches!(
        cg.vm_usage(&acct, "vm"),
        Err(CgroupError::Missing { .. })
    ));
    cg.remove_account(&acct).expect("remove_account");
    cg.remove_account(&acct).expect("remove_account again");
    assert!(dirs.iter().all(|d| !d.exists()));
    assert!(!cg.list_accounts().expect("list").contains(&acct));
}
