//! The injected secret never reaches the agent: an upstream that echoes the credential (a
//! debugging endpoint that reflects request headers, an error page quoting them) has every
//! copy of the secret's bytes replaced by [`MARKER`] before the answer goes on.
//!
//! - Headers: every value holding the secret has it replaced ([`Redactor::header`]).
//! - Body: [`Redactor::push`] scans a stream chunk by chunk. A copy split across chunks is
//!   still found: a chunk's tail that is the start of the secret is held back until the next
//!   chunk (or [`Redactor::finish`]) shows whether the copy completes. Only such a tail waits,
//!   so an event stream whose events end in a newline still streams event by event.
//! - A compressed answer could hide the secret from the scan, so the device asks upstream for
//!   `identity` and refuses an answer that is compressed anyway (see `proxy`).
//!
//! Only the raw bytes are matched: an upstream that sends the secret transformed (base64,
//! percent-encoded, reversed) is not caught. The secret is the upstream's own credential, so such
//! an upstream is one the user already trusts with it; this closes the accidental echo.
//!
//! Hand-written rather than a crate: the replace must run over a stream with a held-back tail
//! and keep every buffer that may hold the secret zeroized, and it is a few lines; credentials
//! are short needles, so a plain scan is fast enough.

use zeroize::Zeroizing;

/// What replaces each copy of the secret.
pub const MARKER: &[u8] = b"[credential redacted by vault-device]";

/// Secrets shorter than this are not scanned for: a two-byte "secret" would redact ordinary
/// text, and a credential that short protects nothing anyway.
pub const MIN_SECRET: usize = 8;

/// Replaces the secret in one answer's headers and body stream.
pub struct Redactor {
    secret: Zeroizing<Vec<u8>>,
    held: Zeroizing<Vec<u8>>,
    /// How many copies were replaced so far.
    pub redacted: usize,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// A redactor for `secret` (inactive when it is shorter than [`MIN_SECRET`]).
    pub fn new(secret: &[u8]) -> Self {
        let secret = if secret.len() >= MIN_SECRET {
            secret.to_vec()
        } else {
            Vec::new()
        };
        Self {
            secret: Zeroizing::new(secret),
            held: Zeroizing::new(Vec::new()),
            redacted: 0,
        }
    }

    /// `value` with every copy of the secret replaced.
    pub fn header(&mut self, value: &[u8]) -> Vec<u8> {
        let (out, n) = replace_all(value, &self.secret);
        self.redacted += n;
        out
    }

    /// The next body chunk: the bytes that can go on now (the tail that could start a copy of
    /// the secret is held back).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secret.is_empty() {
            return chunk.to_vec();
        }
        // Only a held-back tail needs joining to the chunk; without one the chunk is scanned
        // where it is.
        let (mut out, n) = if self.held.is_empty() {
            replace_all(chunk, &self.secret)
        } else {
            let mut buf = Zeroizing::new(std::mem::take(&mut *self.held));
            buf.extend_from_slice(chunk);
            replace_all(&buf, &self.secret)
        };
        self.redacted += n;
        // A copy not yet complete is a tail of `out` that starts the secret; the longest such
        // tail holds every shorter one.
        let keep = (1..self.secret.len().min(out.len() + 1))
            .rev()
            .find(|&k| out[out.len() - k..] == self.secret[..k])
            .unwrap_or(0);
        let tail = out.split_off(out.len() - keep);
        *self.held = tail;
        out
    }

    /// The end of the body: what was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.held)
    }
}

/// `haystack` with every non-overlapping copy of `needle` replaced by [`MARKER`], and how many.
/// The search is `memchr::memmem` (vectorised), so scanning a body costs little more than
/// copying it.
fn replace_all(haystack: &[u8], needle: &[u8]) -> (Vec<u8>, usize) {
    if needle.is_empty() || haystack.len() < needle.len() {
        return (haystack.to_vec(), 0);
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut count = 0;
    let mut copied = 0;
    // Non-overlapping matches, left to right: the same copies the byte-wise scan replaced.
    for at in memchr::memmem::find_iter(haystack, needle) {
        out.extend_from_slice(&haystack[copied..at]);
        out.extend_from_slice(MARKER);
        copied = at + needle.len();
        count += 1;
    }
    out.extend_from_slice(&haystack[copied..]);
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"sk-live-0123456789";

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut r = Redactor::new(SECRET);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.push(c));
        }
        out.extend(r.finish());
        (out, r.redacted)
    }

    #[test]
    fn a_copy_in_one_chunk_is_replaced() {
        let (out, n) = run(&[b"auth: Bearer sk-live-0123456789 ok"]);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            [&b"auth: Bearer "[..], MARKER, b" ok"].concat(),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn a_copy_split_at_every_byte_is_still_found() {
        let text = b"x sk-live-0123456789 y sk-live-0123456789";
        for cut in 0..=text.len() {
            let (out, n) = run(&[&text[..cut], &text[cut..]]);
            assert_eq!(n, 2, "cut at {cut}");
            assert!(!out.windows(SECRET.len()).any(|w| w == SECRET));
            assert_eq!(out, [&b"x "[..], MARKER, b" y ", MARKER].concat());
        }
        // One byte at a time.
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let (out, n) = run(&chunks);
        assert_eq!(n, 2);
        assert!(!out.windows(SECRET.len()).any(|w| w == SECRET));
    }

    #[test]
    fn text_without_the_secret_passes_unchanged_and_in_full() {
        let text = b"sk-live-01234567 is a near miss, and so is sk-live-";
        let (out, n) = run(&[&text[..10], &text[10..]]);
        assert_eq!((out.as_slice(), n), (&text[..], 0));
        let (out, n) = run(&[]);
        assert_eq!((out, n), (Vec::new(), 0));
    }

    #[test]
    fn only_a_tail_that_starts_the_secret_waits() {
        let mut r = Redactor::new(SECRET);
        assert_eq!(r.push(b"data: first\n\n"), b"data: first\n\n");
        assert_eq!(r.push(b"token sk-li"), b"token ");
        assert_eq!(r.push(b"ke"), b"sk-like");
        assert_eq!(r.push(b" sk-live-0123456789"), [&b" "[..], MARKER].concat());
        assert_eq!(r.finish(), b"");
        assert_eq!(r.redacted, 1);
    }

    #[test]
    fn overlapping_and_adjacent_copies_are_replaced_left_to_right() {
        let (out, n) = replace_all(b"aaaa", b"aa");
        assert_eq!(
            (out.as_slice(), n),
            ([MARKER, MARKER].concat().as_slice(), 2)
        );
        let (out, n) = replace_all(b"aaa", b"aa");
        assert_eq!((out.as_slice(), n), ([MARKER, b"a"].concat().as_slice(), 1));
        let (out, n) = replace_all(b"xsecretsecrety", b"secret");
        assert_eq!(out, [&b"x"[..], MARKER, MARKER, b"y"].concat());
        assert_eq!(n, 2);
    }

    #[test]
    fn headers_are_redacted_and_short_secrets_are_not_scanned() {
        let mut r = Redactor::new(SECRET);
        let v = r.header(b"Bearer sk-live-0123456789");
        assert_eq!(v, [&b"Bearer "[..], MARKER].concat());
        assert_eq!(r.redacted, 1);
        let mut short = Redactor::new(b"abc");
        assert_eq!(short.push(b"abcabc"), b"abcabc");
        assert_eq!(short.redacted, 0);
    }
}
