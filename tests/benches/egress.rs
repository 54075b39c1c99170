//! The connection-setup latency that network egress enforcement adds (a benchmark that prints
//! figures; not a test), on loopback, with the daemon's own resolver and SNI check:
//!
//! - **DNS**: an `A` query for an allowed name asked of the VM's resolver (which checks the
//!   policy, asks upstream with a fresh id, filters and records the answer) against the same
//!   query asked of the upstream server directly. The firewall update that a real VM's resolver
//!   makes before it answers (one `nft` run in the VM's namespace, needs root) is left out
//!   here: it is timed by the component test `vm_network` when run as root, and paid only when
//!   an address is new or its grant is near its end.
//! - **TLS setup**: a connection that sends a real ClientHello (made by rustls) and waits for the
//!   server's first byte, through the SNI check (which reads and parses the hello, checks the
//!   name against the policy and the resolver's grants, opens its own connection to the
//!   original destination and splices) against the same connection made directly.
//!
//! It prints p50/p99 of each and the added latency (through minus direct).
//!
//! Run: `cargo bench -p nanoclaw-tests --bench egress` (`BENCH_ROUNDS` changes the count).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::egress::{EgressPolicy, Resolver, SniGate};
use nanoclaw_tests::dns::{a_query, serve_upstream};

const NAME: &str = "allowed.test";
/// A documentation address: public in the resolver's eyes.
const ANSWER: [u8; 4] = [203, 0, 113, 7];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Asks `server` for [`NAME`] `rounds` times; each answer must carry [`ANSWER`].
fn time_dns(server: SocketAddr, rounds: usize) -> Vec<Duration> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1500];
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let started = Instant::now();
        s.send_to(&a_query(i as u16, NAME), server).unwrap();
        let n = s.recv(&mut buf).expect("a DNS answer");
        times.push(started.elapsed());
        assert!(buf[..n].ends_with(&ANSWER), "{:?}", &buf[..n]);
    }
    times.sort();
    times
}

/// A ClientHello for [`NAME`], as rustls sends it.
fn client_hello() -> Vec<u8> {
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), NAME.try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// A server that reads a ClientHello's record and answers one byte, per connection.
fn hello_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = [0u8; 5];
                if conn.read_exact(&mut head).is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
                let mut body = vec![0u8; len];
                if conn.read_exact(&mut body).is_ok() {
                    let _ = conn.write_all(b"S");
                    let mut rest = Vec::new();
                    let _ = conn.read_to_end(&mut rest);
                }
            });
        }
    });
    addr
}

/// Connects to `to` `rounds` times, sends `hello` and waits for the first byte back.
fn time_tls_setup(to: SocketAddr, hello: &[u8], rounds: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut s = TcpStream::connect(to).expect("connect");
        s.set_nodelay(true).ok();
        s.write_all(hello).unwrap();
        let mut first = [0u8; 1];
        s.read_exact(&mut first).expect("the server's first byte");
        times.push(started.elapsed());
        assert_eq!(&first, b"S");
    }
    times.sort();
    times
}

fn report(what: &str, direct: &[Duration], through: &[Duration]) {
    let (d50, t50) = (percentile(direct, 0.5), percentile(through, 0.5));
    println!(
        "{what}: direct p50 {:.3} ms p99 {:.3} ms; through the check p50 {:.3} ms p99 {:.3} ms; \
         added p50 {:.3} ms",
        ms(d50),
        ms(percentile(direct, 0.99)),
        ms(t50),
        ms(percentile(through, 0.99)),
        ms(t50.saturating_sub(d50)),
    );
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let policy = Arc::new(EgressPolicy::parse(&[format!("{NAME}:443")]).unwrap());
    let (events, mut drained) = tokio::sync::mpsc::channel(1024);
    rt.spawn(async move { while drained.recv().await.is_some() {} });

    // DNS, direct and through the resolver.
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        serve_upstream(upstream, |name| {
            (name == NAME).then_some(Ipv4Addr::from(ANSWER))
        })
    });
    let resolver = Resolver::new(Arc::clone(&policy), upstream_addr, events.clone());
    let socket = rt
        .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
        .unwrap();
    let resolver_addr = socket.local_addr().unwrap();
    let serving = resolver.clone();
    rt.spawn(async move { serving.serve_udp(socket).await });
    time_dns(upstream_addr, rounds / 10);
    time_dns(resolver_addr, rounds / 10);
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        direct.extend(time_dns(upstream_addr, rounds / 5));
        through.extend(time_dns(resolver_addr, rounds / 5));
    }
    direct.sort();
    through.sort();
    report("dns A query", &direct, &through);

    // TLS setup, direct and through the SNI check, to one server. The check is told the
    // original destination (on a VM, SO_ORIGINAL_DST after the firewall's redirect) and finds
    // it granted to the name, as the resolver would have.
    let server = hello_server();
    let SocketAddr::V4(server_v4) = server else {
        unreachable!("bound on 127.0.0.1")
    };
    let table = resolver.table();
    table.grant(*server_v4.ip(), NAME, Duration::from_secs(3600));
    let lookup =
        move |_: &tokio::net::TcpStream| -> std::io::Result<SocketAddrV4> { Ok(server_v4) };
    // The rule names the server's port (a VM's would name 443).
    let gate_policy =
        Arc::new(EgressPolicy::parse(&[format!("{NAME}:{}", server_v4.port())]).unwrap());
    drop(policy);
    let gate = SniGate::with_original_dst(gate_policy, table, events, lookup);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let gate_addr = listener.local_addr().unwrap();
    rt.spawn(async move { gate.serve(listener).await });
    let hello = client_hello();
    time_tls_setup(server, &hello, rounds / 10);
    time_tls_setup(gate_addr, &hello, rounds / 10);
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        direct.extend(time_tls_setup(server, &hello, rounds / 5));
        through.extend(time_tls_setup(gate_addr, &hello, rounds / 5));
    }
    direct.sort();
    through.sort();
    report("tls connection setup", &direct, &through);
}
