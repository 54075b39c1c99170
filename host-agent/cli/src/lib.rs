//! The `nanoclaw` command-line client of the daemon's API.
//!
//! - `run` creates a VM, relays the agent's stdout and stderr as they arrive and exits with the
//!   agent's code (128 + signal when a signal killed it). Ctrl-C stops the VM; a second Ctrl-C
//!   leaves at once. If the daemon restarts meanwhile, `run` reconnects (for up to 30 s) and
//!   resumes after the last event it relayed.
//! - `ps`, `inspect`, `logs`, `stop`, `detach`, `pause`, `resume`, `rm` are thin views of the
//!   API.
//! - `snapshot ID [NAME]` saves a VM (memory and state) in the daemon's state folder;
//!   `snapshot ls|rm` list and delete snapshots; `restore NAME` starts a new VM from one and
//!   relays its output as `run` does; `fork ID -n N` makes N VMs from one snapshot.
//! - `migrate ID --to HOST:PORT` moves a running VM to another host's daemon by live migration
//!   and prints its progress, one line per event; Ctrl-C cancels it.
//! - `approvals` lists pending approval requests; approving needs the passkey, on the page.
//! - `audit verify|tail` read the audit log file itself.
//! - `image` builds, imports, lists and removes images, and takes their warm templates;
//!   `run --image NAME` runs in one.
//! - `cp` copies a file or folder into or out of a VM.
//! - `tokenize scan` prints where the tokenizer finds sensitive values in the user's own text
//!   (a dry run of monitor mode; no daemon needed).
//!
//! Exit codes of `nanoclaw` itself: 0 success, 1 an error, 125 `run` could not give an agent
//! exit status (the VM failed, was lost or stopped before the agent started). `migrate` exits
//! by the outcome: 0 moved, 1 kept here (or an error), 3 unknown (the VM stays paused here).
//!
//! # Layout
//! - [`client`]: the HTTP/1.1 client over the Unix socket.
//! - [`approvals`]: `nanoclaw approvals`.
//! - [`audit`]: `nanoclaw audit verify|tail`.
//! - [`image`]: `nanoclaw image build|import|ls|inspect|rm`.
//! - [`token`]: `nanoclaw token create|ls|rm`, the remote API's bearer tokens.
//! - [`snapshot`]: `nanoclaw snapshot ID [NAME]`, `snapshot ls|rm`, `restore NAME`.
//! - [`migrate`]: `nanoclaw migrate ID --to HOST:PORT`, a live migration followed to its end.
//! - [`copy_in`]: `nanoclaw run --copy HOSTPATH:GUESTPATH`.
//! - [`cp`]: `nanoclaw cp SRC DST`.
//! - [`tokenize`]: `nanoclaw tokenize scan [--jsonl] [FILE]`.

pub mod approvals;
pub mod audit;
pub mod client;
pub mod copy_in;
pub mod cp;
pub mod image;
pub mod migrate;
pub mod snapshot;
pub mod token;
pub mod tokenize;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hyper::Method;

use self::client::{Client, ClientError, CopyError, Lines};
use nanoclaw_api::{self as api, AgentExit, CreateVm, Event, EventRecord, VmInfo, VmStatus};

/// How long `run` keeps trying to get the event stream back after losing the daemon.
const RECONNECT_FOR: Duration = Duration::from_secs(30);
/// The pause between those tries.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// The exit code of `run` when there is no agent exit status to pass on.
pub const RUN_FAILED_EXIT: u8 = 125;

