//! The primary path: the device makes the agent's call itself, with the credential injected,
//! and relays the answer.
//!
//! [`proxy`] runs the steps in order, each a function of its own:
//! 1. [`read_body`]: the request body, bounded by [`MAX_REQUEST_BODY`];
//! 2. [`resolve_or_ask`]: the credential and authority under a live grant, asking the user for
//!    an approval when only the grant is missing and a passkey is stored;
//! 3. [`tokenize_request`]: the body tokenized (to an LLM host) or restored (to a host the
//!    profile's `restore_hosts` lists), when the VM tokenizes;
//! 4. [`upstream_request`]: the HTTPS request, the agent's headers filtered and the
//!    credential's header set;
//! 5. [`response_headers`], then [`relay_unchanged`]: the answer passed through, or tokenized
//!    on its way to the agent ([`relay_tokenized`]: JSON whole, text and event streams a line
//!    at a time). Either way every copy of the injected secret is redacted first
//!    ([`super::redact`]), and a compressed answer, which could hide one, is refused.
//!
//! A step that refuses answers the sidecar with `Refused` and nothing goes upstream.

use std::sync::Mutex;

use futures_util::{FutureExt, StreamExt};
use nanoclaw_tokenize::Report;
use serde_bytes::ByteBuf;
use shared_proto::credential::{
    self, BodyPart, DeviceToHost, DeviceToSidecar, HeaderLine, MAX_CHUNK, ProxyRequest,
    ProxyTarget, SidecarToDevice,
};

use super::redact::Redactor;
use super::{
    MAX_REQUEST_BODY, Refusal, Session, SessionContext, SessionPeer, now, refusal, refused, resolve,
};
use crate::ErrorChain;
use crate::grant::Release;
use crate::noise::NoiseError;
use crate::tokenize::{self, BodyError, BodyType, VmTokens, Way};
use crate::vault::{Entry, VaultData};

/// Runs the primary path for the request whose head opened the session.
pub(super) async fn proxy<C: SessionContext>(
    ctx: &C,
    peer: &SessionPeer,
    session: &mut Session,
    head: ProxyRequest,
) -> Result<(), NoiseError> {
    let Some(body) = read_body(session).await? else {
        return Ok(());
    };
    let mut data = match ctx.snapshot() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "vault");
            return session
                .send(&refused(503, "the vault is unavailable"))
                .await;
        }
    };
    data.grants.extend(ctx.approved_grants(now()));
    let (index, authority) = match resolve_or_ask(ctx, peer, &data, &head.target).await {
        Ok(r) => r,
        Err(Refusal { status, reason, .. }) => {
            if let Some(suppressed) = admit_line(Line::Refused) {
                tracing::info!(vm = %peer.vm_id, sidecar = %key_id(&peer.sidecar_public_key), target = ?head.target, status, reason = ?reason, suppressed, "refused");
            }
            return session.send(&refused(status, reason)).await;
        }
    };
    let entry = &data.entries[index];
    let tokens = ctx.tokens().get(&peer.host, &peer.vm_id);
    let body = match &tokens {
        Some(vm) => match tokenize_request(ctx, peer, vm, &authority, &head.headers, body) {
            Ok(body) => body,
            Err(refusal) => return session.send(&refusal).await,
        },
        None => body,
    };
    let request = match upstream_request(ctx, entry, &authority, &head, body) {
        Ok(request) => request,
        Err(refusal) => return session.send(&refusal).await,
    };
    let mut redactor = Redactor::new(entry.secret.expose());
    if let Some(suppressed) = admit_line(Line::Call) {
        tracing::info!(vm = %peer.vm_id, sidecar = %key_id(&peer.sidecar_public_key), credential = %entry.name, %authority, suppressed, "call");
    }
    drop(data);
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            if let Some(suppressed) = admit_line(Line::Upstream) {
                tracing::warn!(error = %ErrorChain(&e), %authority, suppressed, "upstream");
            }
            return session
                .send(&refused(502, format!("upstream {authority} failed")))
                .await;
        }
    };
    let status = response.status().as_u16();
    let headers = response_headers(&response, &mut redactor);
    if tokenize::is_encoded(header(&headers, "content-encoding")) {
        // Asked for `identity`, answered compressed: the secret could hide in it.
        return session
            .send(&refused(
                502,
                format!("{authority} answered with a compressed body, which cannot be checked"),
            ))
            .await;
    }
    let answer = Answer {
        status,
        headers,
        body: response,
    };
    let result = match tokens {
        None => relay_unchanged(session, answer, &mut redactor).await,
        Some(vm) => {
            relay_tokenized(ctx, peer, session, &authority, &vm, answer, &mut redactor).await
        }
    };
    log_redacted(&peer.vm_id, &authority, &redactor);
    result
}

