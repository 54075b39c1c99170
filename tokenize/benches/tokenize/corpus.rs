//! The labelled corpus: deterministic (seeded) mixed prose, log and JSON-ish documents with
//! planted card numbers, SSNs, email addresses and API keys, and decoys that look like them but
//! are not (Luhn-invalid 16-digit numbers, SSNs in the never-issued ranges, order numbers,
//! UUIDs, commit hashes, phone numbers, `user@host` without a TLD, counts next to keywords).
//!
//! The ground truth is each planted value's kind and byte span. A document never splits a
//! value, and values are written between words, quotes, `=` or `: ` so that their bounds are
//! unambiguous.
//!
//! The random numbers are a hand-written SplitMix64 rather than the `rand` crate: the corpus must
//! be the same bytes for a given seed on every machine and every version, which `rand` does not
//! promise for its generators across releases, and nothing here needs more than a few lines.
//!
//! # Layout
//! - `Rng`: the SplitMix64 of `boundary.rs`, with the draws only this corpus makes.
//! - `Corpus`, `generate`: documents, ground truth and the generator per `Density`.
//! - value makers (`card`, `ssn`, `email`, `api_key`) and `decoy`.

use std::ops::Range;

use nanoclaw_tokenize::Kind;

pub use super::boundary::Rng;
use super::boundary::luhn_digits;

/// What only the main corpus draws.
impl Rng {
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn hex(&mut self, n: usize) -> String {
        self.over(b"0123456789abcdef", n)
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER_DIGITS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// How often values and decoys appear.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Density {
    /// About one planted value per 4 KB: the throughput case.
    Sparse,
    /// A planted value in about every third line.
    Dense,
}

impl Density {
    pub fn name(self) -> &'static str {
        match self {
            Density::Sparse => "sparse",
            Density::Dense => "dense",
        }
    }

    /// Per mille of segments that plant a value, and that write a decoy.
    fn rates(self) -> (u64, u64) {
        match self {
            Density::Sparse => (20, 30),
            Density::Dense => (350, 200),
        }
    }
}

/// Documents (each ends in `\n`), back to back in `text`, and the planted values.
pub struct Corpus {
    pub text: String,
    pub docs: Vec<Range<usize>>,
    pub truth: Vec<(Kind, Range<usize>)>,
}

impl Corpus {
    pub fn doc(&self, i: usize) -> &str {
        &self.text[self.docs[i].clone()]
    }
}

#[derive(Clone, Copy)]
enum Style {
    Prose,
    Log,
    Json,
}

/// Appends text and planted values, recording the values' spans.
struct Writer<'a> {
    c: &'a mut Corpus,
}

impl Writer<'_> {
    fn put(&mut self, s: &str) {
        self.c.text.push_str(s);
    }

    fn plant(&mut self, kind: Kind, v: &str) {
        let start = self.c.text.len();
        self.c.text.push_str(v);
        self.c.truth.push((kind, start..self.c.text.len()));
    }
}

/// A corpus of about `bytes` bytes (whole documents) for `seed`. The same seed and density give
/// the same documents in the same order, so a smaller corpus is a prefix of a larger one.
pub fn generate(seed: u64, density: Density, bytes: usize) -> Corpus {
    let mut rng = Rng::new(seed ^ if density == Density::Dense { 0xd3 } else { 0 });
    let mut c = Corpus {
        text: String::with_capacity(bytes + 16 * 1024),
        docs: Vec::new(),
        truth: Vec::new(),
    };
    let (hit_rate, decoy_rate) = density.rates();
    while c.text.len() < bytes {
        let start = c.text.len();
        let style = *rng.pick(&[Style::Prose, Style::Log, Style::Json]);
        let segments = rng.range(8, 60);
        let mut w = Writer { c: &mut c };
        for _ in 0..segments {
            let roll = rng.below(1000);
            if roll < hit_rate {
                plant(&mut rng, &mut w, style);
            } else if roll < hit_rate + decoy_rate {
                let d = decoy(&mut rng);
                filler_around(&mut rng, &mut w, style, &d);
            } else {
                filler(&mut rng, &mut w, style);
            }
        }
        if !c.text.ends_with('\n') {
            c.text.push('\n');
        }
        c.docs.push(start..c.text.len());
    }
    c
}

