//! Tests of the file copy server over a Unix socket pair, with a temp dir as the agent's root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use shared_proto::files::{
    FilesDecoder, FilesErrorKind, FilesReply, FilesRequest, MAX_FILES_CHUNK, encode_files_message,
};
use tar::{EntryType, Header};

use super::*;
use crate::rootfs::dir::tests::test_owner;
use crate::rootfs::{Owner, PreparedRoot};

/// A temp dir holding the agent's root (`root/`) and `outside/secret` beside it.
struct Setup {
    tmp: tempfile::TempDir,
    owner: Owner,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/secret"), b"outside the root").unwrap();
        Self {
            tmp,
            owner: test_owner(),
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    fn prepared(&self) -> PreparedRoot {
        PreparedRoot {
            path: self.root(),
            owner: self.owner,
        }
    }

    /// Serves one connection with `limits`; answers the host's end and the server thread.
    fn serve(&self, limits: Limits) -> (Host, JoinHandle<Result<Transfer, FilesError>>) {
        serve_one(Some(self.prepared()), limits)
    }

    /// What is outside the root, so that a test can check nothing changed there.
    fn outside_listing(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.outside())
    }
}

fn serve_one(
    root: Option<PreparedRoot>,
    limits: Limits,
) -> (Host, JoinHandle<Result<Transfer, FilesError>>) {
    let (guest, host) = UnixStream::pair().unwrap();
    guest.set_idle_timeout(Duration::from_secs(20)).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let server = std::thread::spawn(move || handle(guest, root.as_ref(), &limits));
    (
        Host {
            s: host,
            d: FilesDecoder::new(),
        },
        server,
    )
}

/// The host's end of one connection.
struct Host {
    s: UnixStream,
    d: FilesDecoder<FilesReply>,
}

impl Host {
    fn send(&mut self, msg: &FilesRequest) {
        self.s
            .write_all(&encode_files_message(msg).unwrap())
            .unwrap();
    }

    /// The next reply; `None` at EOF.
    fn recv(&mut self) -> Option<FilesReply> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(m) = self.d.decode_next().unwrap() {
                return Some(m);
            }
            // The test process reaps children, so a SIGCHLD may interrupt the read.
            let n = match self.s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => read.expect("the guest went quiet"),
            };
            if n == 0 {
                return None;
            }
            self.d.push(&buf[..n]);
        }
    }

    /// Sends `Put`; on `Ready`, sends `tar` in chunks of `chunk` bytes and `End` from another
    /// thread while reading. Answers the replies after `Ready` (or the refusal).
    fn put(mut self, dest: &str, tar: Vec<u8>, chunk: usize) -> Vec<FilesReply> {
        self.send(&FilesRequest::Put { dest: dest.into() });
        let first = self.recv().expect("no answer to put");
        if first != FilesReply::Ready {
            let mut got = vec![first];
            got.extend(std::iter::from_fn(|| self.recv()));
            return got;
        }
        let mut writer = self.s.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for piece in tar.chunks(chunk) {
                let msg = FilesRequest::Chunk {
                    data: piece.to_vec(),
                };
                // The guest stops reading after a failure; the rest is lost on purpose.
                if writer
                    .write_all(&encode_files_message(&msg).unwrap())
                    .is_err()
                {
                    return;
                }
            }
            let _ = writer.write_all(&encode_files_message(&FilesRequest::End).unwrap());
        });
        let got: Vec<FilesReply> = std::iter::from_fn(|| self.recv()).collect();
        drop(self);
        sender.join().unwrap();
        got
    }

    /// Sends `Get` and collects the chunks and the replies that are not chunks.
    fn get(mut self, path: &str) -> (Vec<u8>, Vec<FilesReply>) {
        self.send(&FilesRequest::Get { path: path.into() });
        let mut tar = Vec::new();
        let mut others = Vec::new();
        while let Some(reply) = self.recv() {
            match reply {
                FilesReply::Chunk { data } => {
                    assert!(data.len() <= MAX_FILES_CHUNK);
                    tar.extend_from_slice(&data);
                }
                other => others.push(other),
            }
        }
        (tar, others)
    }
}

