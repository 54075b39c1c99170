//! A snapshot restored into a fresh `nanoclaw-vmm` process.
//!
//! The test runs a real-mode guest on its own thread (a loop that counts in memory and in EBX
//! and writes port 0x80 each pass, so `KVM_RUN` returns to the test often), stops it between
//! two runs, saves it with the library, and starts the VMM binary with `--restore` and
//! `--restore-paused`. Through the control socket it then takes a snapshot of the restored,
//! still paused VM (which must equal the saved state), resumes it, pauses it again and takes
//! another (the guest must have counted on from the saved count), and stops the VMM with
//! SIGTERM. The VMM runs with every seccomp filter installed, as in production.
//!
//! Needs `/dev/kvm`; without it, or where the host's KVM refuses an ioctl, the test says which
//! and stops there.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuExit};
use nanoclaw_vmm::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use nanoclaw_vmm::snapshot::{
    self, DeviceStates, HostSupport, MemoryState, SnapshotState, VcpuState, VmState, format,
};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x500;
/// `inc dword [0x500]; inc ebx; out 0x80, al; jmp short back to the start`.
const GUEST_LOOP: [u8; 11] = [
    0x66, 0xff, 0x06, 0x00, 0x05, 0x66, 0x43, 0xe6, 0x80, 0xeb, 0xf5,
];
const MEM_MIB: u64 = 64;
/// Passes the guest makes before it is saved.
const PASSES: u32 = 2000;

/// Runs the guest for [`PASSES`] passes and writes its snapshot into `dir`. `Err` names what
/// the host refused.
fn make_snapshot(dir: &Path) -> Result<(u32, u64), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| format!("KVM_SET_IDENTITY_MAP_ADDR: {e}"))?;
    vm.create_irq_chip()
        .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| format!("KVM_CREATE_PIT2: {e}"))?;
    let mem = nanoclaw_vmm::memory::create_guest_memory(MEM_MIB << 20).unwrap();
    nanoclaw_vmm::memory::register_guest_memory(&vm, &mem).map_err(|e| format!("{e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let host = HostSupport::probe(&kvm, &vm).map_err(|e| e.to_string())?;

    mem.write_slice(&GUEST_LOOP, GuestAddress(CODE)).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    regs.rbx = 0;
    vcpu.set_regs(&regs).unwrap();

    // Each pass exits once, on the port write.
    for _ in 0..PASSES {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let counter: u32 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(counter, PASSES);

    let vcpu_state = VcpuState::capture(&vcpu, 0, &host).map_err(|e| format!("{e}"))?;
    let rbx = vcpu_state.regs.rbx;
    let vm_state = VmState::capture(&vm).map_err(|e| format!("{e}"))?;
    std::fs::create_dir(dir).unwrap();
    snapshot::memory::write_memory(&dir.join(snapshot::MEMORY_FILE), &mem).unwrap();
    let state = SnapshotState {
        vmm_version: "test".into(),
        memory: MemoryState::of(&mem),
        vcpus: vec![vcpu_state],
        vm: vm_state,
        devices: DeviceStates::NotSaved,
    };
    format::write_file(&dir.join(snapshot::STATE_FILE), &state).unwrap();
    Ok((counter, rbx))
}

/// One request on the control socket, one JSON answer back.
fn control(vm_dir: &Path, request: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(vm_dir.join("control.sock")).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

/// The counter in memory and EBX of the snapshot `name` inside `vm_dir`.
fn read_back(vm_dir: &Path, name: &str) -> (u32, u64, u64) {
    let dir = vm_dir.join(name);
    let state: SnapshotState = format::read_file(&dir.join(snapshot::STATE_FILE)).unwrap();
    let mem = nanoclaw_vmm::memory::create_guest_memory(MEM_MIB << 20).unwrap();
    snapshot::memory::read_memory(&dir.join(snapshot::MEMORY_FILE), &state.memory, &mem).unwrap();
    let counter: u32 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    (counter, state.vcpus[0].regs.rbx, state.vcpus[0].regs.rip)
}

struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_snapshot_restores_into_a_fresh_vmm_process_and_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let vm_dir = tmp.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let snap = vm_dir.join("saved");
    let (saved_counter, saved_rbx) = match make_snapshot(&snap) {
        Ok(saved) => saved,
        Err(why) => {
            eprintln!("SKIPPED a_snapshot_restores_into_a_fresh_vmm_process_and_runs_on: {why}");
            return;
        }
    };

    // Without device state, a restore must be asked for as such.
    let refused = Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
        .arg("--vm-dir")
        .arg(&vm_dir)
        .args(["--memory-mib", &MEM_MIB.to_string()])
        .arg("--restore")
        .arg(&snap)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("does not save device state"), "{err}");
    // Nor into a VM of another size.
    let refused = Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
        .arg("--vm-dir")
        .arg(&vm_dir)
        .args(["--memory-mib", "128", "--restore-without-devices"])
        .arg("--restore")
        .arg(&snap)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("guest memory"), "{err}");

    let child = Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
        .arg("--vm-dir")
        .arg(&vm_dir)
        .args(["--memory-mib", &MEM_MIB.to_string(), "--vcpus", "1"])
        .arg("--restore")
        .arg(&snap)
        .args(["--restore-paused", "--restore-without-devices"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm = Vmm(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while control_ready(&vm_dir).is_none() {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err);
            panic!("the VMM exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Restored paused: the state is the saved one.
    assert_eq!(control(&vm_dir, r#"{"op":"state"}"#)["state"], "paused");
    let answer = control(&vm_dir, r#"{"op":"snapshot","dir":"at-start"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    let (counter, rbx, rip) = read_back(&vm_dir, "at-start");
    assert_eq!((counter, rbx), (saved_counter, saved_rbx));
    assert!((CODE..CODE + GUEST_LOOP.len() as u64).contains(&rip));

    // Resumed, it counts on from there.
    assert_eq!(control(&vm_dir, r#"{"op":"resume"}"#)["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(control(&vm_dir, r#"{"op":"pause"}"#)["state"], "paused");
    let answer = control(&vm_dir, r#"{"op":"snapshot","dir":"later"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["snapshot"]["memory_bytes"], MEM_MIB << 20);
    let (later, later_rbx, _) = read_back(&vm_dir, "later");
    assert!(
        later > saved_counter && later_rbx > saved_rbx,
        "the restored guest did not count on: {saved_counter} -> {later}"
    );
    assert!(
        later == later_rbx as u32 || later == later_rbx as u32 + 1,
        "counters out of step: {later} and {later_rbx}"
    );

    // SIGTERM stops it with exit code 13, and no forbidden syscall on the way.
    // SAFETY: kill(2) on our own child's pid, which has not been reaped (Vmm's drop reaps it).
    unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) };
    let status = vmm.0.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err);
    assert_eq!(status.code(), Some(13), "{err}");
    eprintln!("restored process: count {saved_counter} -> {later}");
}

fn control_ready(vm_dir: &Path) -> Option<()> {
    UnixStream::connect(vm_dir.join("control.sock")).ok()?;
    Some(())
}
