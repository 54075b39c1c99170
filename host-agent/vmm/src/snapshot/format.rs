//! The state file: a fixed header, then the CBOR body it checks.
//!
//! ```text
//! offset  size  field
//!      0     8  magic, b"NCLAWSNP"
//!      8     4  format version, little-endian u32 (FORMAT_VERSION)
//!     12     4  flags, little-endian u32, 0
//!     16     8  body length in bytes, little-endian u64 (at most MAX_STATE_BODY)
//!     24    32  SHA-256 of the body
//!     56     …  body: the CBOR encoding of `SnapshotState`
//! ```
//!
//! Reading checks, in order: the file is no longer than a header plus [`MAX_STATE_BODY`]
//! (before anything is allocated), the magic, the version, the body length against what the
//! file holds, the checksum, and only then decodes the body. The checksum catches a damaged or
//! truncated file; it is not a signature (see the module doc of [`super`]).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::SnapshotError;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"NCLAWSNP";
/// The format this VMM writes and the only one it reads. Version 2 added the virtio devices'
/// transport and queue state (version 1 files are refused: their device state has another
/// shape, and a VM restored from one would find its virtio devices reset).
pub const FORMAT_VERSION: u32 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 56;
/// Largest body accepted (16 MiB): 32 vCPUs of state take well under 1 MiB.
pub const MAX_STATE_BODY: u64 = 16 << 20;
/// Scratch space for decoding one CBOR byte string: the largest KVM structure kept is the
/// 4 KiB `kvm_xsave`.
const DECODE_SCRATCH: usize = 16 << 10;

/// The parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version.
    pub version: u32,
    /// The body length.
    pub body_len: u64,
    /// SHA-256 of the body.
    pub checksum: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        // 12..16: flags, zero.
        out[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        out[24..56].copy_from_slice(&self.checksum);
        out
    }

    /// Parses and checks the header at the start of `bytes` (magic, version, flags).
    fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let Some(head) = bytes.get(..HEADER_LEN) else {
            return Err(SnapshotError::TruncatedState {
                expected: HEADER_LEN as u64,
                found: bytes.len() as u64,
            });
        };
        if head[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u32_at(12);
        if flags != 0 {
            return Err(SnapshotError::UnknownFlags(flags));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[16..24]);
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&head[24..56]);
        Ok(Self {
            version,
            body_len: u64::from_le_bytes(len),
            checksum,
        })
    }
}

