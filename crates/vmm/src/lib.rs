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

pub use agent::{AgentClient, Identified, Process, ProcessHandle, SpawnHold};
pub use error::VmmError;
pub use jail::Jail;
pub use probe::{Accel, probe_accel};
pub use qemu::{Hypervisor, LaunchSpec, NetBackend, Qemu, VmPaths};
pub use qmp::Qmp;
pub use ram::{GuestRam, RamMapping};