fn kind_of(replies: &[FilesReply]) -> Option<FilesErrorKind> {
    match replies {
        [FilesReply::Error { kind, .. }] => Some(*kind),
        _ => None,
    }
}

fn message_of(replies: &[FilesReply]) -> &str {
    match replies {
        [FilesReply::Error { message, .. }] => message,
        _ => panic!("not one error: {replies:?}"),
    }
}

/// Every file, link and folder below `dir`, with contents (link targets for links).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(
                    rel,
                    [b"link:", target.as_os_str().as_encoded_bytes()].concat(),
                );
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                todo.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// A folder with nested folders, empty and odd-sized files, a long name, a link and a mode.
fn sample_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    std::fs::create_dir_all(dir.join("empty-dir")).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::fs::write(dir.join("a/one"), b"1").unwrap();
    std::fs::write(dir.join("a/b/block"), vec![7u8; 512]).unwrap();
    let big: Vec<u8> = (0..(3 * MAX_FILES_CHUNK as u32 + 17))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("a/b/c/big.bin"), &big).unwrap();
    let long = "n".repeat(150);
    std::fs::write(dir.join("a").join(&long), b"a long name").unwrap();
    std::fs::write(dir.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(dir.join("run.sh"), PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a/one", dir.join("link-to-one")).unwrap();
}

/// A tar of the folder `src`, its entries under `name/`.
fn tar_of(src: &Path, name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(name, src).unwrap();
    b.into_inner().unwrap()
}

/// A tar holding one entry with a raw `path` (bypassing the builder's own checks).
fn raw_entry(path: &[u8], kind: EntryType, data: &[u8], link: Option<&[u8]>) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
    if let Some(link) = link {
        h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn a_folder_round_trips_byte_for_byte() {
    let setup = Setup::new();
    let src = setup.tmp.path().join("src");
    sample_tree(&src);
    let archive = tar_of(&src, "tree");

    let (host, server) = setup.serve(Limits::default());
    let replies = host.put("/work/in", archive.clone(), 10_000);
    assert_eq!(
        replies,
        [FilesReply::Done {
            bytes: archive.len() as u64,
            entries: 12
        }]
    );
    server.join().unwrap().unwrap();
    let landed = setup.root().join("work/in/tree");
    assert_eq!(snapshot(&landed), snapshot(&src));
    // What was made belongs to the agent; the mode came along.
    for path in [
        setup.root().join("work"),
        landed.clone(),
        landed.join("a/b/c/big.bin"),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (setup.owner.uid, setup.owner.gid),
            "{path:?}"
        );
    }
    let link = std::fs::symlink_metadata(landed.join("link-to-one")).unwrap();
    assert_eq!((link.uid(), link.gid()), (setup.owner.uid, setup.owner.gid));
    assert_eq!(
        std::fs::metadata(landed.join("run.sh")).unwrap().mode() & 0o7777,
        0o750
    );

    let (host, server) = setup.serve(Limits::default());
    let (tar, replies) = host.get("/work/in/tree");
    let Transfer { bytes, entries } = server.join().unwrap().unwrap();
    assert_eq!(
        replies,
        [FilesReply::Done {
            bytes: tar.len() as u64,
            entries: 12
        }]
    );
    assert_eq!((bytes, entries), (tar.len() as u64, 12));
    let back = setup.tmp.path().join("back");
    tar::Archive::new(&tar[..]).unpack(&back).unwrap();
    assert_eq!(snapshot(&back.join("tree")), snapshot(&src));
    assert_eq!(
        snapshot(&back).len(),
        snapshot(&src).len() + 1,
        "one top folder"
    );
}

#[test]
fn a_single_file_is_one_entry_named_by_its_last_component() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.root().join("etc")).unwrap();
    std::fs::write(setup.root().join("etc/motd"), b"hello\n").unwrap();
    let (host, _server) = setup.serve(Limits::default());
    let (tar, replies) = host.get("/etc/motd");
    assert!(
        matches!(replies[..], [FilesReply::Done { entries: 1, .. }]),
        "{replies:?}"
    );
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entries = archive.entries().unwrap();
    let mut e = entries.next().unwrap().unwrap();
    assert_eq!(e.path().unwrap(), Path::new("motd"));
    let mut data = String::new();
    e.read_to_string(&mut data).unwrap();
    assert_eq!(data, "hello\n");
    assert!(entries.next().is_none());
}

