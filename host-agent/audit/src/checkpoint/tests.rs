use super::*;
use crate::{AuditLog, encode_line, verify};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::json;
use std::path::PathBuf;

const LABEL: &str = "host-test/audit.ndjson";

fn device() -> (SigningKey, DeviceKey) {
    let signing = SigningKey::from_bytes(&[7; 32]);
    let key = DeviceKey::from_bytes(&signing.verifying_key().to_bytes()).unwrap();
    (signing, key)
}

/// What the device does: signs the log's current head.
fn sign(signing: &SigningKey, log: &AuditLog) -> SignedCheckpoint {
    let head = log.head().unwrap();
    let checkpoint = Checkpoint {
        log: LABEL.into(),
        seq: head.seq,
        head: head.hash,
        unix_time: 1_700_000_000,
    };
    SignedCheckpoint {
        signature: signing.sign(&checkpoint.signed_message()).to_bytes(),
        device_key: signing.verifying_key().to_bytes(),
        log: checkpoint.log,
        seq: checkpoint.seq,
        head: checkpoint.head,
        unix_time: checkpoint.unix_time,
    }
}

fn records(log: &AuditLog, n: u64) {
    for i in 0..n {
        log.append("policy_decision", json!({"i": i, "tool": "read_file"}))
            .unwrap();
    }
}

/// A log of 10 records, a checkpoint over them (record 10), 5 more records, a second
/// checkpoint over all 16 (record 16), and 3 more. Returns the device's copies too.
fn anchored_log() -> (tempfile::TempDir, PathBuf, Vec<SignedCheckpoint>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let (signing, _) = device();
    let log = AuditLog::open(&path).unwrap();
    let mut signed = Vec::new();
    records(&log, 10);
    let first = sign(&signing, &log);
    assert_eq!(first.seq, 9);
    log.append(CHECKPOINT_KIND, first.to_data()).unwrap();
    signed.push(first);
    records(&log, 5);
    let second = sign(&signing, &log);
    assert_eq!(second.seq, 15);
    log.append(CHECKPOINT_KIND, second.to_data()).unwrap();
    signed.push(second);
    records(&log, 3);
    (dir, path, signed)
}

/// Rewrites the log as a host that holds the file but not the device key can: changes record
/// `target`'s data and recomputes every hash from there on, keeping the checkpoint records.
fn rewrite(path: &Path, target: u64) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut prev = GENESIS;
    let mut out = String::new();
    for line in text.lines() {
        let stored = crate::parse_line(line).unwrap();
        let r = stored.record;
        let data = if r.seq == target {
            json!({"i": 999, "tool": "nothing_to_see"})
        } else {
            r.data
        };
        let (line, hash) = encode_line(r.seq, r.ts_unix_ms, &prev, r.kind, data).unwrap();
        out.push_str(&line);
        prev = hash;
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn checkpoints_verify_and_count_what_they_anchor() {
    let (_dir, path, _) = anchored_log();
    let (_, key) = device();
    let s = verify_anchored(&path, &key).unwrap();
    assert_eq!(s.chain.records, 20);
    assert_eq!(s.checkpoints, 2);
    assert_eq!(s.anchored, 16);
    assert_eq!(s.unanchored, 4);
}

#[test]
fn a_rewritten_chain_passes_verify_but_fails_with_the_device_key() {
    let (_dir, path, signed) = anchored_log();
    let (_, key) = device();
    rewrite(&path, 3);
    // The chain alone is sound: every hash was recomputed.
    assert_eq!(verify(&path).unwrap().records, 20);
    // But record 9's hash is no longer what the device signed.
    let err = verify_anchored(&path, &key).unwrap_err();
    match err {
        AuditError::Checkpoint {
            line: 11,
            seq: 10,
            reason:
                CheckpointError::HeadMismatch {
                    seq: 9,
                    signed: named,
                    ..
                },
        } => assert_eq!(named, hex::encode(signed[0].head)),
        other => panic!("{other:?}"),
    }
    // And the device's own copies catch it too.
    let err = check_device_log(&path, &signed).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::DeviceCheckpoint {
                seq: 9,
                reason: CheckpointError::HeadMismatch { .. }
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_rewrite_after_the_last_checkpoint_is_unanchored_and_passes() {
    let (_dir, path, _) = anchored_log();
    let (_, key) = device();
    rewrite(&path, 18);
    let s = verify_anchored(&path, &key).unwrap();
    assert_eq!(s.unanchored, 4);
}

#[test]
fn a_forged_signature_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let (_, key) = device();
    let log = AuditLog::open(&path).unwrap();
    records(&log, 3);
    // The host signs with a key of its own but names the device's key.
    let forger = SigningKey::from_bytes(&[9; 32]);
    let mut forged = sign(&forger, &log);
    forged.device_key = key.to_bytes();
    log.append(CHECKPOINT_KIND, forged.to_data()).unwrap();
    drop(log);
    let err = verify_anchored(&path, &key).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Checkpoint {
                seq: 3,
                reason: CheckpointError::BadSignature { seq: 2 },
                ..
            }
        ),
        "{err:?}"
    );
    // Naming its own key instead is refused as another key.
    let path2 = dir.path().join("other.ndjson");
    let log2 = AuditLog::open(&path2).unwrap();
    records(&log2, 3);
    let other = sign(&forger, &log2);
    log2.append(CHECKPOINT_KIND, other.to_data()).unwrap();
    drop(log2);
    let err = verify_anchored(&path2, &key).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Checkpoint {
                reason: CheckpointError::OtherKey { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_tampered_signed_field_fails_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let (signing, key) = device();
    let log = AuditLog::open(&path).unwrap();
    records(&log, 3);
    let mut signed = sign(&signing, &log);
    signed.unix_time += 1;
    log.append(CHECKPOINT_KIND, signed.to_data()).unwrap();
    drop(log);
    assert!(matches!(
        verify_anchored(&path, &key).unwrap_err(),
        AuditError::Checkpoint {
            reason: CheckpointError::BadSignature { .. },
            ..
        }
    ));
}

#[test]
fn malformed_checkpoint_records_get_typed_errors() {
    let (_, key) = device();
    for data in [
        json!({}),
        json!("text"),
        json!({"log": LABEL, "seq": 1, "head": "zz", "unix_time": 1, "device_key": "00", "signature": "00"}),
        json!({"log": "", "seq": 0, "head": hex::encode([0u8; 32]), "unix_time": 1,
               "device_key": key.to_hex(), "signature": hex::encode([0u8; 64])}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.ndjson");
        let log = AuditLog::open(&path).unwrap();
        records(&log, 1);
        log.append(CHECKPOINT_KIND, data.clone()).unwrap();
        drop(log);
        let err = verify_anchored(&path, &key).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::Checkpoint {
                    reason: CheckpointError::Malformed | CheckpointError::BadLabel,
                    ..
                }
            ),
            "{data}: {err:?}"
        );
    }
    assert_eq!(DeviceKey::from_hex("abc"), Err(CheckpointError::BadKey));
}

#[test]
fn a_checkpoint_naming_its_own_or_a_later_seq_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let (signing, key) = device();
    let log = AuditLog::open(&path).unwrap();
    records(&log, 2);
    let mut c = sign(&signing, &log).checkpoint();
    c.seq = 2;
    let signed = SignedCheckpoint {
        signature: signing.sign(&c.signed_message()).to_bytes(),
        device_key: key.to_bytes(),
        log: c.log,
        seq: c.seq,
        head: c.head,
        unix_time: c.unix_time,
    };
    log.append(CHECKPOINT_KIND, signed.to_data()).unwrap();
    drop(log);
    assert!(matches!(
        verify_anchored(&path, &key).unwrap_err(),
        AuditError::Checkpoint {
            reason: CheckpointError::NotEarlier { seq: 2 },
            ..
        }
    ));
}

