//! The model's two wire formats: Anthropic Messages and OpenAI Responses, both streamed.
//! Each turns the conversation's [`Message`]s into a request body, and the response's SSE
//! events into [`ModelEvent`]s.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use crate::Message;

pub mod anthropic;
pub mod openai;
mod sse;

pub use sse::SseSplitter;

/// Which wire format the model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/messages`, with tool use and image blocks.
    Anthropic,
    /// `POST /v1/responses`, with function calls.
    OpenAi,
}

impl Api {
    /// The path under the provider's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Api::Anthropic => "/v1/messages",
            Api::OpenAi => "/v1/responses",
        }
    }
}

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// The model's answer before it is read: its status, and the body as it streams.
pub struct ModelReply {
    pub status: u16,
    pub body: ByteStream,
}

/// A tool as the model is told about it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub schema: Value,
}

/// What one request asks.
pub struct Ask<'a> {
    pub model: &'a str,
    pub system: &'a str,
    pub tools: &'a [ToolSpec],
    pub messages: &'a [Message],
    pub max_tokens: u64,
}

/// One thing the model's stream said.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    Text(String),
    /// A complete tool call.
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    Usage {
        input: u64,
        output: u64,
    },
    /// The provider reported an error in the stream.
    Error(String),
    /// The answer is complete.
    Done,
}

/// Reads a provider's SSE events.
pub trait StreamParser: Send {
    /// One SSE event (`event:` name, `data:` text): what it means, in order.
    fn event(&mut self, name: &str, data: &str) -> Vec<ModelEvent>;
}

pub fn request_body(api: Api, ask: &Ask<'_>) -> Value {
    match api {
        Api::Anthropic => anthropic::request(ask),
        Api::OpenAi => openai::request(ask),
    }
}

pub fn parser(api: Api) -> Box<dyn StreamParser> {
    match api {
        Api::Anthropic => Box::<anthropic::Parser>::default(),
        Api::OpenAi => Box::<openai::Parser>::default(),
    }
}

/// The message of an error answer, whichever format it came in (both providers and the
/// gateway put it at `error.message`), or the start of the body.
pub fn error_message(status: u16, body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let message = message.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        if text.trim().is_empty() {
            "no details".to_string()
        } else {
            text
        }
    });
    match status {
        402 => format!("Out of LLM credit: {message}"),
        401 | 403 => format!("The model refused the request ({status}): {message}"),
        429 => format!("The model is rate-limited ({status}): {message}. Try again shortly."),
        _ => format!("The model answered {status}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_say_what_happened() {
        let credit = error_message(
            402,
            br#"{"type":"error","error":{"type":"insufficient_credit","message":"No LLM credit left"}}"#,
        );
        assert!(
            credit.starts_with("Out of LLM credit: No LLM credit left"),
            "{credit}"
        );
        assert_eq!(
            error_message(500, b""),
            "The model answered 500: no details"
        );
        assert!(
            error_message(529, br#"{"error":{"message":"Overloaded"}}"#).contains("Overloaded")
        );
    }
}
