//! Tokenization on the credential path, which only the device sees in clear.
//!
//! The host's MCP gateway tokenizes tool results, but the credential path (the agent's own
//! HTTPS calls) reaches the host only as ciphertext. So the device does it, with the same
//! agent key and mode the host uses for that agent's MCP traffic: the host sends them, and the
//! surrogates it issued since it last did, in a `HostToDevice::Tokenize` over the paired Noise
//! KK link before it opens a session for that VM ([`Registry::apply`], kept by host and VM id as
//! that host names it, also for a VM that moved there). Both sides therefore give the same
//! surrogate for a value, and a surrogate the agent got from a tool is restored when it sends
//! it to an API.
//!
//! - A request to one of the profile's `llm_hosts` has its body tokenized: the model sees
//!   surrogates. A request to any other host has issued surrogates in its body restored: the
//!   service gets the real values. Responses are tokenized on their way to the agent.
//! - Surrogates the device issues stay on the device (telling the host would let it decrypt
//!   them: it holds the key). So a surrogate from an API response is restored on the
//!   credential path but not in an MCP tool call, where it stays a surrogate (fails closed).
//! - JSON bodies (`application/json`, `+json`) are walked structurally, strings only. A JSON
//!   response is read whole (at most [`nanoclaw_tokenize::MAX_INPUT_BYTES`]) before its head
//!   goes to the sidecar. Server-sent events and other text are handled a line at a time (a
//!   `data:` line holding JSON is walked structurally), so streams still stream; a value split
//!   across two events is not seen. A line longer than [`MAX_LINE`] ends the stream in
//!   enforce mode; in monitor mode the rest of the body passes unscanned.
//! - A body that cannot be scanned (compressed, or over the limits) is refused in enforce mode
//!   (the value could pass unseen) and passed on, reported as unscanned, in monitor mode.
//!   Other bodies (images, archives) pass unchanged. The device asks upstreams for
//!   uncompressed answers (`accept-encoding: identity`) when it tokenizes.
//! - The fallback path cannot be tokenized (the sidecar makes the call in the guest, which must
//!   never hold the key), so in enforce mode the device refuses to seal.
//! - Monitor mode changes nothing and counts what enforce mode would replace. Every part with
//!   something counted, or left unscanned, is reported to the host for its audit log
//!   (`DeviceToHost::Tokenized`: kinds and counts, never values).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nanoclaw_tokenize::{IssuedSurrogate, Kind, MAX_INPUT_BYTES, Mode, Report, Tokenizer};
use sha2::{Digest, Sha256};
use shared_proto::credential::{IssuedToken, TokenCounts, TokenKind, TokenizeSpec};

use crate::moves::HostVm;

/// The most VMs whose tokenizers the device keeps; past it an arbitrary one is dropped (its
/// surrogates are then no longer restored: fails closed).
pub const MAX_VMS: usize = 1024;
/// The longest line of a streamed text body.
pub const MAX_LINE: usize = 1 << 20;

/// One VM's tokenization state.
pub struct VmTokens {
    key_digest: [u8; 32],
    enforce: bool,
    llm_hosts: Vec<String>,
    restore_hosts: Vec<String>,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for VmTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTokens")
            .field("enforce", &self.enforce)
            .field("llm_hosts", &self.llm_hosts)
            .field("restore_hosts", &self.restore_hosts)
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl VmTokens {
    /// Whether values are replaced (not only counted).
    pub fn enforce(&self) -> bool {
        self.enforce
    }

    /// Whether `authority` (`host` or `host:port`) is one of the profile's LLM hosts.
    pub fn is_llm(&self, authority: &str) -> bool {
        listed(&self.llm_hosts, authority)
    }

    /// Whether request bodies to `authority` get the real values back (the profile's
    /// `restore_hosts`); a body to a host neither here nor an LLM's leaves unchanged.
    pub fn restores(&self, authority: &str) -> bool {
        listed(&self.restore_hosts, authority)
    }
}

/// Whether `authority` is in `hosts` (ASCII case-insensitive; `:443` is the same as none).
fn listed(hosts: &[String], authority: &str) -> bool {
    let host = |a: &str| -> String { a.strip_suffix(":443").unwrap_or(a).to_ascii_lowercase() };
    let authority = host(authority);
    hosts.iter().any(|h| host(h) == authority)
}

/// Errors of applying the host's settings.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeSetupError {
    /// The tokenizer could not be built from the key.
    #[error("cannot build the tokenizer")]
    Tokenizer(#[source] nanoclaw_tokenize::TokenizeError),
}

/// The tokenizers of the VMs the hosts have announced, by host (its link key) and VM id, as
/// each host names its VMs (two hosts pick their ids independently).
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<HashMap<HostVm, Arc<Mutex<VmTokens>>>>,
}

