//! The forgery suite: assertions made by a software authenticator (a `p256` key in the test)
//! that must each be refused with its typed error, and the canonical encoding's properties.

use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use rand_core::OsRng;

use super::*;

const NOW: u64 = 1_800_000_000_000;

fn rp() -> RelyingParty {
    RelyingParty {
        rp_id: "localhost".into(),
        origin: "http://localhost:8443".into(),
    }
}

fn request(id: &str, nonce: u8) -> ApprovalRequest {
    ApprovalRequest {
        id: id.into(),
        agent: "coder".into(),
        vm_id: "vm-1".into(),
        profile: "worker".into(),
        action: RequestAction::ToolCall {
            server: "fs".into(),
            tool: "delete".into(),
        },
        arguments: r#"{"path":"/home/u/project"}"#.into(),
        rule: "destructive".into(),
        reason: "deletes files".into(),
        created_unix_ms: NOW - 1000,
        expires_unix_ms: NOW + 60_000,
        nonce: [nonce; 32],
    }
}

/// A software authenticator: one ES256 key, a counter, and the flags it sets.
struct SoftAuthenticator {
    key: SigningKey,
    id: Vec<u8>,
    counter: u32,
    flags: u8,
}

impl SoftAuthenticator {
    fn new() -> Self {
        Self {
            key: SigningKey::random(&mut OsRng),
            id: b"soft-credential-1".to_vec(),
            counter: 0,
            flags: flags::UP | flags::UV,
        }
    }

    fn passkey(&self) -> Passkey {
        Passkey {
            credential_id: self.id.clone(),
            public_key: self
                .key
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
            counter: 0,
        }
    }

    fn assert_with(&mut self, challenge: &[u8; 32], origin: &str, kind: &str) -> Assertion {
        self.counter += 1;
        let mut auth_data = Sha256::digest(b"localhost").to_vec();
        auth_data.push(self.flags);
        auth_data.extend_from_slice(&self.counter.to_be_bytes());
        let client_data_json = format!(
            r#"{{"type":"{kind}","challenge":"{}","origin":"{origin}","crossOrigin":false}}"#,
            B64URL.encode(challenge)
        )
        .into_bytes();
        let sig: Signature = self
            .key
            .sign(&signed_message(&auth_data, &client_data_json));
        Assertion {
            credential_id: self.id.clone(),
            authenticator_data: auth_data,
            client_data_json,
            signature: sig.to_der().as_bytes().to_vec(),
        }
    }

    fn assert(&mut self, request: &ApprovalRequest) -> Assertion {
        let challenge = request.challenge().unwrap();
        self.assert_with(&challenge, "http://localhost:8443", "webauthn.get")
    }
}

#[test]
fn a_genuine_assertion_verifies() {
    let mut auth = SoftAuthenticator::new();
    let req = request("a", 1);
    let a = auth.assert(&req);
    let v = verify_approval(&rp(), &req, NOW, &[auth.passkey()], &a).unwrap();
    assert_eq!(
        v,
        VerifiedAssertion {
            passkey: 0,
            counter: 1
        }
    );
}

#[test]
fn an_assertion_for_request_a_is_refused_for_request_b() {
    let mut auth = SoftAuthenticator::new();
    let a = auth.assert(&request("a", 1));
    let b = request("b", 2);
    let err = verify_approval(&rp(), &b, NOW, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::ChallengeMismatch), "{err:?}");
    // Same id, other nonce: still another request.
    let a2 = request("a", 3);
    let err = verify_approval(&rp(), &a2, NOW, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::ChallengeMismatch), "{err:?}");
}

