//! Feeds arbitrary bytes to the incremental frame decoder of both directions.
//!
//! The first input byte picks how the rest is split into pushes, so that the fuzzer also
//! explores frames that arrive in pieces. Decoding must never panic, and a decoded message must
//! encode back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_proto::frame::{FrameDecoder, decode_frame, encode_frame};
use shared_proto::{GuestToHost, HostToGuest};

fn drive<T>(chunk: usize, data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::<T>::new();
    for piece in data.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.decode_next() {
                Ok(Some(msg)) => {
                    let frame = encode_frame(&msg).expect("a decoded message re-encodes");
                    let (back, used) = decode_frame::<T>(&frame)
                        .expect("a re-encoded message decodes")
                        .expect("a re-encoded frame is whole");
                    assert_eq!(used, frame.len());
                    assert_eq!(back, msg);
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
    drive::<HostToGuest>(chunk, rest);
    drive::<GuestToHost>(chunk, rest);
});
