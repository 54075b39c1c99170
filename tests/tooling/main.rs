//! Component tests of our own tooling: `guest-image/build` and `scripts/nested-run`.
//!
//! They check the bad-input paths a user meets first: a corrupt kernel cache, a missing Debian
//! package, and a stage that hangs. Each must end in one clear line naming the cause, and the
//! runner must leave nothing running.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nanoclaw_tests::workspace_root as repo;

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nanoclaw-tooling-")
        .tempdir()
        .expect("create temp dir")
}

/// Runs `guest-image/build ARGS` against the kernel cache `cache`.
fn guest_image_build(cache: &Path, args: &[&str]) -> Output {
    Command::new(repo().join("guest-image/build"))
        .args(args)
        .env("NANOCLAW_CACHE", cache)
        .output()
        .expect("run guest-image/build")
}

/// Builds a fake cached kernel under `cache` for the builder's current key, with a valid
/// SHA256SUMS, and returns its directory.
fn fake_kernel_cache(cache: &Path) -> PathBuf {
    let out = guest_image_build(cache, &["--print-kernel-key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(key.len(), 16, "kernel key {key:?}");
    let dir = cache.join("kernel").join(&key);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["bzImage", "vmlinux", "config", "gen_init_cpio"] {
        std::fs::write(dir.join(f), format!("fake {f}\n")).unwrap();
    }
    let sums = Command::new("sh")
        .arg("-c")
        .arg("sha256sum bzImage vmlinux config gen_init_cpio > SHA256SUMS")
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(sums.success());
    dir
}

#[test]
fn cached_kernel_is_used_without_a_rebuild() {
    let tmp = tempdir();
    let cache = tmp.path();
    let kdir = fake_kernel_cache(cache);
    let out_dir = cache.join("out");
    let out = guest_image_build(
        cache,
        &["--kernel-only", "--out", out_dir.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("cached at"), "{err}");
    assert!(
        !err.contains("extracting"),
        "a cached kernel must not be rebuilt: {err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}", kdir.join("bzImage").display())),
        "{stdout}"
    );
}

#[test]
fn corrupt_cached_kernel_is_a_one_line_error() {
    let tmp = tempdir();
    let cache = tmp.path();
    let kdir = fake_kernel_cache(cache);
    std::fs::write(kdir.join("bzImage"), b"flipped bytes\n").unwrap();
    let out_dir = cache.join("out");
    let out = guest_image_build(
        cache,
        &["--kernel-only", "--out", out_dir.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let errors: Vec<_> = stderr_lines(&out)
        .into_iter()
        .filter(|l| l.contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("is corrupt: sha256 of bzImage is")
            && errors[0].contains("remove")
            && errors[0].contains(&kdir.display().to_string()),
        "{}",
        errors[0]
    );
}

/// A PATH (inside `tmp`) holding every tool of the usual bin folders except `without`.
fn path_without(tmp: &Path, without: &str) -> PathBuf {
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for dir in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = bin.join(&name);
            if name != without && !link.exists() {
                std::os::unix::fs::symlink(e.path(), link).ok();
            }
        }
    }
    bin
}

#[test]
fn runner_names_a_missing_package() {
    let tmp = tempdir();
    let bin = path_without(tmp.path(), "qemu-system-x86_64");
    let out = Command::new("bash")
        .arg(repo().join("scripts/nested-run"))
        .args(["--", "true"])
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("missing tool 'qemu-system-x86_64'")
            && lines[0].contains("Debian package 'qemu-system-x86'"),
        "{}",
        lines[0]
    );
}

#[test]
fn runner_command_timeout_names_the_stage() {
    let start = Instant::now();
    let out = Command::new(repo().join("scripts/nested-run"))
        .args(["--mode", "direct", "--timeout", "1", "--", "sleep", "30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    assert!(start.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timeout in stage 'command' after 1 s"),
        "{err}"
    );
}

