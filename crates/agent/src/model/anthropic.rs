//! Anthropic Messages: `tool_use` and `tool_result` blocks, screenshots as image blocks in the
//! tool result, and the streamed events `message_start` … `message_stop`.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Ask, ModelEvent, StreamParser};
use crate::{Block, Role};

pub fn request(ask: &Ask<'_>) -> Value {
    let tools: Vec<Value> = ask
        .tools
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.schema}))
        .collect();
    let messages: Vec<Value> = ask
        .messages
        .iter()
        .map(|m| {
            let content: Vec<Value> = m.blocks.iter().map(block).collect();
            json!({
                "role": match m.role { Role::User => "user", Role::Assistant => "assistant" },
                "content": content,
            })
        })
        .collect();
    json!({
        "model": ask.model,
        "max_tokens": ask.max_tokens,
        "system": ask.system,
        "tools": tools,
        "messages": messages,
        "stream": true,
    })
}

fn block(b: &Block) -> Value {
    match b {
        Block::Text { text } => json!({"type": "text", "text": text}),
        Block::ToolUse { id, name, input } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": input})
        }
        Block::ToolResult {
            id,
            text,
            png,
            is_error,
        } => {
            let mut content = vec![json!({"type": "text", "text": text})];
            if let Some(data) = png {
                content.push(json!({
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": data},
                }));
            }
            json!({"type": "tool_result", "tool_use_id": id, "content": content, "is_error": is_error})
        }
    }
}

enum Open {
    Text,
    Tool {
        id: String,
        name: String,
        json: String,
    },
}

#[derive(Default)]
pub struct Parser {
    open: HashMap<u64, Open>,
    input_tokens: u64,
}

impl StreamParser for Parser {
    fn event(&mut self, name: &str, data: &str) -> Vec<ModelEvent> {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return vec![ModelEvent::Error(format!(
                "the model sent an event that is not JSON: {}",
                data.chars().take(120).collect::<String>()
            ))];
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(name);
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            "message_start" => {
                let usage = v.pointer("/message/usage");
                let n = |k: &str| {
                    usage
                        .and_then(|u| u.get(k))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                self.input_tokens = n("input_tokens")
                    + n("cache_read_input_tokens")
                    + n("cache_creation_input_tokens");
                Vec::new()
            }
            "content_block_start" => {
                let b = v.get("content_block");
                let open = match b.and_then(|b| b.get("type")).and_then(Value::as_str) {
                    Some("tool_use") => Open::Tool {
                        id: str_at(b, "id"),
                        name: str_at(b, "name"),
                        json: String::new(),
                    },
                    _ => Open::Text,
                };
                self.open.insert(index, open);
                // A text block may start with text already in it.
                match b.and_then(|b| b.get("text")).and_then(Value::as_str) {
                    Some(t) if !t.is_empty() => vec![ModelEvent::Text(t.to_string())],
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let d = v.get("delta");
                match d.and_then(|d| d.get("type")).and_then(Value::as_str) {
                    Some("text_delta") => vec![ModelEvent::Text(str_at(d, "text"))],
                    Some("input_json_delta") => {
                        if let Some(Open::Tool { json, .. }) = self.open.get_mut(&index) {
                            json.push_str(&str_at(d, "partial_json"));
                        }
                        Vec::new()
                    }
                    _ => Vec::new(),
                }
            }
            "content_block_stop" => match self.open.remove(&index) {
                Some(Open::Tool { id, name, json }) => {
                    let input = if json.trim().is_empty() {
                        Ok(json!({}))
                    } else {
                        serde_json::from_str(&json)
                    };
                    match input {
                        Ok(input) => vec![ModelEvent::ToolUse { id, name, input }],
                        // Still a call, so it gets an answer the model can act on.
                        Err(e) => vec![ModelEvent::ToolUse {
                            id,
                            name,
                            input: json!({"__invalid_json": e.to_string()}),
                        }],
                    }
                }
                _ => Vec::new(),
            },
            "message_delta" => {
                let output = v
                    .pointer("/usage/output_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                vec![ModelEvent::Usage {
                    input: self.input_tokens,
                    output,
                }]
            }
            "message_stop" => vec![ModelEvent::Done],
            "error" => vec![ModelEvent::Error(
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("the model's stream failed")
                    .to_string(),
            )],
            _ => Vec::new(),
        }
    }
}

fn str_at(v: Option<&Value>, key: &str) -> String {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SseSplitter;

    #[test]
    fn a_streamed_answer_gives_text_and_whole_tool_calls() {
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"bash\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"command\\\":\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"ls\\\"}\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut sse = SseSplitter::default();
        let mut p = Parser::default();
        let mut got = Vec::new();
        for e in sse.push(stream.as_bytes()).expect("sse") {
            got.extend(p.event(&e.name, &e.data));
        }
        assert_eq!(
            got,
            vec![
                ModelEvent::Text("Hi".into()),
                ModelEvent::ToolUse {
                    id: "t1".into(),
                    name: "bash".into(),
                    input: json!({"command": "ls"})
                },
                ModelEvent::Usage {
                    input: 15,
                    output: 7
                },
                ModelEvent::Done,
            ]
        );
    }

    #[test]
    fn screenshots_go_back_as_image_blocks() {
        let msgs = vec![crate::Message {
            role: Role::User,
            blocks: vec![Block::ToolResult {
                id: "t1".into(),
                text: "shot".into(),
                png: Some("iVBORw0".into()),
                is_error: false,
            }],
        }];
        let body = request(&Ask {
            model: "m",
            system: "s",
            tools: &[],
            messages: &msgs,
            max_tokens: 100,
        });
        assert_eq!(
            body.pointer("/messages/0/content/0/content/1/source/media_type"),
            Some(&json!("image/png"))
        );
    }
}
