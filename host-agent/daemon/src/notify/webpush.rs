//! Web Push to the user's subscribed browsers: VAPID (RFC 8292) and `aes128gcm` payload
//! encryption (RFC 8291 over RFC 8188).
//!
//! - **VAPID**: each request carries `Authorization: vapid t=<JWT>, k=<public key>`, the JWT an
//!   ES256 JWS over `{"aud": <the endpoint's origin>, "exp": <now + 12 h>, "sub": <contact>}`
//!   signed with the host's VAPID key (`vapid.key`, mode 0600; a P-256 key that only
//!   identifies this host to push services, not a user credential).
//! - **Encryption** ([`encrypt`]): a fresh P-256 key pair per message; ECDH with the
//!   subscription's `p256dh` key; `IKM = HKDF(salt = auth, ECDH secret, "WebPush: info" ‖ 0 ‖
//!   ua_public ‖ as_public)`; a random 16-byte salt; `CEK` (16 bytes) and `NONCE` (12 bytes)
//!   from HKDF with "Content-Encoding: aes128gcm" / "Content-Encoding: nonce"; one record,
//!   plaintext ‖ 0x02, sealed with AES-128-GCM; the header salt ‖ rs ‖ idlen ‖ as_public.
//!
//! Why not the `ece` crate: it does this through OpenSSL (its default backend), which would
//! bring a C library and a second crypto stack into the host for about sixty lines; the RustCrypto
//! crates already here (`p256`, `hkdf`, `sha2`, plus `aes-gcm`) do it directly, and the test
//! checks the result against RFC 8291's worked example and against a receiver that decrypts.
//!
//! The payload is the [`Notice`] as JSON: an approval id, a summary and a URL, never secrets.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hkdf::Hkdf;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{Notice, Notifier, NotifyError, http_client};

/// The record size written in the header (one record per message).
const RECORD_SIZE: u32 = 4096;
/// The largest plaintext that fits one record (rs − padding delimiter − GCM tag).
pub const MAX_PLAINTEXT: usize = RECORD_SIZE as usize - 1 - 16;
/// How long push services keep an undelivered message, in seconds.
const PUSH_TTL_SECS: u32 = 300;
/// How long a VAPID JWT is valid (RFC 8292 allows up to 24 h).
const JWT_LIFETIME_SECS: u64 = 12 * 3600;

/// A browser's push subscription, as `PushSubscription.toJSON()` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The push service URL for this browser.
    pub endpoint: String,
    /// Its keys.
    pub keys: SubscriptionKeys,
}

/// The keys of a [`Subscription`], base64url.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionKeys {
    /// The browser's P-256 public key (uncompressed point).
    pub p256dh: String,
    /// The 16-byte authentication secret.
    pub auth: String,
}

