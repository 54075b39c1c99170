//! `nanoclaw cp` end to end: a folder of binary files, nested folders and a symlink goes into a
//! running image VM and comes back out byte for byte; escapes are refused (paths with `..`, a
//! hostile archive, a symlink of the guest pointing at `/etc`); and once the VM is stopped, what
//! the agent wrote comes off its writable disk.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nanoclaw_tests::oci::import_test_image;
use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin, RUN_TIMEOUT, pattern};

/// Boot and agent start under nested virtualization.
const AGENT: Duration = Duration::from_secs(300);

/// The agent: leaves a file and a symlink to `/etc` in `/data`, then syncs every second (so
/// that what `cp` put in is on the writable disk when the VM is stopped) until it is stopped.
const AGENT_SH: &str = "busybox mkdir -p /data/trap && busybox ln -s /etc /data/trap/etc \
    && echo agent-wrote > /data/agent.txt && echo ready \
    && while :; do sync; sleep 1; done";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn nanoclaw(d: &Daemon, args: &[&str], timeout: Duration) -> Output {
    d.nanoclaw(args)
        .output_within(timeout)
        .unwrap_or_else(|e| panic!("nanoclaw {args:?}: {e:#}\n{}", d.records()))
}

/// `nanoclaw ARGS`, which must succeed; answers its stdout.
fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = nanoclaw(d, args, CLI_TIMEOUT);
    assert!(
        out.status.success(),
        "nanoclaw {args:?}: {}\n{}",
        text(&out.stderr),
        d.records()
    );
    text(&out.stdout)
}

/// `nanoclaw ARGS`, which must fail; answers its stderr.
fn refused(d: &Daemon, args: &[&str]) -> String {
    let out = nanoclaw(d, args, CLI_TIMEOUT);
    assert!(
        !out.status.success(),
        "nanoclaw {args:?} succeeded: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// What a host folder holds, symlinks as their targets (never followed).
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let path = root.join(&rel);
            let ft = std::fs::symlink_metadata(&path).unwrap().file_type();
            let node = if ft.is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap())
            } else if ft.is_dir() {
                stack.push(rel.clone());
                Node::Dir
            } else {
                Node::File(std::fs::read(&path).unwrap())
            };
            out.insert(rel, node);
        }
    }
    out
}

/// The folder copied in: binary files (one over many 64 KiB chunks), nested folders, an empty
/// file and a relative symlink.
fn payload(dir: &Path) -> PathBuf {
    let root = dir.join("payload");
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("big.bin"), pattern(1_500_000, 1)).unwrap();
    std::fs::write(root.join("a/small.bin"), pattern(777, 2)).unwrap();
    std::fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    std::fs::write(root.join("a/b/empty"), b"").unwrap();
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("link")).unwrap();
    root
}

