//! The control connection to the host.
//!
//! [`run`] connects (with [`Backoff`]), runs a [`Session`] and reconnects when the session
//! fails, until the host asks for a shutdown, refuses the hello, or the agent's end was
//! delivered. A session sends `Hello`, waits for `HelloAck`, then dispatches `HostToGuest`
//! messages to a [`HostRequests`] on this thread while a writer thread sends the
//! [`Outbox`]'s frames. Everything is generic over the stream, so the tests drive it over Unix
//! sockets.

use std::io::{self, ErrorKind, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shared_proto::frame::{FrameDecoder, FrameError, encode_frame};
use shared_proto::handshake::{HandshakeError, check_hello_answer};
use shared_proto::message::{AgentSpec, GuestNetwork, GuestToHost, HostToGuest};

use crate::outbox::Outbox;
use crate::{ControlStream, ErrorChain};

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
    /// Duplicating the socket for the writer thread failed.
    #[error("cannot clone the control socket")]
    Clone(#[source] io::Error),
    /// Starting the writer thread failed.
    #[error("cannot start the control writer")]
    Writer(#[source] io::Error),
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
    /// The agent's final `AgentExited` was written, and the host then closed the connection
    /// (or did not within [`FLUSH_TIMEOUT`]).
    AgentDone,
    /// The sidecar took a new identity on the host's `Reidentify`: the session ends so that
    /// the next one opens with this `Hello`. [`run`] reconnects at once and never returns it.
    Reidentified(Box<GuestToHost>),
}

/// What the session asks of its owner for each host request.
pub trait HostRequests {
    /// `EchoConnect`: connects to host port `port` and starts echoing on it; returns a short
    /// reason on failure, which is sent back to the host.
    fn echo_connect(&mut self, port: u32) -> Result<(), String>;
    /// `RunAgent`.
    fn run_agent(&mut self, spec: AgentSpec);
    /// `AgentStdin` (empty `data` is EOF).
    fn agent_stdin(&mut self, data: Vec<u8>);
    /// `Signal`.
    fn signal(&mut self, signo: i32);
    /// `Freeze`: stops every other process; a short reason on failure.
    fn freeze(&mut self) -> Result<(), String>;
    /// `Thaw`: lets what `freeze` stopped go on.
    fn thaw(&mut self);
    /// `Reidentify`: reseeds with `entropy` and takes a new identity (see
    /// [`crate::identity`]), moves the network to `network` when given, then thaws; the new
    /// identity's `Hello`, or a short reason.
    fn reidentify(
        &mut self,
        entropy: &[u8],
        network: Option<&GuestNetwork>,
    ) -> Result<GuestToHost, String>;
}

/// How long the sidecar waits, after writing the final frame and half-closing, for the host
/// to close the connection before it gives up and closes it itself.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// One control connection.
#[derive(Debug)]
pub struct Session<'a> {
    hello: &'a GuestToHost,
    acked: bool,
}

/// The writer thread of an acknowledged session.
struct Writer {
    generation: u64,
    thread: JoinHandle<()>,
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
    ///
    /// The hello is written here; once the host acknowledges it, a writer thread sends the
    /// frames of `outbox` (on a clone of the stream) while this thread reads and dispatches
    /// the host's messages. When either side fails, both stop and the unsent frames stay
    /// queued for the next session.
    pub fn run<S: ControlStream>(
        &mut self,
        mut stream: S,
        outbox: &Arc<Outbox>,
        host: &mut dyn HostRequests,
    ) -> Result<SessionEnd, ControlError> {
        send(&mut stream, self.hello)?;
        let mut writer = None;
        let result = self.read_loop(&mut stream, outbox, host, &mut writer);
        if let Some(w) = writer {
            outbox.end_session(w.generation);
            // Wakes a writer blocked in `write`; the socket is done with either way.
            let _ = stream.shutdown_both();
            let _ = w.thread.join();
        }
        match result {
            Err(_) if outbox.final_written() => Ok(SessionEnd::AgentDone),
            r => r,
        }
    }

    fn read_loop<S: ControlStream>(
        &mut self,
        stream: &mut S,
        outbox: &Arc<Outbox>,
        host: &mut dyn HostRequests,
        writer: &mut Option<Writer>,
    ) -> Result<SessionEnd, ControlError> {
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
                if !self.acked {
                    match check_hello_answer(&msg) {
                        Ok(()) => {
                            self.acked = true;
                            tracing::info!("control: hello acknowledged");
                            *writer = Some(start_writer(stream, outbox)?);
                        }
                        Err(e @ HandshakeError::UnexpectedMessage { .. }) => {
                            return Err(ControlError::Handshake(e));
                        }
                        Err(e) => return Ok(SessionEnd::Rejected(e)),
                    }
                } else if let Some(end) = handle(msg, outbox, host) {
                    return Ok(end);
                }
            }
        }
    }
}