/// Encrypts `plaintext` for a subscription with `ua_public` (SEC1) and `auth`, using the
/// ephemeral key `as_secret` and `salt` (both fresh per message; parameters so that tests can
/// replay RFC 8291's example). Answers the `aes128gcm` body.
pub fn encrypt(
    ua_public: &[u8],
    auth: &[u8],
    plaintext: &[u8],
    as_secret: &SecretKey,
    salt: &[u8; 16],
) -> Result<Vec<u8>, NotifyError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(NotifyError::TooLarge(plaintext.len()));
    }
    let ua = PublicKey::from_sec1_bytes(ua_public)
        .map_err(|_| NotifyError::Subscription("p256dh is not a P-256 point"))?;
    let ua_bytes = ua.to_encoded_point(false);
    let as_bytes = as_secret.public_key().to_encoded_point(false);
    let shared = p256::ecdh::diffie_hellman(as_secret.to_nonzero_scalar(), ua.as_affine());

    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(ua_bytes.as_bytes());
    key_info.extend_from_slice(as_bytes.as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&key_info, &mut ikm)
        .map_err(|_| NotifyError::Encrypt)?;
    let prk = Hkdf::<Sha256>::new(Some(salt), &ikm);
    let mut cek = [0u8; 16];
    let mut nonce = [0u8; 12];
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .and_then(|()| prk.expand(b"Content-Encoding: nonce\0", &mut nonce))
        .map_err(|_| NotifyError::Encrypt)?;

    let mut record = plaintext.to_vec();
    record.push(0x02);
    let sealed = Aes128Gcm::new_from_slice(&cek)
        .map_err(|_| NotifyError::Encrypt)?
        .encrypt(Nonce::from_slice(&nonce), record.as_slice())
        .map_err(|_| NotifyError::Encrypt)?;

    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + sealed.len());
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(65);
    body.extend_from_slice(as_bytes.as_bytes());
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// The `Authorization` header value for a push to `endpoint`: `vapid t=<JWT>, k=<key>`.
pub fn vapid_authorization(
    key: &SigningKey,
    endpoint: &str,
    subject: &str,
    now_unix_secs: u64,
) -> Result<String, NotifyError> {
    let audience = endpoint_origin(endpoint)?;
    let header = B64URL.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let claims = serde_json::json!({
        "aud": audience,
        "exp": now_unix_secs + JWT_LIFETIME_SECS,
        "sub": subject,
    });
    let claims = B64URL.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let sig: Signature = key.sign(signing_input.as_bytes());
    let public = key.verifying_key().to_encoded_point(false);
    Ok(format!(
        "vapid t={signing_input}.{}, k={}",
        B64URL.encode(sig.to_bytes()),
        B64URL.encode(public.as_bytes())
    ))
}

/// `scheme://host[:port]` of an http(s) URL.
fn endpoint_origin(endpoint: &str) -> Result<String, NotifyError> {
    let bad = || NotifyError::Endpoint(endpoint.to_owned());
    let (scheme, rest) = endpoint.split_once("://").ok_or_else(bad)?;
    if scheme != "https" && scheme != "http" {
        return Err(bad());
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(bad());
    }
    Ok(format!("{scheme}://{host}"))
}

/// Sends Web Push notices to the subscriptions kept in a file.
#[derive(Debug, Clone)]
pub struct WebPush {
    key: SigningKey,
    subject: String,
    subscriptions_file: PathBuf,
    client: reqwest::Client,
}

