//! Detectors: find card numbers, US SSNs, email addresses and API keys in text, in linear time.
//!
//! Scanning works on the bytes of a `&str`. Every byte the detectors care about is ASCII, and a
//! byte of a multi-byte UTF-8 character (`>= 0x80`) is never in any of their classes, so every
//! span starts and ends on a character boundary.
//!
//! A scan yields *candidates by shape*; the [`Tokenizer`](super::Tokenizer) decides which ones it
//! acts on: while tokenizing, the strict validators below (Luhn and IIN, SSN ranges, provider
//! key shapes, or entropy with a keyword nearby); while detokenizing, whether the candidate is a
//! surrogate it issued. Shapes only depend on character classes that every surrogate keeps
//! (digits stay digits, letters and digits stay letters and digits, every other byte stays
//! itself, a key's provider prefix stays), which is what makes the candidates of a tokenized text
//! line up with the surrogates in it.
//!
//! # Boundaries
//! A value is found whatever comes before or after it: punctuation (`.`, `,`, `-`, `:`, `=`,
//! brackets, quotes, `/`) or a word it runs into (`order4111…`, `ssn123-45-6789`,
//! `tokenghp_…`). The exceptions keep look-alikes out:
//! - a digit run touching `@`, or a `.` that joins it to more digits (a decimal or version
//!   number), is not a card or SSN; nor is one inside a UUID-shaped token or a long token whose
//!   letters and digits alternate often (a hash, a random id);
//! - card digits grouped by spaces or dashes must start with a group of four;
//! - a provider key with a fixed length is cut at that length, one with a variable length takes
//!   every byte of its alphabet that follows (a word run into it is then part of its span).
//!
//! Known limits: card numbers grouped by spaces and written one after another with a single
//! space between them read as one run and are not detected; so are card digits directly after
//! a short number ("call 555 1234 4111 ..."). An email address run into a word is read with
//! that word (`mailjane@example.com` is one address). A high-entropy token without a provider
//! prefix (the keyword rule) is read as a whole run of token bytes, and not when a `.` joins it
//! to more of them (a hostname). JWTs and other `.`-joined tokens are seen segment by segment.
//!
//! The rules are our own, written from the public formats (each card network's published IIN
//! ranges, the SSA's SSN randomization rules, RFC 5321 address shape, each provider's documented
//! key format).

use super::Kind;

/// A candidate found by shape: `text[start..end]`, of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub start: usize,
    pub end: usize,
    pub kind: Kind,
}

/// How many bytes before a token the keyword rule looks at.
const KEYWORD_WINDOW: usize = 48;
/// Words that, just before a high-entropy token, mark it as a secret.
const KEYWORDS: &[&[u8]] = &[
    b"key",
    b"token",
    b"secret",
    b"passw",
    b"auth",
    b"bearer",
    b"credential",
    b"api",
];
/// The shortest and longest token the high-entropy rule considers.
const ENTROPY_MIN_LEN: usize = 20;
const ENTROPY_MAX_LEN: usize = 256;

/// Which bytes may follow a provider's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// `A-Za-z0-9`.
    Alnum,
    /// `A-Z0-9`.
    UpperDigit,
    /// `A-Za-z0-9` and `-`.
    AlnumDash,
    /// `A-Za-z0-9`, `_` and `-` (base64url).
    Base64Url,
    /// `A-Za-z0-9` and `_`, with a `_` at one position: GitHub's fine-grained tokens.
    AlnumUnderscoreAt(usize),
}

impl Rest {
    fn allows(self, c: u8) -> bool {
        match self {
            Rest::Alnum => c.is_ascii_alphanumeric(),
            Rest::UpperDigit => c.is_ascii_uppercase() || c.is_ascii_digit(),
            Rest::AlnumDash => c.is_ascii_alphanumeric() || c == b'-',
            Rest::Base64Url => is_token(c),
            Rest::AlnumUnderscoreAt(_) => c.is_ascii_alphanumeric() || c == b'_',
        }
    }
}

/// How long the part after a provider's prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Len {
    /// Exactly this many bytes; more bytes of the alphabet after them are a word run into it.
    Exact(usize),
    /// Exactly this many, and the next byte may not be of the alphabet (AWS ids, whose
    /// alphabet is upper case: an upper-case word run into one makes it something else).
    ExactAlone(usize),
    /// At least this many; every byte of the alphabet that follows belongs to the key.
    AtLeast(usize),
}

/// A provider key format: a prefix kept in clear and what follows it, as each provider
/// documents it.
struct KeyShape {
    prefix: &'static [u8],
    rest: Rest,
    len: Len,
}

