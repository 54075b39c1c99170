//! Live migration of a running Linux guest.
//!
//! - **Between two VMM processes** (the VMM's part, [`nanoclaw_vmm::migration`]), with the test
//!   playing the two daemons (a socket for each VMM's link and a relay between them). The
//!   source boots the guest image and carries an echo; the target VMM starts with
//!   `--migrate-from`; the source's control socket migrates the VM while it runs. Then the guest
//!   runs on in the target: its sidecar, told by the vsock device that the transport was
//!   reset, says hello again on the target's side, and an echo goes through the target. The
//!   source stays stopped and refuses to run the VM again. The guest's reset ends the target
//!   with 0.
//! - **Between two daemons** (`nanoclaw migrate`): a counting agent, jailed, moves from one
//!   daemon to another over their pinned link on loopback, and counts on there: the same
//!   process (no count repeated, none skipped), the same boot id, the source's copy ended.

use std::time::Duration;

use nanoclaw_tests::migration::PinnedHosts;
use nanoclaw_tests::{DaemonOptions, GuestImage, Kernel, TestVm, VmSpec, echo_round_trip, pattern};
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

    // The source keeps the VM stopped, for good, and says it moved.
    let refused = source
        .vmm_control(r#"{"op":"resume"}"#)
        .expect("resume request");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(
        source.vmm_control(r#"{"op":"state"}"#).expect("state")["state"],
        "moved"
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

/// The agent: counts once a second.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 1; done";

/// Every `count N` of `log`, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_counting_agent_moves_to_another_daemon_and_counts_on_there() {
    use super::agent::{AGENT, detach, logs, nanoclaw, text};
    let image = GuestImage::from_env().expect("guest image");
    let hosts = PinnedHosts::start(
        || DaemonOptions::guest(&image.vmlinux, &image.initramfs),
        true,
    )
    .expect("two daemons pinned to each other");
    let (source, target) = (&hosts.source, &hosts.target);
    let id = detach(source, &["/bin/sh", "-c", COUNTER]);
    source
        .wait_for(&id, AGENT, "counting", |_| {
            counts(&logs(source, &id)).last().is_some_and(|n| *n >= 3)
        })
        .expect("the agent counts");
    let before = source.inspect(&id).expect("inspect");

    let out = nanoclaw(
        source,
        &["migrate", &id, "--to", &hosts.target_addr],
        MIGRATE,
    );
    let shown = text(&out.stdout);
    println!("nanoclaw migrate:\n{shown}");
    assert!(
        out.status.success(),
        "{shown}\n{}\n{}",
        text(&out.stderr),
        hosts.records()
    );
    assert!(shown.contains("accepted: VM "), "{shown}");
    assert!(shown.contains("round 0: "), "{shown}");
    assert!(shown.contains("moved to "), "{shown}");

    // The source's copy has ended, and says where the VM went.
    let after = source.inspect(&id).expect("inspect");
    assert_eq!(after["status"], "migrated", "{after}");
    assert_eq!(after["migrated_to"]["host"], hosts.target_addr.as_str());
    assert_eq!(after["migrated_to"]["outcome"], "moved");
    let there = after["migrated_to"]["vm"]
        .as_str()
        .expect("the VM's id there")
        .to_owned();
    assert!(
        source.vmm_processes().is_empty(),
        "the source's VMM is gone"
    );

    // The target runs the same guest: its boot id, its agent, counting on.
    let info = target.inspect(&there).expect("inspect on the target");
    assert_eq!(info["status"], "running", "{info}");
    assert_eq!(info["migrated_from"]["vm"], id.as_str(), "{info}");
    assert_eq!(info["migrated_from"]["host"], hosts.source_key.as_str());
    assert_eq!(info["boot_id"], before["boot_id"], "{info}");
    let last_here = *counts(&logs(source, &id)).last().expect("counts here");
    target
        .wait_for(&there, AGENT, "counting on the target", |_| {
            counts(&logs(target, &there))
                .last()
                .is_some_and(|n| *n >= last_here + 3)
        })
        .expect("the agent counts on, on the target");
    let mut all = counts(&logs(source, &id));
    all.extend(counts(&logs(target, &there)));
    let expected: Vec<u64> = (1..=*all.last().unwrap()).collect();
    assert_eq!(
        all, expected,
        "one process counted on: no count repeated or skipped across the move"
    );

    let out = nanoclaw(target, &["stop", &there], MIGRATE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        target.vmm_processes().is_empty(),
        "the target's VMM ended with its stop"
    );
}
