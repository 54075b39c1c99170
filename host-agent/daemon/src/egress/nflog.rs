//! The kernel's NFLOG messages (`nfnetlink_log`), read into firewall refusals: the rule that
//! refused (the log prefix, which is the rule's counter name), the packet's protocol,
//! addresses and destination port. No I/O here: [`super::firewall_log`] owns the socket.
//!
//! A netlink datagram holds one or more messages, each a `nlmsghdr`, a `nfgenmsg` and then
//! attributes (`nfattr`: length, type, value, padded to 4 bytes). A packet message carries
//! `NFULA_PREFIX` (the log statement's prefix, NUL-terminated) and `NFULA_PAYLOAD` (the packet
//! from its network header on, cut to the copy range the daemon asked for).
//!
//! # Why this is written here
//!
//! `netlink-packet-netfilter` parses these attributes, but it would bring
//! `netlink-packet-core`, `derive_more` and `zerocopy` into the daemon for what is a few
//! fixed-layout headers, and the IP and TCP/UDP headers in the payload would still be ours to
//! read. The daemon links no netlink stack (`crate::net::netns` says why), so the NFLOG part
//! is the three headers below, read by a total parser: every length is checked before it is
//! used, and anything short or malformed is an [`NflogError`], never a panic (a test feeds it
//! random bytes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kernel's numbers (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
/// `linux/netfilter/nfnetlink_log.h`).
mod defs {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NFGENMSG_LEN: usize = 4;
    pub const NFA_HDRLEN: usize = 4;
    /// The type bits of an attribute (without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`).
    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub const NLMSG_ERROR: u16 = 2;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;

    pub const NFNL_SUBSYS_ULOG: u16 = 4;
    pub const NFULNL_MSG_PACKET: u16 = 0;
    pub const NFULNL_MSG_CONFIG: u16 = 1;

    pub const NFULA_PAYLOAD: u16 = 9;
    pub const NFULA_PREFIX: u16 = 10;

    pub const NFULA_CFG_CMD: u16 = 1;
    pub const NFULA_CFG_MODE: u16 = 2;
    pub const NFULNL_CFG_CMD_BIND: u8 = 1;
    pub const NFULNL_COPY_PACKET: u8 = 2;

    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_ICMPV6: u8 = 58;
    pub const IPPROTO_SCTP: u8 = 132;
    /// IPv6 extension headers walked to reach the transport header.
    pub const IPV6_HOP_BY_HOP: u8 = 0;
    pub const IPV6_ROUTING: u8 = 43;
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const IPV6_DEST_OPTS: u8 = 60;
}
use defs::*;

/// The longest prefix taken as a rule name.
pub const MAX_PREFIX_LEN: usize = 64;
/// IPv6 extension headers followed at most.
const MAX_IPV6_EXTENSIONS: usize = 8;

/// Why an NFLOG datagram could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NflogError {
    /// A header or attribute runs past the end of what was received.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A length field is smaller than its own header.
    #[error("bad length in {0}")]
    BadLength(&'static str),
    /// The kernel answered a request with an error (`-errno`).
    #[error("the kernel refused the request (errno {0})")]
    Refused(i32),
    /// A packet message without `NFULA_PREFIX` or `NFULA_PAYLOAD`.
    #[error("packet message without {0}")]
    Missing(&'static str),
    /// The prefix is not a rule name (empty, too long, or not printable ASCII).
    #[error("the log prefix is not a rule name")]
    BadPrefix,
    /// The payload is neither IPv4 nor IPv6.
    #[error("the payload is not an IP packet (version {0})")]
    NotIp(u8),
}

/// One refusal the firewall logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallDenial {
    /// The rule that refused (its counter name, such as `deny_metadata`).
    pub rule: String,
    /// The packet's source address.
    pub src: IpAddr,
    /// Its destination address.
    pub dst: IpAddr,
    /// Its transport protocol number (6 TCP, 17 UDP, ...).
    pub proto: u8,
    /// Its destination port, for TCP, UDP and SCTP when the header is there (not in a later
    /// fragment).
    pub port: Option<u16>,
}

impl FirewallDenial {
    /// The protocol's name (`tcp`, `udp`, `icmp`, ...), or its number.
    pub fn proto_name(&self) -> String {
        match self.proto {
            IPPROTO_TCP => "tcp".into(),
            IPPROTO_UDP => "udp".into(),
            IPPROTO_ICMP => "icmp".into(),
            IPPROTO_ICMPV6 => "icmpv6".into(),
            IPPROTO_SCTP => "sctp".into(),
            n => n.to_string(),
        }
    }
}

