//! Approval requests and the passkey (WebAuthn) checks over them, as pure functions.
//!
//! An [`ApprovalRequest`] is what the user approves: agent, VM, profile, action and target, the
//! full arguments as shown, the rule and reason, creation and expiry times and a random nonce.
//! [`ApprovalRequest::encode`] gives its canonical bytes and [`ApprovalRequest::challenge`]
//! their SHA-256, which is the WebAuthn challenge: the passkey's signature covers exactly what
//! the user saw, and nothing else can carry it.
//!
//! This lives in `shared-proto`, with no I/O and no clock (callers pass the time), so that the
//! host's approval server and `vault-device` run the very same checks: before it creates a
//! credential grant, the device decodes the request it is shown ([`ApprovalRequest::decode`]
//! refuses any non-canonical encoding), checks it is the one it is asked to grant, and calls
//! [`verify_approval`] with the passkey it stored at pairing. A compromised host cannot mint a
//! grant without the user's passkey signing that exact request.
//!
//! # The canonical encoding
//!
//! CBOR (RFC 8949) of one array with a fixed order, `[`[`DOMAIN`]`, id, agent, vm_id, profile,
//! [action kind, action fields...], arguments, rule, reason, created_unix_ms, expires_unix_ms,
//! nonce]`, written with `ciborium` from a [`ciborium::Value`] built here: text strings, unsigned
//! integers in their shortest form, a byte string for the nonce and definite lengths only, which
//! is the deterministic encoding of RFC 8949 §4.2.1 (there are no maps, so no key order to
//! agree on). An array rather than a map of named fields makes the field order part of the
//! format instead of a property of a serializer. The arguments are one text string: the exact
//! JSON text the approval page shows (the host writes it with sorted object keys), so there is no
//! second rendering of them to disagree with the signed one. The leading domain string keeps a
//! request from being confused with any other signed object.
//!
//! # Why a hand-written WebAuthn verifier
//!
//! `webauthn-rs` makes its own random challenge and its maintainers declined to let callers bind
//! a custom one, while here the challenge must be the request's hash. The checks needed for one
//! ES256 passkey are few and are written out below with `p256` (ECDSA), `ciborium` (the
//! attestation object and COSE key) and `serde_json` (clientDataJSON):
//! - registration ([`verify_registration`]): clientDataJSON type `webauthn.create`, the
//!   challenge, the origin, rpIdHash = SHA-256(rp id), the UP and UV flags, attested credential
//!   data with an ES256 P-256 COSE key; attestation format `none`, or `packed` self-attestation
//!   (its signature checked with the new key). Attestation with a certificate chain is refused:
//!   there is no trust anchor to check it against, and the passkey is trusted because the user
//!   registered it through a one-time link, not because of its maker.
//! - assertion ([`verify_assertion`]): the credential is a registered one, clientDataJSON type
//!   `webauthn.get`, challenge (base64url) = the request hash, origin, not cross-origin,
//!   rpIdHash, UP and UV set, the ES256 signature over authenticatorData ‖
//!   SHA-256(clientDataJSON) by that credential's key, and the signature counter (when either
//!   the stored or the new one is non-zero, the new one must be larger).
//!
//! A counter cannot stop a replay by itself (many passkeys always send 0): the host also lets
//! each request be approved once, and a request's nonce makes every challenge new.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ciborium::Value;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first element of every encoded request.
pub const DOMAIN: &str = "nanoclaw-approval-v1";

/// Flag bits of authenticatorData (WebAuthn §6.1).
mod flags {
    /// User present.
    pub const UP: u8 = 0x01;
    /// User verified.
    pub const UV: u8 = 0x04;
    /// Attested credential data included.
    pub const AT: u8 = 0x40;
}

/// COSE numbers (RFC 9053) of an ES256 P-256 key.
mod cose {
    pub const KTY: i128 = 1;
    pub const ALG: i128 = 3;
    pub const CRV: i128 = -1;
    pub const X: i128 = -2;
    pub const Y: i128 = -3;
    pub const KTY_EC2: i128 = 2;
    pub const ALG_ES256: i128 = -7;
    pub const CRV_P256: i128 = 1;
}

