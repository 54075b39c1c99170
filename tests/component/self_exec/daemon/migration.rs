//! Live migration between two daemons in this executable, each with the fake VMM: a source
//! and a target that pin each other's migration key (`host-agent migration-key`, then
//! `--migration-listen` and `--migration-peer`) on loopback, driven through the HTTP API
//! (`POST /v1/vms/{id}/migrate` and its stream of events, `DELETE` to cancel).
//!
//! The fake VMMs carry a fake stream of their own over the daemons' link
//! ([`nanoclaw_tests::fake_vmm::migration`]); the source VM's fake agent (`pausable MODE`) picks
//! the [`MigrationMode`] both ends act out: a normal move, a slow copy to cancel, a target that
//! dies mid-copy, a target that never answers. A VM with an image moves only to a host that
//! holds the same image, and gets a blank writable disk of the source's size there.

use std::path::Path;
use std::time::Duration;

use nanoclaw_api::{MigratedTo, MigrationEvent, MigrationOutcome, VmInfo, VmStatus};
use nanoclaw_tests::api::{self, Streamed};
use nanoclaw_tests::fake_vmm::{self, MigrationMode};
use nanoclaw_tests::migration::PinnedHosts;
use nanoclaw_tests::migration::{PinnedHosts as Hosts, migration_key};
use nanoclaw_tests::{Daemon, DaemonOptions, text, wait_for};

use super::{mode_and_owner, wait_status};

/// Starts a source and a target with the fake VMM ([`PinnedHosts`]), and checks the key
/// command: the same key twice, kept 0600.
fn hosts(target_pins_source: bool) -> Hosts {
    let options = || {
        DaemonOptions::self_exec()
            .stop_grace_secs(1)
            .rust_log("info")
    };
    let h = PinnedHosts::start(options, target_pins_source).expect("two daemons");
    let state = h.source.state_dir();
    assert_eq!(
        migration_key(&state).expect("the key again"),
        h.source_key,
        "a second call made another key"
    );
    assert_eq!(mode_and_owner(&state.join("migration/host.key")).0, 0o600);
    h
}

/// Starts `run -d -- pausable MODE` and waits for it to run; its id.
fn start_migratable(d: &Daemon, mode: MigrationMode) -> String {
    let out = d.cli(&["run", "-d", "--", "pausable", mode.as_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    wait_status(d, &id, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    id
}

/// `POST /v1/vms/{id}/migrate` with `body`, its status and its streamed answer.
fn post_migrate(d: &Daemon, id: &str, body: serde_json::Value) -> Streamed {
    api::open(
        &d.socket(),
        "POST",
        &format!("/v1/vms/{id}/migrate"),
        Some(&body),
    )
}

/// [`post_migrate`], which must start the stream (200).
fn migrate(h: &Hosts, id: &str, body: serde_json::Value) -> Streamed {
    let mut answer = post_migrate(&h.source, id, body);
    let status = answer.status;
    if status != 200 {
        panic!("{status}: {}\n{}", answer.rest(), h.source.records());
    }
    answer
}

/// `DELETE /v1/vms/{id}/migrate`'s status and body.
fn cancel(d: &Daemon, id: &str) -> (u16, String) {
    api::call(
        &d.socket(),
        "DELETE",
        &format!("/v1/vms/{id}/migrate"),
        None,
    )
}

/// The stream's next event; `None` at its end.
fn next_event(stream: &mut Streamed) -> Option<MigrationEvent> {
    let line = stream.next_line()?;
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("an event: {e}: {line:?}")))
}

/// The stream's events to its end.
fn events_to_end(stream: &mut Streamed) -> Vec<MigrationEvent> {
    std::iter::from_fn(|| next_event(stream)).collect()
}

/// The round numbers among `events`.
fn rounds(events: &[MigrationEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            MigrationEvent::Round { round, .. } => Some(*round),
            _ => None,
        })
        .collect()
}

