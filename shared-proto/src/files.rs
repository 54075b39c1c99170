//! The file copy channel: tar streams in and out of the agent's root, over vsock
//! [`FILES_PORT`](crate::ports::FILES_PORT).
//!
//! The host connects into the guest and runs **one transfer per connection**, each message one
//! frame of [`crate::frame`]:
//!
//! - **Put** (host to guest): the host sends [`FilesRequest::Put`]; the sidecar answers
//!   [`FilesReply::Ready`] once `dest` is an open directory (created if missing), or
//!   [`FilesReply::Error`]. The host then sends the tar stream as [`FilesRequest::Chunk`]s and
//!   one [`FilesRequest::End`]; the sidecar unpacks it under `dest` and answers
//!   [`FilesReply::Done`] or [`FilesReply::Error`]. An error can come before the host has sent
//!   everything, so the host reads while it sends.
//! - **Get** (guest to host): the host sends [`FilesRequest::Get`]; the sidecar sends a tar of
//!   the file or folder at `path` as [`FilesReply::Chunk`]s, then [`FilesReply::Done`]. An
//!   [`FilesReply::Error`] can come at any point; the chunks before it are not a whole archive.
//!
//! After its last reply the sidecar closes the connection.
//!
//! Every message is checked by [`FilesDecoder`] (and before encoding by [`encode_files_message`]):
//! chunks hold 1 to [`MAX_FILES_CHUNK`] bytes, paths are absolute with no `.` or `..` component
//! and at most [`MAX_PATH_LEN`] bytes, error messages at most [`MAX_ERROR_MESSAGE`] bytes. The
//! fuzz target `files_decoder` feeds the decoder arbitrary bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frame::{FrameDecoder, FrameError, encode_frame};

/// The most bytes one [`FilesRequest::Chunk`] or [`FilesReply::Chunk`] carries.
pub const MAX_FILES_CHUNK: usize = 64 * 1024;
/// The longest `dest` or `path`, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// The longest [`FilesReply::Error`] message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// A message from the host to the sidecar on the file copy channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FilesRequest {
    /// Unpack the tar stream that follows under the directory `dest` of the agent's root.
    Put {
        /// An absolute path inside the agent's root; missing directories are created, owned by
        /// the agent.
        dest: String,
    },
    /// Send a tar of the file or folder at `path` of the agent's root.
    Get {
        /// An absolute path inside the agent's root.
        path: String,
    },
    /// The next bytes of the tar stream of a `Put`.
    Chunk {
        /// 1 to [`MAX_FILES_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The tar stream of a `Put` is complete.
    End,
}

/// A message from the sidecar to the host on the file copy channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FilesReply {
    /// `Put`: the destination is ready; send the tar stream.
    Ready,
    /// `Get`: the next bytes of the tar stream.
    Chunk {
        /// 1 to [`MAX_FILES_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The transfer is complete; the last message of the connection.
    Done {
        /// The length of the tar stream received (`Put`) or sent (`Get`).
        bytes: u64,
        /// The number of archive entries unpacked (`Put`) or archived (`Get`).
        entries: u64,
    },
    /// The transfer failed; the last message of the connection.
    Error {
        /// What kind of failure.
        kind: FilesErrorKind,
        /// A short human-readable reason, at most [`MAX_ERROR_MESSAGE`] bytes.
        message: String,
    },
}

impl FilesReply {
    /// An error reply, its message cut to [`MAX_ERROR_MESSAGE`] bytes on a character
    /// boundary.
    pub fn error(kind: FilesErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self::Error { kind, message }
    }
}

/// Why a transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilesErrorKind {
    /// A message out of order or a request the sidecar cannot parse (such as a tar stream that
    /// is not one).
    BadRequest,
    /// The agent's root is not there: no image root was asked for, or the agent has not been
    /// started yet.
    NotReady,
    /// The path does not exist.
    NotFound,
    /// The path or an archive entry would leave the agent's root or its file system: `..`, an
    /// absolute entry, a symlink on the way, a mount point.
    Refused,
    /// An entry of a type the channel does not carry: device nodes, FIFOs, sockets, hard
    /// links, sparse files; or a folder nested too deep.
    Unsupported,
    /// The tar stream is over the byte cap.
    TooLarge,
    /// The archive has more entries than the cap.
    TooManyEntries,
    /// The agent's disk is full.
    NoSpace,
    /// The file system refused the access.
    PermissionDenied,
    /// Any other I/O failure in the guest.
    Io,
}

