//! Emulated devices.
//!
//! # Layout
//! - [`bus`]: port-I/O and MMIO dispatch.
//! - [`virtio`]: the virtio-mmio transport and the virtio-vsock device.

pub mod bus;
pub mod virtio;
