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

/// Counts the requests it is asked (and never answers them).
#[derive(Debug, Default)]
struct Counting(std::sync::atomic::AtomicUsize);

impl Approver for Counting {
    fn request(
        &self,
        _subject: ApprovalSubject,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
}

/// Keeps the notices it is given.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<crate::notify::Notice>>);

impl crate::notify::Notifier for Recorder {
    fn notify(&self, notice: crate::notify::Notice) {
        self.0.lock().unwrap().push(notice);
    }
}

#[tokio::test]
async fn a_request_waiting_on_the_device_only_becomes_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::open(dir.path(), "h").unwrap();
    let approver = Arc::new(Counting::default());
    relay.set_approver(approver.clone());
    let notices = Arc::new(Recorder::default());
    relay.set_notifiers(vec![notices.clone()]);
    let (tx, mut rx) = mpsc::channel(8);
    relay.device_asks(
        tx.clone(),
        [7; 16],
        "vm-1".into(),
        "svc".into(),
        "api.test:443".into(),
        true,
    );
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // No host-side approval (nothing that could produce evidence), no answer to the device.
    assert_eq!(approver.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(rx.try_recv().is_err());
    let seen = notices.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].approval_id, hex::encode([7u8; 16]));
    assert!(seen[0].summary.contains("waits on your device"), "{seen:?}");
    assert!(seen[0].summary.contains("svc") && seen[0].summary.contains("api.test:443"));
    assert!(seen[0].url.is_empty());
    // The same ask without `on_device` goes to the approver, as before.
    relay.device_asks(
        tx,
        [8; 16],
        "vm-1".into(),
        "svc".into(),
        "api.test:443".into(),
        false,
    );
    for _ in 0..100 {
        if approver.0.load(std::sync::atomic::Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(approver.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(notices.0.lock().unwrap().len(), 1);
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

/// A relay in `dir` whose paired device is pinned as [`DEVICE_KEY`]'s public key.
fn pinned_relay(dir: &std::path::Path) -> Arc<Relay> {
    let device = x25519_dalek::StaticSecret::from(DEVICE_KEY);
    let device_public = x25519_dalek::PublicKey::from(&device).to_bytes();
    std::fs::create_dir_all(dir.join("relay")).unwrap();
    std::fs::write(
        dir.join("relay/device.json"),
        format!(
            r#"{{"public_key":"{}","name":"phone"}}"#,
            hex::encode(device_public)
        ),
    )
    .unwrap();
    Relay::open(dir, "h").unwrap()
}

/// The pinned device's static key.
const DEVICE_KEY: [u8; 32] = [7; 32];

/// Links the pinned device to the relay at `addr` (its first message `first`, the host's
/// answer, then Ready) and waits until the relay has taken the link. Returns the connection.
async fn link_device(
    relay: &Relay,
    addr: std::net::SocketAddr,
) -> (
    Vec<u8>,
    link::RecordReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    use shared_proto::credential::{DeviceToHost, LINK_MODE_LINK, noise};
    let mut hs = noise::link_initiator(&DEVICE_KEY, &relay.public_key()).unwrap();
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
    (first, read, write)
}

/// Review finding M6: a recording of the device's first handshake message, replayed, must not
/// take the link over from the live device (before the fix, the host switched links as soon as
/// it had answered the replay, dropping the live link and every session on it).
#[tokio::test]
async fn a_replayed_first_handshake_message_does_not_drop_the_live_link() {
    use shared_proto::credential::LINK_MODE_LINK;
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (first, read, write) = link_device(&relay, addr).await;
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

/// Review finding H4: 2,000 idle connections to the device listener. All but a few are closed
/// at once, the relay holds a bounded number of descriptors, and the device still links once
/// the idle ones are gone.
#[tokio::test]
async fn two_thousand_idle_device_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // This test's own 2,000 ends need descriptors too.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // The relay's open connections: established sockets whose local end is its port (other
    // tests in this process open descriptors too, so a descriptor count would not do).
    let port = format!(":{:04X} ", addr.port());
    let relay_side = || {
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && format!("{} ", f[1]).ends_with(&port) && f[3] == "01"
            })
            .count()
    };
    let mut idle = Vec::new();
    for _ in 0..2000 {
        match TcpStream::connect(addr).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // Every connection over the per-address cap is closed by the relay: reading it ends.
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut b)).await
        {
            closed += 1;
        }
        if closed >= 2000 - link::MAX_DEVICE_CONNECTIONS_PER_PEER {
            break;
        }
    }
    assert_eq!(closed, 2000 - link::MAX_DEVICE_CONNECTIONS_PER_PEER);
    // The relay's side holds only the connections under its cap.
    let held_by_relay = relay_side();
    assert_eq!(held_by_relay, link::MAX_DEVICE_CONNECTIONS_PER_PEER);
    drop(idle);
    // The idle ones gone, the device links.
    let _link = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            let linked =
                tokio::time::timeout(std::time::Duration::from_secs(2), link_device(&relay, addr))
                    .await;
            if let Ok(link) = linked {
                break link;
            }
        }
    })
    .await
    .expect("the device links after the flood");
}

