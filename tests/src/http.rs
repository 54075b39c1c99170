//! Plain HTTP/1.1 by hand, as an agent speaks to the sidecar's proxy: one request per
//! connection, read to the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// Sends `request` (raw HTTP/1.1) to `addr` and reads the answer to its end: the status and the
/// body (chunked decoding done).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_with_head(addr, request);
    (status, body)
}

/// [`http`], with the response head (status line and headers) as well.
pub fn http_with_head(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let head = text.split_once("\r\n\r\n").expect("a response head").0;
    let (status, body) = parse_response(&raw);
    (status, head.to_owned(), body)
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