const fn shape(prefix: &'static [u8], rest: Rest, len: Len) -> KeyShape {
    KeyShape { prefix, rest, len }
}

/// Provider key formats. Where one prefix starts another, the longer comes first.
const KEY_SHAPES: &[KeyShape] = &[
    // GitHub: fine-grained personal access tokens, `github_pat_`, 22 letters and digits, `_`,
    // 59 letters and digits; classic tokens `ghp_` (personal), `gho_` (OAuth), `ghu_`
    // (user-to-server), `ghs_` (server-to-server), `ghr_` (refresh), then 36 letters and digits.
    shape(b"github_pat_", Rest::AlnumUnderscoreAt(22), Len::Exact(82)),
    shape(b"ghp_", Rest::Alnum, Len::Exact(36)),
    shape(b"gho_", Rest::Alnum, Len::Exact(36)),
    shape(b"ghu_", Rest::Alnum, Len::Exact(36)),
    shape(b"ghs_", Rest::Alnum, Len::Exact(36)),
    shape(b"ghr_", Rest::Alnum, Len::Exact(36)),
    // GitLab personal access tokens: `glpat-` and 20 or more of `0-9A-Za-z_-`.
    shape(b"glpat-", Rest::Base64Url, Len::AtLeast(20)),
    // Slack: bot, user, workspace-app, refresh, legacy (`xox[abpors]-`) and app-level
    // (`xapp-`) tokens, digits and letters in dash-separated parts.
    shape(b"xoxa-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xoxb-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xoxp-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xoxo-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xoxr-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xoxs-", Rest::AlnumDash, Len::AtLeast(10)),
    shape(b"xapp-", Rest::AlnumDash, Len::AtLeast(10)),
    // Stripe secret and restricted keys, live and test: 24 or more letters and digits.
    shape(b"sk_live_", Rest::Alnum, Len::AtLeast(24)),
    shape(b"sk_test_", Rest::Alnum, Len::AtLeast(24)),
    shape(b"rk_live_", Rest::Alnum, Len::AtLeast(24)),
    shape(b"rk_test_", Rest::Alnum, Len::AtLeast(24)),
    // AWS access key ids, long-term (`AKIA`) and temporary (`ASIA`): 16 of `A-Z0-9`.
    shape(b"AKIA", Rest::UpperDigit, Len::ExactAlone(16)),
    shape(b"ASIA", Rest::UpperDigit, Len::ExactAlone(16)),
    // Anthropic: `sk-ant-` (then `api03-`, `admin01-`, ...) and base64url.
    shape(b"sk-ant-", Rest::Base64Url, Len::AtLeast(32)),
    // OpenAI: project, service-account and admin keys in base64url; legacy user keys `sk-` and
    // 48 letters and digits (32 or more taken, so that shorter vendor variants are found too).
    shape(b"sk-proj-", Rest::Base64Url, Len::AtLeast(20)),
    shape(b"sk-svcacct-", Rest::Base64Url, Len::AtLeast(20)),
    shape(b"sk-admin-", Rest::Base64Url, Len::AtLeast(20)),
    shape(b"sk-", Rest::Alnum, Len::AtLeast(32)),
    // Google API keys: `AIza` and 35 of `0-9A-Za-z_-`.
    shape(b"AIza", Rest::Base64Url, Len::Exact(35)),
    // npm access tokens (`npm_`, 36) and Hugging Face tokens (`hf_`, 34).
    shape(b"npm_", Rest::Alnum, Len::Exact(36)),
    shape(b"hf_", Rest::Alnum, Len::Exact(34)),
];

/// Whether a key shape may start with the two bytes `a`, `b` (a quick filter on every byte).
fn may_start_key(a: u8, b: u8) -> bool {
    matches!(
        (a, b),
        (b'g', b'h' | b'i' | b'l')
            | (b's' | b'r', b'k')
            | (b'x', b'o' | b'a')
            | (b'A', b'K' | b'S' | b'I')
            | (b'n', b'p')
            | (b'h', b'f')
    )
}

