//! One end-to-end session with a sidecar: the Noise IK responder, then one proxied call
//! (primary path) or one sealed secret (fallback path).
//!
//! # What the device checks
//!
//! - The handshake: the prologue binds the VM id and boot id the host announced in `Open`, and
//!   the sidecar's static key (learned in the handshake) must equal the boot key the host
//!   relayed from the sidecar's `Hello`.
//! - The target: base-URL mode names a credential and goes to its first allowed host;
//!   `HTTP_PROXY` mode names an authority, and the credential is the first entry that allows it
//!   and has a live grant. The call goes out over HTTPS to exactly that authority, never
//!   following redirects (a redirect could carry the header elsewhere).
//! - A live grant for credential x authority x VM ([`crate::grant::find_grant`]): one from
//!   the vault or one a verified approval created. Without one, on the primary path and when
//!   a passkey is stored, the device asks the user through the host and holds the request
//!   ([`crate::device::Device::request_approval`], which checks the host's evidence itself);
//!   if that fails, or on the fallback path, the answer is `Refused` 403 with the reason and
//!   nothing is sent upstream.
//! - The agent's own copy of the credential header, `Host` and hop-by-hop headers are dropped
//!   before the secret is injected.
//!
//! # What the host could still do
//!
//! The host relays every byte and it hands the guest the device's public key and the device the
//! sidecar's boot key. It cannot read or alter a session (Noise IK: the device authenticates
//! with its pinned identity key, the sidecar with its boot key). A host that lies about the
//! sidecar's key can run a session of its own in place of the sidecar: on the primary path that
//! gives it what the agent could get, calls to granted hosts with the secret injected by the
//! device, never the secret itself. On the fallback path it would get the secret sealed to its
//! own key, which is why the fallback needs a grant that says so explicitly; binding the boot
//! key to the VM (attestation) is what would close this.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use nanoclaw_tokenize::Report;
use rand_core::{OsRng, RngCore};
use serde_bytes::ByteBuf;
use shared_proto::credential::{
    self, BodyPart, DeviceToHost, DeviceToSidecar, HeaderLine, MAX_CHUNK, ProxyRequest,
    ProxyTarget, RECORD_PREFIX, RecordDecoder, SidecarToDevice,
};
use shared_proto::envelope;
use tokio::sync::mpsc;
use x25519_dalek::PublicKey;

use crate::device::Device;
use crate::grant::{Release, find_grant};
use crate::noise::{self, NoiseError};
use crate::tokenize::{self, BodyError, BodyType, Way};
use crate::vault::VaultData;

/// The largest request body the device forwards.
pub const MAX_REQUEST_BODY: usize = 16 << 20;
/// How long a sealed envelope is valid.
pub const SEAL_TTL_SECS: u64 = 60;

/// What the host announced about a sidecar in `Open`.
#[derive(Debug, Clone)]
pub struct SessionPeer {
    /// The VM id.
    pub vm_id: String,
    /// The sidecar's boot id.
    pub boot_id: [u8; 16],
    /// The sidecar's boot public key.
    pub sidecar_public_key: [u8; 32],
}

/// The channel of one session to the link writer: ciphertext records to send to the sidecar.
pub type Outbound = mpsc::Sender<Vec<u8>>;

/// Reassembles records from the relayed byte runs.
struct Inbound {
    rx: mpsc::Receiver<Vec<u8>>,
    records: RecordDecoder,
}

impl Inbound {
    async fn next_record(&mut self) -> Result<Vec<u8>, NoiseError> {
        loop {
            if let Some(record) = self.records.decode_next()? {
                return Ok(record);
            }
            match self.rx.recv().await {
                Some(bytes) => self.records.push(&bytes),
                None => return Err(NoiseError::Closed),
            }
        }
    }
}

/// The established session.
struct Session {
    inbound: Inbound,
    out: Outbound,
    transport: snow::TransportState,
}

impl Session {
    async fn recv(&mut self) -> Result<SidecarToDevice, NoiseError> {
        let record = self.inbound.next_record().await?;
        let plain = noise::open(&mut self.transport, &record)?;
        Ok(credential::decode_message(&plain)?)
    }

    async fn send(&mut self, msg: &DeviceToSidecar) -> Result<(), NoiseError> {
        let plain = credential::encode_message(msg)?;
        let sealed = noise::seal(&mut self.transport, &plain)?;
        send_record(&self.out, &sealed).await
    }
}

