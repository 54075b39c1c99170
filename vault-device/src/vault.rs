//! The vault: the device's secrets, sealed at rest.
//!
//! # File layout
//!
//! ```text
//! magic "NCVAULT\x01" (8) | salt (16) | m_cost KiB u32be | t_cost u32be | p_cost u32be |
//! nonce (12) | ChaCha20-Poly1305 ciphertext of the CBOR [`VaultData`] (with its 16-byte tag)
//! ```
//!
//! The key is Argon2id(passphrase, salt, m/t/p from the header); the whole header (magic to
//! nonce) is the associated data, so changing the KDF parameters or the salt makes opening
//! fail. A fresh salt and nonce are drawn on every save, so a key/nonce pair never repeats.
//!
//! # Durability
//!
//! [`Vault::save`] writes a temporary file beside the vault (created 0600, exclusive), fsyncs
//! it, hard-links the current vault to `<vault>.prev`, renames the temporary file over the
//! vault and fsyncs the directory. A crash at any point leaves either the old or the new vault
//! under the vault's name, and the generation before the last save under `.prev`: a vault file
//! that is later damaged on disk gives [`VaultError::Corrupt`], and `.prev` still opens.
//!
//! # What lives inside
//!
//! The device identity key (its static X25519 key in every Noise session), the credential
//! [`Entry`]s, the [`Grant`]s, the [`Pairing`]s with hosts and the [`Move`]s of VMs between
//! them. Secrets are zeroed when dropped.
//!
//! # Older vaults
//!
//! A vault written when the device paired with one host holds `pairing` instead of
//! `pairings`, and grants that name no host. It opens as a one-pairing list, those grants are
//! for that (the first) pairing, and the next save writes the new form.

use std::fs;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::grant::Grant;
use crate::moves::Move;

/// The file magic (its last byte is the format version).
const MAGIC: &[u8; 8] = b"NCVAULT\x01";
/// The length of the header (the associated data).
const HEADER_LEN: usize = 8 + 16 + 12 + 12;
/// The largest vault file accepted, so a hostile file cannot make us allocate without bound.
const MAX_VAULT_LEN: u64 = 16 << 20;
/// The largest Argon2 memory cost accepted from a file (4 GiB), in KiB.
const MAX_M_COST: u32 = 4 << 20;
/// The largest Argon2 time cost accepted from a file.
const MAX_T_COST: u32 = 64;

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Reading, writing or renaming a file failed.
    #[error("{op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the vault magic, is too short or too long.
    #[error("{} is not a vault file", .0.display())]
    NotAVault(PathBuf),
    /// The file's KDF parameters are out of range.
    #[error("{} has invalid key-derivation parameters", .0.display())]
    BadParams(PathBuf),
    /// Authentication failed: a wrong passphrase or a damaged file.
    #[error(
        "{} did not open: wrong passphrase or damaged file (the previous generation is {}.prev)",
        .0.display(), .0.display()
    )]
    Corrupt(PathBuf),
    /// The decrypted contents are not a vault.
    #[error("{} holds malformed contents", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ciborium::de::Error<std::io::Error>,
    },
    /// Argon2 refused the parameters or failed.
    #[error("key derivation failed: {0}")]
    Kdf(argon2::Error),
    /// Encoding the contents failed.
    #[error("cannot encode the vault")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// Encryption failed.
    #[error("cannot seal the vault")]
    Seal,
    /// `create` found a vault already there.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// An entry with this name exists.
    #[error("credential {0:?} already exists")]
    DuplicateEntry(String),
    /// No entry has this name.
    #[error("no credential named {0:?}")]
    NoSuchEntry(String),
    /// An entry's fields are unusable.
    #[error("invalid credential: {0}")]
    InvalidEntry(&'static str),
}

/// The Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's first Argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self {
            m_cost: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests.
    pub const FAST_FOR_TESTS: Self = Self {
        m_cost: 1024,
        t_cost: 1,
        p_cost: 1,
    };
}

/// A secret value, zeroed on drop and never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct Secret(#[serde(with = "serde_bytes")] Vec<u8>);

impl Secret {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes, for injection.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// One credential: the secret and where and how it may be injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its name; also the service name in the proxy's base-URL mode.
    pub name: String,
    /// The secret.
    pub secret: Secret,
    /// The authorities (`host` or `host:port`) it may be sent to; the first is the base-URL
    /// mode's target.
    pub hosts: Vec<String>,
    /// The header it goes in.
    pub header: String,
    /// The header value; `{}` is replaced by the secret.
    pub format: String,
}

