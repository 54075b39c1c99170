//! Real Debian builds: debootstrap from the network, pip in a chroot, mkfs. They need root and
//! network access, so they are ignored by default; run them with
//! `cargo test -p nanoclaw-image --test debian_build -- --ignored --nocapture`.

use std::fs;
use std::time::{Duration, Instant};

use nanoclaw_image::debian::{AGENT_HOME, agent_config};
use nanoclaw_image::ext4::{EXT4_MAGIC, EXT4_MAGIC_OFFSET};
use nanoclaw_image::{DebianRecipe, ImageStore, build_debian};

fn build_and_rebuild(packages: &[&str], pip: &[&str]) {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let recipe = DebianRecipe {
        packages: packages.iter().map(|s| s.to_string()).collect(),
        pip_packages: pip.iter().map(|s| s.to_string()).collect(),
        ..DebianRecipe::new("bookworm")
    };
    let mut seen = Vec::new();
    let started = Instant::now();
    let info = build_debian(&store, "debian", &recipe, |line| {
        if !line.starts_with("debootstrap: I: ") && !line.starts_with("pip:   ") {
            eprintln!("{line}");
        }
        seen.push(line.split(':').next().unwrap_or("").to_owned());
    })
    .unwrap();
    let took = started.elapsed();
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&info.rootfs).unwrap();
    eprintln!(
        "built {} in {:.1} s: rootfs {} MiB apparent, {} MiB allocated",
        info.digest,
        took.as_secs_f64(),
        meta.len() >> 20,
        (meta.blocks() * 512) >> 20
    );
    assert!(seen.iter().any(|p| p == "debootstrap"));
    assert!(seen.iter().any(|p| p == "mkfs"));
    assert_eq!(seen.iter().any(|p| p == "pip"), !pip.is_empty());
    assert_eq!(info.config, agent_config());
    assert_eq!(info.config.working_dir, AGENT_HOME);
    let mut head = vec![0u8; 2048];
    use std::io::Read;
    fs::File::open(&info.rootfs)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    let at = EXT4_MAGIC_OFFSET as usize;
    assert_eq!(head[at..at + 2], EXT4_MAGIC);
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&info.rootfs)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // The agent user is in the image.
    let passwd = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/passwd"])
        .arg(&info.rootfs)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&passwd.stdout).contains("agent:x:1000:1000:"));

    let started = Instant::now();
    let again = build_debian(&store, "again", &recipe, |_| {}).unwrap();
    let cached = started.elapsed();
    eprintln!("cached rebuild in {} ms", cached.as_millis());
    assert_eq!(again.digest, info.digest);
    assert!(cached < Duration::from_secs(5));
}

#[test]
#[ignore = "needs root and the network (debootstrap from deb.debian.org)"]
fn bookworm_python3() {
    build_and_rebuild(&["python3", "ca-certificates"], &[]);
}

#[test]
#[ignore = "needs root and the network (debootstrap and PyPI)"]
fn bookworm_python3_with_pip_packages() {
    build_and_rebuild(&["python3", "ca-certificates"], &["openai", "mcp"]);
}
