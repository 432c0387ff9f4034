//! `ssh VM@HOST [CMD]` through the VM's guest agent instead of its sshd.
//!
//! A shell or a command needs no SSH server in the guest: the backend's [`GuestShell`] starts it
//! through the agent, and this module maps the session channel onto it (pty, window size,
//! environment, stdin and EOF, signals, exit status or signal). Under TCG a guest sshd's key
//! exchange alone took 2.5 s per command; this path costs one agent round trip. What only an
//! SSH server can do (sftp, port forwarding, agent forwarding) still goes to the guest's sshd.
//!
//! Flow control: output comes through a bounded channel whose producer waits (the agent then
//! stops reading the process's output), and stdin is handed over one SSH packet at a time into
//! a bounded channel, so neither direction grows a buffer without limit.

use bytes::Bytes;
use russh::server::{self, Msg};
use russh::{ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tracing::debug;

use crate::server::{Prelude, Start};
use crate::{GuestCommand, GuestInput, GuestOutput, GuestPty, GuestShell, lobby};

/// Variables a client may set with `SendEnv`/`SetEnv`, and their total size, per session.
const MAX_ENV: usize = 64;
const MAX_ENV_BYTES: usize = 32 * 1024;

/// The command a session's set-up requests and start request ask for.
pub(crate) fn command(start: &Start, prelude: &Prelude) -> GuestCommand {
    let mut pty: Option<GuestPty> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut env_bytes = 0;
    for msg in &prelude.requests {
        match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            } => {
                pty = Some(GuestPty {
                    term: term.clone(),
                    cols: *col_width,
                    rows: *row_height,
                });
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Some(pty) = pty.as_mut() {
                    pty.cols = *col_width;
                    pty.rows = *row_height;
                }
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                env_bytes += variable_name.len() + variable_value.len();
                let valid = !variable_name.is_empty()
                    && !variable_name.contains('=')
                    && !variable_name.contains('\0')
                    && !variable_value.contains('\0');
                if valid && env.len() < MAX_ENV && env_bytes <= MAX_ENV_BYTES {
                    env.retain(|(k, _)| k != variable_name);
                    env.push((variable_name.clone(), variable_value.clone()));
                }
            }
            _ => {}
        }
    }
    let command = match start {
        Start::Exec(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Start::Shell | Start::Subsystem(_) => None,
    };
    GuestCommand { command, env, pty }
}

/// Whether this session can run through the agent: a shell or a command, without agent
/// forwarding (which needs the guest's sshd to make `SSH_AUTH_SOCK`).
pub(crate) fn can_serve(start: &Start, prelude: &Prelude) -> bool {
    matches!(start, Start::Shell | Start::Exec(_))
        && !prelude
            .requests
            .iter()
            .any(|m| matches!(m, ChannelMsg::AgentForward { .. }))
}

/// Runs one session channel through the guest agent until the process exits or the client
/// goes away (then the process gets SIGHUP, as with sshd).
pub(crate) async fn session(
    shell: &dyn GuestShell,
    down: Option<server::Handle>,
    id: ChannelId,
    mut reader: ChannelReadHalf,
    writer: ChannelWriteHalf<Msg>,
    start: Start,
    prelude: Prelude,
) {
    let tty = prelude.pty.is_some();
    let cmd = command(&start, &prelude);
    let mut guest = match shell.start(cmd).await {
        Ok(session) => session,
        Err(message) => return lobby::refuse(&writer, tty, &message).await,
    };
    let input = guest.input;
    for data in prelude.data {
        if input.send(GuestInput::Data(data)).await.is_err() {
            break;
        }
    }
    if prelude.eof {
        let _ = input.send(GuestInput::Eof).await;
    }

    let to_vm = async {
        loop {
            let next = match reader.wait().await {
                Some(ChannelMsg::Data { data }) => GuestInput::Data(data),
                Some(ChannelMsg::Eof) => GuestInput::Eof,
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                }) => GuestInput::Resize {
                    cols: col_width,
                    rows: row_height,
                },
                Some(ChannelMsg::Signal { signal }) => match signal_number(&signal) {
                    Some(n) => GuestInput::Signal(n),
                    None => continue,
                },
                Some(ChannelMsg::Close) | None => return,
                Some(_) => continue,
            };
            if input.send(next).await.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        while let Some(out) = guest.output.recv().await {
            let sent = match out {
                GuestOutput::Stdout(data) => writer.data_bytes(data).await,
                GuestOutput::Stderr(data) => writer.extended_data_bytes(1, data).await,
                GuestOutput::Exit { code, signal } => {
                    let _ = writer.eof().await;
                    match (signal, &down) {
                        (Some(n), Some(down)) => {
                            let _ = down
                                .exit_signal_request(
                                    id,
                                    signal_name(n),
                                    false,
                                    String::new(),
                                    String::new(),
                                )
                                .await;
                        }
                        _ => {
                            let status = code.map_or(255, |c| u32::try_from(c).unwrap_or(255));
                            let _ = writer.exit_status(status).await;
                        }
                    }
                    return;
                }
            };
            if sent.is_err() {
                debug!("client went away while receiving output");
                return;
            }
        }
        let message: &[u8] = if tty {
            b"\r\nnook: lost the connection to the VM\r\n"
        } else {
            b"nook: lost the connection to the VM\n"
        };
        let _ = writer
            .extended_data_bytes(1, Bytes::from_static(message))
            .await;
        let _ = writer.exit_status(255).await;
    };
    tokio::select! {
        () = to_vm => {
            // The client closed the channel or the connection dropped: hang up, as sshd does.
            let _ = input.try_send(GuestInput::Hangup);
        }
        () = to_client => {}
    }
    let _ = writer.close().await;
}

