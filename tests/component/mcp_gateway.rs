//! Component tests of the MCP gateway with real peers: the official Python `mcp` SDK as the
//! upstream server (`tests/peers/mcp_upstream.py`, stdio and streamable HTTP) and as the client
//! standing in for the agent (`tests/peers/mcp_agent.py`), plus raw JSON-RPC over the gateway's
//! Unix socket for the escalation suite (what a guest that skips the sidecar can send).
//!
//! The Python SDK comes from the venv `scripts/setup --test` installs
//! (`~/.cache/nanoclaw/mcp-venv`, or `NANOCLAW_MCP_PYTHON`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_agent::approval::{ApprovalOutcome, ApprovalSubject, Approver, DenyAll};
use host_agent::mcp::{DENIED, Gateway, GatewayConfig, MAX_ARGUMENT_BYTES, SpawnError, Spawner};
use host_agent::policy::{AccessPolicy, Profile};
use nanoclaw_audit::AuditLog;
use nanoclaw_tests::free_port;
use nanoclaw_tests::peers::{mcp_python as python, peer};
use nanoclaw_tests::profiles;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const CARD: &str = "4111 1111 1111 1111";
const EMAIL: &str = "alice.smith@example.com";

/// A worker profile over the Python upstream; `mode` is the tokenize mode.
fn worker_profile(log: &Path, mode: &str, tier: &str) -> String {
    [
        profiles::header("test-worker", tier, mode, &python(), log),
        profiles::read_file("/data/"),
        profiles::write_file("/data/out/"),
        profiles::delete_file(Some("/data/")),
        profiles::transfer(1, 100),
    ]
    .concat()
}

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    audit: PathBuf,
    peer_log: PathBuf,
    gateway: Arc<Gateway>,
    server: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn start(
        profile: impl FnOnce(&Path) -> String,
        approver: Arc<dyn Approver>,
        spawner: Option<Arc<dyn Spawner>>,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let peer_log = dir.path().join("peer.ndjson");
        let audit = dir.path().join("audit.ndjson");
        let policy = AccessPolicy::from_toml(&profile(&peer_log)).unwrap();
        let gateway = Gateway::connect(GatewayConfig {
            agent: "agent-1".into(),
            vm_id: "vm-1".into(),
            policy: Arc::new(policy),
            audit: Arc::new(AuditLog::open(&audit).unwrap()),
            approver,
            spawner,
            tokens: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{}", host_agent::error_chain(&e)));
        let gateway = Arc::new(gateway);
        let listener = Gateway::bind(dir.path(), None).unwrap();
        let socket = dir
            .path()
            .join(format!("vsock.sock_{}", shared_proto::ports::MCP_PORT));
        let server = tokio::spawn(Arc::clone(&gateway).serve(listener));
        Fixture {
            _dir: dir,
            socket,
            audit,
            peer_log,
            gateway,
            server,
        }
    }

    /// Runs the Python agent client with `steps`; one output per step.
    async fn python_agent(&self, steps: Value) -> Vec<Value> {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(python())
                .arg(peer("mcp_agent.py"))
                .arg(&self.socket)
                .arg(steps.to_string())
                .output(),
        )
        .await
        .expect("python agent timed out")
        .unwrap();
        assert!(
            out.status.success(),
            "python agent failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn peer_calls(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.peer_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn audit_records(&self) -> Vec<Value> {
        nanoclaw_audit::verify(&self.audit).unwrap();
        std::fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["record"].clone())
            .collect()
    }

    async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
        if let Ok(gw) = Arc::try_unwrap(self.gateway) {
            gw.close().await;
        }
    }
}

/// A raw JSON-RPC connection to the gateway's socket, as a guest without the sidecar has.
struct Raw {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(socket: &Path) -> Raw {
        let (read, write) = UnixStream::connect(socket).await.unwrap().into_split();
        Raw {
            read: BufReader::new(read),
            write,
        }
    }

