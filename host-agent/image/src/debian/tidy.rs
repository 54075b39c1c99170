//! Preparing a debootstrapped tree to be an image: the `agent` user, and the cleanup of what
//! differs between builds. Every path goes through [`tree_path`].

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{AGENT_HOME, AGENT_ID, AGENT_USER, DebianError};

/// The hostname written into images.
const HOSTNAME: &str = "nanoclaw\n";
/// `/etc/hosts` written when the image has none.
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// Adds the `agent` user and group and its home.
pub fn add_agent_user(root: &Path, epoch: u64) -> Result<(), DebianError> {
    let id = AGENT_ID.to_string();
    let taken = |file: &str, id_field: usize| -> Result<bool, DebianError> {
        let path = tree_path(root, file)?;
        let text = read_text(&path)?;
        Ok(text.lines().any(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            fields.first() == Some(&AGENT_USER) || fields.get(id_field) == Some(&id.as_str())
        }))
    };
    if taken("etc/passwd", 2)? || taken("etc/group", 2)? {
        return Err(DebianError::AgentTaken);
    }
    let days = epoch / 86_400;
    let lines = [
        (
            "etc/passwd",
            format!("{AGENT_USER}:x:{id}:{id}:Nanoclaw agent:{AGENT_HOME}:/bin/bash\n"),
        ),
        ("etc/group", format!("{AGENT_USER}:x:{id}:\n")),
        (
            "etc/shadow",
            format!("{AGENT_USER}:*:{days}:0:99999:7:::\n"),
        ),
        ("etc/gshadow", format!("{AGENT_USER}:!::\n")),
    ];
    for (file, line) in lines {
        let path = tree_path(root, file)?;
        if file == "etc/gshadow" && !path.exists() {
            continue;
        }
        append(&path, line.as_bytes())?;
    }
    let home = tree_path(root, AGENT_HOME.trim_start_matches('/'))?;
    if !home.exists() {
        create_dir(&home, 0o750)?;
    }
    chown(&home)?;
    let skel = tree_path(root, "etc/skel")?;
    if let Ok(entries) = fs::read_dir(&skel) {
        for entry in entries {
            let entry = entry.map_err(|source| DebianError::Io {
                path: skel.clone(),
                source,
            })?;
            let from = entry.path();
            let is_file = fs::symlink_metadata(&from).is_ok_and(|m| m.is_file());
            let to = home.join(entry.file_name());
            if is_file && !to.exists() {
                let bytes = fs::read(&from).map_err(|source| DebianError::Io {
                    path: from.clone(),
                    source,
                })?;
                write_new(&to, &bytes, 0o644)?;
                chown(&to)?;
            }
        }
    }
    Ok(())
}

/// Removes what differs between two builds of the same recipe and what no image should carry.
pub fn clean(root: &Path) -> Result<(), DebianError> {
    clear_dir(root, "var/lib/apt/lists", &["partial", "lock"])?;
    clear_dir(root, "var/lib/apt/lists/partial", &[])?;
    clear_dir(root, "var/cache/apt/archives", &["partial", "lock"])?;
    clear_dir(root, "var/cache/apt/archives/partial", &[])?;
    for file in ["pkgcache.bin", "srcpkgcache.bin"] {
        remove_any(&tree_path(root, &format!("var/cache/apt/{file}"))?)?;
    }
    for dir in ["var/cache/debconf", "var/lib/dpkg", "etc"] {
        remove_matching(root, dir, |name| {
            name.ends_with("-old") || name.ends_with('~')
        })?;
    }
    empty_files(root, "var/log")?;
    clear_dir(root, "tmp", &[])?;
    clear_dir(root, "var/tmp", &[])?;
    remove_any(&tree_path(root, "root/.cache")?)?;
    remove_any(&tree_path(root, "var/lib/dbus/machine-id")?)?;
    remove_any(&tree_path(root, "etc/resolv.conf")?)?;
    let machine_id = tree_path(root, "etc/machine-id")?;
    if fs::symlink_metadata(&machine_id).is_ok() {
        remove_any(&machine_id)?;
        // Empty, not absent: systemd then makes one at boot instead of treating it as "first boot".
        write_new(&machine_id, b"", 0o444)?;
    }
    let hostname = tree_path(root, "etc/hostname")?;
    remove_any(&hostname)?;
    write_new(&hostname, HOSTNAME.as_bytes(), 0o644)?;
    let hosts = tree_path(root, "etc/hosts")?;
    if fs::symlink_metadata(&hosts).is_err() {
        write_new(&hosts, HOSTS.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// `root/rel`, after checking that no parent of it is a symlink or a non-directory (a missing
/// parent is fine: the caller will find nothing there, or fail to create).
pub fn tree_path(root: &Path, rel: &str) -> Result<PathBuf, DebianError> {
    let mut path = root.to_owned();
    let components: Vec<_> = Path::new(rel).components().collect();
    for (i, c) in components.iter().enumerate() {
        let Component::Normal(part) = c else {
            return Err(DebianError::UnsafePath {
                path: root.join(rel),
            });
        };
        path.push(part);
        if i + 1 < components.len() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ => return Err(DebianError::UnsafePath { path }),
            }
        }
    }
    Ok(path)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DebianError + '_ {
    move |source| DebianError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_text(path: &Path) -> Result<String, DebianError> {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(DebianError::UnsafePath {
            path: path.to_owned(),
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

/// Appends to an existing regular file (never through a symlink).
fn append(path: &Path, bytes: &[u8]) -> Result<(), DebianError> {
    let mut file = OpenOptions::new()
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))
}

/// Creates a new file (never through a symlink).
pub(super) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DebianError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))
}