/// The upstream's answer on its way to the agent: the head (already redacted) and the body,
/// which goes through the [`Redactor`] as it streams.
struct Answer {
    status: u16,
    headers: Vec<HeaderLine>,
    body: reqwest::Response,
}

/// Logs (within a budget: the agent chooses what it calls) that an answer held the secret.
fn log_redacted(vm_id: &str, authority: &str, redactor: &Redactor) {
    static BUDGET: Mutex<Option<shared_proto::ratelimit::LogBudget>> = Mutex::new(None);
    if redactor.redacted == 0 {
        return;
    }
    let mut budget = BUDGET.lock().unwrap_or_else(|p| p.into_inner());
    let budget = budget.get_or_insert_with(Default::default);
    if let Some(suppressed) = budget.admit(std::time::Instant::now()) {
        tracing::warn!(
            vm = %vm_id,
            %authority,
            copies = redactor.redacted,
            suppressed,
            "the upstream's answer held the injected credential: redacted"
        );
    }
}

/// Step 1: the request body, up to `End`; `None` once a refusal (too large, or a message out
/// of order) has been answered.
async fn read_body(session: &mut Session) -> Result<Option<Vec<u8>>, NoiseError> {
    let mut body = Vec::new();
    loop {
        match session.recv().await? {
            SidecarToDevice::Body(chunk) => {
                if body.len() + chunk.len() > MAX_REQUEST_BODY {
                    session
                        .send(&refused(413, "request body too large"))
                        .await?;
                    return Ok(None);
                }
                body.extend_from_slice(&chunk);
            }
            SidecarToDevice::End => return Ok(Some(body)),
            _ => {
                session.send(&refused(400, "unexpected message")).await?;
                return Ok(None);
            }
        }
    }
}

/// Step 2: the credential (its index in `data.entries`) and authority of the call. When only
/// the grant is missing and the user can be asked, the device holds the request for the
/// user's approval; a verified approval releases this request itself (its grant covers the
/// ones that follow).
async fn resolve_or_ask<C: SessionContext>(
    ctx: &C,
    peer: &SessionPeer,
    data: &VaultData,
    target: &ProxyTarget,
) -> Result<(usize, String), Refusal> {
    let (reason, credential, authority) = match resolve(data, &peer.origin, target, Release::Call) {
        Err(Refusal {
            reason,
            ask: Some((credential, authority)),
            ..
        }) if ctx.can_ask() => (reason, credential, authority),
        resolved => return resolved,
    };
    match ctx.request_approval(peer, &credential, &authority).await {
        Ok(grant) => match data.entries.iter().position(|e| e.name == grant.credential) {
            Some(index) => Ok((index, grant.host)),
            None => Err(refusal(404, format!("no credential named {credential:?}"))),
        },
        Err(e) => Err(refusal(403, format!("{reason}: {}", ErrorChain(&e)))),
    }
}

