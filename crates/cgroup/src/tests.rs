//! Unit tests on fake trees of plain files; the real kernel is exercised by
//! `tests/root_cgroups.rs`.

use std::fs;

use super::*;

struct TempTree(PathBuf);

impl TempTree {
    fn new(tag: &str) -> TempTree {
        let p = std::env::temp_dir().join(format!("nook-cgroup-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("temp dir");
        TempTree(p)
    }

    /// Creates `rel` (a file) with `content`, and its parent directories.
    fn file(&self, rel: &str, content: &str) {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, content).expect("write");
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.0.join(rel)).expect("read")
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn names() {
    for ok in ["a", "0123abcdef", "acct-1", "vm_2", &"f".repeat(64)] {
        assert!(check_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "..",
        ".",
        "a/b",
        "A",
        "a.b",
        "tasks",
        "cgroup.procs",
        &"f".repeat(65),
        "é",
    ] {
        assert!(
            matches!(check_name(bad), Err(CgroupError::InvalidName(_))),
            "{bad}"
        );
    }
}

#[test]
fn quotas() {
    assert_eq!(quota_us(2.0).ok(), Some(Some(200_000)));
    assert_eq!(quota_us(0.2).ok(), Some(Some(20_000)));
    assert_eq!(quota_us(0.01).ok(), Some(Some(1_000)));
    assert_eq!(quota_us(f64::INFINITY).ok(), Some(None));
    for bad in [0.0, -1.0, 0.001, f64::NAN, f64::NEG_INFINITY] {
        assert!(matches!(quota_us(bad), Err(CgroupError::InvalidLimit(_))));
    }
}

#[test]
fn probe_prefers_usable_v2_then_v1() {
    let t = TempTree::new("probe");
    t.file("unified/cgroup.controllers", "hugetlb\n");
    t.file("v2/cgroup.controllers", "cpuset cpu io memory pids\n");
    let mount = |point: &str, fstype: &str, opts: &str, ro: bool| mounts::Mount {
        point: t.0.join(point),
        fstype: fstype.to_owned(),
        options: opts.split(',').map(str::to_owned).collect(),
        read_only: ro,
    };
    // Hybrid: v2 has only hugetlb, so v1 is used, with cpuacct and pids.
    let hybrid = [
        mount("cpu", "cgroup", "rw,cpu", false),
        mount("cpuacct", "cgroup", "rw,cpuacct", false),
        mount("cpuset", "cgroup", "rw,cpuset", false),
        mount("memory", "cgroup", "rw,memory", false),
        mount("pids", "cgroup", "rw,pids", false),
        mount("unified", "cgroup2", "rw", false),
    ];
    let cg = Cgroups::from_mounts(&hybrid).expect("v1");
    assert_eq!(cg.flavor(), Flavor::V1);
    let roots: Vec<_> = ["cpu", "memory", "cpuacct", "pids"]
        .iter()
        .map(|r| t.0.join(r))
        .collect();
    assert_eq!(cg.roots(), roots);

    // Co-mounted cpu,cpuacct counts once.
    let comounted = [
        mount("cpu,cpuacct", "cgroup", "rw,cpu,cpuacct", false),
        mount("memory", "cgroup", "rw,memory", false),
    ];
    let cg = Cgroups::from_mounts(&comounted).expect("v1");
    assert_eq!(cg.roots().len(), 2);

    // v2-only.
    let v2 = [mount("v2", "cgroup2", "rw,nsdelegate", false)];
    let cg = Cgroups::from_mounts(&v2).expect("v2");
    assert_eq!(cg.flavor(), Flavor::V2);
    assert_eq!(cg.roots(), vec![t.0.join("v2")]);

    // Nothing usable.
    let none = [
        mount("unified", "cgroup2", "rw", false),
        mount("cpu", "cgroup", "rw,cpu", true),
        mount("memory", "cgroup", "rw,memory", false),
    ];
    let err = Cgroups::from_mounts(&none).expect_err("unusable");
    let msg = err.to_string();
    assert!(
        msg.contains("read-only") && msg.contains("lacks cpu or memory"),
        "{msg}"
    );
    assert!(matches!(err, CgroupError::NotAvailable(_)));
}

#[test]
fn v2_files_on_a_fake_tree() {
    let t = TempTree::new("v2");
    t.file("cgroup.controllers", "cpu memory pids\n");
    t.file("cgroup.subtree_control", "");
    t.file("nook/cgroup.subtree_control", "");
    for f in ["cpu.max", "memory.max", "memory.swap.max"] {
        t.file(&format!("nook/a1/{f}"), "");
    }
    t.file("nook/a1/cgroup.subtree_control", "");
    for f in ["cpu.weight", "memory.high", "cgroup.procs"] {
        t.file(&format!("nook/a1/v1/{f}"), "");
    }
    t.file("nook/a1/v1/cpu.stat", "usage_usec 1500\nuser_usec 1000\n");
    t.file("nook/a1/v1/memory.current", "4096\n");
    let cg = Cgroups {
        backend: Backend::V2(v2::V2 { root: t.0.clone() }),
        top: PathBuf::from(TOP),
    };
    let limits = AccountLimits {
        cpus: 1.5,
        memory_bytes: 1 << 30,
        swap_bytes: 0,
    };
    cg.set_account("a1", limits).expect("set_account");
    assert_eq!(t.read("cgroup.subtree_control"), "+cpu +memory");
    assert_eq!(t.read("nook/cgroup.subtree_control"), "+cpu +memory");
    assert_eq!(t.read("nook/a1/cgroup.subtree_control"), "+cpu +memory");
    assert_eq!(t.read("nook/a1/cpu.max"), "150000 100000");
    assert_eq!(t.read("nook/a1/memory.max"), "1073741824");
    assert_eq!(t.read("nook/a1/memory.swap.max"), "0");
    // With packing, swap may extend the cap by what the account is allowed.
    let packed = AccountLimits {
        swap_bytes: 3 << 30,
        ..limits
    };
    cg.set_account("a1", packed).expect("set_account");
    assert_eq!(t.read("nook/a1/memory.swap.max"), "3221225472");

    let knobs = VmKnobs {
        cpu_weight: 250,
        memory_high: Some(512 << 20),
    };
    cg.set_vm("a1", "v1", knobs).expect("set_vm");
    assert_eq!(t.read("nook/a1/v1/cpu.weight"), "250");
    assert_eq!(t.read("nook/a1/v1/memory.high"), "536870912");
    cg.set_vm("a1", "v1", VmKnobs::default()).expect("set_vm");
    assert_eq!(t.read("nook/a1/v1/memory.high"), "max");
    let unlimited = AccountLimits {
        cpus: f64::INFINITY,
        memory_bytes: u64::MAX,
        swap_bytes: 0,
    };
    cg.set_account("a1", unlimited).expect("set_account");
    assert_eq!(t.read("nook/a1/cpu.max"), "max 100000");
    assert_eq!(t.read("nook/a1/memory.max"), "max");

    let u = cg.vm_usage("a1", "v1").expect("usage");
    assert_eq!((u.cpu_usage_ns, u.memory_bytes), (1_500_000, 4096));
    assert!(matches!(
        cg.set_vm("a2", "v1", knobs),
        Err(CgroupError::Missing { .. })
    ));
    assert!(matches!(
        cg.set_vm(
            "a1",
            "v1",
            VmKnobs {
                cpu_weight: 0,
                memory_high: None
            }
        ),
        Err(CgroupError::InvalidLimit(_))
    ));
    assert_eq!(cg.list_accounts().expect("list"), vec!["a1".to_owned()]);
    assert_eq!(cg.list_vms("a1").expect("list"), vec!["v1".to_owned()]);
}

#[test]
fn v1_files_on_a_fake_tree() {
    let t = TempTree::new("v1");
    for f in ["cpu.cfs_period_us", "cpu.cfs_quota_us"] {
        t.file(&format!("cpu/nook/a1/{f}"), "");
    }
    for f in ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"] {
        t.file(&format!("memory/nook/a1/{f}"), "");
    }
    t.file("cpu/nook/a1/v1/cpu.shares", "");
    t.file("memory/nook/a1/v1/memory.soft_limit_in_bytes", "");
    let cg = Cgroups {
        backend: Backend::V1(v1::V1 {
            cpu: t.0.join("cpu"),
            memory: t.0.join("memory"),
            cpuacct: None,
            pids: None,
        }),
        top: PathBuf::from(TOP),
    };
    let limits = AccountLimits {
        cpus: 0.2,
        memory_bytes: 64 << 20,
        swap_bytes: 0,
    };
    cg.set_account("a1", limits).expect("set_account");
    assert_eq!(t.read("cpu/nook/a1/cpu.cfs_period_us"), "100000");
    assert_eq!(t.read("cpu/nook/a1/cpu.cfs_quota_us"), "20000");
    assert_eq!(t.read("memory/nook/a1/memory.limit_in_bytes"), "67108864");
    assert_eq!(
        t.read("memory/nook/a1/memory.memsw.limit_in_bytes"),
        "67108864"
    );
    let knobs = VmKnobs {
        cpu_weight: 1,
        memory_high: Some(1 << 20),
    };
    cg.set_vm("a1", "v1", knobs).expect("set_vm");
    assert_eq!(t.read("cpu/nook/a1/v1/cpu.shares"), "10");
    assert_eq!(
        t.read("memory/nook/a1/v1/memory.soft_limit_in_bytes"),
        "1048576"
    );
    cg.set_vm("a1", "v1", VmKnobs::default()).expect("set_vm");
    assert_eq!(t.read("cpu/nook/a1/v1/cpu.shares"), "1024");
    assert_eq!(t.read("memory/nook/a1/v1/memory.soft_limit_in_bytes"), "-1");
    assert!(matches!(
        cg.set_account(
            "a1",
            AccountLimits {
                cpus: 1.0,
                memory_bytes: 0,
                swap_bytes: 0,
            }
        ),
        Err(CgroupError::InvalidLimit(_))
    ));
}

#[test]
fn a_daemon_of_its_own_keeps_its_groups_under_its_own_top() {
    let cg = Cgroups {
        backend: Backend::V2(v2::V2 {
            root: PathBuf::from("/sys/fs/cgroup"),
        }),
        top: PathBuf::from(TOP),
    };
    let own = cg.clone().under("nook-h2").expect("a plain name");
    assert_eq!(own.top(), Path::new("nook-h2"));
    assert_eq!(
        own.group_dirs("a1", Some("v1")).expect("dirs"),
        vec![PathBuf::from("/sys/fs/cgroup/nook-h2/a1/v1")]
    );
    assert_eq!(
        cg.group_dirs("a1", None).expect("dirs"),
        vec![PathBuf::from("/sys/fs/cgroup/nook/a1")]
    );
    for bad in ["", "../etc", "a/b", "Nook"] {
        assert!(cg.clone().under(bad).is_err(), "{bad:?} was taken");
    }
}
