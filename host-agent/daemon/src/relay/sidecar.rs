//! The per-VM listeners: each sidecar connection gets its greeting, the agent's tokenizer
//! settings go to the device, and the session's bytes are copied both ways over the link.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shared_proto::credential::{self, HostToDevice, MAX_LINK_DATA, RelayGreeting};
use shared_proto::ports::CREDENTIAL_PROXY_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::{MAX_SESSIONS_PER_VM, Relay, RelayError, TokenCursor, VmIdentity};

/// How long a credential session may carry no bytes either way before it is cut (a proxied
/// call that waits on a slow upstream still sees bytes well within this).
pub const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// The path of a VM's credential proxy listener.
pub fn proxy_socket_path(vm_dir: &Path) -> PathBuf {
    shared_proto::ports::host_listener_path(vm_dir, CREDENTIAL_PROXY_PORT)
}

impl Relay {
    /// Binds `<vm_dir>/vsock.sock_<CREDENTIAL_PROXY_PORT>` for the VM and serves it until the
    /// returned handle is dropped.
    pub fn attach_vm(
        self: &Arc<Self>,
        vm_dir: &Path,
        identity: VmIdentity,
    ) -> Result<VmRelay, RelayError> {
        credential::session_prologue(&identity.vm_id, &identity.boot_id)?;
        let path = proxy_socket_path(vm_dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| RelayError::Listen {
            what: path.display().to_string(),
            source,
        })?;
        crate::daemon::jail::open_to_vmm(&path, identity.vmm_uid).map_err(|source| {
            RelayError::Listen {
                what: path.display().to_string(),
                source,
            }
        })?;
        let relay = Arc::clone(self);
        let boot_key = identity.sidecar_public_key;
        let identity = Arc::new(identity);
        let slots = Arc::new(Semaphore::new(MAX_SESSIONS_PER_VM));
        let cursor = Arc::new(tokio::sync::Mutex::new(TokenCursor::default()));
        let task = tokio::spawn(async move {
            let mut backoff = super::link::AcceptBackoff::new("credential");
            // The VM's sessions: owned here, so that dropping the `VmRelay` (the VM stopped)
            // ends them too, however long the sidecar would have kept them.
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    Some(_) = sessions.join_next() => continue,
                };
                let stream = match accepted {
                    Ok((stream, _)) => {
                        backoff.ok();
                        stream
                    }
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let relay = Arc::clone(&relay);
                let identity = Arc::clone(&identity);
                let cursor = Arc::clone(&cursor);
                sessions.spawn(async move {
                    if let Err(e) = relay.serve_sidecar(stream, &identity, &cursor).await {
                        tracing::debug!(vm = %identity.vm_id, error = %crate::error_chain(&e), "sidecar session");
                    }
                    drop(slot);
                });
            }
        });
        Ok(VmRelay {
            task,
            path,
            boot_key,
        })
    }

    async fn serve_sidecar(
        &self,
        mut stream: UnixStream,
        identity: &VmIdentity,
        cursor: &tokio::sync::Mutex<TokenCursor>,
    ) -> Result<(), RelayError> {
        let registered = {
            let mut state = self.lock();
            let session = state.next_session;
            state.next_session += 1;
            let device_key = state.device.as_ref().map(|(_, k)| *k);
            match (state.link.as_mut(), device_key) {
                (Some(link), Some(key)) => {
                    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
                    link.sessions.insert(session, tx);
                    Some((session, key, link.tx.clone(), rx, link.generation))
                }
                _ => None,
            }
        };
        let Some((session, device_key, to_device, mut from_device, generation)) = registered else {
            let frame = shared_proto::encode_frame(&RelayGreeting::Unavailable {
                reason: "no device is linked to this host".into(),
            })
            .map_err(|e| RelayError::Io(std::io::Error::other(e)))?;
            stream.write_all(&frame).await.map_err(RelayError::Io)?;
            return Ok(());
        };
        let frame = shared_proto::encode_frame(&RelayGreeting::Ready {
            vm_id: identity.vm_id.clone(),
            device_public_key: device_key,
        })
        .map_err(|e| RelayError::Io(std::io::Error::other(e)))?;
        stream.write_all(&frame).await.map_err(RelayError::Io)?;
        // The device learns the agent's key and the surrogates issued so far before the
        // session opens, and those issued since before each later byte run from the sidecar
        // (so before any request that could use them, on a session that carries many).
        self.sync_tokens(identity, cursor, generation, &to_device, true)
            .await?;
        to_device
            .send(HostToDevice::Open {
                session,
                vm_id: identity.vm_id.clone(),
                boot_id: identity.boot_id,
                sidecar_public_key: identity.sidecar_public_key,
            })
            .await
            .map_err(|_| RelayError::Closed)?;
        let (mut read, mut write) = stream.into_split();
        let start = tokio::time::Instant::now();
        let last_activity = std::sync::atomic::AtomicU64::new(0);
        let touch = || {
            last_activity.store(
                start.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        };
        let up = async {
            let mut buf = vec![0u8; MAX_LINK_DATA];
            loop {
                let n = read.read(&mut buf).await.map_err(RelayError::Io)?;
                if n == 0 {
                    break;
                }
                touch();
                proxied("to_device", n);
                self.sync_tokens(identity, cursor, generation, &to_device, false)
                    .await?;
                to_device
                    .send(HostToDevice::Data {
                        session,
                        bytes: buf[..n].to_vec(),
                    })
                    .await
                    .map_err(|_| RelayError::Closed)?;
            }
            let _ = to_device.send(HostToDevice::Close { session }).await;
            Ok::<(), RelayError>(())
        };
        let down = async {
            while let Some(bytes) = from_device.recv().await {
                touch();
                proxied("from_device", bytes.len());
                write.write_all(&bytes).await.map_err(RelayError::Io)?;
            }
            let _ = write.shutdown().await;
            Ok::<(), RelayError>(())
        };
        // The session ends when the device closes it; the sidecar's half-close only ends `up`.
        // A session with no traffic either way for SESSION_IDLE is cut.
        let idle = async {
            loop {
                tokio::time::sleep(SESSION_IDLE / 8).await;
                let quiet = start.elapsed().as_millis() as u64
                    - last_activity.load(std::sync::atomic::Ordering::Relaxed);
                if quiet >= SESSION_IDLE.as_millis() as u64 {
                    break;
                }
            }
        };
        let result = tokio::select! {
            (up, down) = async { tokio::join!(up, down) } => up.and(down),
            () = idle => {
                let _ = to_device.send(HostToDevice::Close { session }).await;
                Err(RelayError::Timeout)
            }
        };
        self.forget(session);
        result
    }

    /// Sends the device the VM's tokenizer settings and the surrogates issued since the
    /// cursor (all of them on a new link generation). With `always` the settings go even when
    /// nothing new was issued (a session's start); otherwise only when something was.
    async fn sync_tokens(
        &self,
        identity: &VmIdentity,
        cursor: &tokio::sync::Mutex<TokenCursor>,
        generation: u64,
        to_device: &mpsc::Sender<HostToDevice>,
        always: bool,
    ) -> Result<(), RelayError> {
        let Some(tokens) = &identity.tokens else {
            return Ok(());
        };
        // The cursor's lock keeps two sessions' messages in order.
        let mut cursor = cursor.lock().await;
        if cursor.generation != Some(generation) {
            *cursor = TokenCursor {
                generation: Some(generation),
                seq: 0,
            };
        }
        let (issued, next) = tokens.issued_since(cursor.seq);
        if issued.is_empty() && !always {
            return Ok(());
        }
        let mut chunks: Vec<Vec<credential::IssuedToken>> = issued
            .chunks(credential::MAX_ISSUED_PER_MESSAGE)
            .map(<[_]>::to_vec)
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        for issued in chunks {
            to_device
                .send(HostToDevice::Tokenize {
                    vm_id: identity.vm_id.clone(),
                    spec: tokens.spec().clone(),
                    issued,
                })
                .await
                .map_err(|_| RelayError::Closed)?;
        }
        cursor.seq = next;
        Ok(())
    }

    pub(super) fn forget(&self, session: u64) {
        if let Some(link) = self.lock().link.as_mut() {
            link.sessions.remove(&session);
        }
    }
}

/// A VM's credential proxy listener; dropping it stops the listener and removes the socket.
#[derive(Debug)]
pub struct VmRelay {
    task: JoinHandle<()>,
    path: PathBuf,
    boot_key: [u8; 32],
}

impl VmRelay {
    /// The boot key of the sidecar whose sessions this listener relays.
    pub fn boot_key(&self) -> [u8; 32] {
        self.boot_key
    }
}

impl Drop for VmRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counts `n` proxied bytes for `/metrics`.
fn proxied(direction: &'static str, n: usize) {
    crate::metrics::global()
        .proxy_bytes
        .get_or_create(&crate::metrics::DirectionLabel { direction })
        .inc_by(n as u64);
}
