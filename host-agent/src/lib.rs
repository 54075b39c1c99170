//! `host-agent`: the Nanoclaw host.
//!
//! The host is trusted with isolation and policy, never with a raw credential. It treats every
//! byte from a guest as hostile and re-checks every decision the sidecar makes.
//!
//! # Layout
//! - [`vmm`]: the virtual machine monitor. One VMM process per microVM (the daemon re-executes
//!   itself in VMM mode), built on the rust-vmm crates: KVM, guest memory, the Linux loader, the
//!   8250 serial console, i8042 reset and a userspace virtio-vsock device with a hybrid
//!   (Unix-socket) backend.

pub mod vmm;
