//! Live migration, the VMM's part: pre-copy of a running VM's memory to another VMM, then its
//! state, with the VM stopped only for the last few pages.
//!
//! # The source ([`send`])
//! 1. It sends its RAM layout, turns on KVM's dirty-page logging for every memory slot and
//!    clears the devices' log ([`crate::memory`] says who tracks what).
//! 2. **Round 0** sends every page that holds a non-zero byte, while the guest runs. The target
//!    starts from fresh (zero) memory, so a zero page needs no bytes.
//! 3. **Each further round** reads and clears both logs, then sends the pages they name. A page
//!    written after its log was read is in the next round's log, so nothing is missed. It
//!    stops when what is left would take no longer than [`SendConfig::downtime`] at the rate
//!    the last round reached, or after [`SendConfig::max_rounds`] (a guest that dirties memory
//!    faster than the link carries it never converges).
//! 4. **Switch-over.** It stops the VM (the caller's `stop`: vCPUs parked, device threads
//!    paused), captures the state as a snapshot does ([`crate::snapshot::capture`]), reads both
//!    logs once more, sends those pages, the state and `Done`.
//! 5. It waits for the target's answer. `Resumed`: the target's copy runs and this one must
//!    never run again. `Refused`: the target will not run it, and the source may resume.
//!
//! # Exactly one running copy
//! A [`SendError`] says whether the source may resume ([`SendError::source_may_resume`]):
//! - before `Done` was written whole, the target cannot have the state, so it cannot run: the
//!   source resumes (and so does a [`SendConfig`] cancel, which is checked between batches);
//! - after `Done`, without an answer (the link cut, the target gone, the wait timed out), the
//!   target may be running. The source stays stopped and the caller must ask the target's host
//!   out of band before it resumes anything. Resuming here would risk two copies.
//!
//! # Writable disks
//! A VM's writable disks go in the same rounds as its memory, each by its own log of written
//! blocks ([`disk`]): every non-zero block in round 0, the logged ones after, the last ones
//! with the VM stopped. The pages and blocks left both count towards the downtime target.
//!
//! # The target ([`receive`])
//! Fresh memory of the same layout and all-zero writable disks of the same sizes, then pages
//! and blocks written where they belong as they arrive, then the state (checked as a snapshot
//! state file is: magic, version, checksum, counts). The caller restores it into its fresh VM
//! ([`crate::snapshot::restore_vm`] and [`crate::snapshot::restore_virtio`]) and answers with
//! [`answer`] before its vCPUs start.
//!
//! # The link
//! This module reads and writes any byte stream. The VMM is jailed and has no network: the
//! link between the two hosts (mutually authenticated and encrypted) belongs to the daemons,
//! which hand each VMM its end as a local socket. [`stream`] describes the records.

pub mod dirty;
pub mod disk;
pub mod stream;

#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestRam, MemoryError, set_dirty_logging};
use crate::snapshot::memory::{MemoryState, PAGE};
use crate::snapshot::{SnapshotError, SnapshotSource, SnapshotState};
pub use dirty::DirtyPages;
pub use disk::{SourceDisk, TargetDisk};
pub use stream::{Record, StreamError};

/// Errors of a migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream failed or was malformed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Dirty-page logging failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Reading guest memory, capturing or decoding the state failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The two VMs' memory differs in size or layout.
    #[error("the target's guest RAM is laid out otherwise: {0}")]
    Layout(#[source] SnapshotError),
    /// The caller could not stop the VM for the switch-over.
    #[error("stop the VM for the switch-over: {0}")]
    Stop(String),
    /// The caller cancelled the migration.
    #[error("the migration was cancelled")]
    Cancelled,
    /// The target refused to run the VM.
    #[error("the target refused the VM: {0}")]
    Refused(String),
    /// Reading or writing a writable disk failed.
    #[error("{what}")]
    Disk {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The two VMs' writable disks differ in number or size.
    #[error(
        "the writable disks differ: the source's are {source_sizes:?} bytes, the target's {target_sizes:?}"
    )]
    DiskLayout {
        /// The source's sizes, in order.
        source_sizes: Vec<u64>,
        /// The target's.
        target_sizes: Vec<u64>,
    },
}

/// Where a send failed, which decides what the source may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the state was sent whole: the target cannot run the VM.
    BeforeSwitch,
    /// After it, without the target's answer: the target may be running it.
    AwaitingAnswer,
    /// The target answered that it will not run it.
    Refused,
}

/// A failed [`send`].
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SendError {
    /// Where it failed.
    pub phase: Phase,
    /// Why.
    #[source]
    pub error: MigrationError,
}

impl SendError {
    /// Whether the source may run the VM again: only when the target surely does not.
    pub fn source_may_resume(&self) -> bool {
        self.phase != Phase::AwaitingAnswer
    }
}

