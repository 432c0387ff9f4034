//! System tests (root, the real daemon, the real OpenSSH client): attacks on who someone is.
//! Each test names the attack it shows failing. An email or an SSH key counts only once it is
//! proven; signup is closed to strangers unless the host's admin opens it.

mod common;

use common::{Daemon, Key};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_error(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(stderr(out).lines().next().unwrap_or("")).unwrap_or_else(|e| {
        panic!("not a JSON error ({e}): {}", stderr(out));
    })
}

fn public_key(key: &Key) -> String {
    std::fs::read_to_string(key.path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_string()
}

/// The last word of the line holding `marker`: the code a command printed.
fn code_after(text: &str, marker: &str) -> String {
    text.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no {marker:?} in {text}"))
        .to_string()
}

#[test]
fn attack_signup_as_an_invitees_email_gets_no_share_and_no_ssh() {
    // Open signup: anyone may make an account, but an email nobody proved grants nothing.
    let d = Daemon::start_with(&["--signup", "open"]);
    let (alice, mallory) = (Key::new("alice"), Key::new("mallory"));
    d.signup(&alice, "alice@example.com");
    d.lobby_ok(&alice, &["new", "--name", "web", "--image", "tiny"]);
    d.lobby_ok(
        &alice,
        &[
            "share",
            "add",
            "web",
            "victim@corp.example",
            "--role",
            "collaborator",
        ],
    );

    // Mallory claims the invitee's address before the invitee signs up.
    let made = d.lobby_ok(&mallory, &["signup", "victim@corp.example"]);
    assert!(made.contains("unconfirmed"), "{made}");
    let me: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&mallory, &["whoami", "--json"])).expect("whoami");
    assert_eq!(me["email_verified"], false, "{me}");

    // The share does not reach Mallory's account: no shell in the VM, which looks missing.
    let shell = d.ssh(&mallory, "web", &["hostname"]);
    assert!(
        !shell.status.success() && !stdout(&shell).contains("web"),
        "an unproven email got a shell: {}{}",
        stdout(&shell),
        stderr(&shell)
    );
    let missing = d.ssh(&mallory, "nosuchvm", &["hostname"]);
    assert_eq!(shell.status.code(), missing.status.code());

    // Once the admin vouches for the address, the share applies: the check was the proof.
    d.ok(&["account", "verify", "victim@corp.example"]);
    let listed = d.ok(&["account", "list"]);
    assert!(
        !listed.contains("victim@corp.example (unconfirmed)"),
        "{listed}"
    );
    let shell = d.ssh(&mallory, "web", &["hostname"]);
    assert_eq!(stdout(&shell), "web\n", "{}", stderr(&shell));
}

