//! The fallback path: the device seals the secret to the sidecar's boot key, and the sidecar
//! makes the HTTPS call itself.
//!
//! Over the same end-to-end session as the primary path, the sidecar sends `Seal { target }`;
//! the device answers `Sealed { authority, envelope, header, format }` under a grant that allows
//! the fallback. The sidecar opens the envelope with a [`shared_proto::envelope::Opener`] over
//! its boot secret and the VM id of the relay greeting (so an envelope for another VM, expired,
//! replayed or tampered with is refused), builds the request head with the secret injected in a
//! zeroized buffer, sends it over TLS (rustls, roots given by [`FallbackTls`]) to exactly the
//! authority the device named, and copies the response bytes to the agent as they come (the
//! response is HTTP/1.1 with `Connection: close`, so it streams unchanged).
//!
//! The secret lives only in this process's memory, in buffers zeroed on drop, and never in
//! the agent's: the agent gets the upstream response only. rustls copies the plaintext into
//! its own record buffers while encrypting and does not zero them; that copy is freed once the
//! request is sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use shared_proto::credential::{DeviceToSidecar, ProxyTarget, SidecarToDevice};
use shared_proto::envelope::{Envelope, EnvelopeError, Opener};
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::pool::{RelayStream, SessionPool};
use super::{AgentRequest, ProxyError, ProxyIdentity, write_simple};

/// Errors of setting up the fallback.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// The CA bundle is not PEM certificates.
    #[error("bad CA bundle")]
    BadRoots(#[source] rustls::pki_types::pem::Error),
    /// rustls refused a root or the configuration.
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// How the sidecar makes HTTPS calls on the fallback path.
#[derive(Debug, Clone)]
pub struct FallbackTls {
    config: Arc<rustls::ClientConfig>,
    resolve: Vec<(String, SocketAddr)>,
}

impl FallbackTls {
    /// Trusts the PEM certificates in `pem` (only those); `resolve` pins host names to
    /// addresses (for tests).
    pub fn from_pem(pem: &[u8], resolve: Vec<(String, SocketAddr)>) -> Result<Self, FallbackError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.map_err(FallbackError::BadRoots)?)
                .map_err(FallbackError::Tls)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(FallbackError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            resolve,
        })
    }
}

/// The fallback path's state: TLS settings and the envelope opener (made at the first
/// envelope, for the VM id the relay gave).
pub struct Fallback {
    tls: FallbackTls,
    opener: Mutex<Option<(Arc<ProxyIdentity>, Opener)>>,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback").finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Fallback {
    /// A fallback with these TLS settings.
    pub fn new(tls: FallbackTls) -> Self {
        Self {
            tls,
            opener: Mutex::new(None),
        }
    }

    /// Opens an envelope sealed to `identity`'s key for `vm_id` at `now`: the check every
    /// sealed answer goes through. The opener (and what it remembers of envelopes seen) is
    /// made anew when the identity changes.
    pub fn open_envelope(
        &self,
        identity: &Arc<ProxyIdentity>,
        vm_id: &str,
        envelope: &Envelope,
        now: u64,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let mut opener = self.opener.lock().unwrap_or_else(|p| p.into_inner());
        if !opener
            .as_ref()
            .is_some_and(|(made_for, _)| Arc::ptr_eq(made_for, identity))
        {
            let fresh = Opener::new(StaticSecret::from(*identity.boot_secret), vm_id);
            *opener = Some((Arc::clone(identity), fresh));
        }
        let Some((_, opener)) = opener.as_mut() else {
            unreachable!("set just above");
        };
        opener.open(envelope, now)
    }

    fn connect(&self, authority: &str) -> std::io::Result<TcpStream> {
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(443);
        let pinned = self
            .tls
            .resolve
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(host))
            .map(|(_, a)| SocketAddr::new(a.ip(), port));
        match pinned {
            Some(addr) => TcpStream::connect(addr),
            None => TcpStream::connect(
                (host, port)
                    .to_socket_addrs()?
                    .collect::<Vec<_>>()
                    .as_slice(),
            ),
        }
    }
}