/// Errors of the CLI.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Copying a streamed body failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// Writing our own output failed.
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
    /// Reading the `--profile` file failed.
    #[error("cannot read the profile {}", .path.display())]
    Profile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Installing the Ctrl-C handler failed.
    #[error("cannot handle Ctrl-C")]
    Signal(#[source] std::io::Error),
    /// An event line from the daemon does not parse.
    #[error("bad event from the daemon")]
    Event(#[source] serde_json::Error),
    /// An output chunk is not valid base64.
    #[error("bad output chunk from the daemon")]
    Base64(#[source] base64::DecodeError),
    /// A path could not be made absolute.
    #[error("cannot resolve {}", .path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading a file or folder to copy in failed.
    #[error("cannot copy {}", .path.display())]
    CopyIn {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `--copy` source is neither a file, a folder nor a symlink.
    #[error("cannot copy {}: only files, folders and symlinks can be copied", .0.display())]
    CopyKind(PathBuf),
    /// The files to copy in are over the limit.
    #[error(
        "the files to copy in come to {0} MiB, over the limit: copy them with `nanoclaw cp` once the VM runs"
    )]
    CopyTooLarge(usize),
    /// `nanoclaw cp` failed.
    #[error(transparent)]
    Cp(#[from] cp::CpError),
    /// `nanoclaw tokenize scan` failed.
    #[error(transparent)]
    Scan(#[from] tokenize::ScanError),
    /// `nanoclaw migrate` could not follow the migration to its outcome.
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    /// An image build failed.
    #[error("image build failed: {0}")]
    ImageBuild(String),
    /// `--env` without `=`.
    #[error("--env {0:?} is not NAME=VALUE")]
    EnvSyntax(String),
    /// The audit log is unreadable, its chain is broken, or a checkpoint fails.
    #[error(transparent)]
    Audit(#[from] nanoclaw_audit::AuditError),
    /// `--device-key` is not a device audit key.
    #[error("--device-key")]
    DeviceKey(#[source] nanoclaw_audit::CheckpointError),
    /// The VM moved to another host while it was followed.
    #[error(
        "VM {id} moved to another host by a live migration; its agent runs on there (`nanoclaw inspect {id}` says where)"
    )]
    MovedAway {
        /// The VM.
        id: String,
    },
    /// The VM ended without an agent exit status.
    #[error("VM {id} ended {status} without an agent exit status{detail}")]
    NoAgentExit {
        /// The VM.
        id: String,
        /// Its final status.
        status: &'static str,
        /// What the VMM said, if anything.
        detail: String,
    },
}

/// `nanoclaw`: run AI agents in microVMs.
#[derive(Debug, clap::Parser)]
#[command(
    name = "nanoclaw",
    version,
    about = "Run AI agents in Nanoclaw microVMs"
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run an agent in a new microVM and relay its output; exits with the agent's code.
    Run(RunArgs),
    /// List VMs.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's agent output (or its serial console).
    Logs {
        /// The VM id.
        id: String,
        /// Keep following until the VM ends.
        #[arg(short, long)]
        follow: bool,
        /// The serial console instead of the agent's output.
        #[arg(long)]
        console: bool,
    },
    /// Stop a VM (shutdown request, then SIGTERM to its VMM after a grace period).
    Stop {
        /// The VM id.
        id: String,
    },
    /// Let a VM that another VM spawned outlive it (by default it stops when its parent ends).
    Detach {
        /// The VM id.
        id: String,
    },
    /// Pause a running VM: its vCPUs stop; memory, disks and connections stay.
    Pause {
        /// The VM id.
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM id.
        id: String,
    },
    /// Save a VM's memory and state as a snapshot (`snapshot ID [NAME]`), or list or remove
    /// snapshots (`snapshot ls`, `snapshot rm NAME`). Snapshots hold guest memory: secrets too.
    Snapshot(snapshot::SnapshotArgs),
    /// Start a new VM from a snapshot and relay its agent's output (its id with `-d`).
    Restore(snapshot::RestoreArgs),
    /// Make N new VMs from a running VM (a snapshot restored N times); prints their ids.
    /// Each copy reseeds its kernel and takes a new identity before its processes go on.
    Fork {
        /// The VM id.
        id: String,
        /// How many: 1 to 8.
        #[arg(short = 'n', default_value_t = 1)]
        n: u32,
    },
    /// Move a running VM to another host's daemon by live migration (exits 0 moved, 1 kept, 3
    /// unknown).
    ///
    /// Prints one line per event: the target's VM, each pre-copy round, the outcome. Ctrl-C
    /// asks the daemon to cancel and waits for the outcome (a second Ctrl-C leaves at once).
    Migrate(migrate::MigrateArgs),
    /// Forget an ended VM and delete its state.
    Rm {
        /// The VM id.
        id: String,
    },
    /// Show everything the daemon knows about a VM.
    Inspect {
        /// The VM id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List pending approval requests. Approving from the CLI is not possible: open the
    /// request's approval page and approve with your passkey (the biometric is the point).
    Approvals {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print a one-time link (valid 10 minutes) to register a passkey, instead of listing.
        #[arg(long)]
        register_link: bool,
    },
    /// Check or show the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Build, import, list and remove images (agents' root file systems).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Make, list and remove the remote API's bearer tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Copy a file or folder into or out of a VM: `cp HOSTPATH ID:DIR` or `cp ID:PATH HOSTDIR`
    /// (the destination is a folder; out of an ended VM, what the agent wrote is copied).
    Cp(cp::CpArgs),
    /// Dry-run the tokenizer on your own data: where it finds card numbers, SSNs, emails and
    /// API keys (JSON lines of spans; no daemon needed).
    #[command(subcommand)]
    Tokenize(tokenize::TokenizeCommand),
}

/// `nanoclaw run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = api::DEFAULT_MEMORY_MIB)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = api::DEFAULT_VCPUS)]
    pub vcpus: u8,
    /// An environment variable for the agent (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The agent's working directory in the guest (default `/`, or the image's).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Run in this image's root file system (see `nanoclaw image`); without `-- CMD` the
    /// image's entrypoint and command run.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// The size of the VM's writable disk, with an image: MiB, or with a K, M, G or T suffix.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_mib, requires = "image")]
    pub disk_size: Option<u64>,
    /// The user in the image (`name`, `uid`, `name:group`, `uid:gid`); default the image's.
    #[arg(long, requires = "image")]
    pub user: Option<String>,
    /// Copy a host file or folder into the VM before it boots (repeatable, with an image).
    #[arg(long, value_name = "HOSTPATH:GUESTPATH", requires = "image")]
    pub copy: Vec<copy_in::Copy>,
    /// Forward a host port to the agent: `[ADDR:]HOSTPORT:GUESTPORT`, on loopback unless ADDR
    /// says otherwise (repeatable). The VM gets a network device for it, even when its
    /// profile allows no egress.
    #[arg(
        long = "publish",
        short = 'p',
        value_name = "[ADDR:]HOSTPORT:GUESTPORT"
    )]
    pub publish: Vec<api::PortForward>,
    /// Print the VM id and return at once instead of relaying the output.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Print the daemon's events as JSON lines instead of relaying the output.
    #[arg(long)]
    pub json: bool,
    /// The agent's access profile (TOML, see `examples/profiles/`): its tools are served
    /// through the host's MCP gateway and checked against it.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<std::path::PathBuf>,
    /// The agent's command and arguments (required without `--image`).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    pub command: Vec<String>,
}

