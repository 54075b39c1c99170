//! Who the agent runs as: the spec's OCI-style `user` resolved against the image's
//! `/etc/passwd` and `/etc/group`.
//!
//! Those files come from the image, so they are read through the confined root
//! ([`super::RootDir`]), at most [`MAX_DATABASE_BYTES`] of each, and parsed defensively: a line
//! that is not valid UTF-8, is longer than [`MAX_LINE`], has too few fields, an empty or odd
//! name, or an id that is not plain decimal is skipped, never an error.
//!
//! # Rules
//!
//! - No `user`: the spec's `uid`/`gid` (the runner's default, never 0).
//! - `name`: its passwd entry's uid and primary gid. An unknown name is an error (the host
//!   asked for someone the image does not have).
//! - `uid`: that uid, with its passwd entry's primary gid when it has one, else the spec's gid.
//! - `…:group`: the group by name (an unknown one is an error) or number replaces the gid.
//! - A uid of 0 falls back to the spec's uid **and** gid, and a gid of 0 to the spec's gid; each
//!   fallback is noted (the agent is never root).
//! - Supplementary groups are never taken from `/etc/group`: the agent has none.

use std::io::Read;

/// The most bytes of `/etc/passwd` or `/etc/group` read; the rest is ignored.
pub const MAX_DATABASE_BYTES: usize = 1 << 20;
/// The longest line considered, in bytes; longer ones are skipped.
pub const MAX_LINE: usize = 4096;
/// The longest user or group name accepted, in bytes.
pub const MAX_NAME: usize = 256;

/// Errors of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The `user` string is not `user` or `user:group`.
    #[error("user {0:?} is not of the form name, uid, name:group or uid:gid")]
    BadUser(String),
    /// The named user is not in the image's `/etc/passwd`.
    #[error("user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// The named group is not in the image's `/etc/group`.
    #[error("group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
    /// Reading `/etc/passwd` or `/etc/group` failed (other than its absence).
    #[error("cannot read the image's {file}")]
    Read {
        /// Which file.
        file: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One usable line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// The login name.
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
}

/// One usable line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The group name.
    pub name: String,
    /// The group id.
    pub gid: u32,
}

/// The ids the agent runs with, and why they differ from what was asked, if they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
    /// A note for the console when a fallback applied.
    pub note: Option<String>,
}

/// A plain decimal id: 1 to 10 ASCII digits, at most `u32::MAX - 1` (`-1` means "no id").
fn parse_id(field: &str) -> Option<u32> {
    if field.is_empty() || field.len() > 10 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse::<u32>().ok().filter(|id| *id != u32::MAX)
}

/// A name as the databases and `user` may hold it: non-empty, at most [`MAX_NAME`] bytes, not
/// starting with `+` or `-` (NIS entries), no whitespace, control characters or `:`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['+', '-'])
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
}

/// The lines of `text` worth parsing: valid UTF-8, at most [`MAX_LINE`] bytes, not comments or
/// NIS `+`/`-` entries. A last line without its newline counts.
fn lines(text: &[u8]) -> impl Iterator<Item = &str> {
    text.split(|b| *b == b'\n')
        .filter(|l| l.len() <= MAX_LINE)
        .filter_map(|l| std::str::from_utf8(l).ok())
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with(['#', '+', '-']))
}

/// Parses `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`), skipping unusable lines.
/// At least the first four fields must be there.
pub fn parse_passwd(text: &[u8]) -> Vec<PasswdEntry> {
    lines(text)
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next().filter(|n| valid_name(n))?;
            let _password = f.next()?;
            let uid = parse_id(f.next()?)?;
            let gid = parse_id(f.next()?)?;
            Some(PasswdEntry {
                name: name.to_owned(),
                uid,
                gid,
            })
        })
        .collect()
}

/// Parses `/etc/group` (`name:password:gid:members`), skipping unusable lines. The member list
/// is ignored: the agent gets no supplementary groups.
pub fn parse_group(text: &[u8]) -> Vec<GroupEntry> {
    lines(text)
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next().filter(|n| valid_name(n))?;
            let _password = f.next()?;
            let gid = parse_id(f.next()?)?;
            Some(GroupEntry {
                name: name.to_owned(),
                gid,
            })
        })
        .collect()
}

