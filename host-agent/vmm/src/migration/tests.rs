//! Migration between two real KVM VMs in one process, over a socket pair: a real-mode guest
//! that counts and writes across eight pages while its memory is copied, and a "device" that
//! writes guest memory and a writable disk between rounds. Then the failures: cancel, a
//! refusing target, a target that hangs up without an answer, and hostile streams (hostile
//! disk records too).
//!
//! The KVM tests need `/dev/kvm` and its dirty-page log; where the host's KVM refuses an ioctl
//! they report which and stop (see [`crate::snapshot::tests`]).

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::snapshot::cpu::HostSupport;
use crate::snapshot::tests::{
    COUNTER, MEM_BYTES, Running, TestVm, Unsupported, build_vm, host_or_fail, load_program, start,
    wait_for_count,
};

/// Real mode, DS = 0: `inc dword [0x500]; inc ebx; mov ax, bx; and ax, 7; shl ax, 12;
/// add ax, 0x2000; mov di, ax; mov [di], bx; jmp back`: counts, and writes the count into one
/// of the pages 0x2000 to 0x9000 in turn.
const DIRTYING_LOOP: [u8; 24] = [
    0x66, 0xff, 0x06, 0x00, 0x05, // inc dword [0x500]
    0x66, 0x43, // inc ebx
    0x89, 0xd8, // mov ax, bx
    0x25, 0x07, 0x00, // and ax, 7
    0xc1, 0xe0, 0x0c, // shl ax, 12
    0x05, 0x00, 0x20, // add ax, 0x2000
    0x89, 0xc7, // mov di, ax
    0x89, 0x1d, // mov [di], bx
    0xeb, 0xe8, // jmp short -24
];

/// Where the test's stand-in device writes, one page per round.
const DEVICE_WRITES: u64 = 0x20_0000;
/// Where it writes on the disk, one block per round.
const DISK_WRITES: u64 = 0x4_0000;
/// The test's writable disk: 1 MiB and a sector, so that its last block is short.
const DISK_BYTES: u64 = (1 << 20) + 512;

/// A writable disk for the source: a sparse file with data at its start, in its middle and
/// in its last (short) block, and its log.
fn source_disk(dir: &std::path::Path) -> SourceDisk {
    let path = dir.join("source.disk");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(DISK_BYTES).unwrap();
    file.write_all_at(b"superblock", 1024).unwrap();
    file.write_all_at(&[7u8; 8192], 0x8_0000).unwrap();
    file.write_all_at(b"tail", DISK_BYTES - 4).unwrap();
    SourceDisk {
        file: std::sync::Arc::new(file),
        dirty: std::sync::Arc::new(crate::devices::virtio::block::DirtyBlocks::new(DISK_BYTES)),
    }
}

/// The target's disk: all zero, `bytes` long.
fn target_disk(dir: &std::path::Path, bytes: u64) -> TargetDisk {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("target.disk"))
        .unwrap();
    file.set_len(bytes).unwrap();
    TargetDisk { file, bytes }
}

fn link() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    (a, b)
}

/// The target's side, on its own thread: receive, restore, answer (or refuse with `refuse`).
fn target(
    t: TestVm,
    mut link: UnixStream,
    refuse: Option<&'static str>,
    disks: Vec<TargetDisk>,
) -> std::thread::JoinHandle<(TestVm, Result<Received, MigrationError>)> {
    std::thread::spawn(move || {
        let received = receive(&mut link, &t.mem, &disks, &t.host);
        let outcome = match (&received, refuse) {
            (Err(e), _) => Err(e.to_string()),
            (Ok(_), Some(why)) => Err(why.to_owned()),
            (Ok(r), None) => {
                crate::snapshot::restore_vm(&r.state, &t.vm, std::slice::from_ref(&t.vcpu), &t.host)
                    .map_err(|e| e.to_string())
            }
        };
        // The source may be gone already (a cancelled send): nothing to answer then.
        let _ = match &outcome {
            Ok(()) => answer(&mut link, Ok(())),
            Err(why) => answer(&mut link, Err(why as &dyn std::fmt::Display)),
        };
        (t, received)
    })
}