/// `--disk-size`: `2048`, `512M`, `2G`, `1T` (MiB when there is no suffix).
pub(crate) fn parse_size_mib(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], -10i32),
        Some((i, 'M' | 'm')) => (&text[..i], 0),
        Some((i, 'G' | 'g')) => (&text[..i], 10),
        Some((i, 'T' | 't')) => (&text[..i], 20),
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512M or 2G"))?;
    let mib = if shift < 0 {
        n >> 10
    } else {
        n.checked_mul(1 << shift)
            .ok_or_else(|| format!("{text:?} is too large"))?
    };
    if mib == 0 {
        return Err(format!("{text:?} is less than 1 MiB"));
    }
    Ok(mib)
}

/// Runs the CLI; the answer is the process exit code.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let client = Client::new(cli.socket);
    match cli.command {
        Command::Run(args) => run_agent(&client, args).await,
        Command::Ps { json } => ps(&client, json).await.map(|()| 0),
        Command::Logs {
            id,
            follow,
            console,
        } => logs(&client, &id, follow, console).await.map(|()| 0),
        Command::Stop { id } => {
            let info: VmInfo = client
                .json(Method::POST, &format!("/v1/vms/{id}/stop"), None::<&()>)
                .await?;
            println!("{} {}", info.id, info.status.as_str());
            Ok(0)
        }
        Command::Detach { id } => {
            let info: VmInfo = client
                .json(Method::POST, &format!("/v1/vms/{id}/detach"), None::<&()>)
                .await?;
            println!("{} detached", info.id);
            Ok(0)
        }
        Command::Pause { id } => {
            let info: VmInfo = client
                .json(Method::POST, &format!("/v1/vms/{id}/pause"), None::<&()>)
                .await?;
            println!("{} paused", info.id);
            Ok(0)
        }
        Command::Resume { id } => {
            let info: VmInfo = client
                .json(Method::POST, &format!("/v1/vms/{id}/resume"), None::<&()>)
                .await?;
            println!("{} {}", info.id, info.status.as_str());
            Ok(0)
        }
        Command::Rm { id } => {
            client
                .send(Method::DELETE, &format!("/v1/vms/{id}"), None)
                .await?;
            Ok(0)
        }
        Command::Approvals {
            register_link: true,
            ..
        } => approvals::register_link(&client).await,
        Command::Approvals { json, .. } => approvals::list(&client, json).await,
        Command::Audit(command) => audit::run(command),
        Command::Image(command) => image::run(&client, command).await,
        Command::Token(command) => token::run(&client, command).await,
        Command::Snapshot(args) => snapshot::run(&client, args).await,
        Command::Restore(args) => snapshot::restore(&client, args).await,
        Command::Fork { id, n } => {
            let vms: Vec<VmInfo> = client
                .json(
                    Method::POST,
                    &format!("/v1/vms/{id}/fork"),
                    Some(&api::ForkVm { n }),
                )
                .await?;
            let ids: String = vms.iter().map(|v| format!("{}\n", v.id)).collect();
            print_out(&ids)?;
            Ok(0)
        }
        Command::Migrate(args) => migrate::run(&client, args).await,
        Command::Cp(args) => cp::run(&client, args).await,
        Command::Tokenize(command) => tokenize::run(command),
        Command::Inspect { id, json } => {
            let info: VmInfo = client
                .json(Method::GET, &format!("/v1/vms/{id}"), None::<&()>)
                .await?;
            print_out(&inspect_text(&info, json))?;
            Ok(0)
        }
    }
}