#[test]
fn escaping_entries_are_refused_and_nothing_lands_outside() {
    let setup = Setup::new();
    let before = setup.outside_listing();
    for (path, reason) in [
        (&b"../outside/x"[..], "has a .. component"),
        (b"a/../../outside/x", "has a .. component"),
        (b"/etc/x", "is absolute"),
    ] {
        let (host, server) = setup.serve(Limits::default());
        let replies = host.put(
            "/work",
            raw_entry(path, EntryType::Regular, b"x", None),
            512,
        );
        assert_eq!(
            kind_of(&replies),
            Some(FilesErrorKind::Refused),
            "{replies:?}"
        );
        assert!(message_of(&replies).contains(reason), "{replies:?}");
        assert!(server.join().unwrap().is_err());
    }
    assert_eq!(setup.outside_listing(), before);
    assert!(!setup.root().join("etc").exists());
    assert!(!setup.tmp.path().join("x").exists());
}

#[test]
fn symlinks_never_lead_a_copy_out_of_the_root() {
    let setup = Setup::new();
    let before = setup.outside_listing();
    std::os::unix::fs::symlink(setup.outside(), setup.root().join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside", setup.root().join("up")).unwrap();

    // Get through a link: the link resolves inside the root, where there is nothing.
    for path in ["/abs/secret", "/up/secret", "/up"] {
        let (host, _) = setup.serve(Limits::default());
        let (tar, replies) = host.get(path);
        assert_eq!(
            kind_of(&replies),
            Some(FilesErrorKind::NotFound),
            "{path}: {replies:?}"
        );
        assert!(tar.is_empty(), "{path}");
    }

    // Put with the link as the destination: refused, not created through the link.
    for dest in ["/abs", "/up", "/up/deeper"] {
        let (host, _) = setup.serve(Limits::default());
        let replies = host.put(dest, raw_entry(b"pwn", EntryType::Regular, b"x", None), 512);
        assert_eq!(
            kind_of(&replies),
            Some(FilesErrorKind::Refused),
            "{dest}: {replies:?}"
        );
    }

    // An archive that makes a link and then writes through it.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "esc", "../../outside").unwrap();
    let mut h = Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "esc/pwn", &b"pwn"[..]).unwrap();
    let archive = b.into_inner().unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/work", archive, 512);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::Refused),
        "{replies:?}"
    );
    // The link itself is made (harmless: it resolves inside the root for everyone).
    let link = setup.root().join("work/esc");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());

    // Get of the folder holding that link archives the link, not what it points to.
    let (host, _) = setup.serve(Limits::default());
    let (tar, replies) = host.get("/work");
    assert!(
        matches!(replies[..], [FilesReply::Done { entries: 2, .. }]),
        "{replies:?}"
    );
    let mut archive = tar::Archive::new(&tar[..]);
    let kinds: Vec<(PathBuf, EntryType)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().into_owned(), e.header().entry_type())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (PathBuf::from("work"), EntryType::Directory),
            (PathBuf::from("work/esc"), EntryType::Symlink)
        ]
    );
    assert_eq!(setup.outside_listing(), before);
}

