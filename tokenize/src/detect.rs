//! Detectors: find card numbers, US SSNs, email addresses and API keys in text, in linear time.
//!
//! Scanning works on the bytes of a `&str`. Every byte the detectors care about is ASCII, and a
//! byte of a multi-byte UTF-8 character (`>= 0x80`) is never in any of their classes, so every
//! span starts and ends on a character boundary.
//!
//! A scan yields *candidates by shape*; the [`Tokenizer`](super::Tokenizer) decides which ones it
//! acts on: while tokenizing, the strict validators below (Luhn and IIN, SSN ranges, key prefixes
//! or entropy with a keyword nearby); while detokenizing, whether the candidate is a surrogate it
//! issued. Shapes only depend on character classes that every surrogate keeps (digits stay digits,
//! letters and digits stay letters and digits, every other byte stays itself), which is what makes
//! the candidates of a tokenized text line up with the surrogates in it.
//!
//! Known limits: card numbers grouped by spaces and written one after another with a single
//! space between them read as one run and are not detected; so are card digits directly after
//! a short number ("call 555 1234 4111 ..."). A card number or SSN inside a word or token is not
//! one. JWTs and other `.`-joined tokens are seen segment by segment.
//!
//! The rules are our own, written from the public formats (ISO/IEC 7812 IINs, the SSA's SSN
//! randomization rules, RFC 5321 address shape, each vendor's documented key prefix).

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

/// A vendor prefix and how many letters and digits must follow it (`exact` for fixed lengths).
struct KeyPrefix {
    prefix: &'static [u8],
    min_rest: usize,
    exact: bool,
    /// Only `A-Z0-9` may follow (AWS access key ids).
    upper_only: bool,
}

const fn prefix(prefix: &'static [u8], min_rest: usize) -> KeyPrefix {
    KeyPrefix {
        prefix,
        min_rest,
        exact: false,
        upper_only: false,
    }
}

/// Known key prefixes, longest first where one is a prefix of another.
const KEY_PREFIXES: &[KeyPrefix] = &[
    prefix(b"github_pat_", 30),
    prefix(b"sk-proj-", 20),
    prefix(b"sk-ant-", 20),
    prefix(b"sk_live_", 20),
    prefix(b"sk_test_", 20),
    prefix(b"rk_live_", 20),
    prefix(b"sk-", 20),
    prefix(b"ghp_", 30),
    prefix(b"gho_", 30),
    prefix(b"ghu_", 30),
    prefix(b"ghs_", 30),
    prefix(b"ghr_", 30),
    prefix(b"glpat-", 20),
    prefix(b"xoxb-", 10),
    prefix(b"xoxp-", 10),
    prefix(b"xoxa-", 10),
    prefix(b"xoxr-", 10),
    prefix(b"xoxs-", 10),
    prefix(b"xapp-", 10),
    prefix(b"npm_", 30),
    prefix(b"hf_", 30),
    prefix(b"AIza", 30),
    KeyPrefix {
        prefix: b"AKIA",
        min_rest: 16,
        exact: true,
        upper_only: true,
    },
    KeyPrefix {
        prefix: b"ASIA",
        min_rest: 16,
        exact: true,
        upper_only: true,
    },
];

/// The shortest token that can be a key: the shortest vendor prefix plus its letters and digits,
/// or the entropy rule's minimum. Shorter token runs are not candidates (most words), which
/// keeps the scan fast; an API-key surrogate is as long as its key, so none is missed on the way
/// out either.
const MIN_KEY_LEN: usize = {
    let mut m = ENTROPY_MIN_LEN;
    let mut i = 0;
    while i < KEY_PREFIXES.len() {
        let n = KEY_PREFIXES[i].prefix.len() + KEY_PREFIXES[i].min_rest;
        if n < m {
            m = n;
        }
        i += 1;
    }
    m
};

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// A byte of an API key or token.
pub(crate) fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
}

/// Bytes that may not touch a digit run (it would be part of a word or a token).
fn blocks_digit_run(b: u8) -> bool {
    is_token(b) || b == b'@'
}

/// All candidates in `text`, sorted and not overlapping: emails first, then digit runs (card or
/// SSN shaped) outside emails that `claim` keeps, then token runs outside both.
///
/// `claim(text, candidate)` says whether the caller acts on an email or digit-run candidate
/// (acted-on candidates hide their bytes from the later steps). Token runs long enough to be a key are all returned.
pub(crate) fn scan(text: &str, mut claim: impl FnMut(&str, Candidate) -> bool) -> Vec<Candidate> {
    let b = text.as_bytes();
    let mut taken = vec![false; b.len()];
    let mut out = Vec::new();

    for c in email_candidates(b) {
        if claim(text, c) {
            taken[c.start..c.end].iter_mut().for_each(|t| *t = true);
            out.push(c);
        }
    }
    for c in digit_run_candidates(b, &taken) {
        if claim(text, c) {
            taken[c.start..c.end].iter_mut().for_each(|t| *t = true);
            out.push(c);
        }
    }
    out.extend(token_candidates(b, &taken));
    out.sort_by_key(|c| c.start);
    out
}

