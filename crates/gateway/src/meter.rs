//! Counting tokens from what the provider reports, streamed or not.
//!
//! The gateway never estimates what it bills: it reads the provider's own usage. Responses
//! pass through as they come; a copy of each server-sent event is inspected on the side, and
//! only an event carrying `usage` is parsed.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::config::{ApiKind, Price};

/// Tokens of one request, by kind, as the provider counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens not read from or written to the prompt cache.
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Usage {
    /// The cost in micro-dollars (tokens × dollars per million tokens), rounded up.
    pub fn cost_micros(&self, price: &Price) -> u64 {
        let cost = self.input as f64 * price.input
            + self.output as f64 * price.output
            + self.cache_read as f64 * price.cache_read
            + self.cache_write as f64 * price.cache_write;
        // Floating error must not add a micro-dollar to an exact product.
        (cost - 1e-6).ceil().max(0.0) as u64
    }

    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_read + self.cache_write
    }

    /// Reads a provider's `usage` object. Anthropic counts cached input apart from
    /// `input_tokens`; OpenAI counts it inside (`prompt_tokens` or `input_tokens`), with the
    /// cached part in `*_tokens_details.cached_tokens`.
    pub fn from_json(kind: ApiKind, usage: &Value) -> Option<Usage> {
        let n = |key: &str| usage.get(key).and_then(Value::as_u64);
        match kind {
            ApiKind::Anthropic => {
                let known = ["input_tokens", "output_tokens"]
                    .iter()
                    .any(|k| usage.get(k).is_some());
                known.then(|| Usage {
                    input: n("input_tokens").unwrap_or(0),
                    output: n("output_tokens").unwrap_or(0),
                    cache_read: n("cache_read_input_tokens").unwrap_or(0),
                    cache_write: n("cache_creation_input_tokens").unwrap_or(0),
                })
            }
            ApiKind::OpenAi => {
                let (input, output, details) = if usage.get("prompt_tokens").is_some() {
                    (
                        n("prompt_tokens"),
                        n("completion_tokens"),
                        "prompt_tokens_details",
                    )
                } else {
                    (
                        n("input_tokens"),
                        n("output_tokens"),
                        "input_tokens_details",
                    )
                };
                let input = input?;
                let cached = usage
                    .get(details)
                    .and_then(|d| d.get("cached_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(input);
                Some(Usage {
                    input: input - cached,
                    output: output.unwrap_or(0),
                    cache_read: cached,
                    cache_write: 0,
                })
            }
        }
    }
}

/// The usage in a whole (non-streamed) JSON response.
pub fn usage_of_body(kind: ApiKind, body: &[u8]) -> Option<Usage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    // Responses API objects carry it at the top level too; so do chat completions and
    // Anthropic messages.
    Usage::from_json(kind, v.get("usage")?)
}

/// The longest event kept for inspection. A longer one is passed on uninspected: a usage
/// event is a few hundred bytes.
const MAX_EVENT: usize = 1 << 20;

/// Watches a server-sent event stream for usage, and can drop the usage-only chunk the
/// gateway asked an OpenAI stream for when the client did not.
#[derive(Debug)]
pub struct StreamMeter {
    kind: ApiKind,
    usage: Usage,
    seen: bool,
    /// The current, incomplete event.
    pending: BytesMut,
    /// How much of `pending` was already sent on (while skipping).
    sent: usize,
    /// `pending` grew past [`MAX_EVENT`]: skip to the next event boundary.
    skipping: bool,
    drop_usage_chunk: bool,
}

impl StreamMeter {
    pub fn new(kind: ApiKind, drop_usage_chunk: bool) -> Self {
        Self {
            kind,
            usage: Usage::default(),
            seen: false,
            pending: BytesMut::new(),
            sent: 0,
            skipping: false,
            drop_usage_chunk,
        }
    }

    /// The usage reported so far (None if the provider reported none).
    pub fn usage(&self) -> Option<Usage> {
        self.seen.then_some(self.usage)
    }