fn print_out(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(CliError::Write)?;
    out.flush().map_err(CliError::Write)
}

fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, CliError> {
    env.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CliError::EnvSyntax(kv.clone())),
        })
        .collect()
}

async fn run_agent(client: &Client, args: RunArgs) -> Result<u8, CliError> {
    let mut command = args.command.into_iter();
    let mut spec = CreateVm::new(command.next().unwrap_or_default(), command.collect());
    spec.env = parse_env(&args.env)?;
    spec.cwd = match (args.cwd, &args.image) {
        (Some(cwd), _) => cwd,
        // The daemon takes the image's working directory.
        (None, Some(_)) => String::new(),
        (None, None) => "/".to_owned(),
    };
    spec.image = args.image;
    spec.user = args.user;
    spec.ports = args.publish;
    if let Some(mib) = args.disk_size {
        spec.disk_size_mib = mib;
    }
    if !args.copy.is_empty() {
        let tar = copy_in::pack(&args.copy, spec.uid, spec.gid)?;
        if tar.len() > api::MAX_COPY_IN_BYTES {
            return Err(CliError::CopyTooLarge(tar.len() >> 20));
        }
        spec.copy_in_tar = Some(BASE64.encode(tar));
    }
    spec.memory_mib = args.memory;
    spec.vcpus = args.vcpus;
    if let Some(path) = &args.profile {
        let text = std::fs::read_to_string(path).map_err(|source| CliError::Profile {
            path: path.clone(),
            source,
        })?;
        spec.profile = Some(text);
    }
    // Catch Ctrl-C from before the VM exists, so that it can never leave a VM behind.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(CliError::Signal)?;
    let info: VmInfo = client.json(Method::POST, "/v1/vms", Some(&spec)).await?;
    if args.detach {
        print_out(&format!("{}\n", info.id))?;
        return Ok(0);
    }
    relay(client, info.id, args.json, &mut sigint).await
}

