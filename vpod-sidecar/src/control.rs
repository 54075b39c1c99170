//! The control connection to the host.
//!
//! [`run`] connects (with [`Backoff`]), runs a [`Session`] and reconnects when the session
//! fails, until the host asks for a shutdown or refuses the hello. A session sends `Hello`, waits
//! for `HelloAck` and then dispatches `HostToGuest` messages. Everything is generic over the
//! stream, so the tests drive it over Unix sockets.

use std::io::{self, ErrorKind, Read, Write};
use std::time::Duration;

use shared_proto::frame::{FrameDecoder, FrameError, encode_frame};
use shared_proto::handshake::{HandshakeError, check_hello_answer};
use shared_proto::message::{GuestToHost, HostToGuest};

use crate::ErrorChain;

/// The first retry delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// The longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The read buffer size.
const READ_CHUNK: usize = 64 * 1024;

/// Errors that end a control session; the sidecar reconnects after each.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting to the host failed.
    #[error("cannot connect to the host")]
    Connect(#[source] io::Error),
    /// Encoding our message failed.
    #[error("cannot encode a message")]
    Encode(#[source] FrameError),
    /// Writing to the host failed.
    #[error("cannot write to the host")]
    Write(#[source] io::Error),
    /// Reading from the host failed.
    #[error("cannot read from the host")]
    Read(#[source] io::Error),
    /// The host closed the connection.
    #[error("the host closed the connection")]
    Closed,
    /// The host sent bytes that are not a valid frame.
    #[error("malformed frame from the host")]
    Frame(#[source] FrameError),
    /// The host sent something other than the handshake answer first.
    #[error("handshake out of order")]
    Handshake(#[source] HandshakeError),
}

/// Capped exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    attempts: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_INITIAL, BACKOFF_MAX)
    }
}

impl Backoff {
    /// A backoff from `initial` doubling to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
            attempts: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        d
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// Whether the failure before the next delay is worth a log line: the first few, then
    /// every 16th, so that an absent host does not flood the serial console.
    pub fn worth_logging(&self) -> bool {
        self.attempts < 4 || self.attempts.is_multiple_of(16)
    }

    /// Starts over at `initial` (after a successful handshake).
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.attempts = 0;
    }
}

/// How a session ended when it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The host sent `Shutdown`.
    Shutdown,
    /// The host refused our hello.
    Rejected(HandshakeError),
}

/// What the session asks of its owner when the host sends `EchoConnect`.
pub trait EchoConnector {
    /// Connects to host port `port` and starts echoing on it; returns a short reason on
    /// failure, which is sent back to the host.
    fn echo_connect(&mut self, port: u32) -> Result<(), String>;
}

impl<F: FnMut(u32) -> Result<(), String>> EchoConnector for F {
    fn echo_connect(&mut self, port: u32) -> Result<(), String> {
        self(port)
    }
}

/// One control connection.
#[derive(Debug)]
pub struct Session<'a> {
    hello: &'a GuestToHost,
    acked: bool,
}

impl<'a> Session<'a> {
    /// A session that opens with `hello`.
    pub fn new(hello: &'a GuestToHost) -> Self {
        Self {
            hello,
            acked: false,
        }
    }

    /// Whether the host acknowledged our hello.
    pub fn acked(&self) -> bool {
        self.acked
    }

