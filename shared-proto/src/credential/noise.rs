//! The Noise handshakes of the credential channels, built in one place, and the steps every
//! end takes with them.
//!
//! Each channel has one pattern ([`super::NOISE_LINK`], [`super::NOISE_PAIR`],
//! [`super::NOISE_SESSION`]) and one prologue, and each end one builder here: the device and
//! the relay build the link and pairing handshakes, the sidecar and the device the session.
//! [`write_handshake`], [`read_handshake`], [`seal`] and [`open`] move one message through
//! `snow` without the callers sizing buffers. Nothing here does I/O; the messages travel as
//! records ([`super::RecordDecoder`], [`super::encode_record`]).

use snow::{Builder, HandshakeState, TransportState};

use super::{
    LINK_PROLOGUE, MAX_NOISE_MESSAGE, NOISE_LINK, NOISE_PAIR, NOISE_SESSION, NOISE_TAG,
    PAIR_PROLOGUE, RECORD_PREFIX,
};

fn builder(pattern: &str) -> Result<Builder<'static>, snow::Error> {
    Ok(Builder::new(pattern.parse()?))
}

/// The link initiator (the device): KK, its identity key and the host's pinned key.
pub fn link_initiator(local: &[u8; 32], host: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_LINK)?
        .local_private_key(local)?
        .remote_public_key(host)?
        .prologue(LINK_PROLOGUE)?
        .build_initiator()
}

/// The link responder (the relay): KK, the host's key and the paired device's pinned key.
pub fn link_responder(local: &[u8; 32], device: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_LINK)?
        .local_private_key(local)?
        .remote_public_key(device)?
        .prologue(LINK_PROLOGUE)?
        .build_responder()
}

/// The pairing initiator (the device): NNpsk0 with the code's PSK.
pub fn pair_initiator(psk: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_PAIR)?
        .psk(0, psk)?
        .prologue(PAIR_PROLOGUE)?
        .build_initiator()
}

/// The pairing responder (the relay): NNpsk0 with the code's PSK.
pub fn pair_responder(psk: &[u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_PAIR)?
        .psk(0, psk)?
        .prologue(PAIR_PROLOGUE)?
        .build_responder()
}

/// The session initiator (the sidecar): IK, its boot key, the device key the relay announced,
/// and the prologue binding the VM ([`super::session_prologue`]).
pub fn session_initiator(
    local: &[u8; 32],
    device: &[u8; 32],
    prologue: &[u8],
) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_SESSION)?
        .local_private_key(local)?
        .remote_public_key(device)?
        .prologue(prologue)?
        .build_initiator()
}

/// The session responder (the device): IK, its identity key and the prologue binding the VM.
pub fn session_responder(local: &[u8; 32], prologue: &[u8]) -> Result<HandshakeState, snow::Error> {
    builder(NOISE_SESSION)?
        .local_private_key(local)?
        .prologue(prologue)?
        .build_responder()
}