/// Cuts the file to its first `n` lines.
fn truncate_to(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    std::fs::write(path, kept).unwrap();
}

#[test]
fn truncation_after_a_checkpoint_is_caught_by_the_device_check() {
    let (_dir, path, signed) = anchored_log();
    let (_, key) = device();
    assert_eq!(check_device_log(&path, &signed).unwrap().checked, 2);
    // Cut back to 12 records: the second checkpoint (over seq 15, recorded at 16) is gone.
    truncate_to(&path, 12);
    // The chain is sound, and its one remaining checkpoint verifies.
    assert_eq!(verify(&path).unwrap().records, 12);
    let s = verify_anchored(&path, &key).unwrap();
    assert_eq!((s.checkpoints, s.anchored), (1, 10));
    // The device signed seq 15: the file no longer reaches it.
    let err = check_device_log(&path, &signed).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::DeviceCheckpoint {
                seq: 15,
                reason: CheckpointError::Truncated {
                    seq: 15,
                    records: 12
                }
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_deleted_checkpoint_record_is_caught_by_the_device_check() {
    let (_dir, path, signed) = anchored_log();
    // Drop the first checkpoint record (line 11) and re-chain everything after it.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut prev = GENESIS;
    let mut out = String::new();
    let mut seq = 0;
    for (i, line) in text.lines().enumerate() {
        if i == 10 {
            continue;
        }
        let r = crate::parse_line(line).unwrap().record;
        let (line, hash) = encode_line(seq, r.ts_unix_ms, &prev, r.kind, r.data).unwrap();
        out.push_str(&line);
        prev = hash;
        seq += 1;
    }
    std::fs::write(&path, out).unwrap();
    verify(&path).unwrap();
    // Records 0..=9 are untouched, so the first checkpoint's head still matches, but its
    // record is gone (and it is not the newest, which might legitimately be unrecorded).
    let err = check_device_log(&path, &signed).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::DeviceCheckpoint {
                seq: 9,
                reason: CheckpointError::RecordMissing { seq: 9 }
            }
        ),
        "{err:?}"
    );
    // The newest checkpoint alone may be unrecorded (the host stopped before writing it).
    let mut only_first = signed[..1].to_vec();
    only_first[0].signature[0] ^= 1;
    assert!(
        check_device_log(&path, &only_first)
            .unwrap()
            .newest_unrecorded
    );
}
