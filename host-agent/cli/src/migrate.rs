//! `nanoclaw migrate ID --to HOST:PORT`: moves a running VM to another host's daemon by live
//! migration, and follows it to its end.
//!
//! The daemon answers `POST /v1/vms/{id}/migrate` with one [`MigrationEvent`] per line:
//! `accepted` once the target host has a VMM waiting for the VM, one `round` per pre-copy round
//! (the VM runs meanwhile), and `ended`, the last line, with the outcome. The CLI prints one
//! line per event (the daemon's lines as they are with `--json`) and exits by the outcome:
//! [`MOVED_EXIT`], [`KEPT_EXIT`] or [`UNKNOWN_EXIT`].
//!
//! Ctrl-C asks the daemon to cancel (`DELETE /v1/vms/{id}/migrate`, once) and keeps reading to
//! the `ended` line: a cancel that comes after the VM's state went out cannot stop the
//! switch-over, so only that line says where the VM runs. A second Ctrl-C leaves at once; the
//! daemon still settles the migration, and `nanoclaw inspect ID` shows where the VM went.

use std::io::Write;

use hyper::Method;
use nanoclaw_api::{MigrateVm, MigratedTo, MigrationEvent, MigrationOutcome};
use tokio::sync::mpsc::UnboundedReceiver;

use super::CliError;
use super::client::{Client, ClientError, Lines};

/// The exit code when the VM moved: the target host runs it, this host's copy has ended.
pub const MOVED_EXIT: u8 = 0;
/// The exit code when the VM stayed here: the migration failed or was cancelled in time.
pub const KEPT_EXIT: u8 = 1;
/// The exit code when the outcome is unknown: the state went out and no answer came back.
pub const UNKNOWN_EXIT: u8 = 3;
/// The exit code after a second Ctrl-C (the shell's code for SIGINT).
const INTERRUPTED_EXIT: u8 = 130;

/// What `nanoclaw migrate --help` says of the exit codes.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    moved: the target host runs the VM; this host's copy has ended (status `migrated`)
  1    kept here: the migration failed or was cancelled in time (the error is printed), or
       another error (a refused request, a lost daemon, a stream cut short: then
       `nanoclaw inspect ID` shows where the VM is)
  3    outcome unknown: the VM's state went out and no answer came; the VM stays paused
       here until the target's host says which copy runs
  130  a second Ctrl-C left before the outcome";

/// Errors of `nanoclaw migrate`.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A line of the migration stream does not parse.
    #[error("bad migration event from the daemon")]
    Line(#[source] serde_json::Error),
    /// The stream ended, or broke, before its `ended` line.
    #[error(
        "the daemon's stream of VM {id}'s migration ended without an outcome (`nanoclaw inspect {id}` shows where the VM is)"
    )]
    Cut {
        /// The VM.
        id: String,
        /// The failure that cut it, when it did not end cleanly.
        #[source]
        source: Option<ClientError>,
    },
}

/// `nanoclaw migrate`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct MigrateArgs {
    /// The VM to move (it must be running).
    pub id: String,
    /// The target host's migration address, as pinned on this daemon with `--migration-peer`.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_peer_addr,
          required_unless_present = "resolve", conflicts_with = "resolve")]
    pub to: Option<String>,
    /// Settle a migration whose outcome was unknown: ask the target host whether its copy runs.
    /// If it runs (or ran) there, this host's copy ends (`migrated`); if there is none, the VM
    /// runs here again.
    #[arg(long)]
    pub resolve: bool,
    /// The downtime target in milliseconds: pre-copy rounds go on until the rest can be sent
    /// within it (default: the daemon's, 300).
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// The most pre-copy rounds after the first full copy (default: the daemon's, 30).
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// Print the daemon's events as JSON lines.
    #[arg(long)]
    pub json: bool,
}

impl MigrateArgs {
    /// The request body.
    fn request(&self) -> MigrateVm {
        MigrateVm {
            to: self.to.clone().unwrap_or_default(),
            downtime_ms: self.downtime_ms,
            max_rounds: self.max_rounds,
        }
    }
}

