//! The local streamable-HTTP MCP endpoint on `127.0.0.1:<local_port>`, path `/mcp`.
//!
//! A small HTTP/1.1 server of our own on std threads (the sidecar has no async runtime, and
//! the MCP transport needs only this much): `POST /mcp` with one JSON-RPC message as the body,
//! answered with `application/json` (the streamable-HTTP transport's JSON response mode, no
//! SSE stream). An `initialize` without an `Mcp-Session-Id` opens a session: a new connection
//! to the host gateway, whose id comes back in the `Mcp-Session-Id` header; later requests
//! carry it. A notification is answered `202 Accepted`; `DELETE /mcp` ends the session; `GET`
//! is `405` (no server-initiated stream). Bodies over [`MAX_MESSAGE_BYTES`] are `413`.
//! At most [`MAX_SESSIONS`] sessions and [`MAX_CONNECTIONS`] HTTP connections at once.
//!
//! # A session outlives its host connection
//!
//! The host connection of a session can go away under it: a VM restored from a snapshot (or a
//! copy of one) has every vsock connection reset, and its host gateway is a new one. The
//! session keeps the agent's `initialize` and `notifications/initialized`; when a message
//! cannot be written to the old connection, or a broken one is found, a new host connection is
//! opened, the two are replayed on it (the answer to `initialize` is read and dropped), and
//! the message goes out there. So the agent's session id goes on working across a restore.
//! A message the host may have received before its connection broke (its answer did not come)
//! is never sent again: that request answers `502`, and the next one reconnects.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{EarlyFilter, MAX_MESSAGE_BYTES, McpError, Verdict, read_line};
use crate::ControlStream;

/// Most MCP sessions open at once.
pub const MAX_SESSIONS: usize = 64;
/// Most HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request head (request line and headers), in bytes.
const MAX_HEAD: usize = 16 << 10;

/// One session's host connection.
struct HostConn<S> {
    write: S,
    read: BufReader<S>,
    /// The session's `initialize` and `notifications/initialized`, to replay on a new host
    /// connection (see the module doc).
    replay: Vec<Vec<u8>>,
    /// The connection failed while a message was in flight: the next one reconnects first.
    broken: bool,
}

/// Most messages a session keeps to replay.
const MAX_REPLAY: usize = 2;

/// A session's host connection, shared by the HTTP connections that use the session.
type SharedConn<S> = Arc<Mutex<HostConn<S>>>;

/// The endpoint's shared state.
pub struct Endpoint<S, C> {
    filter: EarlyFilter,
    connect: C,
    sessions: Mutex<HashMap<String, SharedConn<S>>>,
    connections: AtomicUsize,
}

impl<S, C> std::fmt::Debug for Endpoint<S, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

/// Binds `127.0.0.1:port`.
pub fn bind(port: u16) -> Result<TcpListener, McpError> {
    TcpListener::bind(("127.0.0.1", port)).map_err(|source| McpError::Listen { port, source })
}

