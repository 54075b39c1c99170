//! Component tests of the daemon (`host-agent serve`) and the `nanoclaw` CLI, with real peers
//! on Unix sockets and no KVM.
//!
//! This test binary plays three roles, chosen by its first argument (it runs without libtest's
//! harness so that it can):
//! - `serve ...`: the real daemon, through `host_agent::daemon::serve_main`;
//! - `--kernel ...`: a FAKE VMM, passed to the daemon as `--vmm-bin`. It plays the sidecar: it
//!   connects to `<vm-dir>/vsock.sock_<CONTROL_PORT>`, speaks `shared-proto`, acts out the
//!   agent named in `RunAgent` (see [`fake_agent`]), writes `exit.json` and exits;
//! - no role: run the tests below, each against its own daemon and state directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use nanoclaw_api::{AgentExit, VmInfo, VmStatus};
use nix::sys::signal::Signal;
use shared_proto::message::{AgentSpec, ExitStatus, GuestToHost, HostToGuest, OutputStream};
use shared_proto::{FrameDecoder, PROTOCOL_VERSION, encode_frame};

/// The `nanoclaw` CLI, built by `cargo test --workspace` beside this test.
fn nanoclaw_cli() -> std::path::PathBuf {
    nanoclaw_tests::built_bin("nanoclaw")
}
const CONTROL_SOCKET: &str = "vsock.sock_1024";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        // The daemon runs its VMM binary as `BIN --kernel ...`.
        Some("--kernel") => fake_vmm(&args[1..]),
        _ => run_tests(&args[1..]),
    }
}

// ---------------------------------------------------------------------------------------------
// Role: the daemon.

#[derive(Debug, Parser)]
struct ServeCli {
    #[command(flatten)]
    args: host_agent::daemon::ServeArgs,
}

fn serve(args: &[String]) {
    let cli = ServeCli::parse_from(args);
    if let Err(e) = host_agent::daemon::serve_main(cli.args) {
        eprintln!("serve: error: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Role: the fake VMM and sidecar.

/// One control connection from the fake sidecar.
struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder<HostToGuest>,
}

impl Conn {
    /// Connects (retrying while the daemon is away) and says hello.
    /// Like the real sidecar, a connection that drops before the answer is retried (a dying
    /// daemon may still accept one).
    fn open(vm_dir: &Path, boot_id: [u8; 16]) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (answer, conn) = Conn::try_open(vm_dir, boot_id);
            match answer {
                Some(HostToGuest::HelloAck { .. }) => return conn,
                None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => fake_fail(vm_dir, &format!("hello answered with {other:?}")),
            }
        }
    }

    /// Connects and says hello; the answer and the connection.
    fn try_open(vm_dir: &Path, boot_id: [u8; 16]) -> (Option<HostToGuest>, Conn) {
        let mut conn = Conn {
            stream: connect_retry(&vm_dir.join(CONTROL_SOCKET)),
            decoder: FrameDecoder::new(),
        };
        conn.send(&GuestToHost::Hello {
            protocol_version: PROTOCOL_VERSION,
            sidecar_version: "fake".into(),
            boot_id,
            ephemeral_public_key: [7; 32],
        });
        (conn.recv(Duration::from_secs(10)), conn)
    }

    fn send(&mut self, msg: &GuestToHost) {
        // A write may fail if the daemon died; the next read notices.
        let _ = self.stream.write_all(&encode_frame(msg).unwrap());
    }

    /// The next message, or `None` on EOF, error or timeout.
    fn recv(&mut self, timeout: Duration) -> Option<HostToGuest> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(msg) = self.decoder.decode_next().ok()? {
                return Some(msg);
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&buf[..n]),
            }
        }
    }

    /// Waits until the daemon closes the connection (after we misbehaved).
    fn expect_closed(&mut self, vm_dir: &Path) {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        // Frames already queued for us (such as stdin's EOF) may come first.
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => fake_fail(vm_dir, &format!("daemon kept a bad connection: {e}")),
            }
        }
    }
}

