//! Snapshots: a paused VM's vCPUs, interrupt controllers, clock and memory, saved to a folder,
//! and restored into a fresh VM.
//!
//! # The folder
//! A snapshot is a folder (mode 0700) of two files (mode 0600):
//! - [`STATE_FILE`] (`state.bin`): a fixed header (magic, format version, body length, SHA-256
//!   of the body; see [`mod@format`]) and a CBOR body, the [`SnapshotState`]: the VMM version that
//!   wrote it, the guest RAM layout, every vCPU's state, the VM-wide state, and the state of
//!   the UART and the i8042, and every virtio device's transport and queues.
//! - [`MEMORY_FILE`] (`memory.bin`): guest RAM, region after region, sparse: only pages with a
//!   non-zero byte are written ([`memory`]). A guest of 256 MiB that touched 30 MiB gives a file
//!   256 MiB long that takes about 30 MiB on disk.
//!
//! The memory file is written first and the state file last, so a folder without a state file
//! is an unfinished snapshot, and restoring it fails on the missing state file.
//!
//! Restoring refuses, with a [`SnapshotError`] that says which: another magic or format
//! version, a body whose checksum does not match, a truncated or oversized state file, a memory
//! file shorter or longer than the state says, a VM whose memory size or layout differs, a
//! vCPU state for another vCPU or with impossible counts. Nothing is allocated from a length
//! the file gives before that length is checked against the file's size and a fixed maximum.
//! The checksum finds damage, not forgery: whoever can write the folder can write a matching
//! checksum, so a snapshot is trusted exactly as much as the folder that holds it.
//!
//! # What is saved
//! Per vCPU ([`cpu::VcpuState`]): CPUID (`KVM_GET_CPUID2`), the TSC frequency
//! (`KVM_GET_TSC_KHZ`, where the host has it), regs, sregs, fpu, xsave and xcrs (where the host
//! has them), debug registers, the LAPIC, the MSRs, vCPU events and the MP state.
//!
//! The MSRs are those of `KVM_GET_MSR_INDEX_LIST`, the list KVM itself gives of the MSRs it
//! saves and restores for migration, less those KVM will not read for this vCPU: `KVM_GET_MSRS`
//! stops at the first MSR it cannot read (a feature this guest's CPUID lacks, a write-only
//! MSR), which is left out, and reading goes on after it. A fixed list would go stale with the
//! kernel; KVM's own list does not.
//!
//! Per VM ([`cpu::VmState`]): the master and slave PICs and the IOAPIC (`KVM_GET_IRQCHIP`), the
//! PIT (`KVM_GET_PIT2`) and the kvmclock base (`KVM_GET_CLOCK`).
//!
//! Devices ([`DeviceStates`]): the COM1 UART's registers and receive FIFO, and the i8042's
//! registers and output queue. Only a vCPU touches these two, so they are still while the
//! vCPUs are parked. A restored VM's UART and i8042 are built from them before any vCPU runs.
//!
//! Virtio devices ([`VirtioStates::Saved`], one [`VirtioDeviceState`] per virtio-mmio slot:
//! vsock, each disk and the network device): the transport's registers (status, feature selects, acknowledged
//! features, queue select, interrupt status, config generation), each queue's size, ready bit,
//! ring addresses and `next_avail`/`next_used`, and the device's offered features and config
//! space, which stand for its own state (vsock: the guest CID; block: the capacity and limits;
//! see [`crate::devices::virtio::state`]; net: the MAC). A frame the network device held for
//! want of a receive buffer is not saved, as a network may drop any frame. Vsock connections are not saved: the virtio spec
//! (1.2 §5.10.6.6) has the device reset its transport after a migration, and so does a restore.
//!
//! # Taking a snapshot
//! The VM must be paused (the control socket's `snapshot` request refuses otherwise). KVM's
//! vCPU ioctls must not race `KVM_RUN` on the same vCPU, so each vCPU saves its own state on its
//! own thread while it is parked: the control thread sends it a [`VcpuCommand`] and wakes the
//! parked threads ([`crate::vcpu::RunGate::notify`]); each runs the command and answers on a
//! channel. The VM-wide state and the memory are then read by the control thread. The virtio
//! device threads were paused with the vCPUs (and are paused again, harmlessly, before the
//! snapshot): none writes guest memory while it is copied, and each sends its queues' positions
//! back on its command channel ([`crate::devices::virtio::worker_link`]).
//!
//! # Restoring, and in which order
//! A restored VM is built like a new one (TSS and identity map, irqchip and PIT, memory slots,
//! vCPUs), but instead of a kernel its memory is read from the memory file, and then:
//! 1. the irqchip (PICs, IOAPIC) and the PIT, before any vCPU state: a vCPU's LAPIC and
//!    pending events refer to them;
//! 2. per vCPU: CPUID first (it decides which xsave parts, MSRs and LAPIC features are valid),
//!    the TSC frequency, sregs (CR0, CR4 and EFER decide the mode the rest is read in), regs,
//!    fpu, xsave, xcrs (XCR0 needs CR4.OSXSAVE), debug registers, the MP state (running,
//!    halted, waiting for SIPI), the LAPIC, then the MSRs with the TSC first and the TSC
//!    deadline last (it is compared with the TSC and only means something once the LAPIC timer
//!    is in TSC-deadline mode), and the vCPU events last: pending exceptions, interrupts, NMIs
//!    and a latched INIT, which KVM checks against the LAPIC and the MP state already set;
//! 3. the clock, last, just before the vCPUs start, without the saved flags: the guest's
//!    monotonic clock goes on from the saved value instead of jumping by the time the snapshot
//!    lay on disk. The guest's wall clock is therefore behind after a restore until something
//!    in the guest sets it.
//!
//! The two files are opened read-only before the VMM enters its jail ([`SnapshotFiles`], held
//! by [`crate::HostDevices`]), so a snapshot is restored where it lies, in the daemon's store:
//! nothing is copied for the new VM, nothing of the store is bound into the jail, and the
//! jailed VMM holds only read-only descriptors of the two files (it cannot change a snapshot
//! that other VMs restore too).
//!
//! Memory is not read at all: the guest's RAM is the memory file mapped `MAP_PRIVATE`
//! ([`map_memory`], before the VM's memory slots are registered), so a restore costs the same
//! whatever the guest had touched, and a page is read from the page cache only when the guest
//! or a device first touches it. A write makes the page the VM's own (copy-on-write); the file
//! is never written, and copies restored from one snapshot share its unwritten pages. (We
//! measured reading the 40 MiB of data of a 256 MiB guest into anonymous memory at 0.9 to 2 s
//! in our nested test machines, most of a restore; mapping it takes nothing.) What the
//! mapping asks of the file:
//! - it must keep its length while the VM runs, since a page past a shortened end would fault
//!   the VMM. The daemon's store never changes a stored file, and deleting a snapshot only
//!   unlinks it: a mapped file lives on until the last VM that maps it ends;
//! - on tmpfs, a hole that the guest touches becomes an allocated (zero) page of the file, as
//!   tmpfs has no other page cache; on a disk file system it stays a hole.
//!
//! [`restore`] and [`memory::read_memory`], which read the file into fresh anonymous memory
//! with `pread64`, remain for callers that build their own memory (the unit tests).
//!
//! After the clock, the virtio devices, which were built as for a new VM: each transport is
//! checked against its saved state (same device type, offered features, config space and
//! queues; a ready queue's size a non-zero power of two, its rings in guest memory) and takes
//! it, and an activated device's thread gets its queues at their saved positions. A pending
//! interrupt is raised again (its irqfd edge belonged to the old process). A state that does
//! not fit is refused with [`SnapshotError::VirtioState`], which names the slot and the fault.
//! In a VM restored paused the device threads are paused before they get their queues, and
//! start with the vCPUs' resume. The restored vsock device drops every host connection and sends
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on its event queue, so the guest's driver drops its
//! sockets and its programs reconnect.
//!
//! A state written without virtio state ([`VirtioStates::NotSaved`]; the VMM never writes one)
//! is restored only when asked ([`RestoreConfig::without_devices`]), with the devices reset:
//! right only for a guest that never set up its virtio devices.
//!
//! # Not done here
//! Keeping snapshots (a store, names, listing, removal), which is the daemon's part; and
//! nested virtualization state
//! (`KVM_GET_NESTED_STATE`; the VMM does not expose VMX/SVM to its guests).
//!
//! # Security
//! A snapshot holds the whole of guest memory, and so whatever secrets the guest held: keys,
//! tokens, the user's data. Its files are created mode 0600 and its folder 0700, by the VMM's
//! (jailed) uid, never over an existing file; the control socket takes only a relative folder
//! name without `..`, created inside the VM's folder, so a client cannot make the VMM write
//! elsewhere. Whoever moves or stores snapshots must keep them as secret as the VM itself.
//!
//! A restored virtio state is checked as the transport checks a driver's setup (sizes, ring
//! alignment, rings inside guest memory, only offered features) before a device thread gets a
//! queue, so a damaged or forged state file cannot point a device outside guest memory or
//! panic the VMM; it can only be refused.
//!
//! The file-size limit of the jail ([`crate::jail::file_size_limit`]) counts the memory file.

