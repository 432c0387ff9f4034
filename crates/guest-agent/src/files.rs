//! `ReadFile` and `WriteFile`.

use crate::Failure;
use std::fs::{OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};

/// Open flags for every file the host names: never wait for a FIFO's other end (the port loop
/// would stall), and never adopt a terminal as the agent's controlling tty.
const OPEN_FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;

/// Reads up to `len` bytes (capped at `nook_proto::CHUNK`) from `offset`. Short only at the end
/// of the file; empty at or after it.
pub fn read(path: &str, offset: u64, len: u32) -> Result<Vec<u8>, Failure> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS)
        .open(path)
        .map_err(|e| Failure::io(format!("open {path}"), &e))?;
    let want = (len as usize).min(nook_proto::CHUNK);
    let mut data = vec![0; want];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut data[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A FIFO or terminal: one plain read of what is there now, from the start only.
            Err(e) if e.raw_os_error() == Some(libc::ESPIPE) && offset == 0 && got == 0 => {
                got = match (&file).read(&mut data) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(Failure::io(format!("read {path}"), &e)),
                };
                break;
            }
            Err(e) => return Err(Failure::io(format!("read {path}"), &e)),
        }
    }
    data.truncate(got);
    Ok(data)
}

/// Replaces `path` with `data`, or appends to it. The parent directory must exist. `mode` is
/// applied exactly (umask aside) when the file is created, and left alone otherwise.
pub fn write(path: &str, data: &[u8], append: bool, mode: Option<u32>) -> Result<(), Failure> {
    let mut opts = OpenOptions::new();
    opts.write(true).custom_flags(OPEN_FLAGS);
    if append {
        opts.append(true);
    }
    let mut created = true;
    let mut create_opts = opts.clone();
    create_opts.create_new(true).mode(mode.unwrap_or(0o644));
    let file = match create_opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            created = false;
            if !append {
                opts.truncate(true);
            }
            opts.open(path)
                .map_err(|e| Failure::io(format!("open {path}"), &e))?
        }
        Err(e) => return Err(Failure::io(format!("create {path}"), &e)),
    };
    if let (true, Some(mode)) = (created, mode) {
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| Failure::io(format!("chmod {path}"), &e))?;
    }
    let mut file = file;
    file.write_all(data)
        .map_err(|e| Failure::io(format!("write {path}"), &e))
}
