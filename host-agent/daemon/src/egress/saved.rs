//! The copy of a VM's [`GrantTable`] kept in its state folder, so that a restarted daemon's
//! SNI check still admits connections to addresses the resolver handed out before the restart
//! (the guest caches those answers and does not ask again until they expire).
//!
//! The file ([`SAVED_GRANTS_FILE`]) is JSON: the `(name, address, expiry)` of each grant, the
//! expiry as wall-clock milliseconds since the Unix epoch, since an [`Instant`] means nothing to
//! another process. It is written whole, to a temporary file that is then renamed over it, so a
//! reader sees the old copy or the new one, never half of one. It holds at most
//! [`MAX_SAVED_GRANTS`] grants (the longest-lived first) and names of at most
//! [`MAX_NAME_LEN`] bytes, which keeps it under [`MAX_FILE_BYTES`]; a longer file is not read.
//!
//! When it is written is up to the caller ([`super::service`]): when the table gains a grant
//! (at most once per second) and on a coarse cadence for grants that were only lengthened;
//! never per connection.
//!
//! Reading it back ([`SavedGrants::restore`]) drops expired grants and caps the rest at
//! [`MAX_TTL`]. A file that cannot be read whole (corrupt, too long, a bad entry) counts as
//! empty, with one warning: the guest then has to resolve its names again, as it would have
//! without the copy.

use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::table::{Grant, GrantTable, MAX_TTL};

/// The file's name in the VM's state folder.
pub const SAVED_GRANTS_FILE: &str = "egress-grants.json";
/// Grants the file holds at most.
pub const MAX_SAVED_GRANTS: usize = 4096;
/// The longest name kept (a DNS name in text is at most 253 bytes).
pub const MAX_NAME_LEN: usize = 253;
/// The longest file read back. [`MAX_SAVED_GRANTS`] entries of [`MAX_NAME_LEN`]-byte names
/// take about 1.3 MiB.
pub const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// The file format's version.
const VERSION: u32 = 1;

/// Why the saved grants could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SavedGrantsError {
    /// Reading or writing the file failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is longer than [`MAX_FILE_BYTES`].
    #[error("{} is longer than {MAX_FILE_BYTES} bytes", .0.display())]
    TooLong(PathBuf),
    /// The file is not what [`SavedGrants::write`] writes.
    #[error("{} does not parse", .0.display())]
    Parse(PathBuf, #[source] serde_json::Error),
    /// The file holds what the daemon never writes (another version, too many grants, an empty
    /// or overlong name), or is not the daemon's own (another owner, or writable by others).
    #[error("{} holds {what}", .0.display(), what = .1)]
    Invalid(PathBuf, &'static str),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    version: u32,
    grants: Vec<SavedGrant>,
}

/// One grant as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGrant {
    /// The name the address was given out for.
    pub name: String,
    /// The address.
    pub addr: Ipv4Addr,
    /// When the grant runs out, in milliseconds since the Unix epoch.
    pub until_ms: u64,
}

/// A VM's saved grants file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedGrants {
    path: PathBuf,
}

