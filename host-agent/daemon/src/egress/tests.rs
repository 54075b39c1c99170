//! The resolver against a real upstream on loopback, and the SNI check on real sockets with
//! real ClientHellos (made by rustls).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::client_hello::{self, HelloError};
use super::dns::EDE_BLOCKED;
use super::sni::HELLO_TIMEOUT;
use super::{EgressEvent, EgressPolicy, GrantTable, Resolver, SniGate};

const SLOW: &str = "slow.example.com.";

/// A UDP DNS server on loopback with fixed answers; counts the queries it gets.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let query = Message::from_vec(&buf[..n]).unwrap();
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.add_queries(query.queries.clone());
            let name = query.queries[0].name().clone();
            let a = |owner: &str, ip: [u8; 4], ttl| {
                Record::from_rdata(
                    Name::from_ascii(owner).unwrap(),
                    ttl,
                    RData::A(A(ip.into())),
                )
            };
            match name.to_lowercase().to_ascii().as_str() {
                "pypi.org." => {
                    reply.add_answer(a("pypi.org.", [192, 0, 2, 1], 5));
                    reply.add_answer(a("pypi.org.", [192, 0, 2, 2], 5));
                    // Not reached from the name: must not be given out.
                    reply.add_answer(a("other.test.", [203, 0, 113, 9], 5));
                }
                "raw.githubusercontent.com." => {
                    let cdn = Name::from_ascii("cdn.example.net.").unwrap();
                    reply.add_answer(Record::from_rdata(
                        name.clone(),
                        300,
                        RData::CNAME(CNAME(cdn)),
                    ));
                    reply.add_answer(a("cdn.example.net.", [192, 0, 2, 7], 86400));
                }
                "internal.example.com." => {
                    reply.add_answer(a("internal.example.com.", [10, 0, 0, 1], 60));
                    reply.add_answer(a("internal.example.com.", [169, 254, 169, 254], 60));
                    reply.add_answer(a("internal.example.com.", [192, 0, 2, 9], 60));
                }
                "metadata.example.com." => {
                    reply.add_answer(a("metadata.example.com.", [169, 254, 169, 254], 60));
                }
                SLOW => continue,
                _ => reply.metadata.response_code = ResponseCode::NXDomain,
            }
            socket
                .send_to(&reply.to_vec().unwrap(), peer)
                .await
                .unwrap();
        }
    });
    (addr, hits)
}

struct Served {
    resolver: Resolver,
    udp: SocketAddr,
    tcp: SocketAddr,
    events: mpsc::Receiver<EgressEvent>,
    hits: Arc<AtomicUsize>,
}

async fn serve() -> Served {
    let (up, hits) = upstream().await;
    let policy = EgressPolicy::parse(&[
        "pypi.org:443".to_string(),
        "*.githubusercontent.com:443".to_string(),
        "*.example.com:443".to_string(),
        "pypi.org:8443".to_string(),
    ])
    .unwrap();
    let (tx, events) = mpsc::channel(64);
    let resolver = Resolver::new(Arc::new(policy), up, tx);
    let udp_socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp = udp_socket.local_addr().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = listener.local_addr().unwrap();
    let r = resolver.clone();
    tokio::spawn(async move { r.serve_udp(udp_socket).await });
    let r = resolver.clone();
    tokio::spawn(async move { r.serve_tcp(listener).await });
    Served {
        resolver,
        udp,
        tcp,
        events,
        hits,
    }
}

fn query(name: &str, kind: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    if edns {
        m.set_edns(Edns::new());
    }
    m
}

async fn ask_udp_bytes(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(Duration::from_secs(4), socket.recv(&mut buf)).await {
        Ok(n) => Some(buf[..n.unwrap()].to_vec()),
        Err(_) => None,
    }
}

