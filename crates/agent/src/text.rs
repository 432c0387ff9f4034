//! Events as a terminal shows them.

use crate::Event;

/// Text from the model, the VM or another person, made safe for a terminal: no escape
/// sequences (a clipboard write, a retitled window), only newlines and tabs kept.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

impl Event {
    /// The event as a terminal shows it (`agent prompt`, `agent log`), with nothing in it that
    /// a terminal would act on.
    pub fn to_text(&self) -> String {
        printable(&self.raw_text())
    }

    fn raw_text(&self) -> String {
        let e = self;
        fn short(s: &str, n: usize) -> String {
            let line = s.lines().next().unwrap_or_default();
            let t: String = line.chars().take(n).collect();
            if t.len() < s.len() {
                format!("{t}…")
            } else {
                t
            }
        }
        match e {
            Event::User { text, by } => format!("\n> {by}: {}\n\n", short(text, 500)),
            Event::Text { delta } => delta.clone(),
            Event::ToolCall { name, input, .. } => {
                let what = ["command", "path", "url", "action", "pattern", "unit"]
                    .iter()
                    .find_map(|k| input.get(*k).and_then(|v| v.as_str()))
                    .map_or_else(|| short(&input.to_string(), 120), |s| short(s, 120));
                format!("\n[{name}] {what}\n")
            }
            Event::ToolResult {
                ok,
                output,
                png,
                ms,
                ..
            } => {
                let shot = png
                    .as_ref()
                    .map(|p| format!(" [screenshot, {} KiB]", p.len() * 3 / 4 / 1024))
                    .unwrap_or_default();
                if *ok {
                    format!("  -> ok ({:.1} s){shot}\n", *ms as f64 / 1000.0)
                } else {
                    format!("  -> failed: {}\n", short(output.trim(), 300))
                }
            }
            Event::Todo { items } => {
                let mut s = String::from("\nchecklist:\n");
                for i in items {
                    s.push_str(&format!(
                        "  [{}] {}\n",
                        if i.done { "x" } else { " " },
                        i.text
                    ));
                }
                s
            }
            Event::Compacted { messages, .. } => {
                format!("\n(older turns were compacted to fit the context: {messages} messages)\n")
            }
            Event::Error { message } => format!("\nerror: {message}\n"),
            Event::Notice { message } => format!("\nnote: {message}\n"),
            Event::Usage { .. } => String::new(),
            Event::TurnEnd { reason } => format!("\n(turn {reason})\n"),
        }
    }
}