impl WebPush {
    /// Loads (or creates, mode 0600) the VAPID key at `key_file`; subscriptions are kept in
    /// `subscriptions_file`. `subject` is the contact push services may use (`mailto:...`).
    pub fn open(
        key_file: &Path,
        subscriptions_file: PathBuf,
        subject: String,
    ) -> Result<Self, NotifyError> {
        let store = |source| NotifyError::Store {
            path: key_file.to_path_buf(),
            source,
        };
        let key = match std::fs::read(key_file) {
            Ok(bytes) => SigningKey::from_slice(&bytes)
                .map_err(|_| NotifyError::StoreFormat(key_file.to_path_buf()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::random(&mut rand_core::OsRng);
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(key_file)
                    .and_then(|mut f| f.write_all(&key.to_bytes()))
                    .map_err(store)?;
                key
            }
            Err(e) => return Err(store(e)),
        };
        Ok(Self {
            key,
            subject,
            subscriptions_file,
            client: http_client(),
        })
    }

    /// The VAPID public key, base64url: the page's `applicationServerKey`.
    pub fn public_key(&self) -> String {
        B64URL.encode(self.key.verifying_key().to_encoded_point(false).as_bytes())
    }

    /// The stored subscriptions.
    pub fn subscriptions(&self) -> Result<Vec<Subscription>, NotifyError> {
        match std::fs::read(&self.subscriptions_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| NotifyError::StoreFormat(self.subscriptions_file.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(NotifyError::Store {
                path: self.subscriptions_file.clone(),
                source,
            }),
        }
    }

    /// Adds a subscription (checking its keys and endpoint first).
    pub fn subscribe(&self, sub: Subscription) -> Result<(), NotifyError> {
        endpoint_origin(&sub.endpoint)?;
        let (ua, auth) = decode_keys(&sub)?;
        PublicKey::from_sec1_bytes(&ua)
            .map_err(|_| NotifyError::Subscription("p256dh is not a P-256 point"))?;
        if auth.len() != 16 {
            return Err(NotifyError::Subscription("auth is not 16 bytes"));
        }
        let mut all = self.subscriptions()?;
        all.retain(|s| s.endpoint != sub.endpoint);
        all.push(sub);
        let store = |source| NotifyError::Store {
            path: self.subscriptions_file.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&all).map_err(|e| store(e.into()))?;
        shared_proto::fs::replace_file(
            &self.subscriptions_file,
            &body,
            shared_proto::fs::DEFAULT_MODE,
        )
        .map_err(|e| store(e.into()))
    }

    /// Encrypts and sends one notice to one subscription; answers the push service's status.
    pub async fn send(&self, sub: &Subscription, notice: &Notice) -> Result<u16, NotifyError> {
        let (ua, auth) = decode_keys(sub)?;
        let plaintext = serde_json::to_vec(notice).map_err(|_| NotifyError::Encrypt)?;
        let mut salt = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
        let ephemeral = SecretKey::random(&mut rand_core::OsRng);
        let body = encrypt(&ua, &auth, &plaintext, &ephemeral, &salt)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let authorization = vapid_authorization(&self.key, &sub.endpoint, &self.subject, now)?;
        let resp = self
            .client
            .post(&sub.endpoint)
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("TTL", PUSH_TTL_SECS.to_string())
            .header("Urgency", "high")
            .header("Authorization", authorization)
            .body(body)
            .send()
            .await
            .map_err(|source| NotifyError::Http {
                url: sub.endpoint.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(NotifyError::Status {
                url: sub.endpoint.clone(),
                status,
            });
        }
        Ok(status)
    }
}

fn decode_keys(sub: &Subscription) -> Result<(Vec<u8>, Vec<u8>), NotifyError> {
    let dec = |s: &str, what| {
        B64URL
            .decode(s.trim_end_matches('='))
            .map_err(|_| NotifyError::Subscription(what))
    };
    Ok((
        dec(&sub.keys.p256dh, "p256dh is not base64url")?,
        dec(&sub.keys.auth, "auth is not base64url")?,
    ))
}

impl Notifier for WebPush {
    fn notify(&self, notice: Notice) {
        let this = self.clone();
        tokio::spawn(async move {
            let subs = match this.subscriptions() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot read push subscriptions");
                    return;
                }
            };
            for sub in subs {
                if let Err(e) = this.send(&sub, &notice).await {
                    tracing::warn!(error = %crate::error_chain(&e), "push notification failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        B64URL.decode(s).unwrap()
    }

    /// RFC 8291 §5: the worked example, byte for byte.
    #[test]
    fn rfc8291_example() {
        let as_secret =
            SecretKey::from_slice(&b("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")).unwrap();
        assert_eq!(
            B64URL.encode(as_secret.public_key().to_encoded_point(false).as_bytes()),
            "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
        );
        let ua_public = b(
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        );
        let auth = b("BTBZMqHH6r4Tts7J_aSIgg");
        let salt: [u8; 16] = b("DGv6ra1nlYgDCS1FRnbzlw").try_into().unwrap();
        let body = encrypt(
            &ua_public,
            &auth,
            b"When I grow up, I want to be a watermelon",
            &as_secret,
            &salt,
        )
        .unwrap();
        assert_eq!(
            B64URL.encode(body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
    }

    #[test]
    fn oversized_payloads_and_bad_keys_are_errors() {
        let sk = SecretKey::random(&mut rand_core::OsRng);
        let ua = sk.public_key().to_encoded_point(false);
        let big = vec![0u8; MAX_PLAINTEXT + 1];
        assert!(matches!(
            encrypt(ua.as_bytes(), &[0; 16], &big, &sk, &[0; 16]),
            Err(NotifyError::TooLarge(_))
        ));
        assert!(matches!(
            encrypt(&[4; 65], &[0; 16], b"x", &sk, &[0; 16]),
            Err(NotifyError::Subscription(_))
        ));
        assert!(endpoint_origin("ftp://x/y").is_err());
        assert_eq!(
            endpoint_origin("https://push.example.net:8443/wpush/v2/abc?x").unwrap(),
            "https://push.example.net:8443"
        );
    }
}
