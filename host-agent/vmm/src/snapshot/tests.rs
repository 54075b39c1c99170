//! Snapshot and restore of a real KVM guest: a real-mode loop that counts in memory and in a
//! register, paused, saved, restored into a fresh VM, and run on from where it was.
//!
//! Needs `/dev/kvm`. Without it, or where the host's KVM refuses an ioctl a snapshot needs (as a
//! nested paravirtual KVM may), the test says which and stops there: it reports, it does not
//! pretend.

use crate::memory::GuestRam;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::time::Duration;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::control::{self, Kicker, Request};
use crate::devices::bus::Bus;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::seccomp::ThreadKind;
use crate::vcpu::{RunGate, VcpuRunner};

/// Where the guest's code is loaded (real mode, CS = 0).
pub(crate) const CODE: u64 = 0x1000;
/// The guest's memory counter (a dword at DS:0x500, DS = 0).
pub(crate) const COUNTER: u64 = 0x500;
/// `inc dword [0x500]; inc ebx; jmp short back to the start`.
const GUEST_LOOP: [u8; 9] = [0x66, 0xff, 0x06, 0x00, 0x05, 0x66, 0x43, 0xeb, 0xf7];
pub(crate) const MEM_BYTES: u64 = 64 << 20;

/// Installs the VMM's filter of `kind` on this thread (without the VMM's SIGSYS handler: a
/// call the filter lacks kills the test process with "Bad system call").
pub(crate) fn confine_for_test(kind: ThreadKind) {
    let bpf = crate::seccomp::compile(kind).unwrap();
    seccompiler::apply_filter(&bpf).unwrap();
}

/// Why the test could not go on: a missing `/dev/kvm` or an ioctl the host refuses.
pub(crate) struct Unsupported(pub(crate) String);

pub(crate) fn refused(what: &str, e: impl std::fmt::Display) -> Unsupported {
    Unsupported(format!("{what} refused by this host's KVM: {e}"))
}

/// An error from this module: an ioctl the host refuses ends the test with a report; any
/// other error fails it.
pub(crate) fn host_or_fail<T>(r: Result<T, SnapshotError>) -> Result<T, Unsupported> {
    match r {
        Ok(v) => Ok(v),
        Err(SnapshotError::Kvm { ioctl, cpu, source }) => Err(Unsupported(format!(
            "{ioctl} (vCPU {cpu:?}) refused by this host's KVM: {source}"
        ))),
        Err(e) => panic!("snapshot failed: {}", crate::error_chain(&e)),
    }
}

pub(crate) struct TestVm {
    pub(crate) kvm: Kvm,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) vcpu: VcpuFd,
    pub(crate) mem: GuestRam,
    pub(crate) host: Arc<HostSupport>,
}

