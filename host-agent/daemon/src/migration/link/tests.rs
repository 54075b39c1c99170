//! The link between two daemons: pinned keys both ways, messages, a relayed stream both ways
//! over real TCP and Unix sockets, and every way a handshake or a record can go wrong.

use std::os::unix::fs::PermissionsExt;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::net::{TcpListener, UnixStream};

use super::*;

fn identity(seed: u8) -> Identity {
    Identity::from_secret([seed; 32])
}

/// A handshake over an in-memory pipe: the initiator `a` pins `a_pins`, the responder `b` pins
/// `b_pins`.
async fn pair(
    a: &Identity,
    a_pins: [u8; 32],
    b: &Identity,
    b_pins: Vec<[u8; 32]>,
) -> (
    Result<Link<DuplexStream>, LinkError>,
    Result<Link<DuplexStream>, LinkError>,
) {
    let (x, y) = duplex(1 << 20);
    tokio::join!(initiate(x, a, &a_pins), respond(y, b, &b_pins))
}

#[tokio::test]
async fn pinned_hosts_exchange_messages_both_ways() {
    let (a, b) = (identity(1), identity(2));
    let (left, right) = pair(&a, b.public(), &b, vec![identity(3).public(), a.public()]).await;
    let (mut left, mut right) = (left.unwrap(), right.unwrap());
    assert_eq!(left.peer(), b.public());
    assert_eq!(right.peer(), a.public());
    left.send(b"offer").await.unwrap();
    assert_eq!(right.recv().await.unwrap(), b"offer");
    right.send(b"ready").await.unwrap();
    assert_eq!(left.recv().await.unwrap(), b"ready");
    // The largest message, and one past it.
    let big = vec![7u8; MAX_DATA];
    left.send(&big).await.unwrap();
    assert_eq!(right.recv().await.unwrap(), big);
    assert!(matches!(
        left.send(&vec![0u8; MAX_DATA + 1]).await,
        Err(LinkError::TooLong(_))
    ));
}

#[tokio::test]
async fn an_unpinned_initiator_is_refused_and_told_why() {
    let (a, b) = (identity(1), identity(2));
    let (x, y) = duplex(1 << 20);
    let caller = async {
        // The caller's handshake ends well (XX tells the responder its key last); it sends its
        // offer, and its answer is the refusal.
        let mut left = initiate(x, &a, &b.public()).await.unwrap();
        left.send(b"offer").await.unwrap();
        let answer = left.recv().await.unwrap();
        let after = left.recv().await;
        (answer, after)
    };
    let pins = [identity(3).public()];
    let ((answer, after), right) = tokio::join!(caller, respond(y, &b, &pins));
    match right {
        Err(LinkError::UnknownPeer(key)) => assert_eq!(key, hex::encode(a.public())),
        other => panic!("{other:?}"),
    }
    let reply: crate::migration::Reply = serde_json::from_slice(&answer).unwrap();
    let crate::migration::Reply::Refused { reason } = reply else {
        panic!("{reply:?}");
    };
    assert!(reason.contains("not pinned"), "{reason}");
    assert!(reason.contains(&hex::encode(a.public())), "{reason}");
    // Then the responder is gone.
    assert!(matches!(after, Err(LinkError::Closed)), "{after:?}");
}