impl Entry {
    /// Checks the fields: a name, at least one host, a token header name, a format with one
    /// `{}`.
    pub fn validate(&self) -> Result<(), VaultError> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(VaultError::InvalidEntry(
                "name must be letters, digits, '-', '_' or '.'",
            ));
        }
        if self.hosts.is_empty() {
            return Err(VaultError::InvalidEntry("at least one --host is needed"));
        }
        if self.header.is_empty()
            || !self
                .header
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b':')
        {
            return Err(VaultError::InvalidEntry("header must be a token"));
        }
        if self.format.matches("{}").count() != 1 {
            return Err(VaultError::InvalidEntry("format must hold exactly one {}"));
        }
        if self
            .secret
            .expose()
            .iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err(VaultError::InvalidEntry("secret holds CR, LF or NUL"));
        }
        Ok(())
    }

    /// Whether `authority` is one of the allowed hosts (ASCII case-insensitive, exact).
    pub fn allows(&self, authority: &str) -> bool {
        crate::grant::host_allowed(&self.hosts, authority)
    }

    /// The header value with the secret in place, zeroed on drop.
    pub fn header_value(&self) -> Zeroizing<Vec<u8>> {
        inject(&self.format, self.secret.expose())
    }
}

/// `format` with its `{}` replaced by `secret`.
pub fn inject(format: &str, secret: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(format.len() + secret.len()));
    match format.split_once("{}") {
        Some((before, after)) => {
            out.extend_from_slice(before.as_bytes());
            out.extend_from_slice(secret);
            out.extend_from_slice(after.as_bytes());
        }
        None => out.extend_from_slice(format.as_bytes()),
    }
    out
}

/// A host this device is paired with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pairing {
    /// Where the device dials (`host:port`).
    pub address: String,
    /// The host's static public key, pinned at pairing: its link key, which grants and moves
    /// name it by.
    #[serde(with = "serde_bytes")]
    pub host_public_key: [u8; 32],
    /// The host's name from its offer.
    pub host_name: String,
}

impl Pairing {
    /// `<name> at <address> key <hex>`, as `list` and errors show it.
    pub fn describe(&self) -> String {
        format!(
            "{} at {} key {}",
            self.host_name,
            self.address,
            hex::encode(self.host_public_key)
        )
    }
}

/// Errors of naming a paired host (`vault-device grant --on`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseHostError {
    /// No host is paired.
    #[error("not paired with a host; run `vault-device pair` first")]
    NotPaired,
    /// Several hosts are paired and none was named.
    #[error("several hosts are paired; name one with --on (name, address or key): {0}")]
    Several(String),
    /// No paired host has that name, address or key.
    #[error("no paired host is named {asked:?} (paired: {hosts})")]
    NoSuch {
        /// What was asked for.
        asked: String,
        /// The paired hosts.
        hosts: String,
    },
    /// Several paired hosts have that name.
    #[error("several paired hosts match {asked:?}; name one by its address or key: {hosts}")]
    Ambiguous {
        /// What was asked for.
        asked: String,
        /// The matching hosts.
        hosts: String,
    },
}

/// The pairing `on` names, by its name, its address or its key in hex; without `on`, the only
/// one. See [`ChooseHostError`] for the rest.
pub fn choose_pairing<'a>(
    pairings: &'a [Pairing],
    on: Option<&str>,
) -> Result<&'a Pairing, ChooseHostError> {
    let list = |ps: &[&Pairing]| {
        ps.iter()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let all: Vec<&Pairing> = pairings.iter().collect();
    let Some(asked) = on else {
        return match all.as_slice() {
            [] => Err(ChooseHostError::NotPaired),
            [one] => Ok(one),
            many => Err(ChooseHostError::Several(list(many))),
        };
    };
    if all.is_empty() {
        return Err(ChooseHostError::NotPaired);
    }
    let key = hex::decode(asked).ok();
    let found: Vec<&Pairing> = all
        .iter()
        .copied()
        .filter(|p| {
            p.host_name == asked
                || p.address == asked
                || key.as_deref() == Some(&p.host_public_key[..])
        })
        .collect();
    match found.as_slice() {
        [] => Err(ChooseHostError::NoSuch {
            asked: asked.to_owned(),
            hosts: list(&all),
        }),
        [one] => Ok(one),
        many => Err(ChooseHostError::Ambiguous {
            asked: asked.to_owned(),
            hosts: list(many),
        }),
    }
}

