//! OpenAI Responses: function calls as `function_call` / `function_call_output` items, and a
//! screenshot as an `input_image` in a user message right after the call's output (where
//! every Responses model accepts images).

use serde_json::{Value, json};

use super::{Ask, ModelEvent, StreamParser};
use crate::{Block, Role};

pub fn request(ask: &Ask<'_>) -> Value {
    let tools: Vec<Value> = ask
        .tools
        .iter()
        .map(|t| {
            json!({"type": "function", "name": t.name, "description": t.description,
                   "parameters": t.schema, "strict": false})
        })
        .collect();
    let mut input = Vec::new();
    for m in ask.messages {
        let mut images = Vec::new();
        for b in &m.blocks {
            match (m.role, b) {
                (Role::User, Block::Text { text }) => input.push(json!({
                    "role": "user", "content": [{"type": "input_text", "text": text}],
                })),
                (Role::Assistant, Block::Text { text }) => input.push(json!({
                    "type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                })),
                (
                    _,
                    Block::ToolUse {
                        id,
                        name,
                        input: args,
                    },
                ) => input.push(json!({
                    "type": "function_call", "call_id": id, "name": name,
                    "arguments": args.to_string(),
                })),
                (_, Block::ToolResult { id, text, png, .. }) => {
                    input.push(
                        json!({"type": "function_call_output", "call_id": id, "output": text}),
                    );
                    if let Some(data) = png {
                        images.push(json!({"type": "input_text", "text": format!("The screenshot from call {id}:")}));
                        images.push(json!({"type": "input_image", "image_url": format!("data:image/png;base64,{data}")}));
                    }
                }
            }
        }
        if !images.is_empty() {
            input.push(json!({"role": "user", "content": images}));
        }
    }
    json!({
        "model": ask.model,
        "instructions": ask.system,
        "input": input,
        "tools": tools,
        "max_output_tokens": ask.max_tokens,
        "stream": true,
        "store": false,
    })
}

#[derive(Default)]
pub struct Parser {
    done: bool,
}

impl StreamParser for Parser {
    fn event(&mut self, name: &str, data: &str) -> Vec<ModelEvent> {
        if data.trim() == "[DONE]" {
            return if self.done {
                Vec::new()
            } else {
                self.done = true;
                vec![ModelEvent::Done]
            };
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return vec![ModelEvent::Error(format!(
                "the model sent an event that is not JSON: {}",
                data.chars().take(120).collect::<String>()
            ))];
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or(name);
        match kind {
            "response.output_text.delta" => vec![ModelEvent::Text(
                v.get("delta")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )],
            "response.output_item.done" => {
                let item = v.get("item");
                if item.and_then(|i| i.get("type")).and_then(Value::as_str) != Some("function_call")
                {
                    return Vec::new();
                }
                let s = |k: &str| {
                    item.and_then(|i| i.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                let args = s("arguments");
                let input = if args.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&args)
                        .unwrap_or_else(|e| json!({"__invalid_json": e.to_string()}))
                };
                vec![ModelEvent::ToolUse {
                    id: s("call_id"),
                    name: s("name"),
                    input,
                }]
            }
            "response.completed" | "response.incomplete" => {
                self.done = true;
                let u = |k: &str| {
                    v.pointer(&format!("/response/usage/{k}"))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                vec![
                    ModelEvent::Usage {
                        input: u("input_tokens"),
                        output: u("output_tokens"),
                    },
                    ModelEvent::Done,
                ]
            }
            "response.failed" => vec![ModelEvent::Error(
                v.pointer("/response/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("the model's response failed")
                    .to_string(),
            )],
            "error" => vec![ModelEvent::Error(
                v.get("message")
                    .or_else(|| v.pointer("/error/message"))
                    .and_then(Value::as_str)
                    .unwrap_or("the model's stream failed")
                    .to_string(),
            )],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn function_calls_and_their_outputs_pair_by_call_id() {
        let msgs = vec![
            Message {
                role: Role::User,
                blocks: vec![Block::Text { text: "hi".into() }],
            },
            Message {
                role: Role::Assistant,
                blocks: vec![Block::ToolUse {
                    id: "c1".into(),
                    name: "browser".into(),
                    input: json!({"action": "screenshot"}),
                }],
            },
            Message {
                role: Role::User,
                blocks: vec![Block::ToolResult {
                    id: "c1".into(),
                    text: "ok".into(),
                    png: Some("AAAA".into()),
                    is_error: false,
                }],
            },
        ];
        let body = request(&Ask {
            model: "m",
            system: "s",
            tools: &[],
            messages: &msgs,
            max_tokens: 10,
        });
        let input = body["input"].as_array().expect("input");
        assert_eq!(input[1]["type"], "function_call");
        assert_eq!(input[2]["call_id"], "c1");
        assert_eq!(input[3]["content"][1]["type"], "input_image");
    }

    #[test]
    fn a_function_call_comes_out_whole_at_item_done() {
        let mut p = Parser::default();
        let got = p.event(
            "response.output_item.done",
            r#"{"type":"response.output_item.done","item":{"type":"function_call","call_id":"c9","name":"bash","arguments":"{\"command\":\"true\"}"}}"#,
        );
        assert_eq!(
            got,
            vec![ModelEvent::ToolUse {
                id: "c9".into(),
                name: "bash".into(),
                input: json!({"command": "true"})
            }]
        );
        let end = p.event(
            "response.completed",
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":4}}}"#,
        );
        assert_eq!(
            end,
            vec![
                ModelEvent::Usage {
                    input: 3,
                    output: 4
                },
                ModelEvent::Done
            ]
        );
    }
}
