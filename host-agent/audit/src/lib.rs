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
//!
//! **Never put a secret value in a record.** Records name agents, tools, rule ids and kinds of
//! data, and carry digests ([`digest`]) of arguments, never the arguments themselves.
//!
//! Appends are serialised by a mutex, written with one `write` on an `O_APPEND` descriptor and
//! `fdatasync`ed before [`AuditLog::append`] returns, so an action that waits for its record
//! never runs unrecorded. A line torn by a crash mid-write (no final newline) was never
//! acknowledged; opening the log cuts it off and says so.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev` of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The longest record line accepted, in bytes (a bigger one is refused on append and reported
/// as broken on verify).
pub const MAX_LINE: usize = 64 * 1024;

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

#[derive(Debug)]
struct Head {
    file: File,
    next_seq: u64,
    hash: [u8; 32],
}

/// An audit log open for appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head: Mutex<Head>,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log at `path` to append to it. The last record is
    /// checked so the chain continues from a sound head; a torn last line is cut off.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, AuditError> {
        let path = path.into();
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
                return Self::open(path);
            }
        };
        Ok(Self {
            path,
            head: Mutex::new(Head {
                file,
                next_seq,
                hash,
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record of `kind` with `data` and returns its seq once it is on disk.
    pub fn append(&self, kind: &str, data: serde_json::Value) -> Result<u64, AuditError> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let record = AuditRecord {
            seq: head.next_seq,
            ts_unix_ms: now_unix_ms(),
            prev: hex::encode(head.hash),
            kind: kind.to_owned(),
            data,
        };
        let body = serde_json::to_string(&record).map_err(AuditError::Encode)?;
        let hash = chain_hash(&head.hash, body.as_bytes());
        let line = format!("{HEAD}{}{MID}{body}}}\n", hex::encode(hash));
        if line.len() > MAX_LINE {
            return Err(AuditError::TooLarge { len: line.len() });
        }
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        head.file.write_all(line.as_bytes()).map_err(io)?;
        head.file.sync_data().map_err(io)?;
        head.next_seq += 1;
        head.hash = hash;
        Ok(record.seq)
    }
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
