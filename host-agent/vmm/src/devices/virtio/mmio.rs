//! The virtio-mmio transport, version 2 ("modern"), virtio spec 1.2 §4.2.
//!
//! [`MmioTransport`] answers the guest's register accesses on a 0x1000-byte MMIO window and owns
//! the queue configuration until the driver sets `DRIVER_OK`. It then validates every queue
//! against guest memory and hands the queues to the [`VirtioDevice`] it fronts. The transport
//! never walks a queue itself.
//!
//! Signalling:
//! - device to guest: an [`IrqTrigger`] (the interrupt status register plus an `EventFd` that the
//!   VMM registers as a KVM irqfd);
//! - guest to device: one `EventFd` per queue. The VMM registers each as a KVM ioeventfd on the
//!   `QueueNotify` register with the queue index as datamatch; a notify that still arrives through
//!   [`BusDevice::write`] signals the same `EventFd`, so both paths behave the same.
//!
//! Snapshots: [`MmioTransport::save_state`] reads the registers and, for an activated device,
//! the queues' positions from the device thread; [`MmioTransport::restore_state`] checks a
//! saved state as strictly as a driver's setup and hands an activated device its queues again
//! ([`VirtioDevice::activate_restored`]). See [`super::state`].

use crate::memory::GuestRam;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::RateLimitedLog;
use super::state::{
    CONFIG_SNAPSHOT_LEN, QueueSnapshot, QuiesceError, TransportState, VirtioStateError,
};
use super::worker_link::ControlLink;
use crate::devices::bus::BusDevice;

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2 is the modern (non-legacy) layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID`: "NCLW". Drivers do not look at it.
pub const MMIO_VENDOR_ID: u32 = 0x574c_434e;
/// Size of the MMIO window one transport answers.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;
/// `VIRTIO_F_VERSION_1`: the device is modern.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: each side says, in the rings, at which index it next wants to be
/// notified (virtio spec 1.2 §2.7.10), so the driver kicks and the device interrupts once per
/// batch rather than once per buffer.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Register offsets, virtio spec 1.2 table 4.1.
pub mod regs {
    /// Magic value (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// Device type (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device feature bits, 32 at a time (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the 32 device feature bits to read (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver feature bits, 32 at a time (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the 32 driver feature bits to write (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers address (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// Ready bit of the selected queue (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification: the value is the queue index (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (RW); writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits (W).
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits (W).
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits (W).
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits (W).
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Configuration generation counter (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits, virtio spec 1.2 §2.1.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// How a device tells the guest that something happened. Device logic is generic over this so
/// tests and fuzzers can count interrupts instead of raising them.
pub trait Interrupt: Send {
    /// Raises an interrupt of kind [`INT_VRING`] or [`INT_CONFIG`].
    fn trigger(&self, kind: u32);
}

/// The real interrupt line: sets the bit in the shared interrupt status register, then writes
/// the irqfd.
#[derive(Debug, Clone)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    irq_evt: Arc<EventFd>,
}

impl IrqTrigger {
    /// Creates a line with a fresh irqfd and a cleared status register.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: Arc::new(AtomicU32::new(0)),
            irq_evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// The `EventFd` the VMM registers as a KVM irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// The current interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
}

static IRQ_WRITE_FAILED: RateLimitedLog = RateLimitedLog::new();

impl Interrupt for IrqTrigger {
    fn trigger(&self, kind: u32) {
        self.status.fetch_or(kind, Ordering::SeqCst);
        if let Err(e) = self.irq_evt.write(1)
            && IRQ_WRITE_FAILED.allow()
        {
            tracing::warn!(error = %e, "virtio irqfd write failed");
        }
    }
}

/// Errors a device reports when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device could not hand the queues to its worker.
    #[error("device worker is gone")]
    WorkerGone,
    /// The driver gave the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
}

/// A virtio device as seen by the transport: identity, features, config space, and the
/// activate/reset life cycle.
pub trait VirtioDevice: Send {
    /// The virtio device type (19 for vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;
    /// Reads the device config space at `offset` (relative to 0x100). Bytes past the end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Whether a snapshot's config space (`saved`) fits this device's (`current`, read the
    /// same way) on restore. By default they must be equal: another CID or a disk of another
    /// size is another machine.
    fn config_matches(&self, saved: &[u8], current: &[u8]) -> bool {
        saved == current
    }
    /// Writes the device config space. Devices with a read-only config ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Hands the validated queues to the device, after the driver set `DRIVER_OK`.
    fn activate(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (the driver wrote 0 to `Status`).
    fn reset(&mut self);
    /// Hands the device queues restored from a snapshot (positions included), before any vCPU
    /// runs. A device with state that does not survive a restore (vsock connections) tells the
    /// guest here. By default, the same as [`VirtioDevice::activate`].
    fn activate_restored(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.activate(mem, acked_features, queues)
    }
    /// The link that pauses the device's thread and reads its queues' state (see
    /// [`super::worker_link`]). A device with a thread returns its link. `None` (the default)
    /// is for a device without one: it has nothing to pause, and once activated its queues'
    /// positions cannot be saved ([`VirtioStateError::NoControl`]).
    fn control(&self) -> Option<&dyn ControlLink> {
        None
    }
}

/// A name for a device type, for messages.
pub fn device_name(device_type: u32) -> &'static str {
    match device_type {
        1 => "net",
        2 => "block",
        19 => "vsock",
        _ => "virtio",
    }
}

/// Per-queue register state kept by the transport until activation.
#[derive(Debug)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// The registers as a queue snapshot (a queue not yet handed to the device: at position 0).
    fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
        }
    }

    /// Builds a queue from the registers, checking size, alignment and that every ring lies in
    /// guest memory. `None` means the driver's configuration is invalid.
    fn to_queue(&self, mem: &GuestRam) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        // Check the ranges ourselves first: `Queue::is_valid` logs on failure, and a guest must
        // not be able to drive an unlimited log line.
        let n = u64::from(self.size);
        let ranges = [
            (self.desc, 16 * n, Permissions::Read),
            (self.avail, 6 + 2 * n, Permissions::Read),
            (self.used, 6 + 8 * n, Permissions::Write),
        ];
        for (addr, len, perm) in ranges {
            if !mem.check_range(GuestAddress(addr), len as usize, perm) {
                return None;
            }
        }
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

static BAD_ACCESS: RateLimitedLog = RateLimitedLog::new();

/// The virtio-mmio v2 transport for one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    interrupt: IrqTrigger,
    queue_evts: Vec<Arc<EventFd>>,
    queues: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    features_rejected: bool,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`. Creates one notification `EventFd` per queue.
    pub fn new(
        mem: GuestRam,
        device: Box<dyn VirtioDevice>,
        interrupt: IrqTrigger,
    ) -> std::io::Result<Self> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            features_rejected: false,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// One notification `EventFd` per queue, in queue order. Register each as a KVM ioeventfd on
    /// `base + regs::QUEUE_NOTIFY` with datamatch = its index, and hand it to the device worker.
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// The interrupt line this transport raises.
    pub fn interrupt(&self) -> &IrqTrigger {
        &self.interrupt
    }

    /// The device status register.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the device was handed its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn name(&self) -> &'static str {
        device_name(self.device.device_type())
    }

    /// Pauses the device thread: it stops walking the queues and touching guest memory until
    /// [`MmioTransport::resume`]. A device without a thread has nothing to pause.
    pub fn pause(&self) -> Result<(), QuiesceError> {
        match self.device.control() {
            Some(link) => link.pause(self.name()),
            None => Ok(()),
        }
    }

    /// Lets the device thread walk its queues again.
    pub fn resume(&self) -> Result<(), QuiesceError> {
        match self.device.control() {
            Some(link) => link.resume(self.name()),
            None => Ok(()),
        }
    }

    /// The transport's state, with the queues' positions from the device thread. Call it with
    /// the vCPUs parked and the device paused ([`MmioTransport::pause`]), or the positions may
    /// be stale by the time guest memory is copied.
    pub fn save_state(&self) -> Result<TransportState, VirtioStateError> {
        let queues = if self.activated {
            let link = self
                .device
                .control()
                .ok_or(VirtioStateError::NoControl(self.name()))?;
            let live = link.save_queues(self.name())?;
            if live.len() != self.queues.len() {
                return Err(VirtioStateError::Queues {
                    saved: live.iter().map(|q| q.max_size).collect(),
                    vm: self.queues.iter().map(|q| q.max_size).collect(),
                });
            }
            live
        } else {
            self.queues.iter().map(QueueRegs::snapshot).collect()
        };
        let mut config = vec![0u8; CONFIG_SNAPSHOT_LEN];
        self.device.read_config(0, &mut config);
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features: self.device.device_features(),
            config,
            status: self.status,
            acked_features: self.acked_features,
            features_rejected: self.features_rejected,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            queues,
        })
    }

    /// Takes `saved` into this freshly built transport (never driven by a guest), checking it
    /// first: on an error nothing changed. An activated device gets its queues, positions
    /// included ([`VirtioDevice::activate_restored`]); a pending interrupt is raised again,
    /// since the irqfd edge that carried it was in the old process.
    pub fn restore_state(&mut self, saved: &TransportState) -> Result<(), VirtioStateError> {
        let queues = self.check_state(saved)?;
        if let Some(queues) = queues {
            self.device
                .activate_restored(self.mem.clone(), saved.acked_features, queues)
                .map_err(VirtioStateError::Activate)?;
        }
        self.status = saved.status;
        self.acked_features = saved.acked_features;
        self.features_rejected = saved.features_rejected;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        self.activated = saved.activated;
        for (regs, q) in self.queues.iter_mut().zip(&saved.queues) {
            regs.size = q.size;
            regs.ready = q.ready;
            regs.desc = q.desc;
            regs.avail = q.avail;
            regs.used = q.used;
        }
        if saved.interrupt_status != 0 {
            self.interrupt.trigger(saved.interrupt_status);
        }
        Ok(())
    }

    /// Checks `saved` against this device and guest memory; for an activated device, builds
    /// its queues.
    fn check_state(&self, saved: &TransportState) -> Result<Option<Vec<Queue>>, VirtioStateError> {
        use status::*;
        let vm_type = self.device.device_type();
        if saved.device_type != vm_type {
            return Err(VirtioStateError::DeviceType {
                saved: saved.device_type,
                vm: vm_type,
            });
        }
        let offered = self.device.device_features();
        if saved.device_features != offered {
            return Err(VirtioStateError::DeviceFeatures {
                saved: saved.device_features,
                vm: offered,
            });
        }
        let mut config = vec![0u8; CONFIG_SNAPSHOT_LEN];
        self.device.read_config(0, &mut config);
        if !self.device.config_matches(&saved.config, &config) {
            return Err(VirtioStateError::Config);
        }
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        let saved_max: Vec<u16> = saved.queues.iter().map(|q| q.max_size).collect();
        if max != saved_max {
            return Err(VirtioStateError::Queues {
                saved: saved_max,
                vm: max,
            });
        }
        let bad = |register, value| Err(VirtioStateError::BadRegister { register, value });
        let known = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
        if saved.status & !known != 0 {
            return bad("Status", u64::from(saved.status));
        }
        if saved.acked_features & !offered != 0 {
            return bad("DriverFeatures", saved.acked_features);
        }
        if saved.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return bad("InterruptStatus", u64::from(saved.interrupt_status));
        }
        if !saved.activated {
            return Ok(None);
        }
        if saved.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK | DRIVER_OK {
            return bad("Status", u64::from(saved.status));
        }
        let queues = saved
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue(i, &self.mem))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(queues))
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between `FEATURES_OK` and `DRIVER_OK`, and only while
    /// the selected queue is not ready.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn reset(&mut self) {
        if self.activated || self.status != 0 {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.features_rejected = false;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(INT_CONFIG);
    }

    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (§3.1.1); anything else is ignored.
        if v & self.status != self.status {
            return;
        }
        let added = v & !self.status;
        if added & FEATURES_OK != 0 {
            let ok = self.status & DRIVER != 0
                && !self.features_rejected
                && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = v & !FEATURES_OK;
                return;
            }
        }
        if added & DRIVER_OK != 0 {
            if v & FEATURES_OK == 0 || self.activated {
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match q.ready.then(|| q.to_queue(&self.mem)).flatten() {
                Some(q) => queues.push(q),
                None => {
                    if BAD_ACCESS.allow() {
                        tracing::warn!("virtio-mmio: DRIVER_OK with an invalid queue");
                    }
                    self.needs_reset();
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), self.acked_features, queues)
        {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(error = %e, "virtio device activation failed");
                self.needs_reset();
            }
        }
    }

    fn notify(&self, index: u32) {
        if let Some(evt) = self.queue_evts.get(index as usize)
            && let Err(e) = evt.write(1)
            && BAD_ACCESS.allow()
        {
            tracing::warn!(error = %e, "virtio-mmio: queue notify write failed");
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        use status::*;
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & DRIVER == 0 || self.status & FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => {
                        // No features beyond bit 63: any bit set here was not offered.
                        self.features_rejected |= v != 0;
                        return;
                    }
                };
                let offered = (self.device.device_features() >> shift) as u32;
                if v & !offered != 0 {
                    self.features_rejected = true;
                }
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features =
                    (self.acked_features & !mask) | (u64::from(v & offered) << shift);
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                    q.size = v as u16;
                }
            }
            regs::QUEUE_READY if self.queue_config_allowed() => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    // Refuse (stay not ready) a queue whose rings are invalid.
                    q.ready = v == 1 && q.to_queue(&mem).is_some();
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH
                if self.queue_config_allowed() =>
            {
                let Some(q) = self.selected_queue().filter(|q| !q.ready) else {
                    return;
                };
                let (field, high) = match offset {
                    regs::QUEUE_DESC_LOW => (&mut q.desc, false),
                    regs::QUEUE_DESC_HIGH => (&mut q.desc, true),
                    regs::QUEUE_AVAIL_LOW => (&mut q.avail, false),
                    regs::QUEUE_AVAIL_HIGH => (&mut q.avail, true),
                    regs::QUEUE_USED_LOW => (&mut q.used, false),
                    _ => (&mut q.used, true),
                };
                *field = if high {
                    (*field & 0xffff_ffff) | (u64::from(v) << 32)
                } else {
                    (*field & !0xffff_ffff) | u64::from(v)
                };
            }
            regs::QUEUE_NOTIFY => self.notify(v),
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            regs::STATUS => self.write_status(v),
            _ => {
                if BAD_ACCESS.allow() {
                    tracing::debug!(offset, "virtio-mmio: ignored register write");
                }
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if self.status & status::DRIVER_OK == 0 || self.activated {
                self.device.write_config(offset - regs::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log {
        activations: Vec<(u64, usize)>,
        resets: usize,
    }

    struct Dummy {
        log: Arc<Mutex<Log>>,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self
                    .config
                    .get(offset as usize + i)
                    .copied()
                    .unwrap_or_default();
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestRam,
            acked: u64,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            self.log
                .lock()
                .unwrap()
                .activations
                .push((acked, queues.len()));
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>) {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let dev = Dummy {
            log: log.clone(),
            config: 42u64.to_le_bytes(),
        };
        (
            MmioTransport::new(mem, Box::new(dev), IrqTrigger::new().unwrap()).unwrap(),
            log,
        )
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn negotiate(t: &mut MmioTransport, high: u32) {
        w(t, regs::STATUS, status::ACKNOWLEDGE);
        w(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, regs::DRIVER_FEATURES_SEL, 1);
        w(t, regs::DRIVER_FEATURES, high);
        w(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        w(t, regs::QUEUE_SEL, idx);
        w(t, regs::QUEUE_NUM, 16);
        w(t, regs::QUEUE_DESC_LOW, base as u32);
        w(t, regs::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, regs::QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        w(t, regs::QUEUE_USED_LOW, (base + 0x200) as u32);
        w(t, regs::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers_and_config() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, regs::VERSION), 2);
        assert_eq!(r(&mut t, regs::DEVICE_ID), 19);
        assert_eq!(r(&mut t, regs::VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 1);
        w(&mut t, regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 1);
        w(&mut t, regs::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 16);
        w(&mut t, regs::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 8];
        t.read(regs::CONFIG, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 42);
        let mut odd = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut odd);
        assert_eq!(odd, [0, 0]);
    }

    #[test]
    fn feature_negotiation_rejects_unoffered_bits_and_missing_version_1() {
        let (mut t, _) = transport();
        // Bit 1 of the low word was not offered.
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        w(&mut t, regs::DRIVER_FEATURES, 0b11);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        w(&mut t, regs::DRIVER_FEATURES, 1);
        w(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);

        // A legacy driver (no VERSION_1) is refused too.
        w(&mut t, regs::STATUS, 0);
        negotiate(&mut t, 0);
        assert_eq!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);

        w(&mut t, regs::STATUS, 0);
        negotiate(&mut t, 1);
        assert_ne!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn activation_reset_and_notify() {
        let (mut t, log) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 1);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, regs::STATUS, all | status::DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(
            log.lock().unwrap().activations,
            vec![(VIRTIO_F_VERSION_1, 2)]
        );

        // Notify through the bus signals the queue's eventfd; an unknown index is ignored.
        w(&mut t, regs::QUEUE_NOTIFY, 1);
        w(&mut t, regs::QUEUE_NOTIFY, 7);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err());

        // Interrupt status and ACK.
        t.interrupt().trigger(INT_VRING);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        w(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), 0);

        // Queue registers are frozen once live.
        w(&mut t, regs::QUEUE_SEL, 0);
        w(&mut t, regs::QUEUE_READY, 0);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 1);

        // Reset clears everything and resets the device.
        w(&mut t, regs::STATUS, 0);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 0);
        assert!(!t.is_activated());
        assert_eq!(t.acked_features(), 0);
        assert_eq!(log.lock().unwrap().resets, 1);

        // And the device can be brought up again.
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w(&mut t, regs::STATUS, all | status::DRIVER_OK);
        assert_eq!(log.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn invalid_queue_config_is_refused() {
        let (mut t, log) = transport();
        // Queue registers before FEATURES_OK are ignored.
        w(&mut t, regs::QUEUE_NUM, 8);
        negotiate(&mut t, 1);
        // Rings outside guest memory.
        setup_queue(&mut t, 0, 0x1_0000_0000);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 0);
        // Size not a power of two.
        w(&mut t, regs::QUEUE_SEL, 1);
        w(&mut t, regs::QUEUE_NUM, 12);
        w(&mut t, regs::QUEUE_DESC_LOW, 0x2000);
        w(&mut t, regs::QUEUE_AVAIL_LOW, 0x2100);
        w(&mut t, regs::QUEUE_USED_LOW, 0x2200);
        w(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 0);
        // Misaligned descriptor table.
        w(&mut t, regs::QUEUE_NUM, 16);
        w(&mut t, regs::QUEUE_DESC_LOW, 0x2008);
        w(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 0);
        // Used ring straddling the end of memory.
        w(&mut t, regs::QUEUE_DESC_LOW, 0x2000);
        w(&mut t, regs::QUEUE_USED_LOW, 0x10_0000 - 0x40);
        w(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 0);

        // DRIVER_OK with queues not ready: no activation, DEVICE_NEEDS_RESET and a config irq.
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, regs::STATUS, all | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert!(log.lock().unwrap().activations.is_empty());
        assert_ne!(r(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), INT_CONFIG);
        assert_eq!(r(&mut t, regs::CONFIG_GENERATION), 1);
    }

    /// A transport the driver left half set up (features agreed, one queue ready, no
    /// `DRIVER_OK`) saves, restores into a fresh one, saves back the same, and the driver can
    /// finish there: `DRIVER_OK` activates the device with the restored queues.
    #[test]
    fn a_half_set_up_transport_round_trips() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, regs::QUEUE_SEL, 1);
        w(&mut t, regs::QUEUE_NUM, 8);
        t.write(regs::CONFIG, &[1]);
        let saved = t.save_state().unwrap();
        assert!(!saved.activated);
        assert_eq!((saved.queue_sel, saved.driver_features_sel), (1, 1));
        assert!(saved.queues[0].ready && !saved.queues[1].ready);
        assert_eq!((saved.queues[1].size, saved.config_generation), (8, 1));
        assert_eq!(&saved.config[..8], &42u64.to_le_bytes());

        let (mut fresh, log) = transport();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state().unwrap(), saved);
        assert_eq!(r(&mut fresh, regs::QUEUE_READY), 0);
        w(&mut fresh, regs::QUEUE_SEL, 0);
        assert_eq!(r(&mut fresh, regs::QUEUE_READY), 1);
        setup_queue(&mut fresh, 1, 0x2000);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut fresh, regs::STATUS, all | status::DRIVER_OK);
        assert!(fresh.is_activated());
        assert_eq!(
            log.lock().unwrap().activations,
            vec![(VIRTIO_F_VERSION_1, 2)]
        );
        // Activated, a device without a thread cannot report its queues' positions.
        assert!(matches!(
            fresh.save_state(),
            Err(VirtioStateError::NoControl(_))
        ));
        // Pausing it is a no-op.
        fresh.pause().unwrap();
        fresh.resume().unwrap();
    }
}
