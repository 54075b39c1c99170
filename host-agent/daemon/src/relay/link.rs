//! The device link: the TCP listener, the Noise KK link and the record reader and writer it
//! and pairing use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use shared_proto::credential::{
    self, DeviceToHost, HostToDevice, LINK_MODE_LINK, LINK_MODE_PAIR, RECORD_PREFIX, RecordDecoder,
    noise,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Link, Relay, RelayError};

/// How long a sidecar may leave relayed bytes unread before its session is cut.
const SLOW_PEER: std::time::Duration = std::time::Duration::from_secs(5);
/// How much is read from a device connection at once: a record of the largest size.
const READ_CHUNK: usize = 64 * 1024;
/// How long a device has to finish a handshake (and to send its first byte).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Device connections served at once. One device links and, at times, pairs: the rest is
/// somebody else, and is closed at once.
pub const MAX_DEVICE_CONNECTIONS: usize = 32;
/// Device connections served at once from one address.
pub const MAX_DEVICE_CONNECTIONS_PER_PEER: usize = 4;

/// Waits after a failed `accept` (out of file descriptors, say), longer each time it fails in
/// a row, so that an accept loop never spins; logs the first failure of a run.
pub(crate) struct AcceptBackoff {
    delay: std::time::Duration,
    what: &'static str,
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(50);
    const MOST: std::time::Duration = std::time::Duration::from_secs(2);

    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            delay: Self::FIRST,
            what,
        }
    }

    /// After a failure: logs it if it starts a run, then sleeps.
    pub(crate) async fn failed(&mut self, error: &std::io::Error) {
        if self.delay == Self::FIRST {
            tracing::warn!(listener = self.what, %error, "accept failed; backing off");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MOST);
    }

    /// After a success.
    pub(crate) fn ok(&mut self) {
        self.delay = Self::FIRST;
    }
}

impl Relay {
    /// Whether a device link is up.
    pub fn is_linked(&self) -> bool {
        self.lock().link.is_some()
    }

    /// Waits until a device link is up.
    pub async fn wait_linked(&self) {
        let mut rx = self.linked.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Binds the device listener and serves it in a task. Returns the bound address.
    pub async fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, JoinHandle<()>), RelayError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::Listen {
                what: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(RelayError::Io)?;
        let relay = Arc::clone(self);
        let task = tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_DEVICE_CONNECTIONS));
            let per_peer: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
            let mut backoff = AcceptBackoff::new("device");
            let mut refused = crate::daemon::ratelimit::LogBudget::default();
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => {
                        backoff.ok();
                        accepted
                    }
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                let Some(slot) = PeerSlot::take(&slots, &per_peer, peer.ip()) else {
                    if let Some(suppressed) = refused.admit(std::time::Instant::now()) {
                        tracing::warn!(%peer, suppressed, "device listener: too many connections; closing");
                    }
                    drop(stream);
                    continue;
                };
                let relay = Arc::clone(&relay);
                tokio::spawn(async move {
                    if let Err(e) = relay.serve_device(stream).await {
                        tracing::warn!(%peer, error = %crate::error_chain(&e), "device connection");
                    }
                    drop(slot);
                });
            }
        });
        tracing::info!(%local, "device listener");
        Ok((local, task))
    }

    async fn serve_device(self: Arc<Self>, mut stream: TcpStream) -> Result<(), RelayError> {
        let _ = stream.set_nodelay(true);
        let mut mode = [0u8; 1];
        timed(stream.read_exact(&mut mode))
            .await?
            .map_err(|_| RelayError::Closed)?;
        match mode[0] {
            LINK_MODE_PAIR => self.pair(stream).await,
            LINK_MODE_LINK => self.link(stream).await,
            other => Err(RelayError::UnknownMode(other)),
        }
    }

    async fn link(self: Arc<Self>, stream: TcpStream) -> Result<(), RelayError> {
        let Some(device_key) = self.lock().device.as_ref().map(|(_, k)| *k) else {
            return Err(RelayError::Refused("no device is paired"));
        };
        let mut hs = noise::link_responder(&self.identity, &device_key)?;
        let (read, mut write) = stream.into_split();
        let mut read = RecordReader::new(read);
        let first = timed(read.next()).await??;
        noise::read_handshake(&mut hs, &first)?;
        let message = noise::write_handshake(&mut hs, &[])?;
        write_record(&mut write, &message).await?;
        let mut transport = hs.into_transport_mode()?;
        // Only a device that holds the handshake's keys can say Ready: a replayed first message
        // gets no further, and the live link stays (review finding M6).
        let ready = timed(read.next()).await??;
        let ready = noise::open(&mut transport, &ready)
            .map_err(RelayError::from)
            .and_then(|p| Ok(credential::decode_message::<DeviceToHost>(&p)?))?;
        if ready != DeviceToHost::Ready {
            return Err(RelayError::Refused(
                "the device's first message was not Ready",
            ));
        }
        let transport = Arc::new(Mutex::new(transport));

        let (tx, mut outgoing) = mpsc::channel::<HostToDevice>(256);
        let generation = {
            let mut state = self.lock();
            let generation = state.next_generation;
            state.next_generation += 1;
            // Replacing an older link drops its sessions' senders, which ends them.
            state.link = Some(Link {
                generation,
                tx,
                sessions: HashMap::new(),
            });
            generation
        };
        self.linked.send_replace(true);
        tracing::info!(generation, "device link up");
        let writer_transport = Arc::clone(&transport);
        let writer = tokio::spawn(async move {
            let (mut plain, mut sealed) = (Vec::new(), Vec::new());
            while let Some(msg) = outgoing.recv().await {
                plain.clear();
                match &msg {
                    // The bulk of the link: encoded straight from the relayed bytes.
                    HostToDevice::Data { session, bytes } => {
                        credential::data::encode_link_data(*session, bytes, &mut plain);
                    }
                    other => plain = credential::encode_message(other)?,
                }
                sealed.clear();
                noise::seal_record(&mut lock_transport(&writer_transport), &plain, &mut sealed)?;
                write.write_all(&sealed).await.map_err(RelayError::Io)?;
            }
            Ok::<(), RelayError>(())
        });
        let mut opened = Vec::new();
        let result = loop {
            let record = match read.next_borrowed().await {
                Ok(r) => r,
                Err(RelayError::Closed) => break Ok(()),
                Err(e) => break Err(e),
            };
            let msg = {
                let mut t = lock_transport(&transport);
                noise::open_in(&mut t, record, &mut opened)
                    .map_err(RelayError::from)
                    .and_then(|p| match credential::data::link_data(p) {
                        // The bulk of the link, read without a general CBOR pass.
                        Some((session, bytes)) => Ok(DeviceToHost::Data {
                            session,
                            bytes: bytes.to_vec(),
                        }),
                        None => Ok(credential::decode_message::<DeviceToHost>(p)?),
                    })
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            let (session, bytes) = match msg {
                DeviceToHost::Data { session, bytes } => (session, Some(bytes)),
                DeviceToHost::Close { session } => (session, None),
                DeviceToHost::Ready => break Err(RelayError::Refused("Ready twice")),
                DeviceToHost::ApprovalNeeded {
                    request,
                    vm_id,
                    credential,
                    target_host,
                    on_device,
                } => {
                    let tx = self
                        .lock()
                        .link
                        .as_ref()
                        .filter(|l| l.generation == generation)
                        .map(|l| l.tx.clone());
                    let Some(tx) = tx else {
                        break Ok(());
                    };
                    self.device_asks(tx, request, vm_id, credential, target_host, on_device);
                    continue;
                }
                report @ DeviceToHost::Tokenized { .. } => {
                    self.record_tokenized(report);
                    continue;
                }
                answer @ (DeviceToHost::CheckpointSigned { .. }
                | DeviceToHost::CheckpointRefused { .. }) => {
                    self.checkpoint_answered(answer);
                    continue;
                }
                answer @ DeviceToHost::MoveNoted { .. } => {
                    self.move_noted(answer);
                    continue;
                }
            };
            let tx = {
                let mut state = self.lock();
                let Some(link) = state.link.as_mut().filter(|l| l.generation == generation) else {
                    break Ok(());
                };
                match bytes {
                    Some(_) => link.sessions.get(&session).cloned(),
                    None => {
                        link.sessions.remove(&session);
                        None
                    }
                }
            };
            if let (Some(tx), Some(bytes)) = (tx, bytes) {
                // Backpressure: wait for a slow sidecar, but not forever, since a sidecar that
                // does not read would stall every session on the link.
                let sent = tokio::time::timeout(SLOW_PEER, tx.send(bytes)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    self.forget(session);
                }
            }
        };
        writer.abort();
        {
            let mut state = self.lock();
            if state
                .link
                .as_ref()
                .is_some_and(|l| l.generation == generation)
            {
                state.link = None;
                self.linked.send_replace(false);
                drop(state);
                // A checkpoint asked on this link gets no answer: its waiter fails now.
                self.drop_checkpoint_waiter();
                self.drop_move_waiters();
            }
        }
        tracing::info!(generation, "device link down");
        result
    }
}

