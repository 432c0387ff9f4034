//! Server-sent events, as both providers stream them: `event:` and `data:` lines, a blank
//! line between events.

/// The largest event kept; a tool call's arguments (a whole file for `write`) come in one
/// piece in some events, so this is generous but bounded.
pub const MAX_EVENT: usize = 8 << 20;

#[derive(Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
    /// Where the search for the next blank line resumes: a big event arriving in small reads
    /// is scanned once, not once per read.
    scanned: usize,
}

/// One event: its name (empty when it had none) and its data lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

impl SseSplitter {
    /// Takes more bytes; the events now complete. `Err` when one grows past [`MAX_EVENT`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            let Some((end, sep)) = find_blank_line(&self.buf, self.scanned.saturating_sub(3))
            else {
                self.scanned = self.buf.len();
                break;
            };
            let raw: Vec<u8> = self.buf.drain(..end + sep).collect();
            self.scanned = 0;
            if let Some(e) = parse(&raw[..end]) {
                events.push(e);
            }
        }
        if self.buf.len() > MAX_EVENT {
            return Err(format!(
                "the model sent an event over {} MiB",
                MAX_EVENT >> 20
            ));
        }
        Ok(events)
    }
}

fn find_blank_line(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if buf[i] == b'\r' && buf[i + 1..].starts_with(b"\n\r\n") {
            return Some((i, 4));
        }
        i += 1;
    }
    None
}

fn parse(raw: &[u8]) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(raw);
    let mut name = String::new();
    let mut data: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() {
        return None;
    }
    Some(SseEvent {
        name,
        data: data.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_come_out_whole() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"event: a\ndata: {\"x\"").expect("push").is_empty());
        let got = s
            .push(b":1}\n\n: comment\n\nevent: b\r\ndata: 2\r\n\r\ndata: 3\n\n")
            .expect("push");
        assert_eq!(
            got,
            vec![
                SseEvent {
                    name: "a".into(),
                    data: "{\"x\":1}".into()
                },
                SseEvent {
                    name: "b".into(),
                    data: "2".into()
                },
                SseEvent {
                    name: String::new(),
                    data: "3".into()
                },
            ]
        );
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut s = SseSplitter::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut refused = false;
        for _ in 0..10 {
            if s.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
