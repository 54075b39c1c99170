//! Records: how every Noise message travels on a byte stream, a 2-byte big-endian length and
//! then that many bytes.
//!
//! [`RecordDecoder`] is the one reader of records in the workspace, shaped like
//! [`crate::frame::FrameDecoder`]: push whatever bytes arrived, then call
//! [`RecordDecoder::decode_next`] until it answers `Ok(None)` (not enough bytes yet, a normal
//! answer). It never panics and never sizes a buffer from a length prefix; a record longer
//! than its cap is refused as soon as the prefix is seen. The I/O around it (a blocking socket
//! in the sidecar, tokio streams in the relay and the device, a channel of relayed byte runs
//! in the device's sessions) is a loop of a few lines at each edge.

use super::{CredentialError, MAX_NOISE_MESSAGE};

/// The size of a record's length prefix.
pub const RECORD_PREFIX: usize = 2;

/// Appends `body` as one record to `out`.
pub fn encode_record(body: &[u8], out: &mut Vec<u8>) -> Result<(), CredentialError> {
    let len = u16::try_from(body.len()).map_err(|_| CredentialError::RecordTooLarge(body.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// An incremental record decoder for one direction of a byte stream.
#[derive(Debug)]
pub struct RecordDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed by decoded records; compacted lazily.
    start: usize,
    /// The longest record body accepted.
    max: usize,
}

impl Default for RecordDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordDecoder {
    /// An empty decoder that accepts records up to [`MAX_NOISE_MESSAGE`] bytes (the Noise
    /// limit, and the most a 2-byte prefix can announce).
    pub fn new() -> Self {
        Self::with_max(MAX_NOISE_MESSAGE)
    }

    /// An empty decoder that refuses records longer than `max` bytes.
    pub fn with_max(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
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

    /// The number of buffered bytes not yet decoded. At the end of the stream, zero means it
    /// ended between records and anything else that it ended inside one.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The body of the next whole record, or `Ok(None)` when more bytes are needed.
    ///
    /// After an error the stream is out of step and the caller should drop the connection.
    pub fn decode_next(&mut self) -> Result<Option<Vec<u8>>, CredentialError> {
        Ok(self.next_record()?.map(<[u8]>::to_vec))
    }

    /// Whether a whole record is buffered (so that [`Self::next_record`] answers it); an error
    /// as soon as a length prefix over the cap is seen.
    pub fn has_record(&self) -> Result<bool, CredentialError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.first_chunk::<RECORD_PREFIX>() else {
            return Ok(false);
        };
        let len = usize::from(u16::from_be_bytes(*prefix));
        if len > self.max {
            return Err(CredentialError::RecordTooLarge(len));
        }
        Ok(rest.len() >= RECORD_PREFIX + len)
    }

    /// Like [`Self::decode_next`], but borrows the record's body from the decoder's buffer
    /// instead of copying it out (valid until the next call on the decoder).
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, CredentialError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.first_chunk::<RECORD_PREFIX>() else {
            self.compact();
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes(*prefix));
        if len > self.max {
            return Err(CredentialError::RecordTooLarge(len));
        }
        if rest.len() < RECORD_PREFIX + len {
            self.compact();
            return Ok(None);
        }
        let at = self.start + RECORD_PREFIX;
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_split_and_join() {
        let mut out = Vec::new();
        encode_record(b"hello", &mut out).unwrap();
        encode_record(b"", &mut out).unwrap();
        let mut d = RecordDecoder::new();
        d.push(&out[..3]);
        assert_eq!(d.decode_next().unwrap(), None);
        assert!(!d.has_record().unwrap());
        assert_eq!(d.pending(), 3);
        d.push(&out[3..]);
        assert!(d.has_record().unwrap());
        assert_eq!(d.decode_next().unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(d.next_record().unwrap(), Some(&b""[..]));
        assert!(!d.has_record().unwrap());
        assert_eq!(d.decode_next().unwrap(), None);
        assert_eq!(d.pending(), 0);
        assert!(matches!(
            encode_record(&vec![0; MAX_NOISE_MESSAGE + 1], &mut out),
            Err(CredentialError::RecordTooLarge(_))
        ));
    }

    #[test]
    fn the_largest_record_passes_and_a_cap_refuses_from_the_prefix() {
        let mut out = Vec::new();
        encode_record(&vec![7; MAX_NOISE_MESSAGE], &mut out).unwrap();
        let mut d = RecordDecoder::new();
        d.push(&out);
        assert_eq!(d.decode_next().unwrap().unwrap().len(), MAX_NOISE_MESSAGE);

        let mut d = RecordDecoder::with_max(16);
        d.push(&17u16.to_be_bytes());
        assert!(matches!(
            d.has_record(),
            Err(CredentialError::RecordTooLarge(17))
        ));
        assert!(matches!(
            d.decode_next(),
            Err(CredentialError::RecordTooLarge(17))
        ));
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_records(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..16),
        ) {
            let mut stream = Vec::new();
            for b in &bodies {
                encode_record(b, &mut stream).unwrap();
            }
            let mut d = RecordDecoder::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at((*cut).min(rest.len()));
                rest = tail;
                d.push(piece);
                while let Some(r) = d.decode_next().unwrap() {
                    got.push(r);
                }
            }
            prop_assert_eq!(got, bodies);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = RecordDecoder::with_max(64);
            d.push(&bytes);
            while let Ok(Some(_)) = d.decode_next() {}
        }
    }
}
