//! Component tests of the daemon (`host-agent serve`) and the `nanoclaw` CLI, with real peers
//! on Unix sockets and no KVM.
//!
//! This test binary plays three roles, chosen by its first argument (it runs without libtest's
//! harness so that it can, see `nanoclaw_tests::self_exec`):
//! - `serve ...`: the real daemon, through `host_agent::daemon::serve_main`;
//! - `--kernel ...`: a FAKE VMM, passed to the daemon as `--vmm-bin`. It plays the sidecar: it
//!   connects to `<vm-dir>/vsock.sock_<CONTROL_PORT>`, speaks `shared-proto`, acts out the
//!   agent named in `RunAgent` (see [`fake_agent`]), writes `exit.json` and exits;
//! - `--restore ...`: a FAKE VMM restoring a fake snapshot (see [`fake_restored_vmm`]);
//! - `--migrate-from ...`: a FAKE VMM receiving a live migration (see [`fake_migrated_vmm`]);
//! - no role: run the tests below, each against its own daemon and state directory. They need
//!   the `nanoclaw` binary built (`cargo build -p nanoclaw-cli`), and the last one the test
//!   tier's Python (`scripts/setup --test`, or `NANOCLAW_MCP_PYTHON`). The live migration's
//!   tests ([`migration`]) run two daemons and need `host-agent` built too.

#[path = "daemon/migration.rs"]
mod migration;

use std::io::Read;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nanoclaw_api::{AgentExit, VmInfo, VmStatus};
use nanoclaw_tests::fake_vmm::{self, ControlConn, McpClient};
use nanoclaw_tests::peers::mcp_python;
use nanoclaw_tests::sdk::{RemoteApi, assert_sdk_tests_passed, sdk_tests};
use nanoclaw_tests::self_exec::{self, SERVE};
use nanoclaw_tests::{
    CLI_TIMEOUT, Daemon, DaemonOptions, OutputWithin, nanoclaw_at, text, wait_for,
};
use nix::sys::signal::Signal;
use shared_proto::message::{AgentSpec, ExitStatus, GuestToHost, HostToGuest, OutputStream};

use migration::{
    a_cancel_mid_copy_keeps_the_vm_running_here,
    a_running_vm_moves_to_the_pinned_host_and_runs_there,
    a_source_daemon_killed_after_the_switch_over_records_the_move_on_restart,
    a_target_that_dies_mid_copy_leaves_the_vm_running_here,
    an_image_vm_moves_only_to_a_host_holding_its_image,
    hosts_not_pinned_either_way_are_refused_and_nothing_starts,
    without_the_targets_answer_the_vm_stays_paused_here_as_unknown,
};

