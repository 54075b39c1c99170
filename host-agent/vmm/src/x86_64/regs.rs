//! Register state for the Linux 64-bit boot protocol: identity-mapped page tables, long mode in
//! the special registers, the entry point and zero page in the general registers, and a sane FPU.

use crate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{BOOT_CS, BOOT_DS, BOOT_TSS, boot_gdt, segment_from_gdt};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry bit: 2 MiB page.
const PDE_PS: u64 = 0x80;

/// Errors from writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or IDT failed.
    #[error("write boot descriptor tables")]
    WriteDescriptorTables(#[source] vm_memory::GuestMemoryError),
    /// Writing the page tables failed.
    #[error("write boot page tables")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
}

/// The identity page tables covering the first 1 GiB with 2 MiB pages: `(address, value)` for
/// every entry to write.
pub fn identity_page_table_entries() -> Vec<(u64, u64)> {
    let mut entries = Vec::with_capacity(514);
    entries.push((PML4_START, PDPTE_START | PTE_PRESENT_RW));
    entries.push((PDPTE_START, PDE_START | PTE_PRESENT_RW));
    for i in 0..512u64 {
        entries.push((PDE_START + i * 8, (i << 21) | PTE_PRESENT_RW | PDE_PS));
    }
    entries
}

/// Writes the boot GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_boot_tables(mem: &GuestRam) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(RegsError::WriteDescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteDescriptorTables)?;
    for (addr, value) in identity_page_table_entries() {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(RegsError::WritePageTables)?;
    }
    Ok(())
}

/// Puts `sregs` (as read from a fresh vCPU) into 64-bit long mode with the boot GDT and page
/// tables. The tables themselves are written by [`write_boot_tables`].
pub fn configure_long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[usize::from(BOOT_CS / 8)], BOOT_CS);
    let data = segment_from_gdt(gdt[usize::from(BOOT_DS / 8)], BOOT_DS);
    let tss = segment_from_gdt(gdt[usize::from(BOOT_TSS / 8)], BOOT_TSS);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers for the 64-bit entry: `rip` at `entry`, `rsi` at the zero page, interrupts
/// off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU at its power-on control words (x87 FCW 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem: GuestRam = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, 0xb003);
        let pde0: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(pde0, 0x83);
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        // Walk a virtual address through the tables: 0x3fe0_1234 maps to itself.
        let va: u64 = 0x3fe0_1234;
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        let gdt2: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, boot_gdt()[2]);
    }

    #[test]
    fn sregs_enter_long_mode_with_boot_selectors() {
        let mut sregs = kvm_sregs::default();
        configure_long_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1));
        assert_eq!((sregs.ds.selector, sregs.ss.selector), (0x18, 0x18));
        assert_eq!(sregs.gdt.limit, 39);
        let regs = boot_regs(0x100200);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100200, ZERO_PAGE_START, 2)
        );
        assert_eq!(boot_fpu().fcw, 0x37f);
    }
}