/// Relays VM `id`'s agent output (its events as JSON lines with `json`) until it ends; the
/// answer is the agent's exit code as `run` gives it. Ctrl-C stops the VM.
async fn relay(
    client: &Client,
    id: String,
    json: bool,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<u8, CliError> {
    let events_path = format!("/v1/vms/{id}/events?follow=true");
    let mut lines: Option<Lines> = None;
    // When the event stream was lost (a daemon restart), and the last event relayed.
    let mut outage: Option<Instant> = None;
    let mut last_seq: Option<u64> = None;
    let mut agent_exit = None;
    let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let Some(current) = lines.as_mut() else {
            match client.send(Method::GET, &events_path, None).await {
                Ok(resp) => {
                    lines = Some(Lines::new(resp.into_body()));
                    outage = None;
                }
                Err(e) => {
                    let since = *outage.get_or_insert_with(Instant::now);
                    let transient = matches!(e, ClientError::NotRunning(_) | ClientError::Http(_));
                    if !transient || since.elapsed() > RECONNECT_FOR {
                        return Err(e.into());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                        _ = sigint.recv() => {
                            eprintln!("nanoclaw: the daemon is unreachable; VM {id} keeps running");
                            return Ok(130);
                        }
                    }
                }
            }
            continue;
        };
        let line = tokio::select! {
            line = current.next_line() => line,
            _ = sigint.recv() => {
                if stopping.is_some() {
                    return Ok(130);
                }
                eprintln!("nanoclaw: stopping VM {id} (Ctrl-C again to leave now)");
                let (client, path) = (client.clone(), format!("/v1/vms/{id}/stop"));
                stopping = Some(tokio::spawn(async move {
                    if let Err(e) = client.json::<(), VmInfo>(Method::POST, &path, None).await {
                        eprintln!("nanoclaw: error: {e}");
                    }
                }));
                continue;
            }
        };
        let line = match line {
            Ok(Some(line)) => line,
            // The daemon went away mid-stream (a restart): reconnect and resume after `last_seq`.
            Ok(None) | Err(ClientError::Http(_)) => {
                lines = None;
                if outage.is_none() {
                    eprintln!("nanoclaw: lost the daemon's event stream; reconnecting");
                    outage = Some(Instant::now());
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let rec: EventRecord = serde_json::from_slice(&line).map_err(CliError::Event)?;
        if last_seq.is_some_and(|l| rec.seq <= l) {
            continue;
        }
        last_seq = Some(rec.seq);
        if json {
            let mut out = std::io::stdout().lock();
            out.write_all(&line)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
                .map_err(CliError::Write)?;
        }
        match rec.event {
            Event::Output { stream, data } if !json => write_output(stream, &data)?,
            // Guest text: control characters could drive the terminal, so they are escaped.
            Event::GuestError { message } if !json => {
                eprintln!("nanoclaw: the guest reports: {}", message.escape_debug());
            }
            Event::Exited { status } => agent_exit = Some(status),
            Event::Ended { status, vmm_exit } => {
                if let Some(task) = stopping {
                    let _ = task.await;
                }
                return match agent_exit {
                    Some(exit) => Ok(exit.shell_code()),
                    None if status == VmStatus::Stopped => Ok(130),
                    None if status == VmStatus::Migrated => Err(CliError::MovedAway { id }),
                    None => Err(CliError::NoAgentExit {
                        id,
                        status: status.as_str(),
                        detail: vmm_exit
                            .map(|e| format!(" (VMM: {})", e.reason))
                            .unwrap_or_default(),
                    }),
                };
            }
            _ => {}
        }
    }
}

fn write_output(stream: api::Stream, data: &str) -> Result<(), CliError> {
    let bytes = BASE64.decode(data).map_err(CliError::Base64)?;
    let result = match stream {
        api::Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes).and_then(|()| out.flush())
        }
        api::Stream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(&bytes).and_then(|()| err.flush())
        }
    };
    result.map_err(CliError::Write)
}

