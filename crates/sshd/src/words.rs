//! A small shell-words splitter for lobby command lines.
//!
//! It understands what users type at a shell prompt: blanks separate words,
//! `'single'` quotes are literal, `"double"` quotes honour `\"`, `\\`, `\$`
//! and `` \` ``, and a backslash outside quotes escapes the next character.
//! It never expands anything (no `$VAR`, globs or `~`).

/// Why a command line could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("Unterminated {0} quote")]
    UnterminatedQuote(char),
    #[error("Trailing backslash")]
    TrailingBackslash,
}

/// Splits `line` into words the way a POSIX shell would (without expansion).
pub fn split(line: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word has started even if it is empty (`''` is an empty argument).
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\\' => match chars.next() {
                // A backslash-newline is a line continuation.
                Some('\n') => {}
                Some(next) => {
                    word.push(next);
                    in_word = true;
                }
                None => return Err(SplitError::TrailingBackslash),
            },
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err(SplitError::UnterminatedQuote('\'')),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some('\n') => {}
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err(SplitError::UnterminatedQuote('"')),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err(SplitError::UnterminatedQuote('"')),
                    }
                }
            }
            other => {
                word.push(other);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<String> {
        split(s).expect("split")
    }

    #[test]
    fn plain_words() {
        assert_eq!(ok("  ls   -l\tfoo \n"), ["ls", "-l", "foo"]);
        assert!(ok("").is_empty());
        assert!(ok("   ").is_empty());
    }

    #[test]
    fn quotes() {
        assert_eq!(
            ok("new --prompt 'hello world'"),
            ["new", "--prompt", "hello world"]
        );
        assert_eq!(ok(r#"echo "a \"b\" \$x \n""#), ["echo", r#"a "b" $x \n"#]);
        assert_eq!(ok(r#"a'b'"c"d"#), ["abcd"]);
        assert_eq!(ok("'' \"\""), ["", ""]);
        assert_eq!(ok(r"'it\'s"), [r"it\s"]);
    }

    #[test]
    fn backslashes() {
        assert_eq!(ok(r"a\ b c\\d"), ["a b", r"c\d"]);
        assert_eq!(ok("a\\\nb"), ["ab"]);
    }

    #[test]
    fn unicode() {
        assert_eq!(ok("echo héllo '世界 🎉'"), ["echo", "héllo", "世界 🎉"]);
    }

    #[test]
    fn errors() {
        assert_eq!(split("echo 'abc"), Err(SplitError::UnterminatedQuote('\'')));
        assert_eq!(split("echo \"abc"), Err(SplitError::UnterminatedQuote('"')));
        assert_eq!(
            split("echo \"abc\\"),
            Err(SplitError::UnterminatedQuote('"'))
        );
        assert_eq!(split("echo abc\\"), Err(SplitError::TrailingBackslash));
    }
}