pub mod cpu;
pub mod format;
pub mod memory;

use crate::memory::GuestRam;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};

use crate::devices::i8042::{I8042, I8042State};
use crate::devices::serial::UartState;
use crate::devices::virtio::state::{QuiesceError, VirtioDeviceState, VirtioStateError};
use serde::{Deserialize, Serialize};

pub use cpu::{HostSupport, VcpuState, VmState};
pub use memory::{MemoryState, MemoryWritten};

/// The state file's name inside a snapshot folder.
pub const STATE_FILE: &str = "state.bin";
/// The memory file's name inside a snapshot folder.
pub const MEMORY_FILE: &str = "memory.bin";
/// What a state without virtio state lacks.
pub const NOT_SAVED: &str = "virtio device state (the virtio-mmio transports and queues of vsock, the disks and the network device)";
/// Longest snapshot folder name the control socket accepts.
pub const MAX_NAME_LEN: usize = 255;

/// Errors from taking, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file or folder operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not start with the magic.
    #[error("not a snapshot state file (bad magic)")]
    BadMagic,
    /// The state file is of another format version.
    #[error(
        "snapshot format version {found} is not supported (this VMM reads version {supported})"
    )]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this VMM reads.
        supported: u32,
    },
    /// The header has flags this VMM does not know.
    #[error("snapshot header has unknown flags {0:#x}")]
    UnknownFlags(u32),
    /// The body's SHA-256 differs from the header's.
    #[error("snapshot state checksum mismatch: the state file is damaged")]
    ChecksumMismatch,
    /// The state file is shorter than its header says.
    #[error("snapshot state file is truncated: {found} bytes of {expected}")]
    TruncatedState {
        /// Bytes the header calls for.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The state file has bytes after its body.
    #[error("snapshot state file has {extra} bytes after its body")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The body is larger than any state this VMM writes.
    #[error("snapshot state body of {found} bytes is over the {max}-byte limit")]
    OversizedState {
        /// Its size.
        found: u64,
        /// The limit.
        max: u64,
    },
    /// Encoding the state failed.
    #[error("encode the snapshot state: {0}")]
    Encode(String),
    /// The body is not a valid state.
    #[error("decode the snapshot state: {0}")]
    Decode(String),
    /// The memory file is shorter than the state says.
    #[error("snapshot memory file is truncated: {found} bytes of {expected}")]
    MemoryFileTruncated {
        /// Its length per the state.
        expected: u64,
        /// Its length on disk.
        found: u64,
    },
    /// The memory file is longer than the state says.
    #[error("snapshot memory file is {found} bytes, more than the {expected} the state says")]
    MemoryFileOversized {
        /// Its length per the state.
        expected: u64,
        /// Its length on disk.
        found: u64,
    },
    /// The snapshot's guest RAM size differs from the VM's.
    #[error("snapshot has {snapshot} bytes of guest memory, the VM has {vm}")]
    MemorySizeMismatch {
        /// Bytes in the snapshot.
        snapshot: u64,
        /// Bytes in the VM.
        vm: u64,
    },
    /// The snapshot's memory layout is inconsistent or differs from the VM's.
    #[error("snapshot memory layout: {0}")]
    MemoryLayout(String),
    /// Copying guest memory failed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A KVM ioctl failed.
    #[error("{ioctl}{} failed", cpu.map(|c| format!(" on vCPU {c}")).unwrap_or_default())]
    Kvm {
        /// The ioctl's name.
        ioctl: &'static str,
        /// The vCPU, for a vCPU ioctl.
        cpu: Option<u8>,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than asked.
    #[error("KVM_SET_MSRS on vCPU {cpu} refused MSR {msr:#x}")]
    MsrRefused {
        /// The vCPU.
        cpu: u8,
        /// The first MSR not set.
        msr: u32,
    },
    /// Building a KVM array (MSRs, CPUID) failed.
    #[error("build a KVM array")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// The host's xsave area is larger than `kvm_xsave`.
    #[error("the host's xsave area is {0} bytes, more than the 4096 this format holds")]
    XsaveTooLarge(i32),
    /// A vCPU state is unusable.
    #[error("snapshot state of vCPU {cpu}: {what}")]
    BadVcpuState {
        /// The vCPU it was meant for.
        cpu: u8,
        /// What is wrong.
        what: String,
    },
    /// The VM-wide state is unusable.
    #[error("snapshot VM state: {0}")]
    BadVmState(String),
    /// The snapshot's vCPU count does not fit.
    #[error("snapshot has {snapshot} vCPUs, the VM {vm}")]
    VcpuCount {
        /// vCPUs in the snapshot.
        snapshot: usize,
        /// vCPUs in the VM.
        vm: usize,
    },
    /// The VM is not paused.
    #[error("the VM is not paused: pause it before taking a snapshot")]
    NotPaused,
    /// A vCPU did not answer (it is stopping, or was resumed).
    #[error("vCPU {cpu} did not save its state within {timeout:?}")]
    VcpuTimeout {
        /// The vCPU.
        cpu: u8,
        /// How long it was given.
        timeout: Duration,
    },
    /// The snapshot folder name is not a plain relative path.
    #[error("snapshot folder {0:?} must be a relative path of plain names (no '..', not absolute)")]
    BadFolderName(String),
    /// A device does not take its saved state.
    #[error("snapshot state of the {device}: {detail}")]
    DeviceState {
        /// Which device.
        device: &'static str,
        /// Why.
        detail: String,
    },
    /// A virtio device's state cannot be saved or restored.
    #[error("snapshot state of the virtio device in slot {slot}")]
    VirtioState {
        /// Its virtio-mmio slot.
        slot: u32,
        /// Why.
        #[source]
        source: VirtioStateError,
    },
    /// A virtio device thread did not pause.
    #[error("pause the virtio devices")]
    Quiesce(#[source] QuiesceError),
    /// The snapshot holds no virtio device state, and restoring without it was not asked for.
    #[error(
        "this snapshot holds no {NOT_SAVED}; restoring would reset them under the guest \
         (restore without it only a guest that never set up its virtio devices)"
    )]
    DeviceStateNotSaved,
}

