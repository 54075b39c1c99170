//! The echo diagnostic: every byte read from a connection is written back, until EOF.
//!
//! Used two ways: the sidecar listens on `ECHO_PORT` for host-initiated connections
//! ([`serve`]), and the host can ask over the control channel for a guest-initiated connection
//! (`HostToGuest::EchoConnect`), which runs [`echo`] too. Together they prove both directions of
//! vsock work.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::vsock::{VsockListener, VsockStream};
use crate::{ErrorChain, HalfClose};

/// The most echo connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;

/// The size of the echo buffer.
const CHUNK: usize = 64 * 1024;

/// The pause after a failed accept, so a persistent error (such as no free descriptors) does
/// not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Errors of the echo diagnostic.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// Reading from the peer failed.
    #[error("echo read failed")]
    Read(#[source] io::Error),
    /// Writing back to the peer failed.
    #[error("echo write failed")]
    Write(#[source] io::Error),
    /// Closing the write side failed.
    #[error("echo shutdown failed")]
    Shutdown(#[source] io::Error),
    /// Accepting a connection failed.
    #[error("echo accept failed")]
    Accept(#[source] io::Error),
}

/// Echoes everything from `stream` back to it until EOF, then shuts down the write side.
/// Returns the number of bytes echoed.
pub fn echo<S: Read + Write + HalfClose>(stream: &mut S) -> Result<u64, EchoError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(EchoError::Read(e)),
        };
        stream.write_all(&buf[..n]).map_err(EchoError::Write)?;
        total += n as u64;
    }
    stream.shutdown_write().map_err(EchoError::Shutdown)?;
    Ok(total)
}

/// Something that accepts echo connections: a vsock listener in the guest, a Unix listener in
/// tests.
pub trait Listener {
    /// The accepted stream.
    type Stream: Read + Write + HalfClose + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> Result<Self::Stream, EchoError>;
}

impl Listener for VsockListener {
    type Stream = VsockStream;
    fn accept(&self) -> Result<VsockStream, EchoError> {
        VsockListener::accept(self).map_err(|e| EchoError::Accept(io::Error::other(e)))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept(&self) -> Result<UnixStream, EchoError> {
        UnixListener::accept(self)
            .map(|(s, _)| s)
            .map_err(EchoError::Accept)
    }
}

/// Decrements the live-connection count when an echo thread ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `echo` on its own thread. Logs the outcome; never panics.
pub fn spawn_echo<S: Read + Write + HalfClose + Send + 'static>(
    mut stream: S,
    what: &'static str,
) -> io::Result<()> {
    spawn_thread(move || match echo(&mut stream) {
        Ok(n) => tracing::debug!(what, bytes = n, "echo done"),
        Err(e) => tracing::warn!(what, error = %ErrorChain(&e), "echo ended"),
    })
}

fn spawn_thread(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("echo".into())
        .spawn(f)
        .map(drop)
}

/// Accepts connections forever and echoes each on its own thread, at most
/// [`MAX_CONNECTIONS`] at once.
pub fn serve<L: Listener>(listener: &L) -> ! {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let mut stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "echo accept");
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("echo: too many connections, closing one");
            continue;
        }
        let slot = Slot(Arc::clone(&live));
        let spawned = spawn_thread(move || {
            let _slot = slot;
            if let Err(e) = echo(&mut stream) {
                tracing::debug!(error = %ErrorChain(&e), "echo connection ended");
            }
        });
        // On failure the closure, and so the slot and the stream, were dropped.
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start echo thread");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Pushes `data` into `stream` on one thread while reading the echo on this one.
    pub(crate) fn push_and_read_back(stream: UnixStream, data: Vec<u8>) -> Vec<u8> {
        let mut writer = stream.try_clone().unwrap();
        let sent = data.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        let mut reader = stream;
        reader.read_to_end(&mut back).unwrap();
        w.join().unwrap();
        back
    }

    pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn echoes_one_mebibyte_then_closes_its_write_side() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || echo(&mut guest).unwrap());
        let data = pattern(1 << 20, 7);
        let back = push_and_read_back(host, data.clone());
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
        assert_eq!(t.join().unwrap(), 1 << 20);
    }

    #[test]
    fn empty_connection_echoes_nothing() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || echo(&mut guest).unwrap());
        assert!(push_and_read_back(host, Vec::new()).is_empty());
        assert_eq!(t.join().unwrap(), 0);
    }

    #[test]
    fn serves_several_connections_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || serve(&listener));

        // Open all connections first so they are live together, then drive them in parallel.
        let conns: Vec<_> = (0..4u8)
            .map(|i| (i, UnixStream::connect(&path).unwrap()))
            .collect();
        let handles: Vec<_> = conns
            .into_iter()
            .map(|(i, s)| {
                std::thread::spawn(move || {
                    let data = pattern(256 * 1024, i);
                    let back = push_and_read_back(s, data.clone());
                    back == data
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap(), "a connection got wrong bytes back");
        }
    }
}
