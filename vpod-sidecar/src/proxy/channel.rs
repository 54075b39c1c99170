//! The sidecar's end of the end-to-end session with the device, over any byte stream (vsock in
//! the guest, a Unix socket in tests).
//!
//! A connection to the host's credential proxy port starts with one shared-proto frame holding
//! a `RelayGreeting`. After `Ready`, the sidecar runs Noise IK as initiator: its static key is
//! the boot X25519 key (whose public half went to the host in `Hello`), the responder's static
//! key is the device key from the greeting, and the prologue binds the VM id from the greeting
//! and the sidecar's own boot id. The host relays the records without a key to read them. Then
//! each Noise transport message carries one CBOR proxy message.
//!
//! A session carries exchanges one after the other; [`DeviceSession`] counts them and knows
//! its age, so that the pool ([`super::pool`]) retires it in time, and whether the last one
//! ended in step (only then may it carry the next).

use std::io::{Read, Write};

use shared_proto::credential::{
    self, DeviceToSidecar, RECORD_PREFIX, RecordDecoder, RelayGreeting, SidecarToDevice, Validate,
    noise,
};

use super::ProxyError;

/// The largest greeting frame read before the handshake.
const MAX_GREETING: usize = 4096;
/// How much is read from the relay at once: a whole record of the largest size.
const READ_CHUNK: usize = 64 * 1024;

/// An established session.
pub struct DeviceSession<S> {
    stream: S,
    records: RecordReader,
    transport: snow::TransportState,
    vm_id: String,
    /// When the handshake finished.
    opened: std::time::Instant,
    /// When the last exchange ended (or the session opened).
    pub(super) idle_since: std::time::Instant,
    /// Exchanges begun on this session.
    exchanges: u64,
    /// The current exchange's request was sent to its end.
    request_sent: bool,
    /// The current exchange's answer was read to its last message.
    answer_read: bool,
    /// Plaintext: the last message opened, or the next one to seal (kept between messages).
    plain: Vec<u8>,
    /// The next record to write (kept between messages).
    sealed: Vec<u8>,
}

impl<S> std::fmt::Debug for DeviceSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSession")
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

fn read_greeting<S: Read>(stream: &mut S) -> Result<RelayGreeting, ProxyError> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 512];
    loop {
        match shared_proto::frame::decode_frame::<RelayGreeting>(&buf) {
            Ok(Some((greeting, used))) => {
                if used != buf.len() {
                    // The host speaks only after the handshake's first message.
                    return Err(ProxyError::Protocol("bytes after the greeting"));
                }
                greeting.validate().map_err(ProxyError::Wire)?;
                return Ok(greeting);
            }
            Ok(None) => {}
            Err(_) => return Err(ProxyError::Protocol("malformed greeting")),
        }
        if buf.len() > MAX_GREETING {
            return Err(ProxyError::Protocol("greeting too long"));
        }
        // Read only what the frame still needs, so no handshake byte is swallowed.
        let want = match buf.first_chunk::<4>() {
            Some(p) => (u32::from_be_bytes(*p) as usize + 4)
                .saturating_sub(buf.len())
                .min(byte.len()),
            None => 4 - buf.len(),
        };
        let n = stream.read(&mut byte[..want]).map_err(ProxyError::Relay)?;
        if n == 0 {
            return Err(ProxyError::Protocol("relay closed before its greeting"));
        }
        buf.extend_from_slice(&byte[..n]);
    }
}

/// The records arriving from the relay: the shared decoder over the blocking stream.
struct RecordReader {
    decoder: RecordDecoder,
    scratch: Vec<u8>,
}

impl RecordReader {
    fn new() -> Self {
        Self {
            decoder: RecordDecoder::new(),
            scratch: vec![0u8; READ_CHUNK],
        }
    }