/// Step 4: the upstream request, `https://<authority><path>`: the agent's headers without
/// hop-by-hop ones, its own copy of the credential's header and its `accept-encoding` (the
/// answer must come uncompressed, so it can be scanned for the secret and tokenized); then the
/// credential's header, marked sensitive. Or the refusal (a bad method, a credential that is no
/// valid header value).
fn upstream_request<C: SessionContext>(
    ctx: &C,
    entry: &Entry,
    authority: &str,
    head: &ProxyRequest,
    body: Vec<u8>,
) -> Result<reqwest::RequestBuilder, Box<DeviceToSidecar>> {
    let path = match &head.target {
        ProxyTarget::Service { path_and_query, .. } => path_and_query,
        ProxyTarget::Absolute { path_and_query, .. } => path_and_query,
    };
    let url = format!("https://{authority}{path}");
    let Ok(method) = reqwest::Method::from_bytes(head.method.as_bytes()) else {
        return Err(Box::new(refused(400, "bad method")));
    };
    let mut request = ctx.http().request(method, &url);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if credential::HOP_BY_HOP_HEADERS.contains(&lower.as_str())
            || lower.eq_ignore_ascii_case(&entry.header)
            || lower == "accept-encoding"
        {
            continue;
        }
        request = request.header(name.as_str(), value.as_slice());
    }
    // A compressed answer could not be scanned.
    request = request.header("accept-encoding", "identity");
    let value = entry.header_value();
    let Ok(mut header_value) = reqwest::header::HeaderValue::from_bytes(&value) else {
        return Err(Box::new(refused(
            500,
            "the credential is not a valid header",
        )));
    };
    header_value.set_sensitive(true);
    Ok(request
        .header(entry.header.as_str(), header_value)
        .body(body))
}

/// Step 5: the response's headers that go to the agent: no hop-by-hop ones, at most
/// [`credential::MAX_HEADERS`], none longer than [`credential::MAX_VALUE_LEN`], the secret
/// redacted from each value.
fn response_headers(response: &reqwest::Response, redactor: &mut Redactor) -> Vec<HeaderLine> {
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
                ByteBuf::from(redactor.header(value.as_bytes())),
            ));
        }
    }
    headers
}

/// Step 5, untokenized: the head, then the body as it arrives.
async fn relay_unchanged(
    session: &mut Session,
    answer: Answer,
    redactor: &mut Redactor,
) -> Result<(), NoiseError> {
    let Answer {
        status,
        headers,
        body,
    } = answer;
    session
        .send(&DeviceToSidecar::Head { status, headers })
        .await?;
    stream_body(session, body, redactor, Ok, || Ok(Vec::new())).await
}

/// Step 5 for a tokenizing VM: the answer tokenized on its way to the agent, by body type
/// (a compressed one never gets here).
async fn relay_tokenized<C: SessionContext>(
    ctx: &C,
    peer: &SessionPeer,
    session: &mut Session,
    authority: &str,
    vm: &Mutex<VmTokens>,
    answer: Answer,
    redactor: &mut Redactor,
) -> Result<(), NoiseError> {
    let report = Reporter {
        ctx,
        host: &peer.host,
        vm_id: &peer.vm_id,
        authority,
        part: BodyPart::Response,
        enforce: tokenize::lock(vm).enforce(),
    };
    match BodyType::of(header(&answer.headers, "content-type")) {
        // Enforce mode scans any other content type as text (a binary body's long lines are
        // refused like any other line over the bound); monitor mode passes it on.
        BodyType::Other if report.enforce => {
            relay_lines(session, &report, vm, BodyType::Text, answer, redactor).await
        }
        BodyType::Other => relay_unchanged(session, answer, redactor).await,
        BodyType::Json => relay_json(session, &report, vm, answer, redactor).await,
        ty @ (BodyType::Text | BodyType::EventStream) => {
            relay_lines(session, &report, vm, ty, answer, redactor).await
        }
    }
}