/// The largest encoded request accepted by [`ApprovalRequest::decode`].
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// Errors of approval requests and passkey checks. Each names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// Encoding a request failed.
    #[error("cannot encode the approval request")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// The bytes are not an encoded request.
    #[error("not an approval request: {0}")]
    Decode(&'static str),
    /// The bytes decode but are not the canonical encoding of what they hold.
    #[error("the approval request is not canonically encoded")]
    NotCanonical,
    /// The request's expiry has passed.
    #[error("the approval request expired")]
    Expired,
    /// The assertion names a credential that is not registered.
    #[error("the passkey is not registered")]
    UnknownCredential,
    /// authenticatorData is malformed.
    #[error("malformed authenticator data: {0}")]
    AuthenticatorData(&'static str),
    /// rpIdHash is not SHA-256 of the rp id.
    #[error("the authenticator data is for another relying party")]
    RpIdMismatch,
    /// The UP flag is clear.
    #[error("the user was not present")]
    UserNotPresent,
    /// The UV flag is clear.
    #[error("the user was not verified")]
    UserNotVerified,
    /// clientDataJSON does not parse.
    #[error("malformed clientDataJSON")]
    ClientData(#[source] serde_json::Error),
    /// clientDataJSON has the wrong `type`.
    #[error("clientDataJSON type is {found:?}, not {expected:?}")]
    WrongType {
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// The challenge is not the expected one (an assertion for another request).
    #[error("the challenge is not this request's")]
    ChallengeMismatch,
    /// The origin is not the expected one.
    #[error("origin {0:?} is not the approval page's")]
    OriginMismatch(String),
    /// The ceremony ran in a cross-origin frame.
    #[error("cross-origin ceremony")]
    CrossOrigin,
    /// The signature is not a DER ECDSA signature.
    #[error("malformed signature")]
    SignatureEncoding,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The signature counter did not increase (a cloned authenticator or a replay).
    #[error("signature counter {found} is not above {stored}")]
    CounterNotIncreased {
        /// The stored counter.
        stored: u32,
        /// The assertion's counter.
        found: u32,
    },
    /// The attestation object is malformed.
    #[error("malformed attestation object: {0}")]
    Attestation(&'static str),
    /// The attestation format is not one we accept.
    #[error("unsupported attestation format {0:?}")]
    UnsupportedAttestation(String),
    /// The credential key is not an ES256 P-256 key.
    #[error("the passkey's key is not ES256 on P-256")]
    UnsupportedKey,
}

/// The action a request is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestAction {
    /// An MCP tool call.
    ToolCall {
        /// The upstream MCP server.
        server: String,
        /// The tool.
        tool: String,
    },
    /// Spawning an agent with a profile beyond the caller's rights.
    Spawn {
        /// The profile asked for.
        profile: String,
    },
    /// Releasing a credential for a target host.
    Credential {
        /// The credential's name.
        name: String,
        /// Where it would be sent.
        target_host: String,
    },
}

/// One approval request, as the user sees it and the passkey signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// The approval's id.
    pub id: String,
    /// The agent asking.
    pub agent: String,
    /// Its VM.
    pub vm_id: String,
    /// Its profile.
    pub profile: String,
    /// The action.
    pub action: RequestAction,
    /// The full arguments: the exact JSON text shown to the user.
    pub arguments: String,
    /// The rule that asked for approval.
    pub rule: String,
    /// Why, in words for the user.
    pub reason: String,
    /// When it was made (Unix ms).
    pub created_unix_ms: u64,
    /// When it stops being approvable (Unix ms).
    pub expires_unix_ms: u64,
    /// Random, so that no two requests share a challenge.
    pub nonce: [u8; 32],
}

impl ApprovalRequest {
    fn to_value(&self) -> Value {
        let t = |s: &str| Value::Text(s.to_owned());
        let action = match &self.action {
            RequestAction::ToolCall { server, tool } => vec![t("tool_call"), t(server), t(tool)],
            RequestAction::Spawn { profile } => vec![t("spawn"), t(profile)],
            RequestAction::Credential { name, target_host } => {
                vec![t("credential"), t(name), t(target_host)]
            }
        };
        Value::Array(vec![
            t(DOMAIN),
            t(&self.id),
            t(&self.agent),
            t(&self.vm_id),
            t(&self.profile),
            Value::Array(action),
            t(&self.arguments),
            t(&self.rule),
            t(&self.reason),
            Value::Integer(self.created_unix_ms.into()),
            Value::Integer(self.expires_unix_ms.into()),
            Value::Bytes(self.nonce.to_vec()),
        ])
    }

    /// The canonical encoding (see the module doc).
    pub fn encode(&self) -> Result<Vec<u8>, ApprovalError> {
        let mut out = Vec::new();
        ciborium::into_writer(&self.to_value(), &mut out).map_err(ApprovalError::Encode)?;
        Ok(out)
    }

    /// SHA-256 of the canonical encoding: the WebAuthn challenge.
    pub fn challenge(&self) -> Result<[u8; 32], ApprovalError> {
        Ok(Sha256::digest(self.encode()?).into())
    }

    /// Decodes a canonically encoded request; any other encoding of the same fields is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, ApprovalError> {
        if bytes.len() > MAX_REQUEST_LEN {
            return Err(ApprovalError::Decode("too long"));
        }
        let value: Value =
            ciborium::from_reader(bytes).map_err(|_| ApprovalError::Decode("not CBOR"))?;
        let Value::Array(items) = value else {
            return Err(ApprovalError::Decode("not an array"));
        };
        let mut it = items.into_iter();
        let mut next = || it.next().ok_or(ApprovalError::Decode("too few fields"));
        let text = |v: Value| match v {
            Value::Text(s) => Ok(s),
            _ => Err(ApprovalError::Decode("a field is not text")),
        };
        let uint = |v: Value| match v {
            Value::Integer(i) => u64::try_from(i).map_err(|_| ApprovalError::Decode("bad time")),
            _ => Err(ApprovalError::Decode("a time is not an integer")),
        };
        if text(next()?)? != DOMAIN {
            return Err(ApprovalError::Decode("wrong domain"));
        }
        let id = text(next()?)?;
        let agent = text(next()?)?;
        let vm_id = text(next()?)?;
        let profile = text(next()?)?;
        let Value::Array(action) = next()? else {
            return Err(ApprovalError::Decode("action is not an array"));
        };
        let action: Vec<String> = action.into_iter().map(text).collect::<Result<_, _>>()?;
        let action = match action.as_slice() {
            [k, server, tool] if k == "tool_call" => RequestAction::ToolCall {
                server: server.clone(),
                tool: tool.clone(),
            },
            [k, profile] if k == "spawn" => RequestAction::Spawn {
                profile: profile.clone(),
            },
            [k, name, target_host] if k == "credential" => RequestAction::Credential {
                name: name.clone(),
                target_host: target_host.clone(),
            },
            _ => return Err(ApprovalError::Decode("unknown action")),
        };
        let arguments = text(next()?)?;
        let rule = text(next()?)?;
        let reason = text(next()?)?;
        let created_unix_ms = uint(next()?)?;
        let expires_unix_ms = uint(next()?)?;
        let nonce = match next()? {
            Value::Bytes(b) => <[u8; 32]>::try_from(b.as_slice())
                .map_err(|_| ApprovalError::Decode("nonce is not 32 bytes"))?,
            _ => return Err(ApprovalError::Decode("nonce is not bytes")),
        };
        if next().is_ok() {
            return Err(ApprovalError::Decode("too many fields"));
        }
        let request = Self {
            id,
            agent,
            vm_id,
            profile,
            action,
            arguments,
            rule,
            reason,
            created_unix_ms,
            expires_unix_ms,
            nonce,
        };
        if request.encode()? != bytes {
            return Err(ApprovalError::NotCanonical);
        }
        Ok(request)
    }
}

/// Who the passkeys are for: the rp id and the approval page's origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelyingParty {
    /// The rp id (a domain; `localhost` in tests).
    pub rp_id: String,
    /// The exact origin of the pages, e.g. `http://localhost:8443`.
    pub origin: String,
}