impl SnapshotError {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates `path` for writing, mode 0600; an existing file is an error (`O_EXCL`).
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// The emulated devices' state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The COM1 UART: registers and receive FIFO.
    pub serial: UartState,
    /// The i8042: registers and output queue.
    pub i8042: I8042State,
    /// The virtio devices.
    pub virtio: VirtioStates,
}

impl DeviceStates {
    /// The devices as they are at power-on (what a VM without these devices would have).
    pub fn power_on() -> Self {
        Self {
            serial: UartState::default(),
            i8042: I8042::new(Box::new(|| {})).state(),
            virtio: VirtioStates::NotSaved,
        }
    }
}

/// Which virtio device state a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioStates {
    /// Not saved (a state written by hand, for a VM whose guest never set up its virtio
    /// devices): restored only when asked (`--restore-without-devices`), the devices reset.
    NotSaved,
    /// Every virtio device of the VM, by slot: what the VMM writes.
    Saved(Vec<VirtioDeviceState>),
}

/// Reads the emulated devices' state: called by the snapshot thread while the vCPUs are
/// parked and the virtio devices paused (so nothing changes a device under it).
pub type SaveDevices = Arc<dyn Fn() -> Result<DeviceStates, SnapshotError> + Send + Sync>;

/// The state file's body.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The VMM version that wrote it (informative; the format version decides).
    pub vmm_version: String,
    /// Guest RAM layout and the memory file's length.
    pub memory: MemoryState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The irqchip, PIT and clock.
    pub vm: VmState,
    /// Device state.
    pub devices: DeviceStates,
}

