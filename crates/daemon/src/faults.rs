//! Fault injection for crash-safety tests: `NOOK_FAULT=POINT` makes the daemon SIGKILL itself
//! when it reaches `POINT`; `NOOK_FAULT=POINT=kill-source` or `=kill-clone` SIGKILLs that
//! QEMU there instead and carries on, as a QEMU crash would; `=no-answer` waits at `POINT` for
//! an answer that never comes, as with a guest whose agent stopped answering. Unset, every
//! point is a no-op.

use std::sync::OnceLock;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What to do at a fault point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: carry on.
    None,
    KillSourceQemu,
    KillCloneQemu,
    /// Wait for a guest's answer that never comes.
    NoAnswer,
}

fn configured() -> Option<&'static (String, String)> {
    static FAULT: OnceLock<Option<(String, String)>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var("NOOK_FAULT").ok()?;
            let (point, action) = spec
                .split_once('=')
                .unwrap_or((spec.as_str(), "kill-daemon"));
            Some((point.to_string(), action.to_string()))
        })
        .as_ref()
}

/// Reached `point`: dies there if told to, else says which QEMU (if any) to kill.
pub fn point(point: &str) -> Fault {
    let Some((wanted, action)) = configured() else {
        return Fault::None;
    };
    if wanted != point {
        return Fault::None;
    }
    tracing::warn!(point, action = action.as_str(), "injected fault");
    match action.as_str() {
        "kill-source" => Fault::KillSourceQemu,
        "kill-clone" => Fault::KillCloneQemu,
        "no-answer" => Fault::NoAnswer,
        _ => {
            let _ = kill(Pid::this(), Signal::SIGKILL);
            // SIGKILL to ourselves does not return; this is only for the type checker.
            std::process::abort()
        }
    }
}
