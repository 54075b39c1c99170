//! The real agent end to end: the demo's inside (`scripts/demo_agent.py`) runs the Python agent
//! of `examples/agents/python` (the official `openai` and `mcp` SDKs) in its Debian image in a
//! microVM, with the API key in the device's vault only, and this test checks every record it
//! left: the LLM server got the real key on every call and saw the card number only as a
//! surrogate, the MCP upstream got the real values back, the delete waited for an approval that
//! never came and was denied, the audit chain verifies, and the key's bytes are nowhere in the
//! daemon's memory, log or state (the VM's writable disk included).
//!
//! The image (`agent-python`) is built before L1 by `scripts/agent-image` into the store named
//! by `NANOCLAW_E2E_IMAGE_STORE` (scripts/e2e sets it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nanoclaw_tests::{OutputWithin, host_agent_bin, workspace_root};
use serde_json::Value;

/// Boot, Python start-up and four model turns under nested virtualization, plus the approval
/// wait.
const DEMO: Duration = Duration::from_secs(1200);

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn a_python_agent_in_a_debian_image_completes_its_conversation_along_the_whole_path() {
    let store = PathBuf::from(
        std::env::var_os("NANOCLAW_E2E_IMAGE_STORE")
            .expect("NANOCLAW_E2E_IMAGE_STORE (scripts/e2e builds the agent image there)"),
    );
    let manifest = std::env::var_os("NANOCLAW_GUEST_MANIFEST").expect("NANOCLAW_GUEST_MANIFEST");
    let work = tempfile::Builder::new()
        .prefix("ncdemo-")
        .tempdir()
        .unwrap();
    let w = work.path();
    let bin_dir = host_agent_bin().parent().unwrap().to_owned();
    let out = Command::new("python3")
        .arg(workspace_root().join("scripts/demo_agent.py"))
        .arg("--work")
        .arg(w)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--guest-manifest")
        .arg(&manifest)
        .arg("--image-store")
        .arg(&store)
        .output_within(DEMO)
        .expect("scripts/demo_agent.py");
    let read = |name: &str| std::fs::read_to_string(w.join(name)).unwrap_or_default();
    let context = || {
        let mut vms = String::new();
        for dir in std::fs::read_dir(w.join("state/vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in ["vmm/console.log", "vmm.log"] {
                vms += &format!(
                    "\n{} {f}:\n{}",
                    dir.path().display(),
                    std::fs::read_to_string(dir.path().join(f)).unwrap_or_default()
                );
            }
        }
        format!(
            "demo stdout:\n{}\ndemo stderr:\n{}\ndaemon log:\n{}\ndevice log:\n{}\nllm server log:\n{}{vms}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            read("daemon.log"),
            read("device.log"),
            read("llm-server.log"),
        )
    };
    assert_eq!(
        read("agent.exit").trim(),
        "0",
        "the agent failed\n{}",
        context()
    );
    assert!(
        read("agent.out").contains("final answer"),
        "no final answer\n{}",
        context()
    );

    // The LLM server: every call carried the real key (the agent only ever had a placeholder),
    // every scripted expectation held, and no message held the real card or email.
    let requests = lines(&w.join("llm-record.jsonl"));
    assert!(
        requests.len() >= 4,
        "{} LLM calls\n{}",
        requests.len(),
        context()
    );
    for r in &requests {
        assert_eq!(r["key_matched"], Value::Bool(true), "{r}");
        let failures = r.get("expectation_failures");
        assert!(
            failures.is_none_or(|f| f.as_array().is_some_and(Vec::is_empty) || f.is_null()),
            "a scripted expectation failed: {r}"
        );
    }
    let seen = serde_json::to_string(&requests).unwrap();
    assert!(
        !seen.contains("4111 1111 1111 1111"),
        "the model saw the real card"
    );
    assert!(
        !seen.contains("alice.smith@example.com"),
        "the model saw the real email"
    );

    // The MCP upstream: the read and the write ran, the write got the real email back, the
    // delete never reached it.
    let calls = lines(&w.join("upstream.ndjson"));
    let tools: Vec<&str> = calls.iter().filter_map(|c| c["tool"].as_str()).collect();
    assert!(tools.contains(&"read_file"), "{tools:?}");
    assert!(!tools.contains(&"delete_file"), "{tools:?}");
    let write = calls
        .iter()
        .find(|c| c["tool"] == "write_file")
        .unwrap_or_else(|| panic!("no write_file: {calls:?}\n{}", context()));
    assert!(
        write["args"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("alice.smith@example.com")),
        "the upstream got the real email back: {write}"
    );

    // The delete waited for the user's passkey and was denied when nobody answered.
    let audit = read("state/audit.ndjson");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("approval_outcome") && l.contains("expired")),
        "no expired approval in the audit log:\n{audit}"
    );
    let verify = Command::new(host_agent_bin().with_file_name("nanoclaw"))
        .args(["audit", "verify", "--file"])
        .arg(w.join("state/audit.ndjson"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The key's bytes: nowhere on the host side.
    let scan: Value = serde_json::from_str(&read("key-scan.json")).expect("key-scan.json");
    assert_eq!(scan["daemon_memory"], Value::Bool(false), "{scan}");
    assert_eq!(scan["daemon_log"], Value::Bool(false), "{scan}");
    assert_eq!(
        scan["state_files_holding_it"],
        serde_json::json!([]),
        "{scan}"
    );
    assert!(
        scan["state_files_scanned"].as_u64().unwrap_or(0) > 3,
        "the scan saw the state: {scan}"
    );
    // The guest's writable disk was among the files scanned.
    assert!(
        std::fs::read_dir(w.join("state/vms"))
            .unwrap()
            .flatten()
            .any(|d| d.path().join("scratch.ext4").is_file()),
        "the VM's writable disk is in its state folder"
    );
}