/// The next handshake message, carrying `payload`.
pub fn write_handshake(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs.write_message(payload, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads the peer's next handshake message and returns its payload.
pub fn read_handshake(hs: &mut HandshakeState, message: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = hs.read_message(message, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Encrypts one plaintext into a transport message.
pub fn seal(t: &mut TransportState, plaintext: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = t.write_message(plaintext, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Decrypts one transport message.
pub fn open(t: &mut TransportState, message: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let n = t.read_message(message, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Encrypts one plaintext and appends it to `out` as a record (length prefix, then the
/// transport message), sealing straight into `out` rather than through a scratch message.
pub fn seal_record(
    t: &mut TransportState,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), snow::Error> {
    let len = plaintext.len() + NOISE_TAG;
    let Ok(prefix) = u16::try_from(len) else {
        return Err(snow::Error::Input);
    };
    let at = out.len();
    out.extend_from_slice(&prefix.to_be_bytes());
    out.resize(at + RECORD_PREFIX + len, 0);
    match t.write_message(plaintext, &mut out[at + RECORD_PREFIX..]) {
        Ok(n) if n == len => Ok(()),
        Ok(_) => {
            out.truncate(at);
            Err(snow::Error::Input)
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

/// Decrypts one transport message into `scratch`, which is kept between calls so that a
/// stream of messages reuses one buffer; returns the plaintext, borrowed from it.
pub fn open_in<'a>(
    t: &mut TransportState,
    message: &[u8],
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], snow::Error> {
    if scratch.len() < message.len() {
        scratch.resize(message.len(), 0);
    }
    let n = t.read_message(message, scratch)?;
    Ok(&scratch[..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::session_prologue;
    use x25519_dalek::{PublicKey, StaticSecret};

    fn key(seed: u8) -> ([u8; 32], [u8; 32]) {
        let secret = StaticSecret::from([seed; 32]);
        (secret.to_bytes(), PublicKey::from(&secret).to_bytes())
    }

    /// Runs a two- or three-message handshake, then one transport message each way.
    fn talk(mut i: HandshakeState, mut r: HandshakeState) -> Result<(), snow::Error> {
        let m1 = write_handshake(&mut i, b"one")?;
        assert_eq!(read_handshake(&mut r, &m1)?, b"one");
        let m2 = write_handshake(&mut r, b"two")?;
        assert_eq!(read_handshake(&mut i, &m2)?, b"two");
        let (mut i, mut r) = (i.into_transport_mode()?, r.into_transport_mode()?);
        let c = seal(&mut i, b"ping")?;
        assert_eq!(open(&mut r, &c)?, b"ping");
        let c = seal(&mut r, b"pong")?;
        assert_eq!(open(&mut i, &c)?, b"pong");
        Ok(())
    }

    #[test]
    fn each_channel_pairs_its_builders() {
        let (device, device_pub) = key(1);
        let (host, host_pub) = key(2);
        talk(
            link_initiator(&device, &host_pub).unwrap(),
            link_responder(&host, &device_pub).unwrap(),
        )
        .unwrap();
        talk(
            pair_initiator(&[9; 32]).unwrap(),
            pair_responder(&[9; 32]).unwrap(),
        )
        .unwrap();
        let prologue = session_prologue("vm-1", &[3; 16]).unwrap();
        let (sidecar, sidecar_pub) = key(3);
        let mut r = session_responder(&device, &prologue).unwrap();
        talk(
            session_initiator(&sidecar, &device_pub, &prologue).unwrap(),
            session_responder(&device, &prologue).unwrap(),
        )
        .unwrap();
        // The device learns the sidecar's key in the first message.
        let mut i = session_initiator(&sidecar, &device_pub, &prologue).unwrap();
        read_handshake(&mut r, &write_handshake(&mut i, &[]).unwrap()).unwrap();
        assert_eq!(r.get_remote_static(), Some(&sidecar_pub[..]));
    }

    #[test]
    fn records_sealed_in_place_open_with_a_kept_buffer() {
        let (device, device_pub) = key(1);
        let (host, host_pub) = key(2);
        let mut i = link_initiator(&device, &host_pub).unwrap();
        let mut r = link_responder(&host, &device_pub).unwrap();
        read_handshake(&mut r, &write_handshake(&mut i, &[]).unwrap()).unwrap();
        read_handshake(&mut i, &write_handshake(&mut r, &[]).unwrap()).unwrap();
        let (mut i, mut r) = (
            i.into_transport_mode().unwrap(),
            r.into_transport_mode().unwrap(),
        );
        let big = vec![5u8; MAX_NOISE_MESSAGE - NOISE_TAG];
        let mut stream = b"x".to_vec();
        seal_record(&mut i, b"first", &mut stream).unwrap();
        seal_record(&mut i, &big, &mut stream).unwrap();
        // One byte too many for a Noise message: refused, and nothing is appended.
        let before = stream.len();
        assert!(seal_record(&mut i, &[0; MAX_NOISE_MESSAGE - NOISE_TAG + 1], &mut stream).is_err());
        assert_eq!(stream.len(), before);
        let mut records = crate::credential::RecordDecoder::new();
        records.push(&stream[1..]);
        let mut scratch = Vec::new();
        let first = records.next_record().unwrap().unwrap().to_vec();
        assert_eq!(open_in(&mut r, &first, &mut scratch).unwrap(), b"first");
        let second = records.next_record().unwrap().unwrap().to_vec();
        assert_eq!(open_in(&mut r, &second, &mut scratch).unwrap(), &big[..]);
        // A forged message fails, the buffer kept.
        let mut forged = Vec::new();
        seal_record(&mut i, b"third", &mut forged).unwrap();
        forged[4] ^= 1;
        assert!(open_in(&mut r, &forged[RECORD_PREFIX..], &mut scratch).is_err());
    }

    #[test]
    fn a_wrong_key_code_or_prologue_fails_the_handshake() {
        let (device, _) = key(1);
        let (host, host_pub) = key(2);
        let (_, other_pub) = key(4);
        assert!(
            talk(
                link_initiator(&device, &host_pub).unwrap(),
                link_responder(&host, &other_pub).unwrap(),
            )
            .is_err()
        );
        assert!(
            talk(
                pair_initiator(&[9; 32]).unwrap(),
                pair_responder(&[8; 32]).unwrap()
            )
            .is_err()
        );
        let (_, device_pub) = key(1);
        let (sidecar, _) = key(3);
        let a = session_prologue("vm-1", &[3; 16]).unwrap();
        let b = session_prologue("vm-2", &[3; 16]).unwrap();
        assert!(
            talk(
                session_initiator(&sidecar, &device_pub, &a).unwrap(),
                session_responder(&device, &b).unwrap(),
            )
            .is_err()
        );
    }
}