/// Locks one VM's state.
pub fn lock(vm: &Mutex<VmTokens>) -> MutexGuard<'_, VmTokens> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

fn kind_of(kind: TokenKind) -> Kind {
    match kind {
        TokenKind::Card => Kind::Card,
        TokenKind::Ssn => Kind::Ssn,
        TokenKind::Email => Kind::Email,
        TokenKind::ApiKey => Kind::ApiKey,
    }
}

impl Registry {
    /// Takes the settings of the host whose link key is `host` for its VM `vm_id` (a new
    /// tokenizer if the key or mode changed) and adopts the surrogates it issued. Answers how many were adopted; one that does not check
    /// out ([`Tokenizer::adopt`]) is skipped and logged.
    pub fn apply(
        &self,
        host: &[u8; 32],
        vm_id: &str,
        spec: &TokenizeSpec,
        issued: &[IssuedToken],
    ) -> Result<usize, TokenizeSetupError> {
        let digest: [u8; 32] = Sha256::digest(spec.key).into();
        let id = HostVm::new(*host, vm_id);
        let vm = {
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            let current = vms.get(&id).filter(|v| {
                let v = lock(v);
                v.key_digest == digest && v.enforce == spec.enforce
            });
            match current {
                Some(v) => {
                    let v = Arc::clone(v);
                    let mut t = lock(&v);
                    t.llm_hosts = spec.llm_hosts.clone();
                    t.restore_hosts = spec.restore_hosts.clone();
                    drop(t);
                    v
                }
                None => {
                    let mode = if spec.enforce {
                        Mode::Enforce
                    } else {
                        Mode::Monitor
                    };
                    let tokenizer =
                        Tokenizer::new(spec.key, mode).map_err(TokenizeSetupError::Tokenizer)?;
                    if vms.len() >= MAX_VMS
                        && !vms.contains_key(&id)
                        && let Some(old) = vms.keys().next().cloned()
                    {
                        vms.remove(&old);
                    }
                    let v = Arc::new(Mutex::new(VmTokens {
                        key_digest: digest,
                        enforce: spec.enforce,
                        llm_hosts: spec.llm_hosts.clone(),
                        restore_hosts: spec.restore_hosts.clone(),
                        tokenizer,
                    }));
                    vms.insert(id, Arc::clone(&v));
                    v
                }
            }
        };
        let mut v = lock(&vm);
        let mut adopted = 0;
        for token in issued {
            let issued = IssuedSurrogate {
                surrogate: token.surrogate.clone(),
                kind: kind_of(token.kind),
                prefix_len: usize::from(token.prefix_len),
                alphabet: token.alphabet,
            };
            match v.tokenizer.adopt(&issued) {
                Ok(()) => adopted += 1,
                Err(e) => tracing::warn!(vm = %vm_id, error = %crate::ErrorChain(&e),
                    kind = ?token.kind, "an issued surrogate from the host was not adopted"),
            }
        }
        Ok(adopted)
    }

    /// The state of the VM `vm_id` of the host `host`, if that host announced it tokenizes.
    pub fn get(&self, host: &[u8; 32], vm_id: &str) -> Option<Arc<Mutex<VmTokens>>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&HostVm::new(*host, vm_id))
            .cloned()
    }
}

/// What a body is, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// JSON: walked structurally.
    Json,
    /// Server-sent events: a line at a time, `data:` JSON walked structurally.
    EventStream,
    /// Other text (or no content type): a line at a time.
    Text,
    /// Anything else: passed unchanged in monitor mode, scanned as text in enforce mode (see
    /// the session's `relay_tokenized`).
    Other,
}

impl BodyType {
    /// The type of a body with this `content-type` header value (`None`: no header).
    pub fn of(content_type: Option<&[u8]>) -> BodyType {
        let Some(ct) = content_type else {
            return BodyType::Text;
        };
        let ct = String::from_utf8_lossy(ct).to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence == "application/json" || essence.ends_with("+json") {
            BodyType::Json
        } else if essence == "text/event-stream" {
            BodyType::EventStream
        } else if essence.starts_with("text/")
            || essence == "application/x-ndjson"
            || essence == "application/x-www-form-urlencoded"
            || essence == "application/xml"
        {
            BodyType::Text
        } else {
            BodyType::Other
        }
    }
}