impl SavedGrants {
    /// The file in the VM's state folder `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(SAVED_GRANTS_FILE),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `grants` (those still running at `now`, which is `wall` on the clock), replacing
    /// the file at once: a temporary file beside it, synced, then renamed over it.
    pub fn write(
        &self,
        grants: &[Grant],
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), SavedGrantsError> {
        let mut kept: Vec<&Grant> = grants
            .iter()
            .filter(|g| g.until > now && !g.name.is_empty() && g.name.len() <= MAX_NAME_LEN)
            .collect();
        // The longest-lived first, so a cut drops those that would expire soonest.
        kept.sort_by(|a, b| b.until.cmp(&a.until).then_with(|| a.name.cmp(&b.name)));
        kept.truncate(MAX_SAVED_GRANTS);
        let wall_ms = millis_since_epoch(wall);
        let body = FileBody {
            version: VERSION,
            grants: kept
                .into_iter()
                .map(|g| SavedGrant {
                    name: g.name.clone(),
                    addr: g.addr,
                    until_ms: wall_ms.saturating_add(
                        u64::try_from(g.until.duration_since(now).as_millis()).unwrap_or(u64::MAX),
                    ),
                })
                .collect(),
        };
        // Serializing plain strings, numbers and addresses cannot fail.
        let text = serde_json::to_vec(&body).unwrap_or_default();
        let tmp = self.path.with_extension("json.tmp");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| SavedGrantsError::Io { what, path, source }
        };
        // A fresh file, so that its owner and mode are the daemon's (a stale one left by a
        // crash goes first).
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.write_all(&text).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(io("rename over", &self.path))
    }

    /// The grants in the file (none when there is no file).
    pub fn read(&self) -> Result<Vec<SavedGrant>, SavedGrantsError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| SavedGrantsError::Io { what, path, source }
        };
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("open")(e)),
        };
        // Only the daemon's own file counts: in an older layout the VM's folder is also its
        // jailed VMM's root, and a grant must never come from there.
        let meta = file.metadata().map_err(io("inspect"))?;
        if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
            return Err(SavedGrantsError::Invalid(
                self.path.clone(),
                "another owner or loose permissions",
            ));
        }
        let mut text = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io("read"))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(SavedGrantsError::TooLong(self.path.clone()));
        }
        let body: FileBody = serde_json::from_slice(&text)
            .map_err(|e| SavedGrantsError::Parse(self.path.clone(), e))?;
        let invalid = |what| Err(SavedGrantsError::Invalid(self.path.clone(), what));
        if body.version != VERSION {
            return invalid("another version");
        }
        if body.grants.len() > MAX_SAVED_GRANTS {
            return invalid("too many grants");
        }
        if body
            .grants
            .iter()
            .any(|g| g.name.is_empty() || g.name.len() > MAX_NAME_LEN)
        {
            return invalid("an empty or overlong name");
        }
        Ok(body.grants)
    }

    /// Puts the file's grants that still run at `now` (`wall` on the clock) into `table`, each
    /// for what is left of it (at most [`MAX_TTL`]), and answers how many. A file that cannot
    /// be read counts as empty, with one warning.
    pub fn restore(&self, table: &GrantTable, now: Instant, wall: SystemTime) -> usize {
        let grants = match self.read() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "egress: the saved grants are ignored; the guest must resolve its names again");
                return 0;
            }
        };
        let wall_ms = millis_since_epoch(wall);
        let mut restored = 0;
        for g in grants {
            let left = Duration::from_millis(g.until_ms.saturating_sub(wall_ms)).min(MAX_TTL);
            if !left.is_zero() && table.grant_at(g.addr, &g.name, left, now) {
                restored += 1;
            }
        }
        restored
    }
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::table::MIN_TTL;

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    #[test]
    fn grants_survive_a_round_trip_with_what_is_left_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let before = GrantTable::new();
        assert!(before.grant_at(A, "pypi.org", Duration::from_secs(600), now));
        assert!(before.grant_at(A, "files.pythonhosted.org", MIN_TTL, now));
        assert!(before.grant_at(B, "pypi.org", Duration::from_secs(600), now));
        saved.write(&before.entries_at(now), now, wall).unwrap();
        assert_eq!(saved.read().unwrap().len(), 3);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SAVED_GRANTS_FILE], "{names:?}");

        // A later process, 10 s on: its own clock, the same wall time.
        let (later, later_wall) = (now + Duration::from_secs(3), wall + Duration::from_secs(10));
        let after = GrantTable::new();
        assert_eq!(saved.restore(&after, later, later_wall), 3);
        assert!(after.is_granted_at(A, "pypi.org", later));
        assert!(after.is_granted_at(B, "pypi.org", later));
        assert!(after.is_granted_at(A, "files.pythonhosted.org", later));
        assert!(!after.is_granted_at(A, "other.test", later));
        // What is left is what was left: 600 s less the 10 s that went by.
        assert!(after.is_granted_at(A, "pypi.org", later + Duration::from_secs(589)));
        assert!(!after.is_granted_at(A, "pypi.org", later + Duration::from_secs(591)));
    }

    #[test]
    fn expired_grants_are_neither_written_nor_restored() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let t = GrantTable::new();
        assert!(t.grant_at(A, "short.test", MIN_TTL, now));
        assert!(t.grant_at(A, "long.test", MAX_TTL, now));
        // Written later, the short grant is over.
        let at = now + MIN_TTL;
        let listed = t.entries_at(now);
        saved.write(&listed, at, wall + MIN_TTL).unwrap();
        assert_eq!(saved.read().unwrap().len(), 1);
        // Read back after the long one ran out too: nothing.
        let after = GrantTable::new();
        assert_eq!(saved.restore(&after, now, wall + MAX_TTL), 0);
        assert!(after.is_empty());
    }

    #[test]
    fn a_far_future_expiry_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        std::fs::write(
            saved.path(),
            br#"{"version":1,"grants":[{"name":"a.test","addr":"192.0.2.1","until_ms":18446744073709551615}]}"#,
        )
        .unwrap();
        let (now, t) = (Instant::now(), GrantTable::new());
        assert_eq!(saved.restore(&t, now, SystemTime::now()), 1);
        assert!(t.is_granted_at(A, "a.test", now + MAX_TTL - Duration::from_secs(1)));
        assert!(!t.is_granted_at(A, "a.test", now + MAX_TTL));
    }

    #[test]
    fn a_corrupt_or_oversized_file_counts_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        let (now, wall) = (Instant::now(), SystemTime::now());
        // No file: empty, no error.
        assert!(saved.read().unwrap().is_empty());
        let long_name = "a".repeat(MAX_NAME_LEN + 1);
        let many: Vec<String> = (0..=MAX_SAVED_GRANTS)
            .map(|i| format!(r#"{{"name":"n{i}.test","addr":"192.0.2.1","until_ms":1}}"#))
            .collect();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{\"version\":1,\"grants\":[{\"name\":\"a.te".to_vec(), "parse"),
            (b"\xff\xfe garbage".to_vec(), "parse"),
            (b"[]".to_vec(), "parse"),
            (
                br#"{"version":1,"grants":[{"name":"a.test","addr":"::1","until_ms":1}]}"#.to_vec(),
                "parse",
            ),
            (br#"{"version":2,"grants":[]}"#.to_vec(), "invalid"),
            (
                br#"{"version":1,"grants":[{"name":"","addr":"192.0.2.1","until_ms":1}]}"#.to_vec(),
                "invalid",
            ),
            (
                format!(
                    r#"{{"version":1,"grants":[{{"name":"{long_name}","addr":"192.0.2.1","until_ms":1}}]}}"#
                )
                .into_bytes(),
                "invalid",
            ),
            (
                format!(r#"{{"version":1,"grants":[{}]}}"#, many.join(",")).into_bytes(),
                "invalid",
            ),
            (vec![b' '; MAX_FILE_BYTES as usize + 1], "too long"),
        ];
        for (text, kind) in cases {
            std::fs::write(saved.path(), &text).unwrap();
            let err = saved.read().unwrap_err();
            let got = match err {
                SavedGrantsError::Parse(..) => "parse",
                SavedGrantsError::Invalid(..) => "invalid",
                SavedGrantsError::TooLong(_) => "too long",
                SavedGrantsError::Io { .. } => "io",
            };
            assert_eq!(
                got,
                kind,
                "{}",
                String::from_utf8_lossy(&text[..text.len().min(80)])
            );
            let t = GrantTable::new();
            assert_eq!(saved.restore(&t, now, wall), 0);
            assert!(t.is_empty());
        }
    }

    #[test]
    fn a_file_others_may_write_is_not_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let t = GrantTable::new();
        assert!(t.grant_at(A, "pypi.org", MIN_TTL, now));
        saved.write(&t.entries_at(now), now, wall).unwrap();
        assert_eq!(saved.read().unwrap().len(), 1);
        std::fs::set_permissions(saved.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(saved.read(), Err(SavedGrantsError::Invalid(..))));
    }

    #[test]
    fn a_full_table_of_the_longest_names_fits_the_file_and_is_cut_to_the_longest_lived() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedGrants::in_dir(dir.path());
        let (now, wall) = (Instant::now(), SystemTime::now());
        let name = |i: usize| format!("{i:06}{}", "a".repeat(MAX_NAME_LEN - 6));
        let mut grants: Vec<Grant> = (0..MAX_SAVED_GRANTS + 10)
            .map(|i| Grant {
                addr: Ipv4Addr::from(u32::MAX - i as u32),
                name: name(i),
                until: now + MIN_TTL + Duration::from_secs(i as u64),
            })
            .collect();
        // Never written: a name longer than a DNS name can be.
        grants.push(Grant {
            addr: A,
            name: "b".repeat(MAX_NAME_LEN + 1),
            until: now + MAX_TTL,
        });
        saved.write(&grants, now, wall).unwrap();
        let len = std::fs::metadata(saved.path()).unwrap().len();
        assert!(len <= MAX_FILE_BYTES, "{len}");
        let back = saved.read().unwrap();
        assert_eq!(back.len(), MAX_SAVED_GRANTS);
        // The ten that would run out first were left out.
        assert!(
            back.iter()
                .all(|g| g.name != name(9) && g.name.len() <= MAX_NAME_LEN)
        );
        assert!(back.iter().any(|g| g.name == name(10)));
    }
}