/// One raw HTTP/1.1 request on the daemon's socket; answers the status code and the body.
fn raw_http(d: &Daemon, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(CLI_TIMEOUT)).unwrap();
    write!(
        s,
        "{head} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let answer = text(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A tar whose second entry climbs out of the destination (written raw: the tar crate refuses
/// `..` names).
fn escaping_tar() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(2);
    tar.append_data(&mut h, "fine.txt", &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(4);
    h.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../../escape.txt");
    h.set_cksum();
    tar.append(&h, &b"evil"[..]).unwrap();
    tar.into_inner().unwrap()
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn files_go_in_and_out_of_a_vm_escapes_are_refused_and_a_stopped_vms_disk_is_read() {
    let guest = GuestImage::from_env().expect("guest image");
    let d = Daemon::start(&guest.vmlinux, &guest.initramfs).expect("start the daemon");
    let work = tempfile::tempdir().unwrap();
    import_test_image(&d, "cp-test", RUN_TIMEOUT).expect("import the test image");

    let id = super::agent::detach_in_image(&d, "cp-test", &["/bin/sh", "-c", AGENT_SH]);
    d.wait_for(&id, AGENT, "running its agent", |i| {
        i["status"] == "running"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", d.records()));
    // The agent's files are there once it has said so.
    let deadline = std::time::Instant::now() + AGENT;
    while !ok(&d, &["logs", &id]).contains("ready") {
        assert!(std::time::Instant::now() < deadline, "{}", d.records());
        std::thread::sleep(Duration::from_millis(250));
    }

    // In and back out, byte for byte.
    let src = payload(work.path());
    let said = ok(&d, &["cp", src.to_str().unwrap(), &format!("{id}:/work")]);
    assert!(said.contains("copied 9 entries"), "{said}");
    let back = work.path().join("back");
    let said = ok(
        &d,
        &["cp", &format!("{id}:/work/payload"), back.to_str().unwrap()],
    );
    assert!(said.contains("copied 9 entries"), "{said}");
    assert_eq!(tree(&back.join("payload")), tree(&src));
    // A second copy to the same place does not overwrite.
    let err = refused(
        &d,
        &["cp", &format!("{id}:/work/payload"), back.to_str().unwrap()],
    );
    assert!(err.contains("does not overwrite"), "{err}");

    // Paths that climb are refused by the CLI, and by the daemon when sent raw.
    for bad in [format!("{id}:../x"), format!("{id}:/work/../../etc")] {
        let err = refused(&d, &["cp", src.to_str().unwrap(), &bad]);
        assert!(err.contains("the path in the VM"), "{bad}: {err}");
        let err = refused(&d, &["cp", &bad, work.path().join("x").to_str().unwrap()]);
        assert!(err.contains("the path in the VM"), "{bad}: {err}");
    }
    let (status, body) = raw_http(
        &d,
        &format!("GET /v1/vms/{id}/files?path=/data/..%2F..%2Fetc"),
        b"",
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = raw_http(&d, &format!("GET /v1/vms/{id}/files?path=etc"), b"");
    assert_eq!(status, 422, "{body}");
    // A hostile archive put raw: the guest refuses its `..` entry.
    let (status, body) = raw_http(
        &d,
        &format!("PUT /v1/vms/{id}/files?path=/work/drop"),
        &escaping_tar(),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains(".."), "{body}");
    for gone in ["/escape.txt", "/work/escape.txt"] {
        let dst = work.path().join("y");
        let err = refused(&d, &["cp", &format!("{id}:{gone}"), dst.to_str().unwrap()]);
        assert!(err.contains("No such file"), "{gone}: {err}");
    }
    let err = refused(&d, &["cp", src.to_str().unwrap(), "nosuchvm:/work"]);
    assert!(err.contains("no VM with id nosuchvm"), "{err}");

    // The guest's symlink to /etc comes out as a symlink, never followed on the host; a copy
    // through it reads the guest's /etc, and the host's is left alone.
    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    let trap = work.path().join("trap-out");
    ok(
        &d,
        &["cp", &format!("{id}:/data/trap"), trap.to_str().unwrap()],
    );
    assert_eq!(
        tree(&trap),
        BTreeMap::from([
            (PathBuf::from("trap"), Node::Dir),
            (PathBuf::from("trap/etc"), Node::Link(PathBuf::from("/etc"))),
        ])
    );
    let through = work.path().join("through");
    ok(
        &d,
        &[
            "cp",
            &format!("{id}:/data/trap/etc/passwd"),
            through.to_str().unwrap(),
        ],
    );
    let guest_passwd = std::fs::read_to_string(through.join("passwd")).unwrap();
    assert!(guest_passwd.contains("agent:x:1000"), "{guest_passwd}");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), host_passwd);
    assert_eq!(std::fs::read_dir(&through).unwrap().count(), 1);

    // Stopped: the writable disk still holds what the agent wrote and what was copied in.
    ok(&d, &["stop", &id]);
    d.wait_for(&id, AGENT, "stopped", |i| i["status"] == "stopped")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.records()));
    let after = work.path().join("after");
    ok(
        &d,
        &[
            "cp",
            &format!("{id}:/data/agent.txt"),
            after.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(after.join("agent.txt")).unwrap(),
        b"agent-wrote\n"
    );
    let again = work.path().join("again");
    ok(
        &d,
        &[
            "cp",
            &format!("{id}:/work/payload"),
            again.to_str().unwrap(),
        ],
    );
    assert_eq!(tree(&again.join("payload")), tree(&src));
    // Off the disk, a symlink on the way is refused rather than followed.
    let err = refused(
        &d,
        &[
            "cp",
            &format!("{id}:/data/trap/etc/passwd"),
            work.path().join("z").to_str().unwrap(),
        ],
    );
    assert!(err.contains("symlink"), "{err}");
    assert!(!work.path().join("z/passwd").exists());
    // Nothing goes into a stopped VM.
    let err = refused(&d, &["cp", src.to_str().unwrap(), &format!("{id}:/work")]);
    assert!(err.contains("running VM only"), "{err}");
}