impl SnapshotState {
    /// Checks the counts a state file could get wrong.
    pub fn validate(&self, host: &HostSupport) -> Result<(), SnapshotError> {
        let n = self.vcpus.len();
        if n == 0 || n > usize::from(crate::MAX_VCPUS) {
            return Err(SnapshotError::VcpuCount {
                snapshot: n,
                vm: n.clamp(1, usize::from(crate::MAX_VCPUS)),
            });
        }
        for (i, vcpu) in (0u8..).zip(&self.vcpus) {
            vcpu.validate(i, host)?;
        }
        Ok(())
    }
}

/// Work a parked vCPU thread does on its own vCPU.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Save the vCPU's state and send it back.
    Save {
        /// What the host supports.
        host: Arc<HostSupport>,
        /// Where the state goes.
        reply: Sender<Result<VcpuState, SnapshotError>>,
    },
}

impl VcpuCommand {
    /// Runs the command on `vcpu` (index `index`); called by the vCPU's thread while parked.
    pub fn run(self, vcpu: &VcpuFd, index: u8) {
        match self {
            VcpuCommand::Save { host, reply } => {
                let _ = reply.send(VcpuState::capture(vcpu, index, &host));
            }
        }
    }
}

/// Runs every command waiting in `commands`: what a parked vCPU thread does when woken.
pub fn run_pending(commands: &Receiver<VcpuCommand>, vcpu: &VcpuFd, index: u8) {
    while let Ok(command) = commands.try_recv() {
        command.run(vcpu, index);
    }
}

