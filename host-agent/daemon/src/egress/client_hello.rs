//! A strict parser of the first flight of a TLS connection: the records that carry the
//! ClientHello, and in it the `server_name` extension (RFC 6066) the SNI check decides on.
//!
//! Why our own: the SNI check needs about a hundred lines of TLS (record framing, handshake
//! reassembly, the ClientHello's fixed fields and the extension list) and must be *strict*
//! where general-purpose parsers are lenient: it refuses duplicate extensions (RFC 8446 §4.2),
//! more than one server name, a name that is not a plain DNS host name, trailing bytes, and a
//! hello carrying `encrypted_client_hello`, whose outer SNI need not be the server the
//! connection reaches. `tls-parser` would parse far more than needed (and pull `nom` in), and
//! `rustls`'s server-side `Acceptor` would make the gate a TLS endpoint it is not. The parser
//! works on borrowed bytes, allocates only the name, and is fuzzed (`host-agent/daemon/fuzz`,
//! target `egress_client_hello`).
//!
//! Input is what the guest sent so far. [`parse`] answers [`HelloError::Incomplete`] while a
//! longer prefix could still make a valid hello, so the caller reads more and calls again; any
//! other error is final.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::rules::check_name;

/// The most ClientHello bytes (records and their headers) read before giving up.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// TLS record content type: handshake.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type: client_hello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension: server_name (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension: encrypted_client_hello (RFC 9849).
const EXT_ECH: u16 = 0xfe0d;
/// server_name's name type: host_name.
const NAME_TYPE_HOST: u8 = 0;
/// The largest TLS plaintext record body.
const MAX_RECORD: usize = 1 << 14;