/// The target VM of the first event, which must be `accepted`.
fn accepted(events: &[MigrationEvent], h: &Hosts) -> String {
    match events.first() {
        Some(MigrationEvent::Accepted { target_vm }) => target_vm.clone(),
        _ => panic!("not accepted first: {events:?}\n{}", h.records()),
    }
}

/// The last event, which must be `ended` with `outcome`: its error.
fn ended_with(events: &[MigrationEvent], outcome: MigrationOutcome, h: &Hosts) -> Option<String> {
    match events.last() {
        Some(MigrationEvent::Ended {
            outcome: o, error, ..
        }) if *o == outcome => error.clone(),
        _ => panic!(
            "the stream did not end {outcome:?}: {events:?}\n{}",
            h.records()
        ),
    }
}

/// `nanoclaw ps --json`, those that have not ended.
fn live_vms(d: &Daemon) -> Vec<VmInfo> {
    let out = d.cli(&["ps", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let vms: Vec<VmInfo> = serde_json::from_slice(&out.stdout).unwrap();
    vms.into_iter()
        .filter(|v| !v.status.is_terminal())
        .collect()
}

/// Waits until the target has no VM that has not ended.
fn target_left_nothing_running(h: &Hosts) {
    let mut live = Vec::new();
    let ok = (0..400).any(|_| {
        live = live_vms(&h.target);
        live.is_empty() || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }
    });
    assert!(
        ok,
        "the target still has live VMs: {live:?}\n{}",
        h.records()
    );
}

/// Kills the target's VMMs and waits until it has no VM that has not ended.
fn kill_target_vmms(h: &Hosts) {
    for pid in h.target.vmm_processes() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    target_left_nothing_running(h);
}

/// The source VM runs on, not paused, with no record of a move, and its guest still answers: a
/// stop ends its agent.
fn runs_on_here(h: &Hosts, id: &str) {
    let info = h.source.vm(id);
    assert!(
        info.status == VmStatus::Running && !info.paused && info.migrated_to.is_none(),
        "{info:?}\n{}",
        h.records()
    );
    let stop = h.source.cli(&["stop", id]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let info = h.source.vm(id);
    assert_eq!(info.status, VmStatus::Stopped, "{info:?}");
    assert_eq!(info.agent_exit, Some(nanoclaw_api::AgentExit::Signal(15)));
}

/// Whether the process `pid` is gone (or a zombie).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

/// Waits until the source's VM `id` (as it was `before`) is `migrated`, recorded as moved to
/// the target's `target_vm`, and its VMM has ended.
fn ended_here_as_moved(h: &Hosts, id: &str, target_vm: &str, before: &VmInfo) {
    let info = wait_status(&h.source, id, |i| i.status == VmStatus::Migrated);
    assert_eq!(
        info.migrated_to,
        Some(MigratedTo {
            host: h.target_addr.clone(),
            vm: target_vm.to_owned(),
            outcome: MigrationOutcome::Moved,
        }),
        "{info:?}\n{}",
        h.records()
    );
    let source_vmm = before.vmm_pid.expect("the source's VMM");
    wait_for("the source's VMM to end", Duration::from_secs(20), || {
        gone(source_vmm)
    });
}

/// A running VM migrates: the stream says `accepted`, a round per pre-copy round (`max_rounds`
/// 1 stops the fake's three at two), and `ended` `moved`. The source's copy is `migrated`, with
/// where it went, and its VMM ends; the target lists it running, with where it came from and
/// the same boot id (its sidecar's hello with that id was taken as a reconnect: the agent was
/// not started again), started with `--migrate-from` and no kernel. It can then be stopped
/// there as any VM.
pub(super) fn a_running_vm_moves_to_the_pinned_host_and_runs_there() {
    let h = hosts(true);
    let id = start_migratable(&h.source, MigrationMode::Normal);
    let before = h.source.vm(&id);
    let body = serde_json::json!({"to": h.target_addr, "max_rounds": 1, "downtime_ms": 50});
    let events = events_to_end(&mut migrate(&h, &id, body));
    let target_vm = accepted(&events, &h);
    assert_eq!(rounds(&events), [0, 1], "{events:?}");
    assert!(
        matches!(
            events[1],
            MigrationEvent::Round {
                pages: 64,
                dirty: 16,
                ..
            }
        ),
        "{events:?}"
    );
    assert_eq!(ended_with(&events, MigrationOutcome::Moved, &h), None);
    assert_eq!(events.len(), 4, "{events:?}");
    match events.last() {
        Some(MigrationEvent::Ended {
            target_vm: Some(t),
            downtime_ms: Some(downtime),
            total_ms,
            ..
        }) => assert!(
            *t == target_vm && *downtime >= 0.0 && total_ms >= downtime,
            "{events:?}"
        ),
        other => panic!("{other:?}"),
    }

    // The source's copy has ended for good.
    ended_here_as_moved(&h, &id, &target_vm, &before);
    let ops = Path::new(&before.vm_dir)
        .join("vmm")
        .join(fake_vmm::CONTROL_OPS_FILE);
    let ops = std::fs::read_to_string(ops).unwrap_or_default();
    assert!(ops.lines().any(|op| op == "migrate"), "{ops}");

    // The target runs it, as the same guest.
    let moved = wait_status(&h.target, &target_vm, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    assert_eq!(
        moved.migrated_from,
        Some(MigratedTo {
            host: h.source_key.clone(),
            vm: id.clone(),
            outcome: MigrationOutcome::Moved,
        }),
        "{moved:?}"
    );
    assert!(
        moved.boot_id.is_some() && moved.boot_id == before.boot_id,
        "{moved:?}\n{before:?}"
    );
    assert_eq!(
        (
            moved.spec.command.as_str(),
            moved.spec.memory_mib,
            moved.spec.vcpus
        ),
        ("pausable", before.spec.memory_mib, before.spec.vcpus)
    );
    let pid = moved.vmm_pid.expect("the target's VMM");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(args.contains(&&b"--migrate-from"[..]), "{args:?}");
    assert!(!args.contains(&&b"--kernel"[..]), "{args:?}");
    let listed = live_vms(&h.target);
    assert!(
        listed.len() == 1 && listed[0].id == target_vm && listed[0].status == VmStatus::Running,
        "{listed:?}"
    );
    wait_for("the moved guest's output", Duration::from_secs(20), || {
        text(&h.target.cli(&["logs", &target_vm]).stdout) == "migrated\n"
    });

    let stop = h.target.cli(&["stop", &target_vm]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let info = h.target.vm(&target_vm);
    assert_eq!(info.status, VmStatus::Stopped, "{info:?}");
    assert_eq!(info.agent_exit, Some(nanoclaw_api::AgentExit::Signal(15)));
}

/// The source daemon is killed after the switch-over, before it has recorded the move (its
/// VMM holds its `moved` answer): the target runs the VM, the source's VMM refuses to run it
/// again, and the source daemon, started again, asks its VMM how the migration ended and ends
/// its copy as `migrated`, with where it went. One copy runs throughout.
pub(super) fn a_source_daemon_killed_after_the_switch_over_records_the_move_on_restart() {
    let mut h = hosts(true);
    let id = start_migratable(&h.source, MigrationMode::LateAnswer);
    let before = h.source.vm(&id);
    let mut stream = migrate(&h, &id, serde_json::json!({"to": h.target_addr}));
    let target_vm = match next_event(&mut stream) {
        Some(MigrationEvent::Accepted { target_vm }) => target_vm,
        other => panic!("not accepted first: {other:?}\n{}", h.records()),
    };
    let switched = Path::new(&before.vm_dir)
        .join("vmm")
        .join(fake_vmm::migration::SWITCHED_FILE);
    wait_for("the switch-over", Duration::from_secs(20), || {
        switched.exists()
    });
    h.source.kill().expect("kill the source daemon");
    drop(stream);

    // The target runs it; the source's VMM outlives its daemon and holds the VM stopped.
    wait_status(&h.target, &target_vm, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    let source_vmm = before.vmm_pid.expect("the source's VMM");
    assert!(!gone(source_vmm), "the source's VMM ended with its daemon");

    h.source.spawn().expect("start the source daemon again");
    ended_here_as_moved(&h, &id, &target_vm, &before);
    assert!(
        h.source.log().contains("a migration out was under way"),
        "{}",
        h.source.log()
    );
    let listed = live_vms(&h.target);
    assert!(listed.len() == 1 && listed[0].id == target_vm, "{listed:?}");
}

/// A cancel while the pages are being copied (after the first round) closes the source VMM's
/// migration socket: the stream ends `kept`, the VM runs on here, not paused, and the target
/// is left with no live VM. A second cancel finds none to cancel.
pub(super) fn a_cancel_mid_copy_keeps_the_vm_running_here() {
    let h = hosts(true);
    let id = start_migratable(&h.source, MigrationMode::Slow);
    let mut stream = migrate(&h, &id, serde_json::json!({"to": h.target_addr}));
    let mut events: Vec<MigrationEvent> = Vec::new();
    while rounds(&events).is_empty() {
        let event = next_event(&mut stream)
            .unwrap_or_else(|| panic!("no round: {events:?}\n{}", h.records()));
        events.push(event);
    }
    let (status, body) = cancel(&h.source, &id);
    assert_eq!(status, 204, "{body}\n{}", h.records());
    events.extend(events_to_end(&mut stream));
    accepted(&events, &h);
    let error = ended_with(&events, MigrationOutcome::Kept, &h);
    assert!(error.is_some(), "{events:?}");
    // The slow copy has fifty rounds: the cancel landed in the middle.
    assert!(rounds(&events).len() < 50, "{events:?}");
    let (status, body) = cancel(&h.source, &id);
    assert_eq!(status, 409, "{body}");
    target_left_nothing_running(&h);
    runs_on_here(&h, &id);
}

/// The target's VMM dies after the first round, without an answer: the stream ends `kept`
/// (the state had not gone out), the VM runs on here, not paused, and the target is left with
/// no live VM.
pub(super) fn a_target_that_dies_mid_copy_leaves_the_vm_running_here() {
    let h = hosts(true);
    let id = start_migratable(&h.source, MigrationMode::TargetDies);
    let events = events_to_end(&mut migrate(
        &h,
        &id,
        serde_json::json!({"to": h.target_addr}),
    ));
    accepted(&events, &h);
    let error = ended_with(&events, MigrationOutcome::Kept, &h);
    assert!(error.is_some(), "{events:?}");
    assert!(rounds(&events).len() < 50, "{events:?}");
    target_left_nothing_running(&h);
    runs_on_here(&h, &id);
}

/// The target's VMM takes the whole state and never answers: the source cannot know which
/// copy runs, so the stream ends `unknown` and the VM stays here, paused, with a record of
/// where it may have gone. Driven by `nanoclaw migrate --json`, which prints the daemon's
/// events and exits 3.
pub(super) fn without_the_targets_answer_the_vm_stays_paused_here_as_unknown() {
    let h = hosts(true);
    let id = start_migratable(&h.source, MigrationMode::NoAnswer);
    let out = h
        .source
        .cli(&["migrate", &id, "--to", &h.target_addr, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        h.records()
    );
    let events: Vec<MigrationEvent> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("an event: {e}: {l:?}")))
        .collect();
    let target_vm = accepted(&events, &h);
    let error = ended_with(&events, MigrationOutcome::Unknown, &h);
    assert!(error.is_some(), "{events:?}");
    let info = h.source.vm(&id);
    assert!(
        info.paused && info.status == VmStatus::Running,
        "{info:?}\n{}",
        h.records()
    );
    assert_eq!(
        info.migrated_to,
        Some(MigratedTo {
            host: h.target_addr.clone(),
            vm: target_vm,
            outcome: MigrationOutcome::Unknown,
        }),
        "{info:?}"
    );

    // Settled by asking the target. While its (silent) VMM is there, the copy may run: the
    // source's ends, as moved.
    let out = h.source.cli(&["migrate", &id, "--resolve"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        h.records()
    );
    assert!(
        text(&out.stdout).contains("migrated: it runs on"),
        "{}",
        text(&out.stdout)
    );
    let info = h.source.vm(&id);
    assert_eq!(info.status, VmStatus::Migrated, "{info:?}");
    assert_eq!(
        info.migrated_to.map(|m| m.outcome),
        Some(MigrationOutcome::Moved)
    );

    // Once the target's VMM is gone without running the VM, there is no copy there: the
    // source's runs again.
    kill_target_vmms(&h);
    let id = start_migratable(&h.source, MigrationMode::NoAnswer);
    let out = h
        .source
        .cli(&["migrate", &id, "--to", &h.target_addr, "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    kill_target_vmms(&h);
    let out = h.source.cli(&["migrate", &id, "--resolve"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        h.records()
    );
    assert!(
        text(&out.stdout).contains("runs here again"),
        "{}",
        text(&out.stdout)
    );
    runs_on_here(&h, &id);
    // A VM with nothing to settle is refused.
    let out = h.source.cli(&["migrate", &id, "--resolve"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no migration of unknown outcome"),
        "{}",
        text(&out.stderr)
    );
}

/// A VM created with an image migrates only to a host that holds the same image (by digest,
/// under any name). A target without it refuses the offer with a reason that says so: the
/// stream ends `kept`, the target is left with no VM and no folder, and the VM runs on here.
/// Once the same image is imported on the target, the move goes through: the target's record
/// holds the image (its own copy of the root disk) and a writable disk in the VM's folder that
/// is exactly as long as the source's and all zero (sparse: the fake VMMs copy no blocks), and
/// its VMM gets both disks as a created VM's does: the image's read-only first.
pub(super) fn an_image_vm_moves_only_to_a_host_holding_its_image() {
    let h = hosts(true);
    let import = |d: &Daemon, name: &str| {
        nanoclaw_tests::oci::import_test_image(d, name, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("import {name}: {e:#}"))
    };
    import(&h.source, "mig-image");
    let out = h.source.cli(&[
        "run",
        "-d",
        "--image",
        "mig-image",
        "--disk-size",
        "64",
        "--",
        "pausable",
        MigrationMode::Normal.as_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let before = wait_status(&h.source, &id, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    let source_record = record_of(&before);
    let source_disk = Path::new(&before.vm_dir).join("scratch.ext4");
    let disk_bytes = std::fs::metadata(&source_disk)
        .expect("the source's disk")
        .len();
    assert_eq!(disk_bytes, 64 << 20);

    // The target does not hold the image: refused, nothing made there.
    let events = events_to_end(&mut migrate(
        &h,
        &id,
        serde_json::json!({"to": h.target_addr}),
    ));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, MigrationEvent::Accepted { .. })),
        "{events:?}"
    );
    let error = ended_with(&events, MigrationOutcome::Kept, &h).unwrap_or_default();
    let digest = source_record["image"]["digest"]
        .as_str()
        .expect("the digest");
    assert!(
        error.contains(&format!("image mig-image ({digest}) is not on this host"))
            && error.contains("import the same image here first"),
        "{error}"
    );
    assert!(live_vms(&h.target).is_empty());
    let folders = std::fs::read_dir(h.target.state_dir().join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(folders, 0, "the target made a VM folder");
    let info = h.source.vm(&id);
    assert!(
        info.status == VmStatus::Running && !info.paused && info.migrated_to.is_none(),
        "{info:?}\n{}",
        h.records()
    );

    // The same image, under another name, on the target: the VM moves.
    import(&h.target, "same-image");
    let events = events_to_end(&mut migrate(
        &h,
        &id,
        serde_json::json!({"to": h.target_addr}),
    ));
    let target_vm = accepted(&events, &h);
    assert_eq!(ended_with(&events, MigrationOutcome::Moved, &h), None);
    ended_here_as_moved(&h, &id, &target_vm, &before);
    let moved = wait_status(&h.target, &target_vm, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    assert_eq!(moved.spec.image.as_deref(), Some("mig-image"));
    let image = &record_of(&moved)["image"];
    let scratch = Path::new(&moved.vm_dir).join("scratch.ext4");
    let rootfs = image["rootfs"].as_str().expect("the rootfs");
    assert!(
        image["name"] == "mig-image"
            && image["digest"] == digest
            && image["user"] == source_record["image"]["user"]
            && image["scratch"] == scratch.to_str().unwrap()
            && Path::new(rootfs).starts_with(h.target.state_dir())
            && Path::new(rootfs).is_file(),
        "{image}"
    );
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(&scratch).expect("the target's disk");
    assert_eq!(disk.len(), disk_bytes);
    assert_eq!(disk.blocks(), 0, "the target's disk is not all zero");
    let pid = moved.vmm_pid.expect("the target's VMM");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let disks: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--disk")
        .map(|w| w[1].as_str())
        .collect();
    assert_eq!(
        disks,
        [
            format!("{rootfs},ro,id=image"),
            format!("{},id=scratch", scratch.display())
        ],
        "{args:?}"
    );
    assert!(args.iter().any(|a| a == "--migrate-from"), "{args:?}");

    let stop = h.target.cli(&["stop", &target_vm]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
}

/// The daemon's record of `vm` (`<vm-dir>/vm.json`), which holds what `inspect` does not show:
/// the VM's image and disks.
fn record_of(vm: &VmInfo) -> serde_json::Value {
    let path = Path::new(&vm.vm_dir).join("vm.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A migration to a host the source has not pinned is refused before anything (400, naming
/// the host), as is one of a VM that does not exist (404). A source whose key the target has
/// not pinned is refused by the target: the source says the host is not pinned (before the
/// stream or as its end, `kept`), nothing starts on the target, and the VM runs on here.
pub(super) fn hosts_not_pinned_either_way_are_refused_and_nothing_starts() {
    let h = hosts(false);
    let id = start_migratable(&h.source, MigrationMode::Normal);

    let (status, body) = api::call(
        &h.source.socket(),
        "POST",
        "/v1/vms/nosuchvm/migrate",
        Some(&serde_json::json!({"to": h.target_addr})),
    );
    assert_eq!(status, 404, "{body}");

    let unpinned = format!("127.0.0.1:{}", nanoclaw_tests::free_port());
    let mut answer = post_migrate(&h.source, &id, serde_json::json!({"to": unpinned}));
    let body = answer.rest();
    assert_eq!(answer.status, 400, "{body}");
    assert!(body.contains(&unpinned), "{body}");

    let mut answer = post_migrate(&h.source, &id, serde_json::json!({"to": h.target_addr}));
    let message = if answer.status == 200 {
        let events = events_to_end(&mut answer);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, MigrationEvent::Accepted { .. })),
            "{events:?}"
        );
        ended_with(&events, MigrationOutcome::Kept, &h).unwrap_or_default()
    } else {
        assert!((400..600).contains(&answer.status), "{}", answer.status);
        answer.rest()
    };
    assert!(message.contains("pinned"), "{message}\n{}", h.records());

    let listed = h.target.cli(&["ps", "--json"]);
    let listed: Vec<VmInfo> = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    let folders = std::fs::read_dir(h.target.state_dir().join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(folders, 0, "the target made a VM folder");
    runs_on_here(&h, &id);
}
