//! Pausing and resuming a running agent (`nanoclaw pause|resume`): the vCPUs stop and go on,
//! the guest's clock keeps the host's time, and a paused VM still stops.

use std::time::{Duration, Instant};

use nanoclaw_tests::CLI_TIMEOUT;

use super::agent::{AGENT, daemon, detach, logs, nanoclaw, text};

/// The agent: counts once a second, with the guest's clock.
const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo \"count $i $(date +%s)\"; sleep 1; done";

/// The last `count N T` line of `log`: `(N, T)`.
fn last_count(log: &str) -> Option<(u64, u64)> {
    log.lines().rev().find_map(|l| {
        let mut f = l.strip_prefix("count ")?.split(' ');
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_paused_agent_stops_counting_and_goes_on_after_the_resume() {
    let d = daemon();
    let id = detach(&d, &["/bin/sh", "-c", COUNTER]);
    d.wait_for(&id, AGENT, "counting", |_| {
        last_count(&logs(&d, &id)).is_some_and(|(n, _)| n >= 3)
    })
    .expect("the agent counts");

    let out = nanoclaw(&d, &["pause", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{id} paused"));
    let paused_at = Instant::now();
    let info = d.inspect(&id).expect("inspect");
    assert_eq!(info["paused"], true, "{info}");
    let ps = text(&nanoclaw(&d, &["ps"], CLI_TIMEOUT).stdout);
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&id) && l.contains("paused")),
        "{ps}"
    );
    // Output already on its way may still land; after that, nothing moves.
    std::thread::sleep(Duration::from_secs(3));
    let (frozen, guest_before) = last_count(&logs(&d, &id)).expect("a count");
    std::thread::sleep(Duration::from_secs(8));
    let (still, _) = last_count(&logs(&d, &id)).expect("a count");
    assert_eq!(still, frozen, "a paused agent does not count");

    let out = nanoclaw(&d, &["resume", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let paused_for = paused_at.elapsed().as_secs();
    d.wait_for(&id, AGENT, "counting again", |_| {
        last_count(&logs(&d, &id)).is_some_and(|(n, _)| n >= frozen + 4)
    })
    .expect("the agent counts again after the resume");
    assert_eq!(d.inspect(&id).expect("inspect")["paused"], false);
    // The guest's clock kept the host's time across the pause: two consecutive counts are at
    // least the pause's length apart. (Not necessarily `frozen` and the next: the virtio
    // devices pause with the vCPUs, so a line the guest wrote just before the pause reaches
    // the host only after the resume.)
    let log = logs(&d, &id);
    let times: Vec<(u64, u64)> = log.lines().filter_map(last_count).collect();
    let gap = times
        .windows(2)
        .filter(|w| w[1].0 == w[0].0 + 1)
        .map(|w| w[1].1.saturating_sub(w[0].1))
        .max()
        .unwrap_or(0);
    assert!(
        gap + 2 >= paused_for,
        "the guest's clock skipped the pause: at most {gap} s between counts in the guest, {paused_for} s paused; {guest_before} was the guest's time at the last count seen paused"
    );

    // A paused VM still stops (the daemon lets it run again to shut down).
    let out = nanoclaw(&d, &["pause", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = nanoclaw(&d, &["stop", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = d
        .wait_for(&id, AGENT, "stopped", |i| i["status"] == "stopped")
        .expect("the paused VM stops");
    assert_eq!(info["paused"], false, "{info}");
    // Pausing an ended VM is a conflict, not a crash.
    let out = nanoclaw(&d, &["pause", &id], CLI_TIMEOUT);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("only a running VM"),
        "{}",
        text(&out.stderr)
    );
}
