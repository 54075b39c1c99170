//! The bulk messages without a general CBOR pass: a session's `Body` (either direction) and the
//! link's `Data` (either direction) are most of the bytes on the credential path, and each is a
//! fixed CBOR shape around one byte string.
//!
//! The encoders write exactly the bytes [`super::encode_message`] writes for the same message
//! (the shortest CBOR heads, fields in declaration order), straight from a borrowed slice. The
//! readers recognise exactly that encoding and borrow the byte string from the plaintext,
//! applying the same limits as [`super::Validate`]; anything else (another message, or the same
//! one encoded some other legal way) answers `None`, and the caller decodes it with
//! [`super::decode_message`]. So the wire is unchanged, and a reader that answers `Some` agrees
//! with the general decoder (the unit tests and the `credential_decode` fuzz target check so).

use super::{MAX_CHUNK, MAX_LINK_DATA};

/// The CBOR head of an externally tagged variant holding one value: a map of one entry whose
/// key is the variant's name (a text string of 4 bytes).
const fn variant_head(name: &[u8; 4]) -> [u8; 6] {
    [0xa1, 0x64, name[0], name[1], name[2], name[3]]
}

const BODY: [u8; 6] = variant_head(b"Body");
const DATA: [u8; 6] = variant_head(b"Data");
/// `Data`'s fields: a map of two, the first key `session`.
const SESSION: &[u8] = b"\xa2\x67session";
/// The second key, `bytes`.
const BYTES: &[u8] = b"\x65bytes";

