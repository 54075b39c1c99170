//! A software authenticator for tests: one ES256 (`p256`) key that answers a WebAuthn `get`
//! as a browser would (authenticatorData, clientDataJSON, a DER signature over
//! authenticatorData || SHA-256(clientDataJSON)), for origin [`ORIGIN`] unless told otherwise,
//! and a WebAuthn `create` with attestation format `none` ([`SoftAuthenticator::register_for`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};
use shared_proto::approval::{Assertion, Passkey, Registration};

/// The approval pages' origin the tests use by default.
pub const ORIGIN: &str = "http://localhost:8443";

/// A software authenticator: one ES256 key, a counter and the flags it sets.
#[derive(Debug)]
pub struct SoftAuthenticator {
    /// The credential's private key.
    pub key: SigningKey,
    /// The credential id.
    pub id: Vec<u8>,
    /// The signature counter, raised before each assertion.
    pub counter: u32,
    /// The authenticatorData flags it sets ([`UP`] | [`UV`] unless a test clears one).
    pub flags: u8,
}

/// The authenticatorData flag "user present".
pub const UP: u8 = 0x01;
/// The authenticatorData flag "user verified".
pub const UV: u8 = 0x04;

impl Default for SoftAuthenticator {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftAuthenticator {
    /// A new credential with a fresh key, id `soft-passkey-1`, counter 0, flags UP and UV.
    pub fn new() -> Self {
        Self {
            key: SigningKey::random(&mut rand_core::OsRng),
            id: b"soft-passkey-1".to_vec(),
            counter: 0,
            flags: UP | UV,
        }
    }

    /// The passkey as the approval server stores it after registration.
    pub fn passkey(&self) -> Passkey {
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

    /// What the browser returns for `navigator.credentials.get` with this challenge.
    pub fn assert(&mut self, challenge: &[u8; 32]) -> Assertion {
        self.assert_for(challenge, ORIGIN)
    }

    /// The same, on the page at `origin`.
    pub fn assert_for(&mut self, challenge: &[u8; 32], origin: &str) -> Assertion {
        self.counter += 1;
        let mut auth_data = Sha256::digest(b"localhost").to_vec();
        auth_data.push(self.flags);
        auth_data.extend_from_slice(&self.counter.to_be_bytes());
        let client_data_json = format!(
            r#"{{"type":"webauthn.get","challenge":"{}","origin":"{origin}","crossOrigin":false}}"#,
            B64URL.encode(challenge)
        )
        .into_bytes();
        let mut signed = auth_data.clone();
        signed.extend_from_slice(&Sha256::digest(&client_data_json));
        let sig: Signature = self.key.sign(&signed);
        Assertion {
            credential_id: self.id.clone(),
            authenticator_data: auth_data,
            client_data_json,
            signature: sig.to_der().as_bytes().to_vec(),
        }
    }

    /// What the browser returns for `navigator.credentials.create` with this challenge on the
    /// page at `origin` (rp id `localhost`): attestation format `none`, the key as an ES256
    /// COSE key, the counter as it stands.
    pub fn register_for(&self, challenge: &[u8], origin: &str) -> Registration {
        use ciborium::Value;
        let point = self.key.verifying_key().to_encoded_point(false);
        let (x, y) = (point.x().unwrap().to_vec(), point.y().unwrap().to_vec());
        let int = |i: i64| Value::Integer(i.into());
        let cose_key = Value::Map(vec![
            (int(1), int(2)),
            (int(3), int(-7)),
            (int(-1), int(1)),
            (int(-2), Value::Bytes(x)),
            (int(-3), Value::Bytes(y)),
        ]);
        let mut auth_data = Sha256::digest(b"localhost").to_vec();
        // UP, UV and AT (attested credential data).
        auth_data.push(self.flags | 0x40);
        auth_data.extend_from_slice(&self.counter.to_be_bytes());
        auth_data.extend_from_slice(&[0; 16]);
        auth_data.extend_from_slice(&u16::try_from(self.id.len()).unwrap().to_be_bytes());
        auth_data.extend_from_slice(&self.id);
        ciborium::into_writer(&cose_key, &mut auth_data).unwrap();
        let object = Value::Map(vec![
            (Value::Text("fmt".into()), Value::Text("none".into())),
            (Value::Text("attStmt".into()), Value::Map(Vec::new())),
            (Value::Text("authData".into()), Value::Bytes(auth_data)),
        ]);
        let mut attestation_object = Vec::new();
        ciborium::into_writer(&object, &mut attestation_object).unwrap();
        let client_data_json = format!(
            r#"{{"type":"webauthn.create","challenge":"{}","origin":"{origin}","crossOrigin":false}}"#,
            B64URL.encode(challenge)
        )
        .into_bytes();
        Registration {
            attestation_object,
            client_data_json,
        }
    }
}
