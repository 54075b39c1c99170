//! The daemon's wiring of device approvals: `host-agent serve --device-listen
//! --approvals-listen` sends the paired device's approval asks to its passkey approver; the
//! user approves over the pages' JSON API (a software authenticator signing as the browser
//! would); the device verifies the evidence itself and creates the grant. Without
//! `--approvals-listen` the device's ask is refused "requires approval".

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::approval::passkey::PendingView;
use nanoclaw_tests::authenticator::SoftAuthenticator;
use nanoclaw_tests::credential::PASSPHRASE;
use nanoclaw_tests::{Daemon, DaemonOptions, free_port};
use shared_proto::approval::{RelyingParty, RequestAction};
use vault_device::approval::{ApprovalCheckError, PasskeyFile};
use vault_device::device::{Device, DeviceConfig};
use vault_device::grant::Grant;
use vault_device::moves::HostVm;
use vault_device::vault::{Entry, KdfParams, Secret, Vault};
use zeroize::Zeroizing;

/// A vault with `svc` and no grants (in `dir`), paired with `daemon` at `device_port`, its device
/// linked (in this process) and trusting `passkeys_json` for `origin`; with the daemon's link key.
async fn device(
    dir: &Path,
    daemon: &Daemon,
    device_port: u16,
    passkeys_json: &[u8],
    origin: &str,
) -> (Arc<Device>, [u8; 32]) {
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
    let code = std::fs::read_to_string(daemon.state_dir().join("relay/pairing-code")).unwrap();
    vault_device::device::pair(
        &mut vault,
        &format!("127.0.0.1:{device_port}"),
        &code,
        "test-phone",
    )
    .await
    .unwrap();
    let host = vault.data.pairings[0].host_public_key;
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
    (device, host)
}

/// Asks (for `vm-7` on the host whose link key is `host`) until the link is up, then waits for
/// the answer.
async fn ask(device: &Device, host: [u8; 32]) -> Result<Grant, ApprovalCheckError> {
    let vm = HostVm::new(host, "vm-7");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match device
            .request_approval(&vm, &vm, "svc", "api.test:443")
            .await
        {
            Err(ApprovalCheckError::LinkDown) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn pending(daemon: &Daemon) -> Vec<PendingView> {
    let out = daemon.cli(&["approvals", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_asks_its_passkey_approver_and_the_device_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (approvals_port, device_port) = (free_port(), free_port());
    let origin = format!("http://localhost:{approvals_port}");
    let mut auth = SoftAuthenticator::new();
    let mut daemon = DaemonOptions::without_vms()
        .args([
            "--approvals-listen".into(),
            format!("127.0.0.1:{approvals_port}"),
            "--device-listen".into(),
            format!("127.0.0.1:{device_port}"),
        ])
        .prepare()
        .expect("the daemon's directory");
    // The passkey the user registered earlier, as the daemon keeps it.
    std::fs::create_dir_all(daemon.state_dir()).unwrap();
    let passkeys_json = serde_json::to_vec(&vec![auth.passkey()]).unwrap();
    std::fs::write(daemon.state_dir().join("passkeys.json"), &passkeys_json).unwrap();
    daemon.spawn().expect("start the daemon");
    let (device, host) = device(dir.path(), &daemon, device_port, &passkeys_json, &origin).await;
    let asked = tokio::spawn({
        let device = Arc::clone(&device);
        async move { ask(&device, host).await }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let view = loop {
        if let Some(v) = pending(&daemon).into_iter().next() {
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
    let audit = std::fs::read_to_string(daemon.state_dir().join("audit.ndjson")).unwrap();
    assert!(audit.contains("\"approval_request\"") && audit.contains("\"approval\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_approvals_the_device_is_told_requires_approval() {
    let dir = tempfile::tempdir().unwrap();
    let device_port = free_port();
    let daemon = DaemonOptions::without_vms()
        .args(["--device-listen".into(), format!("127.0.0.1:{device_port}")])
        .start()
        .expect("start the daemon");
    let passkeys_json = serde_json::to_vec(&vec![SoftAuthenticator::new().passkey()]).unwrap();
    let (device, host) = device(
        dir.path(),
        &daemon,
        device_port,
        &passkeys_json,
        "http://localhost:1",
    )
    .await;
    match ask(&device, host).await {
        Err(ApprovalCheckError::Refused(reason)) => {
            assert!(reason.starts_with("requires approval"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
