//! The lobby REPL's line editor: a pure state machine fed one byte at a time.
//!
//! It turns terminal input (as sent by an SSH client whose local terminal is
//! in raw mode) into edits of one line, and writes the bytes that redraw that
//! line into an output buffer. It knows nothing about SSH or the backend; the
//! REPL asks for completions when it sees [`Action::Complete`].
//!
//! Long lines scroll horizontally inside the terminal width instead of
//! wrapping, so redrawing never has to track wrapped rows. Every character is
//! assumed to be one column wide.

/// The prompt printed before each line.
pub(crate) const PROMPT: &str = "nook> ";
/// The longest line accepted, in characters.
pub(crate) const MAX_LINE_CHARS: usize = 64 * 1024;
const MAX_HISTORY: usize = 500;

/// What the REPL must do after a byte was fed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Enter was pressed: run this line.
    Submit(String),
    /// TAB was pressed: call [`LineEditor::apply_completions`].
    Complete,
    /// ^D on an empty line: leave.
    Eof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Esc {
    None,
    /// Saw ESC.
    Start,
    /// Saw `ESC [`, collecting parameter bytes.
    Csi(Vec<u8>),
    /// Saw `ESC O`.
    Ss3,
}

pub(crate) struct LineEditor {
    buf: Vec<char>,
    cursor: usize,
    /// First character shown when the line is wider than the terminal.
    scroll: usize,
    width: u16,
    history: Vec<String>,
    /// Index into `history`; `history.len()` means "the new line".
    hist_pos: usize,
    /// The new line, kept while browsing history.
    saved: Vec<char>,
    esc: Esc,
    utf8: Vec<u8>,
    utf8_need: usize,
    last_cr: bool,
    out: Vec<u8>,
}

impl LineEditor {
    pub(crate) fn new(width: u16) -> Self {
        Self {
            buf: Vec::new(),
            cursor: 0,
            scroll: 0,
            width,
            history: Vec::new(),
            hist_pos: 0,
            saved: Vec::new(),
            esc: Esc::None,
            utf8: Vec::new(),
            utf8_need: 0,
            last_cr: false,
            out: Vec::new(),
        }
    }

    pub(crate) fn set_width(&mut self, width: u16) {
        self.width = width;
    }

    /// Bytes to send to the terminal; empties the buffer.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Prints a fresh prompt with an empty line (the cursor must be at the start of a row).
    pub(crate) fn prompt(&mut self) {
        self.buf.clear();
        self.cursor = 0;
        self.scroll = 0;
        self.hist_pos = self.history.len();
        self.refresh();
    }

    #[cfg(test)]
    pub(crate) fn line(&self) -> String {
        self.buf.iter().collect()
    }

    /// Feeds one input byte.
    pub(crate) fn feed(&mut self, b: u8) -> Option<Action> {
        let was_cr = std::mem::replace(&mut self.last_cr, false);
        match std::mem::replace(&mut self.esc, Esc::None) {
            Esc::None => {}
            Esc::Start => {
                match b {
                    b'[' => self.esc = Esc::Csi(Vec::new()),
                    b'O' => self.esc = Esc::Ss3,
                    b'b' | b'B' => self.word_left(),
                    b'f' | b'F' => self.word_right(),
                    // ESC ESC: stay in escape mode for the second one.
                    0x1b => self.esc = Esc::Start,
                    _ => {}
                }
                return None;
            }
            Esc::Csi(mut params) => {
                if (0x20..=0x3f).contains(&b) {
                    // Parameters and intermediates; a runaway sequence is cut short.
                    if params.len() < 16 {
                        params.push(b);
                    }
                    self.esc = Esc::Csi(params);
                } else if (0x40..=0x7e).contains(&b) {
                    self.csi(&params, b);
                }
                // Anything else aborts the sequence.
                return None;
            }
            Esc::Ss3 => {
                self.csi(b"", b);
                return None;
            }
        }

        if self.utf8_need > 0 {
            if b & 0xc0 == 0x80 {
                self.utf8.push(b);
                if self.utf8.len() == self.utf8_need {
                    self.utf8_need = 0;
                    let bytes = std::mem::take(&mut self.utf8);
                    if let Ok(s) = std::str::from_utf8(&bytes) {
                        for c in s.chars() {
                            self.insert(c);
                        }
                    }
                }
                return None;
            }
            // A broken sequence: drop it and handle this byte afresh.
            self.utf8.clear();
            self.utf8_need = 0;
        }

        match b {
            b'\r' => {
                self.last_cr = true;
                return Some(self.submit());
            }
            b'\n' => {
                if was_cr {
                    return None;
                }
                return Some(self.submit());
            }
            b'\t' => return Some(Action::Complete),
            0x01 => self.move_to(0),
            0x02 => self.move_to(self.cursor.saturating_sub(1)),
            0x03 => {
                self.out.extend_from_slice(b"^C\r\n");
                self.prompt();
            }
            0x04 => {
                if self.buf.is_empty() {
                    return Some(Action::Eof);
                }
                self.delete_at_cursor();
            }
            0x05 => self.move_to(self.buf.len()),
            0x06 => self.move_to(self.cursor + 1),
            0x08 | 0x7f => self.backspace(),
            0x0b => {
                self.buf.truncate(self.cursor);
                self.refresh();
            }
            0x0c => {
                self.out.extend_from_slice(b"\x1b[H\x1b[2J");
                self.refresh();
            }
            0x0e => self.history_next(),
            0x10 => self.history_prev(),
            0x15 => {
                self.buf.drain(..self.cursor);
                self.cursor = 0;
                self.refresh();
            }
            0x17 => self.kill_word(),
            0x1b => self.esc = Esc::Start,
            0x20..=0x7e => self.insert(char::from(b)),
            0xc2..=0xdf => self.start_utf8(b, 2),
            0xe0..=0xef => self.start_utf8(b, 3),
            0xf0..=0xf4 => self.start_utf8(b, 4),
            // Other control bytes and stray continuation bytes.
            _ => {}
        }
        None
    }

