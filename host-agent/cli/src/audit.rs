//! `nanoclaw audit verify` and `nanoclaw audit tail`: read the audit log file directly (no
//! daemon needed), checking the whole hash chain first.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{CliError, print_out};
use nanoclaw_api as api;
use nanoclaw_audit as audit;

/// The daemon's audit log unless `--file` says otherwise.
pub fn default_file() -> PathBuf {
    PathBuf::from(api::DEFAULT_STATE_DIR).join(nanoclaw_api::AUDIT_FILE)
}

/// `nanoclaw audit ...`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: prints the record count and head hash, or the first broken link
    /// (exit status 1). Keep the head hash elsewhere to detect a truncated log. With
    /// `--device-key`, also checks every checkpoint the device signed: its signature, and that
    /// the head it names is the chain's at its seq (a rewritten chain fails here).
    Verify {
        /// The audit log.
        #[arg(long, default_value_os_t = default_file())]
        file: PathBuf,
        /// The device's audit public key (hex, as `vault-device audit key` prints it).
        #[arg(long, value_name = "HEX")]
        device_key: Option<String>,
    },
    /// Print the last records (after checking the chain).
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: usize,
        /// The audit log.
        #[arg(long, default_value_os_t = default_file())]
        file: PathBuf,
        /// Print JSON lines (the records as stored, with their hashes).
        #[arg(long)]
        json: bool,
    },
}

/// Runs an audit subcommand.
pub fn run(command: AuditCommand) -> Result<u8, CliError> {
    match command {
        AuditCommand::Verify { file, device_key } => {
            let Some(key) = device_key else {
                let summary = audit::verify(&file)?;
                print_out(&format!(
                    "ok: {} records, head {}\ncheckpoints not checked (no --device-key)\n",
                    summary.records, summary.head
                ))?;
                return Ok(0);
            };
            let key = audit::DeviceKey::from_hex(&key).map_err(CliError::DeviceKey)?;
            let s = audit::verify_anchored(&file, &key)?;
            print_out(&format!(
                "ok: {} records, head {}\ncheckpoints: {} signed by {}; {} records anchored, \
                 {} after the last checkpoint (unanchored)\n",
                s.chain.records,
                s.chain.head,
                s.checkpoints,
                key.to_hex(),
                s.anchored,
                s.unanchored
            ))?;
        }
        AuditCommand::Tail { n, file, json } => {
            let mut text = String::new();
            for r in audit::tail(&file, n)? {
                if json {
                    let line = serde_json::json!({"hash": r.hash, "record": r.record});
                    let _ = writeln!(text, "{line}");
                } else {
                    let _ = writeln!(
                        text,
                        "{:>6} {} {:<20} {}",
                        r.record.seq, r.record.ts_unix_ms, r.record.kind, r.record.data
                    );
                }
            }
            print_out(&text)?;
        }
    }
    Ok(0)
}
