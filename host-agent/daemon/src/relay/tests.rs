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

/// Review finding M6: a recording of the device's first handshake message, replayed, must not
/// take the link over from the live device (before the fix, the host switched links as soon as
/// it had answered the replay, dropping the live link and every session on it).
#[tokio::test]
async fn a_replayed_first_handshake_message_does_not_drop_the_live_link() {
    use shared_proto::credential::{DeviceToHost, LINK_MODE_LINK, noise};
    let dir = tempfile::tempdir().unwrap();
    let device = x25519_dalek::StaticSecret::from([7u8; 32]);
    let device_public = x25519_dalek::PublicKey::from(&device).to_bytes();
    std::fs::create_dir_all(dir.path().join("relay")).unwrap();
    std::fs::write(
        dir.path().join("relay/device.json"),
        format!(
            r#"{{"public_key":"{}","name":"phone"}}"#,
            hex::encode(device_public)
        ),
    )
    .unwrap();
    let relay = Relay::open(dir.path(), "h").unwrap();
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();

    // The device links up: its first message, the host's answer, then Ready.
    let mut hs = noise::link_initiator(&device.to_bytes(), &relay.public_key()).unwrap();
    let first = noise::write_handshake(&mut hs, &[]).unwrap();
    let live = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = live.into_split();
    let mut read = link::RecordReader::new(read);
    write.write_all(&[LINK_MODE_LINK]).await.unwrap();
    link::write_record(&mut write, &first).await.unwrap();
    noise::read_handshake(&mut hs, &read.next().await.unwrap()).unwrap();
    let mut transport = hs.into_transport_mode().unwrap();
    let ready = shared_proto::credential::encode_message(&DeviceToHost::Ready).unwrap();
    let sealed = noise::seal(&mut transport, &ready).unwrap();
    link::write_record(&mut write, &sealed).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
        .await
        .unwrap();
    let generation = relay.lock().link.as_ref().unwrap().generation;

    // The replay: the same first message on a new connection; the host answers it, and the
    // replayer, who holds none of the keys, can say nothing more and hangs up.
    let replay = TcpStream::connect(addr).await.unwrap();
    let (replay_read, mut replay_write) = replay.into_split();
    let mut replay_read = link::RecordReader::new(replay_read);
    replay_write.write_all(&[LINK_MODE_LINK]).await.unwrap();
    link::write_record(&mut replay_write, &first).await.unwrap();
    assert!(
        replay_read.next().await.is_ok(),
        "the host answers the replay"
    );
    drop((replay_read, replay_write));

    // However long the host takes over the replay, the live link stays the link.
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = relay.lock().link.as_ref().map(|l| l.generation);
        assert_eq!(now, Some(generation), "the replay took the link over");
    }
    drop((read, write));
}
