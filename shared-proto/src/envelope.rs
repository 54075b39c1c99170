//! The ECDH envelope that carries one secret from the user's device to a sidecar (the fallback
//! path of the design).
//!
//! # Construction
//!
//! The device ([`seal`]) knows the sidecar's X25519 public key from its `Hello`. Per envelope it:
//!
//! 1. draws a fresh ephemeral X25519 key pair and computes the shared secret with the sidecar's
//!    key, refusing a non-contributory (all-zero) result, which a low-order "public key" would
//!    give and which anyone could compute;
//! 2. derives 32 bytes of ChaCha20-Poly1305 key and a 12-byte nonce with HKDF-SHA256, the salt
//!    being `sender public key || recipient public key` and the info a fixed label, so the key
//!    depends on the shared secret and both public keys;
//! 3. encrypts the secret with the header's canonical bytes ([`EnvelopeHeader::aad`]) as
//!    associated data. The header carries the format version, the request id, the VM id, the
//!    expiry (unix seconds) and the ephemeral public key, so flipping any bit of it, or of the
//!    ciphertext, makes opening fail.
//!
//! Each key is used for exactly one message (the ephemeral key is fresh), so the derived nonce
//! never repeats under a key.
//!
//! The sidecar's [`Opener`] holds its X25519 secret and its VM id and refuses envelopes that are
//! for another VM, expired, too far in the future, replayed or tampered with. It remembers the
//! request id of each opened envelope until that envelope's expiry, so its memory stays bounded
//! by [`MAX_TTL_SECS`] and [`REPLAY_CACHE_CAP`].
//!
//! # Why not HPKE
//!
//! RFC 9180 HPKE with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305 would give
//! the same properties. The hand-built scheme above was chosen to stay on the crates the
//! workspace already audits (x25519-dalek, hkdf, chacha20poly1305) and to keep the sidecar's
//! static binary small; it is a single-shot, base-mode KEM-DEM with the same ingredients as
//! HPKE's base mode. Moving to HPKE later only changes this module and bumps
//! [`ENVELOPE_VERSION`].
//!
//! # What it does not do
//!
//! Nothing here proves that the public key belongs to a genuine sidecar: a host that
//! substitutes its own key in the relayed `Hello` could read the secret. Binding the key to the
//! VM (attestation, or the device pinning it over the end-to-end channel) is the caller's job.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroizing;

/// The envelope format version, first field of the header.
pub const ENVELOPE_VERSION: u8 = 1;

/// The longest accepted lifetime of an envelope: `expires_at` may be at most this many seconds
/// after the opener's `now`.
pub const MAX_TTL_SECS: u64 = 300;

/// The most request ids an [`Opener`] remembers at once. When it is full of unexpired ids, new
/// envelopes are refused until some expire (fail closed).
pub const REPLAY_CACHE_CAP: usize = 4096;

/// The longest accepted VM id, in bytes.
pub const MAX_VM_ID_LEN: usize = 128;

/// The domain separation label that opens the associated data.
const AAD_LABEL: &[u8] = b"nanoclaw-envelope";

/// The HKDF info string.
const HKDF_INFO: &[u8] = b"nanoclaw envelope v1: x25519, hkdf-sha256, chacha20poly1305";

/// Errors of sealing and opening envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The VM id is longer than [`MAX_VM_ID_LEN`].
    #[error("VM id is {0} bytes, over the limit")]
    VmIdTooLong(usize),
    /// The header's format version is not [`ENVELOPE_VERSION`].
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// The envelope is addressed to another VM.
    #[error("envelope is for another VM")]
    WrongVm,
    /// The envelope expired.
    #[error("envelope expired at {expires_at}, now is {now}")]
    Expired {
        /// The header's expiry.
        expires_at: u64,
        /// The caller's clock.
        now: u64,
    },
    /// The expiry is further ahead than [`MAX_TTL_SECS`].
    #[error("envelope expiry {expires_at} is too far after {now}")]
    ExpiryTooFar {
        /// The header's expiry.
        expires_at: u64,
        /// The caller's clock.
        now: u64,
    },
    /// An envelope with this request id was opened before.
    #[error("replayed request id")]
    Replayed,
    /// The replay cache is full of unexpired ids.
    #[error("too many envelopes in flight")]
    ReplayCacheFull,
    /// The key agreement gave an all-zero secret (a low-order public key).
    #[error("public key is not contributory")]
    NonContributory,
    /// HKDF could not expand the key material.
    #[error("key derivation failed")]
    KeyDerivation,
    /// Encryption failed.
    #[error("encryption failed")]
    Seal,
    /// Authentication failed: the header or ciphertext was altered, or the key is wrong.
    #[error("envelope failed authentication")]
    Tampered,
}