#[tokio::test]
async fn a_responder_with_another_key_is_refused() {
    let (a, b) = (identity(1), identity(2));
    let pinned = identity(9).public();
    let (left, _right) = pair(&a, pinned, &b, vec![a.public()]).await;
    match left {
        Err(LinkError::WrongPeer { expected, found }) => {
            assert_eq!(expected, hex::encode(pinned));
            assert_eq!(found, hex::encode(b.public()));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_for_a_handshake_is_a_noise_error() {
    let b = identity(2);
    let (mut x, y) = duplex(1 << 16);
    x.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    let got = respond(y, &b, &[identity(1).public()]).await;
    assert!(matches!(got, Err(LinkError::Noise(_))), "{got:?}");
    // A record cut short is a close, not a hang.
    let (mut x, y) = duplex(1 << 16);
    x.write_all(&[0, 200, 1, 2]).await.unwrap();
    drop(x);
    let got = respond(y, &b, &[identity(1).public()]).await;
    assert!(matches!(got, Err(LinkError::Closed)), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_the_handshake_out() {
    let b = identity(2);
    let (_x, y) = duplex(1 << 16);
    let got = respond(y, &b, &[identity(1).public()]).await;
    assert!(
        matches!(got, Err(LinkError::HandshakeTimeout(_))),
        "{got:?}"
    );
}

#[tokio::test]
async fn an_altered_or_replayed_record_ends_the_link() {
    let (a, b) = (identity(1), identity(2));
    // Between the two ends, a pipe the test can tamper with.
    let (x, mut mx) = duplex(1 << 16);
    let (mut my, y) = duplex(1 << 16);
    let forward = tokio::spawn(async move {
        // Copy the handshake (three records) both ways, then tamper with the next record.
        let mut records = Vec::new();
        for from_left in [true, false, true] {
            let (src, dst): (&mut DuplexStream, &mut DuplexStream) = if from_left {
                (&mut mx, &mut my)
            } else {
                (&mut my, &mut mx)
            };
            let rec = read_record(src).await.unwrap();
            write_record(dst, &rec).await.unwrap();
        }
        let mut rec = read_record(&mut mx).await.unwrap();
        records.push(rec.clone());
        // Deliver it once intact, then again (a replay), then flipped.
        write_record(&mut my, &rec).await.unwrap();
        write_record(&mut my, &rec).await.unwrap();
        rec[3] ^= 1;
        write_record(&mut my, &rec).await.unwrap();
        (mx, my)
    });
    let (b_key, a_key) = (b.public(), [a.public()]);
    let (left, right) = tokio::join!(initiate(x, &a, &b_key), respond(y, &b, &a_key));
    let (mut left, mut right) = (left.unwrap(), right.unwrap());
    left.send(b"once").await.unwrap();
    let _keep = forward.await.unwrap();
    assert_eq!(right.recv().await.unwrap(), b"once");
    assert!(matches!(right.recv().await, Err(LinkError::Noise(_))));
}

#[tokio::test]
async fn a_stream_is_relayed_both_ways_over_tcp() {
    let (a, b) = (identity(1), identity(2));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let b_public = b.public();
    let a_public = a.public();
    let responder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        respond(stream, &b, &[a_public]).await.unwrap()
    });
    let mut left = connect(&addr, &a, &b_public).await.unwrap();
    let mut right = responder.await.unwrap();
    // A message first (the offer), then the stream.
    left.send(b"offer").await.unwrap();
    assert_eq!(right.recv().await.unwrap(), b"offer");

    // Each side's "VMM" is the far end of a Unix socket pair.
    let (left_local, mut left_vmm) = UnixStream::pair().unwrap();
    let (right_local, mut right_vmm) = UnixStream::pair().unwrap();
    let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..5u8).collect();
    let left_relay = tokio::spawn(left.relay(left_local));
    let right_relay = tokio::spawn(right.relay(right_local));
    let up2 = up.clone();
    let source = tokio::spawn(async move {
        left_vmm.write_all(&up2).await.unwrap();
        left_vmm.shutdown().await.unwrap();
        let mut answer = Vec::new();
        left_vmm.read_to_end(&mut answer).await.unwrap();
        answer
    });
    let mut got = vec![0u8; up.len()];
    right_vmm.read_exact(&mut got).await.unwrap();
    assert!(got == up, "the stream arrived altered");
    right_vmm.write_all(&down).await.unwrap();
    right_vmm.shutdown().await.unwrap();
    let mut rest = Vec::new();
    right_vmm.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(source.await.unwrap(), down);
    let (l, r) = (
        left_relay.await.unwrap().unwrap(),
        right_relay.await.unwrap().unwrap(),
    );
    assert_eq!((l.sent, l.received), (up.len() as u64, down.len() as u64));
    assert_eq!((r.sent, r.received), (down.len() as u64, up.len() as u64));
}

#[tokio::test]
async fn a_message_inside_a_stream_ends_the_relay() {
    let (a, b) = (identity(1), identity(2));
    let (left, right) = pair(&a, b.public(), &b, vec![a.public()]).await;
    let (mut left, right) = (left.unwrap(), right.unwrap());
    let (local, _vmm) = UnixStream::pair().unwrap();
    let relay = tokio::spawn(right.relay(local));
    left.send(b"not stream data").await.unwrap();
    let got = relay.await.unwrap();
    assert!(
        matches!(
            got,
            Err(LinkError::Unexpected {
                found: "a message",
                ..
            })
        ),
        "{got:?}"
    );
}

#[test]
fn the_identity_is_made_once_private_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let first = Identity::open(dir.path()).unwrap();
    let path = dir.path().join("migration/host.key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(Identity::open(dir.path()).unwrap().public(), first.public());
    assert_eq!(
        parse_key(&hex::encode(first.public())),
        Some(first.public())
    );
    assert_eq!(parse_key("abc"), None);
    std::fs::write(&path, b"short").unwrap();
    let err = Identity::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not a 32-byte key"), "{err}");
}
