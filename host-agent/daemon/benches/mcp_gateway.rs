//! Benchmark (prints figures; not a test): the policy decision latency per `tools/call` and the
//! latency the MCP gateway adds per call.
//!
//! `cargo bench -p host-agent --bench mcp_gateway [-- N]`
//!
//! 1. `AccessPolicy::decide` on `examples/profiles/worker.toml`: an allowed call with a prefix
//!    constraint, a denied one and a tool outside the profile; p50 / p99 over N decisions each
//!    (target: p50 under 50 µs).
//! 2. The same `tools/call` to the Python upstream (`tests/peers/mcp_upstream.py`, stdio) made
//!    directly with an rmcp client, and through the gateway (JSON-RPC over its Unix socket:
//!    policy, tokenization, the audit record with its fdatasync, the upstream call). The
//!    difference of the medians is the gateway's added latency. Needs the venv of
//!    `scripts/setup --test`; skipped with a note without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::approval::DenyAll;
use host_agent::mcp::{Gateway, GatewayConfig};
use host_agent::policy::AccessPolicy;
use nanoclaw_audit::AuditLog;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let policy = AccessPolicy::load(&repo().join("examples/profiles/worker.toml"))?;
    println!("policy decision latency (cedar-policy, worker.toml), {n} decisions each:");
    let cases = [
        (
            "allow read_file /data/x",
            "read_file",
            json!({"path": "/data/reports/q3.txt"}),
        ),
        (
            "deny  read_file /etc/x",
            "read_file",
            json!({"path": "/etc/passwd"}),
        ),
        ("deny  unknown tool", "exec_shell", json!({"command": "id"})),
        (
            "allow transfer (3 bounds)",
            "transfer",
            json!({"amount": 5, "account": "acct-ops"}),
        ),
    ];
    for (label, tool, args) in cases {
        let args = obj(args);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let d = policy.decide("agent-1", tool, &args, false)?;
            samples.push(t.elapsed());
            std::hint::black_box(d);
        }
        let (p50, p99) = percentiles(samples);
        println!(
            "  {label:<28} p50 {:>7.2} µs   p99 {:>7.2} µs   (target p50 < 50 µs)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }

    let python = std::env::var_os("NANOCLAW_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/nanoclaw/mcp-venv/bin/python3")
        });
    if !python.exists() {
        println!(
            "gateway latency: skipped ({} missing; run scripts/setup --test)",
            python.display()
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(gateway_latency(&python, (n / 20).max(50)))
}

async fn gateway_latency(python: &Path, calls: usize) -> anyhow::Result<()> {
    let upstream = repo().join("tests/peers/mcp_upstream.py");
    let args = obj(json!({"path": "/data/reports/q3.txt"}));

    // Directly, with rmcp.
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(&upstream);
    let direct = ().serve(TokioChildProcess::new(cmd)?).await?;
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let params = CallToolRequestParams::new("read_file").with_arguments(args.clone());
        direct.peer().call_tool(params).await?;
        samples.push(t.elapsed());
    }
    let (direct_p50, direct_p99) = percentiles(samples);
    direct.cancel().await?;

    // Through the gateway.
    let dir = tempfile::tempdir()?;
    let profile = format!(
        "name = \"bench\"\ntier = \"worker\"\ntokenize = \"enforce\"\n[servers.files]\n\
         command = [\"{}\", \"{}\"]\n[[tools]]\nserver = \"files\"\nname = \"read_file\"\n\
         args.path = {{ prefix = \"/data/\" }}\n",
        python.display(),
        upstream.display()
    );
    let gateway = Arc::new(
        Gateway::connect(GatewayConfig {
            agent: "agent-1".into(),
            vm_id: "vm-bench".into(),
            policy: Arc::new(AccessPolicy::from_toml(&profile)?),
            audit: Arc::new(AuditLog::open(dir.path().join("audit.ndjson"))?),
            approver: Arc::new(DenyAll),
            spawner: None,
            tokens: None,
        })
        .await?,
    );
    let listener = Gateway::bind(dir.path(), None)?;
    let server = tokio::spawn(Arc::clone(&gateway).serve(listener));
    let socket = shared_proto::ports::host_listener_path(dir.path(), shared_proto::ports::MCP_PORT);
    let (read, mut write) = tokio::net::UnixStream::connect(&socket).await?.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let mut rpc = async |msg: Value| -> anyhow::Result<Value> {
        write.write_all(format!("{msg}\n").as_bytes()).await?;
        line.clear();
        read.read_line(&mut line).await?;
        Ok(serde_json::from_str(&line)?)
    };
    rpc(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"}}}))
    .await?;
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = Instant::now();
        let r = rpc(
            json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
            "params": {"name": "read_file", "arguments": args}}),
        )
        .await?;
        samples.push(t.elapsed());
        anyhow::ensure!(r.get("result").is_some(), "call failed: {r}");
    }
    let (gw_p50, gw_p99) = percentiles(samples);
    server.abort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("tools/call to the Python upstream (stdio), {calls} calls each:");
    println!(
        "  direct (rmcp client)        p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(direct_p50),
        ms(direct_p99)
    );
    println!(
        "  through the gateway         p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(gw_p50),
        ms(gw_p99)
    );
    println!(
        "  added by the gateway (p50)  {:>7.3} ms   (policy + tokenize + audit fdatasync + JSON-RPC hop)",
        ms(gw_p50.saturating_sub(direct_p50))
    );
    Ok(())
}