/// A linked fake device that can read the host's messages and answer.
struct FakeDevice {
    read: link::RecordReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    transport: snow::TransportState,
}

impl FakeDevice {
    async fn link(relay: &Relay, addr: std::net::SocketAddr) -> Self {
        use shared_proto::credential::{DeviceToHost, LINK_MODE_LINK, noise};
        let mut hs = noise::link_initiator(&DEVICE_KEY, &relay.public_key()).unwrap();
        let first = noise::write_handshake(&mut hs, &[]).unwrap();
        let (read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut read = link::RecordReader::new(read);
        write.write_all(&[LINK_MODE_LINK]).await.unwrap();
        link::write_record(&mut write, &first).await.unwrap();
        noise::read_handshake(&mut hs, &read.next().await.unwrap()).unwrap();
        let transport = hs.into_transport_mode().unwrap();
        let mut device = Self {
            read,
            write,
            transport,
        };
        device.send(&DeviceToHost::Ready).await;
        tokio::time::timeout(std::time::Duration::from_secs(10), relay.wait_linked())
            .await
            .unwrap();
        device
    }

    async fn send(&mut self, msg: &shared_proto::credential::DeviceToHost) {
        use shared_proto::credential::noise;
        let plain = shared_proto::credential::encode_message(msg).unwrap();
        let sealed = noise::seal(&mut self.transport, &plain).unwrap();
        link::write_record(&mut self.write, &sealed).await.unwrap();
    }

    async fn recv(&mut self) -> HostToDevice {
        use shared_proto::credential::noise;
        let record = self.read.next().await.unwrap();
        let plain = noise::open(&mut self.transport, &record).unwrap();
        shared_proto::credential::decode_message(&plain).unwrap()
    }

    /// Answers the next checkpoint ask, signing it with `key` (the signature spoiled when
    /// `forge`).
    async fn sign_next(&mut self, key: &ed25519_dalek::SigningKey, forge: bool) {
        use ed25519_dalek::Signer;
        let HostToDevice::Checkpoint {
            log,
            seq,
            head,
            unix_time,
        } = self.recv().await
        else {
            panic!("not a checkpoint ask");
        };
        let asked = nanoclaw_audit::Checkpoint {
            log,
            seq,
            head,
            unix_time,
        };
        let mut signature = key.sign(&asked.signed_message()).to_bytes();
        if forge {
            signature[0] ^= 1;
        }
        self.send(&shared_proto::credential::DeviceToHost::CheckpointSigned {
            log: asked.log,
            seq,
            head,
            unix_time,
            device_key: key.verifying_key().to_bytes(),
            signature,
        })
        .await;
    }
}

fn audit_with(dir: &std::path::Path, n: u64) -> Arc<nanoclaw_audit::AuditLog> {
    let audit = Arc::new(nanoclaw_audit::AuditLog::open(dir.join("audit.ndjson")).unwrap());
    for i in 0..n {
        audit
            .append("policy_decision", serde_json::json!({"i": i}))
            .unwrap();
    }
    audit
}

#[tokio::test]
async fn a_checkpoint_the_device_signs_is_recorded_and_verifies_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut device = FakeDevice::link(&relay, addr).await;
    let audit = audit_with(dir.path(), 3);
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let (recorded, ()) = tokio::join!(relay.checkpoint(&audit), device.sign_next(&key, false));
    assert_eq!(recorded.unwrap(), Some(3));
    let public = nanoclaw_audit::DeviceKey::from_bytes(&key.verifying_key().to_bytes()).unwrap();
    let s = nanoclaw_audit::verify_anchored(&dir.path().join("audit.ndjson"), &public).unwrap();
    assert_eq!((s.checkpoints, s.anchored, s.unanchored), (1, 3, 1));
    // Nothing new but its own record: no second ask.
    assert_eq!(relay.checkpoint(&audit).await.unwrap(), None);
    // A new record: a new ask, covering the first checkpoint's record too.
    audit.append("grant", serde_json::json!({})).unwrap();
    let (recorded, ()) = tokio::join!(relay.checkpoint(&audit), device.sign_next(&key, false));
    assert_eq!(recorded.unwrap(), Some(5));
    let s = nanoclaw_audit::verify_anchored(&dir.path().join("audit.ndjson"), &public).unwrap();
    assert_eq!((s.checkpoints, s.anchored, s.unanchored), (2, 5, 1));
}

