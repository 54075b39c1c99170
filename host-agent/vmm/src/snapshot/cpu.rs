//! Saving and restoring KVM state: each vCPU's ([`VcpuState`]) and the VM's ([`VmState`]).
//!
//! The KVM structures are kept as they are: kvm-bindings' `serde` feature encodes each as its
//! bytes. The one structure that feature leaves out, `kvm_fpu`, is mirrored in [`FpuState`].
//!
//! Every `KVM_GET_*`/`KVM_SET_*` on a vCPU runs on the vCPU's own thread while it is parked
//! outside `KVM_RUN` (see [`super::VcpuCommand`]); the VM-wide ones run on the thread that
//! takes the snapshot while every vCPU is parked.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `IA32_TSC`: restored first, so the guest's TSC continues from the saved value before any
/// MSR that is relative to it is written.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: restored last, after the TSC it is compared with (and after the LAPIC
/// whose timer mode gives it a meaning).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs a state may hold (KVM's index list is a few hundred at most).
pub const MAX_MSRS: usize = 4096;
/// The size of the classic `kvm_xsave` area `KVM_GET_XSAVE`/`KVM_SET_XSAVE` use.
const XSAVE_LEGACY_SIZE: i32 = std::mem::size_of::<kvm_xsave>() as i32;

/// `kvm_fpu`, which kvm-bindings does not serialize.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// What the host offers for saving vCPU state, found once per VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSupport {
    /// `KVM_CAP_XSAVE`: `KVM_GET_XSAVE`/`KVM_SET_XSAVE` exist.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`: `KVM_GET_XCRS`/`KVM_SET_XCRS` exist.
    pub xcrs: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub tsc_khz: bool,
    /// `KVM_CAP_XSAVE2`'s answer: the xsave area's size, 0 when the capability is absent.
    pub xsave2_size: i32,
    /// The MSRs to try to save: `KVM_GET_MSR_INDEX_LIST`.
    pub msr_index_list: Vec<u32>,
}

