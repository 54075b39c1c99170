//! Opening and saving the relay's state files: the host key, the pinned device and the pairing
//! code.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rand_core::{OsRng, RngCore};
use shared_proto::credential;
use tokio::sync::{Semaphore, watch};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{MAX_PENDING_APPROVALS, PairedDevice, Relay, RelayError, State};
use crate::approval::DenyAll;

/// Writes a state file durably, 0600 ([`shared_proto::fs`]).
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RelayError> {
    shared_proto::fs::replace_file(path, bytes, shared_proto::fs::PRIVATE_MODE).map_err(|e| {
        RelayError::File {
            op: e.step,
            path: e.path,
            source: e.source,
        }
    })
}

impl Relay {
    /// Opens (or creates) the relay's state under `<state_dir>/relay/`. `name` is shown to the
    /// device at pairing.
    pub fn open(state_dir: &Path, name: &str) -> Result<Arc<Self>, RelayError> {
        let dir = state_dir.join("relay");
        std::fs::create_dir_all(&dir).map_err(|source| RelayError::File {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let key_path = dir.join("host.key");
        let identity = match std::fs::read(&key_path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let key: [u8; 32] = bytes[..]
                    .try_into()
                    .map_err(|_| RelayError::BadStateFile(key_path.clone()))?;
                Zeroizing::new(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                OsRng.fill_bytes(&mut key[..]);
                write_private(&key_path, &key[..])?;
                key
            }
            Err(source) => {
                return Err(RelayError::File {
                    op: "read",
                    path: key_path,
                    source,
                });
            }
        };
        let public = PublicKey::from(&StaticSecret::from(*identity)).to_bytes();
        let device_path = dir.join("device.json");
        let device = match std::fs::read(&device_path) {
            Ok(bytes) => {
                let d: PairedDevice = serde_json::from_slice(&bytes)
                    .map_err(|_| RelayError::BadStateFile(device_path.clone()))?;
                let key = d
                    .key()
                    .ok_or_else(|| RelayError::BadStateFile(device_path.clone()))?;
                Some((d, key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RelayError::File {
                    op: "read",
                    path: device_path,
                    source,
                });
            }
        };
        let relay = Arc::new(Self {
            dir,
            identity,
            public,
            name: name.to_owned(),
            state: Mutex::new(State {
                device,
                code: None,
                gate: super::pairing::PairingGate::new(std::time::Instant::now()),
                link: None,
                next_session: 1,
                next_generation: 1,
            }),
            linked: watch::channel(false).0,
            approver: Mutex::new(Arc::new(DenyAll)),
            approval_slots: Arc::new(Semaphore::new(MAX_PENDING_APPROVALS)),
            audit: Mutex::new(None),
            notifiers: Mutex::new(Vec::new()),
            checkpoints: Mutex::default(),
            checkpoint_turn: tokio::sync::Mutex::new(()),
            moves: Mutex::new(std::collections::HashMap::new()),
        });
        if relay.lock().device.is_none() {
            relay.new_code()?;
        }
        Ok(relay)
    }

    pub(super) fn new_code(&self) -> Result<(), RelayError> {
        let mut random = [0u8; 8];
        OsRng.fill_bytes(&mut random);
        let code = credential::pairing_code(random);
        write_private(&self.dir.join("pairing-code"), code.as_bytes())?;
        let mut state = self.lock();
        state.code = Some(code);
        state.gate = super::pairing::PairingGate::new(std::time::Instant::now());
        Ok(())
    }
}
