//! Passkey approvals end to end: an agent in a microVM, loaded with the example worker profile,
//! calls the destructive `delete_file` twice through the sidecar's MCP endpoint. Each call waits
//! for the user: it is listed by `nanoclaw approvals --json` while the upstream has not been
//! called. A real browser (headless Chromium with a virtual authenticator, user verification on)
//! registers a passkey through the daemon's one-time link, approves the first request on its
//! approval page and denies the second with the page's Deny button. The first call runs, the
//! second reaches the agent as a denial; the daemon's audit log verifies and shows both
//! requests and outcomes without argument values; flipping one byte of the approval's record
//! makes `nanoclaw audit verify` fail at that record's line. One VM boot.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nanoclaw_tests::browser::{self, Cdp};
use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin, free_port, workspace_root};
use serde_json::{Value, json};

/// The agent: a busybox shell script that deletes two files through the MCP endpoint. (No
/// `wget -T`: the guest's busybox wget crashes with it; its default read timeout, 900 s, is
/// longer than the test waits for an answer.)
const AGENT: &str = r#"
H='Content-Type: application/json'
U=http://127.0.0.1:8931/mcp
INIT='{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"sh","version":"0"}}}'
wget -q -S -O /tmp/init.json --header "$H" --post-data "$INIT" $U 2>/tmp/headers || echo "INIT-FAILED"
SID=$(grep -i 'mcp-session-id' /tmp/headers | sed 's/.*: *//' | tr -d '\r ')
post() { wget -q -O - --header "$H" --header "Mcp-Session-Id: $SID" --post-data "$1" $U; echo; }
echo "FIRST $(post '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/data/first.txt"}}}')"
echo "SECOND $(post '{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_file","arguments":{"path":"/data/second.txt"}}}')"
echo "AGENT-DONE"
"#;

/// The approval page has loaded its request.
const APPROVE_READY: &str = "document.readyState === 'complete' && \
    document.getElementById('status').dataset.state === 'pending'";

/// Chromium and page loads under nested software emulation: minutes, not seconds.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(300);

/// The example worker profile, with its upstream started from the test venv's Python and its
/// calls recorded in `peer_log`.
fn worker_profile(peer_log: &std::path::Path) -> String {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("examples/profiles/worker.toml"))
        .expect("read examples/profiles/worker.toml");
    let python = std::env::var("NANOCLAW_MCP_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/nanoclaw/mcp-venv/bin/python3",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let original = r#"command = ["python3", "tests/peers/mcp_upstream.py"]"#;
    assert!(
        text.contains(original),
        "the worker profile's upstream line changed"
    );
    text.replace(
        original,
        &format!(
            "command = [\"{python}\", \"{}\"]\nenv = {{ NANOCLAW_PEER_LOG = \"{}\" }}",
            root.join("tests/peers/mcp_upstream.py").display(),
            peer_log.display()
        ),
    )
}