fn main() {
    self_exec::main(
        &[
            SERVE,
            ("--kernel", fake_vmm),
            ("--restore", fake_restored_vmm),
            ("--migrate-from", fake_migrated_vmm),
        ],
        nanoclaw_tests::tests![
            cli_says_when_the_daemon_is_not_running,
            run_relays_output_and_exits_with_the_agent_code,
            a_garbage_guest_is_cut_off_and_logged_within_budget,
            a_restarted_daemon_reattaches_a_running_vm,
            a_restarted_daemon_reports_a_vanished_vmm_as_lost,
            stop_escalates_to_sigterm_and_ends_followers,
            ctrl_c_during_run_stops_the_vm,
            spawns_beyond_the_parents_children_cap_are_refused,
            spawns_beyond_the_daemons_vm_cap_are_refused,
            spawns_faster_than_the_rate_are_refused,
            children_stop_with_their_parent_unless_detached,
            a_stop_reaches_the_children_of_children,
            the_remote_api_needs_a_token_whose_scope_covers_the_route,
            the_python_sdk_drives_the_remote_api,
            snapshots_are_taken_paused_stored_listed_and_removed,
            a_restore_starts_a_new_vm_from_the_stored_snapshot_without_a_copy,
            a_damaged_or_incomplete_snapshot_is_refused_and_leaves_no_vm,
            a_fork_makes_n_vms_within_the_vm_cap,
            an_image_template_serves_warm_runs_of_its_size_only,
            a_running_vm_moves_to_the_pinned_host_and_runs_there,
            a_source_daemon_killed_after_the_switch_over_records_the_move_on_restart,
            a_cancel_mid_copy_keeps_the_vm_running_here,
            a_target_that_dies_mid_copy_leaves_the_vm_running_here,
            without_the_targets_answer_the_vm_stays_paused_here_as_unknown,
            hosts_not_pinned_either_way_are_refused_and_nothing_starts,
            an_image_vm_moves_only_to_a_host_holding_its_image,
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Role: the fake VMM and sidecar.

/// The boot key the fake sidecar announces (the daemon has no device here, so none checks it).
const BOOT_KEY: [u8; 32] = [7; 32];

/// The fake VMM: `vmm --kernel K --initrd I --vm-dir DIR ...`.
fn fake_vmm(args: &[String]) {
    let vm_dir = fake_vmm::vm_dir(args);
    std::fs::write(vm_dir.join("console.log"), "fake console: booted\n").unwrap();
    let mut boot_id = [0u8; 16];
    boot_id[..4].copy_from_slice(&std::process::id().to_be_bytes());
    let mut conn = ControlConn::open(&vm_dir, boot_id, BOOT_KEY);
    let spec = loop {
        match conn.recv(Duration::from_secs(10)) {
            Some(HostToGuest::RunAgent(spec)) => break spec,
            // A warm template is sent no agent; its snapshot freezes the guest, and the VMM
            // then serves the snapshot, then the template is stopped.
            Some(HostToGuest::Freeze) => {
                fake_vmm::serve_control(&vm_dir, boot_id, false);
                conn.send(&GuestToHost::Frozen);
            }
            Some(HostToGuest::Thaw) => {}
            Some(HostToGuest::Shutdown) => {
                fake_vmm::write_exit(&vm_dir, "reset", 0);
                std::process::exit(0);
            }
            None => conn = reconnect(&vm_dir, boot_id),
            other => fake_vmm::fail(&vm_dir, &format!("expected RunAgent, got {other:?}")),
        }
    };
    // The agent gets no stdin: EOF right away.
    match conn.recv(Duration::from_secs(10)) {
        Some(HostToGuest::AgentStdin { data }) if data.is_empty() => {}
        other => fake_vmm::fail(&vm_dir, &format!("expected stdin EOF, got {other:?}")),
    }
    fake_agent(&vm_dir, boot_id, conn, spec);
}

/// The fake VMM of a restore: `vmm --restore DIR --vm-dir VMDIR ...`. It checks that DIR is
/// the snapshot's folder in the daemon's store (`<state>/snapshots/`, beside `<state>/vms/`),
/// which the daemon does not copy, reads the fake snapshot there ([`fake_vmm::restore`] refuses a
/// damaged one as the VMM does), serves its control socket, and goes on as the saved guest:
/// its sidecar reconnects with the saved boot id (the daemon must not start the agent again),
/// prints `restored`, and runs until a `Shutdown`.
fn fake_restored_vmm(args: &[String]) {
    let vm_dir = fake_vmm::vm_dir(args);
    let dir = std::path::PathBuf::from(&args[1]);
    let store = vm_dir
        .ancestors()
        .nth(3)
        .map(|state| state.join("snapshots"));
    if dir.parent() != store.as_deref() {
        fake_vmm::fail(
            &vm_dir,
            &format!("--restore {} is not in the snapshot store", dir.display()),
        );
    }
    let boot_id = fake_vmm::restore(&dir);
    let paused = args.iter().any(|a| a == "--restore-paused");
    fake_vmm::serve_control(&vm_dir, boot_id, paused);
    let boot_id = reidentify(&vm_dir, boot_id);
    let mut conn = ControlConn::open(&vm_dir, boot_id, BOOT_KEY);
    match conn.recv(Duration::from_millis(300)) {
        // A warm start: the agent is sent to the new identity, as to a booted guest.
        Some(HostToGuest::RunAgent(spec)) => {
            match conn.recv(Duration::from_secs(10)) {
                Some(HostToGuest::AgentStdin { data }) if data.is_empty() => {}
                other => fake_vmm::fail(&vm_dir, &format!("expected stdin EOF, got {other:?}")),
            }
            fake_agent(&vm_dir, boot_id, conn, spec);
        }
        Some(HostToGuest::Shutdown) => shutdown(&vm_dir, &mut conn),
        _ => {
            output(&mut conn, OutputStream::Stdout, "restored\n");
            wait_for_shutdown(&vm_dir, boot_id, conn);
        }
    }
}

/// The fake VMM of a live migration's target: `vmm --migrate-from SOCKET --vm-dir VMDIR ...`,
/// with no kernel. SOCKET must be in the target VM's own folder. It receives the fake stream
/// ([`fake_vmm::migrate_in`], which checks it, serves the control socket and answers; a mode of
/// the source's makes it fail instead), then goes on as the moved guest: its sidecar connects
/// with the SAME boot id (the daemon must take it as that guest's reconnect and not start the
/// agent again), prints `migrated`, and runs until a `Shutdown`.
fn fake_migrated_vmm(args: &[String]) {
    let vm_dir = fake_vmm::vm_dir(args);
    let socket = std::path::PathBuf::from(&args[1]);
    if let Some(bad) = args.iter().find(|a| *a == "--kernel" || *a == "--initrd") {
        fake_vmm::fail(&vm_dir, &format!("a migration's target was given {bad}"));
    }
    if vm_dir.parent().is_none_or(|vm| !socket.starts_with(vm)) {
        fake_vmm::fail(
            &vm_dir,
            &format!(
                "--migrate-from {} is not in the VM's folder",
                socket.display()
            ),
        );
    }
    let boot_id = fake_vmm::migrate_in(&socket, &vm_dir);
    let mut conn = reconnect(&vm_dir, boot_id);
    output(&mut conn, OutputStream::Stdout, "migrated\n");
    wait_for_shutdown(&vm_dir, boot_id, conn);
}

/// A restored sidecar's first hello, with the snapshot's boot id: the daemon must answer it
/// with `Reidentify` and nothing else before (no agent request). The new boot id is taken from
/// the host's entropy, so that copies differ as the real sidecar's draws do.
fn reidentify(vm_dir: &Path, old: [u8; 16]) -> [u8; 16] {
    let mut conn = ControlConn::open(vm_dir, old, BOOT_KEY);
    match conn.recv(Duration::from_secs(10)) {
        Some(HostToGuest::Reidentify { entropy, .. }) if entropy.len() >= 32 => {
            let mut fresh = [0u8; 16];
            fresh.copy_from_slice(&entropy[..16]);
            fresh
        }
        other => fake_vmm::fail(vm_dir, &format!("expected Reidentify, got {other:?}")),
    }
}

/// Reconnects after the daemon dropped us: hello again with the same boot id, and check that
/// the daemon does not start the agent a second time.
fn reconnect(vm_dir: &Path, boot_id: [u8; 16]) -> ControlConn {
    let mut conn = ControlConn::open(vm_dir, boot_id, BOOT_KEY);
    if let Some(msg) = conn.recv(Duration::from_millis(300)) {
        match msg {
            HostToGuest::RunAgent(_) => fake_vmm::fail(vm_dir, "RunAgent sent twice for one boot"),
            // Keep a Shutdown for the caller by answering it right here.
            HostToGuest::Shutdown => shutdown(vm_dir, &mut conn),
            _ => {}
        }
    }
    conn
}

fn shutdown(vm_dir: &Path, conn: &mut ControlConn) -> ! {
    conn.send(&GuestToHost::AgentExited {
        status: ExitStatus::Signal(15),
    });
    fake_vmm::write_exit(vm_dir, "reset", 0);
    std::process::exit(0);
}

fn output(conn: &mut ControlConn, stream: OutputStream, text: &str) {
    conn.send(&GuestToHost::AgentOutput {
        stream,
        data: text.as_bytes().to_vec(),
    });
}

/// Acts out the agent by its command:
/// - `wait`: starts, prints `waiting`, and runs until a `Shutdown` (agent killed by signal 15),
///   reconnecting whenever the daemon goes away;
/// - `garbage N`: after `RunAgent`, sends a bad frame, then N-1 connections of raw garbage
///   (no hello), checking each is closed, then a hello with another boot id (refused), then
///   reconnects properly and behaves like the default;
/// - `deaf`: starts, prints `deaf`, and ignores everything until killed;
/// - `pausable [MODE]`: serves the VMM's control socket ([`fake_vmm::serve_control`]: pause,
///   resume, snapshots, migrations, acted out by the [`fake_vmm::MigrationMode`] MODE, `normal`
///   by default), then behaves like `wait`;
/// - `orchestrate N`: starts, calls `spawn_agent` N times over its MCP endpoint (a worker that
///   runs `wait`), prints each answer as one JSON line, then behaves like `wait`;
/// - anything else: prints `hello ARGS ENV` on stdout and `to stderr` on stderr, exits 3.
fn fake_agent(vm_dir: &Path, boot_id: [u8; 16], mut conn: ControlConn, spec: AgentSpec) {
    match spec.command.as_str() {
        "wait" => {
            conn.send(&GuestToHost::AgentStarted { pid: 7 });
            output(&mut conn, OutputStream::Stdout, "waiting\n");
            wait_for_shutdown(vm_dir, boot_id, conn);
        }
        "pausable" => {
            if let Some(mode) = spec.args.first() {
                std::fs::write(vm_dir.join(fake_vmm::MIGRATION_MODE_FILE), mode).unwrap();
            }
            fake_vmm::serve_control(vm_dir, boot_id, false);
            conn.send(&GuestToHost::AgentStarted { pid: 11 });
            output(&mut conn, OutputStream::Stdout, "waiting\n");
            wait_for_shutdown(vm_dir, boot_id, conn);
        }
        "orchestrate" => {
            conn.send(&GuestToHost::AgentStarted { pid: 9 });
            let n: u32 = spec.args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
            let mut mcp = McpClient::connect(vm_dir);
            for _ in 0..n {
                let answer = mcp.call(
                    "spawn_agent",
                    serde_json::json!({"profile": WORKER_PROFILE, "command": ["wait"]}),
                );
                output(&mut conn, OutputStream::Stdout, &format!("{answer}\n"));
            }
            wait_for_shutdown(vm_dir, boot_id, conn);
        }
        "deaf" => {
            conn.send(&GuestToHost::AgentStarted { pid: 8 });
            output(&mut conn, OutputStream::Stdout, "deaf\n");
            loop {
                if conn.recv(Duration::from_secs(3600)).is_none() {
                    conn = reconnect(vm_dir, boot_id);
                }
            }
        }
        "garbage" => {
            let n: u32 = spec.args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
            // A frame whose body is not CBOR.
            let garbage = [0u8, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc];
            conn.send_raw(&garbage);
            conn.expect_closed();
            for _ in 1..n {
                let mut raw = ControlConn::connect(vm_dir);
                raw.send_raw(&garbage);
                raw.expect_closed();
            }
            // Another boot id on this VM is refused.
            match ControlConn::try_open(vm_dir, [0xee; 16], BOOT_KEY).0 {
                Some(HostToGuest::HelloReject { .. }) => {}
                other => fake_vmm::fail(vm_dir, &format!("impostor hello answered {other:?}")),
            }
            let conn = reconnect(vm_dir, boot_id);
            normal_agent(vm_dir, conn, &spec);
        }
        _ => normal_agent(vm_dir, conn, &spec),
    }
}

/// Runs until a `Shutdown` (the agent killed by signal 15), reconnecting whenever the daemon
/// goes away. A guest that a live migration stopped hears nothing until it runs again, and
/// after it moved never (the daemon then ends its VMM).
fn wait_for_shutdown(vm_dir: &Path, boot_id: [u8; 16], mut conn: ControlConn) -> ! {
    loop {
        let msg = conn.recv(Duration::from_secs(3600));
        fake_vmm::wait_while_migration_stopped();
        match msg {
            Some(HostToGuest::Shutdown) => shutdown(vm_dir, &mut conn),
            Some(HostToGuest::Freeze) => conn.send(&GuestToHost::Frozen),
            Some(_) => {}
            None => conn = reconnect(vm_dir, boot_id),
        }
    }
}

fn normal_agent(vm_dir: &Path, mut conn: ControlConn, spec: &AgentSpec) {
    conn.send(&GuestToHost::AgentStarted { pid: 42 });
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!("hello {} {}\n", spec.args.join(" "), env.join(" "));
    output(&mut conn, OutputStream::Stdout, &line);
    output(&mut conn, OutputStream::Stderr, "to stderr\n");
    conn.send(&GuestToHost::AgentExited {
        status: ExitStatus::Exit(3),
    });
    fake_vmm::write_exit(vm_dir, "reset", 0);
    drop(conn);
}

// ---------------------------------------------------------------------------------------------
// Role: the tests.

/// A daemon in this executable with the fake VMM, a 1 s stop grace and `extra` arguments.
fn daemon_with(extra: &[&str]) -> Daemon {
    DaemonOptions::self_exec()
        .stop_grace_secs(1)
        .rust_log("info")
        .args(extra.iter().copied())
        .start()
        .expect("start the daemon")
}

fn daemon() -> Daemon {
    daemon_with(&[])
}

/// `nanoclaw --socket SOCKET ARGS`, run to its end.
fn nanoclaw(socket: &Path, args: &[&str]) -> Output {
    nanoclaw_at(socket, args)
        .output_within(CLI_TIMEOUT)
        .expect("run nanoclaw")
}

/// Polls the VM until `f` holds (at most 20 s).
fn wait_status(d: &Daemon, id: &str, f: impl Fn(&VmInfo) -> bool) -> VmInfo {
    d.wait_vm(id, Duration::from_secs(20), f)
}

fn cli_says_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("api.sock");
    let expected = format!(
        "nanoclaw: error: the host-agent daemon is not running at {} (start it with: host-agent serve)\n",
        missing.display()
    );
    let out = nanoclaw(&missing, &["ps"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), expected);
    // A stale socket file that nobody listens on: connection refused, same line.
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let out = nanoclaw(&missing, &["run", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(text(&out.stderr), expected);
}

fn run_relays_output_and_exits_with_the_agent_code() {
    let d = daemon();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = d
        .serve_command(&d.dir().join("other.sock"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        text(&second.stderr).contains("another daemon already uses the state directory"),
        "{}",
        text(&second.stderr)
    );

    let out = d.cli(&["run", "-e", "A=1", "--", "/bin/agent", "x", "y"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello x y A=1\n");
    assert_eq!(text(&out.stderr), "to stderr\n");

    let ps = d.cli(&["ps", "--json"]);
    assert!(ps.status.success());
    let vms: Vec<VmInfo> = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert_eq!(vm.status, VmStatus::Exited);
    assert_eq!(vm.agent_exit, Some(AgentExit::Exit(3)));
    assert_eq!(vm.agent_pid, Some(42));
    assert_eq!(vm.spec.command, "/bin/agent");
    assert_eq!((vm.spec.uid, vm.spec.gid), (1000, 1000));
    assert_eq!(vm.guest_protocol_errors, 0);

    let info = d.vm(&vm.id);
    let vmm_exit = info.vmm_exit.clone().expect("vmm exit");
    assert_eq!(
        (vmm_exit.reason.as_str(), vmm_exit.exit_code),
        ("reset", Some(0))
    );
    assert!(Path::new(&info.vm_dir).join("vm.json").is_file());

    let table = d.cli(&["ps"]);
    let table = text(&table.stdout);
    assert!(
        table.contains(&vm.id) && table.contains("exited"),
        "{table}"
    );

    // The output is kept after the fact.
    let logs = d.cli(&["logs", &vm.id]);
    assert!(logs.status.success());
    assert_eq!(text(&logs.stdout), "hello x y A=1\n");
    assert_eq!(text(&logs.stderr), "to stderr\n");
    let console = d.cli(&["logs", "--console", &vm.id]);
    assert_eq!(text(&console.stdout), "fake console: booted\n");

    let rm = d.cli(&["rm", &vm.id]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(!Path::new(&info.vm_dir).exists());
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    assert!(vms.is_empty());

    let missing = d.cli(&["inspect", "nosuchvm"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        text(&missing.stderr),
        "nanoclaw: error: no VM with id nosuchvm\n"
    );
}

fn a_garbage_guest_is_cut_off_and_logged_within_budget() {
    let d = daemon_with(&["--log-json"]);
    let out = d.cli(&["run", "--", "garbage", "25"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello 25 \n");

    let ps = d.cli(&["ps", "--json"]);
    assert!(ps.status.success(), "the daemon stopped answering");
    let vms: Vec<VmInfo> = serde_json::from_slice(&ps.stdout).unwrap();
    let vm = &vms[0];
    // 25 garbage connections and one impostor hello.
    assert_eq!(vm.guest_protocol_errors, 26);
    assert_eq!(vm.control_reconnects, 1);
    assert_eq!(vm.status, VmStatus::Exited);

    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("guest protocol error"))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(
        (1..=10).contains(&lines.len()),
        "{} lines:\n{log}",
        lines.len()
    );
    assert!(
        lines.iter().all(|l| l["fields"]["vm"] == vm.id.as_str()),
        "{log}"
    );
}

/// Starts a foreground `nanoclaw run -- wait` (the fake agent prints `waiting` and blocks) and
/// returns once the agent's first line has arrived, with the rest of its stdout.
fn start_waiting_run(d: &Daemon) -> (std::process::Child, std::process::ChildStdout) {
    let mut run = nanoclaw_at(&d.socket(), &["run", "--", "wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = run.stdout.take().unwrap();
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"waiting\n");
    (run, stdout)
}

fn a_restarted_daemon_reattaches_a_running_vm() {
    let mut d = daemon();
    // A foreground `run` relays across the restart.
    let (run, mut stdout) = start_waiting_run(&d);
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    let id = vms[0].id.clone();
    let before = wait_status(&d, &id, |i| {
        i.status == VmStatus::Running && i.control_connected
    });

    d.kill().unwrap();
    d.spawn().unwrap();
    let after = wait_status(&d, &id, |i| {
        i.control_connected && i.control_reconnects == 1
    });
    assert_eq!(after.status, VmStatus::Running);
    assert_eq!(after.vmm_pid, before.vmm_pid);

    let stop = d.cli(&["stop", &id]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(text(&stop.stdout), format!("{id} stopped\n"));
    let info = d.vm(&id);
    assert_eq!(info.status, VmStatus::Stopped);
    assert_eq!(info.agent_exit, Some(AgentExit::Signal(15)));
    // Output from before the restart is still there.
    let logs = d.cli(&["logs", &id]);
    assert_eq!(text(&logs.stdout), "waiting\n");

    // The foreground run saw the end, relayed nothing twice, and passed on 128 + SIGTERM.
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = run.wait_with_output().unwrap();
    assert_eq!(text(&rest), "");
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
}

fn a_restarted_daemon_reports_a_vanished_vmm_as_lost() {
    let mut d = daemon();
    let out = d.cli(&["run", "-d", "--", "wait"]);
    let id = text(&out.stdout).trim().to_owned();
    let info = wait_status(&d, &id, |i| i.status == VmStatus::Running);
    d.kill().unwrap();
    let pid = info.vmm_pid.unwrap() as i32;
    signal(pid, Signal::SIGKILL);
    wait_for("the fake VMM to be gone", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    d.spawn().unwrap();
    let info = d.vm(&id);
    assert_eq!(info.status, VmStatus::Lost, "{info:?}\n{}", d.log());
    assert_eq!(info.vmm_exit, None);
    // A follower is not left hanging on a lost VM.
    let logs = d.cli(&["logs", "--follow", &id]);
    assert_eq!(text(&logs.stdout), "waiting\n");
}

fn stop_escalates_to_sigterm_and_ends_followers() {
    let d = daemon();
    let out = d.cli(&["run", "-d", "--", "deaf"]);
    let id = text(&out.stdout).trim().to_owned();
    wait_status(&d, &id, |i| i.status == VmStatus::Running);
    let follower = nanoclaw_at(&d.socket(), &["logs", "--follow", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let busy = d.cli(&["rm", &id]);
    assert_eq!(busy.status.code(), Some(1));
    assert_eq!(
        text(&busy.stderr),
        format!("nanoclaw: error: VM {id} is running; stop it first\n")
    );
    let started = Instant::now();
    let stop = d.cli(&["stop", &id]);
    assert_eq!(text(&stop.stdout), format!("{id} stopped\n"));
    // The sidecar ignored Shutdown: the VMM got SIGTERM after the 1 s grace.
    assert!(started.elapsed() >= Duration::from_secs(1));
    let info = d.vm(&id);
    assert_eq!(info.status, VmStatus::Stopped);
    assert_eq!(info.agent_exit, None);
    assert_eq!(info.vmm_exit.map(|e| e.signal), Some(Some(15)));
    let followed = follower.wait_with_output().unwrap();
    assert!(followed.status.success());
    assert_eq!(text(&followed.stdout), "deaf\n");
}

fn ctrl_c_during_run_stops_the_vm() {
    let d = daemon();
    // `_stdout` keeps the pipe open until the end, as a terminal would.
    let (run, _stdout) = start_waiting_run(&d);
    signal(run.id() as i32, Signal::SIGINT);
    let out = run.wait_with_output().unwrap();
    // The fake agent dies of SIGTERM when the VM shuts down: 128 + 15.
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(vms[0].status, VmStatus::Stopped);
}

fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Spawning: the limits on `spawn_agent`, and children that stop with their parent.

/// The profile of the orchestrators below: no tools but `spawn_agent`.
const ORCHESTRATOR_PROFILE: &str = "name = \"boss\"\ntier = \"orchestrator\"\n";
/// The profile the fake orchestrator spawns its workers with (within its own rights).
const WORKER_PROFILE: &str = "name = \"helper\"\ntier = \"worker\"\n";

/// Starts `orchestrate N` with the orchestrator profile; returns its id and, once all N are
/// answered, the answers to its `spawn_agent` calls.
fn orchestrate(d: &Daemon, n: u32) -> (String, Vec<serde_json::Value>) {
    let profile = d.dir().join("boss.toml");
    std::fs::write(&profile, ORCHESTRATOR_PROFILE).unwrap();
    let out = d.cli(&[
        "run",
        "-d",
        "--profile",
        profile.to_str().unwrap(),
        "--",
        "orchestrate",
        &n.to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let mut answers = Vec::new();
    wait_for("the spawn answers", Duration::from_secs(30), || {
        answers = text(&d.cli(&["logs", &id]).stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an answer"))
            .collect();
        answers.len() == n as usize
    });
    (id, answers)
}

/// The VM id a successful `spawn_agent` answer names.
fn spawned(answer: &serde_json::Value) -> String {
    let said = answer["result"]["content"][0]["text"].as_str();
    let said = said.unwrap_or_else(|| panic!("not a spawn: {answer}"));
    said.strip_prefix("spawned agent in VM ")
        .unwrap_or_else(|| panic!("{said}"))
        .to_owned()
}

/// Checks that `answer` is a denial by `rule`, and that the audit log records it as one.
fn assert_refused(d: &Daemon, answer: &serde_json::Value, rule: &str, says: &str) {
    assert_eq!(answer["error"]["code"], host_agent::mcp::DENIED, "{answer}");
    assert_eq!(answer["error"]["data"]["rule"], rule, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "`{says}` not in {message}");
    let audit = d.state_dir().join(nanoclaw_api::AUDIT_FILE);
    let recorded = std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .any(|r| {
            r["kind"] == "policy_decision"
                && r["data"]["decision"] == "deny"
                && r["data"]["rule"] == rule
                && r["data"]["tool"] == "spawn_agent"
        });
    assert!(recorded, "no deny decision by {rule} in the audit log");
}

fn spawns_beyond_the_parents_children_cap_are_refused() {
    let d = daemon_with(&["--max-children", "2", "--spawn-burst", "10"]);
    let (parent, answers) = orchestrate(&d, 3);
    let children: Vec<String> = answers[..2].iter().map(spawned).collect();
    for child in &children {
        let info = wait_status(&d, child, |i| i.status == VmStatus::Running);
        assert_eq!(info.parent.as_deref(), Some(parent.as_str()));
        assert!(!info.detached);
    }
    assert_refused(
        &d,
        &answers[2],
        "spawn:limit:children-per-vm",
        "already has 2 live",
    );
    // Refused means not made: the parent and its two children only.
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(vms.len(), 3, "{vms:?}");
}

fn spawns_beyond_the_daemons_vm_cap_are_refused() {
    let d = daemon_with(&["--max-vms", "2"]);
    let (_parent, answers) = orchestrate(&d, 2);
    let child = spawned(&answers[0]);
    wait_status(&d, &child, |i| i.status == VmStatus::Running);
    assert_refused(
        &d,
        &answers[1],
        "spawn:limit:vms-per-host",
        "already runs 2 VMs",
    );
    // The cap holds for the user's own creates too, with a clear error.
    let out = d.cli(&["run", "-d", "--", "wait"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("already runs 2 VMs (--max-vms)"),
        "{}",
        text(&out.stderr)
    );
    // An ended VM does not count.
    let stop = d.cli(&["stop", &child]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let out = d.cli(&["run", "-d", "--", "wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn spawns_faster_than_the_rate_are_refused() {
    let d = daemon_with(&["--spawn-burst", "2", "--spawn-interval-secs", "3600"]);
    let (_parent, answers) = orchestrate(&d, 3);
    spawned(&answers[0]);
    spawned(&answers[1]);
    assert_refused(&d, &answers[2], "spawn:limit:rate", "spawning too fast");
}

fn children_stop_with_their_parent_unless_detached() {
    let mut d = daemon();
    let (parent, answers) = orchestrate(&d, 2);
    let (attached, detached) = (spawned(&answers[0]), spawned(&answers[1]));
    for child in [&attached, &detached] {
        wait_status(&d, child, |i| i.status == VmStatus::Running);
    }
    let out = d.cli(&["detach", &detached]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{detached} detached\n"));
    // Only a spawned VM has something to detach from.
    let out = d.cli(&["detach", &parent]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not spawned by another VM"));
    // The link and the detach survive a daemon restart.
    d.kill().unwrap();
    d.spawn().unwrap();
    assert!(d.vm(&detached).detached);
    assert_eq!(d.vm(&attached).parent.as_deref(), Some(parent.as_str()));
    wait_status(&d, &parent, |i| i.control_connected);

    let stop = d.cli(&["stop", &parent]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let info = wait_status(&d, &attached, |i| i.status.is_terminal());
    assert_eq!(info.status, VmStatus::Stopped);
    assert_eq!(info.agent_exit, Some(AgentExit::Signal(15)));
    let survivor = d.vm(&detached);
    assert_eq!(survivor.status, VmStatus::Running, "{survivor:?}");
    assert!(d.log().contains("stopping: its parent ended"));
}

/// A chain of three VMs, linked as spawns link them (in their records, while the daemon is
/// away: a worker cannot spawn, so a real chain needs an approved orchestrator child). Stopping
/// the first stops the other two.
fn a_stop_reaches_the_children_of_children() {
    let mut d = daemon();
    let ids: Vec<String> = (0..3)
        .map(|_| {
            text(&d.cli(&["run", "-d", "--", "wait"]).stdout)
                .trim()
                .to_owned()
        })
        .collect();
    for id in &ids {
        wait_status(&d, id, |i| i.status == VmStatus::Running);
    }
    d.kill().unwrap();
    for (child, parent) in [(1, 0), (2, 1)] {
        let path = d.state_dir().join("vms").join(&ids[child]).join("vm.json");
        let mut record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        record["parent"] = serde_json::json!(ids[parent]);
        std::fs::write(&path, record.to_string()).unwrap();
    }
    d.spawn().unwrap();
    assert_eq!(d.vm(&ids[2]).parent.as_deref(), Some(ids[1].as_str()));
    wait_status(&d, &ids[0], |i| i.control_connected);
    let stop = d.cli(&["stop", &ids[0]]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    for id in &ids[1..] {
        let info = wait_status(&d, id, |i| i.status.is_terminal());
        assert_eq!(info.status, VmStatus::Stopped, "{info:?}");
    }
}

/// The remote API over TLS: no token or an unknown one is 401, a read token reads but cannot
/// create (403), a run token creates a VM, only admin manages tokens, and a removed token stops
/// working at once. The token file holds no token.
fn the_remote_api_needs_a_token_whose_scope_covers_the_route() {
    let port = nanoclaw_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = daemon_with(&["--listen", &listen, "--tls-name", "nanoclaw.test"]);
    let token = |scope: &str| {
        let out = d.cli(&["token", "create", "--scope", scope]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let (read, run) = (token("read"), token("run"));
    let stored = std::fs::read_to_string(d.state_dir().join("tokens.json")).unwrap();
    assert!(
        !stored.contains(&read[4..]) && !stored.contains(&run[4..]),
        "{stored}"
    );

    // The client trusts the daemon's own certificate and nothing else.
    let pem = std::fs::read(d.state_dir().join("tls/cert.pem")).unwrap();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("nanoclaw.test", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let base = format!("https://nanoclaw.test:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let call = |method: reqwest::Method,
                path: &str,
                token: Option<&str>,
                body: Option<serde_json::Value>| {
        let mut req = client.request(method, format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        rt.block_on(async {
            let r = req.send().await.expect("send");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        })
    };
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let vm = serde_json::json!({"command": "/bin/sh", "args": ["-c", "echo remote"]});
    assert_eq!(call(get.clone(), "/v1/vms", None, None).0, 401);
    assert_eq!(
        call(get.clone(), "/v1/vms", Some("nct_forged"), None).0,
        401
    );
    assert_eq!(
        call(get.clone(), "/v1/vms", Some(&read), None),
        (200, "[]".to_owned())
    );
    // The API's description and the metrics are reads.
    let (status, body) = call(get.clone(), "/v1/openapi.json", Some(&read), None);
    assert_eq!((status, body), (200, nanoclaw_api::openapi::json()));
    let (status, body) = call(get.clone(), "/metrics", Some(&read), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("nanoclaw_boots_total"), "{body}");
    let (status, body) = call(post.clone(), "/v1/vms", Some(&read), Some(vm.clone()));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs run"), "{body}");
    let (status, body) = call(post.clone(), "/v1/vms", Some(&run), Some(vm));
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<VmInfo>(&body).unwrap().id;
    wait_status(&d, &id, |i| i.status.is_terminal());
    assert_eq!(call(get.clone(), "/v1/tokens", Some(&run), None).0, 403);
    let (status, body) = call(
        post,
        "/v1/tokens",
        Some(&run),
        Some(serde_json::json!({"scope": "admin"})),
    );
    assert_eq!(status, 403, "a run token cannot make an admin one: {body}");

    let ls = text(&d.cli(&["token", "ls"]).stdout);
    let read_id = ls
        .lines()
        .find(|l| l.contains(" read "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the read token is listed")
        .to_owned();
    assert!(d.cli(&["token", "rm", &read_id]).status.success());
    assert_eq!(call(get, "/v1/vms", Some(&read), None).0, 401);
}

/// The Python SDK (`sdk/python`) over the remote API: its test suite runs against this daemon
/// (`sdk/python/tests/test_fake_vmm.py` says what it covers: runs streamed to their exit code,
/// sync and async, a long-lived sandbox killed, the typed errors of a read token, an unknown
/// token, an untrusted certificate, a pause the fake VMM cannot do and files it has not,
/// snapshots taken, listed, restored and removed), with the offline tests of its tar, error
/// and settings handling.
fn the_python_sdk_drives_the_remote_api() {
    let port = nanoclaw_tests::free_port();
    let d = daemon_with(&["--listen", &format!("127.0.0.1:{port}")]);
    let api = RemoteApi::of(&d, port);
    let out = sdk_tests(
        &mcp_python(),
        &api,
        "fake",
        &["test_offline", "test_fake_vmm"],
        &[],
    )
    .output_within(CLI_TIMEOUT)
    .expect("run the SDK's tests");
    assert_sdk_tests_passed(&out, 24, &d.log());
    // Every sandbox the tests made is gone but the one they kept and removed, and so is
    // every snapshot they took.
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    assert!(vms.is_empty(), "{vms:?}");
    assert!(snapshots(&d).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Snapshots.

/// Starts `run -d -- pausable` (a fake VMM that serves its control socket) and waits for it to
/// run; its id.
fn start_pausable(d: &Daemon) -> String {
    let out = d.cli(&["run", "-d", "--", "pausable"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    wait_status(d, &id, |i| {
        i.status == VmStatus::Running && i.control_connected
    });
    id
}

fn snapshots(d: &Daemon) -> Vec<nanoclaw_api::SnapshotInfo> {
    let out = d.cli(&["snapshot", "ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Mode bits and owner of `path`.
fn mode_and_owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid())
}

/// `nanoclaw ARGS` fails (exit 1) saying `says`.
fn refused(d: &Daemon, args: &[&str], says: &str) {
    let out = d.cli(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains(says),
        "{args:?}: {}",
        text(&out.stderr)
    );
}

/// A running VM is paused around its snapshot and runs again after; the files land in
/// `state/snapshots/NAME/`, root's, 0700 and 0600, nothing is left in the VM's folder; they
/// are listed with what they were taken of, and removed. Taken names, bad names and VMs that
/// do not run are refused.
fn snapshots_are_taken_paused_stored_listed_and_removed() {
    let d = daemon();
    let id = start_pausable(&d);
    let out = d.cli(&["snapshot", &id, "first"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    assert_eq!(text(&out.stdout), "first\n");
    let vm = d.vm(&id);
    assert!(!vm.paused && vm.status == VmStatus::Running, "{vm:?}");
    let vmm_dir = Path::new(&vm.vm_dir).join("vmm");
    let ops = std::fs::read_to_string(vmm_dir.join(fake_vmm::CONTROL_OPS_FILE)).unwrap();
    assert_eq!(ops, "state\npause\nsnapshot\nresume\n");
    assert!(!vmm_dir.join("snapshot-first").exists());

    let me = nix::unistd::geteuid().as_raw();
    let dir = d.state_dir().join("snapshots/first");
    assert_eq!(mode_and_owner(&d.state_dir().join("snapshots")).0, 0o700);
    assert_eq!(mode_and_owner(&dir), (0o700, me));
    for file in ["state.bin", "memory.bin", "snapshot.json"] {
        assert_eq!(mode_and_owner(&dir.join(file)), (0o600, me), "{file}");
    }
    let listed = snapshots(&d);
    assert_eq!(listed.len(), 1);
    let s = &listed[0];
    assert_eq!(
        (s.name.as_str(), s.source_vm.as_str()),
        ("first", id.as_str())
    );
    assert_eq!(s.format_version, 2);
    assert_eq!(s.memory_bytes, fake_vmm::FAKE_MEMORY_BYTES);
    assert_eq!(s.state_bytes, 44);
    assert_eq!(s.spec.command, "pausable");

    // A paused VM stays paused; a name made up by the daemon.
    assert!(d.cli(&["pause", &id]).status.success());
    let out = d.cli(&["snapshot", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let made_up = text(&out.stdout).trim().to_owned();
    assert!(made_up.starts_with("snap-"), "{made_up}");
    assert!(d.vm(&id).paused);
    assert!(d.cli(&["resume", &id]).status.success());

    refused(&d, &["snapshot", &id, "first"], "exists already");
    for bad in ["../x", "a/b", ".hidden", "-x"] {
        refused(&d, &["snapshot", &id, "--", bad], "bad snapshot name");
    }
    refused(&d, &["snapshot", "rm", ".hidden"], "bad snapshot name");
    refused(&d, &["snapshot", "nosuchvm", "x"], "no VM with id nosuchvm");
    assert!(!d.state_dir().join("snapshots/..").join("x").exists());

    assert!(d.cli(&["stop", &id]).status.success());
    refused(
        &d,
        &["snapshot", &id, "late"],
        "only a running VM can be snapshotted",
    );
    assert_eq!(snapshots(&d).len(), 2);

    assert!(d.cli(&["snapshot", "rm", "first"]).status.success());
    assert!(!dir.exists());
    refused(&d, &["snapshot", "rm", "first"], "no snapshot named first");
    let left: Vec<String> = snapshots(&d).into_iter().map(|s| s.name).collect();
    assert_eq!(left, vec![made_up]);
}

/// A restore makes a new VM whose VMM is started with `--restore` on the snapshot's folder in
/// the store, which stays the daemon's (0700 and 0600) and is not copied (the fake VMM checks
/// the files' checksum), the saved guest's sidecar reconnects without the agent being started
/// again, and its output flows.
fn a_restore_starts_a_new_vm_from_the_stored_snapshot_without_a_copy() {
    let d = daemon();
    let id = start_pausable(&d);
    assert!(d.cli(&["snapshot", &id, "s1"]).status.success());
    assert!(d.cli(&["stop", &id]).status.success());

    let out = d.cli(&["restore", "s1", "-d"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    let new = text(&out.stdout).trim().to_owned();
    assert_ne!(new, id);
    let info = wait_status(&d, &new, |i| i.control_connected && !i.reidentify_pending);
    assert_eq!(info.restored_from.as_deref(), Some("s1"));
    assert_eq!(info.status, VmStatus::Running);
    // The saved boot said hello, was asked for a new identity, and came back with one.
    assert_eq!(info.control_reconnects, 0, "{info:?}");
    assert!(
        info.boot_id.is_some() && info.boot_id != d.vm(&id).boot_id,
        "the restored guest kept the saved boot id: {info:?}"
    );
    assert_eq!(info.spec.command, "pausable");
    let inspect = text(&d.cli(&["inspect", &new]).stdout);
    assert!(
        inspect.contains("restored from:  snapshot s1\n"),
        "{inspect}"
    );
    let stored = d.state_dir().join("snapshots/s1");
    let me = nix::unistd::geteuid().as_raw();
    assert_eq!(mode_and_owner(&stored), (0o700, me));
    for file in ["state.bin", "memory.bin"] {
        assert_eq!(mode_and_owner(&stored.join(file)), (0o600, me), "{file}");
    }
    assert!(
        !Path::new(&info.vm_dir).join("vmm/restore").exists(),
        "a copy of the snapshot was made"
    );
    let pid = info.vmm_pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let at = args
        .iter()
        .position(|a| *a == b"--restore")
        .expect("--restore");
    assert_eq!(args[at + 1], stored.as_os_str().as_encoded_bytes());
    assert!(!args.contains(&&b"--kernel"[..]));
    wait_for(
        "the restored guest's output",
        Duration::from_secs(20),
        || text(&d.cli(&["logs", &new]).stdout) == "restored\n",
    );
    // The stored snapshot is untouched and still the daemon's.
    assert_eq!(
        mode_and_owner(&d.state_dir().join("snapshots/s1/memory.bin")),
        (0o600, me)
    );
    let stop = d.cli(&["stop", &new]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(d.vm(&new).status, VmStatus::Stopped);

    // Paused from the start.
    let out = d.cli(&["restore", "s1", "-d", "--paused"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let paused = text(&out.stdout).trim().to_owned();
    assert!(d.vm(&paused).paused);
    assert!(d.cli(&["resume", &paused]).status.success());
    assert!(!d.vm(&paused).paused);
    assert!(d.cli(&["stop", &paused]).status.success());
}

/// A snapshot whose memory file was changed (the VMM refuses it: its words are the error),
/// whose state file is missing, or of another format version is refused, and no VM is left
/// listed or on disk.
fn a_damaged_or_incomplete_snapshot_is_refused_and_leaves_no_vm() {
    let d = daemon();
    let id = start_pausable(&d);
    for name in ["tampered", "incomplete", "future"] {
        let out = d.cli(&["snapshot", &id, name]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(d.cli(&["stop", &id]).status.success());
    let store = d.state_dir().join("snapshots");
    let memory = store.join("tampered/memory.bin");
    let mut bytes = std::fs::read(&memory).unwrap();
    bytes[(1 << 20) + 3] ^= 0x20;
    std::fs::write(&memory, bytes).unwrap();
    std::fs::remove_file(store.join("incomplete/state.bin")).unwrap();
    let state = store.join("future/state.bin");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&state, bytes).unwrap();

    let vms_before = std::fs::read_dir(d.state_dir().join("vms"))
        .unwrap()
        .count();
    refused(
        &d,
        &["restore", "tampered", "-d"],
        "the VMM refused the snapshot: nanoclaw-vmm: error: restore the snapshot in",
    );
    refused(
        &d,
        &["restore", "tampered", "-d"],
        "checksum of the memory file",
    );
    refused(
        &d,
        &["restore", "incomplete", "-d"],
        "snapshot incomplete is incomplete: state.bin is missing",
    );
    refused(
        &d,
        &["restore", "future", "-d"],
        "snapshot future is of format version 3; this daemon's VMM reads 2",
    );
    refused(
        &d,
        &["restore", "nothing", "-d"],
        "no snapshot named nothing",
    );
    refused(&d, &["restore", "../vms", "-d"], "");
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.cli(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vms_after = std::fs::read_dir(d.state_dir().join("vms"))
        .unwrap()
        .count();
    assert_eq!(vms_after, vms_before);
}

/// A fork of N makes N new VMs restored from one snapshot of the VM, which is then removed;
/// N is 1 to 8, and N more VMs than `--max-vms` allows are refused before anything is made.
fn a_fork_makes_n_vms_within_the_vm_cap() {
    let d = daemon_with(&["--max-vms", "3"]);
    let id = start_pausable(&d);
    refused(
        &d,
        &["fork", &id, "-n", "9"],
        "a fork makes 1 to 8 VMs, not 9",
    );
    refused(
        &d,
        &["fork", &id, "-n", "0"],
        "a fork makes 1 to 8 VMs, not 0",
    );
    refused(&d, &["fork", &id, "-n", "3"], "--max-vms");
    // A paused guest cannot freeze its processes for the copies: refused, nothing made.
    assert!(d.cli(&["pause", &id]).status.success());
    refused(&d, &["fork", &id, "-n", "1"], "is paused; resume it first");
    assert!(d.cli(&["resume", &id]).status.success());
    assert!(snapshots(&d).is_empty());
    let out = d.cli(&["fork", &id, "-n", "2"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    let made: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(made.len(), 2, "{made:?}");
    assert!(made[0] != made[1] && !made.contains(&id), "{made:?}");
    let parent_boot = d.vm(&id).boot_id.expect("the parent's boot id");
    let mut boots = vec![parent_boot];
    for vm in &made {
        wait_for("the fork's output", Duration::from_secs(20), || {
            text(&d.cli(&["logs", vm]).stdout) == "restored\n"
        });
        let info = d.vm(vm);
        assert!(
            info.restored_from
                .as_deref()
                .is_some_and(|s| s.starts_with("fork-")),
            "{info:?}"
        );
        // Each copy was admitted only with an identity of its own.
        assert!(
            info.control_connected && !info.reidentify_pending,
            "{info:?}"
        );
        boots.push(info.boot_id.expect("a copy's boot id"));
    }
    boots.sort();
    boots.dedup();
    assert_eq!(
        boots.len(),
        3,
        "the parent and its copies share a boot id: {boots:?}"
    );
    // Each copy read the snapshot as it was restored; the snapshot itself is gone.
    assert!(snapshots(&d).is_empty());
    assert!(!d.vm(&id).paused);
    // The audit log says where the copies came from: the snapshot, each restore, the fork.
    let audit = std::fs::read_to_string(d.state_dir().join(nanoclaw_api::AUDIT_FILE))
        .expect("the audit log");
    let records: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|r| r["record"].clone())
        .collect();
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| &r["data"])
            .collect()
    };
    let taken = of("vm_snapshot");
    assert!(
        taken.len() == 1 && taken[0]["vm"] == id.as_str() && taken[0]["frozen"] == true,
        "{taken:?}"
    );
    let restored = of("vm_restore");
    assert_eq!(restored.len(), 2, "{restored:?}");
    for r in &restored {
        assert_eq!(r["source_vm"], id.as_str(), "{r}");
        assert!(made.iter().any(|m| r["vm"] == m.as_str()), "{r}");
    }
    let forked = of("vm_fork");
    assert!(
        forked.len() == 1 && forked[0]["copies"].as_array().is_some_and(|c| c.len() == 2),
        "{forked:?}"
    );
    for vm in made.iter().chain([&id]) {
        assert!(d.cli(&["stop", vm]).status.success());
    }
}

/// `image warm` boots a template VM of the image that is never sent an agent, snapshots it
/// after its hello and removes it; a run of that image at that size restores the template
/// (with a new identity, then its own agent), and a run of another size boots.
fn an_image_template_serves_warm_runs_of_its_size_only() {
    let d = daemon();
    nanoclaw_tests::oci::import_test_image(&d, "warm-test", Duration::from_secs(120))
        .expect("import the test image");
    let out = d.cli(&["image", "warm", "warm-test"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), d.log());
    let template = text(&out.stdout).trim().to_owned();
    assert!(
        template.starts_with("warm-") && template.ends_with("-256m-1c-2048d"),
        "{template}"
    );
    let listed: Vec<String> = snapshots(&d).into_iter().map(|s| s.name).collect();
    assert_eq!(listed, vec![template.clone()]);
    // The template VM is gone.
    let vms = d.cli(&["ps", "--json"]);
    let vms: Vec<VmInfo> = serde_json::from_slice(&vms.stdout).unwrap();
    assert!(vms.is_empty(), "{vms:?}");

    // A run at the template's size starts from it, and its agent runs as in a booted VM.
    let out = d.cli(&["run", "--image", "warm-test"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        text(&out.stderr),
        d.log()
    );
    assert!(
        text(&out.stdout).starts_with("hello /app/run.sh first second PATH=/bin"),
        "{}",
        text(&out.stdout)
    );
    let vms = d.cli(&["ps", "--json"]);
    let vms: Vec<VmInfo> = serde_json::from_slice(&vms.stdout).unwrap();
    let warm = &vms[0];
    assert_eq!(
        warm.restored_from.as_deref(),
        Some(template.as_str()),
        "{warm:?}"
    );
    assert!(
        !warm.reidentify_pending && warm.boot_id.is_some(),
        "{warm:?}"
    );

    // Another size boots cold.
    let out = d.cli(&["run", "--image", "warm-test", "--memory", "512"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let vms = d.cli(&["ps", "--json"]);
    let vms: Vec<VmInfo> = serde_json::from_slice(&vms.stdout).unwrap();
    assert!(
        vms.iter()
            .any(|v| v.restored_from.is_none() && v.spec.memory_mib == 512),
        "{vms:?}"
    );
    // Warming an image that does not exist is refused, and leaves nothing.
    refused(&d, &["image", "warm", "no-such-image"], "no-such-image");
    assert_eq!(snapshots(&d).len(), 1);
}
