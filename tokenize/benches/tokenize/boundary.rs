//! The boundary corpus: every kind of value written after and before each punctuation mark a
//! user's text puts around it (`.`, `,`, `-`, `:`, `=`, brackets, quotes, `/`, a space) and run
//! into a word on either side; and a look-alike set (order numbers that fail Luhn, UUIDs,
//! commit hashes, dates, phone numbers, never-issued SSNs, words that start like a provider
//! key) in the same places, of which none may be detected.
//!
//! Deterministic: a seed gives the same samples on every machine (a hand-written SplitMix64, here
//! so that this file also builds into the crate's tests, which have no access to the bench's
//! other modules; the bench's `corpus.rs` uses this `Rng` and `luhn_digits` too). Used by the crate's tests (`src/tests.rs`, which asserts the figures)
//! and by the bench (which prints them).
//!
//! Emails are written after and before punctuation but not run into words: an address's local
//! part can be any word, so `mailjane@example.com` is one address (a documented limit).

use std::ops::Range;

use super::Kind;

/// SplitMix64 (Steele, Lea, Flood 2014).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub(crate) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    pub(crate) fn over(&mut self, alphabet: &[u8], n: usize) -> String {
        (0..n).map(|_| char::from(*self.pick(alphabet))).collect()
    }

    pub(crate) fn digits(&mut self, n: usize) -> String {
        self.over(b"0123456789", n)
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
const HEX: &[u8] = b"0123456789abcdef";

/// What goes right before a value (after a word), and right after it (before a word).
pub const BEFORE: &[&str] = &[" ", ".", ",", "-", ":", "=", "(", "\"", "'", "/", ""];
pub const AFTER: &[&str] = &[" ", ".", ",", "-", ":", "=", ")", "\"", "'", "/", ""];

/// One planted value in its own short text.
pub struct Sample {
    pub kind: Kind,
    pub text: String,
    pub value: Range<usize>,
    /// What surrounds it, for failure messages (`"-"` before, `")"` after, `""` a word).
    pub before: &'static str,
    pub after: &'static str,
}

/// One look-alike in its own short text: nothing in it is a sensitive value.
pub struct LookAlike {
    pub what: &'static str,
    pub text: String,
}

/// Words the text around a value starts and ends with; a run-in (`""`) glues the value to
/// them.
const LEAD: &[&str] = &["see", "order", "ssn", "token", "ref", "Total"];
const TRAIL: &[&str] = &["next", "and", "th", "ok", "x"];
/// Words around look-alikes: none is a keyword of the high-entropy key rule (a hash after
/// `token=` may well be a secret).
const PLAIN_LEAD: &[&str] = &["see", "order", "ref", "Total", "commit", "call"];

/// `per_pair` values of each kind for every (before, after) pair.
pub fn samples(seed: u64, per_pair: usize) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for kind in [Kind::Card, Kind::Ssn, Kind::Email, Kind::ApiKey] {
        for &before in BEFORE {
            for &after in AFTER {
                if kind == Kind::Email && (before.is_empty() || after.is_empty()) {
                    continue;
                }
                for _ in 0..per_pair {
                    let v = match kind {
                        Kind::Card => card(&mut rng),
                        Kind::Ssn => ssn(&mut rng),
                        Kind::Email => email(&mut rng),
                        Kind::ApiKey => api_key(&mut rng),
                    };
                    let lead = *rng.pick(LEAD);
                    let trail = *rng.pick(TRAIL);
                    let mut text = format!("{lead}{before}");
                    let start = text.len();
                    text.push_str(&v);
                    let value = start..text.len();
                    text.push_str(after);
                    text.push_str(trail);
                    out.push(Sample {
                        kind,
                        text,
                        value,
                        before,
                        after,
                    });
                }
            }
        }
    }
    out
}