/// `--to`: `HOST:PORT` with a port from 1 to 65535 (an IPv6 host in brackets). The daemon
/// checks that the host is a pinned peer; this only catches a forgotten port.
fn parse_peer_addr(text: &str) -> Result<String, String> {
    let bad = || format!("`{}` is not HOST:PORT", text.escape_debug());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
        return Err(bad());
    }
    Ok(text.to_owned())
}

/// The exit code for a migration's outcome.
pub fn exit_code(outcome: MigrationOutcome) -> u8 {
    match outcome {
        MigrationOutcome::Moved => MOVED_EXIT,
        MigrationOutcome::Kept => KEPT_EXIT,
        MigrationOutcome::Unknown => UNKNOWN_EXIT,
    }
}

/// The outcome's name, as the API spells it.
pub(crate) fn outcome_name(outcome: MigrationOutcome) -> &'static str {
    match outcome {
        MigrationOutcome::Moved => "moved",
        MigrationOutcome::Kept => "kept",
        MigrationOutcome::Unknown => "unknown",
    }
}

/// For `inspect`: where a live migration took the VM or brought it from, one line each
/// (escaped: the target's host names the VM there).
pub(crate) fn inspect_text(to: Option<&MigratedTo>, from: Option<&MigratedTo>) -> String {
    let line = |label: &str, m: &MigratedTo| {
        format!(
            "{label}{} as {} ({})\n",
            m.host.escape_debug(),
            m.vm.escape_debug(),
            outcome_name(m.outcome)
        )
    };
    let mut text = String::new();
    if let Some(m) = to {
        text += &line("migrated to:    ", m);
    }
    if let Some(m) = from {
        text += &line("migrated from:  ", m);
    }
    text
}

/// What the CLI knows of one migration as it reads the stream: the target host and, once it
/// accepted, the VM's id there. It turns each event into its human line.
#[derive(Debug)]
struct Transcript {
    host: String,
    target_vm: Option<String>,
}

impl Transcript {
    fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            target_vm: None,
        }
    }

    /// The human line for `event`, without its newline. Text from the daemon is escaped (the
    /// target's host names the VM there, and errors may quote it).
    fn line(&mut self, event: &MigrationEvent) -> String {
        let host = &self.host;
        match event {
            MigrationEvent::Accepted { target_vm } => {
                self.target_vm = Some(target_vm.clone());
                format!("accepted: VM {} on {host}", target_vm.escape_debug())
            }
            MigrationEvent::Device { follows: true, .. } => {
                format!("device: follows the VM to {host} (its credential calls go on there)")
            }
            MigrationEvent::Device {
                follows: false,
                error,
            } => format!(
                "device: does not follow the VM ({}): its credential calls will fail on {host}",
                error.as_deref().unwrap_or("no reason given").escape_debug()
            ),
            MigrationEvent::Round {
                round,
                pages,
                blocks,
                mb_per_s,
                dirty,
                expected_downtime_ms,
            } => {
                let blocks = match blocks {
                    0 => String::new(),
                    n => format!(" and {n} disk blocks"),
                };
                format!(
                    "round {round}: {pages} pages{blocks} at {mb_per_s:.1} MB/s, {dirty} dirty, expected downtime {expected_downtime_ms:.1} ms"
                )
            }
            MigrationEvent::Ended {
                outcome,
                target_vm,
                downtime_ms,
                total_ms,
                error,
            } => {
                let vm = target_vm.as_ref().or(self.target_vm.as_ref());
                let total = format!("total {:.2} s", total_ms / 1000.0);
                match outcome {
                    MigrationOutcome::Moved => {
                        let there = vm
                            .map(|v| format!(" as {}", v.escape_debug()))
                            .unwrap_or_default();
                        match downtime_ms {
                            Some(d) => {
                                format!("moved to {host}{there}: downtime {d:.1} ms, {total}")
                            }
                            None => format!("moved to {host}{there}: {total}"),
                        }
                    }
                    MigrationOutcome::Kept => match error {
                        Some(e) => format!("kept here: {}", e.escape_debug()),
                        None => "kept here: the daemon gave no reason".to_owned(),
                    },
                    MigrationOutcome::Unknown => {
                        let why = error.as_deref().unwrap_or("no answer from the target");
                        let there = vm
                            .map(|v| format!(" as {}", v.escape_debug()))
                            .unwrap_or_default();
                        format!(
                            "outcome unknown: {}; the VM stays paused here (it may run on {host}{there})",
                            why.escape_debug()
                        )
                    }
                }
            }
        }
    }
}

