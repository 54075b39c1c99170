//! Tokenization: replace card numbers, US SSNs, email addresses and API keys in what flows to an
//! agent with format-preserving surrogates, and restore the real values in what leaves it.
//!
//! A library with no I/O. The host owns the agent key (it never enters the guest); a
//! [`Tokenizer`] holds the FF1 keys derived from it and the set of surrogates it has issued.
//!
//! - [`Mode::Monitor`] changes nothing and reports the kind and count of what would have been
//!   tokenized (the same counts as enforce mode, without running FF1). [`Mode::Enforce`]
//!   replaces it.
//! - A [`Report`] holds counts per kind, never a value; neither does any error.
//! - Only surrogates this tokenizer issued are restored: it remembers up to [`MAX_ISSUED`] of
//!   them (the surrogate strings only, not the real values; the real value is recomputed by
//!   decrypting). Past the bound the oldest is forgotten: a surrogate that old is then left as it
//!   is on the way out, which fails closed (the real value does not leave). Anything that looks
//!   like a card, SSN, email or key but was not issued is left alone.
//! - A surrogate that flows in again (the agent wrote it somewhere and reads it back) is kept as
//!   it is, not encrypted twice, so it still restores on the way out.
//! - Input over [`MAX_INPUT_BYTES`] is refused with [`TokenizeError::TooLarge`]. In bytes, only
//!   the valid UTF-8 runs are scanned; invalid bytes pass through unchanged and split runs.
//!
//! # Why the round trip holds
//! Tokenizing scans the text for candidates by shape (emails, then runs of digits, then tokens)
//! and replaces the ones that pass the strict validators. Every surrogate keeps its value's
//! length and, byte for byte, which positions hold a digit, which a letter and which any other
//! byte, so the same scan of the tokenized text finds each surrogate as a candidate with the same
//! bounds. Detokenizing acts only on candidates found in the issued set, and each construction
//! is a bijection, so decrypting gives the real value back (see `surrogate`). Provider keys are
//! found by their prefix, which surrogates keep, and the classes of the bytes after it; values
//! run into words are found by the same class rules on both sides. The cases where it could
//! not: two API keys with the same prefix but different letter alphabets whose surrogates (20 or
//! more letters and digits) come out equal (the first issued then wins); and, with odds below
//! one in a million, a surrogate whose new letters change how the scan reads it (a
//! high-entropy key whose surrogate spells a provider prefix, a mixed-case key without digits
//! whose surrogate comes out in one case). Such a surrogate is left as it is on the way out,
//! which fails closed.
//!
//! # Sharing issued surrogates
//! The user's device tokenizes the credential path with the same agent key (the host hands it
//! over the paired link; the host cannot see that traffic). So that the device restores
//! surrogates the host issued in MCP results, [`Tokenizer::issued_since`] lists what was issued
//! after a point, as [`IssuedSurrogate`]s (the surrogate and what decrypting it needs, never
//! the real value), and [`Tokenizer::adopt`] takes one into another tokenizer after checking
//! that it decrypts under that tokenizer's key.
//!
//! A tokenizer takes `&mut self` (it records what it issues); share one per agent behind a lock.
//! [`detect_spans`] runs the same detectors without a tokenizer and says where each value is
//! (for scoring detections against labelled text, as `benches/tokenize.rs` does).
//!
//! # Layout
//! - `detect`: linear-time detectors and validators (Luhn and IIN, SSN ranges, email
//!   shape, key prefixes and the entropy-with-keyword rule).
//! - `surrogate`: the FF1 constructions per kind and the per-kind key derivation.
//! - `json`: the structural walk of JSON values (strings only).

mod detect;
mod json;
mod surrogate;

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use serde::Serialize;

use surrogate::{Alphabet, Direction, Keys};

/// The largest input, in bytes, one call accepts.
pub const MAX_INPUT_BYTES: usize = 8 << 20;
/// How many issued surrogates a tokenizer remembers (oldest forgotten first).
pub const MAX_ISSUED: usize = 65_536;
/// How deeply nested a JSON value may be.
pub const MAX_JSON_DEPTH: usize = 128;

