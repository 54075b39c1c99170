//! Checkpoints: the device's signatures over the chain's head, which anchor the chain to a key
//! the host does not hold.
//!
//! The hash chain alone shows that a file is self-consistent, not that it is the file the host
//! wrote at the time: a host compromised later can rewrite any record and recompute every hash
//! after it, or cut the tail off. A checkpoint closes that for the records it covers. While a
//! device is linked, the host periodically sends it a [`Checkpoint`] (a label naming the log,
//! the `seq` of the last record, that record's hash and the time); the device checks that the
//! seq only grows and the time is near its clock, signs it with its Ed25519 audit key, keeps a
//! copy in its own append-only log, and answers with the signature. The host then appends the
//! [`SignedCheckpoint`] to the chain as a record of kind [`CHECKPOINT_KIND`].
//!
//! - [`verify_anchored`] (`nanoclaw audit verify --device-key HEX`) checks every checkpoint
//!   record's signature with the key the user gives, and that the head it names is the hash of
//!   the chain at its seq: a chain rewritten before a checkpoint, with every hash recomputed,
//!   no longer matches what the device signed, and the host cannot sign a new one.
//! - [`check_device_log`] (`vault-device audit check FILE`) compares the device's own copies
//!   with a file: every checkpoint the device signed must be there, its head matching, and its
//!   record present, so a host that deleted checkpoint records or cut the file back before a
//!   checkpoint is caught even though the file's own chain is sound.
//!
//! What a checkpoint does not prove: records after the last checkpoint are unanchored (a host
//! compromised now can rewrite or drop them), and a host compromised from the start can simply
//! never ask. Both verifiers report how many records come after the last checkpoint.
//!
//! # The signed message
//!
//! [`Checkpoint::signed_message`]: the context string [`SIGNING_CONTEXT`], the label's length
//! (u16, big-endian) and bytes, the seq (u64 BE), the 32-byte head and the Unix time in seconds
//! (u64 BE). The fixed context keeps a checkpoint signature from being valid as anything else
//! the key might sign.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{AuditError, ChainSummary, GENESIS, StoredRecord, for_each};

/// The record kind of a signed checkpoint in the chain.
pub const CHECKPOINT_KIND: &str = "audit_checkpoint";

/// The longest log label, in bytes.
pub const MAX_LOG_LABEL: usize = 128;

/// The prefix of every signed checkpoint message.
pub const SIGNING_CONTEXT: &[u8] = b"nanoclaw audit checkpoint v1\0";

/// Why a checkpoint is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A device key is not 64 hex digits of a valid Ed25519 public key.
    #[error("not a device audit key (64 hex digits of an Ed25519 public key)")]
    BadKey,
    /// The label is empty, too long or holds control characters.
    #[error("bad log label (1 to {MAX_LOG_LABEL} bytes, no control characters)")]
    BadLabel,
    /// A checkpoint record's data is not a signed checkpoint.
    #[error("checkpoint record is malformed")]
    Malformed,
    /// The checkpoint was signed by another key than the one given.
    #[error("checkpoint signed by another key ({found})")]
    OtherKey {
        /// The key the record names, hex.
        found: String,
    },
    /// The signature does not verify.
    #[error("bad signature on the checkpoint of seq {seq}")]
    BadSignature {
        /// The checkpoint's seq.
        seq: u64,
    },
    /// The chain's hash at the checkpoint's seq is not the head the device signed: the records
    /// up to it were rewritten.
    #[error("chain head at seq {seq} is {chain}, but the device signed {signed}")]
    HeadMismatch {
        /// The seq.
        seq: u64,
        /// The head the device signed, hex.
        signed: String,
        /// The chain's hash at that seq, hex.
        chain: String,
    },
    /// A checkpoint record names a seq that is not before it.
    #[error("checkpoint names seq {seq}, which is not before its own record")]
    NotEarlier {
        /// The seq named.
        seq: u64,
    },
    /// The file ends before a seq the device signed: it was cut back.
    #[error("the device signed seq {seq}, but the file holds only {records} records (truncated)")]
    Truncated {
        /// The seq signed.
        seq: u64,
        /// Records in the file.
        records: u64,
    },
    /// A checkpoint the device signed has no record in the file (deleted, or cut off).
    #[error("the device's checkpoint of seq {seq} has no record in the file")]
    RecordMissing {
        /// The seq signed.
        seq: u64,
    },
}

/// A device's Ed25519 audit public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey(VerifyingKey);

impl DeviceKey {
    /// From its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, CheckpointError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| CheckpointError::BadKey)
    }

    /// From 64 hex digits (as `vault-device audit key` prints it).
    pub fn from_hex(text: &str) -> Result<Self, CheckpointError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| CheckpointError::BadKey)?;
        Self::from_bytes(&bytes)
    }

    /// Its 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Its hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }
}

