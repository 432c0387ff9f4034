//! Finding the cgroup hierarchies in `/proc/self/mountinfo`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mount {
    pub point: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    /// Super options: for v1 these name the controllers (`rw,cpu,cpuacct`).
    pub options: Vec<String>,
    pub read_only: bool,
}

impl Mount {
    pub fn has_option(&self, opt: &str) -> bool {
        self.options.iter().any(|o| o == opt)
    }
}

/// The cgroup mounts in a mountinfo text, in order. Malformed lines are skipped.
pub(crate) fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // id parent major:minor root point mount-opts [optional...] - fstype source super-opts
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let fstype = right.next()?;
    if fstype != "cgroup" && fstype != "cgroup2" {
        return None;
    }
    let _source = right.next()?;
    let options: Vec<String> = right
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    let point = unescape(left.get(4)?);
    let mount_ro = left.get(5)?.split(',').any(|o| o == "ro");
    let read_only = mount_ro || options.iter().any(|o| o == "ro");
    Some(Mount {
        point: PathBuf::from(point),
        fstype: fstype.to_owned(),
        options,
        read_only,
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host() {
        let m = cgroup_mounts(HYBRID);
        assert_eq!(m.len(), 7);
        assert_eq!(m[0].point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert!(m[0].has_option("cpu"));
        assert!(!m[2].has_option("cpu"), "cpuset is not cpu");
        assert_eq!(m[6].fstype, "cgroup2");
        assert!(m.iter().all(|m| !m.read_only));
    }

    #[test]
    fn v2_only_and_comounted_and_readonly() {
        let text = "\
25 19 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
26 19 0:23 / /sys/fs/cgroup/cpu,cpuacct ro,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
27 19 0:24 / /mnt/with\\040space rw - cgroup cgroup rw,memory
garbage line
";
        let m = cgroup_mounts(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].fstype, "cgroup2");
        assert!(!m[0].read_only);
        assert!(m[1].has_option("cpu") && m[1].has_option("cpuacct"));
        assert!(m[1].read_only);
        assert_eq!(m[2].point, PathBuf::from("/mnt/with space"));
    }
}
