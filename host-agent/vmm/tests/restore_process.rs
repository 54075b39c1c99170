//! A snapshot restored into a fresh `nanoclaw-vmm` process.
//!
//! The test runs a real-mode guest of two vCPUs on its own thread (each vCPU a loop that counts
//! in a memory word of its own and in its EBX and writes port 0x80 each pass, so `KVM_RUN`
//! returns to the test often), stops it between two runs, saves it with the library, and starts the VMM binary with `--restore` and
//! `--restore-paused`. Through the control socket it then takes a snapshot of the restored,
//! still paused VM (which must equal the saved state), resumes it, pauses it again and takes
//! another (the guest must have counted on from the saved count), and stops the VMM with
//! SIGTERM. The VMM runs with every seccomp filter installed, as in production.
//!
//! The saved VM has a live vsock device: its transport state says the driver set it up, with
//! its rings in guest memory and one buffer on its event queue. The restore takes it without
//! `--restore-without-devices`; the device stays paused (guest memory untouched) while the VM
//! is, and once resumed it puts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` in that buffer. A state
//! with a bad queue is refused with the queue named.
//!
//! Needs `/dev/kvm`; without it, or where the host's KVM refuses an ioctl, the test says which
//! and stops there.

use nanoclaw_vmm::memory::GuestRam;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY, kvm_mp_state,
    kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuExit};
use nanoclaw_vmm::devices::virtio::state::{
    CONFIG_SNAPSHOT_LEN, QueueSnapshot, TransportState, VirtioDeviceState,
};
use nanoclaw_vmm::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, VSOCK_MMIO_SLOT};
use nanoclaw_vmm::snapshot::{
    self, DeviceStates, HostSupport, MemoryState, SnapshotState, VcpuState, VirtioStates, VmState,
    format,
};
use vm_memory::{Bytes, GuestAddress};

/// vCPU `i`'s loop is at `CODE + i * 0x100` and counts at `COUNTER + 4 * i`.
const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x500;
const LOOP_LEN: u64 = 11;
const VCPUS: u8 = 2;
const MEM_MIB: u64 = 64;
/// Passes each vCPU makes before the guest is saved.
const PASSES: u32 = 2000;
/// The vsock rings: queue `q`'s descriptor table at `RINGS + q * 0x1000`, its available ring
/// 0x100 and its used ring 0x200 after it; 16 entries each.
const RINGS: u64 = 0x10_000;
const QSIZE: u16 = 16;
/// The event queue's one buffer.
const EVENT_BUF: u64 = 0x20_000;
const EVQ: usize = 2;
/// The guest CID (the VMM's default).
const CID: u64 = 3;

fn ring(q: usize) -> (u64, u64, u64) {
    let desc = RINGS + q as u64 * 0x1000;
    (desc, desc + 0x100, desc + 0x200)
}

/// The rings of a vsock driver that set the device up and offered one event buffer.
fn write_vsock_rings(mem: &GuestRam) {
    let (desc, avail, _) = ring(EVQ);
    // Descriptor 0: the 8-byte buffer, device-writable (VRING_DESC_F_WRITE).
    mem.write_obj(EVENT_BUF, GuestAddress(desc)).unwrap();
    mem.write_obj(8u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
    // avail: flags 0, idx 1, ring[0] = 0.
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    mem.write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUF))
        .unwrap();
}

/// The vsock transport of that driver.
fn vsock_state() -> TransportState {
    let mut config = vec![0u8; CONFIG_SNAPSHOT_LEN];
    config[..8].copy_from_slice(&CID.to_le_bytes());
    TransportState {
        device_type: 19,
        device_features: 1 << 32,
        config,
        // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
        status: 0xf,
        acked_features: 1 << 32,
        features_rejected: false,
        device_features_sel: 0,
        driver_features_sel: 1,
        queue_sel: 2,
        interrupt_status: 0,
        config_generation: 0,
        activated: true,
        queues: (0..3)
            .map(|q| {
                let (desc, avail, used) = ring(q);
                QueueSnapshot {
                    max_size: 256,
                    size: QSIZE,
                    ready: true,
                    desc,
                    avail,
                    used,
                    next_avail: 0,
                    next_used: 0,
                    event_idx: false,
                }
            })
            .collect(),
    }
}

