//! Sessions driven through a fake [`SessionContext`]: the test plays the sidecar (the Noise IK
//! initiator, over the same record channel the link feeds), the fake plays the device's vault,
//! approvals and reports. Upstream calls go to a closed local port, so every case here ends
//! before or at the connection; the component tests under `tests/` cover real upstreams.

use std::sync::Mutex;

use serde_bytes::ByteBuf;
use shared_proto::credential::{ProxyRequest, noise as handshake, session_prologue};
use tokio::task::JoinHandle;
use x25519_dalek::{PublicKey, StaticSecret};

use super::*;
use crate::approval::ApprovalCheckError;
use crate::moves::HostVm;
use crate::tokenize::Registry;
use crate::vault::{Entry, KdfParams, Secret, Vault};

const VM: &str = "vm-1";
const SIDECAR_SECRET: [u8; 32] = [7; 32];
/// The link key of the host the sessions come from.
const HOST: [u8; 32] = [0xa; 32];
/// Another paired host's link key.
const OTHER_HOST: [u8; 32] = [0xb; 32];

/// The device as a session sees it, with answers set by each test.
struct Fake {
    identity: Zeroizing<[u8; 32]>,
    data: Option<VaultData>,
    approved: Vec<Grant>,
    can_ask: bool,
    /// What `request_approval` answers (once).
    approval: Mutex<Option<Result<Grant, ApprovalCheckError>>>,
    /// The asks made: credential, target host, the asking session's origin.
    asked: Mutex<Vec<(String, String, HostVm)>>,
    /// The reports sent, with the link each went on.
    reports: Mutex<Vec<([u8; 32], DeviceToHost)>>,
    /// The sessions whose handshake completed.
    handshakes: Mutex<Vec<SessionPeer>>,
    tokens: Registry,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl SessionContext for Fake {
    fn identity_secret(&self) -> Zeroizing<[u8; 32]> {
        self.identity.clone()
    }

    fn snapshot(&self) -> Result<VaultData, VaultError> {
        self.data
            .clone()
            .ok_or_else(|| VaultError::NotAVault("vault".into()))
    }

    fn approved_grants(&self, _now_unix: u64) -> Vec<Grant> {
        self.approved.clone()
    }

    fn can_ask(&self) -> bool {
        self.can_ask
    }

    fn request_approval(
        &self,
        peer: &SessionPeer,
        credential: &str,
        target_host: &str,
    ) -> impl Future<Output = Result<Grant, ApprovalCheckError>> + Send {
        self.asked.lock().unwrap().push((
            credential.to_owned(),
            target_host.to_owned(),
            peer.origin.clone(),
        ));
        let answer = self
            .approval
            .lock()
            .unwrap()
            .take()
            .unwrap_or(Err(ApprovalCheckError::LinkDown));
        async move { answer }
    }

    fn tokens(&self) -> &Registry {
        &self.tokens
    }

    fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn handshake_done(&self, peer: &SessionPeer) {
        self.handshakes.lock().unwrap().push(peer.clone());
    }

    fn notify_host(&self, host: &[u8; 32], msg: DeviceToHost) {
        self.reports.lock().unwrap().push((*host, msg));
    }
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A device whose vault holds `entries` and `grants`; `api.test` resolves to 127.0.0.1.
fn fake(entries: Vec<Entry>, grants: Vec<Grant>) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let mut vault = Vault::create(&dir.path().join("vault"), b"pw", KdfParams::FAST_FOR_TESTS)
        .expect("a vault");
    for e in entries {
        vault.add(e).unwrap();
    }
    vault.data.grants = grants;
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .resolve("api.test", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    Fake {
        identity: vault.identity_secret(),
        data: Some(vault.data.clone()),
        approved: Vec::new(),
        can_ask: false,
        approval: Mutex::new(None),
        asked: Mutex::new(Vec::new()),
        reports: Mutex::new(Vec::new()),
        handshakes: Mutex::new(Vec::new()),
        tokens: Registry::default(),
        http,
        _dir: dir,
    }
}

fn entry(name: &str, host: &str, secret: &[u8]) -> Entry {
    Entry {
        name: name.into(),
        secret: Secret::new(secret.to_vec()),
        hosts: vec![host.into()],
        header: "Authorization".into(),
        format: "Bearer {}".into(),
    }
}

fn grant(credential: &str, host: &str, fallback: bool) -> Grant {
    Grant {
        credential: credential.into(),
        host: host.into(),
        vm: VM.into(),
        on: Some(HOST),
        expires_at: u64::MAX,
        fallback,
    }
}

/// The peer of a session from `host` for `vm`, with the test sidecar's key and `origin`.
fn peer_on(host: [u8; 32], vm: &str, origin: HostVm) -> SessionPeer {
    SessionPeer {
        host,
        vm_id: vm.into(),
        boot_id: [1; 16],
        sidecar_public_key: public(SIDECAR_SECRET),
        origin,
    }
}

fn service(name: &str) -> ProxyTarget {
    ProxyTarget::Service {
        name: name.into(),
        path_and_query: "/v1/x".into(),
    }
}

fn request(target: ProxyTarget) -> SidecarToDevice {
    SidecarToDevice::Request(ProxyRequest {
        target,
        method: "POST".into(),
        headers: vec![("x-agent".into(), ByteBuf::from(b"1".to_vec()))],
    })
}

/// The sidecar's end of one session under test.
struct Sidecar {
    to_device: mpsc::Sender<Vec<u8>>,
    from_device: mpsc::Receiver<Vec<u8>>,
    records: RecordDecoder,
    /// Set once the handshake is done.
    transport: Option<snow::TransportState>,
    session: JoinHandle<Result<(), NoiseError>>,
}

impl Sidecar {
    /// Runs a session against `ctx` and completes the handshake, the first record cut in two
    /// byte runs as the link may deliver it.
    async fn open(ctx: Arc<Fake>) -> Sidecar {
        Self::open_as(ctx, peer_on(HOST, VM, HostVm::new(HOST, VM))).await
    }

    /// As [`Sidecar::open`], for a session the device sees as `peer`.
    async fn open_as(ctx: Arc<Fake>, peer: SessionPeer) -> Sidecar {
        let (mut sidecar, mut hs) = Self::start_as(ctx, peer);
        let answer = sidecar.next_record().await.expect("the handshake answer");
        handshake::read_handshake(&mut hs, &answer).unwrap();
        sidecar.transport = Some(hs.into_transport_mode().unwrap());
        sidecar
    }

    /// Starts a session whose host announced `announced` as the sidecar's key, and sends the
    /// first handshake message.
    fn start(ctx: Arc<Fake>, announced: [u8; 32]) -> (Sidecar, snow::HandshakeState) {
        let mut peer = peer_on(HOST, VM, HostVm::new(HOST, VM));
        peer.sidecar_public_key = announced;
        Self::start_as(ctx, peer)
    }

    fn start_as(ctx: Arc<Fake>, peer: SessionPeer) -> (Sidecar, snow::HandshakeState) {
        let prologue = session_prologue(&peer.vm_id, &peer.boot_id).unwrap();
        let device = public(*ctx.identity);
        let (to_device, rx) = mpsc::channel(64);
        let (out, from_device) = mpsc::channel(64);
        let session = tokio::spawn(run(ctx, peer, rx, out));
        let mut hs = handshake::session_initiator(&SIDECAR_SECRET, &device, &prologue).unwrap();
        let first = handshake::write_handshake(&mut hs, &[]).unwrap();
        let mut record = Vec::new();
        credential::encode_record(&first, &mut record).unwrap();
        let (a, b) = record.split_at(3);
        to_device.try_send(a.to_vec()).unwrap();
        to_device.try_send(b.to_vec()).unwrap();
        (
            Sidecar {
                to_device,
                from_device,
                records: RecordDecoder::new(),
                transport: None,
                session,
            },
            hs,
        )
    }

    async fn next_record(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(r) = self.records.decode_next().unwrap() {
                return Some(r);
            }
            let bytes = self.from_device.recv().await?;
            self.records.push(&bytes);
        }
    }

    async fn send(&mut self, msg: &SidecarToDevice) {
        let plain = credential::encode_message(msg).unwrap();
        let transport = self.transport.as_mut().expect("the handshake is done");
        let sealed = handshake::seal(transport, &plain).unwrap();
        let mut record = Vec::new();
        credential::encode_record(&sealed, &mut record).unwrap();
        self.to_device.send(record).await.unwrap();
    }

    async fn recv(&mut self) -> DeviceToSidecar {
        let record = self.next_record().await.expect("an answer");
        let transport = self.transport.as_mut().expect("the handshake is done");
        let plain = handshake::open(transport, &record).unwrap();
        credential::decode_message(&plain).unwrap()
    }

    /// Sends a request and its (empty) body, and answers the device's first message.
    async fn call(&mut self, target: ProxyTarget) -> DeviceToSidecar {
        self.send(&request(target)).await;
        self.send(&SidecarToDevice::End).await;
        self.recv().await
    }

    /// Waits for the device to end the session.
    async fn ended(self) -> Result<(), NoiseError> {
        drop(self.to_device);
        self.session.await.unwrap()
    }
}

fn public(secret: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret)).to_bytes()
}