#[test]
fn runner_boot_timeout_names_the_stage_and_leaves_nothing_running() {
    let tmp = tempdir();
    let out = Command::new(repo().join("scripts/nested-run"))
        .args(["--mode", "l1", "--boot-timeout", "1", "--", "true"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timeout in stage 'L1 boot' after 1 s"),
        "{err}"
    );
    let left = nanoclaw_tests::processes_mentioning(&tmp.path().display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "work dir not removed"
    );
}

#[test]
fn runner_in_l1_sees_a_working_directory_under_tmp() {
    // L1 puts a fresh tmpfs on /tmp; a clone under the host's /tmp must still be visible there.
    let dir = tempfile::Builder::new()
        .prefix("nanoclaw-cwd-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(dir.path().join("marker"), "seen from L1\n").unwrap();
    let out = Command::new(repo().join("scripts/nested-run"))
        .args(["--mode", "l1", "--timeout", "120", "--"])
        .args([
            "sh",
            "-c",
            "cat marker && pwd && touch /tmp/writable && echo tmp-ok",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        format!("seen from L1\n{}\ntmp-ok\n", dir.path().display())
    );
}

#[test]
fn runner_ends_a_hung_l1_as_an_l1_death_and_shows_what_it_last_said() {
    // Once the heartbeat has listed its `sleep 601`, the command stops the heartbeat (a child of
    // L1's /init, named like it), which is what a hung L1 looks like from outside.
    let start = Instant::now();
    let out = Command::new(repo().join("scripts/nested-run"))
        .args(["--mode", "l1", "--timeout", "300", "--"])
        .args([
            "sh",
            "-c",
            "sleep 601 & \
             until grep -q ' sleep 601$' /tmp/scratch/.l1-status 2>/dev/null; do sleep 1; done; \
             for p in $(pgrep -P 1 -x init); do kill -STOP $p; done; echo stopped; wait",
        ])
        .env("NANOCLAW_L1_SILENT_AFTER", "20")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(200),
        "not stopped early"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "stopped\n");
    assert!(
        err.contains("L1 is hung during stage 'command' (no heartbeat for 20 s)"),
        "{err}"
    );
    // The last heartbeat lists the command; QMP names where the vCPUs are and shows the clock.
    assert!(err.contains("L1's last heartbeat"), "{err}");
    assert!(err.lines().any(|l| l.ends_with(" sleep 601")), "{err}");
    assert!(
        err.contains("sample 0: cpu0 ") && err.contains("jiffies "),
        "{err}"
    );
}

/// `scripts/package-deb --debug`: the package holds the daemon, the CLI, the VMM, the guest and
/// its manifest, the hardened unit and the conffile, with the maintainer scripts that make the
/// `nanoclaw` group; the manifest names the packaged guest, and the unit passes systemd's check.
#[test]
fn the_debian_package_holds_the_binaries_the_guest_and_the_hardened_unit() {
    let out_dir = tempdir();
    let out = Command::new(repo().join("scripts/package-deb"))
        .args(["--debug", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(deb.is_file(), "{}", deb.display());
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout).into_owned();
    for (path, mode) in [
        ("./usr/bin/host-agent", "-rwxr-xr-x"),
        ("./usr/bin/nanoclaw", "-rwxr-xr-x"),
        ("./usr/lib/nanoclaw/nanoclaw-vmm", "-rwxr-xr-x"),
        ("./usr/lib/nanoclaw/guest/vmlinux", "-rw-r--r--"),
        ("./usr/lib/nanoclaw/guest/initramfs.cpio.gz", "-rw-r--r--"),
        ("./usr/lib/nanoclaw/guest/manifest", "-rw-r--r--"),
        ("./lib/systemd/system/host-agent.service", "-rw-r--r--"),
        ("./etc/nanoclaw/host-agent.env", "-rw-r--r--"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.contains(" root/root ") && l.ends_with(path)),
            "{path} ({mode}, root/root) in\n{contents}"
        );
    }
    let extracted = tempdir();
    let x = Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(&deb)
        .arg(extracted.path())
        .output()
        .unwrap();
    assert!(x.status.success(), "{:?}", stderr_lines(&x));
    let read = |p: &str| std::fs::read_to_string(extracted.path().join(p)).unwrap();
    let manifest = read("usr/lib/nanoclaw/guest/manifest");
    assert!(
        manifest.contains("KERNEL_VMLINUX=/usr/lib/nanoclaw/guest/vmlinux\n")
            && manifest.contains("INITRAMFS=/usr/lib/nanoclaw/guest/initramfs.cpio.gz\n"),
        "{manifest}"
    );
    assert_eq!(read("DEBIAN/conffiles"), "/etc/nanoclaw/host-agent.env\n");
    assert!(read("DEBIAN/postinst").contains("addgroup --system nanoclaw"));
    let control = read("DEBIAN/control");
    assert!(control.contains("Package: nanoclaw\n"), "{control}");
    let unit = read("lib/systemd/system/host-agent.service");
    for line in [
        "KillMode=process",
        "Delegate=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "DevicePolicy=closed",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in\n{unit}");
    }
    assert!(unit.contains("--socket-group nanoclaw"), "{unit}");
    // systemd's own check of the unit, where systemd-analyze is installed: no complaint but
    // the binary, which is not installed here.
    if let Ok(check) = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(
            extracted
                .path()
                .join("lib/systemd/system/host-agent.service"),
        )
        .output()
    {
        let said = String::from_utf8_lossy(&check.stderr).into_owned();
        for line in said.lines() {
            assert!(
                line.contains("/usr/bin/host-agent") || line.trim().is_empty(),
                "systemd-analyze: {said}"
            );
        }
    }
}
