//! `vault-device`: the command line of the user's device. The logic lives in the library; this
//! file parses arguments, reads the passphrase and secrets, and prints results.
//!
//! The passphrase comes from `--passphrase-file` or the `VAULT_DEVICE_PASSPHRASE` variable; a
//! secret for `add` comes from standard input (never from the command line, which other users
//! can read in `/proc`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use shared_proto::approval::RelyingParty;
use vault_device::ErrorChain;
use vault_device::approval::{PasskeyFile, fingerprint};
use vault_device::device::{self, Device, DeviceConfig};
use vault_device::grant::Grant;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
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
    /// List credentials (never their secrets), grants and the pairing.
    List,
    /// Allow releasing a credential to a host for a VM until an expiry.
    Grant {
        /// The credential name.
        credential: String,
        /// The authority the call goes to (must be one of the credential's hosts).
        #[arg(long)]
        host: String,
        /// The VM id, or `*` for any VM.
        #[arg(long, default_value = "*")]
        vm: String,
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
    /// Pair with a host, using the code it shows.
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
    /// Keep the link to the paired host up and answer sessions.
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
    },
    /// The passkeys whose approvals the device accepts (`<vault>.passkeys.json`).
    Passkey {
        #[command(subcommand)]
        command: PasskeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PasskeyCommand {
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
    match cli.command {
        Command::Init {
            kdf_memory_kib,
            kdf_iterations,
        } => {
            let mut params = KdfParams::default();
            if let Some(m) = kdf_memory_kib {
                params.m_cost = m;
            }
            if let Some(t) = kdf_iterations {
                params.t_cost = t;
            }
            let vault = Vault::create(&cli.vault, &pass, params)?;
            println!("created {}", cli.vault.display());
            println!("identity {}", hex::encode(vault.identity_public()));
        }
        Command::Add {
            name,
            hosts,
            header,
            format,
        } => {
            let mut vault = Vault::open(&cli.vault, &pass)?;
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
        }
        Command::Remove { name } => {
            let mut vault = Vault::open(&cli.vault, &pass)?;
            vault.remove(&name)?;
            vault.save()?;
            println!("removed {name}");
        }
        Command::List => {
            let vault = Vault::open(&cli.vault, &pass)?;
            println!("identity {}", hex::encode(vault.identity_public()));
            match &vault.data.pairing {
                Some(p) => println!(
                    "paired {} at {} key {}",
                    p.host_name,
                    p.address,
                    hex::encode(p.host_public_key)
                ),
                None => println!("not paired"),
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
            for g in &vault.data.grants {
                let left = g.expires_at.saturating_sub(now);
                println!(
                    "grant {} host {} vm {} {}{}",
                    g.credential,
                    g.host,
                    g.vm,
                    if left == 0 {
                        "expired".to_owned()
                    } else {
                        format!("{left}s left")
                    },
                    if g.fallback { " fallback" } else { "" }
                );
            }
        }
        Command::Grant {
            credential,
            host,
            vm,
            ttl,
            fallback,
        } => {
            let mut vault = Vault::open(&cli.vault, &pass)?;
            let Some(entry) = vault.entry(&credential) else {
                bail!("no credential named {credential:?}");
            };
            if !entry.allows(&host) {
                bail!(
                    "{credential} may not be sent to {host} (its hosts: {})",
                    entry.hosts.join(",")
                );
            }
            let now = now();
            vault.data.grants.retain(|g| g.expires_at > now);
            vault.data.grants.push(Grant {
                credential: credential.clone(),
                host: host.clone(),
                vm: vm.clone(),
                expires_at: now.saturating_add(ttl),
                fallback,
            });
            vault.save()?;
            println!("granted {credential} to {host} for vm {vm} for {ttl}s");
        }
        Command::Revoke { credential } => {
            let mut vault = Vault::open(&cli.vault, &pass)?;
            vault.data.grants.retain(|g| g.credential != credential);
            vault.save()?;
            println!("revoked {credential}");
        }
        Command::Identity => {
            let vault = Vault::open(&cli.vault, &pass)?;
            println!("{}", hex::encode(vault.identity_public()));
        }
        Command::Pair { host, code, name } => {
            let mut vault = Vault::open(&cli.vault, &pass)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let pairing = rt.block_on(device::pair(&mut vault, &host, &code, &name))?;
            println!(
                "paired with {} at {} key {}",
                pairing.host_name,
                pairing.address,
                hex::encode(pairing.host_public_key)
            );
        }
        Command::Serve {
            ca_files,
            resolve,
            log_json,
            approval_wait_secs,
        } => {
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
            let device = Device::open(DeviceConfig {
                vault: cli.vault.clone(),
                passphrase: pass,
                ca_files,
                resolve,
                approval_wait: Duration::from_secs(approval_wait_secs),
            })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(device.serve())?;
        }
        Command::Passkey { command } => {
            // The passphrase proves the vault is the user's.
            Vault::open(&cli.vault, &pass)?;
            let path = PasskeyFile::path_for(&cli.vault);
            let mut store = PasskeyFile::load(&path)?;
            match command {
                PasskeyCommand::Import {
                    file,
                    rp_id,
                    origin,
                } => {
                    let json = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    store.import(&json, &RelyingParty { rp_id, origin }, &file)?;
                    store.save(&path)?;
                    println!(
                        "stored {} passkey(s) for {} in {}",
                        store.passkeys.len(),
                        store.origin,
                        path.display()
                    );
                }
                PasskeyCommand::List => {
                    println!("rp {} origin {}", store.rp_id, store.origin);
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
        }
    }
    Ok(())
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
