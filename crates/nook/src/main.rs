//! `nook`: parses arguments, loads config and hands off to the daemon library or the admin
//! client. Exit status: 0 on success, the guest command's status for `vm exec`, 1 on error.

mod cli;
mod client;
mod commands;

use clap::Parser;

/// The edge proxies every HTTPS request and allocates per request; in nook-edge's
/// examples/proxy_bench, mimalloc gave 1.06x nginx's throughput where glibc's malloc gave 0.96x
/// (one pair of runs; runs swing by about 5%).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