fn connect_retry(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn write_exit(vm_dir: &Path, reason: &str, code: i32) {
    let text = format!(r#"{{"reason":"{reason}","exit_code":{code},"boot_to_ready_ms":5}}"#);
    std::fs::write(vm_dir.join("exit.json"), text).unwrap();
}

fn fake_fail(vm_dir: &Path, why: &str) -> ! {
    eprintln!("fake vmm: {why}");
    write_exit(
        vm_dir,
        &format!("fake_failure: {}", why.replace('"', "'")),
        1,
    );
    std::process::exit(1);
}

/// The fake VMM: `vmm --kernel K --initrd I --vm-dir DIR ...`.
fn fake_vmm(args: &[String]) {
    let vm_dir = args
        .windows(2)
        .find(|w| w[0] == "--vm-dir")
        .map(|w| PathBuf::from(&w[1]))
        .expect("--vm-dir");
    std::fs::write(vm_dir.join("console.log"), "fake console: booted\n").unwrap();
    let mut boot_id = [0u8; 16];
    boot_id[..4].copy_from_slice(&std::process::id().to_be_bytes());
    let mut conn = Conn::open(&vm_dir, boot_id);
    let spec = match conn.recv(Duration::from_secs(10)) {
        Some(HostToGuest::RunAgent(spec)) => spec,
        other => fake_fail(&vm_dir, &format!("expected RunAgent, got {other:?}")),
    };
    // The agent gets no stdin: EOF right away.
    match conn.recv(Duration::from_secs(10)) {
        Some(HostToGuest::AgentStdin { data }) if data.is_empty() => {}
        other => fake_fail(&vm_dir, &format!("expected stdin EOF, got {other:?}")),
    }
    fake_agent(&vm_dir, boot_id, conn, spec);
}

/// Reconnects after the daemon dropped us: hello again with the same boot id, and check that
/// the daemon does not start the agent a second time.
fn reconnect(vm_dir: &Path, boot_id: [u8; 16]) -> Conn {
    let mut conn = Conn::open(vm_dir, boot_id);
    if let Some(msg) = conn.recv(Duration::from_millis(300)) {
        match msg {
            HostToGuest::RunAgent(_) => fake_fail(vm_dir, "RunAgent sent twice for one boot"),
            // Keep a Shutdown for the caller by answering it right here.
            HostToGuest::Shutdown => shutdown(vm_dir, &mut conn),
            _ => {}
        }
    }
    conn
}

fn shutdown(vm_dir: &Path, conn: &mut Conn) -> ! {
    conn.send(&GuestToHost::AgentExited {
        status: ExitStatus::Signal(15),
    });
    write_exit(vm_dir, "reset", 0);
    std::process::exit(0);
}

fn output(conn: &mut Conn, stream: OutputStream, text: &str) {
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
/// - anything else: prints `hello ARGS ENV` on stdout and `to stderr` on stderr, exits 3.
fn fake_agent(vm_dir: &Path, boot_id: [u8; 16], mut conn: Conn, spec: AgentSpec) {
    match spec.command.as_str() {
        "wait" => {
            conn.send(&GuestToHost::AgentStarted { pid: 7 });
            output(&mut conn, OutputStream::Stdout, "waiting\n");
            loop {
                match conn.recv(Duration::from_secs(3600)) {
                    Some(HostToGuest::Shutdown) => shutdown(vm_dir, &mut conn),
                    Some(_) => {}
                    None => conn = reconnect(vm_dir, boot_id),
                }
            }
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
            conn.stream.write_all(&garbage).unwrap();
            conn.expect_closed(vm_dir);
            for _ in 1..n {
                let mut raw = Conn {
                    stream: connect_retry(&vm_dir.join(CONTROL_SOCKET)),
                    decoder: FrameDecoder::new(),
                };
                raw.stream.write_all(&garbage).unwrap();
                raw.expect_closed(vm_dir);
            }
            // Another boot id on this VM is refused.
            match Conn::try_open(vm_dir, [0xee; 16]).0 {
                Some(HostToGuest::HelloReject { .. }) => {}
                other => fake_fail(vm_dir, &format!("impostor hello answered {other:?}")),
            }
            let conn = reconnect(vm_dir, boot_id);
            normal_agent(vm_dir, conn, &spec);
        }
        _ => normal_agent(vm_dir, conn, &spec),
    }
}

fn normal_agent(vm_dir: &Path, mut conn: Conn, spec: &AgentSpec) {
    conn.send(&GuestToHost::AgentStarted { pid: 42 });
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!("hello {} {}\n", spec.args.join(" "), env.join(" "));
    output(&mut conn, OutputStream::Stdout, &line);
    output(&mut conn, OutputStream::Stderr, "to stderr\n");
    conn.send(&GuestToHost::AgentExited {
        status: ExitStatus::Exit(3),
    });
    write_exit(vm_dir, "reset", 0);
    drop(conn);
}

// ---------------------------------------------------------------------------------------------
// Role: the tests.

fn run_tests(filters: &[String]) {
    let tests: &[(&str, fn())] = &[
        (
            "cli_says_when_the_daemon_is_not_running",
            cli_says_when_the_daemon_is_not_running,
        ),
        (
            "run_relays_output_and_exits_with_the_agent_code",
            run_relays_output_and_exits_with_the_agent_code,
        ),
        (
            "a_garbage_guest_is_cut_off_and_logged_within_budget",
            a_garbage_guest_is_cut_off_and_logged_within_budget,
        ),
        (
            "a_restarted_daemon_reattaches_a_running_vm",
            a_restarted_daemon_reattaches_a_running_vm,
        ),
        (
            "a_restarted_daemon_reports_a_vanished_vmm_as_lost",
            a_restarted_daemon_reports_a_vanished_vmm_as_lost,
        ),
        (
            "stop_escalates_to_sigterm_and_ends_followers",
            stop_escalates_to_sigterm_and_ends_followers,
        ),
        (
            "ctrl_c_during_run_stops_the_vm",
            ctrl_c_during_run_stops_the_vm,
        ),
    ];
    let wanted: Vec<&String> = filters.iter().filter(|f| !f.starts_with('-')).collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !wanted.is_empty() && !wanted.iter().any(|w| name.contains(w.as_str())) {
            continue;
        }
        ran += 1;
        eprintln!("test {name} ...");
        let started = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(()) => eprintln!("test {name} ... ok ({:.1?})", started.elapsed()),
            Err(_) => {
                eprintln!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    eprintln!("{ran} run, {} failed", failed.len());
    if !failed.is_empty() {
        eprintln!("failed: {failed:?}");
        std::process::exit(101);
    }
}

/// One daemon with its own state directory, killed on drop.
struct TestDaemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl TestDaemon {
    fn start() -> TestDaemon {
        TestDaemon::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kernel"), "k").unwrap();
        std::fs::write(dir.path().join("initrd"), "i").unwrap();
        let mut d = TestDaemon {
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    /// Runs a second daemon on the same state directory and another socket; its output.
    fn second_daemon(&self) -> Output {
        let me = std::env::current_exe().unwrap();
        let p = self.dir.path();
        Command::new(&me)
            .arg("serve")
            .arg("--state-dir")
            .arg(p.join("state"))
            .arg("--socket")
            .arg(p.join("other.sock"))
            .arg("--kernel")
            .arg(p.join("kernel"))
            .arg("--initrd")
            .arg(p.join("initrd"))
            .output()
            .unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let me = std::env::current_exe().unwrap();
        let p = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.join("daemon.log"))
            .unwrap();
        let child = Command::new(&me)
            .arg("serve")
            .arg("--state-dir")
            .arg(p.join("state"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--kernel")
            .arg(p.join("kernel"))
            .arg("--initrd")
            .arg(p.join("initrd"))
            .arg("--vmm-bin")
            .arg(&me)
            .arg("--stop-grace-secs")
            .arg("1")
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until("the daemon listens", || {
            UnixStream::connect(self.socket()).is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn nanoclaw(&self, args: &[&str]) -> Output {
        nanoclaw(&self.socket(), args)
    }

    fn inspect(&self, id: &str) -> VmInfo {
        let out = self.nanoclaw(&["inspect", id, "--json"]);
        assert!(out.status.success(), "inspect: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_status(&self, id: &str, f: impl Fn(&VmInfo) -> bool) -> VmInfo {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.inspect(id);
            if f(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "VM never got there: {info:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nanoclaw(socket: &Path, args: &[&str]) -> Output {
    Command::new(nanoclaw_cli())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let d = TestDaemon::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = d.second_daemon();
    assert!(!second.status.success());
    assert!(
        text(&second.stderr).contains("another daemon already uses the state directory"),
        "{}",
        text(&second.stderr)
    );

    let out = d.nanoclaw(&["run", "-e", "A=1", "--", "/bin/agent", "x", "y"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello x y A=1\n");
    assert_eq!(text(&out.stderr), "to stderr\n");

    let ps = d.nanoclaw(&["ps", "--json"]);
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

    let info = d.inspect(&vm.id);
    let vmm_exit = info.vmm_exit.clone().expect("vmm exit");
    assert_eq!(
        (vmm_exit.reason.as_str(), vmm_exit.exit_code),
        ("reset", Some(0))
    );
    assert!(Path::new(&info.vm_dir).join("vm.json").is_file());

    let table = d.nanoclaw(&["ps"]);
    let table = text(&table.stdout);
    assert!(
        table.contains(&vm.id) && table.contains("exited"),
        "{table}"
    );

    // The output is kept after the fact.
    let logs = d.nanoclaw(&["logs", &vm.id]);
    assert!(logs.status.success());
    assert_eq!(text(&logs.stdout), "hello x y A=1\n");
    assert_eq!(text(&logs.stderr), "to stderr\n");
    let console = d.nanoclaw(&["logs", "--console", &vm.id]);
    assert_eq!(text(&console.stdout), "fake console: booted\n");

    let rm = d.nanoclaw(&["rm", &vm.id]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(!Path::new(&info.vm_dir).exists());
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.nanoclaw(&["ps", "--json"]).stdout).unwrap();
    assert!(vms.is_empty());

    let missing = d.nanoclaw(&["inspect", "nosuchvm"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        text(&missing.stderr),
        "nanoclaw: error: no VM with id nosuchvm\n"
    );
}

fn a_garbage_guest_is_cut_off_and_logged_within_budget() {
    let d = TestDaemon::start_with(&["--log-json"]);
    let out = d.nanoclaw(&["run", "--", "garbage", "25"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello 25 \n");

    let ps = d.nanoclaw(&["ps", "--json"]);
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
fn start_waiting_run(d: &TestDaemon) -> (std::process::Child, std::process::ChildStdout) {
    let mut run = Command::new(nanoclaw_cli())
        .arg("--socket")
        .arg(d.socket())
        .args(["run", "--", "wait"])
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
    let mut d = TestDaemon::start();
    // A foreground `run` relays across the restart.
    let (run, mut stdout) = start_waiting_run(&d);
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.nanoclaw(&["ps", "--json"]).stdout).unwrap();
    let id = vms[0].id.clone();
    let before = d.wait_status(&id, |i| {
        i.status == VmStatus::Running && i.control_connected
    });

    d.kill();
    d.spawn();
    let after = d.wait_status(&id, |i| i.control_connected && i.control_reconnects == 1);
    assert_eq!(after.status, VmStatus::Running);
    assert_eq!(after.vmm_pid, before.vmm_pid);

    let stop = d.nanoclaw(&["stop", &id]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(text(&stop.stdout), format!("{id} stopped\n"));
    let info = d.inspect(&id);
    assert_eq!(info.status, VmStatus::Stopped);
    assert_eq!(info.agent_exit, Some(AgentExit::Signal(15)));
    // Output from before the restart is still there.
    let logs = d.nanoclaw(&["logs", &id]);
    assert_eq!(text(&logs.stdout), "waiting\n");

    // The foreground run saw the end, relayed nothing twice, and passed on 128 + SIGTERM.
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = run.wait_with_output().unwrap();
    assert_eq!(text(&rest), "");
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
}

fn a_restarted_daemon_reports_a_vanished_vmm_as_lost() {
    let mut d = TestDaemon::start();
    let out = d.nanoclaw(&["run", "-d", "--", "wait"]);
    let id = text(&out.stdout).trim().to_owned();
    let info = d.wait_status(&id, |i| i.status == VmStatus::Running);
    d.kill();
    let pid = info.vmm_pid.unwrap() as i32;
    signal(pid, Signal::SIGKILL);
    wait_until("the fake VMM is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    d.spawn();
    let info = d.inspect(&id);
    assert_eq!(info.status, VmStatus::Lost, "{info:?}\n{}", d.log());
    assert_eq!(info.vmm_exit, None);
    // A follower is not left hanging on a lost VM.
    let logs = d.nanoclaw(&["logs", "--follow", &id]);
    assert_eq!(text(&logs.stdout), "waiting\n");
}

fn stop_escalates_to_sigterm_and_ends_followers() {
    let d = TestDaemon::start();
    let out = d.nanoclaw(&["run", "-d", "--", "deaf"]);
    let id = text(&out.stdout).trim().to_owned();
    d.wait_status(&id, |i| i.status == VmStatus::Running);
    let follower = Command::new(nanoclaw_cli())
        .arg("--socket")
        .arg(d.socket())
        .args(["logs", "--follow", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let busy = d.nanoclaw(&["rm", &id]);
    assert_eq!(busy.status.code(), Some(1));
    assert_eq!(
        text(&busy.stderr),
        format!("nanoclaw: error: VM {id} is running; stop it first\n")
    );
    let started = Instant::now();
    let stop = d.nanoclaw(&["stop", &id]);
    assert_eq!(text(&stop.stdout), format!("{id} stopped\n"));
    // The sidecar ignored Shutdown: the VMM got SIGTERM after the 1 s grace.
    assert!(started.elapsed() >= Duration::from_secs(1));
    let info = d.inspect(&id);
    assert_eq!(info.status, VmStatus::Stopped);
    assert_eq!(info.agent_exit, None);
    assert_eq!(info.vmm_exit.map(|e| e.signal), Some(Some(15)));
    let followed = follower.wait_with_output().unwrap();
    assert!(followed.status.success());
    assert_eq!(text(&followed.stdout), "deaf\n");
}

fn ctrl_c_during_run_stops_the_vm() {
    let d = TestDaemon::start();
    // `_stdout` keeps the pipe open until the end, as a terminal would.
    let (run, _stdout) = start_waiting_run(&d);
    signal(run.id() as i32, Signal::SIGINT);
    let out = run.wait_with_output().unwrap();
    // The fake agent dies of SIGTERM when the VM shuts down: 128 + 15.
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    let vms: Vec<VmInfo> = serde_json::from_slice(&d.nanoclaw(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(vms[0].status, VmStatus::Stopped);
}

fn signal(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}
