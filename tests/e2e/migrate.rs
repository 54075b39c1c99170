//! Live migration of a running Linux guest from one `nanoclaw-vmm` process to another: the
//! VMM's part of live migration ([`nanoclaw_vmm::migration`]), with the test playing the two
//! daemons (a socket for each VMM's link and a relay between them).
//!
//! The source boots the guest image and carries an echo; the target VMM starts with
//! `--migrate-from`; the source's control socket migrates the VM while it runs. Then the guest
//! runs on in the target: its sidecar, told by the vsock device that the transport was reset,
//! says hello again on the target's side, and an echo goes through the target. The source
//! stays stopped and refuses to run the VM again. The guest's reset ends the target with 0.

use std::time::Duration;

use nanoclaw_tests::{Kernel, TestVm, VmSpec, echo_round_trip, pattern};
use shared_proto::HostToGuest;
use shared_proto::ports::ECHO_PORT;

const BOOT: Duration = Duration::from_secs(90);
const IO: Duration = Duration::from_secs(120);
const MIGRATE: Duration = Duration::from_secs(300);

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_running_guest_migrates_to_another_vmm_and_runs_on_there() {
    let spec = VmSpec {
        kernel: Kernel::Vmlinux,
        memory_mib: 256,
        ..VmSpec::default()
    };
    let mut source = TestVm::boot(&spec).expect("boot");
    let _first = source.accept_control(BOOT).expect("sidecar hello");
    let stream = source
        .connect(ECHO_PORT, BOOT)
        .expect("CONNECT on the source");
    echo_round_trip(stream, &pattern(64 << 10, 1), IO).expect("echo on the source");

    let (mut target, link) = TestVm::migrate_in(&spec).expect("start the target VMM");
    let m = source
        .migrate_to(link, 300, MIGRATE)
        .expect("migrate the VM");
    let answer = &m.answer;
    assert_eq!(
        answer["ok"],
        true,
        "{answer}\nsource console:\n{}",
        source.console()
    );
    assert_eq!(answer["migration"]["outcome"], "moved", "{answer}");
    let rounds = answer["migration"]["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty(), "{answer}");
    assert_eq!(
        m.progress.len(),
        rounds.len(),
        "one progress line per round"
    );
    println!(
        "migrated in {:.0} ms: {} rounds {:?}, {} pages stopped, downtime {:.1} ms, {} MB relayed",
        m.elapsed.as_secs_f64() * 1e3,
        rounds.len(),
        rounds
            .iter()
            .map(|r| r["pages"].clone())
            .collect::<Vec<_>>(),
        answer["migration"]["final_pages"],
        answer["migration"]["downtime_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        m.bytes / 1_000_000,
    );

    // The guest runs on in the target: its sidecar says hello there, and echoes.
    let mut control = target
        .accept_control(BOOT)
        .expect("the sidecar's hello on the target");
    let stream = target
        .connect(ECHO_PORT, BOOT)
        .expect("CONNECT on the target");
    let took = echo_round_trip(stream, &pattern(1 << 20, 2), IO).expect("echo on the target");
    println!("echo of 1 MiB each way through the target in {took:?}");

    // The source keeps the VM stopped, for good.
    let refused = source
        .vmm_control(r#"{"op":"resume"}"#)
        .expect("resume request");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(
        source.vmm_control(r#"{"op":"state"}"#).expect("state")["state"],
        "paused"
    );

    control.send(&HostToGuest::Shutdown).expect("send Shutdown");
    let exit = target.wait_exit(BOOT).expect("target VMM exit");
    assert_eq!(
        exit.code,
        Some(0),
        "the guest's reset ends the target: {exit:?}"
    );
    source.signal(libc::SIGTERM).expect("SIGTERM the source");
    let exit = source
        .wait_exit(Duration::from_secs(30))
        .expect("source VMM exit");
    assert_eq!(exit.code, Some(13), "{exit:?}");
}