    /// Takes the next chunk from upstream and returns what to send the client. Without
    /// dropping, that is the chunk itself, at once; with dropping, whole events only.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if !self.drop_usage_chunk {
            self.scan(&chunk, None);
            return chunk;
        }
        let mut out = BytesMut::with_capacity(chunk.len());
        self.scan(&chunk, Some(&mut out));
        out.freeze()
    }

    /// The stream ended: whatever incomplete event is left goes out as it is.
    pub fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        let sent = std::mem::replace(&mut self.sent, 0);
        if self.drop_usage_chunk {
            rest.freeze().slice(sent..)
        } else {
            Bytes::new()
        }
    }

    fn scan(&mut self, mut chunk: &[u8], mut out: Option<&mut BytesMut>) {
        while !chunk.is_empty() {
            let Some(end) = boundary(&self.pending, chunk) else {
                self.pending.extend_from_slice(chunk);
                if self.skipping || self.pending.len() > MAX_EVENT {
                    // Too long to be a usage event: pass it on uninspected, keeping only the
                    // last bytes, where a blank line may begin.
                    self.skipping = true;
                    if let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(&self.pending[self.sent..]);
                    }
                    let tail = self.pending.split_off(self.pending.len().saturating_sub(2));
                    self.pending = tail;
                    self.sent = self.pending.len();
                }
                return;
            };
            let (head, tail) = chunk.split_at(end - self.pending.len());
            self.pending.extend_from_slice(head);
            let event = std::mem::take(&mut self.pending);
            let sent = std::mem::replace(&mut self.sent, 0);
            let keep = std::mem::replace(&mut self.skipping, false) || self.inspect(&event);
            if let Some(out) = out.as_deref_mut()
                && keep
            {
                out.extend_from_slice(&event[sent..]);
            }
            chunk = tail;
        }
    }

    /// Reads one whole event; false when it is the usage-only chunk to drop.
    fn inspect(&mut self, event: &[u8]) -> bool {
        if !contains(event, b"usage") {
            return true;
        }
        let mut data = Vec::new();
        for line in event.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
            }
        }
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return true;
        };
        let typ = v.get("type").and_then(Value::as_str).unwrap_or("");
        let found = match (self.kind, typ) {
            (ApiKind::Anthropic, "message_start") => v.pointer("/message/usage"),
            (ApiKind::Anthropic, _) => v.get("usage"),
            (ApiKind::OpenAi, t) if t.starts_with("response.") => v.pointer("/response/usage"),
            (ApiKind::OpenAi, _) => v.get("usage"),
        };
        let Some(usage) = found
            .filter(|u| u.is_object())
            .and_then(|u| Usage::from_json(self.kind, u).map(|parsed| (u, parsed)))
        else {
            return true;
        };
        let (raw, parsed) = usage;
        if self.kind == ApiKind::Anthropic && typ == "message_delta" {
            // message_delta carries the final output count, and input counts only when the
            // provider repeats them.
            self.usage.output = parsed.output;
            for (key, field) in [
                ("input_tokens", &mut self.usage.input),
                ("cache_read_input_tokens", &mut self.usage.cache_read),
                ("cache_creation_input_tokens", &mut self.usage.cache_write),
            ] {
                if let Some(n) = raw.get(key).and_then(Value::as_u64) {
                    *field = n;
                }
            }
        } else {
            self.usage = parsed;
        }
        self.seen = true;
        let usage_only = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        !(self.drop_usage_chunk && usage_only)
    }
}

/// Where the first event in `pending ++ chunk` ends (an index into the joined bytes, just past
/// its blank line), if it does. `pending` holds no blank line of its own, so only one that
/// starts in its last two bytes, or in `chunk`, can end the event.
fn boundary(pending: &[u8], chunk: &[u8]) -> Option<usize> {
    let overlap = pending.len().min(2);
    let mut window = pending[pending.len() - overlap..].to_vec();
    window.extend_from_slice(&chunk[..chunk.len().min(3)]);
    match find_blank(&window) {
        Some((start, end)) if start < overlap => Some(pending.len() - overlap + end),
        _ => find_blank(chunk).map(|(_, end)| pending.len() + end),
    }
}

