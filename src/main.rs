use std::process::ExitCode;

use clap::Parser;
use orchard::config::{Cli, Command};

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