/// Errors of tokenization. None carries a value from the input.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The input is larger than [`MAX_INPUT_BYTES`].
    #[error("input of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The input's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A JSON value is nested deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON nested deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// Deriving a per-kind key from the agent key failed (HKDF refused the output length;
    /// its error type implements `std::error::Error` only with a feature we do not need).
    #[error("cannot derive a tokenization key")]
    DeriveKey,
    /// FF1 refused a radix.
    #[error("FF1 refused the radix")]
    Radix(#[source] fpe::ff1::InvalidRadix),
    /// FF1 encryption failed.
    #[error("FF1 encryption failed")]
    Encrypt(#[source] fpe::ff1::NumeralStringError),
    /// FF1 decryption failed.
    #[error("FF1 decryption failed")]
    Decrypt(#[source] fpe::ff1::NumeralStringError),
    /// An [`IssuedSurrogate`] to adopt does not decrypt under this key, or its fields are out
    /// of range.
    #[error("an issued surrogate to adopt is not valid under this key")]
    BadIssued,
    /// Cycle walking found no valid value in its step limit.
    #[error("cycle walking found no valid value")]
    CycleWalk,
    /// A character was outside the alphabet it was to be encrypted over.
    #[error("a character is outside its FF1 alphabet")]
    Alphabet,
}

/// What a tokenizer does with what it detects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Change nothing; report what would have been tokenized.
    Monitor,
    /// Replace with surrogates on the way in; restore on the way out.
    Enforce,
}

/// The kinds of sensitive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A payment card number.
    Card,
    /// A US Social Security number.
    Ssn,
    /// An email address.
    Email,
    /// An API key or token.
    ApiKey,
}

/// Counts per kind of what was (or in monitor mode, would have been) tokenized or restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Card numbers.
    pub cards: u64,
    /// SSNs.
    pub ssns: u64,
    /// Email addresses.
    pub emails: u64,
    /// API keys and tokens.
    pub api_keys: u64,
    /// Values detected but too short to encrypt (left unchanged; short email addresses).
    pub skipped: u64,
}

impl Report {
    fn count(&mut self, kind: Kind) {
        let n = match kind {
            Kind::Card => &mut self.cards,
            Kind::Ssn => &mut self.ssns,
            Kind::Email => &mut self.emails,
            Kind::ApiKey => &mut self.api_keys,
        };
        *n += 1;
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Report) {
        self.cards += other.cards;
        self.ssns += other.ssns;
        self.emails += other.emails;
        self.api_keys += other.api_keys;
        self.skipped += other.skipped;
    }

    /// How many values in all (skipped ones not included).
    pub fn total(&self) -> u64 {
        self.cards + self.ssns + self.emails + self.api_keys
    }
}

/// Where the detectors find a sensitive value in `text`: its kind and byte span, in order,
/// not overlapping.
///
/// These are the values a [`Mode::Enforce`] tokenizer with nothing issued yet replaces in
/// [`Tokenizer::tokenize_text`], and that a [`Mode::Monitor`] one counts, plus the ones it
/// detects but finds too short to encrypt (counted as [`Report::skipped`]). Linear in the
/// length of `text`; every span starts and ends on a character boundary.
pub fn detect_spans(text: &str) -> Vec<(Kind, Range<usize>)> {
    let b = text.as_bytes();
    detect::scan(text, |_, c| {
        let s = &b[c.start..c.end];
        match c.kind {
            Kind::Card => detect::valid_card(s),
            Kind::Ssn => detect::valid_ssn(s),
            Kind::Email => true,
            Kind::ApiKey => false,
        }
    })
    .into_iter()
    .filter(|c| c.kind != Kind::ApiKey || detect::key_prefix_len(b, *c, "").is_some())
    .map(|c| (c.kind, c.start..c.end))
    .collect()
}

/// What is remembered about an issued surrogate: enough to decrypt it, no real value.
#[derive(Debug, Clone, Copy)]
struct Issued {
    kind: Kind,
    prefix_len: usize,
    alphabet: Alphabet,
    /// When it was issued, in this tokenizer's own count ([`Tokenizer::issued_since`]).
    seq: u64,
}

/// An issued surrogate as it goes to another tokenizer with the same key: the surrogate and
/// what decrypting it needs, never the real value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSurrogate {
    /// The surrogate as the agent sees it.
    pub surrogate: String,
    /// Its kind.
    pub kind: Kind,
    /// For API keys, the length of the prefix kept in clear; 0 for the other kinds.
    pub prefix_len: usize,
    /// For API keys, the letter alphabet encrypted over (an opaque id); ignored otherwise.
    pub alphabet: u8,
}

/// Tokenizes and detokenizes for one agent.
pub struct Tokenizer {
    keys: Keys,
    mode: Mode,
    issued: HashMap<String, Issued>,
    order: VecDeque<String>,
    /// The `seq` of the next surrogate remembered.
    next_seq: u64,
    /// [`MAX_ISSUED`]; smaller in tests.
    capacity: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("mode", &self.mode)
            .field("issued", &self.issued.len())
            .finish_non_exhaustive()
    }
}

fn check_len(len: usize) -> Result<(), TokenizeError> {
    if len > MAX_INPUT_BYTES {
        return Err(TokenizeError::TooLarge {
            len,
            max: MAX_INPUT_BYTES,
        });
    }
    Ok(())
}

