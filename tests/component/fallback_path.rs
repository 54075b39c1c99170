//! The fallback path end to end on loopback: the device seals the secret to the sidecar's boot
//! key, the host relays the envelope inside the session, and the sidecar's proxy opens it and
//! makes the HTTPS call itself. Envelopes the device really sealed are then replayed, tampered
//! with, aged and sent to another VM's opener: each is refused.

use std::sync::Arc;

use nanoclaw_tests::credential::{
    PASSPHRASE, Sidecar, VM, attach, make_vault, pair, random_secret, sidecar, start_device,
};
use nanoclaw_tests::http::http;
use nanoclaw_tests::upstream::{Upstream, make_ca, start_upstream};
use shared_proto::credential::{DeviceToSidecar, ProxyTarget, SidecarToDevice};
use shared_proto::envelope::EnvelopeError;
use vpod_sidecar::proxy::channel::DeviceSession;
use vpod_sidecar::proxy::fallback::{Fallback, FallbackTls};
use vpod_sidecar::proxy::{self, IdentityCell, ProxyIdentity};

struct World {
    _dir: tempfile::TempDir,
    upstream: Upstream,
    vault: std::path::PathBuf,
    vm_dir: std::path::PathBuf,
    sc: Sidecar,
    ca_pem: Vec<u8>,
    api: String,
    _relay: Arc<host_agent::relay::Relay>,
    _vm: host_agent::relay::VmRelay,
}

async fn world(secret: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let upstream = start_upstream(&ca, &["api.test", "other.test"], secret).await;
    let port = upstream.addr.port();
    let api = format!("api.test:{port}");
    let vault = make_vault(dir.path(), &api, &format!("other.test:{port}"), secret);
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let (addr, _l) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, addr).await;
    let _device = start_device(&vault, &ca, vec![("api.test".into(), upstream.addr)]).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .unwrap();
    let vm_dir = dir.path().join("vm");
    std::fs::create_dir(&vm_dir).unwrap();
    let sc = sidecar();
    let vm = attach(&relay, &vm_dir, &sc, sc.public);
    let ca_pem = std::fs::read(&ca.pem_path).unwrap();
    World {
        _dir: dir,
        upstream,
        vault,
        vm_dir,
        sc,
        ca_pem,
        api,
        _relay: relay,
        _vm: vm,
    }
}

fn identity(sc: &Sidecar) -> ProxyIdentity {
    ProxyIdentity {
        boot_secret: zeroize::Zeroizing::new(sc.secret),
        boot_id: sc.boot_id,
    }
}

