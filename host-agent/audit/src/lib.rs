//! The audit log: append-only, hash-chained records of every decision, approval, denial, grant
//! and credential use.
//!
//! One file (the daemon's is `<state-dir>/audit.ndjson`), one record per line:
//!
//! ```text
//! {"hash":"<64 hex digits>","record":{"seq":0,"ts_unix_ms":...,"prev":"<64 hex>","kind":"...","data":{...}}}
//! ```
//!
//! - `hash` is SHA-256(`prev` as 32 raw bytes ‖ the exact bytes of the `record` object as
//!   written). Hashing the bytes as written, not a re-serialisation, means a verifier needs no
//!   canonical JSON: any changed byte in a record, in its hash or in the line's frame breaks that
//!   line.
//! - `prev` is the previous line's `hash` ([`GENESIS`], all zeros, for the first), and `seq`
//!   counts from 0 without gaps, so a removed, reordered or inserted line breaks the chain at the
//!   first line after it. [`verify`] reports the first broken link.
//! - Truncating the tail cannot be seen from the file alone (no chain can show that); keep the
//!   head hash elsewhere (`nanoclaw audit verify` prints it) to detect that.
//! - Nor can the chain alone show a rewrite: whoever can write the file can change a record and
//!   recompute every hash after it. [`checkpoint`]s anchor the chain to the linked device's key,
//!   which the host does not hold: the device signs the head periodically and keeps its own
//!   copy, and the signed checkpoint goes into the chain as a [`CHECKPOINT_KIND`] record.
//!   [`verify_anchored`] checks them with the device's key; [`check_device_log`] checks a file
//!   against the device's copies. Records after the last checkpoint stay unanchored.
//!
//! **Never put a secret value in a record.** Records name agents, tools, rule ids and kinds of
//! data, and carry digests ([`digest`]) of arguments, never the arguments themselves.
//!
//! # The write path: group commit on a writer thread
//!
//! One writer thread per open log (a plain OS thread, named `audit-writer`, never a task of an
//! async runtime) owns the file. Callers queue records ([`AuditLog::submit`], or the blocking
//! [`AuditLog::append`]) and wait for their acknowledgement. The writer takes every record
//! waiting in the queue (up to [`MAX_BATCH`]), gives them their `seq`, `prev` and `hash` in
//! queue order, writes the whole batch with one `write` on an `O_APPEND` descriptor,
//! `fdatasync`s once, and only then acknowledges each record of the batch with its seq. So:
//!
//! - an action that waits for its record never runs unrecorded: a record is acknowledged only
//!   once it is on disk;
//! - concurrent callers share one `fdatasync` instead of queueing for one each (a record that
//!   arrives while a batch is being synced goes into the next batch);
//! - an async caller awaits a [`Pending`] and holds no lock and blocks no runtime thread while
//!   the disk syncs.
//!
//! When writing or syncing a batch fails, every record of the batch fails with
//! [`AuditError::Write`] (none is acknowledged), the file is cut back to its length before the
//! batch and synced, and the next batch reuses the failed batch's seqs, so the chain on disk has
//! neither a gap nor a record nobody was told about. If even cutting back fails, the log cannot
//! know what is on disk: every later record fails with [`AuditError::Unusable`] until the log
//! is opened again (opening checks the last record and cuts off a torn line, as after a crash).
//! A record that cannot be encoded or is over [`MAX_LINE`] fails alone and takes no seq.
//!
//! A line torn by a crash mid-write (no final newline) was never acknowledged; opening the log
//! cuts it off and says so. Records queued but not yet acknowledged when the process dies were
//! never acknowledged either: their callers never went on.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod checkpoint;

pub use checkpoint::{
    AnchorSummary, CHECKPOINT_KIND, Checkpoint, CheckpointError, DeviceCheckSummary, DeviceKey,
    SignedCheckpoint, check_device_log, verify_anchored,
};

