//! Property tests of the lobby's shell-words splitter: what a client types is untrusted.

use nook_sshd::words::split;
use proptest::prelude::*;

/// Quotes `word` for a POSIX shell: single quotes, with `'` written as `'\''`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

proptest! {
    #[test]
    fn any_line_splits_or_fails_without_panicking(line in any::<String>()) {
        let _ = split(&line);
    }

    #[test]
    fn quoted_words_come_back_exactly(words in prop::collection::vec(any::<String>(), 0..8)) {
        let line = words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
        prop_assert_eq!(split(&line).expect("a quoted line splits"), words);
    }

    #[test]
    fn plain_words_split_on_blanks(words in prop::collection::vec("[a-zA-Z0-9_./:=@%+,-]{1,12}", 0..8), gap in "[ \t]{1,3}") {
        let line = words.join(&gap);
        prop_assert_eq!(split(&line).expect("plain words split"), words);
    }
}
