//! Noise records on async byte streams, and the builders of the three Noise patterns the
//! device speaks (see `shared_proto::credential` for the layout).

use shared_proto::credential::{self, MAX_NOISE_MESSAGE, RECORD_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Reads one record; `Ok(None)` on a clean end of stream before its first byte.
pub async fn read_record<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, NoiseError> {
    let mut prefix = [0u8; RECORD_PREFIX];
    match r.read(&mut prefix[..1]).await.map_err(NoiseError::Io)? {
        0 => return Ok(None),
        _ => r
            .read_exact(&mut prefix[1..])
            .await
            .map_err(|_| NoiseError::Closed)?,
    };
    let len = usize::from(u16::from_be_bytes(prefix));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|_| NoiseError::Closed)?;
    Ok(Some(body))
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
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs.write_message(payload, &mut buf)?;
    write_record(w, &buf[..n]).await
}

/// Reads the next handshake message and returns its payload.
pub async fn read_handshake<R: AsyncRead + Unpin>(
    r: &mut R,
    hs: &mut snow::HandshakeState,
) -> Result<Vec<u8>, NoiseError> {
    let record = read_record(r).await?.ok_or(NoiseError::Closed)?;
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs.read_message(&record, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Encrypts one plaintext into a transport message.
pub fn seal(t: &mut snow::TransportState, plaintext: &[u8]) -> Result<Vec<u8>, NoiseError> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = t.write_message(plaintext, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Decrypts one transport message.
pub fn open(t: &mut snow::TransportState, message: &[u8]) -> Result<Vec<u8>, NoiseError> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = t.read_message(message, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn params(pattern: &str) -> Result<snow::params::NoiseParams, NoiseError> {
    pattern.parse().map_err(NoiseError::Noise)
}

/// The link initiator (the device): KK with the host's pinned key.
pub fn link_initiator(
    local: &[u8; 32],
    host: &[u8; 32],
) -> Result<snow::HandshakeState, NoiseError> {
    Ok(snow::Builder::new(params(credential::NOISE_LINK)?)
        .local_private_key(local)?
        .remote_public_key(host)?
        .prologue(credential::LINK_PROLOGUE)?
        .build_initiator()?)
}

/// The pairing initiator (the device): NNpsk0 with the code's PSK.
pub fn pair_initiator(psk: &[u8; 32]) -> Result<snow::HandshakeState, NoiseError> {
    Ok(snow::Builder::new(params(credential::NOISE_PAIR)?)
        .psk(0, psk)?
        .prologue(credential::PAIR_PROLOGUE)?
        .build_initiator()?)
}

/// The session responder (the device): IK, the prologue binding the VM.
pub fn session_responder(
    local: &[u8; 32],
    prologue: &[u8],
) -> Result<snow::HandshakeState, NoiseError> {
    Ok(snow::Builder::new(params(credential::NOISE_SESSION)?)
        .local_private_key(local)?
        .prologue(prologue)?
        .build_responder()?)
}
