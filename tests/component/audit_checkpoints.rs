//! Audit checkpoints with the real device (finding L7): the relay asks the device (the real
//! `Device`, linked from this process) to sign the audit chain's head, and the real binaries
//! check the result. `nanoclaw audit verify --device-key` (with the key `vault-device audit
//! key` prints) and `vault-device audit check` accept the file; once the chain is rewritten
//! with every hash recomputed, which plain `verify` does not notice, both fail; once the file
//! is cut back before the last checkpoint, the device's check fails.

use std::path::Path;
use std::process::Command;

use nanoclaw_audit::AuditLog;
use nanoclaw_tests::credential::{PASSPHRASE, make_vault, pair, random_secret, start_device};
use nanoclaw_tests::upstream::make_ca;
use nanoclaw_tests::{CLI_TIMEOUT, OutputWithin, text, vault_device_bin};
use serde_json::json;
use sha2::{Digest, Sha256};

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output_within(CLI_TIMEOUT).expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn vault_device(vault: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new(vault_device_bin())
        .arg("--vault")
        .arg(vault)
        .args(args)
        .env(
            "VAULT_DEVICE_PASSPHRASE",
            std::str::from_utf8(PASSPHRASE).unwrap(),
        )
        .stdin(std::process::Stdio::null()))
}

fn nanoclaw(args: &[&str]) -> (i32, String, String) {
    run(&mut nanoclaw_tests::nanoclaw(args))
}

