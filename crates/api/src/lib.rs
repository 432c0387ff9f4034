//! Wire types shared by the daemon's admin API and its clients (the `nook` CLI, the SSH
//! lobby, the HTTPS API and the dashboard), plus the single table of user-facing error codes.
//!
//! Nothing here does I/O. What a client sees of an error is an [`ApiError`]: a stable
//! [`ErrorCode`] and a message written for a person, never the `Display` of an internal error.

use serde::{Deserialize, Serialize};

pub mod lobby;
pub mod size;

pub use size::{format_size, parse_size};

/// Names are unique per host and safe as hostnames and DNS labels.
pub const NAME_RULE: &str = "names are 2-63 characters: a lowercase letter, then lowercase letters, digits or '-', not ending in '-'";

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let bytes = name.as_bytes();
    let ok = (2..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(70).collect();
        Err(ApiError::new(
            ErrorCode::InvalidName,
            format!("Invalid VM name {shown:?}: {NAME_RULE}"),
        ))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: Option<String>,
    pub image: Option<String>,
    pub cpu: Option<u32>,
    /// A size such as `512M` or `2G`.
    pub memory: Option<String>,
    pub disk: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    /// QEMU or the guest died without being asked to; `state_reason` says why.
    Failed,
    /// The VM lives on a host of the fleet that stopped sending heartbeats; `state_reason`
    /// names the host and what the VM was doing. Never stored: it is how a VM is *shown*
    /// while its host is down.
    Unavailable,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Unavailable => "unavailable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => Self::Creating,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// What `cp` asks for: the clone's name, and whether to clone only the disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CloneVm {
    /// The clone's name; a friendly one is made up when absent.
    pub name: Option<String>,
    /// Clone only the disk, and boot the clone afresh, even when the source is running.
    #[serde(default)]
    pub stopped_only: bool,
    /// The host of the fleet the clone goes to; by default the source's, while it has room.
    #[serde(default)]
    pub on: Option<String>,
}

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneMode {
    /// The source was stopped: the clone is a stopped copy of its disk.
    Disk,
    /// The source was running and the clone booted afresh from a copy of its disk.
    Boot,
    /// The source was running: the clone carries on from its memory, processes included.
    Fork,
}

/// What `cp` did, with where its time went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cloned {
    pub vm: VmInfo,
    pub source: String,
    pub mode: CloneMode,
    pub timings: CloneTimings,
    /// Set when the clone went to another host than its source's: what that cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<CloneMoved>,
}

/// A clone made on its source's host (where the layers are) and moved to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneMoved {
    pub from: String,
    pub to: String,
    /// Why it went there: asked for (`--on`), or what its source's host lacked.
    pub why: String,
    /// Bytes of disk layers (and image) sent; a running clone's memory is not counted.
    pub disk_bytes_sent: u64,
    /// How long the move took, within `timings.total_ms`.
    pub move_ms: f64,
}

/// One line saying what `cp` made and how long it took, for the lobby and the CLI.
pub fn clone_summary(c: &Cloned) -> String {
    let t = &c.timings;
    let what = match c.mode {
        CloneMode::Disk => "a stopped copy of its disk".to_string(),
        CloneMode::Boot => "a fresh boot of a copy of its disk".to_string(),
        CloneMode::Fork => format!(
            "running, memory and processes included{}; {} paused {:.0} ms",
            match t.fork {
                Some(ForkKind::Instant) => ", shared copy-on-write",
                Some(ForkKind::Copied) => ", memory copied",
                None => "",
            },
            c.source,
            t.source_paused_ms.unwrap_or_default()
        ),
    };
    let mut line = format!(
        "Cloned {} into {} ({what}) in {:.2} s",
        c.source,
        c.vm.name,
        t.total_ms / 1000.0
    );
    if t.attempts > 1 {
        line.push_str(&format!(
            " (forked {} times: a clone woke broken and was replaced)",
            t.attempts
        ));
    }
    if let Some(m) = &c.moved {
        line.push_str(&format!(
            "\n  on host {}: made on {}, where its source's layers are, then moved ({}; {} of disk sent, {:.2} s of the total)",
            m.to,
            m.from,
            m.why,
            format_size(m.disk_bytes_sent),
            m.move_ms / 1000.0
        ));
    }
    line
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CloneTimings {
    /// From the request to the clone being ready (or stopped, for a disk clone).
    pub total_ms: f64,
    /// Freezing the disk layer and making both new overlays.
    pub disk_ms: f64,
    /// Streaming memory and device state into the clone (forks only).
    pub memory_ms: Option<f64>,
    /// How long the source's vCPUs were paused (forks only).
    pub source_paused_ms: Option<f64>,
    /// Booting the clone (boot clones only) or giving it its identity (forks).
    pub ready_ms: Option<f64>,
    /// How many forks it took: more than one when a clone woke broken (its kernel reported
    /// trouble, or it could not run a command) and the source was forked again.
    #[serde(default)]
    pub attempts: u32,
    /// How a running source's memory reached the clone (forks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<ForkKind>,
}

/// How a fork gave the clone its source's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForkKind {
    /// Shared copy-on-write: nothing was copied.
    Instant,
    /// Copied while the source ran (its memory could not be shared: it was forked moments
    /// before, a process streamed through its agent, or instant forks are off).
    Copied,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub image: String,
    pub state: VmState,
    pub state_reason: Option<String>,
    pub cpu: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub guest_ip: Option<String>,
    pub created_at: String,
    /// The fleet host the VM lives on (absent on a one-host install).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub user: Option<String>,
    pub cwd: Option<String>,
    /// Forward the request body to the process's stdin.
    #[serde(default)]
    pub stdin: bool,
}

