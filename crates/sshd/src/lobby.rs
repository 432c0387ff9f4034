//! Lobby sessions: `ssh HOST CMD`, the interactive REPL, and line mode.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};

use crate::editor::{Action, LineEditor};
use crate::server::{Ctx, Prelude, Start};
use crate::words::{self, SplitError};
use crate::{Backend, LobbyIo, LobbyOutput};

/// The longest command (exec string or line) accepted, in bytes.
pub(crate) const MAX_COMMAND: usize = 64 * 1024;
/// Typed-ahead input kept while a command runs.
const TYPEAHEAD_BUDGET: usize = 1 << 20;
/// Exit status for a command line that can't be parsed.
const STATUS_USAGE: u32 = 2;
/// Exit status after ^C.
const STATUS_INTERRUPTED: u32 = 130;

type Writer = ChannelWriteHalf<Msg>;

/// Writes `message` on stderr, then exit status 1, EOF and close.
pub(crate) async fn refuse(w: &Writer, tty: bool, message: &str) {
    let mut text = message.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    write(w, tty, &LobbyOutput::Err(text.into_bytes())).await;
    finish(w, 1).await;
}

async fn finish(w: &Writer, status: u32) {
    let _ = w.exit_status(status).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

/// Converts lone `\n` to `\r\n`, as a pty's ONLCR would.
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    let mut prev = 0u8;
    for &b in bytes {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// Sends one piece of output; false once the channel is gone.
async fn write(w: &Writer, tty: bool, output: &LobbyOutput) -> bool {
    let (ext, bytes) = match output {
        LobbyOutput::Out(b) => (None, b),
        LobbyOutput::Err(b) => (Some(1), b),
    };
    let data = if tty { crlf(bytes) } else { bytes.clone() };
    let sent = match ext {
        None => w.data_bytes(data).await,
        Some(ext) => w.extended_data_bytes(ext, data).await,
    };
    sent.is_ok()
}

async fn write_raw(w: &Writer, bytes: Vec<u8>) -> bool {
    bytes.is_empty() || w.data_bytes(bytes).await.is_ok()
}

fn parse_error(e: &SplitError) -> String {
    match e {
        SplitError::UnterminatedQuote(q) => format!("nook: unterminated {q} quote\n"),
        SplitError::TrailingBackslash => "nook: the command ends with a backslash\n".to_string(),
    }
}

fn clamp_width(cols: u32) -> u16 {
    match u16::try_from(cols) {
        Ok(0) | Err(_) => 80,
        Ok(c) => c,
    }
}

/// Input received from the client but not consumed yet.
struct Input {
    pending: VecDeque<u8>,
    eof: bool,
}

impl Input {
    fn push(&mut self, data: &[u8]) {
        let room = TYPEAHEAD_BUDGET.saturating_sub(self.pending.len());
        self.pending.extend(&data[..data.len().min(room)]);
    }
}

enum Mode {
    /// `ssh HOST CMD`: client data is the command's stdin.
    Exec,
    /// REPL or line mode: client data is typed ahead; ^C interrupts in the REPL.
    Typeahead { ctrl_c: bool },
}

enum Outcome {
    Exited(u32),
    Interrupted,
    Closed,
}

struct Term {
    tty: bool,
    width: Arc<AtomicU16>,
    /// Whether the last byte written ended a line.
    at_line_start: bool,
}

/// Runs a lobby session on a session channel whose route is the lobby.
pub(crate) async fn run<B: Backend>(
    ctx: Ctx<B>,
    mut reader: ChannelReadHalf,
    writer: Writer,
    start: Start,
    prelude: Prelude,
) {
    let mut term = Term {
        tty: prelude.pty.is_some(),
        width: Arc::new(AtomicU16::new(
            prelude.pty.as_ref().map_or(80, |p| clamp_width(p.cols)),
        )),
        at_line_start: true,
    };
    let mut input = Input {
        pending: VecDeque::new(),
        eof: prelude.eof,
    };
    for chunk in &prelude.data {
        input.push(chunk);
    }
    let r = &mut reader;
    let status = match start {
        Start::Exec(cmd) => exec(&ctx, r, &writer, &cmd, &mut term, &mut input).await,
        Start::Shell if term.tty => repl(&ctx, r, &writer, &mut term, &mut input).await,
        Start::Shell => lines(&ctx, r, &writer, &mut term, &mut input).await,
        Start::Subsystem(name) => {
            let msg = format!(
                "nook: the lobby has no {name:?} subsystem. To copy files, use the VM: scp FILE VM@{}:\n",
                ctx.state.banner_host
            );
            write(&writer, term.tty, &LobbyOutput::Err(msg.into_bytes())).await;
            Some(1)
        }
    };
    match status {
        Some(status) => finish(&writer, status).await,
        None => {
            let _ = writer.close().await;
        }
    }
}

async fn exec<B: Backend>(
    ctx: &Ctx<B>,
    reader: &mut ChannelReadHalf,
    w: &Writer,
    cmd: &[u8],
    term: &mut Term,
    input: &mut Input,
) -> Option<u32> {
    let fail = |msg: String| LobbyOutput::Err(msg.into_bytes());
    if cmd.len() > MAX_COMMAND {
        let msg = format!(
            "nook: command too long ({} bytes; the limit is {MAX_COMMAND})\n",
            cmd.len()
        );
        write(w, term.tty, &fail(msg)).await;
        return Some(STATUS_USAGE);
    }
    let Ok(text) = std::str::from_utf8(cmd) else {
        let msg = "nook: the command is not valid UTF-8\n".to_string();
        write(w, term.tty, &fail(msg)).await;
        return Some(STATUS_USAGE);
    };
    let argv = match words::split(text) {
        Ok(argv) => argv,
        Err(e) => {
            write(w, term.tty, &fail(parse_error(&e))).await;
            return Some(STATUS_USAGE);
        }
    };
    match run_command(ctx, reader, w, argv, term, input, Mode::Exec).await {
        Outcome::Exited(status) => Some(status),
        Outcome::Interrupted => Some(STATUS_INTERRUPTED),
        Outcome::Closed => None,
    }
}

/// Runs one lobby command while relaying its output and watching the channel.
async fn run_command<B: Backend>(
    ctx: &Ctx<B>,
    reader: &mut ChannelReadHalf,
    w: &Writer,
    argv: Vec<String>,
    term: &mut Term,
    input: &mut Input,
    mode: Mode,
) -> Outcome {
    let caller = ctx.caller().await;
    let with_stdin = matches!(mode, Mode::Exec);
    let (io, mut out_rx, mut stdin) =
        LobbyIo::for_session(term.tty, term.width.clone(), with_stdin);
    if let Some(s) = &stdin {
        let (a, b) = input.pending.as_slices();
        s.push(a);
        s.push(b);
        input.pending.clear();
        if input.eof {
            stdin = None;
        }
    }
    let fut = ctx.backend.lobby(&caller, argv, io);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            Some(output) = out_rx.recv() => {
                if !emit(w, term, &output).await {
                    return Outcome::Closed;
                }
            }
            status = &mut fut => {
                while let Some(output) = out_rx.try_recv() {
                    if !emit(w, term, &output).await {
                        return Outcome::Closed;
                    }
                }
                return Outcome::Exited(status);
            }
            msg = reader.wait() => match msg {
                Some(ChannelMsg::Data { data }) => match mode {
                    Mode::Exec => {
                        if let Some(s) = &stdin {
                            s.push(&data);
                        }
                    }
                    Mode::Typeahead { ctrl_c } => {
                        if ctrl_c && data.contains(&0x03) {
                            input.pending.clear();
                            return Outcome::Interrupted;
                        }
                        input.push(&data);
                    }
                },
                Some(ChannelMsg::Eof) => {
                    input.eof = true;
                    stdin = None;
                }
                Some(ChannelMsg::WindowChange { col_width, .. }) => {
                    term.width.store(clamp_width(col_width), Ordering::Relaxed);
                }
                Some(ChannelMsg::Signal { signal: Sig::INT | Sig::TERM | Sig::HUP }) => {
                    return Outcome::Interrupted;
                }
                Some(ChannelMsg::Close) | None => return Outcome::Closed,
                Some(_) => {}
            }
        }
    }
}

