//! Virtio devices over the virtio-mmio transport.
//!
//! # Layout
//! - [`mmio`]: the virtio-mmio v2 transport ([`mmio::MmioTransport`], a [`BusDevice`](crate::devices::bus::BusDevice)).
//! - [`vsock`]: the virtio-vsock device with the hybrid (Unix socket) backend.
//! - [`block`]: the virtio-blk device backed by a host file.
//! - [`net`]: the virtio-net device backed by a host TAP.
//! - [`worker_link`]: the front end's command channel to a device thread, shared by all, and
//!   how a device thread is paused.
//! - [`state`]: a device's saved transport and queue state, for snapshots.
//!
//! # Integration
//! The VMM calls [`attach_vsock`] once, [`attach_block`] once per disk and [`attach_net`] for
//! the network device, after creating the in-kernel irqchip and guest memory and before
//! starting the vCPUs, then adds each handle's `cmdline_arg` to the kernel command line, in slot
//! order.
//!
//! Thread model: the transport runs on whichever vCPU thread takes the MMIO exit (behind the
//! bus's per-device mutex). Queue work runs on one dedicated thread per device (`vsock-dev`,
//! `blk-dev<N>`, `net-dev`), which owns the device and its host resources (sockets, the backing
//! file, the TAP); the
//! two share no lock. The guest's queue notifications reach that thread through KVM ioeventfds
//! and its interrupts leave through a KVM irqfd, so the data path never takes a vCPU exit to
//! userspace. [`VsockHandle::stop`], [`BlockHandle::stop`] and [`NetHandle::stop`] (or dropping
//! the handle) stop and join the thread; the vsock one also removes the socket file.
//!
//! # Pausing and snapshots
//! [`VirtioDevices`] holds every transport the VMM attached, by slot: the control thread pauses
//! their threads after the vCPUs park and resumes them before the vCPUs run again (see
//! [`worker_link`]), and a snapshot saves and a restore takes each transport's state
//! ([`state`]). A new device kind needs only a [`mmio::VirtioDevice::control`] that returns
//! its [`worker_link::WorkerLink`] (its command type taking [`worker_link::WorkerControl`]),
//! a worker that calls [`worker_link::Quiesce::apply`] and skips its queues while paused, and
//! a [`VirtioDevices::add`] of its transport.

pub mod block;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod state;
pub mod vsock;
pub mod worker_link;

use crate::memory::GuestRam;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use self::block::{BlockDevice, BlockError, BlockFrontend, BlockWorker, DiskFile, DiskInfo};
use self::mmio::{IrqTrigger, MMIO_WINDOW_LEN, MmioTransport, regs};
use self::net::{NetBackend, NetDevice, NetError, NetFrontend, NetWorker};
use self::state::{QuiesceError, VirtioDeviceState, VirtioStateError};
use self::vsock::{VsockDevice, VsockError, VsockFrontend, VsockMuxer, VsockWorker};
use crate::devices::bus::{Bus, BusError};
use crate::seccomp::{self, ThreadKind};

pub use self::block::{BlockMetrics, BlockMetricsSnapshot};
pub use self::net::{NetMetrics, NetMetricsSnapshot};
pub use self::vsock::{VsockMetrics, VsockMetricsSnapshot};

/// Where a virtio-mmio device lives: its MMIO window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical base address of the window.
    pub base: u64,
    /// Window length; must be 0x1000.
    pub len: u64,
    /// The GSI the device interrupts on.
    pub gsi: u32,
}

impl MmioSlot {
    /// The kernel command-line argument declaring a device in this slot, e.g.
    /// `virtio_mmio.device=4K@0xd0000000:5`.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.gsi
        )
    }
}

/// A transport as the MMIO bus holds it.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Every virtio transport of the VM, by virtio-mmio slot: what pausing and snapshots work on.
#[derive(Clone, Default)]
pub struct VirtioDevices {
    devices: Vec<(u32, SharedTransport)>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(slot, _)| slot))
            .finish()
    }
}

