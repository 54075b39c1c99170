//! The VMM's jail, entered for real on this host (as root; no KVM boot is needed): the VMM's
//! test hook `--jail-probe` reports what a VMM taken over by its guest could reach from inside.

use std::process::Command;

use nanoclaw_tests::vmm_bin;

/// Runs the jailed VMM's probe of `targets` with `dir/vm` as the jail; returns its lines.
fn probe(
    dir: &std::path::Path,
    disk_mode: u32,
    targets: &[&str],
) -> (std::process::ExitStatus, String, String) {
    probe_with(dir, disk_mode, targets, &[])
}

/// [`probe`] with more VMM arguments.
fn probe_with(
    dir: &std::path::Path,
    disk_mode: u32,
    targets: &[&str],
    extra: &[&str],
) -> (std::process::ExitStatus, String, String) {
    use std::os::unix::fs::PermissionsExt;
    for f in ["bzImage", "initramfs"] {
        std::fs::write(dir.join(f), b"not booted").unwrap();
    }
    let disk = dir.join("scratch.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(disk_mode)).unwrap();
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(dir.join("bzImage"))
        .arg("--initrd")
        .arg(dir.join("initramfs"))
        .arg("--vm-dir")
        .arg(dir.join("vm"))
        .arg("--disk")
        .arg(&disk)
        .args(["--jail-uid", "1000777", "--jail-gid", "1000777"])
        .args(extra);
    for t in targets {
        cmd.arg("--jail-probe").arg(t);
    }
    let out = cmd.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_jailed_vmm_reaches_its_own_files_and_nothing_of_the_host() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: entering the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let other_vm = tempfile::tempdir().unwrap();
    std::fs::write(other_vm.path().join("secret"), b"another VM's file").unwrap();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let other = other_vm.path().join("secret").display().to_string();
    let own_kernel = dir.path().join("bzImage").display().to_string();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let refs = [
        "/etc/shadow",
        "/var/lib/nanoclaw",
        other.as_str(),
        own_kernel.as_str(),
        tcp.as_str(),
        "/kernel",
        "/initrd",
        "/disk0",
        "/dev/kvm",
    ];
    let (status, out, err) = probe(dir.path(), 0o644, &refs);
    assert!(status.success(), "{status}: {err}");
    let result = |t: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("PROBE {t} ")))
            .unwrap_or_else(|| panic!("no probe line for {t}: {out}"))
            .to_owned()
    };
    for outside in &refs[..4] {
        assert!(
            result(outside).contains("No such file"),
            "{outside}: {}",
            result(outside)
        );
    }
    // The jail's network namespace has no route anywhere.
    assert!(result(&tcp).contains("unreachable"), "{}", result(&tcp));
    for inside in ["/kernel", "/initrd", "/disk0", "/dev/kvm"] {
        assert_eq!(result(inside), "ok", "{inside}");
    }
    // The jail's folder now belongs to the VMM's uid, and nobody else may enter it.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.path().join("vm")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (1000777, 1000777, 0o700)
    );
}

#[test]
fn a_jailed_vmm_runs_as_its_uid_without_privileges() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: entering the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A disk only root may write: the jailed VMM (its own uid, no capabilities) cannot open it
    // for writing, which shows that root's powers are gone.
    std::fs::create_dir(dir.path().join("vm")).unwrap();
    let (status, out, err) = probe(dir.path(), 0o600, &["/disk0"]);
    assert!(status.success(), "{status}: {err}");
    assert!(out.contains("PROBE /disk0 Permission denied"), "{out}");
}

#[test]
fn in_its_user_namespace_the_vmm_keeps_its_files_and_root_is_nobody() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: entering the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let targets = ["owner:/kernel", "owner:/dev/kvm", "/kernel", "/dev/kvm"];
    let line = |out: &str, t: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("PROBE {t} ")))
            .unwrap_or_else(|| panic!("no probe line for {t}: {out}"))
            .to_owned()
    };
    // Without the namespace, root's files read as root's.
    let (status, out, err) = probe(dir.path(), 0o600, &targets);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(line(&out, "owner:/kernel"), "uid 0");
    // With it, root is unmapped and reads as the overflow uid; the jail's own /dev/kvm node is
    // still the VMM's uid, and everything it needs still opens.
    let (status, out, err) = probe_with(dir.path(), 0o600, &targets, &["--jail-userns"]);
    assert!(status.success(), "{status}: {err}");
    let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid").unwrap();
    assert_eq!(
        line(&out, "owner:/kernel"),
        format!("uid {}", overflow.trim())
    );
    assert_eq!(line(&out, "owner:/dev/kvm"), "uid 1000777");
    for inside in ["/kernel", "/dev/kvm"] {
        assert_eq!(line(&out, inside), "ok", "{inside}");
    }
}

