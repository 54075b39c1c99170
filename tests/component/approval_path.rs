//! Credential releases approved with a passkey and re-checked by the device, on loopback with
//! real peers: agent -> sidecar proxy -> host relay -> device; the device, holding no grant,
//! asks the host; the host's approver asks the user (here a software authenticator, a `p256`
//! key, signing as a browser would); the device verifies the evidence itself, grants, and calls
//! the real HTTPS server.
//!
//! A compromised host is played by [`ForgingApprover`], an `Approver` that answers "approved"
//! with evidence it made up: each forgery must be refused by the device with its typed error
//! and the HTTPS server must see nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use host_agent::approval::passkey::{ApprovalConfig, ApprovalEvidence, PasskeyApprover};
use host_agent::approval::{ApprovalAction, ApprovalOutcome, ApprovalSubject, Approver, DenyAll};
use host_agent::relay::{Relay, VmRelay};
use nanoclaw_audit::AuditLog;
use nanoclaw_tests::authenticator::{ORIGIN, SoftAuthenticator, UP, UV};
use nanoclaw_tests::credential::{
    PASSPHRASE, UNGRANTED_SECRET, VM, attach, pair, random_secret, sidecar, start_proxy,
};
use nanoclaw_tests::http::http;
use nanoclaw_tests::upstream::{Upstream, make_ca, start_upstream};
use shared_proto::approval::{ApprovalRequest, RelyingParty, RequestAction};
use shared_proto::credential::APPROVAL_REQUEST_ARG;
use vault_device::approval::{ApprovalCheckError, Ask, GrantRecord, PasskeyFile, check_evidence};
use vault_device::device::{Device, DeviceConfig};
use vault_device::moves::HostVm;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
use zeroize::Zeroizing;