    fn next<S: Read>(&mut self, stream: &mut S) -> Result<&[u8], ProxyError> {
        while !self.decoder.has_record().map_err(ProxyError::Wire)? {
            match stream.read(&mut self.scratch) {
                Ok(n) if n > 0 => self.decoder.push(&self.scratch[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ if self.decoder.pending() == 0 => {
                    return Err(ProxyError::Protocol("the session ended"));
                }
                _ => return Err(ProxyError::Protocol("the session ended mid-record")),
            }
        }
        self.decoder
            .next_record()
            .map_err(ProxyError::Wire)?
            .ok_or(ProxyError::Protocol("no whole record"))
    }
}

fn write_record<S: Write>(stream: &mut S, body: &[u8]) -> Result<(), ProxyError> {
    let mut out = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut out).map_err(ProxyError::Wire)?;
    stream.write_all(&out).map_err(ProxyError::Relay)?;
    stream.flush().map_err(ProxyError::Relay)
}

impl<S: Read + Write> DeviceSession<S> {
    /// Reads the greeting and runs the handshake.
    pub fn open(
        mut stream: S,
        boot_secret: &[u8; 32],
        boot_id: &[u8; 16],
    ) -> Result<Self, ProxyError> {
        let (vm_id, device_key) = match read_greeting(&mut stream)? {
            RelayGreeting::Ready {
                vm_id,
                device_public_key,
            } => (vm_id, device_public_key),
            RelayGreeting::Unavailable { reason } => return Err(ProxyError::Unavailable(reason)),
        };
        let prologue = credential::session_prologue(&vm_id, boot_id).map_err(ProxyError::Wire)?;
        let mut hs = noise::session_initiator(boot_secret, &device_key, &prologue)
            .map_err(ProxyError::Noise)?;
        let first = noise::write_handshake(&mut hs, &[]).map_err(ProxyError::Noise)?;
        write_record(&mut stream, &first)?;
        let mut records = RecordReader::new();
        let answer = records.next(&mut stream)?;
        noise::read_handshake(&mut hs, answer).map_err(ProxyError::Noise)?;
        let transport = hs.into_transport_mode().map_err(ProxyError::Noise)?;
        let now = std::time::Instant::now();
        Ok(Self {
            stream,
            records,
            transport,
            vm_id,
            opened: now,
            idle_since: now,
            exchanges: 0,
            request_sent: false,
            answer_read: false,
            plain: Vec::new(),
            sealed: Vec::new(),
        })
    }

    /// Starts an exchange; false when the session has carried its share and must retire.
    pub fn begin_exchange(&mut self) -> bool {
        if self.exchanges >= credential::MAX_SESSION_EXCHANGES {
            return false;
        }
        self.exchanges += 1;
        self.request_sent = false;
        self.answer_read = false;
        true
    }

    /// Whether the exchange that ran left the session in step for another one: the request
    /// went out to its end and the answer came in to its last message.
    pub fn exchange_complete(&self) -> bool {
        self.request_sent && self.answer_read
    }

    /// How long ago the handshake finished.
    pub fn age(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// The relay stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The VM id the host gave.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &SidecarToDevice) -> Result<(), ProxyError> {
        let plain = credential::encode_message(msg).map_err(ProxyError::Wire)?;
        self.send_plain(&plain)?;
        if matches!(msg, SidecarToDevice::End | SidecarToDevice::Seal { .. }) {
            self.request_sent = true;
        }
        Ok(())
    }

    /// Sends `bytes` as one `Body` message (at most [`credential::MAX_CHUNK`] bytes), encoded
    /// straight from the slice.
    pub fn send_body(&mut self, bytes: &[u8]) -> Result<(), ProxyError> {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        credential::data::encode_body(bytes, &mut plain);
        let sent = self.send_plain(&plain);
        self.plain = plain;
        sent
    }

    /// Seals `plain` into one record and writes it.
    fn send_plain(&mut self, plain: &[u8]) -> Result<(), ProxyError> {
        self.sealed.clear();
        noise::seal_record(&mut self.transport, plain, &mut self.sealed)
            .map_err(ProxyError::Noise)?;
        self.stream
            .write_all(&self.sealed)
            .map_err(ProxyError::Relay)?;
        self.stream.flush().map_err(ProxyError::Relay)
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<DeviceToSidecar, ProxyError> {
        Ok(match self.recv_borrowed()? {
            Received::Body(bytes) => DeviceToSidecar::Body(bytes.to_vec()),
            Received::Message(msg) => msg,
        })
    }

    /// Receives one message, a `Body` borrowed from the session's buffer rather than copied
    /// out (the bulk of an answer goes to the agent from where it was decrypted).
    pub fn recv_borrowed(&mut self) -> Result<Received<'_>, ProxyError> {
        let record = self.records.next(&mut self.stream)?;
        let plain = noise::open_in(&mut self.transport, record, &mut self.plain)
            .map_err(ProxyError::Noise)?;
        if let Some(bytes) = credential::data::body_bytes(plain) {
            return Ok(Received::Body(bytes));
        }
        let msg = credential::decode_message(plain).map_err(ProxyError::Wire)?;
        if matches!(
            msg,
            DeviceToSidecar::End | DeviceToSidecar::Refused { .. } | DeviceToSidecar::Sealed { .. }
        ) {
            self.answer_read = true;
        }
        Ok(Received::Message(msg))
    }
}

/// A message from the device as [`DeviceSession::recv_borrowed`] gives it.
#[derive(Debug)]
pub enum Received<'a> {
    /// A `Body`, its bytes borrowed.
    Body(&'a [u8]),
    /// Any other message.
    Message(DeviceToSidecar),
}