/// How the source converges.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// The longest the VM should stay stopped: pre-copy ends when what is left would take this
    /// long at the last round's rate.
    pub downtime: Duration,
    /// The most rounds after round 0, converged or not.
    pub max_rounds: u32,
}

impl Default for SendConfig {
    fn default() -> Self {
        // Cloud Hypervisor's default downtime target.
        Self {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
        }
    }
}

/// One round of copying, reported as it ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// 0 for the full copy; the switch-over's pages are [`SendSummary::final_pages`].
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Writable disks' blocks sent (4 KiB each, as pages are).
    pub blocks: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// Pages and blocks written meanwhile, for the next round (the logs read at its end).
    pub dirty: u64,
    /// How long sending those would take at this round's rate.
    pub expected_downtime: Duration,
}

impl Round {
    /// This round's rate, bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        ((self.pages + self.blocks) * PAGE as u64) as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }
}

/// What a successful [`send`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SendSummary {
    /// Every pre-copy round, round 0 first.
    pub rounds: Vec<Round>,
    /// Pages sent with the VM stopped.
    pub final_pages: u64,
    /// Disk blocks sent with the VM stopped.
    pub final_blocks: u64,
    /// From the stop to the target's answer: the guest's downtime, less the target's start.
    pub downtime: Duration,
    /// The state record's length.
    pub state_bytes: usize,
}

/// What the caller gives [`send`] besides the link, the VM and the config.
pub struct SendHooks<'a> {
    /// Stops the VM for the switch-over (vCPUs parked, device threads paused) and says
    /// whether every vCPU is parked.
    pub stop: &'a mut dyn FnMut() -> Result<bool, String>,
    /// Wakes parked vCPU threads to save their state (as for [`crate::snapshot::take`]).
    pub wake: &'a dyn Fn(),
    /// Checked between batches: set, the send fails with [`MigrationError::Cancelled`].
    pub cancel: &'a AtomicBool,
    /// Hears of each round as it ends.
    pub progress: &'a mut dyn FnMut(&Round),
    /// How long each vCPU has to save its state.
    pub state_timeout: Duration,
}

impl std::fmt::Debug for SendHooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHooks")
            .field("cancel", &self.cancel)
            .field("state_timeout", &self.state_timeout)
            .finish_non_exhaustive()
    }
}

/// Live-migrates the running VM of `source` over `link`, calling `hooks` to stop the VM, wake
/// its vCPUs, check for a cancel and report progress. On success the target runs the VM: the
/// caller must end the source without resuming it. On failure, see
/// [`SendError::source_may_resume`]. Either way dirty-page logging is off again when it returns.
pub fn send<L: Read + Write>(
    link: &mut L,
    source: &SnapshotSource,
    config: &SendConfig,
    hooks: &mut SendHooks<'_>,
) -> Result<SendSummary, SendError> {
    stream::write_preamble(link).map_err(before_switch)?;
    stream::write_layout(link, &MemoryState::of(&source.mem)).map_err(before_switch)?;
    let sizes: Vec<u64> = source.disks.iter().map(SourceDisk::bytes).collect();
    stream::write_disks(link, &sizes).map_err(before_switch)?;
    set_dirty_logging(&source.vm, &source.mem, true).map_err(before_switch)?;
    DirtyPages::clear_device_log(&source.mem);
    for disk in &source.disks {
        disk.dirty.take();
    }
    let result = precopy_and_switch(link, source, config, hooks);
    if result.as_ref().is_err_and(SendError::source_may_resume) {
        // The source runs on: stop paying for the log. (On success or an unknown outcome the
        // source never runs again, so it does not matter.)
        if let Err(e) = set_dirty_logging(&source.vm, &source.mem, false) {
            tracing::warn!(error = %crate::error_chain(&e), "turning dirty-page logging off failed");
        }
    }
    result
}

/// What changed since the last look: guest pages and each writable disk's blocks.
struct Dirty {
    pages: DirtyPages,
    disks: Vec<crate::devices::virtio::block::BlockSet>,
}

impl Dirty {
    fn collect(source: &SnapshotSource) -> Result<Self, MigrationError> {
        Ok(Self {
            pages: DirtyPages::collect(&source.vm, &source.mem)?,
            disks: source.disks.iter().map(|d| d.dirty.take()).collect(),
        })
    }

    fn count(&self) -> u64 {
        self.pages.count() + self.disks.iter().map(|d| d.count()).sum::<u64>()
    }