fn send_from(
    running: &Running,
    link: &mut UnixStream,
    config: &SendConfig,
    cancel: &AtomicBool,
    rounds: &mut Vec<Round>,
) -> Result<SendSummary, SendError> {
    let mut stop = || {
        running.pause();
        Ok(running.gate.is_closed() && running.gate.parked() == 1)
    };
    let mem = running.source.mem.clone();
    send(
        link,
        &running.source,
        config,
        &mut SendHooks {
            stop: &mut stop,
            wake: &|| running.gate.notify(),
            cancel,
            progress: &mut |r: &Round| {
                // A device writes guest memory, and the disk, while the copy runs.
                mem.write_obj(
                    0xfeed_0000 + r.round,
                    GuestAddress(DEVICE_WRITES + u64::from(r.round) * 4096),
                )
                .unwrap();
                for disk in &running.source.disks {
                    let at = DISK_WRITES + u64::from(r.round) * 4096 + 100;
                    disk.file
                        .write_all_at(&(0xd15c_0000 + r.round).to_le_bytes(), at)
                        .unwrap();
                    disk.dirty.mark(at, 4);
                }
                rounds.push(*r);
            },
            state_timeout: Duration::from_secs(5),
        },
    )
}

fn same_memory(a: &GuestRam, b: &GuestRam) -> bool {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    (0..MEM_BYTES).step_by(1 << 20).all(|at| {
        a.read_slice(&mut x, GuestAddress(at)).unwrap();
        b.read_slice(&mut y, GuestAddress(at)).unwrap();
        x == y
    })
}

fn migrate_a_counting_guest() -> Result<(), Unsupported> {
    let first = build_vm()?;
    load_program(&first, &DIRTYING_LOOP);
    let mut running = start(first);
    let dir = tempfile::tempdir().unwrap();
    running.source.disks = vec![source_disk(dir.path())];
    wait_for_count(&running, 1000);
    let (mut source_end, target_end) = link();
    let receiver = target(
        build_vm()?,
        target_end,
        None,
        vec![target_disk(dir.path(), DISK_BYTES)],
    );

    let config = SendConfig {
        downtime: Duration::from_millis(50),
        max_rounds: 5,
    };
    let mut rounds = Vec::new();
    let sent = send_from(
        &running,
        &mut source_end,
        &config,
        &AtomicBool::new(false),
        &mut rounds,
    );
    let (second, received) = receiver.join().unwrap();
    let summary = match sent {
        Ok(summary) => summary,
        Err(SendError {
            error: MigrationError::Memory(e),
            ..
        }) => {
            running.resume();
            running.stop();
            return Err(Unsupported(format!(
                "dirty-page logging refused by this host's KVM: {}",
                crate::error_chain(&e)
            )));
        }
        Err(e) => panic!("send failed: {}", crate::error_chain(&e)),
    };
    let received = received.unwrap();

    // The source is stopped for good, and the target holds exactly its memory: every page the
    // guest and the "device" wrote during the rounds got there.
    let saved = running.counter();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        running.counter(),
        saved,
        "the source ran on after the switch-over"
    );
    assert!(
        same_memory(&running.source.mem, &second.mem),
        "memories differ"
    );
    for r in &rounds {
        let at = GuestAddress(DEVICE_WRITES + u64::from(r.round) * 4096);
        assert_eq!(
            second.mem.read_obj::<u32>(at).unwrap(),
            0xfeed_0000 + r.round
        );
    }
    assert_eq!(summary.rounds, rounds);
    assert!(summary.rounds[0].pages >= 9, "{summary:?}");
    assert!(received.pages >= summary.rounds[0].pages + summary.final_pages);
    // The disk too: its data, its short last block and every round's write, and nothing from
    // its holes (round 0 sent the three blocks that hold data, not the 257 of the file).
    let disk = std::fs::read(dir.path().join("source.disk")).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("target.disk")).unwrap(),
        disk,
        "the disks differ"
    );
    assert_eq!(
        &disk[(DISK_WRITES + 100) as usize..][..4],
        &0xd15c_0000u32.to_le_bytes()
    );
    assert_eq!(summary.rounds[0].blocks, 4, "{summary:?}");
    assert_eq!(
        received.blocks,
        summary.rounds.iter().map(|r| r.blocks).sum::<u64>() + summary.final_blocks,
        "{summary:?}"
    );
    running.stop();

    // The target runs on from the source's count.
    let target_counter: u32 = second.mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(target_counter, saved);
    host_or_fail(received.state.vm.restore_clock(&second.vm))?;
    let moved = start(second);
    wait_for_count(&moved, saved + 1000);
    moved.stop();
    eprintln!(
        "migration: {} rounds ({:?} pages), {} pages stopped, state {} bytes, downtime {:?}, \
         count {saved} on the source, counting on the target",
        summary.rounds.len(),
        summary.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        summary.final_pages,
        summary.state_bytes,
        summary.downtime,
    );
    Ok(())
}

