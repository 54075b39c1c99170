//! The daemon's wiring of device approvals: `host-agent serve --device-listen
//! --approvals-listen` sends the paired device's approval asks to its passkey approver; the
//! user approves over the pages' JSON API (a software authenticator signing as the browser
//! would); the device verifies the evidence itself and creates the grant. Without
//! `--approvals-listen` the device's ask is refused "requires approval".

#[path = "../../../vault-device/tests/common/soft_authenticator.rs"]
mod soft_authenticator;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::approval::passkey::PendingView;
use shared_proto::approval::{RelyingParty, RequestAction};
use soft_authenticator::SoftAuthenticator;
use vault_device::approval::{ApprovalCheckError, PasskeyFile};
use vault_device::device::{Device, DeviceConfig};
use vault_device::grant::Grant;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
use zeroize::Zeroizing;

const PASSPHRASE: &[u8] = b"correct horse battery staple";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, extra: &[String]) -> Daemon {
    std::fs::write(dir.join("kernel"), "k").unwrap();
    std::fs::write(dir.join("initrd"), "i").unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_host-agent"))
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .arg("--kernel")
        .arg(dir.join("kernel"))
        .arg("--initrd")
        .arg(dir.join("initrd"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(dir.join("api.sock")).is_err() {
        assert!(
            Instant::now() < deadline,
            "daemon did not start: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

/// A vault with `svc` and no grants, paired with the daemon at `device_port`, its device
/// linked (in this process) and trusting `passkeys_json` for `origin`.
async fn device(dir: &Path, device_port: u16, passkeys_json: &[u8], origin: &str) -> Arc<Device> {
    let vault_path = dir.join("device.vault");
    let mut vault = Vault::create(&vault_path, PASSPHRASE, KdfParams::FAST_FOR_TESTS).unwrap();
    vault
        .add(Entry {
            name: "svc".into(),
            secret: Secret::new(b"sk-not-used-in-this-test".to_vec()),
            hosts: vec!["api.test:443".into()],
            header: "Authorization".into(),
            format: "Bearer {}".into(),
        })
        .unwrap();
    vault.save().unwrap();
    let code = std::fs::read_to_string(dir.join("state/relay/pairing-code")).unwrap();
    vault_device::device::pair(
        &mut vault,
        &format!("127.0.0.1:{device_port}"),
        &code,
        "test-phone",
    )
    .await
    .unwrap();
    let path = PasskeyFile::path_for(&vault_path);
    let mut store = PasskeyFile::default();
    let rp = RelyingParty {
        rp_id: "localhost".into(),
        origin: origin.into(),
    };
    store.import(passkeys_json, &rp, &path).unwrap();
    store.save(&path).unwrap();
    let device = Device::open(DeviceConfig {
        vault: vault_path,
        passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
        ca_files: vec![],
        resolve: vec![],
        approval_wait: Duration::from_secs(30),
    })
    .unwrap();
    tokio::spawn(Arc::clone(&device).serve());
    device
}

/// Asks until the link is up, then waits for the answer.
async fn ask(device: &Device) -> Result<Grant, ApprovalCheckError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match device.request_approval("svc", "api.test:443", "vm-7").await {
            Err(ApprovalCheckError::LinkDown) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn pending(dir: &Path) -> Vec<PendingView> {
    let out = Command::new(nanoclaw_tests::built_bin("nanoclaw"))
        .arg("--socket")
        .arg(dir.join("api.sock"))
        .args(["approvals", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_asks_its_passkey_approver_and_the_device_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (approvals_port, device_port) = (free_port(), free_port());
    let origin = format!("http://localhost:{approvals_port}");
    let mut auth = SoftAuthenticator::new();
    // The passkey the user registered earlier, as the daemon keeps it.
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let passkeys_json = serde_json::to_vec(&vec![auth.passkey()]).unwrap();
    std::fs::write(dir.path().join("state/passkeys.json"), &passkeys_json).unwrap();
    let _daemon = start(
        dir.path(),
        &[
            "--approvals-listen".into(),
            format!("127.0.0.1:{approvals_port}"),
            "--device-listen".into(),
            format!("127.0.0.1:{device_port}"),
        ],
    );
    let device = device(dir.path(), device_port, &passkeys_json, &origin).await;
    let asked = tokio::spawn({
        let device = Arc::clone(&device);
        async move { ask(&device).await }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let view = loop {
        if let Some(v) = pending(dir.path()).into_iter().next() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no approval request reached the daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view.request.vm_id, "vm-7");
    assert_eq!(
        view.request.action,
        RequestAction::Credential {
            name: "svc".into(),
            target_host: "api.test:443".into()
        }
    );
    let assertion = auth.assert_for(&view.request.challenge().unwrap(), &origin);
    let resp = reqwest::Client::new()
        .post(format!(
            "{origin}/api/approvals/{}/approve",
            view.request.id
        ))
        .json(&assertion)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let grant = tokio::time::timeout(Duration::from_secs(20), asked)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            grant.credential.as_str(),
            grant.host.as_str(),
            grant.vm.as_str()
        ),
        ("svc", "api.test:443", "vm-7")
    );
    let audit = std::fs::read_to_string(dir.path().join("state/audit.ndjson")).unwrap();
    assert!(audit.contains("\"approval_request\"") && audit.contains("\"approval\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_approvals_the_device_is_told_requires_approval() {
    let dir = tempfile::tempdir().unwrap();
    let device_port = free_port();
    let _daemon = start(
        dir.path(),
        &["--device-listen".into(), format!("127.0.0.1:{device_port}")],
    );
    let passkeys_json = serde_json::to_vec(&vec![SoftAuthenticator::new().passkey()]).unwrap();
    let device = device(
        dir.path(),
        device_port,
        &passkeys_json,
        "http://localhost:1",
    )
    .await;
    match ask(&device).await {
        Err(ApprovalCheckError::Refused(reason)) => {
            assert!(reason.starts_with("requires approval"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
