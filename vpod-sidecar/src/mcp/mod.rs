//! The agent's local MCP endpoint: the sidecar forwards the agent's MCP messages to the host's
//! gateway over vsock [`MCP_PORT`], filtering early with the profile summary it received.
//!
//! The host is authoritative and re-checks every call; the early filter only answers what is
//! plainly outside the profile (a `tools/call` of a tool the summary does not list) without a
//! round trip, with the same error the host gives ([`DENIED`], rule `default-deny`). Everything
//! else, malformed input included, goes to the host, so a guest gets the same answers with or
//! without the sidecar.
//!
//! Two ways in for the agent:
//! - [`http`]: streamable HTTP on `127.0.0.1:<local_port>` at `/mcp` (JSON responses, one
//!   host connection per MCP session, keyed by the `Mcp-Session-Id` header);
//! - [`stdio`]: `vpod-sidecar mcp-stdio`, a shim the agent starts as a stdio MCP server; it
//!   relays lines between its stdin/stdout and the host.
//!
//! # Layout
//! - this file: the early filter ([`EarlyFilter`]) and line framing shared by both.
//! - [`http`]: the local streamable-HTTP endpoint.
//! - [`stdio`]: the stdio shim.
//!
//! [`MCP_PORT`]: shared_proto::ports::MCP_PORT

pub mod http;
pub mod stdio;

use std::collections::HashSet;
use std::io::{self, BufRead};

use serde_json::{Value, json};

/// The JSON-RPC error code of a denied call (the host gateway's code).
pub const DENIED: i64 = -32003;
/// The longest message line the sidecar relays, in bytes (the host's limit).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Errors of the MCP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// Binding the local endpoint failed.
    #[error("cannot listen on 127.0.0.1:{port}")]
    Listen {
        /// The port.
        port: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Connecting to the host's gateway failed.
    #[error("cannot reach the host's MCP gateway")]
    Connect(#[source] io::Error),
    /// Relaying failed.
    #[error("relay")]
    Io(#[source] io::Error),
}

/// What the early filter says about one message from the agent.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Send it to the host.
    Forward,
    /// Answer the agent with this message; the host does not see it.
    Reply(Value),
}

/// The early filter: the tool names of the profile summary.
#[derive(Debug, Clone)]
pub struct EarlyFilter {
    /// `None`: no summary, everything goes to the host.
    tools: Option<HashSet<String>>,
}

impl EarlyFilter {
    /// A filter that forwards everything (no summary).
    pub fn forward_all() -> Self {
        Self { tools: None }
    }

    /// A filter for the tools the summary lists.
    pub fn new(tools: &[String]) -> Self {
        Self {
            tools: Some(tools.iter().cloned().collect()),
        }
    }

    /// Judges one line from the agent.
    pub fn inbound(&self, line: &[u8]) -> Verdict {
        let Some(tools) = &self.tools else {
            return Verdict::Forward;
        };
        let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(line) else {
            return Verdict::Forward;
        };
        if msg.get("method").and_then(Value::as_str) != Some("tools/call") {
            return Verdict::Forward;
        }
        let Some(id) = msg.get("id") else {
            return Verdict::Forward;
        };
        let Some(name) = msg
            .get("params")
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
        else {
            return Verdict::Forward;
        };
        if tools.contains(name) {
            return Verdict::Forward;
        }
        Verdict::Reply(json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {
                "code": DENIED,
                "message": format!(
                    "denied by rule `default-deny`: tool `{name}` is not in the profile"
                ),
                "data": {"rule": "default-deny"},
            },
        }))
    }

    /// Filters one line from the host: a `tools/list` result keeps only the summary's tools
    /// (the host already filtered; this keeps a confused host from widening the agent's view).
    pub fn outbound(&self, line: Vec<u8>) -> Vec<u8> {
        let Some(allowed) = &self.tools else {
            return line;
        };
        let Ok(mut msg) = serde_json::from_slice::<Value>(&line) else {
            return line;
        };
        let Some(tools) = msg
            .get_mut("result")
            .and_then(|r| r.get_mut("tools"))
            .and_then(Value::as_array_mut)
        else {
            return line;
        };
        let before = tools.len();
        tools.retain(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| allowed.contains(n))
        });
        if tools.len() == before {
            return line;
        }
        serde_json::to_vec(&msg).unwrap_or(line)
    }
}