/// The `prev` of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The longest record line accepted, in bytes (a bigger one is refused on append and reported
/// as broken on verify).
pub const MAX_LINE: usize = 64 * 1024;

/// The most records one batch (one write, one `fdatasync`) holds.
pub const MAX_BATCH: usize = 256;

/// The frame around each record: `{"hash":"` + 64 hex digits + `","record":` ... `}`.
const HEAD: &str = "{\"hash\":\"";
const MID: &str = "\",\"record\":";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Opening, reading or writing the file failed.
    #[error("audit log {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing or syncing a batch of records failed: none of them is recorded (the file was
    /// cut back to where it was before the batch).
    #[error("audit log {}: writing a batch of {records} records failed; none is recorded", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// How many records the batch held (each of them fails with this error).
        records: usize,
        /// The cause, shared by every record of the batch.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A failed batch could not be cut back off the file, so what is on disk is unknown: the
    /// log refuses every record until it is opened again.
    #[error("audit log {} is unusable after a failed write; open it again", .path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why cutting the failed batch back off failed.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The log's writer thread is gone (it panicked): nothing can be recorded.
    #[error("the audit log's writer thread is gone")]
    WriterGone,
    /// A record could not be encoded.
    #[error("cannot encode an audit record")]
    Encode(#[source] serde_json::Error),
    /// A record is larger than [`MAX_LINE`].
    #[error("audit record of {len} bytes is over the {MAX_LINE}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// The last line, which a new record would chain to, is not a sound record: the log was
    /// altered (run `nanoclaw audit verify` to find the first broken link).
    #[error("the last audit record is broken: {0}")]
    BrokenTail(BrokenLink),
    /// The chain is broken at this line.
    #[error("audit chain broken at line {line}{}: {reason}", .seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
    Broken {
        /// The line number, from 1.
        line: u64,
        /// The record's `seq`, when it could be read.
        seq: Option<u64>,
        /// What is wrong.
        reason: BrokenLink,
    },
    /// The chain is sound, but a checkpoint record in it fails its check
    /// ([`verify_anchored`]).
    #[error("checkpoint at line {line} (seq {seq}): {reason}")]
    Checkpoint {
        /// The line number, from 1.
        line: u64,
        /// The checkpoint record's own seq.
        seq: u64,
        /// What is wrong.
        reason: CheckpointError,
    },
    /// The chain is sound, but it does not hold what the device signed
    /// ([`check_device_log`]).
    #[error("the device's checkpoint of seq {seq} does not match the file: {reason}")]
    DeviceCheckpoint {
        /// The seq the device signed.
        seq: u64,
        /// What is wrong.
        reason: CheckpointError,
    },
}

/// Why a line breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokenLink {
    /// The line is not a framed record.
    #[error("not a framed record")]
    Malformed,
    /// The stored hash does not match the record's bytes.
    #[error("hash does not match the record")]
    HashMismatch,
    /// `prev` is not the previous line's hash.
    #[error("prev does not match the previous record's hash")]
    PrevMismatch,
    /// `seq` is not one more than the previous line's.
    #[error("seq {found} where {expected} was expected")]
    SeqGap {
        /// The expected seq.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The last line has no final newline.
    #[error("torn final line")]
    Torn,
}

/// One record as stored (the part the hash covers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// When it was appended (Unix milliseconds).
    pub ts_unix_ms: u64,
    /// The previous record's hash, hex ([`GENESIS`] for the first).
    pub prev: String,
    /// What happened: `policy_decision`, `approval`, `denial`, `grant`, `credential_use`,
    /// `tokenize`, ...
    pub kind: String,
    /// The details (never a secret value).
    pub data: serde_json::Value,
}

/// A record and its hash, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// The record.
    pub record: AuditRecord,
    /// Its hash, hex.
    pub hash: String,
}

/// What a successful [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// How many records.
    pub records: u64,
    /// The last record's hash, hex ([`GENESIS`] for an empty log).
    pub head: String,
}

/// The last record on disk: its seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// The last acknowledged record's seq.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