/// A registered passkey: public data only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Passkey {
    /// The credential id.
    #[serde(with = "b64url")]
    pub credential_id: Vec<u8>,
    /// The public key, SEC1 uncompressed (65 bytes).
    #[serde(with = "b64url")]
    pub public_key: Vec<u8>,
    /// The last signature counter seen.
    pub counter: u32,
}

/// A WebAuthn assertion as the browser returns it (`PublicKeyCredential` with an
/// `AuthenticatorAssertionResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assertion {
    /// The credential id (`rawId`).
    #[serde(with = "b64url")]
    pub credential_id: Vec<u8>,
    /// `authenticatorData`.
    #[serde(with = "b64url")]
    pub authenticator_data: Vec<u8>,
    /// `clientDataJSON`.
    #[serde(with = "b64url")]
    pub client_data_json: Vec<u8>,
    /// `signature` (DER).
    #[serde(with = "b64url")]
    pub signature: Vec<u8>,
}

/// A WebAuthn registration as the browser returns it (`AuthenticatorAttestationResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// `attestationObject`.
    #[serde(with = "b64url")]
    pub attestation_object: Vec<u8>,
    /// `clientDataJSON`.
    #[serde(with = "b64url")]
    pub client_data_json: Vec<u8>,
}

/// What a successful [`verify_assertion`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedAssertion {
    /// The index of the passkey that signed, in the slice given.
    pub passkey: usize,
    /// Its new signature counter (store it).
    pub counter: u32,
}