/// Runs `nanoclaw migrate`: starts the migration and follows it to its outcome, on stdout.
pub async fn run(client: &Client, args: MigrateArgs) -> Result<u8, CliError> {
    if args.resolve {
        return resolve(client, &args.id).await;
    }
    // Catch Ctrl-C from before the request, so that one during it still cancels.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CliError::Signal)?;
    let (tx, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while sigint.recv().await.is_some() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    follow(client, &args, &mut std::io::stdout(), &mut interrupts).await
}

/// `nanoclaw migrate ID --resolve`: asks the daemon to settle a migration of unknown outcome,
/// and says where the VM runs now.
async fn resolve(client: &Client, id: &str) -> Result<u8, CliError> {
    let vm: nanoclaw_api::VmInfo = client
        .json::<(), _>(Method::POST, &format!("/v1/vms/{id}/migrate/resolve"), None)
        .await?;
    let mut out = std::io::stdout().lock();
    out.write_all(resolved_text(&vm).as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Write)?;
    Ok(MOVED_EXIT)
}

/// What `--resolve` prints for the VM as the daemon answered it.
fn resolved_text(vm: &nanoclaw_api::VmInfo) -> String {
    match &vm.migrated_to {
        Some(m) if vm.status == nanoclaw_api::VmStatus::Migrated => format!(
            "{} migrated: it runs on {} as {}; this host's copy has ended\n",
            vm.id.escape_debug(),
            m.host.escape_debug(),
            m.vm.escape_debug()
        ),
        _ => format!(
            "{} runs here again: the target holds no copy of it\n",
            vm.id.escape_debug()
        ),
    }
}

/// Sends the migration request and follows its stream to the `ended` line, writing the lines
/// to `out`; each message on `interrupts` is a Ctrl-C. The answer is the exit code.
async fn follow(
    client: &Client,
    args: &MigrateArgs,
    out: &mut impl Write,
    interrupts: &mut UnboundedReceiver<()>,
) -> Result<u8, CliError> {
    let id = &args.id;
    let body = serde_json::to_vec(&args.request()).map_err(ClientError::Encode)?;
    let resp = client
        .send(Method::POST, &format!("/v1/vms/{id}/migrate"), Some(body))
        .await?;
    let mut lines = Lines::new(resp.into_body());
    let mut transcript = Transcript::new(args.to.as_deref().unwrap_or_default());
    let mut cancelling: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            Some(()) = interrupts.recv() => {
                if cancelling.is_some() {
                    eprintln!(
                        "nanoclaw: leaving; the daemon settles the migration (`nanoclaw inspect {id}` shows where VM {id} is)"
                    );
                    return Ok(INTERRUPTED_EXIT);
                }
                eprintln!("nanoclaw: cancelling… (Ctrl-C again to leave now)");
                cancelling = Some(tokio::spawn(cancel(client.clone(), id.clone())));
                continue;
            }
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(MigrateError::Cut {
                    id: id.clone(),
                    source: None,
                }
                .into());
            }
            Err(e) => {
                return Err(MigrateError::Cut {
                    id: id.clone(),
                    source: Some(e),
                }
                .into());
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event: MigrationEvent = serde_json::from_slice(&line).map_err(MigrateError::Line)?;
        let written = if args.json {
            out.write_all(&line).and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(out, "{}", transcript.line(&event))
        };
        written
            .and_then(|()| out.flush())
            .map_err(CliError::Write)?;
        if let MigrationEvent::Ended { outcome, .. } = event {
            if let Some(task) = cancelling {
                let _ = task.await;
            }
            return Ok(exit_code(outcome));
        }
    }
}

