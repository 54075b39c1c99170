//! The component fixture shared by the credential tests: a real HTTPS server that demands the
//! credential (its CA trusted by the device only), a paired device and host relay on loopback,
//! and the sidecar's proxy code running on the host over a Unix socket in place of vsock.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_agent::relay::{Relay, VmIdentity, VmRelay, proxy_socket_path};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use vault_device::device::{self, Device, DeviceConfig};
use vault_device::grant::Grant;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
use vpod_sidecar::proxy::{self, ProxyIdentity};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// A fresh credential for one test. It is drawn at run time, never a constant: the test
/// binary also runs as the daemon and the agent, and a constant would sit in their mapped
/// executable and defeat the memory scans.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    format!("sk-live-{}", hex::encode(bytes))
}
/// A second credential that has no grant.
pub const UNGRANTED_SECRET: &str = "sk-ungranted-Qm3Zr8Tn5Wb2Xc7Vy4Ud9Ke1";
/// The VM id.
pub const VM: &str = "vm-test-1";
pub const PASSPHRASE: &[u8] = b"correct horse battery staple";

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
/// [`Upstream::release`] (or 10 s), sends a second and ends; `/json` answers JSON holding the
/// request body as a string and [`RESPONSE_EMAIL`].
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    release: Arc<Notify>,
}

impl Upstream {
    pub fn release(&self) {
        self.release.notify_one();
    }
}

pub struct Ca {
    pub pem_path: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

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

/// A vault with the granted credential `svc` (to `api.test:PORT`) and the ungranted `other`
/// (to `api.test:PORT` and `other.test:PORT`).
pub fn make_vault(dir: &Path, api: &str, other: &str, secret: &str) -> PathBuf {
    let path = dir.join("device.vault");
    let mut vault = Vault::create(&path, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    vault
        .add(Entry {
            name: "svc".into(),
            secret: Secret::new(secret.as_bytes().to_vec()),
            hosts: vec![api.to_owned()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        })
        .unwrap();
    vault
        .add(Entry {
            name: "other".into(),
            secret: Secret::new(UNGRANTED_SECRET.as_bytes().to_vec()),
            hosts: vec![other.to_owned()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        })
        .unwrap();
    vault.data.grants.push(Grant {
        credential: "svc".into(),
        host: api.to_owned(),
        vm: VM.into(),
        expires_at: u64::MAX,
        fallback: true,
    });
    vault.save().unwrap();
    path
}

/// Pairs the vault with the relay listening at `addr`.
pub async fn pair(vault: &Path, relay: &Relay, addr: SocketAddr) {
    let mut v = Vault::open(vault, PASSPHRASE).unwrap();
    let code = relay.pairing_code().unwrap();
    device::pair(&mut v, &addr.to_string(), &code, "test-phone")
        .await
        .unwrap();
    assert!(relay.paired_device().is_some());
}

/// Starts the device's link (in this process) and waits until the relay sees it.
pub async fn start_device(
    vault: &Path,
    ca: &Ca,
    resolve: Vec<(String, SocketAddr)>,
) -> Arc<Device> {
    let device = Device::open(DeviceConfig {
        vault: vault.to_owned(),
        passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
        ca_files: vec![ca.pem_path.clone()],
        resolve,
        approval_wait: device::DEFAULT_APPROVAL_WAIT,
    })
    .unwrap();
    tokio::spawn(Arc::clone(&device).serve());
    device
}

/// The sidecar's boot identity.
pub struct Sidecar {
    pub secret: [u8; 32],
    pub public: [u8; 32],
    pub boot_id: [u8; 16],
}

pub fn sidecar() -> Sidecar {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    Sidecar {
        public: PublicKey::from(&secret).to_bytes(),
        secret: secret.to_bytes(),
        boot_id: [0x5a; 16],
    }
}

/// Attaches the VM to the relay with the given announced sidecar key.
pub fn attach(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    announced: [u8; 32],
) -> VmRelay {
    attach_with(relay, vm_dir, sidecar, announced, None)
}

/// [`attach`] for an agent whose tokenizer the host shares with the device.
pub fn attach_tokenized(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    tokens: Arc<host_agent::mcp::AgentTokens>,
) -> VmRelay {
    attach_with(relay, vm_dir, sidecar, sidecar.public, Some(tokens))
}

fn attach_with(
    relay: &Arc<Relay>,
    vm_dir: &Path,
    sidecar: &Sidecar,
    announced: [u8; 32],
    tokens: Option<Arc<host_agent::mcp::AgentTokens>>,
) -> VmRelay {
    relay
        .attach_vm(
            vm_dir,
            VmIdentity {
                vm_id: VM.into(),
                boot_id: sidecar.boot_id,
                sidecar_public_key: announced,
                tokens,
            },
        )
        .unwrap()
}

/// Runs the sidecar's proxy on a thread, connecting to the VM's relay socket; returns its
/// address.
pub fn start_proxy(vm_dir: &Path, sidecar: &Sidecar) -> SocketAddr {
    let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = Arc::new(ProxyIdentity {
        boot_secret: Zeroizing::new(sidecar.secret),
        boot_id: sidecar.boot_id,
    });
    let socket = proxy_socket_path(vm_dir);
    let connect = Arc::new(move || std::os::unix::net::UnixStream::connect(&socket));
    std::thread::spawn(move || proxy::serve(&listener, identity, connect));
    addr
}

/// A raw HTTP/1.1 exchange with the proxy: the status and the body (chunked decoding done).
pub fn http(proxy: SocketAddr, request: &str) -> (u16, String) {
    let mut s = StdTcpStream::connect(proxy).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        (status, out)
    } else {
        (status, body.to_owned())
    }
}