async fn emit(w: &Writer, term: &mut Term, output: &LobbyOutput) -> bool {
    let (LobbyOutput::Out(bytes) | LobbyOutput::Err(bytes)) = output;
    if let Some(&last) = bytes.last() {
        term.at_line_start = last == b'\n';
    }
    write(w, term.tty, output).await
}

enum LineResult {
    Continue,
    Exit,
    Closed,
}

/// Splits and runs one line typed in the REPL or line mode.
async fn run_line<B: Backend>(
    ctx: &Ctx<B>,
    reader: &mut ChannelReadHalf,
    w: &Writer,
    line: &str,
    term: &mut Term,
    input: &mut Input,
    status: &mut u32,
) -> LineResult {
    let argv = match words::split(line) {
        Ok(argv) => argv,
        Err(e) => {
            *status = STATUS_USAGE;
            let msg = LobbyOutput::Err(parse_error(&e).into_bytes());
            if !write(w, term.tty, &msg).await {
                return LineResult::Closed;
            }
            return LineResult::Continue;
        }
    };
    match argv.first().map(String::as_str) {
        None => return LineResult::Continue,
        Some("exit" | "quit") if argv.len() == 1 => return LineResult::Exit,
        Some(_) => {}
    }
    let mode = Mode::Typeahead { ctrl_c: term.tty };
    match run_command(ctx, reader, w, argv, term, input, mode).await {
        Outcome::Exited(s) => *status = s,
        Outcome::Interrupted => {
            *status = STATUS_INTERRUPTED;
            if term.tty && !write_raw(w, b"^C\r\n".to_vec()).await {
                return LineResult::Closed;
            }
            term.at_line_start = true;
        }
        Outcome::Closed => return LineResult::Closed,
    }
    LineResult::Continue
}