#[test]
fn a_planted_hard_link_is_replaced_not_written_through() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.root().join("work")).unwrap();
    std::fs::write(setup.root().join("protected"), b"keep").unwrap();
    std::fs::hard_link(setup.root().join("protected"), setup.root().join("work/hl")).unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put(
        "/work",
        raw_entry(b"hl", EntryType::Regular, b"new", None),
        512,
    );
    assert!(
        matches!(replies[..], [FilesReply::Done { entries: 1, .. }]),
        "{replies:?}"
    );
    assert_eq!(
        std::fs::read(setup.root().join("protected")).unwrap(),
        b"keep"
    );
    assert_eq!(std::fs::read(setup.root().join("work/hl")).unwrap(), b"new");
    let meta = std::fs::metadata(setup.root().join("protected")).unwrap();
    assert_eq!(meta.nlink(), 1);
}

#[test]
fn setuid_bits_are_dropped_and_an_existing_file_is_replaced() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.root().join("work")).unwrap();
    std::fs::write(setup.root().join("work/f"), b"old contents, longer").unwrap();
    let mut h = Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o4755);
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut h, "f", &b"new"[..]).unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/work", b.into_inner().unwrap(), 512);
    assert!(
        matches!(replies[..], [FilesReply::Done { .. }]),
        "{replies:?}"
    );
    let meta = std::fs::metadata(setup.root().join("work/f")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read(setup.root().join("work/f")).unwrap(), b"new");
}

#[test]
fn devices_fifos_and_hard_links_are_refused() {
    let setup = Setup::new();
    for (kind, what) in [
        (EntryType::Char, "device node"),
        (EntryType::Block, "device node"),
        (EntryType::Fifo, "FIFO"),
        (EntryType::Link, "hard link"),
    ] {
        let (host, _) = setup.serve(Limits::default());
        let link = (kind == EntryType::Link).then_some(&b"other"[..]);
        let replies = host.put("/dev-test", raw_entry(b"node", kind, b"", link), 512);
        assert_eq!(
            kind_of(&replies),
            Some(FilesErrorKind::Unsupported),
            "{replies:?}"
        );
        assert!(message_of(&replies).contains(what), "{replies:?}");
        assert!(!setup.root().join("dev-test/node").exists());
    }
}

#[test]
fn long_names_come_from_gnu_and_pax_headers_within_a_cap() {
    let setup = Setup::new();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"pax/named/file"[..])])
        .unwrap();
    let mut h = Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "short", &b"pax"[..]).unwrap();
    let archive = b.into_inner().unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/w", archive, 512);
    assert!(
        matches!(replies[..], [FilesReply::Done { entries: 1, .. }]),
        "{replies:?}"
    );
    assert_eq!(
        std::fs::read(setup.root().join("w/pax/named/file")).unwrap(),
        b"pax"
    );
    assert!(!setup.root().join("w/short").exists());

    // A PAX size would change how the stream is cut: refused.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("size", &b"3"[..])]).unwrap();
    let mut h = Header::new_gnu();
    h.set_size(3);
    b.append_data(&mut h, "sized", &b"abc"[..]).unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/w", b.into_inner().unwrap(), 512);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::Unsupported),
        "{replies:?}"
    );

    // A long name of 100 KiB is not buffered.
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::GNULongName);
    let name = vec![b'n'; 100 * 1024];
    h.set_size(name.len() as u64);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &name[..]).unwrap();
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/w", b.into_inner().unwrap(), MAX_FILES_CHUNK);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::Unsupported),
        "{replies:?}"
    );
    assert!(message_of(&replies).contains("extension header over 64 KiB"));
}