/// `inc dword [counter]; inc ebx; out 0x80, al; jmp short back to the start`.
fn guest_loop(counter: u64) -> [u8; LOOP_LEN as usize] {
    let [lo, hi] = (counter as u16).to_le_bytes();
    [0x66, 0xff, 0x06, lo, hi, 0x66, 0x43, 0xe6, 0x80, 0xeb, 0xf5]
}

fn code(cpu: u8) -> u64 {
    CODE + u64::from(cpu) * 0x100
}

fn counter_addr(cpu: u8) -> u64 {
    COUNTER + 4 * u64::from(cpu)
}

/// Runs the guest for [`PASSES`] passes and writes its snapshot into `dir`. `Err` names what
/// the host refused.
fn make_snapshot(dir: &Path) -> Result<Vec<(u32, u64)>, String> {
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
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let host = HostSupport::probe(&kvm, &vm).map_err(|e| e.to_string())?;
    let mut vcpus = Vec::new();
    for cpu in 0..VCPUS {
        let vcpu = vm
            .create_vcpu(u64::from(cpu))
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
        mem.write_slice(&guest_loop(counter_addr(cpu)), GuestAddress(code(cpu)))
            .unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
            seg.base = 0;
            seg.selector = 0;
        }
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = code(cpu);
        regs.rflags = 2;
        regs.rbx = 0;
        vcpu.set_regs(&regs).unwrap();
        // An application processor waits for INIT and SIPI; this one runs at once.
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(|e| format!("KVM_SET_MP_STATE: {e}"))?;
        vcpus.push(vcpu);
    }
    write_vsock_rings(&mem);

    // Each pass exits once, on the port write; the vCPUs take turns on this thread.
    for _ in 0..PASSES {
        for vcpu in &mut vcpus {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(0x80, _)) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }
    let mut saved = Vec::new();
    let mut vcpu_states = Vec::new();
    for (cpu, vcpu) in (0..VCPUS).zip(&vcpus) {
        let counter: u32 = mem.read_obj(GuestAddress(counter_addr(cpu))).unwrap();
        assert_eq!(counter, PASSES);
        let state = VcpuState::capture(vcpu, cpu, &host).map_err(|e| format!("{e}"))?;
        saved.push((counter, state.regs.rbx));
        vcpu_states.push(state);
    }
    let vm_state = VmState::capture(&vm).map_err(|e| format!("{e}"))?;
    std::fs::create_dir(dir).unwrap();
    snapshot::memory::write_memory(&dir.join(snapshot::MEMORY_FILE), &mem).unwrap();
    let state = SnapshotState {
        vmm_version: "test".into(),
        memory: MemoryState::of(&mem),
        vcpus: vcpu_states,
        vm: vm_state,
        devices: devices(),
    };
    format::write_file(&dir.join(snapshot::STATE_FILE), &state).unwrap();
    Ok(saved)
}

