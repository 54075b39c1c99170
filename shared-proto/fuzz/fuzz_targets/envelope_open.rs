//! Feeds arbitrary bytes, framed, to the envelope decoder and then to an [`Opener`].
//!
//! The first eight input bytes are the opener's clock. Whatever decodes must be refused or
//! opened without a panic, and an envelope that opens once must be refused as a replay.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::envelope::{Envelope, EnvelopeError, Opener};
use shared_proto::frame::decode_frame;
use x25519_dalek::StaticSecret;

fuzz_target!(|data: &[u8]| {
    let Some((now, body)) = data.split_first_chunk::<8>() else {
        return;
    };
    let now = u64::from_be_bytes(*now);
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body);
    let Ok(Some((envelope, _))) = decode_frame::<Envelope>(&framed) else {
        return;
    };
    let mut opener = Opener::new(StaticSecret::from([7u8; 32]), "vm-fuzz");
    if opener.open(&envelope, now).is_ok() {
        assert_eq!(opener.open(&envelope, now), Err(EnvelopeError::Replayed));
    }
});