fn rp() -> RelyingParty {
    RelyingParty {
        rp_id: "localhost".into(),
        origin: ORIGIN.into(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A vault with `svc` (to `api`) and `other` (to `api` and `other`), and no grants at all.
fn make_ungranted_vault(dir: &Path, api: &str, other: &str, secret: &str) -> PathBuf {
    let path = dir.join("device.vault");
    let mut vault = Vault::create(&path, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    for (name, secret, hosts) in [
        ("svc", secret, vec![api.to_owned()]),
        (
            "other",
            UNGRANTED_SECRET,
            vec![api.to_owned(), other.to_owned()],
        ),
    ] {
        vault
            .add(Entry {
                name: name.into(),
                secret: Secret::new(secret.as_bytes().to_vec()),
                hosts,
                header: "Authorization".into(),
                format: "Bearer {}".into(),
            })
            .unwrap();
    }
    vault.save().unwrap();
    path
}

struct Fixture {
    _dir: tempfile::TempDir,
    host_dir: PathBuf,
    vault: PathBuf,
    relay: Arc<Relay>,
    _device: Arc<Device>,
    upstream: Upstream,
    api: String,
    other: String,
    proxy: SocketAddr,
    _vm: VmRelay,
    auth: Arc<Mutex<SoftAuthenticator>>,
}

impl Fixture {
    /// The device (waiting at most `approval_wait`), paired and linked, with the soft
    /// authenticator's passkey imported as `vault-device passkey import` does; one VM.
    async fn new(approval_wait: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca(dir.path());
        let secret = random_secret();
        let upstream = start_upstream(&ca, &["api.test", "other.test"], &secret).await;
        let port = upstream.addr.port();
        let api = format!("api.test:{port}");
        let other = format!("other.test:{port}");
        let vault = make_ungranted_vault(dir.path(), &api, &other, &secret);
        let host_dir = dir.path().join("host");
        let relay = Relay::open(&host_dir, "test-host").unwrap();
        let (relay_addr, _listener) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        pair(&vault, &relay, relay_addr).await;

        let auth = SoftAuthenticator::new();
        // The host's passkeys file, as the approval server writes it after a registration.
        std::fs::write(
            host_dir.join("passkeys.json"),
            serde_json::to_vec(&vec![auth.passkey()]).unwrap(),
        )
        .unwrap();
        let path = PasskeyFile::path_for(&vault);
        let mut store = PasskeyFile::load(&path).unwrap();
        store
            .import(
                &std::fs::read(host_dir.join("passkeys.json")).unwrap(),
                &rp(),
                &path,
            )
            .unwrap();
        store.save(&path).unwrap();

        let device = Device::open(DeviceConfig {
            vault: vault.clone(),
            passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
            ca_files: vec![ca.pem_path.clone()],
            resolve: vec![
                ("api.test".to_owned(), upstream.addr),
                ("other.test".to_owned(), upstream.addr),
            ],
            approval_wait,
        })
        .unwrap();
        tokio::spawn(Arc::clone(&device).serve());
        tokio::time::timeout(Duration::from_secs(10), relay.wait_linked())
            .await
            .expect("the device links up");
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let sc = sidecar();
        let vm = attach(&relay, &vm_dir, &sc, sc.public);
        let proxy = start_proxy(&vm_dir, &sc);
        Self {
            _dir: dir,
            host_dir,
            vault,
            relay,
            _device: device,
            upstream,
            api,
            other,
            proxy,
            _vm: vm,
            auth: Arc::new(Mutex::new(auth)),
        }
    }

    fn passkey_approver(&self, ttl: Duration) -> PasskeyApprover {
        let audit = AuditLog::open(self.host_dir.join("audit.ndjson")).unwrap();
        let approver = PasskeyApprover::new(
            ApprovalConfig {
                rp: rp(),
                ttl,
                passkeys_file: Some(self.host_dir.join("passkeys.json")),
            },
            Arc::new(audit),
            vec![],
        )
        .unwrap();
        self.relay.set_approver(Arc::new(approver.clone()));
        approver
    }

    /// The agent's call through the proxy, on a blocking thread.
    async fn call(&self, request: String) -> (u16, String) {
        let proxy = self.proxy;
        tokio::task::spawn_blocking(move || http(proxy, &request))
            .await
            .unwrap()
    }

    fn upstream_requests(&self) -> usize {
        self.upstream.seen.lock().unwrap().requests.len()
    }

    fn grant_log(&self) -> Vec<GrantRecord> {
        let path = vault_device::approval::GrantLog::for_vault(&self.vault)
            .path()
            .to_owned();
        match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

async fn wait_pending(approver: &PasskeyApprover) -> host_agent::approval::passkey::PendingView {
    for _ in 0..500 {
        if let Some(p) = approver.pending().into_iter().next() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no approval request reached the approver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approved_release_is_verified_by_the_device_and_the_call_goes_through() {
    let f = Fixture::new(Duration::from_secs(30)).await;
    let approver = f.passkey_approver(Duration::from_secs(60));

    let call = f.call("GET /svc/hello HTTP/1.1\r\n\r\n".into());
    let approve = async {
        let pending = wait_pending(&approver).await;
        // The user sees exactly what the device asked about.
        assert_eq!(pending.request.vm_id, VM);
        assert_eq!(
            pending.request.action,
            RequestAction::Credential {
                name: "svc".into(),
                target_host: f.api.clone(),
            }
        );
        assert_eq!(f.upstream_requests(), 0, "nothing is sent while waiting");
        let assertion = f
            .auth
            .lock()
            .unwrap()
            .assert(&pending.request.challenge().unwrap());
        approver.approve(&pending.request.id, &assertion).unwrap();
        pending.request.id
    };
    let ((status, body), approval_id) = tokio::join!(call, approve);
    assert_eq!((status, body.as_str()), (200, "hello "), "{body}");

    // The device recorded the grant it created, for exactly this credential, host and VM.
    let log = f.grant_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].approval_id, approval_id);
    assert_eq!(
        (
            log[0].grant.credential.as_str(),
            log[0].grant.host.as_str(),
            log[0].grant.vm.as_str()
        ),
        ("svc", f.api.as_str(), VM)
    );
    assert!(!log[0].grant.fallback);
    let now = now_ms() / 1000;
    assert!(log[0].grant.expires_at > now && log[0].grant.expires_at <= now + 300);
    // The device stored the new counter and the used approval id.
    let store = PasskeyFile::load(&PasskeyFile::path_for(&f.vault)).unwrap();
    assert_eq!(store.passkeys[0].counter, 1);
    assert_eq!(store.used_approvals, vec![approval_id]);
    use std::os::unix::fs::PermissionsExt;
    for path in [
        PasskeyFile::path_for(&f.vault),
        vault_device::approval::GrantLog::for_vault(&f.vault)
            .path()
            .to_owned(),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }

    // The grant now covers the next call without asking.
    let (status, _) = f.call("GET /svc/hello HTTP/1.1\r\n\r\n".into()).await;
    assert_eq!(status, 200);
    assert!(approver.pending().is_empty());
    // The host audited the request and the approval.
    let audit = std::fs::read_to_string(f.host_dir.join("audit.ndjson")).unwrap();
    assert!(audit.contains("\"approval_request\""), "{audit}");
    assert!(audit.contains("\"approval\""), "{audit}");
    assert_eq!(f.upstream_requests(), 2);
    for (_, _, auth) in f.upstream.seen.lock().unwrap().requests.iter() {
        assert!(auth.as_deref().unwrap().starts_with("Bearer sk-live-"));
    }
}

/// How the compromised host forges the evidence for the device's ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forgery {
    /// Genuine evidence, but with a short expiry (to be replayed later).
    GenuineShortLived,
    OtherCredential,
    OtherHost,
    OtherVm,
    UnregisteredKey,
    /// The evidence of the previous approval, sent again.
    Replay,
    UvCleared,
}

/// A compromised host: "approves" every ask at once with evidence it made.
struct ForgingApprover {
    forgery: Forgery,
    auth: Arc<Mutex<SoftAuthenticator>>,
    other_host: String,
    last: Arc<Mutex<Option<ApprovalEvidence>>>,
    made: Mutex<Option<ApprovalEvidence>>,
}

impl std::fmt::Debug for ForgingApprover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgingApprover")
            .field("forgery", &self.forgery)
            .finish()
    }
}

/// The approval request a host would build for `subject`, then altered by `forgery`.
fn forged_request(
    subject: &ApprovalSubject,
    forgery: Forgery,
    other_host: &str,
) -> ApprovalRequest {
    let ApprovalAction::Credential { name, target_host } = &subject.action else {
        panic!("the relay asks about credentials");
    };
    let (mut name, mut target_host) = (name.clone(), target_host.clone());
    let mut vm_id = subject.vm_id.clone();
    let mut ttl = 60_000;
    match forgery {
        Forgery::OtherCredential => name = "other".into(),
        Forgery::OtherHost => target_host = other_host.to_owned(),
        Forgery::OtherVm => vm_id = "vm-someone-else".into(),
        Forgery::GenuineShortLived => ttl = 1_500,
        _ => {}
    }
    let now = now_ms();
    let mut nonce = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    ApprovalRequest {
        id: hex::encode(&nonce[..8]),
        agent: subject.agent.clone(),
        vm_id,
        profile: subject.profile.clone(),
        action: RequestAction::Credential { name, target_host },
        arguments: host_agent::approval::passkey::canonical_json(&subject.arguments),
        rule: subject.rule.clone(),
        reason: subject.reason.clone(),
        created_unix_ms: now,
        expires_unix_ms: now + ttl,
        nonce,
    }
}

impl ForgingApprover {
    fn forge(&self, subject: &ApprovalSubject) -> ApprovalEvidence {
        if self.forgery == Forgery::Replay {
            return self
                .last
                .lock()
                .unwrap()
                .clone()
                .expect("an earlier approval");
        }
        let request = forged_request(subject, self.forgery, &self.other_host);
        let challenge = request.challenge().unwrap();
        let assertion = match self.forgery {
            Forgery::UnregisteredKey => {
                // The registered credential id, but a key the user never registered.
                let mut stranger = SoftAuthenticator::new();
                stranger.counter = 1000;
                stranger.assert(&challenge)
            }
            Forgery::UvCleared => {
                let mut auth = self.auth.lock().unwrap();
                auth.flags = UP;
                let a = auth.assert(&challenge);
                auth.flags = UP | UV;
                a
            }
            _ => self.auth.lock().unwrap().assert(&challenge),
        };
        let evidence = ApprovalEvidence {
            request: request.encode().unwrap(),
            assertion,
        };
        if self.forgery == Forgery::GenuineShortLived {
            *self.last.lock().unwrap() = Some(evidence.clone());
        }
        evidence
    }
}

impl Approver for ForgingApprover {
    fn request(
        &self,
        subject: ApprovalSubject,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + '_>> {
        let evidence = self.forge(&subject);
        *self.made.lock().unwrap() = Some(evidence);
        Box::pin(async {
            ApprovalOutcome::Approved {
                approval_id: "forged".into(),
            }
        })
    }

    fn take_evidence(&self, _approval_id: &str) -> Option<ApprovalEvidence> {
        self.made.lock().unwrap().take()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_host_cannot_mint_grants() {
    let f = Fixture::new(Duration::from_secs(30)).await;
    let last = Arc::new(Mutex::new(None));
    let set = |forgery| {
        f.relay.set_approver(Arc::new(ForgingApprover {
            forgery,
            auth: Arc::clone(&f.auth),
            other_host: f.other.clone(),
            last: Arc::clone(&last),
            made: Mutex::new(None),
        }))
    };

    // The positive control: honest evidence from this approver is accepted. Its grant lapses
    // in about a second, so that the device asks again below.
    set(Forgery::GenuineShortLived);
    let (status, body) = f.call("GET /svc/hello HTTP/1.1\r\n\r\n".into()).await;
    assert_eq!((status, body.as_str()), (200, "hello "), "{body}");
    assert_eq!(f.upstream_requests(), 1);
    // (The grant's expiry is the approval's, rounded up to a whole second.)
    tokio::time::sleep(Duration::from_millis(3100)).await;

    let cases = [
        (
            Forgery::OtherCredential,
            "for credential \"other\", not \"svc\"",
        ),
        (Forgery::OtherHost, "for target host"),
        (Forgery::OtherVm, "for VM \"vm-someone-else\""),
        (Forgery::UnregisteredKey, "the signature does not verify"),
        (Forgery::Replay, "does not answer this request"),
        (Forgery::UvCleared, "the user was not verified"),
    ];
    for (forgery, expected) in cases {
        set(forgery);
        let (status, body) = f.call("GET /svc/hello HTTP/1.1\r\n\r\n".into()).await;
        assert_eq!(status, 403, "{forgery:?}: {body}");
        assert!(body.contains(expected), "{forgery:?}: {body}");
        assert_eq!(
            f.upstream_requests(),
            1,
            "{forgery:?}: the credential was sent"
        );
    }
    // Only the genuine approval created a grant.
    assert_eq!(f.grant_log().len(), 1);
}

/// The same forgeries against [`check_evidence`] directly, each with its typed error.
#[test]
fn each_forgery_has_its_typed_error() {
    let mut auth = SoftAuthenticator::new();
    let mut store = PasskeyFile {
        rp_id: "localhost".into(),
        origin: ORIGIN.into(),
        on_device: false,
        passkeys: vec![auth.passkey()],
        used_approvals: vec![],
    };
    let ask = Ask {
        request: [7; 16],
        credential: "svc".into(),
        target_host: "api.test:443".into(),
        vm_id: VM.into(),
        // No host links here: any fixed link key names the VM's host.
        origin: HostVm::new([9; 32], VM),
    };
    let subject = ApprovalSubject {
        agent: "a".into(),
        vm_id: VM.into(),
        profile: "-".into(),
        action: ApprovalAction::Credential {
            name: "svc".into(),
            target_host: "api.test:443".into(),
        },
        arguments: serde_json::json!({ APPROVAL_REQUEST_ARG: hex::encode([7u8; 16]) }),
        rule: "r".into(),
        reason: "r".into(),
    };
    let sign = |auth: &mut SoftAuthenticator, forgery| {
        let r = forged_request(&subject, forgery, "other.test:443");
        let a = auth.assert(&r.challenge().unwrap());
        (r.encode().unwrap(), a)
    };
    let now = now_ms();
    for (forgery, check) in [
        (
            Forgery::OtherCredential,
            (|e| matches!(e, ApprovalCheckError::WrongCredential { .. }))
                as fn(&ApprovalCheckError) -> bool,
        ),
        (Forgery::OtherHost, |e| {
            matches!(e, ApprovalCheckError::WrongHost { .. })
        }),
        (Forgery::OtherVm, |e| {
            matches!(e, ApprovalCheckError::WrongVm { .. })
        }),
    ] {
        let (bytes, a) = sign(&mut auth, forgery);
        let e = check_evidence(&mut store, &ask, &bytes, &a, now).unwrap_err();
        assert!(check(&e), "{forgery:?}: {e:?}");
    }
    // Another ask's request id.
    let other_ask = Ask {
        request: [8; 16],
        ..ask.clone()
    };
    let (bytes, a) = sign(&mut auth, Forgery::GenuineShortLived);
    assert!(matches!(
        check_evidence(&mut store, &other_ask, &bytes, &a, now),
        Err(ApprovalCheckError::WrongRequest)
    ));
    // An unregistered key under the registered id; UV cleared.
    let mut stranger = SoftAuthenticator::new();
    let (bytes, a) = sign(&mut stranger, Forgery::GenuineShortLived);
    assert!(matches!(
        check_evidence(&mut store, &ask, &bytes, &a, now),
        Err(ApprovalCheckError::Verify(
            shared_proto::approval::ApprovalError::BadSignature
        ))
    ));
    auth.flags = UP;
    let (bytes, a) = sign(&mut auth, Forgery::GenuineShortLived);
    assert!(matches!(
        check_evidence(&mut store, &ask, &bytes, &a, now),
        Err(ApprovalCheckError::Verify(
            shared_proto::approval::ApprovalError::UserNotVerified
        ))
    ));
    auth.flags = UP | UV;
    // Genuine: accepted once, and the counter is stored; the same evidence again is refused.
    let (bytes, a) = sign(&mut auth, Forgery::GenuineShortLived);
    let request = check_evidence(&mut store, &ask, &bytes, &a, now).unwrap();
    assert_eq!(store.passkeys[0].counter, auth.counter);
    assert_eq!(store.used_approvals, vec![request.id.clone()]);
    assert!(matches!(
        check_evidence(&mut store, &ask, &bytes, &a, now),
        Err(ApprovalCheckError::AlreadyUsed(id)) if id == request.id
    ));
    // Expired, and non-canonical bytes.
    let (bytes, a) = sign(&mut auth, Forgery::GenuineShortLived);
    assert!(matches!(
        check_evidence(&mut store, &ask, &bytes, &a, now + 10_000),
        Err(ApprovalCheckError::Verify(
            shared_proto::approval::ApprovalError::Expired
        ))
    ));
    assert!(matches!(
        check_evidence(&mut store, &ask, b"\xa0", &a, now),
        Err(ApprovalCheckError::Decode(_))
    ));
    // No passkey stored: nothing can be approved.
    let mut empty = PasskeyFile::default();
    assert!(matches!(
        check_evidence(&mut empty, &ask, &bytes, &a, now),
        Err(ApprovalCheckError::NoPasskey)
    ));
}

/// Never answers: the device's own bound must end the wait.
#[derive(Debug)]
struct SilentApprover;

impl Approver for SilentApprover {
    fn request(
        &self,
        _subject: ApprovalSubject,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn denied_expired_and_unanswered_approvals_are_clear_refusals() {
    let f = Fixture::new(Duration::from_secs(3)).await;
    let request = || "GET /svc/hello HTTP/1.1\r\n\r\n".to_owned();

    // No approvals configured on the host: DenyAll.
    f.relay.set_approver(Arc::new(DenyAll));
    let (status, body) = f.call(request()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("requires approval"), "{body}");

    // Denied by the user.
    let approver = f.passkey_approver(Duration::from_secs(60));
    let call = f.call(request());
    let deny = async {
        let pending = wait_pending(&approver).await;
        approver.deny(&pending.request.id).unwrap();
    };
    let ((status, body), ()) = tokio::join!(call, deny);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("denied by the user"), "{body}");

    // No answer before the approval's expiry.
    f.passkey_approver(Duration::from_millis(500));
    let (status, body) = f.call(request()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("expired"), "{body}");

    // The host never answers: the device's bounded wait ends it.
    f.relay.set_approver(Arc::new(SilentApprover));
    let (status, body) = f.call(request()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no approval within"), "{body}");

    assert_eq!(f.upstream_requests(), 0);
    assert!(f.grant_log().is_empty());
    let audit = std::fs::read_to_string(f.host_dir.join("audit.ndjson")).unwrap();
    assert!(
        audit.contains("\"denial\"") && audit.contains("\"expiry\""),
        "{audit}"
    );
}