/// Look-alikes, each written after and before every punctuation mark of [`BEFORE`] and
/// [`AFTER`] (not run into words: a word glued to a hash or a number makes another token).
pub fn look_alikes(seed: u64, per_pair: usize) -> Vec<LookAlike> {
    let mut rng = Rng::new(seed ^ 0x100c);
    let mut out = Vec::new();
    for &before in BEFORE.iter().filter(|b| !b.is_empty()) {
        for &after in AFTER.iter().filter(|a| !a.is_empty()) {
            for _ in 0..per_pair {
                let (what, v) = look_alike(&mut rng);
                let lead = *rng.pick(PLAIN_LEAD);
                let trail = *rng.pick(TRAIL);
                out.push(LookAlike {
                    what,
                    text: format!("{lead}{before}{v}{after}{trail}"),
                });
            }
        }
    }
    out
}

/// ASCII digits of a Luhn-valid number starting with `iin`, `len` long.
pub(crate) fn luhn_digits(rng: &mut Rng, iin: &str, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = iin.bytes().map(|c| c - b'0').collect();
    while d.len() < len - 1 {
        d.push(rng.below(10) as u8);
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 0 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    d.push(((10 - sum % 10) % 10) as u8);
    d.iter().map(|x| b'0' + x).collect()
}

fn group(digits: &[u8], sizes: &[usize], sep: &str) -> String {
    let mut s = String::new();
    let mut at = 0;
    for (i, &n) in sizes.iter().enumerate() {
        if i > 0 {
            s.push_str(sep);
        }
        s.push_str(std::str::from_utf8(&digits[at..at + n]).unwrap_or_default());
        at += n;
    }
    s
}

/// A Luhn-valid card number of one of the networks, in one piece or grouped.
fn card(rng: &mut Rng) -> String {
    let mc2 = rng.range(2221, 2720).to_string();
    let mc5 = rng.range(51, 55).to_string();
    let jcb = rng.range(3528, 3589).to_string();
    let discover = rng.range(644, 649).to_string();
    let (iin, len, sizes): (&str, usize, &[usize]) = match rng.below(10) {
        0 | 1 => ("4", 16, &[4, 4, 4, 4]),
        2 => ("4", 13, &[4, 4, 5]),
        3 => (&mc5, 16, &[4, 4, 4, 4]),
        4 => (&mc2, 16, &[4, 4, 4, 4]),
        5 => (*rng.pick(&["34", "37"]), 15, &[4, 6, 5]),
        6 => ("6011", 16, &[4, 4, 4, 4]),
        7 => (&discover, 16, &[4, 4, 4, 4]),
        8 => (&jcb, 16, &[4, 4, 4, 4]),
        _ => ("36", 14, &[4, 6, 4]),
    };
    let d = luhn_digits(rng, iin, len);
    let sep = *rng.pick(&["", "", " ", "-"]);
    group(&d, sizes, sep)
}

/// An SSN in an issued range.
fn ssn(rng: &mut Rng) -> String {
    loop {
        let area = rng.range(1, 899);
        let s = format!(
            "{area:03}-{:02}-{:04}",
            rng.range(1, 99),
            rng.range(1, 9999)
        );
        let mut d = s.bytes().filter(u8::is_ascii_digit);
        let first = d.next();
        if area != 666 && !d.all(|x| Some(x) == first) {
            return s;
        }
    }
}

fn email(rng: &mut Rng) -> String {
    let local = match rng.below(3) {
        0 => format!(
            "{}.{}",
            rng.pick(&["jane", "omar", "li"]),
            rng.pick(&["doe", "wei"])
        ),
        1 => format!("{}_{}+x", rng.pick(&["maria", "tom"]), rng.range(1, 99)),
        _ => format!("{}{}", rng.pick(&["aiko", "sven"]), rng.range(1, 999)),
    };
    let domain = *rng.pick(&[
        "example.com",
        "mail.example.org",
        "acme.io",
        "corp.example.co.uk",
    ]);
    format!("{local}@{domain}")
}

/// A key of one of the provider shapes (see `detect::KEY_SHAPES`).
fn api_key(rng: &mut Rng) -> String {
    match rng.below(16) {
        0 => format!("ghp_{}", rng.over(ALNUM, 36)),
        1 => format!(
            "{}{}",
            rng.pick(&["gho_", "ghu_", "ghs_", "ghr_"]),
            rng.over(ALNUM, 36)
        ),
        2 => format!("github_pat_{}_{}", rng.over(ALNUM, 22), rng.over(ALNUM, 59)),
        // GitLab: with `_` and `-` inside, as they often are.
        3 => {
            let mut rest = rng.over(BASE64URL, 18);
            rest.insert(rng.range(1, 17) as usize, '_');
            rest.insert(rng.range(1, 18) as usize, '-');
            format!("glpat-{rest}")
        }
        4 => format!(
            "{}{}-{}-{}",
            rng.pick(&["xoxb-", "xoxp-"]),
            rng.digits(12),
            rng.digits(13),
            rng.over(ALNUM, 24)
        ),
        5 => format!(
            "{}{}",
            rng.pick(&["sk_live_", "rk_live_", "sk_test_"]),
            rng.over(ALNUM, 99)
        ),
        6 | 7 => format!(
            "{}{}",
            rng.pick(&["AKIA", "ASIA"]),
            rng.over(UPPER_DIGITS, 16)
        ),
        8 => format!("sk-ant-api03-{}AA", rng.over(BASE64URL, 93)),
        9 => format!("sk-proj-{}", rng.over(BASE64URL, 124)),
        10 => format!("sk-{}", rng.over(ALNUM, 48)),
        11 => format!("AIza{}", rng.over(BASE64URL, 35)),
        12 => format!("npm_{}", rng.over(ALNUM, 36)),
        13 => format!("hf_{}", rng.over(ALNUM, 34)),
        14 => format!("sk-svcacct-{}", rng.over(BASE64URL, 60)),
        _ => format!(
            "xapp-1-{}-{}-{}",
            rng.over(UPPER_DIGITS, 11),
            rng.digits(13),
            rng.over(HEX, 64)
        ),
    }
}

fn uuid(rng: &mut Rng) -> String {
    format!(
        "{}-{}-4{}-{}{}-{}",
        rng.over(HEX, 8),
        rng.over(HEX, 4),
        rng.over(HEX, 3),
        rng.pick(&["8", "9", "a", "b"]),
        rng.over(HEX, 3),
        rng.over(HEX, 12)
    )
}

/// Something that looks like a value but is none, and what it is.
fn look_alike(rng: &mut Rng) -> (&'static str, String) {
    match rng.below(16) {
        0 | 1 => {
            // A card-length number with a network's IIN that fails Luhn.
            let iin = *rng.pick(&["4", "51", "37", "6011", "3530"]);
            let len = if iin == "37" { 15 } else { 16 };
            let mut d = luhn_digits(rng, iin, len);
            let last = d.pop().map_or(0, |c| c - b'0');
            d.push(b'0' + (last + rng.range(1, 9) as u8) % 10);
            let sizes: &[usize] = if len == 15 { &[4, 6, 5] } else { &[4, 4, 4, 4] };
            let sep = *rng.pick(&["", " ", "-"]);
            ("order number failing Luhn", group(&d, sizes, sep))
        }
        2 => (
            "order number",
            match rng.below(3) {
                0 => format!("ORD-2026-{}", rng.digits(6)),
                1 => {
                    let n = rng.range(9, 12) as usize;
                    format!("#{}", rng.digits(n))
                }
                // Luhn-valid, but no network issues in the 1-range.
                _ => String::from_utf8(luhn_digits(rng, "1", 16)).unwrap_or_default(),
            },
        ),
        3 | 4 => ("UUID", uuid(rng)),
        5 | 6 => (
            "commit hash",
            match rng.below(3) {
                0 => rng.over(HEX, 40),
                1 => rng.over(HEX, 7),
                _ => format!("sha256:{}", rng.over(HEX, 64)),
            },
        ),
        7 | 8 => (
            "date",
            match rng.below(4) {
                0 => format!("2026-{:02}-{:02}", rng.range(1, 12), rng.range(1, 28)),
                1 => format!("{:02}/{:02}/2026", rng.range(1, 12), rng.range(1, 28)),
                2 => format!(
                    "2026-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                    rng.range(1, 12),
                    rng.range(1, 28),
                    rng.below(24),
                    rng.below(60),
                    rng.below(60)
                ),
                _ => format!("{:02}.{:02}.2026", rng.range(1, 28), rng.range(1, 12)),
            },
        ),
        9 | 10 => {
            let (a, n) = (rng.range(201, 989), rng.digits(4));
            (
                "phone number",
                match rng.below(5) {
                    0 => format!("+1 {a}-555-{n}"),
                    1 => format!("({a}) 555-{n}"),
                    2 => format!("{a}.555.{n}"),
                    3 => format!("+44 20 7946 {n}"),
                    _ => format!("+1-{a}-555-{n}"),
                },
            )
        }
        11 | 12 => {
            let (a, g, s) = match rng.below(5) {
                0 => ("000".to_string(), rng.range(1, 99), rng.range(1, 9999)),
                1 => ("666".to_string(), rng.range(1, 99), rng.range(1, 9999)),
                2 => (
                    rng.range(900, 999).to_string(),
                    rng.range(1, 99),
                    rng.range(1, 9999),
                ),
                3 => (format!("{:03}", rng.range(1, 899)), 0, rng.range(1, 9999)),
                _ => (format!("{:03}", rng.range(1, 899)), rng.range(1, 99), 0),
            };
            ("never-issued SSN", format!("{a}-{g:02}-{s:04}"))
        }
        13 => (
            "word with a key prefix",
            (*rng.pick(&[
                "risk-assessment-framework-and-controls",
                "task-scheduler-configuration-reference",
                "desk-booking-for-the-quarterly-offsite",
                "ghp_short1",
                "sk_live_notakey",
                "AKIAshortword",
                "xoxb-12",
                "AIzaSyShort",
                "github_pat_tooShort_9",
                "glpat-abc",
            ]))
            .to_string(),
        ),
        14 => (
            "version or address",
            match rng.below(3) {
                0 => format!(
                    "v{}.{}.{}",
                    rng.range(0, 9),
                    rng.range(0, 40),
                    rng.range(0, 99)
                ),
                1 => format!(
                    "10.{}.{}.{}",
                    rng.below(256),
                    rng.below(256),
                    rng.below(256)
                ),
                _ => format!(
                    "{},{:03},{:03}.{:02}",
                    rng.range(1, 999),
                    rng.below(1000),
                    rng.below(1000),
                    rng.below(100)
                ),
            },
        ),
        _ => (
            "long number",
            // 20 or more digits: longer than any card.
            {
                let n = rng.range(20, 24) as usize;
                rng.digits(n)
            },
        ),
    }
}

/// Recall and precision of one kind's detections over the samples (a detection counts if it
/// overlaps the planted value and has its kind).
#[derive(Debug, Default, Clone, Copy)]
pub struct Figures {
    pub planted: usize,
    pub found: usize,
    pub detections: usize,
    pub true_detections: usize,
}

impl Figures {
    pub fn recall(&self) -> f64 {
        self.found as f64 / self.planted.max(1) as f64
    }

    pub fn precision(&self) -> f64 {
        if self.detections == 0 {
            return 1.0;
        }
        self.true_detections as f64 / self.detections as f64
    }
}

/// Scores `detect` (kind and byte span of each detection in a text) on `samples` for `kind`,
/// and lists the samples it missed.
pub fn score(
    samples: &[Sample],
    kind: Kind,
    detect: impl Fn(&str) -> Vec<(Kind, Range<usize>)>,
) -> (Figures, Vec<&Sample>) {
    let mut f = Figures::default();
    let mut missed = Vec::new();
    for s in samples {
        let found = detect(&s.text);
        let mut hit = false;
        for (_, r) in found.into_iter().filter(|(k, _)| *k == kind) {
            f.detections += 1;
            if s.kind == kind && r.start < s.value.end && s.value.start < r.end {
                f.true_detections += 1;
                hit = true;
            }
        }
        if s.kind == kind {
            f.planted += 1;
            if hit {
                f.found += 1;
            } else {
                missed.push(s);
            }
        }
    }
    (f, missed)
}