/// The authenticated, unencrypted part of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeHeader {
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// The id of the request this secret answers; an opener accepts each id once.
    #[serde(with = "serde_bytes")]
    pub request_id: [u8; 16],
    /// The VM the secret is for.
    pub vm_id: String,
    /// The expiry, in unix seconds.
    pub expires_at: u64,
    /// The sender's ephemeral X25519 public key.
    #[serde(with = "serde_bytes")]
    pub sender_public_key: [u8; 32],
}

impl EnvelopeHeader {
    /// The canonical bytes of the header, used as associated data:
    /// `label || version || request_id || u16be(len vm_id) || vm_id || u64be(expires_at) ||
    /// sender_public_key`.
    pub fn aad(&self) -> Result<Vec<u8>, EnvelopeError> {
        let vm_id = self.vm_id.as_bytes();
        if vm_id.len() > MAX_VM_ID_LEN {
            return Err(EnvelopeError::VmIdTooLong(vm_id.len()));
        }
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + 1 + 16 + 2 + vm_id.len() + 8 + 32);
        aad.extend_from_slice(AAD_LABEL);
        aad.push(self.version);
        aad.extend_from_slice(&self.request_id);
        // Fits: MAX_VM_ID_LEN < u16::MAX.
        aad.extend_from_slice(&(vm_id.len() as u16).to_be_bytes());
        aad.extend_from_slice(vm_id);
        aad.extend_from_slice(&self.expires_at.to_be_bytes());
        aad.extend_from_slice(&self.sender_public_key);
        Ok(aad)
    }
}

/// A sealed secret: header in the clear, body encrypted and authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The authenticated header.
    pub header: EnvelopeHeader,
    /// ChaCha20-Poly1305 ciphertext with its 16-byte tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// Derives the AEAD key and nonce from a shared secret and both public keys.
fn derive_cipher(
    shared: &SharedSecret,
    sender: &[u8; 32],
    recipient: &[u8; 32],
) -> Result<(ChaCha20Poly1305, [u8; 12]), EnvelopeError> {
    if !shared.was_contributory() {
        return Err(EnvelopeError::NonContributory);
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(sender);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes());
    let mut okm = Zeroizing::new([0u8; 44]);
    hk.expand(HKDF_INFO, &mut okm[..])
        .map_err(|_| EnvelopeError::KeyDerivation)?;
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&okm[..32]));
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Ok((cipher, nonce))
}

/// Seals `plaintext` to `recipient` (the device side).
pub fn seal<R: RngCore + CryptoRng>(
    rng: &mut R,
    recipient: &PublicKey,
    request_id: [u8; 16],
    vm_id: &str,
    expires_at: u64,
    plaintext: &[u8],
) -> Result<Envelope, EnvelopeError> {
    let ephemeral = EphemeralSecret::random_from_rng(rng);
    let sender_public = PublicKey::from(&ephemeral);
    let header = EnvelopeHeader {
        version: ENVELOPE_VERSION,
        request_id,
        vm_id: vm_id.to_owned(),
        expires_at,
        sender_public_key: sender_public.to_bytes(),
    };
    let aad = header.aad()?;
    let shared = ephemeral.diffie_hellman(recipient);
    let (cipher, nonce) = derive_cipher(&shared, sender_public.as_bytes(), recipient.as_bytes())?;
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| EnvelopeError::Seal)?;
    Ok(Envelope { header, ciphertext })
}

/// The sidecar side: opens envelopes sealed to its key, for its VM, once each.
pub struct Opener {
    secret: StaticSecret,
    public: PublicKey,
    vm_id: String,
    /// Request ids already opened, with their expiry.
    seen: HashMap<[u8; 16], u64>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("public", &self.public)
            .field("vm_id", &self.vm_id)
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Creates an opener for `vm_id` around the sidecar's X25519 secret. The secret is zeroed
    /// when the opener is dropped.
    pub fn new(secret: StaticSecret, vm_id: impl Into<String>) -> Self {
        let public = PublicKey::from(&secret);
        Self {
            secret,
            public,
            vm_id: vm_id.into(),
            seen: HashMap::new(),
        }
    }