fn lock(t: &SharedTransport) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl VirtioDevices {
    /// Adds the transport in virtio-mmio slot `slot`.
    pub fn add(&mut self, slot: u32, transport: SharedTransport) {
        self.devices.push((slot, transport));
    }

    /// How many devices there are.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Pauses every device thread (see [`worker_link`]); call it with the vCPUs parked. If one
    /// does not pause, those already paused are resumed and its error is returned.
    pub fn pause(&self) -> Result<(), QuiesceError> {
        for (i, (_, t)) in self.devices.iter().enumerate() {
            if let Err(e) = lock(t).pause() {
                for (_, t) in &self.devices[..i] {
                    let _ = lock(t).resume();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Lets every device thread walk its queues again. A thread that is gone is logged.
    pub fn resume(&self) {
        for (_, t) in &self.devices {
            if let Err(e) = lock(t).resume() {
                tracing::error!(error = %e, "cannot resume a virtio device");
            }
        }
    }

    /// Every device's state, in slot order of addition; the devices must be paused.
    pub fn save(&self) -> Result<Vec<VirtioDeviceState>, (u32, VirtioStateError)> {
        self.devices
            .iter()
            .map(|(slot, t)| {
                Ok(VirtioDeviceState {
                    slot: *slot,
                    transport: lock(t).save_state().map_err(|e| (*slot, e))?,
                })
            })
            .collect()
    }

    /// Restores `saved` into these freshly built devices: every saved slot must have a device
    /// here and every device here exactly one saved state. Each device checks its state before
    /// it takes it ([`MmioTransport::restore_state`]); the first refusal ends the restore (and
    /// the VMM, which does not run a half-restored VM).
    pub fn restore(&self, saved: &[VirtioDeviceState]) -> Result<(), (u32, VirtioStateError)> {
        for s in saved {
            if !self.devices.iter().any(|(slot, _)| *slot == s.slot) {
                let what = "the snapshot has a device here, this VM has none";
                return Err((s.slot, VirtioStateError::Slot { slot: s.slot, what }));
            }
        }
        for (slot, _) in &self.devices {
            let n = saved.iter().filter(|s| s.slot == *slot).count();
            if n != 1 {
                let what = if n == 0 {
                    "this VM has a device here, the snapshot has none"
                } else {
                    "the snapshot has more than one device here"
                };
                return Err((*slot, VirtioStateError::Slot { slot: *slot, what }));
            }
        }
        for s in saved {
            if let Some((_, t)) = self.devices.iter().find(|(slot, _)| *slot == s.slot) {
                lock(t)
                    .restore_state(&s.transport)
                    .map_err(|e| (s.slot, e))?;
            }
        }
        Ok(())
    }
}

/// Configuration of the vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The host listener path; guest connections to port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Callbacks into the VMM.
#[derive(Default)]
pub struct VsockHooks {
    /// Fires once, on the device thread, when the guest first sends `OP_REQUEST`, with the host
    /// port it connects to. Keep it short: it runs on the device thread.
    pub on_first_guest_connect: Option<Box<dyn FnOnce(u32) + Send>>,
}

impl std::fmt::Debug for VsockHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHooks")
            .field(
                "on_first_guest_connect",
                &self.on_first_guest_connect.is_some(),
            )
            .finish()
    }
}

/// Errors from attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The slot is not a 4 KiB window.
    #[error("virtio-mmio slot length must be 0x1000, got {0:#x}")]
    SlotLen(u64),
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved")]
    GuestCid(u64),
    /// Creating an eventfd failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// Registering the irqfd failed.
    #[error("cannot register irqfd for GSI {gsi}")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Registering a queue-notify ioeventfd failed.
    #[error("cannot register ioeventfd for queue {queue}")]
    RegisterIoevent {
        /// The queue index.
        queue: usize,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Inserting the transport on the MMIO bus failed.
    #[error("cannot insert virtio-mmio device on the bus")]
    Bus(#[source] BusError),
    /// Building the vsock device failed.
    #[error("cannot build the vsock device")]
    Vsock(#[source] VsockError),
    /// Building a block device failed.
    #[error("cannot build the block device")]
    Block(#[source] BlockError),
    /// Building the network device failed.
    #[error("cannot build the network device")]
    Net(#[source] NetError),
}

/// A running vsock device.
#[derive(Debug)]
pub struct VsockHandle {
    slot: MmioSlot,
    transport: Option<SharedTransport>,
    uds_path: PathBuf,
    metrics: Arc<VsockMetrics>,
    stop_evt: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl VsockHandle {
    /// The transport on the MMIO bus (set by the attach function).
    pub fn transport(&self) -> Option<&SharedTransport> {
        self.transport.as_ref()
    }

    /// The kernel command-line argument declaring the device, e.g.
    /// `virtio_mmio.device=4K@0xd0000000:5`.
    pub fn cmdline_arg(&self) -> String {
        self.slot.cmdline_arg()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Stops the device thread, waits for it, and removes the socket file. Open host streams
    /// are closed. The transport stays on the bus: later guest accesses still get answers, but
    /// queue notifications go nowhere.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if stop_thread(&mut self.thread, &self.stop_evt, "vsock") {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl Drop for VsockHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates the virtio-mmio transport and the vsock device, inserts the transport on `mmio_bus`
/// at `slot`, registers the irqfd (`slot.gsi`) and one ioeventfd per queue (on `QueueNotify`,
/// datamatch = queue index) with `vm`, binds the Unix listener at `cfg.uds_path`, and spawns
/// the device thread. The VMM must already have created the in-kernel irqchip.
pub fn attach_vsock(
    vm: &VmFd,
    mem: GuestRam,
    mmio_bus: &mut Bus,
    slot: MmioSlot,
    cfg: VsockConfig,
    hooks: VsockHooks,
) -> Result<VsockHandle, VirtioError> {
    // On any error below, dropping `handle` stops the thread and removes the socket.
    let (transport, mut handle) = spawn_vsock(mem, slot, cfg, hooks)?;
    handle.transport = Some(wire_transport(vm, mmio_bus, slot, transport)?);
    Ok(handle)
}

/// The device-independent half of `spawn_vsock` and `spawn_block`: creates the command and
/// stop eventfds, the command channel, the front end (`frontend`), the interrupt and the
/// virtio-mmio transport, then has `worker` build the device thread's body from the interrupt,
/// the transport's queue eventfds, the command receiver, the command eventfd and the stop
/// eventfd, and spawns it as `thread_name` (`spawn_err` maps a spawn failure). The thread
/// installs the seccomp filter of `kind` before it runs the body. Returns the transport, the
/// stop eventfd and the thread.
fn spawn_device_thread<C, F, R>(
    mem: GuestRam,
    thread_name: String,
    kind: ThreadKind,
    frontend: impl FnOnce(Sender<C>, Arc<EventFd>) -> F,
    worker: impl FnOnce(
        IrqTrigger,
        &[Arc<EventFd>],
        Receiver<C>,
        Arc<EventFd>,
        Arc<EventFd>,
    ) -> Result<R, VirtioError>,
    spawn_err: impl FnOnce(std::io::Error) -> VirtioError,
) -> Result<(MmioTransport, Arc<EventFd>, JoinHandle<()>), VirtioError>
where
    F: mmio::VirtioDevice + 'static,
    R: FnOnce() + Send + 'static,
{
    let new_evt = || {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(Arc::new)
            .map_err(VirtioError::EventFd)
    };
    let command_evt = new_evt()?;
    let stop_evt = new_evt()?;
    let (commands_tx, commands_rx) = std::sync::mpsc::channel();
    let frontend = frontend(commands_tx, command_evt.clone());
    let interrupt = IrqTrigger::new().map_err(VirtioError::EventFd)?;
    let transport = MmioTransport::new(mem, Box::new(frontend), interrupt.clone())
        .map_err(VirtioError::EventFd)?;
    let body = worker(
        interrupt,
        transport.queue_evts(),
        commands_rx,
        command_evt,
        stop_evt.clone(),
    )?;
    let thread = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            seccomp::confine_or_exit(kind);
            body()
        })
        .map_err(spawn_err)?;
    Ok((transport, stop_evt, thread))
}

/// Registers the transport's irqfd (`slot.gsi`) and one ioeventfd per queue (on `QueueNotify`,
/// datamatch = queue index) with `vm`, and inserts the transport on `mmio_bus` at `slot`.
fn wire_transport(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    slot: MmioSlot,
    transport: MmioTransport,
) -> Result<SharedTransport, VirtioError> {
    vm.register_irqfd(transport.interrupt().irq_evt(), slot.gsi)
        .map_err(|source| VirtioError::RegisterIrqfd {
            gsi: slot.gsi,
            source,
        })?;
    let notify = IoEventAddress::Mmio(slot.base + regs::QUEUE_NOTIFY);
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        vm.register_ioevent(evt, &notify, queue as u32)
            .map_err(|source| VirtioError::RegisterIoevent { queue, source })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus
        .insert(transport.clone(), slot.base, slot.len)
        .map_err(VirtioError::Bus)?;
    Ok(transport)
}

/// The KVM-free half of [`attach_vsock`]: builds the transport and the device, binds the
/// listener and spawns the device thread. The caller puts the transport on a bus and wires its
/// interrupt and queue eventfds (tests drive it directly).
pub fn spawn_vsock(
    mem: GuestRam,
    slot: MmioSlot,
    cfg: VsockConfig,
    hooks: VsockHooks,
) -> Result<(MmioTransport, VsockHandle), VirtioError> {
    if slot.len != MMIO_WINDOW_LEN {
        return Err(VirtioError::SlotLen(slot.len));
    }
    if cfg.guest_cid <= 2 || cfg.guest_cid >= u64::from(u32::MAX) {
        return Err(VirtioError::GuestCid(cfg.guest_cid));
    }
    let metrics = Arc::new(VsockMetrics::default());
    let muxer = VsockMuxer::new(
        cfg.guest_cid,
        cfg.uds_path.clone(),
        metrics.clone(),
        hooks.on_first_guest_connect,
    )
    .map_err(VirtioError::Vsock)?;

    let (transport, stop_evt, thread) = spawn_device_thread(
        mem,
        "vsock-dev".into(),
        ThreadKind::Vsock,
        |commands, command_evt| VsockFrontend::new(cfg.guest_cid, commands, command_evt),
        |interrupt, queue_evts, commands, command_evt, stop_evt| {
            let device = VsockDevice::new(cfg.guest_cid, muxer, interrupt, metrics.clone());
            let worker =
                VsockWorker::new(device, queue_evts.to_vec(), commands, command_evt, stop_evt)
                    .map_err(VirtioError::Vsock)?;
            Ok(move || {
                if let Err(e) = worker.run() {
                    tracing::error!(error = %e, "vsock device thread failed");
                }
            })
        },
        |e| VirtioError::Vsock(VsockError::Spawn(e)),
    )?;

    let handle = VsockHandle {
        slot,
        transport: None,
        uds_path: cfg.uds_path,
        metrics,
        stop_evt,
        thread: Some(thread),
    };
    Ok((transport, handle))
}

/// Configuration of one block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The backing file: a non-empty regular file whose size is a multiple of 512 bytes.
    pub path: PathBuf,
    /// Open the file read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// The `GET_ID` answer: 1 to 20 ASCII letters, digits, `-`, `_` or `.`.
    pub id: String,
}

/// A running block device.
#[derive(Debug)]
pub struct BlockHandle {
    slot: MmioSlot,
    transport: Option<SharedTransport>,
    id: String,
    read_only: bool,
    metrics: Arc<BlockMetrics>,
    stop_evt: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// A writable disk's file and log, for a live migration.
    migration: Option<crate::migration::SourceDisk>,
}

impl BlockHandle {
    /// A writable disk's file and log of written blocks, as a live migration sends them
    /// (`None` for a read-only disk).
    pub fn migration_disk(&self) -> Option<crate::migration::SourceDisk> {
        self.migration.clone()
    }

    /// The transport on the MMIO bus (set by the attach function).
    pub fn transport(&self) -> Option<&SharedTransport> {
        self.transport.as_ref()
    }

    /// The kernel command-line argument declaring the device, e.g.
    /// `virtio_mmio.device=4K@0xd0001000:6`.
    pub fn cmdline_arg(&self) -> String {
        self.slot.cmdline_arg()
    }

    /// The id the guest reads with `GET_ID`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Stops the device thread and waits for it; the backing file is closed (and unlocked).
    /// The transport stays on the bus: later guest accesses still get answers, but queue
    /// notifications go nowhere.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        stop_thread(
            &mut self.thread,
            &self.stop_evt,
            &format!("block {}", self.id),
        );
    }
}

impl Drop for BlockHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens and locks the backing file, creates the virtio-mmio transport and the block device,
/// inserts the transport on `mmio_bus` at `slot`, registers the irqfd (`slot.gsi`) and the
/// queue's ioeventfd with `vm`, and spawns the device thread (`thread_name`). The VMM must
/// already have created the in-kernel irqchip.
pub fn attach_block(
    vm: &VmFd,
    mem: GuestRam,
    mmio_bus: &mut Bus,
    slot: MmioSlot,
    cfg: BlockConfig,
    thread_name: String,
) -> Result<BlockHandle, VirtioError> {
    // On any error below, dropping `handle` stops the thread.
    let (transport, mut handle) = spawn_block(mem, slot, cfg, thread_name)?;
    handle.transport = Some(wire_transport(vm, mmio_bus, slot, transport)?);
    Ok(handle)
}

/// The KVM-free half of [`attach_block`]: opens the file, builds the transport and the device
/// and spawns the device thread. The caller puts the transport on a bus and wires its interrupt
/// and queue eventfd (tests drive it directly).
pub fn spawn_block(
    mem: GuestRam,
    slot: MmioSlot,
    cfg: BlockConfig,
    thread_name: String,
) -> Result<(MmioTransport, BlockHandle), VirtioError> {
    if slot.len != MMIO_WINDOW_LEN {
        return Err(VirtioError::SlotLen(slot.len));
    }
    if !crate::DiskConfig::is_valid_id(&cfg.id) {
        return Err(VirtioError::Block(BlockError::Id(cfg.id)));
    }
    let disk = DiskFile::open(&cfg.path, cfg.read_only).map_err(VirtioError::Block)?;
    let migration = match disk.dirty_log() {
        None => None,
        Some(dirty) => Some(crate::migration::SourceDisk {
            file: Arc::new(disk.try_clone_file().map_err(|source| {
                VirtioError::Block(BlockError::Duplicate {
                    path: cfg.path.clone(),
                    source,
                })
            })?),
            dirty,
        }),
    };
    let info = DiskInfo {
        sectors: disk.sectors(),
        read_only: cfg.read_only,
        id: cfg.id.clone().into_bytes(),
    };
    let metrics = Arc::new(BlockMetrics::default());

    let (transport, stop_evt, thread) = spawn_device_thread(
        mem,
        thread_name,
        ThreadKind::Block,
        {
            // The front end's features and config space come from its own copy of `info`.
            let info = info.clone();
            move |commands, command_evt| BlockFrontend::new(&info, commands, command_evt)
        },
        |interrupt, queue_evts, commands, command_evt, stop_evt| {
            // The block frontend has exactly one queue.
            let queue_evt = queue_evts[0].clone();
            let device = BlockDevice::new(disk, info, interrupt, metrics.clone());
            let worker = BlockWorker::new(device, queue_evt, commands, command_evt, stop_evt)
                .map_err(VirtioError::Block)?;
            Ok(move || {
                if let Err(e) = worker.run() {
                    tracing::error!(error = %e, "block device thread failed");
                }
            })
        },
        |e| VirtioError::Block(BlockError::Spawn(e)),
    )?;

    let handle = BlockHandle {
        slot,
        transport: None,
        id: cfg.id,
        read_only: cfg.read_only,
        metrics,
        stop_evt,
        thread: Some(thread),
        migration,
    };
    Ok((transport, handle))
}

/// A running network device.
#[derive(Debug)]
pub struct NetHandle {
    slot: MmioSlot,
    transport: Option<SharedTransport>,
    mac: [u8; 6],
    metrics: Arc<NetMetrics>,
    stop_evt: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl NetHandle {
    /// The transport on the MMIO bus (set by the attach function).
    pub fn transport(&self) -> Option<&SharedTransport> {
        self.transport.as_ref()
    }

    /// The kernel command-line argument declaring the device, e.g.
    /// `virtio_mmio.device=4K@0xd0009000:14`.
    pub fn cmdline_arg(&self) -> String {
        self.slot.cmdline_arg()
    }

    /// The MAC address the guest reads.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Stops the device thread and waits for it; the backend (the TAP) is closed and a frame
    /// still pending is dropped. The transport stays on the bus: later guest accesses still get
    /// answers, but queue notifications go nowhere.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        stop_thread(&mut self.thread, &self.stop_evt, "net");
    }
}

/// Stops a device thread (if it still runs) through its stop eventfd and waits for it; shared
/// by every device handle's `stop` and `drop`. Answers whether the thread was stopped here
/// (false: it was already, or it could not be signalled, which is logged).
fn stop_thread(thread: &mut Option<JoinHandle<()>>, stop_evt: &EventFd, device: &str) -> bool {
    let Some(thread) = thread.take() else {
        return false;
    };
    if let Err(e) = stop_evt.write(1) {
        tracing::error!(error = %e, device, "cannot signal the device thread");
        return false;
    }
    if thread.join().is_err() {
        tracing::error!(device, "device thread panicked");
    }
    true
}

impl Drop for NetHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates the virtio-mmio transport and the network device over `backend` (an attached
/// [`net::Tap`] in the VMM), inserts the transport on `mmio_bus` at `slot`, registers the
/// irqfd (`slot.gsi`) and both queues' ioeventfds with `vm`, and spawns the device thread
/// (`net-dev`). The VMM must already have created the in-kernel irqchip.
pub fn attach_net<B>(
    vm: &VmFd,
    mem: GuestRam,
    mmio_bus: &mut Bus,
    slot: MmioSlot,
    mac: [u8; 6],
    backend: B,
) -> Result<NetHandle, VirtioError>
where
    B: NetBackend + std::os::fd::AsRawFd + 'static,
{
    // On any error below, dropping `handle` stops the thread.
    let (transport, mut handle) = spawn_net(mem, slot, mac, backend)?;
    handle.transport = Some(wire_transport(vm, mmio_bus, slot, transport)?);
    Ok(handle)
}

/// The KVM-free half of [`attach_net`]: builds the transport and the device and spawns the
/// device thread. The caller puts the transport on a bus and wires its interrupt and queue
/// eventfds (tests drive it directly).
pub fn spawn_net<B>(
    mem: GuestRam,
    slot: MmioSlot,
    mac: [u8; 6],
    backend: B,
) -> Result<(MmioTransport, NetHandle), VirtioError>
where
    B: NetBackend + std::os::fd::AsRawFd + 'static,
{
    if slot.len != MMIO_WINDOW_LEN {
        return Err(VirtioError::SlotLen(slot.len));
    }
    if !crate::NetConfig::is_valid_mac(&mac) {
        return Err(VirtioError::Net(NetError::Mac));
    }
    let metrics = Arc::new(NetMetrics::default());
    let (transport, stop_evt, thread) = spawn_device_thread(
        mem,
        "net-dev".into(),
        ThreadKind::Net,
        |commands, command_evt| NetFrontend::new(mac, commands, command_evt),
        |interrupt, queue_evts, commands, command_evt, stop_evt| {
            // The net frontend has exactly two queues: receive, then transmit.
            let queue_evts = [queue_evts[0].clone(), queue_evts[1].clone()];
            let device = NetDevice::new(backend, interrupt, metrics.clone());
            let worker = NetWorker::new(device, queue_evts, commands, command_evt, stop_evt)
                .map_err(VirtioError::Net)?;
            Ok(move || {
                if let Err(e) = worker.run() {
                    tracing::error!(error = %e, "net device thread failed");
                }
            })
        },
        |e| VirtioError::Net(NetError::Spawn(e)),
    )?;
    let handle = NetHandle {
        slot,
        transport: None,
        mac,
        metrics,
        stop_evt,
        thread: Some(thread),
    };
    Ok((transport, handle))
}

/// Rate limit for log lines a guest can trigger: the first [`RateLimitedLog::BURST`] pass,
/// then one in every [`RateLimitedLog::EVERY`].
#[derive(Debug)]
pub struct RateLimitedLog {
    count: AtomicU64,
}

impl RateLimitedLog {
    /// Lines always logged.
    pub const BURST: u64 = 10;
    /// After the burst, log one line in this many.
    pub const EVERY: u64 = 1000;

    /// A fresh limiter (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
        }
    }

    /// Whether this occurrence may be logged.
    pub fn allow(&self) -> bool {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        n < Self::BURST || n.is_multiple_of(Self::EVERY)
    }

    /// How many occurrences [`RateLimitedLog::allow`] let through so far.
    pub fn passed(&self) -> u64 {
        let n = self.count.load(Ordering::Relaxed);
        let burst = n.min(Self::BURST);
        // Occurrences 0..n that are multiples of EVERY, less those already in the burst.
        burst + n.div_ceil(Self::EVERY) - burst.div_ceil(Self::EVERY)
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod snapshot_tests;

#[cfg(test)]
mod tests {
    use super::mmio::{INT_VRING, status};
    use super::vsock::test_utils::{GUEST_CID, GuestDriver, Harness, MEM_SIZE, QSIZE, RxPkt};
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;

    #[test]
    fn rate_limited_log_passes_burst_then_one_in_every() {
        let l = RateLimitedLog::new();
        let mut passed = 0;
        for i in 1..=5000u64 {
            passed += u64::from(l.allow());
            assert_eq!(l.passed(), passed, "after {i}");
        }
        assert_eq!(passed, RateLimitedLog::BURST + 4); // 1000, 2000, 3000, 4000
        assert_eq!(RateLimitedLog::new().passed(), 0);
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Waits (on the device thread) for the guest to receive one packet.
    fn wait_rx(drv: &mut GuestDriver, t: &mut MmioTransport) -> RxPkt {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if drv.outstanding_rx() == 0 {
                drv.add_rx_buffers(1);
                w(t, regs::QUEUE_NOTIFY, 0);
            }
            if let Some(p) = drv.recv().pop() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no packet from the device thread"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn block_device_thread_serves_a_driver_through_the_transport() {
        use super::block::test_utils::{BlockDriver, QSIZE};
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.img");
        let contents: Vec<u8> = (0..64 * 512).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        let slot = MmioSlot {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        };
        let cfg = BlockConfig {
            path: path.clone(),
            read_only: false,
            id: "scratch-1".into(),
        };
        let (mut t, handle) = spawn_block(mem.clone(), slot, cfg, "blk-test".into()).unwrap();
        assert_eq!(handle.cmdline_arg(), "virtio_mmio.device=4K@0xd0001000:6");
        assert_eq!((handle.id(), handle.read_only()), ("scratch-1", false));
        let mut word = [0u8; 4];
        t.read(regs::DEVICE_ID, &mut word);
        assert_eq!(u32::from_le_bytes(word), 2);
        t.read(regs::CONFIG, &mut word);
        assert_eq!(u32::from_le_bytes(word), 64);

        // Driver initialisation: VERSION_1 and FLUSH, SEG_MAX, SIZE_MAX.
        let (mut drv, _) = BlockDriver::new(mem.clone(), QSIZE);
        let s = status::ACKNOWLEDGE | status::DRIVER;
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        w(&mut t, regs::STATUS, s);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        w(
            &mut t,
            regs::DRIVER_FEATURES,
            (1 << 9) | (1 << 2) | (1 << 1),
        );
        w(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        w(&mut t, regs::DRIVER_FEATURES, 1);
        w(&mut t, regs::STATUS, s | status::FEATURES_OK);
        assert_ne!(t.device_status() & status::FEATURES_OK, 0);
        let (d, a, u) = drv.ring_addrs();
        w(&mut t, regs::QUEUE_SEL, 0);
        w(&mut t, regs::QUEUE_NUM, u32::from(QSIZE));
        w(&mut t, regs::QUEUE_DESC_LOW, d as u32);
        w(&mut t, regs::QUEUE_AVAIL_LOW, a as u32);
        w(&mut t, regs::QUEUE_USED_LOW, u as u32);
        w(&mut t, regs::QUEUE_READY, 1);
        w(
            &mut t,
            regs::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());

        // A read served by the device thread.
        let p = drv.post_read(2, 1024);
        w(&mut t, regs::QUEUE_NOTIFY, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let used = loop {
            let used = drv.take_used();
            if !used.is_empty() {
                break used;
            }
            assert!(
                Instant::now() < deadline,
                "no answer from the device thread"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(used, vec![(p.head, 1025)]);
        assert_eq!(drv.read_status(p.status), 0);
        assert_eq!(drv.data(&p), contents[1024..2048]);
        assert_ne!(t.interrupt().status() & INT_VRING, 0);
        assert!(t.interrupt().irq_evt().read().unwrap() >= 1);

        // A reset is acknowledged by the thread before the status reads back 0.
        w(&mut t, regs::STATUS, 0);
        t.read(regs::STATUS, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0);

        // Stopping closes the file and drops its exclusive lock.
        let metrics = handle.metrics();
        handle.stop();
        assert_eq!(BlockMetrics::get(&metrics.reads), 1);
        assert!(block::DiskFile::open(&path, false).is_ok());
    }

    #[test]
    fn block_setup_refuses_bad_files_and_ids() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.img");
        std::fs::write(&path, [0u8; 700]).unwrap();
        let slot = MmioSlot {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        };
        let cfg = |id: &str| BlockConfig {
            path: path.clone(),
            read_only: true,
            id: id.into(),
        };
        let err = spawn_block(mem.clone(), slot, cfg("ok"), "t".into()).unwrap_err();
        assert!(matches!(
            err,
            VirtioError::Block(BlockError::UnalignedSize { len: 700, .. })
        ));
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "cannot build the block device: disk {} is 700 bytes, not a multiple of 512",
                path.display()
            )
        );
        let err = spawn_block(mem.clone(), slot, cfg("no spaces"), "t".into()).unwrap_err();
        assert!(matches!(err, VirtioError::Block(BlockError::Id(_))));
        let bad_slot = MmioSlot {
            len: 0x2000,
            ..slot
        };
        let err = spawn_block(mem, bad_slot, cfg("ok"), "t".into()).unwrap_err();
        assert!(matches!(err, VirtioError::SlotLen(0x2000)));
    }

    #[test]
    fn device_thread_serves_a_driver_through_the_transport() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let uds_path = dir.path().join("vsock.sock");
        let fired = Arc::new(AtomicU32::new(0));
        let f = fired.clone();
        let slot = MmioSlot {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        let cfg = VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds_path.clone(),
        };
        let hooks = VsockHooks {
            on_first_guest_connect: Some(Box::new(move |p| f.store(p, Ordering::SeqCst))),
        };
        let (mut t, handle) = spawn_vsock(mem.clone(), slot, cfg, hooks).unwrap();
        assert_eq!(handle.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        let mut cid = [0u8; 8];
        t.read(regs::CONFIG, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);

        // Driver initialisation, all through the MMIO registers.
        let (mut drv, _) = GuestDriver::new(mem.clone());
        let s = status::ACKNOWLEDGE | status::DRIVER;
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        w(&mut t, regs::STATUS, s);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        w(&mut t, regs::DRIVER_FEATURES, 1);
        w(&mut t, regs::STATUS, s | status::FEATURES_OK);
        for q in 0..3 {
            let (d, a, u) = drv.ring_addrs(q);
            w(&mut t, regs::QUEUE_SEL, q as u32);
            w(&mut t, regs::QUEUE_NUM, u32::from(QSIZE));
            w(&mut t, regs::QUEUE_DESC_LOW, d as u32);
            w(&mut t, regs::QUEUE_AVAIL_LOW, a as u32);
            w(&mut t, regs::QUEUE_USED_LOW, u as u32);
            w(&mut t, regs::QUEUE_READY, 1);
        }
        w(
            &mut t,
            regs::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());

        // Guest-initiated: connect to host port 5000.
        let listener = UnixListener::bind(super::vsock::unix::port_listener_path(
            &dir.path().join("vsock.sock"),
            5000,
        ))
        .unwrap();
        drv.put_tx(Harness::guest_hdr(1000, 5000, 1 /* OP_REQUEST */), &[]);
        w(&mut t, regs::QUEUE_NOTIFY, 1);
        let resp = wait_rx(&mut drv, &mut t);
        assert_eq!(
            (resp.hdr.op, resp.hdr.dst_port),
            (2 /* OP_RESPONSE */, 1000)
        );
        assert_eq!(fired.load(Ordering::SeqCst), 5000);
        assert_ne!(t.interrupt().status() & INT_VRING, 0);
        assert!(t.interrupt().irq_evt().read().unwrap() >= 1);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"hi").unwrap();
        let data = wait_rx(&mut drv, &mut t);
        assert_eq!(data.data, b"hi");

        // Host-initiated: CONNECT 77 becomes an OP_REQUEST to guest port 77.
        let mut hs = UnixStream::connect(&uds_path).unwrap();
        hs.write_all(b"CONNECT 77\n").unwrap();
        let req = wait_rx(&mut drv, &mut t);
        assert_eq!((req.hdr.op, req.hdr.dst_port), (1, 77));

        // A driver reset drops every connection before the status reads back 0.
        w(&mut t, regs::STATUS, 0);
        let mut st = [0u8; 4];
        t.read(regs::STATUS, &mut st);
        assert_eq!(u32::from_le_bytes(st), 0);
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);

        // Stop: the thread exits, host streams close, the socket file goes away.
        let metrics = handle.metrics();
        handle.stop();
        assert!(!uds_path.exists());
        hs.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(hs.read_to_end(&mut rest).unwrap(), 0);
        // Only the guest-initiated connection was established; the guest never answered ours.
        assert_eq!(VsockMetrics::get(&metrics.conns_opened), 1);
    }
}
