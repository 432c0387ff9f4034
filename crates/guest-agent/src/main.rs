//! `nook-guest-agent`: boot set-up, then serve the virtio-serial port forever.
//!
//! Usage: `nook-guest-agent [--port PATH] [--no-setup]`

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "Usage: nook-guest-agent [--port PATH] [--no-setup]
  --port PATH   serve this device or FIFO instead of the virtio-serial port named org.nook.agent.0
  --no-setup    skip boot set-up (hostname, network, DNS, root filesystem growth)";

fn main() -> ExitCode {
    let mut port: Option<PathBuf> = None;
    let mut setup = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => match args.next() {
                Some(p) => port = Some(PathBuf::from(p)),
                None => {
                    eprintln!("--port needs a path\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--no-setup" => setup = false,
            "--version" | "-V" => {
                println!("nook-guest-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    nook_guest_agent::logger::start();
    nook_guest_agent::logger::line(format!("version {} starting", env!("CARGO_PKG_VERSION")));
    if setup {
        nook_guest_agent::boot::setup();
    }
    let agent = nook_guest_agent::Agent::new();
    nook_guest_agent::port::run(&agent, port.as_deref())
}
