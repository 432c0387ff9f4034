//! Fetches xterm.js from npm (the versions pinned in vendor/package-lock.json) so the binary
//! can embed it. Runs `npm ci` once; afterwards the files are on disk and nothing is fetched.

use std::path::Path;
use std::process::Command;

const FILES: &[&str] = &[
    "node_modules/@xterm/xterm/lib/xterm.js",
    "node_modules/@xterm/xterm/css/xterm.css",
    "node_modules/@xterm/addon-fit/lib/addon-fit.js",
];

fn main() {
    let vendor = Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor");
    println!("cargo:rerun-if-changed=vendor/package-lock.json");
    for f in FILES {
        println!("cargo:rerun-if-changed=vendor/{f}");
    }
    if FILES.iter().all(|f| vendor.join(f).is_file()) {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&vendor)
        .status();
    let ok = matches!(status, Ok(s) if s.success());
    if !ok || !FILES.iter().all(|f| vendor.join(f).is_file()) {
        panic!(
            "nook-web embeds xterm.js from npm, and `npm ci` in {} failed ({status:?}). \
             Install Node.js and npm (scripts/install-deps does), make sure the npm registry \
             is reachable, and build again.",
            vendor.display()
        );
    }
}
