//! Component tests of the guest's side of MCP against the real host gateway, over the Unix
//! socket that is the host end of vsock `MCP_PORT`: the sidecar's local streamable-HTTP
//! endpoint driven by the official Python `mcp` client, and the proof that a guest bypassing
//! the sidecar gets exactly the answers the sidecar path gives.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use host_agent::approval::DenyAll;
use host_agent::mcp::{Gateway, GatewayConfig, MAX_ARGUMENT_BYTES};
use host_agent::policy::AccessPolicy;
use nanoclaw_audit::AuditLog;
use nanoclaw_tests::peers::{mcp_python as python, peer};
use nanoclaw_tests::profiles;
use serde_json::{Value, json};
use vpod_sidecar::mcp::{EarlyFilter, http, stdio};

fn profile(log: &Path) -> String {
    [
        profiles::header("sidecar-test", "worker", "enforce", &python(), log),
        profiles::read_file("/data/"),
        profiles::write_file("/data/"),
        profiles::delete_file(None),
    ]
    .concat()
}

struct Host {
    dir: tempfile::TempDir,
    socket: PathBuf,
    tools: Vec<String>,
    _server: tokio::task::JoinHandle<()>,
}

async fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("peer.ndjson");
    let policy = Arc::new(AccessPolicy::from_toml(&profile(&log)).unwrap());
    let tools = policy.visible_tools();
    let gateway = Gateway::connect(GatewayConfig {
        agent: "agent-1".into(),
        vm_id: "vm-1".into(),
        policy,
        audit: Arc::new(AuditLog::open(dir.path().join("audit.ndjson")).unwrap()),
        approver: Arc::new(DenyAll),
        spawner: None,
        tokens: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{}", host_agent::error_chain(&e)));
    let listener = Gateway::bind(dir.path(), None).unwrap();
    let socket = dir
        .path()
        .join(format!("vsock.sock_{}", shared_proto::ports::MCP_PORT));
    let server = tokio::spawn(Arc::new(gateway).serve(listener));
    Host {
        dir,
        socket,
        tools,
        _server: server,
    }
}

/// The messages a hostile agent sends, in order (ids unique unless replayed on purpose).
fn hostile_messages() -> Vec<Vec<u8>> {
    let call = |id: u64, name: &str, args: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": args}})
        .to_string()
        .into_bytes()
    };
    vec![
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "hostile", "version": "0"}}})
        .to_string()
        .into_bytes(),
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec(),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            .to_string()
            .into_bytes(),
        call(2, "exec_shell", json!({"command": "id"})),
        call(3, "read_file", json!({"path": "/etc/passwd"})),
        call(4, "read_file", json!({"path": "/data/../etc/passwd"})),
        call(5, "delete_file", json!({"path": "/data/a"})),
        call(6, "read_file", json!({"path": "/data/a"})),
        call(3, "read_file", json!({"path": "/data/a"})),
        call(
            7,
            "write_file",
            json!({"path": "/data/a", "content": "x".repeat(MAX_ARGUMENT_BYTES + 1)}),
        ),
        b"{not json".to_vec(),
        br#"[{"jsonrpc":"2.0","id":8,"method":"ping"}]"#.to_vec(),
        json!({"jsonrpc": "2.0", "id": 9, "method": "resources/read", "params": {}})
            .to_string()
            .into_bytes(),
        json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": 7}})
            .to_string()
            .into_bytes(),
        json!({"jsonrpc": "2.0", "id": 11, "method": "ping"})
            .to_string()
            .into_bytes(),
    ]
}

fn replies(bytes: &[u8]) -> Vec<Value> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

/// Straight to the host's socket, no sidecar.
fn direct(socket: &Path, messages: &[Vec<u8>]) -> Vec<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut out = Vec::new();
    for m in messages {
        s.write_all(m).unwrap();
        s.write_all(b"\n").unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    out.extend(replies(&all));
    out
}

/// Through the sidecar's stdio shim.
fn through_shim(socket: &Path, tools: &[String], messages: &[Vec<u8>]) -> Vec<Value> {
    let host = UnixStream::connect(socket).unwrap();
    let (mut agent_in, shim_in) = UnixStream::pair().unwrap();
    let (shim_out, agent_out) = UnixStream::pair().unwrap();
    agent_out
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let filter = EarlyFilter::new(tools);
    let shim = std::thread::spawn(move || stdio::run(&filter, shim_in, shim_out, host));
    for m in messages {
        agent_in.write_all(m).unwrap();
        agent_in.write_all(b"\n").unwrap();
    }
    drop(agent_in);
    let mut all = Vec::new();
    BufReader::new(agent_out).read_to_end(&mut all).unwrap();
    shim.join().unwrap().unwrap();
    replies(&all)
}

