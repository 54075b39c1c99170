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
//! - **Between two daemons** (`nanoclaw migrate`): a counting agent, jailed, in an imported
//!   image, moves from one daemon to another over their pinned link on loopback, and counts
//!   on there: the same process (no count repeated, none skipped), the same boot id, the
//!   source's copy ended. It also appends each count to a file on its writable disk and syncs
//!   it, so the disk is written while it is copied; once the VM is stopped on the target, the
//!   target's disk holds every count, the ones written on the source included.
//! - **The device following the agent** (`nanoclaw migrate` with a device paired with both
//!   daemons): an agent calls an HTTPS server through the device every second, under a grant
//!   that names the VM on the source host only. It migrates; the source tells the device, and
//!   the agent's calls go on on the target, where the VM has another id.
//! - **A networked agent and its client** (`nanoclaw migrate`, the overlay address following):
//!   two daemons in two network namespaces, joined by an underlay (a bridge) with a client in
//!   a third. The agent serves a counter on TCP to the client over its overlay address; it
//!   migrates, and the client's one connection goes on with no count repeated or skipped. The
//!   longest silence the client saw is printed.

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

/// The agent: counts once a second, each count printed and also appended to a file
/// on the writable disk and synced there.
const DISK_COUNTER: &str = "i=0; while true; do i=$((i+1)); echo \"count $i\"; \
    echo $i >> /data/counts; sync; sleep 1; done";

/// Every `count N` of `log`, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_counting_agent_moves_to_another_daemon_and_counts_on_there() {
    use super::agent::{AGENT, detach_in_image, logs, nanoclaw, text};
    use nanoclaw_tests::oci::import_test_image;
    let image = GuestImage::from_env().expect("guest image");
    let hosts = PinnedHosts::start(
        || DaemonOptions::guest(&image.vmlinux, &image.initramfs),
        true,
    )
    .expect("two daemons pinned to each other");
    let (source, target) = (&hosts.source, &hosts.target);
    // The same image on both hosts: the target refuses a VM whose image it lacks.
    for d in [source, target] {
        import_test_image(d, "migrating", MIGRATE).expect("import the test image");
    }
    let id = detach_in_image(source, "migrating", &["/bin/sh", "-c", DISK_COUNTER]);
    source
        .wait_for(&id, AGENT, "counting", |_| {
            counts(&logs(source, &id)).last().is_some_and(|n| *n >= 3)
        })
        .expect("the agent counts");
    let before = source.inspect(&id).expect("inspect");

    let shown = migrate_to_target(&hosts, &id);
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

    let last_there = *all.last().unwrap();

    let out = nanoclaw(target, &["stop", &there], MIGRATE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        target.vmm_processes().is_empty(),
        "the target's VMM ended with its stop"
    );

    // The writable disk came along: read off the stopped VM's disk on the target, the file
    // holds every count from the first, written on the source, to those written there.
    let work = tempfile::tempdir().expect("a scratch folder");
    let out = nanoclaw(
        target,
        &[
            "cp",
            &format!("{there}:/data/counts"),
            work.path().to_str().unwrap(),
        ],
        MIGRATE,
    );
    assert!(out.status.success(), "cp: {}", text(&out.stderr));
    let on_disk: Vec<u64> = std::fs::read_to_string(work.path().join("counts"))
        .expect("the counts file")
        .lines()
        .map(|l| l.trim().parse().expect("a count"))
        .collect();
    let expected: Vec<u64> = (1..=on_disk.len() as u64).collect();
    assert_eq!(on_disk, expected, "every count on the disk, in order");
    assert!(
        on_disk.len() as u64 + 2 >= last_there && on_disk.len() as u64 > last_here,
        "the disk holds the counts up to the stop ({} of {last_there}, {last_here} before the move)",
        on_disk.len()
    );
}

