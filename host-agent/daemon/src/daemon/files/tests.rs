//! Tests of the host side of `nanoclaw cp`: the re-write of a guest's archive, the channel
//! against the sidecar's own file copy server behind a fake VMM socket (and against hostile
//! guests), and copies off a real ext4 disk made with `mkfs.ext4` and read with `debugfs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path as FsPath, PathBuf};
use std::process::Command;

use axum::body::Body;
use shared_proto::files::{FilesDecoder, FilesReply, FilesRequest, encode_files_message};
use tar::{EntryType, Header};

use super::archive::{self, ArchiveError, ChannelWriter, Piece};
use super::disk::DiskError;
use super::guest::{GuestFiles, VSOCK_SOCKET};
use super::*;

/// What an archive holds: name to (kind, contents or link target, mode).
type Listing = BTreeMap<String, (char, Vec<u8>, u32)>;

/// Parses a whole archive.
fn listing(tar_bytes: &[u8]) -> Listing {
    let mut out = Listing::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().expect("an archive") {
        let mut entry = entry.expect("an entry");
        let name = entry.path().unwrap().display().to_string();
        let mode = entry.header().mode().unwrap();
        let (kind, data) = match entry.header().entry_type() {
            EntryType::Directory => ('d', Vec::new()),
            EntryType::Symlink => (
                'l',
                entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default(),
            ),
            EntryType::Regular => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                ('f', data)
            }
            other => panic!("{name}: unexpected {other:?}"),
        };
        out.insert(name, (kind, data, mode));
    }
    out
}

/// Bytes that no two files share: a position-dependent pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// An archive with a raw name (the tar crate refuses `..` and absolute names itself).
fn raw_entry(tar: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, data: &[u8]) {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    tar.append(&h, data).unwrap();
}

fn file(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8], mode: u32) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    tar.append_data(&mut h, name, data).unwrap();
}

fn dir(tar: &mut tar::Builder<Vec<u8>>, name: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    tar.append_data(&mut h, name, std::io::empty()).unwrap();
}

fn symlink(tar: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    tar.append_link(&mut h, name, target).unwrap();
}

/// A folder of several kinds of file, as a guest's `Get` would send it.
fn good_archive() -> (Vec<u8>, String) {
    let long = format!("out/{}", "n".repeat(150));
    let mut tar = tar::Builder::new(Vec::new());
    dir(&mut tar, "out");
    file(&mut tar, "out/bin", &pattern(100_000, 1), 0o4755);
    dir(&mut tar, "out/a");
    dir(&mut tar, "out/a/b");
    file(&mut tar, "out/a/b/c.txt", b"nested\n", 0o644);
    file(&mut tar, "out/empty", b"", 0o600);
    symlink(&mut tar, "out/link", "../../etc");
    file(&mut tar, &long, b"long name", 0o644);
    (tar.into_inner().unwrap(), long)
}

const LIMITS: archive::Limits = archive::Limits {
    max_entries: 100,
    max_depth: 8,
};

/// Runs [`archive::sanitize`] over `input`; answers its outcome and what it wrote.
fn sanitize(input: Vec<u8>, limits: archive::Limits) -> (Result<u64, ArchiveError>, Vec<u8>) {
    let (tx, mut rx) = mpsc::channel::<Piece>(4);
    let worker = std::thread::spawn(move || {
        let mut out = ChannelWriter::new(tx);
        archive::sanitize(input.as_slice(), &mut out, &limits)
    });
    let mut written = Vec::new();
    while let Some(piece) = rx.blocking_recv() {
        written.extend_from_slice(&piece.expect("the writer sends no error items itself"));
    }
    (worker.join().unwrap(), written)
}

/// Whether `bytes` end with tar's end-of-archive blocks.
fn ends_whole(bytes: &[u8]) -> bool {
    bytes.len() >= 1024 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0)
}

#[test]
fn a_guest_archive_is_rewritten_with_the_same_files_and_no_set_id_bits() {
    let (input, long) = good_archive();
    let (result, out) = sanitize(input.clone(), LIMITS);
    assert_eq!(result.unwrap(), 8);
    let got = listing(&out);
    let want = listing(&input);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, (kind, data, mode)) in &want {
        let (k, d, m) = &got[name];
        assert_eq!((k, d), (kind, data), "{name}");
        if *kind != 'l' {
            assert_eq!(*m, mode & 0o777, "{name}");
        }
    }
    assert_eq!(got["out/bin"].2, 0o755, "the setuid bit is gone");
    assert_eq!(got[&long].1, b"long name");
    assert_eq!(got["out/link"].1, b"../../etc", "a symlink stays a symlink");
}