/// Sends `body` to the sidecar as one record.
async fn send_record(out: &Outbound, body: &[u8]) -> Result<(), NoiseError> {
    let mut record = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut record)?;
    out.send(record).await.map_err(|_| NoiseError::Closed)
}

/// Runs one session to its end. Errors end the session; the link stays up.
pub async fn run(
    device: Arc<Device>,
    peer: SessionPeer,
    rx: mpsc::Receiver<Vec<u8>>,
    out: Outbound,
) -> Result<(), NoiseError> {
    let mut inbound = Inbound {
        rx,
        records: RecordDecoder::new(),
    };
    let prologue = credential::session_prologue(&peer.vm_id, &peer.boot_id)?;
    let identity = device.identity_secret();
    let mut hs = noise::session_responder(&identity, &prologue)?;
    let first = inbound.next_record().await?;
    credential::noise::read_handshake(&mut hs, &first)?;
    if hs.get_remote_static() != Some(&peer.sidecar_public_key[..]) {
        return Err(NoiseError::UnexpectedPeer);
    }
    let answer = credential::noise::write_handshake(&mut hs, &[])?;
    send_record(&out, &answer).await?;
    let transport = hs.into_transport_mode()?;
    let mut session = Session {
        inbound,
        out,
        transport,
    };
    match session.recv().await? {
        SidecarToDevice::Request(head) => proxy(&device, &peer, &mut session, head).await,
        SidecarToDevice::Seal { target } => {
            let answer = seal(&device, &peer, &target);
            session.send(&answer).await
        }
        SidecarToDevice::Body(_) | SidecarToDevice::End => {
            session
                .send(&refused(400, "a session opens with a request or a seal"))
                .await
        }
    }
}