#[test]
fn attack_ssh_key_add_of_a_victims_public_key_does_not_take_the_key() {
    let d = Daemon::start();
    let (alice, mallory, victim) = (Key::new("alice"), Key::new("mallory"), Key::new("victim"));
    d.signup(&alice, "alice@example.com");
    d.signup(&mallory, "mallory@example.com");

    // Mallory adds the victim's public key (anyone can fetch it from a code host).
    let claim = d.lobby_ok(&mallory, &["ssh-key", "add", &public_key(&victim)]);
    let code = code_after(&claim, "ssh-key confirm");
    // The key is not Mallory's: the victim is still a stranger, not someone in her account.
    let out = d.ssh(&victim, "lobby", &["whoami", "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "not_signed_up");
    let keys = d.lobby_ok(&mallory, &["ssh-key", "list"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
    // Mallory cannot redeem the code herself: only the key's holder can.
    let out = d.ssh(&mallory, "lobby", &["ssh-key", "confirm", &code, "--json"]);
    assert!(!out.status.success());
    assert_eq!(json_error(&out)["error"]["code"], "key_taken");
    // A code redeemed with another key is spent, so codes cannot be tried key after key.
    let stranger = Key::new("stranger");
    let out = d.ssh(&stranger, "lobby", &["ssh-key", "confirm", &code, "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "invalid_code");
    let out = d.ssh(&victim, "lobby", &["ssh-key", "confirm", &code, "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "invalid_code");
    let out = d.ssh(&victim, "lobby", &["whoami"]);
    assert!(!out.status.success(), "{}", stdout(&out));

    // The honest path: Alice adds her second key and confirms from it.
    let laptop = Key::new("laptop");
    let claim = d.lobby_ok(&alice, &["ssh-key", "add", &public_key(&laptop)]);
    let code = code_after(&claim, "ssh-key confirm");
    let added = d.lobby_ok(&laptop, &["ssh-key", "confirm", &code]);
    assert!(added.contains("alice@example.com"), "{added}");
    assert!(
        d.lobby_ok(&laptop, &["whoami"])
            .contains("alice@example.com")
    );
    let out = d.ssh(&laptop, "lobby", &["ssh-key", "confirm", &code, "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "key_taken");
}

#[test]
fn attack_signup_by_a_stranger_needs_an_invite_by_default() {
    let d = Daemon::start();
    let (owner, stranger, friend) = (Key::new("owner"), Key::new("stranger"), Key::new("friend"));
    // The first account on a fresh host signs up straight away and owns the host.
    let welcome = d.lobby_ok(&owner, &["signup", "owner@example.com"]);
    assert!(welcome.contains("You own this host"), "{welcome}");

    // Anyone else needs an invite; the error says how to get one.
    let out = d.ssh(&stranger, "lobby", &["signup", "stranger@example.com"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs an invite"), "{}", stderr(&out));
    let out = d.ssh(
        &stranger,
        "lobby",
        &["signup", "stranger@example.com", "--json"],
    );
    assert_eq!(json_error(&out)["error"]["code"], "signup_closed");

    // The owner invites from the lobby; the code works once, for its email only.
    let invite = d.lobby_ok(&owner, &["invite", "friend@example.com"]);
    let code = code_after(&invite, "--invite");
    let out = d.ssh(
        &stranger,
        "lobby",
        &[
            "signup",
            "stranger@example.com",
            "--invite",
            &code,
            "--json",
        ],
    );
    assert_eq!(json_error(&out)["error"]["code"], "invalid_code");
    d.lobby_ok(
        &friend,
        &["signup", "friend@example.com", "--invite", &code],
    );
    let me: serde_json::Value =
        serde_json::from_str(&d.lobby_ok(&friend, &["whoami", "--json"])).expect("whoami");
    assert_eq!(me["email_verified"], true, "{me}");
    assert_eq!(me["owner"], false, "{me}");
    let late = Key::new("late");
    let out = d.ssh(
        &late,
        "lobby",
        &["signup", "friend2@example.com", "--invite", &code, "--json"],
    );
    assert_eq!(json_error(&out)["error"]["code"], "invalid_code");

    // Only the owner invites.
    let out = d.ssh(&friend, "lobby", &["invite", "x@example.com", "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "forbidden");
    // An invite for someone who already has an account is refused, not wasted.
    let out = d.ssh(&owner, "lobby", &["invite", "friend@example.com", "--json"]);
    assert_eq!(json_error(&out)["error"]["code"], "email_taken");

    // The admin adds an account directly, its email confirmed.
    let added = Key::new("added");
    let pubfile = added.path.with_extension("pub");
    d.ok(&[
        "account",
        "add",
        "added@example.com",
        "--key",
        pubfile.to_str().expect("path"),
    ]);
    assert!(
        d.lobby_ok(&added, &["whoami"])
            .contains("added@example.com")
    );
    let listed = d.ok(&["account", "list"]);
    assert!(listed.contains("owner@example.com (owner)"), "{listed}");
    assert!(listed.contains("added@example.com\n"), "{listed}");
}

#[test]
fn attack_signup_on_a_closed_host_is_refused() {
    let d = Daemon::start_with(&["--signup", "closed"]);
    let (owner, stranger) = (Key::new("owner"), Key::new("stranger"));
    d.lobby_ok(&owner, &["signup", "owner@example.com"]);
    let out = d.ssh(&stranger, "lobby", &["signup", "stranger@example.com"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("takes no signups"),
        "{}",
        stderr(&out)
    );
    // A bad policy is named at start.
    let out = std::process::Command::new(common::nook_bin())
        .args(["serve", "--signup", "sometimes"])
        .env("NOOK_DATA_DIR", d.data_dir.join("other"))
        .output()
        .expect("nook serve");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("signup") && stderr(&out).contains("open, email, invite or closed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn attack_signup_flood_from_one_address_is_throttled() {
    let d = Daemon::start_with(&["--signup", "open"]);
    // 20 signups from one address pass (the first makes the owner); the next is refused,
    // saying when to come back, and makes no account.
    for i in 0..20 {
        let key = Key::new(&format!("k{i}"));
        d.lobby_ok(&key, &["signup", &format!("user{i}@example.com")]);
    }
    let late = Key::new("late");
    let out = d.ssh(&late, "lobby", &["signup", "late@example.com", "--json"]);
    let err = json_error(&out);
    assert_eq!(err["error"]["code"], "rate_limited", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("try again in"),
        "{err}"
    );
    let listed = d.ok(&["account", "list"]);
    assert!(!listed.contains("late@example.com"), "{listed}");
    assert_eq!(listed.lines().count(), 20, "{listed}");
}

/// `Uid:` and `Gid:` of `/proc/PID/status` (real, effective, saved, filesystem), `Seccomp:`
/// and `NoNewPrivs:`.
fn process_status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

/// Runs `cmd` as `uid` (no groups) inside QEMU `pid`'s mount namespace and root, or on the
/// host when `pid` is None.
fn as_uid(pid: Option<u32>, uid: &str, cmd: &[&str]) -> std::process::Output {
    let mut argv: Vec<String> = Vec::new();
    if let Some(pid) = pid {
        argv.extend(["nsenter", "-t", &pid.to_string(), "-m", "-r", "--"].map(String::from));
    }
    argv.extend(
        [
            "/usr/bin/setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]
        .map(String::from),
    );
    argv.extend(cmd.iter().map(|s| s.to_string()));
    std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("run setpriv")
}

#[test]
fn attack_qemu_escape_runs_as_its_own_uid_and_sees_no_other_vm() {
    let d = Daemon::start();
    d.create_tiny("jail-a");
    d.create_tiny("jail-b");
    let (a, b) = (d.vm("jail-a"), d.vm("jail-b"));
    let vm_dir =
        |vm: &serde_json::Value| d.data_dir.join("vms").join(vm["id"].as_str().expect("id"));
    let pid_of = |vm: &serde_json::Value| {
        let pids = common::qemu_pids_of_vm(vm["id"].as_str().expect("id"));
        assert_eq!(pids.len(), 1, "QEMUs of {vm}: {pids:?}");
        pids[0]
    };
    let (pid_a, pid_b) = (pid_of(&a), pid_of(&b));
    let (status_a, status_b) = (process_status(pid_a), process_status(pid_b));
    let uid_a = status_a["Uid"].split(' ').next().expect("uid").to_string();
    for (status, name) in [(&status_a, "jail-a"), (&status_b, "jail-b")] {
        let uid = status["Uid"].split(' ').next().expect("uid");
        assert_ne!(uid, "0", "{name}'s QEMU runs as root: {status:?}");
        assert_eq!(status["Uid"], [uid; 4].join(" "), "{name}: {status:?}");
        assert_eq!(status["Gid"], [uid; 4].join(" "), "{name}: {status:?}");
        assert_eq!(
            status["Seccomp"], "2",
            "{name}'s QEMU has no seccomp filter"
        );
        assert_eq!(status["NoNewPrivs"], "1", "{name}");
        assert_eq!(status["Groups"], "", "{name} keeps supplementary groups");
    }
    assert_ne!(status_a["Uid"], status_b["Uid"], "two VMs share a uid");
    // A network namespace of its own: no host address, loopback service or abstract socket.
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns");
    assert_ne!(
        netns(&pid_a.to_string()),
        netns("self"),
        "a's QEMU shares the host's network"
    );

    let disk_a = vm_dir(&a).join("disk.qcow2");
    let disk_b = vm_dir(&b).join("disk.qcow2");
    let db = d.data_dir.join("nook.sqlite");
    let text = |p: &std::path::Path| p.display().to_string();

    // On the host, a's uid can open neither b's disk nor the database.
    for target in [&disk_b, &db, &disk_a] {
        let out = as_uid(None, &uid_a, &["/usr/bin/head", "-c", "4", &text(target)]);
        assert!(
            !out.status.success(),
            "a's uid read {} on the host",
            target.display()
        );
    }
    // Inside a's jail: b's disk and the database do not exist, a's own disk does, and
    // nothing can be created.
    let jailed = |cmd: &[&str]| as_uid(Some(pid_a), &uid_a, cmd);
    for target in [&disk_b, &db] {
        let out = jailed(&["/usr/bin/head", "-c", "4", &text(target)]);
        assert!(
            stderr(&out).contains("No such file"),
            "{} is visible in a's jail: {}",
            target.display(),
            stderr(&out)
        );
    }
    let own = jailed(&["/usr/bin/head", "-c", "4", &text(&disk_a)]);
    assert!(
        own.status.success(),
        "a's QEMU cannot read its own disk: {}",
        stderr(&own)
    );
    assert_eq!(&own.stdout[..], b"QFI\xfb");
    for place in [
        std::path::PathBuf::from("/escape"),
        vm_dir(&a).join("escape"),
    ] {
        let out = jailed(&["/usr/bin/touch", &text(&place)]);
        assert!(!out.status.success(), "a's uid created {}", place.display());
    }
    // The VM's own directory is only traversable: its keys and logs are root's.
    let listing = jailed(&["/usr/bin/ls", &text(&vm_dir(&a))]);
    assert!(
        !listing.status.success(),
        "a's uid lists its VM directory: {}",
        stdout(&listing)
    );
}

/// A clone reads the layer its source's old top became. An escaped QEMU of the source must
/// not write it afterwards: QEMU holds it read-only, and the file is root's.
#[test]
fn attack_source_of_a_clone_cannot_write_the_layer_they_share() {
    use std::os::unix::fs::MetadataExt;
    // The fork's QEMUs stay as the fork made them (no move into memory of their own).
    let d = Daemon::start_with(&["--fork-memory", "shared"]);
    d.create_tiny("origin");
    d.ok(&["vm", "cp", "origin", "copy"]);
    // Files are matched by inode: the source opened its layer under its old top's name.
    let layers: Vec<(u64, u64)> = std::fs::read_dir(d.data_dir.join("layers"))
        .expect("layers")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let mut checked = 0;
    for name in ["origin", "copy"] {
        let vm = d.vm(name);
        let pids = common::qemu_pids_of_vm(vm["id"].as_str().expect("id"));
        assert_eq!(pids.len(), 1, "QEMUs of {name}: {pids:?}");
        for fd in std::fs::read_dir(format!("/proc/{}/fd", pids[0]))
            .expect("fds")
            .flatten()
        {
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if !layers.contains(&(meta.dev(), meta.ino())) {
                continue;
            }
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let info = std::fs::read_to_string(format!(
                "/proc/{}/fdinfo/{}",
                pids[0],
                fd.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .expect("flags");
            assert_eq!(
                flags & 0o3,
                0,
                "{name}'s QEMU holds layer {} open for writing",
                target.display()
            );
            assert_eq!(
                (meta.uid(), meta.mode() & 0o777),
                (0, 0o644),
                "layer {} is not root's and read-only",
                target.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "no QEMU has the shared layer open ({checked})"
    );
}

/// The same forgery aimed at root's `qemu-img`: a stopped VM's top names an external data
/// file (a host file), which `resize` would grow and a flatten would write through. Nook
/// refuses the disk, and the named file keeps its size.
#[test]
fn attack_disk_header_naming_a_data_file_is_not_grown_by_resize() {
    let d = Daemon::start();
    let owner = Key::new("forger");
    d.signup(&owner, "forger@example.com");
    d.lobby_ok(&owner, &["new", "--name", "forged", "--image", "tiny"]);
    d.lobby_ok(&owner, &["stop", "forged"]);
    let id = d
        .list()
        .into_iter()
        .find(|vm| vm["name"] == "forged")
        .and_then(|vm| vm["id"].as_str().map(str::to_string))
        .expect("forged's id");
    let disk = d.data_dir.join("vms").join(id).join("disk.qcow2");
    let bait = tempfile::NamedTempFile::new().expect("bait");
    std::fs::write(bait.path(), b"host secret").expect("bait");
    // What an escaped QEMU can do to the top it owns: make it a qcow2 whose data lives in a
    // file elsewhere (made on a decoy, then renamed to the bait in the header).
    let decoy = tempfile::NamedTempFile::new().expect("decoy");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", decoy.path().display()))
        .arg(&disk)
        .arg("1G")
        .output()
        .expect("qemu-img");
    assert!(made.status.success(), "{}", stderr(&made));
    let amended = std::process::Command::new("qemu-img")
        .args(["amend", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", bait.path().display()))
        .arg(&disk)
        .output()
        .expect("qemu-img");
    assert!(amended.status.success(), "{}", stderr(&amended));

    let out = d.ssh(&owner, "lobby", &["resize", "forged", "--disk", "3G"]);
    assert!(
        !out.status.success(),
        "resize of a forged disk went through"
    );
    assert!(
        stderr(&out).contains("backing file nook did not make"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::metadata(bait.path()).expect("bait").len(),
        11,
        "root's qemu-img grew the named host file"
    );
    let out = d.ssh(&owner, "lobby", &["start", "forged"]);
    assert!(!out.status.success(), "a forged disk started");
    assert!(
        d.qemu_pids().is_empty(),
        "a QEMU started on the forged disk"
    );
}

/// An escaped QEMU owns its disk top and can write any backing-file name into its header, for
/// the root daemon to follow at the next start (another VM's disk through `/proc`, a host
/// file). Such a VM is not started, and the named file is left as it was.
#[test]
fn attack_disk_header_naming_a_host_file_is_refused_at_start() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start();
    let vm = d.create_tiny("forged");
    d.ok(&["vm", "stop", "forged"]);
    let disk = d
        .data_dir
        .join("vms")
        .join(vm["id"].as_str().expect("id"))
        .join("disk.qcow2");
    let bait = tempfile::NamedTempFile::new().expect("bait");
    std::fs::write(bait.path(), b"host secret").expect("bait");
    let before = std::fs::metadata(bait.path()).expect("bait");
    let out = std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-F", "raw", "-b"])
        .arg(bait.path())
        .arg(&disk)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", stderr(&out));

    let err = d.fails(&["vm", "start", "forged"]);
    // Refused either way: the name is no layer, and the host file is no qcow2 to read on from.
    assert!(
        err.contains("backing file nook did not make") || err.contains("the disk's chain"),
        "{err}"
    );
    let after = std::fs::metadata(bait.path()).expect("bait");
    assert_eq!(
        (after.uid(), after.mode()),
        (before.uid(), before.mode()),
        "the daemon changed the named file"
    );
    assert!(
        d.qemu_pids().is_empty(),
        "a QEMU started on the forged disk"
    );
}
