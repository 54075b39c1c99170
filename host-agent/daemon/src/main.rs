//! The `host-agent` binary: `serve` runs the daemon, which starts one `nanoclaw-vmm` process per
//! agent VM. All logic lives in the library; this file parses arguments and maps the outcome to
//! an exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "host-agent", about = "The Nanoclaw host agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: the API socket and one VMM process per agent VM.
    Serve(host_agent::daemon::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match host_agent::daemon::serve_main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("host-agent: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
