//! The device's own approval page (finding M7: the device shows a credential request itself and
//! the passkey signs it on the device's origin): a real `vault-device` `Device` in this process,
//! its page on loopback, driven over its JSON API with the software authenticator, and once by
//! headless Chromium with a virtual authenticator.
//!
//! A compromised host is played by assertions made for the host's origin and by requests other
//! than the one the device built: each must be refused, and no grant may follow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use nanoclaw_tests::authenticator::{ORIGIN as HOST_ORIGIN, SoftAuthenticator};
use nanoclaw_tests::browser;
use nanoclaw_tests::credential::PASSPHRASE;
use nanoclaw_tests::{DaemonOptions, free_port};
use serde_json::{Value, json};
use shared_proto::approval::{
    ApprovalError, ApprovalRequest, Assertion, RelyingParty, RequestAction,
};
use shared_proto::credential::APPROVAL_REQUEST_ARG;
use vault_device::approval::{ApprovalCheckError, Ask, GrantRecord, PasskeyFile, check_evidence};
use vault_device::approval_page::{self, ApprovalPage, PageError};
use vault_device::device::{Device, DeviceConfig, now_unix_ms};
use vault_device::grant::Grant;
use vault_device::moves::HostVm;
use vault_device::vault::{KdfParams, Vault};
use zeroize::Zeroizing;

const CREDENTIAL: &str = "svc";
const TARGET: &str = "api.test:443";
const VM: &str = "vm-0001";
/// The link key the asks name when the vault has no pairing (the device never links).
const UNPAIRED_HOST: [u8; 32] = [7; 32];

/// A device (no link, no credentials needed) with its approval page served on loopback.
struct PageFixture {
    dir: tempfile::TempDir,
    vault: PathBuf,
    device: Arc<Device>,
    /// The link key of the vault's pairing ([`UNPAIRED_HOST`] without one): the host of the
    /// VMs that ask.
    host: [u8; 32],
    page: ApprovalPage,
    addr: SocketAddr,
    origin: String,
    client: reqwest::Client,
}

