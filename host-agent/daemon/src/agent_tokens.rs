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

/// An agent's tokenizer as it moves with its VM to another host (live migration): its key
/// and the surrogates it issued, so that the new host's gateway and the device give the same
/// surrogates and restore the ones the agent already holds.
pub struct CarriedTokens {
    /// The agent's key.
    pub key: zeroize::Zeroizing<[u8; 32]>,
    /// The surrogates it issued (or adopted), oldest first.
    pub issued: Vec<IssuedToken>,
}

impl std::fmt::Debug for CarriedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarriedTokens")
            .field("key", &"<redacted>")
            .field("issued", &self.issued.len())
            .finish()
    }
}

fn local_kind(kind: TokenKind) -> Kind {
    match kind {
        TokenKind::Card => Kind::Card,
        TokenKind::Ssn => Kind::Ssn,
        TokenKind::Email => Kind::Email,
        TokenKind::ApiKey => Kind::ApiKey,
    }
}

impl AgentTokens {
    /// The tokenizer for an agent with `profile`, under a fresh random key; `None` when the
    /// profile turns tokenization off.
    pub fn for_profile(profile: &Profile) -> Result<Option<AgentTokens>, TokenizeError> {
        Self::for_profile_carrying(profile, None)
    }

    /// [`for_profile`](Self::for_profile), but under the key `carried` brought from the
    /// agent's previous host, with its surrogates adopted; a surrogate that does not decrypt
    /// under that key or lacks its kind's shape is left out (and counted in the log).
    pub fn for_profile_carrying(
        profile: &Profile,
        carried: Option<&CarriedTokens>,
    ) -> Result<Option<AgentTokens>, TokenizeError> {
        let mode = match profile.tokenize {
            TokenizeMode::Off => return Ok(None),
            TokenizeMode::Monitor => Mode::Monitor,
            TokenizeMode::Enforce => Mode::Enforce,
        };
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        match carried {
            Some(c) => *key = *c.key,
            None => OsRng.fill_bytes(&mut key[..]),
        }
        let tokenizer = Tokenizer::new(*key, mode)?;
        let tokens = AgentTokens {
            spec: TokenizeSpec {
                enforce: mode == Mode::Enforce,
                key: *key,
                llm_hosts: profile.llm_hosts.clone(),
                restore_hosts: profile.restore_hosts.clone(),
            },
            mode,
            tokenizer: Mutex::new(tokenizer),
        };
        if let Some(c) = carried {
            tokens.adopt(&c.issued);
        }
        Ok(Some(tokens))
    }

    /// Adopts surrogates this agent's tokenizer issued on its previous host, so that they are
    /// restored here too (and handed to the device with the others). One that does not
    /// decrypt under the key or lacks its kind's shape is left out, and counted in the log.
    pub fn adopt(&self, issued: &[IssuedToken]) {
        let mut tokenizer = self.lock();
        let refused = issued
            .iter()
            .filter(|i| {
                tokenizer
                    .adopt(&nanoclaw_tokenize::IssuedSurrogate {
                        surrogate: i.surrogate.clone(),
                        kind: local_kind(i.kind),
                        prefix_len: usize::from(i.prefix_len),
                        alphabet: i.alphabet,
                    })
                    .is_err()
            })
            .count();
        if refused > 0 {
            tracing::warn!(
                refused,
                of = issued.len(),
                "surrogates carried from the agent's previous host were refused"
            );
        }
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

    /// The key and the surrogates remembered since `seq` (`0`: all), to carry to the agent's
    /// next host, and the `seq` to carry from next time.
    pub fn carried_since(&self, seq: u64) -> (CarriedTokens, u64) {
        let (issued, next) = self.issued_since(seq);
        let carried = CarriedTokens {
            key: zeroize::Zeroizing::new(self.spec.key),
            issued,
        };
        (carried, next)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enforcing() -> Profile {
        Profile::from_toml("name = \"t\"\ntier = \"worker\"\ntokenize = \"enforce\"\n").unwrap()
    }

    #[test]
    fn a_carried_tokenizer_restores_what_the_first_one_issued() {
        let profile = enforcing();
        let first = AgentTokens::for_profile(&profile).unwrap().unwrap();
        let card = "4111 1111 1111 1111";
        let (shown, _) = first.lock().tokenize_text(&format!("card {card}")).unwrap();
        assert!(!shown.contains(card), "{shown}");

        let (carried, _) = first.carried_since(0);
        assert_eq!(carried.issued.len(), 1);
        let moved = AgentTokens::for_profile_carrying(&profile, Some(&carried))
            .unwrap()
            .unwrap();
        assert_eq!(moved.spec().key, first.spec().key);
        // The agent's surrogate is restored on the new host, and the new host hands the
        // device the same list.
        let (restored, _) = moved.lock().detokenize_text(&shown).unwrap();
        assert_eq!(restored, format!("card {card}"));
        assert_eq!(moved.issued_since(0).0, carried.issued);

        // A fresh tokenizer (the host before carrying) could not.
        let fresh = AgentTokens::for_profile(&profile).unwrap().unwrap();
        let (not_restored, _) = fresh.lock().detokenize_text(&shown).unwrap();
        assert_eq!(not_restored, shown);
    }

    #[test]
    fn surrogates_issued_during_the_copy_follow_as_a_delta() {
        let profile = enforcing();
        let first = AgentTokens::for_profile(&profile).unwrap().unwrap();
        let (before, _) = first.lock().tokenize_text("a 4111 1111 1111 1111").unwrap();
        let (carried, seq) = first.carried_since(0);
        let moved = AgentTokens::for_profile_carrying(&profile, Some(&carried))
            .unwrap()
            .unwrap();
        // Issued on the source while the VM was being copied.
        let (during, _) = first.lock().tokenize_text("b 5555 5555 5555 4444").unwrap();
        let (delta, _) = first.carried_since(seq);
        assert_eq!(delta.issued.len(), 1);
        moved.adopt(&delta.issued);
        let (restored, _) = moved
            .lock()
            .detokenize_text(&format!("{before} {during}"))
            .unwrap();
        assert_eq!(restored, "a 4111 1111 1111 1111 b 5555 5555 5555 4444");
    }

    #[test]
    fn a_carried_surrogate_of_the_wrong_shape_is_left_out() {
        let profile = enforcing();
        let first = AgentTokens::for_profile(&profile).unwrap().unwrap();
        let (mut carried, _) = first.carried_since(0);
        carried.issued.push(IssuedToken {
            surrogate: "1234".into(),
            kind: TokenKind::Card,
            prefix_len: 0,
            alphabet: 0,
        });
        let moved = AgentTokens::for_profile_carrying(&profile, Some(&carried))
            .unwrap()
            .unwrap();
        assert!(moved.issued_since(0).0.is_empty());
    }
}