#[test]
fn the_same_assertion_twice_is_refused_by_the_counter() {
    let mut auth = SoftAuthenticator::new();
    let req = request("a", 1);
    let a = auth.assert(&req);
    let mut passkey = auth.passkey();
    let v = verify_approval(&rp(), &req, NOW, std::slice::from_ref(&passkey), &a).unwrap();
    passkey.counter = v.counter;
    let err = verify_approval(&rp(), &req, NOW, &[passkey], &a).unwrap_err();
    assert!(
        matches!(
            err,
            ApprovalError::CounterNotIncreased {
                stored: 1,
                found: 1
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_expired_request_is_refused() {
    let mut auth = SoftAuthenticator::new();
    let req = request("a", 1);
    let a = auth.assert(&req);
    let err = verify_approval(&rp(), &req, req.expires_unix_ms, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::Expired), "{err:?}");
}

#[test]
fn a_wrong_origin_is_refused() {
    let mut auth = SoftAuthenticator::new();
    let req = request("a", 1);
    let a = auth.assert_with(
        &req.challenge().unwrap(),
        "http://evil.example",
        "webauthn.get",
    );
    let err = verify_approval(&rp(), &req, NOW, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::OriginMismatch(o) if o == "http://evil.example"));
}

#[test]
fn a_cleared_uv_flag_is_refused() {
    let mut auth = SoftAuthenticator::new();
    auth.flags = flags::UP;
    let req = request("a", 1);
    let a = auth.assert(&req);
    let err = verify_approval(&rp(), &req, NOW, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::UserNotVerified), "{err:?}");
    auth.flags = flags::UV;
    let a = auth.assert(&req);
    let err = verify_approval(&rp(), &req, NOW, &[auth.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::UserNotPresent), "{err:?}");
}

#[test]
fn a_signature_by_an_unregistered_key_is_refused() {
    let registered = SoftAuthenticator::new();
    // Another key under the registered credential id: the signature does not verify.
    let mut forger = SoftAuthenticator::new();
    let req = request("a", 1);
    let a = forger.assert(&req);
    let err = verify_approval(&rp(), &req, NOW, &[registered.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature), "{err:?}");
    // Another credential id altogether.
    forger.id = b"someone-else".to_vec();
    let a = forger.assert(&req);
    let err = verify_approval(&rp(), &req, NOW, &[registered.passkey()], &a).unwrap_err();
    assert!(matches!(err, ApprovalError::UnknownCredential), "{err:?}");
}

#[test]
fn tampered_or_misdirected_assertions_are_refused() {
    let mut auth = SoftAuthenticator::new();
    let req = request("a", 1);
    let pk = [auth.passkey()];
    // A registration's client data offered as an assertion.
    let a = auth.assert_with(
        &req.challenge().unwrap(),
        "http://localhost:8443",
        "webauthn.create",
    );
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(matches!(err, ApprovalError::WrongType { .. }), "{err:?}");
    // One flipped bit in the authenticator data's counter: the signature breaks.
    let mut a = auth.assert(&req);
    a.authenticator_data[36] ^= 1;
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature), "{err:?}");
    // Another relying party.
    let mut a = auth.assert(&req);
    a.authenticator_data[0] ^= 1;
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(matches!(err, ApprovalError::RpIdMismatch), "{err:?}");
    // Truncated data and junk signatures are errors, not panics.
    let mut a = auth.assert(&req);
    a.authenticator_data.truncate(36);
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(
        matches!(err, ApprovalError::AuthenticatorData(_)),
        "{err:?}"
    );
    let mut a = auth.assert(&req);
    a.signature = vec![0x30, 0x02, 0x01];
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(matches!(err, ApprovalError::SignatureEncoding), "{err:?}");
    let mut a = auth.assert(&req);
    a.client_data_json = b"{not json".to_vec();
    let err = verify_approval(&rp(), &req, NOW, &pk, &a).unwrap_err();
    assert!(matches!(err, ApprovalError::ClientData(_)), "{err:?}");
}

