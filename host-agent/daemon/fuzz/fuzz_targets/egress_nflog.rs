//! Fuzzes the firewall log's parser (`egress::nflog::parse_datagram`): a netlink datagram from
//! the kernel whose payload is a packet a hostile guest wrote. It must never panic, never
//! return more messages than the datagram could hold, and every refusal it reads must name a
//! rule no longer than the datagram.

#![no_main]

use host_agent::egress::nflog::{NflogMessage, parse_datagram};
use libfuzzer_sys::fuzz_target;

/// A netlink message header is 16 bytes: no datagram holds more messages than that allows,
/// plus the one error that ends a walk.
const NLMSG_HDRLEN: usize = 16;

fuzz_target!(|data: &[u8]| {
    let messages = parse_datagram(data);
    assert!(messages.len() <= data.len() / NLMSG_HDRLEN + 1);
    for m in messages.into_iter().flatten() {
        if let NflogMessage::Denial(d) = m {
            assert!(d.rule.len() <= data.len());
        }
    }
});
