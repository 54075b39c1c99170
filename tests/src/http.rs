//! Plain HTTP/1.1 by hand, as an agent speaks to the sidecar's proxy: a request on a fresh
//! connection ([`http`]), or several on one persistent connection ([`read_response`]), each
//! answer read by its framing (`content-length`, chunked, or to the close).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends `request` (raw HTTP/1.1) to `addr` on a new connection and reads one answer: the
/// status and the body (chunked decoding done).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_with_head(addr, request);
    (status, body)
}

/// [`http`], with the response head (status line and headers) as well.
pub fn http_with_head(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let (status, head, body) = read_response(&mut r).expect("a response");
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Reads one response from a persistent connection by its framing: the status, the head
/// (status line and headers) and the body (chunked decoding done). `None` when the connection
/// closed before a response began.
///
/// # Panics
///
/// On a malformed response.
pub fn read_response<R: BufRead>(r: &mut R) -> Option<(u16, String, Vec<u8>)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if r.read_until(b'\n', &mut head).unwrap() == 0 {
            assert!(head.is_empty(), "closed mid-head");
            return None;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    assert!(resp.parse(&head).unwrap().is_complete());
    let status = resp.code.expect("a status");
    let get = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).expect("a chunk size");
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end).unwrap();
                assert_eq!(end, "\r\n");
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            r.read_exact(&mut body[start..]).unwrap();
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).unwrap();
            assert_eq!(&crlf, b"\r\n");
        }
    } else if let Some(len) = get("content-length") {
        body.resize(len.trim().parse().expect("a length"), 0);
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    let head = String::from_utf8_lossy(&head)
        .trim_end_matches("\r\n")
        .to_owned();
    Some((status, head, body))
}

/// The status and the body (chunked decoding done) of a whole HTTP/1.1 response.
///
/// # Panics
///
/// If `raw` has no response head or no status.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        (status, out)
    } else {
        (status, body.to_owned())
    }
}