/// The devices the saved VM had: not at power-on, so the restore has to carry them over.
fn devices() -> DeviceStates {
    let mut devices = DeviceStates::power_on();
    devices.virtio = VirtioStates::Saved(vec![VirtioDeviceState {
        slot: VSOCK_MMIO_SLOT,
        transport: vsock_state(),
    }]);
    devices.serial.scratch = 0x5a;
    devices.serial.line_control = 0x03;
    devices.serial.in_buffer = b"in".to_vec();
    devices.i8042.control = 0x11;
    devices.i8042.out = vec![0x55];
    devices
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

/// What the vsock device did in a snapshot: its transport, the event queue's used index and
/// its first used element, and the event buffer's first word.
#[derive(Debug)]
struct VsockSeen {
    transport: TransportState,
    used_idx: u16,
    used_elem: (u32, u32),
    event: u32,
}

/// Each vCPU's counter in memory, EBX and RIP in the snapshot `name` inside `vm_dir`, and
/// what the vsock device did.
fn read_back(vm_dir: &Path, name: &str) -> (Vec<(u32, u64, u64)>, VsockSeen) {
    let dir = vm_dir.join(name);
    let state: SnapshotState = format::read_file(&dir.join(snapshot::STATE_FILE)).unwrap();
    let want = devices();
    assert_eq!(
        (&state.devices.serial, &state.devices.i8042),
        (&want.serial, &want.i8042),
        "the UART or i8042 changed in {name}"
    );
    let VirtioStates::Saved(virtio) = &state.devices.virtio else {
        panic!("no virtio state in {name}");
    };
    assert_eq!(virtio.len(), 1, "{name}");
    assert_eq!(virtio[0].slot, VSOCK_MMIO_SLOT);
    let mem = nanoclaw_vmm::memory::create_guest_memory(MEM_MIB << 20).unwrap();
    snapshot::memory::read_memory(&dir.join(snapshot::MEMORY_FILE), &state.memory, &mem).unwrap();
    let (_, _, used) = ring(EVQ);
    let seen = VsockSeen {
        transport: virtio[0].transport.clone(),
        used_idx: mem.read_obj(GuestAddress(used + 2)).unwrap(),
        used_elem: (
            mem.read_obj(GuestAddress(used + 4)).unwrap(),
            mem.read_obj(GuestAddress(used + 8)).unwrap(),
        ),
        event: mem.read_obj(GuestAddress(EVENT_BUF)).unwrap(),
    };
    assert_eq!(state.vcpus.len(), usize::from(VCPUS));
    let counts = (0..VCPUS)
        .zip(&state.vcpus)
        .map(|(cpu, v)| {
            assert_eq!(v.index, cpu);
            let counter: u32 = mem.read_obj(GuestAddress(counter_addr(cpu))).unwrap();
            (counter, v.regs.rbx, v.regs.rip)
        })
        .collect();
    (counts, seen)
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
    let saved = match make_snapshot(&snap) {
        Ok(saved) => saved,
        Err(why) => {
            eprintln!("SKIPPED a_snapshot_restores_into_a_fresh_vmm_process_and_runs_on: {why}");
            return;
        }
    };

    // A state with a bad queue is refused, the queue named.
    let bad = vm_dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        snap.join(snapshot::MEMORY_FILE),
        bad.join(snapshot::MEMORY_FILE),
    )
    .unwrap();
    let mut state: SnapshotState = format::read_file(&snap.join(snapshot::STATE_FILE)).unwrap();
    if let VirtioStates::Saved(devices) = &mut state.devices.virtio {
        devices[0].transport.queues[1].size = 12;
    }
    format::write_file(&bad.join(snapshot::STATE_FILE), &state).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
        .arg("--vm-dir")
        .arg(&vm_dir)
        .args([
            "--memory-mib",
            &MEM_MIB.to_string(),
            "--vcpus",
            &VCPUS.to_string(),
        ])
        .arg("--restore")
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("queue 1 has a size that is not a power of two"),
        "{err}"
    );
    // Nor into a VM of another size.
    let refused = Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
        .arg("--vm-dir")
        .arg(&vm_dir)
        .args(["--memory-mib", "128", "--vcpus", &VCPUS.to_string()])
        .arg("--restore-without-devices")
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
        .args([
            "--memory-mib",
            &MEM_MIB.to_string(),
            "--vcpus",
            &VCPUS.to_string(),
        ])
        .arg("--restore")
        .arg(&snap)
        .arg("--restore-paused")
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
    let (at_start, vsock) = read_back(&vm_dir, "at-start");
    // The device came back as saved and, paused, has not touched its rings.
    assert_eq!(vsock.transport, vsock_state());
    assert_eq!((vsock.used_idx, vsock.event), (0, 0xffff_ffff), "{vsock:?}");
    for (cpu, (&(counter, rbx, rip), &(saved_counter, saved_rbx))) in
        (0..VCPUS).zip(at_start.iter().zip(&saved))
    {
        assert_eq!((counter, rbx), (saved_counter, saved_rbx), "vCPU {cpu}");
        assert!(
            (code(cpu)..code(cpu) + LOOP_LEN).contains(&rip),
            "vCPU {cpu}"
        );
    }

    // Resumed, it counts on from there.
    assert_eq!(control(&vm_dir, r#"{"op":"resume"}"#)["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(control(&vm_dir, r#"{"op":"pause"}"#)["state"], "paused");
    let answer = control(&vm_dir, r#"{"op":"snapshot","dir":"later"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["snapshot"]["memory_bytes"], MEM_MIB << 20);
    let (later, vsock) = read_back(&vm_dir, "later");
    // Resumed, the device told the guest its transport was reset: event id 0 in the buffer,
    // 4 bytes used, the event queue one on, and the interrupt raised.
    assert_eq!(vsock.used_idx, 1, "{vsock:?}");
    assert_eq!(vsock.used_elem, (0, 4), "{vsock:?}");
    assert_eq!(vsock.event, 0, "{vsock:?}");
    let evq = vsock.transport.queues[EVQ];
    assert_eq!((evq.next_avail, evq.next_used), (1, 1));
    assert_eq!(vsock.transport.interrupt_status, 1);
    for (cpu, (&(counter, rbx, _), &(saved_counter, saved_rbx))) in
        (0..VCPUS).zip(later.iter().zip(&saved))
    {
        assert!(
            counter > saved_counter && rbx > saved_rbx,
            "vCPU {cpu} did not count on: {saved_counter} -> {counter}"
        );
        assert!(
            counter == rbx as u32 || counter == rbx as u32 + 1,
            "vCPU {cpu}: counters out of step: {counter} and {rbx}"
        );
    }

    // SIGTERM stops it with exit code 13, and no forbidden syscall on the way.
    // SAFETY: kill(2) on our own child's pid, which has not been reaped (Vmm's drop reaps it).
    unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) };
    let status = vmm.0.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err);
    assert_eq!(status.code(), Some(13), "{err}");
    eprintln!("restored process: counts {saved:?} -> {later:?}");
}