async fn ask_udp(server: SocketAddr, q: &Message) -> Message {
    let bytes = ask_udp_bytes(server, &q.to_vec().unwrap())
        .await
        .expect("a reply");
    let reply = Message::from_vec(&bytes).unwrap();
    assert_eq!(reply.metadata.id, q.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

fn addrs(reply: &Message) -> Vec<(String, Ipv4Addr, u32)> {
    reply
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => (r.name.to_ascii(), a.0, r.ttl),
            other => panic!("unexpected record {other:?}"),
        })
        .collect()
}

fn ede(reply: &Message) -> (u16, String) {
    let edns = reply.edns.as_ref().expect("an OPT record");
    match edns.option(EdnsCode::from(15)) {
        Some(EdnsOption::Unknown(15, data)) => (
            u16::from_be_bytes([data[0], data[1]]),
            String::from_utf8(data[2..].to_vec()).unwrap(),
        ),
        other => panic!("no Extended DNS Error: {other:?}"),
    }
}

#[tokio::test]
async fn allowed_a_is_relayed_and_granted_with_clamped_ttl() {
    let mut s = serve().await;
    let reply = ask_udp(s.udp, &query("PyPI.org.", RecordType::A, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.recursion_available);
    assert_eq!(
        addrs(&reply),
        vec![
            ("PyPI.org.".to_string(), Ipv4Addr::new(192, 0, 2, 1), 30),
            ("PyPI.org.".to_string(), Ipv4Addr::new(192, 0, 2, 2), 30),
        ]
    );
    for last in [1, 2] {
        assert_eq!(
            s.events.recv().await.unwrap(),
            EgressEvent::Granted {
                name: "pypi.org".into(),
                addr: Ipv4Addr::new(192, 0, 2, last),
                ports: vec![443, 8443],
                ttl: Duration::from_secs(30),
            }
        );
    }
    let table = s.resolver.table();
    assert!(table.is_granted(Ipv4Addr::new(192, 0, 2, 1), "pypi.org"));
    assert!(!table.is_granted(Ipv4Addr::new(203, 0, 113, 9), "pypi.org"));
    assert!(!table.is_granted(Ipv4Addr::new(203, 0, 113, 9), "other.test"));
    let c = s.resolver.counters();
    assert_eq!(
        (c.queries, c.forwarded, c.answered, c.granted),
        (1, 1, 1, 2)
    );
}

#[tokio::test]
async fn cname_chain_is_flattened_and_long_ttl_clamped() {
    let mut s = serve().await;
    let reply = ask_udp(
        s.udp,
        &query("raw.githubusercontent.com.", RecordType::A, false),
    )
    .await;
    assert!(reply.edns.is_none());
    assert_eq!(
        addrs(&reply),
        vec![(
            "raw.githubusercontent.com.".to_string(),
            Ipv4Addr::new(192, 0, 2, 7),
            3600
        )]
    );
    assert_eq!(
        s.events.recv().await.unwrap(),
        EgressEvent::Granted {
            name: "raw.githubusercontent.com".into(),
            addr: Ipv4Addr::new(192, 0, 2, 7),
            ports: vec![443],
            ttl: Duration::from_secs(3600),
        }
    );
}

#[tokio::test]
async fn an_address_whose_grant_cannot_be_queued_is_left_out() {
    let (up, _) = upstream().await;
    let policy = EgressPolicy::parse(&["pypi.org:443".to_string()]).unwrap();
    // Room for one event, and nobody reads it.
    let (tx, _events) = mpsc::channel(1);
    let resolver = Resolver::new(Arc::new(policy), up, tx);
    let q = query("pypi.org.", RecordType::A, false);
    let reply =
        Message::from_vec(&resolver.answer_udp(&q.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(addrs(&reply).len(), 1);
    let c = resolver.counters();
    assert_eq!((c.granted, c.events_dropped), (1, 1));
    // With the queue still full, nothing can be given out.
    let reply =
        Message::from_vec(&resolver.answer_udp(&q.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
}

#[tokio::test]
async fn non_public_addresses_are_never_given_out() {
    let mut s = serve().await;
    let reply = ask_udp(s.udp, &query("internal.example.com.", RecordType::A, false)).await;
    assert_eq!(
        addrs(&reply),
        vec![(
            "internal.example.com.".to_string(),
            Ipv4Addr::new(192, 0, 2, 9),
            60
        )]
    );
    match s.events.recv().await.unwrap() {
        EgressEvent::Granted { addr, .. } => assert_eq!(addr, Ipv4Addr::new(192, 0, 2, 9)),
        other => panic!("unexpected event {other:?}"),
    }
    // Nothing left: SERVFAIL, not an empty answer the client would cache as "no address".
    let reply = ask_udp(s.udp, &query("metadata.example.com.", RecordType::A, false)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
    assert!(
        !s.resolver
            .table()
            .is_granted(Ipv4Addr::new(169, 254, 169, 254), "metadata.example.com")
    );
    assert_eq!(s.resolver.counters().non_public, 3);
}

#[tokio::test]
async fn nxdomain_is_relayed_without_grants() {
    let s = serve().await;
    let reply = ask_udp(s.udp, &query("nothing.example.com.", RecordType::A, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.answers.is_empty());
    assert_eq!(s.resolver.counters().granted, 0);
}

#[tokio::test]
async fn refused_name_gets_refused_with_extended_error() {
    let mut s = serve().await;
    let reply = ask_udp(s.udp, &query("Other.Test.", RecordType::A, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert!(reply.answers.is_empty());
    let text = "nanoclaw: other.test not in egress allowlist";
    assert_eq!(ede(&reply), (EDE_BLOCKED, text.to_string()));
    assert_eq!(
        s.events.recv().await.unwrap(),
        EgressEvent::Refused {
            name: "other.test".into(),
            rule: text.into()
        }
    );
    // The suffix of a wildcard is not below it.
    let reply = ask_udp(s.udp, &query("githubusercontent.com.", RecordType::A, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        s.hits.load(Ordering::SeqCst),
        0,
        "nothing refused went upstream"
    );
    assert_eq!(s.resolver.counters().refused, 2);
}

#[tokio::test]
async fn other_types_are_refused_naming_the_rule_and_aaaa_is_empty() {
    let s = serve().await;
    let reply = ask_udp(s.udp, &query("pypi.org.", RecordType::TXT, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    let (code, text) = ede(&reply);
    assert_eq!(code, EDE_BLOCKED);
    assert!(
        text.contains("TXT") && text.contains("pypi.org:443"),
        "{text}"
    );

    let reply = ask_udp(s.udp, &query("pypi.org.", RecordType::AAAA, true)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty());
    assert!(
        reply
            .edns
            .as_ref()
            .unwrap()
            .option(EdnsCode::from(15))
            .is_none()
    );
    assert_eq!(s.hits.load(Ordering::SeqCst), 0);
    assert_eq!(s.resolver.counters().aaaa_empty, 1);
}

#[tokio::test]
async fn malformed_requests_get_formerr_or_nothing_and_do_not_stop_the_server() {
    let s = serve().await;
    assert_eq!(ask_udp_bytes(s.udp, &[1, 2, 3]).await, None);
    // A header that promises a question the message does not hold.
    let bad = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    let reply = Message::from_vec(&ask_udp_bytes(s.udp, &bad).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // Responses are never answered (no reflection loops).
    let mut response = query("pypi.org.", RecordType::A, false);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(
        ask_udp_bytes(s.udp, &response.to_vec().unwrap()).await,
        None
    );
    // Two questions.
    let mut two = query("pypi.org.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("a.example.com.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask_udp(s.udp, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    // Every single-byte corruption of a valid query is answered or dropped, never a panic.
    let valid = query("raw.githubusercontent.com.", RecordType::TXT, true)
        .to_vec()
        .unwrap();
    for i in 0..valid.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = valid.clone();
            b[i] ^= flip;
            let _ = s.resolver.answer_udp(&b).await;
            let _ = s.resolver.answer_udp(&b[..i]).await;
        }
    }
    // The refusals filled the event queue: grants wait for room, so drain it.
    let mut s = s;
    while s.events.try_recv().is_ok() {}
    let reply = ask_udp(s.udp, &query("pypi.org.", RecordType::A, false)).await;
    assert_eq!(reply.answers.len(), 2);
    assert!(s.resolver.counters().malformed >= 3);
}

#[tokio::test]
async fn tcp_queries_work_on_one_connection() {
    let s = serve().await;
    let mut stream = TcpStream::connect(s.tcp).await.unwrap();
    for name in ["pypi.org.", "other.test."] {
        let q = query(name, RecordType::A, true);
        let bytes = q.to_vec().unwrap();
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let reply = Message::from_vec(&buf).unwrap();
        assert_eq!(reply.metadata.id, q.metadata.id);
        if name == "pypi.org." {
            assert_eq!(addrs(&reply).len(), 2);
        } else {
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        }
    }
    // A length over the bound closes the session.
    stream.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(n.map_or(true, |n| n == 0));
}

#[tokio::test]
async fn silent_upstream_gives_servfail_after_the_timeout() {
    let s = serve().await;
    let started = std::time::Instant::now();
    let reply = ask_udp(s.udp, &query(SLOW, RecordType::A, false)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= super::dns::UPSTREAM_TIMEOUT);
    assert_eq!(s.resolver.counters().upstream_failures, 1);
}

// The SNI check.

fn rustls_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[test]
fn parses_a_real_rustls_client_hello() {
    let hello = rustls_hello("files.pythonhosted.org");
    assert_eq!(
        client_hello::parse(&hello).unwrap().sni.as_deref(),
        Some("files.pythonhosted.org")
    );
    for n in 0..hello.len() {
        assert_eq!(
            client_hello::parse(&hello[..n]),
            Err(HelloError::Incomplete),
            "prefix {n}"
        );
    }
    // rustls sends no SNI for an IP address.
    let no_sni = rustls_hello("192.0.2.1");
    assert_eq!(client_hello::parse(&no_sni).unwrap().sni, None);
}

#[test]
fn corrupted_client_hellos_fail_with_typed_errors() {
    let hello = rustls_hello("pypi.org");
    // Deterministic xorshift: the same corruptions every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut refused = 0;
    for _ in 0..5000 {
        let mut b = hello.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        match client_hello::parse(&b) {
            Ok(h) => {
                if let Some(sni) = h.sni {
                    assert!(super::rules::check_name(&sni).is_ok());
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0);
    assert!(matches!(
        client_hello::parse(&[0x16; 64]),
        Err(HelloError::RecordVersion(_))
    ));
}

async fn echo_server() -> SocketAddrV4 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Gate {
    gate: SniGate,
    addr: SocketAddr,
    events: mpsc::Receiver<EgressEvent>,
}

/// A gate whose connections all claim `dst` as their original destination.
async fn gate(policy: &[String], table: GrantTable, dst: SocketAddrV4) -> Gate {
    let policy = Arc::new(EgressPolicy::parse(policy).unwrap());
    let (tx, events) = mpsc::channel(16);
    let lookup = move |_: &TcpStream| -> io::Result<SocketAddrV4> { Ok(dst) };
    let gate = SniGate::with_original_dst(policy, table, tx, lookup);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let g = gate.clone();
    tokio::spawn(async move { g.serve(listener).await });
    Gate { gate, addr, events }
}

/// Sends `hello` and reads what comes back: the echo, or the error the reset causes.
async fn exchange(addr: SocketAddr, hello: &[u8], extra: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(hello).await?;
    s.write_all(extra).await?;
    let mut buf = vec![0u8; hello.len() + extra.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok(buf)
}

#[tokio::test]
async fn allowed_connection_is_spliced_end_to_end() {
    let echo = echo_server().await;
    let table = GrantTable::new();
    table.grant(*echo.ip(), "pypi.org", Duration::from_secs(60));
    let mut g = gate(&[format!("pypi.org:{}", echo.port())], table, echo).await;
    let hello = rustls_hello("pypi.org");
    let back = exchange(g.addr, &hello, b"after the hello").await.unwrap();
    let mut expected = hello.clone();
    expected.extend_from_slice(b"after the hello");
    assert_eq!(back, expected);
    assert_eq!(
        g.events.recv().await.unwrap(),
        EgressEvent::Connected {
            sni: "pypi.org".into(),
            addr: *echo.ip(),
            port: echo.port()
        }
    );
    assert_eq!(g.gate.counters().allowed, 1);
}

async fn assert_reset(g: &mut Gate, hello: &[u8], sni: &str, reason_has: &str) {
    let err = exchange(g.addr, hello, b"").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    match g.events.recv().await.unwrap() {
        EgressEvent::ConnectionRefused {
            sni: got, reason, ..
        } => {
            assert_eq!(got, sni);
            assert!(reason.contains(reason_has), "{reason}");
        }
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test]
async fn mismatched_name_and_address_are_reset() {
    let echo = echo_server().await;
    let table = GrantTable::new();
    // The guest resolved pypi.org to another address and other.test to this one: it now
    // asks this address for pypi.org, which the resolver never said lives here.
    table.grant(
        Ipv4Addr::new(127, 0, 0, 2),
        "pypi.org",
        Duration::from_secs(60),
    );
    table.grant(*echo.ip(), "other.test", Duration::from_secs(60));
    let policy = [
        format!("pypi.org:{}", echo.port()),
        format!("other.test:{}", echo.port()),
    ];
    let mut g = gate(&policy, table, echo).await;
    let hello = rustls_hello("pypi.org");
    assert_reset(&mut g, &hello, "pypi.org", "was not resolved for pypi.org").await;
    // A name no rule allows on this port.
    let hello = rustls_hello("evil.test");
    assert_reset(&mut g, &hello, "evil.test", "not in the egress allowlist").await;
    // No SNI at all.
    let hello = rustls_hello("127.0.0.1");
    assert_reset(&mut g, &hello, "no SNI", "no server name").await;
    // Not TLS.
    assert_reset(
        &mut g,
        b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        "no SNI",
        "bad ClientHello",
    )
    .await;
    assert_eq!(g.gate.counters().refused, 4);
    assert_eq!(g.gate.counters().allowed, 0);
}

#[tokio::test]
async fn allowed_name_on_another_port_is_reset() {
    let echo = echo_server().await;
    let table = GrantTable::new();
    table.grant(*echo.ip(), "pypi.org", Duration::from_secs(60));
    let mut g = gate(&["pypi.org:443".to_string()], table, echo).await;
    let hello = rustls_hello("pypi.org");
    assert_reset(
        &mut g,
        &hello,
        "pypi.org",
        "not in the egress allowlist for port",
    )
    .await;
}

#[tokio::test]
async fn a_silent_guest_is_reset_after_the_hello_timeout() {
    let echo = echo_server().await;
    let mut g = gate(&["pypi.org:443".to_string()], GrantTable::new(), echo).await;
    let hello = rustls_hello("pypi.org");
    // Half a hello, then nothing.
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let mut buf = [0u8; 1];
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(HELLO_TIMEOUT + Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // Not before the timeout: a slow client gets all of it.
    assert!(
        started.elapsed() >= HELLO_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    match g.events.recv().await.unwrap() {
        EgressEvent::ConnectionRefused { reason, .. } => {
            assert!(reason.contains("no complete ClientHello"), "{reason}")
        }
        other => panic!("unexpected event {other:?}"),
    }
}
