//! The agent's tools: what the model is told about each, and how each runs in the VM.

use std::time::Duration;

use serde_json::{Value, json};

use crate::model::{Api, ToolSpec};
use crate::patch::{self, FileOp};
use crate::{BrowserAction, Exec, TodoItem, Workspace, WorkspaceError};

/// Every tool's name, for the unknown-tool answer.
pub const TOOL_NAMES: &[&str] = &[
    "bash", "shell", "read", "write", "patch", "search", "browser", "logs", "todo",
];

/// `bash` output kept from each end.
const BASH_KEEP: usize = 16 << 10;
const BASH_TIMEOUT: u64 = 120;
const BASH_TIMEOUT_MAX: u64 = 600;
/// The most of a file `read` returns, and the largest file `patch` edits.
const READ_LIMIT: usize = 256 << 10;
const PATCH_LIMIT: usize = 4 << 20;

/// What a tool call came to.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ok: bool,
    pub text: String,
    pub png: Option<Vec<u8>>,
    pub todo: Option<Vec<TodoItem>>,
}

impl Outcome {
    fn ok(text: impl Into<String>) -> Self {
        Outcome {
            ok: true,
            text: text.into(),
            ..Default::default()
        }
    }
    fn fail(text: impl Into<String>) -> Self {
        Outcome {
            ok: false,
            text: text.into(),
            ..Default::default()
        }
    }
}

pub fn specs(api: Api) -> Vec<ToolSpec> {
    let mut tools = vec![
        ToolSpec {
            name: "bash",
            description: "Run a bash command in the VM (as its user, in the home directory) and wait for it. Output is cut in the middle past 32 KiB. For servers and anything long-running use `shell` instead.",
            schema: json!({"type": "object", "properties": {
                "command": {"type": "string"},
                "timeout_secs": {"type": "integer", "description": "default 120, at most 600"}
            }, "required": ["command"]}),
        },
        ToolSpec {
            name: "shell",
            description: "Start a long-running command (a server, a build) in the background. Returns after wait_secs (default 5) with its pid, whether it still runs, its log file and the log's end. It keeps running after the call.",
            schema: json!({"type": "object", "properties": {
                "command": {"type": "string"},
                "wait_secs": {"type": "integer", "description": "default 5, at most 60"}
            }, "required": ["command"]}),
        },
        ToolSpec {
            name: "read",
            description: "Read a text file (paths are relative to the home directory). Gives up to `limit` lines from line `offset` (1-based).",
            schema: json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer"},
                "limit": {"type": "integer"}
            }, "required": ["path"]}),
        },
        ToolSpec {
            name: "write",
            description: "Create or overwrite a file with this content (directories are made).",
            schema: json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"}
            }, "required": ["path", "content"]}),
        },
        ToolSpec {
            name: "search",
            description: "Search file contents with ripgrep (a regular expression), under `path` (default: home).",
            schema: json!({"type": "object", "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string"},
                "glob": {"type": "string", "description": "e.g. *.py"}
            }, "required": ["pattern"]}),
        },
        ToolSpec {
            name: "browser",
            description: "A headless browser that sees the VM: `localhost` and 127.0.0.1 are the VM. Actions: navigate (url), screenshot (you get the image), console (the page's console log), eval (js, its value), click (a CSS selector).",
            schema: json!({"type": "object", "properties": {
                "action": {"type": "string", "enum": ["navigate", "screenshot", "console", "eval", "click"]},
                "url": {"type": "string"},
                "js": {"type": "string"},
                "selector": {"type": "string"}
            }, "required": ["action"]}),
        },
        ToolSpec {
            name: "logs",
            description: "The journal of a systemd unit (journalctl -u UNIT).",
            schema: json!({"type": "object", "properties": {
                "unit": {"type": "string"},
                "lines": {"type": "integer", "description": "default 100"}
            }, "required": ["unit"]}),
        },
        ToolSpec {
            name: "todo",
            description: "Replace your checklist for this task; the user sees it. Keep it short and tick items off as you go.",
            schema: json!({"type": "object", "properties": {
                "items": {"type": "array", "items": {"type": "object", "properties": {
                    "text": {"type": "string"}, "done": {"type": "boolean"}
                }, "required": ["text"]}}
            }, "required": ["items"]}),
        },
    ];
    match api {
        Api::Anthropic => tools.insert(4, ToolSpec {
            name: "patch",
            description: "Edit a file: replace the one exact occurrence of `old` with `new`. Fails when `old` occurs zero or several times.",
            schema: json!({"type": "object", "properties": {
                "path": {"type": "string"},
                "old": {"type": "string"},
                "new": {"type": "string"}
            }, "required": ["path", "old", "new"]}),
        }),
        Api::OpenAi => tools.insert(4, ToolSpec {
            name: "apply_patch",
            description: "Edit files with a patch in the apply_patch format: `*** Begin Patch`, then `*** Add File: P` (lines with +), `*** Update File: P` (hunks of ' ', '-' and '+' lines after @@), `*** Delete File: P`, and `*** End Patch`.",
            schema: json!({"type": "object", "properties": {
                "patch": {"type": "string"}
            }, "required": ["patch"]}),
        }),
    }
    tools
}

