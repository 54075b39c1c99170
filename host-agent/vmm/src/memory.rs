//! Guest RAM: anonymous mappings laid out by [`super::layout::ram_regions`] and registered with
//! KVM as memory slots. This is the one place that hands host addresses to the kernel.
//!
//! # Which pages changed
//! Live migration copies memory while the guest runs, then copies again what changed. Two
//! writers change guest RAM, and each is tracked where it writes:
//! - **the guest's vCPUs**, by KVM: a slot registered with `KVM_MEM_LOG_DIRTY_PAGES`
//!   ([`set_dirty_logging`]) has a bitmap that `KVM_GET_DIRTY_LOG` reads and clears;
//! - **the VMM's own devices** (a received packet, a block read, a used ring), by vm-memory:
//!   [`GuestRam`] carries an [`AtomicBitmap`] per region, which every write through vm-memory
//!   marks. No device writes guest RAM any other way (no raw host pointers), so nothing escapes
//!   it.
//!
//! [`crate::migration`] reads and clears both.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::ram_regions;

/// Errors from creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping the guest RAM failed.
    #[error("map {size} bytes of guest RAM")]
    Map {
        /// Requested guest RAM in bytes.
        size: u64,
        /// The mapping error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A region's host address could not be resolved.
    #[error("resolve host address of guest region {slot}")]
    HostAddress {
        /// KVM slot number.
        slot: u32,
        /// The lookup error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("register guest region {slot} with KVM")]
    SetUserMemoryRegion {
        /// KVM slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("read the dirty-page log of guest region {slot}")]
    DirtyLog {
        /// KVM slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM as the VMM holds it: vm-memory's mappings, each with a bitmap of the pages the VMM
/// wrote (see the module doc). The bitmap costs one bit per 4 KiB page and an atomic OR per
/// page a device writes.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Maps `size` bytes of guest RAM (anonymous, private, not yet touched).
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    GuestRam::from_ranges(&ram_regions(size)).map_err(|source| MemoryError::Map { size, source })
}

/// Registers every region of `mem` with `vm`, slot `i` for region `i`.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    register(vm, mem, 0)
}

/// Turns KVM's dirty-page logging of every slot of `mem` on or off: each slot is registered
/// again, at the same place, with or without `KVM_MEM_LOG_DIRTY_PAGES`. Turning it on starts
/// with every page clean; [`dirty_log`] reads and clears a slot's log.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestRam, on: bool) -> Result<(), MemoryError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    register(vm, mem, flags)
}

/// The pages of slot `slot` (`len` bytes) that the guest wrote since the last call, one bit per
/// 4 KiB page in 64-bit words; reading clears the log. The slot must log dirty pages
/// ([`set_dirty_logging`]).
pub fn dirty_log(vm: &VmFd, slot: u32, len: usize) -> Result<Vec<u64>, MemoryError> {
    vm.get_dirty_log(slot, len)
        .map_err(|source| MemoryError::DirtyLog { slot, source })
}

fn register(vm: &VmFd, mem: &GuestRam, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| MemoryError::HostAddress { slot, source })?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of exactly `region.len()` bytes owned by
        // `mem`. The caller keeps `mem` (a clone shares the same mappings) alive for as long as
        // `vm` runs vCPUs: `Vmm` owns both and drops the VM file before the memory. Slots are
        // distinct and the regions do not overlap, as `ram_regions` guarantees. Registering a
        // slot again with the same range and other flags only changes its flags.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetUserMemoryRegion { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_follows_the_layout() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr().raw_value(), (64 << 20) - 1);
    }
}
