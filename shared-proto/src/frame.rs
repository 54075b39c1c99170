//! Length-prefixed CBOR frames.
//!
//! A frame is a 4-byte big-endian body length followed by exactly one CBOR value of that many
//! bytes. A body longer than [`MAX_FRAME_LEN`] is refused as soon as its length prefix is seen,
//! before any buffer is sized for it, and a body that does not decode to exactly one value of
//! the expected type is [`FrameError::Malformed`] or [`FrameError::TrailingBytes`].
//!
//! [`FrameDecoder`] is the incremental decoder for byte streams: push whatever bytes arrived,
//! then call [`FrameDecoder::decode_next`] until it answers `Ok(None)` (not enough bytes yet). An
//! error desynchronises the stream, so the caller drops the connection.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame body accepted or produced, in bytes (1 MiB). Senders split bulk data
/// (agent output, stdin) into smaller messages.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// The size of the length prefix, in bytes.
pub const LEN_PREFIX: usize = 4;

/// Errors of framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces a body over [`MAX_FRAME_LEN`].
    #[error("frame body of {len} bytes exceeds the {max}-byte cap")]
    TooLarge {
        /// The announced (or, when encoding, the actual) body length.
        len: u64,
        /// The cap, [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The body is not one valid CBOR value of the expected message type.
    #[error("malformed frame body")]
    Malformed(#[source] ciborium::de::Error<std::io::Error>),
    /// The body holds a valid message followed by extra bytes.
    #[error("{0} trailing bytes after the message in the frame body")]
    TrailingBytes(usize),
    /// Serialising a message failed.
    #[error("cannot encode message")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
}

/// Encodes `msg` as one frame (length prefix and CBOR body) appended to `out`.
///
/// On error `out` is left as it was.
pub fn encode_frame_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    if let Err(e) = ciborium::into_writer(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let body_len = out.len() - start - LEN_PREFIX;
    if body_len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: body_len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    // Fits: MAX_FRAME_LEN < u32::MAX.
    let prefix = (body_len as u32).to_be_bytes();
    out[start..start + LEN_PREFIX].copy_from_slice(&prefix);
    Ok(())
}

/// Encodes `msg` as one frame (length prefix and CBOR body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Decodes the first frame of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and otherwise the message with
/// the number of bytes it used. Checks the cap from the prefix alone, so an oversize frame is
/// refused even when only its first four bytes have arrived.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    let Some(body) = buf[LEN_PREFIX..].get(..len_usize) else {
        return Ok(None);
    };
    let mut rest = body;
    let msg = ciborium::from_reader(&mut rest).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(Some((msg, LEN_PREFIX + len_usize)))
}

/// An incremental frame decoder for one direction of a byte stream.
///
/// It buffers only bytes that actually arrived; it never reserves room for a declared length.
#[derive(Debug)]
pub struct FrameDecoder<T> {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed by decoded frames; compacted lazily.
    start: usize,
    _msg: PhantomData<fn() -> T>,
}