/// How logs and `list` name the host whose link key is `key`: its name if it is paired, else
/// its key in hex.
pub fn host_label(pairings: &[Pairing], key: &[u8; 32]) -> String {
    pairings
        .iter()
        .find(|p| p.host_public_key == *key)
        .map_or_else(|| hex::encode(key), |p| p.host_name.clone())
}

/// Everything the vault holds.
#[derive(Clone, Serialize, Deserialize)]
pub struct VaultData {
    /// The device identity key (X25519 secret).
    identity: Secret,
    /// The credentials.
    pub entries: Vec<Entry>,
    /// The grants.
    pub grants: Vec<Grant>,
    /// The paired hosts, in the order they were first paired.
    #[serde(default)]
    pub pairings: Vec<Pairing>,
    /// The single pairing of a vault written before several were possible: read, never
    /// written ([`VaultData::pairings`] takes it when the vault opens).
    #[serde(default, rename = "pairing", skip_serializing)]
    legacy_pairing: Option<Pairing>,
    /// The VMs that moved between paired hosts ([`crate::moves`]).
    #[serde(default)]
    pub moves: Vec<Move>,
}

impl std::fmt::Debug for VaultData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultData")
            .field("entries", &self.entries.len())
            .field("grants", &self.grants.len())
            .field("pairings", &self.pairings)
            .field("moves", &self.moves.len())
            .finish_non_exhaustive()
    }
}

impl VaultData {
    /// Adds `pairing`, in place of any with the same host key or the same address (where the
    /// first of them was, so the first pairing stays first).
    pub fn add_pairing(&mut self, pairing: Pairing) {
        let same = |p: &Pairing| {
            p.host_public_key == pairing.host_public_key || p.address == pairing.address
        };
        let at = self.pairings.iter().position(same);
        self.pairings.retain(|p| !same(p));
        let at = at.unwrap_or(self.pairings.len()).min(self.pairings.len());
        self.pairings.insert(at, pairing);
        self.adopt_legacy();
    }

    /// The link keys of the paired hosts.
    pub fn paired_hosts(&self) -> Vec<[u8; 32]> {
        self.pairings.iter().map(|p| p.host_public_key).collect()
    }

    /// The pairing whose host has the link key `key`.
    pub fn pairing(&self, key: &[u8; 32]) -> Option<&Pairing> {
        self.pairings.iter().find(|p| p.host_public_key == *key)
    }

    /// Brings the contents of an older vault to the current form: its single pairing becomes
    /// the list, and its grants that name no host are for the first pairing (never any host).
    fn adopt_legacy(&mut self) {
        if let Some(p) = self.legacy_pairing.take()
            && self.pairings.is_empty()
        {
            self.pairings.push(p);
        }
        if let Some(first) = self.pairings.first().map(|p| p.host_public_key) {
            for g in self.grants.iter_mut().filter(|g| g.on.is_none()) {
                g.on = Some(first);
            }
        }
    }
}

/// An open vault: its contents, the file, and the passphrase to re-seal it with.
pub struct Vault {
    path: PathBuf,
    passphrase: Zeroizing<Vec<u8>>,
    params: KdfParams,
    /// The contents.
    pub data: VaultData,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("path", &self.path)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Creates a new vault with a fresh identity key at `path`, refusing to overwrite one.
    pub fn create(path: &Path, passphrase: &[u8], params: KdfParams) -> Result<Self, VaultError> {
        if path.exists() {
            return Err(VaultError::Exists(path.to_owned()));
        }
        let mut identity = vec![0u8; 32];
        OsRng.fill_bytes(&mut identity);
        let vault = Self {
            path: path.to_owned(),
            passphrase: Zeroizing::new(passphrase.to_vec()),
            params,
            data: VaultData {
                identity: Secret::new(identity),
                entries: Vec::new(),
                grants: Vec::new(),
                pairings: Vec::new(),
                legacy_pairing: None,
                moves: Vec::new(),
            },
        };
        vault.save()?;
        Ok(vault)
    }