pub(super) fn create_dir(path: &Path, mode: u32) -> Result<(), DebianError> {
    fs::create_dir(path).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

fn chown(path: &Path) -> Result<(), DebianError> {
    std::os::unix::fs::lchown(path, Some(AGENT_ID), Some(AGENT_ID)).map_err(io_err(path))
}

pub(super) fn remove_any(path: &Path) -> Result<(), DebianError> {
    let result = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.map_err(io_err(path))
}

/// Sorted names in `rel`, or none if it is not a directory.
fn children(root: &Path, rel: &str) -> Result<Vec<(String, PathBuf)>, DebianError> {
    let dir = tree_path(root, rel)?;
    if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

fn clear_dir(root: &Path, rel: &str, keep: &[&str]) -> Result<(), DebianError> {
    remove_matching(root, rel, |name| !keep.contains(&name))
}

fn remove_matching(
    root: &Path,
    rel: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<(), DebianError> {
    for (name, path) in children(root, rel)? {
        if matches(&name) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

/// Truncates every regular file below `rel` (log files keep their owner and mode).
fn empty_files(root: &Path, rel: &str) -> Result<(), DebianError> {
    for (name, path) in children(root, rel)? {
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            empty_files(root, &format!("{rel}/{name}"))?;
        } else if meta.is_file() && meta.len() > 0 {
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree that looks enough like debootstrap's output for the steps after it.
    fn fake_debian(root: &Path) {
        for dir in [
            "etc/skel",
            "home",
            "tmp",
            "var/log/apt",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let files: [(&str, &[u8]); 11] = [
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/group", b"root:x:0:\n"),
            ("etc/shadow", b"root:*:19000:0:99999:7:::\n"),
            ("etc/gshadow", b"root:*::\n"),
            ("etc/skel/.bashrc", b"# bashrc\n"),
            ("etc/hostname", b"build-host\n"),
            ("etc/resolv.conf", b"nameserver 10.0.0.1\n"),
            ("var/log/apt/history.log", b"Start-Date: today\n"),
            (
                "var/lib/apt/lists/deb.debian.org_dists_bookworm_Release",
                b"x",
            ),
            ("var/cache/apt/archives/python3_3.11_amd64.deb", b"x"),
            ("var/lib/dpkg/status-old", b"x"),
        ];
        for (file, bytes) in files {
            fs::write(root.join(file), bytes).unwrap();
        }
    }

    #[test]
    fn agent_user_and_cleanup_on_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_debian(root);
        add_agent_user(root, 86_400 * 20_000).unwrap();
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.ends_with("agent:x:1000:1000:Nanoclaw agent:/home/agent:/bin/bash\n"));
        let shadow = fs::read_to_string(root.join("etc/shadow")).unwrap();
        assert!(shadow.contains("agent:*:20000:"));
        assert!(
            fs::read_to_string(root.join("etc/group"))
                .unwrap()
                .contains("agent:x:1000:\n")
        );
        use std::os::unix::fs::MetadataExt;
        let home = fs::metadata(root.join("home/agent")).unwrap();
        assert_eq!((home.uid(), home.gid()), (AGENT_ID, AGENT_ID));
        assert_eq!(
            fs::metadata(root.join("home/agent/.bashrc")).unwrap().uid(),
            AGENT_ID
        );
        // A second time, the user is taken.
        assert!(matches!(
            add_agent_user(root, 1),
            Err(DebianError::AgentTaken)
        ));

        clean(root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            HOSTNAME
        );
        assert!(!root.join("etc/resolv.conf").exists());
        assert!(root.join("etc/hosts").exists());
        assert_eq!(
            fs::metadata(root.join("var/log/apt/history.log"))
                .unwrap()
                .len(),
            0
        );
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert_eq!(
            fs::read_dir(root.join("var/lib/apt/lists"))
                .unwrap()
                .count(),
            1
        );
        assert!(
            !root
                .join("var/cache/apt/archives/python3_3.11_amd64.deb")
                .exists()
        );
        assert!(!root.join("var/lib/dpkg/status-old").exists());
    }

    #[test]
    fn writes_never_go_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("var/log")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        assert!(matches!(
            tree_path(&root, "etc/passwd"),
            Err(DebianError::UnsafePath { .. })
        ));
        assert!(matches!(
            add_agent_user(&root, 1),
            Err(DebianError::UnsafePath { .. })
        ));
        // A symlinked log file is left alone, not truncated through.
        std::os::unix::fs::symlink(outside.join("secret"), root.join("var/log/x.log")).unwrap();
        empty_files(&root, "var/log").unwrap();
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"keep");
    }
}