#[test]
fn hostile_guest_archives_are_refused_and_never_end_like_whole_ones() {
    type Build = fn(&mut tar::Builder<Vec<u8>>);
    type Expected = fn(&ArchiveError) -> bool;
    let cases: Vec<(&str, Build, Expected)> = vec![
        (
            "dot-dot",
            |t| raw_entry(t, "out/../../etc/passwd", EntryType::Regular, b"x"),
            |e| matches!(e, ArchiveError::BadName { .. }),
        ),
        (
            "absolute",
            |t| raw_entry(t, "/etc/passwd", EntryType::Regular, b"x"),
            |e| matches!(e, ArchiveError::BadName { .. }),
        ),
        (
            "device",
            |t| raw_entry(t, "out/sda", EntryType::Block, b""),
            |e| {
                matches!(
                    e,
                    ArchiveError::Unsupported {
                        what: "block device",
                        ..
                    }
                )
            },
        ),
        (
            "char device",
            |t| raw_entry(t, "out/null", EntryType::Char, b""),
            |e| matches!(e, ArchiveError::Unsupported { .. }),
        ),
        (
            "fifo",
            |t| raw_entry(t, "out/p", EntryType::Fifo, b""),
            |e| matches!(e, ArchiveError::Unsupported { .. }),
        ),
        (
            "hard link",
            |t| {
                file(t, "out/a", b"a", 0o644);
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                t.append_link(&mut h, "out/b", "/etc/shadow").unwrap();
            },
            |e| {
                matches!(
                    e,
                    ArchiveError::Unsupported {
                        what: "hard link",
                        ..
                    }
                )
            },
        ),
        (
            "below a symlink",
            |t| {
                symlink(t, "out/etc", "/etc");
                file(t, "out/etc/passwd", b"root::0:0::/:/bin/sh\n", 0o644);
            },
            |e| {
                matches!(
                    e,
                    ArchiveError::Below {
                        what: "symlink",
                        ..
                    }
                )
            },
        ),
        (
            "below a file",
            |t| {
                file(t, "out/f", b"f", 0o644);
                file(t, "out/f/g", b"g", 0o644);
            },
            |e| matches!(e, ArchiveError::Below { what: "file", .. }),
        ),
        (
            "twice",
            |t| {
                dir(t, "out/d");
                symlink(t, "out/d", "/etc");
            },
            |e| matches!(e, ArchiveError::Duplicate { .. }),
        ),
        (
            "too deep",
            |t| file(t, "a/b/c/d/e/f/g/h/i", b"deep", 0o644),
            |e| matches!(e, ArchiveError::TooDeep { .. }),
        ),
        (
            "pax",
            |t| {
                t.append_pax_extensions([("path", b"out/x".as_slice())])
                    .unwrap();
                file(t, "out/y", b"y", 0o644);
            },
            |e| {
                matches!(
                    e,
                    ArchiveError::Unsupported {
                        what: "PAX header",
                        ..
                    }
                )
            },
        ),
        (
            "too long a name",
            |t| {
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::GNULongName);
                let name = vec![b'a'; 10_000];
                h.set_size(name.len() as u64);
                h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
                h.set_cksum();
                t.append(&h, name.as_slice()).unwrap();
                file(t, "out/x", b"x", 0o644);
            },
            |e| matches!(e, ArchiveError::NameTooLong { .. }),
        ),
        (
            "too many",
            |t| {
                for i in 0..101 {
                    file(t, &format!("f{i}"), b"", 0o644);
                }
            },
            |e| matches!(e, ArchiveError::TooManyEntries { max: 100 }),
        ),
    ];
    for (name, build, expected) in cases {
        let mut tar = tar::Builder::new(Vec::new());
        dir(&mut tar, "out");
        file(&mut tar, "out/first", &pattern(700, 9), 0o644);
        build(&mut tar);
        let (result, out) = sanitize(tar.into_inner().unwrap(), LIMITS);
        match result {
            Err(e) if expected(&e) => {}
            other => panic!("{name}: {other:?}"),
        }
        assert!(
            !ends_whole(&out),
            "{name}: the output ends like a whole archive"
        );
    }
}

