//! System test (root, real QEMU guest on the full Debian image): systemd reaches
//! multi-user.target and the agent runs commands, as root and as the `nook` user.

mod common;

use common::Daemon;

#[test]
fn vm_default_image_boots_systemd_to_multi_user() {
    let d = Daemon::start();
    let out = d.ok(&[
        "vm", "create", "--image", "default", "--name", "deb", "--cpu", "2", "--memory", "1G",
        "--json",
    ]);
    let vm: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(vm["state"], "running");
    let target = d.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "sh",
        "-c",
        "systemctl is-system-running --wait >/dev/null; systemctl is-active multi-user.target",
    ]);
    assert_eq!(target, "active\n");
    assert_eq!(
        d.ok(&["vm", "exec", "deb", "--user", "nook", "--", "id", "-un"]),
        "nook\n"
    );
    assert_eq!(
        d.ok(&[
            "vm", "exec", "deb", "--user", "nook", "--", "sudo", "-n", "id", "-u"
        ]),
        "0\n"
    );
    assert_eq!(d.ok(&["vm", "exec", "deb", "--", "hostname"]), "deb\n");
    // udev must not rename the link under the agent (`net.ifnames=0`): the address is on eth0.
    let addr = d.ok(&[
        "vm", "exec", "deb", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert!(addr.contains("inet 10.200."), "{addr}");
    let tools = d.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "sh",
        "-c",
        "for t in git curl python3 gcc chromium sshd; do command -v $t; done | wc -l",
    ]);
    assert_eq!(tools.trim(), "6", "missing tools in the default image");
    // Every VM gets its own machine-id and SSH host keys, not the image's.
    let id = d.ok(&["vm", "exec", "deb", "--", "cat", "/etc/machine-id"]);
    assert_eq!(id.trim().len(), 32, "{id}");
    d.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "test",
        "-s",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]);
}
