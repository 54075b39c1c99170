//! Feeds arbitrary bytes to the credential channels' record decoder.
//!
//! The first input byte picks how the rest is split into pushes (and a second decoder gets a
//! small cap), so that the fuzzer also explores records that arrive in pieces. Decoding must
//! never panic, must give the same records however the bytes are split, and every record must
//! encode back to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::credential::{CredentialError, RecordDecoder, encode_record};

fn drive(decoder: &mut RecordDecoder, chunk: usize, data: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut records = Vec::new();
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.decode_next() {
                Ok(Some(r)) => records.push(r),
                Ok(None) => break,
                Err(CredentialError::RecordTooLarge(_)) => return (records, true),
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
    }
    (records, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 16) + 1;
    let (pieces, _) = drive(&mut RecordDecoder::new(), chunk, rest);
    let (whole, _) = drive(&mut RecordDecoder::new(), rest.len().max(1), rest);
    assert_eq!(pieces, whole);
    let mut again = Vec::new();
    for r in &whole {
        encode_record(r, &mut again).expect("a decoded record re-encodes");
    }
    assert_eq!(&rest[..again.len()], &again[..]);

    let cap = usize::from(first);
    let (capped, refused) = drive(&mut RecordDecoder::with_max(cap), chunk, rest);
    assert!(capped.iter().all(|r| r.len() <= cap));
    if !refused {
        assert_eq!(capped, whole);
    }
});