/// A JSON answer: read whole (bounded), then tokenized structurally, before the head goes
/// out. Over the bound, monitor mode passes the rest unscanned.
async fn relay_json<C: SessionContext>(
    session: &mut Session,
    report: &Reporter<'_, C>,
    vm: &Mutex<VmTokens>,
    answer: Answer,
    redactor: &mut Redactor,
) -> Result<(), NoiseError> {
    let Answer {
        status,
        headers,
        body: response,
    } = answer;
    let authority = report.authority;
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let mut over = false;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return session
                .send(&refused(502, format!("upstream {authority} body failed")))
                .await;
        };
        body.extend(redactor.push(&chunk));
        if body.len() > nanoclaw_tokenize::MAX_INPUT_BYTES {
            over = true;
            break;
        }
    }
    if !over {
        body.extend(redactor.finish());
    }
    let result = if over {
        Err(BodyError::TooLarge {
            max: nanoclaw_tokenize::MAX_INPUT_BYTES,
        })
    } else {
        tokenize::whole(
            &mut tokenize::lock(vm),
            BodyType::Json,
            Way::Tokenize,
            &body,
        )
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
    session.send_body(&out).await?;
    if over {
        // Monitor mode: the rest passes unscanned.
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { return Ok(()) };
            session.send_body(&redactor.push(&chunk)).await?;
        }
        session.send_body(&redactor.finish()).await?;
    }
    session.send(&DeviceToSidecar::End).await
}

/// A text or event-stream answer: the head at once, then the body tokenized a line at a
/// time, so streams still stream.
async fn relay_lines<C: SessionContext>(
    session: &mut Session,
    report: &Reporter<'_, C>,
    vm: &Mutex<VmTokens>,
    ty: BodyType,
    answer: Answer,
    redactor: &mut Redactor,
) -> Result<(), NoiseError> {
    let Answer {
        status,
        headers,
        body: response,
    } = answer;
    session
        .send(&DeviceToSidecar::Head { status, headers })
        .await?;
    let lines = Mutex::new(tokenize::Lines::new(ty, Way::Tokenize));
    let lines_of = || lines.lock().unwrap_or_else(|p| p.into_inner());
    let result = stream_body(
        session,
        response,
        redactor,
        |c| lines_of().push(&mut tokenize::lock(vm), &c),
        || lines_of().finish(&mut tokenize::lock(vm)),
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

/// The value of the first header `name` (lowercase) among `headers`.
fn header<'a>(headers: &'a [HeaderLine], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Streams the upstream body through the redactor and then `filter` (and `finish` at its end),
/// then `End`. A failing upstream or filter ends the body without `End`, which tells the
/// sidecar it is cut.
async fn stream_body(
    session: &mut Session,
    response: reqwest::Response,
    redactor: &mut Redactor,
    mut filter: impl FnMut(Vec<u8>) -> Result<Vec<u8>, BodyError>,
    finish: impl FnOnce() -> Result<Vec<u8>, BodyError>,
) -> Result<(), NoiseError> {
    let mut stream = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::with_capacity(MAX_CHUNK);
    let mut ended = false;
    while !ended {
        // Wait for the next piece, then take whatever else has already arrived (up to a full
        // record) without waiting: records come out full-sized on a fast download, and a
        // stream that trickles still goes on at once.
        match stream.next().await {
            None => break,
            Some(Ok(c)) => pending.extend_from_slice(&c),
            Some(Err(e)) => return upstream_body_failed(&e),
        }
        while pending.len() < MAX_CHUNK {
            match stream.next().now_or_never() {
                None => break,
                Some(None) => ended = true,
                Some(Some(Ok(c))) => pending.extend_from_slice(&c),
                Some(Some(Err(e))) => return upstream_body_failed(&e),
            }
            if ended {
                break;
            }
        }
        let out = filter(redactor.push(&pending));
        pending.clear();
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                if let Some(suppressed) = admit_line(Line::Cut) {
                    tracing::warn!(error = %e, suppressed, "the response cannot be tokenized: cut");
                }
                return Ok(());
            }
        };
        session.send_body(&out).await?;
    }
    let last = filter(redactor.finish()).and_then(|mut out| {
        out.extend(finish()?);
        Ok(out)
    });
    match last {
        Ok(out) => {
            session.send_body(&out).await?;
        }
        Err(e) => {
            if let Some(suppressed) = admit_line(Line::Cut) {
                tracing::warn!(error = %e, suppressed, "the response cannot be tokenized: cut");
            }
            return Ok(());
        }
    }
    session.send(&DeviceToSidecar::End).await
}