/// Serde helpers: bytes as unpadded base64url text.
pub mod b64url {
    use super::{B64URL, Engine};

    /// Serializes bytes as base64url.
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64URL.encode(bytes))
    }

    /// Deserializes base64url text (padding tolerated).
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        B64URL
            .decode(s.trim_end_matches('='))
            .map_err(serde::de::Error::custom)
    }
}

/// Checks that `assertion` approves `request` at `now_unix_ms`: the request has not expired and
/// the assertion verifies over its challenge ([`verify_assertion`]).
pub fn verify_approval(
    rp: &RelyingParty,
    request: &ApprovalRequest,
    now_unix_ms: u64,
    passkeys: &[Passkey],
    assertion: &Assertion,
) -> Result<VerifiedAssertion, ApprovalError> {
    if now_unix_ms >= request.expires_unix_ms {
        return Err(ApprovalError::Expired);
    }
    verify_assertion(rp, &request.challenge()?, passkeys, assertion)
}

#[derive(Deserialize)]
struct ClientData {
    #[serde(rename = "type")]
    kind: String,
    challenge: String,
    origin: String,
    #[serde(rename = "crossOrigin", default)]
    cross_origin: bool,
}

fn check_client_data(
    rp: &RelyingParty,
    bytes: &[u8],
    kind: &'static str,
    challenge: &[u8],
) -> Result<(), ApprovalError> {
    let cd: ClientData = serde_json::from_slice(bytes).map_err(ApprovalError::ClientData)?;
    if cd.kind != kind {
        return Err(ApprovalError::WrongType {
            expected: kind,
            found: cd.kind,
        });
    }
    let got = B64URL
        .decode(cd.challenge.trim_end_matches('='))
        .map_err(|_| ApprovalError::ChallengeMismatch)?;
    if got != challenge {
        return Err(ApprovalError::ChallengeMismatch);
    }
    if cd.origin != rp.origin {
        return Err(ApprovalError::OriginMismatch(cd.origin));
    }
    if cd.cross_origin {
        return Err(ApprovalError::CrossOrigin);
    }
    Ok(())
}

/// The fixed head of authenticatorData: flags and counter, after checking rpIdHash, UP and UV.
fn check_auth_data_head(rp: &RelyingParty, data: &[u8]) -> Result<(u8, u32), ApprovalError> {
    let (rp_hash, rest) = data
        .split_first_chunk::<32>()
        .ok_or(ApprovalError::AuthenticatorData("too short"))?;
    let (&[flag_bits], rest) = rest
        .split_first_chunk::<1>()
        .ok_or(ApprovalError::AuthenticatorData("too short"))?;
    let counter = rest
        .first_chunk::<4>()
        .ok_or(ApprovalError::AuthenticatorData("too short"))?;
    if rp_hash[..] != Sha256::digest(rp.rp_id.as_bytes())[..] {
        return Err(ApprovalError::RpIdMismatch);
    }
    if flag_bits & flags::UP == 0 {
        return Err(ApprovalError::UserNotPresent);
    }
    if flag_bits & flags::UV == 0 {
        return Err(ApprovalError::UserNotVerified);
    }
    Ok((flag_bits, u32::from_be_bytes(*counter)))
}