/// The agent of the credential test: a call through the device every second, and a line
/// saying how it went.
fn calling_agent() -> String {
    format!(
        "while true; do \
           if busybox wget -q -O /dev/null http://127.0.0.1:{}/svc/hello; \
           then echo CALL-OK; else echo CALL-FAIL; fi; sleep 1; done",
        shared_proto::credential::GUEST_PROXY_PORT
    )
}

/// The `CALL-` lines of `log`.
fn calls(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("CALL-")).collect()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn the_device_follows_a_moving_agent_and_its_credential_calls_go_on() {
    use super::agent::{AGENT, detach, logs, text};
    use super::credentials::{
        Reaper, Upstream, init_vault, pairing_code, run, serve_device, upstream_port, vault_command,
    };
    let image = GuestImage::from_env().expect("guest image");
    let dir = tempfile::Builder::new().prefix("nce2e-").tempdir().unwrap();
    let p = dir.path();
    let mut reaper = Reaper(Vec::new());
    let upstream = Upstream::start(p, &mut reaper);
    // Each daemon serves a device link on a port of its own.
    let device_ports = [nanoclaw_tests::free_port(), nanoclaw_tests::free_port()];
    let started = std::cell::Cell::new(0);
    let hosts = PinnedHosts::start(
        || {
            let port = device_ports[started.replace(started.get() + 1).min(1)];
            DaemonOptions::guest(&image.vmlinux, &image.initramfs)
                .args(["--device-listen".to_owned(), format!("127.0.0.1:{port}")])
        },
        true,
    )
    .expect("two daemons pinned to each other");
    let (source, target) = (&hosts.source, &hosts.target);

    // One device, paired with both hosts.
    let vd = vault_command(p);
    init_vault(&vd, &upstream.api, &upstream.secret);
    let addresses = device_ports.map(|port| format!("127.0.0.1:{port}"));
    for (daemon, address) in [source, target].into_iter().zip(&addresses) {
        let code = pairing_code(&daemon.state_dir());
        run(vd().args(["pair", "--host", address, "--code", &code]));
    }
    reaper
        .0
        .push(serve_device(p, &vd, &upstream_port(&upstream.api)));

    // The grant names the VM on the source host only: on the target, only the device's
    // following the VM can serve its calls.
    let id = detach(source, &["/bin/sh", "-c", &calling_agent()]);
    run(vd().args([
        "grant",
        "svc",
        "--host",
        &upstream.api,
        "--vm",
        &id,
        "--on",
        &addresses[0],
        "--ttl",
        "600",
    ]));
    // On a failure: what the device logged, and what its vault holds.
    let device_log = || {
        let listed = vd().arg("list").output().map(|o| text(&o.stdout));
        format!(
            "{}\nvault-device list:\n{}",
            std::fs::read_to_string(p.join("device.log")).unwrap_or_default(),
            listed.unwrap_or_default()
        )
    };
    source
        .wait_for(&id, AGENT, "a granted call on the source", |_| {
            calls(&logs(source, &id)).contains(&"CALL-OK")
        })
        .unwrap_or_else(|e| panic!("{e:#}\ndevice log:\n{}", device_log()));

    let shown = migrate_to_target(&hosts, &id);
    assert!(
        shown.contains("device: follows the VM"),
        "{shown}\ndevice log:\n{}",
        device_log()
    );
    let there = source.inspect(&id).expect("inspect")["migrated_to"]["vm"]
        .as_str()
        .expect("the VM's id there")
        .to_owned();
    assert_ne!(there, id, "the target gave the VM an id of its own");
    // On the target its calls go on, under the grant made for it on the source. A call in
    // flight at the switch-over may fail; the ones after must not.
    target
        .wait_for(&there, AGENT, "two calls on the target", |_| {
            let log = logs(target, &there);
            let got = calls(&log);
            got.len() >= 3 && got[got.len() - 2..] == ["CALL-OK", "CALL-OK"]
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\ntarget log:\n{}\ndevice log:\n{}",
                logs(target, &there),
                device_log()
            )
        });
    let source_calls = calls(&logs(source, &id)).len();
    let target_log = logs(target, &there);
    println!(
        "credential calls: {source_calls} on the source, then on the target {:?}",
        calls(&target_log)
    );
}