/// One line of the NDJSON stream answering an exec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout {
        #[serde(with = "nook_proto::b64")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "nook_proto::b64")]
        data: Vec<u8>,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Error {
        error: ApiError,
    },
}

/// One row of the VM table every front end prints, ending with `last` (a reason, a date).
pub fn vm_table_row(vm: &VmInfo, last: &str) -> String {
    format!(
        "{:<24} {:<9} {:<8} {:>4} {:>9} {:>9}  {:<14} {last}",
        vm.name,
        vm.state.as_str(),
        vm.image,
        vm.cpu,
        format_size(u64::from(vm.memory_mib) << 20),
        format_size(vm.disk_bytes),
        vm.guest_ip.as_deref().unwrap_or("-"),
    )
}

/// The header of [`vm_table_row`]'s table, naming the last column.
pub fn vm_table_header(last: &str) -> String {
    format!(
        "{:<24} {:<9} {:<8} {:>4} {:>9} {:>9}  {:<14} {last}",
        "NAME", "STATE", "IMAGE", "CPU", "MEMORY", "DISK", "IP"
    )
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub kernel_version: String,
    pub path: String,
}

/// Every error a client can see. The code is stable; the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }
}

macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:literal;)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum ErrorCode {
            $(#[serde(rename = $code)] $variant,)*
        }

        impl ErrorCode {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $code,)* }
            }

            /// The HTTP status this error maps to on every HTTP surface.
            pub fn status(self) -> u16 {
                match self { $(Self::$variant => $status,)* }
            }
        }
    };
}

error_codes! {
    InvalidName = "invalid_name", 400;
    InvalidArgument = "invalid_argument", 400;
    NameTaken = "name_taken", 409;
    NotFound = "vm_not_found", 404;
    UnknownImage = "unknown_image", 400;
    ImageNotBuilt = "image_not_built", 409;
    NotRunning = "vm_not_running", 409;
    AlreadyRunning = "vm_already_running", 409;
    Busy = "vm_busy", 409;
    QemuMissing = "qemu_missing", 503;
    HostMisconfigured = "host_misconfigured", 503;
    NoSpace = "no_space", 507;
    GuestNotReady = "guest_not_ready", 504;
    AgentUnavailable = "agent_unavailable", 503;
    GuestError = "guest_error", 502;
    NotSignedUp = "not_signed_up", 401;
    EmailTaken = "email_taken", 409;
    KeyTaken = "key_taken", 409;
    KeyNotFound = "key_not_found", 404;
    Usage = "usage", 400;
    OverEnvelope = "over_envelope", 409;
    HostShortOfMemory = "host_short_of_memory", 503;
    SignupClosed = "signup_closed", 403;
    InvalidCode = "invalid_code", 403;
    EmailUnconfirmed = "email_unconfirmed", 403;
    Forbidden = "forbidden", 403;
    TokenNotFound = "token_not_found", 404;
    IntegrationNotFound = "integration_not_found", 404;
    IntegrationExists = "integration_exists", 409;
    RateLimited = "rate_limited", 429;
    StoreUnavailable = "store_unavailable", 503;
    HostDown = "host_down", 503;
    HostCordoned = "host_cordoned", 409;
    Internal = "internal", 500;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in [
            "ab",
            "blog",
            "a-1",
            "x23456789012345678901234567890123456789012345678901234567890123",
        ] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            "1abc",
            "Blog",
            "blog-",
            "bl_og",
            "bløg",
            "a b",
            "x234567890123456789012345678901234567890123456789012345678901234",
        ] {
            let err = validate_name(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::InvalidName);
        }
    }

    #[test]
    fn error_codes_serialise_stably() {
        let err = ApiError::new(ErrorCode::NameTaken, "taken");
        assert_eq!(
            serde_json::to_string(&err).expect("json"),
            r#"{"code":"name_taken","message":"taken"}"#
        );
        assert_eq!(err.status(), 409);
    }
}