/// Quotes a word for a POSIX shell.
pub fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A path for the shell: quoted, with a leading `~` meaning the home directory as the model
/// means it.
fn path_word(p: &str) -> String {
    if p == "~" {
        "\"$HOME\"".to_string()
    } else if let Some(rest) = p.strip_prefix("~/") {
        format!("\"$HOME\"/{}", shq(rest))
    } else {
        shq(p)
    }
}

fn text_arg<'a>(input: &'a Value, key: &str) -> Result<&'a str, String> {
    input
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing `{key}` (a string)"))
}

fn num_arg(input: &Value, key: &str, default: u64, max: u64) -> u64 {
    input
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or(default)
        .clamp(1, max)
}

/// Runs one tool call. Errors of the call itself (bad arguments, a failed command) are an
/// `Outcome` with `ok: false`, for the model to read; the VM being unreachable is too.
pub async fn run(ws: &dyn Workspace, name: &str, input: &Value) -> Outcome {
    if let Some(why) = input.get("__invalid_json").and_then(Value::as_str) {
        return Outcome::fail(format!(
            "the arguments of this `{name}` call were not valid JSON ({why}); send them again"
        ));
    }
    let result = match name {
        "bash" => bash(ws, input).await,
        "shell" => shell(ws, input).await,
        "read" => read(ws, input).await,
        "write" => write(ws, input).await,
        "patch" => patch_tool(ws, input).await,
        "apply_patch" => apply_patch(ws, input).await,
        "search" => search(ws, input).await,
        "browser" => browser(ws, input).await,
        "logs" => logs(ws, input).await,
        "todo" => todo(input),
        other => Err(format!(
            "there is no tool `{other}`; the tools are: {}",
            TOOL_NAMES.join(", ")
        )),
    };
    result.unwrap_or_else(Outcome::fail)
}

async fn exec(ws: &dyn Workspace, e: Exec) -> Result<crate::ExecOutput, String> {
    ws.exec(e).await.map_err(|WorkspaceError(m)| m)
}

fn user(script: String, secs: u64, keep: usize) -> Exec {
    Exec {
        script,
        stdin: None,
        root: false,
        timeout: Duration::from_secs(secs),
        keep,
    }
}

async fn bash(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let command = text_arg(input, "command")?;
    let secs = num_arg(input, "timeout_secs", BASH_TIMEOUT, BASH_TIMEOUT_MAX);
    let out = exec(ws, user(command.to_string(), secs, BASH_KEEP)).await?;
    let mut text = out.text();
    let ok = out.status == Some(0);
    if out.timed_out {
        text.push_str(&format!(
            "\n[killed after {secs} s; use `shell` for long-running commands]"
        ));
    } else {
        match out.status {
            Some(0) => {}
            Some(n) => text.push_str(&format!("\n[exit status {n}]")),
            None => text.push_str("\n[killed by a signal]"),
        }
    }
    Ok(Outcome {
        ok,
        text,
        ..Default::default()
    })
}

async fn shell(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let command = text_arg(input, "command")?;
    let wait = num_arg(input, "wait_secs", 5, 60);
    // setsid: the command outlives this call and the agent's process group.
    let script = format!(
        r#"dir="$HOME/.nook-agent/logs"; mkdir -p "$dir"
log="$dir/$(date +%Y%m%d-%H%M%S)-$$.log"
setsid sh -c 'if command -v bash >/dev/null 2>&1; then exec bash -lc "$0"; else exec sh -lc "$0"; fi' {cmd} >"$log" 2>&1 </dev/null &
pid=$!
i=0; while [ $i -lt {ticks} ] && kill -0 $pid 2>/dev/null; do sleep 0.2; i=$((i+1)); done
if kill -0 $pid 2>/dev/null; then echo "running: pid $pid"; else wait $pid; echo "exited with status $? (pid $pid)"; fi
echo "log: $log"
echo "--- the log's end ---"
tail -c 4000 "$log""#,
        cmd = shq(command),
        ticks = wait * 5,
    );
    let out = exec(ws, user(script, wait + 30, BASH_KEEP)).await?;
    Ok(Outcome {
        ok: out.status == Some(0),
        text: out.text(),
        ..Default::default()
    })
}