fn control_ready(vm_dir: &Path) -> Option<()> {
    UnixStream::connect(vm_dir.join("control.sock")).ok()?;
    Some(())
}

/// Waits for a connection on `listener` for at most `within`, failing if `vmm` exits first.
fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    vmm: &mut Vmm,
    within: Duration,
) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = vmm.0.try_wait().unwrap() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err);
            panic!("the VMM exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "no connection within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side: one direction of
/// the relay a daemon runs between a migration's two VMMs.
fn relay(mut from: UnixStream, to: UnixStream) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let copied = std::io::copy(&mut from, &mut &to).unwrap_or(0);
        let _ = to.shutdown(std::net::Shutdown::Write);
        copied
    })
}

#[test]
fn a_running_vm_migrates_into_another_vmm_process_and_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (source_dir, target_dir) = (tmp.path().join("source"), tmp.path().join("target"));
    std::fs::create_dir(&source_dir).unwrap();
    std::fs::create_dir(&target_dir).unwrap();
    let snap = source_dir.join("saved");
    let saved = match make_snapshot(&snap) {
        Ok(saved) => saved,
        Err(why) => {
            eprintln!("SKIPPED a_running_vm_migrates_into_another_vmm_process_and_runs_on: {why}");
            return;
        }
    };
    let spawn = |vm_dir: &Path, from: [&std::ffi::OsStr; 2]| {
        Vmm(Command::new(env!("CARGO_BIN_EXE_nanoclaw-vmm"))
            .arg("--vm-dir")
            .arg(vm_dir)
            .args([
                "--memory-mib",
                &MEM_MIB.to_string(),
                "--vcpus",
                &VCPUS.to_string(),
            ])
            .args(from)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap())
    };
    // The source: the saved VM restored, running.
    let mut source = spawn(&source_dir, ["--restore".as_ref(), snap.as_os_str()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while control_ready(&source_dir).is_none() {
        assert!(
            source.0.try_wait().unwrap().is_none(),
            "the source VMM exited"
        );
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        control(&source_dir, r#"{"op":"state"}"#)["state"],
        "running"
    );

    // The daemon's part, played by the test: a socket the target connects to at its start, one
    // in the source's folder for the source's link, and a relay between them.
    let inbound = tmp.path().join("inbound.sock");
    let to_target = std::os::unix::net::UnixListener::bind(&inbound).unwrap();
    let from_source =
        std::os::unix::net::UnixListener::bind(source_dir.join("migrate.sock")).unwrap();
    let mut target = spawn(
        &target_dir,
        ["--migrate-from".as_ref(), inbound.as_os_str()],
    );
    let target_link = accept_within(&to_target, &mut target, Duration::from_secs(20));

    let request = {
        let source_dir = source_dir.clone();
        std::thread::spawn(move || {
            let mut stream = UnixStream::connect(source_dir.join("control.sock")).unwrap();
            stream
                .write_all(b"{\"op\":\"migrate\",\"socket\":\"migrate.sock\",\"downtime_ms\":50}\n")
                .unwrap();
            let mut lines = Vec::new();
            for line in BufReader::new(stream).lines() {
                let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                let last = line.get("progress").is_none();
                lines.push(line);
                if last {
                    break;
                }
            }
            lines
        })
    };
    let source_link = accept_within(&from_source, &mut source, Duration::from_secs(20));
    let up = relay(
        source_link.try_clone().unwrap(),
        target_link.try_clone().unwrap(),
    );
    let down = relay(target_link, source_link);
    let mut lines = request.join().unwrap();
    let answer = lines.pop().unwrap();
    let (sent, answered) = (up.join().unwrap(), down.join().unwrap());

    // Moved: the source says so, keeps the VM stopped, and refuses to run it again.
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["state"], "paused", "{answer}");
    let migration = &answer["migration"];
    assert_eq!(migration["outcome"], "moved", "{answer}");
    let rounds = migration["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{answer}");
    assert_eq!(lines.len(), rounds.len(), "one progress line per round");
    assert_eq!(lines[0]["progress"], rounds[0]);
    // Round 0 sent the guest's code and counters, and the vsock rings; the stream carried
    // them all, and the answer came back (5 bytes: a tag and a length, no payload).
    assert!(rounds[0]["pages"].as_u64().unwrap() >= 3, "{answer}");
    assert!(sent > 3 * 4096, "{sent} bytes sent");
    assert_eq!(answered, 5, "the target's answer");
    let refused = control(&source_dir, r#"{"op":"resume"}"#);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("moved"),
        "{refused}"
    );
    assert_eq!(control(&source_dir, r#"{"op":"state"}"#)["state"], "moved");

    // The target runs the VM on: its counters are past the saved ones and in step.
    let deadline = Instant::now() + Duration::from_secs(20);
    while control_ready(&target_dir).is_none() {
        assert!(
            target.0.try_wait().unwrap().is_none(),
            "the target VMM exited"
        );
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        control(&target_dir, r#"{"op":"state"}"#)["state"],
        "running"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(control(&target_dir, r#"{"op":"pause"}"#)["state"], "paused");
    let snap = control(&target_dir, r#"{"op":"snapshot","dir":"moved"}"#);
    assert_eq!(snap["ok"], true, "{snap}");
    let (moved, _) = read_back(&target_dir, "moved");
    for (cpu, (&(counter, rbx, _), &(saved_counter, _))) in (0..VCPUS).zip(moved.iter().zip(&saved))
    {
        assert!(
            counter > saved_counter,
            "vCPU {cpu}: {saved_counter} -> {counter}"
        );
        assert!(
            counter == rbx as u32 || counter == rbx as u32 + 1,
            "vCPU {cpu}: counters out of step: {counter} and {rbx}"
        );
    }

    // Both end on SIGTERM with exit code 13: no forbidden syscall on either side.
    for (name, vmm) in [("source", &mut source), ("target", &mut target)] {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (Vmm's drop reaps it).
        unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) };
        let status = vmm.0.wait().unwrap();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err);
        assert_eq!(status.code(), Some(13), "{name}: {err}");
    }
    eprintln!(
        "migrated process: counts {saved:?} -> {moved:?}, {} rounds, {sent} bytes",
        rounds.len()
    );
}
