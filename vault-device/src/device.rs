//! The running device: the open vault, the HTTPS client, pairing and the outbound link to the
//! paired host.
//!
//! # The link
//!
//! The device dials the host (so a phone behind NAT works), writes
//! [`LINK_MODE_LINK`] and runs Noise KK as initiator
//! with its identity key and the host key pinned at pairing: a host without that key, or a
//! device the host has not paired, fails the handshake. Then one reader loop decodes
//! `HostToDevice` messages and hands each session's bytes to its task ([`crate::session`]); one
//! writer task encrypts the sessions' `DeviceToHost` messages in order. [`Device::serve`]
//! redials with a capped backoff whenever the link drops.
//!
//! # Pairing
//!
//! [`pair`] dials the host, writes `LINK_MODE_PAIR` and runs NNpsk0 with the PSK derived from
//! the code the host showed; each side sends a `PairingOffer` with its static key inside the
//! handshake, and the device pins the host's key in the vault.
//!
//! # Reloading
//!
//! `vault-device grant` and `add` change the vault file while `serve` runs; [`Device::snapshot`]
//! re-opens it when its modification time changed, so a new grant takes effect at the next
//! request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use shared_proto::credential::{
    self, DeviceToHost, HostToDevice, LINK_MODE_LINK, LINK_MODE_PAIR, MAX_LINK_DATA, PairingOffer,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::noise::{self, NoiseError};
use crate::session::{self, SessionPeer};
use crate::vault::{Pairing, Vault, VaultData, VaultError};