/// Errors of the file copy wire.
#[derive(Debug, thiserror::Error)]
pub enum FilesWireError {
    /// The frame itself is bad (size, CBOR, direction).
    #[error("bad frame")]
    Frame(#[source] FrameError),
    /// A chunk carries more than [`MAX_FILES_CHUNK`] bytes.
    #[error("chunk of {0} bytes is over the {MAX_FILES_CHUNK}-byte cap")]
    ChunkTooLarge(usize),
    /// A chunk carries no bytes.
    #[error("empty chunk")]
    EmptyChunk,
    /// A `dest` or `path` breaks the path rules.
    #[error("path is {0}")]
    BadPath(&'static str),
    /// An error message is over [`MAX_ERROR_MESSAGE`] bytes.
    #[error("error message of {0} bytes is over the {MAX_ERROR_MESSAGE}-byte cap")]
    MessageTooLong(usize),
}

/// The size and shape checks of a file copy message, beyond what CBOR decoding checks.
pub trait CheckedMessage {
    /// Whether the message keeps the channel's limits.
    fn check(&self) -> Result<(), FilesWireError>;
}

fn check_chunk(data: &[u8]) -> Result<(), FilesWireError> {
    match data.len() {
        0 => Err(FilesWireError::EmptyChunk),
        n if n > MAX_FILES_CHUNK => Err(FilesWireError::ChunkTooLarge(n)),
        _ => Ok(()),
    }
}

/// Checks a `dest` or `path`: absolute, at most [`MAX_PATH_LEN`] bytes, no NUL, no `.` or `..`
/// component. Repeated and trailing slashes are allowed.
pub fn check_path(path: &str) -> Result<(), FilesWireError> {
    if path.len() > MAX_PATH_LEN {
        return Err(FilesWireError::BadPath("too long"));
    }
    if !path.starts_with('/') {
        return Err(FilesWireError::BadPath("not absolute"));
    }
    if path.contains('\0') {
        return Err(FilesWireError::BadPath("holding a NUL byte"));
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(FilesWireError::BadPath("holding a . or .. component"));
    }
    Ok(())
}

impl CheckedMessage for FilesRequest {
    fn check(&self) -> Result<(), FilesWireError> {
        match self {
            Self::Put { dest: p } | Self::Get { path: p } => check_path(p),
            Self::Chunk { data } => check_chunk(data),
            Self::End => Ok(()),
        }
    }
}

impl CheckedMessage for FilesReply {
    fn check(&self) -> Result<(), FilesWireError> {
        match self {
            Self::Chunk { data } => check_chunk(data),
            Self::Error { message, .. } if message.len() > MAX_ERROR_MESSAGE => {
                Err(FilesWireError::MessageTooLong(message.len()))
            }
            Self::Ready | Self::Done { .. } | Self::Error { .. } => Ok(()),
        }
    }
}

/// Encodes a checked message as one frame.
pub fn encode_files_message<T>(msg: &T) -> Result<Vec<u8>, FilesWireError>
where
    T: Serialize + CheckedMessage,
{
    msg.check()?;
    encode_frame(msg).map_err(FilesWireError::Frame)
}

/// The incremental decoder of one direction of the file copy channel: frames, then the checks
/// of [`CheckedMessage`]. `Ok(None)` means more bytes are needed; after an error the stream is
/// out of step and the caller drops the connection.
#[derive(Debug)]
pub struct FilesDecoder<T> {
    frames: FrameDecoder<T>,
}

impl<T> Default for FilesDecoder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> FilesDecoder<T> {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            frames: FrameDecoder::new(),
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// The number of buffered bytes not yet decoded.
    pub fn pending(&self) -> usize {
        self.frames.pending()
    }
}

impl<T: DeserializeOwned + CheckedMessage> FilesDecoder<T> {
    /// Decodes and checks the next whole message, or answers `Ok(None)` when more bytes are
    /// needed.
    pub fn decode_next(&mut self) -> Result<Option<T>, FilesWireError> {
        let Some(msg) = self.frames.decode_next().map_err(FilesWireError::Frame)? else {
            return Ok(None);
        };
        msg.check()?;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::MAX_FRAME_LEN;
    use proptest::prelude::*;

    fn decode<T: DeserializeOwned + CheckedMessage>(
        bytes: &[u8],
    ) -> Result<Option<T>, FilesWireError> {
        let mut d = FilesDecoder::<T>::new();
        d.push(bytes);
        d.decode_next()
    }

    fn any_path() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9_ -]{1,12}", 0..6)
            .prop_map(|parts| format!("/{}", parts.join("/")))
    }

    fn any_chunk() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 1..256)
    }

    fn any_kind() -> impl Strategy<Value = FilesErrorKind> {
        prop_oneof![
            Just(FilesErrorKind::BadRequest),
            Just(FilesErrorKind::NotReady),
            Just(FilesErrorKind::NotFound),
            Just(FilesErrorKind::Refused),
            Just(FilesErrorKind::Unsupported),
            Just(FilesErrorKind::TooLarge),
            Just(FilesErrorKind::TooManyEntries),
            Just(FilesErrorKind::NoSpace),
            Just(FilesErrorKind::PermissionDenied),
            Just(FilesErrorKind::Io),
        ]
    }

    fn any_request() -> impl Strategy<Value = FilesRequest> {
        prop_oneof![
            any_path().prop_map(|dest| FilesRequest::Put { dest }),
            any_path().prop_map(|path| FilesRequest::Get { path }),
            any_chunk().prop_map(|data| FilesRequest::Chunk { data }),
            Just(FilesRequest::End),
        ]
    }

    fn any_reply() -> impl Strategy<Value = FilesReply> {
        prop_oneof![
            Just(FilesReply::Ready),
            any_chunk().prop_map(|data| FilesReply::Chunk { data }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(bytes, entries)| FilesReply::Done { bytes, entries }),
            (any_kind(), "\\PC{0,32}")
                .prop_map(|(kind, message)| FilesReply::Error { kind, message }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(msg in any_request()) {
            let frame = encode_files_message(&msg).unwrap();
            prop_assert_eq!(decode::<FilesRequest>(&frame).unwrap(), Some(msg));
        }

        #[test]
        fn replies_round_trip(msg in any_reply()) {
            let frame = encode_files_message(&msg).unwrap();
            prop_assert_eq!(decode::<FilesReply>(&frame).unwrap(), Some(msg));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = FilesDecoder::<FilesRequest>::new();
            r.push(&bytes);
            while let Ok(Some(_)) = r.decode_next() {}
            let mut g = FilesDecoder::<FilesReply>::new();
            g.push(&bytes);
            while let Ok(Some(_)) = g.decode_next() {}
        }
    }

    #[test]
    fn a_chunk_at_the_cap_passes_and_one_byte_over_is_refused_both_ways() {
        let at_cap = FilesRequest::Chunk {
            data: vec![1; MAX_FILES_CHUNK],
        };
        let frame = encode_files_message(&at_cap).unwrap();
        assert_eq!(decode::<FilesRequest>(&frame).unwrap(), Some(at_cap));

        let over = FilesReply::Chunk {
            data: vec![1; MAX_FILES_CHUNK + 1],
        };
        assert!(matches!(
            encode_files_message(&over),
            Err(FilesWireError::ChunkTooLarge(n)) if n == MAX_FILES_CHUNK + 1
        ));
        // A peer that skips the check is refused on decode, although the frame is well under
        // the frame cap.
        let frame = encode_frame(&over).unwrap();
        assert!(frame.len() < MAX_FRAME_LEN);
        assert!(matches!(
            decode::<FilesReply>(&frame),
            Err(FilesWireError::ChunkTooLarge(_))
        ));
        let empty = encode_frame(&FilesRequest::Chunk { data: Vec::new() }).unwrap();
        assert!(matches!(
            decode::<FilesRequest>(&empty),
            Err(FilesWireError::EmptyChunk)
        ));
    }

    #[test]
    fn bad_paths_are_refused_on_decode() {
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        for (path, why) in [
            ("", "not absolute"),
            ("etc/passwd", "not absolute"),
            ("/work/../etc", "holding a . or .. component"),
            ("/work/./x", "holding a . or .. component"),
            ("/..", "holding a . or .. component"),
            ("/a\0b", "holding a NUL byte"),
            (long.as_str(), "too long"),
        ] {
            let frame = encode_frame(&FilesRequest::Get { path: path.into() }).unwrap();
            match decode::<FilesRequest>(&frame) {
                Err(FilesWireError::BadPath(reason)) => assert_eq!(reason, why, "{path:?}"),
                other => panic!("{path:?}: {other:?}"),
            }
        }
        for good in ["/", "/workspace", "/workspace/", "//a//b", "/a/.hidden/..x"] {
            assert_eq!(check_path(good).ok(), Some(()), "{good:?}");
        }
    }

    #[test]
    fn error_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let FilesReply::Error { message, .. } = FilesReply::error(FilesErrorKind::Io, long) else {
            panic!("not an error");
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE);
        assert!(message.len() >= MAX_ERROR_MESSAGE - 1);
        let too_long = FilesReply::Error {
            kind: FilesErrorKind::Io,
            message: "x".repeat(MAX_ERROR_MESSAGE + 1),
        };
        let frame = encode_frame(&too_long).unwrap();
        assert!(matches!(
            decode::<FilesReply>(&frame),
            Err(FilesWireError::MessageTooLong(_))
        ));
    }

    #[test]
    fn the_wrong_direction_and_old_frames_are_frame_errors() {
        let frame = encode_files_message(&FilesRequest::End).unwrap();
        assert!(matches!(
            decode::<FilesReply>(&frame),
            Err(FilesWireError::Frame(FrameError::Malformed(_)))
        ));
        let control = encode_frame(&crate::message::HostToGuest::Shutdown).unwrap();
        assert!(matches!(
            decode::<FilesRequest>(&control),
            Err(FilesWireError::Frame(_))
        ));
        // The kind travels as its snake_case name.
        let frame =
            encode_files_message(&FilesReply::error(FilesErrorKind::NoSpace, "full")).unwrap();
        assert!(frame.windows(8).any(|w| w == b"no_space"));
    }

    #[test]
    fn a_reply_split_anywhere_is_incomplete_until_whole() {
        let msg = FilesReply::Done {
            bytes: 10240,
            entries: 3,
        };
        let frame = encode_files_message(&msg).unwrap();
        for cut in 0..frame.len() {
            let mut d = FilesDecoder::<FilesReply>::new();
            d.push(&frame[..cut]);
            assert!(matches!(d.decode_next(), Ok(None)));
            d.push(&frame[cut..]);
            assert_eq!(d.decode_next().unwrap(), Some(msg.clone()));
            assert_eq!(d.pending(), 0);
        }
    }
}
