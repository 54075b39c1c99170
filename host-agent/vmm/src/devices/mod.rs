//! Emulated devices.
//!
//! # Layout
//! - [`bus`]: port-I/O and MMIO dispatch.
//! - [`serial`]: the COM1 8250 UART (the guest console).
//! - [`i8042`]: the keyboard controller, for `reboot=k` resets.
//! - [`virtio`]: the virtio-mmio transport, the virtio-vsock device and the virtio-blk device.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