fn verify_es256(public_key: &[u8], message: &[u8], der: &[u8]) -> Result<(), ApprovalError> {
    let key =
        VerifyingKey::from_sec1_bytes(public_key).map_err(|_| ApprovalError::UnsupportedKey)?;
    let sig = Signature::from_der(der).map_err(|_| ApprovalError::SignatureEncoding)?;
    key.verify(message, &sig)
        .map_err(|_| ApprovalError::BadSignature)
}

fn signed_message(authenticator_data: &[u8], client_data_json: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(authenticator_data.len() + 32);
    m.extend_from_slice(authenticator_data);
    m.extend_from_slice(&Sha256::digest(client_data_json));
    m
}

/// Verifies a WebAuthn assertion over `challenge` by one of `passkeys` (see the module doc for
/// the checks). On success the caller must store the returned counter for that passkey.
pub fn verify_assertion(
    rp: &RelyingParty,
    challenge: &[u8; 32],
    passkeys: &[Passkey],
    assertion: &Assertion,
) -> Result<VerifiedAssertion, ApprovalError> {
    let index = passkeys
        .iter()
        .position(|p| p.credential_id == assertion.credential_id)
        .ok_or(ApprovalError::UnknownCredential)?;
    let passkey = &passkeys[index];
    check_client_data(rp, &assertion.client_data_json, "webauthn.get", challenge)?;
    let (_, counter) = check_auth_data_head(rp, &assertion.authenticator_data)?;
    verify_es256(
        &passkey.public_key,
        &signed_message(&assertion.authenticator_data, &assertion.client_data_json),
        &assertion.signature,
    )?;
    if (counter != 0 || passkey.counter != 0) && counter <= passkey.counter {
        return Err(ApprovalError::CounterNotIncreased {
            stored: passkey.counter,
            found: counter,
        });
    }
    Ok(VerifiedAssertion {
        passkey: index,
        counter,
    })
}

fn map_get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
        .map(|(_, v)| v)
}

fn cose_get(map: &[(Value, Value)], key: i128) -> Option<&Value> {
    map.iter()
        .find(|(k, _)| matches!(k, Value::Integer(i) if i128::from(*i) == key))
        .map(|(_, v)| v)
}

fn cose_int(map: &[(Value, Value)], key: i128) -> Option<i128> {
    match cose_get(map, key)? {
        Value::Integer(i) => Some(i128::from(*i)),
        _ => None,
    }
}

fn cose_coord(map: &[(Value, Value)], key: i128) -> Result<[u8; 32], ApprovalError> {
    match cose_get(map, key) {
        Some(Value::Bytes(b)) => {
            <[u8; 32]>::try_from(b.as_slice()).map_err(|_| ApprovalError::UnsupportedKey)
        }
        _ => Err(ApprovalError::UnsupportedKey),
    }
}