#[test]
fn an_error_of_the_guest_after_the_last_entry_is_still_an_error() {
    let (input, _) = good_archive();
    let (tx, rx) = mpsc::channel::<Piece>(256);
    for piece in input.chunks(4096) {
        tx.try_send(Ok(axum::body::Bytes::copy_from_slice(piece)))
            .unwrap();
    }
    tx.try_send(Err(std::io::Error::other("the guest failed")))
        .unwrap();
    drop(tx);
    let (out_tx, mut out_rx) = mpsc::channel::<Piece>(64);
    let worker = std::thread::spawn(move || {
        let mut out = ChannelWriter::new(out_tx);
        archive::sanitize(ChannelReader::new(rx), &mut out, &LIMITS)
    });
    let mut written = Vec::new();
    while let Some(piece) = out_rx.blocking_recv() {
        written.extend_from_slice(&piece.unwrap());
    }
    assert!(matches!(worker.join().unwrap(), Err(ArchiveError::Read(_))));
    assert!(!ends_whole(&written));
}

#[test]
fn guest_text_is_cut_and_loses_control_characters() {
    assert_eq!(
        guest_text(b"no such file\x1b[2J\n\r\x07!"),
        "no such file[2J!"
    );
    let long = guest_text("é".repeat(1000).as_bytes());
    assert!(
        long.len() <= MAX_GUEST_TEXT + '…'.len_utf8(),
        "{}",
        long.len()
    );
    assert!(long.ends_with('…'));
    assert_eq!(guest_text(b"\xff ok"), "\u{fffd} ok");
    let e = FilesError::guest(FilesErrorKind::Refused, "escape\u{1b}]0;title\u{7}");
    assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_chain(&e), "the guest refused: escape]0;title");
    for (kind, status) in [
        (FilesErrorKind::NotReady, StatusCode::CONFLICT),
        (FilesErrorKind::NotFound, StatusCode::NOT_FOUND),
        (FilesErrorKind::TooLarge, StatusCode::PAYLOAD_TOO_LARGE),
        (
            FilesErrorKind::TooManyEntries,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (FilesErrorKind::NoSpace, StatusCode::INSUFFICIENT_STORAGE),
        (
            FilesErrorKind::Unsupported,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        assert_eq!(guest_status(kind), status, "{kind:?}");
    }
}

// ---- The channel, against the sidecar's server behind a fake VMM socket. ----

/// A VM directory whose `vsock.sock` answers `CONNECT` like the VMM and hands each connection
/// to `serve` on a thread.
struct FakeVm {
    dir: tempfile::TempDir,
}

impl FakeVm {
    fn new(serve: impl Fn(UnixStream) + Send + Sync + 'static) -> Self {
        Self::with_answer(b"OK 1024\n", serve)
    }

    fn with_answer(
        answer: &'static [u8],
        serve: impl Fn(UnixStream) + Send + Sync + 'static,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join(VSOCK_SOCKET)).unwrap();
        let serve = std::sync::Arc::new(serve);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let serve = std::sync::Arc::clone(&serve);
                std::thread::spawn(move || {
                    let mut line = String::new();
                    BufReader::new(stream.try_clone().unwrap())
                        .read_line(&mut line)
                        .unwrap();
                    assert_eq!(
                        line,
                        format!("CONNECT {}\n", shared_proto::ports::FILES_PORT)
                    );
                    stream.write_all(answer).unwrap();
                    if answer.starts_with(b"OK ") {
                        serve(stream);
                    }
                });
            }
        });
        Self { dir }
    }

    fn path(&self) -> &FsPath {
        self.dir.path()
    }
}

/// An agent root served by the sidecar's file copy server.
fn sidecar_vm(root: Option<PathBuf>) -> FakeVm {
    let owner = vpod_sidecar::rootfs::Owner {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    FakeVm::new(move |stream| {
        let prepared = root
            .clone()
            .map(|path| vpod_sidecar::rootfs::PreparedRoot { path, owner });
        let _ = vpod_sidecar::files::handle(
            stream,
            prepared.as_ref(),
            &vpod_sidecar::files::Limits::default(),
        );
    })
}

/// A body that arrives in pieces of `piece` bytes.
fn body_of(bytes: Vec<u8>, piece: usize) -> Body {
    let pieces: Vec<Result<axum::body::Bytes, std::io::Error>> = bytes
        .chunks(piece)
        .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(pieces))
}