/// `DELETE /v1/vms/{id}/migrate`; a refusal (`409`: no migration runs any more) is printed,
/// and the stream's `ended` line still says how the migration ended.
async fn cancel(client: Client, id: String) {
    if let Err(e) = client
        .send(Method::DELETE, &format!("/v1/vms/{id}/migrate"), None)
        .await
    {
        eprintln!("nanoclaw: cannot cancel: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn resolve_says_where_the_vm_runs_now() {
        let vm = |status: &str| -> nanoclaw_api::VmInfo {
            serde_json::from_value(serde_json::json!({
                "id": "abc", "status": status, "spec": {"command": "/bin/agent"},
                "created_unix_ms": 0, "control_connected": false, "control_reconnects": 0,
                "guest_protocol_errors": 0, "output_dropped_bytes": 0, "vm_dir": "/d",
                "migrated_to": {"host": "10.0.0.2:7070", "vm": "f00d", "outcome": "moved"},
            }))
            .unwrap()
        };
        assert_eq!(
            resolved_text(&vm("migrated")),
            "abc migrated: it runs on 10.0.0.2:7070 as f00d; this host's copy has ended\n"
        );
        let mut here = vm("running");
        here.migrated_to = None;
        assert_eq!(
            resolved_text(&here),
            "abc runs here again: the target holds no copy of it\n"
        );
    }

    fn parse(args: &[&str]) -> Result<MigrateArgs, clap::Error> {
        let cli = Cli::try_parse_from(["nanoclaw", "migrate"].iter().chain(args))?;
        let Command::Migrate(args) = cli.command else {
            panic!("not migrate");
        };
        Ok(args)
    }

    #[test]
    fn migrate_takes_an_id_a_peer_and_optional_targets() {
        let a = parse(&[
            "abc",
            "--to",
            "10.0.0.2:7070",
            "--downtime-ms",
            "50",
            "--max-rounds",
            "5",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (
                a.id.as_str(),
                a.to.as_deref().unwrap_or_default(),
                a.downtime_ms,
                a.max_rounds,
                a.json
            ),
            ("abc", "10.0.0.2:7070", Some(50), Some(5), true)
        );
        let r = parse(&["abc", "--resolve"]).unwrap();
        assert!(r.resolve && r.to.is_none());
        assert!(parse(&["abc"]).is_err(), "--to or --resolve is needed");
        assert!(parse(&["abc", "--resolve", "--to", "h:1"]).is_err());
        let a = parse(&["abc", "--to", "[fd00::2]:7070"]).unwrap();
        assert_eq!((a.downtime_ms, a.max_rounds, a.json), (None, None, false));
        // Unset targets are left to the daemon: the body holds only what was given.
        assert_eq!(
            serde_json::to_string(&a.request()).unwrap(),
            r#"{"to":"[fd00::2]:7070"}"#
        );
        assert!(parse(&["abc"]).is_err(), "--to is required");
        assert!(parse(&["--to", "h:1"]).is_err(), "the id is required");
        for bad in ["host", "host:", ":7070", "host:0", "host:70000", "host:x"] {
            assert!(parse(&["abc", "--to", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["abc", "--to", "h:1", "--max-rounds", "-1"]).is_err());
    }

    #[test]
    fn the_help_documents_the_exit_codes() {
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        let text = help.to_string();
        for code in ["0    moved", "1    kept here", "3    outcome unknown"] {
            assert!(text.contains(code), "{code} missing from:\n{text}");
        }
    }

    #[test]
    fn outcomes_map_to_exit_codes() {
        assert_eq!(exit_code(MigrationOutcome::Moved), 0);
        assert_eq!(exit_code(MigrationOutcome::Kept), 1);
        assert_eq!(exit_code(MigrationOutcome::Unknown), 3);
    }

    /// An `ended` event 2.31 s after the start.
    fn ended(
        outcome: MigrationOutcome,
        target_vm: Option<&str>,
        downtime_ms: Option<f64>,
        error: Option<&str>,
    ) -> MigrationEvent {
        MigrationEvent::Ended {
            outcome,
            target_vm: target_vm.map(str::to_owned),
            downtime_ms,
            total_ms: 2310.0,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn each_event_is_one_human_line() {
        let mut t = Transcript::new("10.0.0.2:7070");
        let accepted: MigrationEvent =
            serde_json::from_str(r#"{"event":"accepted","target_vm":"f00d"}"#).unwrap();
        assert_eq!(t.line(&accepted), "accepted: VM f00d on 10.0.0.2:7070");
        let round: MigrationEvent = serde_json::from_str(
            r#"{"event":"round","round":0,"pages":12345,"mb_per_s":812.34,"dirty":321,"expected_downtime_ms":3.21}"#,
        )
        .unwrap();
        assert_eq!(
            t.line(&round),
            "round 0: 12345 pages at 812.3 MB/s, 321 dirty, expected downtime 3.2 ms"
        );
        let with_disk: MigrationEvent = serde_json::from_str(
            r#"{"event":"round","round":1,"pages":10,"blocks":7,"mb_per_s":1.0,"dirty":2,"expected_downtime_ms":0.5}"#,
        )
        .unwrap();
        assert_eq!(
            t.line(&with_disk),
            "round 1: 10 pages and 7 disk blocks at 1.0 MB/s, 2 dirty, expected downtime 0.5 ms"
        );
        let moved = ended(MigrationOutcome::Moved, None, Some(41.23), None);
        // The id from `accepted` when `ended` does not repeat it.
        assert_eq!(
            t.line(&moved),
            "moved to 10.0.0.2:7070 as f00d: downtime 41.2 ms, total 2.31 s"
        );
        let moved = ended(MigrationOutcome::Moved, Some("beef"), None, None);
        assert_eq!(
            t.line(&moved),
            "moved to 10.0.0.2:7070 as beef: total 2.31 s"
        );
        let kept = ended(MigrationOutcome::Kept, None, None, Some("cancelled"));
        assert_eq!(t.line(&kept), "kept here: cancelled");
        assert_eq!(
            t.line(&ended(MigrationOutcome::Kept, None, None, None)),
            "kept here: the daemon gave no reason"
        );
        let unknown = ended(
            MigrationOutcome::Unknown,
            None,
            None,
            Some("no answer after the state"),
        );
        assert_eq!(
            t.line(&unknown),
            "outcome unknown: no answer after the state; the VM stays paused here (it may run on 10.0.0.2:7070 as f00d)"
        );
        let mut fresh = Transcript::new("h:1");
        assert_eq!(
            fresh.line(&ended(MigrationOutcome::Unknown, None, None, None)),
            "outcome unknown: no answer from the target; the VM stays paused here (it may run on h:1)"
        );
    }

    #[test]
    fn text_from_the_daemon_cannot_drive_the_terminal() {
        let mut t = Transcript::new("h:1");
        let accepted = MigrationEvent::Accepted {
            target_vm: "x\u{1b}[2J".into(),
        };
        assert_eq!(t.line(&accepted), "accepted: VM x\\u{1b}[2J on h:1");
        let kept = ended(MigrationOutcome::Kept, None, None, Some("bad\nline"));
        assert_eq!(t.line(&kept), "kept here: bad\\nline");
        let refused = MigrationEvent::Device {
            follows: false,
            error: Some("the device refused: not\npaired".into()),
        };
        assert_eq!(
            t.line(&refused),
            "device: does not follow the VM (the device refused: not\\npaired): its credential calls will fail on h:1"
        );
        let follows = MigrationEvent::Device {
            follows: true,
            error: None,
        };
        assert_eq!(
            t.line(&follows),
            "device: follows the VM to h:1 (its credential calls go on there)"
        );
    }

    #[test]
    fn inspect_names_both_ends_of_a_migration() {
        assert_eq!(inspect_text(None, None), "");
        let to = MigratedTo {
            host: "10.0.0.2:7070".into(),
            vm: "f00d".into(),
            outcome: MigrationOutcome::Moved,
        };
        let from = MigratedTo {
            host: "ab12".into(),
            vm: "c0de".into(),
            outcome: MigrationOutcome::Unknown,
        };
        assert_eq!(
            inspect_text(Some(&to), Some(&from)),
            "migrated to:    10.0.0.2:7070 as f00d (moved)\n\
             migrated from:  ab12 as c0de (unknown)\n"
        );
    }

    /// A daemon on a Unix socket in a temporary folder that answers each request with the next
    /// canned answer, and reports each request's method, path and body.
    struct FakeDaemon {
        _dir: tempfile::TempDir,
        client: Client,
        requests: tokio::sync::mpsc::UnboundedReceiver<(String, String, Vec<u8>)>,
    }

    /// One canned answer: its status line and body; `after` holds the body's rest back until a
    /// request arrives on another connection.
    struct Answer {
        status: &'static str,
        body: &'static str,
        after: Option<&'static str>,
    }

    impl FakeDaemon {
        fn start(answers: Vec<Answer>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("api.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
            let (next_tx, next_rx) = tokio::sync::watch::channel(0usize);
            tokio::spawn(async move {
                for (n, answer) in answers.into_iter().enumerate() {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let (tx, next_tx, mut next_rx) = (tx.clone(), next_tx.clone(), next_rx.clone());
                    tokio::spawn(async move {
                        let request = read_request(&mut conn).await;
                        let _ = tx.send(request);
                        next_tx.send_replace(n + 1);
                        let head = format!(
                            "HTTP/1.1 {}\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n",
                            answer.status
                        );
                        let _ = conn.write_all(head.as_bytes()).await;
                        let _ = conn.write_all(answer.body.as_bytes()).await;
                        if let Some(rest) = answer.after {
                            let _ = next_rx.wait_for(|seen| *seen > n + 1).await;
                            let _ = conn.write_all(rest.as_bytes()).await;
                        }
                    });
                }
            });
            Self {
                client: Client::new(&path),
                _dir: dir,
                requests,
            }
        }
    }

    async fn read_request(conn: &mut tokio::net::UnixStream) -> (String, String, Vec<u8>) {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut piece = [0u8; 4096];
            let n = conn.read(&mut piece).await.unwrap();
            assert!(n > 0, "the request ended early");
            buf.extend_from_slice(&piece[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut piece = [0u8; 4096];
            let n = conn.read(&mut piece).await.unwrap();
            assert!(n > 0, "the request body ended early");
            buf.extend_from_slice(&piece[..n]);
        }
        let mut words = head.split(' ');
        let method = words.next().unwrap().to_owned();
        let path = words.next().unwrap().to_owned();
        (method, path, buf[head_end..].to_vec())
    }

    fn args(json: bool) -> MigrateArgs {
        MigrateArgs {
            id: "abc".into(),
            to: Some("10.0.0.2:7070".into()),
            resolve: false,
            downtime_ms: Some(50),
            max_rounds: None,
            json,
        }
    }

    const MOVED_STREAM: &str = concat!(
        r#"{"event":"accepted","target_vm":"f00d"}"#,
        "\n",
        r#"{"event":"round","round":0,"pages":100,"mb_per_s":800.0,"dirty":3,"expected_downtime_ms":0.1}"#,
        "\n",
        r#"{"event":"ended","outcome":"moved","target_vm":"f00d","downtime_ms":41.2,"total_ms":2310.0}"#,
        "\n",
    );

    #[tokio::test]
    async fn a_moved_vm_prints_its_lines_and_exits_0() {
        let mut daemon = FakeDaemon::start(vec![Answer {
            status: "200 OK",
            body: MOVED_STREAM,
            after: None,
        }]);
        let (_keep, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
        let mut out = Vec::new();
        let code = follow(&daemon.client, &args(false), &mut out, &mut interrupts)
            .await
            .unwrap();
        assert_eq!(code, MOVED_EXIT);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted: VM f00d on 10.0.0.2:7070\n\
             round 0: 100 pages at 800.0 MB/s, 3 dirty, expected downtime 0.1 ms\n\
             moved to 10.0.0.2:7070 as f00d: downtime 41.2 ms, total 2.31 s\n"
        );
        let (method, path, body) = daemon.requests.recv().await.unwrap();
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("POST", "/v1/vms/abc/migrate")
        );
        assert_eq!(body, br#"{"to":"10.0.0.2:7070","downtime_ms":50}"#);
    }

    #[tokio::test]
    async fn json_prints_the_daemons_lines_as_they_are() {
        let daemon = FakeDaemon::start(vec![Answer {
            status: "200 OK",
            body: MOVED_STREAM,
            after: None,
        }]);
        let (_keep, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
        let mut out = Vec::new();
        let code = follow(&daemon.client, &args(true), &mut out, &mut interrupts)
            .await
            .unwrap();
        assert_eq!(code, MOVED_EXIT);
        assert_eq!(String::from_utf8(out).unwrap(), MOVED_STREAM);
    }

    /// What following a migration fails with when the daemon answers `status` and `body`.
    async fn failure_of(status: &'static str, body: &'static str) -> CliError {
        let daemon = FakeDaemon::start(vec![Answer {
            status,
            body,
            after: None,
        }]);
        let (_keep, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
        follow(
            &daemon.client,
            &args(false),
            &mut Vec::new(),
            &mut interrupts,
        )
        .await
        .unwrap_err()
    }

    #[tokio::test]
    async fn a_stream_without_its_end_is_a_typed_error() {
        let err = failure_of(
            "200 OK",
            "{\"event\":\"accepted\",\"target_vm\":\"f00d\"}\n",
        )
        .await;
        assert!(
            matches!(&err, CliError::Migrate(MigrateError::Cut { id, source: None }) if id == "abc"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_refusal_before_the_stream_is_the_daemons_error() {
        let err = failure_of("409 Conflict", r#"{"error":"VM abc is not running"}"#).await;
        assert!(
            matches!(&err, CliError::Client(ClientError::Api { status, message })
                if status.as_u16() == 409 && message == "VM abc is not running"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn ctrl_c_cancels_once_and_reads_on_to_the_outcome() {
        let mut daemon = FakeDaemon::start(vec![
            Answer {
                status: "200 OK",
                body: "{\"event\":\"accepted\",\"target_vm\":\"f00d\"}\n",
                // The outcome only once the cancel has come.
                after: Some(
                    "{\"event\":\"ended\",\"outcome\":\"kept\",\"target_vm\":\"f00d\",\"total_ms\":900.0,\"error\":\"cancelled\"}\n",
                ),
            },
            Answer {
                status: "204 No Content",
                body: "",
                after: None,
            },
        ]);
        let (ctrl_c, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
        ctrl_c.send(()).unwrap();
        let mut out = Vec::new();
        let code = follow(&daemon.client, &args(false), &mut out, &mut interrupts)
            .await
            .unwrap();
        assert_eq!(code, KEPT_EXIT);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "accepted: VM f00d on 10.0.0.2:7070\nkept here: cancelled\n"
        );
        let (method, ..) = daemon.requests.recv().await.unwrap();
        assert_eq!(method, "POST");
        let (method, path, _) = daemon.requests.recv().await.unwrap();
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("DELETE", "/v1/vms/abc/migrate")
        );
    }

    #[tokio::test]
    async fn a_second_ctrl_c_leaves_at_once() {
        let daemon = FakeDaemon::start(vec![
            Answer {
                status: "200 OK",
                body: "",
                after: Some("never read\n"),
            },
            Answer {
                status: "204 No Content",
                body: "",
                after: None,
            },
        ]);
        let (ctrl_c, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
        ctrl_c.send(()).unwrap();
        ctrl_c.send(()).unwrap();
        let code = follow(
            &daemon.client,
            &args(false),
            &mut Vec::new(),
            &mut interrupts,
        )
        .await
        .unwrap();
        assert_eq!(code, INTERRUPTED_EXIT);
    }
}
