//! Live migration, the daemon's part: carrying a running VM's migration stream from this host
//! to another (the VMM's part, the stream itself, is `nanoclaw_vmm::migration`).
//!
//! Built so far: [`link`], the mutually authenticated, encrypted link between two hosts'
//! daemons, and the relay of a VMM's stream over it. Not built yet: the offer and answer
//! between the daemons, starting the target VMM with `--migrate-from`, `nanoclaw migrate`, and
//! moving the VM's address and credential link; nothing in the daemon starts a migration yet.

pub mod link;
