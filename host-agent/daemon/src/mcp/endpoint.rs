//! The agent-facing MCP endpoint: one JSON-RPC session per connection, one message per line.
//!
//! Every line gets an answer or, for a notification, none; nothing the peer sends ends the
//! session except closing it or a line over [`MAX_MESSAGE_BYTES`] (after which framing cannot
//! be trusted: the session answers once and closes). The answers:
//!
//! | input | answer |
//! | --- | --- |
//! | not JSON | `-32700` parse error, id `null` |
//! | a batch, not an object, no `"jsonrpc": "2.0"`, a bad id | `-32600` invalid request |
//! | an id used before in this session | `-32600`, the id named |
//! | a request before `initialize` | `-32600` |
//! | a method other than `initialize`, `ping`, `tools/list`, `tools/call` | `-32601` |
//! | `tools/call` without a string `name`, arguments not an object or over [`MAX_ARGUMENT_BYTES`] | `-32602` |
//! | a denied call | [`super::DENIED`], the rule named |

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::Gateway;

/// The longest message line accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The largest `tools/call` arguments accepted, in bytes of their JSON.
pub const MAX_ARGUMENT_BYTES: usize = 256 << 10;
/// How many request ids one session may use (a replay check needs them all).
pub const MAX_REQUEST_IDS: usize = 1 << 16;
/// How long a session may stay silent before it is closed (an agent between two steps of its
/// work is silent for seconds to minutes; a connection held open for nothing is not kept).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// How long one reply may take to be written before the session is closed: an agent that does
/// not read its answers must not hold the gateway's task.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest request id accepted, in bytes of its text. SDKs send integers or UUIDs; a longer
/// id is refused, and the session remembers each id as a 32-byte digest whatever its length.
pub const MAX_ID_BYTES: usize = 256;

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
pub(super) const INVALID_PARAMS: i64 = -32602;
pub(super) const INTERNAL_ERROR: i64 = -32603;

/// The protocol revisions the initialize handshake accepts, oldest first.
const PROTOCOL_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// One agent session's state.
#[derive(Debug, Default)]
pub struct Session {
    initialized: bool,
    /// SHA-256 of each request id used (kind-tagged), so that a replay is refused in fixed
    /// memory per id.
    seen_ids: std::collections::HashSet<[u8; 32]>,
}