async fn read(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let path = text_arg(input, "path")?;
    let offset = num_arg(input, "offset", 1, u64::MAX);
    let limit = num_arg(input, "limit", 2000, 100_000);
    let end = offset.saturating_add(limit - 1);
    let script = format!(
        r#"f={p}
[ -e "$f" ] || {{ echo "no such file: $f" >&2; exit 2; }}
[ -d "$f" ] && {{ echo "$f is a directory; its entries:"; ls -la "$f"; exit 0; }}
n=$(wc -l < "$f")
sed -n '{offset},{end}p' "$f" | head -c {cap}
if [ "$n" -gt {end} ] || [ {offset} -gt 1 ]; then echo; echo "[lines {offset}-{end} of $n]"; fi"#,
        p = path_word(path),
        cap = READ_LIMIT,
    );
    let out = exec(ws, user(script, 30, READ_LIMIT)).await?;
    Ok(Outcome {
        ok: out.status == Some(0),
        text: out.text(),
        ..Default::default()
    })
}

async fn write_file(ws: &dyn Workspace, path: &str, content: &[u8]) -> Result<(), String> {
    let script = format!(
        r#"f={p}; mkdir -p -- "$(dirname -- "$f")" && cat > "$f""#,
        p = path_word(path)
    );
    let mut e = user(script, 60, 4096);
    e.stdin = Some(content.to_vec());
    let out = exec(ws, e).await?;
    if out.status == Some(0) {
        Ok(())
    } else {
        Err(format!("could not write {path}: {}", out.text().trim()))
    }
}

async fn read_whole(ws: &dyn Workspace, path: &str) -> Result<String, String> {
    let script = format!(
        r#"f={p}; [ -f "$f" ] || {{ echo "no such file: $f" >&2; exit 2; }}; cat -- "$f""#,
        p = path_word(path)
    );
    let out = exec(ws, user(script, 30, PATCH_LIMIT)).await?;
    if out.status != Some(0) {
        return Err(out.text().trim().to_string());
    }
    if out.total as usize > out.head.len() + out.tail.len() {
        return Err(format!(
            "{path} is over {} MiB: edit it with bash (sed, a script) instead",
            PATCH_LIMIT >> 20
        ));
    }
    let mut bytes = out.head;
    bytes.extend_from_slice(&out.tail);
    String::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8 text"))
}

async fn write(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let path = text_arg(input, "path")?;
    let content = text_arg(input, "content")?;
    write_file(ws, path, content.as_bytes()).await?;
    Ok(Outcome::ok(format!(
        "wrote {path} ({} bytes, {} lines)",
        content.len(),
        content.lines().count()
    )))
}

async fn patch_tool(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let path = text_arg(input, "path")?;
    let old = text_arg(input, "old")?;
    let new = text_arg(input, "new")?;
    let content = read_whole(ws, path).await?;
    let changed = patch::replace_exact(&content, old, new).map_err(|e| format!("{path}: {e}"))?;
    write_file(ws, path, changed.as_bytes()).await?;
    Ok(Outcome::ok(format!("patched {path}")))
}

async fn apply_patch(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let text = text_arg(input, "patch")?;
    let ops = patch::parse_apply_patch(text)?;
    // Every update is worked out before anything is written, so a bad hunk changes nothing.
    let mut writes: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for op in &ops {
        match op {
            FileOp::Add { path, content } => {
                writes.push((path.clone(), Some(content.clone()), None));
            }
            FileOp::Delete { path } => writes.push((path.clone(), None, None)),
            FileOp::Update {
                path,
                move_to,
                hunks,
            } => {
                let content = read_whole(ws, path).await?;
                let changed =
                    patch::apply_hunks(&content, hunks).map_err(|e| format!("{path}: {e}"))?;
                match move_to {
                    Some(to) => {
                        writes.push((to.clone(), Some(changed), None));
                        writes.push((path.clone(), None, Some(to.clone())));
                    }
                    None => writes.push((path.clone(), Some(changed), None)),
                }
            }
        }
    }
    let mut done = Vec::new();
    for (path, content, moved) in writes {
        match content {
            Some(c) => {
                write_file(ws, &path, c.as_bytes()).await?;
                done.push(format!("wrote {path}"));
            }
            None => {
                let out =
                    exec(ws, user(format!("rm -f -- {}", path_word(&path)), 30, 4096)).await?;
                if out.status != Some(0) {
                    return Err(format!("could not delete {path}: {}", out.text().trim()));
                }
                done.push(match moved {
                    Some(to) => format!("moved {path} to {to}"),
                    None => format!("deleted {path}"),
                });
            }
        }
    }
    Ok(Outcome::ok(done.join("\n")))
}

