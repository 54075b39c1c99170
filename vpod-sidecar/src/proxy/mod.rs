//! The local credential proxy: the agent's HTTP endpoint on `127.0.0.1` in the guest, whose
//! requests the user's device makes with the credential injected.
//!
//! # Modes
//!
//! - **Base URL**: the agent uses `http://127.0.0.1:PORT/<service>/<path>` as its API base;
//!   the device sends `<path>` to the first allowed host of credential `<service>`.
//! - **`HTTP_PROXY`**: the agent sends absolute URIs, `GET http://api.example.com/v1/x`; the
//!   device calls `https://api.example.com/v1/x` with the credential that allows that host.
//!   `https://` URIs and `CONNECT` are refused (a TLS tunnel would leave nothing to inject
//!   into); the agent uses `http://` and the device adds TLS.
//!
//! # Connections and sessions
//!
//! Each agent connection is served on its own thread, at most [`MAX_CONNECTIONS`] at once.
//! It is an HTTP/1.1 persistent connection: requests are read and answered one after the
//! other, until the agent sends `Connection: close` (or speaks HTTP/1.0), waits longer than
//! [`AGENT_IDLE`] for its next request, or has sent [`MAX_REQUESTS_PER_CONNECTION`]. Any
//! request refused before it was read whole (a bad head or body), any failure and any
//! fallback-path request closes the connection (`connection: close` on the answer), so a
//! connection never goes on out of step. Requests written back to back before their answers
//! (pipelining) are not read ahead: each is read only once the one before it has been answered
//! whole, so they are served in order or, after a refusal, the connection closes; they never
//! desynchronise.
//!
//! A request body has a `Content-Length` or is chunked (`Transfer-Encoding: chunked`, decoded
//! here by `read_chunked`; any other transfer coding is 501, both framings at once 400). Either
//! way it is read whole, at most [`MAX_BODY`], before it goes to the device. The request head
//! is parsed by `httparse`, and so are chunk-size lines (`httparse::parse_chunk_size`); what
//! is hand-written is the small loop around them (a bounded line at a time, every CRLF
//! checked, the total bounded), since the proxy runs on blocking threads and needs nothing
//! else of an HTTP stack.
//!
//! For each request the proxy takes a session to the device from its pool ([`pool`]: an idle
//! end-to-end session ([`channel::DeviceSession`]), or a new relay connection (the `connect`
//! closure: vsock in the guest, a Unix socket in tests) and handshake), sends the head and the
//! body, then streams the answer back as it arrives: a `Head`, then each `Body` as one HTTP
//! chunk, written at once (so SSE streams), and `End` as the last chunk. A `Refused` answer
//! becomes that HTTP status with the reason as a plain-text body; a channel failure before the
//! head is a 502 saying so (and the session is dropped; the next request makes a new one).
//!
//! The agent never sees a credential on this path: the device injects it, and the response
//! carries none.

pub mod channel;
pub mod fallback;
pub mod pool;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_bytes::ByteBuf;
use shared_proto::credential::{
    DeviceToSidecar, HeaderLine, MAX_CHUNK, ProxyRequest, ProxyTarget, SidecarToDevice,
};

use channel::{DeviceSession, Received};
use pool::{RelayStream, SessionPool};

pub use crate::identity::IdentityCell;

/// Agent connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head.
pub const MAX_HEAD: usize = 64 * 1024;
/// The largest request body.
pub const MAX_BODY: usize = 16 << 20;
/// The most request headers.
const MAX_REQUEST_HEADERS: usize = 96;
/// How long an agent connection may wait for its next request (and the longest pause while a
/// request is being read) before it is closed.
pub const AGENT_IDLE: Duration = Duration::from_secs(15);
/// The most requests one agent connection carries; the last is answered with
/// `connection: close`.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 1000;
/// The longest chunk-size or trailer line of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// How much of the agent's bytes are buffered at once.
const AGENT_BUFFER: usize = 64 * 1024;

