//! The credential proxy's cost on loopback (a benchmark that prints figures; not a test).
//!
//! It sets up the primary path as the component tests do (the sidecar's proxy code on a Unix
//! socket in place of vsock, the host relay, the device's link, a local HTTPS server that
//! demands the credential) and compares, for the same HTTPS server:
//! - **direct**: a client making the HTTPS call itself (reqwest + rustls, the same client the
//!   device uses), the way an agent holding the key would;
//! - **proxied, new conn**: the agent's plain HTTP request to the sidecar proxy on a connection
//!   of its own (`Connection: close`), relayed to the device, which makes the same HTTPS call;
//! - **proxied, keep-alive**: the same over one persistent agent connection.
//!
//! Both proxied paths reuse the proxy's pooled session to the device, as an agent's would.
//!
//! It prints p50/p99 latency per request, the added latency (proxied minus direct), requests
//! per second one at a time, and download throughput for a large body (the median of interleaved
//! rounds, and the median of each round's ratio to direct).
//!
//! Run: `cargo bench -p nanoclaw-tests --bench proxy` (set `BENCH_REQUESTS` to change the
//! count of small requests, `BENCH_DOWNLOADS` that of downloads).

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nanoclaw_tests::credential;
use nanoclaw_tests::http::read_response;
use nanoclaw_tests::upstream::{make_ca, start_upstream};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One request on a new agent connection that asks to close (no keep-alive).
fn proxied(proxy: std::net::SocketAddr, path: &str) -> usize {
    let mut s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_nodelay(true).ok();
    write!(
        s,
        "GET /svc{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );
    raw.len()
}

/// An agent that keeps its connection to the proxy open across requests.
struct KeepAlive {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn new(proxy: std::net::SocketAddr) -> Self {
        let writer = TcpStream::connect(proxy).expect("connect to the proxy");
        writer.set_nodelay(true).ok();
        let reader = BufReader::with_capacity(256 * 1024, writer.try_clone().expect("clone"));
        Self { writer, reader }
    }

    fn get(&mut self, path: &str) -> usize {
        write!(
            self.writer,
            "GET /svc{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .expect("write");
        let (status, _, body) = read_response(&mut self.reader).expect("an answer");
        assert_eq!(status, 200);
        body.len()
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let big: usize = 16 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = credential::random_secret();
    let ca = make_ca(dir.path());
    let upstream = rt.block_on(start_upstream(&ca, &["api.test"], &secret));
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = credential::make_vault(dir.path(), &api, &api, &secret);
    let relay =
        host_agent::relay::Relay::open(&dir.path().join("host"), "bench-host").expect("relay");
    let (addr, _listener) = rt
        .block_on(relay.listen("127.0.0.1:0".parse().expect("addr")))
        .expect("listen");
    rt.block_on(credential::pair(&vault, &relay, addr));
    let _device = rt.block_on(credential::start_device(
        &vault,
        &ca,
        vec![("api.test".into(), upstream.addr)],
    ));
    rt.block_on(relay.wait_linked());
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).expect("vm dir");
    let sc = credential::sidecar();
    let _vm = rt.block_on(async { credential::attach(&relay, &vm_dir, &sc, sc.public) });
    let proxy = credential::start_proxy(&vm_dir, &sc);

    let cert =
        reqwest::Certificate::from_pem(&std::fs::read(&ca.pem_path).expect("ca")).expect("pem");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .resolve("api.test", upstream.addr)
        .build()
        .expect("client");
    let auth = format!("Bearer {secret}");
    let direct = |path: String| {
        let (client, auth) = (client.clone(), auth.clone());
        let url = format!("https://{api}{path}");
        rt.block_on(async move {
            let r = client
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .expect("direct call");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("body").len()
        })
    };

    // Warm up every path.
    let mut kept = KeepAlive::new(proxy);
    for _ in 0..20 {
        direct("/hello".into());
        proxied(proxy, "/hello");
        kept.get("/hello");
    }
    let mut d = Vec::with_capacity(n);
    let mut p = Vec::with_capacity(n);
    let mut k = Vec::with_capacity(n);
    // Interleave, so drifts in machine load hit every path alike.
    for _ in 0..n {
        let t = Instant::now();
        direct("/hello".into());
        d.push(t.elapsed());
        let t = Instant::now();
        proxied(proxy, "/hello");
        p.push(t.elapsed());
        let t = Instant::now();
        kept.get("/hello");
        k.push(t.elapsed());
    }
    let total = |v: &[Duration]| -> Duration { v.iter().sum() };
    let (dt, pt, kt) = (total(&d), total(&p), total(&k));
    d.sort();
    p.sort();
    k.sort();
    println!(
        "credential proxy on loopback, {n} sequential requests per path (the upstream closes each \
         HTTPS connection, so every path pays a TLS handshake upstream)"
    );
    let row = |name: &str, v: &[Duration], t: Duration| {
        println!(
            "  {name:<22} p50 {:7.3} ms  p99 {:7.3} ms  {:7.1} req/s",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            n as f64 / t.as_secs_f64()
        );
    };
    row("direct", &d, dt);
    row("proxied, new conn", &p, pt);
    row("proxied, keep-alive", &k, kt);
    for (name, v) in [("new conn", &p), ("keep-alive", &k)] {
        println!(
            "  added, {name:<15} p50 {:7.3} ms  p99 {:7.3} ms",
            ms(percentile(v, 0.5)) - ms(percentile(&d, 0.5)),
            ms(percentile(v, 0.99)) - ms(percentile(&d, 0.99))
        );
    }
    // Interleaved rounds, so drifts in machine load hit every path alike; the median round
    // of each path, and the median of each round's ratio to direct.
    let rounds: usize = std::env::var("BENCH_DOWNLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let mbs = |t: Duration| big as f64 / t.as_secs_f64() / 1e6;
    let (mut dr, mut pr, mut kr) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        assert!(direct(format!("/big/{big}")) >= big);
        dr.push(mbs(t.elapsed()));
        let t = Instant::now();
        assert!(proxied(proxy, &format!("/big/{big}")) >= big);
        pr.push(mbs(t.elapsed()));
        let t = Instant::now();
        assert!(kept.get(&format!("/big/{big}")) >= big);
        kr.push(mbs(t.elapsed()));
    }
    let median = |v: &[f64]| -> f64 {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratio = |v: &[f64]| -> f64 {
        let r: Vec<f64> = v.iter().zip(&dr).map(|(x, d)| x / d).collect();
        median(&r)
    };
    let (direct_mbs, proxied_mbs, kept_mbs) = (median(&dr), median(&pr), median(&kr));
    let (proxied_ratio, kept_ratio) = (ratio(&pr), ratio(&kr));
    println!(
        "  download of {} MiB, median of {rounds} interleaved rounds: direct {direct_mbs:.0} MB/s, \
         proxied {proxied_mbs:.0} MB/s ({:.0}% of direct, median per round), keep-alive \
         {kept_mbs:.0} MB/s ({:.0}%); target >= 50%",
        big >> 20,
        100.0 * proxied_ratio,
        100.0 * kept_ratio
    );
}