/// Where PID 1 leaves the summary's tool names (one per line) for `vpod-sidecar mcp-stdio`.
pub const TOOLS_FILE: &str = "/run/nanoclaw/mcp-tools";

/// Starts the local streamable-HTTP endpoint for `summary` on its own thread, forwarding to
/// the host's [`MCP_PORT`](shared_proto::ports::MCP_PORT), and leaves the tool names in
/// [`TOOLS_FILE`] for the stdio shim.
pub fn start(summary: &shared_proto::message::McpSummary) -> Result<(), McpError> {
    let listener = http::bind(summary.local_port)?;
    let names = summary.tools.join("\n");
    let written =
        std::fs::create_dir_all("/run/nanoclaw").and_then(|()| std::fs::write(TOOLS_FILE, names));
    if let Err(e) = written {
        tracing::warn!(error = %e, "mcp: cannot write the tool list for mcp-stdio");
    }
    let endpoint = http::Endpoint::new(EarlyFilter::new(&summary.tools), connect_host);
    std::thread::Builder::new()
        .name("mcp-endpoint".into())
        .spawn(move || endpoint.serve(&listener))
        .map_err(McpError::Io)?;
    tracing::info!(
        port = summary.local_port,
        tools = summary.tools.len(),
        "mcp endpoint up"
    );
    Ok(())
}

/// Connects to the host's MCP gateway.
pub fn connect_host() -> io::Result<crate::vsock::VsockStream> {
    crate::vsock::VsockStream::connect(shared_proto::ports::HOST_CID, shared_proto::ports::MCP_PORT)
        .map_err(io::Error::other)
}

/// `vpod-sidecar mcp-stdio`: the stdio shim over vsock; returns the exit code.
pub fn stdio_main() -> i32 {
    let tools: Vec<String> = std::fs::read_to_string(TOOLS_FILE)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    let host = match connect_host() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mcp-stdio: cannot reach the host's MCP gateway: {e}");
            return 1;
        }
    };
    // Without the tool list every message goes to the host, which decides alone.
    let filter = if tools.is_empty() {
        EarlyFilter::forward_all()
    } else {
        EarlyFilter::new(&tools)
    };
    match stdio::run(&filter, io::stdin(), io::stdout(), host) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mcp-stdio: {}", crate::ErrorChain(&e));
            1
        }
    }
}

/// Reads one line (without its newline) of at most [`MAX_MESSAGE_BYTES`]; `None` at EOF. A
/// longer line is an error: framing is lost.
pub fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *r, MAX_MESSAGE_BYTES as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "MCP message over the size limit",
        ));
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_filter_denies_unlisted_tools_like_the_host() {
        let f = EarlyFilter::new(&["read_file".into()]);
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}}"#;
        assert_eq!(f.inbound(ok), Verdict::Forward);
        let bad = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"exec"}}"#;
        let Verdict::Reply(r) = f.inbound(bad) else {
            panic!("not denied")
        };
        assert_eq!(r["id"], 2);
        assert_eq!(r["error"]["code"], DENIED);
        assert_eq!(
            r["error"]["message"],
            "denied by rule `default-deny`: tool `exec` is not in the profile"
        );
        // Malformed and other methods go to the host, which answers authoritatively.
        for line in [
            &b"{nope"[..],
            br#"{"jsonrpc":"2.0","id":3,"method":"resources/read"}"#,
        ] {
            assert_eq!(f.inbound(line), Verdict::Forward);
        }
    }

    #[test]
    fn outbound_drops_tools_outside_the_summary() {
        let f = EarlyFilter::new(&["a".into()]);
        let line = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#;
        let out: Value = serde_json::from_slice(&f.outbound(line.to_vec())).unwrap();
        assert_eq!(out["result"]["tools"], json!([{"name": "a"}]));
        let other = b"{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{}}".to_vec();
        assert_eq!(f.outbound(other.clone()), other);
    }

    #[test]
    fn read_line_caps_the_size() {
        let mut ok = io::Cursor::new(b"a\nb".to_vec());
        assert_eq!(read_line(&mut ok).unwrap(), Some(b"a".to_vec()));
        assert_eq!(read_line(&mut ok).unwrap(), Some(b"b".to_vec()));
        assert_eq!(read_line(&mut ok).unwrap(), None);
        let mut big = io::Cursor::new(vec![b'x'; MAX_MESSAGE_BYTES + 2]);
        assert!(read_line(&mut big).is_err());
    }
}