    /// The public key senders seal to.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Opens `envelope`, given the current time in unix seconds.
    ///
    /// A request id is remembered only once its envelope opened, so a forged envelope cannot
    /// burn the id of a genuine one.
    pub fn open(
        &mut self,
        envelope: &Envelope,
        now: u64,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let header = &envelope.header;
        if header.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(header.version));
        }
        if header.vm_id != self.vm_id {
            return Err(EnvelopeError::WrongVm);
        }
        if now >= header.expires_at {
            return Err(EnvelopeError::Expired {
                expires_at: header.expires_at,
                now,
            });
        }
        if header.expires_at - now > MAX_TTL_SECS {
            return Err(EnvelopeError::ExpiryTooFar {
                expires_at: header.expires_at,
                now,
            });
        }
        self.seen.retain(|_, expires_at| *expires_at > now);
        if self.seen.contains_key(&header.request_id) {
            return Err(EnvelopeError::Replayed);
        }
        if self.seen.len() >= REPLAY_CACHE_CAP {
            return Err(EnvelopeError::ReplayCacheFull);
        }
        let aad = header.aad()?;
        let sender = PublicKey::from(header.sender_public_key);
        let shared = self.secret.diffie_hellman(&sender);
        let (cipher, nonce) = derive_cipher(&shared, sender.as_bytes(), self.public.as_bytes())?;
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &envelope.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::Tampered)?;
        self.seen.insert(header.request_id, header.expires_at);
        Ok(Zeroizing::new(plaintext))
    }

    /// How many request ids are remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    const NOW: u64 = 1_790_000_000;
    const VM: &str = "vm-7f3a";

    fn opener() -> Opener {
        Opener::new(StaticSecret::random_from_rng(OsRng), VM)
    }

    fn sealed(o: &Opener, id: u8, expires_at: u64) -> Envelope {
        seal(
            &mut OsRng,
            &o.public_key(),
            [id; 16],
            VM,
            expires_at,
            b"sk-live-secret",
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let mut o = opener();
        let env = sealed(&o, 1, NOW + 60);
        assert_eq!(&o.open(&env, NOW).unwrap()[..], b"sk-live-secret");
        // Survives the wire too.
        let frame = crate::frame::encode_frame(&env).unwrap();
        let (back, _) = crate::frame::decode_frame::<Envelope>(&frame)
            .unwrap()
            .unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn two_seals_of_the_same_secret_differ() {
        let o = opener();
        let a = sealed(&o, 1, NOW + 60);
        let b = sealed(&o, 1, NOW + 60);
        assert_ne!(a.header.sender_public_key, b.header.sender_public_key);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn expired_is_refused() {
        let mut o = opener();
        let env = sealed(&o, 1, NOW);
        assert_eq!(
            o.open(&env, NOW),
            Err(EnvelopeError::Expired {
                expires_at: NOW,
                now: NOW
            })
        );
        assert!(matches!(
            o.open(&env, NOW + 1000),
            Err(EnvelopeError::Expired { .. })
        ));
    }

    #[test]
    fn far_future_expiry_is_refused() {
        let mut o = opener();
        let env = sealed(&o, 1, NOW + MAX_TTL_SECS + 1);
        assert!(matches!(
            o.open(&env, NOW),
            Err(EnvelopeError::ExpiryTooFar { .. })
        ));
    }

    #[test]
    fn replay_is_refused_until_expiry_then_forgotten() {
        let mut o = opener();
        let env = sealed(&o, 9, NOW + 60);
        assert!(o.open(&env, NOW).is_ok());
        assert_eq!(o.open(&env, NOW + 1), Err(EnvelopeError::Replayed));
        // Another envelope reusing the id is refused too.
        let again = sealed(&o, 9, NOW + 60);
        assert_eq!(o.open(&again, NOW + 2), Err(EnvelopeError::Replayed));
        assert_eq!(o.remembered(), 1);
        // After the expiry, a later envelope's open prunes the id.
        let later = sealed(&o, 10, NOW + 120);
        assert!(o.open(&later, NOW + 61).is_ok());
        assert_eq!(o.remembered(), 1);
    }

    #[test]
    fn full_replay_cache_fails_closed() {
        let mut o = opener();
        for i in 0..REPLAY_CACHE_CAP {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            o.seen.insert(id, NOW + 100);
        }
        let env = sealed(&o, 0xff, NOW + 60);
        assert_eq!(o.open(&env, NOW), Err(EnvelopeError::ReplayCacheFull));
        // Once they expire, there is room again.
        let env = sealed(&o, 0xff, NOW + 160);
        assert!(o.open(&env, NOW + 100).is_ok());
        assert_eq!(o.remembered(), 1);
    }

    #[test]
    fn wrong_vm_is_refused() {
        let mut o = opener();
        let env = seal(
            &mut OsRng,
            &o.public_key(),
            [1; 16],
            "vm-other",
            NOW + 60,
            b"x",
        )
        .unwrap();
        assert_eq!(o.open(&env, NOW), Err(EnvelopeError::WrongVm));
    }

    #[test]
    fn wrong_key_is_refused() {
        let mut o = opener();
        let other = opener();
        let env = sealed(&other, 1, NOW + 60);
        assert_eq!(o.open(&env, NOW), Err(EnvelopeError::Tampered));
        assert_eq!(o.remembered(), 0);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let mut o = opener();
        let env = sealed(&o, 1, NOW + 60);
        for byte in 0..env.ciphertext.len() {
            for bit in 0..8 {
                let mut t = env.clone();
                t.ciphertext[byte] ^= 1 << bit;
                assert_eq!(o.open(&t, NOW), Err(EnvelopeError::Tampered));
            }
        }
        for byte in 0..16 {
            for bit in 0..8 {
                let mut t = env.clone();
                t.header.request_id[byte] ^= 1 << bit;
                assert_eq!(o.open(&t, NOW), Err(EnvelopeError::Tampered));
            }
        }
        for byte in 0..32 {
            for bit in 0..8 {
                let mut t = env.clone();
                t.header.sender_public_key[byte] ^= 1 << bit;
                assert!(o.open(&t, NOW).is_err());
            }
        }
        for bit in 0..64 {
            let mut t = env.clone();
            t.header.expires_at ^= 1 << bit;
            assert!(o.open(&t, NOW).is_err());
        }
        for bit in 0..8 {
            let mut t = env.clone();
            t.header.version ^= 1 << bit;
            assert!(o.open(&t, NOW).is_err());
        }
        let mut t = env.clone();
        t.header.vm_id.push('x');
        assert!(o.open(&t, NOW).is_err());
        let mut t = env.clone();
        t.ciphertext.pop();
        assert_eq!(o.open(&t, NOW), Err(EnvelopeError::Tampered));
        // None of the failures burned the id.
        assert!(o.open(&env, NOW).is_ok());
    }

    #[test]
    fn expiry_is_authenticated_even_within_the_window() {
        let mut o = opener();
        let env = sealed(&o, 1, NOW + 60);
        let mut t = env.clone();
        t.header.expires_at = NOW + 30;
        assert_eq!(o.open(&t, NOW), Err(EnvelopeError::Tampered));
    }

    #[test]
    fn low_order_recipient_key_is_refused_when_sealing() {
        // The identity point (all zeros) makes every shared secret zero.
        let zero = PublicKey::from([0u8; 32]);
        assert_eq!(
            seal(&mut OsRng, &zero, [1; 16], VM, NOW + 60, b"x"),
            Err(EnvelopeError::NonContributory)
        );
    }

    #[test]
    fn low_order_sender_key_is_refused_when_opening() {
        let mut o = opener();
        let mut env = sealed(&o, 1, NOW + 60);
        env.header.sender_public_key = [0u8; 32];
        assert_eq!(o.open(&env, NOW), Err(EnvelopeError::NonContributory));
    }

    #[test]
    fn long_vm_id_is_refused() {
        let o = opener();
        let long = "v".repeat(MAX_VM_ID_LEN + 1);
        assert_eq!(
            seal(&mut OsRng, &o.public_key(), [1; 16], &long, NOW + 60, b"x"),
            Err(EnvelopeError::VmIdTooLong(MAX_VM_ID_LEN + 1))
        );
    }
}