#[test]
fn the_byte_cap_stops_a_put_and_a_get_with_too_large() {
    let setup = Setup::new();
    let limits = Limits {
        max_bytes: 64 * 1024,
        ..Limits::default()
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_size(1 << 20);
    h.set_mode(0o644);
    b.append_data(&mut h, "big", &vec![1u8; 1 << 20][..])
        .unwrap();
    let (host, server) = setup.serve(limits);
    let replies = host.put("/w", b.into_inner().unwrap(), MAX_FILES_CHUNK);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::TooLarge),
        "{replies:?}"
    );
    assert!(matches!(
        server.join().unwrap(),
        Err(FilesError::TooLarge { max: 65536 })
    ));
    // What was written before the cap stays (transfers are not atomic), and no more.
    let landed = std::fs::metadata(setup.root().join("w/big")).map(|m| m.len());
    assert!(landed.unwrap_or(0) <= 64 * 1024);

    std::fs::write(setup.root().join("w/big"), vec![2u8; 1 << 20]).unwrap();
    let (host, server) = setup.serve(limits);
    let (tar, replies) = host.get("/w/big");
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::TooLarge),
        "{replies:?}"
    );
    assert!(tar.len() <= 64 * 1024);
    assert!(server.join().unwrap().is_err());
}

#[test]
fn the_entry_cap_stops_a_put_and_a_get() {
    let setup = Setup::new();
    let limits = Limits {
        max_entries: 5,
        ..Limits::default()
    };
    let src = setup.tmp.path().join("many");
    std::fs::create_dir(&src).unwrap();
    for i in 0..10 {
        std::fs::write(src.join(format!("f{i}")), b"x").unwrap();
    }
    let (host, _) = setup.serve(limits);
    let replies = host.put("/w", tar_of(&src, "many"), 512);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::TooManyEntries),
        "{replies:?}"
    );

    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/w", tar_of(&src, "many"), 512);
    assert!(
        matches!(replies[..], [FilesReply::Done { entries: 11, .. }]),
        "{replies:?}"
    );
    let (host, _) = setup.serve(limits);
    let (_, replies) = host.get("/w/many");
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::TooManyEntries),
        "{replies:?}"
    );
}

#[test]
fn folders_nested_past_the_depth_cap_are_refused() {
    let setup = Setup::new();
    let limits = Limits {
        max_depth: 4,
        ..Limits::default()
    };
    std::fs::create_dir_all(setup.root().join("d/1/2/3/4/5")).unwrap();
    let (host, _) = setup.serve(limits);
    let (_, replies) = host.get("/d");
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::Unsupported),
        "{replies:?}"
    );
    let (host, _) = setup.serve(limits);
    let replies = host.put(
        "/w",
        raw_entry(b"1/2/3/4/5/f", EntryType::Regular, b"", None),
        512,
    );
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::Unsupported),
        "{replies:?}"
    );
}

#[test]
fn without_a_root_every_request_is_not_ready() {
    for request in [
        FilesRequest::Put { dest: "/w".into() },
        FilesRequest::Get { path: "/w".into() },
    ] {
        let (mut host, server) = serve_one(None, Limits::default());
        host.send(&request);
        let replies: Vec<_> = std::iter::from_fn(|| host.recv()).collect();
        assert_eq!(
            kind_of(&replies),
            Some(FilesErrorKind::NotReady),
            "{replies:?}"
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(FilesError::NotReady(_))
        ));
    }
}

#[test]
fn out_of_order_and_garbage_are_bad_requests() {
    let setup = Setup::new();
    let (mut host, _) = setup.serve(Limits::default());
    host.send(&FilesRequest::End);
    let replies: Vec<_> = std::iter::from_fn(|| host.recv()).collect();
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::BadRequest),
        "{replies:?}"
    );

    let (mut host, _) = setup.serve(Limits::default());
    host.s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
    let replies: Vec<_> = std::iter::from_fn(|| host.recv()).collect();
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::BadRequest),
        "{replies:?}"
    );

    // A second request inside a put's stream.
    let (mut host, _) = setup.serve(Limits::default());
    host.send(&FilesRequest::Put { dest: "/w".into() });
    assert_eq!(host.recv(), Some(FilesReply::Ready));
    host.send(&FilesRequest::Get { path: "/w".into() });
    let replies: Vec<_> = std::iter::from_fn(|| host.recv()).collect();
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::BadRequest),
        "{replies:?}"
    );

    // Bytes that are not a tar stream.
    let (host, _) = setup.serve(Limits::default());
    let replies = host.put("/w", vec![0x5a; 1024], 512);
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::BadRequest),
        "{replies:?}"
    );
}

