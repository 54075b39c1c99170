//! Bearer tokens of the remote API: scoped, stored hashed.
//!
//! A token is `nct_` and 43 characters of URL-safe base64 (32 random bytes). It is shown once,
//! when it is made (`nanoclaw token create --scope run`, over the local socket). The daemon
//! keeps only its SHA-256 in `<state-dir>/tokens.json` (0600, replaced atomically), with an id,
//! the scope and the creation time; a lookup hashes what the client sent and finds the record
//! by that hash, so no stored value can be replayed and no comparison leaks timing about a
//! secret. A token made from 256 random bits needs no slow hash: nothing can be guessed.
//!
//! Scopes nest: `read` lists and reads; `run` also creates, stops, pauses, snapshots, restores
//! and forks VMs, removes snapshots and copies files into VMs; `admin` also manages images, approvals registration and tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nanoclaw_api::{TokenInfo, TokenScope};
use sha2::{Digest, Sha256};

/// The token file's name in the state directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "nct_";
/// At most this many tokens exist at once.
pub const MAX_TOKENS: usize = 1000;

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read or written.
    #[error("token file {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what the daemon writes.
    #[error("token file {} is malformed", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Replacing the file failed.
    #[error("token file")]
    Replace(#[from] shared_proto::fs::ReplaceError),
    /// Too many tokens.
    #[error("there are already {MAX_TOKENS} tokens; remove some first")]
    TooMany,
    /// No token has this id.
    #[error("no token with id {0}")]
    NotFound(String),
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Random(#[source] rand_core::Error),
}

/// One stored token: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stored {
    id: String,
    scope: TokenScope,
    /// Hex SHA-256 of the token.
    sha256: String,
    created_unix_ms: u64,
}

/// The tokens, loaded once and written through on every change.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    /// By hash.
    tokens: Mutex<BTreeMap<String, Stored>>,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl TokenStore {
    /// Loads `<state_dir>/tokens.json` (none yet: no tokens).
    pub fn open(state_dir: &Path) -> Result<Self, TokenError> {
        let path = state_dir.join(TOKENS_FILE);
        let stored: Vec<Stored> = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| TokenError::Malformed {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TokenError::Io { path, source }),
        };
        let tokens = stored.into_iter().map(|s| (s.sha256.clone(), s)).collect();
        Ok(Self {
            path,
            tokens: Mutex::new(tokens),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, tokens: &BTreeMap<String, Stored>) -> Result<(), TokenError> {
        let mut list: Vec<&Stored> = tokens.values().collect();
        list.sort_by_key(|s| (s.created_unix_ms, s.id.clone()));
        let bytes = serde_json::to_vec_pretty(&list).map_err(|source| TokenError::Malformed {
            path: self.path.clone(),
            source,
        })?;
        shared_proto::fs::replace_file(&self.path, &bytes, 0o600)?;
        Ok(())
    }

    /// Makes a token of `scope`; answers it (shown once) and its record.
    pub fn create(
        &self,
        scope: TokenScope,
        now_unix_ms: u64,
    ) -> Result<(String, TokenInfo), TokenError> {
        use rand_core::RngCore;
        let mut secret = [0u8; 32];
        let mut id = [0u8; 6];
        rand_core::OsRng
            .try_fill_bytes(&mut secret)
            .and_then(|()| rand_core::OsRng.try_fill_bytes(&mut id))
            .map_err(TokenError::Random)?;
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let stored = Stored {
            id: hex::encode(id),
            scope,
            sha256: hash(&token),
            created_unix_ms: now_unix_ms,
        };
        let mut tokens = self.lock();
        if tokens.len() >= MAX_TOKENS {
            return Err(TokenError::TooMany);
        }
        let mut next = tokens.clone();
        next.insert(stored.sha256.clone(), stored.clone());
        self.save(&next)?;
        *tokens = next;
        Ok((token, info(&stored)))
    }

    /// The scope of `token`, if it is one of ours.
    pub fn scope_of(&self, token: &str) -> Option<TokenScope> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        self.lock().get(&hash(token)).map(|s| s.scope)
    }

    /// Every token's record, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut list: Vec<TokenInfo> = self.lock().values().map(info).collect();
        list.sort_by_key(|t| (t.created_unix_ms, t.id.clone()));
        list
    }

    /// Removes the token with `id`.
    pub fn remove(&self, id: &str) -> Result<(), TokenError> {
        let mut tokens = self.lock();
        let mut next = tokens.clone();
        next.retain(|_, s| s.id != id);
        if next.len() == tokens.len() {
            return Err(TokenError::NotFound(id.to_owned()));
        }
        self.save(&next)?;
        *tokens = next;
        Ok(())
    }
}

fn info(s: &Stored) -> TokenInfo {
    TokenInfo {
        id: s.id.clone(),
        scope: s.scope,
        created_unix_ms: s.created_unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_found_by_their_scope() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let (run, info) = store.create(TokenScope::Run, 1).unwrap();
        let (read, _) = store.create(TokenScope::Read, 2).unwrap();
        assert!(
            run.starts_with(TOKEN_PREFIX) && run.len() == 4 + 43,
            "{run}"
        );
        assert_eq!(store.scope_of(&run), Some(TokenScope::Run));
        assert_eq!(store.scope_of(&read), Some(TokenScope::Read));
        assert_eq!(store.scope_of("nct_forged"), None);
        assert_eq!(store.scope_of(&run[1..]), None);
        // Only hashes reach the disk, and the file is the owner's alone.
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(
            !text.contains(&run[4..]) && !text.contains(&read[4..]),
            "{text}"
        );
        assert!(text.contains(&hash(&run)));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(TOKENS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart finds them; a removed one no longer works.
        let store = TokenStore::open(dir.path()).unwrap();
        assert_eq!(store.list().len(), 2);
        store.remove(&info.id).unwrap();
        assert_eq!(store.scope_of(&run), None);
        assert!(matches!(
            store.remove(&info.id),
            Err(TokenError::NotFound(_))
        ));
        assert_eq!(TokenStore::open(dir.path()).unwrap().list().len(), 1);
    }

    #[test]
    fn a_malformed_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENS_FILE), b"{not json").unwrap();
        let e = TokenStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, TokenError::Malformed { .. }), "{e}");
    }
}