#[track_caller]
fn assert_refused(answer: &DeviceToSidecar, status: u16, reason: &str) {
    match answer {
        DeviceToSidecar::Refused {
            status: s,
            reason: r,
        } => {
            assert_eq!(*s, status, "{r}");
            assert!(r.contains(reason), "{r:?} does not say {reason:?}");
        }
        other => panic!("expected Refused {status}, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unknown_service_is_refused_without_asking() {
    let ctx = Arc::new(fake(vec![entry("svc", "api.test", b"k")], vec![]));
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    let answer = s.call(service("nope")).await;
    assert_refused(&answer, 404, "no credential named \"nope\"");
    s.ended().await.unwrap();
    assert!(ctx.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn without_a_grant_or_a_passkey_the_call_is_refused_without_asking() {
    let ctx = Arc::new(fake(vec![entry("svc", "api.test", b"k")], vec![]));
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    let answer = s.call(service("svc")).await;
    assert_refused(&answer, 403, "no live grant for svc to api.test");
    s.ended().await.unwrap();
    assert!(ctx.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_approval_refuses_the_call_with_its_reason() {
    let mut ctx = fake(vec![entry("svc", "api.test", b"k")], vec![]);
    ctx.can_ask = true;
    let ctx = Arc::new(ctx);
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    let answer = s.call(service("svc")).await;
    assert_refused(
        &answer,
        403,
        &format!(
            "no live grant for svc to api.test: {}",
            ApprovalCheckError::LinkDown
        ),
    );
    s.ended().await.unwrap();
    assert_eq!(
        *ctx.asked.lock().unwrap(),
        [("svc".into(), "api.test".into(), HostVm::new(HOST, VM))]
    );
}

#[tokio::test]
async fn an_approved_grant_releases_the_held_call() {
    let host = format!("api.test:{}", closed_port());
    let mut ctx = fake(vec![entry("svc", &host, b"k")], vec![]);
    ctx.can_ask = true;
    *ctx.approval.lock().unwrap() = Some(Ok(grant("svc", &host, false)));
    let ctx = Arc::new(ctx);
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    // The call goes upstream, where nothing listens.
    let answer = s.call(service("svc")).await;
    assert_refused(&answer, 502, &format!("upstream {host} failed"));
    s.ended().await.unwrap();
    assert_eq!(ctx.asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn grants_from_earlier_approvals_count_without_asking() {
    let host = format!("api.test:{}", closed_port());
    let mut ctx = fake(vec![entry("svc", &host, b"k")], vec![]);
    ctx.can_ask = true;
    ctx.approved = vec![grant("svc", &host, false)];
    let ctx = Arc::new(ctx);
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    let answer = s
        .call(ProxyTarget::Absolute {
            authority: host.clone(),
            path_and_query: "/".into(),
        })
        .await;
    assert_refused(&answer, 502, &format!("upstream {host} failed"));
    s.ended().await.unwrap();
    assert!(ctx.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_credential_that_is_no_header_value_is_never_sent() {
    let ctx = Arc::new(fake(
        vec![entry("svc", "api.test", b"bad\x7fkey")],
        vec![grant("svc", "api.test", false)],
    ));
    let mut s = Sidecar::open(ctx).await;
    let answer = s.call(service("svc")).await;
    assert_refused(&answer, 500, "the credential is not a valid header");
    s.ended().await.unwrap();
}

#[tokio::test]
async fn an_unavailable_vault_refuses_the_call() {
    let mut ctx = fake(vec![], vec![]);
    ctx.data = None;
    let mut s = Sidecar::open(Arc::new(ctx)).await;
    let answer = s.call(service("svc")).await;
    assert_refused(&answer, 503, "the vault is unavailable");
    s.ended().await.unwrap();
}

#[tokio::test]
async fn messages_out_of_order_are_refused() {
    let ctx = Arc::new(fake(vec![entry("svc", "api.test", b"k")], vec![]));
    // A request whose body is interrupted by a seal.
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    s.send(&request(service("svc"))).await;
    s.send(&SidecarToDevice::Body(b"part".to_vec())).await;
    s.send(&SidecarToDevice::Seal {
        target: service("svc"),
    })
    .await;
    assert_refused(&s.recv().await, 400, "unexpected message");
    // Out of step: the device ends the session itself.
    assert!(s.next_record().await.is_none());
    s.ended().await.unwrap();
    // An exchange that opens with a body.
    let mut s = Sidecar::open(ctx).await;
    s.send(&SidecarToDevice::End).await;
    assert_refused(
        &s.recv().await,
        400,
        "an exchange opens with a request or a seal",
    );
    assert!(s.next_record().await.is_none());
    s.ended().await.unwrap();
}

#[tokio::test]
async fn a_session_carries_exchanges_one_after_the_other_each_checked_on_its_own() {
    let mut ctx = fake(
        vec![
            entry("svc", "api.test", b"k"),
            entry("fb", "fb.test", b"sealed-secret"),
        ],
        vec![grant("fb", "fb.test", true)],
    );
    ctx.can_ask = true;
    let ctx = Arc::new(ctx);
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    // The first call has no grant: the user is asked (the fake answers that the link is down).
    assert_refused(&s.call(service("svc")).await, 403, "no live grant");
    // The second, on the same session, is checked afresh: asked again.
    assert_refused(&s.call(service("svc")).await, 403, "no live grant");
    assert_eq!(ctx.asked.lock().unwrap().len(), 2);
    // A seal, then a call to an unknown service, on the same session still.
    s.send(&SidecarToDevice::Seal {
        target: service("fb"),
    })
    .await;
    assert!(matches!(s.recv().await, DeviceToSidecar::Sealed { .. }));
    assert_refused(&s.call(service("nosuch")).await, 404, "no credential");
    // The sidecar closing the idle session is its normal end.
    s.ended().await.unwrap();
}

#[tokio::test]
async fn a_sidecar_key_other_than_the_announced_one_ends_the_session() {
    let ctx = Arc::new(fake(vec![], vec![]));
    let (s, _hs) = Sidecar::start(Arc::clone(&ctx), public([9; 32]));
    assert!(matches!(s.ended().await, Err(NoiseError::UnexpectedPeer)));
    // Not a completed handshake: no move is marked arrived by it.
    assert!(ctx.handshakes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_seal_needs_a_grant_that_allows_the_fallback() {
    let ctx = Arc::new(fake(
        vec![entry("svc", "api.test", b"k")],
        vec![grant("svc", "api.test", false)],
    ));
    let mut s = Sidecar::open(ctx).await;
    s.send(&SidecarToDevice::Seal {
        target: service("svc"),
    })
    .await;
    assert_refused(&s.recv().await, 403, "no live grant for svc to api.test");
    s.ended().await.unwrap();

    let ctx = Arc::new(fake(
        vec![entry("svc", "api.test", b"k")],
        vec![grant("svc", "api.test", true)],
    ));
    let mut s = Sidecar::open(ctx).await;
    s.send(&SidecarToDevice::Seal {
        target: service("svc"),
    })
    .await;
    match s.recv().await {
        DeviceToSidecar::Sealed {
            authority,
            header,
            format,
            envelope,
        } => {
            assert_eq!(authority, "api.test");
            assert_eq!(
                (header.as_str(), format.as_str()),
                ("Authorization", "Bearer {}")
            );
            assert_eq!(envelope.header.vm_id, VM);
        }
        other => panic!("expected Sealed, got {other:?}"),
    }
    s.ended().await.unwrap();
}

#[tokio::test]
async fn a_grant_on_one_host_does_not_serve_another_hosts_vm_of_the_same_id() {
    let host = format!("api.test:{}", closed_port());
    let ctx = Arc::new(fake(
        vec![entry("svc", &host, b"k")],
        vec![grant("svc", &host, false)],
    ));
    // Host B's own VM named `vm-1`: refused, and its ask would be for (B, vm-1).
    let on_b = peer_on(OTHER_HOST, VM, HostVm::new(OTHER_HOST, VM));
    let mut s = Sidecar::open_as(Arc::clone(&ctx), on_b).await;
    assert_refused(&s.call(service("svc")).await, 403, "no live grant");
    s.ended().await.unwrap();
    // The same id on host A, which the grant names: it goes upstream.
    let mut s = Sidecar::open(Arc::clone(&ctx)).await;
    assert_refused(
        &s.call(service("svc")).await,
        502,
        &format!("upstream {host} failed"),
    );
    s.ended().await.unwrap();
}

#[tokio::test]
async fn a_session_that_moved_here_gets_its_origins_grants_and_asks_for_it() {
    let host = format!("api.test:{}", closed_port());
    let mut ctx = fake(
        vec![entry("svc", &host, b"k"), entry("other", "api.test", b"o")],
        vec![grant("svc", &host, false)],
    );
    ctx.can_ask = true;
    let ctx = Arc::new(ctx);
    // From host B as `vm-9`, resolved (by the device) to host A's `vm-1`.
    let moved = peer_on(OTHER_HOST, "vm-9", HostVm::new(HOST, VM));
    let mut s = Sidecar::open_as(Arc::clone(&ctx), moved).await;
    assert_refused(
        &s.call(service("svc")).await,
        502,
        &format!("upstream {host} failed"),
    );
    // An ask is for the origin.
    assert_refused(&s.call(service("other")).await, 403, "no live grant");
    s.ended().await.unwrap();
    assert_eq!(
        *ctx.asked.lock().unwrap(),
        [("other".into(), "api.test".into(), HostVm::new(HOST, VM))]
    );
    // The device heard of the completed handshake, with the peer as announced.
    let done = ctx.handshakes.lock().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].host, done[0].vm_id.as_str()), (OTHER_HOST, "vm-9"));
    assert!(done[0].moved_here());
}