/// Checks a snapshot folder name from the control socket: relative, plain names only.
pub fn folder_name(name: &str) -> Result<PathBuf, SnapshotError> {
    let bad = || SnapshotError::BadFolderName(name.to_owned());
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(bad());
    }
    let path = Path::new(name);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    Ok(path.to_path_buf())
}

/// What the VM gives a snapshot: the parts the taking thread reads.
#[derive(Clone)]
pub struct SnapshotSource {
    /// The VM file (irqchip, PIT, clock).
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestRam,
    /// One command channel per vCPU thread, in index order.
    pub vcpus: Vec<Sender<VcpuCommand>>,
    /// What the host supports.
    pub host: Arc<HostSupport>,
    /// The emulated devices' state.
    pub devices: SaveDevices,
    /// The writable disks, in order: a live migration copies them (a snapshot does not: a
    /// restored copy gets disks of its own).
    pub disks: Vec<crate::migration::SourceDisk>,
}

impl std::fmt::Debug for SnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSource")
            .field("vcpus", &self.vcpus.len())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// What [`take`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// vCPUs saved.
    pub vcpus: usize,
    /// The memory file's length.
    pub memory_bytes: u64,
    /// Bytes of it written (non-zero pages).
    pub memory_data_bytes: u64,
}

/// Takes a snapshot of a paused VM into the new folder `dir` (its parent must exist).
/// `parked` says whether every vCPU thread is parked; `wake` wakes the parked threads so they
/// run their commands; each vCPU has `timeout` to answer.
pub fn take(
    dir: &Path,
    source: &SnapshotSource,
    parked: bool,
    wake: &dyn Fn(),
    timeout: Duration,
) -> Result<SnapshotSummary, SnapshotError> {
    if !parked {
        return Err(SnapshotError::NotPaused);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| SnapshotError::io("create the snapshot folder", dir, e))?;
    let state = capture(source, parked, wake, timeout)?;
    let written = memory::write_memory(&dir.join(MEMORY_FILE), &source.mem)?;
    format::write_file(&dir.join(STATE_FILE), &state)?;
    Ok(SnapshotSummary {
        vcpus: state.vcpus.len(),
        memory_bytes: written.file_len,
        memory_data_bytes: written.data_bytes,
    })
}