/// Linux signal numbers for the RFC 4254 names (the guest is Linux on x86-64).
fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => 6,
        Sig::ALRM => 14,
        Sig::FPE => 8,
        Sig::HUP => 1,
        Sig::ILL => 4,
        Sig::INT => 2,
        Sig::KILL => 9,
        Sig::PIPE => 13,
        Sig::QUIT => 3,
        Sig::SEGV => 11,
        Sig::TERM => 15,
        Sig::USR1 => 10,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => 12,
            "CONT" => 18,
            "STOP" => 19,
            "TSTP" => 20,
            "WINCH" => 28,
            _ => return None,
        },
    })
}

fn signal_name(n: i32) -> Sig {
    match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        10 => Sig::USR1,
        11 => Sig::SEGV,
        12 => Sig::Custom("USR2".into()),
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        other => Sig::Custom(format!("SIG{other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prelude(requests: Vec<ChannelMsg>) -> Prelude {
        Prelude {
            pty: None,
            requests,
            data: Vec::new(),
            eof: false,
        }
    }

    #[test]
    fn pty_env_and_resizes_before_start_make_the_command() {
        let p = prelude(vec![
            ChannelMsg::RequestPty {
                want_reply: false,
                term: "xterm".into(),
                col_width: 80,
                row_height: 24,
                pix_width: 0,
                pix_height: 0,
                terminal_modes: vec![],
            },
            ChannelMsg::SetEnv {
                want_reply: false,
                variable_name: "LANG".into(),
                variable_value: "C.UTF-8".into(),
            },
            ChannelMsg::SetEnv {
                want_reply: false,
                variable_name: "BAD=NAME".into(),
                variable_value: "x".into(),
            },
            ChannelMsg::WindowChange {
                col_width: 120,
                row_height: 40,
                pix_width: 0,
                pix_height: 0,
            },
        ]);
        let cmd = command(&Start::Exec(b"echo hi".to_vec()), &p);
        assert_eq!(cmd.command.as_deref(), Some("echo hi"));
        assert_eq!(cmd.env, vec![("LANG".to_string(), "C.UTF-8".to_string())]);
        let pty = cmd.pty.expect("pty");
        assert_eq!((pty.term.as_str(), pty.cols, pty.rows), ("xterm", 120, 40));
        assert!(command(&Start::Shell, &p).command.is_none());
    }

    #[test]
    fn env_is_bounded() {
        let requests = (0..1000)
            .map(|i| ChannelMsg::SetEnv {
                want_reply: false,
                variable_name: format!("V{i}"),
                variable_value: "x".repeat(100),
            })
            .collect();
        let cmd = command(&Start::Shell, &prelude(requests));
        assert!(cmd.env.len() <= MAX_ENV);
    }

    #[test]
    fn agent_forwarding_and_subsystems_need_sshd() {
        assert!(can_serve(&Start::Shell, &prelude(vec![])));
        assert!(can_serve(&Start::Exec(b"true".to_vec()), &prelude(vec![])));
        assert!(!can_serve(
            &Start::Subsystem("sftp".into()),
            &prelude(vec![])
        ));
        let forward = prelude(vec![ChannelMsg::AgentForward { want_reply: false }]);
        assert!(!can_serve(&Start::Shell, &forward));
    }

    #[test]
    fn signals_map_both_ways() {
        for sig in [Sig::INT, Sig::TERM, Sig::HUP, Sig::KILL, Sig::USR1] {
            let n = signal_number(&sig).expect("known");
            assert_eq!(signal_number(&signal_name(n)), Some(n));
        }
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }
}
