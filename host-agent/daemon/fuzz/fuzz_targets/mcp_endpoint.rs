//! Fuzzes the agent-facing MCP endpoint: the input is the byte stream a hostile guest sends on
//! one session (newline-delimited JSON-RPC), served by the production loop
//! (`Gateway::serve_connection`: framing, size limits, parsing, validation, replay checks and
//! dispatch, `tools/call` included). It must never panic or hang, and every byte it writes back
//! must be a JSON-RPC 2.0 reply: an object with `"jsonrpc": "2.0"` and exactly one of `result`
//! or `error`, an error carrying an integer `code` and a string `message`; never more replies
//! than lines sent.
//!
//! The gateway is an orchestrator with `tokenize = "enforce"` and no upstream servers, so a
//! `tools/call` runs the argument restore, the policy decision, the audit record and (for
//! `spawn_agent`) the child-profile parse before it fails for want of an upstream or a spawner.
//! Its audit log is a file unlinked as soon as it is open (on `/dev/shm` when there is one, so
//! the log's sync per record costs nothing); a fresh gateway and log replace it every
//! `RENEW` inputs, so the log never grows without bound and nothing is left behind.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use host_agent::approval::DenyAll;
use host_agent::mcp::{Gateway, GatewayConfig};
use host_agent::policy::AccessPolicy;
use libfuzzer_sys::fuzz_target;
use nanoclaw_audit::AuditLog;
use serde_json::Value;

/// Inputs served by one gateway (and its audit log) before a fresh one replaces it.
const RENEW: u32 = 4096;

const PROFILE: &str = "name = \"fuzz\"\ntier = \"orchestrator\"\ntokenize = \"enforce\"\n";

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// The gateway and how many inputs it has served.
    gateway: Mutex<(Arc<Gateway>, u32)>,
}

fn audit_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn new_gateway(rt: &tokio::runtime::Runtime) -> Arc<Gateway> {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = audit_dir().join(format!("mcp-fuzz-{}-{n}.ndjson", std::process::id()));
    let audit = AuditLog::open(&path).expect("fuzz audit log");
    // The log keeps its descriptor; the name is not needed again.
    std::fs::remove_file(&path).expect("unlink the fuzz audit log");
    let policy = AccessPolicy::from_toml(PROFILE).expect("fuzz profile");
    let config = GatewayConfig {
        agent: "fuzz@vm".into(),
        vm_id: "vm".into(),
        policy: Arc::new(policy),
        audit: Arc::new(audit),
        approver: Arc::new(DenyAll),
        spawner: None,
        tokens: None,
    };
    Arc::new(
        rt.block_on(Gateway::connect(config))
            .expect("a gateway without upstreams connects"),
    )
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("fuzz runtime");
        let gateway = new_gateway(&rt);
        Fixture {
            rt,
            gateway: Mutex::new((gateway, 0)),
        }
    })
}

/// Panics unless `reply` is a well-formed JSON-RPC 2.0 response.
fn check_reply(reply: &[u8]) {
    let v: Value = serde_json::from_slice(reply).expect("a reply is JSON");
    let obj = v.as_object().expect("a reply is an object");
    assert_eq!(obj.get("jsonrpc"), Some(&Value::from("2.0")), "{v}");
    assert!(obj.contains_key("id"), "a reply names its id: {v}");
    match (obj.get("result"), obj.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            assert!(e.get("code").is_some_and(Value::is_i64), "{v}");
            assert!(e.get("message").is_some_and(Value::is_string), "{v}");
        }
        _ => panic!("a reply has exactly one of result and error: {v}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let gateway = {
        let mut g = fx.gateway.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 >= RENEW {
            *g = (new_gateway(&fx.rt), 0);
        }
        g.1 += 1;
        Arc::clone(&g.0)
    };
    let mut out = Vec::new();
    fx.rt.block_on(async {
        let stream = tokio::io::join(data, &mut out);
        gateway.serve_connection(stream).await;
    });
    let lines = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let mut replies = 0;
    for reply in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        check_reply(reply);
        replies += 1;
    }
    assert!(replies <= lines, "{replies} replies to {lines} lines");
});
