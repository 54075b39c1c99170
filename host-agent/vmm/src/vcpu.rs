//! vCPUs: per-vCPU register setup and the run loop each vCPU thread executes.
//!
//! The loop dispatches port I/O and MMIO exits to the buses and turns every exit that ends the VM
//! (reset, triple fault, system events, failures) into a [`VmEvent`] for the thread that waits for
//! the VM's end. It stops when the shared stop flag is set and a kick (see
//! [`super::signals`]) interrupts `KVM_RUN`.
//!
//! **Pausing.** A [`RunGate`] shared by every vCPU thread parks them: the pausing thread closes
//! the gate and kicks each vCPU; a kicked vCPU sees the gate closed between two `KVM_RUN`s,
//! counts itself parked and waits. [`RunGate::wait_parked`] returns once all are. On resume each
//! vCPU tells KVM it was stopped (`KVM_KVMCLOCK_CTRL`) before it runs again, so the guest's
//! watchdogs do not take the pause for a hung CPU; kvmclock itself keeps counting host time,
//! so the guest's clocks stay right across the pause.
//!
//! **Work while parked.** A parked vCPU thread also runs the [`VcpuCommand`]s sent to it, each
//! time [`RunGate::notify`] wakes it (or at the latest after its periodic re-check): that is how
//! a snapshot reads each vCPU's state on the vCPU's own thread, outside `KVM_RUN`.

use crate::memory::GuestRam;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::devices::bus::Bus;
use super::exit::VmEvent;
use super::seccomp::{self, ThreadKind};
use super::signals;
use super::snapshot::{self, VcpuCommand};
use super::x86_64::{cpuid, lapic, msr, regs};