/// What the device signs: the log, the seq of its last record, that record's hash, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Names the log (the host's choice, at most [`MAX_LOG_LABEL`] bytes).
    pub log: String,
    /// The seq of the last record covered.
    pub seq: u64,
    /// That record's hash.
    pub head: [u8; 32],
    /// When the host asked (Unix seconds).
    pub unix_time: u64,
}

impl Checkpoint {
    /// Checks the label.
    pub fn check(&self) -> Result<(), CheckpointError> {
        check_label(&self.log)
    }

    /// The exact bytes signed (see the module doc).
    pub fn signed_message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + 2 + self.log.len() + 48);
        out.extend_from_slice(SIGNING_CONTEXT);
        // Labels are checked to be at most MAX_LOG_LABEL bytes before anything is signed or
        // verified; saturating keeps an unchecked one from aliasing a shorter length.
        let len = u16::try_from(self.log.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(self.log.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.unix_time.to_be_bytes());
        out
    }
}

/// Checks a log label: 1 to [`MAX_LOG_LABEL`] bytes, no control characters.
pub fn check_label(label: &str) -> Result<(), CheckpointError> {
    if label.is_empty() || label.len() > MAX_LOG_LABEL || label.chars().any(char::is_control) {
        return Err(CheckpointError::BadLabel);
    }
    Ok(())
}

/// A checkpoint with the device's signature: the data of a [`CHECKPOINT_KIND`] record, and a
/// line of the device's checkpoint log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// See [`Checkpoint::log`].
    pub log: String,
    /// See [`Checkpoint::seq`].
    pub seq: u64,
    /// See [`Checkpoint::head`] (hex).
    #[serde(with = "hex::serde")]
    pub head: [u8; 32],
    /// See [`Checkpoint::unix_time`].
    pub unix_time: u64,
    /// The device's audit public key (hex). Informative: verifiers use the key the user gives.
    #[serde(with = "hex::serde")]
    pub device_key: [u8; 32],
    /// The Ed25519 signature over [`Checkpoint::signed_message`] (hex).
    #[serde(with = "hex::serde")]
    pub signature: [u8; 64],
}

impl SignedCheckpoint {
    /// What was signed.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log: self.log.clone(),
            seq: self.seq,
            head: self.head,
            unix_time: self.unix_time,
        }
    }

    /// Reads one from a record's data.
    pub fn from_data(data: &serde_json::Value) -> Result<Self, CheckpointError> {
        let signed = Self::deserialize(data).map_err(|_| CheckpointError::Malformed)?;
        check_label(&signed.log)?;
        Ok(signed)
    }

    /// As a record's data.
    pub fn to_data(&self) -> serde_json::Value {
        // A struct of strings and integers always serialises.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Checks that `key` signed it (and that it names `key`).
    pub fn verify(&self, key: &DeviceKey) -> Result<(), CheckpointError> {
        check_label(&self.log)?;
        if self.device_key != key.to_bytes() {
            return Err(CheckpointError::OtherKey {
                found: hex::encode(self.device_key),
            });
        }
        let signature = Signature::from_bytes(&self.signature);
        key.0
            .verify(&self.checkpoint().signed_message(), &signature)
            .map_err(|_| CheckpointError::BadSignature { seq: self.seq })
    }
}

/// What [`verify_anchored`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorSummary {
    /// The chain.
    pub chain: ChainSummary,
    /// Checkpoint records checked (each signed by the key, each head matching).
    pub checkpoints: u64,
    /// Records covered by the last checkpoint (its seq + 1; 0 without any).
    pub anchored: u64,
    /// Records after the last checkpoint's seq, which no signature covers.
    pub unanchored: u64,
}

/// What [`check_device_log`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCheckSummary {
    /// The chain.
    pub chain: ChainSummary,
    /// The device's checkpoints checked against the file.
    pub checked: u64,
    /// Records covered by the device's last checkpoint (its seq + 1; 0 without any).
    pub anchored: u64,
    /// Whether the device's newest checkpoint has no record in the file: the host may have
    /// stopped between asking and recording, so this alone is not an error.
    pub newest_unrecorded: bool,
}

