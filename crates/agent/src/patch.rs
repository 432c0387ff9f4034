//! File edits: the exact string replacement Anthropic models are trained on, and the
//! `apply_patch` format OpenAI models write (`*** Begin Patch` … `*** End Patch`).

/// Replaces the one occurrence of `old` in `content`. Zero or several occurrences are an
/// error that says so, so the model can widen its `old` text.
pub fn replace_exact(content: &str, old: &str, new: &str) -> Result<String, String> {
    if old.is_empty() {
        return Err(
            "`old` is empty: give the exact text to replace (use `write` to create a file)".into(),
        );
    }
    match content.matches(old).count() {
        0 => Err(format!(
            "no match: the file does not contain `old` exactly{}. Read the file again and copy the text, whitespace included.",
            near_miss(content, old)
        )),
        1 => Ok(content.replacen(old, new, 1)),
        n => Err(format!(
            "{n} matches: `old` must occur exactly once; add surrounding lines to make it unique"
        )),
    }
}

/// A hint when `old` matches once whitespace is ignored at the line ends.
fn near_miss(content: &str, old: &str) -> &'static str {
    let squash = |s: &str| s.lines().map(str::trim).collect::<Vec<_>>().join("\n");
    if squash(content).contains(&squash(old)) {
        " (it does when leading or trailing whitespace is ignored: mind the indentation)"
    } else {
        ""
    }
}

/// One file's change in an `apply_patch` patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    Add {
        path: String,
        content: String,
    },
    Delete {
        path: String,
    },
    Update {
        path: String,
        move_to: Option<String>,
        hunks: Vec<Hunk>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hunk {
    pub old: Vec<String>,
    pub new: Vec<String>,
}

pub fn parse_apply_patch(text: &str) -> Result<Vec<FileOp>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "*** Begin Patch")
        .ok_or("the patch must start with `*** Begin Patch`")?;
    let mut ops = Vec::new();
    let mut i = start + 1;
    let mut ended = false;
    while i < lines.len() {
        let line = lines[i];
        if line.trim() == "*** End Patch" {
            ended = true;
            break;
        }
        if let Some(path) = line.strip_prefix("*** Add File: ") {
            i += 1;
            let mut content = String::new();
            while i < lines.len() && !lines[i].starts_with("*** ") {
                let l = lines[i].strip_prefix('+').ok_or_else(|| {
                    format!("line {}: in an added file every line starts with +", i + 1)
                })?;
                content.push_str(l);
                content.push('\n');
                i += 1;
            }
            ops.push(FileOp::Add {
                path: path.trim().to_string(),
                content,
            });
        } else if let Some(path) = line.strip_prefix("*** Delete File: ") {
            ops.push(FileOp::Delete {
                path: path.trim().to_string(),
            });
            i += 1;
        } else if let Some(path) = line.strip_prefix("*** Update File: ") {
            i += 1;
            let mut move_to = None;
            if let Some(to) = lines.get(i).and_then(|l| l.strip_prefix("*** Move to: ")) {
                move_to = Some(to.trim().to_string());
                i += 1;
            }
            let mut hunks = Vec::new();
            let mut hunk = Hunk::default();
            while i < lines.len() && !lines[i].starts_with("*** ") {
                let l = lines[i];
                if l.starts_with("@@") {
                    if hunk != Hunk::default() {
                        hunks.push(std::mem::take(&mut hunk));
                    }
                } else if let Some(rest) = l.strip_prefix('-') {
                    hunk.old.push(rest.to_string());
                } else if let Some(rest) = l.strip_prefix('+') {
                    hunk.new.push(rest.to_string());
                } else {
                    let rest = l.strip_prefix(' ').unwrap_or(l);
                    hunk.old.push(rest.to_string());
                    hunk.new.push(rest.to_string());
                }
                i += 1;
            }
            if hunk != Hunk::default() {
                hunks.push(hunk);
            }
            if hunks.is_empty() && move_to.is_none() {
                return Err(format!("`*** Update File: {}` has no changes", path.trim()));
            }
            ops.push(FileOp::Update {
                path: path.trim().to_string(),
                move_to,
                hunks,
            });
        } else if line.trim().is_empty() {
            i += 1;
        } else {
            return Err(format!(
                "line {}: expected `*** Add File:`, `*** Update File:`, `*** Delete File:` or `*** End Patch`, found {line:?}",
                i + 1
            ));
        }
    }
    if !ended {
        return Err("the patch must end with `*** End Patch`".into());
    }
    if ops.is_empty() {
        return Err("the patch changes no file".into());
    }
    Ok(ops)
}

/// Applies an update's hunks in order; each one's old lines must occur once, after the
/// previous hunk.
pub fn apply_hunks(content: &str, hunks: &[Hunk]) -> Result<String, String> {
    let had_newline = content.ends_with('\n');
    let mut lines: Vec<String> = content.lines().map(str::to_string).collect();
    let mut from = 0;
    for (n, h) in hunks.iter().enumerate() {
        let at = if h.old.is_empty() {
            lines.len()
        } else {
            let found: Vec<usize> = (from..=lines.len().saturating_sub(h.old.len()))
                .filter(|&i| {
                    i + h.old.len() <= lines.len() && lines[i..i + h.old.len()] == h.old[..]
                })
                .collect();
            match found.as_slice() {
                [] => {
                    return Err(format!(
                        "hunk {}: its context and - lines are not in the file (from line {}):\n{}",
                        n + 1,
                        from + 1,
                        h.old.join("\n")
                    ));
                }
                [one] => *one,
                _ => {
                    return Err(format!(
                        "hunk {}: its context occurs {} times; add lines to make it unique",
                        n + 1,
                        found.len()
                    ));
                }
            }
        };
        lines.splice(at..at + h.old.len(), h.new.iter().cloned());
        from = at + h.new.len();
    }
    let mut out = lines.join("\n");
    if had_newline || content.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_needs_exactly_one_match() {
        assert_eq!(replace_exact("a b c", "b", "x"), Ok("a x c".into()));
        let none = replace_exact("a b c", "z", "x").expect_err("no match");
        assert!(none.starts_with("no match"), "{none}");
        let many = replace_exact("b b", "b", "x").expect_err("two");
        assert!(many.starts_with("2 matches"), "{many}");
        let ws = replace_exact("  fn a() {}\n", "fn a() {}  ", "x").expect_err("ws");
        assert!(ws.contains("indentation"), "{ws}");
    }

    #[test]
    fn an_apply_patch_adds_updates_and_deletes() {
        let patch = "*** Begin Patch\n*** Add File: new.txt\n+hello\n*** Update File: app.py\n@@ def main\n def main():\n-    print('a')\n+    print('b')\n*** Delete File: old.txt\n*** End Patch\n";
        let ops = parse_apply_patch(patch).expect("parse");
        assert_eq!(ops.len(), 3);
        let FileOp::Update { hunks, .. } = &ops[1] else {
            panic!("not an update")
        };
        let out = apply_hunks("import x\ndef main():\n    print('a')\n", hunks).expect("apply");
        assert_eq!(out, "import x\ndef main():\n    print('b')\n");
        let err = apply_hunks("def main():\n    pass\n", hunks).expect_err("stale");
        assert!(err.contains("not in the file"), "{err}");
        assert!(parse_apply_patch("*** Begin Patch\n*** Add File: x\n+a\n").is_err());
        assert!(parse_apply_patch("hello").is_err());
    }
}
