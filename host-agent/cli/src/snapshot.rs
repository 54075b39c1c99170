//! `nanoclaw snapshot ID [NAME]`, `nanoclaw snapshot ls|rm` and `nanoclaw restore NAME`.
//!
//! A snapshot holds the VM's whole memory (and so any secret the guest held): the daemon keeps
//! it in its state folder, root's and mode 0600, until `snapshot rm`.

use std::fmt::Write as _;

use hyper::Method;
use nanoclaw_api::{CreateSnapshot, RestoreSnapshot, SnapshotInfo, VmInfo};

use super::client::Client;
use super::{CliError, print_out};

/// `nanoclaw snapshot ...`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    /// List or remove snapshots.
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// The VM to save (a running VM is paused around the snapshot, then resumed).
    #[arg(required = true, value_name = "ID")]
    pub id: Option<String>,
    /// The snapshot's name (`A-Z a-z 0-9 . _ -`, up to 64); the daemon makes one up without it.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
}

/// `nanoclaw snapshot ls|rm`.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List the snapshots.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot's files.
    Rm {
        /// The snapshot's name.
        name: String,
    },
}

/// `nanoclaw restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot to start a new VM from.
    pub name: String,
    /// Start it with its vCPUs paused (`nanoclaw resume ID` lets them run).
    #[arg(long)]
    pub paused: bool,
    /// Print the new VM's id and return at once instead of relaying the agent's output.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Print the daemon's events as JSON lines instead of relaying the output.
    #[arg(long)]
    pub json: bool,
}

/// Runs `nanoclaw snapshot ...`.
pub async fn run(client: &Client, args: SnapshotArgs) -> Result<u8, CliError> {
    match (args.command, args.id) {
        (Some(SnapshotCommand::Ls { json }), _) => {
            let all: Vec<SnapshotInfo> = client
                .json(Method::GET, "/v1/snapshots", None::<&()>)
                .await?;
            print_out(&list_text(&all, json)?)?;
        }
        (Some(SnapshotCommand::Rm { name }), _) => {
            client
                .send(Method::DELETE, &format!("/v1/snapshots/{name}"), None)
                .await?;
        }
        (None, Some(id)) => {
            let req = CreateSnapshot { name: args.name };
            let info: SnapshotInfo = client
                .json(Method::POST, &format!("/v1/vms/{id}/snapshot"), Some(&req))
                .await?;
            print_out(&format!("{}\n", info.name))?;
        }
        // clap requires the id without a subcommand.
        (None, None) => return Ok(2),
    }
    Ok(0)
}

/// `snapshot ls`'s text.
fn list_text(all: &[SnapshotInfo], json: bool) -> Result<String, CliError> {
    if json {
        let text = serde_json::to_string_pretty(all).map_err(CliError::Event)?;
        return Ok(format!("{text}\n"));
    }
    let mut text = format!(
        "{:<24} {:<10} {:>8} {:>10} {:<16} CREATED (unix ms)\n",
        "NAME", "VM", "MEMORY", "DATA", "IMAGE"
    );
    for s in all {
        let _ = writeln!(
            text,
            "{:<24} {:<10} {:>7}M {:>9}M {:<16} {}",
            s.name,
            s.source_vm,
            s.memory_bytes >> 20,
            s.memory_data_bytes >> 20,
            s.image.as_deref().unwrap_or("-"),
            s.created_unix_ms
        );
    }
    Ok(text)
}

/// Runs `nanoclaw restore NAME`: the new VM, then as `run` does (its output relayed, or its id
/// with `-d`).
pub async fn restore(client: &Client, args: RestoreArgs) -> Result<u8, CliError> {
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CliError::Signal)?;
    let req = RestoreSnapshot {
        paused: args.paused,
    };
    let info: VmInfo = client
        .json(
            Method::POST,
            &format!("/v1/snapshots/{}/restore", args.name),
            Some(&req),
        )
        .await?;
    if args.detach {
        print_out(&format!("{}\n", info.id))?;
        return Ok(0);
    }
    eprintln!("nanoclaw: VM {} restored from {}", info.id, args.name);
    super::relay(client, info.id, args.json, &mut sigint).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<super::super::Cli, clap::Error> {
        super::super::Cli::try_parse_from(["nanoclaw"].iter().chain(args))
    }

    #[test]
    fn snapshot_takes_an_id_or_a_subcommand() {
        let cli = parse(&["snapshot", "abc", "mine"]).unwrap();
        let super::super::Command::Snapshot(a) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.id.as_deref(), a.name.as_deref()),
            (Some("abc"), Some("mine"))
        );
        assert!(a.command.is_none());
        let cli = parse(&["snapshot", "rm", "mine"]).unwrap();
        let super::super::Command::Snapshot(a) = cli.command else {
            panic!()
        };
        assert!(matches!(a.command, Some(SnapshotCommand::Rm { name }) if name == "mine"));
        assert!(parse(&["snapshot"]).is_err());
        assert!(parse(&["restore"]).is_err());
        assert!(parse(&["restore", "s", "-d", "--paused"]).is_ok());
    }
}
