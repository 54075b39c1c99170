//! Fuzzes the egress resolver's request path (`Resolver::answer_udp`): the datagram a hostile
//! guest sends to its DNS server. It must never panic, and whatever it sends back must parse as
//! a DNS response with the request's id.
//!
//! The upstream is a loopback port nothing listens on, so a forwarded query fails at once (the
//! ICMP port-unreachable ends the connected socket's wait) and the run does not wait for the
//! upstream deadline.

#![no_main]

use std::sync::{Arc, OnceLock};

use host_agent::egress::{EgressPolicy, Resolver};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    resolver: Resolver,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let policy = EgressPolicy::parse(&[
            "pypi.org:443".to_string(),
            "*.githubusercontent.com:443".to_string(),
        ])
        .expect("policy");
        // Nobody reads events: with the receiver gone, sending one fails at once.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let upstream = "127.0.0.1:9".parse().expect("address");
        let resolver = runtime.block_on(async { Resolver::new(Arc::new(policy), upstream, tx) });
        Fixture { runtime, resolver }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some(reply) = f.runtime.block_on(f.resolver.answer_udp(data)) else {
        return;
    };
    let reply = hickory_proto::op::Message::from_vec(&reply).expect("reply parses");
    assert_eq!(reply.metadata.id, u16::from_be_bytes([data[0], data[1]]));
    assert_eq!(
        reply.metadata.message_type,
        hickory_proto::op::MessageType::Response
    );
});