    /// Sends what it names; answers (pages, blocks).
    fn send(
        &self,
        link: &mut impl Write,
        source: &SnapshotSource,
        buf: &mut [u8],
        cancel: &AtomicBool,
    ) -> Result<(u64, u64), MigrationError> {
        let pages = send_dirty(link, &source.mem, &self.pages, buf, cancel)?;
        let mut blocks = 0;
        for (index, (disk, set)) in source.disks.iter().zip(&self.disks).enumerate() {
            blocks += disk::send_dirty(link, index, disk, set, buf, cancel)?;
        }
        Ok((pages, blocks))
    }
}

fn precopy_and_switch<L: Read + Write>(
    link: &mut L,
    source: &SnapshotSource,
    config: &SendConfig,
    hooks: &mut SendHooks<'_>,
) -> Result<SendSummary, SendError> {
    let cancel = hooks.cancel;
    let mut buf = vec![0u8; stream::MAX_PAGES_PER_RECORD * PAGE];
    let mut rounds = Vec::new();

    // Round 0: every non-zero page and disk block.
    let started = Instant::now();
    let pages = send_nonzero(link, &source.mem, &mut buf, cancel).map_err(before_switch)?;
    let mut blocks = 0;
    for (index, d) in source.disks.iter().enumerate() {
        blocks += disk::send_nonzero(link, index, d, &mut buf, cancel).map_err(before_switch)?;
    }
    let mut dirty = Dirty::collect(source).map_err(before_switch)?;
    let mut round = finish_round(0, (pages, blocks), started, &dirty);
    (hooks.progress)(&round);
    rounds.push(round);

    // Further rounds, until what is left fits the downtime target.
    while round.expected_downtime > config.downtime && round.round < config.max_rounds {
        let started = Instant::now();
        let sent = dirty
            .send(link, source, &mut buf, cancel)
            .map_err(before_switch)?;
        dirty = Dirty::collect(source).map_err(before_switch)?;
        round = finish_round(round.round + 1, sent, started, &dirty);
        (hooks.progress)(&round);
        rounds.push(round);
    }
    if cancel.load(Ordering::Acquire) {
        return Err(before_switch(MigrationError::Cancelled));
    }

    // Switch-over: stop, capture, the last pages and blocks, the state.
    let stopped = Instant::now();
    let parked = (hooks.stop)().map_err(|e| before_switch(MigrationError::Stop(e)))?;
    let state = crate::snapshot::capture(source, parked, hooks.wake, hooks.state_timeout)
        .map_err(before_switch)?;
    let last = Dirty::collect(source).map_err(before_switch)?;
    let never = AtomicBool::new(false);
    let (mut final_pages, mut final_blocks) = dirty
        .send(link, source, &mut buf, &never)
        .map_err(before_switch)?;
    let (pages, blocks) = last
        .send(link, source, &mut buf, &never)
        .map_err(before_switch)?;
    final_pages += pages;
    final_blocks += blocks;
    let state_file = crate::snapshot::format::encode(&state).map_err(before_switch)?;
    stream::write_state(link, &state_file).map_err(before_switch)?;
    stream::write_done(link).map_err(before_switch)?;

    // From here the target may run the VM.
    let mut scratch = Vec::new();
    match stream::read_record(link, None, &mut scratch, "the target's answer was due") {
        Ok(Record::Resumed) => Ok(SendSummary {
            rounds,
            final_pages,
            final_blocks,
            downtime: stopped.elapsed(),
            state_bytes: state_file.len(),
        }),
        Ok(Record::Refused(reason)) => Err(SendError {
            phase: Phase::Refused,
            error: MigrationError::Refused(reason),
        }),
        Ok(other) => Err(SendError {
            phase: Phase::AwaitingAnswer,
            error: StreamError::Unexpected {
                found: other.name(),
                expected: "the target's answer",
            }
            .into(),
        }),
        Err(e) => Err(SendError {
            phase: Phase::AwaitingAnswer,
            error: e.into(),
        }),
    }
}

/// A failure before the state was sent whole: the source may resume.
fn before_switch(error: impl Into<MigrationError>) -> SendError {
    SendError {
        phase: Phase::BeforeSwitch,
        error: error.into(),
    }
}

fn finish_round(round: u32, (pages, blocks): (u64, u64), started: Instant, dirty: &Dirty) -> Round {
    let elapsed = started.elapsed();
    let mut r = Round {
        round,
        pages,
        blocks,
        elapsed,
        dirty: dirty.count(),
        expected_downtime: Duration::ZERO,
    };
    // A round that sent nothing has no rate: assume the worst unless nothing is left.
    r.expected_downtime = if r.dirty == 0 {
        Duration::ZERO
    } else if pages + blocks == 0 {
        Duration::MAX
    } else {
        Duration::try_from_secs_f64((r.dirty * PAGE as u64) as f64 / r.bytes_per_second())
            .unwrap_or(Duration::MAX)
    };
    r
}