    fn start_utf8(&mut self, b: u8, len: usize) {
        self.utf8.clear();
        self.utf8.push(b);
        self.utf8_need = len;
    }

    fn csi(&mut self, params: &[u8], fin: u8) {
        match (params, fin) {
            (_, b'A') => self.history_prev(),
            (_, b'B') => self.history_next(),
            (b"" | b"1", b'C') => self.move_to(self.cursor + 1),
            (b"" | b"1", b'D') => self.move_to(self.cursor.saturating_sub(1)),
            // Ctrl/Alt + arrows move by words.
            (_, b'C') => self.word_right(),
            (_, b'D') => self.word_left(),
            (_, b'H') | (b"1" | b"7", b'~') => self.move_to(0),
            (_, b'F') | (b"4" | b"8", b'~') => self.move_to(self.buf.len()),
            (b"3", b'~') => self.delete_at_cursor(),
            _ => {}
        }
    }

    fn submit(&mut self) -> Action {
        // Leave the cursor after the whole line before moving on.
        self.move_to(self.buf.len());
        self.out.extend_from_slice(b"\r\n");
        let line: String = self.buf.iter().collect();
        let trimmed = line.trim();
        if !trimmed.is_empty() && self.history.last().map(String::as_str) != Some(trimmed) {
            self.history.push(trimmed.to_string());
            if self.history.len() > MAX_HISTORY {
                self.history.remove(0);
            }
        }
        self.buf.clear();
        self.saved.clear();
        self.cursor = 0;
        self.scroll = 0;
        self.hist_pos = self.history.len();
        Action::Submit(line)
    }

    fn insert(&mut self, c: char) {
        if self.buf.len() >= MAX_LINE_CHARS {
            self.out.push(0x07);
            return;
        }
        self.buf.insert(self.cursor, c);
        self.cursor += 1;
        self.refresh();
    }

    fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.buf.remove(self.cursor);
            self.refresh();
        }
    }

    fn delete_at_cursor(&mut self) {
        if self.cursor < self.buf.len() {
            self.buf.remove(self.cursor);
            self.refresh();
        }
    }

    fn move_to(&mut self, pos: usize) {
        let pos = pos.min(self.buf.len());
        if pos != self.cursor {
            self.cursor = pos;
            self.refresh();
        }
    }

    fn word_left(&mut self) {
        let mut i = self.cursor;
        while i > 0 && self.buf[i - 1].is_whitespace() {
            i -= 1;
        }
        while i > 0 && !self.buf[i - 1].is_whitespace() {
            i -= 1;
        }
        self.move_to(i);
    }

    fn word_right(&mut self) {
        let mut i = self.cursor;
        let n = self.buf.len();
        while i < n && self.buf[i].is_whitespace() {
            i += 1;
        }
        while i < n && !self.buf[i].is_whitespace() {
            i += 1;
        }
        self.move_to(i);
    }

    fn kill_word(&mut self) {
        let end = self.cursor;
        let mut start = end;
        while start > 0 && self.buf[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !self.buf[start - 1].is_whitespace() {
            start -= 1;
        }
        if start != end {
            self.buf.drain(start..end);
            self.cursor = start;
            self.refresh();
        }
    }

    fn history_prev(&mut self) {
        if self.hist_pos == 0 {
            return;
        }
        if self.hist_pos == self.history.len() {
            self.saved = self.buf.clone();
        }
        self.hist_pos -= 1;
        self.buf = self.history[self.hist_pos].chars().collect();
        self.cursor = self.buf.len();
        self.refresh();
    }

    fn history_next(&mut self) {
        if self.hist_pos >= self.history.len() {
            return;
        }
        self.hist_pos += 1;
        self.buf = if self.hist_pos == self.history.len() {
            std::mem::take(&mut self.saved)
        } else {
            self.history[self.hist_pos].chars().collect()
        };
        self.cursor = self.buf.len();
        self.refresh();
    }

    /// The start index and text of the word being typed (up to the cursor).
    fn current_word(&self) -> (usize, String) {
        let mut start = self.cursor;
        while start > 0 && !self.buf[start - 1].is_whitespace() {
            start -= 1;
        }
        (start, self.buf[start..self.cursor].iter().collect())
    }

    /// Completes the word before the cursor against `words`: a unique match is
    /// inserted (with a trailing space), several matches are extended to their
    /// common prefix and listed below the line.
    pub(crate) fn apply_completions(&mut self, words: &[String]) {
        let (start, prefix) = self.current_word();
        let mut matches: Vec<&str> = words
            .iter()
            .map(String::as_str)
            .filter(|w| w.starts_with(prefix.as_str()) && !w.is_empty())
            .collect();
        matches.sort_unstable();
        matches.dedup();
        match matches.as_slice() {
            [] => self.out.push(0x07),
            [only] => {
                let mut text: Vec<char> = only.chars().collect();
                if self.buf.get(self.cursor) != Some(&' ') {
                    text.push(' ');
                }
                self.replace_word(start, &text);
            }
            [first, rest @ ..] => {
                let mut common: &str = first;
                for m in rest {
                    let n = common
                        .char_indices()
                        .zip(m.chars())
                        .find(|((_, a), b)| a != b)
                        .map_or(common.len().min(m.len()), |((i, _), _)| i);
                    common = &common[..n];
                }
                if common.len() > prefix.len() {
                    let text: Vec<char> = common.chars().collect();
                    self.replace_word(start, &text);
                }
                self.list(&matches);
            }
        }
    }

    fn replace_word(&mut self, start: usize, text: &[char]) {
        if self.buf.len() - (self.cursor - start) + text.len() > MAX_LINE_CHARS {
            self.out.push(0x07);
            return;
        }
        self.buf.splice(start..self.cursor, text.iter().copied());
        self.cursor = start + text.len();
        self.refresh();
    }

    fn list(&mut self, items: &[&str]) {
        let width = usize::from(self.width.max(20));
        self.out.extend_from_slice(b"\r\n");
        let mut col = 0;
        for item in items {
            let len = item.chars().count();
            if col > 0 && col + 2 + len > width {
                self.out.extend_from_slice(b"\r\n");
                col = 0;
            }
            if col > 0 {
                self.out.extend_from_slice(b"  ");
                col += 2;
            }
            self.out.extend_from_slice(item.as_bytes());
            col += len;
        }
        self.out.extend_from_slice(b"\r\n");
        self.refresh();
    }

    /// Redraws the prompt row: prompt, the visible part of the line, then the cursor.
    fn refresh(&mut self) {
        let prompt_len = PROMPT.chars().count();
        let avail = usize::from(self.width)
            .saturating_sub(prompt_len + 1)
            .max(8);
        if self.cursor < self.scroll {
            self.scroll = self.cursor;
        } else if self.cursor > self.scroll + avail {
            self.scroll = self.cursor - avail;
        }
        // Use the room freed when the line got shorter.
        if self.scroll > 0 && self.buf.len() < self.scroll + avail {
            self.scroll = self.buf.len().saturating_sub(avail).min(self.cursor);
        }
        let end = self.buf.len().min(self.scroll + avail);
        self.out.push(b'\r');
        self.out.extend_from_slice(PROMPT.as_bytes());
        let visible: String = self.buf[self.scroll..end].iter().collect();
        self.out.extend_from_slice(visible.as_bytes());
        self.out.extend_from_slice(b"\x1b[K");
        let back = end - self.cursor;
        if back > 0 {
            self.out
                .extend_from_slice(format!("\x1b[{back}D").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(ed: &mut LineEditor, bytes: &[u8]) -> Vec<Action> {
        bytes.iter().filter_map(|&b| ed.feed(b)).collect()
    }

    fn submit(s: &str) -> Action {
        Action::Submit(s.to_string())
    }

    #[test]
    fn typing_and_enter() {
        let mut ed = LineEditor::new(80);
        assert_eq!(feed_all(&mut ed, b"ls -l\r\n"), [submit("ls -l")]);
        assert_eq!(feed_all(&mut ed, b"a\nb\r"), [submit("a"), submit("b")]);
        let out = String::from_utf8(ed.take_output()).expect("utf8");
        assert!(out.contains("nook> ls -l"), "{out:?}");
    }

    #[test]
    fn editing_keys() {
        let mut ed = LineEditor::new(80);
        // Left twice, insert, Home, insert, End, backspace.
        feed_all(&mut ed, b"helo\x1b[D\x1b[Dl\x01X\x05\x7f");
        assert_eq!(ed.line(), "Xhell");
        // ^A ^K kills everything, ^U kills before the cursor.
        feed_all(&mut ed, b"\x01\x0b");
        assert_eq!(ed.line(), "");
        feed_all(&mut ed, b"abc def\x1b[D\x15");
        assert_eq!(ed.line(), "f");
        // ^W deletes the word before the cursor.
        feed_all(&mut ed, b"\x05 one two  \x17");
        assert_eq!(ed.line(), "f one ");
        // ^C clears the line.
        feed_all(&mut ed, b"\x03");
        assert_eq!(ed.line(), "");
        // Home/End escape variants and Delete.
        feed_all(&mut ed, b"xyz\x1b[H\x1b[3~\x1bOF!");
        assert_eq!(ed.line(), "yz!");
    }

    #[test]
    fn ctrl_d() {
        let mut ed = LineEditor::new(80);
        assert_eq!(feed_all(&mut ed, b"ab\x01\x04"), []);
        assert_eq!(ed.line(), "b");
        feed_all(&mut ed, b"\x05\x15");
        assert_eq!(ed.line(), "");
        assert_eq!(feed_all(&mut ed, b"\x04"), [Action::Eof]);
    }

    #[test]
    fn history() {
        let mut ed = LineEditor::new(80);
        feed_all(&mut ed, b"one\rtwo\r");
        feed_all(&mut ed, b"new\x1b[A");
        assert_eq!(ed.line(), "two");
        feed_all(&mut ed, b"\x1b[A\x1b[A");
        assert_eq!(ed.line(), "one");
        feed_all(&mut ed, b"\x1b[B\x1b[B");
        assert_eq!(ed.line(), "new");
        assert_eq!(feed_all(&mut ed, b"\x1b[A\x1b[A\r"), [submit("one")]);
    }

    #[test]
    fn utf8_input() {
        let mut ed = LineEditor::new(80);
        let actions = feed_all(&mut ed, "héllo 世界 🎉\x7f!\r".as_bytes());
        assert_eq!(actions, [submit("héllo 世界 !")]);
        // Invalid sequences are dropped, not panicked on.
        let actions = feed_all(&mut ed, b"a\xff\xc3b\x80\xf0\x9fc\r");
        assert_eq!(actions, [submit("abc")]);
    }

    #[test]
    fn completion() {
        let words: Vec<String> = ["whoami", "new", "ls", "stop", "start", "stat"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut ed = LineEditor::new(80);
        assert_eq!(feed_all(&mut ed, b"who\t"), [Action::Complete]);
        ed.apply_completions(&words);
        assert_eq!(ed.line(), "whoami ");
        feed_all(&mut ed, b"\x15st");
        ed.take_output();
        ed.apply_completions(&words);
        // Common prefix is "st"; nothing to extend, so the matches are listed.
        assert_eq!(ed.line(), "st");
        let out = String::from_utf8(ed.take_output()).expect("utf8");
        assert!(out.contains("start  stat  stop"), "{out:?}");
        feed_all(&mut ed, b"o");
        ed.apply_completions(&words);
        assert_eq!(ed.line(), "stop ");
        feed_all(&mut ed, b"x");
        ed.take_output();
        ed.apply_completions(&words);
        assert_eq!(ed.line(), "stop x");
        assert_eq!(ed.take_output(), b"\x07");
    }

    #[test]
    fn long_lines_scroll_and_garbage_is_safe() {
        let mut ed = LineEditor::new(20);
        let long = "x".repeat(100);
        feed_all(&mut ed, long.as_bytes());
        let out = ed.take_output();
        // The last redraw fits in the width.
        let last = out.rsplit(|&b| b == b'\r').next().unwrap_or_default();
        assert!(last.len() < 40, "{}", String::from_utf8_lossy(last));
        // Random bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let _ = ed.feed((x >> 16) as u8);
        }
    }
}