impl Tokenizer {
    /// A tokenizer for the agent whose key is `agent_key` (kept on the host, never in a guest).
    pub fn new(agent_key: [u8; 32], mode: Mode) -> Result<Tokenizer, TokenizeError> {
        let mut agent_key = agent_key;
        let keys = Keys::derive(&agent_key);
        zeroize::Zeroize::zeroize(&mut agent_key);
        Ok(Tokenizer {
            keys: keys?,
            mode,
            issued: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            capacity: MAX_ISSUED,
        })
    }

    /// The mode this tokenizer runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many issued surrogates are remembered.
    pub fn issued_count(&self) -> usize {
        self.issued.len()
    }

    /// The surrogates issued (or adopted) since `seq` that are still remembered, oldest first,
    /// and the `seq` to ask from next time. `issued_since(0)` lists all of them.
    pub fn issued_since(&self, seq: u64) -> (Vec<IssuedSurrogate>, u64) {
        let newer = self
            .order
            .iter()
            .rev()
            .map_while(|s| {
                let i = self.issued.get(s)?;
                (i.seq >= seq).then(|| IssuedSurrogate {
                    surrogate: s.clone(),
                    kind: i.kind,
                    prefix_len: i.prefix_len,
                    alphabet: i.alphabet.id(),
                })
            })
            .collect::<Vec<_>>();
        (newer.into_iter().rev().collect(), self.next_seq)
    }

    /// Remembers a surrogate another tokenizer with the same key issued, so that it is restored
    /// here too. Refused ([`TokenizeError::BadIssued`]) unless it has its kind's shape (a card
    /// or an SSN must pass the validators) and decrypts under this key. FF1 is a permutation, so
    /// this cannot tell a surrogate from any other value of that shape: adopt only from the
    /// tokenizer's other holder (the host, over the paired link).
    pub fn adopt(&mut self, issued: &IssuedSurrogate) -> Result<(), TokenizeError> {
        let s = issued.surrogate.as_str();
        check_len(s.len())?;
        let alphabet = match issued.kind {
            Kind::ApiKey => Alphabet::from_id(issued.alphabet).ok_or(TokenizeError::BadIssued)?,
            _ => Alphabet::Alpha52,
        };
        let prefix_len = match issued.kind {
            Kind::ApiKey => issued.prefix_len,
            _ => 0,
        };
        let shaped = match issued.kind {
            Kind::Card => detect::valid_card(s.as_bytes()),
            Kind::Ssn => detect::valid_ssn(s.as_bytes()),
            Kind::Email | Kind::ApiKey => true,
        };
        if !shaped || prefix_len > s.len() || !s.is_char_boundary(prefix_len) {
            return Err(TokenizeError::BadIssued);
        }
        let entry = Issued {
            kind: issued.kind,
            prefix_len,
            alphabet,
            seq: 0,
        };
        match self.surrogate(s, entry, Direction::Decrypt) {
            Ok(Some(_)) => {
                self.remember(s.to_owned(), entry);
                Ok(())
            }
            _ => Err(TokenizeError::BadIssued),
        }
    }

    /// Replace sensitive values in text flowing to the agent.
    pub fn tokenize_text(&mut self, text: &str) -> Result<(String, Report), TokenizeError> {
        check_len(text.len())?;
        self.tokenize_in(text, "")
    }

    /// Restore the real values of issued surrogates in text leaving the agent.
    pub fn detokenize_text(&mut self, text: &str) -> Result<(String, Report), TokenizeError> {
        check_len(text.len())?;
        self.detokenize_in(text)
    }

    /// [`tokenize_text`](Self::tokenize_text) on bytes: valid UTF-8 runs are scanned, invalid
    /// bytes pass through unchanged.
    pub fn tokenize_bytes(&mut self, bytes: &[u8]) -> Result<(Vec<u8>, Report), TokenizeError> {
        self.bytes(bytes, Direction::Encrypt)
    }

    /// [`detokenize_text`](Self::detokenize_text) on bytes, invalid UTF-8 unchanged.
    pub fn detokenize_bytes(&mut self, bytes: &[u8]) -> Result<(Vec<u8>, Report), TokenizeError> {
        self.bytes(bytes, Direction::Decrypt)
    }

    /// Tokenize every string in a JSON value (member names and other values stay). A string's
    /// member name counts as a keyword for the API-key entropy rule.
    pub fn tokenize_json(
        &mut self,
        value: &serde_json::Value,
    ) -> Result<(serde_json::Value, Report), TokenizeError> {
        json::transform(value, &mut |s, context| self.tokenize_in(s, context))
    }

