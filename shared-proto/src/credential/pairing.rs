//! Pairing: the short code the user types, the PSK derived from it, and the offer each side
//! sends inside the pairing handshake.

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::checks::check_name;
use super::{CODE_ALPHABET, CredentialError, PAIRING_CODE_SYMBOLS, PAIRING_INFO, Validate};

/// Formats 50 random bits as a pairing code `XXXXX-XXXXX`.
pub fn pairing_code(random: [u8; 8]) -> String {
    let bits = u64::from_be_bytes(random);
    let mut code = String::with_capacity(PAIRING_CODE_SYMBOLS + 1);
    for i in 0..PAIRING_CODE_SYMBOLS {
        if i == PAIRING_CODE_SYMBOLS / 2 {
            code.push('-');
        }
        let shift = 5 * (PAIRING_CODE_SYMBOLS - 1 - i);
        let symbol = ((bits >> shift) & 0x1f) as usize;
        code.push(char::from(CODE_ALPHABET[symbol]));
    }
    code
}

/// The canonical form of a typed code: upper case, separators and spaces dropped, and the
/// look-alikes `I`/`L` read as `1` and `O` as `0`.
fn normalize_code(code: &str) -> Result<String, CredentialError> {
    let mut out = String::with_capacity(PAIRING_CODE_SYMBOLS);
    for c in code.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !c.is_ascii() || !CODE_ALPHABET.contains(&(c as u8)) {
            return Err(CredentialError::BadPairingCode);
        }
        out.push(c);
        if out.len() > PAIRING_CODE_SYMBOLS {
            return Err(CredentialError::BadPairingCode);
        }
    }
    if out.len() != PAIRING_CODE_SYMBOLS {
        return Err(CredentialError::BadPairingCode);
    }
    Ok(out)
}

/// The 32-byte Noise PSK derived from a pairing code (HKDF-SHA256 of its canonical form).
///
/// Each connection attempt lets an active attacker test one guess, and a passive one none (the
/// ephemeral DH keys the transcript), so 50 bits with single use and a short validity are
/// enough.
pub fn pairing_psk(code: &str) -> Result<[u8; 32], CredentialError> {
    let canonical = normalize_code(code)?;
    let hk = Hkdf::<Sha256>::new(Some(PAIRING_INFO), canonical.as_bytes());
    let mut psk = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit.
    hk.expand(b"psk", &mut psk)
        .map_err(|_| CredentialError::BadPairingCode)?;
    Ok(psk)
}

/// What each side sends inside the pairing handshake: its static X25519 public key and a name
/// for the user to recognise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingOffer {
    /// The sender's static public key, pinned by the other side.
    #[serde(with = "serde_bytes")]
    pub static_public_key: [u8; 32],
    /// A human label ("alice-phone", "host-a").
    pub name: String,
}

impl Validate for PairingOffer {
    fn validate(&self) -> Result<(), CredentialError> {
        check_name(&self.name, "name")
    }
}