async fn start(approval_wait: Duration) -> PageFixture {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("device.vault");
    Vault::create(&vault, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    start_with(dir, vault, approval_wait).await
}

/// The same, with the vault at `vault` (in `dir`) already made.
async fn start_with(
    dir: tempfile::TempDir,
    vault: PathBuf,
    approval_wait: Duration,
) -> PageFixture {
    let device = Device::open(DeviceConfig {
        vault: vault.clone(),
        passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
        ca_files: Vec::new(),
        resolve: Vec::new(),
        approval_wait,
    })
    .unwrap();
    let host = device
        .snapshot()
        .unwrap()
        .pairings
        .first()
        .map_or(UNPAIRED_HOST, |p| p.host_public_key);
    let (listener, rp) = approval_page::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let page = ApprovalPage::for_device(Arc::clone(&device), rp.clone());
    tokio::spawn(page.clone().serve(listener));
    let client = reqwest::Client::builder()
        .resolve("localhost", addr)
        .build()
        .unwrap();
    PageFixture {
        dir,
        vault,
        device,
        host,
        page,
        addr,
        origin: rp.origin,
        client,
    }
}

impl PageFixture {
    /// The VM `vm` on the fixture's host.
    fn vm(&self, vm: &str) -> HostVm {
        HostVm::new(self.host, vm)
    }

    /// Asks for the release of [`CREDENTIAL`] to [`TARGET`] for `vm` (which is its own origin).
    async fn request(device: &Device, vm: HostVm) -> Result<Grant, ApprovalCheckError> {
        device.request_approval(&vm, &vm, CREDENTIAL, TARGET).await
    }

    /// A request to the page, from the page itself (`Origin` = its origin) unless `origin` says
    /// otherwise (`Some("")`: no `Origin` at all). Answers the status and the JSON body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        origin: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.origin));
        match origin {
            None => req = req.header("origin", &self.origin),
            Some("") => {}
            Some(o) => req = req.header("origin", o),
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body), None)
            .await
    }

    /// Registers `auth` through the page's registration API, as the page's script would.
    async fn register(&self, auth: &SoftAuthenticator) {
        let link = self.page.open_registration();
        let token = link.split_once('#').unwrap().1;
        let (status, begin) = self
            .post("/api/register/begin", json!({"token": token}))
            .await;
        assert_eq!(status, 200, "{begin}");
        assert_eq!(begin["rp_id"], "localhost");
        let challenge = begin["challenge"].as_str().unwrap();
        let raw = B64URL.decode(challenge).unwrap();
        let reg = auth.register_for(&raw, &self.origin);
        let (status, done) = self
            .post(
                "/api/register/finish",
                json!({
                    "challenge": challenge,
                    "attestation_object": B64URL.encode(&reg.attestation_object),
                    "client_data_json": B64URL.encode(&reg.client_data_json),
                }),
            )
            .await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(done["credential_id"], B64URL.encode(&auth.id));
    }

    /// Starts a call's ask in the background; answers the task and the ask's page view once it
    /// is listed.
    async fn ask(
        &self,
    ) -> (
        tokio::task::JoinHandle<Result<Grant, ApprovalCheckError>>,
        Value,
    ) {
        let device = Arc::clone(&self.device);
        let vm = self.vm(VM);
        let task = tokio::spawn(async move { Self::request(&device, vm).await });
        for _ in 0..200 {
            let (status, list) = self.get("/api/approvals").await;
            assert_eq!(status, 200, "{list}");
            if let Some(v) = list.as_array().and_then(|l| l.first()) {
                let id = v["request"]["id"].as_str().unwrap();
                let (status, view) = self.get(&format!("/api/approvals/{id}")).await;
                assert_eq!(status, 200, "{view}");
                return (task, view);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the ask never showed on the page")
    }

    fn passkeys(&self) -> PasskeyFile {
        PasskeyFile::load(&PasskeyFile::path_for(&self.vault)).unwrap()
    }
}

fn challenge_of(view: &Value) -> [u8; 32] {
    B64URL
        .decode(view["challenge"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn assertion_json(a: &Assertion) -> Value {
    serde_json::to_value(a).unwrap()
}

async fn outcome(
    task: tokio::task::JoinHandle<Result<Grant, ApprovalCheckError>>,
) -> Result<Grant, ApprovalCheckError> {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the call still waits")
        .unwrap()
}

#[tokio::test]
async fn a_device_registered_passkey_approves_a_pending_ask_and_a_grant_follows() {
    let f = start(Duration::from_secs(60)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let store = f.passkeys();
    assert!(store.on_device);
    assert_eq!(store.origin, f.origin);
    assert_eq!(store.rp_id, "localhost");

    let (task, view) = f.ask().await;
    // The device built what the page shows: a credential release naming its own ask.
    let request: ApprovalRequest = serde_json::from_value(view["request"].clone()).unwrap();
    assert_eq!(
        request.action,
        RequestAction::Credential {
            name: CREDENTIAL.into(),
            target_host: TARGET.into()
        }
    );
    assert_eq!(request.vm_id, VM);
    let args: Value = serde_json::from_str(&request.arguments).unwrap();
    assert_eq!(args[APPROVAL_REQUEST_ARG].as_str().unwrap().len(), 32);
    assert_eq!(challenge_of(&view), request.challenge().unwrap());
    assert_eq!(view["rp_id"], "localhost");
    assert_eq!(view["credential_ids"], json!([B64URL.encode(&auth.id)]));

    let assertion = auth.assert_for(&challenge_of(&view), &f.origin);
    let id = request.id.clone();
    let (status, body) = f
        .post(
            &format!("/api/approvals/{id}/approve"),
            assertion_json(&assertion),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["approval_id"], json!(id));

    let grant = outcome(task).await.unwrap();
    assert_eq!(grant.credential, CREDENTIAL);
    assert_eq!(grant.host, TARGET);
    assert_eq!(grant.vm, VM);
    assert!(!grant.fallback);
    assert!(
        f.device
            .approved_grants(now_unix_ms() / 1000)
            .contains(&grant)
    );
    // Recorded in the grant log; the counter and the used id are stored.
    let log = std::fs::read_to_string(f.dir.path().join("device.vault.grants.log")).unwrap();
    let record: GrantRecord = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(record.approval_id, id);
    assert_eq!(record.grant, grant);
    let store = f.passkeys();
    assert_eq!(store.passkeys[0].counter, auth.counter);
    assert!(store.used_approvals.contains(&id));
    // Answered: no longer pending, and the same assertion does not approve it again.
    assert_eq!(f.get("/api/approvals").await.1, json!([]));
    let (status, _) = f
        .post(
            &format!("/api/approvals/{id}/approve"),
            assertion_json(&assertion),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_assertion_made_for_the_hosts_origin_is_refused() {
    let f = start(Duration::from_secs(60)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    // The right challenge, signed on the host's page (same rp id, another origin).
    let on_host = auth.assert_for(&challenge_of(&view), HOST_ORIGIN);
    let (status, body) = f
        .post(
            &format!("/api/approvals/{id}/approve"),
            assertion_json(&on_host),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(HOST_ORIGIN),
        "{body}"
    );
    // Still pending, no grant; the user can still approve on the device's page.
    assert!(f.device.approved_grants(0).is_empty());
    assert!(!task.is_finished());
    let good = auth.assert_for(&challenge_of(&view), &f.origin);
    let (status, _) = f
        .post(
            &format!("/api/approvals/{id}/approve"),
            assertion_json(&good),
        )
        .await;
    assert_eq!(status, 200);
    assert!(outcome(task).await.is_ok());
}

#[tokio::test]
async fn evidence_the_host_sends_is_refused_by_a_device_registered_store() {
    // What a compromised host could send as `ApprovalAnswer::Approved`: a well-formed request
    // for the very ask (naming its request id), signed by the user's own passkey on the host's
    // page. With the passkeys imported from the host it would pass; registered on the device,
    // the origin check refuses it.
    let mut auth = SoftAuthenticator::new();
    let ask = Ask {
        request: [5; 16],
        credential: CREDENTIAL.into(),
        target_host: TARGET.into(),
        vm_id: VM.into(),
        origin: HostVm::new(UNPAIRED_HOST, VM),
    };
    let now = now_unix_ms();
    let request = ApprovalRequest {
        id: "host-approval-1".into(),
        agent: format!("the agent in {VM}"),
        vm_id: VM.into(),
        profile: "-".into(),
        action: RequestAction::Credential {
            name: CREDENTIAL.into(),
            target_host: TARGET.into(),
        },
        arguments: json!({
            "credential": CREDENTIAL,
            "target_host": TARGET,
            APPROVAL_REQUEST_ARG: hex::encode(ask.request),
        })
        .to_string(),
        rule: "credential_without_grant".into(),
        reason: "-".into(),
        created_unix_ms: now,
        expires_unix_ms: now + 60_000,
        nonce: [6; 32],
    };
    let canonical = request.encode().unwrap();
    let assertion = auth.assert_for(&request.challenge().unwrap(), HOST_ORIGIN);

    let device_rp = approval_page::relying_party(45_123);
    let mut on_device = PasskeyFile::default();
    on_device.register(auth.passkey(), &device_rp).unwrap();
    let err = check_evidence(&mut on_device, &ask, &canonical, &assertion, now).unwrap_err();
    assert!(
        matches!(&err, ApprovalCheckError::Verify(ApprovalError::OriginMismatch(o)) if o == HOST_ORIGIN),
        "{err:?}"
    );
    assert!(on_device.used_approvals.is_empty());

    // The control: the same evidence against passkeys imported for the host's pages passes.
    let mut imported = PasskeyFile::default();
    let host_rp = RelyingParty {
        rp_id: "localhost".into(),
        origin: HOST_ORIGIN.into(),
    };
    let json = serde_json::to_vec(&[auth.passkey()]).unwrap();
    imported
        .import(&json, &host_rp, std::path::Path::new("host.json"))
        .unwrap();
    assert!(!imported.on_device);
    check_evidence(&mut imported, &ask, &canonical, &assertion, now).unwrap();
}

#[tokio::test]
async fn a_request_other_than_the_one_the_device_built_is_refused() {
    let f = start(Duration::from_secs(60)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    let shown: ApprovalRequest = serde_json::from_value(view["request"].clone()).unwrap();
    // Another target, another VM, other arguments: each a different challenge.
    let mut others = Vec::new();
    let mut r = shown.clone();
    r.action = RequestAction::Credential {
        name: CREDENTIAL.into(),
        target_host: "evil.test:443".into(),
    };
    others.push(r);
    let mut r = shown.clone();
    r.vm_id = "vm-other".into();
    others.push(r);
    let mut r = shown.clone();
    r.expires_unix_ms += 3_600_000;
    others.push(r);
    for other in others {
        let a = auth.assert_for(&other.challenge().unwrap(), &f.origin);
        let (status, body) = f
            .post(&format!("/api/approvals/{id}/approve"), assertion_json(&a))
            .await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("challenge"),
            "{body}"
        );
    }
    assert!(f.device.approved_grants(0).is_empty());
    assert!(!task.is_finished());
    assert!(f.passkeys().used_approvals.is_empty());
}

#[tokio::test]
async fn cross_origin_requests_and_oversized_bodies_are_refused() {
    let f = start(Duration::from_secs(60)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    let a = assertion_json(&auth.assert_for(&challenge_of(&view), &f.origin));
    let approve = format!("/api/approvals/{id}/approve");
    let deny = format!("/api/approvals/{id}/deny");
    let post = reqwest::Method::POST;
    // Another page's Origin, or none at all, cannot approve or deny.
    for origin in ["http://evil.test", "http://localhost:1", "null", ""] {
        let (status, body) = f
            .call(post.clone(), &approve, Some(a.clone()), Some(origin))
            .await;
        assert_eq!(status, 403, "{origin}: {body}");
        let (status, _) = f.call(post.clone(), &deny, None, Some(origin)).await;
        assert_eq!(status, 403, "{origin}");
    }
    // Nor a cross-site fetch that names no Origin the check would catch.
    let resp = f
        .client
        .post(format!("{}{approve}", f.origin))
        .header("origin", &f.origin)
        .header("sec-fetch-site", "cross-site")
        .json(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // A request that names another Host (a DNS-rebinding page) is refused, reads included.
    let resp = reqwest::Client::new()
        .get(format!("http://{}/api/approvals", f.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 421);
    // A cross-origin read is refused too.
    let (status, _) = f
        .call(
            reqwest::Method::GET,
            "/api/approvals",
            None,
            Some("http://evil.test"),
        )
        .await;
    assert_eq!(status, 403);
    // Registration from another page: refused before the token is even looked at.
    let (status, _) = f
        .call(
            post.clone(),
            "/api/register/begin",
            Some(json!({"token": "x"})),
            Some("http://evil.test"),
        )
        .await;
    assert_eq!(status, 403);
    // Bodies are bounded.
    let big = json!({"credential_id": "A".repeat(approval_page::MAX_BODY)});
    let (status, _) = f.post(&approve, big).await;
    assert_eq!(status, 413);
    // None of it touched the ask: the page itself still approves it.
    assert!(!task.is_finished());
    let (status, _) = f.post(&approve, a).await;
    assert_eq!(status, 200);
    assert!(outcome(task).await.is_ok());
    // And the page never listens beyond loopback.
    assert!(matches!(
        approval_page::bind("0.0.0.0:0".parse().unwrap()).await,
        Err(PageError::NotLoopback(_))
    ));
}

#[tokio::test]
async fn deny_refuses_the_ask_at_once() {
    let f = start(Duration::from_secs(60)).await;
    let auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    let (status, _) = f
        .post(&format!("/api/approvals/{id}/deny"), json!(null))
        .await;
    assert_eq!(status, 200);
    let err = outcome(task).await.unwrap_err();
    assert!(
        matches!(&err, ApprovalCheckError::Refused(r) if r.contains("denied")),
        "{err:?}"
    );
    assert_eq!(f.get("/api/approvals").await.1, json!([]));
    assert_eq!(
        f.get(&format!("/api/approvals/{id}")).await.0,
        404,
        "a denied ask is gone"
    );
    assert!(f.device.approved_grants(0).is_empty());
    // With the page no longer served, a device-registered store refuses to ask at once
    // (nobody could approve), instead of falling back to the host.
    f.device.set_approval_page(None);
    let err = PageFixture::request(&f.device, f.vm(VM)).await.unwrap_err();
    assert!(
        matches!(err, ApprovalCheckError::PageNotServed(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn one_vm_cannot_hold_more_than_its_share_of_the_pages_asks() {
    let f = start(Duration::from_secs(60)).await;
    f.register(&SoftAuthenticator::new()).await;
    let mut tasks = Vec::new();
    for _ in 0..vault_device::device::MAX_PAGE_ASKS_PER_VM {
        let device = Arc::clone(&f.device);
        let vm = f.vm(VM);
        tasks.push(tokio::spawn(async move {
            PageFixture::request(&device, vm).await
        }));
    }
    for _ in 0..200 {
        if f.get("/api/approvals").await.1.as_array().unwrap().len() == tasks.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        f.get("/api/approvals").await.1.as_array().unwrap().len(),
        tasks.len()
    );
    // One more from that VM is refused at once; another VM still gets through.
    let err = PageFixture::request(&f.device, f.vm(VM)).await.unwrap_err();
    assert!(matches!(err, ApprovalCheckError::TooMany(_)), "{err:?}");
    let other = tokio::spawn({
        let device = Arc::clone(&f.device);
        let vm = f.vm("vm-0002");
        async move { PageFixture::request(&device, vm).await }
    });
    for _ in 0..200 {
        if f.get("/api/approvals").await.1.as_array().unwrap().len() == tasks.len() + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        f.get("/api/approvals").await.1.as_array().unwrap().len(),
        tasks.len() + 1
    );
    assert!(!other.is_finished());
}

#[tokio::test]
async fn an_expired_ask_disappears() {
    let f = start(Duration::from_millis(800)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    let request: ApprovalRequest = serde_json::from_value(view["request"].clone()).unwrap();
    assert!(request.expires_unix_ms <= request.created_unix_ms + 800);
    let late = auth.assert_for(&challenge_of(&view), &f.origin);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(f.get("/api/approvals").await.1, json!([]));
    assert_eq!(f.get(&format!("/api/approvals/{id}")).await.0, 404);
    let (status, _) = f
        .post(
            &format!("/api/approvals/{id}/approve"),
            assertion_json(&late),
        )
        .await;
    assert_eq!(status, 404);
    let err = outcome(task).await.unwrap_err();
    assert!(matches!(err, ApprovalCheckError::Timeout(_)), "{err:?}");
    assert!(f.device.approved_grants(0).is_empty());
}

#[tokio::test]
async fn registration_needs_the_one_time_token_and_the_devices_origin() {
    let f = start(Duration::from_secs(60)).await;
    let auth = SoftAuthenticator::new();
    // No token open, or a wrong one.
    let (status, _) = f
        .post("/api/register/begin", json!({"token": "guess"}))
        .await;
    assert_eq!(status, 403);
    let link = f.page.open_registration();
    assert!(link.starts_with(&format!("{}/register#", f.origin)));
    let (status, _) = f
        .post("/api/register/begin", json!({"token": "guess"}))
        .await;
    assert_eq!(status, 403);
    // A registration made on the host's page is refused.
    let token = link.split_once('#').unwrap().1;
    let (_, begin) = f.post("/api/register/begin", json!({"token": token})).await;
    let challenge = begin["challenge"].as_str().unwrap();
    let reg = auth.register_for(&B64URL.decode(challenge).unwrap(), HOST_ORIGIN);
    let (status, body) = f
        .post(
            "/api/register/finish",
            json!({
                "challenge": challenge,
                "attestation_object": B64URL.encode(&reg.attestation_object),
                "client_data_json": B64URL.encode(&reg.client_data_json),
            }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(f.passkeys().passkeys.is_empty());
    // The right one works once; the token is then closed.
    f.register(&auth).await;
    let (status, _) = f.post("/api/register/begin", json!({"token": token})).await;
    assert_eq!(status, 403);
    assert_eq!(f.passkeys().passkeys.len(), 1);
}

/// With the real daemon: the device's ask reaches the user as a webhook notice only (no
/// approval on the host's pages), and the device's page approves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_forwards_only_a_notice_of_a_request_waiting_on_the_device() {
    // The webhook receiver: keeps what it is sent.
    let notices = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let notices = Arc::clone(&notices);
            move |axum::Json(v): axum::Json<Value>| async move {
                notices.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(hook, app).await });

    let device_port = free_port();
    let mut daemon = DaemonOptions::without_vms()
        .args([
            "--approvals-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--device-listen".into(),
            format!("127.0.0.1:{device_port}"),
            "--approvals-webhook".into(),
            format!("http://{hook_addr}/hook"),
        ])
        .prepare()
        .expect("the daemon's directory");
    daemon.spawn().expect("start the daemon");

    let dir = tempfile::tempdir().unwrap();
    let vault_path = dir.path().join("device.vault");
    let mut vault = Vault::create(&vault_path, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    let code = std::fs::read_to_string(daemon.state_dir().join("relay/pairing-code")).unwrap();
    vault_device::device::pair(
        &mut vault,
        &format!("127.0.0.1:{device_port}"),
        &code,
        "test-laptop",
    )
    .await
    .unwrap();
    drop(vault);
    let f = start_with(dir, vault_path, Duration::from_secs(60)).await;
    let mut auth = SoftAuthenticator::new();
    f.register(&auth).await;
    tokio::spawn(Arc::clone(&f.device).serve());
    for _ in 0..400 {
        if f.device.is_linked() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(f.device.is_linked(), "the device never linked");

    let (task, view) = f.ask().await;
    let request: ApprovalRequest = serde_json::from_value(view["request"].clone()).unwrap();
    let args: Value = serde_json::from_str(&request.arguments).unwrap();
    let ask_id = args[APPROVAL_REQUEST_ARG].as_str().unwrap().to_owned();
    let mut notice = None;
    for _ in 0..200 {
        notice = notices.lock().unwrap().first().cloned();
        if notice.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notice = notice.expect("no notice reached the webhook");
    assert_eq!(notice["approval_id"], json!(ask_id));
    let summary = notice["summary"].as_str().unwrap();
    assert!(summary.contains("waits on your device"), "{summary}");
    assert!(
        summary.contains(CREDENTIAL) && summary.contains(TARGET),
        "{summary}"
    );
    assert_eq!(notice["url"], json!(""));
    // The host made no approval of its own: nothing is pending on its pages.
    let out = daemon.cli(&["approvals", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );
    // The device's page approves it.
    let a = auth.assert_for(&challenge_of(&view), &f.origin);
    let (status, body) = f
        .post(
            &format!("/api/approvals/{}/approve", request.id),
            assertion_json(&a),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let grant = outcome(task).await.unwrap();
    assert_eq!(grant.vm, VM);
    assert_eq!(notices.lock().unwrap().len(), 1);
}

const APPROVE_READY: &str = "document.readyState === 'complete' && \
    document.getElementById('status').dataset.state === 'pending'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_registers_on_the_device_page_and_approves_a_pending_ask() -> Result<()> {
    let bin = browser::chromium_bin();
    if !browser::chromium_available(&bin) {
        if std::env::var_os("CI").is_some() {
            panic!("{bin} is missing under CI: scripts/setup installs the chromium package");
        }
        eprintln!(
            "\n\n*** SKIPPING chromium_registers_on_the_device_page_and_approves_a_pending_ask: \
             {bin} is not installed (apt-get install chromium, or scripts/setup) ***\n\n"
        );
        return Ok(());
    }
    let page_timeout = Duration::from_secs(10);
    let f = start(Duration::from_secs(120)).await;
    let (_browser, mut cdp) = browser::launch(&bin, Duration::from_secs(60)).await?;
    cdp.add_virtual_authenticator(true).await?;

    // Register on the device's page, through the one-time link it prints.
    let link = f.page.open_registration();
    cdp.open(
        &link,
        "document.readyState === 'complete' && typeof nanoclawRegister === 'function'",
        page_timeout,
    )
    .await?;
    assert_eq!(cdp.eval("nanoclawRegister()").await?, json!("registered"));
    let store = f.passkeys();
    assert!(store.on_device);
    assert_eq!(store.origin, f.origin);
    assert_eq!(store.passkeys.len(), 1);

    // A call asks; the device's page of pending asks lists it.
    let (task, view) = f.ask().await;
    let id = view["request"]["id"].as_str().unwrap().to_owned();
    cdp.open(
        &format!("{}/", f.origin),
        "document.readyState === 'complete' && \
         document.getElementById('status').dataset.state === 'pending'",
        page_timeout,
    )
    .await?;
    assert_eq!(
        cdp.eval("document.querySelector('#pending a').getAttribute('href')")
            .await?,
        json!(format!("/approve/{id}"))
    );
    // Its approval page shows what the device built; the passkey approves it.
    cdp.open(
        &format!("{}/approve/{id}", f.origin),
        APPROVE_READY,
        page_timeout,
    )
    .await?;
    assert_eq!(
        cdp.eval("document.getElementById('action').textContent")
            .await?,
        json!(format!("use credential {CREDENTIAL} for {TARGET}"))
    );
    assert_eq!(cdp.eval("nanoclawApprove()").await?, json!("approved"));
    let grant = outcome(task).await?;
    assert_eq!(
        (
            grant.credential.as_str(),
            grant.host.as_str(),
            grant.vm.as_str()
        ),
        (CREDENTIAL, TARGET, VM)
    );
    assert!(f.passkeys().used_approvals.contains(&id));
    Ok(())
}