/// Whether a `content-encoding` value means the body is compressed (so it cannot be scanned).
pub fn is_encoded(content_encoding: Option<&[u8]>) -> bool {
    content_encoding.is_some_and(|v| {
        let v = String::from_utf8_lossy(v);
        let v = v.trim();
        !v.is_empty() && !v.eq_ignore_ascii_case("identity")
    })
}

/// The counts of a report, for the wire.
pub fn counts(r: &Report) -> TokenCounts {
    TokenCounts {
        cards: r.cards,
        ssns: r.ssns,
        emails: r.emails,
        api_keys: r.api_keys,
        skipped: r.skipped,
    }
}

/// Why a body could not be tokenized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is compressed.
    #[error("a compressed body cannot be tokenized")]
    Encoded,
    /// The body is over the tokenizer's limit.
    #[error("a body over {max} bytes cannot be tokenized")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// A streamed line is over [`MAX_LINE`].
    #[error("a line over {max} bytes cannot be tokenized")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

fn tok_err(e: nanoclaw_tokenize::TokenizeError) -> BodyError {
    match e {
        nanoclaw_tokenize::TokenizeError::TooLarge { max, .. } => BodyError::TooLarge { max },
        other => BodyError::Tokenizer(crate::ErrorChain(&other).to_string()),
    }
}

/// Which way a body goes through the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Values are replaced by surrogates.
    Tokenize,
    /// Issued surrogates are replaced by the real values.
    Restore,
}

/// Transforms a whole body of type `ty`. Answers the new body (the same bytes in monitor mode
/// or for [`BodyType::Other`]) and what was counted.
pub fn whole(
    v: &mut VmTokens,
    ty: BodyType,
    way: Way,
    body: &[u8],
) -> Result<(Vec<u8>, Report), BodyError> {
    if ty == BodyType::Other || body.is_empty() {
        return Ok((body.to_vec(), Report::default()));
    }
    if body.len() > MAX_INPUT_BYTES {
        return Err(BodyError::TooLarge {
            max: MAX_INPUT_BYTES,
        });
    }
    if ty == BodyType::Json
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(body)
    {
        let (out, report) = match way {
            Way::Tokenize => v.tokenizer.tokenize_json(&value),
            Way::Restore => v.tokenizer.detokenize_json(&value),
        }
        .map_err(tok_err)?;
        if !v.enforce || report.total() == 0 {
            return Ok((body.to_vec(), report));
        }
        let bytes = serde_json::to_vec(&out).map_err(|e| BodyError::Tokenizer(e.to_string()))?;
        return Ok((bytes, report));
    }
    // Not JSON after all, text, or events: scanned as text, which keeps every byte that is not
    // part of a value (surrogates keep the byte classes of what they replace).
    if ty == BodyType::EventStream {
        let mut lines = Lines::new(ty, way);
        let mut out = lines.push(v, body)?;
        out.extend(lines.finish(v)?);
        return Ok((out, lines.report));
    }
    let (out, report) = match way {
        Way::Tokenize => v.tokenizer.tokenize_bytes(body),
        Way::Restore => v.tokenizer.detokenize_bytes(body),
    }
    .map_err(tok_err)?;
    Ok((if v.enforce { out } else { body.to_vec() }, report))
}

/// A streamed text body, a line at a time.
#[derive(Debug)]
pub struct Lines {
    ty: BodyType,
    way: Way,
    pending: Vec<u8>,
    /// Monitor mode met a line too long to scan: the rest passes as it is.
    bypass: bool,
    /// What was counted so far.
    pub report: Report,
    /// Why part of the body went unscanned (monitor mode) or the stream was cut (enforce).
    pub unscanned: Option<BodyError>,
}

impl Lines {
    /// A stream of type `ty` (text or events).
    pub fn new(ty: BodyType, way: Way) -> Lines {
        Lines {
            ty,
            way,
            pending: Vec::new(),
            bypass: false,
            report: Report::default(),
            unscanned: None,
        }
    }