/// Verifies a WebAuthn registration made over `challenge` and returns the new passkey (counter
/// as registered). See the module doc for the checks.
pub fn verify_registration(
    rp: &RelyingParty,
    challenge: &[u8],
    registration: &Registration,
) -> Result<Passkey, ApprovalError> {
    check_client_data(
        rp,
        &registration.client_data_json,
        "webauthn.create",
        challenge,
    )?;
    let object: Value = ciborium::from_reader(registration.attestation_object.as_slice())
        .map_err(|_| ApprovalError::Attestation("not CBOR"))?;
    let Value::Map(object) = object else {
        return Err(ApprovalError::Attestation("not a map"));
    };
    let Some(Value::Text(fmt)) = map_get(&object, "fmt") else {
        return Err(ApprovalError::Attestation("no fmt"));
    };
    let Some(Value::Bytes(auth_data)) = map_get(&object, "authData") else {
        return Err(ApprovalError::Attestation("no authData"));
    };
    let Some(Value::Map(att_stmt)) = map_get(&object, "attStmt") else {
        return Err(ApprovalError::Attestation("no attStmt"));
    };
    let (flag_bits, counter) = check_auth_data_head(rp, auth_data)?;
    if flag_bits & flags::AT == 0 {
        return Err(ApprovalError::AuthenticatorData("no attested credential"));
    }
    // rpIdHash (32), flags (1), counter (4), AAGUID (16), credential id length (2).
    let rest = auth_data
        .get(32 + 1 + 4 + 16..)
        .ok_or(ApprovalError::AuthenticatorData("too short"))?;
    let (len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or(ApprovalError::AuthenticatorData("too short"))?;
    let id_len = usize::from(u16::from_be_bytes(*len));
    let (credential_id, key_bytes) = rest
        .split_at_checked(id_len)
        .ok_or(ApprovalError::AuthenticatorData("credential id overruns"))?;
    let key: Value = ciborium::from_reader(key_bytes)
        .map_err(|_| ApprovalError::AuthenticatorData("bad credential key"))?;
    let Value::Map(key) = key else {
        return Err(ApprovalError::UnsupportedKey);
    };
    if cose_int(&key, cose::KTY) != Some(cose::KTY_EC2)
        || cose_int(&key, cose::ALG) != Some(cose::ALG_ES256)
        || cose_int(&key, cose::CRV) != Some(cose::CRV_P256)
    {
        return Err(ApprovalError::UnsupportedKey);
    }
    let mut public_key = Vec::with_capacity(65);
    public_key.push(0x04);
    public_key.extend_from_slice(&cose_coord(&key, cose::X)?);
    public_key.extend_from_slice(&cose_coord(&key, cose::Y)?);
    // The point must be on the curve.
    VerifyingKey::from_sec1_bytes(&public_key).map_err(|_| ApprovalError::UnsupportedKey)?;
    match fmt.as_str() {
        "none" if att_stmt.is_empty() => {}
        "none" => return Err(ApprovalError::Attestation("none with a statement")),
        "packed" => {
            if map_get(att_stmt, "x5c").is_some() {
                return Err(ApprovalError::UnsupportedAttestation(
                    "packed with a certificate chain".into(),
                ));
            }
            let alg = match map_get(att_stmt, "alg") {
                Some(Value::Integer(i)) => i128::from(*i),
                _ => return Err(ApprovalError::Attestation("no alg")),
            };
            if alg != cose::ALG_ES256 {
                return Err(ApprovalError::UnsupportedKey);
            }
            let Some(Value::Bytes(sig)) = map_get(att_stmt, "sig") else {
                return Err(ApprovalError::Attestation("no sig"));
            };
            verify_es256(
                &public_key,
                &signed_message(auth_data, &registration.client_data_json),
                sig,
            )?;
        }
        other => return Err(ApprovalError::UnsupportedAttestation(other.to_owned())),
    }
    Ok(Passkey {
        credential_id: credential_id.to_vec(),
        public_key,
        counter,
    })
}

/// The browser side of the approval pages: the registration and approval pages and the script
/// that carries the WebAuthn ceremonies' bytes. The host's approval pages and `vault-device`'s
/// own approval page serve the same files over the same JSON API (`/api/register/*`,
/// `/api/approvals/*`); the server checks everything, the script only carries bytes. The
/// device's page of pending asks (`data-page="list"`) also reads `GET /api/approvals`.
pub mod pages {
    /// The approval page (one request, by the id in its path).
    pub const APPROVE_HTML: &str = include_str!("approval/pages/approve.html");
    /// The passkey registration page (the one-time token in the URL fragment).
    pub const REGISTER_HTML: &str = include_str!("approval/pages/register.html");
    /// The pages' script.
    pub const WEBAUTHN_JS: &str = include_str!("approval/pages/webauthn.js");
    /// The headers every answer of a server of these pages carries (header name, value): no
    /// script, style or connection from elsewhere, never in a frame, never cached, no referrer.
    pub const SECURITY_HEADERS: [(&str, &str); 4] = [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
    ];
}

#[cfg(test)]
mod tests;
