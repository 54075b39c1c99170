//! The saved state of a virtio-mmio device, and how a device thread is paused.
//!
//! A snapshot saves, per device, its [`TransportState`]: the virtio-mmio registers (device
//! status, feature selects, the acknowledged features, queue select, interrupt status, config
//! generation), every queue's registers and ring positions ([`QueueSnapshot`]), the features the
//! device offered and its config space. The device-specific state is what the config space
//! holds (vsock: the guest CID; block: the capacity and limits), so a restore into a device
//! that differs (another CID, a disk of another size or read-only where it was writable) is
//! refused rather than shown to a guest whose driver has the old values cached. Nothing else of
//! a device survives: vsock connections are not carried over (virtio spec 1.2 §5.10.6.6), and
//! the block device keeps no state between requests.
//!
//! Restoring checks every field a state file could get wrong ([`VirtioStateError`]) before the
//! queues are built: a ready queue needs a non-zero power-of-two size within the device's
//! maximum and rings inside guest memory, an activated device needs every queue ready, and
//! only offered features may be acknowledged. A queue that is not ready is inert, so its
//! registers are taken as the driver left them.

use crate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// How many bytes of a device's config space a snapshot keeps (every device here has fewer;
/// bytes past a device's config read as zero).
pub const CONFIG_SNAPSHOT_LEN: usize = 64;

/// One virtqueue: its registers and where the device is in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// `QueueNumMax`: the largest size the device offers.
    pub max_size: u16,
    /// `QueueNum`: the size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether `VIRTIO_F_EVENT_IDX` is in use on this queue.
    pub event_idx: bool,
}

impl QueueSnapshot {
    /// The snapshot of a live queue.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc: s.desc_table,
            avail: s.avail_ring,
            used: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// Checks a ready queue against guest memory and builds it, positions included.
    pub fn to_queue(&self, index: usize, mem: &GuestRam) -> Result<Queue, VirtioStateError> {
        let bad = |what: &'static str| VirtioStateError::BadQueue { queue: index, what };
        if !self.ready {
            return Err(bad("is not ready"));
        }
        if self.size == 0 {
            return Err(bad("is ready with size 0"));
        }
        if !self.size.is_power_of_two() {
            return Err(bad("has a size that is not a power of two"));
        }
        if self.size > self.max_size {
            return Err(bad("is larger than its maximum size"));
        }
        let n = u64::from(self.size);
        let rings = [
            (self.desc, 16 * n, 16, Permissions::Read),
            (self.avail, 6 + 2 * n, 2, Permissions::Read),
            (self.used, 6 + 8 * n, 4, Permissions::Write),
        ];
        for (addr, len, align, perm) in rings {
            if !addr.is_multiple_of(align) {
                return Err(bad("has a misaligned ring"));
            }
            if !mem.check_range(GuestAddress(addr), len as usize, perm) {
                return Err(bad("has a ring outside guest memory"));
            }
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: true,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
        };
        let queue = Queue::try_from(state).map_err(|_| bad("is refused by the queue"))?;
        // The ranges were checked above, so this does not log.
        if !queue.is_valid(mem) {
            return Err(bad("is refused by the queue"));
        }
        Ok(queue)
    }
}

/// The virtio-mmio transport of one device, with its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device type (19 vsock, 2 block, 1 net).
    pub device_type: u32,
    /// The features the device offered: a restore into a device that offers others is refused.
    pub device_features: u64,
    /// The device's config space, its first [`CONFIG_SNAPSHOT_LEN`] bytes.
    pub config: Vec<u8>,
    /// The `Status` register.
    pub status: u32,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// Whether the driver wrote a feature bit that was not offered.
    pub features_rejected: bool,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The interrupt status register (`INT_VRING`, `INT_CONFIG`).
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Whether the device had its queues (the driver set `DRIVER_OK` and every queue was valid).
    pub activated: bool,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
}

/// One virtio device of a snapshot: where it is and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Its virtio-mmio slot ([`crate::layout::virtio_mmio_slot`]).
    pub slot: u32,
    /// Its transport, queues and config.
    pub transport: TransportState,
}

/// Why a saved virtio state cannot be restored, or a device state cannot be saved.
#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    /// The saved device is of another type than the one in its slot.
    #[error("the saved device is of type {saved}, this VM's is of type {vm}")]
    DeviceType {
        /// The saved type.
        saved: u32,
        /// The VM's.
        vm: u32,
    },
    /// The saved device offered other features.
    #[error("the saved device offered features {saved:#x}, this VM's offers {vm:#x}")]
    DeviceFeatures {
        /// The saved features.
        saved: u64,
        /// The VM's.
        vm: u64,
    },
    /// The saved config space differs (another CID, a disk of another size).
    #[error("the saved device's config space differs from this VM's (another CID or disk?)")]
    Config,
    /// The saved device has another number of queues, or other maximum sizes.
    #[error("the saved device has queues {saved:?} (maximum sizes), this VM's has {vm:?}")]
    Queues {
        /// The saved maximum sizes.
        saved: Vec<u16>,
        /// The VM's.
        vm: Vec<u16>,
    },
    /// A queue is unusable.
    #[error("queue {queue} {what}")]
    BadQueue {
        /// The queue.
        queue: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A register holds a value the transport never sets.
    #[error("register {register} holds {value:#x}, which the transport never sets")]
    BadRegister {
        /// The register.
        register: &'static str,
        /// Its value.
        value: u64,
    },
    /// The device thread would not take its queues.
    #[error("the device thread would not take its queues")]
    Activate(#[source] super::mmio::ActivateError),
    /// The activated device has no device thread to report its queues' positions.
    #[error("the {0} device cannot report its queues")]
    NoControl(&'static str),
    /// The device thread did not answer.
    #[error(transparent)]
    Worker(#[from] QuiesceError),
    /// A saved device has no device in this VM, or a device of this VM has no saved state.
    #[error("virtio-mmio slot {slot}: {what}")]
    Slot {
        /// The slot.
        slot: u32,
        /// What is wrong.
        what: &'static str,
    },
}

/// A device thread that did not pause, or did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuiesceError {
    /// The device thread did not acknowledge in time.
    #[error("the {device} device thread did not {what} within {timeout:?}")]
    Timeout {
        /// The device.
        device: &'static str,
        /// What it was asked.
        what: &'static str,
        /// How long it was given.
        timeout: std::time::Duration,
    },
    /// The device thread has ended.
    #[error("the {device} device thread is gone")]
    Gone {
        /// The device.
        device: &'static str,
    },
}