impl<S, C> Endpoint<S, C>
where
    S: Read + Write + ControlStream,
    C: Fn() -> std::io::Result<S> + Send + Sync + 'static,
{
    /// An endpoint that opens host connections with `connect`.
    pub fn new(filter: EarlyFilter, connect: C) -> Arc<Self> {
        Arc::new(Self {
            filter,
            connect,
            sessions: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        })
    }

    /// Serves `listener` forever, one thread per HTTP connection.
    pub fn serve(self: Arc<Self>, listener: &TcpListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                let mut s = stream;
                let _ = respond(&mut s, 503, &[], b"too many connections");
                continue;
            }
            let me = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("mcp-http".into())
                .spawn(move || {
                    me.connection(stream);
                    me.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Serves requests on one HTTP connection until it closes or breaks the protocol.
    fn connection(&self, stream: TcpStream) {
        let Ok(mut write) = stream.try_clone() else {
            return;
        };
        let mut read = BufReader::new(stream);
        while let Ok(Some(req)) = read_request(&mut read) {
            let close = req.close;
            let (status, mut headers, body) = self.answer(req);
            if close {
                headers.push(("Connection", "close".into()));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if respond(&mut write, status, &headers, &body).is_err() || close {
                return;
            }
        }
    }

    fn answer(&self, req: Request) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
        if req.path != "/mcp" {
            return (404, vec![], b"not found".to_vec());
        }
        match req.method.as_str() {
            "POST" => {}
            "DELETE" => {
                if let Some(id) = &req.session {
                    self.lock_sessions().remove(id);
                }
                return (200, vec![], vec![]);
            }
            "GET" => return (405, vec![("Allow", "POST, DELETE".into())], vec![]),
            _ => return (405, vec![("Allow", "POST, DELETE".into())], vec![]),
        }
        let Some(body) = req.body else {
            return (413, vec![], b"body over the size limit".to_vec());
        };
        if let Verdict::Reply(reply) = self.filter.inbound(&body) {
            return json_answer(req.session, serde_json::to_vec(&reply).unwrap_or_default());
        }
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let method = parsed
            .as_ref()
            .and_then(|v| v.get("method"))
            .and_then(Value::as_str);
        let id = parsed.as_ref().and_then(|v| v.get("id")).cloned();
        let (session_id, conn) = match &req.session {
            Some(sid) => match self.lock_sessions().get(sid) {
                Some(conn) => (sid.clone(), Arc::clone(conn)),
                None => return (404, vec![], b"unknown MCP session".to_vec()),
            },
            None if method == Some("initialize") => match self.open_session() {
                Ok(pair) => pair,
                Err(status) => return (status, vec![], b"cannot open a session".to_vec()),
            },
            // Without a session, a message still reaches the host (a one-off connection),
            // so malformed input gets the host's own answer.
            None => match self.open_session() {
                Ok((sid, conn)) => {
                    self.lock_sessions().remove(&sid);
                    (String::new(), conn)
                }
                Err(status) => return (status, vec![], b"cannot reach the host".to_vec()),
            },
        };
        let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.broken && self.reconnect(&mut conn).is_err() {
            self.lock_sessions().remove(&session_id);
            return (502, vec![], b"the host closed the MCP session".to_vec());
        }
        let send = |conn: &mut HostConn<S>| {
            conn.write
                .write_all(&body)
                .and_then(|()| conn.write.write_all(b"\n"))
        };
        // Nothing of a failed write reached the host: the message may go out again on a new
        // connection.
        let sent =
            send(&mut conn).or_else(|_| self.reconnect(&mut conn).and_then(|()| send(&mut conn)));
        if sent.is_err() {
            self.lock_sessions().remove(&session_id);
            return (502, vec![], b"the host closed the MCP session".to_vec());
        }
        if !session_id.is_empty()
            && matches!(method, Some("initialize" | "notifications/initialized"))
            && conn.replay.len() < MAX_REPLAY
        {
            conn.replay.push(body.clone());
        }
        // A notification or a response gets no answer; a request gets exactly one line back,
        // and so does anything the host could not parse (its error, id null).
        let expects_answer = match parsed.as_ref() {
            Some(Value::Object(m)) if m.get("jsonrpc").and_then(Value::as_str) == Some("2.0") => {
                match m.get("method") {
                    None => false,
                    Some(Value::String(_)) => id.is_some(),
                    Some(_) => true,
                }
            }
            _ => true,
        };
        if !expects_answer {
            return (202, session_header(&session_id), vec![]);
        }
        match read_line(&mut conn.read) {
            Ok(Some(line)) => json_answer(
                (!session_id.is_empty()).then_some(session_id),
                self.filter.outbound(line),
            ),
            _ => {
                // The host may have acted on it: not sent again. The session reconnects with
                // its next message.
                conn.broken = true;
                (502, vec![], b"the host closed the MCP session".to_vec())
            }
        }
    }

    /// Opens a new host connection for a session and replays its `initialize` and
    /// `notifications/initialized` on it (see the module doc).
    fn reconnect(&self, conn: &mut HostConn<S>) -> std::io::Result<()> {
        if conn.replay.is_empty() {
            return Err(std::io::Error::other("nothing to replay: not a session"));
        }
        let mut write = (self.connect)()?;
        let mut read = BufReader::new(write.try_clone()?);
        for message in &conn.replay {
            write.write_all(message)?;
            write.write_all(b"\n")?;
            let is_request = serde_json::from_slice::<Value>(message)
                .ok()
                .is_some_and(|v| v.get("id").is_some());
            if is_request && read_line(&mut read)?.is_none() {
                return Err(std::io::Error::other(
                    "the host closed the replayed session",
                ));
            }
        }
        conn.write = write;
        conn.read = read;
        conn.broken = false;
        tracing::info!("mcp: a session's host connection was opened again");
        Ok(())
    }

    fn open_session(&self) -> Result<(String, SharedConn<S>), u16> {
        if self.lock_sessions().len() >= MAX_SESSIONS {
            return Err(503);
        }
        let stream = (self.connect)().map_err(|e| {
            tracing::warn!(error = %e, "mcp: cannot reach the host gateway");
            502u16
        })?;
        let read = stream.try_clone().map_err(|_| 502u16)?;
        let mut raw = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
        let sid: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let conn = Arc::new(Mutex::new(HostConn {
            write: stream,
            read: BufReader::new(read),
            replay: Vec::new(),
            broken: false,
        }));
        self.lock_sessions().insert(sid.clone(), Arc::clone(&conn));
        Ok((sid, conn))
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SharedConn<S>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn session_header(sid: &str) -> Vec<(&'static str, String)> {
    if sid.is_empty() {
        vec![]
    } else {
        vec![("Mcp-Session-Id", sid.to_owned())]
    }
}

fn json_answer(
    session: Option<String>,
    body: Vec<u8>,
) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    headers.extend(session_header(session.as_deref().unwrap_or("")));
    (200, headers, body)
}

/// One parsed HTTP request. `body` is `None` when it was over the limit.
struct Request {
    method: String,
    path: String,
    session: Option<String>,
    body: Option<Vec<u8>>,
    /// The client asked to close the connection after the answer.
    close: bool,
}

/// Reads one request; `Ok(None)` at a clean EOF, `Err` on anything malformed (the connection
/// is then closed).
fn read_request<R: BufRead>(r: &mut R) -> std::io::Result<Option<Request>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut head_len = 0;
    let mut line = String::new();
    let mut next_line = |r: &mut R, line: &mut String| -> std::io::Result<usize> {
        line.clear();
        let n = r
            .take((MAX_HEAD - head_len.min(MAX_HEAD)) as u64)
            .read_line(line)?;
        head_len += n;
        if head_len >= MAX_HEAD {
            return Err(bad("request head too long"));
        }
        Ok(n)
    };
    if next_line(r, &mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().ok_or_else(|| bad("no method"))?.to_owned();
    let path = parts.next().ok_or_else(|| bad("no path"))?.to_owned();
    let path = path.split('?').next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut session = None;
    let mut close = false;
    loop {
        if next_line(r, &mut line)? == 0 {
            return Err(bad("request head cut short"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').ok_or_else(|| bad("bad header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().map_err(|_| bad("bad content-length"))?;
        } else if name.eq_ignore_ascii_case("mcp-session-id") {
            session = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked bodies are not supported"));
        }
    }
    if length > MAX_MESSAGE_BYTES {
        // The body is not read: the answer closes the connection.
        return Ok(Some(Request {
            method,
            path,
            session,
            body: None,
            close: true,
        }));
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path,
        session,
        body: Some(body),
        close,
    }))
}

fn respond<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if status == 413 {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()?;
    if status == 413 {
        return Err(std::io::Error::other("closing after an oversized body"));
    }
    Ok(())
}
