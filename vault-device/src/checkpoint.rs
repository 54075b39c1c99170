//! Audit checkpoints on the device: its audit signing key, the checks before it signs, and its
//! own append-only log of what it signed (finding L7).
//!
//! While linked, the host asks the device to sign the head of its audit chain
//! (`HostToDevice::Checkpoint`: a label naming the log, the seq of its last record, that
//! record's hash, the host's time). The device refuses when the seq does not grow past the
//! last one it signed for that label (kept across restarts: it is read back from the log), or
//! when the time is more than [`MAX_CLOCK_SKEW`] from its own clock. Otherwise it signs
//! (`nanoclaw_audit::Checkpoint::signed_message`), appends the signed checkpoint to
//! `<vault>.checkpoints.log` (JSON lines, 0600, synced before the answer leaves) and answers
//! `DeviceToHost::CheckpointSigned`. That file is what makes a later rewrite or truncation of
//! the host's log visible even if the host deletes its checkpoint records:
//! `vault-device audit check FILE` compares it with a copy of the host's log
//! ([`nanoclaw_audit::check_device_log`]).
//!
//! # The key
//!
//! An Ed25519 key derived from the vault's identity secret (the device's X25519 key) with
//! HKDF-SHA256 under its own label ([`AUDIT_KEY_INFO`]): the vault format does not change,
//! every existing vault has its audit key already, and the key is exactly as safe as the vault.
//! The distinct label means the derived key reveals nothing of the identity key and the two
//! keys are never used for each other's purpose. `vault-device audit key` prints its public
//! half for `nanoclaw audit verify --device-key`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use hkdf::Hkdf;
use nanoclaw_audit::{Checkpoint, DeviceKey, SignedCheckpoint};
use sha2::Sha256;
use zeroize::Zeroizing;

/// The HKDF `info` of the audit signing key.
pub const AUDIT_KEY_INFO: &[u8] = b"nanoclaw vault-device audit checkpoint signing key v1";
/// How far the host's time may be from the device's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// How many distinct log labels the device keeps a last seq for; a checkpoint for one more is
/// refused (a host has one log; this only bounds what a hostile one can make the device keep).
pub const MAX_LOGS: usize = 64;
/// The longest line of the device's checkpoint log read back.
const MAX_LINE: usize = 4096;

/// Why the device did not sign a checkpoint, or its log failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointLogError {
    /// The label is empty, too long or holds control characters.
    #[error("bad log label")]
    BadLabel,
    /// The seq does not grow past the last one signed for this log.
    #[error("seq {seq} of log {log:?} does not grow past {last}, the last one signed")]
    SeqWentBack {
        /// The log label.
        log: String,
        /// The seq asked.
        seq: u64,
        /// The last seq signed.
        last: u64,
    },
    /// The host's time is too far from the device's clock.
    #[error("the host's time {host} is more than {} s from the device's {device}", MAX_CLOCK_SKEW.as_secs())]
    ClockSkew {
        /// The host's time (Unix seconds).
        host: u64,
        /// The device's.
        device: u64,
    },
    /// The device already keeps [`MAX_LOGS`] labels.
    #[error("already {MAX_LOGS} audit logs checkpointed; refusing another")]
    TooManyLogs,
    /// Reading or writing the checkpoint log failed.
    #[error("checkpoint log {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the checkpoint log is not a signed checkpoint.
    #[error("checkpoint log {} line {line} is malformed", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: u64,
    },
}

/// `error` as the reason of a `CheckpointRefused`: at most 200 bytes (cut at a character
/// boundary), control characters replaced, so that it always passes the link's checks.
pub fn refusal_reason(error: &CheckpointLogError) -> String {
    let mut reason: String = error
        .to_string()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    while reason.len() > 200 {
        reason.pop();
    }
    reason
}

/// The device's audit signing key, derived from its identity secret (see the module doc).
pub fn audit_signing_key(identity_secret: &[u8; 32]) -> SigningKey {
    let hk = Hkdf::<Sha256>::new(None, identity_secret);
    let mut seed = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
    if hk.expand(AUDIT_KEY_INFO, seed.as_mut()).is_err() {
        unreachable!("HKDF-SHA256 expands to 32 bytes");
    }
    SigningKey::from_bytes(&seed)
}

/// The public half of [`audit_signing_key`], as `audit verify --device-key` takes it.
pub fn audit_public_key(identity_secret: &[u8; 32]) -> DeviceKey {
    let public = audit_signing_key(identity_secret)
        .verifying_key()
        .to_bytes();
    // An Ed25519 public key derived from a secret key is always valid.
    DeviceKey::from_bytes(&public).unwrap_or_else(|_| unreachable!("a derived key is valid"))
}

