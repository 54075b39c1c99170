//! `nanoclaw run --copy HOSTPATH:GUESTPATH`: the files and folders to copy into a VM before it
//! boots, packed as one tar whose entry names are guest paths (relative to the guest's root),
//! owned by the agent's user. [`pack_into`] packs one of them as a stream, for `nanoclaw cp`. The daemon unpacks it with the image store's rules (no `..`, no
//! absolute names, no writes through symlinks, no device nodes) onto the VM's writable disk.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use super::CliError;

/// One `--copy` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// What to copy, on this host.
    pub host: PathBuf,
    /// Where it goes in the guest: a path relative to the guest's root, without `..`.
    pub guest: PathBuf,
}

impl std::str::FromStr for Copy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HOSTPATH:GUESTPATH"))?;
        if host.is_empty() {
            return Err(format!("{s:?} has no host path"));
        }
        let guest_path = Path::new(guest);
        if !guest_path.is_absolute() {
            return Err(format!("the guest path {guest:?} must be absolute"));
        }
        let mut rel = PathBuf::new();
        for c in guest_path.components() {
            match c {
                Component::RootDir => {}
                Component::Normal(part) => rel.push(part),
                Component::CurDir => {}
                _ => return Err(format!("the guest path {guest:?} must not contain `..`")),
            }
        }
        if rel.as_os_str().is_empty() {
            return Err("the guest path must not be the root".into());
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: rel,
        })
    }
}

/// Packs `copies` into one tar, every entry owned by `uid:gid`.
pub fn pack(copies: &[Copy], uid: u32, gid: u32) -> Result<Vec<u8>, CliError> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    for copy in copies {
        add(&mut tar, &copy.host, &copy.guest, uid, gid)?;
    }
    tar.into_inner().map_err(|source| CliError::CopyIn {
        path: PathBuf::new(),
        source,
    })
}

/// Packs the file, folder or symlink `host` into a tar written to `out` as it is read, its
/// entry named `name` (its children below `name/`), every entry owned by `uid:gid`. Symlinks
/// are packed as links, never followed. Answers `out` after the end of the archive.
pub fn pack_into<W: Write>(
    out: W,
    host: &Path,
    name: &Path,
    uid: u32,
    gid: u32,
) -> Result<W, CliError> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    add(&mut tar, host, name, uid, gid)?;
    tar.into_inner().map_err(|source| CliError::CopyIn {
        path: host.to_owned(),
        source,
    })
}

fn add<W: Write>(
    tar: &mut tar::Builder<W>,
    host: &Path,
    guest: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), CliError> {
    let err = |source| CliError::CopyIn {
        path: host.to_owned(),
        source,
    };
    let meta = std::fs::symlink_metadata(host).map_err(err)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    header.set_uid(uid.into());
    header.set_gid(gid.into());
    let ft = meta.file_type();
    if ft.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, guest, std::io::empty())
            .map_err(err)?;
        let mut children: Vec<_> = std::fs::read_dir(host)
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            add(tar, &child.path(), &guest.join(child.file_name()), uid, gid)?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(host).map_err(err)?;
        header.set_size(0);
        tar.append_link(&mut header, guest, target).map_err(err)?;
    } else if ft.is_file() {
        let file = std::fs::File::open(host).map_err(err)?;
        // Exactly the size in the header: a file that grows or shrinks meanwhile fails the
        // copy instead of breaking the archive.
        let data = SizedRead {
            inner: file,
            left: meta.len(),
        };
        tar.append_data(&mut header, guest, data).map_err(err)?;
    } else {
        return Err(CliError::CopyKind(host.to_owned()));
    }
    Ok(())
}

/// Reads exactly `left` bytes: an early end is an error, and nothing past `left` is read.
struct SizedRead<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for SizedRead<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was copied",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_specs_parse_and_refuse_what_would_escape() {
        let c: Copy = "./agent:/opt/agent".parse().unwrap();
        assert_eq!(
            (c.host.as_path(), c.guest.as_path()),
            (Path::new("./agent"), Path::new("opt/agent"))
        );
        assert!("agent".parse::<Copy>().is_err());
        assert!(":/opt".parse::<Copy>().is_err());
        assert!("a:relative".parse::<Copy>().is_err());
        assert!("a:/opt/../etc".parse::<Copy>().is_err());
        assert!("a:/".parse::<Copy>().is_err());
    }

    #[test]
    fn a_folder_packs_with_guest_names_and_the_agents_owner() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), b"alpha").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", dir.path().join("link")).unwrap();
        let spec = format!("{}:/work/in", dir.path().display());
        let bytes = pack(&[spec.parse().unwrap()], 1000, 1001).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1000, 1001));
            seen.push(e.path().unwrap().display().to_string());
        }
        assert_eq!(
            seen,
            [
                "work/in",
                "work/in/link",
                "work/in/sub",
                "work/in/sub/a.txt"
            ]
        );
    }
}