#[test]
fn a_counting_guest_migrates_with_every_page_and_counts_on() {
    if let Err(Unsupported(why)) = migrate_a_counting_guest() {
        eprintln!("SKIPPED a_counting_guest_migrates_with_every_page_and_counts_on: {why}");
    }
}

/// Starts a counting guest and a send to `target`; returns the send's result with the source
/// still there.
fn failed_send(
    cancel: bool,
    target_side: impl FnOnce(UnixStream) + Send + 'static,
) -> Result<(Running, SendError), Unsupported> {
    let first = build_vm()?;
    load_program(&first, &DIRTYING_LOOP);
    let running = start(first);
    wait_for_count(&running, 100);
    let (mut source_end, target_end) = link();
    let peer = std::thread::spawn(move || target_side(target_end));
    let sent = send_from(
        &running,
        &mut source_end,
        &SendConfig::default(),
        &AtomicBool::new(cancel),
        &mut Vec::new(),
    );
    drop(source_end);
    peer.join().unwrap();
    match sent {
        Ok(s) => panic!("the send succeeded: {s:?}"),
        Err(SendError {
            error: MigrationError::Memory(e),
            ..
        }) => {
            running.resume();
            running.stop();
            Err(Unsupported(format!(
                "dirty-page logging: {}",
                crate::error_chain(&e)
            )))
        }
        Err(e) => Ok((running, e)),
    }
}

fn failures() -> Result<(), Unsupported> {
    // Cancelled: never stopped, runs on.
    let (running, e) = failed_send(true, |mut link| {
        let mem = crate::memory::create_guest_memory(MEM_BYTES).unwrap();
        let host = HostSupport::default();
        assert!(receive(&mut link, &mem, &[], &host).is_err());
    })?;
    assert!(matches!(e.error, MigrationError::Cancelled), "{e}");
    assert_eq!(e.phase, Phase::BeforeSwitch);
    assert!(e.source_may_resume());
    let now = running.counter();
    wait_for_count(&running, now + 1000);
    running.stop();

    // Refused by the target after everything arrived: the source may resume, and does.
    let (running, e) = failed_send(false, |link| {
        let t = build_vm().map_err(|u| u.0).unwrap();
        let (_, received) = target(t, link, Some("no room on this host"), Vec::new())
            .join()
            .unwrap();
        received.unwrap();
    })?;
    assert_eq!(e.phase, Phase::Refused);
    assert!(e.to_string().contains("no room on this host"), "{e}");
    assert!(e.source_may_resume());
    let now = running.counter();
    running.resume();
    wait_for_count(&running, now + 1000);
    running.stop();

    // The target takes everything and hangs up without an answer: it may be running, so
    // the source must not resume.
    let (running, e) = failed_send(false, |mut link| {
        let t = build_vm().map_err(|u| u.0).unwrap();
        receive(&mut link, &t.mem, &[], &t.host).unwrap();
    })?;
    assert_eq!(e.phase, Phase::AwaitingAnswer);
    assert!(!e.source_may_resume());
    assert!(
        matches!(e.error, MigrationError::Stream(StreamError::Closed(_))),
        "{e}"
    );
    running.resume();
    running.stop();
    Ok(())
}

#[test]
fn cancel_refusal_and_silence_leave_one_copy() {
    if let Err(Unsupported(why)) = failures() {
        eprintln!("SKIPPED cancel_refusal_and_silence_leave_one_copy: {why}");
    }
}