#[test]
fn without_root_the_jail_is_refused_and_nothing_runs() {
    // The VMM run as a plain user (through setpriv when we are root) refuses to run unjailed.
    let dir = tempfile::tempdir().unwrap();
    for f in ["bzImage", "initramfs"] {
        std::fs::write(dir.path().join(f), b"x").unwrap();
    }
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(vmm_bin());
        c
    } else {
        Command::new(vmm_bin())
    };
    let out = cmd
        .arg("--kernel")
        .arg(dir.path().join("bzImage"))
        .arg("--initrd")
        .arg(dir.path().join("initramfs"))
        .arg("--vm-dir")
        .arg(dir.path().join("vm"))
        .args(["--jail-uid", "1000778", "--jail-gid", "1000778"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot enter the jail: the jail needs root"),
        "{err}"
    );
}

#[test]
fn a_jailed_vmm_attaches_its_tap_before_the_jail_and_keeps_no_tun_device() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: entering the jail needs root");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for f in ["bzImage", "initramfs"] {
        std::fs::write(dir.path().join(f), b"not booted").unwrap();
    }
    // The VMM starts in a network namespace of its own that holds `tap` (as the daemon will
    // start it in the VM's namespace), made here by `unshare --net` and `ip`.
    let run = |tap: &str, make_it: bool| {
        let make = if make_it {
            format!("ip tuntap add dev {tap} mode tap && ip link set dev {tap} up && ")
        } else {
            String::new()
        };
        Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                &format!("{make}exec \"$0\" \"$@\""),
            ])
            .arg(vmm_bin())
            .arg("--kernel")
            .arg(dir.path().join("bzImage"))
            .arg("--initrd")
            .arg(dir.path().join("initramfs"))
            .arg("--vm-dir")
            .arg(dir.path().join("vm"))
            .args(["--net", &format!("tap={tap},mac=02:00:00:00:00:01")])
            .args(["--jail-uid", "1000779", "--jail-gid", "1000779"])
            .args(["--jail-probe", "/dev/net/tun"])
            .output()
            .unwrap()
    };
    let out = run("nc-jail-tap0", true);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Attached before the jail; inside it there is no tun device to attach to another TAP.
    assert!(
        stdout.contains("PROBE /dev/net/tun No such file"),
        "{stdout}\n{stderr}"
    );

    // A TAP that is not there is a setup error, before the jail, and none is created.
    let out = run("nc-jail-none", false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no network interface \"nc-jail-none\""),
        "{stderr}"
    );
}

#[test]
fn a_vmm_with_jail_netns_attaches_the_tap_of_the_vms_own_namespace() {
    use host_agent::net::netns::{NETNS_FILE, VmNetns};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: entering the jail needs root");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: no /dev/net/tun");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for f in ["bzImage", "initramfs"] {
        std::fs::write(dir.path().join(f), b"not booted").unwrap();
    }
    // The VM's namespace, made as the daemon makes it, with `tap0` inside it only: the VMM
    // starts in the test's namespace, where no `tap0` is.
    let path = dir.path().join(NETNS_FILE);
    let ns = VmNetns::create(&path).unwrap();
    let (mut ip, _keep) = ns.command("ip").unwrap();
    let made = ip
        .args(["tuntap", "add", "dev", "tap0", "mode", "tap"])
        .args(["user", "1000781", "group", "1000781"])
        .status()
        .unwrap();
    let run = |netns: bool| {
        let mut cmd = Command::new(vmm_bin());
        cmd.arg("--kernel")
            .arg(dir.path().join("bzImage"))
            .arg("--initrd")
            .arg(dir.path().join("initramfs"))
            .arg("--vm-dir")
            .arg(dir.path().join("vm"))
            .args(["--net", "tap=tap0,mac=02:00:0a:c8:00:02"])
            .args(["--jail-uid", "1000781", "--jail-gid", "1000781"])
            .args(["--jail-probe", "/dev/net/tun"]);
        if netns {
            cmd.arg("--jail-netns").arg(&path);
        }
        cmd.output().unwrap()
    };
    let with = run(true);
    let without = run(false);
    VmNetns::remove(&path).unwrap();
    assert!(made.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&with.stdout),
        String::from_utf8_lossy(&with.stderr),
    );
    assert!(with.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("PROBE /dev/net/tun No such file"),
        "{stdout}\n{stderr}"
    );
    // Outside the VM's namespace there is no `tap0`: a setup error.
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert_eq!(without.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no network interface \"tap0\""), "{stderr}");
}