    /// Runs the session on `stream` until it ends or fails.
    pub fn run<S: Read + Write>(
        &mut self,
        stream: &mut S,
        echo: &mut dyn EchoConnector,
    ) -> Result<SessionEnd, ControlError> {
        send(stream, self.hello)?;
        let mut decoder = FrameDecoder::<HostToGuest>::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return Err(ControlError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ControlError::Read(e)),
            };
            decoder.push(&buf[..n]);
            while let Some(msg) = decoder.decode_next().map_err(ControlError::Frame)? {
                if let Some(end) = self.handle(stream, msg, echo)? {
                    return Ok(end);
                }
            }
        }
    }

    fn handle<S: Write>(
        &mut self,
        stream: &mut S,
        msg: HostToGuest,
        echo: &mut dyn EchoConnector,
    ) -> Result<Option<SessionEnd>, ControlError> {
        if !self.acked {
            return match check_hello_answer(&msg) {
                Ok(()) => {
                    self.acked = true;
                    tracing::info!("control: hello acknowledged");
                    Ok(None)
                }
                Err(e @ HandshakeError::UnexpectedMessage { .. }) => {
                    Err(ControlError::Handshake(e))
                }
                Err(e) => Ok(Some(SessionEnd::Rejected(e))),
            };
        }
        match msg {
            HostToGuest::Shutdown => Ok(Some(SessionEnd::Shutdown)),
            HostToGuest::EchoConnect { port } => {
                if let Err(reason) = echo.echo_connect(port) {
                    tracing::warn!(port, %reason, "echo connect failed");
                    send(
                        stream,
                        &GuestToHost::Error {
                            message: format!("echo connect to port {port}: {reason}"),
                        },
                    )?;
                }
                Ok(None)
            }
            HostToGuest::HelloAck { .. } | HostToGuest::HelloReject { .. } => {
                reply_error(stream, "handshake already done")
            }
            HostToGuest::RunAgent(_)
            | HostToGuest::AgentStdin { .. }
            | HostToGuest::Signal { .. } => {
                reply_error(stream, "agent control is not supported by this sidecar yet")
            }
        }
    }
}

fn reply_error<S: Write>(
    stream: &mut S,
    message: &str,
) -> Result<Option<SessionEnd>, ControlError> {
    send(
        stream,
        &GuestToHost::Error {
            message: message.to_owned(),
        },
    )?;
    Ok(None)
}

fn send<S: Write>(stream: &mut S, msg: &GuestToHost) -> Result<(), ControlError> {
    let frame = encode_frame(msg).map_err(ControlError::Encode)?;
    stream.write_all(&frame).map_err(ControlError::Write)?;
    stream.flush().map_err(ControlError::Write)
}

