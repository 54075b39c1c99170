//! The boot GDT and the KVM segment registers that match it.
//!
//! The Linux 64-bit boot protocol (Documentation/x86/boot.rst) asks for flat 4 GiB segments at
//! selectors `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), so the table is: null, null, code, data,
//! TSS.

use kvm_bindings::kvm_segment;

/// Access/flags word of a 64-bit code segment: present, DPL 0, execute/read, accessed, L=1, G=1.
const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags word of a data segment: present, DPL 0, read/write, accessed, D/B=1, G=1.
const DATA_FLAGS: u16 = 0xc093;
/// Access/flags word of a 64-bit busy TSS: present, type 0xb.
const TSS_FLAGS: u16 = 0x808b;

/// Selector of the boot code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the boot data segment.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the task register.
pub const BOOT_TSS: u16 = 0x20;

/// Packs a GDT descriptor from its flags word (access byte in bits 0..8, flags in 12..16), base
/// and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT, indexed by selector / 8.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// The KVM segment register value for descriptor `entry` loaded through `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_the_reference_encoding() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4], 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x4092, 0x1234_5678, 0xabcde),
            0x124a_9234_5678_bcde
        );
    }

    #[test]
    fn segments_decode_flat_64bit_code_and_data() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[2], BOOT_CS);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x10));
        assert_eq!(
            (cs.type_, cs.present, cs.dpl, cs.s, cs.l, cs.db, cs.g),
            (0xb, 1, 0, 1, 1, 0, 1)
        );
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(gdt[3], BOOT_DS);
        assert_eq!((ds.type_, ds.s, ds.l, ds.db, ds.g), (0x3, 1, 0, 1, 1));
        let tss = segment_from_gdt(gdt[4], BOOT_TSS);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let odd = segment_from_gdt(gdt_entry(0x4092, 0x1234_5678, 0xabcde), 0x28);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }
}
