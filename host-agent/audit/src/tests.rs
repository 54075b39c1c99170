use super::*;
use serde_json::json;

fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..n {
        let seq = log
            .append("policy_decision", json!({"i": i, "tool": "read_file"}))
            .unwrap();
        assert_eq!(seq, i);
    }
    (dir, path)
}

#[test]
fn an_appended_chain_verifies_and_reopening_continues_it() {
    let (_dir, path) = log_with(3);
    let first = verify(&path).unwrap();
    assert_eq!(first.records, 3);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(
        log.append("grant", json!({"credential": "github"}))
            .unwrap(),
        3
    );
    let second = verify(&path).unwrap();
    assert_eq!(second.records, 4);
    assert_ne!(first.head, second.head);
    let last = tail(&path, 2).unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[1].record.kind, "grant");
    assert_eq!(last[1].record.prev, last[0].hash);
    assert_eq!(last[1].hash, second.head);
}

#[test]
fn the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = log_with(1);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn an_empty_log_verifies_with_the_genesis_head() {
    let (_dir, path) = log_with(0);
    let s = verify(&path).unwrap();
    assert_eq!(s.records, 0);
    assert_eq!(s.head, hex::encode(GENESIS));
}

/// Flipping any single byte of any record line breaks the chain at exactly that line.
#[test]
fn flipping_any_byte_breaks_the_chain_at_that_line() {
    let (_dir, path) = log_with(4);
    let original = std::fs::read(&path).unwrap();
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(
            original
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    for pos in 0..original.len() {
        if original[pos] == b'\n' {
            continue;
        }
        let mut bytes = original.clone();
        bytes[pos] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let line = line_starts.iter().filter(|&&s| s <= pos).count() as u64;
        match verify(&path) {
            Err(AuditError::Broken { line: at, .. }) => {
                assert_eq!(at, line, "byte {pos} flipped, reported at line {at}")
            }
            other => panic!("byte {pos} flipped: {other:?}"),
        }
    }
}

#[test]
fn removed_reordered_and_inserted_lines_are_found() {
    let (_dir, path) = log_with(4);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |ls: &[&str]| {
        let mut s = ls.join("\n");
        s.push('\n');
        std::fs::write(&path, s).unwrap();
    };

    write(&[lines[0], lines[2], lines[3]]);
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken {
            line: 2,
            seq: Some(2),
            reason: BrokenLink::PrevMismatch
        })
    ));

    write(&[lines[0], lines[2], lines[1], lines[3]]);
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken { line: 2, .. })
    ));

    write(&[lines[0], lines[1], lines[1], lines[2], lines[3]]);
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken { line: 3, .. })
    ));

    // Dropping the first record breaks the chain at the new first line.
    write(&lines[1..]);
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken { line: 1, .. })
    ));
}

#[test]
fn a_torn_final_line_is_reported_and_cut_off_on_open() {
    let (_dir, path) = log_with(2);
    let mut bytes = std::fs::read(&path).unwrap();
    let intact = bytes.len();
    bytes.extend_from_slice(b"{\"hash\":\"00");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken {
            line: 3,
            reason: BrokenLink::Torn,
            ..
        })
    ));
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, intact);
    assert_eq!(log.append("denial", json!({})).unwrap(), 2);
    assert_eq!(verify(&path).unwrap().records, 3);
}

#[test]
fn opening_a_log_whose_last_record_was_altered_refuses_to_chain_onto_it() {
    let (_dir, path) = log_with(2);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("read_file", "read_fil3")).unwrap();
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::BrokenTail(BrokenLink::HashMismatch))
    ));
}

#[test]
fn oversized_records_are_refused_and_leave_the_chain_intact() {
    let (_dir, path) = log_with(1);
    let log = AuditLog::open(&path).unwrap();
    let big = "x".repeat(MAX_LINE);
    assert!(matches!(
        log.append("policy_decision", json!({ "note": big })),
        Err(AuditError::TooLarge { .. })
    ));
    assert_eq!(log.append("policy_decision", json!({})).unwrap(), 1);
    assert_eq!(verify(&path).unwrap().records, 2);
}

#[test]
fn garbage_and_long_lines_are_malformed_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    for content in [
        b"not json\n".to_vec(),
        b"{\"hash\":\"zz\",\"record\":{}}\n".to_vec(),
        vec![0xff; 100],
        {
            let mut v = vec![b'a'; MAX_LINE + 10];
            v.push(b'\n');
            v
        },
    ] {
        std::fs::write(&path, &content).unwrap();
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 1, .. })
        ));
    }
}

#[test]
fn concurrent_appends_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let log = std::sync::Arc::new(AuditLog::open(&path).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    log.append("policy_decision", json!({"t": t, "i": i}))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(verify(&path).unwrap().records, 100);
}

#[test]
fn digests_are_sha256_hex() {
    assert_eq!(
        digest(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