/// Rewrites the log as a host holding the file but not the device key can: changes record
/// `target`'s data and recomputes every hash from there on.
fn rewrite(path: &Path, target: u64) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut prev = [0u8; 32];
    let mut out = String::new();
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut record = line["record"].clone();
        if record["seq"] == json!(target) {
            record["data"] = json!({"i": 999, "what": "never happened"});
        }
        record["prev"] = json!(hex::encode(prev));
        let body = serde_json::to_string(&record).unwrap();
        let mut h = Sha256::new();
        h.update(prev);
        h.update(body.as_bytes());
        prev = h.finalize().into();
        out.push_str(&format!(
            "{{\"hash\":\"{}\",\"record\":{body}}}\n",
            hex::encode(prev)
        ));
    }
    std::fs::write(path, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_anchors_the_chain_and_both_checks_catch_a_rewrite_and_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path());
    let vault = make_vault(dir.path(), "api.test:1", "other.test:1", &random_secret());
    let relay = host_agent::relay::Relay::open(&dir.path().join("host"), "test-host").unwrap();
    let (relay_addr, _listener) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    pair(&vault, &relay, relay_addr).await;
    let _device = start_device(&vault, &ca, vec![]).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .expect("the device links up");

    // Records 0..=4, a checkpoint over them (record 5), records 6 and 7, a checkpoint over
    // 0..=7 (record 8).
    let path = dir.path().join("audit.ndjson");
    let audit = AuditLog::open(&path).unwrap();
    for i in 0..5 {
        audit
            .submit("policy_decision", json!({"i": i}))
            .await
            .unwrap();
    }
    assert_eq!(relay.checkpoint(&audit).await.unwrap(), Some(5));
    for i in 5..7 {
        audit
            .submit("policy_decision", json!({"i": i}))
            .await
            .unwrap();
    }
    assert_eq!(relay.checkpoint(&audit).await.unwrap(), Some(8));
    drop(audit);
    let original = std::fs::read(&path).unwrap();
    let file = path.to_str().unwrap();

    // The device kept its own copies.
    let mut device_log = vault.as_os_str().to_owned();
    device_log.push(".checkpoints.log");
    let copies = std::fs::read_to_string(&device_log).unwrap();
    assert_eq!(copies.lines().count(), 2, "{copies}");

    let (code, key, err) = vault_device(&vault, &["audit", "key"]);
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_owned();
    assert_eq!(key.len(), 64, "{key}");

    let (code, out, err) = nanoclaw(&["audit", "verify", "--file", file, "--device-key", &key]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "checkpoints: 2 signed by {key}; 8 records anchored, 1 after the last checkpoint (unanchored)"
        )),
        "{out}"
    );
    let (code, out, err) = vault_device(&vault, &["audit", "check", file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: 9 records"), "{out}");

    // Rewritten before the first checkpoint: the chain alone is sound, the anchors are not.
    rewrite(&path, 2);
    let (code, out, err) = nanoclaw(&["audit", "verify", "--file", file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("checkpoints not checked"), "{out}");
    let (code, _, err) = nanoclaw(&["audit", "verify", "--file", file, "--device-key", &key]);
    assert_eq!(code, 1);
    assert!(
        err.contains("checkpoint at line 6 (seq 5): chain head at seq 4 is"),
        "{err}"
    );
    let (code, _, err) = vault_device(&vault, &["audit", "check", file]);
    assert_eq!(code, 1);
    assert!(
        err.contains("the device's checkpoint of seq 4 does not match the file"),
        "{err}"
    );

    // Cut back to 7 records: the second checkpoint's seq (7) and record are gone. The file's
    // own checks pass; the device's copy does not.
    let kept: Vec<u8> = original
        .split_inclusive(|b| *b == b'\n')
        .take(7)
        .flatten()
        .copied()
        .collect();
    std::fs::write(&path, kept).unwrap();
    let (code, _, err) = nanoclaw(&["audit", "verify", "--file", file, "--device-key", &key]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vault_device(&vault, &["audit", "check", file]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated"), "{err}");

    // A key that is not one is a clear error.
    let (code, _, err) = nanoclaw(&["audit", "verify", "--file", file, "--device-key", "abc"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("--device-key"), "{err}");
}

/// The records of kind `audit_checkpoint` in the log at `path`.
fn checkpoint_records(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"audit_checkpoint\""))
        .count()
}

/// A tokenization report from the device: the daemon records it as a `tokenize` record.
fn report() -> shared_proto::credential::DeviceToHost {
    shared_proto::credential::DeviceToHost::Tokenized {
        vm_id: "vm-test-1".into(),
        target_host: "api.test:443".into(),
        part: shared_proto::credential::BodyPart::Response,
        enforce: true,
        counts: shared_proto::credential::TokenCounts::default(),
        unscanned: None,
    }
}

/// `host-agent serve --device-listen`: the daemon asks the linked device for a checkpoint as
/// soon as there is something to anchor, and once more when it is stopped (SIGTERM), so that
/// the records up to its shutdown are anchored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_asks_the_linked_device_and_again_at_shutdown() {
    use std::time::{Duration, Instant};
    use vault_device::device::{Device, DeviceConfig};
    use zeroize::Zeroizing;

    let dir = tempfile::tempdir().unwrap();
    let device_port = nanoclaw_tests::free_port();
    let mut daemon = nanoclaw_tests::DaemonOptions::without_vms()
        .args([
            "--device-listen".into(),
            format!("127.0.0.1:{device_port}"),
            "--audit-checkpoint-secs".into(),
            "3600".into(),
        ])
        .start()
        .expect("start the daemon");
    let vault_path = make_vault(dir.path(), "api.test:1", "other.test:1", &random_secret());
    let mut vault = vault_device::vault::Vault::open(&vault_path, PASSPHRASE).unwrap();
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
    let device = Device::open(DeviceConfig {
        vault: vault_path.clone(),
        passphrase: Zeroizing::new(PASSPHRASE.to_vec()),
        ca_files: vec![],
        resolve: vec![],
        approval_wait: Duration::from_secs(30),
    })
    .unwrap();
    tokio::spawn(std::sync::Arc::clone(&device).serve());

    let audit = daemon.state_dir().join("audit.ndjson");
    let wait_for = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while checkpoint_records(&audit) < n {
            assert!(
                Instant::now() < deadline,
                "{what}; daemon log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Reports until one lands (the link may still be coming up), then the first checkpoint.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no record; daemon log:\n{}",
            daemon.log()
        );
        device.notify_host(&host, report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| wait_for(1, "no checkpoint while linked"));

    // One more record, then SIGTERM: the daemon anchors it before it goes.
    let before = nanoclaw_audit::verify(&audit).unwrap().records;
    device.notify_host(&host, report());
    let deadline = Instant::now() + Duration::from_secs(30);
    while nanoclaw_audit::verify(&audit).unwrap().records == before {
        assert!(Instant::now() < deadline, "the report was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.is_running() {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(checkpoint_records(&audit), 2, "{}", daemon.log());

    let key = vault_device::checkpoint::audit_public_key(&vault.identity_secret());
    let s = nanoclaw_audit::verify_anchored(&audit, &key).unwrap();
    assert_eq!(s.checkpoints, 2);
    // Everything but the last checkpoint's own record is anchored.
    assert_eq!(s.unanchored, 1, "{s:?}");
    let (code, out, err) = vault_device(&vault_path, &["audit", "check", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 checkpoints"), "{out}");
}