fn refused(status: u16, reason: impl Into<String>) -> DeviceToSidecar {
    DeviceToSidecar::Refused {
        status,
        reason: reason.into(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a request does not resolve.
struct Refusal {
    status: u16,
    reason: String,
    /// The credential and authority an approval could grant, when only the grant is missing.
    ask: Option<(String, String)>,
}

fn refusal(status: u16, reason: String) -> Refusal {
    Refusal {
        status,
        reason,
        ask: None,
    }
}

/// The credential (its index in `data.entries`) and authority a request resolves to, or the
/// refusal.
fn resolve(
    data: &VaultData,
    vm: &str,
    target: &ProxyTarget,
    release: Release,
) -> Result<(usize, String), Refusal> {
    let now = now();
    match target {
        ProxyTarget::Service { name, .. } => {
            let index = data
                .entries
                .iter()
                .position(|e| &e.name == name)
                .ok_or_else(|| refusal(404, format!("no credential named {name:?}")))?;
            let authority = data.entries[index].hosts[0].clone();
            if find_grant(&data.grants, name, &authority, vm, release, now).is_none() {
                return Err(Refusal {
                    status: 403,
                    reason: format!("no live grant for {name} to {authority}"),
                    ask: Some((name.clone(), authority)),
                });
            }
            Ok((index, authority))
        }
        ProxyTarget::Absolute { authority, .. } => {
            let allowed: Vec<usize> = (0..data.entries.len())
                .filter(|&i| data.entries[i].allows(authority))
                .collect();
            let Some(&first) = allowed.first() else {
                return Err(refusal(
                    403,
                    format!("no credential may be sent to {authority}"),
                ));
            };
            allowed
                .into_iter()
                .find(|&i| {
                    let name = &data.entries[i].name;
                    find_grant(&data.grants, name, authority, vm, release, now).is_some()
                })
                .map(|i| (i, authority.clone()))
                .ok_or_else(|| Refusal {
                    status: 403,
                    reason: format!("no live grant for {authority}"),
                    ask: Some((data.entries[first].name.clone(), authority.clone())),
                })
        }
    }
}

/// The primary path.
async fn proxy(
    device: &Device,
    peer: &SessionPeer,
    session: &mut Session,
    head: ProxyRequest,
) -> Result<(), NoiseError> {
    let mut body = Vec::new();
    loop {
        match session.recv().await? {
            SidecarToDevice::Body(chunk) => {
                if body.len() + chunk.len() > MAX_REQUEST_BODY {
                    return session.send(&refused(413, "request body too large")).await;
                }
                body.extend_from_slice(&chunk);
            }
            SidecarToDevice::End => break,
            _ => return session.send(&refused(400, "unexpected message")).await,
        }
    }
    let mut data = match device.snapshot() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %crate::ErrorChain(&e), "vault");
            return session
                .send(&refused(503, "the vault is unavailable"))
                .await;
        }
    };
    data.grants.extend(device.approved_grants(now()));
    let mut resolved = resolve(&data, &peer.vm_id, &head.target, Release::Call);
    if let Err(Refusal {
        ask: Some((credential, authority)),
        reason,
        ..
    }) = &resolved
        && device.can_ask()
    {
        resolved = match device
            .request_approval(credential, authority, &peer.vm_id)
            .await
        {
            // The verified approval releases this held request itself (its grant covers the
            // ones that follow).
            Ok(grant) => match data.entries.iter().position(|e| e.name == grant.credential) {
                Some(index) => Ok((index, grant.host)),
                None => Err(refusal(404, format!("no credential named {credential:?}"))),
            },
            Err(e) => Err(refusal(403, format!("{reason}: {}", crate::ErrorChain(&e)))),
        };
    }
    let (index, authority) = match resolved {
        Ok(r) => r,
        Err(Refusal { status, reason, .. }) => {
            tracing::info!(vm = %peer.vm_id, target = ?head.target, "refused");
            return session.send(&refused(status, reason)).await;
        }
    };
    let entry = &data.entries[index];
    let tokens = device.tokens().get(&peer.vm_id);
    let body = match &tokens {
        Some(vm) => match tokenize_request(device, peer, vm, &authority, &head.headers, body) {
            Ok(body) => body,
            Err(refusal) => return session.send(&refusal).await,
        },
        None => body,
    };
    let path = match &head.target {
        ProxyTarget::Service { path_and_query, .. } => path_and_query,
        ProxyTarget::Absolute { path_and_query, .. } => path_and_query,
    };
    let url = format!("https://{authority}{path}");
    let Ok(method) = reqwest::Method::from_bytes(head.method.as_bytes()) else {
        return session.send(&refused(400, "bad method")).await;
    };
    let mut request = device.http().request(method, &url);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if credential::HOP_BY_HOP_HEADERS.contains(&lower.as_str())
            || lower.eq_ignore_ascii_case(&entry.header)
            || (tokens.is_some() && lower == "accept-encoding")
        {
            continue;
        }
        request = request.header(name.as_str(), value.as_slice());
    }
    if tokens.is_some() {
        // A compressed answer could not be scanned.
        request = request.header("accept-encoding", "identity");
    }
    let value = entry.header_value();
    let mut header_value = match reqwest::header::HeaderValue::from_bytes(&value) {
        Ok(v) => v,
        Err(_) => {
            return session
                .send(&refused(500, "the credential is not a valid header"))
                .await;
        }
    };
    header_value.set_sensitive(true);
    request = request
        .header(entry.header.as_str(), header_value)
        .body(body);
    drop(value);
    tracing::info!(vm = %peer.vm_id, credential = %entry.name, %authority, "call");
    drop(data);
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %crate::ErrorChain(&e), %authority, "upstream");
            return session
                .send(&refused(502, format!("upstream {authority} failed")))
                .await;
        }
    };
    let mut headers: Vec<HeaderLine> = Vec::new();
    for (name, value) in response.headers() {
        if credential::HOP_BY_HOP_HEADERS.contains(&name.as_str())
            || headers.len() >= credential::MAX_HEADERS
        {
            continue;
        }
        if value.len() <= credential::MAX_VALUE_LEN {
            headers.push((
                name.as_str().to_owned(),
                ByteBuf::from(value.as_bytes().to_vec()),
            ));
        }
    }
    let status = response.status().as_u16();
    let Some(vm) = tokens else {
        session
            .send(&DeviceToSidecar::Head { status, headers })
            .await?;
        return stream_body(session, response, |c| Ok(c.to_vec()), || Ok(Vec::new())).await;
    };
    let report = Reporter {
        device,
        vm_id: &peer.vm_id,
        authority: &authority,
        part: BodyPart::Response,
        enforce: tokenize::lock(&vm).enforce(),
    };
    let ty = BodyType::of(header(&headers, "content-type"));
    if ty != BodyType::Other && tokenize::is_encoded(header(&headers, "content-encoding")) {
        report.send(&Report::default(), Some(BodyError::Encoded.to_string()));
        if report.enforce {
            return session
                .send(&refused(
                    502,
                    format!(
                        "{authority} answered with a compressed body, which cannot be tokenized"
                    ),
                ))
                .await;
        }
        session
            .send(&DeviceToSidecar::Head { status, headers })
            .await?;
        return stream_body(session, response, |c| Ok(c.to_vec()), || Ok(Vec::new())).await;
    }
    match ty {
        BodyType::Other => {
            session
                .send(&DeviceToSidecar::Head { status, headers })
                .await?;
            stream_body(session, response, |c| Ok(c.to_vec()), || Ok(Vec::new())).await
        }
        BodyType::Json => {
            // Read whole (bounded), then tokenized structurally, before the head goes out.
            let mut body = Vec::new();
            let mut stream = response.bytes_stream();
            let mut over = false;
            while let Some(chunk) = stream.next().await {
                let Ok(chunk) = chunk else {
                    return session
                        .send(&refused(502, format!("upstream {authority} body failed")))
                        .await;
                };
                if body.len() + chunk.len() > nanoclaw_tokenize::MAX_INPUT_BYTES {
                    over = true;
                    body.extend_from_slice(&chunk);
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            let result = if over {
                Err(BodyError::TooLarge {
                    max: nanoclaw_tokenize::MAX_INPUT_BYTES,
                })
            } else {
                tokenize::whole(&mut tokenize::lock(&vm), ty, Way::Tokenize, &body)
            };
            let out = match result {
                Ok((out, r)) => {
                    report.send(&r, None);
                    out
                }
                Err(e) => {
                    report.send(&Report::default(), Some(e.to_string()));
                    if report.enforce {
                        return session
                            .send(&refused(502, format!("the response of {authority}: {e}")))
                            .await;
                    }
                    body
                }
            };
            session
                .send(&DeviceToSidecar::Head { status, headers })
                .await?;
            for piece in out.chunks(MAX_CHUNK) {
                session.send(&DeviceToSidecar::Body(piece.to_vec())).await?;
            }
            if over {
                // Monitor mode: the rest passes unscanned.
                while let Some(chunk) = stream.next().await {
                    let Ok(chunk) = chunk else { return Ok(()) };
                    for piece in chunk.chunks(MAX_CHUNK) {
                        session.send(&DeviceToSidecar::Body(piece.to_vec())).await?;
                    }
                }
            }
            session.send(&DeviceToSidecar::End).await
        }
        BodyType::Text | BodyType::EventStream => {
            session
                .send(&DeviceToSidecar::Head { status, headers })
                .await?;
            let lines = std::sync::Mutex::new(tokenize::Lines::new(ty, Way::Tokenize));
            let lines_of = || lines.lock().unwrap_or_else(|p| p.into_inner());
            let result = stream_body(
                session,
                response,
                |c| lines_of().push(&mut tokenize::lock(&vm), c),
                || lines_of().finish(&mut tokenize::lock(&vm)),
            )
            .await;
            let (counted, unscanned) = {
                let lines = lines_of();
                (
                    lines.report,
                    lines.unscanned.as_ref().map(ToString::to_string),
                )
            };
            report.send(&counted, unscanned);
            result
        }
    }
}

/// The value of the first header `name` (lowercase) among `headers`.
fn header<'a>(headers: &'a [HeaderLine], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Streams the upstream body through `filter` (and `finish` at its end), then `End`. A
/// failing upstream or filter ends the body without `End`, which tells the sidecar it is cut.
async fn stream_body(
    session: &mut Session,
    response: reqwest::Response,
    mut filter: impl FnMut(&[u8]) -> Result<Vec<u8>, BodyError>,
    finish: impl FnOnce() -> Result<Vec<u8>, BodyError>,
) -> Result<(), NoiseError> {
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::ErrorChain(&e), "upstream body");
                return Ok(());
            }
        };
        let out = match filter(&chunk) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = %e, "the response cannot be tokenized: cut");
                return Ok(());
            }
        };
        for piece in out.chunks(MAX_CHUNK) {
            session.send(&DeviceToSidecar::Body(piece.to_vec())).await?;
        }
    }
    match finish() {
        Ok(out) => {
            for piece in out.chunks(MAX_CHUNK) {
                session.send(&DeviceToSidecar::Body(piece.to_vec())).await?;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the response cannot be tokenized: cut");
            return Ok(());
        }
    }
    session.send(&DeviceToSidecar::End).await
}