/// Errors of the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The relay connection failed.
    #[error("relay connection")]
    Relay(#[source] std::io::Error),
    /// The host has no device linked.
    #[error("no device available: {0}")]
    Unavailable(String),
    /// The relay or device broke the protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// A Noise operation failed (handshake with the wrong device key, forged message).
    #[error("noise")]
    Noise(#[source] snow::Error),
    /// A message did not decode or validate.
    #[error("message")]
    Wire(#[source] shared_proto::credential::CredentialError),
    /// The agent connection failed.
    #[error("agent connection")]
    Agent(#[source] std::io::Error),
}

/// What the proxy needs from the sidecar's boot.
pub struct ProxyIdentity {
    /// The boot X25519 secret (its public half is in `Hello`).
    pub boot_secret: zeroize::Zeroizing<[u8; 32]>,
    /// The boot id.
    pub boot_id: [u8; 16],
}

impl std::fmt::Debug for ProxyIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyIdentity")
            .field("boot_id", &self.boot_id)
            .finish_non_exhaustive()
    }
}

/// Serves `listener` forever on the primary path, one thread per agent connection, with the
/// current identity of `identity` (see [`crate::identity`]).
pub fn serve<S, F>(listener: &TcpListener, identity: Arc<IdentityCell>, connect: Arc<F>)
where
    S: RelayStream + 'static,
    F: Fn() -> std::io::Result<S> + Send + Sync + 'static,
{
    serve_with(listener, identity, connect, None);
}

/// Serves `listener` forever, on the fallback path when `fallback` is given (see
/// [`fallback`]), else on the primary path.
pub fn serve_with<S, F>(
    listener: &TcpListener,
    identity: Arc<IdentityCell>,
    connect: Arc<F>,
    fallback: Option<Arc<fallback::Fallback>>,
) where
    S: RelayStream + 'static,
    F: Fn() -> std::io::Result<S> + Send + Sync + 'static,
{
    let pool = Arc::new(SessionPool::new(identity, connect));
    let active = Arc::new(AtomicUsize::new(0));
    for agent in listener.incoming() {
        let Ok(agent) = agent else { continue };
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            let mut agent = agent;
            let _ = write_simple(&mut agent, 503, "too many proxy connections", false);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let pool = Arc::clone(&pool);
        let fallback = fallback.clone();
        let done = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                if let Err(e) = handle(agent, &pool, fallback.as_deref()) {
                    tracing::debug!(error = %crate::ErrorChain(&e), "proxy connection");
                }
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A parsed agent request.
#[derive(Debug)]
struct AgentRequest {
    head: ProxyRequest,
    body: Vec<u8>,
    /// Whether the agent lets the connection carry another request after this one.
    keep_alive: bool,
}

/// Why a request was not forwarded: the status and message for the agent.
type Reject = (u16, String);

fn reject(status: u16, msg: impl Into<String>) -> Reject {
    (status, msg.into())
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads one line (up to and including `\n`) of at most `max` bytes into `out`; the number of
/// bytes read (0 at the end of the stream).
fn read_line<R: BufRead>(r: &mut R, out: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    let before = out.len();
    let n = r.take(max as u64).read_until(b'\n', out)?;
    if n == max && !out[before..].ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    Ok(n)
}

/// Reads the next request; `Ok(None)` when the agent closed the connection, or let it idle
/// past [`AGENT_IDLE`], before sending a byte of one.
fn read_request<R: BufRead>(r: &mut R) -> Result<Option<AgentRequest>, Reject> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let room = MAX_HEAD + 1 - head.len();
        match read_line(r, &mut head, room) {
            Ok(0) if head.is_empty() => return Ok(None),
            Ok(0) => return Err(reject(400, "connection closed mid-request")),
            Ok(_) => {}
            Err(e) if timed_out(&e) && head.is_empty() => return Ok(None),
            Err(e) if timed_out(&e) => return Err(reject(408, "the request came too slowly")),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(reject(431, "request head too large"));
            }
            Err(_) => return Err(reject(400, "cannot read the request")),
        }
        if head.len() > MAX_HEAD {
            return Err(reject(431, "request head too large"));
        }
        if head == b"\r\n" || head == b"\n" {
            // Tolerated before a request line (RFC 9112 section 2.2).
            head.clear();
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(reject(400, "malformed request")),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default();
    if method == "CONNECT" || target.starts_with("https://") {
        return Err(reject(
            405,
            "use http:// URLs through this proxy; the device makes the HTTPS call",
        ));
    }
    let target = parse_target(target)?;
    let mut lines: Vec<HeaderLine> = Vec::new();
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = req.version != Some(1);
    for h in req.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        if lower == "transfer-encoding" {
            let value = std::str::from_utf8(h.value).unwrap_or_default().trim();
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err(reject(
                    501,
                    "the only transfer coding accepted is a single `chunked`",
                ));
            }
            chunked = true;
        }
        if lower == "content-length" {
            let len = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| reject(400, "bad Content-Length"))?;
            if content_length.is_some_and(|c| c != len) {
                return Err(reject(400, "conflicting Content-Length"));
            }
            content_length = Some(len);
        }
        if lower == "connection" {
            let value = String::from_utf8_lossy(h.value);
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                close = true;
            }
        }
        if shared_proto::credential::HOP_BY_HOP_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        lines.push((h.name.to_owned(), ByteBuf::from(h.value.to_vec())));
    }
    let body = match (chunked, content_length) {
        (true, Some(_)) => {
            return Err(reject(
                400,
                "a request body has either Content-Length or chunked framing, not both",
            ));
        }
        (true, None) => read_chunked(r)?,
        (false, len) => {
            let len = len.unwrap_or(0);
            if len > MAX_BODY {
                return Err(reject(413, "request body too large"));
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).map_err(|e| body_error(&e))?;
            body
        }
    };
    Ok(Some(AgentRequest {
        head: ProxyRequest {
            target,
            method,
            headers: lines,
        },
        body,
        keep_alive: !close,
    }))
}

