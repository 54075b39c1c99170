//! Guest RAM: anonymous mappings laid out by [`super::layout::ram_regions`] and registered with
//! KVM as memory slots. This is the one place that hands host addresses to the kernel.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
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
}

/// Maps `size` bytes of guest RAM (anonymous, private, not yet touched).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap<()>, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
        .map_err(|source| MemoryError::Map { size, source })
}

/// Registers every region of `mem` with `vm`, slot `i` for region `i`.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap<()>) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| MemoryError::HostAddress { slot, source })?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of exactly `region.len()` bytes owned by
        // `mem`. The caller keeps `mem` (a clone shares the same mappings) alive for as long as
        // `vm` runs vCPUs: `Vmm` owns both and drops the VM file before the memory. Slots are
        // distinct and the regions do not overlap, as `ram_regions` guarantees.
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