/// Sends the host what was tokenized in one part of a call (kinds and counts; nothing when
/// there was nothing to say).
struct Reporter<'a> {
    device: &'a Device,
    vm_id: &'a str,
    authority: &'a str,
    part: BodyPart,
    enforce: bool,
}

impl Reporter<'_> {
    fn send(&self, report: &Report, unscanned: Option<String>) {
        if report.total() == 0 && report.skipped == 0 && unscanned.is_none() {
            return;
        }
        self.device.notify_host(DeviceToHost::Tokenized {
            vm_id: self.vm_id.to_owned(),
            target_host: self.authority.to_owned(),
            part: self.part,
            enforce: self.enforce,
            counts: tokenize::counts(report),
            unscanned,
        });
    }
}

/// The request body as it goes upstream: tokenized to an LLM host, surrogates restored to any
/// other; or the refusal (enforce mode) when it cannot be scanned.
fn tokenize_request(
    device: &Device,
    peer: &SessionPeer,
    vm: &std::sync::Mutex<tokenize::VmTokens>,
    authority: &str,
    headers: &[HeaderLine],
    body: Vec<u8>,
) -> Result<Vec<u8>, Box<DeviceToSidecar>> {
    let (llm, enforce) = {
        let v = tokenize::lock(vm);
        (v.is_llm(authority), v.enforce())
    };
    let (part, way) = if llm {
        (BodyPart::RequestTokenized, Way::Tokenize)
    } else {
        (BodyPart::RequestRestored, Way::Restore)
    };
    let report = Reporter {
        device,
        vm_id: &peer.vm_id,
        authority,
        part,
        enforce,
    };
    let ty = BodyType::of(header(headers, "content-type"));
    let result = if body.is_empty() || ty == BodyType::Other {
        Ok((body, Report::default()))
    } else if tokenize::is_encoded(header(headers, "content-encoding")) {
        Err((BodyError::Encoded, body))
    } else {
        let result = tokenize::whole(&mut tokenize::lock(vm), ty, way, &body);
        result.map_err(|e| (e, body))
    };
    match result {
        Ok((out, r)) => {
            report.send(&r, None);
            Ok(out)
        }
        Err((e, body)) => {
            report.send(&Report::default(), Some(e.to_string()));
            if enforce {
                let status = if e == BodyError::Encoded { 415 } else { 413 };
                Err(Box::new(refused(status, format!("the request body: {e}"))))
            } else {
                Ok(body)
            }
        }
    }
}

