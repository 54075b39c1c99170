//! The credential proxy's persistent paths, on loopback as in [`super::primary_path`]: the
//! agent's keep-alive connections, one end-to-end session reused across requests (counted at
//! the relay socket: one connection is one handshake), chunked request bodies, and a relay that
//! breaks under a session.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanoclaw_tests::credential::{
    RelayConnections, attach, make_vault, pair, random_secret, sidecar, start_device,
    start_proxy_watched,
};
use nanoclaw_tests::http::read_response;
use nanoclaw_tests::upstream::{Seen, Upstream, make_ca, start_upstream};

/// The primary path set up with a watched proxy.
struct World {
    proxy: SocketAddr,
    relay_connections: RelayConnections,
    upstream: Upstream,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let secret = random_secret();
    let upstream = start_upstream(&ca, &["api.test"], &secret).await;
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = make_vault(dir.path(), &api, &api, &secret);
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let (relay_addr, listener) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, relay_addr).await;
    let device = start_device(&vault, &ca, vec![("api.test".into(), upstream.addr)]).await;
    tokio::time::timeout(Duration::from_secs(10), relay.wait_linked())
        .await
        .expect("the device links up");
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let sc = sidecar();
    let vm = attach(&relay, &vm_dir, &sc, sc.public);
    let (proxy, relay_connections) = start_proxy_watched(&vm_dir, &sc);
    World {
        proxy,
        relay_connections,
        upstream,
        _keep: Box::new((dir, relay, listener, device, vm)),
    }
}

fn connect(proxy: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn text(body: &[u8]) -> &str {
    std::str::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_on_one_agent_connection_share_one_session() {
    let w = world().await;
    let (proxy, relays) = (w.proxy, w.relay_connections.clone());
    let seen: Arc<Mutex<Seen>> = Arc::clone(&w.upstream.seen);
    tokio::task::spawn_blocking(move || {
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"POST /svc/hello HTTP/1.1\r\nContent-Length: 3\r\n\r\none")
            .unwrap();
        let (status, head, body) = read_response(&mut r).unwrap();
        assert_eq!((status, text(&body)), (200, "hello one"));
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        s.write_all(b"POST /svc/hello HTTP/1.1\r\nContent-Length: 3\r\n\r\ntwo")
            .unwrap();
        let (status, _, body) = read_response(&mut r).unwrap();
        assert_eq!((status, text(&body)), (200, "hello two"));
        // Two requests written at once (pipelined) are answered in order, not mixed up.
        s.write_all(
            b"POST /svc/hello HTTP/1.1\r\nContent-Length: 5\r\n\r\nthreePOST /svc/hello HTTP/1.1\r\nContent-Length: 4\r\n\r\nfour",
        )
        .unwrap();
        let (_, _, body) = read_response(&mut r).unwrap();
        assert_eq!(text(&body), "hello three");
        let (_, _, body) = read_response(&mut r).unwrap();
        assert_eq!(text(&body), "hello four");
        // A refusal by the device keeps the connection in step too.
        s.write_all(b"GET /nosuch/x HTTP/1.1\r\n\r\n").unwrap();
        let (status, _, _) = read_response(&mut r).unwrap();
        assert_eq!(status, 404);
        // `Connection: close` is honoured: the answer says so and the connection ends.
        s.write_all(b"GET /svc/hello HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (status, head, _) = read_response(&mut r).unwrap();
        assert_eq!(status, 200);
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(read_response(&mut r).is_none(), "the proxy closed the connection");

        // A second agent connection reuses the idle session too.
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"GET /svc/hello HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r).unwrap().0, 200);

        // Seven exchanges, each authorised on its own (six made upstream), over one handshake.
        assert_eq!(relays.opened(), 1);
        assert_eq!(seen.lock().unwrap().requests.len(), 6);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunked_body_arrives_upstream_intact_and_a_bad_one_is_400() {
    let w = world().await;
    let proxy = w.proxy;
    let seen = Arc::clone(&w.upstream.seen);
    tokio::task::spawn_blocking(move || {
        // Chunks with an extension and a trailer, on a kept-alive connection.
        let (mut s, mut r) = connect(proxy);
        s.write_all(
            b"POST /svc/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n7;ext=1\r\ned body\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .unwrap();
        let (status, _, body) = read_response(&mut r).unwrap();
        assert_eq!((status, text(&body)), (200, "hello chunked body"));
        // A larger body, in many chunks, then another request on the same connection.
        let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut raw = b"POST /svc/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for piece in big.chunks(7_777) {
            raw.extend_from_slice(format!("{:X}\r\n", piece.len()).as_bytes());
            raw.extend_from_slice(piece);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        s.write_all(&raw).unwrap();
        let (status, _, _) = read_response(&mut r).unwrap();
        assert_eq!(status, 200);
        s.write_all(b"GET /svc/hello HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r).unwrap().0, 200);
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.bodies.len(), 3);
            assert_eq!(seen.bodies[0], b"chunked body");
            assert_eq!(seen.bodies[1], big);
        }

        // Malformed chunked bodies: 400, the connection closed, nothing sent upstream.
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 6\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
        ] {
            let (mut s, mut r) = connect(proxy);
            let mut raw = b"POST /svc/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            raw.extend_from_slice(bad);
            s.write_all(&raw).unwrap();
            let (status, head, body) = read_response(&mut r).unwrap();
            assert_eq!(status, 400, "{}: {}", String::from_utf8_lossy(bad), text(&body));
            assert!(head.to_ascii_lowercase().contains("connection: close"));
            assert!(read_response(&mut r).is_none());
        }
        // Over the body bound: 413.
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"POST /svc/hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000001\r\n")
            .unwrap();
        assert_eq!(read_response(&mut r).unwrap().0, 413);
        assert_eq!(seen.lock().unwrap().bodies.len(), 3);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_relay_is_a_502_and_the_next_request_gets_a_new_session() {
    let w = world().await;
    let (proxy, relays) = (w.proxy, w.relay_connections.clone());
    let seen = Arc::clone(&w.upstream.seen);
    let upstream = Arc::new(w.upstream);
    let _keep = w._keep;
    let up = Arc::clone(&upstream);
    tokio::task::spawn_blocking(move || {
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"GET /svc/hello HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r).unwrap().0, 200);
        assert_eq!(relays.opened(), 1);

        // A call in flight (the upstream holds its answer) when the relay breaks: a clear 502,
        // not a hang.
        s.write_all(b"GET /svc/held HTTP/1.1\r\n\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().requests.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the held call reaches the upstream"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        relays.break_all();
        let (status, _, body) = read_response(&mut r).unwrap();
        assert_eq!(status, 502, "{}", text(&body));
        assert!(read_response(&mut r).is_none(), "closed after the 502");
        up.release();

        // The next request makes a new session and succeeds.
        let (mut s, mut r) = connect(proxy);
        s.write_all(b"POST /svc/hello HTTP/1.1\r\nContent-Length: 5\r\n\r\nagain")
            .unwrap();
        let (status, _, body) = read_response(&mut r).unwrap();
        assert_eq!((status, text(&body)), (200, "hello again"));
        assert_eq!(relays.opened(), 2);

        // A relay that breaks while the session is idle costs nothing but a new handshake.
        relays.break_all();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(b"GET /svc/hello HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut r).unwrap().0, 200);
        assert_eq!(relays.opened(), 3);
    })
    .await
    .unwrap();
}
