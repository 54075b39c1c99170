//! The device's Noise layer: records on its async byte streams (the link to the host and
//! pairing), over the shared record decoder, and the shared builders of its three handshakes
//! (see `shared_proto::credential` for the layout).

use shared_proto::credential::{self, RECORD_PREFIX, RecordDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use shared_proto::credential::noise::{
    link_initiator, open, open_in, pair_initiator, seal, seal_record, session_responder,
};

/// How much is read from a stream at once: a record of the largest size.
const READ_CHUNK: usize = 64 * 1024;

/// Errors of the Noise layer.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    /// The stream failed.
    #[error("stream")]
    Io(#[source] std::io::Error),
    /// The peer closed the stream in the middle of a handshake or record.
    #[error("the peer closed the connection")]
    Closed,
    /// A Noise operation failed: a bad key, a failed handshake or a forged message.
    #[error("noise")]
    Noise(#[source] snow::Error),
    /// A message did not decode or validate.
    #[error("message")]
    Wire(#[source] credential::CredentialError),
    /// The peer's static key is not the pinned one.
    #[error("the peer's static key is not the expected one")]
    UnexpectedPeer,
}

impl From<snow::Error> for NoiseError {
    fn from(e: snow::Error) -> Self {
        Self::Noise(e)
    }
}

impl From<credential::CredentialError> for NoiseError {
    fn from(e: credential::CredentialError) -> Self {
        Self::Wire(e)
    }
}

/// The records arriving on one stream: the shared decoder over an async reader.
#[derive(Debug)]
pub struct RecordReader<R> {
    inner: R,
    decoder: RecordDecoder,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// Reads records from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: RecordDecoder::new(),
            scratch: vec![0u8; READ_CHUNK],
        }
    }

    /// The next record; `Ok(None)` on a clean end of stream between records.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, NoiseError> {
        loop {
            if let Some(record) = self.decoder.decode_next()? {
                return Ok(Some(record));
            }
            let n = self
                .inner
                .read(&mut self.scratch)
                .await
                .map_err(NoiseError::Io)?;
            if n == 0 {
                return match self.decoder.pending() {
                    0 => Ok(None),
                    _ => Err(NoiseError::Closed),
                };
            }
            self.decoder.push(&self.scratch[..n]);
        }
    }
}

/// Writes one record.
pub async fn write_record<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), NoiseError> {
    let mut out = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut out)?;
    w.write_all(&out).await.map_err(NoiseError::Io)?;
    w.flush().await.map_err(NoiseError::Io)
}

/// Writes the next handshake message (with `payload`) as a record.
pub async fn write_handshake<W: AsyncWrite + Unpin>(
    w: &mut W,
    hs: &mut snow::HandshakeState,
    payload: &[u8],
) -> Result<(), NoiseError> {
    let message = credential::noise::write_handshake(hs, payload)?;
    write_record(w, &message).await
}

/// Reads the next handshake message and returns its payload.
pub async fn read_handshake<R: AsyncRead + Unpin>(
    r: &mut RecordReader<R>,
    hs: &mut snow::HandshakeState,
) -> Result<Vec<u8>, NoiseError> {
    let record = r.next().await?.ok_or(NoiseError::Closed)?;
    Ok(credential::noise::read_handshake(hs, &record)?)
}
