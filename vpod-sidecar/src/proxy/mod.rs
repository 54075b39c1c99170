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
//! # One request per connection
//!
//! Each agent connection carries one request (`Connection: close`) on its own thread, at most
//! [`MAX_CONNECTIONS`] at once. The request body needs a `Content-Length` (chunked request
//! bodies get 411). For each request the proxy opens a fresh relay connection (the `connect`
//! closure: vsock in the guest, a Unix socket in tests) and an end-to-end session
//! ([`channel::DeviceSession`]), sends the head and the body, then streams the answer back as it
//! arrives: a `Head`, then each `Body` as one HTTP chunk, flushed at once (so SSE streams), and
//! `End` as the last chunk. A `Refused` answer becomes that HTTP status with the reason as a
//! plain-text body; a channel failure before the head is a 502 saying so.
//!
//! The agent never sees a credential on this path: the device injects it, and the response
//! carries none.

pub mod channel;
pub mod fallback;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_bytes::ByteBuf;
use shared_proto::credential::{
    DeviceToSidecar, HeaderLine, MAX_CHUNK, ProxyRequest, ProxyTarget, SidecarToDevice,
};

use channel::DeviceSession;

/// Agent connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head.
pub const MAX_HEAD: usize = 64 * 1024;
/// The largest request body.
pub const MAX_BODY: usize = 16 << 20;
/// The most request headers.
const MAX_REQUEST_HEADERS: usize = 96;

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

/// Serves `listener` forever on the primary path, one thread per agent connection.
pub fn serve<S, F>(listener: &TcpListener, identity: Arc<ProxyIdentity>, connect: Arc<F>)
where
    S: Read + Write + Send + 'static,
    F: Fn() -> std::io::Result<S> + Send + Sync + 'static,
{
    serve_with(listener, identity, connect, None);
}

