//! Per-vCPU fix-ups of the CPUID table that `KVM_GET_SUPPORTED_CPUID` returns.
//!
//! KVM reports what the host can virtualize; the VMM still has to describe the machine it built:
//! which APIC id this vCPU has, how many vCPUs share the package, and that a hypervisor is
//! present. The topology is one package with `count` single-threaded cores, APIC id = vCPU index.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 0x1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX: HTT (more than one logical processor per package).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;
/// Leaf 0xb / 0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold APIC ids `0..count`.
fn apic_id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Rewrites `entries` for vCPU `cpu_index` of `cpu_count`.
pub fn fixup_cpuid(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, cpu_count: u8) {
    let id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    let core_bits = apic_id_bits(count);
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (id << 24) | (count << 16) | (CLFLUSH_LINE_SIZE << 8);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters (Intel): cores per package in EAX[31:26]; each
                // cache is private to a core except the last level, shared by the package.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: SMT level (1 thread), then core level (`count` cores).
                entry.edx = id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: NC (cores - 1) in ECX[7:0], APIC id size in ECX[15:12].
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | ((count - 1) & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC id; one thread per core, core id = APIC id.
                entry.eax = id;
                entry.ebx = id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xdead_0000,
            ebx: 0xffff_ffff,
            ecx: 0x0000_0001,
            edx: 0x0000_0001,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut entries = vec![entry(0x1, 0)];
        fixup_cpuid(&mut entries, 3, 4);
        let e = entries[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!((e.ebx >> 8) & 0xff, 8);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e.ecx & 1, 1, "other feature bits are kept");
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);

        let mut single = vec![kvm_cpuid_entry2 {
            edx: LEAF1_EDX_HTT,
            ..entry(0x1, 0)
        }];
        fixup_cpuid(&mut single, 0, 1);
        assert_eq!(single[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_package_of_single_thread_cores() {
        let mut entries = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2), entry(0x4, 0)];
        entries[3].eax = 3 << 5; // an L3 descriptor
        fixup_cpuid(&mut entries, 2, 3);
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&entries, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
        let l3 = find(&entries, 0x4, 0);
        assert_eq!(l3.eax >> 26, 2);
        assert_eq!((l3.eax >> 14) & 0xfff, 2);
        assert_eq!((l3.eax >> 5) & 7, 3);
    }

    #[test]
    fn amd_leaves_count_cores() {
        let mut entries = vec![entry(0x8000_0008, 0), entry(0x8000_001e, 0)];
        fixup_cpuid(&mut entries, 1, 2);
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx & 0xff, 1);
        assert_eq!((find(&entries, 0x8000_0008, 0).ecx >> 12) & 0xf, 1);
        assert_eq!(find(&entries, 0x8000_001e, 0).eax, 1);
        assert_eq!(apic_id_bits(1), 0);
        assert_eq!(apic_id_bits(2), 1);
        assert_eq!(apic_id_bits(5), 3);
        assert_eq!(apic_id_bits(32), 5);
    }
}
