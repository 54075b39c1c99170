//! `vault-device`: the command line of the user's device. The logic lives in the library; this
//! file parses arguments, reads the passphrase and secrets, and prints results.
//!
//! The passphrase comes from `--passphrase-file` or the `VAULT_DEVICE_PASSPHRASE` variable; a
//! secret for `add` comes from standard input (never from the command line, which other users
//! can read in `/proc`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use shared_proto::approval::RelyingParty;
use vault_device::ErrorChain;
use vault_device::approval::{PasskeyFile, fingerprint};
use vault_device::approval_page::{self, ApprovalPage};
use vault_device::checkpoint;
use vault_device::device::{self, Device, DeviceConfig};
use vault_device::grant::{self, GrantRequest};
use vault_device::vault::{Entry, KdfParams, Secret, Vault, choose_pairing, host_label};
use zeroize::Zeroizing;

#[derive(Debug, Parser)]
#[command(
    name = "vault-device",
    about = "The user's device: credentials that never leave it"
)]
struct Cli {
    /// The vault file.
    #[arg(long, default_value = "vault-device.vault")]
    vault: PathBuf,
    /// A file holding the passphrase (its first line); else `VAULT_DEVICE_PASSPHRASE`.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new vault with a fresh identity key.
    Init {
        /// Argon2id memory cost in KiB (default 19456).
        #[arg(long)]
        kdf_memory_kib: Option<u32>,
        /// Argon2id iterations (default 2).
        #[arg(long)]
        kdf_iterations: Option<u32>,
    },
    /// Add a credential; its secret is read from standard input.
    Add {
        /// The credential name (also the base-URL mode's service name).
        name: String,
        /// An authority (`host` or `host:port`) it may be sent to; repeatable; the first is the
        /// base-URL target.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// The header it is sent in.
        #[arg(long, default_value = "Authorization")]
        header: String,
        /// The header value, `{}` standing for the secret.
        #[arg(long, default_value = "Bearer {}")]
        format: String,
    },
    /// Remove a credential and its grants.
    Remove {
        /// The credential name.
        name: String,
    },
    /// List credentials (never their secrets), grants, the paired hosts and the moves.
    List,
    /// Allow releasing a credential to a host for a VM of a paired host until an expiry.
    Grant {
        /// The credential name.
        credential: String,
        /// The authority the call goes to (must be one of the credential's hosts).
        #[arg(long)]
        host: String,
        /// The VM id on that paired host, or `*` for any VM of that host.
        #[arg(long, default_value = "*")]
        vm: String,
        /// The paired host the VM runs on: its name, its address or its key in hex (default:
        /// the only paired host).
        #[arg(long)]
        on: Option<String>,
        /// Seconds from now.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Also allow the fallback path (the secret sealed into the guest).
        #[arg(long)]
        fallback: bool,
    },
    /// Remove every grant of a credential.
    Revoke {
        /// The credential name.
        credential: String,
    },
    /// Print the device's identity public key (hex).
    Identity,
    /// Pair with a host, using the code it shows (added to the paired hosts, in place of one
    /// with the same key or address).
    Pair {
        /// The host's device listener (`host:port`).
        #[arg(long)]
        host: String,
        /// The pairing code.
        #[arg(long)]
        code: String,
        /// This device's name, shown to the host.
        #[arg(long, default_value = "vault-device")]
        name: String,
    },
    /// Keep a link to each paired host up and answer sessions (a host paired meanwhile is
    /// linked within a few seconds).
    Serve {
        /// A PEM CA file trusted for upstream HTTPS (repeatable; no built-in roots).
        #[arg(long = "ca-file")]
        ca_files: Vec<PathBuf>,
        /// `host=ip:port`: a fixed resolution (repeatable).
        #[arg(long = "resolve")]
        resolve: Vec<String>,
        /// Log JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Seconds a call without a grant waits for the user's passkey approval.
        #[arg(long, default_value_t = device::DEFAULT_APPROVAL_WAIT.as_secs())]
        approval_wait_secs: u64,
        /// Serve the device's own approval page on this loopback address (`127.0.0.1:PORT`;
        /// origin `http://localhost:PORT`). Passkeys registered on the device are approved
        /// there only, so use the port they were registered on.
        #[arg(long)]
        approval_listen: Option<SocketAddr>,
        /// Also print a one-time link that registers a passkey on the approval page.
        #[arg(long, requires = "approval_listen")]
        open_registration: bool,
    },
    /// The passkeys whose approvals the device accepts (`<vault>.passkeys.json`).
    Passkey {
        #[command(subcommand)]
        command: PasskeyCommand,
    },
    /// The host's audit log: the device's checkpoint key and its own checkpoint log
    /// (`<vault>.checkpoints.log`).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print the device's audit public key (hex), for `nanoclaw audit verify --device-key`.
    Key,
    /// Check a copy of the host's audit log against the checkpoints this device signed: each
    /// must be in it with a matching head, and its record present (exit status 1 otherwise).
    Check {
        /// The copy of the host's audit log.
        file: PathBuf,
        /// The log label to check (default: the only one the device has signed for).
        #[arg(long)]
        log: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PasskeyCommand {
    /// Register a passkey on the device's own approval page: serves the page on a loopback
    /// address, prints a one-time link, and stores the passkey once the ceremony in the browser
    /// succeeds. Approvals are then shown and signed on the device's page only (`serve
    /// --approval-listen` with the same address). Run it while `serve` is stopped (it uses the
    /// same port), or use `serve --open-registration` instead.
    Register {
        /// The loopback address of the page (`127.0.0.1:PORT`; origin `http://localhost:PORT`).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Store the host's registered passkeys (a copy of its `passkeys.json`) and the origin of
    /// its approval pages. The host is trusted for this once: compare the fingerprints that
    /// `list` prints with the passkey you registered.
    Import {
        /// The host's passkeys file.
        file: PathBuf,
        /// The rp id of the approval pages (their domain).
        #[arg(long)]
        rp_id: String,
        /// The exact origin of the approval pages, e.g. `https://host.example:8443`.
        #[arg(long)]
        origin: String,
    },
    /// List the stored passkeys (credential id, key fingerprint, counter).
    List,
}

fn passphrase(cli: &Cli) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(path) = &cli.passphrase_file {
        let text = Zeroizing::new(
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
        return Ok(Zeroizing::new(line.to_vec()));
    }
    match std::env::var_os("VAULT_DEVICE_PASSPHRASE") {
        Some(p) => Ok(Zeroizing::new(p.into_encoded_bytes())),
        None => bail!("no passphrase: give --passphrase-file or set VAULT_DEVICE_PASSPHRASE"),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_resolve(s: &str) -> anyhow::Result<(String, SocketAddr)> {
    let (host, addr) = s
        .split_once('=')
        .with_context(|| format!("--resolve {s:?} is not host=ip:port"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("--resolve {s:?}: bad address"))?;
    Ok((host.to_owned(), addr))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let pass = passphrase(&cli)?;
    let path = cli.vault;
    match cli.command {
        Command::Init {
            kdf_memory_kib,
            kdf_iterations,
        } => init(&path, &pass, kdf_memory_kib, kdf_iterations),
        Command::Add {
            name,
            hosts,
            header,
            format,
        } => add(&path, &pass, name, hosts, header, format),
        Command::Remove { name } => {
            let mut vault = Vault::open(&path, &pass)?;
            vault.remove(&name)?;
            vault.save()?;
            println!("removed {name}");
            Ok(())
        }
        Command::List => list(&Vault::open(&path, &pass)?),
        Command::Grant {
            credential,
            host,
            vm,
            on,
            ttl,
            fallback,
        } => grant(&path, &pass, on.as_deref(), |on| GrantRequest {
            credential,
            host,
            vm,
            on,
            ttl_secs: ttl,
            fallback,
        }),
        Command::Revoke { credential } => {
            let mut vault = Vault::open(&path, &pass)?;
            grant::revoke(&mut vault.data.grants, &credential);
            vault.save()?;
            println!("revoked {credential}");
            Ok(())
        }
        Command::Identity => {
            let vault = Vault::open(&path, &pass)?;
            println!("{}", hex::encode(vault.identity_public()));
            Ok(())
        }
        Command::Pair { host, code, name } => pair(&path, &pass, &host, &code, &name),
        Command::Serve {
            ca_files,
            resolve,
            log_json,
            approval_wait_secs,
            approval_listen,
            open_registration,
        } => serve(
            path,
            pass,
            ca_files,
            &resolve,
            log_json,
            Duration::from_secs(approval_wait_secs),
            approval_listen.map(|a| (a, open_registration)),
        ),
        Command::Passkey { command } => passkey(&path, &pass, command),
        Command::Audit { command } => audit(&path, &pass, command),
    }
}

/// `init`: a new vault with a fresh identity key.
fn init(
    path: &Path,
    pass: &[u8],
    kdf_memory_kib: Option<u32>,
    kdf_iterations: Option<u32>,
) -> anyhow::Result<()> {
    let mut params = KdfParams::default();
    if let Some(m) = kdf_memory_kib {
        params.m_cost = m;
    }
    if let Some(t) = kdf_iterations {
        params.t_cost = t;
    }
    let vault = Vault::create(path, pass, params)?;
    println!("created {}", path.display());
    println!("identity {}", hex::encode(vault.identity_public()));
    Ok(())
}

/// `add`: a credential whose secret comes from standard input.
fn add(
    path: &Path,
    pass: &[u8],
    name: String,
    hosts: Vec<String>,
    header: String,
    format: String,
) -> anyhow::Result<()> {
    let mut vault = Vault::open(path, pass)?;
    let mut secret = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut secret)
        .context("reading the secret from standard input")?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.is_empty() {
        bail!("empty secret on standard input");
    }
    vault.add(Entry {
        name: name.clone(),
        secret: Secret::new(secret.to_vec()),
        hosts,
        header,
        format,
    })?;
    vault.save()?;
    println!("added {name}");
    Ok(())
}

/// `list`: the identity, the pairings, the credentials (never their secrets), the grants and
/// the moves.
fn list(vault: &Vault) -> anyhow::Result<()> {
    let data = &vault.data;
    println!("identity {}", hex::encode(vault.identity_public()));
    if data.pairings.is_empty() {
        println!("not paired");
    }
    for p in &data.pairings {
        println!("paired {}", p.describe());
    }
    for e in &vault.data.entries {
        println!(
            "credential {} hosts {} header {} format {:?}",
            e.name,
            e.hosts.join(","),
            e.header,
            e.format
        );
    }
    let now = now();
    for g in &data.grants {
        println!("grant {}", g.describe(now, &data.pairings));
    }
    for m in &data.moves {
        println!(
            "moved vm {} on {} to vm {} on {} key {}{}",
            m.from_vm,
            host_label(&data.pairings, &m.from_host),
            m.to_vm,
            host_label(&data.pairings, &m.to_host),
            hex::encode(m.boot_key),
            if m.arrived { " arrived" } else { "" }
        );
    }
    Ok(())
}

/// `grant`: a grant under the rules of [`grant::issue`], for a VM of the paired host `on`
/// names ([`choose_pairing`]).
fn grant(
    path: &Path,
    pass: &[u8],
    on: Option<&str>,
    request: impl FnOnce([u8; 32]) -> GrantRequest,
) -> anyhow::Result<()> {
    let mut vault = Vault::open(path, pass)?;
    let host = choose_pairing(&vault.data.pairings, on)?.clone();
    let request = request(host.host_public_key);
    let hosts = vault.entry(&request.credential).map(|e| e.hosts.clone());
    let ttl = request.ttl_secs;
    let issued = grant::issue(&mut vault.data.grants, hosts.as_deref(), request, now())?;
    vault.save()?;
    println!(
        "granted {} to {} for vm {} on {} for {ttl}s",
        issued.credential, issued.host, issued.vm, host.host_name
    );
    Ok(())
}

/// `pair`: pairs with the host and pins its key.
fn pair(path: &Path, pass: &[u8], host: &str, code: &str, name: &str) -> anyhow::Result<()> {
    let mut vault = Vault::open(path, pass)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pairing = rt.block_on(device::pair(&mut vault, host, code, name))?;
    println!(
        "paired with {} at {} key {}",
        pairing.host_name,
        pairing.address,
        hex::encode(pairing.host_public_key)
    );
    Ok(())
}

/// `serve`: logging, the approval page if asked for, then the device's link until it is no
/// longer paired.
fn serve(
    vault: PathBuf,
    passphrase: Zeroizing<Vec<u8>>,
    ca_files: Vec<PathBuf>,
    resolve: &[String],
    log_json: bool,
    approval_wait: Duration,
    approval_page: Option<(SocketAddr, bool)>,
) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    let resolve = resolve
        .iter()
        .map(|s| parse_resolve(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store_path = PasskeyFile::path_for(&vault);
    let device = Device::open(DeviceConfig {
        vault,
        passphrase,
        ca_files,
        resolve,
        approval_wait,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if let Some((listen, open_registration)) = approval_page {
            let (listener, rp) = approval_page::bind(listen).await?;
            let store = PasskeyFile::load(&store_path)?;
            if store.on_device && store.relying_party() != rp {
                bail!(
                    "the passkeys were registered on the approval page at {}, not {}: serve it \
                     on the same port (or register again)",
                    store.origin,
                    rp.origin
                );
            }
            let page = ApprovalPage::for_device(std::sync::Arc::clone(&device), rp.clone());
            if open_registration {
                println!("register a passkey: {}", page.open_registration());
            }
            if !store.on_device {
                tracing::warn!(
                    "no passkey is registered on the device: requests are still approved on \
                     the host's pages (`vault-device passkey register`, or `--open-registration`)"
                );
            }
            tracing::info!(origin = %rp.origin, "approval page listening");
            tokio::spawn(async move {
                if let Err(e) = page.serve(listener).await {
                    tracing::error!(error = %ErrorChain(&e), "approval page failed");
                }
            });
        }
        device.serve().await?;
        Ok(())
    })
}

/// `passkey import` and `passkey list`.
fn passkey(path: &Path, pass: &[u8], command: PasskeyCommand) -> anyhow::Result<()> {
    // The passphrase proves the vault is the user's.
    Vault::open(path, pass)?;
    let store_path = PasskeyFile::path_for(path);
    let mut store = PasskeyFile::load(&store_path)?;
    match command {
        PasskeyCommand::Register { listen } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(register(listen, store_path.clone()))?;
            let store = PasskeyFile::load(&store_path)?;
            if let Some(p) = store.passkeys.last() {
                println!(
                    "registered passkey {} key {} for {} in {}",
                    hex::encode(&p.credential_id),
                    fingerprint(p),
                    store.origin,
                    store_path.display()
                );
            }
        }
        PasskeyCommand::Import {
            file,
            rp_id,
            origin,
        } => {
            let json =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if store.on_device {
                println!(
                    "note: this replaces the passkeys registered on the device's own page with \
                     the host's; requests will be shown and signed on the host's pages (the \
                     weaker mode)"
                );
            }
            store.import(&json, &RelyingParty { rp_id, origin }, &file)?;
            store.save(&store_path)?;
            println!(
                "stored {} passkey(s) for {} in {}",
                store.passkeys.len(),
                store.origin,
                store_path.display()
            );
        }
        PasskeyCommand::List => {
            println!(
                "rp {} origin {} ({})",
                store.rp_id,
                store.origin,
                if store.on_device {
                    "registered on the device's approval page"
                } else {
                    "imported from the host"
                }
            );
            for p in &store.passkeys {
                println!(
                    "passkey {} key {} counter {}",
                    hex::encode(&p.credential_id),
                    fingerprint(p),
                    p.counter
                );
            }
        }
    }
    Ok(())
}

/// `passkey register`: the registration-only page until one registration succeeds.
async fn register(listen: SocketAddr, store_path: PathBuf) -> anyhow::Result<()> {
    let (listener, rp) = approval_page::bind(listen).await?;
    let page = ApprovalPage::registration_only(rp, store_path);
    let link = page.open_registration();
    let done = page.clone();
    let server = tokio::spawn(page.serve(listener));
    println!("open this link in a browser on this machine to register a passkey:\n{link}");
    tokio::select! {
        () = done.registered() => {}
        () = tokio::time::sleep(approval_page::REGISTRATION_TTL) => {
            bail!("no passkey was registered within {:?}", approval_page::REGISTRATION_TTL)
        }
        r = server => {
            r.context("the approval page stopped")?.context("the approval page failed")?;
            bail!("the approval page stopped");
        }
    }
    Ok(())
}

/// `audit key` and `audit check`.
fn audit(path: &Path, pass: &[u8], command: AuditCommand) -> anyhow::Result<()> {
    let vault = Vault::open(path, pass)?;
    match command {
        AuditCommand::Key => {
            println!(
                "{}",
                checkpoint::audit_public_key(&vault.identity_secret()).to_hex()
            );
            Ok(())
        }
        AuditCommand::Check { file, log } => {
            let log_path = checkpoint::log_path_for(path);
            let signed = checkpoint::read_log(&log_path)?;
            let mut labels: Vec<&str> = signed.iter().map(|s| s.log.as_str()).collect();
            labels.sort_unstable();
            labels.dedup();
            let label = match (log, labels.as_slice()) {
                (Some(l), _) => l,
                (None, []) => bail!(
                    "{} holds no checkpoints: this device never signed one",
                    log_path.display()
                ),
                (None, [one]) => (*one).to_owned(),
                (None, many) => bail!(
                    "the device signed checkpoints of several logs ({}); pick one with --log",
                    many.join(", ")
                ),
            };
            let mine: Vec<_> = signed.into_iter().filter(|s| s.log == label).collect();
            if mine.is_empty() {
                bail!("the device signed no checkpoint of log {label:?}");
            }
            let summary = nanoclaw_audit::check_device_log(&file, &mine)?;
            println!(
                "ok: {} records, head {}; {} checkpoints of {label:?} match, anchoring {} \
                 records; {} after the last one are unanchored",
                summary.chain.records,
                summary.chain.head,
                summary.checked,
                summary.anchored,
                summary.chain.records.saturating_sub(summary.anchored),
            );
            if summary.newest_unrecorded {
                println!(
                    "note: the newest checkpoint has no record in the file (the host may have \
                     stopped before writing it)"
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: &dyn std::error::Error = e.as_ref();
            eprintln!("vault-device: {}", ErrorChain(chain));
            ExitCode::FAILURE
        }
    }
}