/// Errors from configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Building the CPUID table failed.
    #[error("build CPUID for vCPU {0}")]
    BuildCpuid(u8, #[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("set CPUID of vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    /// Building the MSR list failed.
    #[error("build boot MSRs")]
    BuildMsrs(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("set MSRs of vCPU {0}")]
    SetMsrs(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` set fewer MSRs than asked.
    #[error("vCPU {cpu}: KVM set {set} of {wanted} boot MSRs")]
    PartialMsrs {
        /// vCPU index.
        cpu: u8,
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
    },
    /// `KVM_SET_FPU` failed.
    #[error("set FPU of vCPU {0}")]
    SetFpu(u8, #[source] kvm_ioctls::Error),
    /// `KVM_GET_LAPIC` failed.
    #[error("get LAPIC of vCPU {0}")]
    GetLapic(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("set LAPIC of vCPU {0}")]
    SetLapic(u8, #[source] kvm_ioctls::Error),
    /// `KVM_GET_SREGS` failed.
    #[error("get special registers of vCPU {0}")]
    GetSregs(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("set special registers of vCPU {0}")]
    SetSregs(u8, #[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("set registers of vCPU {0}")]
    SetRegs(u8, #[source] kvm_ioctls::Error),
}

/// Configures vCPU `index` of `count`: CPUID, MSRs, FPU and LAPIC for every vCPU; on the boot
/// vCPU (index 0) also the long-mode registers that enter the kernel at `entry`. The other vCPUs
/// wait for INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    supported_cpuid: &CpuId,
    entry: u64,
) -> Result<(), VcpuError> {
    let mut entries = supported_cpuid.as_slice().to_vec();
    cpuid::fixup_cpuid(&mut entries, index, count);
    let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::BuildCpuid(index, e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| VcpuError::SetCpuid(index, e))?;

    let msrs = msr::boot_msrs().map_err(VcpuError::BuildMsrs)?;
    let wanted = msrs.as_slice().len();
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| VcpuError::SetMsrs(index, e))?;
    if set != wanted {
        return Err(VcpuError::PartialMsrs {
            cpu: index,
            set,
            wanted,
        });
    }

    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(|e| VcpuError::SetFpu(index, e))?;

    let mut klapic = vcpu
        .get_lapic()
        .map_err(|e| VcpuError::GetLapic(index, e))?;
    lapic::configure_lint(&mut klapic);
    vcpu.set_lapic(&klapic)
        .map_err(|e| VcpuError::SetLapic(index, e))?;

    if index == 0 {
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| VcpuError::GetSregs(index, e))?;
        regs::configure_long_mode_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(|e| VcpuError::SetSregs(index, e))?;
        vcpu.set_regs(&regs::boot_regs(entry))
            .map_err(|e| VcpuError::SetRegs(index, e))?;
    }
    Ok(())
}

/// What one `KVM_RUN` exit means for the loop.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    End(VmEvent),
}

/// Maps a system event (`KVM_EXIT_SYSTEM_EVENT`) to the VM's end.
fn system_event(cpu: u8, kind: u32) -> VmEvent {
    match kind {
        KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
        KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
        KVM_SYSTEM_EVENT_CRASH => VmEvent::VcpuError {
            cpu,
            detail: "KVM_SYSTEM_EVENT_CRASH".into(),
        },
        other => VmEvent::VcpuError {
            cpu,
            detail: format!("unexpected KVM system event {other}"),
        },
    }
}

/// Where vCPU threads park while the VM is paused; see the module doc.
#[derive(Debug, Default)]
pub struct RunGate {
    /// Read by the vCPUs between two `KVM_RUN`s, without the lock.
    closed: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    parked: usize,
}

impl RunGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate: each vCPU parks at its next exit from `KVM_RUN` (kick them).
    pub fn close(&self) {
        self.lock().closed = true;
        self.closed.store(true, Ordering::Release);
    }

    /// Opens the gate: parked vCPUs run again.
    pub fn open(&self) {
        let mut state = self.lock();
        state.closed = false;
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How many vCPUs are parked.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Waits until `count` vCPUs are parked, calling `kick` every `interval` meanwhile (a vCPU
    /// may have entered `KVM_RUN` between the gate closing and its kick). `false` when the
    /// deadline passed first.
    pub fn wait_parked(
        &self,
        count: usize,
        interval: Duration,
        deadline: Instant,
        mut kick: impl FnMut(),
    ) -> bool {
        let mut state = self.lock();
        loop {
            if state.parked >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            drop(state);
            kick();
            state = self.lock();
            if state.parked >= count {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, interval.min(deadline - now))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Wakes the parked vCPU threads without opening the gate, so each runs the work waiting
    /// for it (see `RunGate::park_with`) and parks again.
    pub fn notify(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// On a vCPU thread: parks while the gate is closed and `stop` is not set. `true` when the
    /// thread did park.
    pub(crate) fn park(&self, stop: &AtomicBool) -> bool {
        self.park_with(stop, || {})
    }

    /// [`RunGate::park`], calling `work` (without the lock) once parked and each time the
    /// thread wakes while the gate stays closed: how a parked vCPU thread runs commands on its
    /// own vCPU (see [`crate::snapshot::VcpuCommand`]).
    pub(crate) fn park_with(&self, stop: &AtomicBool, mut work: impl FnMut()) -> bool {
        if !self.is_closed() {
            return false;
        }
        let mut state = self.lock();
        if !state.closed {
            return false;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.closed && !stop.load(Ordering::Acquire) {
            drop(state);
            work();
            state = self.lock();
            if !state.closed || stop.load(Ordering::Acquire) {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, PARK_RECHECK)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        state.parked -= 1;
        true
    }
}

/// How often a parked vCPU re-checks the stop flag (stopping the VM does not open the gate).
const PARK_RECHECK: Duration = Duration::from_millis(50);

/// Everything a vCPU thread needs.
#[derive(Debug)]
pub struct VcpuRunner {
    /// vCPU index (its APIC id).
    pub index: u8,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Where the VM's end is reported.
    pub events: Sender<VmEvent>,
    /// Guest memory, held so the mappings outlive the vCPU.
    pub mem: GuestRam,
    /// Where the vCPU parks while the VM is paused.
    pub gate: Arc<RunGate>,
    /// Work for the vCPU's own thread while it is parked (saving its state for a snapshot).
    pub commands: Option<Receiver<VcpuCommand>>,
    /// The boot timeline, reported just before the first `KVM_RUN` (vCPU 0 only).
    pub timeline: Option<crate::timeline::BootTimeline>,
}

impl VcpuRunner {
    /// Runs the vCPU until the VM ends or [`VcpuRunner::stop`] is set and a kick arrives.
    pub fn run(mut self) {
        seccomp::confine_or_exit(ThreadKind::Vcpu);
        let run_page: *mut kvm_bindings::kvm_run = self.vcpu.get_kvm_run();
        // SAFETY: `run_page` is the kvm_run mapping of `self.vcpu`, owned by this thread; it is
        // cleared below before `self.vcpu` is dropped at the end of this function.
        unsafe { signals::set_thread_kvm_run(run_page) };
        let mut unhandled: u64 = 0;
        while !self.stop.load(Ordering::Acquire) {
            let (vcpu, index) = (&self.vcpu, self.index);
            let parked = match &self.commands {
                Some(commands) => self
                    .gate
                    .park_with(&self.stop, || snapshot::run_pending(commands, vcpu, index)),
                None => self.gate.park(&self.stop),
            };
            if parked {
                // Tell the guest's kvmclock it was stopped, so its watchdogs do not report the
                // pause as a soft lockup. EINVAL: the guest does not use kvmclock.
                if let Err(e) = self.vcpu.kvmclock_ctrl()
                    && e.errno() != libc::EINVAL
                {
                    tracing::debug!(cpu = self.index, error = %e, "KVM_KVMCLOCK_CTRL failed");
                }
                continue;
            }
            if let Some(timeline) = self.timeline.take() {
                timeline.report_first_run();
            }
            match self.step(&mut unhandled) {
                Step::Continue => {}
                Step::End(event) => {
                    // The waiter may have gone already (another vCPU ended the VM first).
                    let _ = self.events.send(event);
                    break;
                }
            }
        }
        signals::clear_thread_kvm_run();
    }

    fn step(&mut self, unhandled: &mut u64) -> Step {
        let cpu = self.index;
        match self.vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    // Nothing decodes the port: the bus floats high.
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                // Writes to unclaimed ports (other COM ports, POST codes) are dropped.
                self.pio.write(u64::from(port), data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    // Neither RAM nor a device: reads as zeros. (Every VMM log line is rate-limited
                    // per call site, see `log_limit`.)
                    tracing::debug!(
                        cpu,
                        addr = format_args!("{addr:#x}"),
                        "MMIO read of nothing"
                    );
                    data.fill(0);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: Linux resets through the keyboard controller (`reboot=k`), which
                // the i8042 device reports itself, so this is a guest that crashed hard.
                tracing::warn!(
                    cpu,
                    state = %self.fault_state(),
                    "KVM_EXIT_SHUTDOWN: the guest triple-faulted; ending it as a reset"
                );
                Step::End(VmEvent::Reset)
            }
            Ok(VcpuExit::Hlt) => Step::End(VmEvent::PowerOff),
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::End(system_event(cpu, kind)),
            Ok(VcpuExit::FailEntry(reason, on_cpu)) => Step::End(VmEvent::VcpuError {
                cpu,
                detail: format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host cpu {on_cpu}"
                ),
            }),
            Ok(VcpuExit::InternalError) => {
                let suberror = self.internal_suberror();
                Step::End(VmEvent::VcpuError {
                    cpu,
                    detail: format!("KVM_EXIT_INTERNAL_ERROR: suberror {suberror}"),
                })
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(other) => {
                *unhandled += 1;
                let detail = format!("unexpected vCPU exit {other:?}");
                if *unhandled <= 3 {
                    tracing::error!(cpu, "{detail}");
                }
                Step::End(VmEvent::VcpuError { cpu, detail })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (or a stray signal): clear immediate_exit and re-check the stop flag.
                self.vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::End(VmEvent::VcpuError {
                cpu,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    /// The registers that say where and how a guest crashed (read once, as the VM ends), for
    /// the triple-fault warning: the instruction and stack pointers, the control registers, the
    /// descriptor tables and any exception KVM still holds.
    ///
    /// On Intel, KVM leaves the registers as they were at the fault. On AMD it resets the vCPU
    /// as it reports the shutdown, so they read as the reset state (`rip=0xfff0`, `cs=0xf000`);
    /// the warning says so, and only the last exception's vector and error code are left.
    fn fault_state(&self) -> String {
        let regs = match self.vcpu.get_regs() {
            Ok(r) => r,
            Err(e) => return format!("registers unreadable: {e}"),
        };
        let sregs = self.vcpu.get_sregs().ok();
        let reset = regs.rip == 0xfff0 && sregs.is_some_and(|s| s.cs.selector == 0xf000);
        let mut out = String::new();
        if reset {
            out.push_str("(registers already reset by KVM) ");
        }
        out += &format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rdi={:#x}",
            regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rdi
        );
        if let Some(s) = sregs {
            out.push_str(&format!(
                " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} ss={:#x} \
                 idt={:#x}/{:#x} gdt={:#x}/{:#x} tr={:#x}@{:#x}",
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.ss.selector,
                s.idt.base,
                s.idt.limit,
                s.gdt.base,
                s.gdt.limit,
                s.tr.selector,
                s.tr.base
            ));
        }
        if let Ok(ev) = self.vcpu.get_vcpu_events() {
            out.push_str(&format!(
                " exception={}/{}/{:#x} interrupt={}/{} nmi={}/{}",
                ev.exception.injected,
                ev.exception.nr,
                ev.exception.error_code,
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.nmi.injected,
                ev.nmi.pending
            ));
        }
        out
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, which makes `internal` the
        // active member of the exit union; it is plain old data.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_events_map_to_vm_events() {
        assert_eq!(system_event(0, KVM_SYSTEM_EVENT_RESET), VmEvent::Reset);
        assert_eq!(
            system_event(0, KVM_SYSTEM_EVENT_SHUTDOWN),
            VmEvent::PowerOff
        );
        assert!(matches!(
            system_event(1, KVM_SYSTEM_EVENT_CRASH),
            VmEvent::VcpuError { cpu: 1, .. }
        ));
        assert!(matches!(
            system_event(2, 99),
            VmEvent::VcpuError { cpu: 2, .. }
        ));
    }
}