impl KeyShape {
    /// The length of the part after the prefix that `rest` (the bytes after the prefix, up to
    /// the next byte already taken) starts with, if it has this shape.
    fn rest_len(&self, rest: &[u8]) -> Option<usize> {
        let max = match self.len {
            Len::Exact(n) | Len::ExactAlone(n) => n,
            Len::AtLeast(_) => rest.len(),
        };
        let n = rest
            .iter()
            .take(max)
            .take_while(|&&c| self.rest.allows(c))
            .count();
        let ok = match self.len {
            Len::Exact(m) => n == m,
            Len::ExactAlone(m) => n == m && rest.get(n).is_none_or(|&c| !self.rest.allows(c)),
            Len::AtLeast(m) => n >= m,
        };
        let part = &rest[..n];
        let layout = match self.rest {
            Rest::AlnumUnderscoreAt(at) => {
                part.get(at) == Some(&b'_') && part.iter().filter(|&&c| c == b'_').count() == 1
            }
            _ => true,
        };
        // Random keys have a digit or a capital; words and hyphenated names do not.
        let random = part
            .iter()
            .any(|c| c.is_ascii_digit() || c.is_ascii_uppercase());
        (ok && layout && random).then_some(n)
    }
}

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

/// Which bytes are token bytes, as a table (the scans ask for every byte).
const TOKEN_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
        c += 1;
    }
    t
};

/// A byte of an API key or token.
pub(crate) fn is_token(b: u8) -> bool {
    TOKEN_BYTES[usize::from(b)]
}

/// All candidates in `text`, sorted and not overlapping: emails first, then provider-shaped
/// keys outside them, then digit runs (card or SSN shaped) outside both that `claim` keeps,
/// then high-entropy token runs outside all of those.
///
/// `claim(text, candidate)` says whether the caller acts on an email or digit-run candidate
/// (acted-on candidates hide their bytes from the later steps). Provider-shaped keys always
/// hide theirs and are all returned, and so are token runs long enough to be a key.
pub(crate) fn scan(text: &str, mut claim: impl FnMut(&str, Candidate) -> bool) -> Vec<Candidate> {
    let b = text.as_bytes();
    let mut taken = vec![false; b.len()];
    let mut out = Vec::new();
    let take = |taken: &mut [bool], out: &mut Vec<Candidate>, c: Candidate| {
        taken[c.start..c.end].iter_mut().for_each(|t| *t = true);
        out.push(c);
    };

    for c in email_candidates(b) {
        if claim(text, c) {
            take(&mut taken, &mut out, c);
        }
    }
    for c in key_shape_candidates(b, &taken) {
        take(&mut taken, &mut out, c);
    }
    for c in digit_run_candidates(b, &taken) {
        if claim(text, c) {
            take(&mut taken, &mut out, c);
        }
    }
    out.extend(token_candidates(b, &taken));
    out.sort_by_key(|c| c.start);
    out
}

/// Email-shaped spans: `local@domain`, local part of at most 64 bytes not starting with `.`,
/// `-`, `+` or `%` (punctuation before the address) nor ending in `.`, a domain of two or more
/// labels whose last label is 2 or more letters.
fn email_candidates(b: &[u8]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut last_end = 0;
    for at in 0..b.len() {
        if b[at] != b'@' || at < last_end {
            continue;
        }
        let mut start = at;
        while start > last_end && is_local(b[start - 1]) {
            start -= 1;
        }
        while start < at && matches!(b[start], b'.' | b'-' | b'+' | b'%') {
            start += 1;
        }
        if start == at || at - start > 64 || b[at - 1] == b'.' {
            continue;
        }
        let Some(end) = domain_end(b, at + 1) else {
            continue;
        };
        out.push(Candidate {
            start,
            end,
            kind: Kind::Email,
        });
        last_end = end;
    }
    out
}

/// The end of the longest domain starting at `from`: two or more labels of letters, digits and
/// inner `-`, each at most 63 bytes, 253 in all, the last 2 or more letters. Punctuation or a
/// word after it is not part of it (`example.com.` or `example.com-ok` end at `com`).
fn domain_end(b: &[u8], from: usize) -> Option<usize> {
    let mut best = None;
    let mut label_start = from;
    let mut labels = 0;
    loop {
        let mut i = label_start;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-') {
            i += 1;
        }
        let label = &b[label_start..i];
        if i - from > 253 || label.is_empty() || label[0] == b'-' {
            break;
        }
        labels += 1;
        if labels >= 2 {
            // The top-level domain: the label's leading letters, if they are all of it or a
            // `-` follows them (a word run on after a dash).
            let alpha = label.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            if alpha >= 2 && (alpha == label.len() || label[alpha] == b'-') {
                best = Some(label_start + alpha);
            }
        }
        if label.len() > 63 || label[label.len() - 1] == b'-' {
            break;
        }
        if i + 1 < b.len() && b[i] == b'.' {
            label_start = i + 1;
        } else {
            break;
        }
    }
    best
}

