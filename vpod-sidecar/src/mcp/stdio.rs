//! The stdio shim: `vpod-sidecar mcp-stdio`, started by the agent as a stdio MCP server.
//!
//! Lines from stdin pass the early filter and go to the host; the host's lines (and the
//! filter's own answers) go to stdout, one JSON-RPC message per line. It ends when stdin ends
//! (after the host's last answers) or the host closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use super::{EarlyFilter, McpError, Verdict, read_line};
use crate::ControlStream;

/// Relays between the agent (`input`, `output`) and the host connection `host` until either
/// side ends.
pub fn run<S, R, W>(filter: &EarlyFilter, input: R, output: W, host: S) -> Result<(), McpError>
where
    S: Read + Write + ControlStream + Send + 'static,
    R: Read,
    W: Write + Send + 'static,
{
    let output = Arc::new(Mutex::new(output));
    let from_host = host.try_clone().map_err(McpError::Io)?;
    let out = Arc::clone(&output);
    let back_filter = filter.clone();
    let reader = std::thread::Builder::new()
        .name("mcp-stdio-host".into())
        .spawn(move || -> Result<(), McpError> {
            let mut from_host = BufReader::new(from_host);
            while let Some(line) = read_line(&mut from_host).map_err(McpError::Io)? {
                let line = back_filter.outbound(line);
                write_line(&out, &line)?;
            }
            Ok(())
        })
        .map_err(McpError::Io)?;

    let mut host = host;
    let mut input = BufReader::new(input);
    let sent = (|| -> Result<(), McpError> {
        while let Some(line) = read_line(&mut input).map_err(McpError::Io)? {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match filter.inbound(&line) {
                Verdict::Forward => {
                    host.write_all(&line).map_err(McpError::Io)?;
                    host.write_all(b"\n").map_err(McpError::Io)?;
                }
                Verdict::Reply(reply) => {
                    let bytes = serde_json::to_vec(&reply).unwrap_or_default();
                    write_line(&output, &bytes)?;
                }
            }
        }
        Ok(())
    })();
    // Stdin ended: let the host finish answering, then stop.
    let _ = crate::HalfClose::shutdown_write(&host);
    let read = reader
        .join()
        .unwrap_or_else(|_| Err(McpError::Io(std::io::Error::other("relay thread panicked"))));
    let _ = host.shutdown_both();
    sent.and(read)
}

fn write_line<W: Write>(out: &Mutex<W>, line: &[u8]) -> Result<(), McpError> {
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    out.write_all(line).map_err(McpError::Io)?;
    out.write_all(b"\n").map_err(McpError::Io)?;
    out.flush().map_err(McpError::Io)
}

/// Reads lines from a buffered reader (used by tests to read the shim's output).
pub fn lines<R: BufRead>(r: &mut R) -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some(l) = read_line(r)? {
        out.push(l);
    }
    Ok(out)
}