/// Appends the shortest CBOR head of major type `major` and argument `n`.
fn put_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[m | 24, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Reads a CBOR head of major type `major` in its shortest form: its argument and the rest.
fn take_head(bytes: &[u8], major: u8) -> Option<(u64, &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    if first >> 5 != major {
        return None;
    }
    let (n, rest, least) = match first & 0x1f {
        n @ 0..24 => return Some((u64::from(n), rest)),
        24 => {
            let (b, rest) = rest.split_first_chunk::<1>()?;
            (u64::from(b[0]), rest, 24)
        }
        25 => {
            let (b, rest) = rest.split_first_chunk::<2>()?;
            (u64::from(u16::from_be_bytes(*b)), rest, 0x100)
        }
        26 => {
            let (b, rest) = rest.split_first_chunk::<4>()?;
            (u64::from(u32::from_be_bytes(*b)), rest, 0x1_0000)
        }
        27 => {
            let (b, rest) = rest.split_first_chunk::<8>()?;
            (u64::from_be_bytes(*b), rest, 0x1_0000_0000)
        }
        _ => return None,
    };
    (n >= least).then_some((n, rest))
}

/// A byte string that is the whole of `bytes`, at most `max` long.
fn whole_bstr(bytes: &[u8], max: usize) -> Option<&[u8]> {
    let (len, rest) = take_head(bytes, 2)?;
    (usize::try_from(len).ok()? == rest.len() && rest.len() <= max).then_some(rest)
}

/// Appends the CBOR of `Body(bytes)` ([`super::SidecarToDevice::Body`] and
/// [`super::DeviceToSidecar::Body`] encode alike).
pub fn encode_body(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(BODY.len() + 5 + bytes.len());
    out.extend_from_slice(&BODY);
    put_head(out, 2, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The bytes of a `Body` message ([`super::SidecarToDevice::Body`] or
/// [`super::DeviceToSidecar::Body`]) when `plain` is one in the form [`encode_body`] writes,
/// and valid (at most [`MAX_CHUNK`] bytes).
pub fn body_bytes(plain: &[u8]) -> Option<&[u8]> {
    whole_bstr(plain.strip_prefix(&BODY)?, MAX_CHUNK)
}

/// Appends the CBOR of a link `Data { session, bytes }` ([`super::HostToDevice::Data`] and
/// [`super::DeviceToHost::Data`] encode alike).
pub fn encode_link_data(session: u64, bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(DATA.len() + SESSION.len() + 9 + BYTES.len() + 5 + bytes.len());
    out.extend_from_slice(&DATA);
    out.extend_from_slice(SESSION);
    put_head(out, 0, session);
    out.extend_from_slice(BYTES);
    put_head(out, 2, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The session and bytes of a link `Data` message when `plain` is one in the form
/// [`encode_link_data`] writes, and valid (at most [`MAX_LINK_DATA`] bytes).
pub fn link_data(plain: &[u8]) -> Option<(u64, &[u8])> {
    let rest = plain.strip_prefix(&DATA)?.strip_prefix(SESSION)?;
    let (session, rest) = take_head(rest, 0)?;
    let bytes = whole_bstr(rest.strip_prefix(BYTES)?, MAX_LINK_DATA)?;
    Some((session, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{
        DeviceToHost, DeviceToSidecar, HostToDevice, SidecarToDevice, decode_message,
        encode_message,
    };
    use proptest::prelude::*;

    const LENGTHS: &[usize] = &[0, 1, 23, 24, 255, 256, 4096, 0xffff - 100, MAX_LINK_DATA];
    const SESSIONS: &[u64] = &[
        0,
        23,
        24,
        255,
        256,
        0xffff,
        0x1_0000,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX,
    ];

    #[test]
    fn the_encoders_write_what_the_general_encoder_writes() {
        for &len in LENGTHS {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            if len <= MAX_CHUNK {
                let mut out = Vec::new();
                encode_body(&bytes, &mut out);
                assert_eq!(
                    out,
                    encode_message(&DeviceToSidecar::Body(bytes.clone())).unwrap()
                );
                assert_eq!(
                    out,
                    encode_message(&SidecarToDevice::Body(bytes.clone())).unwrap()
                );
                assert_eq!(body_bytes(&out), Some(&bytes[..]));
            }
            for &session in SESSIONS {
                let mut out = Vec::new();
                encode_link_data(session, &bytes, &mut out);
                let general = HostToDevice::Data {
                    session,
                    bytes: bytes.clone(),
                };
                assert_eq!(out, encode_message(&general).unwrap());
                let general = DeviceToHost::Data {
                    session,
                    bytes: bytes.clone(),
                };
                assert_eq!(out, encode_message(&general).unwrap());
                let want = (len <= MAX_LINK_DATA).then_some((session, &bytes[..]));
                assert_eq!(link_data(&out), want);
            }
        }
    }

    #[test]
    fn the_readers_refuse_what_they_do_not_recognise_and_what_is_over_the_limits() {
        // Another message, or a longer head than needed (legal CBOR, left to the general
        // decoder).
        assert_eq!(
            body_bytes(&encode_message(&DeviceToSidecar::End).unwrap()),
            None
        );
        assert_eq!(body_bytes(b"\xa1\x64Body\x58\x01x"), None);
        assert_eq!(body_bytes(b"\xa1\x64Body\x41x"), Some(&b"x"[..]));
        // A byte string shorter or longer than the rest.
        assert_eq!(body_bytes(b"\xa1\x64Body\x42x"), None);
        assert_eq!(body_bytes(b"\xa1\x64Body\x41xy"), None);
        // Over the limits: the general decoder refuses these too.
        let mut out = Vec::new();
        encode_body(&vec![0; MAX_CHUNK + 1], &mut out);
        assert_eq!(body_bytes(&out), None);
        assert!(decode_message::<DeviceToSidecar>(&out).is_err());
        let mut out = Vec::new();
        encode_link_data(1, &vec![0; MAX_LINK_DATA + 1], &mut out);
        assert_eq!(link_data(&out), None);
        assert!(decode_message::<DeviceToHost>(&out).is_err());
        assert_eq!(
            link_data(&encode_message(&DeviceToHost::Close { session: 1 }).unwrap()),
            None
        );
    }

    proptest! {
        #[test]
        fn whatever_the_readers_take_the_general_decoder_reads_alike(
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            session in any::<u64>(),
            link in any::<bool>(),
            at in any::<usize>(),
            to in any::<u8>(),
            cut in any::<bool>(),
        ) {
            // A valid encoding with one byte changed or cut short there.
            let mut bytes = Vec::new();
            if link {
                encode_link_data(session, &payload, &mut bytes);
            } else {
                encode_body(&payload, &mut bytes);
            }
            let at = at % bytes.len();
            if cut {
                bytes.truncate(at);
            } else {
                bytes[at] = to;
            }
            if let Some(b) = body_bytes(&bytes) {
                prop_assert_eq!(
                    decode_message::<DeviceToSidecar>(&bytes).unwrap(),
                    DeviceToSidecar::Body(b.to_vec())
                );
            }
            if let Some((session, b)) = link_data(&bytes) {
                prop_assert_eq!(
                    decode_message::<DeviceToHost>(&bytes).unwrap(),
                    DeviceToHost::Data { session, bytes: b.to_vec() }
                );
            }
        }

        #[test]
        fn any_body_or_data_round_trips(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            session in any::<u64>(),
        ) {
            let mut out = Vec::new();
            encode_body(&bytes, &mut out);
            prop_assert_eq!(body_bytes(&out), Some(&bytes[..]));
            let mut out = Vec::new();
            encode_link_data(session, &bytes, &mut out);
            prop_assert_eq!(link_data(&out), Some((session, &bytes[..])));
        }
    }
}