#[tokio::test]
async fn a_bad_signature_or_a_refusal_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut device = FakeDevice::link(&relay, addr).await;
    let audit = audit_with(dir.path(), 2);
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let (recorded, ()) = tokio::join!(relay.checkpoint(&audit), device.sign_next(&key, true));
    assert!(
        matches!(recorded, Err(CheckpointFailure::BadSignature(_))),
        "{recorded:?}"
    );
    let refuse = async {
        let HostToDevice::Checkpoint { seq, .. } = device.recv().await else {
            panic!("not a checkpoint ask");
        };
        device
            .send(&shared_proto::credential::DeviceToHost::CheckpointRefused {
                seq,
                reason: "seq went back".into(),
            })
            .await;
    };
    let (recorded, ()) = tokio::join!(relay.checkpoint(&audit), refuse);
    assert!(
        matches!(&recorded, Err(CheckpointFailure::Refused(r)) if r == "seq went back"),
        "{recorded:?}"
    );
    // Refused: not asked again until something new is appended.
    assert_eq!(relay.checkpoint(&audit).await.unwrap(), None);
    assert_eq!(
        nanoclaw_audit::verify(&dir.path().join("audit.ndjson"))
            .unwrap()
            .records,
        2
    );
    // An answer for nothing in flight is ignored.
    device
        .send(&shared_proto::credential::DeviceToHost::CheckpointRefused {
            seq: 99,
            reason: "x".into(),
        })
        .await;
    assert!(relay.is_linked());
}

#[tokio::test]
async fn without_a_link_a_checkpoint_fails_with_not_linked() {
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let audit = audit_with(dir.path(), 1);
    assert!(matches!(
        relay.checkpoint(&audit).await,
        Err(CheckpointFailure::NotLinked)
    ));
}

#[tokio::test]
async fn the_relay_asks_at_once_when_linked_then_after_every_records() {
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut device = FakeDevice::link(&relay, addr).await;
    let audit = audit_with(dir.path(), 2);
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let task = relay.spawn_checkpoints(
        Arc::clone(&audit),
        CheckpointPolicy {
            every: std::time::Duration::from_secs(3600),
            every_records: 3,
        },
    );
    let within = |secs| std::time::Duration::from_secs(secs);
    // The first ask comes at once (nothing was anchored yet).
    tokio::time::timeout(within(5), device.sign_next(&key, false))
        .await
        .expect("a first checkpoint");
    // Two new records are under the threshold and the hour is not up: no ask.
    for _ in 0..2 {
        audit.append("grant", serde_json::json!({})).unwrap();
    }
    assert!(
        tokio::time::timeout(within(2), device.recv())
            .await
            .is_err(),
        "asked under the threshold"
    );
    // The third is at it.
    audit.append("grant", serde_json::json!({})).unwrap();
    tokio::time::timeout(within(5), device.sign_next(&key, false))
        .await
        .expect("a checkpoint after three records");
    task.abort();
}

#[tokio::test]
async fn a_move_notice_carries_the_vm_and_gives_the_devices_answer() {
    use shared_proto::credential::DeviceToHost;
    let dir = tempfile::tempdir().unwrap();
    let relay = pinned_relay(dir.path());
    assert!(matches!(
        relay.tell_moving("vm-1", [1; 32], [2; 32], "vm-9").await,
        Err(super::MoveNoticeFailure::NotLinked)
    ));
    let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut device = FakeDevice::link(&relay, addr).await;

    // Followed: the device gets what the source knows, and its answer ends the wait.
    let answering = async {
        let got = device.recv().await;
        assert_eq!(
            got,
            HostToDevice::Moving {
                vm_id: "vm-1".into(),
                boot_key: [1; 32],
                to_host: [2; 32],
                to_vm: "vm-9".into(),
            }
        );
        // An answer for another VM is nobody's: it changes nothing.
        device
            .send(&DeviceToHost::MoveNoted {
                vm_id: "vm-2".into(),
                refused: None,
            })
            .await;
        device
            .send(&DeviceToHost::MoveNoted {
                vm_id: "vm-1".into(),
                refused: None,
            })
            .await;
    };
    let (told, ()) = tokio::join!(
        relay.tell_moving("vm-1", [1; 32], [2; 32], "vm-9"),
        answering
    );
    told.unwrap();

    // Refused: the device's reason comes back.
    let answering = async {
        let HostToDevice::Moving { vm_id, .. } = device.recv().await else {
            panic!("not a move notice");
        };
        device
            .send(&DeviceToHost::MoveNoted {
                vm_id,
                refused: Some("that host is not paired".into()),
            })
            .await;
    };
    let (told, ()) = tokio::join!(
        relay.tell_moving("vm-1", [1; 32], [3; 32], "vm-9"),
        answering
    );
    match told {
        Err(super::MoveNoticeFailure::Refused(why)) => assert_eq!(why, "that host is not paired"),
        other => panic!("{other:?}"),
    }

    // The link dropping mid-wait fails the notice at once, not at its timeout.
    let dropping = async {
        let _ = device.recv().await;
        drop(device);
    };
    let started = std::time::Instant::now();
    let (told, ()) = tokio::join!(
        relay.tell_moving("vm-1", [1; 32], [2; 32], "vm-9"),
        dropping
    );
    assert!(
        matches!(told, Err(super::MoveNoticeFailure::LinkDown)),
        "{told:?}"
    );
    assert!(started.elapsed() < super::MOVE_NOTICE_WAIT);
}