async fn ps(client: &Client, json: bool) -> Result<(), CliError> {
    let vms: Vec<VmInfo> = client.json(Method::GET, "/v1/vms", None::<&()>).await?;
    if json {
        let text = serde_json::to_string_pretty(&vms).map_err(CliError::Event)?;
        return print_out(&format!("{text}\n"));
    }
    let mut text = format!(
        "{:<10} {:<9} {:>8} {:<6} COMMAND\n",
        "ID", "STATUS", "PID", "EXIT"
    );
    for vm in &vms {
        let exit = match vm.agent_exit {
            Some(AgentExit::Exit(c)) => c.to_string(),
            Some(AgentExit::Signal(s)) => format!("sig{s}"),
            None => "-".to_owned(),
        };
        let pid = vm.vmm_pid.map_or("-".to_owned(), |p| p.to_string());
        let cmd = std::iter::once(vm.spec.command.as_str())
            .chain(vm.spec.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        text.push_str(&format!(
            "{:<10} {:<9} {:>8} {:<6} {}\n",
            vm.id,
            status_text(vm),
            pid,
            exit,
            cmd
        ));
    }
    print_out(&text)
}

/// A VM's status as `ps` and `inspect` show it: `paused` for a VM whose vCPUs are paused and
/// that has not ended (a VM that migrated away keeps its last pause flag, but its status wins).
fn status_text(vm: &VmInfo) -> &'static str {
    if vm.paused && !vm.status.is_terminal() {
        "paused"
    } else {
        vm.status.as_str()
    }
}

fn inspect_text(vm: &VmInfo, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(vm).unwrap_or_default() + "\n";
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let exit = vm.agent_exit.map(|e| match e {
        AgentExit::Exit(c) => format!("exit {c}"),
        AgentExit::Signal(s) => format!("signal {s}"),
    });
    let vmm_exit = vm.vmm_exit.as_ref().map(vmm_exit_text);
    format!(
        "id:             {}\nstatus:         {}\ncommand:        {} {}\nmemory:         {} MiB\nvcpus:          {}\nvmm pid:        {}\nagent pid:      {}\nagent exit:     {}\nvmm exit:       {}\ncontrol:        {} ({} reconnects, {} protocol errors)\noutput dropped: {} bytes, {} other events ({} bytes of VMM log)\ndirectory:      {}\n",
        vm.id,
        status_text(vm),
        vm.spec.command,
        vm.spec.args.join(" "),
        vm.spec.memory_mib,
        vm.spec.vcpus,
        opt(vm.vmm_pid.map(|p| p.to_string())),
        opt(vm.agent_pid.map(|p| p.to_string())),
        opt(exit),
        opt(vmm_exit),
        if vm.control_connected {
            "connected"
        } else {
            "not connected"
        },
        vm.control_reconnects,
        vm.guest_protocol_errors,
        vm.output_dropped_bytes,
        vm.events_dropped,
        vm.vmm_log_dropped_bytes,
        vm.vm_dir,
    ) + &parent_text(vm)
        + &migrate::inspect_text(vm.migrated_to.as_ref(), vm.migrated_from.as_ref())
        + &vm
            .restored_from
            .as_ref()
            .map(|s| format!("restored from:  snapshot {s}\n"))
            .unwrap_or_default()
        + &device_counters_text(vm.vmm_exit.as_ref())
        + &network_text(vm)
}