/// The fallback path: seal the secret to the sidecar's boot key, under a grant that allows it.
fn seal(device: &Device, peer: &SessionPeer, target: &ProxyTarget) -> DeviceToSidecar {
    let data = match device.snapshot() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %crate::ErrorChain(&e), "vault");
            return refused(503, "the vault is unavailable");
        }
    };
    if device
        .tokens()
        .get(&peer.vm_id)
        .is_some_and(|vm| tokenize::lock(&vm).enforce())
    {
        tracing::info!(vm = %peer.vm_id, "seal refused: the VM's calls are tokenized");
        return refused(
            403,
            "this agent's calls are tokenized, which the fallback path would bypass; \
             use the primary path",
        );
    }
    let (entry, authority) = match resolve(&data, &peer.vm_id, target, Release::Seal) {
        Ok((index, authority)) => (&data.entries[index], authority),
        Err(Refusal { status, reason, .. }) => {
            tracing::info!(vm = %peer.vm_id, ?target, "seal refused");
            return refused(status, reason);
        }
    };
    let mut request_id = [0u8; 16];
    OsRng.fill_bytes(&mut request_id);
    let recipient = PublicKey::from(peer.sidecar_public_key);
    match envelope::seal(
        &mut OsRng,
        &recipient,
        request_id,
        &peer.vm_id,
        now() + SEAL_TTL_SECS,
        entry.secret.expose(),
    ) {
        Ok(envelope) => {
            tracing::info!(vm = %peer.vm_id, credential = %entry.name, %authority, "sealed");
            DeviceToSidecar::Sealed {
                authority,
                envelope,
                header: entry.header.clone(),
                format: entry.format.clone(),
            }
        }
        Err(e) => refused(500, format!("cannot seal: {e}")),
    }
}
