//! Local APIC wiring: LINT0 delivers the legacy PIC's interrupts (ExtINT) and LINT1 delivers NMIs,
//! as on a PC, so the guest's timer check and NMI watchdog find what they expect.

use kvm_bindings::kvm_lapic_state;

/// LVT LINT0 register offset.
pub const APIC_LVT0: usize = 0x350;
/// LVT LINT1 register offset.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode: NMI.
const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode: ExtINT.
const APIC_MODE_EXTINT: u32 = 0x7;

/// Reads the 32-bit APIC register at `offset`.
pub fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit APIC register at `offset`.
pub fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

/// Replaces the delivery-mode field (bits 8..11) of an LVT value.
const fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, keeping the other LVT bits.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000 | 0x400);
        set_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        configure_lint(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x0001_0400);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}
