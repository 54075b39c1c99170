//! Snapshot, restore and fork of a running agent (`nanoclaw snapshot`, `restore`, `fork`): a
//! real guest is saved whole (vCPUs, memory, virtio devices), its VM stopped, and a new VMM
//! process restores it; the agent counts on from where it was, through a sidecar that
//! reconnected after the vsock transport reset with a new identity. Then three copies are
//! forked from it, and each draws its own values from `/dev/urandom`.

use nanoclaw_tests::CLI_TIMEOUT;

use super::agent::{AGENT, daemon, detach, logs, nanoclaw, text};

/// The agent: counts once a second, with 8 bytes drawn from `/dev/urandom` on each line
/// (hashed to hex, with what the busybox guest has).
const COUNTER: &str = "i=0; while true; do i=$((i+1)); \
     echo \"count $i $(head -c 16 /dev/urandom | sha256sum | head -c 16)\"; sleep 1; done";

/// Every `count N RANDOM` in `log`, in order.
fn lines(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("count ")?.split_whitespace();
            let n = words.next()?.parse().ok()?;
            Some((n, words.next().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// Every `count N` in `log`, in order.
fn counts(log: &str) -> Vec<u64> {
    lines(log).into_iter().map(|(n, _)| n).collect()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_restored_agent_counts_on_from_where_its_snapshot_was_taken() {
    let d = daemon();
    let id = detach(&d, &["/bin/sh", "-c", COUNTER]);
    d.wait_for(&id, AGENT, "counting", |_| {
        counts(&logs(&d, &id)).last().is_some_and(|&n| n >= 3)
    })
    .expect("the agent counts");

    // The snapshot pauses the running VM around itself, then lets it go on.
    let out = nanoclaw(&d, &["snapshot", &id, "counter"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "counter");
    let at_snapshot = *counts(&logs(&d, &id)).last().expect("a count");
    d.wait_for(&id, AGENT, "counting after the snapshot", |_| {
        counts(&logs(&d, &id))
            .last()
            .is_some_and(|&n| n >= at_snapshot + 2)
    })
    .expect("the source VM counts on after its snapshot");
    let listed = text(&nanoclaw(&d, &["snapshot", "ls", "--json"], CLI_TIMEOUT).stdout);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("snapshot ls --json");
    let snap = &listed[0];
    assert_eq!(snap["name"], "counter", "{listed}");
    assert_eq!(snap["source_vm"], id.as_str(), "{listed}");
    // Sparse: a 256 MiB guest running busybox touched far less.
    let data = snap["memory_data_bytes"]
        .as_u64()
        .expect("memory_data_bytes");
    assert!(
        data < snap["memory_bytes"].as_u64().unwrap_or(0),
        "{listed}"
    );

    // One copy at a time: the source ends before its snapshot comes back.
    let out = nanoclaw(&d, &["stop", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    d.wait_for(&id, AGENT, "stopped", |i| i["status"] == "stopped")
        .expect("the source stops");

    let restore_started = std::time::Instant::now();
    let out = nanoclaw(&d, &["restore", "counter", "-d"], CLI_TIMEOUT);
    let restore_answered = restore_started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restored = text(&out.stdout).trim().to_owned();
    assert!(
        !restored.is_empty() && restored != id,
        "new id: {restored:?}"
    );
    // The agent was not started again: its counts go on from the snapshot's, not from 1.
    d.wait_for(&restored, AGENT, "the restored agent counting", |_| {
        let c = counts(&logs(&d, &restored));
        c.len() >= 3
    })
    .expect("the restored agent counts");
    let c = counts(&logs(&d, &restored));
    let first = c[0];
    // The copy may first deliver a few lines the source had queued, and delivered itself,
    // before the snapshot: its own log starts a little before `at_snapshot`, never at 1.
    assert!(
        first > 1 && first + 5 >= at_snapshot,
        "the restored agent started over: counts {c:?}, snapshot at {at_snapshot}"
    );
    assert!(
        c.windows(2).all(|w| w[1] == w[0] + 1),
        "the restored agent's counts are not consecutive: {c:?}"
    );
    let info = d.inspect(&restored).expect("inspect");
    assert_eq!(info["restored_from"], "counter", "{info}");
    // The restored guest was admitted only with a new identity.
    assert_eq!(
        info["reidentify_pending"],
        serde_json::Value::Null,
        "{info}"
    );
    let source_boot = d.inspect(&id).expect("inspect")["boot_id"].clone();
    assert!(
        info["boot_id"].is_string() && info["boot_id"] != source_boot,
        "the restored guest kept its snapshot's boot id: {info}"
    );
    eprintln!(
        "snapshot e2e: the snapshot was taken at count {at_snapshot} ({} of {} MiB of memory \
         written); the restore answered in {:.1} s and the restored agent counted on from {first}",
        data >> 20,
        snap["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        restore_answered.as_secs_f64()
    );

    damaged_copies_are_refused(&d, "counter");
    let out = nanoclaw(&d, &["snapshot", "rm", "counter"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Fork: three copies of the running agent. Each reseeds its kernel from the host's bytes
    // before its processes go on, so the values they draw after the fork all differ.
    let out = nanoclaw(&d, &["fork", &restored, "-n", "3"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copies: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(copies.len(), 3, "{copies:?}");
    let mut drawn = Vec::new();
    let mut boots = vec![info["boot_id"].to_string()];
    for copy in &copies {
        d.wait_for(copy, AGENT, "the copy counting", |_| {
            lines(&logs(&d, copy)).len() >= 3
        })
        .expect("the copy counts");
        let got = lines(&logs(&d, copy));
        // The first line may have drawn its value before the freeze: take the second, drawn
        // after the copy's reseed.
        drawn.push(got[1].1.clone());
        let info = d.inspect(copy).expect("inspect");
        boots.push(info["boot_id"].to_string());
    }
    eprintln!("fork e2e: the copies drew {drawn:?} after the fork");
    let mut distinct = drawn.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "copies drew the same values from /dev/urandom: {drawn:?}"
    );
    assert!(drawn.iter().all(|v| v.len() == 16), "{drawn:?}");
    boots.sort();
    boots.dedup();
    assert_eq!(boots.len(), 4, "copies share a boot id: {boots:?}");
    // The source counts on after the fork (it was thawed).
    let before = *counts(&logs(&d, &restored)).last().expect("a count");
    d.wait_for(
        &restored,
        AGENT,
        "the source counting after the fork",
        |_| {
            counts(&logs(&d, &restored))
                .last()
                .is_some_and(|&n| n >= before + 2)
        },
    )
    .expect("the source goes on after the fork");

    for vm in copies.iter().chain([&restored]) {
        let out = nanoclaw(&d, &["stop", vm], CLI_TIMEOUT);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// Three damaged copies of snapshot `name`, made in the daemon's store, are refused with clear
/// errors, and no VM is left listed or on disk: a truncated memory file and a state file with
/// one byte of its body changed (refused by the real VMM, in its own words), and a state file
/// of another format version (refused by the daemon before any VMM starts).
fn damaged_copies_are_refused(d: &nanoclaw_tests::Daemon, name: &str) {
    let store = d.state_dir().join("snapshots");
    for copy in ["truncated", "tampered", "future"] {
        let out = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(store.join(name))
            .arg(store.join(copy))
            .output()
            .expect("cp");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(store.join("truncated/memory.bin"))
        .expect("the memory file");
    let len = memory.metadata().expect("metadata").len();
    memory.set_len(len / 2).expect("truncate");
    let state = store.join("tampered/state.bin");
    let mut bytes = std::fs::read(&state).expect("the state file");
    let at = bytes.len() - 7;
    bytes[at] ^= 0x40;
    std::fs::write(&state, bytes).expect("write the state file");
    // The header: 8 bytes of magic, then the format version (little-endian u32).
    let state = store.join("future/state.bin");
    let mut bytes = std::fs::read(&state).expect("the state file");
    bytes[8..12].copy_from_slice(&999u32.to_le_bytes());
    std::fs::write(&state, bytes).expect("write the state file");

    let vms = || std::fs::read_dir(d.state_dir().join("vms")).map_or(0, |r| r.count());
    let listed = || {
        let out = text(&nanoclaw(d, &["ps", "--json"], CLI_TIMEOUT).stdout);
        let vms: Vec<serde_json::Value> = serde_json::from_str(&out).expect("ps --json");
        let mut ids: Vec<String> = vms.iter().map(|v| v["id"].to_string()).collect();
        ids.sort();
        ids
    };
    let (vms_before, listed_before) = (vms(), listed());
    for (copy, expected) in [
        ("truncated", "snapshot memory file is truncated"),
        (
            "tampered",
            "snapshot state checksum mismatch: the state file is damaged",
        ),
        ("future", "is of format version 999"),
    ] {
        let out = nanoclaw(d, &["restore", copy, "-d"], CLI_TIMEOUT);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "restoring {copy} succeeded");
        assert!(err.contains(expected), "restoring {copy}: {err}");
        let out = nanoclaw(d, &["snapshot", "rm", copy], CLI_TIMEOUT);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(vms(), vms_before, "a refused restore left a VM folder");
    assert_eq!(
        listed(),
        listed_before,
        "a refused restore left a VM listed"
    );
}

/// The agent: opens an MCP session through the sidecar's endpoint, then calls `read_file` in
/// it every two seconds, printing `MCP-OK` or `MCP-FAIL` for each answer.
const MCP_CALLER: &str = r#"
H='Content-Type: application/json'
U=http://127.0.0.1:8931/mcp
INIT='{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"sh","version":"0"}}}'
until wget -q -S -O /tmp/init.json --header "$H" --post-data "$INIT" $U 2>/tmp/headers; do sleep 1; done
SID=$(grep -i 'mcp-session-id' /tmp/headers | sed 's/.*: *//' | tr -d '\r ')
wget -q -O /dev/null --header "$H" --header "Mcp-Session-Id: $SID" --post-data '{"jsonrpc":"2.0","method":"notifications/initialized"}' $U
i=0
while true; do
  i=$((i+1))
  if wget -q -O /tmp/r --header "$H" --header "Mcp-Session-Id: $SID" --post-data "{\"jsonrpc\":\"2.0\",\"id\":$i,\"method\":\"tools/call\",\"params\":{\"name\":\"read_file\",\"arguments\":{\"path\":\"/data/r.txt\"}}}" $U \
     && grep -q '"result"' /tmp/r; then echo "MCP-OK $i"; else echo "MCP-FAIL $i"; fi
  sleep 2
done
"#;

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn an_open_mcp_session_goes_on_after_a_restore() {
    let d = daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let python = std::env::var("NANOCLAW_MCP_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/nanoclaw/mcp-venv/bin/python3",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let peer_log = dir.path().join("peer.ndjson");
    let profile = [
        nanoclaw_tests::profiles::header(
            "e2e-restore",
            "worker",
            "enforce",
            std::path::Path::new(&python),
            &peer_log,
        ),
        nanoclaw_tests::profiles::read_file("/data/"),
    ]
    .concat();
    let profile_path = dir.path().join("profile.toml");
    std::fs::write(&profile_path, profile).expect("write the profile");
    let profile_arg = profile_path.to_string_lossy().into_owned();
    let out = nanoclaw(
        &d,
        &[
            "run",
            "-d",
            "--profile",
            &profile_arg,
            "--",
            "/bin/sh",
            "-c",
            MCP_CALLER,
        ],
        CLI_TIMEOUT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let oks = |vm: &str| -> Vec<String> {
        logs(&d, vm)
            .lines()
            .filter(|l| l.starts_with("MCP-"))
            .map(str::to_owned)
            .collect()
    };
    d.wait_for(&id, AGENT, "calling tools", |_| {
        oks(&id).iter().any(|l| l.starts_with("MCP-OK"))
    })
    .expect("the agent's MCP session works");
    let out = nanoclaw(&d, &["snapshot", &id, "mcp"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = nanoclaw(&d, &["stop", &id], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = nanoclaw(&d, &["restore", "mcp", "-d"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restored = text(&out.stdout).trim().to_owned();
    // The call in flight at the snapshot may fail; the session's next ones go through the new
    // VM's own gateway.
    d.wait_for(&restored, AGENT, "calling tools after the restore", |_| {
        oks(&restored)
            .iter()
            .filter(|l| l.starts_with("MCP-OK"))
            .count()
            >= 2
    })
    .unwrap_or_else(|e| panic!("{e:#}\nrestored: {:?}", oks(&restored)));
    let lines = oks(&restored);
    eprintln!("mcp restore e2e: the restored agent's calls in the same session: {lines:?}");
    assert!(
        lines.iter().filter(|l| l.starts_with("MCP-FAIL")).count() <= 1,
        "{lines:?}"
    );
    let out = nanoclaw(&d, &["stop", &restored], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = nanoclaw(&d, &["snapshot", "rm", "mcp"], CLI_TIMEOUT);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