/// A tar of `in/`: binary files, nested folders and a symlink.
fn upload() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    dir(&mut tar, "in");
    file(&mut tar, "in/blob", &pattern(300_000, 3), 0o644);
    dir(&mut tar, "in/x");
    dir(&mut tar, "in/x/y");
    file(&mut tar, "in/x/y/z.bin", &pattern(70_001, 5), 0o600);
    symlink(&mut tar, "in/x/up", "../blob");
    tar.into_inner().unwrap()
}

#[tokio::test]
async fn a_folder_goes_in_and_comes_back_out_byte_for_byte() {
    let root = tempfile::tempdir().unwrap();
    let vm = sidecar_vm(Some(root.path().to_owned()));
    let tar = upload();

    let conn = GuestFiles::connect(vm.path(), None).await.unwrap();
    let put = conn
        .put("/work", body_of(tar.clone(), 10_000), MAX_TAR_BYTES)
        .await
        .unwrap();
    assert_eq!(put.entries, 6);
    assert_eq!(put.bytes, tar.len() as u64);
    assert_eq!(
        std::fs::read(root.path().join("work/in/x/y/z.bin")).unwrap(),
        pattern(70_001, 5)
    );

    let rx = get_running(vm.path(), None, "vm", "/work/in")
        .await
        .unwrap();
    let got = listing(&collect(rx).await.unwrap());
    let want = listing(&tar);
    assert_eq!(got.len(), want.len());
    for (name, (kind, data, _)) in &want {
        assert_eq!((&got[name].0, &got[name].1), (kind, data), "{name}");
    }
}

#[tokio::test]
async fn the_guests_refusals_come_back_with_their_status() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("work")).unwrap();
    let vm = sidecar_vm(Some(root.path().to_owned()));

    let e = get_running(vm.path(), None, "vm", "/work/missing")
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::NOT_FOUND, "{e:?}");

    // An escape in the archive: the sidecar refuses it, nothing lands outside the root.
    let mut tar = tar::Builder::new(Vec::new());
    file(&mut tar, "ok", b"fine", 0o644);
    raw_entry(&mut tar, "../../escaped", EntryType::Regular, b"evil");
    let conn = GuestFiles::connect(vm.path(), None).await.unwrap();
    let e = conn
        .put(
            "/work",
            body_of(tar.into_inner().unwrap(), 512),
            MAX_TAR_BYTES,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY, "{e:?}");
    assert!(error_chain(&e).contains(".."), "{}", error_chain(&e));
    assert!(!root.path().parent().unwrap().join("escaped").exists());

    // Over the cap: the daemon stops sending.
    let conn = GuestFiles::connect(vm.path(), None).await.unwrap();
    let e = conn
        .put("/work", body_of(upload(), 4096), 10_000)
        .await
        .unwrap_err();
    assert!(matches!(e, FilesError::TooLarge { max: 10_000 }), "{e:?}");
    assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A guest whose root is not built yet.
    let not_ready = sidecar_vm(None);
    let conn = GuestFiles::connect(not_ready.path(), None).await.unwrap();
    let e = conn
        .put("/work", body_of(upload(), 4096), MAX_TAR_BYTES)
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
}