#[test]
fn the_encoding_round_trips_and_refuses_other_encodings() {
    let req = request("a", 7);
    let bytes = req.encode().unwrap();
    assert_eq!(ApprovalRequest::decode(&bytes).unwrap(), req);
    assert_eq!(req.encode().unwrap(), bytes, "deterministic");
    // The same array with an indefinite length (0x9f ... 0xff) is not canonical.
    assert_eq!(bytes[0], 0x8c, "a 12-element array");
    let mut indefinite = vec![0x9f];
    indefinite.extend_from_slice(&bytes[1..]);
    indefinite.push(0xff);
    assert!(matches!(
        ApprovalRequest::decode(&indefinite),
        Err(ApprovalError::NotCanonical)
    ));
    // Trailing bytes, truncation and junk are refused.
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(ApprovalRequest::decode(&trailing).is_err());
    for n in 0..bytes.len() {
        assert!(ApprovalRequest::decode(&bytes[..n]).is_err());
    }
    // Every field is covered by the challenge.
    let base = req.challenge().unwrap();
    let mut changed = Vec::new();
    let mut r = req.clone();
    r.arguments = r#"{"path":"/"}"#.into();
    changed.push(r);
    let mut r = req.clone();
    r.action = RequestAction::ToolCall {
        server: "fs".into(),
        tool: "delete_all".into(),
    };
    changed.push(r);
    let mut r = req.clone();
    r.expires_unix_ms += 1;
    changed.push(r);
    let mut r = req.clone();
    r.agent = "other".into();
    changed.push(r);
    for r in changed {
        assert_ne!(r.challenge().unwrap(), base, "{r:?}");
    }
}

/// A registration made by the software authenticator, in format `fmt`.
fn registration(auth: &SoftAuthenticator, challenge: &[u8], fmt: &str) -> Registration {
    let point = auth.key.verifying_key().to_encoded_point(false);
    let cose_key = Value::Map(vec![
        (Value::Integer(1.into()), Value::Integer(2.into())),
        (Value::Integer(3.into()), Value::Integer((-7).into())),
        (Value::Integer((-1).into()), Value::Integer(1.into())),
        (
            Value::Integer((-2).into()),
            Value::Bytes(point.x().unwrap().to_vec()),
        ),
        (
            Value::Integer((-3).into()),
            Value::Bytes(point.y().unwrap().to_vec()),
        ),
    ]);
    let mut auth_data = Sha256::digest(b"localhost").to_vec();
    auth_data.push(flags::UP | flags::UV | flags::AT);
    auth_data.extend_from_slice(&0u32.to_be_bytes());
    auth_data.extend_from_slice(&[0; 16]);
    auth_data.extend_from_slice(&(auth.id.len() as u16).to_be_bytes());
    auth_data.extend_from_slice(&auth.id);
    ciborium::into_writer(&cose_key, &mut auth_data).unwrap();
    let client_data_json = format!(
        r#"{{"type":"webauthn.create","challenge":"{}","origin":"http://localhost:8443"}}"#,
        B64URL.encode(challenge)
    )
    .into_bytes();
    let att_stmt = if fmt == "packed" {
        let sig: Signature = auth
            .key
            .sign(&signed_message(&auth_data, &client_data_json));
        vec![
            (Value::Text("alg".into()), Value::Integer((-7).into())),
            (
                Value::Text("sig".into()),
                Value::Bytes(sig.to_der().as_bytes().to_vec()),
            ),
        ]
    } else {
        Vec::new()
    };
    let object = Value::Map(vec![
        (Value::Text("fmt".into()), Value::Text(fmt.into())),
        (Value::Text("attStmt".into()), Value::Map(att_stmt)),
        (Value::Text("authData".into()), Value::Bytes(auth_data)),
    ]);
    let mut attestation_object = Vec::new();
    ciborium::into_writer(&object, &mut attestation_object).unwrap();
    Registration {
        attestation_object,
        client_data_json,
    }
}

#[test]
fn registration_yields_the_authenticators_key() {
    let auth = SoftAuthenticator::new();
    for fmt in ["none", "packed"] {
        let reg = registration(&auth, b"registration-challenge", fmt);
        let pk = verify_registration(&rp(), b"registration-challenge", &reg).unwrap();
        assert_eq!(pk, auth.passkey(), "{fmt}");
        let err = verify_registration(&rp(), b"another-challenge", &reg).unwrap_err();
        assert!(matches!(err, ApprovalError::ChallengeMismatch), "{err:?}");
    }
    let reg = registration(&auth, b"c", "fido-u2f");
    assert!(matches!(
        verify_registration(&rp(), b"c", &reg),
        Err(ApprovalError::UnsupportedAttestation(_))
    ));
    // Truncated attestation objects are errors, not panics.
    let reg = registration(&auth, b"c", "none");
    for n in 0..reg.attestation_object.len() {
        let mut r = reg.clone();
        r.attestation_object.truncate(n);
        assert!(verify_registration(&rp(), b"c", &r).is_err());
    }
}
