//! MCP end to end: an agent in a microVM lists and calls tools through the sidecar's local
//! endpoint (streamable HTTP on 127.0.0.1 in the guest, with busybox `wget`, and the
//! `mcp-stdio` shim); the host's gateway checks each call against the profile and calls the
//! Python upstream (the official `mcp` SDK) running beside the daemon. The tool returns a card
//! number and an email: the agent sees only surrogates, passes the email's surrogate back, and
//! the upstream receives the real value. The agent's profile is orchestrator-tier: it also
//! spawns a worker with a narrower profile through the host's `spawn_agent`, which the daemon
//! creates as a second VM. Two VM boots.

use std::time::Duration;

use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin, RUN_TIMEOUT, profiles};

const CARD: &str = "4111 1111 1111 1111";
const EMAIL: &str = "alice.smith@example.com";

/// The agent: a busybox shell script.
const AGENT: &str = r#"
H='Content-Type: application/json'
U=http://127.0.0.1:8931/mcp
INIT='{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"sh","version":"0"}}}'
wget -q -S -O /tmp/init.json --header "$H" --post-data "$INIT" $U 2>/tmp/headers || echo "INIT-FAILED"
SID=$(grep -i 'mcp-session-id' /tmp/headers | sed 's/.*: *//' | tr -d '\r ')
post() { wget -q -O - --header "$H" --header "Mcp-Session-Id: $SID" --post-data "$1" $U; echo; }
echo "LIST $(post '{"jsonrpc":"2.0","id":1,"method":"tools/list"}')"
post '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/data/r.txt"}}}' > /tmp/read
echo "READ $(cat /tmp/read)"
echo "DENY $(post '{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/shadow"}}}')"
echo "HIDDEN $(post '{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"exec_shell","arguments":{"command":"id"}}}')"
MAIL=$(grep -o 'customer [^ ]*' /tmp/read | head -n 1 | cut -d' ' -f2)
CALL="{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"write_file\",\"arguments\":{\"path\":\"/data/out.txt\",\"content\":\"$MAIL\"}}}"
printf '%s\n%s\n' "$INIT" "$CALL" | /init mcp-stdio | sed 's/^/STDIO /'
echo "SPAWN $(post "$SPAWN")"
# A spawned worker stops with its parent: stay up while the child boots and runs.
sleep 60
echo "AGENT-DONE"
"#;

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn an_agent_calls_tools_through_the_sidecar_and_sees_only_surrogates() {
    let image = GuestImage::from_env().expect("guest image");
    let d = Daemon::start(&image.vmlinux, &image.initramfs).expect("start the daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let peer_log = dir.path().join("peer.ndjson");
    let python = std::env::var("NANOCLAW_MCP_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/nanoclaw/mcp-venv/bin/python3",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let python = std::path::PathBuf::from(python);
    let profile = [
        profiles::header("e2e-worker", "orchestrator", "enforce", &python, &peer_log),
        profiles::read_file("/data/"),
        profiles::write_file("/data/"),
    ]
    .concat();
    // The child: the same server, one tool, a narrower prefix (within the parent's rights).
    let child = [
        profiles::header("e2e-child", "worker", "enforce", &python, &peer_log),
        profiles::read_file("/data/sub/"),
    ]
    .concat();
    let spawn = serde_json::json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "spawn_agent", "arguments": {"profile": child,
            "command": ["/bin/sh", "-c", "echo child-ran"]}}})
    .to_string();
    assert!(
        !spawn.contains('\''),
        "the spawn request must fit in single quotes"
    );
    let agent = format!("SPAWN='{spawn}'\n{AGENT}");
    let profile_path = dir.path().join("profile.toml");
    std::fs::write(&profile_path, profile).expect("write the profile");
    let profile_arg = profile_path.to_string_lossy().into_owned();
    let out = d
        .nanoclaw(&[
            "run",
            "--profile",
            &profile_arg,
            "--",
            "/bin/sh",
            "-c",
            &agent,
        ])
        .output_within(RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("nanoclaw run: {e:#}\n{}", d.records()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\ndaemon:\n{}", d.log());
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(stdout.contains("AGENT-DONE"), "{context}");
    let line = |tag: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} line: {context}"))
            .to_owned()
    };
    let list = line("LIST ");
    assert!(
        list.contains("\"read_file\"") && list.contains("\"write_file\""),
        "{list}"
    );
    assert!(!list.contains("exec_shell"), "{list}");
    let read = line("READ ");
    assert!(read.contains("customer "), "{read}");
    assert!(
        !read.contains(CARD) && !read.contains(EMAIL),
        "the agent saw a real value: {read}"
    );
    assert!(line("DENY ").contains("path.prefix"), "{context}");
    assert!(line("HIDDEN ").contains("default-deny"), "{context}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("STDIO ") && l.contains("\"id\":1") && l.contains("result")),
        "{context}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let calls = std::fs::read_to_string(&peer_log).unwrap_or_default();
    let calls: Vec<serde_json::Value> = calls
        .lines()
        .map(|l| serde_json::from_str(l).expect("peer log line"))
        .collect();
    let tools: Vec<&str> = calls.iter().filter_map(|c| c["tool"].as_str()).collect();
    assert_eq!(tools, ["read_file", "write_file"], "{context}");
    assert_eq!(
        calls[1]["args"]["content"], EMAIL,
        "the upstream got the real value"
    );

    // The spawned worker ran in its own VM, created by the daemon, while its parent was still
    // up (a child stops with its parent unless the user detached it).
    let spawn = line("SPAWN ");
    let child_id = spawn
        .split("spawned agent in VM ")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no VM id in {spawn}: {context}"))
        .to_owned();
    let info = d
        .wait_for(
            &child_id,
            Duration::from_secs(240),
            "the child's exit",
            |i| {
                ["exited", "stopped", "failed", "lost"]
                    .contains(&i["status"].as_str().unwrap_or(""))
            },
        )
        .expect("the spawned VM ends");
    assert!(info["spec"]["profile"].is_string(), "{info}");
    let logs = d
        .nanoclaw(&["logs", &child_id])
        .output_within(CLI_TIMEOUT)
        .expect("nanoclaw logs");
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.contains("child-ran"),
        "child logs: {logs} {info}\n{}",
        d.records()
    );
}