const WORDS: &[&str] = &[
    "the",
    "report",
    "shows",
    "that",
    "our",
    "team",
    "shipped",
    "a",
    "new",
    "build",
    "on",
    "Tuesday",
    "and",
    "customers",
    "asked",
    "for",
    "refunds",
    "after",
    "delays",
    "in",
    "the",
    "warehouse",
    "we",
    "will",
    "review",
    "every",
    "order",
    "before",
    "Friday",
    "please",
    "check",
    "with",
    "support",
    "if",
    "anything",
    "looks",
    "wrong",
    "meeting",
    "notes",
    "from",
    "café",
    "Zürich",
    "résumé",
    "naïve",
    "–",
    "budget",
    "forecast",
    "is",
    "up",
    "12",
    "percent",
    "this",
    "quarter",
    "while",
    "costs",
    "fell",
    "by",
    "3.5",
    "points",
    "key",
    "results",
    "token",
    "ring",
    "version",
    "2",
    "of",
    "the",
    "API",
    "docs",
    "draft",
    "sent",
    "to",
    "legal",
];

fn sentence(rng: &mut Rng) -> String {
    let n = rng.range(6, 16) as usize;
    let mut s = String::new();
    for i in 0..n {
        let w = *rng.pick(WORDS);
        if i == 0 {
            let mut cs = w.chars();
            if let Some(f) = cs.next() {
                s.extend(f.to_uppercase());
                s.push_str(cs.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
    }
    s.push('.');
    s
}

fn uuid(rng: &mut Rng) -> String {
    format!(
        "{}-{}-4{}-{}{}-{}",
        rng.hex(8),
        rng.hex(4),
        rng.hex(3),
        rng.pick(&["8", "9", "a", "b"]),
        rng.hex(3),
        rng.hex(12)
    )
}

fn timestamp(rng: &mut Rng) -> String {
    format!(
        "2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        rng.range(1, 12),
        rng.range(1, 28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1000)
    )
}

const SERVICES: &[&str] = &["api", "billing", "auth", "search", "worker", "gateway"];
const MESSAGES: &[&str] = &[
    "GET /v1/orders 200",
    "POST /v1/session 201",
    "cache miss for user 48213",
    "retrying upstream after 503",
    "job finished in 1.27 s",
    "connection reset by peer",
    "GET /healthz 200",
];

fn log_prefix(rng: &mut Rng) -> String {
    let level = *rng.pick(&["INFO", "INFO", "INFO", "WARN", "DEBUG"]);
    format!("{} {level} {} ", timestamp(rng), rng.pick(SERVICES))
}

fn filler(rng: &mut Rng, w: &mut Writer, style: Style) {
    match style {
        Style::Prose => {
            w.put(&sentence(rng));
            w.put(if rng.chance(200) { "\n" } else { " " });
        }
        Style::Log => {
            let line = format!(
                "{}{} req_id={} dur_ms={}\n",
                log_prefix(rng),
                rng.pick(MESSAGES),
                uuid(rng),
                rng.range(1, 2000)
            );
            w.put(&line);
        }
        Style::Json => {
            let line = format!(
                "{{\"id\": {}, \"status\": \"{}\", \"sku\": \"SKU-{}-{}\", \"updated_at\": \"{}\", \
                 \"note\": \"{}\"}}\n",
                rng.range(1000, 999_999),
                rng.pick(&["shipped", "pending", "refunded", "open"]),
                rng.digits(5),
                rng.pick(&["A", "B", "XL"]),
                timestamp(rng),
                sentence(rng)
            );
            w.put(&line);
        }
    }
}

/// A decoy written where the style puts a value.
fn filler_around(rng: &mut Rng, w: &mut Writer, style: Style, d: &str) {
    let line = match style {
        Style::Prose => format!("{} See {d} for details. ", sentence(rng)),
        Style::Log => format!("{}ref={d} status=ok\n", log_prefix(rng)),
        Style::Json => format!("{{\"ref\": \"{d}\", \"kind\": \"lookup\"}}\n"),
    };
    w.put(&line);
}

/// Text that looks like a value but is none.
fn decoy(rng: &mut Rng) -> String {
    match rng.below(11) {
        0 | 1 => {
            // A 16-digit number with a card's IIN that fails Luhn.
            let mut d = luhn_digits(rng, "4", 16);
            let last = d.pop().map_or(0, |c| c - b'0');
            d.push(b'0' + (last + rng.range(1, 9) as u8) % 10);
            let sep = *rng.pick(&["", " ", "-"]);
            group(&d, &[4, 4, 4, 4], sep)
        }
        2 => {
            // Never-issued SSN ranges.
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
            format!("{a}-{g:02}-{s:04}")
        }
        3 => format!("ORD-2026-{}", rng.digits(6)),
        4 => {
            let n = rng.range(9, 12) as usize;
            format!("#{}", rng.digits(n))
        }
        5 => uuid(rng),
        6 => format!("commit {}", rng.hex(40)),
        7 => format!("+1 {}-555-{}", rng.range(201, 989), rng.digits(4)),
        8 => format!("deploy@build-{}", rng.range(1, 40)),
        9 => format!("token_count={}", rng.range(100, 99_999)),
        _ => format!("key-{}", rng.digits(8)),
    }
}

fn plant(rng: &mut Rng, w: &mut Writer, style: Style) {
    let kind = *rng.pick(&[Kind::Card, Kind::Ssn, Kind::Email, Kind::ApiKey]);
    let (label, value, json_key) = match kind {
        Kind::Card => ("card", card(rng), "card_number"),
        Kind::Ssn => ("ssn", ssn(rng), "ssn"),
        Kind::Email => ("user", email(rng), "email"),
        Kind::ApiKey => return plant_key(rng, w, style),
    };
    match style {
        Style::Prose => {
            let (before, after) = match kind {
                Kind::Card => ("Please charge the card ", " for the invoice. "),
                Kind::Ssn => ("The applicant's SSN is ", " per the form. "),
                _ => ("Write to ", " if the order is late. "),
            };
            w.put(&sentence(rng));
            w.put(" ");
            w.put(before);
            w.plant(kind, &value);
            w.put(after);
        }
        Style::Log => {
            w.put(&log_prefix(rng));
            w.put(label);
            w.put("=");
            w.plant(kind, &value);
            w.put(&format!(" dur_ms={}\n", rng.range(1, 2000)));
        }
        Style::Json => {
            w.put(&format!(
                "{{\"id\": {}, \"{json_key}\": \"",
                rng.range(1000, 999_999)
            ));
            w.plant(kind, &value);
            w.put("\", \"verified\": true}\n");
        }
    }
}

fn plant_key(rng: &mut Rng, w: &mut Writer, style: Style) {
    let (name, value, vendor) = api_key(rng);
    match (style, vendor) {
        (Style::Prose, true) => {
            w.put(&sentence(rng));
            w.put(" Use ");
            w.plant(Kind::ApiKey, &value);
            w.put(" for the staging run. ");
        }
        (Style::Prose, false) => {
            w.put(&sentence(rng));
            w.put(&format!(" The {name} is "));
            w.plant(Kind::ApiKey, &value);
            w.put(" for now. ");
        }
        (Style::Log, _) if rng.chance(400) => {
            w.put(&log_prefix(rng));
            w.put("upstream request Authorization: Bearer ");
            w.plant(Kind::ApiKey, &value);
            w.put("\n");
        }
        (Style::Log, _) => {
            w.put(&log_prefix(rng));
            w.put(&format!("loaded {name}="));
            w.plant(Kind::ApiKey, &value);
            w.put("\n");
        }
        (Style::Json, _) => {
            w.put(&format!(
                "{{\"service\": \"{}\", \"{name}\": \"",
                rng.pick(SERVICES)
            ));
            w.plant(Kind::ApiKey, &value);
            w.put("\"}\n");
        }
    }
}

/// `digits` grouped by `sizes` with `sep` between groups.
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

/// A Luhn-valid card number of a real scheme, with or without spaces or dashes.
pub fn card(rng: &mut Rng) -> String {
    let mc2 = (2221 + rng.below(500)).to_string();
    let mc5 = (51 + rng.below(5)).to_string();
    let jcb = (3528 + rng.below(62)).to_string();
    let amex = rng.pick(&["34", "37"]).to_string();
    let (iin, len, sizes): (&str, usize, &[usize]) = match rng.below(9) {
        0..=2 => ("4", 16, &[4, 4, 4, 4]),
        3 => ("4", 13, &[4, 4, 5]),
        4 => (&mc5, 16, &[4, 4, 4, 4]),
        5 => (&mc2, 16, &[4, 4, 4, 4]),
        6 => (&amex, 15, &[4, 6, 5]),
        7 => ("6011", 16, &[4, 4, 4, 4]),
        _ => (&jcb, 16, &[4, 4, 4, 4]),
    };
    let d = luhn_digits(rng, iin, len);
    let sep = *rng.pick(&["", "", " ", "-"]);
    group(&d, sizes, sep)
}

/// A US SSN in an issued range, `ddd-dd-dddd`.
pub fn ssn(rng: &mut Rng) -> String {
    loop {
        let area = rng.range(1, 899);
        if area == 666 {
            continue;
        }
        let s = format!(
            "{area:03}-{:02}-{:04}",
            rng.range(1, 99),
            rng.range(1, 9999)
        );
        let mut d = s.bytes().filter(u8::is_ascii_digit);
        let first = d.next();
        if d.all(|x| Some(x) == first) {
            continue;
        }
        return s;
    }
}

const FIRST: &[&str] = &[
    "jane", "omar", "li", "maria", "tom", "aiko", "sven", "priya",
];
const LAST: &[&str] = &[
    "doe", "haddad", "wei", "garcia", "baker", "tanaka", "berg", "iyer",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "acme.io",
    "corp.example.co.uk",
    "gmail.com",
    "uni-example.edu",
];

/// An email address.
pub fn email(rng: &mut Rng) -> String {
    let (f, l) = (*rng.pick(FIRST), *rng.pick(LAST));
    let local = match rng.below(4) {
        0 => format!("{f}.{l}"),
        1 => format!("{}{l}", &f[..1]),
        2 => format!("{f}_{l}+{}", rng.pick(&["billing", "news", "x"])),
        _ => format!("{f}{}", rng.range(1, 999)),
    };
    format!("{local}@{}", rng.pick(DOMAINS))
}

/// An API key: the member or variable name it goes with, the key, and whether it has a vendor
/// prefix (otherwise it is found by entropy next to a keyword).
pub fn api_key(rng: &mut Rng) -> (&'static str, String, bool) {
    match rng.below(8) {
        0 => ("openai_key", format!("sk-{}", rng.over(ALNUM, 48)), true),
        1 => (
            "openai_key",
            format!("sk-proj-{}", rng.over(ALNUM, 56)),
            true,
        ),
        2 => ("github_token", format!("ghp_{}", rng.over(ALNUM, 36)), true),
        3 => (
            "slack_token",
            format!(
                "xoxb-{}-{}-{}",
                rng.digits(12),
                rng.digits(13),
                rng.over(ALNUM, 24)
            ),
            true,
        ),
        4 => (
            "aws_access_key_id",
            format!("AKIA{}", rng.over(UPPER_DIGITS, 16)),
            true,
        ),
        n => {
            let name = *rng.pick(&["api_key", "client_secret", "auth_token"]);
            let len = if n == 5 { 32 } else { 40 };
            loop {
                let k = rng.over(ALNUM, len);
                let b = k.as_bytes();
                if b.iter().any(u8::is_ascii_digit) && b.iter().any(u8::is_ascii_alphabetic) {
                    return (name, k, false);
                }
            }
        }
    }
}