/// An upstream body that failed mid-way: the answer is cut (no `End`).
fn upstream_body_failed(e: &reqwest::Error) -> Result<(), NoiseError> {
    if let Some(suppressed) = admit_line(Line::Cut) {
        tracing::warn!(error = %ErrorChain(e), suppressed, "upstream body");
    }
    Ok(())
}

/// The first 8 bytes of a sidecar's boot key in hex: enough to tell one guest boot (or one
/// clone of a snapshot) from another in the log.
pub(super) fn key_id(key: &[u8; 32]) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The per-request log lines, each with a budget of its own: the agent chooses what it calls
/// and how often, so none of them may flood the device's log.
#[derive(Clone, Copy)]
pub(super) enum Line {
    /// A request the device refused.
    Refused = 0,
    /// A call made with a credential.
    Call = 1,
    /// An upstream that failed before its answer.
    Upstream = 2,
    /// An answer cut mid-way (the body failed or could not be tokenized).
    Cut = 3,
    /// A session opened by a sidecar (its VM and boot key).
    Session = 4,
}

/// Whether a line of `kind` may be logged now, and how many of that kind were dropped before it.
pub(super) fn admit_line(kind: Line) -> Option<u64> {
    static BUDGETS: [Mutex<Option<shared_proto::ratelimit::LogBudget>>; 5] =
        [const { Mutex::new(None) }; 5];
    let mut budget = BUDGETS[kind as usize]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    budget
        .get_or_insert_with(Default::default)
        .admit(std::time::Instant::now())
}

/// Sends the host what was tokenized in one part of a call (kinds and counts; nothing when
/// there was nothing to say).
struct Reporter<'a, C> {
    ctx: &'a C,
    /// The link the report goes on (the session's).
    host: &'a [u8; 32],
    vm_id: &'a str,
    authority: &'a str,
    part: BodyPart,
    enforce: bool,
}

impl<C: SessionContext> Reporter<'_, C> {
    fn send(&self, report: &Report, unscanned: Option<String>) {
        if report.total() == 0 && report.skipped == 0 && unscanned.is_none() {
            return;
        }
        self.ctx.notify_host(
            self.host,
            DeviceToHost::Tokenized {
                vm_id: self.vm_id.to_owned(),
                target_host: self.authority.to_owned(),
                part: self.part,
                enforce: self.enforce,
                counts: tokenize::counts(report),
                unscanned,
            },
        );
    }
}

/// Step 3: the request body as it goes upstream: tokenized to an LLM host, surrogates
/// restored to a host the profile lists in `restore_hosts`, unchanged to any other; or the
/// refusal (enforce mode) when it cannot be scanned.
fn tokenize_request<C: SessionContext>(
    ctx: &C,
    peer: &SessionPeer,
    vm: &Mutex<VmTokens>,
    authority: &str,
    headers: &[HeaderLine],
    body: Vec<u8>,
) -> Result<Vec<u8>, Box<DeviceToSidecar>> {
    let (llm, restores, enforce) = {
        let v = tokenize::lock(vm);
        (v.is_llm(authority), v.restores(authority), v.enforce())
    };
    let (part, way) = if llm {
        (BodyPart::RequestTokenized, Way::Tokenize)
    } else if restores {
        (BodyPart::RequestRestored, Way::Restore)
    } else {
        // Neither a model API nor a host the profile gives real values: the body leaves as
        // the agent wrote it, surrogates and all.
        return Ok(body);
    };
    let report = Reporter {
        ctx,
        host: &peer.host,
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
