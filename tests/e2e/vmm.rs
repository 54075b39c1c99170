//! Our VMM boots the guest image and carries vsock traffic both ways.
//!
//! Each test boots one microVM with the `nanoclaw-vmm` binary; the sidecar (PID 1) says hello on the
//! control port, then the host pushes 1 MiB through a host-initiated connection (hybrid
//! `CONNECT`) and 1 MiB through a guest-initiated one (`EchoConnect`), checking the echo byte for
//! byte. `Shutdown` makes the sidecar reset the guest, which must end the VMM with status 0.
//! The seccomp test boots two side by side: one whose VMM makes a forbidden syscall through its
//! test hook (it must end with status 14 and say which call), and one that must run on.

use std::time::Duration;

use nanoclaw_tests::{Kernel, TestVm, VmSpec, echo_round_trip, pattern};
use shared_proto::HostToGuest;
use shared_proto::ports::ECHO_PORT;

const BOOT: Duration = Duration::from_secs(90);
const IO: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;
/// Host port the test listens on for the guest-initiated echo connection.
const GUEST_INITIATED_PORT: u32 = 7000;

/// Boots, runs both echoes with `len` bytes each, shuts down, and returns the console.
fn boot_echo_and_reset(spec: VmSpec, len: usize) -> String {
    let mut vm = TestVm::boot(&spec).expect("boot");
    let mut control = vm.accept_control(BOOT).expect("sidecar hello");

    // Host-initiated: CONNECT <ECHO_PORT> on vsock.sock.
    let stream = vm
        .connect(ECHO_PORT, BOOT)
        .expect("CONNECT to the guest echo port");
    let took = echo_round_trip(stream, &pattern(len, 1), IO).expect("host-initiated echo");
    println!("host-initiated echo: {len} bytes each way in {took:?}");

    // Guest-initiated: the sidecar connects to our listener on vsock.sock_<port>.
    // Bounded: a connection that never comes is a failure with the sidecar's answer and the
    // console, not a hang until the tier's timeout.
    let listener = vm.listen(GUEST_INITIATED_PORT).expect("listen");
    control
        .send(&HostToGuest::EchoConnect {
            port: GUEST_INITIATED_PORT,
        })
        .expect("send EchoConnect");
    let stream = match vm.accept_within(&listener, BOOT) {
        Ok(stream) => stream,
        Err(e) => panic!(
            "guest-initiated connection: {e:#}\nthe sidecar's next control message: {:?}",
            control.recv(Duration::from_secs(2))
        ),
    };
    let took = echo_round_trip(stream, &pattern(len, 2), IO).expect("guest-initiated echo");
    println!("guest-initiated echo: {len} bytes each way in {took:?}");

    control.send(&HostToGuest::Shutdown).expect("send Shutdown");
    let exit = vm.wait_exit(BOOT).expect("VMM exit");
    assert_eq!(
        exit.code,
        Some(0),
        "a guest reset ends the VMM with 0: {exit:?}"
    );
    assert_eq!(exit.report["reason"], "reset", "{exit:?}");
    assert!(
        exit.report["boot_to_ready_ms"].as_u64().is_some(),
        "boot-to-ready is reported: {}",
        exit.report
    );
    println!("boot_to_ready_ms={}", exit.report["boot_to_ready_ms"]);
    exit.console
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn one_vcpu_bzimage_streams_a_mib_each_way_and_resets() {
    let console = boot_echo_and_reset(VmSpec::default(), MIB);
    assert!(console.contains("Linux version"), "{console}");
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn two_vcpus_vmlinux_sees_both_cpus_and_streams() {
    let spec = VmSpec {
        kernel: Kernel::Vmlinux,
        vcpus: 2,
        ..VmSpec::default()
    };
    let console = boot_echo_and_reset(spec, MIB);
    assert!(
        console.contains("Brought up 1 node, 2 CPUs"),
        "the guest must see both vCPUs:\n{console}"
    );
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn guest_kernel_panic_ends_the_vmm_with_the_panic_status() {
    // busybox `false` as init: it exits at once, and the kernel panics ("Attempted to kill
    // init"), which with panic=-1 resets immediately.
    let spec = VmSpec {
        cmdline_extra: Some("rdinit=/bin/false".into()),
        ..VmSpec::default()
    };
    let mut vm = TestVm::boot(&spec).expect("boot");
    let exit = vm.wait_exit(BOOT).expect("VMM exit");
    assert_eq!(exit.code, Some(11), "{exit:?}");
    assert_eq!(exit.report["reason"], "panic", "{exit:?}");
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn sigterm_stops_a_running_vm_cleanly() {
    let mut vm = TestVm::boot(&VmSpec::default()).expect("boot");
    let _control = vm.accept_control(BOOT).expect("sidecar hello");
    vm.signal(libc::SIGTERM).expect("SIGTERM the VMM");
    let exit = vm.wait_exit(Duration::from_secs(30)).expect("VMM exit");
    assert_eq!(exit.code, Some(13), "{exit:?}");
    assert_eq!(exit.report["reason"], "signal", "{exit:?}");
    assert!(
        !vm.dir().join("vsock.sock").exists(),
        "the vsock socket is removed on a clean stop"
    );
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_forbidden_syscall_ends_only_its_own_vmm_with_the_seccomp_status() {
    // `--test-forbidden-syscall`: once its guest is ready (the sidecar's first vsock connection),
    // the VMM's vsock thread makes a syscall that no seccomp filter allows (getppid).
    let hooked = VmSpec {
        vmm_args: vec!["--test-forbidden-syscall".into()],
        ..VmSpec::default()
    };
    let mut doomed = TestVm::boot(&hooked).expect("boot the hooked VM");
    let mut bystander = TestVm::boot(&VmSpec::default()).expect("boot the bystander VM");

    let exit = doomed.wait_exit(BOOT).expect("the hooked VMM exits");
    assert_eq!(exit.code, Some(14), "{exit:?}");
    assert_eq!(exit.report["reason"], "seccomp", "{exit:?}");
    assert_eq!(exit.report["exit_code"], 14, "{exit:?}");
    assert_eq!(exit.report["syscall"], "getppid", "{exit:?}");
    assert_eq!(exit.report["syscall_nr"], libc::SYS_getppid, "{exit:?}");

    // The other VM runs on: its sidecar says hello and its vsock still carries an echo.
    let _control = bystander
        .accept_control(BOOT)
        .expect("the bystander's sidecar hello");
    let stream = bystander
        .connect(ECHO_PORT, BOOT)
        .expect("CONNECT to the bystander's echo port");
    echo_round_trip(stream, &pattern(64 * 1024, 3), IO).expect("the bystander still echoes");
    bystander
        .signal(libc::SIGTERM)
        .expect("SIGTERM the bystander");
    let exit = bystander
        .wait_exit(Duration::from_secs(30))
        .expect("the bystander's VMM exits");
    assert_eq!(exit.code, Some(13), "{exit:?}");
    assert_eq!(exit.report["reason"], "signal", "{exit:?}");
}