/// Serves one request on the fallback path, answering the agent on `agent`. The seal is asked
/// for over a pooled session, like a primary-path request.
pub(super) fn handle<S, F>(
    request: AgentRequest,
    pool: &SessionPool<S, F>,
    fallback: &Fallback,
    agent: &mut TcpStream,
) -> Result<(), ProxyError>
where
    S: RelayStream,
    F: Fn() -> std::io::Result<S>,
{
    let answer = (|| {
        let mut session = pool.take()?;
        let identity = Arc::clone(session.identity());
        let answer = session
            .send(&SidecarToDevice::Seal {
                target: request.head.target.clone(),
            })
            .and_then(|()| session.recv());
        let vm_id = session.vm_id().to_owned();
        pool.give_back(session);
        Ok::<_, ProxyError>((identity, vm_id, answer?))
    })();
    let (identity, vm_id, answer) = match answer {
        Ok(a) => a,
        Err(e) => {
            let status = if matches!(e, ProxyError::Unavailable(_)) {
                503
            } else {
                502
            };
            let msg = crate::ErrorChain(&e).to_string();
            return write_simple(agent, status, &msg, false).map_err(ProxyError::Agent);
        }
    };
    let (authority, envelope, header, format) = match answer {
        DeviceToSidecar::Sealed {
            authority,
            envelope,
            header,
            format,
        } => (authority, envelope, header, format),
        DeviceToSidecar::Refused { status, reason } => {
            return write_simple(agent, status, &reason, false).map_err(ProxyError::Agent);
        }
        _ => {
            return write_simple(agent, 502, "the device answered out of order", false)
                .map_err(ProxyError::Agent);
        }
    };
    let secret = match fallback.open_envelope(&identity, &vm_id, &envelope, now()) {
        Ok(s) => s,
        Err(e) => {
            return write_simple(agent, 502, &format!("envelope refused: {e}"), false)
                .map_err(ProxyError::Agent);
        }
    };
    let path = match &request.head.target {
        ProxyTarget::Service { path_and_query, .. }
        | ProxyTarget::Absolute { path_and_query, .. } => path_and_query,
    };
    let mut head = Zeroizing::new(Vec::with_capacity(1024));
    head.extend_from_slice(
        format!(
            "{} {path} HTTP/1.1\r\nhost: {authority}\r\n",
            request.head.method
        )
        .as_bytes(),
    );
    for (name, value) in &request.head.headers {
        if name.eq_ignore_ascii_case(&header) {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(header.as_bytes());
    head.extend_from_slice(b": ");
    match format.split_once("{}") {
        Some((before, after)) => {
            head.extend_from_slice(before.as_bytes());
            head.extend_from_slice(&secret);
            head.extend_from_slice(after.as_bytes());
        }
        None => {
            return write_simple(agent, 502, "the device sent a bad format", false)
                .map_err(ProxyError::Agent);
        }
    }
    drop(secret);
    head.extend_from_slice(
        format!(
            "\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            request.body.len()
        )
        .as_bytes(),
    );
    let host = authority
        .rsplit_once(':')
        .map_or(authority.as_str(), |(h, _)| h);
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return write_simple(agent, 502, "bad upstream host name", false)
            .map_err(ProxyError::Agent);
    };
    let tcp = match fallback.connect(&authority) {
        Ok(t) => t,
        Err(e) => {
            return write_simple(agent, 502, &format!("cannot reach {authority}: {e}"), false)
                .map_err(ProxyError::Agent);
        }
    };
    let Ok(conn) = rustls::ClientConnection::new(Arc::clone(&fallback.tls.config), name) else {
        return write_simple(agent, 502, "TLS setup failed", false).map_err(ProxyError::Agent);
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let sent = tls
        .write_all(&head)
        .and_then(|()| tls.write_all(&request.body))
        .and_then(|()| tls.flush());
    drop(head);
    if let Err(e) = sent {
        return write_simple(agent, 502, &format!("upstream {authority}: {e}"), false)
            .map_err(ProxyError::Agent);
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                agent.write_all(&buf[..n]).map_err(ProxyError::Agent)?;
                agent.flush().map_err(ProxyError::Agent)?;
            }
            // A server that closes without close_notify ends the response too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(ProxyError::Agent(e)),
        }
    }
    Ok(())
}
