//! Runner self-test: the first use of kvm-ioctls in the tree.
//!
//! Opens `/dev/kvm`, creates a VM with one page of guest memory, and runs a tiny 16-bit
//! real-mode guest that writes `KVM-OK\n` to the COM1 data port (0x3f8) and halts. Asserts every
//! byte the guest printed and the final HLT exit. Through `scripts/nested-run` this proves that
//! the L1 VM really offers a working KVM.

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const GUEST_CODE_ADDR: u64 = 0x1000;
const COM1: u16 = 0x3f8;

/// Real-mode code: for each byte, `mov al, imm8; out dx, al`, then `hlt`.
fn real_mode_program(message: &[u8]) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in message {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.push(0xf4); // hlt
    code
}

#[test]
#[ignore = "e2e: run through scripts/e2e (needs /dev/kvm, normally inside the nested runner)"]
fn real_mode_guest_prints_and_halts() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");

    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("guest memory");
    let message = b"KVM-OK\n";
    mem.write_slice(&real_mode_program(message), GuestAddress(GUEST_CODE_ADDR))
        .expect("write guest code");
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `[userspace_addr, userspace_addr + memory_size)` is a live mapping owned by
        // `mem`, and it stays mapped for as long as the VM can touch it: the vCPU and the VM are
        // dropped explicitly at the end of this test, before `mem`. Each region gets its own slot
        // and the regions do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.expect("KVM_SET_USER_MEMORY_REGION");
    }

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = GUEST_CODE_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    let mut printed = Vec::new();
    let halted = loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, COM1, "guest wrote to an unexpected port");
                printed.extend_from_slice(data);
            }
            VcpuExit::Hlt => break true,
            other => panic!("unexpected vCPU exit: {other:?}"),
        }
        assert!(printed.len() <= message.len(), "guest printed too much");
    };
    assert!(halted);
    assert_eq!(printed, message, "bytes the guest printed");
    println!(
        "kvm self-test: guest printed {:?} and halted",
        String::from_utf8_lossy(&printed)
    );

    drop(vcpu);
    drop(vm);
    drop(mem);
}
