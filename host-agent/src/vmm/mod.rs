//! The virtual machine monitor: one process per microVM.
//!
//! # Layout
//! - [`devices`]: the emulated devices and the buses that route guest I/O to them.

pub mod devices;