/// Sessions one link may hold at once; an `Open` beyond it is closed at once.
pub const MAX_SESSIONS: usize = 256;
/// How long a session may leave relayed bytes unread before it is dropped.
const SLOW_SESSION: Duration = Duration::from_secs(5);
/// The longest pause between redials.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vault failed.
    #[error("vault")]
    Vault(#[from] VaultError),
    /// The device is not paired with a host.
    #[error("not paired with a host; run `vault-device pair` first")]
    NotPaired,
    /// Dialling the host failed.
    #[error("cannot connect to {address}")]
    Connect {
        /// The host's address.
        address: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Noise layer failed (handshake, forged or malformed message).
    #[error("link")]
    Link(#[from] NoiseError),
    /// A CA file could not be read or parsed.
    #[error("cannot load CA file {}", .path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The HTTPS client could not be built.
    #[error("cannot build the HTTPS client")]
    Client(#[source] reqwest::Error),
}

/// How the device runs.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The vault file.
    pub vault: PathBuf,
    /// Its passphrase.
    pub passphrase: Zeroizing<Vec<u8>>,
    /// PEM CA files the device trusts for upstream HTTPS (only these: no built-in roots).
    pub ca_files: Vec<PathBuf>,
    /// Fixed name resolutions (`host` to address), for tests and split-horizon setups.
    pub resolve: Vec<(String, SocketAddr)>,
}

struct Cached {
    modified: Option<SystemTime>,
    vault: Vault,
}

/// The running device.
pub struct Device {
    config: DeviceConfig,
    cached: Mutex<Cached>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("vault", &self.config.vault)
            .finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Device {
    /// Opens the vault and builds the HTTPS client.
    pub fn open(config: DeviceConfig) -> Result<Arc<Self>, DeviceError> {
        let vault = Vault::open(&config.vault, &config.passphrase)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10));
        for path in &config.ca_files {
            let ca_err = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::CaFile {
                path: path.clone(),
                source,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(Box::new(e)))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(Box::new(e)))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        for (host, addr) in &config.resolve {
            builder = builder.resolve(host, *addr);
        }
        let http = builder.build().map_err(DeviceError::Client)?;
        Ok(Arc::new(Self {
            cached: Mutex::new(Cached {
                modified: modified(&config.vault),
                vault,
            }),
            config,
            http,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The vault's contents, re-read if the file changed.
    pub fn snapshot(&self) -> Result<VaultData, VaultError> {
        let mut cached = self.lock();
        let now = modified(&self.config.vault);
        if now != cached.modified {
            cached.vault = Vault::open(&self.config.vault, &self.config.passphrase)?;
            cached.modified = now;
        }
        Ok(cached.vault.data.clone())
    }

    /// The identity secret.
    pub fn identity_secret(&self) -> Zeroizing<[u8; 32]> {
        self.lock().vault.identity_secret()
    }

    /// The HTTPS client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Keeps the link up: dials, serves until it drops, waits, dials again. Returns only when
    /// the device is not paired.
    pub async fn serve(self: Arc<Self>) -> Result<(), DeviceError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match Arc::clone(&self).run_link().await {
                Err(DeviceError::NotPaired) => return Err(DeviceError::NotPaired),
                Err(e) => tracing::warn!(error = %crate::ErrorChain(&e), "link down"),
                Ok(()) => {
                    tracing::info!("link closed by the host");
                    backoff = Duration::from_millis(200);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Dials the paired host and serves the link until it ends.
    pub async fn run_link(self: Arc<Self>) -> Result<(), DeviceError> {
        let pairing = self.lock().vault.data.pairing.clone();
        let pairing = pairing.ok_or(DeviceError::NotPaired)?;
        let mut stream = TcpStream::connect(&pairing.address)
            .await
            .map_err(|source| DeviceError::Connect {
                address: pairing.address.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&[LINK_MODE_LINK])
            .await
            .map_err(|e| DeviceError::Link(NoiseError::Io(e)))?;
        let identity = self.identity_secret();
        let mut hs = noise::link_initiator(&identity, &pairing.host_public_key)?;
        drop(identity);
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        noise::write_handshake(&mut write, &mut hs, &[]).await?;
        noise::read_handshake(&mut read, &mut hs).await?;
        let transport = Arc::new(Mutex::new(
            hs.into_transport_mode().map_err(NoiseError::from)?,
        ));
        tracing::info!(host = %pairing.address, "link up");

        let (to_host, mut outgoing) = mpsc::channel::<DeviceToHost>(256);
        let writer_transport = Arc::clone(&transport);
        let writer = tokio::spawn(async move {
            while let Some(msg) = outgoing.recv().await {
                let sealed = {
                    let plain = credential::encode_message(&msg)?;
                    let mut t = writer_transport.lock().unwrap_or_else(|p| p.into_inner());
                    noise::seal(&mut t, &plain)?
                };
                noise::write_record(&mut write, &sealed).await?;
            }
            Ok::<(), NoiseError>(())
        });

        let mut sessions: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let result = loop {
            let record = match noise::read_record(&mut read).await {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let plain = {
                let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
                noise::open(&mut t, &record)
            };
            let msg = match plain.and_then(|p| Ok(credential::decode_message::<HostToDevice>(&p)?))
            {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            sessions.retain(|_, tx| !tx.is_closed());
            match msg {
                HostToDevice::Open {
                    session,
                    vm_id,
                    boot_id,
                    sidecar_public_key,
                } => {
                    if sessions.len() >= MAX_SESSIONS || sessions.contains_key(&session) {
                        let _ = to_host.send(DeviceToHost::Close { session }).await;
                        continue;
                    }
                    let (tx, rx) = mpsc::channel(64);
                    sessions.insert(session, tx);
                    let peer = SessionPeer {
                        vm_id,
                        boot_id,
                        sidecar_public_key,
                    };
                    tokio::spawn(run_session(
                        Arc::clone(&self),
                        session,
                        peer,
                        rx,
                        to_host.clone(),
                    ));
                }
                HostToDevice::Data { session, bytes } => {
                    if let Some(tx) = sessions.get(&session) {
                        // Backpressure, bounded: a session stuck for SLOW_SESSION is dropped
                        // rather than stalling the whole link.
                        let sent = tokio::time::timeout(SLOW_SESSION, tx.send(bytes)).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            sessions.remove(&session);
                        }
                    }
                }
                HostToDevice::Close { session } => {
                    sessions.remove(&session);
                }
            }
        };
        drop(to_host);
        drop(sessions);
        writer.abort();
        result.map_err(DeviceError::Link)
    }
}

/// Runs one session, cutting its output into link `Data` messages, then closes it.
async fn run_session(
    device: Arc<Device>,
    session: u64,
    peer: SessionPeer,
    rx: mpsc::Receiver<Vec<u8>>,
    to_host: mpsc::Sender<DeviceToHost>,
) {
    let (out, mut records) = mpsc::channel::<Vec<u8>>(16);
    let forward_to = to_host.clone();
    let forwarder = tokio::spawn(async move {
        while let Some(record) = records.recv().await {
            for piece in record.chunks(MAX_LINK_DATA) {
                let msg = DeviceToHost::Data {
                    session,
                    bytes: piece.to_vec(),
                };
                if forward_to.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
    let vm = peer.vm_id.clone();
    if let Err(e) = session::run(device, peer, rx, out).await {
        tracing::info!(%vm, session, error = %crate::ErrorChain(&e), "session ended");
    }
    let _ = forwarder.await;
    let _ = to_host.send(DeviceToHost::Close { session }).await;
}

/// Pairs with the host at `address` using the `code` it shows, and pins its key in `vault`.
pub async fn pair(
    vault: &mut Vault,
    address: &str,
    code: &str,
    name: &str,
) -> Result<Pairing, DeviceError> {
    let psk = Zeroizing::new(credential::pairing_psk(code).map_err(NoiseError::from)?);
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|source| DeviceError::Connect {
            address: address.to_owned(),
            source,
        })?;
    stream
        .write_all(&[LINK_MODE_PAIR])
        .await
        .map_err(|e| DeviceError::Link(NoiseError::Io(e)))?;
    let mut hs = noise::pair_initiator(&psk)?;
    let offer = PairingOffer {
        static_public_key: vault.identity_public(),
        name: name.to_owned(),
    };
    let payload = credential::encode_message(&offer).map_err(NoiseError::from)?;
    noise::write_handshake(&mut stream, &mut hs, &payload).await?;
    let answer = noise::read_handshake(&mut stream, &mut hs).await?;
    let host: PairingOffer = credential::decode_message(&answer).map_err(NoiseError::from)?;
    let pairing = Pairing {
        address: address.to_owned(),
        host_public_key: host.static_public_key,
        host_name: host.name,
    };
    vault.data.pairing = Some(pairing.clone());
    vault.save()?;
    Ok(pairing)
}