/// Reads the state of a paused VM, everything but its memory's contents: each vCPU's, saved by
/// its own parked thread, the VM-wide state and the devices'. What [`take`] writes to the state
/// file, and what a live migration sends once the VM is stopped.
pub fn capture(
    source: &SnapshotSource,
    parked: bool,
    wake: &dyn Fn(),
    timeout: Duration,
) -> Result<SnapshotState, SnapshotError> {
    if !parked {
        return Err(SnapshotError::NotPaused);
    }
    let mut replies = Vec::with_capacity(source.vcpus.len());
    for (cpu, commands) in (0u8..).zip(&source.vcpus) {
        let (reply, answer) = channel();
        let command = VcpuCommand::Save {
            host: source.host.clone(),
            reply,
        };
        if commands.send(command).is_err() {
            return Err(SnapshotError::VcpuTimeout {
                cpu,
                timeout: Duration::ZERO,
            });
        }
        replies.push(answer);
    }
    wake();
    let deadline = Instant::now() + timeout;
    let mut vcpus = Vec::with_capacity(replies.len());
    for (cpu, answer) in (0u8..).zip(replies) {
        let wait = deadline.saturating_duration_since(Instant::now());
        let state = answer
            .recv_timeout(wait)
            .map_err(|_| SnapshotError::VcpuTimeout { cpu, timeout })??;
        vcpus.push(state);
    }
    let vm = VmState::capture(&source.vm)?;
    let devices = (source.devices)()?;
    Ok(SnapshotState {
        vmm_version: env!("CARGO_PKG_VERSION").to_owned(),
        memory: MemoryState::of(&source.mem),
        vcpus,
        vm,
        devices,
    })
}

/// Reads and checks the state file of the snapshot in `dir`.
pub fn read_state(dir: &Path, host: &HostSupport) -> Result<SnapshotState, SnapshotError> {
    read_state_from(&SnapshotFiles::open(dir)?, host)
}

/// Reads and checks the state file of the snapshot open as `files`.
pub fn read_state_from(
    files: &SnapshotFiles,
    host: &HostSupport,
) -> Result<SnapshotState, SnapshotError> {
    let state: SnapshotState = format::read_from(&files.state, &files.dir.join(STATE_FILE))?;
    state.validate(host)?;
    Ok(state)
}

/// A snapshot's two files, open for reading. The VMM opens them before it enters its jail
/// ([`crate::HostDevices::open`]), so a snapshot is restored where it lies, read-only, with
/// no copy of it made for the VM and nothing of it visible inside the jail.
#[derive(Debug)]
pub struct SnapshotFiles {
    /// The snapshot folder (for errors and logs).
    pub dir: PathBuf,
    /// [`STATE_FILE`].
    pub state: File,
    /// [`MEMORY_FILE`].
    pub memory: File,
}

impl SnapshotFiles {
    /// Opens the two files of the snapshot in `dir`, read-only.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let open = |name: &str, what: &'static str| {
            let path = dir.join(name);
            File::open(&path).map_err(|source| SnapshotError::io(what, &path, source))
        };
        Ok(Self {
            dir: dir.to_owned(),
            state: open(STATE_FILE, "read the state file")?,
            memory: open(MEMORY_FILE, "read the memory file")?,
        })
    }
}