async fn search(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let pattern = text_arg(input, "pattern")?;
    let path = input.get("path").and_then(Value::as_str).unwrap_or(".");
    let glob = input.get("glob").and_then(Value::as_str);
    let has_rg = exec(ws, user("command -v rg".into(), 10, 1024)).await?;
    let mut note = "";
    if has_rg.status != Some(0) {
        let install = Exec {
            script: "DEBIAN_FRONTEND=noninteractive apt-get install -y -q ripgrep >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ripgrep >/dev/null 2>&1; }".into(),
            root: true,
            timeout: Duration::from_secs(180),
            keep: 4096,
            stdin: None,
        };
        let installed = exec(ws, install).await?;
        if installed.status != Some(0) {
            note = "[ripgrep could not be installed; this is grep -rnE]\n";
        }
    }
    let script = if note.is_empty() {
        format!(
            "rg --line-number --max-columns 300 --color never {g} -e {p} -- {d}",
            g = glob
                .map(|g| format!("--glob {}", shq(g)))
                .unwrap_or_default(),
            p = shq(pattern),
            d = path_word(path),
        )
    } else {
        format!(
            "grep -rnE {g} -e {p} -- {d}",
            g = glob
                .map(|g| format!("--include={}", shq(g)))
                .unwrap_or_default(),
            p = shq(pattern),
            d = path_word(path),
        )
    };
    let out = exec(ws, user(script, 60, BASH_KEEP)).await?;
    let text = match out.status {
        Some(0) => format!("{note}{}", out.text()),
        Some(1) => format!("{note}no matches"),
        _ => return Err(format!("{note}search failed: {}", out.text().trim())),
    };
    Ok(Outcome::ok(text))
}

async fn browser(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let action = match text_arg(input, "action")? {
        "navigate" => BrowserAction::Navigate {
            url: text_arg(input, "url")?.to_string(),
        },
        "screenshot" => BrowserAction::Screenshot,
        "console" => BrowserAction::Console,
        "eval" => BrowserAction::Eval {
            js: text_arg(input, "js")?.to_string(),
        },
        "click" => BrowserAction::Click {
            selector: text_arg(input, "selector")?.to_string(),
        },
        other => {
            return Err(format!(
                "unknown browser action `{other}`: use navigate, screenshot, console, eval or click"
            ));
        }
    };
    let b = ws.browser().await.map_err(|WorkspaceError(m)| m)?;
    let got = b.act(action).await.map_err(|WorkspaceError(m)| m)?;
    Ok(Outcome {
        ok: true,
        text: got.text,
        png: got.png,
        todo: None,
    })
}

async fn logs(ws: &dyn Workspace, input: &Value) -> Result<Outcome, String> {
    let unit = text_arg(input, "unit")?;
    let lines = num_arg(input, "lines", 100, 5000);
    let e = Exec {
        script: format!(
            "journalctl --no-pager -o short-iso -n {lines} -u {}",
            shq(unit)
        ),
        root: true,
        timeout: Duration::from_secs(30),
        keep: BASH_KEEP,
        stdin: None,
    };
    let out = exec(ws, e).await?;
    Ok(Outcome {
        ok: out.status == Some(0),
        text: out.text(),
        ..Default::default()
    })
}

fn todo(input: &Value) -> Result<Outcome, String> {
    let items: Vec<TodoItem> = serde_json::from_value(
        input
            .get("items")
            .cloned()
            .ok_or("missing `items` (a list of {text, done})")?,
    )
    .map_err(|e| format!("`items` must be a list of {{text, done}}: {e}"))?;
    if items.len() > 100 {
        return Err("at most 100 items".into());
    }
    let open = items.iter().filter(|i| !i.done).count();
    Ok(Outcome {
        ok: true,
        text: format!("checklist saved: {} items, {open} open", items.len()),
        png: None,
        todo: Some(items),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(shq("a b"), "'a b'");
        assert_eq!(shq("it's"), "'it'\\''s'");
        assert_eq!(path_word("~/app/x y.py"), "\"$HOME\"/'app/x y.py'");
        assert_eq!(path_word("/etc/~x"), "'/etc/~x'");
    }

    #[test]
    fn each_api_gets_its_own_edit_tool() {
        let names = |api| specs(api).iter().map(|t| t.name).collect::<Vec<_>>();
        assert!(names(Api::Anthropic).contains(&"patch"));
        assert!(names(Api::OpenAi).contains(&"apply_patch"));
        assert!(!names(Api::OpenAi).contains(&"patch"));
    }
}