    /// Takes the next chunk; answers what can go on now (every complete line). A line over
    /// [`MAX_LINE`] is an error in enforce mode; in monitor mode the rest of the body passes
    /// unscanned (and [`Lines::unscanned`] says why).
    pub fn push(&mut self, v: &mut VmTokens, chunk: &[u8]) -> Result<Vec<u8>, BodyError> {
        if self.bypass {
            return Ok(chunk.to_vec());
        }
        self.pending.extend_from_slice(chunk);
        let complete = self
            .pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |end| end + 1);
        let too_long = self.pending.len() - complete > MAX_LINE
            || self.pending[..complete]
                .split_inclusive(|&b| b == b'\n')
                .any(|line| line.len() > MAX_LINE);
        if too_long {
            let e = BodyError::LineTooLong { max: MAX_LINE };
            self.unscanned = Some(e.clone());
            if v.enforce {
                return Err(e);
            }
            self.bypass = true;
            return Ok(std::mem::take(&mut self.pending));
        }
        let rest = self.pending.split_off(complete);
        let lines = std::mem::replace(&mut self.pending, rest);
        let mut out = Vec::with_capacity(lines.len());
        for line in lines.split_inclusive(|&b| b == b'\n') {
            out.extend(self.line(v, line)?);
        }
        Ok(out)
    }

    /// The end of the body: the last line, if it had no newline.
    pub fn finish(&mut self, v: &mut VmTokens) -> Result<Vec<u8>, BodyError> {
        let last = std::mem::take(&mut self.pending);
        if last.is_empty() {
            return Ok(last);
        }
        self.line(v, &last)
    }

    fn line(&mut self, v: &mut VmTokens, line: &[u8]) -> Result<Vec<u8>, BodyError> {
        if self.ty == BodyType::EventStream
            && let Some(data) = line.strip_prefix(b"data:")
        {
            let body = data.strip_prefix(b" ").unwrap_or(data);
            let trimmed = body.strip_suffix(b"\n").unwrap_or(body);
            let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(trimmed)
                && (value.is_object() || value.is_array())
            {
                let (out, report) = match self.way {
                    Way::Tokenize => v.tokenizer.tokenize_json(&value),
                    Way::Restore => v.tokenizer.detokenize_json(&value),
                }
                .map_err(tok_err)?;
                self.report.merge(report);
                if !v.enforce || report.total() == 0 {
                    return Ok(line.to_vec());
                }
                let mut bytes = b"data: ".to_vec();
                serde_json::to_writer(&mut bytes, &out)
                    .map_err(|e| BodyError::Tokenizer(e.to_string()))?;
                bytes.extend_from_slice(&body[trimmed.len()..]);
                return Ok(bytes);
            }
        }
        let (out, report) = match self.way {
            Way::Tokenize => v.tokenizer.tokenize_bytes(line),
            Way::Restore => v.tokenizer.detokenize_bytes(line),
        }
        .map_err(tok_err)?;
        self.report.merge(report);
        Ok(if v.enforce { out } else { line.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const HOST: [u8; 32] = [0xa; 32];
    const CARD: &str = "4111 1111 1111 1111";
    const EMAIL: &str = "jane.doe@example.com";

    fn spec(enforce: bool) -> TokenizeSpec {
        TokenizeSpec {
            enforce,
            key: [7; 32],
            llm_hosts: vec!["llm.test".into()],
            restore_hosts: vec!["svc.test".into()],
        }
    }

    fn vm(reg: &Registry) -> Arc<Mutex<VmTokens>> {
        reg.get(&HOST, "vm-1").expect("announced")
    }

    #[test]
    fn each_host_has_its_own_settings_for_a_vm_id() {
        let reg = Registry::default();
        reg.apply(&HOST, "vm-1", &spec(true), &[]).unwrap();
        assert!(reg.get(&[0xb; 32], "vm-1").is_none());
        reg.apply(&[0xb; 32], "vm-1", &spec(false), &[]).unwrap();
        assert!(lock(&vm(&reg)).enforce());
        assert!(!lock(&reg.get(&[0xb; 32], "vm-1").unwrap()).enforce());
    }

    #[test]
    fn a_host_issued_surrogate_is_restored_and_the_same_value_gets_the_same_surrogate() {
        // The host's side: its gateway's tokenizer with the agent key.
        let mut host = Tokenizer::new([7; 32], Mode::Enforce).unwrap();
        let (tool_result, _) = host.tokenize_text(&format!("card {CARD}")).unwrap();
        let surrogate = tool_result.strip_prefix("card ").unwrap().to_owned();
        let (issued, _) = host.issued_since(0);
        let wire: Vec<IssuedToken> = issued
            .iter()
            .map(|i| IssuedToken {
                surrogate: i.surrogate.clone(),
                kind: TokenKind::Card,
                prefix_len: 0,
                alphabet: i.alphabet,
            })
            .collect();
        let reg = Registry::default();
        assert_eq!(reg.apply(&HOST, "vm-1", &spec(true), &wire).unwrap(), 1);
        let vm = vm(&reg);
        let mut v = lock(&vm);
        // To a service: restored.
        let body = format!(r#"{{"card":"{surrogate}"}}"#);
        let (out, report) = whole(&mut v, BodyType::Json, Way::Restore, body.as_bytes()).unwrap();
        assert_eq!(out, format!(r#"{{"card":"{CARD}"}}"#).as_bytes());
        assert_eq!(report.cards, 1);
        // To the LLM: the real value becomes the host's very surrogate.
        let body = format!(r#"{{"prompt":"pay with {CARD}"}}"#);
        let (out, _) = whole(&mut v, BodyType::Json, Way::Tokenize, body.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(r#"{{"prompt":"pay with {surrogate}"}}"#)
        );
        assert!(v.is_llm("llm.test:443") && v.is_llm("LLM.test") && !v.is_llm("api.test"));
        assert!(v.restores("svc.test:443") && v.restores("SVC.test") && !v.restores("llm.test"));
        assert!(!v.restores("api.test"));
    }

    #[test]
    fn a_new_key_replaces_the_tokenizer_and_a_bad_issued_entry_is_skipped() {
        let reg = Registry::default();
        let bad = IssuedToken {
            surrogate: "4111 1111 1111 1112".into(),
            kind: TokenKind::Card,
            prefix_len: 0,
            alphabet: 0,
        };
        assert_eq!(reg.apply(&HOST, "vm-1", &spec(true), &[bad]).unwrap(), 0);
        let first = vm(&reg);
        reg.apply(&HOST, "vm-1", &spec(true), &[]).unwrap();
        assert!(Arc::ptr_eq(&first, &vm(&reg)), "same key: same tokenizer");
        let mut other = spec(true);
        other.key = [8; 32];
        reg.apply(&HOST, "vm-1", &other, &[]).unwrap();
        assert!(!Arc::ptr_eq(&first, &vm(&reg)), "new key: new tokenizer");
        reg.apply(&HOST, "vm-1", &spec(false), &[]).unwrap();
        assert!(!lock(&vm(&reg)).enforce(), "new mode: new tokenizer");
    }

    #[test]
    fn monitor_counts_and_changes_nothing() {
        let reg = Registry::default();
        reg.apply(&HOST, "vm-1", &spec(false), &[]).unwrap();
        let vm = vm(&reg);
        let mut v = lock(&vm);
        let body = format!(r#"{{ "a": "{CARD}", "b": "{EMAIL}" }}"#);
        let (out, report) = whole(&mut v, BodyType::Json, Way::Tokenize, body.as_bytes()).unwrap();
        assert_eq!(out, body.as_bytes());
        assert_eq!((report.cards, report.emails), (1, 1));
    }

    #[test]
    fn events_stream_a_line_at_a_time_and_json_data_is_walked() {
        let reg = Registry::default();
        reg.apply(&HOST, "vm-1", &spec(true), &[]).unwrap();
        let vm = vm(&reg);
        let mut v = lock(&vm);
        let mut lines = Lines::new(BodyType::EventStream, Way::Tokenize);
        let event = format!("data: {{\"text\":\"mail {EMAIL}\"}}\r\n\r\n");
        let (head, tail) = event.as_bytes().split_at(12);
        assert!(
            lines.push(&mut v, head).unwrap().is_empty(),
            "no full line yet"
        );
        let out = lines.push(&mut v, tail).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("data: {\"text\":\"mail ") && out.ends_with("\"}\r\n\r\n"));
        assert!(!out.contains(EMAIL), "{out}");
        let out = lines
            .push(&mut v, format!("id: 1\ndata: {CARD}").as_bytes())
            .unwrap();
        assert_eq!(out, b"id: 1\n");
        let last = String::from_utf8(lines.finish(&mut v).unwrap()).unwrap();
        assert!(last.starts_with("data: ") && !last.contains(CARD), "{last}");
        assert_eq!((lines.report.emails, lines.report.cards), (1, 1));
    }

    #[test]
    fn bad_bodies_are_typed_errors_or_pass_unchanged() {
        let reg = Registry::default();
        reg.apply(&HOST, "vm-1", &spec(true), &[]).unwrap();
        let vm = vm(&reg);
        let mut v = lock(&vm);
        let huge = vec![b'a'; MAX_INPUT_BYTES + 1];
        assert_eq!(
            whole(&mut v, BodyType::Text, Way::Tokenize, &huge),
            Err(BodyError::TooLarge {
                max: MAX_INPUT_BYTES
            })
        );
        let mut lines = Lines::new(BodyType::Text, Way::Tokenize);
        assert_eq!(
            lines.push(&mut v, &vec![b'1'; MAX_LINE + 1]),
            Err(BodyError::LineTooLong { max: MAX_LINE })
        );
        // In monitor mode the same line, and everything after it, passes as it is.
        reg.apply(&HOST, "vm-2", &spec(false), &[]).unwrap();
        let monitor = reg.get(&HOST, "vm-2").unwrap();
        let mut m = lock(&monitor);
        let mut lines = Lines::new(BodyType::Text, Way::Tokenize);
        let first = format!("{CARD}\n");
        assert_eq!(
            lines.push(&mut m, first.as_bytes()).unwrap(),
            first.as_bytes()
        );
        assert_eq!(lines.report.cards, 1);
        let long = vec![b'x'; MAX_LINE + 2];
        assert_eq!(lines.push(&mut m, &long).unwrap(), long);
        assert_eq!(
            lines.push(&mut m, CARD.as_bytes()).unwrap(),
            CARD.as_bytes()
        );
        assert!(lines.finish(&mut m).unwrap().is_empty());
        assert_eq!(
            lines.unscanned,
            Some(BodyError::LineTooLong { max: MAX_LINE })
        );
        // Invalid UTF-8 around a value: the bytes stay, the value is replaced.
        let mut body = vec![0xff, 0xfe, b' '];
        body.extend_from_slice(CARD.as_bytes());
        body.push(0xc3);
        let (out, report) = whole(&mut v, BodyType::Text, Way::Tokenize, &body).unwrap();
        assert_eq!(report.cards, 1);
        assert_eq!(&out[..3], &body[..3]);
        assert_eq!(out.last(), Some(&0xc3));
        // Binary passes unchanged; JSON that does not parse is scanned as text.
        let png = [0x89, b'P', b'N', b'G', b'4', b'1', b'1', b'1'];
        assert_eq!(
            whole(&mut v, BodyType::Other, Way::Tokenize, &png)
                .unwrap()
                .0,
            png
        );
        let broken = format!("{{\"a\": \"{CARD}\"");
        let (out, _) = whole(&mut v, BodyType::Json, Way::Tokenize, broken.as_bytes()).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains(CARD));
        assert_eq!(
            BodyType::of(Some(b"application/problem+json")),
            BodyType::Json
        );
        assert_eq!(
            BodyType::of(Some(b"Text/Event-Stream; charset=utf-8")),
            BodyType::EventStream
        );
        assert_eq!(BodyType::of(Some(b"image/png")), BodyType::Other);
        assert_eq!(BodyType::of(None), BodyType::Text);
        assert!(is_encoded(Some(b"gzip")) && !is_encoded(Some(b"identity")) && !is_encoded(None));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However a stream is cut into chunks, the agent gets the same bytes as from the
        /// whole body, every value is replaced, and arbitrary bytes never panic.
        #[test]
        fn streamed_lines_do_not_depend_on_chunking(
            lines in prop::collection::vec(
                prop_oneof![
                    Just(format!("data: {{\"card\":\"{CARD}\"}}")),
                    Just(format!("mail {EMAIL} now")),
                    Just("id: 7".to_owned()),
                    "[ -~]{0,40}",
                ],
                1..8,
            ),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            noise in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let body = lines.join("\n").into_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
            points.sort_unstable();
            let reg = Registry::default();
            reg.apply(&HOST, "vm-1", &spec(true), &[]).unwrap();
            let vm = vm(&reg);
            let mut v = lock(&vm);
            let (expected, _) = whole(&mut v, BodyType::EventStream, Way::Tokenize, &body).unwrap();
            let mut lines = Lines::new(BodyType::EventStream, Way::Tokenize);
            let mut got = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([body.len()]) {
                got.extend(lines.push(&mut v, &body[at..p]).unwrap());
                at = p;
            }
            got.extend(lines.finish(&mut v).unwrap());
            prop_assert_eq!(&got, &expected);
            let text = String::from_utf8_lossy(&got);
            prop_assert!(!text.contains(CARD) && !text.contains(EMAIL), "{}", text);
            let mut lines = Lines::new(BodyType::Text, Way::Restore);
            let _ = lines.push(&mut v, &noise);
            let _ = lines.finish(&mut v);
            let _ = whole(&mut v, BodyType::Json, Way::Tokenize, &noise);
        }
    }
}
