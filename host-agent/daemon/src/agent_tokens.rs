//! One agent's tokenizer, shared by its MCP gateway and the credential relay (so it sits below
//! both: neither reaches into the other for it).
//!
//! The gateway tokenizes tool results with it. The relay hands its key, mode and the profile's
//! LLM hosts to the user's device (inside the Noise KK link: the device is the only party that
//! sees the credential path in clear, see `vault_device::tokenize`), followed by the
//! surrogates issued since it last did ([`AgentTokens::issued_since`]), so that the device
//! gives the same surrogates and restores the gateway's. Nothing the device issues comes back.

use std::sync::{Mutex, MutexGuard};

use rand_core::{OsRng, RngCore};
use shared_proto::credential::{IssuedToken, MAX_SURROGATE_LEN, TokenKind, TokenizeSpec};

use crate::policy::{Profile, TokenizeMode};
use nanoclaw_tokenize::{Kind, Mode, TokenizeError, Tokenizer};

/// An agent's tokenizer and the settings the device gets.
pub struct AgentTokens {
    spec: TokenizeSpec,
    mode: Mode,
    tokenizer: Mutex<Tokenizer>,
}

impl std::fmt::Debug for AgentTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTokens")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn wire_kind(kind: Kind) -> TokenKind {
    match kind {
        Kind::Card => TokenKind::Card,
        Kind::Ssn => TokenKind::Ssn,
        Kind::Email => TokenKind::Email,
        Kind::ApiKey => TokenKind::ApiKey,
    }
}

impl AgentTokens {
    /// The tokenizer for an agent with `profile`, under a fresh random key; `None` when the
    /// profile turns tokenization off.
    pub fn for_profile(profile: &Profile) -> Result<Option<AgentTokens>, TokenizeError> {
        let mode = match profile.tokenize {
            TokenizeMode::Off => return Ok(None),
            TokenizeMode::Monitor => Mode::Monitor,
            TokenizeMode::Enforce => Mode::Enforce,
        };
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        let tokenizer = Tokenizer::new(*key, mode)?;
        Ok(Some(AgentTokens {
            spec: TokenizeSpec {
                enforce: mode == Mode::Enforce,
                key: *key,
                llm_hosts: profile.llm_hosts.clone(),
                restore_hosts: profile.restore_hosts.clone(),
            },
            mode,
            tokenizer: Mutex::new(tokenizer),
        }))
    }

    /// What the device gets.
    pub fn spec(&self) -> &TokenizeSpec {
        &self.spec
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Locks the tokenizer.
    pub fn lock(&self) -> MutexGuard<'_, Tokenizer> {
        self.tokenizer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The surrogates issued since `seq`, for the wire, and the `seq` to ask from next.
    /// Surrogates over [`MAX_SURROGATE_LEN`] are left out (the device then leaves them as
    /// they are: fails closed).
    pub fn issued_since(&self, seq: u64) -> (Vec<IssuedToken>, u64) {
        let (issued, next) = self.lock().issued_since(seq);
        let wire = issued
            .into_iter()
            .filter(|i| i.surrogate.len() <= MAX_SURROGATE_LEN)
            .filter_map(|i| {
                Some(IssuedToken {
                    prefix_len: u16::try_from(i.prefix_len).ok()?,
                    surrogate: i.surrogate,
                    kind: wire_kind(i.kind),
                    alphabet: i.alphabet,
                })
            })
            .collect();
        (wire, next)
    }
}
