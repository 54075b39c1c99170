//! Fuzz the tokenizer's scanner: arbitrary bytes are tokenized and detokenized again. Neither
//! may panic, and the result must be the input (invalid UTF-8 included).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nanoclaw_tokenize::{Mode, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(mut t) = Tokenizer::new([0x5a; 32], Mode::Enforce) else {
        return;
    };
    let Ok((tokenized, _)) = t.tokenize_bytes(data) else {
        return;
    };
    let (restored, _) = t
        .detokenize_bytes(&tokenized)
        .expect("detokenize what was tokenized");
    assert_eq!(restored, data, "round trip");
});
