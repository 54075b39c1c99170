//! Fuzzes the target's side of a live migration: the stream a source VMM sends (preamble,
//! layout, disks, page and block records, state, end) is read into 1 MiB of fresh guest memory
//! and, when asked, one 64 KiB writable disk. A damaged or hostile stream must end in a typed
//! error: never a panic, a hang, or an allocation sized by a length the stream gives. A stream
//! that passes must have written only inside guest memory (vm-memory checks every write) and
//! inside the disk (which keeps its size), and its state must have passed the snapshot state
//! checks.
//!
//! Input layout: the first byte's bit 1 gives the target its disk; with bit 0 set, a valid
//! preamble, layout record and disks record (naming the target's disks) are put in front of
//! the rest, so most inputs reach the page, block and state records; the rest is the stream.

#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::memory::create_guest_memory;
use nanoclaw_vmm::migration::{TargetDisk, receive, stream};
use nanoclaw_vmm::snapshot::{HostSupport, MemoryState};

const MEM: u64 = 1 << 20;
const DISK: u64 = 64 << 10;

/// One unlinked scratch file for the whole run, emptied before each input.
fn disk_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("migration-fuzz-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("a scratch disk");
        std::fs::remove_file(&path).expect("unlink the scratch disk");
        file
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&switches, rest)) = data.split_first() else {
        return;
    };
    let mem = create_guest_memory(MEM).expect("map guest memory");
    let mut disks = Vec::new();
    if switches & 2 != 0 {
        let file = disk_file();
        file.set_len(0).expect("empty the disk");
        file.set_len(DISK).expect("size the disk");
        disks.push(TargetDisk {
            file: file.try_clone().expect("a descriptor of the disk"),
            bytes: DISK,
        });
    }
    let mut input = Vec::new();
    if switches & 1 != 0 {
        stream::write_preamble(&mut input).expect("preamble");
        stream::write_layout(&mut input, &MemoryState::of(&mem)).expect("layout");
        let sizes: Vec<u64> = disks.iter().map(|d| d.bytes).collect();
        stream::write_disks(&mut input, &sizes).expect("disks");
    }
    input.extend_from_slice(rest);
    let host = HostSupport::default();
    let received = receive(&mut &input[..], &mem, &disks, &host);
    if let Some(disk) = disks.first() {
        assert_eq!(disk.file.metadata().expect("stat the disk").len(), DISK);
    }
    if let Ok(received) = received {
        assert!(!received.state.vcpus.is_empty());
    }
});