#[tokio::test]
async fn a_vm_without_the_channel_is_a_conflict() {
    let nobody = tempfile::tempdir().unwrap();
    let e = GuestFiles::connect(nobody.path(), None).await.unwrap_err();
    assert!(matches!(e, FilesError::Connect(_)), "{e:?}");
    assert_eq!(e.status(), StatusCode::CONFLICT);

    // The VMM accepts, then closes: no guest listens on the port.
    let closed = FakeVm::with_answer(b"", |_| {});
    let e = GuestFiles::connect(closed.path(), None).await.unwrap_err();
    assert!(matches!(e, FilesError::NotListening), "{e:?}");

    // A socket served by another uid than the VM's jailed VMM (another VM's, behind a link the
    // hostile VMM put in its folder) is refused before anything is sent.
    let other = FakeVm::with_answer(b"OK 1\n", |_| {});
    let me = nix::unistd::getuid().as_raw();
    let e = GuestFiles::connect(other.path(), Some(me.wrapping_add(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, FilesError::NotTheVmm { peer, .. } if peer == me),
        "{e:?}"
    );
    assert!(GuestFiles::connect(other.path(), Some(me)).await.is_ok());

    let odd = FakeVm::with_answer(b"NO\x1b[31m\n", |_| {});
    let e = GuestFiles::connect(odd.path(), None).await.unwrap_err();
    assert_eq!(
        error_chain(&e),
        "the VMM refused the connection: \"NO[31m\""
    );
}

/// A hostile guest: answers any `Get` with `replies`.
fn hostile_vm(replies: Vec<FilesReply>) -> FakeVm {
    FakeVm::new(move |mut stream| {
        let mut decoder = FilesDecoder::<FilesRequest>::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Some(_)) = decoder.decode_next() {
                break;
            }
            let n = stream.read(&mut buf).unwrap();
            decoder.push(&buf[..n]);
        }
        let pieces = replies.iter().flat_map(|reply| match reply {
            FilesReply::Chunk { data } => data
                .chunks(shared_proto::files::MAX_FILES_CHUNK)
                .map(|c| FilesReply::Chunk { data: c.to_vec() })
                .collect(),
            other => vec![other.clone()],
        });
        for reply in pieces {
            if stream
                .write_all(&encode_files_message(&reply).unwrap())
                .is_err()
            {
                return;
            }
        }
    })
}

#[tokio::test]
async fn a_hostile_guests_get_is_cut_short_before_it_reaches_the_client() {
    let mut tar = tar::Builder::new(Vec::new());
    file(&mut tar, "out/ok", &pattern(2000, 1), 0o644);
    raw_entry(
        &mut tar,
        "../../../root/.ssh/authorized_keys",
        EntryType::Regular,
        b"key",
    );
    let evil = tar.into_inner().unwrap();
    let vm = hostile_vm(vec![
        FilesReply::Chunk { data: evil },
        FilesReply::Done {
            bytes: 0,
            entries: 2,
        },
    ]);
    let rx = get_running(vm.path(), None, "vm", "/out").await.unwrap();
    let cut = collect(rx).await;
    assert!(cut.is_err(), "the body fails instead of ending");

    // An error of the guest after a good start also fails the body.
    let (good, _) = good_archive();
    let vm = hostile_vm(vec![
        FilesReply::Chunk {
            data: good[..4096].to_vec(),
        },
        FilesReply::error(FilesErrorKind::Io, "disk on fire"),
    ]);
    let rx = get_running(vm.path(), None, "vm", "/out").await.unwrap();
    assert!(collect(rx).await.is_err());

    // A guest that sends a whole archive and then closes without `Done`.
    let vm = hostile_vm(vec![FilesReply::Chunk { data: good }]);
    let rx = get_running(vm.path(), None, "vm", "/out").await.unwrap();
    assert!(collect(rx).await.is_err());

    // A refusal before any chunk is an answer with its status.
    let vm = hostile_vm(vec![FilesReply::error(FilesErrorKind::NotReady, "later")]);
    let e = get_running(vm.path(), None, "vm", "/out")
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::CONFLICT);
}

// ---- Copies off an ended VM's writable disk. ----

/// A VM directory whose writable disk holds `upper/` as laid out by `fill`.
fn ended_vm(fill: impl FnOnce(&FsPath)) -> tempfile::TempDir {
    let vm = tempfile::tempdir().unwrap();
    let staged = vm.path().join("staged");
    std::fs::create_dir_all(staged.join("upper")).unwrap();
    fill(&staged.join("upper"));
    nanoclaw_image::create_scratch_disk_with(
        &vm.path().join(SCRATCH_DISK_FILE),
        32 << 20,
        Some(&staged),
    )
    .unwrap();
    std::fs::remove_dir_all(&staged).unwrap();
    vm
}

/// Runs `debugfs -w -R CMD` on the VM's disk (to make it hostile).
fn debugfs_w(vm: &FsPath, cmd: &str) {
    let out = Command::new(disk::DEBUGFS.find().unwrap())
        .args(["-w", "-R", cmd])
        .arg(vm.join(SCRATCH_DISK_FILE))
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {out:?}");
}