fn handle(msg: HostToGuest, outbox: &Outbox, host: &mut dyn HostRequests) -> Option<SessionEnd> {
    match msg {
        HostToGuest::Shutdown => return Some(SessionEnd::Shutdown),
        HostToGuest::EchoConnect { port } => {
            if let Err(reason) = host.echo_connect(port) {
                tracing::warn!(port, %reason, "echo connect failed");
                reply_error(outbox, format!("echo connect to port {port}: {reason}"));
            }
        }
        HostToGuest::HelloAck { .. } | HostToGuest::HelloReject { .. } => {
            reply_error(outbox, "handshake already done".to_owned());
        }
        HostToGuest::RunAgent(spec) => host.run_agent(spec),
        HostToGuest::AgentStdin { data } => host.agent_stdin(data),
        HostToGuest::Signal { signo } => host.signal(signo),
        HostToGuest::Freeze => match host.freeze() {
            Ok(()) => outbox.push(&GuestToHost::Frozen),
            Err(reason) => reply_error(outbox, format!("freeze: {reason}")),
        },
        HostToGuest::Thaw => host.thaw(),
        HostToGuest::Reidentify { entropy, network } => {
            match host.reidentify(&entropy, network.as_ref()) {
                Ok(hello) => return Some(SessionEnd::Reidentified(Box::new(hello))),
                Err(reason) => reply_error(outbox, format!("reidentify: {reason}")),
            }
        }
    }
    None
}

fn reply_error(outbox: &Outbox, message: String) {
    outbox.push(&GuestToHost::Error { message });
}

fn send<S: Write>(stream: &mut S, msg: &GuestToHost) -> Result<(), ControlError> {
    let frame = encode_frame(msg).map_err(ControlError::Encode)?;
    stream.write_all(&frame).map_err(ControlError::Write)?;
    stream.flush().map_err(ControlError::Write)
}

fn start_writer<S: ControlStream>(
    stream: &S,
    outbox: &Arc<Outbox>,
) -> Result<Writer, ControlError> {
    let clone = stream.try_clone().map_err(ControlError::Clone)?;
    let generation = outbox.begin_session();
    let ob = Arc::clone(outbox);
    let spawned = std::thread::Builder::new()
        .name("control-writer".into())
        .spawn(move || write_frames(clone, &ob, generation));
    match spawned {
        Ok(thread) => Ok(Writer { generation, thread }),
        Err(e) => {
            outbox.end_session(generation);
            Err(ControlError::Writer(e))
        }
    }
}

/// Writes the outbox's frames in order until the session ends. After the final frame it
/// half-closes the stream and waits (at most [`FLUSH_TIMEOUT`]) for the host to close, which
/// ends the session; then it closes the stream itself.
fn write_frames<S: ControlStream>(mut stream: S, outbox: &Outbox, generation: u64) {
    while let Some(q) = outbox.take(generation) {
        if let Err(e) = stream.write_all(&q.frame).and_then(|()| stream.flush()) {
            tracing::debug!(error = %e, "control write failed");
            outbox.restore(q);
            let _ = stream.shutdown_both();
            return;
        }
        let is_final = q.is_final;
        outbox.commit(q);
        if is_final {
            let _ = stream.shutdown_write();
            if !outbox.wait_session_end(generation, FLUSH_TIMEOUT) {
                tracing::warn!("the host did not close the control connection; closing it");
                let _ = stream.shutdown_both();
            }
            return;
        }
    }
}

