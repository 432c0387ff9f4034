//! Property tests of the lobby grammar: any argv a client sends parses or fails cleanly.

use clap::Parser;
use nook_api::lobby::{COMMANDS, LobbyLine};
use proptest::prelude::*;

proptest! {
    #[test]
    fn any_argv_parses_or_fails_without_panicking(argv in prop::collection::vec(any::<String>(), 0..8)) {
        let _ = LobbyLine::try_parse_from(&argv);
    }

    #[test]
    fn commands_with_arbitrary_arguments_never_panic(
        command in prop::sample::select(COMMANDS.to_vec()),
        args in prop::collection::vec(prop_oneof![
            any::<String>(),
            Just("--json".to_string()),
            Just("--name".to_string()),
            Just("--help".to_string()),
            Just("--".to_string()),
            "-[a-z]{1,2}",
            "--[a-z-]{1,12}(=.{0,8})?",
        ], 0..6),
    ) {
        let mut argv = vec![command.to_string()];
        argv.extend(args);
        let _ = LobbyLine::try_parse_from(&argv);
    }
}