/// A device connection's place: one of [`MAX_DEVICE_CONNECTIONS`], and one of its address's
/// [`MAX_DEVICE_CONNECTIONS_PER_PEER`]; both are given back on drop.
struct PeerSlot {
    _slot: tokio::sync::OwnedSemaphorePermit,
    peers: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        slots: &Arc<tokio::sync::Semaphore>,
        peers: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let slot = Arc::clone(slots).try_acquire_owned().ok()?;
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_DEVICE_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            _slot: slot,
            peers: Arc::clone(peers),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn lock_transport(t: &Mutex<snow::TransportState>) -> MutexGuard<'_, snow::TransportState> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) async fn timed<F: std::future::Future>(f: F) -> Result<F::Output, RelayError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| RelayError::Timeout)
}

/// The records arriving on one device connection: the shared decoder over an async reader.
pub(super) struct RecordReader<R> {
    inner: R,
    decoder: RecordDecoder,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub(super) fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: RecordDecoder::new(),
            scratch: vec![0u8; READ_CHUNK],
        }
    }

    /// The next record; [`RelayError::Closed`] when the stream ends or fails.
    pub(super) async fn next(&mut self) -> Result<Vec<u8>, RelayError> {
        Ok(self.next_borrowed().await?.to_vec())
    }

    /// The next record, borrowed from the reader's buffer until the next call.
    pub(super) async fn next_borrowed(&mut self) -> Result<&[u8], RelayError> {
        while !self.decoder.has_record()? {
            match self.inner.read(&mut self.scratch).await {
                Ok(n) if n > 0 => self.decoder.push(&self.scratch[..n]),
                _ => return Err(RelayError::Closed),
            }
        }
        self.decoder.next_record()?.ok_or(RelayError::Closed)
    }
}

pub(super) async fn write_record<W: AsyncWrite + Unpin>(
    w: &mut W,
    body: &[u8],
) -> Result<(), RelayError> {
    let mut out = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut out)?;
    w.write_all(&out).await.map_err(RelayError::Io)
}