/// What one netlink message in a datagram was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NflogMessage {
    /// A logged packet.
    Denial(FirewallDenial),
    /// An acknowledgement of a request (`NLMSG_ERROR` with code 0).
    Ack,
    /// Anything else (another message type), skipped.
    Other,
}

/// The messages of one received datagram, in order. A message that does not parse is an
/// error in its place; a header that cannot be read ends the walk with that error.
pub fn parse_datagram(mut buf: &[u8]) -> Vec<Result<NflogMessage, NflogError>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            out.push(Err(NflogError::Truncated("netlink header")));
            break;
        }
        let len = read_u32_ne(buf, 0) as usize;
        if len < NLMSG_HDRLEN {
            out.push(Err(NflogError::BadLength("netlink header")));
            break;
        }
        let Some(msg) = buf.get(..len) else {
            out.push(Err(NflogError::Truncated("netlink message")));
            break;
        };
        out.push(parse_message(msg));
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    out
}

/// One netlink message (`msg` is exactly its `nlmsg_len` bytes).
fn parse_message(msg: &[u8]) -> Result<NflogMessage, NflogError> {
    let kind = read_u16_ne(msg, 4);
    let body = &msg[NLMSG_HDRLEN..];
    if kind == NLMSG_ERROR {
        let code = body
            .get(..4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(NflogError::Truncated("netlink error"))?;
        return if code == 0 {
            Ok(NflogMessage::Ack)
        } else {
            Err(NflogError::Refused(code.saturating_neg()))
        };
    }
    if kind != (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET) {
        return Ok(NflogMessage::Other);
    }
    let mut attrs = body
        .get(NFGENMSG_LEN..)
        .ok_or(NflogError::Truncated("nfgenmsg"))?;
    let (mut prefix, mut payload) = (None, None);
    while !attrs.is_empty() {
        if attrs.len() < NFA_HDRLEN {
            return Err(NflogError::Truncated("attribute header"));
        }
        let len = usize::from(read_u16_ne(attrs, 0));
        let kind = read_u16_ne(attrs, 2) & NLA_TYPE_MASK;
        if len < NFA_HDRLEN {
            return Err(NflogError::BadLength("attribute"));
        }
        let value = attrs
            .get(NFA_HDRLEN..len)
            .ok_or(NflogError::Truncated("attribute"))?;
        match kind {
            NFULA_PREFIX => prefix = Some(value),
            NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        attrs = attrs.get(align4(len)..).unwrap_or_default();
    }
    let rule = rule_name(prefix.ok_or(NflogError::Missing("a prefix"))?)?;
    let payload = payload.ok_or(NflogError::Missing("a payload"))?;
    let (src, dst, proto, port) = parse_ip(payload)?;
    Ok(NflogMessage::Denial(FirewallDenial {
        rule,
        src,
        dst,
        proto,
        port,
    }))
}

/// The prefix up to its NUL, when it is a plausible rule name.
fn rule_name(prefix: &[u8]) -> Result<String, NflogError> {
    let text = prefix.split(|b| *b == 0).next().unwrap_or_default();
    let ok = !text.is_empty()
        && text.len() <= MAX_PREFIX_LEN
        && text.iter().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(NflogError::BadPrefix);
    }
    Ok(String::from_utf8_lossy(text).into_owned())
}

type Addresses = (IpAddr, IpAddr, u8, Option<u16>);

/// Source, destination, protocol and destination port of an IP packet (`payload` starts at
/// its network header).
fn parse_ip(payload: &[u8]) -> Result<Addresses, NflogError> {
    let first = *payload.first().ok_or(NflogError::Truncated("IP header"))?;
    match first >> 4 {
        4 => {
            let header = payload
                .get(..20)
                .ok_or(NflogError::Truncated("IPv4 header"))?;
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return Err(NflogError::BadLength("IPv4 header"));
            }
            let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
            let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
            let proto = header[9];
            // Only the first fragment holds the transport header.
            let offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
            let port = if offset == 0 {
                dst_port(proto, payload.get(ihl..).unwrap_or_default())
            } else {
                None
            };
            Ok((src.into(), dst.into(), proto, port))
        }
        6 => {
            let header = payload
                .get(..40)
                .ok_or(NflogError::Truncated("IPv6 header"))?;
            let addr = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&header[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let (src, dst) = (addr(8), addr(24));
            let (mut next, mut at) = (header[6], 40usize);
            let mut first_fragment = true;
            for _ in 0..MAX_IPV6_EXTENSIONS {
                let ext = payload.get(at..at + 8);
                match (next, ext) {
                    (IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS, Some(ext)) => {
                        next = ext[0];
                        at += (usize::from(ext[1]) + 1) * 8;
                    }
                    (IPV6_FRAGMENT, Some(ext)) => {
                        next = ext[0];
                        first_fragment = u16::from_be_bytes([ext[2], ext[3]]) >> 3 == 0;
                        at += 8;
                    }
                    _ => break,
                }
            }
            let port = if first_fragment {
                dst_port(next, payload.get(at..).unwrap_or_default())
            } else {
                None
            };
            Ok((src.into(), dst.into(), next, port))
        }
        v => Err(NflogError::NotIp(v)),
    }
}

/// The destination port of a TCP, UDP or SCTP header (`None` for other protocols or a header
/// cut short).
fn dst_port(proto: u8, l4: &[u8]) -> Option<u16> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            l4.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]]))
        }
        _ => None,
    }
}