/// Reads more input from the channel; false when the channel is closed.
async fn read_more(reader: &mut ChannelReadHalf, term: &Term, input: &mut Input) -> bool {
    match reader.wait().await {
        Some(ChannelMsg::Data { data }) => input.push(&data),
        Some(ChannelMsg::WindowChange { col_width, .. }) => {
            term.width.store(clamp_width(col_width), Ordering::Relaxed);
        }
        Some(ChannelMsg::Eof) => input.eof = true,
        Some(ChannelMsg::Close) | None => return false,
        Some(_) => {}
    }
    true
}

/// The interactive REPL (a shell request with a pty).
async fn repl<B: Backend>(
    ctx: &Ctx<B>,
    reader: &mut ChannelReadHalf,
    w: &Writer,
    term: &mut Term,
    input: &mut Input,
) -> Option<u32> {
    let mut ed = LineEditor::new(term.width.load(Ordering::Relaxed));
    let mut welcome = format!(
        "Welcome to nook on {}. Type `help` for commands, TAB to complete, `exit` to leave.\r\n",
        ctx.state.banner_host
    );
    if ctx.caller().await.account.is_none() {
        welcome.push_str(
            "This SSH key has no account yet: type `signup you@example.com` to make one \
             (add `--invite CODE` if the host's owner gave you one), or `ssh-key confirm CODE` \
             to add it to your account.\r\n",
        );
    }
    if !write_raw(w, welcome.into_bytes()).await {
        return None;
    }
    ed.prompt();
    let mut status = 0;
    loop {
        while let Some(b) = input.pending.pop_front() {
            match ed.feed(b) {
                None => {}
                Some(Action::Eof) => {
                    write_raw(w, ed.take_output()).await;
                    write_raw(w, b"\r\n".to_vec()).await;
                    return Some(0);
                }
                Some(Action::Complete) => {
                    let caller = ctx.caller().await;
                    let words = ctx.backend.completions(&caller).await;
                    ed.apply_completions(&words);
                }
                Some(Action::Submit(line)) => {
                    if !write_raw(w, ed.take_output()).await {
                        return None;
                    }
                    term.at_line_start = true;
                    match run_line(ctx, reader, w, &line, term, input, &mut status).await {
                        LineResult::Continue => {}
                        LineResult::Exit => return Some(0),
                        LineResult::Closed => return None,
                    }
                    if !term.at_line_start && !write_raw(w, b"\r\n".to_vec()).await {
                        return None;
                    }
                    ed.set_width(term.width.load(Ordering::Relaxed));
                    ed.prompt();
                }
            }
        }
        if !write_raw(w, ed.take_output()).await {
            return None;
        }
        if input.eof {
            write_raw(w, b"\r\n".to_vec()).await;
            return Some(0);
        }
        if !read_more(reader, term, input).await {
            return None;
        }
        ed.set_width(term.width.load(Ordering::Relaxed));
    }
}

/// A shell request without a pty: one command per line of stdin, no prompt.
/// The exit status is the last command's.
async fn lines<B: Backend>(
    ctx: &Ctx<B>,
    reader: &mut ChannelReadHalf,
    w: &Writer,
    term: &mut Term,
    input: &mut Input,
) -> Option<u32> {
    let mut status = 0;
    let mut line: Vec<u8> = Vec::new();
    let mut overlong = false;
    loop {
        loop {
            let text = match input.pending.pop_front() {
                Some(b'\n') => {
                    let bytes = std::mem::take(&mut line);
                    if std::mem::take(&mut overlong) {
                        Err(format!(
                            "nook: line too long (the limit is {MAX_COMMAND} bytes)\n"
                        ))
                    } else {
                        decode_line(bytes)
                    }
                }
                Some(b) => {
                    if line.len() < MAX_COMMAND {
                        line.push(b);
                    } else {
                        overlong = true;
                    }
                    continue;
                }
                None if input.eof && (!line.is_empty() || overlong) => {
                    let bytes = std::mem::take(&mut line);
                    if std::mem::take(&mut overlong) {
                        Err(format!(
                            "nook: line too long (the limit is {MAX_COMMAND} bytes)\n"
                        ))
                    } else {
                        decode_line(bytes)
                    }
                }
                None => break,
            };
            let text = match text {
                Ok(text) => text,
                Err(msg) => {
                    status = STATUS_USAGE;
                    if !write(w, false, &LobbyOutput::Err(msg.into_bytes())).await {
                        return None;
                    }
                    continue;
                }
            };
            match run_line(ctx, reader, w, &text, term, input, &mut status).await {
                LineResult::Continue => {}
                LineResult::Exit => return Some(status),
                LineResult::Closed => return None,
            }
        }
        if input.eof {
            return Some(status);
        }
        if !read_more(reader, term, input).await {
            return None;
        }
    }
}

fn decode_line(mut bytes: Vec<u8>) -> Result<String, String> {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| "nook: the line is not valid UTF-8\n".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_conversion() {
        assert_eq!(crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert_eq!(crlf(b""), b"");
    }

    #[test]
    fn widths() {
        assert_eq!(clamp_width(0), 80);
        assert_eq!(clamp_width(132), 132);
        assert_eq!(clamp_width(1 << 20), 80);
    }
}