/// Reads at most [`MAX_DATABASE_BYTES`] from `r`; the last, possibly cut, line of a longer
/// file is dropped.
pub fn read_capped(r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_DATABASE_BYTES as u64 + 1)
        .read_to_end(&mut buf)?;
    if buf.len() > MAX_DATABASE_BYTES {
        buf.truncate(MAX_DATABASE_BYTES);
        let keep = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(keep);
        tracing::warn!(
            cap = MAX_DATABASE_BYTES,
            "identity: an image user database is over the cap; the rest is ignored"
        );
    }
    Ok(buf)
}

/// One side of a `user` string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Id(u32),
    Name(String),
}

fn parse_who(part: &str, whole: &str) -> Result<Who, IdentityError> {
    if let Some(id) = parse_id(part) {
        return Ok(Who::Id(id));
    }
    if part.bytes().all(|b| b.is_ascii_digit()) || !valid_name(part) {
        return Err(IdentityError::BadUser(whole.to_owned()));
    }
    Ok(Who::Name(part.to_owned()))
}

/// Resolves `user` (the spec's field) against the image's databases; `default` is the spec's
/// `(uid, gid)`.
pub fn resolve(
    user: Option<&str>,
    default: (u32, u32),
    passwd: &[PasswdEntry],
    group: &[GroupEntry],
) -> Result<Identity, IdentityError> {
    let Some(user) = user else {
        return Ok(Identity {
            uid: default.0,
            gid: default.1,
            note: None,
        });
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user_who = parse_who(user_part, user)?;
    let group_who = group_part.map(|g| parse_who(g, user)).transpose()?;
    let (uid, mut gid) = match user_who {
        Who::Name(name) => passwd
            .iter()
            .find(|e| e.name == name)
            .map(|e| (e.uid, e.gid))
            .ok_or(IdentityError::UnknownUser(name))?,
        Who::Id(uid) => {
            let gid = passwd.iter().find(|e| e.uid == uid).map(|e| e.gid);
            (uid, gid.unwrap_or(default.1))
        }
    };
    if let Some(g) = group_who {
        gid = match g {
            Who::Id(gid) => gid,
            Who::Name(name) => group
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.gid)
                .ok_or(IdentityError::UnknownGroup(name))?,
        };
    }
    if uid == 0 {
        return Ok(Identity {
            uid: default.0,
            gid: default.1,
            note: Some(format!(
                "user {user:?} is uid 0; the agent runs as {}:{} instead",
                default.0, default.1
            )),
        });
    }
    if gid == 0 {
        return Ok(Identity {
            uid,
            gid: default.1,
            note: Some(format!(
                "user {user:?} has gid 0; the agent runs with gid {} instead",
                default.1
            )),
        });
    }
    Ok(Identity {
        uid,
        gid,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
agent:x:1000:1000:The Agent,,,:/home/agent:/bin/bash
wheelie:x:1001:0::/home/w:/bin/sh
minimal:x:1002:1003
";
    const GROUP: &str = "\
root:x:0:
users:x:100:agent,minimal
agent:x:1000:
";

    fn ids(user: &str) -> Result<Identity, IdentityError> {
        resolve(
            Some(user),
            (4000, 4001),
            &parse_passwd(PASSWD.as_bytes()),
            &parse_group(GROUP.as_bytes()),
        )
    }

    fn uid_gid(user: &str) -> (u32, u32) {
        let id = ids(user).unwrap();
        (id.uid, id.gid)
    }

    #[test]
    fn names_numbers_and_groups_resolve() {
        assert_eq!(uid_gid("agent"), (1000, 1000));
        assert_eq!(uid_gid("minimal"), (1002, 1003));
        assert_eq!(uid_gid("agent:users"), (1000, 100));
        assert_eq!(uid_gid("agent:55"), (1000, 55));
        assert_eq!(uid_gid("1000"), (1000, 1000));
        assert_eq!(uid_gid("1000:users"), (1000, 100));
        assert_eq!(uid_gid("1234:5678"), (1234, 5678));
        // A uid the image does not list keeps the spec's gid.
        assert_eq!(uid_gid("1234"), (1234, 4001));
        assert_eq!(ids("agent").unwrap().note, None);
    }

    #[test]
    fn no_user_is_the_specs_ids_without_a_note() {
        let id = resolve(None, (4000, 4001), &[], &[]).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 4000,
                gid: 4001,
                note: None
            }
        );
    }

    #[test]
    fn root_and_group_zero_fall_back_to_the_specs_ids_with_a_note() {
        for user in ["root", "0", "0:0", "root:agent", "0:1000"] {
            let id = ids(user).unwrap();
            assert_eq!((id.uid, id.gid), (4000, 4001), "{user}");
            assert!(id.note.unwrap().contains("uid 0"), "{user}");
        }
        for user in ["wheelie", "agent:root", "agent:0", "1000:0"] {
            let id = ids(user).unwrap();
            assert_ne!(id.uid, 0, "{user}");
            assert_eq!(id.gid, 4001, "{user}");
            assert!(id.note.unwrap().contains("gid 0"), "{user}");
        }
    }

    #[test]
    fn unknown_names_and_malformed_users_are_errors() {
        assert!(matches!(ids("nobody"), Err(IdentityError::UnknownUser(n)) if n == "nobody"));
        assert!(matches!(ids("agent:staff"), Err(IdentityError::UnknownGroup(g)) if g == "staff"));
        for bad in [
            "",
            ":",
            "agent:",
            ":users",
            "a:b:c",
            "a b",
            "4294967295",
            "99999999999",
            "-1",
            "+1",
            "ag\u{7}ent",
        ] {
            assert!(
                matches!(ids(bad), Err(IdentityError::BadUser(_))),
                "{bad:?}: {:?}",
                ids(bad)
            );
        }
    }

    #[test]
    fn hostile_lines_are_skipped_without_losing_the_good_ones() {
        let mut text = Vec::new();
        text.extend_from_slice(b"short:x:1\n");
        text.extend_from_slice(b":x:5:5:::\n");
        text.extend_from_slice(b"spaced name:x:6:6:::\n");
        text.extend_from_slice(b"neg:x:-1:7:::\n");
        text.extend_from_slice(b"plus:x:+8:8:::\n");
        text.extend_from_slice(b"big:x:4294967296:9:::\n");
        text.extend_from_slice(b"nogid:x:10::::\n");
        text.extend_from_slice(b"+nis::::::\n");
        text.extend_from_slice(b"bad\xff\xfeutf8:x:11:11:::\n");
        text.extend_from_slice(b"\0\0\0\0\0\0\0\0\0\0\0\0\n");
        let mut long = b"long:x:12:12:".to_vec();
        long.extend(std::iter::repeat_n(b'g', MAX_LINE));
        text.extend_from_slice(&long);
        text.push(b'\n');
        text.extend_from_slice(b"good:x:13:14:::\r\n");
        text.extend_from_slice(b"last:x:15:16"); // no newline at the end
        let entries = parse_passwd(&text);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["good", "last"]);
        assert_eq!(entries[0].uid, 13);
        assert_eq!(entries[1].gid, 16);

        let groups = parse_group(b"g:x:notanumber:\nok:x:20:a,b\n\n\n:x:21:\nonly:x\n");
        assert_eq!(
            groups,
            [GroupEntry {
                name: "ok".into(),
                gid: 20
            }]
        );
    }

    #[test]
    fn the_first_of_duplicate_names_wins() {
        let passwd = parse_passwd(b"agent:x:1000:1000:::\nagent:x:0:0:::\n");
        let id = resolve(Some("agent"), (4000, 4001), &passwd, &[]).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
    }

    #[test]
    fn huge_files_are_read_only_up_to_the_cap() {
        // A user line right after the cap is never seen; one before it is.
        let mut text = b"early:x:1100:1100:::\n".to_vec();
        let filler = b"filler:x:1:1:::\n";
        while text.len() + filler.len() <= MAX_DATABASE_BYTES {
            text.extend_from_slice(filler);
        }
        text.extend_from_slice(b"late:x:1200:1200:::\n");
        text.extend(std::iter::repeat_n(b'z', 8 << 20));
        let read = read_capped(&text[..]).unwrap();
        assert!(read.len() <= MAX_DATABASE_BYTES);
        assert!(read.ends_with(b"\n"));
        let passwd = parse_passwd(&read);
        assert!(passwd.iter().any(|e| e.name == "early"));
        assert!(!passwd.iter().any(|e| e.name == "late"));

        // One endless line: nothing usable, and the read stops at the cap.
        let endless = std::io::repeat(b'a');
        let read = read_capped(endless).unwrap();
        assert!(read.is_empty());
        assert!(parse_passwd(&read).is_empty());

        // A file under the cap is kept whole, its last line included.
        let small = read_capped(&b"a:x:1:2"[..]).unwrap();
        assert_eq!(parse_passwd(&small).len(), 1);
    }
}