/// Receives `bytes` into a fresh 1 MiB guest.
fn receive_bytes(bytes: &[u8]) -> Result<Received, MigrationError> {
    let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
    receive(&mut &bytes[..], &mem, &[], &HostSupport::default())
}

/// A stream's start: the preamble, the layout of `mem_bytes` of RAM and no writable disks.
fn preamble_and_layout(mem_bytes: u64) -> Vec<u8> {
    let mut out = preamble_and_layout_only(mem_bytes);
    stream::write_disks(&mut out, &[]).unwrap();
    out
}

fn preamble_and_layout_only(mem_bytes: u64) -> Vec<u8> {
    let mem = crate::memory::create_guest_memory(mem_bytes).unwrap();
    let mut out = Vec::new();
    stream::write_preamble(&mut out).unwrap();
    stream::write_layout(&mut out, &MemoryState::of(&mem)).unwrap();
    out
}

fn record(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What a hostile stream's error must be.
type Expect = fn(&MigrationError) -> bool;

#[test]
fn hostile_streams_are_refused_with_what_is_wrong() {
    let good = preamble_and_layout(1 << 20);
    let with = |extra: &[u8]| [good.as_slice(), extra].concat();
    let pages = |addr: u64, n: usize| {
        let mut p = addr.to_le_bytes().to_vec();
        p.resize(8 + n, 0xab);
        record(2, &p)
    };
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("empty", Vec::new(), |e| {
            matches!(e, MigrationError::Stream(StreamError::Closed(_)))
        }),
        ("bad magic", b"NOTAMIGRATIONSTREAM".to_vec(), |e| {
            matches!(e, MigrationError::Stream(StreamError::BadMagic))
        }),
        (
            "version",
            [&stream::MAGIC[..], &9u32.to_le_bytes()].concat(),
            |e| matches!(e, MigrationError::Stream(StreamError::Version { found: 9 })),
        ),
        ("other layout", preamble_and_layout(2 << 20), |e| {
            matches!(e, MigrationError::Layout(_))
        }),
        ("unknown tag", with(&record(77, &[])), |e| {
            matches!(e, MigrationError::Stream(StreamError::UnknownTag(77)))
        }),
        // A length of 4 GiB is refused before anything is allocated or read.
        ("huge record", with(&[2, 0xff, 0xff, 0xff, 0xff]), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::Oversized {
                    record: "pages",
                    ..
                })
            )
        }),
        ("outside memory", with(&pages(1 << 20, 4096)), |e| {
            matches!(e, MigrationError::Stream(StreamError::OutsideMemory { .. }))
        }),
        ("wraps", with(&pages(u64::MAX - 4095, 4096)), |e| {
            matches!(e, MigrationError::Stream(StreamError::OutsideMemory { .. }))
        }),
        ("unaligned address", with(&pages(0x1001, 4096)), |e| {
            matches!(e, MigrationError::Stream(StreamError::Unaligned { .. }))
        }),
        ("part of a page", with(&pages(0x1000, 100)), |e| {
            matches!(e, MigrationError::Stream(StreamError::Unaligned { .. }))
        }),
        ("no address", with(&record(2, &[1, 2, 3])), |e| {
            matches!(e, MigrationError::Stream(StreamError::Unaligned { .. }))
        }),
        ("truncated pages", with(&pages(0, 4096)[..100]), |e| {
            matches!(e, MigrationError::Stream(StreamError::Closed(_)))
        }),
        ("done before the state", with(&record(4, &[])), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::Unexpected { found: "done", .. })
            )
        }),
        ("a damaged state", with(&record(3, &[0u8; 100])), |e| {
            matches!(e, MigrationError::Snapshot(_))
        }),
        (
            "pages before the layout",
            {
                let mut s = Vec::new();
                stream::write_preamble(&mut s).unwrap();
                [s, pages(0, 4096)].concat()
            },
            |e| {
                matches!(
                    e,
                    MigrationError::Stream(StreamError::Unexpected { found: "pages", .. })
                )
            },
        ),
        ("no end", with(&pages(0, 4096)), |e| {
            matches!(e, MigrationError::Stream(StreamError::Closed(_)))
        }),
    ];
    for (name, bytes, expected) in cases {
        match receive_bytes(&bytes) {
            Ok(r) => panic!("{name}: accepted ({} pages)", r.pages),
            Err(e) => assert!(expected(&e), "{name}: {}", crate::error_chain(&e)),
        }
    }
}