/// The tools the upstream has been called with so far, with their `path` arguments.
fn upstream_calls(peer_log: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(peer_log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("peer log line");
            (
                v["tool"].as_str().unwrap_or_default().to_owned(),
                v["args"]["path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The agent's run: the `nanoclaw run` child and where its output goes.
struct Agent {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Agent {
    fn output(&self) -> (String, String) {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        (read(&self.stdout), read(&self.stderr))
    }

    /// What a failure shows: the agent's output, the daemon's log and the audit log's tail.
    fn context(&self, d: &Daemon) -> String {
        let (stdout, stderr) = self.output();
        let audit = d.state_dir().join("audit.ndjson");
        let tail = d
            .nanoclaw(&[
                "audit",
                "tail",
                "-n",
                "40",
                "--file",
                &audit.to_string_lossy(),
            ])
            .output_within(CLI_TIMEOUT)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "agent stdout:\n{stdout}\nagent stderr:\n{stderr}\ndaemon:\n{}\naudit:\n{tail}",
            d.log()
        )
    }
}

/// Polls `nanoclaw approvals --json` until a `delete_file` request other than `seen` is pending.
/// Fails at once if the agent has exited meanwhile (its calls did not wait).
fn next_pending(
    d: &Daemon,
    agent: &mut Agent,
    seen: &[String],
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = d
            .nanoclaw(&["approvals", "--json"])
            .output_within(CLI_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "nanoclaw approvals: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pending: Vec<Value> = serde_json::from_slice(&out.stdout)?;
        if let Some(p) = pending.into_iter().find(|p| {
            p["request"]["action"]["tool"] == json!("delete_file")
                && !seen.iter().any(|s| p["request"]["id"] == json!(s))
        }) {
            return Ok(p);
        }
        if let Some(status) = agent.child.try_wait()? {
            bail!(
                "the agent exited ({status}) with no new delete_file request pending; {}",
                agent.context(d)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "no new pending delete_file request within {timeout:?}; {}",
            agent.context(d)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Opens a pending request's approval page and answers what `action` (a page function) said.
async fn decide(cdp: &mut Cdp, pending: &Value, action: &str) -> Result<Value> {
    let url = pending["url"].as_str().context("no approval url")?;
    cdp.open(url, APPROVE_READY, BROWSER_TIMEOUT).await?;
    let shown = cdp
        .eval("document.getElementById('arguments').textContent")
        .await?;
    ensure!(
        shown == pending["request"]["arguments"],
        "the page shows {shown}, the request holds {}",
        pending["request"]["arguments"]
    );
    cdp.eval(action).await
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_destructive_call_runs_only_after_a_passkey_approval_and_a_denied_one_never_runs() {
    let started = Instant::now();
    let bin = browser::chromium_bin();
    assert!(
        browser::chromium_available(&bin),
        "{bin} is missing: scripts/setup installs the chromium package"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Chromium starts slowly under emulation: start it while the daemon comes up.
    let launching = rt.spawn(async move { browser::launch(&bin, BROWSER_TIMEOUT).await });

    let image = GuestImage::from_env().expect("guest image");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start_with(
        &image.vmlinux,
        &image.initramfs,
        &["--approvals-listen", &listen],
    )
    .expect("start the daemon");
    let (_browser, mut cdp) = rt
        .block_on(launching)
        .expect("the launch task")
        .expect("launch chromium");
    println!(
        "chromium ready {:.1} s into the test",
        started.elapsed().as_secs_f64()
    );

    // 1. A passkey (user verification on), registered through the one-time link.
    let out = d
        .nanoclaw(&["approvals", "--register-link"])
        .output_within(CLI_TIMEOUT)
        .expect("nanoclaw approvals --register-link");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let link = text
        .lines()
        .find(|l| l.starts_with("http://"))
        .unwrap_or_else(|| panic!("no link in {text}"))
        .to_owned();
    let registered: Result<Value> = rt.block_on(async {
        cdp.add_virtual_authenticator(true).await?;
        cdp.open(
            &link,
            "document.readyState === 'complete' && typeof nanoclawRegister === 'function'",
            BROWSER_TIMEOUT,
        )
        .await?;
        cdp.eval("nanoclawRegister()").await
    });
    assert_eq!(registered.expect("register"), json!("registered"));

    // 2. The agent, with the worker profile, in the background.
    let dir = tempfile::tempdir().expect("tempdir");
    let peer_log = dir.path().join("peer.ndjson");
    let profile_path = dir.path().join("worker.toml");
    std::fs::write(&profile_path, worker_profile(&peer_log)).expect("write the profile");
    let profile_arg = profile_path.to_string_lossy().into_owned();
    let stdout_path = dir.path().join("agent.stdout");
    let stderr_path = dir.path().join("agent.stderr");
    let child = d
        .nanoclaw(&[
            "run",
            "--profile",
            &profile_arg,
            "--",
            "/bin/sh",
            "-c",
            AGENT,
        ])
        .stdout(std::fs::File::create(&stdout_path).expect("agent stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("agent stderr file"))
        .spawn()
        .expect("nanoclaw run");
    let mut agent = Agent {
        child,
        stdout: stdout_path,
        stderr: stderr_path,
    };

    // The first call waits for the user; the upstream has not been called.
    let first =
        next_pending(&d, &mut agent, &[], Duration::from_secs(600)).expect("the first request");
    println!(
        "first request pending {:.1} s into the test",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        first["request"]["arguments"],
        json!(r#"{"path":"/data/first.txt"}"#),
        "{first}"
    );
    assert_eq!(first["request"]["profile"], json!("worker"), "{first}");
    assert_eq!(
        first["request"]["reason"],
        json!("deletes a file"),
        "{first}"
    );
    assert!(
        upstream_calls(&peer_log).is_empty(),
        "the upstream ran before the approval"
    );
    let first_id = first["request"]["id"]
        .as_str()
        .expect("request id")
        .to_owned();

    // 3. Approve it with the passkey on its page.
    let approved = rt.block_on(decide(&mut cdp, &first, "nanoclawApprove()"));
    assert_eq!(approved.expect("approve"), json!("approved"));

    // The second call waits too; deny it with the page's Deny button.
    let second = next_pending(
        &d,
        &mut agent,
        std::slice::from_ref(&first_id),
        Duration::from_secs(240),
    )
    .expect("the second request");
    assert_eq!(
        second["request"]["arguments"],
        json!(r#"{"path":"/data/second.txt"}"#),
        "{second}"
    );
    assert_eq!(
        upstream_calls(&peer_log),
        [("delete_file".to_owned(), "/data/first.txt".to_owned())],
        "only the approved call ran"
    );
    let second_id = second["request"]["id"]
        .as_str()
        .expect("request id")
        .to_owned();
    let denied = rt.block_on(decide(&mut cdp, &second, "nanoclawDeny()"));
    assert_eq!(denied.expect("deny"), json!("denied"));

    // 4. The agent saw the first call's result and the second's denial. Past the agent's start
    // (up to minutes under emulation), each step takes seconds: 240 s bounds a stuck one.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = agent.child.try_wait().expect("wait for nanoclaw run") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.child.kill();
            panic!("the agent did not finish; {}", agent.context(&d));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let (stdout, _) = agent.output();
    let context = agent.context(&d);
    assert_eq!(status.code(), Some(0), "{context}");
    assert!(stdout.contains("AGENT-DONE"), "{context}");
    let line = |tag: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} line: {context}"))
            .to_owned()
    };
    let first_line = line("FIRST ");
    assert!(
        first_line.contains("\"result\"") && first_line.contains("deleted /data/first.txt"),
        "{context}"
    );
    let second_line = line("SECOND ");
    assert!(
        second_line.contains("\"error\"") && second_line.contains("denied by the user"),
        "{context}"
    );
    assert_eq!(
        upstream_calls(&peer_log),
        [("delete_file".to_owned(), "/data/first.txt".to_owned())],
        "the denied call never reached the upstream"
    );

    // The audit chain verifies and holds both requests and outcomes, and no argument values.
    d.kill().expect("stop the daemon");
    let audit = d.state_dir().join("audit.ndjson");
    let audit_arg = audit.to_string_lossy().into_owned();
    let out = d
        .nanoclaw(&["audit", "verify", "--file", &audit_arg])
        .output_within(CLI_TIMEOUT)
        .expect("nanoclaw audit verify");
    let verified = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && verified.starts_with("ok: "),
        "{verified}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d
        .nanoclaw(&["audit", "tail", "-n", "1000", "--file", &audit_arg])
        .output_within(CLI_TIMEOUT)
        .expect("nanoclaw audit tail");
    let tail = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{tail}");
    let kind_lines = |kind: &str, id: &str| {
        tail.lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(kind) && l.contains(id))
            .count()
    };
    for id in [&first_id, &second_id] {
        assert_eq!(kind_lines("approval_request", id), 1, "{id}: {tail}");
    }
    assert_eq!(kind_lines("approval", &first_id), 1, "{tail}");
    assert_eq!(kind_lines("denial", &second_id), 1, "{tail}");
    assert_eq!(kind_lines("denial", &first_id), 0, "{tail}");
    assert_eq!(kind_lines("approval", &second_id), 0, "{tail}");
    let outcomes: Vec<&str> = tail
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("approval_outcome"))
        .collect();
    assert_eq!(outcomes.len(), 2, "{tail}");
    assert!(
        outcomes[0].contains("approved") && outcomes[1].contains("denied"),
        "{tail}"
    );
    let file = std::fs::read_to_string(&audit).expect("read the audit log");
    for value in ["/data/first.txt", "/data/second.txt"] {
        assert!(
            !file.contains(value),
            "an argument value reached the audit log"
        );
    }

    // Flip one byte of the approval's record: verify fails at that line.
    let (line_no, tampered) = tamper_with_approval(&file, &first_id).expect("tamper");
    std::fs::write(&audit, tampered).expect("write the tampered log");
    let out = d
        .nanoclaw(&["audit", "verify", "--file", &audit_arg])
        .output_within(CLI_TIMEOUT)
        .expect("nanoclaw audit verify");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a tampered log verified: {stderr}");
    assert!(
        stderr.contains(&format!("broken at line {line_no} ")) && stderr.contains("hash"),
        "{stderr}"
    );
    println!(
        "approval e2e: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}

/// Flips one digit of the `counter` in the `approval` record of `id`; answers that record's
/// line number (from 1) and the changed log. The line stays valid JSON, so only the hash chain
/// can notice.
fn tamper_with_approval(file: &str, id: &str) -> Result<(usize, String)> {
    let mut lines: Vec<String> = file.lines().map(str::to_owned).collect();
    let Some(index) = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"approval\"") && l.contains(id))
    else {
        bail!("no approval record of {id}");
    };
    let line = &mut lines[index];
    let at = line.find("\"counter\":").context("no counter")? + "\"counter\":".len();
    let digit = line.as_bytes()[at];
    ensure!(digit.is_ascii_digit(), "counter is not a number: {line}");
    let flipped = if digit == b'9' { b'8' } else { digit + 1 };
    line.replace_range(at..=at, &char::from(flipped).to_string());
    let mut out = lines.join("\n");
    out.push('\n');
    Ok((index + 1, out))
}