fn body_error(e: &std::io::Error) -> Reject {
    if timed_out(e) {
        reject(408, "the request body came too slowly")
    } else {
        reject(400, "connection closed mid-body")
    }
}

/// Decodes a chunked body (RFC 9112 section 7.1): chunk-size lines parsed by `httparse`, each
/// chunk's data followed by exactly CRLF, the total at most [`MAX_BODY`], trailer fields read
/// and dropped. Anything else is 400 (413 over the bound).
fn read_chunked<R: BufRead>(r: &mut R) -> Result<Vec<u8>, Reject> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(r, &mut line, MAX_CHUNK_LINE) {
            Ok(0) => return Err(reject(400, "connection closed mid-body")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(reject(400, "chunk-size line too long"));
            }
            Err(e) => return Err(body_error(&e)),
        }
        // httparse reads an empty line as size 0: a size needs at least one hex digit.
        if !line.first().is_some_and(u8::is_ascii_hexdigit) {
            return Err(reject(400, "bad chunk size"));
        }
        let size = match httparse::parse_chunk_size(&line) {
            Ok(httparse::Status::Complete((used, size))) if used == line.len() => size,
            _ => return Err(reject(400, "bad chunk size")),
        };
        if size == 0 {
            break;
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|s| body.len().saturating_add(*s) <= MAX_BODY)
            .ok_or_else(|| reject(413, "request body too large"))?;
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| body_error(&e))?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).map_err(|e| body_error(&e))?;
        if &crlf != b"\r\n" {
            return Err(reject(400, "chunk data not followed by CRLF"));
        }
    }
    // Trailer fields, then the empty line; their bytes count against the head bound.
    let mut trailer = 0usize;
    loop {
        line.clear();
        match read_line(r, &mut line, MAX_CHUNK_LINE) {
            Ok(0) => return Err(reject(400, "connection closed in the trailer")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(reject(400, "trailer line too long"));
            }
            Err(e) => return Err(body_error(&e)),
        }
        if line == b"\r\n" {
            return Ok(body);
        }
        trailer += line.len();
        if !line.ends_with(b"\r\n") || !line.contains(&b':') || trailer > MAX_HEAD {
            return Err(reject(400, "malformed trailer"));
        }
    }
}