fn start_fallback_proxy(w: &World) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = FallbackTls::from_pem(&w.ca_pem, vec![("api.test".into(), w.upstream.addr)]).unwrap();
    let fallback = Arc::new(Fallback::new(tls));
    let socket = host_agent::relay::proxy_socket_path(&w.vm_dir);
    let connect = Arc::new(move || std::os::unix::net::UnixStream::connect(&socket));
    let id = Arc::new(IdentityCell::from(identity(&w.sc)));
    std::thread::spawn(move || proxy::serve_with(&listener, id, connect, Some(fallback)));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecar_opens_the_envelope_and_makes_the_call() {
    let secret = random_secret();
    let w = world(&secret).await;
    let proxy = start_fallback_proxy(&w);
    let api = w.api.clone();
    let vault = w.vault.clone();
    let (ok, proxied, refused, ungranted) = tokio::task::spawn_blocking(move || {
        let ok = http(
            proxy,
            "POST /svc/hello HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        );
        let proxied = http(proxy, &format!("GET http://{api}/hello HTTP/1.1\r\n\r\n"));
        let refused = http(proxy, "GET http://evil.test/x HTTP/1.1\r\n\r\n");
        let ungranted = http(proxy, "GET /other/x HTTP/1.1\r\n\r\n");
        (ok, proxied, refused, ungranted)
    })
    .await
    .unwrap();
    assert_eq!((ok.0, ok.1.as_str()), (200, "hello abc"));
    assert_eq!((proxied.0, proxied.1.as_str()), (200, "hello "));
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert_eq!(ungranted.0, 403, "{}", ungranted.1);
    {
        let seen = w.upstream.seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 2);
        for (_, _, auth) in &seen.requests {
            assert_eq!(auth.as_deref(), Some(format!("Bearer {secret}").as_str()));
        }
    }

    // A grant without `fallback` does not release the secret into the guest.
    let mut v = vault_device::vault::Vault::open(&vault, PASSPHRASE).unwrap();
    v.data.grants[0].fallback = false;
    v.save().unwrap();
    let (status, body) =
        tokio::task::spawn_blocking(move || http(proxy, "GET /svc/hello HTTP/1.1\r\n\r\n"))
            .await
            .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(w.upstream.seen.lock().unwrap().requests.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_envelopes_are_refused() {
    let secret = random_secret();
    let w = world(&secret).await;
    let socket = host_agent::relay::proxy_socket_path(&w.vm_dir);
    let id = identity(&w.sc);
    let sealed = tokio::task::spawn_blocking(move || {
        let seal_one = || {
            let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            let mut s = DeviceSession::open(stream, &id.boot_secret, &id.boot_id).unwrap();
            s.send(&SidecarToDevice::Seal {
                target: ProxyTarget::Service {
                    name: "svc".into(),
                    path_and_query: "/".into(),
                },
            })
            .unwrap();
            match s.recv().unwrap() {
                DeviceToSidecar::Sealed { envelope, .. } => (s.vm_id().to_owned(), envelope),
                other => panic!("{other:?}"),
            }
        };
        (seal_one(), seal_one())
    })
    .await
    .unwrap();
    let ((vm_id, first), (_, second)) = sealed;
    assert_eq!(vm_id, VM);
    let now = first.header.expires_at - 30;
    let fallback = Fallback::new(FallbackTls::from_pem(&w.ca_pem, vec![]).unwrap());
    let id = Arc::new(identity(&w.sc));

    // Tampered (one ciphertext bit, the expiry, the request id): refused, and no id is burned.
    let mut t = first.clone();
    t.ciphertext[0] ^= 1;
    assert_eq!(
        fallback.open_envelope(&id, VM, &t, now),
        Err(EnvelopeError::Tampered)
    );
    let mut t = first.clone();
    t.header.expires_at -= 1;
    assert_eq!(
        fallback.open_envelope(&id, VM, &t, now),
        Err(EnvelopeError::Tampered)
    );
    let mut t = first.clone();
    t.header.request_id[0] ^= 1;
    assert_eq!(
        fallback.open_envelope(&id, VM, &t, now),
        Err(EnvelopeError::Tampered)
    );
    // Expired.
    assert!(matches!(
        fallback.open_envelope(&id, VM, &first, first.header.expires_at),
        Err(EnvelopeError::Expired { .. })
    ));
    // The genuine one opens to the secret, once.
    let opened = fallback.open_envelope(&id, VM, &first, now).unwrap();
    assert_eq!(&opened[..], secret.as_bytes());
    assert_eq!(
        fallback.open_envelope(&id, VM, &first, now),
        Err(EnvelopeError::Replayed)
    );
    // Another VM's sidecar (same key, other VM id) refuses it.
    let other_vm = Fallback::new(FallbackTls::from_pem(&w.ca_pem, vec![]).unwrap());
    assert_eq!(
        other_vm.open_envelope(&id, "vm-other", &second, now),
        Err(EnvelopeError::WrongVm)
    );
    // And another sidecar's key cannot open it.
    let stranger = Arc::new(identity(&sidecar()));
    let fresh = Fallback::new(FallbackTls::from_pem(&w.ca_pem, vec![]).unwrap());
    assert_eq!(
        fresh.open_envelope(&stranger, VM, &second, now),
        Err(EnvelopeError::Tampered)
    );
}
