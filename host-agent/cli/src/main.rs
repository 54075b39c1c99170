//! The `nanoclaw` CLI: parses arguments, runs [`nanoclaw_cli::run`] and maps the outcome to
//! an exit code. Errors are one line on stderr: `nanoclaw: error: <the whole cause chain>`.

use std::process::ExitCode;

use clap::Parser;
use nanoclaw_cli::{self as cli, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_run = matches!(cli.command, cli::Command::Run(_));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nanoclaw: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("nanoclaw: error: {:#}", anyhow::Error::new(e));
            ExitCode::from(if is_run { cli::RUN_FAILED_EXIT } else { 1 })
        }
    }
}