/// Connects and runs sessions until one ends with a shutdown or a reject. Between attempts it
/// sleeps for `backoff`'s next delay; the backoff starts over after each acknowledged hello.
pub fn run<S, C>(
    mut connect: C,
    hello: &GuestToHost,
    backoff: &mut Backoff,
    echo: &mut dyn EchoConnector,
) -> SessionEnd
where
    S: Read + Write,
    C: FnMut() -> io::Result<S>,
{
    loop {
        let result = connect()
            .map_err(ControlError::Connect)
            .and_then(|mut stream| {
                let mut session = Session::new(hello);
                let result = session.run(&mut stream, echo);
                if session.acked() {
                    backoff.reset();
                }
                result
            });
        match result {
            Ok(end) => return end,
            Err(e) => {
                if backoff.worth_logging() {
                    tracing::warn!(attempts = backoff.attempts(), error = %ErrorChain(&e), "control");
                }
            }
        }
        std::thread::sleep(backoff.next_delay());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::PROTOCOL_VERSION;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    fn hello() -> GuestToHost {
        GuestToHost::Hello {
            protocol_version: PROTOCOL_VERSION,
            sidecar_version: "test".into(),
            boot_id: [3; 16],
            ephemeral_public_key: [4; 32],
        }
    }

    /// A scripted host: reads the hello, sends `script`, then collects what the guest sends
    /// until it closes the connection.
    fn host(mut s: UnixStream, script: Vec<u8>) -> JoinHandle<Vec<GuestToHost>> {
        std::thread::spawn(move || {
            s.write_all(&script).unwrap();
            s.shutdown(std::net::Shutdown::Write).ok();
            let mut bytes = Vec::new();
            s.read_to_end(&mut bytes).ok();
            let mut d = FrameDecoder::<GuestToHost>::new();
            d.push(&bytes);
            let mut got = Vec::new();
            while let Ok(Some(m)) = d.decode_next() {
                got.push(m);
            }
            got
        })
    }

    fn frames(msgs: &[HostToGuest]) -> Vec<u8> {
        msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect()
    }

    fn ack() -> HostToGuest {
        HostToGuest::HelloAck {
            protocol_version: PROTOCOL_VERSION,
        }
    }

    fn run_one(script: Vec<u8>) -> (Result<SessionEnd, ControlError>, Vec<u32>, Vec<GuestToHost>) {
        let (mut guest, h) = UnixStream::pair().unwrap();
        let host = host(h, script);
        let hello = hello();
        let mut ports = Vec::new();
        let mut echo = |port| {
            ports.push(port);
            Ok(())
        };
        let result = Session::new(&hello).run(&mut guest, &mut echo);
        drop(guest);
        (result, ports, host.join().unwrap())
    }

    #[test]
    fn hello_ack_echo_connect_then_shutdown() {
        let script = frames(&[
            ack(),
            HostToGuest::EchoConnect { port: 5555 },
            HostToGuest::Shutdown,
        ]);
        let (result, ports, sent) = run_one(script);
        assert_eq!(result.unwrap(), SessionEnd::Shutdown);
        assert_eq!(ports, vec![5555]);
        assert_eq!(sent, vec![hello()]);
    }

    #[test]
    fn hello_reject_ends_the_session_with_the_reason() {
        let script = frames(&[HostToGuest::HelloReject {
            reason: "not today".into(),
            host_protocol_version: PROTOCOL_VERSION,
        }]);
        let (result, _, _) = run_one(script);
        assert_eq!(
            result.unwrap(),
            SessionEnd::Rejected(HandshakeError::Rejected {
                reason: "not today".into()
            })
        );
    }

    #[test]
    fn an_ack_with_another_version_is_a_mismatch() {
        let script = frames(&[HostToGuest::HelloAck {
            protocol_version: PROTOCOL_VERSION + 1,
        }]);
        let (result, _, _) = run_one(script);
        assert_eq!(
            result.unwrap(),
            SessionEnd::Rejected(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
    }

    #[test]
    fn garbage_is_a_frame_error() {
        let mut script = frames(&[ack()]);
        script.extend_from_slice(&[0, 0, 0, 2, 0xff, 0xff]);
        let (result, _, _) = run_one(script);
        assert!(matches!(result, Err(ControlError::Frame(_))), "{result:?}");
    }

    #[test]
    fn an_oversize_frame_is_refused_from_its_prefix() {
        let mut script = frames(&[ack()]);
        script.extend_from_slice(&u32::MAX.to_be_bytes());
        let (result, _, _) = run_one(script);
        assert!(
            matches!(
                result,
                Err(ControlError::Frame(FrameError::TooLarge { .. }))
            ),
            "{result:?}"
        );
    }

    #[test]
    fn a_command_before_the_ack_is_out_of_order() {
        let script = frames(&[HostToGuest::EchoConnect { port: 1 }]);
        let (result, ports, _) = run_one(script);
        assert!(
            matches!(result, Err(ControlError::Handshake(_))),
            "{result:?}"
        );
        assert!(ports.is_empty());
    }

    #[test]
    fn eof_is_closed() {
        let (result, _, _) = run_one(frames(&[ack()]));
        assert!(matches!(result, Err(ControlError::Closed)), "{result:?}");
    }

    #[test]
    fn agent_commands_and_failed_echo_connects_are_answered_with_errors() {
        let script = frames(&[
            ack(),
            HostToGuest::Signal { signo: 9 },
            HostToGuest::EchoConnect { port: 9 },
            HostToGuest::Shutdown,
        ]);
        let (mut guest, h) = UnixStream::pair().unwrap();
        let host = host(h, script);
        let hello = hello();
        let mut echo = |_| Err("refused".to_owned());
        let result = Session::new(&hello).run(&mut guest, &mut echo);
        drop(guest);
        assert_eq!(result.unwrap(), SessionEnd::Shutdown);
        let sent = host.join().unwrap();
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], hello);
        assert!(
            matches!(&sent[1], GuestToHost::Error { message } if message.contains("not supported"))
        );
        assert!(matches!(&sent[2], GuestToHost::Error { message } if message.contains("refused")));
    }

    #[test]
    fn run_reconnects_after_failures_until_shutdown() {
        // Attempt 1: connect fails. Attempt 2: the host sends garbage. Attempt 3: the host
        // drops the connection after the ack. Attempt 4: ack, then shutdown.
        let scripts = [
            None,
            Some(vec![0xde, 0xad, 0xbe, 0xef, 0]),
            Some(frames(&[ack()])),
            Some(frames(&[ack(), HostToGuest::Shutdown])),
        ];
        let mut attempt = 0;
        let mut hosts = Vec::new();
        let connect = || {
            let script = scripts.get(attempt).cloned().flatten();
            attempt += 1;
            match script {
                None => Err(io::Error::from(ErrorKind::ConnectionRefused)),
                Some(script) => {
                    let (guest, h) = UnixStream::pair()?;
                    hosts.push(host(h, script));
                    Ok(guest)
                }
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        let mut echo = |_| Ok(());
        let end = run(connect, &hello(), &mut backoff, &mut echo);
        assert_eq!(end, SessionEnd::Shutdown);
        assert_eq!(attempt, 4);
        for h in hosts {
            assert_eq!(h.join().unwrap()[0], hello());
        }
    }

    /// The host side of the end-to-end boot test, over Unix sockets instead of vsock: hello,
    /// ack, a guest-initiated echo connection carrying 1 MiB, then shutdown.
    #[test]
    fn serves_the_host_end_to_end_sequence() {
        use crate::echo::tests::{pattern, push_and_read_back};
        use shared_proto::handshake::answer_hello;
        use std::os::unix::net::UnixListener;

        let dir = tempfile::tempdir().unwrap();
        let port = 5000u32;
        let echo_listener =
            UnixListener::bind(dir.path().join(format!("vsock.sock_{port}"))).unwrap();
        let (mut guest, mut h) = UnixStream::pair().unwrap();
        let host = std::thread::spawn(move || {
            let mut d = FrameDecoder::<GuestToHost>::new();
            let mut buf = [0u8; 4096];
            let first = loop {
                if let Some(m) = d.decode_next().unwrap() {
                    break m;
                }
                let n = h.read(&mut buf).unwrap();
                assert_ne!(n, 0, "guest closed before hello");
                d.push(&buf[..n]);
            };
            let verdict = answer_hello(&first);
            assert_eq!(verdict.outcome, Ok(()));
            h.write_all(&encode_frame(&verdict.reply).unwrap()).unwrap();
            h.write_all(&encode_frame(&HostToGuest::EchoConnect { port }).unwrap())
                .unwrap();
            let (conn, _) = echo_listener.accept().unwrap();
            let data = pattern(1 << 20, 42);
            assert!(
                push_and_read_back(conn, data.clone()) == data,
                "echo differs"
            );
            h.write_all(&encode_frame(&HostToGuest::Shutdown).unwrap())
                .unwrap();
        });
        let hello = hello();
        let dir_path = dir.path().to_owned();
        let mut echo = move |port: u32| -> Result<(), String> {
            let s = UnixStream::connect(dir_path.join(format!("vsock.sock_{port}")))
                .map_err(|e| e.to_string())?;
            crate::echo::spawn_echo(s, "test").map_err(|e| e.to_string())
        };
        let end = Session::new(&hello).run(&mut guest, &mut echo).unwrap();
        assert_eq!(end, SessionEnd::Shutdown);
        host.join().unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let got: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![50, 100, 200, 300, 300, 300]);
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }
}