/// Encodes `value` as a state file: header and body.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, SnapshotError> {
    let mut body = Vec::new();
    ciborium::into_writer(value, &mut body).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let body_len = body.len() as u64;
    if body_len > MAX_STATE_BODY {
        return Err(SnapshotError::OversizedState {
            found: body_len,
            max: MAX_STATE_BODY,
        });
    }
    let header = Header {
        version: FORMAT_VERSION,
        body_len,
        checksum: Sha256::digest(&body).into(),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a whole state file held in `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    let header = Header::decode(bytes)?;
    let body = &bytes[HEADER_LEN..];
    if header.body_len > MAX_STATE_BODY {
        return Err(SnapshotError::OversizedState {
            found: header.body_len,
            max: MAX_STATE_BODY,
        });
    }
    let found = body.len() as u64;
    if found < header.body_len {
        return Err(SnapshotError::TruncatedState {
            expected: HEADER_LEN as u64 + header.body_len,
            found: HEADER_LEN as u64 + found,
        });
    }
    if found > header.body_len {
        return Err(SnapshotError::TrailingBytes {
            extra: found - header.body_len,
        });
    }
    let digest: [u8; 32] = Sha256::digest(body).into();
    if digest != header.checksum {
        return Err(SnapshotError::ChecksumMismatch);
    }
    let mut scratch = vec![0u8; DECODE_SCRATCH];
    ciborium::de::from_reader_with_buffer(body, &mut scratch)
        .map_err(|e| SnapshotError::Decode(e.to_string()))
}

/// Writes `value` to a new state file at `path` (mode 0600; an existing file is an error),
/// synced to disk.
pub fn write_file<T: Serialize>(path: &Path, value: &T) -> Result<(), SnapshotError> {
    let bytes = encode(value)?;
    let io = |source| SnapshotError::io("write the state file", path, source);
    let mut file = super::create_private(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Reads and checks the state file at `path`. The file's length is checked before any of it
/// is read, so no allocation is larger than a header plus [`MAX_STATE_BODY`].
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let file = File::open(path)
        .map_err(|source| SnapshotError::io("read the state file", path, source))?;
    read_from(&file, path)
}

/// Reads and checks the state file open as `file` (`path` names it in errors), from its
/// start; bounded as [`read_file`] is.
pub fn read_from<T: DeserializeOwned>(file: &File, path: &Path) -> Result<T, SnapshotError> {
    let io = |source| SnapshotError::io("read the state file", path, source);
    let len = file.metadata().map_err(io)?.len();
    let max = HEADER_LEN as u64 + MAX_STATE_BODY;
    if len > max {
        return Err(SnapshotError::OversizedState {
            found: len.saturating_sub(HEADER_LEN as u64),
            max: MAX_STATE_BODY,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` bounds the read even if the file grows after the length was read.
    // From the file's start: it was opened for this one read.
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            values: (0..100).collect(),
        }
    }

    #[test]
    fn a_state_file_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"NCLAWSNP");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn a_tampered_body_fails_the_checksum() {
        let mut bytes = encode(&sample()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(SnapshotError::ChecksumMismatch)
        ));
        // A tampered checksum too.
        let mut bytes = encode(&sample()).unwrap();
        bytes[30] ^= 0x80;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(SnapshotError::ChecksumMismatch)
        ));
    }

    #[test]
    fn another_version_magic_or_flags_is_refused() {
        let good = encode(&sample()).unwrap();
        let mut bytes = good.clone();
        for old_or_new in [1u32, 3] {
            bytes[8..12].copy_from_slice(&old_or_new.to_le_bytes());
            let err = decode::<Sample>(&bytes).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::UnsupportedVersion { found, supported: 2 } if found == old_or_new
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains(&format!("version {old_or_new}")),
                "{err}"
            );
        }
        let mut bytes = good.clone();
        bytes[0] = b'X';
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(SnapshotError::BadMagic)
        ));
        let mut bytes = good;
        bytes[12] = 1;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(SnapshotError::UnknownFlags(1))
        ));
    }

    #[test]
    fn truncated_oversized_and_garbage_state_is_a_typed_error() {
        let good = encode(&sample()).unwrap();
        for cut in [0, 7, HEADER_LEN - 1, HEADER_LEN, good.len() - 1] {
            assert!(
                matches!(
                    decode::<Sample>(&good[..cut]),
                    Err(SnapshotError::TruncatedState { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            decode::<Sample>(&long),
            Err(SnapshotError::TrailingBytes { extra: 1 })
        ));
        // A header that claims a huge body is refused before anything is allocated for it.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(SnapshotError::OversizedState { .. })
        ));
        // A valid checksum over a body that is not the expected type.
        let other = encode(&"just a string").unwrap();
        assert!(matches!(
            decode::<Sample>(&other),
            Err(SnapshotError::Decode(_))
        ));
    }

    /// Arbitrary bytes after a valid header (checksum recomputed, as a forger would): an error,
    /// never a panic.
    #[test]
    fn random_bodies_never_panic() {
        use proptest::prelude::*;
        proptest!(|(body in proptest::collection::vec(any::<u8>(), 0..512))| {
            let header = Header {
                version: FORMAT_VERSION,
                body_len: body.len() as u64,
                checksum: Sha256::digest(&body).into(),
            };
            let mut bytes = header.encode().to_vec();
            bytes.extend_from_slice(&body);
            let _ = decode::<super::super::SnapshotState>(&bytes);
            let _ = decode::<Sample>(&bytes);
        });
    }

    #[test]
    fn files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        write_file(&path, &sample()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_file::<Sample>(&path).unwrap(), sample());
        assert!(matches!(
            write_file(&path, &sample()),
            Err(SnapshotError::Io { .. })
        ));
        // An oversized file is refused from its length alone.
        let big = dir.path().join("big.bin");
        let f = File::create(&big).unwrap();
        f.set_len(HEADER_LEN as u64 + MAX_STATE_BODY + 1).unwrap();
        assert!(matches!(
            read_file::<Sample>(&big),
            Err(SnapshotError::OversizedState { .. })
        ));
    }
}