/// Serves `listener` forever, on the fallback path when `fallback` is given (see
/// [`fallback`]), else on the primary path.
pub fn serve_with<S, F>(
    listener: &TcpListener,
    identity: Arc<ProxyIdentity>,
    connect: Arc<F>,
    fallback: Option<Arc<fallback::Fallback>>,
) where
    S: Read + Write + Send + 'static,
    F: Fn() -> std::io::Result<S> + Send + Sync + 'static,
{
    let active = Arc::new(AtomicUsize::new(0));
    for agent in listener.incoming() {
        let Ok(agent) = agent else { continue };
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            let mut agent = agent;
            let _ = write_simple(&mut agent, 503, "too many proxy connections");
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let identity = Arc::clone(&identity);
        let connect = Arc::clone(&connect);
        let fallback = fallback.clone();
        let done = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || {
                if let Err(e) = handle(agent, &identity, &*connect, fallback.as_deref()) {
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
}

/// Why a request was not forwarded: the status and message for the agent.
type Reject = (u16, String);

fn reject(status: u16, msg: impl Into<String>) -> Reject {
    (status, msg.into())
}

fn read_request<R: BufRead>(r: &mut R) -> Result<AgentRequest, Reject> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = r
            .read_until(b'\n', &mut head)
            .map_err(|_| reject(400, "cannot read the request"))?;
        if n == 0 {
            return Err(reject(400, "connection closed mid-request"));
        }
        if head.len() > MAX_HEAD {
            return Err(reject(431, "request head too large"));
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
    let target = if let Some(rest) = target.strip_prefix("http://") {
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let authority = match authority.strip_suffix(":80") {
            Some(a) => a,
            None => authority,
        };
        ProxyTarget::Absolute {
            authority: authority.to_ascii_lowercase(),
            path_and_query: path.to_owned(),
        }
    } else if let Some(rest) = target.strip_prefix('/') {
        let (name, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if name.is_empty() {
            return Err(reject(404, "the path must start with /<service>/"));
        }
        ProxyTarget::Service {
            name: name.to_owned(),
            path_and_query: path,
        }
    } else {
        return Err(reject(400, "unsupported request target"));
    };
    let mut lines: Vec<HeaderLine> = Vec::new();
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        let lower = h.name.to_ascii_lowercase();
        if lower == "transfer-encoding" {
            return Err(reject(411, "send the request body with a Content-Length"));
        }
        if lower == "content-length" {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| reject(400, "bad Content-Length"))?;
            if content_length.is_some_and(|c| c != len) {
                return Err(reject(400, "conflicting Content-Length"));
            }
            content_length = Some(len);
        }
        if shared_proto::credential::HOP_BY_HOP_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        lines.push((h.name.to_owned(), ByteBuf::from(h.value.to_vec())));
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(reject(413, "request body too large"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|_| reject(400, "connection closed mid-body"))?;
    Ok(AgentRequest {
        head: ProxyRequest {
            target,
            method,
            headers: lines,
        },
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_simple<W: Write>(w: &mut W, status: u16, msg: &str) -> std::io::Result<()> {
    let body = format!("nanoclaw credential proxy: {msg}\n");
    write!(
        w,
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )?;
    w.flush()
}

/// Serves one agent connection.
fn handle<S, F>(
    agent: TcpStream,
    identity: &ProxyIdentity,
    connect: &F,
    fallback: Option<&fallback::Fallback>,
) -> Result<(), ProxyError>
where
    S: Read + Write,
    F: Fn() -> std::io::Result<S>,
{
    let _ = agent.set_nodelay(true);
    let mut writer = agent.try_clone().map_err(ProxyError::Agent)?;
    let mut reader = BufReader::new(agent);
    let request = match read_request(&mut reader) {
        Ok(r) => r,
        Err((status, msg)) => {
            return write_simple(&mut writer, status, &msg).map_err(ProxyError::Agent);
        }
    };
    if let Some(fallback) = fallback {
        return fallback::handle(request, identity, connect, fallback, &mut writer);
    }
    let head_only = request.head.method == "HEAD";
    let mut session = match open_and_send(request, identity, connect) {
        Ok(s) => s,
        Err(e) => {
            let msg = crate::ErrorChain(&e).to_string();
            let status = if matches!(e, ProxyError::Unavailable(_)) {
                503
            } else {
                502
            };
            return write_simple(&mut writer, status, &msg).map_err(ProxyError::Agent);
        }
    };
    let first = match session.recv() {
        Ok(m) => m,
        Err(e) => {
            let msg = crate::ErrorChain(&e).to_string();
            return write_simple(&mut writer, 502, &msg).map_err(ProxyError::Agent);
        }
    };
    let (status, headers) = match first {
        DeviceToSidecar::Head { status, headers } => (status, headers),
        DeviceToSidecar::Refused { status, reason } => {
            return write_simple(&mut writer, status, &reason).map_err(ProxyError::Agent);
        }
        DeviceToSidecar::Body(_) | DeviceToSidecar::End | DeviceToSidecar::Sealed { .. } => {
            return write_simple(&mut writer, 502, "the device answered out of order")
                .map_err(ProxyError::Agent);
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
    out.extend_from_slice(b"connection: close\r\n\r\n");
    writer.write_all(&out).map_err(ProxyError::Agent)?;
    writer.flush().map_err(ProxyError::Agent)?;
    loop {
        match session.recv()? {
            DeviceToSidecar::Body(bytes) => {
                if bodyless || bytes.is_empty() {
                    continue;
                }
                let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                chunk.extend_from_slice(&bytes);
                chunk.extend_from_slice(b"\r\n");
                writer.write_all(&chunk).map_err(ProxyError::Agent)?;
                writer.flush().map_err(ProxyError::Agent)?;
            }
            DeviceToSidecar::End => {
                if !bodyless {
                    writer.write_all(b"0\r\n\r\n").map_err(ProxyError::Agent)?;
                }
                return writer.flush().map_err(ProxyError::Agent);
            }
            _ => {
                return Err(ProxyError::Protocol(
                    "unexpected message in a response body",
                ));
            }
        }
    }
}

fn open_and_send<S, F>(
    request: AgentRequest,
    identity: &ProxyIdentity,
    connect: &F,
) -> Result<DeviceSession<S>, ProxyError>
where
    S: Read + Write,
    F: Fn() -> std::io::Result<S>,
{
    let stream = connect().map_err(ProxyError::Relay)?;
    let mut session = DeviceSession::open(stream, &identity.boot_secret, &identity.boot_id)?;
    session.send(&SidecarToDevice::Request(request.head))?;
    for chunk in request.body.chunks(MAX_CHUNK) {
        session.send(&SidecarToDevice::Body(chunk.to_vec()))?;
    }
    session.send(&SidecarToDevice::End)?;
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<AgentRequest, Reject> {
        read_request(&mut raw.as_bytes())
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
        assert_eq!(
            status("POST /s/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
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
}