/// The agent of the networked test: serves one client on TCP [`SERVED_PORT`], a line every
/// 100 ms.
const SERVER: &str = "exec /bin/busybox nc -l -p 7000 -e /bin/sh -c \
    'i=0; while true; do i=$((i+1)); echo \"count $i\"; sleep 0.1; done'";
const SERVED_PORT: u16 = 7000;

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_client_connection_to_a_networked_agent_survives_its_migration() {
    use super::agent::{AGENT, nanoclaw, text};
    use nanoclaw_tests::netns::{UNDERLAY_IF, Underlay};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let image = GuestImage::from_env().expect("guest image");
    let underlay = Underlay::create("mig", 3, "10.200.0.0/16").expect("the underlay");
    let [a, b, client] = &underlay.members[..] else {
        unreachable!("three members")
    };
    let on = |member: &nanoclaw_tests::netns::Member| {
        DaemonOptions::guest(&image.vmlinux, &image.initramfs)
            .in_netns(member.nsenter_arg())
            .args(["--underlay", UNDERLAY_IF])
    };
    let hosts = PinnedHosts::start_at(
        (on(a), format!("{}:7420", a.addr)),
        (on(b), format!("{}:7420", b.addr)),
        true,
    )
    .expect("two daemons on the underlay, pinned to each other");
    let (source, target) = (&hosts.source, &hosts.target);

    let profile = source.dir().join("serve.toml");
    std::fs::write(
        &profile,
        format!(
            "name = \"e2e-serve\"\ntier = \"worker\"\n\n[network]\ningress = [{SERVED_PORT}]\n"
        ),
    )
    .expect("write the profile");
    let profile = profile.to_string_lossy().into_owned();
    let out = nanoclaw(
        source,
        &[
            "run",
            "--detach",
            "--profile",
            &profile,
            "--",
            "/bin/sh",
            "-c",
            SERVER,
        ],
        MIGRATE,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        hosts.records()
    );
    let id = text(&out.stdout).trim().to_owned();
    let info = source.inspect(&id).expect("inspect");
    let guest: std::net::Ipv4Addr = info["network"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the VM's address: {info}"));
    assert_eq!(
        info["network"]["ingress"],
        serde_json::json!([SERVED_PORT]),
        "{info}"
    );

    // The client connects over the underlay, as soon as the agent listens.
    let deadline = Instant::now() + AGENT;
    let stream = loop {
        let tried = client.connect((guest, SERVED_PORT).into(), Duration::from_secs(5));
        match tried {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!(
                "the client cannot reach the agent: {e:#}\n{}",
                hosts.records()
            ),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    // The test's own hold on the connection, to end the reader when it is done.
    let closer = stream
        .try_clone()
        .expect("a second handle on the connection");
    // Every line the client reads, with when it came; the reader ends at the stream's end.
    let lines: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let ended: Arc<Mutex<Option<String>>> = Arc::default();
    let reader = {
        let (lines, ended) = (Arc::clone(&lines), Arc::clone(&ended));
        std::thread::spawn(move || {
            let why = read_counts(stream, &lines);
            *ended.lock().unwrap() = Some(why.clone());
            why
        })
    };
    let count = || lines.lock().unwrap().last().map_or(0, |l| l.1);
    let wait_count = |n: u64, what: &str, detail: &dyn Fn() -> String| {
        let deadline = Instant::now() + AGENT;
        while count() < n {
            let gone = ended.lock().unwrap().clone();
            assert!(
                gone.is_none() && Instant::now() < deadline,
                "{what}: the client's count stopped at {} ({gone:?})\n{}\nclient's neighbours: {}\n{}",
                count(),
                detail(),
                text(
                    &client
                        .command("ip")
                        .args(["neigh"])
                        .output()
                        .map(|o| o.stdout)
                        .unwrap_or_default()
                ),
                hosts.records()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_count(10, "before the migration", &String::new);

    let shown = migrate_to_target(&hosts, &id);
    assert!(shown.contains("moved to "), "{shown}");
    let moved_at = count();
    let after = source.inspect(&id).expect("inspect");
    assert_eq!(after["status"], "migrated", "{after}");
    let there = after["migrated_to"]["vm"]
        .as_str()
        .expect("the VM's id there")
        .to_owned();
    let info = target.inspect(&there).expect("inspect on the target");
    assert_eq!(info["status"], "running", "{info}");
    assert_eq!(
        info["network"]["address"],
        guest.to_string(),
        "the address went with the VM"
    );

    // The same connection carries on, from the guest now on the target.
    wait_count(moved_at + 30, "after the migration", &|| {
        format!(
            "the target's VM: {}",
            target
                .inspect(&there)
                .map(|v| v["network"].to_string())
                .unwrap_or_default()
        )
    });
    let seen: Vec<(Instant, u64)> = lines.lock().unwrap().clone();
    let counts: Vec<u64> = seen.iter().map(|l| l.1).collect();
    let expected: Vec<u64> = (1..=*counts.last().unwrap()).collect();
    assert_eq!(
        counts, expected,
        "one connection, one process: no count repeated or skipped across the move"
    );
    let silence = seen
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    println!(
        "client's longest silence across the migration: {} ms (the agent writes every 100 ms)",
        silence.as_millis()
    );

    // The source answers for the address no more; the target does.
    let proxies = |m: &nanoclaw_tests::netns::Member| {
        let out = m
            .command("ip")
            .args(["neigh", "show", "proxy"])
            .output()
            .expect("ip neigh show proxy");
        text(&out.stdout)
    };
    assert!(!proxies(a).contains(&guest.to_string()), "{}", proxies(a));
    assert!(proxies(b).contains(&guest.to_string()), "{}", proxies(b));

    // The target's account of the move, for the log.
    for line in target
        .log()
        .lines()
        .filter(|l| l.contains("migrat") || l.contains("underlay"))
    {
        println!("target daemon: {line}");
    }

    // The client hangs up (a stopped guest would leave the reader waiting out its timeout).
    let _ = closer.shutdown(std::net::Shutdown::Both);
    let ended = reader.join().expect("the reader");
    println!("the client's connection: {ended}");
    let out = nanoclaw(target, &["stop", &there], MIGRATE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxies(b).contains(&guest.to_string()) {
        assert!(
            Instant::now() < deadline,
            "the target still answers for a stopped VM: {}",
            proxies(b)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads `count N` lines from `stream` into `lines`, each with when it came, until the stream
/// ends or fails; says how it ended.
fn read_counts(
    stream: std::net::TcpStream,
    lines: &std::sync::Mutex<Vec<(std::time::Instant, u64)>>,
) -> String {
    use std::io::BufRead;
    let mut got = std::io::BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match got.read_line(&mut line) {
            Ok(0) => return "the connection ended".to_owned(),
            Ok(_) => match line
                .trim()
                .strip_prefix("count ")
                .and_then(|n| n.parse().ok())
            {
                Some(n) => lines.lock().unwrap().push((std::time::Instant::now(), n)),
                None => return format!("an odd line: {line:?}"),
            },
            Err(e) => return format!("reading: {e}"),
        }
    }
}

/// `nanoclaw migrate ID --to TARGET` on the source of `hosts`, which must succeed; what it
/// printed.
fn migrate_to_target(hosts: &PinnedHosts, id: &str) -> String {
    use super::agent::{nanoclaw, text};
    let out = nanoclaw(
        &hosts.source,
        &["migrate", id, "--to", &hosts.target_addr],
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
    shown
}