fn agent_output(upper: &FsPath) {
    let out = upper.join("work/out");
    std::fs::create_dir_all(out.join("a/b")).unwrap();
    std::fs::write(out.join("bin"), pattern(200_000, 7)).unwrap();
    std::fs::set_permissions(out.join("bin"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(out.join("a/b/c.txt"), b"nested\n").unwrap();
    std::fs::write(out.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("/etc", out.join("etc")).unwrap();
    std::os::unix::fs::symlink("x".repeat(300), out.join("slow-link")).unwrap();
    nix::unistd::mkfifo(
        &out.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
}

async fn ended_get(vm: &FsPath, path: &str) -> Result<Listing, FilesError> {
    let rx = get_ended(vm, "vm", path).await?;
    let bytes = collect(rx).await.expect("a whole body");
    Ok(listing(&bytes))
}

#[tokio::test]
async fn an_ended_vms_files_come_off_its_disk_with_symlinks_as_links() {
    let vm = ended_vm(agent_output);
    let got = ended_get(vm.path(), "/work/out").await.unwrap();
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "out",
            "out/a",
            "out/a/b",
            "out/a/b/c.txt",
            "out/bin",
            "out/empty",
            "out/etc",
            "out/slow-link"
        ],
        "the FIFO is left out"
    );
    assert_eq!(got["out/bin"], ('f', pattern(200_000, 7), 0o755));
    assert_eq!(got["out/a/b/c.txt"].1, b"nested\n");
    assert_eq!(got["out/empty"].1, b"");
    assert_eq!(got["out/etc"].0, 'l');
    assert_eq!(got["out/etc"].1, b"/etc");
    assert_eq!(got["out/slow-link"].1, "x".repeat(300).as_bytes());

    let one = ended_get(vm.path(), "/work/out/a/b/c.txt").await.unwrap();
    assert_eq!(one.keys().collect::<Vec<_>>(), ["c.txt"]);
    let all = ended_get(vm.path(), "/").await.unwrap();
    assert!(all.contains_key("work/out/bin"), "{:?}", all.keys());

    let e = ended_get(vm.path(), "/work/out/etc/passwd")
        .await
        .unwrap_err();
    assert!(
        matches!(e, FilesError::Disk(DiskError::ThroughSymlink { .. })),
        "{e:?}"
    );
    assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e = ended_get(vm.path(), "/work/nothing").await.unwrap_err();
    assert_eq!(e.status(), StatusCode::NOT_FOUND, "{e:?}");
    let leftovers: Vec<_> = std::fs::read_dir(vm.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from(SCRATCH_DISK_FILE)]);
}

#[tokio::test]
async fn a_hostile_disk_is_refused() {
    // A name given twice in one folder (a symlink to /etc, then a file of the same name, is
    // what makes `rdump` write through the link).
    let vm = ended_vm(agent_output);
    debugfs_w(vm.path(), "ln /upper/work/out/bin /upper/work/out/a");
    debugfs_w(vm.path(), "ln /upper/work/out/bin /upper/work/out/a");
    let e = ended_get(vm.path(), "/work/out").await.unwrap_err();
    assert!(
        matches!(e, FilesError::Disk(DiskError::Duplicate { .. })),
        "{e:?}"
    );

    // A folder linked into itself.
    let vm = ended_vm(agent_output);
    debugfs_w(vm.path(), "ln /upper/work/out /upper/work/out/a/b/loop");
    let e = ended_get(vm.path(), "/work/out").await.unwrap_err();
    assert!(
        matches!(e, FilesError::Disk(DiskError::Loop { .. })),
        "{e:?}"
    );

    // A name with a newline cannot be told from the listing's own lines.
    let vm = ended_vm(|upper| {
        std::fs::create_dir_all(upper.join("work/out")).unwrap();
        std::fs::write(upper.join("work/out/two\nlines"), b"x").unwrap();
    });
    let e = ended_get(vm.path(), "/work/out").await.unwrap_err();
    assert!(
        matches!(e, FilesError::Disk(DiskError::Malformed { .. })),
        "{e:?}"
    );
    assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // No disk at all.
    let gone = tempfile::tempdir().unwrap();
    let e = ended_get(gone.path(), "/work").await.unwrap_err();
    assert_eq!(e.status(), StatusCode::CONFLICT, "{e:?}");
}
