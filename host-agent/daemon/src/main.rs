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
    Serve(Box<host_agent::daemon::ServeArgs>),
    /// Print this host's live-migration key (hex), made at first use in
    /// `<state-dir>/migration/host.key`: the other hosts pin it with `--migration-peer`.
    MigrationKey {
        /// The daemon's state directory.
        #[arg(long, default_value = nanoclaw_api::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match host_agent::daemon::serve_main(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("host-agent: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::MigrationKey { state_dir } => {
            use std::os::unix::fs::DirBuilderExt;
            // The daemon's own state folder, private as `serve` makes it.
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&state_dir);
            match host_agent::migration::link::Identity::open(&state_dir) {
                Ok(identity) => {
                    println!("{}", hex::encode(identity.public()));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("host-agent: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