/// Why bytes are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// More bytes are needed.
    #[error("incomplete ClientHello")]
    Incomplete,
    /// The hello would not fit in [`MAX_HELLO_BYTES`].
    #[error("ClientHello longer than {MAX_HELLO_BYTES} bytes")]
    TooLong,
    /// The first record is not a handshake record.
    #[error("not a TLS handshake record (content type {0})")]
    NotHandshake(u8),
    /// A record's version is not TLS 1.x.
    #[error("TLS record version {0:#06x} is not 3.x")]
    RecordVersion(u16),
    /// A record is empty or longer than TLS allows.
    #[error("TLS record length {0} out of range")]
    RecordLength(usize),
    /// The first handshake message is not a ClientHello.
    #[error("handshake message type {0} is not ClientHello")]
    NotClientHello(u8),
    /// A field runs past the end of its enclosing structure.
    #[error("ClientHello field {0} is truncated")]
    Truncated(&'static str),
    /// A field's length breaks the protocol's rules.
    #[error("ClientHello field {0} has an invalid length")]
    BadLength(&'static str),
    /// Bytes after the last extension.
    #[error("trailing bytes after the ClientHello's extensions")]
    TrailingBytes,
    /// The same extension twice.
    #[error("extension {0:#06x} appears twice")]
    DuplicateExtension(u16),
    /// The hello is encrypted (ECH): the outer name hides the real one.
    #[error("encrypted ClientHello (ECH) hides the server name")]
    EncryptedHello,
    /// The server_name extension is malformed or names something that is not a host name.
    #[error("server name: {0}")]
    BadServerName(&'static str),
}

/// What the SNI check needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The host name (lower case), or `None` when the hello has no server_name extension.
    pub sni: Option<String>,
}

/// A cursor over a byte slice that reads big-endian fields.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], HelloError> {
        if self.bytes.len() < n {
            return Err(HelloError::Truncated(field));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize, field: &'static str) -> Result<&'a [u8], HelloError> {
        let len = match width {
            1 => usize::from(self.u8(field)?),
            _ => usize::from(self.u16(field)?),
        };
        self.take(len, field)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Parses the ClientHello at the start of `input` (what the guest sent so far; bytes after the
/// hello are ignored).
pub fn parse(input: &[u8]) -> Result<ClientHello, HelloError> {
    let body = reassemble(input)?;
    parse_body(&body)
}

/// Joins the handshake records at the start of `input` until they hold the first handshake
/// message, and returns that message's body.
fn reassemble(input: &[u8]) -> Result<Vec<u8>, HelloError> {
    let mut rest = input;
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        // The handshake header says how long the message is; until it is complete, read more
        // records.
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(handshake[0]));
            }
            let len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if len + 4 > MAX_HELLO_BYTES {
                return Err(HelloError::TooLong);
            }
            if handshake.len() >= len + 4 {
                // A record may carry the start of the next handshake message after this one;
                // it is not ours to read.
                handshake.truncate(len + 4);
                return Ok(handshake.split_off(4));
            }
        } else if let Some(&kind) = handshake.first()
            && kind != HANDSHAKE_CLIENT_HELLO
        {
            return Err(HelloError::NotClientHello(kind));
        }
        if input.len() - rest.len() >= MAX_HELLO_BYTES {
            return Err(HelloError::TooLong);
        }
        let Some(&content) = rest.first() else {
            return Err(HelloError::Incomplete);
        };
        if content != CONTENT_HANDSHAKE {
            return Err(HelloError::NotHandshake(content));
        }
        if let Some(&major) = rest.get(1)
            && major != 3
        {
            return Err(HelloError::RecordVersion(u16::from(major) << 8));
        }
        if rest.len() < 5 {
            return Err(HelloError::Incomplete);
        }
        let version = u16::from_be_bytes([rest[1], rest[2]]);
        if !(0x0300..=0x0304).contains(&version) {
            return Err(HelloError::RecordVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::RecordLength(len));
        }
        if rest.len() < 5 + len {
            // Check what has arrived of this record so a bad hello fails before its last byte.
            handshake.extend_from_slice(&rest[5..]);
            if let Some(&kind) = handshake.first()
                && kind != HANDSHAKE_CLIENT_HELLO
            {
                return Err(HelloError::NotClientHello(kind));
            }
            return Err(HelloError::Incomplete);
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { bytes: body };
    let version = r.u16("legacy_version")?;
    if version >> 8 != 3 {
        return Err(HelloError::BadLength("legacy_version"));
    }
    r.take(32, "random")?;
    let session_id = r.vec(1, "legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::BadLength("legacy_session_id"));
    }
    let suites = r.vec(2, "cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::BadLength("cipher_suites"));
    }
    let compression = r.vec(1, "legacy_compression_methods")?;
    if compression.is_empty() {
        return Err(HelloError::BadLength("legacy_compression_methods"));
    }
    if r.is_empty() {
        // TLS 1.2 and older may omit the extensions: no SNI.
        return Ok(ClientHello { sni: None });
    }
    let mut exts = Reader {
        bytes: r.vec(2, "extensions")?,
    };
    if !r.is_empty() {
        return Err(HelloError::TrailingBytes);
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut sni = None;
    while !exts.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec(2, "extension data")?;
        if seen.contains(&kind) {
            return Err(HelloError::DuplicateExtension(kind));
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => sni = Some(server_name(data)?),
            EXT_ECH => return Err(HelloError::EncryptedHello),
            _ => {}
        }
    }
    Ok(ClientHello { sni })
}

/// The one host name in a server_name extension's data.
fn server_name(data: &[u8]) -> Result<String, HelloError> {
    let mut outer = Reader { bytes: data };
    let mut list = Reader {
        bytes: outer.vec(2, "server_name_list")?,
    };
    if !outer.is_empty() {
        return Err(HelloError::BadServerName("bytes after the name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8("name_type")?;
        let name = list.vec(2, "host_name")?;
        if kind != NAME_TYPE_HOST {
            return Err(HelloError::BadServerName("unknown name type"));
        }
        if host.is_some() {
            return Err(HelloError::BadServerName("more than one host name"));
        }
        host = Some(name);
    }
    let name = host.ok_or(HelloError::BadServerName("empty name list"))?;
    let name = std::str::from_utf8(name).map_err(|_| HelloError::BadServerName("not ASCII"))?;
    if name.ends_with('.') {
        return Err(HelloError::BadServerName("trailing dot"));
    }
    if name.parse::<Ipv4Addr>().is_ok() || name.parse::<Ipv6Addr>().is_ok() {
        return Err(HelloError::BadServerName("an IP literal"));
    }
    let name = name.to_ascii_lowercase();
    check_name(&name).map_err(HelloError::BadServerName)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello with `exts` (type, data), in one record.
    pub(crate) fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext_bytes = Vec::new();
        for (kind, data) in exts {
            ext_bytes.extend_from_slice(&kind.to_be_bytes());
            ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    pub(crate) fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    #[test]
    fn finds_the_name_and_lowercases_it() {
        let h = hello(&[(10, vec![0, 2, 0, 29]), (0, sni_ext(&[(0, b"PyPI.org")]))]);
        assert_eq!(parse(&h).unwrap().sni.as_deref(), Some("pypi.org"));
        // Bytes after the hello (the next flight) are not the parser's business.
        let mut more = h.clone();
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(parse(&more).unwrap().sni.as_deref(), Some("pypi.org"));
    }

    #[test]
    fn no_extensions_or_no_sni_is_none() {
        assert_eq!(parse(&hello(&[])).unwrap().sni, None);
        assert_eq!(parse(&hello(&[(10, vec![0, 0])])).unwrap().sni, None);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let h = hello(&[(0, sni_ext(&[(0, b"pypi.org")]))]);
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Err(HelloError::Incomplete), "prefix {n}");
        }
    }

    #[test]
    fn a_hello_split_over_records_is_joined() {
        let h = hello(&[(0, sni_ext(&[(0, b"pypi.org")]))]);
        let hs = &h[5..];
        let (a, b) = hs.split_at(10);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(parse(&split).unwrap().sni.as_deref(), Some("pypi.org"));
    }

    #[test]
    fn refuses_what_a_strict_reading_forbids() {
        let sni = |name: &[u8]| hello(&[(0, sni_ext(&[(0, name)]))]);
        let err = |b: &[u8]| parse(b).unwrap_err();
        assert_eq!(err(b"GET / HTTP/1.1\r\n"), HelloError::NotHandshake(b'G'));
        assert_eq!(err(&[22, 2, 0]), HelloError::RecordVersion(0x0200));
        assert_eq!(err(&[22, 3, 1, 0, 0]), HelloError::RecordLength(0));
        assert_eq!(err(&[22, 3, 1, 0x40, 1]), HelloError::RecordLength(0x4001));
        assert_eq!(err(&[22, 3, 1, 0, 4, 2]), HelloError::NotClientHello(2));
        assert_eq!(err(&[22, 3, 1, 0, 4, 1, 0, 0x40, 0]), HelloError::TooLong);
        assert_eq!(
            err(&hello(&[
                (0, sni_ext(&[(0, b"a.test")])),
                (0, sni_ext(&[(0, b"b.test")]))
            ])),
            HelloError::DuplicateExtension(0)
        );
        assert_eq!(
            err(&hello(&[(0, sni_ext(&[(0, b"a.test"), (0, b"b.test")]))])),
            HelloError::BadServerName("more than one host name")
        );
        assert_eq!(
            err(&hello(&[(0, sni_ext(&[(1, b"a.test")]))])),
            HelloError::BadServerName("unknown name type")
        );
        assert_eq!(
            err(&hello(&[(0, sni_ext(&[]))])),
            HelloError::BadServerName("empty name list")
        );
        assert_eq!(
            err(&sni(b"1.2.3.4")),
            HelloError::BadServerName("an IP literal")
        );
        assert_eq!(
            err(&sni(b"::1")),
            HelloError::BadServerName("an IP literal")
        );
        assert_eq!(
            err(&sni(b"a.test.")),
            HelloError::BadServerName("trailing dot")
        );
        assert_eq!(
            err(&sni(b"a..test")),
            HelloError::BadServerName("empty label")
        );
        assert_eq!(
            err(&sni(b"a\0.test")),
            HelloError::BadServerName("labels may hold only letters, digits, '-' and '_'")
        );
        assert_eq!(
            err(&sni(&[0xff, b'.', b'a'])),
            HelloError::BadServerName("not ASCII")
        );
        assert_eq!(
            err(&hello(&[
                (0, sni_ext(&[(0, b"a.test")])),
                (EXT_ECH, vec![0])
            ])),
            HelloError::EncryptedHello
        );
        // An extension whose length runs past the list.
        let mut h = hello(&[(10, vec![0, 2, 0, 29])]);
        let n = h.len();
        h[n - 5] = 9;
        assert_eq!(err(&h), HelloError::Truncated("extension data"));
        // Bytes after the extensions inside the handshake message.
        let mut h = hello(&[]);
        h.push(0);
        let rec_len = (h.len() - 5) as u16;
        h[3..5].copy_from_slice(&rec_len.to_be_bytes());
        h[8] += 1;
        assert_eq!(err(&h), HelloError::TrailingBytes);
    }
}