/// Email-shaped spans: `local@domain`, local part of at most 64 bytes not starting or ending in
/// `.`, a domain of two or more labels whose last label is 2 or more letters.
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
        while start < at && b[start] == b'.' {
            start += 1;
        }
        if start == at || at - start > 64 || b[at - 1] == b'.' {
            continue;
        }
        let mut end = at + 1;
        while end < b.len() && is_domain(b[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
            end -= 1;
        }
        if !valid_domain(&b[at + 1..end]) {
            continue;
        }
        out.push(Candidate {
            start,
            end,
            kind: Kind::Email,
        });
        last_end = end;
    }
    out
}

fn valid_domain(d: &[u8]) -> bool {
    if d.len() > 253 {
        return false;
    }
    let labels: Vec<&[u8]> = d.split(|&c| c == b'.').collect();
    let Some(tld) = labels.last() else {
        return false;
    };
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty() && l.len() <= 63 && l.first() != Some(&b'-') && l.last() != Some(&b'-')
        })
        && tld.len() >= 2
        && tld.iter().all(u8::is_ascii_alphabetic)
}

/// Runs of digit groups joined by single spaces or dashes, not touching a word or token
/// (a group longer than six digits is not joined to its neighbours): card-shaped
/// (13 to 19 digits, one kind of separator) or SSN-shaped (`ddd-dd-dddd`).
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
        let left_ok = start == 0 || !(blocks_digit_run(b[start - 1]) || b[start - 1] == b'.');
        let right_ok = end == b.len() || !blocks_digit_run(b[end]);
        if !(left_ok && right_ok) {
            continue;
        }
        let run = &b[start..end];
        if card_shaped(run) {
            out.push(Candidate {
                start,
                end,
                kind: Kind::Card,
            });
        } else if ssn_shaped(run) {
            out.push(Candidate {
                start,
                end,
                kind: Kind::Ssn,
            });
        }
    }
    out
}

/// Maximal runs of token bytes outside `taken`, at least [`MIN_KEY_LEN`] long, that contain a
/// letter, not touching `@` or a `.` that joins them to more token bytes (those belong to
/// hostnames and addresses).
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
        if end - start >= MIN_KEY_LEN && b[start..end].iter().any(u8::is_ascii_alphabetic) {
            out.push(Candidate {
                start,
                end,
                kind: Kind::ApiKey,
            });
        }
    }
    out
}

fn card_shaped(run: &[u8]) -> bool {
    let digits = run.iter().filter(|c| c.is_ascii_digit()).count();
    let mut seps = run.iter().filter(|c| !c.is_ascii_digit());
    let one_kind = match seps.next() {
        Some(first) => seps.all(|s| s == first),
        None => true,
    };
    (13..=19).contains(&digits) && one_kind
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

/// Whether the number starts with an issuer prefix of a major scheme and has a length that
/// scheme issues.
pub(crate) fn known_iin(digits: &[u8]) -> bool {
    let len = digits.len();
    let lead = |n: usize| {
        digits
            .iter()
            .take(n)
            .fold(0u32, |a, &d| a * 10 + u32::from(d))
    };
    let (p1, p2, p3, p4) = (lead(1), lead(2), lead(3), lead(4));
    let visa = p1 == 4 && matches!(len, 13 | 16 | 19);
    let mastercard = ((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && len == 16;
    let amex = matches!(p2, 34 | 37) && len == 15;
    let discover =
        (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65) && (16..=19).contains(&len);
    let jcb = (3528..=3589).contains(&p4) && (16..=19).contains(&len);
    let diners =
        ((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39)) && (14..=19).contains(&len);
    let unionpay = p2 == 62 && (16..=19).contains(&len);
    let maestro = matches!(p2, 50 | 56 | 57 | 58 | 63 | 67) && (13..=19).contains(&len);
    visa || mastercard || amex || discover || jcb || diners || unionpay || maestro
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

/// The length of the known vendor prefix of a well-formed `tok`, if it has one.
pub(crate) fn known_prefix(tok: &[u8]) -> Option<usize> {
    KEY_PREFIXES.iter().find_map(|k| {
        let rest = tok.strip_prefix(k.prefix)?;
        let alnum = rest.iter().filter(|c| c.is_ascii_alphanumeric()).count();
        let ok = if k.exact {
            rest.len() == k.min_rest
        } else {
            alnum >= k.min_rest
        } && (!k.upper_only
            || rest
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()));
        ok.then_some(k.prefix.len())
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
        assert!(kinds("x4111111111111111").is_empty());
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
    fn short_tokens_are_not_candidates() {
        assert_eq!(MIN_KEY_LEN, 15);
        let key = "xoxb-0123456789";
        assert_eq!(known_prefix(key.as_bytes()), Some(5));
        let b = format!("x {key} {}", &key[..14]);
        let c = token_candidates(b.as_bytes(), &vec![false; b.len()]);
        assert_eq!(c.len(), 1);
        assert_eq!(&b[c[0].start..c[0].end], key);
    }

    #[test]
    fn aws_ids_are_upper_only() {
        assert_eq!(known_prefix(b"AKIAIOSFODNN7EXAMPLE"), Some(4));
        assert_eq!(known_prefix(b"AKIAiosfodnn7example"), None);
        assert_eq!(known_prefix(b"AKIAIOSFODNN7EXAMPLEX"), None);
    }
}