/// `<vault>.checkpoints.log`.
pub fn log_path_for(vault: &Path) -> PathBuf {
    let mut p = vault.as_os_str().to_owned();
    p.push(".checkpoints.log");
    PathBuf::from(p)
}

/// The device's checkpoint log, and the last seq signed per label.
#[derive(Debug)]
pub struct CheckpointLog {
    path: PathBuf,
    last: HashMap<String, u64>,
}

impl CheckpointLog {
    /// Opens the log at `path` (it need not exist yet) and reads back the last seq signed per
    /// label. A torn final line (a crash mid-append: never answered) is cut off.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, CheckpointLogError> {
        let path = path.into();
        let mut last = HashMap::new();
        for signed in read_log(&path)? {
            let seq = last.entry(signed.log).or_insert(signed.seq);
            *seq = (*seq).max(signed.seq);
        }
        Ok(Self { path, last })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks `checkpoint` (see the module doc), signs it with `key`, appends it and syncs.
    pub fn sign(
        &mut self,
        key: &SigningKey,
        checkpoint: Checkpoint,
        now_unix: u64,
    ) -> Result<SignedCheckpoint, CheckpointLogError> {
        checkpoint
            .check()
            .map_err(|_| CheckpointLogError::BadLabel)?;
        if let Some(&last) = self.last.get(&checkpoint.log) {
            if checkpoint.seq <= last {
                return Err(CheckpointLogError::SeqWentBack {
                    log: checkpoint.log,
                    seq: checkpoint.seq,
                    last,
                });
            }
        } else if self.last.len() >= MAX_LOGS {
            return Err(CheckpointLogError::TooManyLogs);
        }
        if checkpoint.unix_time.abs_diff(now_unix) > MAX_CLOCK_SKEW.as_secs() {
            return Err(CheckpointLogError::ClockSkew {
                host: checkpoint.unix_time,
                device: now_unix,
            });
        }
        let signature = key.sign(&checkpoint.signed_message()).to_bytes();
        let signed = SignedCheckpoint {
            log: checkpoint.log,
            seq: checkpoint.seq,
            head: checkpoint.head,
            unix_time: checkpoint.unix_time,
            device_key: key.verifying_key().to_bytes(),
            signature,
        };
        self.append(&signed)?;
        self.last.insert(signed.log.clone(), signed.seq);
        Ok(signed)
    }

    fn append(&self, signed: &SignedCheckpoint) -> Result<(), CheckpointLogError> {
        let io = |source| CheckpointLogError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = signed.to_data().to_string();
        line.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

/// Every checkpoint in the device's log at `path` (none if it does not exist), oldest first.
/// A torn final line is cut off the file.
pub fn read_log(path: &Path) -> Result<Vec<SignedCheckpoint>, CheckpointLogError> {
    let io = |source| CheckpointLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(&file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut good_len = 0u64;
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let malformed = || CheckpointLogError::Malformed {
            path: path.to_path_buf(),
            line: line_no,
        };
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return Err(malformed());
            }
            // Torn: never synced in full, so never answered.
            tracing::warn!(path = %path.display(), "checkpoint log: cutting off a torn final line");
            file.set_len(good_len).map_err(io)?;
            file.sync_data().map_err(io)?;
            break;
        }
        let value: serde_json::Value =
            serde_json::from_slice(&buf[..buf.len() - 1]).map_err(|_| malformed())?;
        out.push(SignedCheckpoint::from_data(&value).map_err(|_| malformed())?);
        good_len += n as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABEL: &str = "host/audit.ndjson";

    fn ask(seq: u64, unix_time: u64) -> Checkpoint {
        Checkpoint {
            log: LABEL.into(),
            seq,
            head: [seq as u8; 32],
            unix_time,
        }
    }

    #[test]
    fn the_audit_key_is_derived_from_the_identity_and_is_not_it() {
        let a = audit_signing_key(&[1; 32]);
        assert_eq!(
            a.verifying_key(),
            audit_signing_key(&[1; 32]).verifying_key()
        );
        assert_ne!(
            a.verifying_key(),
            audit_signing_key(&[2; 32]).verifying_key()
        );
        assert_ne!(a.to_bytes(), [1; 32]);
        assert_eq!(
            audit_public_key(&[1; 32]).to_bytes(),
            a.verifying_key().to_bytes()
        );
    }

    #[test]
    fn the_device_refuses_a_seq_that_goes_back_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.checkpoints.log");
        let key = audit_signing_key(&[1; 32]);
        let mut log = CheckpointLog::open(&path).unwrap();
        log.sign(&key, ask(10, 1000), 1000).unwrap();
        for seq in [10, 9, 0] {
            assert!(matches!(
                log.sign(&key, ask(seq, 1000), 1000),
                Err(CheckpointLogError::SeqWentBack { last: 10, .. })
            ));
        }
        // The last seq is read back from the file.
        let mut log = CheckpointLog::open(&path).unwrap();
        assert!(matches!(
            log.sign(&key, ask(5, 1000), 1000),
            Err(CheckpointLogError::SeqWentBack { last: 10, .. })
        ));
        log.sign(&key, ask(11, 1000), 1000).unwrap();
        // Another log's seqs are its own.
        let mut other = ask(3, 1000);
        other.log = "other/audit.ndjson".into();
        log.sign(&key, other, 1000).unwrap();
    }

