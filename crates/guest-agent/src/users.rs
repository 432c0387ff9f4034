//! Users and groups, read straight from `/etc/passwd` and `/etc/group`: a static glibc cannot
//! load NSS modules reliably, and the guest images keep their accounts in these files anyway.

use std::path::Path;

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// Finds `name` in the text of an `/etc/passwd` file. Comments, blank, malformed and NIS
/// (`+`/`-`) lines are skipped; an empty shell means `/bin/sh`.
pub fn parse_passwd(text: &str, name: &str) -> Option<Account> {
    text.lines().find_map(|line| {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.starts_with('+') || line.starts_with('-') {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name || name.is_empty() {
            return None;
        }
        let shell = if fields[6].is_empty() {
            "/bin/sh"
        } else {
            fields[6]
        };
        Some(Account {
            name: fields[0].to_string(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_string(),
            shell: shell.to_string(),
        })
    })
}

/// The groups of `user` from the text of an `/etc/group` file: `primary` first, then every group
/// that lists the user as a member, without duplicates.
pub fn parse_groups(text: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.starts_with('+') || line.starts_with('-') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|m| m.trim() == user) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// Looks up `name` and its groups under `etc` (normally `/etc`).
pub fn lookup_in(etc: &Path, name: &str) -> Option<(Account, Vec<u32>)> {
    let passwd = std::fs::read_to_string(etc.join("passwd")).ok()?;
    let account = parse_passwd(&passwd, name)?;
    // A missing /etc/group only costs the supplementary groups.
    let group = std::fs::read_to_string(etc.join("group")).unwrap_or_default();
    let groups = parse_groups(&group, name, account.gid);
    Some((account, groups))
}

/// Looks up `name` and its groups in `/etc`.
pub fn lookup(name: &str) -> Option<(Account, Vec<u32>)> {
    lookup_in(Path::new("/etc"), name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# comment line
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken:x:notanumber:1::/nowhere:/bin/sh
short:x:5
alice:x:1000:1000:Alice,,,:/home/alice:
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
+nisuser::::::
";

    const GROUP: &str = "\
root:x:0:
wheel:x:10:root,alice
users:x:100:bob, alice
alice:x:1000:
bad:x:oops:alice
docker:x:999:alice
nogroup:x:65534:
";

    #[test]
    fn finds_users_and_defaults_the_shell() {
        let alice = parse_passwd(PASSWD, "alice").unwrap();
        assert_eq!(
            alice,
            Account {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/sh".into(),
            }
        );
        let root = parse_passwd(PASSWD, "root").unwrap();
        assert_eq!(
            (root.uid, root.gid, root.shell.as_str()),
            (0, 0, "/bin/bash")
        );
        assert_eq!(parse_passwd(PASSWD, "nobody").unwrap().uid, 65534);
    }

    #[test]
    fn skips_missing_malformed_and_nis_entries() {
        assert_eq!(parse_passwd(PASSWD, "mallory"), None);
        assert_eq!(parse_passwd(PASSWD, "broken"), None);
        assert_eq!(parse_passwd(PASSWD, "short"), None);
        assert_eq!(parse_passwd(PASSWD, "+nisuser"), None);
        assert_eq!(parse_passwd(PASSWD, ""), None);
        // A prefix of a name is not the name.
        assert_eq!(parse_passwd(PASSWD, "ali"), None);
    }

    #[test]
    fn collects_supplementary_groups() {
        assert_eq!(parse_groups(GROUP, "alice", 1000), vec![1000, 10, 100, 999]);
        assert_eq!(parse_groups(GROUP, "root", 0), vec![0, 10]);
        assert_eq!(parse_groups(GROUP, "nobody", 65534), vec![65534]);
        // Primary group listed again as a membership is not duplicated.
        assert_eq!(parse_groups("wheel:x:10:carol\n", "carol", 10), vec![10]);
    }

    #[test]
    fn lookup_reads_files_from_a_directory() {
        let dir = std::env::temp_dir().join(format!("nook-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("passwd"), PASSWD).unwrap();
        std::fs::write(dir.join("group"), GROUP).unwrap();
        let (acct, groups) = lookup_in(&dir, "alice").unwrap();
        assert_eq!(acct.uid, 1000);
        assert_eq!(groups, vec![1000, 10, 100, 999]);
        std::fs::remove_file(dir.join("group")).unwrap();
        let (_, groups) = lookup_in(&dir, "alice").unwrap();
        assert_eq!(groups, vec![1000]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