impl HostSupport {
    /// Asks `kvm` and `vm`. Call before any seccomp filter is installed (it uses `/dev/kvm`).
    pub fn probe(kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> Result<Self, SnapshotError> {
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(|source| SnapshotError::Kvm {
                ioctl: "KVM_GET_MSR_INDEX_LIST",
                cpu: None,
                source,
            })?
            .as_slice()
            .to_vec();
        Ok(Self {
            xsave: vm.check_extension(Cap::Xsave),
            xcrs: vm.check_extension(Cap::Xcrs),
            tsc_khz: vm.check_extension(Cap::GetTscKhz),
            xsave2_size: vm.check_extension_int(Cap::Xsave2),
            msr_index_list,
        })
    }

    /// Whether the classic 4 KiB `kvm_xsave` holds the whole xsave area. The VMM enables no
    /// dynamic xstate feature (no `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`), so it does on every
    /// host it runs on; this is checked, not assumed, because `KVM_SET_XSAVE` copies the area's
    /// size from the buffer it is given.
    fn legacy_xsave_fits(&self) -> bool {
        self.xsave2_size <= XSAVE_LEGACY_SIZE
    }
}

/// One vCPU's saved state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Its index (and APIC id).
    pub index: u8,
    /// `KVM_GET_CPUID2`.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `KVM_GET_TSC_KHZ`, when the host has it.
    pub tsc_khz: Option<u32>,
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_FPU`.
    pub fpu: FpuState,
    /// `KVM_GET_XSAVE`, when the host has it.
    pub xsave: Option<kvm_xsave>,
    /// `KVM_GET_XCRS`, when the host has it.
    pub xcrs: Option<kvm_xcrs>,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
    /// `KVM_GET_LAPIC`.
    pub lapic: kvm_lapic_state,
    /// `KVM_GET_MSRS` of every readable MSR of the index list.
    pub msrs: Vec<kvm_msr_entry>,
    /// `KVM_GET_VCPU_EVENTS`.
    pub vcpu_events: kvm_vcpu_events,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

fn kvm_err(ioctl: &'static str, cpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        ioctl,
        cpu: Some(cpu),
        source,
    }
}

/// Reads every MSR of `list` that KVM lets the host read. `KVM_GET_MSRS` stops at the first MSR
/// it cannot read and returns how many it read; that MSR is left out (it belongs to a feature
/// this guest's CPUID does not have, or it is write-only) and reading goes on after it.
fn read_msrs(vcpu: &VcpuFd, cpu: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(SnapshotError::Fam)?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS", cpu))?;
        let read = read.min(batch.len());
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < batch.len() {
            skipped.push(batch[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    if !skipped.is_empty() {
        tracing::debug!(cpu, ?skipped, "MSRs KVM would not read are not saved");
    }
    Ok(out)
}

/// Orders MSRs for `KVM_SET_MSRS`, which writes them in array order: the TSC first, the TSC
/// deadline last, the rest as saved.
fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let rank = |m: &kvm_msr_entry| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut out = msrs.to_vec();
    out.sort_by_key(rank);
    out
}

impl VcpuState {
    /// Saves vCPU `index`. Run it on the vCPU's thread, outside `KVM_RUN`.
    pub fn capture(vcpu: &VcpuFd, index: u8, host: &HostSupport) -> Result<Self, SnapshotError> {
        let err = |ioctl| kvm_err(ioctl, index);
        // The xsave area's size is checked before anything else is read.
        if host.xsave && !host.legacy_xsave_fits() {
            return Err(SnapshotError::XsaveTooLarge(host.xsave2_size));
        }
        let mp_state = vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let fpu = FpuState::from(&vcpu.get_fpu().map_err(err("KVM_GET_FPU"))?);
        let xsave = if host.xsave {
            Some(vcpu.get_xsave().map_err(err("KVM_GET_XSAVE"))?)
        } else {
            None
        };
        let xcrs = if host.xcrs {
            Some(vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let tsc_khz = if host.tsc_khz {
            Some(vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?)
        } else {
            None
        };
        let msrs = read_msrs(vcpu, index, &host.msr_index_list)?;
        let vcpu_events = vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            index,
            cpuid,
            tsc_khz,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            mp_state,
        })
    }

    /// Checks what a state file could get wrong before any of it reaches KVM.
    pub fn validate(&self, expected_index: u8, host: &HostSupport) -> Result<(), SnapshotError> {
        let bad = |what: String| SnapshotError::BadVcpuState {
            cpu: expected_index,
            what,
        };
        if self.index != expected_index {
            return Err(bad(format!("it is the state of vCPU {}", self.index)));
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(bad(format!("{} CPUID entries", self.cpuid.len())));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(bad(format!("{} MSRs", self.msrs.len())));
        }
        if self.xsave.is_some() && !host.xsave {
            return Err(bad(
                "it has xsave state and this host lacks KVM_CAP_XSAVE".into()
            ));
        }
        if self.xcrs.is_some() && !host.xcrs {
            return Err(bad("it has XCRs and this host lacks KVM_CAP_XCRS".into()));
        }
        if self.xsave.is_some() && !host.legacy_xsave_fits() {
            return Err(SnapshotError::XsaveTooLarge(host.xsave2_size));
        }
        Ok(())
    }

    /// Restores this state into `vcpu`, a fresh vCPU of a VM whose irqchip exists. The order
    /// is the one the module doc of [`super`] explains.
    pub fn restore(&self, vcpu: &VcpuFd, host: &HostSupport) -> Result<(), SnapshotError> {
        let index = self.index;
        self.validate(index, host)?;
        let err = |ioctl| kvm_err(ioctl, index);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(SnapshotError::Fam)?;
        vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz
            && host.tsc_khz
        {
            let now = vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?;
            if now != khz {
                vcpu.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ"))?;
            }
        }
        vcpu.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(err("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `validate` checked that the host's xsave area fits the 4 KiB `kvm_xsave`
            // (KVM_CAP_XSAVE2 answers at most its size, and this VMM enables no dynamic xstate
            // feature), so KVM reads no byte past `xsave`.
            unsafe { vcpu.set_xsave(xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        vcpu.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        let ordered = restore_order(&self.msrs);
        for batch in ordered.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(batch).map_err(SnapshotError::Fam)?;
            let set = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if set < batch.len() {
                return Err(SnapshotError::MsrRefused {
                    cpu: index,
                    msr: batch[set].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))
    }
}

/// The VM-wide state: the in-kernel irqchip, the PIT and the clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the master PIC.
    pub pic_master: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the slave PIC.
    pub pic_slave: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the IOAPIC.
    pub ioapic: kvm_irqchip,
    /// `KVM_GET_PIT2`.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        ioctl,
        cpu: None,
        source,
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Saves the VM-wide state. Every vCPU must be parked.
    pub fn capture(vm: &VmFd) -> Result<Self, SnapshotError> {
        Ok(Self {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores the irqchip and the PIT into `vm` (made with both): before the vCPUs' state.
    pub fn restore_devices(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for (chip, id, name) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
        ] {
            if chip.chip_id != id {
                return Err(SnapshotError::BadVmState(format!(
                    "the {name} entry holds chip {}",
                    chip.chip_id
                )));
            }
            vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(vm_err("KVM_SET_PIT2"))
    }

    /// Restores the clock: last, just before the vCPUs run. The saved flags are dropped, so
    /// KVM does not move the clock by the wall-clock time between snapshot and restore
    /// (`KVM_CLOCK_REALTIME`): the guest's monotonic clock goes on from the saved value.
    pub fn restore_clock(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_are_restored_tsc_first_and_deadline_last() {
        let m = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let saved = [m(0x6e0), m(0x174), m(0x10), m(0xc000_0080)];
        let order: Vec<u32> = restore_order(&saved).iter().map(|e| e.index).collect();
        assert_eq!(order, [0x10, 0x174, 0xc000_0080, 0x6e0]);
    }

    #[test]
    fn the_fpu_mirror_keeps_every_field() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 1,
            ftwx: 2,
            last_opcode: 3,
            last_ip: 4,
            last_dp: 5,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[3][7] = 8;
        fpu.xmm[15][15] = 9;
        let back = kvm_fpu::from(&FpuState::from(&fpu));
        assert_eq!(back, fpu);
    }
}
