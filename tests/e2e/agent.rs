//! `nanoclaw run` end to end: the daemon, the CLI, our VMM and the sidecar as PID 1.

use std::process::Output;
use std::time::Duration;

use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin, RUN_TIMEOUT, workspace_root};

pub(crate) const AGENT: Duration = Duration::from_secs(240);
/// The garbage guest's 60 connections: ten of them send a truncated frame and wait out the
/// host's 10 s hello timeout, so about 100 s of the run is waiting even on a fast machine.
const GARBAGE_RUN: Duration = Duration::from_secs(600);

pub(crate) fn daemon() -> Daemon {
    let image = GuestImage::from_env().expect("guest image");
    Daemon::start(&image.vmlinux, &image.initramfs).expect("start the daemon")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_ok(out: &Output) -> (String, String) {
    (text(&out.stdout), text(&out.stderr))
}

/// `nanoclaw ARGS`, waited for up to `timeout`; a failure to finish shows [`Daemon::records`].
pub(crate) fn nanoclaw(d: &Daemon, args: &[&str], timeout: Duration) -> Output {
    d.nanoclaw(args)
        .output_within(timeout)
        .unwrap_or_else(|e| panic!("nanoclaw {args:?}: {e:#}\n{}", d.records()))
}

pub(crate) fn detach(d: &Daemon, cmd: &[&str]) -> String {
    detach_with(d, &[], cmd)
}

/// Runs `cmd` detached in image `image`, on a 64 MiB writable disk; answers the VM's id.
pub(crate) fn detach_in_image(d: &Daemon, image: &str, cmd: &[&str]) -> String {
    detach_with(d, &["--image", image, "--disk-size", "64M"], cmd)
}

/// `nanoclaw run --detach RUN_ARGS -- CMD`; answers the VM's id.
fn detach_with(d: &Daemon, run_args: &[&str], cmd: &[&str]) -> String {
    let mut args = vec!["run", "--detach"];
    args.extend_from_slice(run_args);
    args.push("--");
    args.extend_from_slice(cmd);
    let out = nanoclaw(d, &args, RUN_TIMEOUT);
    assert!(out.status.success(), "run: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "id {id:?}"
    );
    id
}

pub(crate) fn logs(d: &Daemon, id: &str) -> String {
    let out = nanoclaw(d, &["logs", id], CLI_TIMEOUT);
    text(&out.stdout)
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn run_prints_the_output_and_exits_with_the_agent_code() {
    let d = daemon();
    let out = nanoclaw(
        &d,
        &[
            "run",
            "--",
            "/bin/sh",
            "-c",
            "echo hi; echo oops >&2; exit 3",
        ],
        RUN_TIMEOUT,
    );
    let (stdout, stderr) = run_ok(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert_eq!(stdout, "hi\n");
    assert!(stderr.contains("oops"), "{stderr:?}");
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn two_agents_do_not_see_each_others_files_or_processes() {
    let d = daemon();
    // A leaves a file and a distinctive process behind and keeps running.
    let a = detach(
        &d,
        &[
            "/bin/sh",
            "-c",
            "echo a > /tmp/left-by-a; echo a-ready; exec sleep 4242",
        ],
    );
    d.wait_for(&a, AGENT, "running with output", |_| {
        logs(&d, &a).contains("a-ready")
    })
    .expect("agent A runs");
    // B runs while A does, and looks for both.
    let out = nanoclaw(
        &d,
        &["run", "--", "/bin/sh", "-c", "ls -a /tmp; ps; echo b-done"],
        RUN_TIMEOUT,
    );
    let (stdout, stderr) = run_ok(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {stderr}\n{}",
        d.records()
    );
    assert!(stdout.contains("b-done"), "{stdout}");
    assert!(
        stdout.contains(" ps"),
        "B's own ps sees B's processes: {stdout}"
    );
    assert!(!stdout.contains("left-by-a"), "B sees A's file: {stdout}");
    assert!(!stdout.contains("4242"), "B sees A's process: {stdout}");
    let info = d.inspect(&a).expect("inspect A");
    assert_eq!(
        info["status"], "running",
        "A still runs while B ran: {info}"
    );
    let stop = nanoclaw(&d, &["stop", &a], CLI_TIMEOUT);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    d.wait_for(&a, AGENT, "stopped", |i| i["status"] == "stopped")
        .expect("A stops");
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_daemon_restart_keeps_the_running_vm() {
    let mut d = daemon();
    let id = detach(
        &d,
        &["/bin/sh", "-c", "echo before; sleep 15; echo after; exit 5"],
    );
    d.wait_for(&id, AGENT, "running with output", |_| {
        logs(&d, &id).contains("before")
    })
    .expect("agent runs");
    let vmms = d.vmm_processes();
    assert_eq!(vmms.len(), 1, "one VMM: {vmms:?}");

    d.kill().expect("kill the daemon");
    assert_eq!(d.vmm_processes(), vmms, "the VMM outlives the daemon");
    d.spawn().expect("restart the daemon");

    let info = d
        .wait_for(&id, AGENT, "exited", |i| i["status"] == "exited")
        .expect("the re-attached VM finishes");
    assert_eq!(info["agent_exit"]["exit"], 5, "{info}");
    assert!(info["control_reconnects"].as_u64() >= Some(1), "{info}");
    let output = logs(&d, &id);
    assert!(
        output.contains("before") && output.contains("after"),
        "no output lost across the restart: {output:?}"
    );
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_guest_sending_garbage_is_cut_off_and_the_daemon_stays_healthy() {
    let image = GuestImage::from_env().expect("guest image");
    let garbage_initrd = workspace_root().join("target/guest-image-garbage/initramfs.cpio.gz");
    let mut d = Daemon::start(&image.vmlinux, &garbage_initrd).expect("start the daemon");
    let id = detach(&d, &["/bin/true"]);
    let info = d
        .wait_for(&id, GARBAGE_RUN, "ended", |i| {
            matches!(
                i["status"].as_str(),
                Some("failed" | "exited" | "stopped" | "lost")
            )
        })
        .expect("the garbage guest's VM ends");
    let errors = info["guest_protocol_errors"].as_u64().unwrap_or(0);
    assert!(errors >= 60, "every garbage connection is counted: {info}");
    // The VMM's own counters reach `inspect` through its exit record.
    let opened = info["vmm_exit"]["vsock"]["conns_opened"].as_u64();
    assert!(
        opened >= Some(60),
        "the VMM counted every connection: {info}"
    );

    let console = nanoclaw(&d, &["logs", &id, "--console"], CLI_TIMEOUT);
    let console = text(&console.stdout);
    assert!(
        console.contains("done: 60 of 60 connections closed by the host"),
        "the host closed every garbage connection:\n{console}"
    );
    let log = d.log();
    let warned = log.matches("guest protocol error").count();
    assert!(warned >= 1, "the error is logged:\n{log}");
    assert!(
        warned < 60,
        "the log is rate-limited ({warned} lines):\n{log}"
    );
    assert!(d.is_running(), "the daemon survives");
    let ps = nanoclaw(&d, &["ps"], CLI_TIMEOUT);
    assert!(ps.status.success(), "the daemon still answers");
}