#[test]
fn a_host_that_leaves_mid_put_ends_the_transfer_at_once() {
    let setup = Setup::new();
    let (mut host, server) = setup.serve(Limits::default());
    host.send(&FilesRequest::Put { dest: "/w".into() });
    assert_eq!(host.recv(), Some(FilesReply::Ready));
    let half = raw_entry(b"f", EntryType::Regular, &[1u8; 4096], None);
    host.send(&FilesRequest::Chunk {
        data: half[..1024].to_vec(),
    });
    host.s.shutdown(std::net::Shutdown::Write).unwrap();
    let start = std::time::Instant::now();
    let result = server.join().unwrap();
    assert!(matches!(result, Err(FilesError::Closed(_))), "{result:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let replies: Vec<_> = std::iter::from_fn(|| host.recv()).collect();
    assert_eq!(kind_of(&replies), Some(FilesErrorKind::Io), "{replies:?}");
}

#[test]
fn the_server_takes_one_connection_after_another() {
    let setup = Setup::new();
    std::fs::write(setup.root().join("f"), b"data").unwrap();
    let socket = setup.tmp.path().join("files.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let root = std::sync::Arc::new(OnceLock::new());
    let served = std::sync::Arc::clone(&root);
    std::thread::spawn(move || serve(&listener, &served, &Limits::default()));
    let connect = || Host {
        s: UnixStream::connect(&socket).unwrap(),
        d: FilesDecoder::new(),
    };
    let (_, replies) = connect().get("/f");
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::NotReady),
        "{replies:?}"
    );
    root.set(setup.prepared()).unwrap();
    for _ in 0..2 {
        let (tar, replies) = connect().get("/f");
        assert!(
            matches!(replies[..], [FilesReply::Done { entries: 1, .. }]),
            "{replies:?}"
        );
        assert!(!tar.is_empty());
    }
}

/// Runs `f` on a thread of its own mount namespace, where mounts stay private to it.
/// Answers `None` when the test process may not make one (not root, or no mount namespaces).
fn in_private_mount_namespace<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    use nix::mount::MsFlags;
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNS gives this thread (and only it, it
        // shares no fs_struct after the call) its own copy of the mount table.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return None;
        }
        let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
        nix::mount::mount(None::<&str>, "/", None::<&str>, private, None::<&str>).ok()?;
        Some(f())
    })
    .join()
    .unwrap()
}

#[test]
fn a_full_disk_is_a_no_space_reply_not_a_hang() {
    let outcome = in_private_mount_namespace(|| {
        let setup = Setup::new();
        // A 64 KiB file system as the agent's root; the mount lives in this thread's namespace.
        nix::mount::mount(
            Some("tmpfs"),
            &setup.root(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .expect("tmpfs");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_size(1 << 20);
        h.set_mode(0o644);
        b.append_data(&mut h, "fill", &vec![3u8; 1 << 20][..])
            .unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let host = Host {
            s: host,
            d: FilesDecoder::new(),
        };
        let client = std::thread::spawn(move || host.put("/", b.into_inner().unwrap(), 32 * 1024));
        let result = handle(guest, Some(&setup.prepared()), &Limits::default());
        let replies = client.join().unwrap();
        // So that the temp dir can be removed.
        nix::mount::umount(&setup.root()).expect("umount");
        (result, replies)
    });
    let Some((result, replies)) = outcome else {
        eprintln!("skipped: a private mount namespace needs root");
        return;
    };
    assert_eq!(
        kind_of(&replies),
        Some(FilesErrorKind::NoSpace),
        "{replies:?}"
    );
    assert!(message_of(&replies).contains("ENOSPC"), "{replies:?}");
    assert!(matches!(
        result,
        Err(FilesError::Entry {
            source: Errno::ENOSPC,
            ..
        })
    ));
}