/// Where the first blank line ("\n\n", or "\n\r\n" as in "\r\n\r\n") in `b` starts, and the
/// index just past it.
fn find_blank(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ANTHROPIC: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ok \"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":5}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    const OPENAI_HEAD: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}],\"usage\":null}\r\n\r\n";
    const OPENAI_USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":5,\"total_tokens\":25,\"prompt_tokens_details\":{\"cached_tokens\":7}}}\r\n\r\n";
    const OPENAI_DONE: &str = "data: [DONE]\r\n\r\n";

    fn run(meter: &mut StreamMeter, stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts.into_iter().chain([stream.len()]) {
            if cut > at {
                out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&stream[at..cut])));
                at = cut;
            }
        }
        out.extend_from_slice(&meter.finish());
        out
    }

    #[test]
    fn anthropic_usage_comes_from_message_start_and_delta() {
        let mut m = StreamMeter::new(ApiKind::Anthropic, false);
        let out = run(&mut m, ANTHROPIC.as_bytes(), &[]);
        assert_eq!(out, ANTHROPIC.as_bytes());
        assert_eq!(
            m.usage(),
            Some(Usage {
                input: 12,
                output: 5,
                cache_read: 0,
                cache_write: 7
            })
        );
    }

    #[test]
    fn openai_usage_chunk_is_dropped_only_when_asked() {
        let stream = format!("{OPENAI_HEAD}{OPENAI_USAGE}{OPENAI_DONE}");
        let want = Usage {
            input: 13,
            output: 5,
            cache_read: 7,
            cache_write: 0,
        };
        let mut kept = StreamMeter::new(ApiKind::OpenAi, false);
        assert_eq!(run(&mut kept, stream.as_bytes(), &[]), stream.as_bytes());
        assert_eq!(kept.usage(), Some(want));
        let mut dropped = StreamMeter::new(ApiKind::OpenAi, true);
        let out = run(&mut dropped, stream.as_bytes(), &[]);
        assert_eq!(out, format!("{OPENAI_HEAD}{OPENAI_DONE}").as_bytes());
        assert_eq!(dropped.usage(), Some(want));
    }

    #[test]
    fn responses_usage_comes_from_response_completed() {
        let stream = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"ok\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":2},\"output_tokens\":4,\"total_tokens\":13}}}\n\n";
        let mut m = StreamMeter::new(ApiKind::OpenAi, false);
        run(&mut m, stream.as_bytes(), &[]);
        assert_eq!(
            m.usage(),
            Some(Usage {
                input: 7,
                output: 4,
                cache_read: 2,
                cache_write: 0
            })
        );
    }

    #[test]
    fn costs_are_exact_to_the_token() {
        let price = Price {
            input: 3.0,
            output: 15.0,
            cache_read: 0.3,
            cache_write: 3.75,
        };
        let u = Usage {
            input: 1_000_000,
            output: 2,
            cache_read: 10,
            cache_write: 4,
        };
        // 3 $ + 30 µ$ + 3 µ$ + 15 µ$
        assert_eq!(u.cost_micros(&price), 3_000_048);
        assert_eq!(Usage::default().cost_micros(&price), 0);
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_bytes_and_usage(cuts in proptest::collection::vec(0usize..2000, 0..12), drop in any::<bool>()) {
            let openai = format!("{OPENAI_HEAD}{OPENAI_HEAD}{OPENAI_USAGE}{OPENAI_DONE}");
            for (kind, stream) in [(ApiKind::Anthropic, ANTHROPIC.to_string()), (ApiKind::OpenAi, openai)] {
                let mut whole = StreamMeter::new(kind, drop);
                let want = run(&mut whole, stream.as_bytes(), &[]);
                let mut cut = StreamMeter::new(kind, drop);
                let got = run(&mut cut, stream.as_bytes(), &cuts);
                prop_assert_eq!(got, want);
                prop_assert_eq!(cut.usage(), whole.usage());
                prop_assert!(cut.usage().is_some());
            }
        }

        #[test]
        fn garbage_never_panics_and_passes_through(bytes in proptest::collection::vec(any::<u8>(), 0..4000), cuts in proptest::collection::vec(0usize..4000, 0..8)) {
            let mut m = StreamMeter::new(ApiKind::OpenAi, false);
            let out = run(&mut m, &bytes, &cuts);
            prop_assert_eq!(out, bytes);
        }
    }
}
