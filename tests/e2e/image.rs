//! Images end to end: an OCI image the test builds itself (two layers, a whiteout) is imported
//! with `nanoclaw image import` and runs in a microVM from its read-only disk, with an overlay
//! on its own writable disk; its `Cmd`, `Env`, `WorkingDir` and `User` come through. A hostile
//! archive is refused and nothing is stored; a guest that fills its disk gets an error, not a
//! hang, and the daemon keeps serving.

use std::process::Output;
use std::time::Duration;

use nanoclaw_tests::oci::{import_test_image, write_layout};
use nanoclaw_tests::{CLI_TIMEOUT, Daemon, GuestImage, OutputWithin};
use serde_json::json;

/// Import, boot and run under nested virtualization.
const RUN: Duration = Duration::from_secs(300);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn nanoclaw(d: &Daemon, args: &[&str], timeout: Duration) -> Output {
    d.nanoclaw(args)
        .output_within(timeout)
        .unwrap_or_else(|e| panic!("nanoclaw {args:?}: {e:#}\n{}", d.records()))
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn an_imported_oci_image_runs_its_cmd_with_its_env_and_workdir_on_an_overlay() {
    let guest = GuestImage::from_env().expect("guest image");
    let d = Daemon::start(&guest.vmlinux, &guest.initramfs).expect("start the daemon");
    import_test_image(&d, "oci-test", RUN).expect("import the test image");

    let out = nanoclaw(
        &d,
        &["run", "--image", "oci-test", "--disk-size", "64M"],
        RUN,
    );
    let stdout = text(&out.stdout);
    let all = format!(
        "stdout:\n{stdout}\nstderr:\n{}\n{}",
        text(&out.stderr),
        d.records()
    );
    assert_eq!(out.status.code(), Some(0), "{all}");
    for want in [
        "greeting=hello from oci",
        "cwd=/app",
        "uid=1000 gid=1000",
        "data=keep.txt ",
        "args=first second",
        "tmp=ok",
        "overlay=changed",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in {all}");
    }
    assert!(
        !stdout.contains("old.txt"),
        "the whiteout hid old.txt: {all}"
    );

    // The request's command and environment win over the image's.
    let out = nanoclaw(
        &d,
        &[
            "run",
            "--image",
            "oci-test",
            "--disk-size",
            "64M",
            "-e",
            "GREETING=override",
            "--",
            "/bin/sh",
            "-c",
            "echo $GREETING; cat /data/keep.txt",
        ],
        RUN,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", d.records());
    // A fresh VM has a fresh writable disk: the first run's change is not here.
    assert_eq!(stdout, "override\nkeep\n", "{}", d.records());
}

#[test]
#[ignore = "e2e: run through scripts/e2e"]
fn hostile_images_and_a_full_disk_give_clear_errors_and_the_daemon_keeps_serving() {
    let guest = GuestImage::from_env().expect("guest image");
    let d = Daemon::start(&guest.vmlinux, &guest.initramfs).expect("start the daemon");
    let work = tempfile::tempdir().unwrap();

    // A layer whose entry climbs out of the root.
    let bad = work.path().join("bad");
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    // `append_data` refuses `..`, so the name goes into the header raw, as a hostile tool would.
    header.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escape.txt");
    header.set_cksum();
    tar.append(&header, &b"evil"[..]).unwrap();
    let evil = tar.into_inner().unwrap();
    write_layout(&bad, &[evil], json!({"Cmd": ["/bin/sh"]})).unwrap();
    let out = nanoclaw(
        &d,
        &["image", "import", "evil", bad.to_str().unwrap()],
        CLI_TIMEOUT,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a `..` entry was accepted");
    assert!(err.contains(".."), "the error names the entry: {err}");
    let out = nanoclaw(&d, &["image", "ls"], CLI_TIMEOUT);
    assert!(!text(&out.stdout).contains("evil"), "nothing was stored");

    // A good image, then a guest that fills its writable disk: the writer fails with ENOSPC
    // and the run ends with its exit code.
    import_test_image(&d, "oci-test", RUN).expect("import the test image");
    let out = nanoclaw(
        &d,
        &[
            "run",
            "--image",
            "oci-test",
            "--disk-size",
            "32M",
            "--",
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/data/fill bs=1M count=64; echo dd=$?; sync; exit 0",
        ],
        RUN,
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{stderr}\n{}",
        d.records()
    );
    assert!(
        stdout.contains("dd=1"),
        "dd failed as the disk filled: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("No space left on device"),
        "the guest saw ENOSPC: {stderr}"
    );

    // A corrupt image disk: its ext4 superblock (at byte 1024) is overwritten in the store. The
    // guest cannot mount it, the run ends with 126 and says why.
    let info = nanoclaw(&d, &["image", "inspect", "oci-test"], CLI_TIMEOUT);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("inspect JSON");
    let rootfs = info["rootfs"]
        .as_str()
        .expect("the image's disk path")
        .to_owned();
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&rootfs)
            .unwrap();
        disk.write_all_at(&[0xa5; 1024], 1024).unwrap();
    }
    let out = nanoclaw(
        &d,
        &[
            "run",
            "--image",
            "oci-test",
            "--disk-size",
            "32M",
            "--",
            "/bin/true",
        ],
        RUN,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}\n{}", d.records());
    assert!(
        stderr.contains("root file system"),
        "the error names the root file system: {stderr}"
    );

    // The daemon still serves: a plain run works.
    let out = nanoclaw(&d, &["run", "--", "/bin/sh", "-c", "echo still here"], RUN);
    assert_eq!(text(&out.stdout), "still here\n", "{}", d.records());
}