/// Checks the chain of the log at `path`, then every [`CHECKPOINT_KIND`] record in it: signed
/// by `key`, naming an earlier seq, and the head it names is the chain's hash at that seq. The
/// first failure is [`AuditError::Checkpoint`].
pub fn verify_anchored(path: &Path, key: &DeviceKey) -> Result<AnchorSummary, AuditError> {
    // Pass 1: the chain, and every checkpoint record's signature.
    let mut wanted: Vec<(u64, u64, SignedCheckpoint)> = Vec::new();
    let mut summary = empty_summary();
    for_each(
        path,
        |line, stored| {
            if stored.record.kind != CHECKPOINT_KIND {
                return Ok(());
            }
            let bad = |reason| AuditError::Checkpoint {
                line,
                seq: stored.record.seq,
                reason,
            };
            let signed = SignedCheckpoint::from_data(&stored.record.data).map_err(bad)?;
            signed.verify(key).map_err(bad)?;
            if signed.seq >= stored.record.seq {
                return Err(bad(CheckpointError::NotEarlier { seq: signed.seq }));
            }
            wanted.push((line, stored.record.seq, signed));
            Ok(())
        },
        &mut summary,
    )?;
    // Pass 2: the chain's hashes at the seqs the checkpoints name.
    let heads = heads_at(path, wanted.iter().map(|(_, _, s)| s.seq))?;
    for (line, record_seq, signed) in &wanted {
        // Every named seq is before its record, so the pass found it unless the file changed.
        let chain = heads.get(&signed.seq).copied().unwrap_or(GENESIS);
        if chain != signed.head {
            return Err(AuditError::Checkpoint {
                line: *line,
                seq: *record_seq,
                reason: CheckpointError::HeadMismatch {
                    seq: signed.seq,
                    signed: hex::encode(signed.head),
                    chain: hex::encode(chain),
                },
            });
        }
    }
    let anchored = wanted.iter().map(|(_, _, s)| s.seq + 1).max().unwrap_or(0);
    Ok(AnchorSummary {
        checkpoints: wanted.len() as u64,
        anchored,
        unanchored: summary.records.saturating_sub(anchored),
        chain: summary,
    })
}

/// Checks the log at `path` against checkpoints the device signed (its own copies, of this
/// log's label): each one's seq must be in the file with the hash the device signed, and its
/// record must be there (except the newest's, see
/// [`DeviceCheckSummary::newest_unrecorded`]). The first failure is
/// [`AuditError::DeviceCheckpoint`].
pub fn check_device_log(
    path: &Path,
    signed: &[SignedCheckpoint],
) -> Result<DeviceCheckSummary, AuditError> {
    let wanted: Vec<u64> = signed.iter().map(|s| s.seq).collect();
    let mut heads = HashMap::new();
    let mut recorded: std::collections::HashSet<(u64, [u8; 64])> = Default::default();
    let mut summary = empty_summary();
    let wanted_set: std::collections::HashSet<u64> = wanted.iter().copied().collect();
    for_each(
        path,
        |_, stored| {
            note_head(&wanted_set, stored, &mut heads);
            if stored.record.kind == CHECKPOINT_KIND
                && let Ok(c) = SignedCheckpoint::from_data(&stored.record.data)
            {
                recorded.insert((c.seq, c.signature));
            }
            Ok(())
        },
        &mut summary,
    )?;
    let newest = signed.iter().map(|s| s.seq).max();
    let mut newest_unrecorded = false;
    for s in signed {
        let bad = |reason| AuditError::DeviceCheckpoint { seq: s.seq, reason };
        let Some(chain) = heads.get(&s.seq) else {
            return Err(bad(CheckpointError::Truncated {
                seq: s.seq,
                records: summary.records,
            }));
        };
        if *chain != s.head {
            return Err(bad(CheckpointError::HeadMismatch {
                seq: s.seq,
                signed: hex::encode(s.head),
                chain: hex::encode(chain),
            }));
        }
        if !recorded.contains(&(s.seq, s.signature)) {
            if Some(s.seq) == newest {
                newest_unrecorded = true;
            } else {
                return Err(bad(CheckpointError::RecordMissing { seq: s.seq }));
            }
        }
    }
    Ok(DeviceCheckSummary {
        checked: signed.len() as u64,
        anchored: newest.map_or(0, |s| s + 1),
        newest_unrecorded,
        chain: summary,
    })
}

fn empty_summary() -> ChainSummary {
    ChainSummary {
        records: 0,
        head: hex::encode(GENESIS),
    }
}

fn note_head(
    wanted: &std::collections::HashSet<u64>,
    stored: &StoredRecord,
    heads: &mut HashMap<u64, [u8; 32]>,
) {
    if wanted.contains(&stored.record.seq) {
        let mut hash = [0u8; 32];
        // The chain walk checked the hash is 64 hex digits.
        if hex::decode_to_slice(&stored.hash, &mut hash).is_ok() {
            heads.insert(stored.record.seq, hash);
        }
    }
}

/// The chain's hashes at `seqs` (checking the chain again on the way).
fn heads_at(
    path: &Path,
    seqs: impl Iterator<Item = u64>,
) -> Result<BTreeMap<u64, [u8; 32]>, AuditError> {
    let wanted: std::collections::HashSet<u64> = seqs.collect();
    let mut heads = HashMap::new();
    let mut summary = empty_summary();
    if !wanted.is_empty() {
        for_each(
            path,
            |_, stored| {
                note_head(&wanted, stored, &mut heads);
                Ok(())
            },
            &mut summary,
        )?;
    }
    Ok(heads.into_iter().collect())
}

#[cfg(test)]
mod tests;