/// How many records and `fdatasync`s a log has done since it was opened, and how long they
/// took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditStats {
    /// Records written, synced and acknowledged.
    pub records: u64,
    /// Batches written and synced (one `fdatasync` each).
    pub syncs: u64,
    /// The time the writer spent writing and syncing those batches: divided by `syncs`, the
    /// mean time a batch took to reach the disk, which every record of it waited for.
    pub sync_time: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    syncs: AtomicU64,
    /// Nanoseconds spent in the writes and syncs of acknowledged batches.
    sync_nanos: AtomicU64,
    /// The last acknowledged record (`None` while the log is empty).
    head: std::sync::Mutex<Option<ChainHead>>,
}

impl Counters {
    fn set_head(&self, head: ChainHead) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = Some(head);
    }
}

/// A record waiting in the queue, and who waits for it.
struct Job {
    kind: String,
    data: serde_json::Value,
    reply: Reply,
}

/// Where a record's outcome goes.
enum Reply {
    /// A thread blocked in [`AuditLog::append`].
    Blocking(mpsc::SyncSender<Result<u64, AuditError>>),
    /// A [`Pending`] future.
    Async(tokio::sync::oneshot::Sender<Result<u64, AuditError>>),
}

impl Reply {
    fn send(self, outcome: Result<u64, AuditError>) {
        // A caller that stopped waiting does not want the answer; the record's fate is the
        // same either way.
        match self {
            Self::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
            Self::Async(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// A step of writing a batch, where a test may inject a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the batch is written (the hook may write part of it itself, as a short write
    /// would).
    Write,
    /// Before the batch is synced.
    Sync,
    /// Before a failed batch is cut back off the file.
    Rollback,
}

/// A test's fault injection: called with the file before each [`Stage`]; an error fails that
/// step as the system call would.
type FaultHook = Box<dyn FnMut(Stage, &File) -> std::io::Result<()> + Send>;

/// The writer thread's state: the file and the head of the chain.
struct Writer {
    path: PathBuf,
    file: File,
    /// The length of the file up to the last acknowledged record.
    len: u64,
    next_seq: u64,
    hash: [u8; 32],
    /// Set when a failed batch could not be cut back off.
    unusable: Option<Arc<std::io::Error>>,
    counters: Arc<Counters>,
    fault: Option<FaultHook>,
}

/// An audit log open for appending. Dropping it waits for the records already queued to be
/// written.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// The writer's queue (`None` only while dropping).
    queue: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// A queued record: resolves to its seq once it is on disk, or to the error that kept it off.
#[derive(Debug)]
#[must_use = "a record is on disk only once its Pending resolves to Ok"]
pub struct Pending(PendingState);

#[derive(Debug)]
enum PendingState {
    Queued(tokio::sync::oneshot::Receiver<Result<u64, AuditError>>),
    /// Refused before it was queued (taken when polled).
    Failed(Option<AuditError>),
}

impl Future for Pending {
    type Output = Result<u64, AuditError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PendingState::Queued(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(AuditError::WriterGone))),
            PendingState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(AuditError::WriterGone))),
        }
    }
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` to append to it, and starts its writer
    /// thread. The last record is checked so the chain continues from a sound head; a torn last
    /// line is cut off.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, AuditError> {
        Self::open_with(path.into(), None)
    }

    fn open_with(path: PathBuf, fault: Option<FaultHook>) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let last = last_line(&mut file).map_err(io)?;
        let (next_seq, hash) = match last {
            None => (0, GENESIS),
            Some(Tail::Complete(line)) => {
                let stored = parse_line(&line).map_err(AuditError::BrokenTail)?;
                check_hash(&line, &stored).map_err(AuditError::BrokenTail)?;
                let hash = decode_hash(&stored.hash)
                    .ok_or(AuditError::BrokenTail(BrokenLink::Malformed))?;
                (stored.record.seq + 1, hash)
            }
            Some(Tail::Torn { keep }) => {
                tracing::warn!(path = %path.display(), "audit log: cutting off a torn final line");
                file.set_len(keep).map_err(io)?;
                file.sync_data().map_err(io)?;
                return Self::open_with(path, fault);
            }
        };
        let len = file.metadata().map_err(io)?.len();
        let counters = Arc::new(Counters::default());
        if next_seq > 0 {
            counters.set_head(ChainHead {
                seq: next_seq - 1,
                hash,
            });
        }
        let writer = Writer {
            path: path.clone(),
            file,
            len,
            next_seq,
            hash,
            unusable: None,
            counters: Arc::clone(&counters),
            fault,
        };
        let (queue, jobs) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(jobs))
            .map_err(io)?;
        Ok(Self {
            path,
            queue: Some(queue),
            writer: Some(handle),
            counters,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record of `kind` with `data` at once and returns a future that resolves to
    /// its seq once it is on disk. Records queued one after another (by one caller, or by
    /// callers that ordered themselves) are chained in that order. Dropping the future does
    /// not withdraw the record.
    pub fn submit(&self, kind: &str, data: serde_json::Value) -> Pending {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.enqueue(kind, data, Reply::Async(tx)) {
            Ok(()) => Pending(PendingState::Queued(rx)),
            Err(e) => Pending(PendingState::Failed(Some(e))),
        }
    }

    /// Appends a record of `kind` with `data` and returns its seq once it is on disk, blocking
    /// the calling thread meanwhile (async code awaits [`AuditLog::submit`] instead).
    pub fn append(&self, kind: &str, data: serde_json::Value) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(kind, data, Reply::Blocking(tx))?;
        rx.recv().unwrap_or(Err(AuditError::WriterGone))
    }

    /// How many records and syncs this log has done since it was opened.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            records: self.counters.records.load(Ordering::Relaxed),
            syncs: self.counters.syncs.load(Ordering::Relaxed),
            sync_time: Duration::from_nanos(self.counters.sync_nanos.load(Ordering::Relaxed)),
        }
    }

    /// The last record on disk (acknowledged), `None` while the log is empty: what a
    /// [`Checkpoint`] names.
    pub fn head(&self) -> Option<ChainHead> {
        *self.counters.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, kind: &str, data: serde_json::Value, reply: Reply) -> Result<(), AuditError> {
        let job = Job {
            kind: kind.to_owned(),
            data,
            reply,
        };
        self.queue
            .as_ref()
            .ok_or(AuditError::WriterGone)?
            .send(job)
            .map_err(|_| AuditError::WriterGone)
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and stop.
        drop(self.queue.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "audit log: the writer thread panicked");
        }
    }
}

impl Writer {
    /// Commits batches until every [`AuditLog`] handle is gone and the queue is empty.
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = Vec::with_capacity(8);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Writes and syncs one batch, then answers each of its records.
    fn commit(&mut self, batch: Vec<Job>) {
        if let Some(cause) = &self.unusable {
            for job in batch {
                job.reply.send(Err(AuditError::Unusable {
                    path: self.path.clone(),
                    source: Arc::clone(cause),
                }));
            }
            return;
        }
        let ts_unix_ms = now_unix_ms();
        let mut bytes = Vec::new();
        let mut hash = self.hash;
        let mut written = Vec::with_capacity(batch.len());
        for job in batch {
            let seq = self.next_seq + written.len() as u64;
            match encode_line(seq, ts_unix_ms, &hash, job.kind, job.data) {
                Ok((line, line_hash)) => {
                    bytes.extend_from_slice(line.as_bytes());
                    hash = line_hash;
                    written.push((seq, job.reply));
                }
                // This record alone fails and takes no seq.
                Err(e) => job.reply.send(Err(e)),
            }
        }
        if written.is_empty() {
            return;
        }
        let started = Instant::now();
        match self.write_and_sync(&bytes) {
            Ok(()) => {
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.counters.sync_nanos.fetch_add(took, Ordering::Relaxed);
                self.len += bytes.len() as u64;
                self.next_seq += written.len() as u64;
                self.hash = hash;
                self.counters.set_head(ChainHead {
                    seq: self.next_seq - 1,
                    hash,
                });
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .records
                    .fetch_add(written.len() as u64, Ordering::Relaxed);
                for (seq, reply) in written {
                    reply.send(Ok(seq));
                }
            }
            Err(e) => {
                let source = Arc::new(e);
                tracing::error!(path = %self.path.display(), records = written.len(),
                    error = %source, "audit log: writing a batch failed; none of it is recorded");
                self.roll_back();
                let records = written.len();
                for (_, reply) in written {
                    reply.send(Err(AuditError::Write {
                        path: self.path.clone(),
                        records,
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }

    fn write_and_sync(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.fault(Stage::Write)?;
        self.file.write_all(bytes)?;
        self.fault(Stage::Sync)?;
        self.file.sync_data()
    }

    /// Cuts a failed batch (whatever of it reached the file) back off, so the next batch
    /// continues the chain from the last acknowledged record.
    fn roll_back(&mut self) {
        let cut = self
            .fault(Stage::Rollback)
            .and_then(|()| self.file.set_len(self.len))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = cut {
            tracing::error!(path = %self.path.display(), error = %e,
                "audit log: cannot cut a failed batch back off; refusing every record until reopened");
            self.unusable = Some(Arc::new(e));
        }
    }

    fn fault(&mut self, stage: Stage) -> std::io::Result<()> {
        match self.fault.as_mut() {
            Some(hook) => hook(stage, &self.file),
            None => Ok(()),
        }
    }
}

/// One framed line (with its newline) of the record `seq` chained to `prev`, and its hash.
fn encode_line(
    seq: u64,
    ts_unix_ms: u64,
    prev: &[u8; 32],
    kind: String,
    data: serde_json::Value,
) -> Result<(String, [u8; 32]), AuditError> {
    let record = AuditRecord {
        seq,
        ts_unix_ms,
        prev: hex::encode(prev),
        kind,
        data,
    };
    let body = serde_json::to_string(&record).map_err(AuditError::Encode)?;
    let hash = chain_hash(prev, body.as_bytes());
    let line = format!("{HEAD}{}{MID}{body}}}\n", hex::encode(hash));
    if line.len() > MAX_LINE {
        return Err(AuditError::TooLarge { len: line.len() });
    }
    Ok((line, hash))
}

/// Checks the whole chain of the log at `path` and returns its summary, or the first broken
/// link as [`AuditError::Broken`].
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    let mut summary = ChainSummary {
        records: 0,
        head: hex::encode(GENESIS),
    };
    for_each(path, |_, _| Ok(()), &mut summary)?;
    Ok(summary)
}

/// The last `n` records of the log at `path`, oldest first, after checking the whole chain.
pub fn tail(path: &Path, n: usize) -> Result<Vec<StoredRecord>, AuditError> {
    let mut last = std::collections::VecDeque::with_capacity(n.min(1024));
    let mut summary = ChainSummary {
        records: 0,
        head: hex::encode(GENESIS),
    };
    for_each(
        path,
        |_, stored| {
            if n > 0 {
                if last.len() == n {
                    last.pop_front();
                }
                last.push_back(stored.clone());
            }
            Ok(())
        },
        &mut summary,
    )?;
    Ok(last.into())
}

/// The SHA-256 of `bytes`, hex: how records refer to argument values without holding them.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Walks every line of the log, checking each link, and calls `visit` for each record.
fn for_each(
    path: &Path,
    mut visit: impl FnMut(u64, &StoredRecord) -> Result<(), AuditError>,
    summary: &mut ChainSummary,
) -> Result<(), AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS;
    let mut expected_seq = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let broken = |seq, reason| AuditError::Broken {
            line: line_no,
            seq,
            reason,
        };
        if buf.last() != Some(&b'\n') {
            let reason = if buf.len() > MAX_LINE {
                BrokenLink::Malformed
            } else {
                BrokenLink::Torn
            };
            return Err(broken(None, reason));
        }
        let line = std::str::from_utf8(&buf[..buf.len() - 1])
            .map_err(|_| broken(None, BrokenLink::Malformed))?;
        let stored = parse_line(line).map_err(|r| broken(None, r))?;
        let seq = Some(stored.record.seq);
        check_hash(line, &stored).map_err(|r| broken(seq, r))?;
        if stored.record.prev != hex::encode(prev) {
            return Err(broken(seq, BrokenLink::PrevMismatch));
        }
        if stored.record.seq != expected_seq {
            return Err(broken(
                seq,
                BrokenLink::SeqGap {
                    expected: expected_seq,
                    found: stored.record.seq,
                },
            ));
        }
        visit(line_no, &stored)?;
        prev = decode_hash(&stored.hash).ok_or_else(|| broken(seq, BrokenLink::Malformed))?;
        expected_seq += 1;
    }
    summary.records = expected_seq;
    summary.head = hex::encode(prev);
    Ok(())
}

/// Splits a line (without its newline) into its hash and record.
fn parse_line(line: &str) -> Result<StoredRecord, BrokenLink> {
    let rest = line.strip_prefix(HEAD).ok_or(BrokenLink::Malformed)?;
    let (hash, rest) = rest.split_at_checked(64).ok_or(BrokenLink::Malformed)?;
    let body = rest
        .strip_prefix(MID)
        .and_then(|r| r.strip_suffix('}'))
        .ok_or(BrokenLink::Malformed)?;
    decode_hash(hash).ok_or(BrokenLink::Malformed)?;
    let record: AuditRecord = serde_json::from_str(body).map_err(|_| BrokenLink::Malformed)?;
    Ok(StoredRecord {
        record,
        hash: hash.to_owned(),
    })
}

/// Checks that the line's stored hash covers its record bytes and `prev`.
fn check_hash(line: &str, stored: &StoredRecord) -> Result<(), BrokenLink> {
    let body = &line[HEAD.len() + 64 + MID.len()..line.len() - 1];
    let prev = decode_hash(&stored.record.prev).ok_or(BrokenLink::Malformed)?;
    if hex::encode(chain_hash(&prev, body.as_bytes())) == stored.hash {
        Ok(())
    } else {
        Err(BrokenLink::HashMismatch)
    }
}

fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// 64 lowercase hex digits to 32 bytes.
fn decode_hash(hex_digits: &str) -> Option<[u8; 32]> {
    if hex_digits.len() != 64 || hex_digits.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

enum Tail {
    /// The last line, without its newline.
    Complete(String),
    /// The file ends in a partial line; `keep` bytes precede it.
    Torn { keep: u64 },
}

/// The last line of `file`, read backwards in chunks.
fn last_line(file: &mut File) -> std::io::Result<Option<Tail>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut last_byte = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last_byte)?;
    let complete = last_byte[0] == b'\n';
    let end = if complete { len - 1 } else { len };
    // Find the newline before `end`.
    let mut start = 0;
    let mut pos = end;
    let mut chunk = vec![0u8; 8192];
    'search: while pos > 0 {
        let take = pos.min(chunk.len() as u64);
        pos -= take;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk[..take as usize])?;
        if let Some(i) = chunk[..take as usize].iter().rposition(|&b| b == b'\n') {
            start = pos + i as u64 + 1;
            break 'search;
        }
        if end - pos > MAX_LINE as u64 {
            // Longer than any record we write: let the parse report it.
            start = pos;
            break 'search;
        }
    }
    if !complete {
        return Ok(Some(Tail::Torn { keep: start }));
    }
    let mut line = vec![0u8; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    // Not UTF-8: the parse reports it as malformed.
    let line = String::from_utf8(line).unwrap_or_default();
    Ok(Some(Tail::Complete(line)))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