/// A VM like the VMM's (TSS, identity map, irqchip, PIT, RAM, one vCPU with the host's CPUID).
pub(crate) fn build_vm() -> Result<TestVm, Unsupported> {
    let kvm = Kvm::new().map_err(|e| Unsupported(format!("cannot open /dev/kvm: {e}")))?;
    let vm = kvm.create_vm().map_err(|e| refused("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| refused("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| refused("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| refused("KVM_CREATE_IRQCHIP", e))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| refused("KVM_CREATE_PIT2", e))?;
    let mem = crate::memory::create_guest_memory(MEM_BYTES).unwrap();
    crate::memory::register_guest_memory(&vm, &mem)
        .map_err(|e| refused("KVM_SET_USER_MEMORY_REGION", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| refused("KVM_CREATE_VCPU", e))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| refused("KVM_GET_SUPPORTED_CPUID", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| refused("KVM_SET_CPUID2", e))?;
    let host = Arc::new(host_or_fail(HostSupport::probe(&kvm, &vm))?);
    Ok(TestVm {
        kvm,
        vm: Arc::new(vm),
        vcpu,
        mem,
        host,
    })
}

/// Loads the counting loop and points the vCPU at it, in real mode.
pub(crate) fn load_guest(t: &TestVm) {
    load_program(t, &GUEST_LOOP);
}

/// Loads real-mode `code` at [`CODE`] and points the vCPU at it, with EBX zero.
pub(crate) fn load_program(t: &TestVm, code: &[u8]) {
    t.mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let mut sregs = t.vcpu.get_sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    t.vcpu.set_sregs(&sregs).unwrap();
    let mut regs = t.vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    regs.rbx = 0;
    t.vcpu.set_regs(&regs).unwrap();
}

/// A running vCPU thread, its gate, and what it takes to pause, snapshot and stop it.
pub(crate) struct Running {
    pub(crate) gate: Arc<RunGate>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) kicker: Arc<Kicker>,
    pub(crate) thread: std::thread::JoinHandle<()>,
    pub(crate) source: SnapshotSource,
}

pub(crate) fn start(t: TestVm) -> Running {
    crate::signals::install_kick_handler().unwrap();
    let gate = Arc::new(RunGate::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (commands_tx, commands_rx) = channel();
    let (events, _events_rx) = channel();
    let runner = VcpuRunner {
        index: 0,
        vcpu: t.vcpu,
        pio: Bus::new(),
        mmio: Bus::new(),
        stop: stop.clone(),
        events,
        mem: t.mem.clone(),
        gate: gate.clone(),
        commands: Some(commands_rx),
        timeline: None,
    };
    let thread = std::thread::spawn(move || {
        // Keep the events receiver alive for the thread's life.
        let _events_rx = _events_rx;
        // Under the VMM's vCPU filter, so a call it lacks ends the test process with SIGSYS.
        confine_for_test(ThreadKind::Vcpu);
        runner.run()
    });
    let kicker = {
        use std::os::unix::thread::JoinHandleExt;
        Arc::new(Kicker::new(vec![thread.as_pthread_t()]))
    };
    Running {
        gate,
        stop,
        kicker,
        thread,
        source: SnapshotSource {
            vm: t.vm,
            mem: t.mem,
            vcpus: vec![commands_tx],
            host: t.host,
            devices: Arc::new(|| Ok(DeviceStates::power_on())),
            disks: Vec::new(),
        },
    }
}

impl Running {
    pub(crate) fn pause(&self) {
        let answer = control::handle(
            Request::Pause,
            &self.gate,
            1,
            &mut || self.kicker.kick_all(),
            &crate::devices::virtio::VirtioDevices::default(),
            control::PAUSE_TIMEOUT,
        );
        assert!(
            matches!(
                answer,
                control::Answer::Ok {
                    state: control::RunState::Paused,
                    ..
                }
            ),
            "{answer:?}"
        );
    }

    pub(crate) fn resume(&self) {
        self.gate.open();
    }

    fn snapshot(&self, dir: &Path) -> Result<SnapshotSummary, SnapshotError> {
        take(
            dir,
            &self.source,
            self.gate.is_closed() && self.gate.parked() == self.source.vcpus.len(),
            &|| self.gate.notify(),
            Duration::from_secs(5),
        )
    }

    /// A `snapshot` request on the control socket, for folder `name` inside `vm_dir`, served
    /// as the control thread serves it: on a thread under the control filter.
    fn snapshot_request(&self, vm_dir: &Path, name: &str) -> control::Answer {
        let ctx = control::SnapshotContext {
            vm_dir: vm_dir.to_path_buf(),
            source: self.source.clone(),
        };
        let gate = self.gate.clone();
        let kicker = self.kicker.clone();
        let name = name.to_owned();
        std::thread::spawn(move || {
            confine_for_test(ThreadKind::Control);
            control::handle_snapshot(
                &name,
                &gate,
                1,
                &mut || kicker.kick_all(),
                &crate::devices::virtio::VirtioDevices::default(),
                Some(&ctx),
                Duration::from_secs(5),
            )
        })
        .join()
        .unwrap()
    }

    pub(crate) fn counter(&self) -> u32 {
        self.source.mem.read_obj(GuestAddress(COUNTER)).unwrap()
    }

    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.kicker.kick_all();
        self.gate.open();
        while !self.thread.is_finished() {
            self.kicker.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        self.kicker.retire();
        self.thread.join().unwrap();
    }
}

/// Waits until the guest's counter passes `min`.
pub(crate) fn wait_for_count(r: &Running, min: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.counter() <= min {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The counter in memory and EBX move one instruction apart: equal, or memory one ahead.
pub(crate) fn assert_in_step(memory: u32, rbx: u64) {
    let ebx = rbx as u32;
    assert!(
        memory == ebx || memory == ebx.wrapping_add(1),
        "memory counter {memory} and ebx {ebx} are out of step"
    );
}

fn snapshot_and_restore() -> Result<(), Unsupported> {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");

    // The first VM counts, is paused, and saved.
    let first = build_vm()?;
    load_guest(&first);
    let running = start(first);
    wait_for_count(&running, 1000);
    // Not paused: refused, and nothing is made.
    assert!(matches!(
        running.snapshot(&dir.path().join("early")),
        Err(SnapshotError::NotPaused)
    ));
    let answer = running.snapshot_request(dir.path(), "early");
    assert!(
        matches!(&answer, control::Answer::Err { error, .. } if error.contains("not paused")),
        "{answer:?}"
    );
    assert!(!dir.path().join("early").exists());
    running.pause();
    let summary = running.snapshot(&snap);
    // Through the control socket's handler too; a folder that exists is not overwritten.
    if summary.is_ok() {
        control_snapshots(&running, dir.path());
    }
    let saved_counter = running.counter();
    // A paused guest does not count.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(running.counter(), saved_counter);
    running.stop();
    let summary = host_or_fail(summary)?;
    assert_eq!(summary.vcpus, 1);
    assert_eq!(summary.memory_bytes, MEM_BYTES);
    // The guest touched two pages (code and counter share one) and the rest stays a hole.
    assert!(
        summary.memory_data_bytes <= 2 * memory::PAGE as u64,
        "{summary:?}"
    );

    let state: SnapshotState = format::read_file(&snap.join(STATE_FILE)).unwrap();
    let saved = &state.vcpus[0];
    assert_in_step(saved_counter, saved.regs.rbx);
    assert!(
        (CODE..CODE + GUEST_LOOP.len() as u64).contains(&saved.regs.rip),
        "rip {:#x} is outside the loop",
        saved.regs.rip
    );
    assert!(!saved.msrs.is_empty(), "no MSR was saved");

    // A fresh VM, restored: memory and registers are where they were before anything runs.
    let second = build_vm()?;
    let state = read_state(&snap, &second.host).unwrap();
    host_or_fail(restore(
        &snap,
        &state,
        &second.vm,
        std::slice::from_ref(&second.vcpu),
        &second.mem,
        &second.host,
    ))?;
    host_or_fail(state.vm.restore_clock(&second.vm))?;
    let restored_counter: u32 = second.mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(restored_counter, saved_counter);
    let regs = second.vcpu.get_regs().unwrap();
    assert_eq!(regs.rbx, saved.regs.rbx);
    assert_eq!(regs.rip, saved.regs.rip);
    assert_eq!(regs.rflags, saved.regs.rflags);
    let sregs = second.vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cs.base, saved.sregs.cs.base);
    assert_eq!(sregs.cr0, saved.sregs.cr0);
    let code: [u8; 9] = second.mem.read_obj(GuestAddress(CODE)).unwrap();
    assert_eq!(code, GUEST_LOOP);

    let running_host = second.host.clone();
    // It runs on from the saved count, and a second snapshot shows both counters moved on
    // together.
    let running = start(second);
    wait_for_count(&running, saved_counter + 1000);
    running.pause();
    let snap2 = dir.path().join("snap2");
    let again = running.snapshot(&snap2);
    let counter2 = running.counter();
    running.resume();
    running.stop();
    host_or_fail(again)?;
    let state2: SnapshotState = format::read_file(&snap2.join(STATE_FILE)).unwrap();
    let rbx2 = state2.vcpus[0].regs.rbx;
    assert!(counter2 > saved_counter + 1000);
    assert!(rbx2 > saved.regs.rbx);
    assert_in_step(counter2, rbx2);
    eprintln!(
        "snapshot/restore: saved at count {saved_counter} (rip {:#x}), ran on to {counter2}; \
         {} of the {} MSRs of KVM's index list saved, xsave {}, xcrs {}, tsc_khz {:?}",
        saved.regs.rip,
        saved.msrs.len(),
        running_host.msr_index_list.len(),
        saved.xsave.is_some(),
        saved.xcrs.is_some(),
        saved.tsc_khz,
    );
    Ok(())
}

fn control_snapshots(running: &Running, vm_dir: &Path) {
    let answer = running.snapshot_request(vm_dir, "via-control");
    let control::Answer::Snapshot { snapshot: info, .. } = &answer else {
        panic!("{answer:?}");
    };
    assert_eq!((info.vcpus, info.memory_bytes), (1, MEM_BYTES));
    let answer = running.snapshot_request(vm_dir, "via-control");
    assert!(matches!(answer, control::Answer::Err { .. }), "{answer:?}");
    let answer = running.snapshot_request(vm_dir, "../escape");
    assert!(matches!(answer, control::Answer::Err { .. }), "{answer:?}");
}

#[test]
fn a_real_mode_guest_is_snapshotted_restored_and_counts_on() {
    if let Err(Unsupported(why)) = snapshot_and_restore() {
        eprintln!("SKIPPED a_real_mode_guest_is_snapshotted_restored_and_counts_on: {why}");
    }
}

#[test]
fn folder_names_are_plain_relative_paths() {
    assert_eq!(folder_name("snap-1").unwrap(), PathBuf::from("snap-1"));
    assert_eq!(
        folder_name("snaps/one").unwrap(),
        PathBuf::from("snaps/one")
    );
    for bad in ["", "/tmp/x", "../x", "a/../b", ".", "./a", "a\0b"] {
        assert!(
            matches!(folder_name(bad), Err(SnapshotError::BadFolderName(_))),
            "{bad:?}"
        );
    }
    assert!(folder_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
}

#[test]
fn a_state_with_impossible_counts_is_refused() {
    let t = match build_vm() {
        Ok(t) => t,
        Err(Unsupported(why)) => {
            eprintln!("SKIPPED a_state_with_impossible_counts_is_refused: {why}");
            return;
        }
    };
    let vm_state = match VmState::capture(&t.vm) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED a_state_with_impossible_counts_is_refused: {e}");
            return;
        }
    };
    let vcpu = match VcpuState::capture(&t.vcpu, 0, &t.host) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED a_state_with_impossible_counts_is_refused: {e}");
            return;
        }
    };
    let state = SnapshotState {
        vmm_version: "test".into(),
        memory: MemoryState::of(&t.mem),
        vcpus: vec![],
        vm: vm_state,
        devices: DeviceStates::power_on(),
    };
    assert!(matches!(
        state.validate(&t.host),
        Err(SnapshotError::VcpuCount { snapshot: 0, .. })
    ));
    let mut wrong_index = vcpu;
    wrong_index.index = 3;
    let state = SnapshotState {
        vcpus: vec![wrong_index],
        ..state
    };
    assert!(matches!(
        state.validate(&t.host),
        Err(SnapshotError::BadVcpuState { cpu: 0, .. })
    ));
    let mut no_cpuid = VcpuState::capture(&t.vcpu, 0, &t.host).unwrap();
    no_cpuid.cpuid.clear();
    assert!(matches!(
        no_cpuid.validate(0, &t.host),
        Err(SnapshotError::BadVcpuState { .. })
    ));
    let _ = t.kvm;
}