#[test]
fn a_refusal_is_cut_to_its_limit_at_a_character() {
    let mut out = Vec::new();
    let long = "é".repeat(stream::MAX_REASON);
    stream::write_answer(&mut out, Some(&long)).unwrap();
    let mut scratch = Vec::new();
    match stream::read_record(&mut &out[..], None, &mut scratch, "an answer").unwrap() {
        Record::Refused(text) => {
            assert!(text.len() <= stream::MAX_REASON && text.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_disk_records_are_refused_with_what_is_wrong() {
    const BYTES: u64 = 8192;
    let start = |sizes: &[u64]| {
        let mut s = preamble_and_layout_only(1 << 20);
        stream::write_disks(&mut s, sizes).unwrap();
        s
    };
    let blocks = |disk: u32, offset: u64, n: usize| {
        let mut p = disk.to_le_bytes().to_vec();
        p.extend_from_slice(&offset.to_le_bytes());
        p.resize(stream::BLOCKS_HEADER + n, 0xcd);
        record(8, &p)
    };
    let good = |extra: &[u8]| [start(&[BYTES]), extra.to_vec()].concat();
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "no disks record",
            [preamble_and_layout_only(1 << 20), blocks(0, 0, 512)].concat(),
            |e| {
                matches!(
                    e,
                    MigrationError::Stream(StreamError::Unexpected {
                        found: "blocks",
                        expected: "the disks"
                    })
                )
            },
        ),
        ("other disks", start(&[4096]), |e| {
            matches!(e, MigrationError::DiskLayout { .. })
        }),
        ("one disk too many", start(&[BYTES, BYTES]), |e| {
            matches!(e, MigrationError::DiskLayout { .. })
        }),
        (
            "a disks record of no whole size",
            [preamble_and_layout_only(1 << 20), record(7, &[1, 2, 3])].concat(),
            |e| matches!(e, MigrationError::Stream(StreamError::BadDisks(3))),
        ),
        ("blocks for no disk", good(&blocks(1, 0, 512)), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::OutsideDisk { disk: 1, .. })
            )
        }),
        ("past the end", good(&blocks(0, BYTES - 512, 1024)), |e| {
            matches!(e, MigrationError::Stream(StreamError::OutsideDisk { .. }))
        }),
        ("wraps", good(&blocks(0, u64::MAX - 511, 512)), |e| {
            matches!(e, MigrationError::Stream(StreamError::OutsideDisk { .. }))
        }),
        ("unaligned offset", good(&blocks(0, 100, 512)), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::UnalignedBlocks { .. })
            )
        }),
        ("part of a sector", good(&blocks(0, 0, 100)), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::UnalignedBlocks { .. })
            )
        }),
        ("no header", good(&record(8, &[1, 2, 3])), |e| {
            matches!(
                e,
                MigrationError::Stream(StreamError::UnalignedBlocks { .. })
            )
        }),
        ("no end", good(&blocks(0, 512, 1024)), |e| {
            matches!(e, MigrationError::Stream(StreamError::Closed(_)))
        }),
    ];
    for (name, bytes, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let disk = target_disk(dir.path(), BYTES);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        match receive(&mut &bytes[..], &mem, &[disk], &HostSupport::default()) {
            Ok(r) => panic!("{name}: accepted ({} blocks)", r.blocks),
            Err(e) => assert!(expected(&e), "{name}: {}", crate::error_chain(&e)),
        }
        // Only whole, in-bounds records reached the disk: the last case's.
        let written = std::fs::read(dir.path().join("target.disk")).unwrap();
        assert_eq!(
            written.len() as u64,
            BYTES,
            "{name}: the disk kept its size"
        );
        if name == "no end" {
            assert!(written[512..1536].iter().all(|&b| b == 0xcd), "{name}");
            assert!(
                written[..512]
                    .iter()
                    .chain(&written[1536..])
                    .all(|&b| b == 0)
            );
        } else {
            assert!(written.iter().all(|&b| b == 0), "{name}: nothing written");
        }
    }
}
