//! The test HTTPS server that demands the credential: a CA of its own ([`make_ca`], trusted by the
//! device only) and a server ([`start_upstream`]) that answers only requests carrying the right
//! bearer token, recording what it saw.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// What the HTTPS server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// `(host header, path, authorization)` of each request.
    pub requests: Vec<(String, String, Option<String>)>,
    /// Whether the SSE handler's pause was ended by the client (not by its timeout).
    pub sse_released_by_client: Option<bool>,
    /// The body of each request, in order.
    pub bodies: Vec<Vec<u8>>,
    /// The `accept-encoding` of each request.
    pub accept_encodings: Vec<Option<String>>,
}

/// The email address the `/json` route answers with.
pub const RESPONSE_EMAIL: &str = "ops.lead@corp.example";

/// The test HTTPS server: `/hello` answers 200 `hello <body>` with the right bearer token,
/// 401 otherwise; `/big/N` answers N bytes; `/sse` sends one event, waits until
/// [`Upstream::release`] (or 10 s), sends a second and ends; `/held` answers nothing until
/// [`Upstream::release`] (or 10 s), then `held`; `/json` answers JSON holding the
/// request body as a string and [`RESPONSE_EMAIL`]; `/octet` answers `contact
/// <RESPONSE_EMAIL>` as `application/octet-stream`; `/echo` answers the request's
/// `authorization` back, in an `x-echo` header and (octet-stream, a byte at a time in chunks)
/// the body, as a careless debugging endpoint would.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens (on 127.0.0.1); clients resolve the test's names to it.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
    release: Arc<Notify>,
}

impl Upstream {
    /// Lets the pending `/sse` response send its last event.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// The test CA: its certificate (as PEM at `pem_path`) and key, which sign the server's
/// certificate.
pub struct Ca {
    /// The CA certificate, PEM: the device's (or a client's) only trusted root.
    pub pem_path: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("pem_path", &self.pem_path)
            .finish_non_exhaustive()
    }
}

/// Makes a CA and writes its certificate to `dir/ca.pem`.
pub fn make_ca(dir: &Path) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "nanoclaw test CA");
    let cert = params.self_signed(&key).unwrap();
    let pem_path = dir.join("ca.pem");
    std::fs::write(&pem_path, cert.pem()).unwrap();
    Ca {
        pem_path,
        cert,
        key,
    }
}

/// Starts the server on 127.0.0.1 with a certificate from `ca` for `names`, accepting the bearer
/// token `secret`.
pub async fn start_upstream(ca: &Ca, names: &[&str], secret: &str) -> Upstream {
    let expected = format!("Bearer {secret}");
    let leaf_key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf = params.signed_by(&leaf_key, &ca.cert, &ca.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let release = Arc::new(Notify::new());
    let (s, r) = (Arc::clone(&seen), Arc::clone(&release));
    let expected = Arc::new(expected);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let (seen, release) = (Arc::clone(&s), Arc::clone(&r));
            let expected = Arc::clone(&expected);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                if req.parse(&head).is_err() {
                    return;
                }
                let path = req.path.unwrap_or_default().to_owned();
                let get = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let auth = get("authorization");
                let host = get("host").unwrap_or_default();
                let len: usize = get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = tls.read_exact(&mut body).await;
                {
                    let mut seen = seen.lock().unwrap();
                    seen.requests.push((host, path.clone(), auth.clone()));
                    seen.bodies.push(body.clone());
                    seen.accept_encodings.push(get("accept-encoding"));
                }
                let authorized = auth.as_deref() == Some(expected.as_str());
                if !authorized {
                    let _ = tls
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 13\r\nconnection: close\r\n\r\nunauthorized\n")
                        .await;
                    let _ = tls.shutdown().await;
                    return;
                }
                if path == "/sse" {
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                        .await;
                    let first = b"data: first\n\n";
                    let _ = tls
                        .write_all(format!("{:x}\r\n", first.len()).as_bytes())
                        .await;
                    let _ = tls.write_all(first).await;
                    let _ = tls.write_all(b"\r\n").await;
                    let _ = tls.flush().await;
                    let by_client =
                        tokio::time::timeout(Duration::from_secs(10), release.notified())
                            .await
                            .is_ok();
                    seen.lock().unwrap().sse_released_by_client = Some(by_client);
                    let last = b"data: last\n\n";
                    let _ = tls
                        .write_all(format!("{:x}\r\n", last.len()).as_bytes())
                        .await;
                    let _ = tls.write_all(last).await;
                    let _ = tls.write_all(b"\r\n0\r\n\r\n").await;
                    let _ = tls.flush().await;
                } else if path == "/held" {
                    // Nothing until released (or 10 s): a call in flight.
                    let _ = tokio::time::timeout(Duration::from_secs(10), release.notified()).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nheld")
                        .await;
                } else if path == "/json" {
                    let reply = serde_json::json!({
                        "got": String::from_utf8_lossy(&body),
                        "contact": RESPONSE_EMAIL,
                    })
                    .to_string();
                    let _ = tls
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                                reply.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                } else if path == "/octet" {
                    let reply = format!("contact {RESPONSE_EMAIL}\n");
                    let _ = tls
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                                reply.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                } else if path == "/echo" {
                    let auth = auth.unwrap_or_default();
                    let _ = tls
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nx-echo: {auth}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                    let body = format!("you sent: {auth}\n");
                    for byte in body.as_bytes() {
                        let _ = tls.write_all(b"1\r\n").await;
                        let _ = tls.write_all(&[*byte]).await;
                        let _ = tls.write_all(b"\r\n").await;
                        let _ = tls.flush().await;
                    }
                    let _ = tls.write_all(b"0\r\n\r\n").await;
                } else if let Some(size) = path.strip_prefix("/big/") {
                    let size: usize = size.parse().unwrap_or(0).min(64 << 20);
                    let _ = tls
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                    let block = vec![b'x'; 64 * 1024];
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(block.len());
                        if tls.write_all(&block[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                } else {
                    let reply = format!("hello {}", String::from_utf8_lossy(&body));
                    let _ = tls
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                                reply.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    Upstream {
        addr,
        seen,
        release,
    }
}