/// The proxy target of a request target: an absolute `http://` URI or `/<service>/<path>`.
fn parse_target(target: &str) -> Result<ProxyTarget, Reject> {
    if let Some(rest) = target.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let authority = match authority.strip_suffix(":80") {
            Some(a) => a,
            None => authority,
        };
        Ok(ProxyTarget::Absolute {
            authority: authority.to_ascii_lowercase(),
            path_and_query: path.to_owned(),
        })
    } else if let Some(rest) = target.strip_prefix('/') {
        let (name, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if name.is_empty() {
            return Err(reject(404, "the path must start with /<service>/"));
        }
        Ok(ProxyTarget::Service {
            name: name.to_owned(),
            path_and_query: path,
        })
    } else {
        Err(reject(400, "unsupported request target"))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Answers with a plain-text message; the connection stays open only when `keep` says so.
fn write_simple<W: Write>(w: &mut W, status: u16, msg: &str, keep: bool) -> std::io::Result<()> {
    let body = format!("nanoclaw credential proxy: {msg}\n");
    let connection = if keep { "" } else { "connection: close\r\n" };
    write!(
        w,
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{connection}\r\n{body}",
        reason(status),
        body.len()
    )?;
    w.flush()
}

/// Serves one agent connection: its requests one after the other.
fn handle<S, F>(
    agent: TcpStream,
    pool: &SessionPool<S, F>,
    fallback: Option<&fallback::Fallback>,
) -> Result<(), ProxyError>
where
    S: RelayStream,
    F: Fn() -> std::io::Result<S>,
{
    let _ = agent.set_nodelay(true);
    agent
        .set_read_timeout(Some(AGENT_IDLE))
        .map_err(ProxyError::Agent)?;
    let mut writer = agent.try_clone().map_err(ProxyError::Agent)?;
    let mut reader = BufReader::with_capacity(AGENT_BUFFER, agent);
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err((status, msg)) => {
                return write_simple(&mut writer, status, &msg, false).map_err(ProxyError::Agent);
            }
        };
        if let Some(fallback) = fallback {
            // The fallback copies the upstream's own `connection: close` answer: one request.
            return fallback::handle(request, pool, fallback, &mut writer);
        }
        let keep = request.keep_alive && served < MAX_REQUESTS_PER_CONNECTION;
        if !forward(request, pool, &mut writer, keep)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Forwards one request through a pooled session and answers the agent; whether the agent
/// connection may carry another request.
fn forward<S, F>(
    request: AgentRequest,
    pool: &SessionPool<S, F>,
    writer: &mut TcpStream,
    keep: bool,
) -> Result<bool, ProxyError>
where
    S: RelayStream,
    F: Fn() -> std::io::Result<S>,
{
    let mut session = match pool.take() {
        Ok(s) => s,
        Err(e) => {
            let msg = crate::ErrorChain(&e).to_string();
            let status = if matches!(e, ProxyError::Unavailable(_)) {
                503
            } else {
                502
            };
            write_simple(writer, status, &msg, false).map_err(ProxyError::Agent)?;
            return Ok(false);
        }
    };
    let result = exchange(&mut session, request, writer, keep);
    pool.give_back(session);
    result
}

/// Sends the request on `session` and relays the answer to the agent.
fn exchange<S: Read + Write>(
    session: &mut DeviceSession<S>,
    request: AgentRequest,
    writer: &mut TcpStream,
    keep: bool,
) -> Result<bool, ProxyError> {
    let head_only = request.head.method == "HEAD";
    let first = send_request(session, request).and_then(|()| session.recv());
    let first = match first {
        Ok(m) => m,
        Err(e) => {
            let msg = crate::ErrorChain(&e).to_string();
            write_simple(writer, 502, &msg, false).map_err(ProxyError::Agent)?;
            return Ok(false);
        }
    };
    let (status, headers) = match first {
        DeviceToSidecar::Head { status, headers } => (status, headers),
        DeviceToSidecar::Refused { status, reason } => {
            write_simple(writer, status, &reason, keep).map_err(ProxyError::Agent)?;
            return Ok(keep);
        }
        DeviceToSidecar::Body(_) | DeviceToSidecar::End | DeviceToSidecar::Sealed { .. } => {
            write_simple(writer, 502, "the device answered out of order", false)
                .map_err(ProxyError::Agent)?;
            return Ok(false);
        }
    };
    let bodyless = head_only || status < 200 || status == 204 || status == 304;
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (name, value) in &headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !bodyless {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    writer.write_all(&out).map_err(ProxyError::Agent)?;
    let mut chunk = Vec::with_capacity(MAX_CHUNK + 16);
    loop {
        match session.recv_borrowed()? {
            Received::Body(bytes) => {
                if bodyless || bytes.is_empty() {
                    continue;
                }
                chunk.clear();
                chunk.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
                chunk.extend_from_slice(bytes);
                chunk.extend_from_slice(b"\r\n");
                writer.write_all(&chunk).map_err(ProxyError::Agent)?;
            }
            Received::Message(DeviceToSidecar::End) => {
                if !bodyless {
                    writer.write_all(b"0\r\n\r\n").map_err(ProxyError::Agent)?;
                }
                writer.flush().map_err(ProxyError::Agent)?;
                return Ok(keep);
            }
            _ => {
                return Err(ProxyError::Protocol(
                    "unexpected message in a response body",
                ));
            }
        }
    }
}

fn send_request<S: Read + Write>(
    session: &mut DeviceSession<S>,
    request: AgentRequest,
) -> Result<(), ProxyError> {
    session.send(&SidecarToDevice::Request(request.head))?;
    for chunk in request.body.chunks(MAX_CHUNK) {
        session.send_body(chunk)?;
    }
    session.send(&SidecarToDevice::End)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<AgentRequest, Reject> {
        read_request(&mut raw.as_bytes()).map(|r| r.expect("a request"))
    }

    #[test]
    fn base_url_and_proxy_modes() {
        let r =
            parse("GET /openai/v1/models?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
                .unwrap();
        assert_eq!(
            r.head.target,
            ProxyTarget::Service {
                name: "openai".into(),
                path_and_query: "/v1/models?x=1".into()
            }
        );
        assert_eq!(r.head.headers.len(), 1);
        let r = parse("GET /openai?x HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            r.head.target,
            ProxyTarget::Service {
                name: "openai".into(),
                path_and_query: "/?x".into()
            }
        );
        let r = parse(
            "POST http://API.example.com:80/v1/chat HTTP/1.1\r\nContent-Length: 2\r\nProxy-Authorization: x\r\n\r\nhi",
        )
        .unwrap();
        assert_eq!(
            r.head.target,
            ProxyTarget::Absolute {
                authority: "api.example.com".into(),
                path_and_query: "/v1/chat".into()
            }
        );
        assert!(r.head.headers.is_empty());
        assert_eq!(r.body, b"hi");
    }

    #[test]
    fn bad_requests_get_clear_statuses() {
        let status = |raw: &str| parse(raw).unwrap_err().0;
        assert_eq!(status("CONNECT api.example.com:443 HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("GET https://api.example.com/ HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status("GET /s HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status("GET /s HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET /s HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            400
        );
        assert_eq!(status("garbage\r\n\r\n"), 400);
        assert_eq!(status("GET /s HTTP/1.1\r\n"), 400);
    }

    #[test]
    fn chunked_bodies_are_decoded_strictly() {
        let chunked = |body: &str| {
            parse(&format!(
                "POST /s/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            ))
        };
        let r = chunked("3\r\nabc\r\nA;name=v\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abc0123456789");
        assert!(
            r.head.headers.is_empty(),
            "transfer-encoding is not forwarded"
        );
        assert_eq!(chunked("0\r\n\r\n").unwrap().body, b"");
        let status = |body: &str| chunked(body).unwrap_err().0;
        // Bad sizes, data not followed by CRLF, a bad trailer, an early end.
        assert_eq!(status("x\r\nabc\r\n0\r\n\r\n"), 400);
        assert_eq!(status("\r\n0\r\n\r\n"), 400);
        assert_eq!(status("-1\r\n"), 400);
        assert_eq!(status("1 1\r\na\r\n0\r\n\r\n"), 400);
        assert_eq!(status("fffffffffffffffff\r\n"), 400);
        assert_eq!(status("3\r\nabcd\r\n0\r\n\r\n"), 400);
        assert_eq!(status("3\r\nabc"), 400);
        assert_eq!(status("3\r\nabc\r\n0\r\nbroken\r\n\r\n"), 400);
        assert_eq!(status("3\r\nabc\r\n0\r\n"), 400);
        assert_eq!(status(&format!("{}\r\n", "1".repeat(MAX_CHUNK_LINE))), 400);
        // Over the body bound, in one chunk or summed over several.
        assert_eq!(status(&format!("{:x}\r\n", MAX_BODY + 1)), 413);
        assert_eq!(status(&format!("{:x}\r\n", u64::MAX >> 8)), 413);
        let half = "a".repeat(MAX_BODY / 2);
        let over = format!(
            "{:x}\r\n{half}\r\n{:x}\r\n{half}\r\n1\r\na\r\n0\r\n\r\n",
            half.len(),
            half.len()
        );
        assert_eq!(status(&over), 413);
        // Other codings, two framings.
        let status = |raw: &str| parse(raw).unwrap_err().0;
        assert_eq!(
            status("POST /s/x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status(
                "POST /s/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            501
        );
        assert_eq!(
            status(
                "POST /s/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"
            ),
            400
        );
    }

    #[test]
    fn persistence_follows_the_version_and_connection_header() {
        assert!(parse("GET /s/x HTTP/1.1\r\n\r\n").unwrap().keep_alive);
        assert!(
            !parse("GET /s/x HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET /s/x HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        // Requests back to back are read one at a time, each whole.
        let mut raw: &[u8] =
            b"POST /s/a HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET /s/b HTTP/1.1\r\n\r\n";
        let first = read_request(&mut raw).unwrap().unwrap();
        assert_eq!(first.body, b"ab");
        let second = read_request(&mut raw).unwrap().unwrap();
        assert_eq!(second.head.method, "GET");
        // Then the end of the connection: no request, no error.
        assert!(read_request(&mut raw).unwrap().is_none());
        // A head that never ends is bounded.
        let endless = format!("GET /s/x HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD + 10));
        assert_eq!(parse(&endless).unwrap_err().0, 431);
        assert_eq!(
            parse("GET /s HTTP/1.1\r\nContent-Length: +5\r\n\r\nabcde")
                .unwrap_err()
                .0,
            400
        );
    }
}