    /// Restore issued surrogates in every string of a JSON value.
    pub fn detokenize_json(
        &mut self,
        value: &serde_json::Value,
    ) -> Result<(serde_json::Value, Report), TokenizeError> {
        json::transform(value, &mut |s, _| self.detokenize_in(s))
    }

    fn bytes(&mut self, bytes: &[u8], dir: Direction) -> Result<(Vec<u8>, Report), TokenizeError> {
        check_len(bytes.len())?;
        let mut out = Vec::with_capacity(bytes.len());
        let mut report = Report::default();
        for chunk in bytes.utf8_chunks() {
            let (s, r) = match dir {
                Direction::Encrypt => self.tokenize_in(chunk.valid(), "")?,
                Direction::Decrypt => self.detokenize_in(chunk.valid())?,
            };
            out.extend_from_slice(s.as_bytes());
            out.extend_from_slice(chunk.invalid());
            report.merge(r);
        }
        Ok((out, report))
    }

    fn is_issued(&self, s: &str, kind: Kind) -> Option<Issued> {
        self.issued.get(s).copied().filter(|i| i.kind == kind)
    }

    fn tokenize_in(
        &mut self,
        text: &str,
        context: &str,
    ) -> Result<(String, Report), TokenizeError> {
        let mut report = Report::default();
        let candidates = detect::scan(text, |t, c| {
            let s = &t[c.start..c.end];
            if self.is_issued(s, c.kind).is_some() {
                return true;
            }
            match c.kind {
                Kind::Card => detect::valid_card(s.as_bytes()),
                Kind::Ssn => detect::valid_ssn(s.as_bytes()),
                Kind::Email => {
                    let ok = surrogate::email_encryptable(s);
                    if !ok {
                        report.skipped += 1;
                    }
                    ok
                }
                Kind::ApiKey => false,
            }
        });
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for c in candidates {
            let s = &text[c.start..c.end];
            if self.is_issued(s, c.kind).is_some() {
                continue;
            }
            let (prefix_len, alphabet) = match c.kind {
                Kind::ApiKey => match detect::key_prefix_len(text.as_bytes(), c, context) {
                    Some(p) => (p, Alphabet::for_letters(&s.as_bytes()[p..])),
                    None => continue,
                },
                _ => (0, Alphabet::Alpha52),
            };
            if self.mode == Mode::Monitor {
                // Count what enforce mode would replace, without encrypting: cards and SSNs
                // always get a surrogate, emails that could not were left out above.
                if c.kind != Kind::ApiKey || surrogate::api_key_encryptable(s, prefix_len, alphabet)
                {
                    report.count(c.kind);
                } else {
                    report.skipped += 1;
                }
                continue;
            }
            let issued = Issued {
                kind: c.kind,
                prefix_len,
                alphabet,
                seq: 0,
            };
            let Some(sur) = self.surrogate(s, issued, Direction::Encrypt)? else {
                report.skipped += 1;
                continue;
            };
            report.count(c.kind);
            out.push_str(&text[at..c.start]);
            out.push_str(&sur);
            at = c.end;
            self.remember(sur, issued);
        }
        out.push_str(&text[at..]);
        Ok((out, report))
    }

    fn detokenize_in(&mut self, text: &str) -> Result<(String, Report), TokenizeError> {
        let mut report = Report::default();
        let candidates = detect::scan(text, |t, c| {
            self.is_issued(&t[c.start..c.end], c.kind).is_some()
        });
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for c in candidates {
            let s = &text[c.start..c.end];
            let Some(issued) = self.is_issued(s, c.kind) else {
                continue;
            };
            let Some(real) = self.surrogate(s, issued, Direction::Decrypt)? else {
                continue;
            };
            report.count(c.kind);
            out.push_str(&text[at..c.start]);
            out.push_str(&real);
            at = c.end;
        }
        out.push_str(&text[at..]);
        Ok((out, report))
    }

    fn surrogate(
        &self,
        s: &str,
        i: Issued,
        dir: Direction,
    ) -> Result<Option<String>, TokenizeError> {
        match i.kind {
            Kind::Card => surrogate::card(&self.keys, s, dir).map(Some),
            Kind::Ssn => surrogate::ssn(&self.keys, s, dir).map(Some),
            Kind::Email => surrogate::email(&self.keys, s, dir),
            Kind::ApiKey => surrogate::api_key(&self.keys, s, i.prefix_len, i.alphabet, dir),
        }
    }

    fn remember(&mut self, surrogate: String, mut issued: Issued) {
        if self.issued.contains_key(&surrogate) {
            return;
        }
        issued.seq = self.next_seq;
        self.next_seq += 1;
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.issued.remove(&old);
        }
        self.issued.insert(surrogate.clone(), issued);
        self.order.push_back(surrogate);
    }
}

#[cfg(test)]
mod tests;