pub(crate) fn check_cancel(cancel: &AtomicBool) -> Result<(), MigrationError> {
    if cancel.load(Ordering::Acquire) {
        return Err(MigrationError::Cancelled);
    }
    Ok(())
}

/// Sends every page of `mem` that holds a non-zero byte; returns how many.
fn send_nonzero(
    link: &mut impl Write,
    mem: &GuestRam,
    buf: &mut [u8],
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    let mut sent = 0u64;
    for region in mem.iter() {
        let base = region.start_addr();
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            check_cancel(cancel)?;
            let n = (len - done).min(buf.len() as u64) as usize;
            let at = base.unchecked_add(done);
            mem.read_slice(&mut buf[..n], at)
                .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            for (start, end) in crate::snapshot::memory::nonzero_runs(&buf[..n]) {
                stream::write_pages(link, at.raw_value() + start as u64, &buf[start..end])?;
                sent += ((end - start) / PAGE) as u64;
            }
            done += n as u64;
        }
    }
    Ok(sent)
}

/// Sends the pages `dirty` names, as they are now; returns how many.
fn send_dirty(
    link: &mut impl Write,
    mem: &GuestRam,
    dirty: &DirtyPages,
    buf: &mut [u8],
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    let mut sent = 0u64;
    for (addr, pages) in dirty.runs(buf.len() / PAGE) {
        check_cancel(cancel)?;
        let data = &mut buf[..pages * PAGE];
        mem.read_slice(data, vm_memory::GuestAddress(addr))
            .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
        stream::write_pages(link, addr, data)?;
        sent += pages as u64;
    }
    Ok(sent)
}

/// What [`receive`] took in.
#[derive(Debug)]
pub struct Received {
    /// The VM's state, checked; restore it into the fresh VM.
    pub state: SnapshotState,
    /// Page records taken (a page sent in several rounds counts each time).
    pub pages: u64,
    /// Disk blocks taken, counted the same way.
    pub blocks: u64,
}

/// Takes a migrating VM's memory into `mem` (fresh: all zero, not yet run) and its writable
/// disks into `disks` (all zero, in the VM's order), and returns its state. The caller
/// restores the state, then calls [`answer`], then starts the vCPUs.
pub fn receive(
    link: &mut impl Read,
    mem: &GuestRam,
    disks: &[TargetDisk],
    host: &crate::snapshot::cpu::HostSupport,
) -> Result<Received, MigrationError> {
    stream::read_preamble(link)?;
    let mut scratch = Vec::new();
    let layout = match stream::read_record(link, None, &mut scratch, "the layout was due")? {
        Record::Layout(layout) => layout,
        other => {
            return Err(StreamError::Unexpected {
                found: other.name(),
                expected: "the layout",
            }
            .into());
        }
    };
    layout.check_matches(mem).map_err(MigrationError::Layout)?;
    match stream::read_record(link, None, &mut scratch, "the disks were due")? {
        Record::Disks(sizes) => disk::check_sizes(&sizes, disks)?,
        other => {
            return Err(StreamError::Unexpected {
                found: other.name(),
                expected: "the disks",
            }
            .into());
        }
    }
    let (mut pages, mut blocks) = (0u64, 0u64);
    let state = loop {
        match stream::read_record(link, Some(mem), &mut scratch, "pages or the state were due")? {
            Record::Pages { pages: n, .. } => pages += n as u64,
            Record::Blocks { disk, offset, len } => {
                let data = &scratch[stream::BLOCKS_HEADER..stream::BLOCKS_HEADER + len];
                disk::write_blocks(disks, disk, offset, data)?;
                blocks += (len as u64).div_ceil(PAGE as u64);
            }
            Record::State(bytes) => {
                let state: SnapshotState = crate::snapshot::format::decode(&bytes)?;
                state
                    .memory
                    .check_matches(mem)
                    .map_err(MigrationError::Layout)?;
                state.validate(host)?;
                break state;
            }
            other => {
                return Err(StreamError::Unexpected {
                    found: other.name(),
                    expected: "pages or the state",
                }
                .into());
            }
        }
    };
    match stream::read_record(link, None, &mut scratch, "the end of the stream was due")? {
        Record::Done => {
            disk::sync(disks)?;
            Ok(Received {
                state,
                pages,
                blocks,
            })
        }
        other => Err(StreamError::Unexpected {
            found: other.name(),
            expected: "the end of the stream",
        }
        .into()),
    }
}

/// The target's answer: `Ok(())` when its copy is restored and about to run (send it just
/// before the vCPUs start), the error when it will not run the VM.
pub fn answer(
    link: &mut impl Write,
    outcome: Result<(), &dyn std::fmt::Display>,
) -> Result<(), StreamError> {
    match outcome {
        Ok(()) => stream::write_answer(link, None),
        Err(why) => stream::write_answer(link, Some(&why.to_string())),
    }
}