/// For `inspect`: a networked VM's addresses, allowlist and nonzero egress counters.
fn network_text(vm: &VmInfo) -> String {
    let Some(net) = &vm.network else {
        return String::new();
    };
    let mut text = format!(
        "network:        {} via {}\negress:         {}\n",
        net.address,
        net.gateway,
        net.egress.join(", ")
    );
    for p in &vm.spec.ports {
        text += &format!(
            "port:           {}:{} -> guest port {}\n",
            p.host_addr, p.host_port, p.guest_port
        );
    }
    let counts: Vec<String> = net
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if !counts.is_empty() {
        text += &format!("egress counts:  {}\n", counts.join(", "));
    }
    text
}

/// For `inspect`: the VM that spawned this one, if one did.
fn parent_text(vm: &VmInfo) -> String {
    match (&vm.parent, vm.detached) {
        (None, _) => String::new(),
        (Some(p), false) => format!("parent:         {p} (stops with it)\n"),
        (Some(p), true) => format!("parent:         {p} (detached)\n"),
    }
}

/// How the VMM ended, for `inspect`: the reason, its exit code or signal, and the syscall its
/// seccomp filter stopped (escaped: the VMM wrote it, and a guest may own the VMM).
fn vmm_exit_text(e: &nanoclaw_api::VmmExit) -> String {
    let mut text = match (e.exit_code, e.signal) {
        (Some(c), _) => format!("{} (exit code {c})", e.reason.escape_debug()),
        (None, Some(s)) => format!("{} (signal {s})", e.reason.escape_debug()),
        (None, None) => e.reason.escape_debug().to_string(),
    };
    if let Some(syscall) = &e.syscall {
        text.push_str(&format!(", syscall {}", syscall.escape_debug()));
    }
    text
}

/// The VMM's final device counters, one line per device, nonzero counters only.
fn device_counters_text(exit: Option<&nanoclaw_api::VmmExit>) -> String {
    let Some(exit) = exit else {
        return String::new();
    };
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
        let parts: Vec<String> = m
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if parts.is_empty() {
            "(all zero)".to_owned()
        } else {
            parts.join(" ")
        }
    };
    let mut text = String::new();
    if !exit.vsock.is_empty() {
        text += &format!("vsock:          {}\n", nonzero(&exit.vsock));
    }
    for disk in &exit.disks {
        let mode = if disk.read_only { "ro" } else { "rw" };
        text += &format!(
            "disk {} ({mode}): {}\n",
            disk.id.escape_debug(),
            nonzero(&disk.metrics)
        );
    }
    text
}