fn by_id(replies: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = replies.iter().map(Value::to_string).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassing_the_sidecar_gets_exactly_the_same_answers() {
    let host = host().await;
    let socket = host.socket.clone();
    let tools = host.tools.clone();
    let (direct, shimmed) = tokio::task::spawn_blocking(move || {
        let messages = hostile_messages();
        (
            direct(&socket, &messages),
            through_shim(&socket, &tools, &messages),
        )
    })
    .await
    .unwrap();
    // 15 messages, one notification: 14 answers each way.
    assert_eq!(direct.len(), 14, "{direct:#?}");
    assert_eq!(by_id(&direct), by_id(&shimmed));
    // And they are the denials expected.
    let find = |id: u64| {
        direct
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no answer to {id}"))
    };
    assert!(
        find(2)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("default-deny")
    );
    assert!(
        find(3)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("path.prefix")
    );
    assert!(
        find(4)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("path.prefix")
    );
    assert!(
        find(5)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requires approval")
    );
    assert!(find(6)["result"].is_object());
    assert_eq!(direct.iter().filter(|r| r["id"] == 3).count(), 2);
    assert!(direct.iter().any(|r| {
        r["id"] == 3
            && r["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("already used")
    }));
    assert_eq!(find(7)["error"]["code"], -32602);
    assert_eq!(find(9)["error"]["code"], -32601);
    assert_eq!(find(10)["error"]["code"], -32602);
    assert_eq!(find(11)["result"], json!({}));
    let _ = &host.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agent_over_the_sidecars_streamable_http_endpoint() {
    let host = host().await;
    let listener = http::bind(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = host.socket.clone();
    let endpoint = http::Endpoint::new(EarlyFilter::new(&host.tools), move || {
        UnixStream::connect(&socket)
    });
    std::thread::spawn(move || endpoint.serve(&listener));
    let steps = json!([
        {"list": true},
        {"call": "read_file", "args": {"path": "/data/report.txt"}},
        {"call": "exec_shell", "args": {"command": "id"}},
        {"call": "read_file", "args": {"path": "/root/x"}},
        {"call": "write_file", "args": {"path": "/data/out"}, "call_with": [1, "content"]},
    ]);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python())
            .arg(peer("mcp_agent.py"))
            .arg(format!("http://127.0.0.1:{port}/mcp"))
            .arg(steps.to_string())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        out[0]["tools"],
        json!(["read_file", "write_file", "delete_file"])
    );
    let text = out[1]["ok"]["content"][0]["text"].as_str().unwrap();
    assert!(!text.contains("4111 1111 1111 1111") && !text.contains("alice.smith@example.com"));
    assert!(
        out[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("default-deny")
    );
    assert!(
        out[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("path.prefix")
    );
    assert!(out[4]["ok"].is_object(), "{}", out[4]);
    let peer = std::fs::read_to_string(host.dir.path().join("peer.ndjson")).unwrap();
    let calls: Vec<Value> = peer
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1]["args"]["content"], "alice.smith@example.com");
}

#[test]
fn http_endpoint_refuses_bad_requests() {
    // No host is needed to answer these: the endpoint refuses them before any session.
    let listener = http::bind(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let endpoint = http::Endpoint::new(EarlyFilter::new(&[]), || {
        Err::<UnixStream, _>(std::io::Error::other("no host in this test"))
    });
    std::thread::spawn(move || endpoint.serve(&listener));
    let ask = |req: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    assert!(ask("GET /mcp HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(ask("POST /other HTTP/1.1\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.1 404"));
    let big = format!("POST /mcp HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 2 << 20);
    assert!(ask(&big).starts_with("HTTP/1.1 413"));
    let unknown = "POST /mcp HTTP/1.1\r\nMcp-Session-Id: nope\r\nContent-Length: 2\r\n\r\n{}";
    assert!(ask(unknown).starts_with("HTTP/1.1 404"));
    // A call the early filter refuses is answered without a host.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert!(ask(&req).starts_with("HTTP/1.1 200"));
    // Without a reachable host, anything else is a 502.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert!(ask(&req).starts_with("HTTP/1.1 502"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_wget_speaks_to_the_sidecars_endpoint() {
    // The e2e agent's client: busybox wget (Debian's busybox-static, as in the guest image).
    if !Path::new("/bin/busybox").exists() {
        panic!("/bin/busybox is missing: run scripts/setup (busybox-static)");
    }
    let host = host().await;
    let listener = http::bind(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = host.socket.clone();
    let endpoint = http::Endpoint::new(EarlyFilter::new(&host.tools), move || {
        UnixStream::connect(&socket)
    });
    std::thread::spawn(move || endpoint.serve(&listener));
    let script = format!(
        r#"
H='Content-Type: application/json'
U=http://127.0.0.1:{port}/mcp
INIT='{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"2025-11-25","capabilities":{{}},"clientInfo":{{"name":"sh","version":"0"}}}}}}'
busybox wget -q -S -O /dev/null --header "$H" --post-data "$INIT" $U 2>"$TMPDIR/headers"
SID=$(grep -i 'mcp-session-id' "$TMPDIR/headers" | sed 's/.*: *//' | tr -d '\r ')
busybox wget -q -O - --header "$H" --header "Mcp-Session-Id: $SID" --post-data '{{"jsonrpc":"2.0","id":1,"method":"tools/list"}}' $U
"#
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("TMPDIR", tmp.path())
            .output(),
    )
    .await
    .expect("wget hung")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"read_file\""),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP request to the endpoint on a connection of its own: the status code, the
/// `Mcp-Session-Id` header and the body.
fn post_mcp(port: u16, session: Option<&str>, body: &Value) -> (u16, Option<String>, Value) {
    let body = body.to_string();
    let sid = session.map_or(String::new(), |s| format!("Mcp-Session-Id: {s}\r\n"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nContent-Type: application/json\r\n{sid}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let session = head
        .lines()
        .find_map(|l| l.strip_prefix("Mcp-Session-Id: "))
        .map(str::to_owned);
    (
        status,
        session,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A restored VM's vsock connections are reset and its host gateway is a new one: the agent's
/// open MCP session goes on, because the endpoint opens a new host connection and replays the
/// session's `initialize` on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_goes_on_across_a_reset_of_its_host_connection() {
    let before = host().await;
    let after = host().await;
    let socket = Arc::new(std::sync::Mutex::new(before.socket.clone()));
    let handed_out: Arc<std::sync::Mutex<Vec<UnixStream>>> = Arc::default();
    let listener = http::bind(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let endpoint = {
        let (socket, handed_out) = (Arc::clone(&socket), Arc::clone(&handed_out));
        http::Endpoint::new(EarlyFilter::new(&before.tools), move || {
            let stream = UnixStream::connect(&*socket.lock().unwrap())?;
            handed_out.lock().unwrap().push(stream.try_clone()?);
            Ok(stream)
        })
    };
    std::thread::spawn(move || endpoint.serve(&listener));
    let call = |id: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "/data/r.txt"}}})
    };
    let steps = tokio::task::spawn_blocking(move || {
        let (status, sid, init) = post_mcp(
            port,
            None,
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "restored", "version": "0"}}}),
        );
        assert_eq!(status, 200, "{init}");
        let sid = sid.expect("a session id");
        let (status, _, _) = post_mcp(
            port,
            Some(&sid),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        );
        assert_eq!(status, 202);
        let (status, _, first) = post_mcp(port, Some(&sid), &call(1));
        assert_eq!(status, 200, "{first}");
        assert!(first["result"].is_object(), "{first}");
        // The restore: every host connection reset, and a new gateway behind the port.
        for s in handed_out.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        *socket.lock().unwrap() = after.socket.clone();
        let (status, same, second) = post_mcp(port, Some(&sid), &call(2));
        (status, same, second, sid, before, after)
    })
    .await
    .unwrap();
    let (status, same, second, sid, before, after) = steps;
    assert_eq!(status, 200, "{second}");
    assert_eq!(same.as_deref(), Some(sid.as_str()));
    assert!(second["result"].is_object(), "{second}");
    // The call after the reset reached the new gateway's upstream, not the old one's.
    let calls = |h: &Host| {
        std::fs::read_to_string(h.dir.path().join("peer.ndjson"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!((calls(&before), calls(&after)), (1, 1));
}
