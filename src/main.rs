use std::process::ExitCode;

use clap::Parser;
use orchard::config::{Cli, Command};

/// glibc's allocator spent a fifth of the server's CPU (arena consolidation and chunk
/// unlinking) under fleet-wide DDM load; mimalloc's per-thread free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => orchard::server::serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orchard: {e}");
            ExitCode::FAILURE
        }
    }
}
