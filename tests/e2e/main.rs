//! The end-to-end tier: real KVM, real guests.
//!
//! Every test here is `#[ignore]`d for a plain `cargo test`, because our machines' own
//! `/dev/kvm` cannot boot Linux. `scripts/e2e` builds the guest image and this binary, then runs
//! it with `--ignored` through `scripts/nested-run`, inside one L1 VM with nested KVM.

mod agent;
mod approval;
mod cp;
mod credentials;
mod egress;
mod image;
mod kvm_selftest;
mod mcp;
mod migrate;
mod pause;
mod real_agent;
mod sdk;
mod snapshot;
mod vmm;
