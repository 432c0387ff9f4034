//! The virtio-serial port: finding it, opening it, and serving it forever.
//!
//! When no host is connected, virtio-serial reads return 0 at once and writes block until one
//! connects. So end of file means "nobody there yet": the loop drops any partial frame, sleeps
//! and reads the same descriptor again. It is only reopened after a read error, because the
//! port can be open only once and spawn threads may still hold the old descriptor for writing.

use crate::Agent;
use nook_proto::FrameBuf;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

/// Where the kernel lists virtio-serial ports.
pub const SYS_PORTS: &str = "/sys/class/virtio-ports";
const EOF_DELAY: Duration = Duration::from_millis(100);
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// The device (`/dev/vportNpM`) of the port named `name`, from the listing in `sys_ports`.
pub fn find_port(sys_ports: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(sys_ports)
        .ok()?
        .filter_map(Result::ok)
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("name")).is_ok_and(|n| n.trim() == name)
        })
        .map(|entry| Path::new("/dev").join(entry.file_name()))
}

/// Opens the port at `path`, or the one named `nook_proto::PORT_NAME`, retrying until it
/// appears.
fn open(path: Option<&Path>) -> File {
    let mut logged = false;
    loop {
        let dev = match path {
            Some(p) => Some(p.to_path_buf()),
            None => find_port(Path::new(SYS_PORTS), nook_proto::PORT_NAME),
        };
        let result = dev
            .as_ref()
            .map(|dev| OpenOptions::new().read(true).write(true).open(dev));
        match result {
            Some(Ok(file)) => {
                if let Some(dev) = dev {
                    log!("serving {}", dev.display());
                }
                return file;
            }
            Some(Err(e)) if !logged => log!("cannot open the port yet: {e}; retrying"),
            None if !logged => log!("port {} not present yet; retrying", nook_proto::PORT_NAME),
            _ => {}
        }
        logged = true;
        sleep(RETRY_DELAY);
    }
}

/// Serves the port forever.
pub fn run(agent: &Agent, path: Option<&Path>) -> ! {
    let mut frames = FrameBuf::new();
    loop {
        let port = open(path);
        match port.try_clone() {
            Ok(writer) => agent.set_writer(writer),
            Err(e) => {
                log!("cannot duplicate the port descriptor: {e}");
                sleep(RETRY_DELAY);
                continue;
            }
        }
        loop {
            frames.clear();
            match agent.read_frames(&port, &mut frames) {
                Ok(()) => {
                    agent.host_gone();
                    sleep(EOF_DELAY);
                }
                Err(e) => {
                    log!("port read failed: {e}; reopening");
                    // Our last reference must go, or the reopen finds the port busy.
                    agent.disconnect();
                    drop(port);
                    sleep(RETRY_DELAY);
                    break;
                }
            }
        }
    }
}