async fn logs(client: &Client, id: &str, follow: bool, console: bool) -> Result<(), CliError> {
    let what = if console { "console" } else { "events" };
    let resp = client
        .send(
            Method::GET,
            &format!("/v1/vms/{id}/{what}?follow={follow}"),
            None,
        )
        .await?;
    if console {
        return Ok(client::copy_body(resp.into_body(), &mut std::io::stdout()).await?);
    }
    let mut lines = Lines::new(resp.into_body());
    while let Some(line) = lines.next_line().await? {
        let rec: EventRecord = serde_json::from_slice(&line).map_err(CliError::Event)?;
        if let Event::Output { stream, data } = rec.event {
            write_output(stream, &data)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_vmm_exit_names_the_forbidden_syscall() {
        let exit = nanoclaw_api::VmmExit {
            reason: "seccomp".into(),
            exit_code: Some(14),
            syscall: Some("getppid".into()),
            ..Default::default()
        };
        assert_eq!(
            vmm_exit_text(&exit),
            "seccomp (exit code 14), syscall getppid"
        );
        let exit = nanoclaw_api::VmmExit {
            reason: "seccomp".into(),
            signal: Some(31),
            syscall: Some("x\u{1b}[2J".into()),
            ..Default::default()
        };
        assert_eq!(
            vmm_exit_text(&exit),
            "seccomp (signal 31), syscall x\\u{1b}[2J"
        );
        let exit = nanoclaw_api::VmmExit {
            reason: "reset".into(),
            exit_code: Some(0),
            ..Default::default()
        };
        assert_eq!(vmm_exit_text(&exit), "reset (exit code 0)");
    }

    #[test]
    fn device_counters_show_nonzero_values_and_escape_disk_ids() {
        assert_eq!(device_counters_text(None), "");
        let exit = nanoclaw_api::VmmExit {
            reason: "reset".into(),
            vsock: [
                ("conns_opened".to_owned(), 3),
                ("conns_reset".to_owned(), 0),
            ]
            .into(),
            disks: vec![
                nanoclaw_api::DiskCounters {
                    id: "nanoclaw-image".into(),
                    read_only: true,
                    metrics: [("reads".to_owned(), 12)].into(),
                },
                nanoclaw_api::DiskCounters {
                    id: "evil\u{1b}[2J".into(),
                    read_only: false,
                    metrics: [("writes".to_owned(), 0)].into(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            device_counters_text(Some(&exit)),
            "vsock:          conns_opened=3\n\
             disk nanoclaw-image (ro): reads=12\n\
             disk evil\\u{1b}[2J (rw): (all zero)\n"
        );
    }

    fn vm_info(status: &str, paused: bool) -> VmInfo {
        serde_json::from_value(serde_json::json!({
            "id": "abc", "status": status, "spec": {"command": "/bin/agent"},
            "created_unix_ms": 0, "control_connected": false, "control_reconnects": 0,
            "guest_protocol_errors": 0, "output_dropped_bytes": 0, "vm_dir": "/d",
            "paused": paused,
            "migrated_to": {"host": "10.0.0.2:7070", "vm": "f00d", "outcome": "moved"},
        }))
        .unwrap()
    }

    #[test]
    fn a_migrated_vm_shows_its_status_and_where_it_went() {
        let vm = vm_info("migrated", true);
        assert_eq!(status_text(&vm), "migrated");
        assert_eq!(status_text(&vm_info("running", true)), "paused");
        let text = inspect_text(&vm, false);
        assert!(text.contains("status:         migrated\n"), "{text}");
        assert!(
            text.contains("migrated to:    10.0.0.2:7070 as f00d (moved)\n"),
            "{text}"
        );
        assert!(!text.contains("migrated from:"), "{text}");
    }

    #[test]
    fn run_takes_the_command_after_the_double_dash() {
        let cli = Cli::try_parse_from([
            "nanoclaw", "run", "--memory", "512", "-e", "A=1", "--", "/bin/sh", "-c", "exit 3",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.memory, 512);
        assert_eq!(args.command, ["/bin/sh", "-c", "exit 3"]);
        assert_eq!(parse_env(&args.env).unwrap(), [("A".into(), "1".into())]);
        assert!(matches!(
            parse_env(&["NOEQUALS".into()]),
            Err(CliError::EnvSyntax(_))
        ));
    }

    #[test]
    fn run_with_an_image_needs_no_command_and_sizes_parse() {
        let cli = Cli::try_parse_from([
            "nanoclaw",
            "run",
            "--image",
            "py",
            "--disk-size",
            "2G",
            "--user",
            "agent",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.image.as_deref(), Some("py"));
        assert_eq!(args.disk_size, Some(2048));
        assert!(args.command.is_empty());
        assert!(
            Cli::try_parse_from(["nanoclaw", "run"]).is_err(),
            "no image, no command"
        );
        assert!(
            Cli::try_parse_from(["nanoclaw", "run", "--disk-size", "1G", "--", "true"]).is_err(),
            "--disk-size needs --image"
        );
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1t"), Ok(1 << 20));
        assert_eq!(parse_size_mib("4096K"), Ok(4));
        assert!(parse_size_mib("1K").is_err());
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("99999999999999999999G").is_err());
        assert!(parse_size_mib(&format!("{}T", u64::MAX)).is_err());
    }
}