impl<T> Default for FrameDecoder<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> FrameDecoder<T> {
    /// Creates an empty decoder.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            _msg: PhantomData,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The number of buffered bytes not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

impl<T: DeserializeOwned> FrameDecoder<T> {
    /// Decodes the next whole frame, or answers `Ok(None)` when more bytes are needed.
    ///
    /// After an error the stream is out of step and the caller should drop the connection.
    pub fn decode_next(&mut self) -> Result<Option<T>, FrameError> {
        match decode_frame(&self.buf[self.start..])? {
            None => {
                if self.start > 0 {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                Ok(None)
            }
            Some((msg, used)) => {
                self.start += used;
                Ok(Some(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{GuestToHost, HostToGuest};
    use proptest::prelude::*;

    #[test]
    fn oversize_prefix_is_refused_from_four_bytes() {
        let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        let mut d = FrameDecoder::<HostToGuest>::new();
        d.push(&len);
        match d.decode_next() {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME_LEN as u64 + 1);
                assert_eq!(max, MAX_FRAME_LEN);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // A 4 GiB declared length is refused the same way; nothing is sized for it.
        let r = decode_frame::<GuestToHost>(&u32::MAX.to_be_bytes());
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn frame_at_the_cap_is_accepted_and_one_byte_over_is_not() {
        let data = vec![7u8; MAX_FRAME_LEN - 64];
        let msg = HostToGuest::AgentStdin { data };
        let frame = encode_frame(&msg).unwrap();
        assert!(frame.len() - LEN_PREFIX <= MAX_FRAME_LEN);
        let (back, used) = decode_frame::<HostToGuest>(&frame).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, frame.len());

        let too_big = HostToGuest::AgentStdin {
            data: vec![7u8; MAX_FRAME_LEN],
        };
        assert!(matches!(
            encode_frame(&too_big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_body_is_malformed_and_trailing_bytes_are_refused() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode_frame::<HostToGuest>(&buf),
            Err(FrameError::Malformed(_))
        ));

        let mut frame = encode_frame(&HostToGuest::Shutdown).unwrap();
        let body_len = frame.len() - LEN_PREFIX + 1;
        frame[..LEN_PREFIX].copy_from_slice(&(body_len as u32).to_be_bytes());
        frame.push(0x00);
        assert!(matches!(
            decode_frame::<HostToGuest>(&frame),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn the_wrong_direction_is_malformed() {
        let frame = encode_frame(&HostToGuest::Shutdown).unwrap();
        assert!(matches!(
            decode_frame::<GuestToHost>(&frame),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn decoder_yields_several_frames_from_one_push_then_waits() {
        let a = HostToGuest::Signal { signo: 15 };
        let b = HostToGuest::EchoConnect { port: 4000 };
        let mut bytes = encode_frame(&a).unwrap();
        bytes.extend(encode_frame(&b).unwrap());
        let tail = encode_frame(&HostToGuest::Shutdown).unwrap();
        bytes.extend_from_slice(&tail[..3]);

        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(d.decode_next().unwrap(), Some(a));
        assert_eq!(d.decode_next().unwrap(), Some(b));
        assert_eq!(d.decode_next().unwrap(), None);
        assert_eq!(d.pending(), 3);
        d.push(&tail[3..]);
        assert_eq!(d.decode_next().unwrap(), Some(HostToGuest::Shutdown));
        assert_eq!(d.decode_next().unwrap(), None);
        assert_eq!(d.pending(), 0);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut h = FrameDecoder::<HostToGuest>::new();
            h.push(&bytes);
            while let Ok(Some(_)) = h.decode_next() {}
            let mut g = FrameDecoder::<GuestToHost>::new();
            g.push(&bytes);
            while let Ok(Some(_)) = g.decode_next() {}
        }

        #[test]
        fn arbitrary_body_behind_a_valid_prefix_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut buf = (body.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            let _ = decode_frame::<HostToGuest>(&buf);
            let _ = decode_frame::<GuestToHost>(&buf);
        }

        #[test]
        fn every_truncation_is_incomplete(msg in crate::message::tests::any_guest_to_host()) {
            let frame = encode_frame(&msg).unwrap();
            for cut in 0..frame.len() {
                let mut d = FrameDecoder::<GuestToHost>::new();
                d.push(&frame[..cut]);
                prop_assert!(matches!(d.decode_next(), Ok(None)));
                d.push(&frame[cut..]);
                prop_assert_eq!(d.decode_next().unwrap(), Some(msg.clone()));
            }
        }

        #[test]
        fn oversize_prefix_is_too_large(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
            prop_assert!(
                matches!(
                    decode_frame::<HostToGuest>(&len.to_be_bytes()),
                    Err(FrameError::TooLarge { .. })
                ),
                "expected TooLarge"
            );
        }
    }
}