/// Serves one connection.
pub(super) async fn serve<S>(gateway: &Gateway, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut session = Session::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut read).take(MAX_MESSAGE_BYTES as u64 + 1);
        let n = match tokio::time::timeout(IDLE_TIMEOUT, limited.read_until(b'\n', &mut line)).await
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "mcp: read failed");
                return;
            }
            Err(_) => {
                tracing::debug!("mcp: session idle; closing");
                return;
            }
        };
        if n == 0 {
            return;
        }
        if line.len() > MAX_MESSAGE_BYTES {
            let reply = error(
                Value::Null,
                INVALID_REQUEST,
                &format!("message over the {MAX_MESSAGE_BYTES}-byte limit; closing"),
            );
            let _ = send(&mut write, &reply).await;
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(reply) = gateway.handle(&mut session, &line).await
            && send(&mut write, &reply).await.is_err()
        {
            return;
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, reply: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).unwrap_or_default();
    bytes.push(b'\n');
    let write = async {
        w.write_all(&bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn error_data(id: Value, code: i64, message: &str, data: Value) -> Value {
    if data.is_null() {
        return error(id, code, message);
    }
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
}

fn result(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

impl Gateway {
    /// Answers one message of `session` (`None` for a notification or a response).
    pub async fn handle(&self, session: &mut Session, line: &[u8]) -> Option<Value> {
        let msg: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Some(error(
                    Value::Null,
                    PARSE_ERROR,
                    &format!("parse error: {e}"),
                ));
            }
        };
        let Value::Object(mut msg) = msg else {
            let what = if msg.is_array() {
                "batches are not supported"
            } else {
                "a message must be a JSON object"
            };
            return Some(error(Value::Null, INVALID_REQUEST, what));
        };
        if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            let id = msg.get("id").cloned().unwrap_or(Value::Null);
            return Some(error(id, INVALID_REQUEST, "`jsonrpc` must be \"2.0\""));
        }
        // Taken, not copied: the rest of the message is read only by reference, and a
        // `tools/call`'s arguments can be large.
        let mut params = msg.remove("params").unwrap_or(Value::Null);
        let Some(method) = msg.get("method") else {
            // A response (to nothing: this endpoint sends no requests) is dropped.
            return None;
        };
        let Some(method) = method.as_str() else {
            let id = msg.get("id").cloned().unwrap_or(Value::Null);
            return Some(error(id, INVALID_REQUEST, "`method` must be a string"));
        };
        let Some(id) = msg.get("id").cloned() else {
            // Notifications (initialized, cancelled, ...) need no answer.
            return None;
        };
        let id_key = match &id {
            Value::String(s) => format!("s:{s}"),
            Value::Number(n) if n.is_i64() || n.is_u64() => format!("n:{n}"),
            _ => {
                return Some(error(
                    Value::Null,
                    INVALID_REQUEST,
                    "`id` must be a string or an integer",
                ));
            }
        };
        if id_key.len() > MAX_ID_BYTES + 2 {
            // Not echoed back: the reply would be as large as the id.
            return Some(error(
                Value::Null,
                INVALID_REQUEST,
                &format!("`id` is over {MAX_ID_BYTES} bytes"),
            ));
        }
        let id_key: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(id_key.as_bytes()).into()
        };
        if session.seen_ids.contains(&id_key) {
            return Some(error(
                id.clone(),
                INVALID_REQUEST,
                &format!("request id {id} was already used in this session"),
            ));
        }
        if session.seen_ids.len() >= MAX_REQUEST_IDS {
            return Some(error(
                id,
                INVALID_REQUEST,
                "this session has used its request ids; open a new session",
            ));
        }
        session.seen_ids.insert(id_key);
        match method {
            "initialize" => {
                session.initialized = true;
                let asked = params.get("protocolVersion").and_then(Value::as_str);
                let version = asked
                    .filter(|v| PROTOCOL_VERSIONS.contains(v))
                    .unwrap_or(PROTOCOL_VERSIONS[PROTOCOL_VERSIONS.len() - 1]);
                Some(result(
                    id,
                    json!({
                        "protocolVersion": version,
                        "capabilities": {"tools": {"listChanged": false}},
                        "serverInfo": {"name": "nanoclaw-gateway",
                            "version": env!("CARGO_PKG_VERSION")},
                        "instructions": format!("Tools of profile `{}`; every call is checked \
                            against it by the host.", self.config.policy.profile().name),
                    }),
                ))
            }
            "ping" => Some(result(id, json!({}))),
            "tools/list" | "tools/call" if !session.initialized => Some(error(
                id,
                INVALID_REQUEST,
                "the session is not initialized: send `initialize` first",
            )),
            "tools/list" => Some(result(id, json!({"tools": self.tools}))),
            "tools/call" => {
                let args = params.get_mut("arguments").map(Value::take);
                let Some(name) = params.get("name").and_then(Value::as_str) else {
                    return Some(error(
                        id,
                        INVALID_PARAMS,
                        "tools/call needs a string `name`",
                    ));
                };
                let args = match args {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(m)) => m,
                    Some(_) => {
                        return Some(error(
                            id,
                            INVALID_PARAMS,
                            "tools/call `arguments` must be an object",
                        ));
                    }
                };
                let size = serde_json::to_vec(&args).map(|v| v.len()).unwrap_or(0);
                if size > MAX_ARGUMENT_BYTES {
                    return Some(error(
                        id,
                        INVALID_PARAMS,
                        &format!(
                            "tools/call arguments are {size} bytes, over the \
                             {MAX_ARGUMENT_BYTES}-byte limit"
                        ),
                    ));
                }
                match self.call(name, args).await {
                    Ok(value) => Some(result(id, value)),
                    Err((code, message, data)) => Some(error_data(id, code, &message, data)),
                }
            }
            other => Some(error(
                id,
                METHOD_NOT_FOUND,
                &format!(
                    "method `{}` is not served: this endpoint serves initialize, ping, \
                     tools/list and tools/call",
                    other.chars().take(64).collect::<String>().escape_debug()
                ),
            )),
        }
    }
}