    /// Opens and decrypts the vault at `path`.
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self, VaultError> {
        let io = |op| {
            let path = path.to_owned();
            move |source| VaultError::Io { op, path, source }
        };
        let len = fs::metadata(path).map_err(io("stat"))?.len();
        if len > MAX_VAULT_LEN || len < (HEADER_LEN + 16) as u64 {
            return Err(VaultError::NotAVault(path.to_owned()));
        }
        let bytes = fs::read(path).map_err(io("read"))?;
        let Some((header, ciphertext)) = bytes.split_at_checked(HEADER_LEN) else {
            return Err(VaultError::NotAVault(path.to_owned()));
        };
        if &header[..8] != MAGIC {
            return Err(VaultError::NotAVault(path.to_owned()));
        }
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let params = KdfParams {
            m_cost: word(24),
            t_cost: word(28),
            p_cost: word(32),
        };
        if params.m_cost > MAX_M_COST || params.t_cost > MAX_T_COST || params.p_cost > 16 {
            return Err(VaultError::BadParams(path.to_owned()));
        }
        let salt = &header[8..24];
        let nonce = &header[36..48];
        let key = derive_key(passphrase, salt, params).map_err(|e| match e {
            VaultError::Kdf(_) => VaultError::BadParams(path.to_owned()),
            e => e,
        })?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key[..]));
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: header,
                    },
                )
                .map_err(|_| VaultError::Corrupt(path.to_owned()))?,
        );
        let mut data: VaultData =
            ciborium::from_reader(&plaintext[..]).map_err(|source| VaultError::Malformed {
                path: path.to_owned(),
                source,
            })?;
        data.adopt_legacy();
        Ok(Self {
            path: path.to_owned(),
            passphrase: Zeroizing::new(passphrase.to_vec()),
            params,
            data,
        })
    }

    /// The vault's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device identity secret.
    pub fn identity_secret(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(self.data.identity.expose());
        out
    }

    /// The device identity public key.
    pub fn identity_public(&self) -> [u8; 32] {
        let secret = StaticSecret::from(*self.identity_secret());
        PublicKey::from(&secret).to_bytes()
    }

    /// Adds a credential.
    pub fn add(&mut self, entry: Entry) -> Result<(), VaultError> {
        entry.validate()?;
        if self.entry(&entry.name).is_some() {
            return Err(VaultError::DuplicateEntry(entry.name));
        }
        self.data.entries.push(entry);
        Ok(())
    }

    /// Removes a credential and its grants.
    pub fn remove(&mut self, name: &str) -> Result<(), VaultError> {
        let before = self.data.entries.len();
        self.data.entries.retain(|e| e.name != name);
        if self.data.entries.len() == before {
            return Err(VaultError::NoSuchEntry(name.to_owned()));
        }
        self.data.grants.retain(|g| g.credential != name);
        Ok(())
    }

    /// The credential named `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.data.entries.iter().find(|e| e.name == name)
    }

    /// Seals the contents and replaces the file atomically (see the module doc).
    pub fn save(&self) -> Result<(), VaultError> {
        self.seal(&self.data)
    }

    /// Seals `data` (the contents, or in tests an older form of them) into the vault's file.
    fn seal<T: Serialize>(&self, data: &T) -> Result<(), VaultError> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut nonce);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&self.params.m_cost.to_be_bytes());
        header.extend_from_slice(&self.params.t_cost.to_be_bytes());
        header.extend_from_slice(&self.params.p_cost.to_be_bytes());
        header.extend_from_slice(&nonce);
        let key = derive_key(&self.passphrase, &salt, self.params)?;
        let mut plaintext = Zeroizing::new(Vec::new());
        ciborium::into_writer(data, &mut *plaintext).map_err(VaultError::Encode)?;
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&key[..]));
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &header,
                },
            )
            .map_err(|_| VaultError::Seal)?;
        header.extend_from_slice(&ciphertext);
        write_atomically(&self.path, &header)
    }
}

/// Argon2id of the passphrase.
fn derive_key(
    passphrase: &[u8],
    salt: &[u8],
    p: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let params = Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32)).map_err(VaultError::Kdf)?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut key[..])
        .map_err(VaultError::Kdf)?;
    Ok(key)
}

/// The previous generation's file name.
pub fn prev_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

