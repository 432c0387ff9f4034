//! `nook`: parses arguments, loads config and hands off to the daemon library or the admin
//! client. Exit status: 0 on success, the guest command's status for `vm exec`, 1 on error.

mod cli;
mod client;
mod commands;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(commands::run(cli));
    std::process::exit(code);
}