    async fn initialized(socket: &Path) -> Raw {
        let mut raw = Raw::connect(socket).await;
        let r = raw
            .request(
                json!({"jsonrpc": "2.0", "id": "init", "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"}}}),
            )
            .await;
        assert_eq!(r["result"]["protocolVersion"], "2025-11-25", "{r}");
        raw.send_line(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await;
        raw
    }

    async fn send_line(&mut self, line: &[u8]) {
        self.write.write_all(line).await.unwrap();
        self.write.write_all(b"\n").await.unwrap();
    }

    async fn reply(&mut self) -> Value {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), self.read.read_line(&mut line))
            .await
            .expect("no reply")
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    async fn request(&mut self, msg: Value) -> Value {
        self.send_line(msg.to_string().as_bytes()).await;
        self.reply().await
    }

    async fn call(&mut self, id: u64, tool: &str, args: Value) -> Value {
        self.request(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": args}}))
            .await
    }
}

fn assert_error(reply: &Value, code: i64, needle: &str) {
    let err = &reply["error"];
    assert_eq!(err["code"], code, "{reply}");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "`{needle}` not in {reply}");
}

fn text_of(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Real values go only into the tools the profile marks `restore = true`: without the mark, the
/// surrogate the agent passes on reaches the upstream as the surrogate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_not_marked_restore_gets_the_surrogate_not_the_real_value() {
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "worker").replace("restore = true\n", ""),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let out = fx
        .python_agent(json!([
            {"call": "read_file", "args": {"path": "/data/report.txt"}},
            {"call": "write_file", "args": {"path": "/data/out/r.txt"}, "call_with": [0, "content"]},
        ]))
        .await;
    assert!(out[1]["ok"].is_object(), "{}", out[1]);
    let calls = fx.peer_calls();
    let content = calls[1]["args"]["content"].as_str().unwrap_or_default();
    assert!(!content.is_empty() && content != EMAIL, "{calls:?}");
    assert!(content.contains('@'), "a surrogate email: {content}");
    assert!(text_of(&out[0]["ok"]).contains(content), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_sees_permitted_tools_and_surrogates_and_denials_name_rules() {
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let out = fx
        .python_agent(json!([
            {"list": true},
            {"call": "read_file", "args": {"path": "/data/report.txt"}},
            {"call": "read_file", "args": {"path": "/etc/passwd"}},
            {"call": "exec_shell", "args": {"command": "id"}},
            {"call": "delete_file", "args": {"path": "/data/report.txt"}},
            {"call": "write_file", "args": {"path": "/data/out/r.txt"}, "call_with": [1, "content"]},
            {"call": "transfer", "args": {"amount": 1000}},
        ]))
        .await;
    assert_eq!(out.len(), 7, "{out:?}");
    // tools/list: only what the profile lists (exec_shell is hidden).
    assert_eq!(
        out[0]["tools"],
        json!(["read_file", "write_file", "delete_file", "transfer"])
    );
    // The tool result reaches the agent with surrogates only.
    let seen = text_of(&out[1]["ok"]);
    assert!(
        seen.starts_with("file /data/report.txt: customer "),
        "{seen}"
    );
    assert!(!seen.contains(CARD) && !seen.contains(EMAIL), "{seen}");
    // Nowhere in the answer (its structured copy included) is a real value. A surrogate keeps
    // the card's issuer prefix and may, by chance, repeat more of its digits.
    let whole = out[1].to_string();
    assert!(
        !whole.contains(CARD) && !whole.contains(EMAIL),
        "{}",
        out[1]
    );
    // Denials are MCP errors naming the rule.
    assert_eq!(out[2]["error"]["code"], DENIED);
    let m = out[2]["error"]["message"].as_str().unwrap();
    assert!(m.contains("arg:files/read_file/path.prefix"), "{m}");
    assert!(
        out[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("default-deny")
    );
    let m = out[4]["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("approval:files/delete_file") && m.contains("requires approval"),
        "{m}"
    );
    // The surrogate the agent passed back reached the upstream as the real value.
    assert!(out[5]["ok"].is_object(), "{}", out[5]);
    assert!(
        out[6]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("amount.max")
    );
    let calls = fx.peer_calls();
    let tools: Vec<&str> = calls.iter().map(|c| c["tool"].as_str().unwrap()).collect();
    assert_eq!(tools, ["read_file", "write_file"], "{calls:?}");
    assert_eq!(calls[1]["args"]["content"], EMAIL);

    // Every decision is in the (intact) audit log, with no argument values.
    let records = fx.audit_records();
    let decisions: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["kind"] == "policy_decision")
        .map(|r| {
            (
                r["data"]["decision"].as_str().unwrap().to_owned(),
                r["data"]["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = [
        ("allow", "tool:files/read_file"),
        ("deny", "arg:files/read_file/path.prefix"),
        ("deny", "default-deny"),
        ("needs_approval", "approval:files/delete_file"),
        ("allow", "tool:files/write_file"),
        ("deny", "arg:files/transfer/amount.max"),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(decisions, expect);
    for r in records.iter().filter(|r| r["kind"] == "policy_decision") {
        assert_eq!(r["data"]["agent"], "agent-1");
        assert_eq!(r["data"]["args_digest"].as_str().unwrap().len(), 64);
    }
    let raw = std::fs::read_to_string(&fx.audit).unwrap();
    for secret in [CARD, EMAIL, "/etc/passwd", "/data/report.txt"] {
        assert!(!raw.contains(secret), "the audit log holds `{secret}`");
    }
    assert!(
        records.iter().any(|r| r["kind"] == "tokenize"
            && r["data"]["mode"] == "enforce"
            && r["data"]["counts"]["cards"].as_u64() >= Some(1)),
        "{records:?}"
    );
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_changes_nothing_and_records_counts() {
    let fx = Fixture::start(
        |log| worker_profile(log, "monitor", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    let r = raw
        .call(1, "read_file", json!({"path": "/data/report.txt"}))
        .await;
    let seen = text_of(&r["result"]);
    assert!(seen.contains(CARD) && seen.contains(EMAIL), "{r}");
    let records = fx.audit_records();
    let tok: Vec<&Value> = records.iter().filter(|r| r["kind"] == "tokenize").collect();
    assert_eq!(tok.len(), 1, "{records:?}");
    assert_eq!(tok[0]["data"]["mode"], "monitor");
    assert_eq!(tok[0]["data"]["direction"], "result");
    // The text appears twice in the result (content and structuredContent).
    assert_eq!(tok[0]["data"]["counts"]["cards"], 2);
    assert_eq!(tok[0]["data"]["counts"]["emails"], 2);
    let text = std::fs::read_to_string(&fx.audit).unwrap();
    assert!(!text.contains(CARD) && !text.contains(EMAIL));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_upstream() {
    let port = free_port();
    let mut child = tokio::process::Command::new(python())
        .arg(peer("mcp_upstream.py"))
        .args(["--http", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fx = Fixture::start(
        |_| {
            format!(
                r#"
name = "http"
tier = "worker"
[servers.web]
url = "http://127.0.0.1:{port}/mcp"
[[tools]]
server = "web"
name = "transfer"
args.amount = {{ max = 10 }}
args.account = {{ one_of = ["a"] }}
"#
            )
        },
        Arc::new(DenyAll),
        None,
    )
    .await;
    let out = fx
        .python_agent(json!([
            {"list": true},
            {"call": "transfer", "args": {"amount": 5, "account": "a"}},
            {"call": "transfer", "args": {"amount": 50, "account": "a"}},
        ]))
        .await;
    assert_eq!(out[0]["tools"], json!(["transfer"]));
    assert_eq!(text_of(&out[1]["ok"]), "moved 5 to a");
    assert_eq!(out[2]["error"]["code"], DENIED);
    fx.stop().await;
    let _ = child.kill().await;
}

/// Review finding M8: a `transfer` call with an argument the profile does not name (`memo`)
/// was allowed and the upstream received it. Now it is denied, naming the argument, and never
/// reaches the upstream; `other_args = "allow"` on the tool lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_arguments_reach_the_upstream_only_when_the_tool_opts_out() {
    let profile = |log: &Path, opt_out: &str| {
        [
            profiles::header("payer", "worker", "off", &python(), log),
            profiles::transfer(1, 100),
            format!("args.account = {{ one_of = [\"acct-ops\"] }}\n{opt_out}\n"),
        ]
        .concat()
    };
    let with_memo = json!({"amount": 50, "account": "acct-ops", "memo": "x"});
    let named = json!({"amount": 50, "account": "acct-ops"});

    let fx = Fixture::start(|log| profile(log, ""), Arc::new(DenyAll), None).await;
    let mut raw = Raw::initialized(&fx.socket).await;
    let r = raw.call(1, "transfer", with_memo.clone()).await;
    assert_error(&r, DENIED, "other_args:files/transfer");
    assert_error(&r, DENIED, "`memo`");
    let r = raw.call(2, "transfer", named.clone()).await;
    assert_eq!(text_of(&r["result"]), "moved 50 to acct-ops", "{r}");
    assert_eq!(
        fx.peer_calls(),
        [json!({"tool": "transfer", "args": named})],
        "only the call with the named arguments reached the upstream"
    );
    fx.stop().await;

    let fx = Fixture::start(
        |log| profile(log, "other_args = \"allow\""),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    let r = raw.call(1, "transfer", with_memo.clone()).await;
    assert_eq!(text_of(&r["result"]), "moved 50 to acct-ops", "{r}");
    assert_eq!(
        fx.peer_calls(),
        [json!({"tool": "transfer", "args": with_memo})]
    );
    fx.stop().await;
}

/// Records what it was asked to spawn (the daemon's create path stands behind this trait).
#[derive(Debug, Default)]
struct RecordingSpawner(Mutex<Vec<(String, Vec<String>)>>);

impl Spawner for RecordingSpawner {
    fn pace(&self, _parent_vm: &str) -> Result<(), SpawnError> {
        Ok(())
    }

    fn spawn(
        &self,
        _parent_vm: String,
        profile: Profile,
        command: Vec<String>,
    ) -> Pin<Box<dyn Future<Output = Result<String, SpawnError>> + Send + '_>> {
        self.0.lock().unwrap().push((profile.name, command));
        Box::pin(async { Ok("vm-child".to_string()) })
    }
}

/// Approves everything, counting the requests: stands in for a user who always taps yes, to
/// show that the gateway proceeds on `Approved` only after the policy is asked again.
#[derive(Debug, Default)]
struct ApproveAll(Mutex<u32>);

impl Approver for ApproveAll {
    fn request(
        &self,
        _subject: ApprovalSubject,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + '_>> {
        *self.0.lock().unwrap() += 1;
        Box::pin(async {
            ApprovalOutcome::Approved {
                approval_id: "ap-1".into(),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_calls_run_and_are_recorded() {
    let fx = Fixture::start(
        |log| worker_profile(log, "off", "worker"),
        Arc::new(ApproveAll::default()),
        None,
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    let r = raw.call(1, "delete_file", json!({"path": "/data/a"})).await;
    assert_eq!(text_of(&r["result"]), "deleted /data/a", "{r}");
    // Approval never widens a bound.
    let r = raw.call(2, "delete_file", json!({"path": "/etc/a"})).await;
    assert_error(&r, DENIED, "path.prefix");
    let kinds: Vec<String> = fx
        .audit_records()
        .iter()
        .map(|r| format!("{}:{}", r["kind"], r["data"]["decision"]))
        .collect();
    assert_eq!(
        kinds,
        [
            "\"policy_decision\":\"needs_approval\"",
            "\"approval_outcome\":null",
            "\"policy_decision\":\"allow\"",
            "\"policy_decision\":\"deny\"",
        ]
    );
    fx.stop().await;
}

/// The escalation suite: a hostile guest speaking straight to the host's MCP socket (no
/// sidecar), one attempt after another on one session; each gets a clear error and the session
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_attempts_are_all_denied_and_nothing_crashes() {
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;

    // Before initialize, no tool is served.
    let mut early = Raw::connect(&fx.socket).await;
    let r = early
        .request(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .await;
    assert_error(&r, -32600, "not initialized");

    let mut raw = Raw::initialized(&fx.socket).await;
    // 1. A tool not in the profile (the upstream has it).
    let r = raw.call(1, "exec_shell", json!({"command": "id"})).await;
    assert_error(&r, DENIED, "default-deny");
    // 2. An argument outside its constraint, and a `..` escape from the prefix.
    let r = raw
        .call(2, "read_file", json!({"path": "/root/.ssh/id"}))
        .await;
    assert_error(&r, DENIED, "arg:files/read_file/path.prefix");
    let r = raw
        .call(3, "read_file", json!({"path": "/data/../etc/shadow"}))
        .await;
    assert_error(&r, DENIED, "path.prefix");
    // 3. A constrained argument of the wrong type, or missing.
    let r = raw.call(4, "transfer", json!({"amount": "1e9"})).await;
    assert_error(&r, DENIED, "amount.type");
    let r = raw.call(5, "transfer", json!({})).await;
    assert_error(&r, DENIED, "amount");
    // 4. Unknown and odd tool names.
    for (i, name) in [
        "",
        "read_file\u{0}",
        "../read_file",
        "READ_FILE",
        "files/read_file",
    ]
    .iter()
    .enumerate()
    {
        let r = raw
            .call(10 + i as u64, name, json!({"path": "/data/a"}))
            .await;
        assert_error(&r, DENIED, "default-deny");
    }
    // 5. A worker calling the orchestrator tool.
    let r = raw
        .call(20, "spawn_agent", json!({"profile": "", "command": ["sh"]}))
        .await;
    assert_error(&r, DENIED, "default-deny");
    // 6. A destructive tool without approval (DenyAll).
    let r = raw
        .call(21, "delete_file", json!({"path": "/data/a"}))
        .await;
    assert_error(&r, DENIED, "requires approval");
    // 7. Malformed JSON-RPC.
    raw.send_line(b"{not json").await;
    assert_error(&raw.reply().await, -32700, "parse error");
    raw.send_line(b"[{\"jsonrpc\":\"2.0\",\"id\":30,\"method\":\"ping\"}]")
        .await;
    assert_error(&raw.reply().await, -32600, "batches");
    let r = raw
        .request(json!({"jsonrpc": "1.0", "id": 31, "method": "tools/list"}))
        .await;
    assert_error(&r, -32600, "jsonrpc");
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "tools/list"}))
        .await;
    assert_error(&r, -32600, "`id`");
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": 32, "method": "tools/call",
            "params": {"name": "read_file", "arguments": ["/data/a"]}}))
        .await;
    assert_error(&r, -32602, "must be an object");
    raw.send_line(b"\"just a string\"").await;
    assert_error(&raw.reply().await, -32600, "JSON object");
    // 8. Oversized arguments.
    let big = "x".repeat(MAX_ARGUMENT_BYTES + 1);
    let r = raw
        .call(
            40,
            "write_file",
            json!({"path": "/data/out/a", "content": big}),
        )
        .await;
    assert_error(&r, -32602, "over the");
    // 9. Methods outside tools/*.
    for (i, m) in [
        "resources/read",
        "prompts/get",
        "sampling/createMessage",
        "tools/../admin",
        "server/discover",
    ]
    .iter()
    .enumerate()
    {
        let r = raw
            .request(json!({"jsonrpc": "2.0", "id": 50 + i, "method": m, "params": {}}))
            .await;
        assert_error(&r, -32601, "not served");
    }
    // 10. A replayed request id (of an allowed call, and of a denied one).
    let r = raw.call(60, "read_file", json!({"path": "/data/a"})).await;
    assert!(r["result"].is_object(), "{r}");
    let r = raw.call(60, "read_file", json!({"path": "/data/a"})).await;
    assert_error(&r, -32600, "already used");
    let r = raw.call(1, "exec_shell", json!({"command": "id"})).await;
    assert_error(&r, -32600, "already used");

    // The session still serves, and nothing denied reached the upstream.
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": 99, "method": "ping"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    let calls = fx.peer_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["tool"], "read_file");

    // 11. A line over the message limit: answered, then the session closes; others go on.
    let mut huge = Raw::initialized(&fx.socket).await;
    let mut line = vec![b'x'; host_agent::mcp::MAX_MESSAGE_BYTES + 10];
    line.push(b'\n');
    // The gateway answers and closes as soon as the limit is passed, so the rest of
    // the line may meet a closed socket: that is the behaviour under test, not a failure.
    if let Err(e) = huge.write.write_all(&line).await {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    assert_error(&huge.reply().await, -32600, "limit");
    let mut rest = String::new();
    let n = huge.read.read_line(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "the session should be closed: {rest}");
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": 100, "method": "ping"}))
        .await;
    assert_eq!(r["result"], json!({}));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_spawns_only_within_its_rights() {
    let spawner = Arc::new(RecordingSpawner::default());
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "orchestrator"),
        Arc::new(DenyAll),
        Some(spawner.clone()),
    )
    .await;
    let within = [
        profiles::header("reader", "worker", "enforce", &python(), &fx.peer_log),
        profiles::read_file("/data/reports/"),
    ]
    .concat();
    let as_orchestrator = within.replace("tier = \"worker\"", "tier = \"orchestrator\"");
    let wider = within.replace("/data/reports/", "/");
    let new_tool = format!("{within}\n[[tools]]\nserver = \"files\"\nname = \"exec_shell\"\n");
    let mut raw = Raw::initialized(&fx.socket).await;
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .await;
    let names: Vec<&str> = r["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"spawn_agent"), "{names:?}");

    let cmd = json!(["/bin/agent"]);
    let r = raw
        .call(2, "spawn_agent", json!({"profile": within, "command": cmd}))
        .await;
    assert!(text_of(&r["result"]).contains("vm-child"), "{r}");
    for (id, profile, needle) in [
        (3, &as_orchestrator, "only workers"),
        (4, &wider, "wider"),
        (5, &new_tool, "exec_shell"),
    ] {
        let r = raw
            .call(
                id,
                "spawn_agent",
                json!({"profile": profile, "command": cmd}),
            )
            .await;
        assert_error(&r, DENIED, "requires approval");
        let m = r["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("spawn:beyond-own-rights") && m.contains(needle),
            "{m}"
        );
    }
    let r = raw
        .call(
            6,
            "spawn_agent",
            json!({"profile": "tier = 3", "command": cmd}),
        )
        .await;
    assert_error(&r, -32602, "profile");
    assert_eq!(
        *spawner.0.lock().unwrap(),
        vec![("reader".to_string(), vec!["/bin/agent".to_string()])]
    );
    // Why a spawn was beyond the caller's rights is in the approval request, not lost.
    let records = fx.audit_records();
    let beyond = records
        .iter()
        .filter(|r| r["data"]["rule"] == "spawn:beyond-own-rights")
        .count();
    assert_eq!(beyond, 6, "three decisions and three approval outcomes");
    fx.stop().await;
}

/// Refuses every spawn as too fast, and counts what reached it.
#[derive(Debug, Default)]
struct PacedOut {
    paced: Mutex<u32>,
    spawned: Mutex<u32>,
}

impl Spawner for PacedOut {
    fn pace(&self, _parent_vm: &str) -> Result<(), SpawnError> {
        *self.paced.lock().unwrap() += 1;
        Err(SpawnError::RateLimited {
            retry_after_ms: 5000,
        })
    }

    fn spawn(
        &self,
        _parent_vm: String,
        _profile: Profile,
        _command: Vec<String>,
    ) -> Pin<Box<dyn Future<Output = Result<String, SpawnError>> + Send + '_>> {
        *self.spawned.lock().unwrap() += 1;
        Box::pin(async { Ok("vm-child".to_string()) })
    }
}

/// A spawn over the caller's pace is refused before anything else: an orchestrator cannot
/// flood the user with approval requests for spawns beyond its rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawn_over_the_pace_is_refused_before_any_approval_is_asked() {
    let spawner = Arc::new(PacedOut::default());
    let approver = Arc::new(ApproveAll::default());
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "orchestrator"),
        approver.clone(),
        Some(spawner.clone()),
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    // An orchestrator child is beyond the caller's rights: it would need approval.
    let beyond = "name = \"sub\"\ntier = \"orchestrator\"\n";
    let r = raw
        .call(
            1,
            "spawn_agent",
            json!({"profile": beyond, "command": ["/bin/agent"]}),
        )
        .await;
    assert_error(&r, DENIED, "spawning too fast");
    assert_eq!(r["error"]["data"]["rule"], "spawn:limit:rate", "{r}");
    assert_eq!(*spawner.paced.lock().unwrap(), 1);
    assert_eq!(*spawner.spawned.lock().unwrap(), 0);
    assert_eq!(*approver.0.lock().unwrap(), 0, "an approval was asked");
    let decisions: Vec<(Value, Value)> = fx
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "policy_decision")
        .map(|r| (r["data"]["decision"].clone(), r["data"]["rule"].clone()))
        .collect();
    assert_eq!(decisions, [(json!("deny"), json!("spawn:limit:rate"))]);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_limit_are_closed_and_the_gateway_goes_on() {
    let fx = Fixture::start(
        |log| worker_profile(log, "off", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..host_agent::mcp::MAX_SESSIONS {
        open.push(Raw::initialized(&fx.socket).await);
    }
    let mut extra = Raw::connect(&fx.socket).await;
    // The gateway may have closed it already (a broken pipe): either way no answer comes.
    let _ = extra
        .write
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n")
        .await;
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read.read_line(&mut line))
        .await
        .expect("the extra session should be closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "{line}");
    // Closing one frees its place.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = Raw::initialized(&fx.socket).await;
    let r = again
        .request(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .await;
    assert_eq!(r["result"], json!({}));
    drop(open);
    fx.stop().await;
}

/// Review finding H2: a session stored each request id whole, so 65,536 ids of up to 1 MiB
/// each could sit in the daemon's memory per session. Ids over `MAX_ID_BYTES` are refused (and
/// not echoed), and the session keeps a fixed-size digest of each id it accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_request_ids_are_refused_and_the_session_goes_on() {
    let fx = Fixture::start(
        |log| worker_profile(log, "off", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    let huge = "x".repeat(512 << 10);
    for i in 0..100 {
        let id = format!("{i}{huge}");
        let r = raw
            .request(json!({"jsonrpc": "2.0", "id": id, "method": "ping"}))
            .await;
        assert_eq!(r["error"]["code"], -32600, "ping {i} was not refused");
        assert_eq!(r["id"], Value::Null, "the id is not echoed back");
        let message = r["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("`id` is over"), "{message}");
    }
    // The session goes on; an id at the limit is fine, and a replay of it is refused.
    let at_limit = "y".repeat(host_agent::mcp::MAX_ID_BYTES);
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": at_limit, "method": "ping"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    let r = raw
        .request(json!({"jsonrpc": "2.0", "id": at_limit, "method": "ping"}))
        .await;
    assert_eq!(r["error"]["code"], -32600, "{r}");
    fx.stop().await;
}

/// An agent that repeats a denied call gets one full `policy_decision` record for the first
/// denial and one `denial_summary` counting the rest of the window (written here when the
/// gateway goes), while every allowed call between them is recorded on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_denials_are_summarised_and_allowed_calls_each_recorded() {
    let fx = Fixture::start(
        |log| worker_profile(log, "enforce", "worker"),
        Arc::new(DenyAll),
        None,
    )
    .await;
    let mut raw = Raw::initialized(&fx.socket).await;
    for i in 0..10 {
        let r = raw
            .call(i, "read_file", json!({"path": format!("/etc/x{i}")}))
            .await;
        assert_error(&r, DENIED, "arg:files/read_file/path.prefix");
        if i == 4 {
            let r = raw
                .call(100, "read_file", json!({"path": "/data/report.txt"}))
                .await;
            assert!(r.get("result").is_some(), "{r}");
        }
    }
    let r = raw
        .call(101, "read_file", json!({"path": "/data/report.txt"}))
        .await;
    assert!(r.get("result").is_some(), "{r}");
    drop(raw);

    // Stop the gateway (its session task lets go of it once the connection is closed).
    let Fixture {
        _dir: dir,
        audit,
        gateway,
        server,
        ..
    } = fx;
    server.abort();
    let _ = server.await;
    let mut gateway = gateway;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let gw = loop {
        match Arc::try_unwrap(gateway) {
            Ok(gw) => break gw,
            Err(g) if tokio::time::Instant::now() < deadline => {
                gateway = g;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => panic!("the session still holds the gateway"),
        }
    };
    gw.close().await;

    nanoclaw_audit::verify(&audit).unwrap();
    let records: Vec<Value> = nanoclaw_audit::tail(&audit, 1000)
        .unwrap()
        .into_iter()
        .map(|r| json!({"kind": r.record.kind, "data": r.record.data}))
        .collect();
    let decisions: Vec<&str> = records
        .iter()
        .filter(|r| r["kind"] == "policy_decision")
        .map(|r| r["data"]["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["deny", "allow", "allow"], "{records:?}");
    let summaries: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "denial_summary")
        .collect();
    assert_eq!(summaries.len(), 1, "{records:?}");
    let s = &summaries[0]["data"];
    assert_eq!(s["repeats"], 9);
    assert_eq!(s["tool"], "read_file");
    assert_eq!(s["rule"], "arg:files/read_file/path.prefix");
    assert_eq!(s["vm_id"], "vm-1");
    drop(dir);
}
