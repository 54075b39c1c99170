//! The daemon's HTTP API on its Unix socket, spoken by hand (no CLI in between): a call whose
//! answer is read whole ([`call`]), or one whose answer streams and is read a line at a time as
//! it comes ([`open`], [`Streamed`]), such as a live migration's events.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a read of the answer may wait.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `METHOD PATH` with `body` as JSON, on a new connection to the API socket `socket`; the
/// status and the whole body.
///
/// # Panics
///
/// If the daemon does not answer.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, String) {
    let mut answer = open(socket, method, path, body);
    let status = answer.status;
    (status, answer.rest())
}

/// `METHOD PATH` with `body` as JSON, on a new connection to the API socket `socket`, with the
/// answer's head read; the body is read as it comes.
///
/// # Panics
///
/// If the daemon cannot be reached or its answer has no head.
pub fn open(socket: &Path, method: &str, path: &str, body: Option<&serde_json::Value>) -> Streamed {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: daemon\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut conn = BufReader::new(stream);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = conn.read_until(b'\n', &mut head).unwrap();
        assert!(
            n > 0,
            "{method} {path}: the daemon closed mid-head: {head:?}"
        );
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    assert!(resp.parse(&head).unwrap().is_complete());
    let status = resp.code.expect("a status");
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let framing = if header("transfer-encoding").as_deref() == Some("chunked") {
        Framing::Chunked {
            left: 0,
            started: false,
        }
    } else if let Some(len) = header("content-length") {
        Framing::Length(len.parse().expect("a length"))
    } else {
        Framing::ToEnd
    };
    Streamed {
        status,
        body: BufReader::new(Body { conn, framing }),
    }
}

/// An answer whose head is read and whose body is read as it comes.
#[derive(Debug)]
pub struct Streamed {
    /// The status.
    pub status: u16,
    body: BufReader<Body>,
}

impl Streamed {
    /// The body's next line, without its newline; `None` at its end.
    ///
    /// # Panics
    ///
    /// If nothing comes for a minute, or the connection breaks.
    pub fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.body.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_owned()),
            Err(e) => panic!("read the answer: {e}"),
        }
    }

    /// The rest of the body.
    ///
    /// # Panics
    ///
    /// If the connection breaks first.
    pub fn rest(&mut self) -> String {
        let mut rest = String::new();
        self.body
            .read_to_string(&mut rest)
            .unwrap_or_else(|e| panic!("read the answer: {e}"));
        rest
    }
}

/// How the body ends.
#[derive(Debug)]
enum Framing {
    /// `Transfer-Encoding: chunked`: `left` bytes of the chunk at hand; `started` once the
    /// first chunk's size was read (each later size line follows the last chunk's CRLF).
    Chunked { left: usize, started: bool },
    /// `Content-Length`: this many bytes left.
    Length(usize),
    /// To the connection's end.
    ToEnd,
}

/// The body of an answer, decoded by its framing.
#[derive(Debug)]
struct Body {
    conn: BufReader<UnixStream>,
    framing: Framing,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        match &mut self.framing {
            Framing::ToEnd => self.conn.read(buf),
            Framing::Length(left) => {
                let want = buf.len().min(*left);
                let n = self.conn.read(&mut buf[..want])?;
                *left -= n;
                Ok(n)
            }
            Framing::Chunked { left, started } => {
                if *left == 0 {
                    let mut line = String::new();
                    if *started {
                        self.conn.read_line(&mut line)?;
                        if line != "\r\n" {
                            return Err(bad(format!("no CRLF after a chunk: {line:?}")));
                        }
                        line.clear();
                    }
                    if self.conn.read_line(&mut line)? == 0 {
                        // The connection closed where a chunk's size was due.
                        return Err(bad("the body ended without its last chunk".into()));
                    }
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| bad(format!("a chunk size: {line:?}")))?;
                    *started = true;
                    if size == 0 {
                        // Trailers, if any, up to the empty line; then the end for good.
                        loop {
                            line.clear();
                            if self.conn.read_line(&mut line)? == 0 || line == "\r\n" {
                                break;
                            }
                        }
                        self.framing = Framing::Length(0);
                        return Ok(0);
                    }
                    *left = size;
                }
                let want = buf.len().min(*left);
                let n = self.conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(bad("the connection closed mid-chunk".into()));
                }
                *left -= n;
                Ok(n)
            }
        }
    }
}