/// The request that binds the socket to NFLOG `group` and asks for each packet's first
/// `copy_range` bytes, with an acknowledgement.
pub fn bind_request(group: u16, copy_range: u32, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    let mut mode = copy_range.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    push_attr(&mut attrs, NFULA_CFG_MODE, &mode);
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len());
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()) as u32;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the group (big-endian).
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(&group.to_be_bytes());
    msg.extend_from_slice(&attrs);
    msg
}

fn push_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (NFA_HDRLEN + value.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(out.len()), 0);
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// `buf[at..at + 2]` as a native-endian u16; the caller has checked the length.
fn read_u16_ne(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

/// `buf[at..at + 4]` as a native-endian u32; the caller has checked the length.
fn read_u32_ne(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Hand-built messages, as the kernel sends them (for the tests here and the reader's).
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// A packet message logged with `prefix`, carrying `payload`.
    pub(crate) fn packet_message(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // The kernel sends more attributes; one before the prefix must be skipped.
        push_attr(&mut attrs, 1, &[0x08, 0x00, 1, 0]);
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        push_attr(&mut attrs, NFULA_PREFIX, &p);
        push_attr(&mut attrs, NFULA_PAYLOAD, payload);
        let len = (NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()) as u32;
        let mut msg = Vec::new();
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET).to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[2, 0, 0, 15]);
        msg.extend_from_slice(&attrs);
        msg
    }

    /// An IPv4 packet from `src` to `dst` of `proto`, whose transport header starts with
    /// source port 40000 and destination port `port`.
    pub(crate) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&port.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        ip
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn one(datagram: &[u8]) -> Result<NflogMessage, NflogError> {
        let mut all = parse_datagram(datagram);
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    #[test]
    fn an_ipv4_tcp_refusal_names_its_rule_address_and_port() {
        let msg = packet_message("deny_metadata", &ipv4(GUEST, METADATA, IPPROTO_TCP, 80));
        let NflogMessage::Denial(d) = one(&msg).unwrap() else {
            panic!("not a denial");
        };
        assert_eq!(
            d,
            FirewallDenial {
                rule: "deny_metadata".into(),
                src: GUEST.into(),
                dst: METADATA.into(),
                proto: IPPROTO_TCP,
                port: Some(80),
            }
        );
        assert_eq!(d.proto_name(), "tcp");
    }

    #[test]
    fn ipv4_udp_icmp_and_a_later_fragment() {
        let dst = Ipv4Addr::new(192, 0, 2, 9);
        let udp = packet_message("deny_other", &ipv4(GUEST, dst, IPPROTO_UDP, 53));
        let Ok(NflogMessage::Denial(d)) = one(&udp) else {
            panic!()
        };
        assert_eq!((d.proto_name().as_str(), d.port), ("udp", Some(53)));
        let icmp = packet_message("deny_other", &ipv4(GUEST, dst, IPPROTO_ICMP, 0));
        let Ok(NflogMessage::Denial(d)) = one(&icmp) else {
            panic!()
        };
        assert_eq!((d.proto_name().as_str(), d.port), ("icmp", None));
        let mut frag = ipv4(GUEST, dst, IPPROTO_UDP, 53);
        frag[6..8].copy_from_slice(&[0x00, 0x10]);
        let Ok(NflogMessage::Denial(d)) = one(&packet_message("deny_other", &frag)) else {
            panic!()
        };
        assert_eq!(d.port, None);
        // Options: the transport header starts after them.
        let mut opts = ipv4(GUEST, dst, IPPROTO_TCP, 0);
        opts[0] = 0x46;
        opts.splice(20..20, [1, 1, 1, 0]);
        opts[26..28].copy_from_slice(&8443u16.to_be_bytes());
        let Ok(NflogMessage::Denial(d)) = one(&packet_message("deny_other", &opts)) else {
            panic!()
        };
        assert_eq!(d.port, Some(8443));
    }

    #[test]
    fn an_ipv6_refusal_walks_extension_headers() {
        let src: Ipv6Addr = "fd00::2".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut ip = vec![0x60, 0, 0, 0, 0, 16, IPV6_HOP_BY_HOP, 64];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        // Hop-by-hop options (8 bytes), then TCP to port 443.
        ip.extend_from_slice(&[IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&443u16.to_be_bytes());
        let Ok(NflogMessage::Denial(d)) = one(&packet_message("deny_ipv6", &ip)) else {
            panic!()
        };
        assert_eq!(
            (d.rule.as_str(), d.src, d.dst, d.proto, d.port),
            ("deny_ipv6", src.into(), dst.into(), IPPROTO_TCP, Some(443))
        );
    }

    #[test]
    fn several_messages_in_one_datagram_and_an_ack() {
        let mut dgram = packet_message("deny_host", &ipv4(GUEST, METADATA, IPPROTO_TCP, 22));
        let mut ack = vec![0u8; NLMSG_HDRLEN + 4 + NLMSG_HDRLEN];
        let ack_len = ack.len() as u32;
        ack[..4].copy_from_slice(&ack_len.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        dgram.extend_from_slice(&ack);
        let mut refused = ack.clone();
        refused[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        dgram.extend_from_slice(&refused);
        let all = parse_datagram(&dgram);
        assert!(matches!(&all[0], Ok(NflogMessage::Denial(d)) if d.port == Some(22)));
        assert_eq!(all[1], Ok(NflogMessage::Ack));
        assert_eq!(all[2], Err(NflogError::Refused(16)));
    }

    #[test]
    fn truncated_and_malformed_messages_are_typed_errors() {
        let good = packet_message("deny_other", &ipv4(GUEST, METADATA, IPPROTO_TCP, 80));
        // Every cut short of the whole message fails, and none panics.
        for cut in 1..good.len() {
            let got = parse_datagram(&good[..cut]);
            assert!(got.iter().any(Result::is_err), "cut at {cut}: {got:?}");
        }
        // A payload cut inside the TCP header still names the rule, without a port.
        let short = packet_message("deny_other", &ipv4(GUEST, METADATA, IPPROTO_TCP, 80)[..22]);
        assert!(matches!(one(&short), Ok(NflogMessage::Denial(d)) if d.port.is_none()));
        assert_eq!(
            one(&packet_message("", &ipv4(GUEST, METADATA, 6, 80))),
            Err(NflogError::BadPrefix)
        );
        assert_eq!(
            one(&packet_message("deny\x01x", &ipv4(GUEST, METADATA, 6, 80))),
            Err(NflogError::BadPrefix)
        );
        assert_eq!(
            one(&packet_message("deny_other", &[0x50; 40])),
            Err(NflogError::NotIp(5))
        );
        let mut bad_ihl = ipv4(GUEST, METADATA, 6, 80);
        bad_ihl[0] = 0x44;
        assert_eq!(
            one(&packet_message("deny_other", &bad_ihl)),
            Err(NflogError::BadLength("IPv4 header"))
        );
        // A netlink length below its own header, and an attribute length below its header.
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(one(&tiny), Err(NflogError::BadLength("netlink header")));
        let mut attr = good.clone();
        attr[20..22].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(one(&attr), Err(NflogError::BadLength("attribute")));
        // Another message type is skipped.
        let mut other = good;
        other[4..6].copy_from_slice(&0x0301u16.to_ne_bytes());
        assert_eq!(one(&other), Ok(NflogMessage::Other));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: the same cases every run.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = packet_message("deny_other", &ipv4(GUEST, METADATA, IPPROTO_TCP, 80));
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = (next() % 256) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A real message with a few bytes flipped reaches deeper.
                let mut b = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b
            };
            let _ = parse_datagram(&bytes);
        }
    }

    #[test]
    fn the_bind_request_is_a_config_message_with_an_ack_flag() {
        let req = bind_request(15, 128, 7);
        assert_eq!(read_u32_ne(&req, 0) as usize, req.len());
        assert_eq!(read_u16_ne(&req, 4), 0x0401);
        assert_eq!(read_u16_ne(&req, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&req[18..20], &15u16.to_be_bytes());
        // The command attribute, then the mode: copy 128 bytes of each packet.
        let attr = |len: u16, kind: u16| [len.to_ne_bytes(), kind.to_ne_bytes()].concat();
        assert_eq!(&req[20..24], attr(5, NFULA_CFG_CMD));
        assert_eq!(req[24], NFULNL_CFG_CMD_BIND);
        assert_eq!(&req[28..32], attr(10, NFULA_CFG_MODE));
        assert_eq!(&req[32..38], &[0, 0, 0, 128, NFULNL_COPY_PACKET, 0]);
    }
}
