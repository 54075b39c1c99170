//! Feeds arbitrary bytes to the file copy decoder of both directions.
//!
//! The first input byte picks how the rest is split into pushes, as in `frame_decoder`.
//! Decoding must never panic; whatever decodes keeps the channel's limits and encodes back to a
//! frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::files::{
    CheckedMessage, FilesDecoder, FilesReply, FilesRequest, encode_files_message,
};

fn drive<T>(chunk: usize, data: &[u8])
where
    T: serde::de::DeserializeOwned
        + serde::Serialize
        + CheckedMessage
        + PartialEq
        + std::fmt::Debug,
{
    let mut decoder = FilesDecoder::<T>::new();
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.decode_next() {
                Ok(Some(msg)) => {
                    assert!(msg.check().is_ok(), "a decoded message passes the checks");
                    let frame = encode_files_message(&msg).expect("a decoded message re-encodes");
                    let mut again = FilesDecoder::<T>::new();
                    again.push(&frame);
                    let back = again
                        .decode_next()
                        .expect("a re-encoded message decodes")
                        .expect("a re-encoded frame is whole");
                    assert_eq!(back, msg);
                    assert_eq!(again.pending(), 0);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 16) + 1;
    let chunk = if first >= 128 {
        rest.len().max(1)
    } else {
        chunk
    };
    drive::<FilesRequest>(chunk, rest);
    drive::<FilesReply>(chunk, rest);
});
