//! The guest physical address map: where RAM, the boot structures, the kernel, the initramfs and
//! the virtio-mmio windows live, and the e820 map that tells the guest about it.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM)
//! 0x0000_0500  boot GDT            0x0000_0520  boot IDT (empty)
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (last KiB of base memory, scanned by the kernel), reserved
//! 0x0010_0000  kernel (bzImage protected-mode code; an ELF vmlinux loads at its own paddr)
//!   ...        initramfs, placed as high as allowed in low RAM
//! 0xd000_0000  MMIO gap: virtio-mmio slots, IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than fits below the gap
//! ```

use vm_memory::GuestAddress;

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (an empty one, loaded so that an early fault triple-faults cleanly).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 2-MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory.
pub const BASE_MEM_END: u64 = 0xa0000;
/// First byte above the legacy hole: where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// KVM's TSS (3 pages, inside the MMIO gap, below the IOAPIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page (Intel real-mode emulation), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Default LAPIC base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// Default IOAPIC base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;

/// Base of the first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_LEN: u64 = 0x1000;
/// GSI of the first virtio-mmio slot; slot `i` uses `VIRTIO_FIRST_GSI + i`.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Highest GSI the in-kernel IOAPIC routes (24 pins).
pub const MAX_GSI: u32 = 23;
/// Number of virtio-mmio slots: one per GSI from [`VIRTIO_FIRST_GSI`] to [`MAX_GSI`].
pub const VIRTIO_MMIO_SLOTS: u32 = MAX_GSI - VIRTIO_FIRST_GSI + 1;

/// The virtio-mmio slot plan. Slot order is address order and kernel command-line order, which
/// is the order Linux probes the devices in:
///
/// | slot | device |
/// | --- | --- |
/// | 0 | virtio-vsock |
/// | 1 ..= [`MAX_DISKS`](crate::MAX_DISKS) | virtio-blk, in `VmConfig::disks` order (`/dev/vda` first) |
/// | [`NIC_MMIO_SLOT`] | the network device (`--net`), when there is one |
/// | the rest | free |
pub const VSOCK_MMIO_SLOT: u32 = 0;
/// First block-device slot; disk `i` uses `FIRST_DISK_MMIO_SLOT + i`.
pub const FIRST_DISK_MMIO_SLOT: u32 = 1;
/// The network device's slot, past the last disk.
pub const NIC_MMIO_SLOT: u32 = FIRST_DISK_MMIO_SLOT + crate::MAX_DISKS as u32;

// Every planned slot has a routable GSI.
const _: () = assert!(NIC_MMIO_SLOT < VIRTIO_MMIO_SLOTS);
/// GSI of the COM1 serial port.
pub const SERIAL_GSI: u32 = 4;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

// The boot stack grows down from between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The guest RAM regions for `mem_size` bytes: one from 0 up to the MMIO gap, and the rest (if
/// any) from 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_GAP_START {
        regions.push((
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            (mem_size - MMIO_GAP_START) as usize,
        ));
    }
    regions
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The e820 map the guest sees: base memory up to the EBDA, the MP table reserved, RAM from 1 MiB
/// to the end of low RAM, and the RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: BASE_MEM_END - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(mem_size) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: FIRST_ADDR_PAST_32BITS,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Base address and GSI of virtio-mmio slot `index`, or `None` past the last routable GSI.
pub fn virtio_mmio_slot(index: u32) -> Option<(u64, u32)> {
    let gsi = VIRTIO_FIRST_GSI.checked_add(index)?;
    (gsi <= MAX_GSI).then(|| {
        (
            VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SLOT_LEN,
            gsi,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_one_region_and_three_e820_entries() {
        let mem = 128 * MIB;
        assert_eq!(ram_regions(mem), vec![(GuestAddress(0), mem as usize)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[1].addr + map[1].size, 0xa0000);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: mem - 0x10_0000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn large_guest_splits_around_the_mmio_gap() {
        let mem = 4096 * MIB;
        let regions = ram_regions(mem);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), 0xd000_0000));
        assert_eq!(
            regions[1],
            (GuestAddress(1 << 32), (mem - 0xd000_0000) as usize)
        );
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, mem);
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 32,
                size: mem - MMIO_GAP_START,
                kind: E820_RAM
            }
        );
        // No RAM entry overlaps the gap or another entry.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn virtio_slots_follow_the_gsi_plan() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(2), Some((0xd000_2000, 7)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
        assert_eq!(VIRTIO_MMIO_SLOTS, 19);
    }

    #[test]
    fn slot_plan_gives_each_device_its_own_window_and_gsi_in_order() {
        let vsock = virtio_mmio_slot(VSOCK_MMIO_SLOT).unwrap();
        let disks: Vec<_> = (0..crate::MAX_DISKS as u32)
            .map(|i| virtio_mmio_slot(FIRST_DISK_MMIO_SLOT + i).unwrap())
            .collect();
        let nic = virtio_mmio_slot(NIC_MMIO_SLOT).unwrap();
        let mut all = vec![vsock];
        all.extend(&disks);
        all.push(nic);
        // Ascending addresses and GSIs, no two devices sharing either.
        for w in all.windows(2) {
            assert!(w[0].0 + VIRTIO_MMIO_SLOT_LEN <= w[1].0);
            assert!(w[0].1 < w[1].1);
        }
        assert_eq!(disks[0], (0xd000_1000, 6));
        assert!(
            all.iter()
                .all(|&(base, gsi)| base < IOAPIC_DEFAULT_BASE as u64 && gsi <= MAX_GSI)
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, BASE_MEM_END - EBDA_START),
        ];
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x} overlaps {:#x}",
                w[0].0,
                w[1].0
            );
        }
    }
}
