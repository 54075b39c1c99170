//! The Intel MultiProcessor Specification (v1.4) table: how a guest without ACPI finds its vCPUs,
//! its IOAPIC and its interrupt routing.
//!
//! The table is built as plain little-endian bytes (no `repr(C)` casts) and then copied into guest
//! memory at the start of the EBDA, one of the places the kernel scans for the `_MP_` floating
//! pointer. Layout: floating pointer (16 bytes), then the configuration table header (44 bytes)
//! followed by its entries: one processor entry per vCPU, one ISA bus, one IOAPIC, one I/O
//! interrupt entry per IOAPIC pin (ISA IRQ *n* to pin *n*) and the two local interrupts
//! (LINT0 = ExtINT, LINT1 = NMI).

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_DEFAULT_BASE, BASE_MEM_END, EBDA_START, IOAPIC_DEFAULT_BASE, MAX_GSI};

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REV: u8 = 4;
const OEM_ID: &[u8; 8] = b"NANOCLAW";
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Family 6 signature and the FPU + APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforming to the bus" (edge, active high on ISA).
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Largest vCPU count whose table fits between the EBDA and the end of base memory.
pub const MAX_CPUS: u8 = 32;

/// Errors from building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero vCPUs, or more than [`MAX_CPUS`].
    #[error("unsupported vCPU count {0} for the MP table")]
    CpuCount(u8),
    /// The table does not fit below the end of base memory.
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    TooLarge(usize),
    /// Writing into guest memory failed.
    #[error("write MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Sum of `bytes` modulo 256.
fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The value that makes `bytes` plus it sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    byte_sum(bytes).wrapping_neg()
}

/// The IOAPIC's id: the first id after the vCPUs' APIC ids.
pub fn ioapic_id(cpu_count: u8) -> u8 {
    cpu_count
}

/// Builds the MP table for `cpu_count` vCPUs, to be placed at `base`.
pub fn build(cpu_count: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpu_count == 0 || cpu_count > MAX_CPUS {
        return Err(MptableError::CpuCount(cpu_count));
    }
    let ioapic = ioapic_id(cpu_count);
    let table_addr = base + FLOATING_LEN as u64;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..cpu_count {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.push(ENTRY_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic);
    entries.push(IOAPIC_VERSION);
    entries.push(IOAPIC_ENABLED);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    entry_count += 1;

    for pin in 0..=MAX_GSI as u8 {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(pin);
        entries.push(ioapic);
        entries.push(pin);
        entry_count += 1;
    }
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LAPICS, 1)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.push(ISA_BUS_ID);
        entries.push(0);
        entries.push(dest);
        entries.push(lint);
        entry_count += 1;
    }

    debug_assert_eq!(
        entries.len(),
        PROCESSOR_ENTRY_LEN * usize::from(cpu_count)
            + SMALL_ENTRY_LEN * (usize::from(entry_count) - usize::from(cpu_count))
    );
    let table_len = HEADER_LEN + entries.len();
    let total = FLOATING_LEN + table_len;
    if base + total as u64 > BASE_MEM_END || table_len > usize::from(u16::MAX) {
        return Err(MptableError::TooLarge(total));
    }

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(TABLE_SIGNATURE);
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(OEM_ID);
    header.extend_from_slice(PRODUCT_ID);
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header[7] = checksum(&[header.as_slice(), entries.as_slice()].concat());

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(FLOATING_SIGNATURE);
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte paragraphs
    floating.push(SPEC_REV);
    floating.push(0); // checksum, filled below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum(&floating);

    Ok([floating, header, entries].concat())
}

/// Builds the MP table for `cpu_count` vCPUs and writes it at the start of the EBDA.
pub fn setup_mptable(mem: &GuestRam, cpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(cpu_count, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn checksums_and_header_fields_are_valid() {
        for cpus in [1u8, 2, 7, 32] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(u32_at(&t, 4) as u64, EBDA_START + 16);
            assert_eq!(t[8], 1);
            assert_eq!(t[9], 4);
            assert_eq!(byte_sum(&t[..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16_at(table, 4) as usize;
            assert_eq!(len, table.len());
            assert_eq!(byte_sum(table), 0, "configuration table checksum");
            let count = u16_at(table, 34) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 24 + 2);
            assert_eq!(u32_at(table, 36), 0xfee0_0000);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (1 + 1 + 24 + 2));
            assert!(EBDA_START as usize + t.len() <= BASE_MEM_END as usize);
        }
    }

    #[test]
    fn entries_list_every_cpu_and_the_routing() {
        let t = build(2, EBDA_START).unwrap();
        let e = &t[16 + 44..];
        // Processor 0: BSP, enabled.
        assert_eq!(&e[0..4], &[0, 0, 0x14, 3]);
        // Processor 1: enabled, not BSP.
        assert_eq!(&e[20..24], &[0, 1, 0x14, 1]);
        // Bus, then the IOAPIC with id 2 at 0xfec00000.
        assert_eq!(&e[40..48], b"\x01\x00ISA   ");
        assert_eq!(&e[48..52], &[2, 2, 0x11, 1]);
        assert_eq!(u32_at(e, 52), 0xfec0_0000);
        // ISA IRQ 5 (the first virtio slot) reaches IOAPIC 2 pin 5.
        let irq5 = &e[56 + 5 * 8..56 + 6 * 8];
        assert_eq!(irq5, &[3, 0, 0, 0, 0, 5, 2, 5]);
        // Local interrupts: LINT0 ExtINT to the BSP, LINT1 NMI to all.
        let lint = &e[56 + 24 * 8..];
        assert_eq!(lint, &[4, 3, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MptableError::CpuCount(0))
        ));
        assert!(matches!(
            build(33, EBDA_START),
            Err(MptableError::CpuCount(33))
        ));
        assert!(matches!(
            build(32, BASE_MEM_END - 64),
            Err(MptableError::TooLarge(_))
        ));
    }
}