/// Restores `state` (read from `dir`) into a fresh VM: `vm` made with the in-kernel irqchip and
/// PIT, `mem` fresh and registered, `vcpus` created and not yet run; the memory file is read
/// into `mem` ([`memory::read_memory`]). Everything but the clock: call
/// [`VmState::restore_clock`] just before the vCPUs start. (The VMM itself maps the memory
/// file instead: [`map_memory`], then [`restore_vm`].)
pub fn restore(
    dir: &Path,
    state: &SnapshotState,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    mem: &GuestRam,
    host: &HostSupport,
) -> Result<(), SnapshotError> {
    check_vcpu_count(state, vcpus)?;
    state.validate(host)?;
    memory::read_memory(&dir.join(MEMORY_FILE), &state.memory, mem)?;
    restore_cpus(state, vm, vcpus, host)
}

fn check_vcpu_count(state: &SnapshotState, vcpus: &[VcpuFd]) -> Result<(), SnapshotError> {
    if state.vcpus.len() != vcpus.len() {
        return Err(SnapshotError::VcpuCount {
            snapshot: state.vcpus.len(),
            vm: vcpus.len(),
        });
    }
    Ok(())
}

/// The irqchip, the PIT and every vCPU's state, in that order (memory is in place already).
fn restore_cpus(
    state: &SnapshotState,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    host: &HostSupport,
) -> Result<(), SnapshotError> {
    check_vcpu_count(state, vcpus)?;
    let started = Instant::now();
    state.vm.restore_devices(vm)?;
    for (saved, fd) in state.vcpus.iter().zip(vcpus) {
        saved.restore(fd, host)?;
    }
    tracing::debug!(ms = started.elapsed().as_millis(), "vCPU state restored");
    Ok(())
}

/// How to start a VM from a snapshot (`nanoclaw-vmm --restore DIR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The snapshot folder.
    pub dir: PathBuf,
    /// Start with every vCPU parked, to be resumed on the control socket.
    pub paused: bool,
    /// Restore a snapshot without virtio device state ([`VirtioStates::NotSaved`]): only right
    /// for a guest that never set up its virtio devices. A snapshot with it is restored whole
    /// either way.
    pub without_devices: bool,
}

/// Reads the snapshot `restore` names, open as `files`, and checks it can be restored as asked: what
/// [`crate::machine::Vmm`] does first, before it builds the devices from the state.
pub fn open_for_restore(
    restore: &RestoreConfig,
    files: &SnapshotFiles,
    host: &HostSupport,
) -> Result<SnapshotState, SnapshotError> {
    let state = read_state_from(files, host)?;
    if state.devices.virtio == VirtioStates::NotSaved && !restore.without_devices {
        return Err(SnapshotError::DeviceStateNotSaved);
    }
    Ok(state)
}

/// Guest RAM of `mem_size` bytes mapped copy-on-write from the snapshot open as `files` (see
/// [`memory::map_memory_file`]): nothing of it is read before the guest touches it.
pub fn map_memory(
    files: &SnapshotFiles,
    state: &SnapshotState,
    mem_size: u64,
) -> Result<GuestRam, SnapshotError> {
    memory::map_memory_file(
        &files.memory,
        &files.dir.join(MEMORY_FILE),
        &state.memory,
        &crate::layout::ram_regions(mem_size),
    )
}

/// Restores the virtio devices' state from `state` into the VM's freshly built `devices`
/// (nothing for a state without it, restored only when asked: see [`open_for_restore`]). Call
/// it after [`restore_vm`] and before the vCPUs start.
pub fn restore_virtio(
    state: &SnapshotState,
    devices: &crate::devices::virtio::VirtioDevices,
) -> Result<(), SnapshotError> {
    match &state.devices.virtio {
        VirtioStates::NotSaved => Ok(()),
        VirtioStates::Saved(saved) => devices
            .restore(saved)
            .map_err(|(slot, source)| SnapshotError::VirtioState { slot, source }),
    }
}

/// Restores `state` (from [`open_for_restore`]) into a fresh VM whose memory was mapped from
/// the snapshot ([`map_memory`]), the clock included: call it last before the vCPUs start.
pub fn restore_vm(
    state: &SnapshotState,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    host: &HostSupport,
) -> Result<(), SnapshotError> {
    restore_cpus(state, vm, vcpus, host)?;
    state.vm.restore_clock(vm)
}

#[cfg(test)]
pub(crate) mod tests;
