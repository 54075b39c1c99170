//! x86_64 CPU and platform setup for a direct 64-bit Linux boot: descriptor tables, page tables,
//! registers, CPUID, MSRs, the local APIC and the MP table.
//!
//! Everything here is a pure function over `kvm_bindings` structures or guest memory, so it is
//! unit-tested without `/dev/kvm`; [`crate::vcpu`] applies the results through the ioctls.
//!
//! # Layout
//! - [`gdt`]: GDT entries and the KVM segments derived from them.
//! - [`regs`]: identity page tables, general, special and FPU registers for the 64-bit entry.
//! - [`cpuid`]: fix-ups of `KVM_GET_SUPPORTED_CPUID` per vCPU.
//! - [`msr`]: the boot MSR set.
//! - [`lapic`]: LINT0/LINT1 wiring of the local APIC.
//! - [`mptable`]: the Intel MultiProcessor table that lists every vCPU to a guest without ACPI.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod mptable;
pub mod msr;
pub mod regs;
