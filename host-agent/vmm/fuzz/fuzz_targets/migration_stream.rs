//! Fuzzes the target's side of a live migration: the stream a source VMM sends (preamble,
//! layout, page records, state, end) is read into 1 MiB of fresh guest memory. A damaged or
//! hostile stream must end in a typed error: never a panic, a hang, or an allocation sized by
//! a length the stream gives. A stream that passes must have written only inside guest memory
//! (vm-memory checks every write), and its state must have passed the snapshot state checks.
//!
//! Input layout: with the first byte's bit 0 set, a valid preamble and layout record are put in
//! front of the rest (so most inputs reach the page and state records); the rest is the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::memory::create_guest_memory;
use nanoclaw_vmm::migration::{receive, stream};
use nanoclaw_vmm::snapshot::{HostSupport, MemoryState};

const MEM: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&switches, rest)) = data.split_first() else {
        return;
    };
    let mem = create_guest_memory(MEM).expect("map guest memory");
    let mut input = Vec::new();
    if switches & 1 != 0 {
        stream::write_preamble(&mut input).expect("preamble");
        stream::write_layout(&mut input, &MemoryState::of(&mem)).expect("layout");
    }
    input.extend_from_slice(rest);
    let host = HostSupport::default();
    if let Ok(received) = receive(&mut &input[..], &mem, &host) {
        assert!(!received.state.vcpus.is_empty());
    }
});
