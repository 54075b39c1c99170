use super::*;
use serde_json::json;
use std::sync::Arc;

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

/// Opens the log at `path` with a fault-injection hook.
fn open_hooked(
    path: &Path,
    hook: impl FnMut(Stage, &File) -> std::io::Result<()> + Send + 'static,
) -> AuditLog {
    AuditLog::open_with(path.to_path_buf(), Some(Box::new(hook))).unwrap()
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// A hook that holds the first sync until released, so that records queue up behind it;
/// `then` decides every later step (`n` counts the syncs, from 1).
fn hold_first_sync(
    mut then: impl FnMut(Stage, u64, &File) -> std::io::Result<()> + Send + 'static,
) -> (
    impl FnMut(Stage, &File) -> std::io::Result<()> + Send + 'static,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let mut syncs = 0u64;
    let hook = move |stage: Stage, file: &File| {
        if stage == Stage::Sync {
            syncs += 1;
            if syncs == 1 {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                return Ok(());
            }
        }
        then(stage, syncs, file)
    };
    (hook, entered, release)
}

/// Appends one record from another thread and waits until the writer holds its sync; the
/// returned thread answers once the sync is released.
fn first_record_held(
    log: &Arc<AuditLog>,
    entered: &mpsc::Receiver<()>,
) -> std::thread::JoinHandle<Result<u64, AuditError>> {
    let held = {
        let log = Arc::clone(log);
        std::thread::spawn(move || log.append("policy_decision", json!({"first": true})))
    };
    entered.recv().unwrap();
    held
}

#[test]
fn concurrent_appends_from_many_threads_chain_without_gaps_and_acks_are_on_disk() {
    const THREADS: u64 = 16;
    const EACH: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            let path = path.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..EACH {
                    let seq = log
                        .append("policy_decision", json!({"t": t, "i": i}))
                        .unwrap();
                    // Acknowledged means written: the line is in the file now.
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        text.contains(&format!("\"seq\":{seq},")),
                        "seq {seq} acknowledged but not in the file"
                    );
                    acked.push((seq, t, i));
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<(u64, u64, u64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    acked.sort();
    let seqs: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        seqs,
        (0..THREADS * EACH).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert_eq!(verify(&path).unwrap().records, THREADS * EACH);
    let stored = tail(&path, usize::MAX).unwrap();
    for ((seq, t, i), s) in acked.iter().zip(&stored) {
        assert_eq!(s.record.seq, *seq);
        assert_eq!(s.record.data, json!({"t": t, "i": i}), "seq {seq}");
    }
    assert_eq!(log.stats().records, THREADS * EACH);
}

/// Group commit: while one batch syncs, the records that arrive queue up and share the next
/// sync.
#[test]
fn concurrent_records_share_syncs() {
    const THREADS: u64 = 16;
    const EACH: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    // A slow disk: every sync takes 2 ms.
    let log = Arc::new(open_hooked(&path, |stage, _| {
        if stage == Stage::Sync {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }));
    let barrier = Arc::new(std::sync::Barrier::new(THREADS as usize));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (log, barrier) = (Arc::clone(&log), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..EACH {
                    log.append("policy_decision", json!({"t": t, "i": i}))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.records, THREADS * EACH);
    assert!(
        stats.syncs * 2 < stats.records,
        "{} syncs for {} records: no batching",
        stats.syncs,
        stats.records
    );
    assert_eq!(verify(&path).unwrap().records, THREADS * EACH);
}

/// Records queued while a batch syncs are written by the next batch, with one sync; one that
/// is too large fails alone and takes no seq.
#[test]
fn records_queued_during_a_sync_form_one_batch_and_a_bad_one_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let (hook, entered, release) = hold_first_sync(|_, _, _| Ok(()));
    let log = Arc::new(open_hooked(&path, hook));
    let held = first_record_held(&log, &entered);
    let big = "x".repeat(MAX_LINE);
    let pending: Vec<Pending> = (0..10)
        .map(|i| {
            let data = if i == 4 {
                json!({ "note": big })
            } else {
                json!({ "i": i })
            };
            log.submit("policy_decision", data)
        })
        .collect();
    release.send(()).unwrap();
    assert_eq!(held.join().unwrap().unwrap(), 0);
    let outcomes: Vec<_> = block_on(async {
        let mut out = Vec::new();
        for p in pending {
            out.push(p.await);
        }
        out
    });
    assert!(matches!(outcomes[4], Err(AuditError::TooLarge { .. })));
    let seqs: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    let stats = log.stats();
    assert_eq!((stats.records, stats.syncs), (10, 2));
    assert!(stats.sync_time > std::time::Duration::ZERO);
    assert_eq!(verify(&path).unwrap().records, 10);
}

/// Many async callers: their records share one batch, stay unacknowledged while that batch is
/// written but not yet synced, and are chained in the order they were queued.
#[test]
fn async_callers_are_answered_only_after_their_batch_is_synced() {
    const CALLERS: u64 = 32;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    // Holds the first sync (so the callers' records queue up behind it), then the second one,
    // the callers' batch, after its write: `at_second` says when it is held there.
    let (at_second_tx, at_second) = mpsc::channel();
    let (release_second, release_second_rx) = mpsc::channel::<()>();
    let (hook, entered, release) = hold_first_sync(move |stage, n, _| {
        if stage == Stage::Sync && n == 2 {
            at_second_tx.send(()).unwrap();
            release_second_rx.recv().unwrap();
        }
        Ok(())
    });
    let log = Arc::new(open_hooked(&path, hook));
    let held = first_record_held(&log, &entered);
    let mut pending: Vec<Pending> = (0..CALLERS)
        .map(|i| log.submit("policy_decision", json!({ "caller": i })))
        .collect();
    release.send(()).unwrap();
    assert_eq!(held.join().unwrap().unwrap(), 0);
    at_second.recv().unwrap();
    // The whole batch is in the file, written but not synced: nobody is answered yet.
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written.lines().count() as u64, 1 + CALLERS);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for (i, p) in pending.iter_mut().enumerate() {
        assert!(
            std::pin::Pin::new(p).poll(&mut cx).is_pending(),
            "caller {i} was answered before its record was synced"
        );
    }
    release_second.send(()).unwrap();
    let seqs: Vec<u64> = block_on(async {
        let mut seqs = Vec::new();
        for p in pending {
            seqs.push(p.await.unwrap());
        }
        seqs
    });
    assert_eq!(
        seqs,
        (1..=CALLERS).collect::<Vec<_>>(),
        "queue order, no gap"
    );
    let stats = log.stats();
    assert_eq!((stats.records, stats.syncs), (1 + CALLERS, 2));
    assert_eq!(verify(&path).unwrap().records, 1 + CALLERS);
    let stored = tail(&path, usize::MAX).unwrap();
    for (i, s) in stored.iter().skip(1).enumerate() {
        assert_eq!(s.record.data, json!({ "caller": i }));
    }
}

/// A failed sync fails every record of its batch; the file is cut back, and the next record
/// takes the first failed seq, so the chain has no gap and holds nothing unacknowledged.
#[test]
fn a_failed_sync_fails_the_whole_batch_and_the_chain_goes_on_without_a_gap() {
    let (_dir, path) = log_with(2);
    let (hook, entered, release) = hold_first_sync(|stage, syncs, _| {
        if stage == Stage::Sync && syncs == 2 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    });
    let log = Arc::new(open_hooked(&path, hook));
    let held = first_record_held(&log, &entered);
    let pending: Vec<Pending> = (0..5)
        .map(|i| log.submit("policy_decision", json!({"lost": i})))
        .collect();
    release.send(()).unwrap();
    assert_eq!(held.join().unwrap().unwrap(), 2);
    for p in pending {
        match block_on(p) {
            Err(AuditError::Write {
                records: 5, source, ..
            }) => assert_eq!(source.raw_os_error(), Some(libc::EIO)),
            other => panic!("a record of the failed batch: {other:?}"),
        }
    }
    assert_eq!(log.append("denial", json!({"after": true})).unwrap(), 3);
    assert_eq!(verify(&path).unwrap().records, 4);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("lost"), "a failed record is on disk");
    assert_eq!(log.stats().records, 2);
}

/// A short write leaves part of a line; it is cut off and the chain goes on.
#[test]
fn a_short_write_is_cut_back_off() {
    let (_dir, path) = log_with(1);
    let len = std::fs::metadata(&path).unwrap().len();
    let mut writes = 0;
    let log = open_hooked(&path, move |stage, mut file| {
        if stage == Stage::Write {
            writes += 1;
            if writes == 1 {
                file.write_all(b"{\"hash\":\"0123")?;
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        Ok(())
    });
    assert!(matches!(
        log.append("policy_decision", json!({"lost": true})),
        Err(AuditError::Write { records: 1, .. })
    ));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(log.append("policy_decision", json!({})).unwrap(), 1);
    assert_eq!(verify(&path).unwrap().records, 2);
}

/// When even cutting a failed batch back fails, the log refuses every later record (it cannot
/// know what is on disk); opening it again recovers as after a crash.
#[test]
fn a_log_that_cannot_undo_a_failed_batch_refuses_records_until_reopened() {
    let (_dir, path) = log_with(1);
    let log = open_hooked(&path, |stage, mut file| match stage {
        Stage::Write => {
            file.write_all(b"{\"hash\":\"0123")?;
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        Stage::Rollback => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        Stage::Sync => Ok(()),
    });
    assert!(matches!(
        log.append("policy_decision", json!({})),
        Err(AuditError::Write { .. })
    ));
    match log.append("policy_decision", json!({})) {
        Err(AuditError::Unusable { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EIO))
        }
        other => panic!("after a failed cut: {other:?}"),
    }
    drop(log);
    assert!(matches!(
        verify(&path),
        Err(AuditError::Broken {
            line: 2,
            reason: BrokenLink::Torn,
            ..
        })
    ));
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.append("policy_decision", json!({})).unwrap(), 1);
    assert_eq!(verify(&path).unwrap().records, 2);
}

/// Dropping the log writes what was queued before it returns.
#[test]
fn dropping_the_log_writes_what_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.ndjson");
    let log = AuditLog::open(&path).unwrap();
    let pending: Vec<Pending> = (0..3)
        .map(|i| log.submit("policy_decision", json!({ "i": i })))
        .collect();
    drop(log);
    assert_eq!(verify(&path).unwrap().records, 3);
    let seqs: Vec<u64> = pending.into_iter().map(|p| block_on(p).unwrap()).collect();
    assert_eq!(seqs, vec![0, 1, 2]);
}