/// The offsets at which a key prefix holds `byte`, as bits (bit `o`: offset `o`).
const fn offsets_of(byte: u8) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < KEY_SHAPES.len() {
        let p = KEY_SHAPES[i].prefix;
        let mut o = 0;
        while o < p.len() {
            if p[o] == byte {
                m |= 1 << o;
            }
            o += 1;
        }
        i += 1;
    }
    m
}

/// Where `_`, `-` and `A` sit in the key prefixes. Every prefix holds one of them, so the scan
/// only looks at those bytes (found with SIMD) instead of at every byte.
const UNDERSCORE_AT: u32 = offsets_of(b'_');
const DASH_AT: u32 = offsets_of(b'-');
const A_AT: u32 = offsets_of(b'A');
const _: () = {
    // Each prefix holds `_`, `-` or `A`.
    let mut i = 0;
    while i < KEY_SHAPES.len() {
        let p = KEY_SHAPES[i].prefix;
        let mut found = false;
        let mut o = 0;
        while o < p.len() {
            found |= matches!(p[o], b'_' | b'-' | b'A');
            o += 1;
        }
        assert!(found);
        i += 1;
    }
};

/// Provider-shaped keys outside `taken`, wherever they start (after punctuation or inside a
/// word), in order, not overlapping: at each `_`, `-` or `A`, the starts a prefix holding it
/// there would have, earliest first.
fn key_shape_candidates(b: &[u8], taken: &[bool]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut next_free = 0;
    for j in memchr::memchr3_iter(b'_', b'-', b'A', b) {
        if j < next_free {
            continue;
        }
        let offsets = match b[j] {
            b'_' => UNDERSCORE_AT,
            b'-' => DASH_AT,
            _ => A_AT,
        };
        // Largest offset first: the earliest start.
        let mut left = offsets;
        while left != 0 {
            let o = 31 - left.leading_zeros() as usize;
            left &= !(1 << o);
            let Some(start) = j.checked_sub(o) else {
                continue;
            };
            if start < next_free
                || start + 1 >= b.len()
                || taken[start]
                || !may_start_key(b[start], b[start + 1])
            {
                continue;
            }
            if let Some(end) = key_at(b, taken, start) {
                out.push(Candidate {
                    start,
                    end,
                    kind: Kind::ApiKey,
                });
                next_free = end;
                break;
            }
        }
    }
    out
}

/// The end of the provider-shaped key starting at `start`, if one does.
fn key_at(b: &[u8], taken: &[bool], start: usize) -> Option<usize> {
    // The run of token bytes from `start` up to the next taken one (every key alphabet is
    // token bytes), so that this costs no more than the run.
    let run = b[start..]
        .iter()
        .zip(&taken[start..])
        .take_while(|&(&c, &t)| !t && is_token(c))
        .count();
    let s = &b[start..start + run];
    KEY_SHAPES.iter().find_map(|k| {
        let rest = s.strip_prefix(k.prefix)?;
        k.rest_len(rest).map(|n| start + k.prefix.len() + n)
    })
}

/// Runs of digit groups joined by single spaces or dashes (a group longer than six digits is
/// not joined to its neighbours): card-shaped (13 to 19 digits, one kind of separator, a first
/// group of four) or SSN-shaped (`ddd-dd-dddd`). A run may touch letters and punctuation, but
/// not `@`, nor a `.` joining it to more digits, nor be inside a UUID-shaped or hash-like token
/// (see [`in_identifier`]).
fn digit_run_candidates(b: &[u8], taken: &[bool]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let free_digit = |i: usize| i < b.len() && !taken[i] && b[i].is_ascii_digit();
    let mut i = 0;
    while i < b.len() {
        if !free_digit(i) {
            i += 1;
            continue;
        }
        let start = i;
        let group_end = |mut j: usize| {
            while free_digit(j) {
                j += 1;
            }
            j
        };
        let mut group = (start, group_end(start));
        let mut end = group.1;
        // Groups of up to six digits join across one separator ("4111 1111 ..."); longer groups
        // stand alone, so two card numbers in a row are two runs.
        while end < b.len() && matches!(b[end], b' ' | b'-') && free_digit(end + 1) {
            let next = (end + 1, group_end(end + 1));
            if group.1 - group.0 > 6 || next.1 - next.0 > 6 {
                break;
            }
            group = next;
            end = next.1;
        }
        i = end;
        let decimal_dot = |j: usize| b[j] == b'.';
        let left_ok = start == 0
            || !(b[start - 1] == b'@'
                || (decimal_dot(start - 1) && start > 1 && b[start - 2].is_ascii_digit()));
        let right_ok = end == b.len()
            || !(b[end] == b'@'
                || (decimal_dot(end) && end + 1 < b.len() && b[end + 1].is_ascii_digit()));
        if !(left_ok && right_ok) {
            continue;
        }
        let run = &b[start..end];
        let kind = if card_shaped(run) {
            Kind::Card
        } else if ssn_shaped(run) {
            Kind::Ssn
        } else {
            continue;
        };
        if in_identifier(b, taken, start, end) {
            continue;
        }
        out.push(Candidate { start, end, kind });
    }
    out
}