/// Connects and runs sessions until one ends with a shutdown, a reject or the agent's end.
/// Between attempts it sleeps for `backoff`'s next delay; the backoff starts over after each
/// acknowledged hello, and the first attempt after a session the host had acknowledged goes at
/// once (a restore's transport reset, a daemon restart: the host is most likely back already,
/// and a restored VM is not ready until it is heard from). Every session opens with the same
/// `hello` (so the same boot id), until a `Reidentify` gives a new one: then it reconnects at
/// once with that.
pub fn run<S, C>(
    mut connect: C,
    hello: &GuestToHost,
    backoff: &mut Backoff,
    outbox: &Arc<Outbox>,
    host: &mut dyn HostRequests,
) -> SessionEnd
where
    S: ControlStream,
    C: FnMut() -> io::Result<S>,
{
    let mut hello = hello.clone();
    loop {
        let mut acked = false;
        let result = connect().map_err(ControlError::Connect).and_then(|stream| {
            let mut session = Session::new(&hello);
            let result = session.run(stream, outbox, host);
            if session.acked() {
                backoff.reset();
                acked = true;
            }
            result
        });
        match result {
            Ok(SessionEnd::Reidentified(new)) => {
                tracing::info!("control: new identity, reconnecting");
                hello = *new;
                continue;
            }
            Ok(end) => return end,
            Err(e) => {
                if backoff.worth_logging() {
                    tracing::warn!(attempts = backoff.attempts(), error = %ErrorChain(&e), "control");
                }
                if acked {
                    continue;
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
    use std::io::Read;
    use std::os::unix::net::UnixStream;

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

    /// Records echo connects (refusing them when `refuse`) and agent requests.
    #[derive(Default)]
    struct Recorder {
        refuse: bool,
        ports: Vec<u32>,
        signals: Vec<i32>,
        /// What happened to the guest's processes and identity, in order.
        lifecycle: Vec<String>,
    }

    impl HostRequests for Recorder {
        fn echo_connect(&mut self, port: u32) -> Result<(), String> {
            self.ports.push(port);
            if self.refuse {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
        fn run_agent(&mut self, _spec: AgentSpec) {}
        fn agent_stdin(&mut self, _data: Vec<u8>) {}
        fn signal(&mut self, signo: i32) {
            self.signals.push(signo);
        }
        fn freeze(&mut self) -> Result<(), String> {
            self.lifecycle.push("freeze".into());
            if self.refuse {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
        fn thaw(&mut self) {
            self.lifecycle.push("thaw".into());
        }
        fn reidentify(
            &mut self,
            entropy: &[u8],
            network: Option<&GuestNetwork>,
        ) -> Result<GuestToHost, String> {
            self.lifecycle.push(format!(
                "reidentify {}{}",
                entropy.len(),
                network
                    .map(|n| format!(" at {}", n.address))
                    .unwrap_or_default()
            ));
            if entropy.is_empty() {
                return Err("no entropy".into());
            }
            Ok(GuestToHost::Hello {
                protocol_version: PROTOCOL_VERSION,
                sidecar_version: "test".into(),
                boot_id: [entropy[0]; 16],
                ephemeral_public_key: [entropy[0]; 32],
            })
        }
    }

    /// Serves echo connects with a closure; ignores agent requests.
    struct EchoOnly<'a>(&'a mut dyn FnMut(u32) -> Result<(), String>);

    impl HostRequests for EchoOnly<'_> {
        fn echo_connect(&mut self, port: u32) -> Result<(), String> {
            (self.0)(port)
        }
        fn run_agent(&mut self, _spec: AgentSpec) {}
        fn agent_stdin(&mut self, _data: Vec<u8>) {}
        fn signal(&mut self, _signo: i32) {}
        fn freeze(&mut self) -> Result<(), String> {
            Err("not here".into())
        }
        fn thaw(&mut self) {}
        fn reidentify(
            &mut self,
            _entropy: &[u8],
            _network: Option<&GuestNetwork>,
        ) -> Result<GuestToHost, String> {
            Err("not here".into())
        }
    }

    fn run_one(script: Vec<u8>) -> (Result<SessionEnd, ControlError>, Vec<u32>, Vec<GuestToHost>) {
        let (guest, h) = UnixStream::pair().unwrap();
        let host = host(h, script);
        let hello = hello();
        let mut rec = Recorder::default();
        let outbox = Arc::new(Outbox::default());
        let result = Session::new(&hello).run(guest, &outbox, &mut rec);
        (result, rec.ports, host.join().unwrap())
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
    fn agent_commands_are_dispatched_and_failed_echo_connects_answered_with_errors() {
        let (guest, mut h) = UnixStream::pair().unwrap();
        h.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let session = std::thread::spawn(move || {
            let hello = hello();
            let mut rec = Recorder {
                refuse: true,
                ..Recorder::default()
            };
            let outbox = Arc::new(Outbox::default());
            let end = Session::new(&hello).run(guest, &outbox, &mut rec);
            (end, rec)
        });
        let mut d = FrameDecoder::<GuestToHost>::new();
        let mut next = |h: &mut UnixStream| next_msg(h, &mut d);
        assert_eq!(next(&mut h), hello());
        let script = frames(&[
            ack(),
            HostToGuest::Signal { signo: 9 },
            HostToGuest::EchoConnect { port: 9 },
            ack(),
        ]);
        h.write_all(&script).unwrap();
        let first = next(&mut h);
        assert!(
            matches!(&first, GuestToHost::Error { message } if message.contains("refused")),
            "{first:?}"
        );
        let second = next(&mut h);
        assert!(
            matches!(&second, GuestToHost::Error { message } if message.contains("handshake")),
            "{second:?}"
        );
        h.write_all(&frames(&[HostToGuest::Shutdown])).unwrap();
        let (end, rec) = session.join().unwrap();
        assert_eq!(end.unwrap(), SessionEnd::Shutdown);
        assert_eq!(rec.ports, vec![9]);
        assert_eq!(rec.signals, vec![9]);
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
        let outbox = Arc::new(Outbox::default());
        let end = run(
            connect,
            &hello(),
            &mut backoff,
            &outbox,
            &mut Recorder::default(),
        );
        assert_eq!(end, SessionEnd::Shutdown);
        assert_eq!(attempt, 4);
        for h in hosts {
            assert_eq!(h.join().unwrap()[0], hello());
        }
    }

    /// Reads the guest's next message on a host end of the control socket.
    fn next_msg(h: &mut UnixStream, d: &mut FrameDecoder<GuestToHost>) -> GuestToHost {
        loop {
            if let Some(m) = d.decode_next().unwrap() {
                return m;
            }
            let mut buf = [0u8; 4096];
            let n = match h.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => read.unwrap(),
            };
            assert_ne!(n, 0, "the guest closed early");
            d.push(&buf[..n]);
        }
    }

    #[test]
    fn freeze_is_answered_and_a_new_identity_reconnects_with_its_hello() {
        let (hosts_tx, hosts_rx) = std::sync::mpsc::channel::<UnixStream>();
        let connect = move || {
            let (guest, h) = UnixStream::pair()?;
            h.set_read_timeout(Some(Duration::from_secs(20)))?;
            hosts_tx.send(h).map_err(io::Error::other)?;
            Ok(guest)
        };
        let guest = std::thread::spawn(move || {
            // A long backoff: the reconnect after a new identity must not wait for it.
            let mut backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(30));
            let outbox = Arc::new(Outbox::default());
            let mut rec = Recorder::default();
            let end = run(connect, &hello(), &mut backoff, &outbox, &mut rec);
            (end, rec)
        });
        let started = std::time::Instant::now();
        // Session 1: freeze (answered `Frozen`), a refused reidentify (answered with an
        // error, same session), then one that succeeds and ends the session.
        let mut h = hosts_rx.recv().unwrap();
        let mut d = FrameDecoder::new();
        assert_eq!(next_msg(&mut h, &mut d), hello());
        h.write_all(&frames(&[ack(), HostToGuest::Freeze])).unwrap();
        assert_eq!(next_msg(&mut h, &mut d), GuestToHost::Frozen);
        h.write_all(&frames(&[HostToGuest::Reidentify {
            entropy: vec![],
            network: None,
        }]))
        .unwrap();
        let refused = next_msg(&mut h, &mut d);
        assert!(
            matches!(&refused, GuestToHost::Error { message } if message.contains("reidentify: no entropy")),
            "{refused:?}"
        );
        h.write_all(&frames(&[HostToGuest::Reidentify {
            entropy: vec![9; 32],
            network: Some(GuestNetwork {
                address: std::net::Ipv4Addr::new(10, 200, 0, 6),
                prefix_len: 30,
                gateway: std::net::Ipv4Addr::new(10, 200, 0, 5),
                dns: std::net::Ipv4Addr::new(10, 200, 0, 5),
                mac: [2, 0, 0, 0, 0, 9],
            }),
        }]))
        .unwrap();
        // Session 2 opens at once with the new identity's hello.
        let mut h2 = hosts_rx.recv().unwrap();
        let mut d2 = FrameDecoder::new();
        let again = next_msg(&mut h2, &mut d2);
        assert!(
            matches!(&again, GuestToHost::Hello { boot_id, .. } if *boot_id == [9; 16]),
            "{again:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        h2.write_all(&frames(&[ack(), HostToGuest::Thaw, HostToGuest::Shutdown]))
            .unwrap();
        let (end, rec) = guest.join().unwrap();
        assert_eq!(end, SessionEnd::Shutdown);
        assert_eq!(
            rec.lifecycle,
            [
                "freeze",
                "reidentify 0",
                "reidentify 32 at 10.200.0.6",
                "thaw"
            ]
        );
    }

    #[test]
    fn a_refused_freeze_is_answered_with_an_error_not_frozen() {
        let (guest, mut h) = UnixStream::pair().unwrap();
        h.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let session = std::thread::spawn(move || {
            let mut rec = Recorder {
                refuse: true,
                ..Recorder::default()
            };
            let outbox = Arc::new(Outbox::default());
            Session::new(&hello()).run(guest, &outbox, &mut rec)
        });
        let mut d = FrameDecoder::new();
        assert_eq!(next_msg(&mut h, &mut d), hello());
        h.write_all(&frames(&[ack(), HostToGuest::Freeze])).unwrap();
        let answer = next_msg(&mut h, &mut d);
        assert!(
            matches!(&answer, GuestToHost::Error { message } if message.contains("freeze: refused")),
            "{answer:?}"
        );
        h.write_all(&frames(&[HostToGuest::Shutdown])).unwrap();
        assert_eq!(session.join().unwrap().unwrap(), SessionEnd::Shutdown);
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
            UnixListener::bind(shared_proto::ports::host_listener_path(dir.path(), port)).unwrap();
        let (guest, mut h) = UnixStream::pair().unwrap();
        let host = std::thread::spawn(move || {
            let mut d = FrameDecoder::<GuestToHost>::new();
            let mut buf = [0u8; 4096];
            let first = loop {
                if let Some(m) = d.decode_next().unwrap() {
                    break m;
                }
                let n = match h.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => read.unwrap(),
                };
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
            let s = UnixStream::connect(shared_proto::ports::host_listener_path(&dir_path, port))
                .map_err(|e| e.to_string())?;
            crate::echo::spawn_echo(s, "test").map_err(|e| e.to_string())
        };
        let outbox = Arc::new(Outbox::default());
        let end = Session::new(&hello)
            .run(guest, &outbox, &mut EchoOnly(&mut echo))
            .unwrap();
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
