//! The VM runtime: turns a [`LaunchSpec`] into a running QEMU, finds it again after the daemon
//! restarts, and talks to it over QMP and to the guest agent over virtio-serial.
//!
//! It knows nothing of accounts, names or the database: callers hand it paths and sizes.
//! QEMU processes run in process groups of their own so that they outlive the daemon; liveness
//! is observed through the QMP socket, never through `waitpid`.

pub mod agent;
pub mod console;
mod error;
pub mod fence_watch;
pub mod fork;
pub mod jail;
pub mod probe;
pub mod qemu;
pub mod qmp;
pub mod ram;
mod sys;
mod throttle;

/// The TCG translation cache nook gives each QEMU, in MiB, unless configured otherwise.
/// QEMU's default is up to 1 GiB, filled front to back as the guest runs new code and only
/// flushed when full: an idle default-image VM had written 267 MiB of it within minutes of
/// its boot, most of it code its boot ran once, which packing then moved to swap. 128 MiB
/// holds what a guest runs again; a boot fills it about twice. Measured on idle default VMs
/// with `--pack dense` (README): the host's MemAvailable 62 MiB lower per VM against 109, and
/// waking as fast; 64 MiB saved no more and slowed boots and requests by flushing.
/// (Under QEMU 7.2 forks taken across a flush woke corrupted until the precopy fix in
/// `ram.rs`; they no longer do: `bench/fork_fresh.sh`.)
pub const TCG_CACHE_MIB: u32 = 128;

pub use agent::{AgentClient, Held, Identified, NextConnection, Process, ProcessHandle};
pub use error::VmmError;
pub use jail::Jail;
pub use probe::{Accel, probe_accel};
pub use qemu::{Hypervisor, LaunchSpec, NetBackend, Qemu, VmPaths};
pub use qmp::Qmp;
pub use ram::{GuestRam, RamMapping};
