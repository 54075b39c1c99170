use std::sync::Arc;

use shared_proto::credential::{ApprovalAnswer, HostToDevice, RelayGreeting};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use super::*;
use crate::approval::{ApprovalOutcome, ApprovalSubject, Approver};

#[tokio::test]
async fn state_persists_and_codes_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = Relay::open(dir.path(), "host-a").unwrap();
    let code = a.pairing_code().unwrap();
    let code_file = dir.path().join("relay/pairing-code");
    assert_eq!(std::fs::read_to_string(&code_file).unwrap(), code);
    for f in ["pairing-code", "host.key"] {
        let mode = std::fs::metadata(dir.path().join("relay").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let b = Relay::open(dir.path(), "host-a").unwrap();
    assert_eq!(a.public_key(), b.public_key());
    std::fs::write(dir.path().join("relay/device.json"), b"{").unwrap();
    assert!(matches!(
        Relay::open(dir.path(), "host-a"),
        Err(RelayError::BadStateFile(_))
    ));
}

#[tokio::test]
async fn a_sidecar_without_a_device_gets_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::open(dir.path(), "h").unwrap();
    let _vm = relay
        .attach_vm(
            dir.path(),
            VmIdentity {
                vm_id: "vm-1".into(),
                boot_id: [1; 16],
                sidecar_public_key: [2; 32],
                tokens: None,
                vmm_uid: None,
            },
        )
        .unwrap();
    let mut s = UnixStream::connect(proxy_socket_path(dir.path()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let (greeting, _) = shared_proto::frame::decode_frame::<RelayGreeting>(&buf)
        .unwrap()
        .unwrap();
    assert!(matches!(greeting, RelayGreeting::Unavailable { .. }));
}

/// Approves everything at once but keeps no evidence.
#[derive(Debug)]
struct NoEvidence;

impl Approver for NoEvidence {
    fn request(
        &self,
        _subject: ApprovalSubject,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>> {
        Box::pin(async {
            ApprovalOutcome::Approved {
                approval_id: "x".into(),
            }
        })
    }
}

/// Never answers.
#[derive(Debug)]
struct Silent;

impl Approver for Silent {
    fn request(
        &self,
        _subject: ApprovalSubject,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

async fn answer(rx: &mut mpsc::Receiver<HostToDevice>) -> ([u8; 16], ApprovalAnswer) {
    match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
        Ok(Some(HostToDevice::Approval { request, answer })) => (request, answer),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn approval_asks_without_evidence_or_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::open(dir.path(), "h").unwrap();
    let (tx, mut rx) = mpsc::channel(MAX_PENDING_APPROVALS + 8);
    let ask = |relay: &Relay, n: u8| {
        relay.ask_user(
            tx.clone(),
            [n; 16],
            "vm-1".into(),
            "svc".into(),
            "api.test:443".into(),
        )
    };
    // The default approver is DenyAll.
    ask(&relay, 1);
    let (id, a) = answer(&mut rx).await;
    assert_eq!(id, [1; 16]);
    assert!(
        matches!(&a, ApprovalAnswer::Refused { reason } if reason.starts_with("requires approval")),
        "{a:?}"
    );
    // "Approved" with nothing the device could check is a refusal.
    relay.set_approver(Arc::new(NoEvidence));
    ask(&relay, 2);
    let (_, a) = answer(&mut rx).await;
    assert!(
        matches!(&a, ApprovalAnswer::Refused { reason } if reason.contains("no evidence")),
        "{a:?}"
    );
    // Asks that wait are bounded; one more is refused at once.
    relay.set_approver(Arc::new(Silent));
    for n in 0..MAX_PENDING_APPROVALS {
        ask(&relay, u8::try_from(n % 200).unwrap());
    }
    ask(&relay, 255);
    let (id, a) = answer(&mut rx).await;
    assert_eq!(id, [255; 16]);
    assert!(
        matches!(&a, ApprovalAnswer::Refused { reason } if reason.contains("too many")),
        "{a:?}"
    );
}

#[tokio::test]
async fn garbage_on_the_device_listener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::open(dir.path(), "h").unwrap();
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    for first in [&b"X"[..], b"L\x00\x05hello", b"P\x00\x03abc"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let mut buf = Vec::new();
        // The relay hangs up; nothing is answered.
        let _ = s.read_to_end(&mut buf).await;
        assert!(buf.is_empty());
    }
    assert!(!relay.is_linked());
    assert!(relay.paired_device().is_none());
}
