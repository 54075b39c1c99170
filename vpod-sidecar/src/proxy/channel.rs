//! The sidecar's end of the end-to-end session with the device, over any byte stream (vsock in
//! the guest, a Unix socket in tests).
//!
//! A connection to the host's credential proxy port starts with one shared-proto frame holding
//! a `RelayGreeting`. After `Ready`, the sidecar runs Noise IK as initiator: its static key is
//! the boot X25519 key (whose public half went to the host in `Hello`), the responder's static
//! key is the device key from the greeting, and the prologue binds the VM id from the greeting
//! and the sidecar's own boot id. The host relays the records without a key to read them. Then
//! each Noise transport message carries one CBOR proxy message.

use std::io::{Read, Write};

use shared_proto::credential::{
    self, DeviceToSidecar, MAX_NOISE_MESSAGE, RECORD_PREFIX, RelayGreeting, SidecarToDevice,
    Validate,
};

use super::ProxyError;

/// The largest greeting frame read before the handshake.
const MAX_GREETING: usize = 4096;

/// An established session.
pub struct DeviceSession<S> {
    stream: S,
    transport: snow::TransportState,
    vm_id: String,
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

fn read_record<S: Read>(stream: &mut S) -> Result<Vec<u8>, ProxyError> {
    let mut prefix = [0u8; RECORD_PREFIX];
    stream
        .read_exact(&mut prefix)
        .map_err(|_| ProxyError::Protocol("the session ended"))?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream
        .read_exact(&mut body)
        .map_err(|_| ProxyError::Protocol("the session ended mid-record"))?;
    Ok(body)
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
        let params = credential::NOISE_SESSION
            .parse()
            .map_err(ProxyError::Noise)?;
        let mut hs = snow::Builder::new(params)
            .local_private_key(boot_secret)
            .and_then(|b| b.remote_public_key(&device_key))
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator())
            .map_err(ProxyError::Noise)?;
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = hs.write_message(&[], &mut buf).map_err(ProxyError::Noise)?;
        write_record(&mut stream, &buf[..n])?;
        let answer = read_record(&mut stream)?;
        hs.read_message(&answer, &mut buf)
            .map_err(ProxyError::Noise)?;
        let transport = hs.into_transport_mode().map_err(ProxyError::Noise)?;
        Ok(Self {
            stream,
            transport,
            vm_id,
        })
    }

    /// The VM id the host gave.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &SidecarToDevice) -> Result<(), ProxyError> {
        let plain = credential::encode_message(msg).map_err(ProxyError::Wire)?;
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = self
            .transport
            .write_message(&plain, &mut buf)
            .map_err(ProxyError::Noise)?;
        write_record(&mut self.stream, &buf[..n])
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<DeviceToSidecar, ProxyError> {
        let record = read_record(&mut self.stream)?;
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = self
            .transport
            .read_message(&record, &mut buf)
            .map_err(ProxyError::Noise)?;
        credential::decode_message(&buf[..n]).map_err(ProxyError::Wire)
    }
}