    #[test]
    fn each_signed_checkpoint_is_appended_to_the_private_log_and_verifies() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = log_path_for(&dir.path().join("v.vault"));
        assert!(path.ends_with("v.vault.checkpoints.log"));
        let key = audit_signing_key(&[1; 32]);
        let public = audit_public_key(&[1; 32]);
        let mut log = CheckpointLog::open(&path).unwrap();
        let first = log.sign(&key, ask(1, 1000), 1100).unwrap();
        let second = log.sign(&key, ask(2, 1000), 1000).unwrap();
        let read = read_log(&path).unwrap();
        assert_eq!(read, vec![first, second]);
        for s in &read {
            s.verify(&public).unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_far_off_time_and_a_bad_label_are_refused_and_not_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.checkpoints.log");
        let key = audit_signing_key(&[1; 32]);
        let mut log = CheckpointLog::open(&path).unwrap();
        assert!(matches!(
            log.sign(&key, ask(1, 1000), 1000 + MAX_CLOCK_SKEW.as_secs() + 1),
            Err(CheckpointLogError::ClockSkew { .. })
        ));
        let mut bad = ask(1, 1000);
        bad.log = "a\nb".into();
        assert!(matches!(
            log.sign(&key, bad, 1000),
            Err(CheckpointLogError::BadLabel)
        ));
        assert!(read_log(&path).unwrap().is_empty());
        // A refused seq did not count: 1 may still be signed.
        log.sign(&key, ask(1, 1000), 1000).unwrap();
    }

    #[test]
    fn every_refusal_reason_passes_the_links_checks() {
        use shared_proto::credential::{DeviceToHost, decode_message, encode_message};
        let errors = [
            CheckpointLogError::BadLabel,
            CheckpointLogError::SeqWentBack {
                log: "a\nb".repeat(100),
                seq: 1,
                last: 2,
            },
            CheckpointLogError::ClockSkew {
                host: 0,
                device: u64::MAX,
            },
            CheckpointLogError::TooManyLogs,
            CheckpointLogError::Io {
                path: PathBuf::from(format!("/tmp/{}\n\u{7}é", "ü".repeat(300))),
                source: std::io::Error::other("x"),
            },
            CheckpointLogError::Malformed {
                path: PathBuf::from("/v\r\n"),
                line: 3,
            },
        ];
        for e in &errors {
            let msg = DeviceToHost::CheckpointRefused {
                seq: 1,
                reason: refusal_reason(e),
            };
            let bytes = encode_message(&msg).unwrap();
            assert_eq!(
                decode_message::<DeviceToHost>(&bytes).unwrap(),
                msg,
                "{e:?}"
            );
        }
    }

    #[test]
    fn too_many_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = audit_signing_key(&[1; 32]);
        let mut log = CheckpointLog::open(dir.path().join("c.log")).unwrap();
        for i in 0..MAX_LOGS {
            let mut c = ask(1, 1000);
            c.log = format!("log-{i}");
            log.sign(&key, c, 1000).unwrap();
        }
        let mut c = ask(1, 1000);
        c.log = "one-more".into();
        assert!(matches!(
            log.sign(&key, c, 1000),
            Err(CheckpointLogError::TooManyLogs)
        ));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_garbage_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let key = audit_signing_key(&[1; 32]);
        let mut log = CheckpointLog::open(&path).unwrap();
        log.sign(&key, ask(1, 1000), 1000).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"log\":\"hos").unwrap();
        drop(f);
        assert_eq!(read_log(&path).unwrap().len(), 1);
        let mut log = CheckpointLog::open(&path).unwrap();
        log.sign(&key, ask(2, 1000), 1000).unwrap();
        assert_eq!(read_log(&path).unwrap().len(), 2);
        std::fs::write(&path, b"not json\n").unwrap();
        assert!(matches!(
            CheckpointLog::open(&path),
            Err(CheckpointLogError::Malformed { line: 1, .. })
        ));
    }
}