/// Whether `b[start..end]` lies in a token (a run of token bytes outside `taken`) that is an
/// identifier, not text around a value: UUID-shaped (8-4-4-4-12 letters and digits), or 20 or
/// more bytes whose letters and digits change places six or more times (a hex hash, a random
/// id; a word run into a number changes once or twice). Decided on character classes only, so
/// it reads the same on tokenized text.
fn in_identifier(b: &[u8], taken: &[bool], start: usize, end: usize) -> bool {
    let mut s = start;
    while s > 0 && !taken[s - 1] && is_token(b[s - 1]) {
        s -= 1;
    }
    let mut e = end;
    while e < b.len() && !taken[e] && is_token(b[e]) {
        e += 1;
    }
    let tok = &b[s..e];
    let uuid_shaped = tok.len() == 36
        && tok.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_alphanumeric()
            }
        });
    if uuid_shaped {
        return true;
    }
    if tok.len() < 20 {
        return false;
    }
    let switches = tok
        .iter()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(u8::is_ascii_digit)
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] != w[1])
        .count();
    switches >= 6
}

/// Maximal runs of token bytes outside `taken`, at least [`ENTROPY_MIN_LEN`] long, that contain
/// a letter, not touching `@` or a `.` that joins them to more token bytes (those belong to
/// hostnames and addresses): candidates for the high-entropy rule.
fn token_candidates(b: &[u8], taken: &[bool]) -> Vec<Candidate> {
    let mut out = Vec::new();
    let free_token = |i: usize| !taken[i] && is_token(b[i]);
    let mut i = 0;
    while i < b.len() {
        if !free_token(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && free_token(i) {
            i += 1;
        }
        let end = i;
        // A `.` between token bytes joins hostname labels; a `.` ending a sentence does not.
        let left = start > 0
            && (b[start - 1] == b'@'
                || (b[start - 1] == b'.' && start > 1 && is_token(b[start - 2])));
        let right = end < b.len()
            && (b[end] == b'@' || (b[end] == b'.' && end + 1 < b.len() && is_token(b[end + 1])));
        if left || right {
            continue;
        }
        if end - start >= ENTROPY_MIN_LEN && b[start..end].iter().any(u8::is_ascii_alphabetic) {
            out.push(Candidate {
                start,
                end,
                kind: Kind::ApiKey,
            });
        }
    }
    out
}

/// 13 to 19 digits, in one piece or in groups with one kind of separator whose first group is
/// four digits (`4111 1111 1111 1111`, `3782 822463 10005`).
fn card_shaped(run: &[u8]) -> bool {
    let digits = run.iter().filter(|c| c.is_ascii_digit()).count();
    let mut seps = run.iter().filter(|c| !c.is_ascii_digit());
    let grouped_ok = match seps.next() {
        Some(first) => {
            seps.all(|s| s == first) && run.iter().position(|c| !c.is_ascii_digit()) == Some(4)
        }
        None => true,
    };
    (13..=19).contains(&digits) && grouped_ok
}

fn ssn_shaped(run: &[u8]) -> bool {
    run.len() == 11
        && run.iter().enumerate().all(|(i, c)| {
            if i == 3 || i == 6 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

/// The digits of `s` as numbers 0 to 9, separators dropped.
pub(crate) fn digits_of(s: &[u8]) -> Vec<u8> {
    s.iter()
        .filter(|c| c.is_ascii_digit())
        .map(|c| c - b'0')
        .collect()
}

/// Whether `digits` (0 to 9 each) pass the Luhn check.
pub(crate) fn luhn_valid(digits: &[u8]) -> bool {
    !digits.is_empty() && luhn_sum(digits, false).is_multiple_of(10)
}

/// The Luhn check digit to append to `payload`.
pub(crate) fn luhn_check_digit(payload: &[u8]) -> u8 {
    ((10 - luhn_sum(payload, true) % 10) % 10) as u8
}

/// Luhn sum from the right; `doubling_first` when the rightmost digit is doubled (a payload
/// that the check digit will follow).
fn luhn_sum(digits: &[u8], doubling_first: bool) -> u32 {
    digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if (i % 2 == 0) == doubling_first {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum()
}

/// A range of issuer prefixes of one card network and the card lengths it issues there.
struct IinRange {
    /// The lowest and highest prefix, both `digits` long.
    low: u32,
    high: u32,
    digits: usize,
    /// Bit `n` set: the network issues `n`-digit numbers in this range.
    lengths: u32,
}

/// Bits `low..=high`.
const fn lengths(low: u32, high: u32) -> u32 {
    let mut m = 0;
    let mut n = low;
    while n <= high {
        m |= 1 << n;
        n += 1;
    }
    m
}

const fn iin(low: u32, high: u32, digits: usize, lens: u32) -> IinRange {
    IinRange {
        low,
        high,
        digits,
        lengths: lens,
    }
}

/// Issuer prefixes per network, from each network's published ranges (restated here, not
/// copied from any list).
const IIN_RANGES: &[IinRange] = &[
    // Visa: everything starting with 4; 13 (old cards), 16 and 19 digits.
    iin(4, 4, 1, 1 << 13 | 1 << 16 | 1 << 19),
    // Mastercard: 51-55, and the 2-series 2221-2720; 16 digits.
    iin(51, 55, 2, 1 << 16),
    iin(2221, 2720, 4, 1 << 16),
    // American Express: 34 and 37; 15 digits.
    iin(34, 34, 2, 1 << 15),
    iin(37, 37, 2, 1 << 15),
    // Discover (and its network's partners): 6011, 644-649, 65, and the 622126-622925
    // co-branded range; 16 to 19 digits.
    iin(6011, 6011, 4, lengths(16, 19)),
    iin(644, 649, 3, lengths(16, 19)),
    iin(65, 65, 2, lengths(16, 19)),
    iin(622_126, 622_925, 6, lengths(16, 19)),
    // JCB: 3528-3589; 16 to 19 digits.
    iin(3528, 3589, 4, lengths(16, 19)),
    // Diners Club International: 300-305, 3095, 36, 38-39; 14 to 19 digits.
    iin(300, 305, 3, lengths(14, 19)),
    iin(3095, 3095, 4, lengths(14, 19)),
    iin(36, 36, 2, lengths(14, 19)),
    iin(38, 39, 2, lengths(14, 19)),
    // UnionPay: 62 and 81; 16 to 19 digits.
    iin(62, 62, 2, lengths(16, 19)),
    iin(81, 81, 2, lengths(16, 19)),
    // Maestro: 5018, 5020, 5038, 5893, 6304, 6759, 6761-6763; 12 to 19 digits (13 and up
    // here, the shortest run the scan reads as a card).
    iin(5018, 5018, 4, lengths(12, 19)),
    iin(5020, 5020, 4, lengths(12, 19)),
    iin(5038, 5038, 4, lengths(12, 19)),
    iin(5893, 5893, 4, lengths(12, 19)),
    iin(6304, 6304, 4, lengths(12, 19)),
    iin(6759, 6759, 4, lengths(12, 19)),
    iin(6761, 6763, 4, lengths(12, 19)),
    // Dankort: 5019; 16 digits.
    iin(5019, 5019, 4, 1 << 16),
    // Mir: 2200-2204; 16 to 19 digits.
    iin(2200, 2204, 4, lengths(16, 19)),
    // RuPay: 60, 65 (shared with Discover, above), 81, 82 and 508; 16 digits.
    iin(60, 60, 2, 1 << 16),
    iin(82, 82, 2, 1 << 16),
    iin(508, 508, 3, 1 << 16),
    // InstaPayment: 637-639; 16 digits.
    iin(637, 639, 3, 1 << 16),
    // Verve: 506099-506198 and 650002-650027; 16, 18 and 19 digits.
    iin(506_099, 506_198, 6, 1 << 16 | 1 << 18 | 1 << 19),
    iin(650_002, 650_027, 6, 1 << 16 | 1 << 18 | 1 << 19),
    // Troy: 9792; 16 digits.
    iin(9792, 9792, 4, 1 << 16),
];

/// Whether the number starts with an issuer prefix of a card network (see [`IIN_RANGES`]) and
/// has a length that network issues there.
pub(crate) fn known_iin(digits: &[u8]) -> bool {
    let len = digits.len();
    if len >= 32 {
        return false;
    }
    IIN_RANGES.iter().any(|r| {
        let lead = digits
            .iter()
            .take(r.digits)
            .fold(0u32, |a, &d| a * 10 + u32::from(d));
        r.lengths & (1 << len) != 0 && (r.low..=r.high).contains(&lead)
    })
}

/// Whether a card-shaped run is a card number: Luhn-valid with a known IIN.
pub(crate) fn valid_card(run: &[u8]) -> bool {
    let d = digits_of(run);
    card_shaped(run) && luhn_valid(&d) && known_iin(&d)
}

/// Whether `ddd-dd-dddd` is an SSN that can be issued: area not 000, 666 or 900-999, group not
/// 00, serial not 0000, and not one digit repeated.
pub(crate) fn valid_ssn(run: &[u8]) -> bool {
    if !ssn_shaped(run) {
        return false;
    }
    valid_ssn_digits(&digits_of(run))
}

/// [`valid_ssn`] on the nine digits alone.
pub(crate) fn valid_ssn_digits(d: &[u8]) -> bool {
    if d.len() != 9 {
        return false;
    }
    let num = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let (area, group, serial) = (num(0..3), num(3..5), num(5..9));
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !d.iter().all(|&x| x == d[0])
}

/// Whether `s` is exactly one well-formed address (what the scan yields as emails).
#[cfg(test)]
pub(crate) fn valid_email(s: &[u8]) -> bool {
    let c = email_candidates(s);
    c.len() == 1 && c[0].start == 0 && c[0].end == s.len()
}

/// How a token is recognised as a key: the length of its vendor prefix, or `Some(0)` for the
/// high-entropy rule. `context` is text the caller knows precedes it (a JSON member name).
pub(crate) fn key_prefix_len(text: &[u8], c: Candidate, context: &str) -> Option<usize> {
    let tok = &text[c.start..c.end];
    if let Some(p) = known_prefix(tok) {
        return Some(p);
    }
    // A UUID is an identifier (request, trace and object ids fill logs and JSON, and a keyword
    // such as a service called `api` is often near one), not a secret of unknown format.
    if is_uuid(tok) {
        return None;
    }
    let len_ok = (ENTROPY_MIN_LEN..=ENTROPY_MAX_LEN).contains(&tok.len());
    let classes_ok = tok.iter().any(u8::is_ascii_alphabetic) && tok.iter().any(u8::is_ascii_digit);
    if !(len_ok && classes_ok) {
        return None;
    }
    let hex = tok.iter().all(u8::is_ascii_hexdigit);
    let bits = entropy_bits(tok);
    if bits < if hex { 3.0 } else { 3.5 } {
        return None;
    }
    let window = &text[c.start.saturating_sub(KEYWORD_WINDOW)..c.start];
    (has_keyword(window) || has_keyword(context.as_bytes())).then_some(0)
}

/// The length of the provider prefix of `tok`, if all of `tok` is a key of that provider's
/// shape.
pub(crate) fn known_prefix(tok: &[u8]) -> Option<usize> {
    KEY_SHAPES.iter().find_map(|k| {
        let rest = tok.strip_prefix(k.prefix)?;
        (k.rest_len(rest)? == rest.len()).then_some(k.prefix.len())
    })
}

/// Whether `tok` is a UUID in its canonical form: 8-4-4-4-12 hex digits.
fn is_uuid(tok: &[u8]) -> bool {
    tok.len() == 36
        && tok.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn has_keyword(window: &[u8]) -> bool {
    let lower = window.to_ascii_lowercase();
    KEYWORDS
        .iter()
        .any(|k| lower.windows(k.len()).any(|w| w == *k))
}

/// Shannon entropy of the bytes of `tok`, in bits per byte.
fn entropy_bits(tok: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    tok.iter().for_each(|&c| counts[usize::from(c)] += 1);
    let n = tok.len() as f64;
    counts
        .iter()
        .filter(|&&k| k > 0)
        .map(|&k| {
            let p = f64::from(k) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(Kind, String)> {
        let b = text.as_bytes();
        scan(text, |t, c| match c.kind {
            Kind::Card => valid_card(&t.as_bytes()[c.start..c.end]),
            Kind::Ssn => valid_ssn(&t.as_bytes()[c.start..c.end]),
            _ => true,
        })
        .into_iter()
        .filter(|c| c.kind != Kind::ApiKey || key_prefix_len(b, *c, "").is_some())
        .map(|c| (c.kind, text[c.start..c.end].to_string()))
        .collect()
    }

    #[test]
    fn luhn_and_check_digit() {
        assert!(luhn_valid(&digits_of(b"4111111111111111")));
        assert!(!luhn_valid(&digits_of(b"4111111111111112")));
        assert_eq!(luhn_check_digit(&digits_of(b"411111111111111")), 1);
        assert_eq!(luhn_check_digit(&digits_of(b"7992739871")), 3);
    }

    #[test]
    fn finds_each_kind() {
        let text = "card 4111-1111-1111-1111, ssn 123-45-6789, mail jane.doe@example.com, \
                    key ghp_abcdefghijklmnopqrstuvwxyz0123456789 and AKIAIOSFODNN7EXAMPLE.";
        let found = kinds(text);
        let got: Vec<_> = found.iter().map(|(k, s)| (*k, s.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Kind::Card, "4111-1111-1111-1111"),
                (Kind::Ssn, "123-45-6789"),
                (Kind::Email, "jane.doe@example.com"),
                (Kind::ApiKey, "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
                (Kind::ApiKey, "AKIAIOSFODNN7EXAMPLE"),
            ]
        );
    }

    #[test]
    fn rejects_invalid_ssns() {
        for s in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "111-11-1111",
            "123456789",
            "123-456-789",
        ] {
            assert!(!valid_ssn(s.as_bytes()), "{s}");
        }
        assert!(valid_ssn(b"078-05-1120"));
        assert!(kinds("id 000-12-3456 here").is_empty());
    }

    #[test]
    fn rejects_non_cards() {
        // Luhn-valid but no known IIN; known IIN but not Luhn-valid; a word touching it.
        assert!(!valid_card(b"1234567812345670"));
        assert!(!valid_card(b"4111111111111112"));
        // A decimal point, an `@` or a UUID or hash around the digits: not a card.
        assert!(kinds("1.4111111111111111").is_empty());
        assert!(kinds("4111111111111111.5").is_empty());
        assert!(kinds("user@4111111111111111").is_empty());
        assert!(kinds("id 1234567a-4111-1111-1111-1111a0b1c2d3").is_empty());
        assert!(kinds("sha a1b2c3d4e5f64111111111111111a1b2c3d4e5f6").is_empty());
        // Grouped digits start with a group of four.
        assert!(kinds("41 1111 1111 1111 11").is_empty());
        assert!(kinds("4111-1111 1111-1111").is_empty());
        assert_eq!(kinds("4111 1111 1111 1111").len(), 1);
    }

    #[test]
    fn emails_need_a_real_domain() {
        assert!(valid_email(b"a.b+c@mail.example.org"));
        for s in [
            "a@b", "a@b.c", "a@b.c0m", ".@b.com", "a.@b.com", "a@-b.com", "a@b..com",
        ] {
            assert!(!valid_email(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn entropy_rule_needs_a_keyword() {
        let tok = "q8Zr2LmX0pW7vT4kN9sB1yH6";
        assert!(kinds(&format!("value {tok} here")).is_empty());
        assert_eq!(kinds(&format!("api_key = {tok}")).len(), 1);
        // Low entropy is not a secret even next to a keyword.
        assert!(kinds("token aaaaaaaaaaaaaaaaaaaaaaaa1").is_empty());
        // Nor is a UUID (an identifier); a token of the same length and alphabet still is.
        let uuid = "14bdba4a-3779-4113-9076-029a694a531e";
        assert!(is_uuid(uuid.as_bytes()));
        assert!(kinds(&format!("INFO auth GET /v1/orders req_id={uuid}")).is_empty());
        let not_uuid = "14bdba4a3-779-4113-9076-029a694a531e";
        assert!(!is_uuid(not_uuid.as_bytes()));
        assert_eq!(kinds(&format!("auth_token={not_uuid}")).len(), 1);
    }

    #[test]
    fn short_keys_are_not_candidates() {
        let key = "xoxb-0123456789";
        assert_eq!(known_prefix(key.as_bytes()), Some(5));
        let b = format!("x {key} {}", &key[..14]);
        let c = key_shape_candidates(b.as_bytes(), &vec![false; b.len()]);
        assert_eq!(c.len(), 1);
        assert_eq!(&b[c[0].start..c[0].end], key);
        // Runs shorter than the entropy rule's minimum are not candidates either.
        let t = format!("a {} b", "q8Zr2LmX0pW7vT4kN9s");
        assert!(token_candidates(t.as_bytes(), &vec![false; t.len()]).is_empty());
    }

    #[test]
    fn aws_ids_are_upper_only() {
        assert_eq!(known_prefix(b"AKIAIOSFODNN7EXAMPLE"), Some(4));
        assert_eq!(known_prefix(b"AKIAiosfodnn7example"), None);
        assert_eq!(known_prefix(b"AKIAIOSFODNN7EXAMPLEX"), None);
    }
}