/// Writes `bytes` to `path` durably and 0600 ([`shared_proto::fs`]), keeping the old file as
/// `.prev`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    shared_proto::fs::replace_file_keeping_previous(
        path,
        bytes,
        shared_proto::fs::PRIVATE_MODE,
        &prev_path(path),
    )
    .map_err(|e| VaultError::Io {
        op: e.step,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.into(),
            secret: Secret::new(b"sk-test-123".to_vec()),
            hosts: vec!["api.example.com".into()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        }
    }

    #[test]
    fn create_add_save_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let mut v = Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        let public = v.identity_public();
        v.add(entry("openai")).unwrap();
        v.save().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let raw = fs::read(&path).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"sk-test-123"));
        let v = Vault::open(&path, b"pw").unwrap();
        assert_eq!(v.identity_public(), public);
        assert_eq!(v.entry("openai").unwrap().secret.expose(), b"sk-test-123");
        assert!(matches!(
            Vault::open(&path, b"wrong"),
            Err(VaultError::Corrupt(_))
        ));
        assert!(matches!(
            Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS),
            Err(VaultError::Exists(_))
        ));
    }

    #[test]
    fn corruption_is_a_clear_error_and_prev_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let mut v = Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        v.add(entry("a")).unwrap();
        v.save().unwrap();
        v.add(entry("b")).unwrap();
        v.save().unwrap();
        // Flip one byte in the body, then one in the header.
        let good = fs::read(&path).unwrap();
        for at in [good.len() - 1, HEADER_LEN + 3, 10, 40] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            let err = Vault::open(&path, b"pw").unwrap_err();
            assert!(
                matches!(err, VaultError::Corrupt(_) | VaultError::BadParams(_)),
                "{at}: {err:?}"
            );
        }
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            Vault::open(&path, b"pw"),
            Err(VaultError::NotAVault(_))
        ));
        // The previous generation (before "b") still opens.
        let prev = Vault::open(&prev_path(&path), b"pw").unwrap();
        assert!(prev.entry("a").is_some() && prev.entry("b").is_none());
    }

    #[test]
    fn a_torn_write_leaves_the_vault_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let mut v = Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        v.add(entry("a")).unwrap();
        v.save().unwrap();
        // A crash after a partial temporary write leaves only a stray temp file.
        fs::write(dir.path().join(".vault.tmp-dead"), b"NCVAULT\x01half").unwrap();
        assert!(Vault::open(&path, b"pw").unwrap().entry("a").is_some());
        // And a save whose rename target is unusable fails cleanly without touching the vault.
        let blocked = dir.path().join("dir-vault");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let mut w = Vault::open(&path, b"pw").unwrap();
        w.path = blocked.clone();
        assert!(matches!(w.save(), Err(VaultError::Io { .. })));
        assert!(Vault::open(&path, b"pw").unwrap().entry("a").is_some());
        let strays = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with(".dir-vault.tmp")
            })
            .count();
        assert_eq!(strays, 0);
    }

    #[test]
    fn entries_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vault::create(&dir.path().join("v"), b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        let mut e = entry("x");
        e.format = "Bearer".into();
        assert!(matches!(v.add(e), Err(VaultError::InvalidEntry(_))));
        let mut e = entry("x");
        e.hosts.clear();
        assert!(v.add(e).is_err());
        let mut e = entry("x");
        e.secret = Secret::new(b"a\r\nb".to_vec());
        assert!(v.add(e).is_err());
        v.add(entry("x")).unwrap();
        assert!(matches!(
            v.add(entry("x")),
            Err(VaultError::DuplicateEntry(_))
        ));
        assert_eq!(&entry("x").header_value()[..], b"Bearer sk-test-123");
        assert!(entry("x").allows("API.example.com"));
        assert!(!entry("x").allows("api.example.com.evil"));
    }

    #[test]
    fn hostile_kdf_params_are_refused_before_deriving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[24..28].copy_from_slice(&u32::MAX.to_be_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Vault::open(&path, b"pw"),
            Err(VaultError::BadParams(_))
        ));
    }

    fn pairing(name: &str, address: &str, key: u8) -> Pairing {
        Pairing {
            address: address.into(),
            host_public_key: [key; 32],
            host_name: name.into(),
        }
    }

    /// A grant as vaults stored it before grants named their host.
    #[derive(Serialize)]
    struct OldGrant {
        credential: String,
        host: String,
        vm: String,
        expires_at: u64,
        fallback: bool,
    }

    /// The contents as vaults stored them when the device paired with one host.
    #[derive(Serialize)]
    struct OldData {
        identity: Secret,
        entries: Vec<Entry>,
        grants: Vec<OldGrant>,
        pairing: Option<Pairing>,
    }

    #[test]
    fn a_vault_with_one_pairing_opens_as_a_list_and_saves_in_the_new_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let v = Vault::create(&path, b"pw", KdfParams::FAST_FOR_TESTS).unwrap();
        let old = OldData {
            identity: v.data.identity.clone(),
            entries: vec![entry("openai")],
            grants: vec![OldGrant {
                credential: "openai".into(),
                host: "api.example.com".into(),
                vm: "*".into(),
                expires_at: 100,
                fallback: false,
            }],
            pairing: Some(pairing("host-a", "a:7000", 0xa)),
        };
        v.seal(&old).unwrap();
        let mut v = Vault::open(&path, b"pw").unwrap();
        assert_eq!(v.data.pairings, [pairing("host-a", "a:7000", 0xa)]);
        // The old grant is for that (the first) pairing, never any host.
        assert_eq!(v.data.grants[0].on, Some([0xa; 32]));
        assert!(v.data.moves.is_empty());
        v.data.add_pairing(pairing("host-b", "b:7000", 0xb));
        v.save().unwrap();
        let v = Vault::open(&path, b"pw").unwrap();
        assert_eq!(v.data.pairings.len(), 2);
        assert_eq!(v.data.grants[0].on, Some([0xa; 32]));
        // What a save writes holds the new form only: `pairings`, no `pairing`.
        let mut plain = Vec::new();
        ciborium::into_writer(&v.data, &mut plain).unwrap();
        let value: ciborium::Value = ciborium::from_reader(&plain[..]).unwrap();
        let keys: Vec<String> = value
            .as_map()
            .unwrap()
            .iter()
            .filter_map(|(k, _)| k.as_text().map(str::to_owned))
            .collect();
        assert!(keys.contains(&"pairings".to_owned()));
        assert!(!keys.contains(&"pairing".to_owned()));
    }

    #[test]
    fn pairing_again_replaces_the_same_key_or_address_in_place() {
        let mut data = Vault::create(
            &tempfile::tempdir().unwrap().path().join("v"),
            b"pw",
            KdfParams::FAST_FOR_TESTS,
        )
        .unwrap()
        .data;
        data.add_pairing(pairing("a", "a:1", 1));
        data.add_pairing(pairing("b", "b:1", 2));
        // Same key, new address; then a new key at b's address.
        data.add_pairing(pairing("a2", "a:2", 1));
        data.add_pairing(pairing("b2", "b:1", 3));
        assert_eq!(
            data.pairings,
            [pairing("a2", "a:2", 1), pairing("b2", "b:1", 3)]
        );
        // One that matches both (a's key, b2's address) takes the first's place.
        data.add_pairing(pairing("c", "b:1", 1));
        assert_eq!(data.pairings, [pairing("c", "b:1", 1)]);
    }

    #[test]
    fn the_host_of_a_grant_is_named_by_name_address_or_key() {
        let a = pairing("host-a", "a.example:7000", 0xa);
        let b = pairing("host-b", "b.example:7000", 0xb);
        assert_eq!(choose_pairing(&[], None), Err(ChooseHostError::NotPaired));
        assert_eq!(
            choose_pairing(&[], Some("host-a")),
            Err(ChooseHostError::NotPaired)
        );
        // One host: the default.
        assert_eq!(choose_pairing(std::slice::from_ref(&a), None), Ok(&a));
        let both = [a.clone(), b.clone()];
        match choose_pairing(&both, None) {
            Err(e @ ChooseHostError::Several(_)) => {
                let text = e.to_string();
                assert!(text.contains("--on"), "{text}");
                assert!(text.contains("host-a at a.example:7000") && text.contains("host-b"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(choose_pairing(&both, Some("host-b")), Ok(&b));
        assert_eq!(choose_pairing(&both, Some("a.example:7000")), Ok(&a));
        assert_eq!(choose_pairing(&both, Some(&hex::encode([0xb; 32]))), Ok(&b));
        assert_eq!(
            choose_pairing(&both, Some(&hex::encode([0xb; 32]).to_uppercase())),
            Ok(&b)
        );
        assert!(matches!(
            choose_pairing(&both, Some("host-c")),
            Err(ChooseHostError::NoSuch { .. })
        ));
        // A short key prefix is not a key.
        assert!(matches!(
            choose_pairing(&both, Some("0b0b")),
            Err(ChooseHostError::NoSuch { .. })
        ));
        let twin = pairing("host-a", "c.example:7000", 0xc);
        let dup = [a.clone(), twin];
        assert!(matches!(
            choose_pairing(&dup, Some("host-a")),
            Err(ChooseHostError::Ambiguous { .. })
        ));
        assert_eq!(choose_pairing(&dup, Some("a.example:7000")), Ok(&a));
        assert_eq!(host_label(&dup, &[0xc; 32]), "host-a");
        assert_eq!(host_label(&dup, &[0xd; 32]), hex::encode([0xd; 32]));
    }
}
