//! Copying out of an ended VM: its writable disk (`scratch.ext4`) holds the overlay's upper
//! layer under `/upper`, that is every file the agent wrote or changed. `debugfs` (e2fsprogs)
//! reads it without mounting it; the daemon builds the tar stream itself.
//!
//! The disk is the guest's work and as hostile as anything the guest sends: a guest kernel can
//! write any bytes to it. So `debugfs` is only asked to *read*, and never writes a name of the
//! disk on the host (`rdump` of a folder would, and follows symlinks it made itself when a
//! folder names an entry twice):
//!
//! - folders are listed by inode number with `ls -p <ino>`, a batch of commands per level of
//!   the tree; the daemon walks the tree itself, without following symlinks, refusing names
//!   with `/`, a name given twice in one folder, a folder reached twice (a loop), and trees over
//!   the entry, depth and byte caps; device nodes (the overlay's whiteouts among them), FIFOs
//!   and sockets are left out;
//! - file contents come from one `cat <ino>` per file, read as exactly the listed size;
//! - a symlink's target is read by `rdump <ino>` into a private folder of the daemon, where it
//!   is created under a name the daemon chose, after `stat <ino>` confirmed it is a symlink.
//!
//! `debugfs -f -` echoes each command (`debugfs: CMD`) before its output; the output is cut at
//! those echoes, and any echo out of order fails the copy, so that a name holding a newline
//! cannot shift one command's output onto another's. What such a name can still do is forge
//! lines of a listing: those only name inodes of the same disk, so they can change what the
//! archive holds (which the guest controls anyway), not where anything goes on the host.
//!
//! Unlike a copy from a running VM, nothing of the image below the overlay is seen, and
//! symlinks on the way to the path are refused rather than followed. Every entry's time is the
//! disk's last modification.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, UNIX_EPOCH};

use axum::http::StatusCode;
use nanoclaw_image::tool::{Tool, ToolError};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tar::{Builder, EntryType};

use super::archive::{self, ChannelWriter, ExactRead, Meta};

/// `debugfs`, from e2fsprogs.
pub const DEBUGFS: Tool = Tool {
    name: "debugfs",
    package: "e2fsprogs",
};

/// The overlay's upper folder at the root of the writable disk.
const UPPER_DIR: &str = "upper";
/// The root folder's inode on ext4.
const ROOT_INODE: u64 = 2;
/// How long one batch of listing commands may run.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long streaming the files' contents may take (the client sets the pace).
const CONTENTS_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most output of one batch of listing commands.
const MAX_BATCH_OUTPUT: u64 = 64 << 20;
/// The end of `debugfs`'s error output kept for a failure.
const STDERR_TAIL: usize = 2048;
/// The longest name in a folder (ext4's limit).
const MAX_NAME_LEN: usize = 255;
/// The longest symlink target, in bytes.
const MAX_LINK_TARGET: usize = 4095;

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Errors of copying out of an ended VM's disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The VM has no writable disk (any more).
    #[error("the VM's writable disk {} is missing", .0.display())]
    NoDisk(PathBuf),
    /// `debugfs` is not installed.
    #[error("cannot read the VM's disk")]
    Tool(#[source] ToolError),
    /// Starting `debugfs` failed.
    #[error("cannot start debugfs")]
    Spawn(#[source] io::Error),
    /// Talking to `debugfs` failed.
    #[error("reading debugfs's output")]
    Pipe(#[source] io::Error),
    /// `debugfs` took too long.
    #[error("debugfs took more than {0:?}")]
    Timeout(Duration),
    /// `debugfs` said something that is not what was asked for: a corrupt or hostile disk.
    #[error("the disk's listing is malformed ({what}); debugfs said: {stderr}")]
    Malformed {
        /// What was wrong.
        what: String,
        /// The end of `debugfs`'s error output.
        stderr: String,
    },
    /// The path is not on the disk.
    #[error("{path} is not on the stopped VM's writable disk (only what the agent wrote is)")]
    NotFound {
        /// The guest path.
        path: String,
    },
    /// A component of the path on the way is not a folder.
    #[error("{path} is not a folder on the stopped VM's writable disk")]
    NotFolder {
        /// The guest path up to that component.
        path: String,
    },
    /// A symlink on the way to the path.
    #[error("{path} is a symlink; a stopped VM's disk is copied without following symlinks")]
    ThroughSymlink {
        /// The guest path up to the symlink.
        path: String,
    },
    /// A name that no file system holds.
    #[error("the disk holds a bad name {name:?} in {dir}")]
    BadName {
        /// The name (cut).
        name: String,
        /// Where.
        dir: String,
    },
    /// A folder names an entry twice.
    #[error("the disk names {name:?} twice in {dir}")]
    Duplicate {
        /// The name (cut).
        name: String,
        /// Where.
        dir: String,
    },
    /// A folder reached twice.
    #[error("the disk's folder {dir} is reached twice (a loop)")]
    Loop {
        /// Where.
        dir: String,
    },
    /// Folders nest deeper than the cap.
    #[error("{dir} nests deeper than {max} folders")]
    TooDeep {
        /// Where.
        dir: String,
        /// The cap.
        max: usize,
    },
    /// More entries than the cap.
    #[error("more than {max} entries")]
    TooManyEntries {
        /// The cap.
        max: u64,
    },
    /// The files add up to more than the cap.
    #[error("the files add up to more than {max} bytes")]
    TooLarge {
        /// The cap.
        max: u64,
    },
    /// A symlink's target cannot be read.
    #[error("cannot read the symlink {path}")]
    Symlink {
        /// Its name in the archive.
        path: String,
    },
    /// The private folder for symlinks cannot be made.
    #[error("cannot make a private folder beside the disk")]
    Staging(#[source] io::Error),
    /// A file's contents are not what its listing said.
    #[error("reading {path} from the disk")]
    Contents {
        /// Its name in the archive.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed (the client went away).
    #[error("writing the archive")]
    Write(#[source] io::Error),
}

impl DiskError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoDisk(_) => StatusCode::CONFLICT,
            Self::NotFound { .. } | Self::NotFolder { .. } => StatusCode::NOT_FOUND,
            Self::ThroughSymlink { .. }
            | Self::BadName { .. }
            | Self::Duplicate { .. }
            | Self::Loop { .. }
            | Self::TooDeep { .. }
            | Self::Malformed { .. }
            | Self::Symlink { .. }
            | Self::Contents { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyEntries { .. } | Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Tool(_) | Self::Spawn(_) | Self::Pipe(_) | Self::Staging(_) | Self::Write(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// The caps of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most entries.
    pub max_entries: u64,
    /// The most bytes of file contents.
    pub max_bytes: u64,
    /// The deepest nesting below the copied folder.
    pub max_depth: usize,
}

/// One line of `ls -p`: `/INO/MODE/UID/GID/NAME/SIZE/`, or `/INO/MODE/UID/GID/NAME//` for a
/// folder.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    name: Vec<u8>,
    size: u64,
}

impl Listed {
    fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// Parses one line of `ls -p`; `None` when it is not one.
fn parse_listed(line: &[u8]) -> Option<Listed> {
    let rest = line.strip_prefix(b"/")?;
    let mut fields = rest.splitn(5, |&b| b == b'/');
    let number = |f: &[u8], radix| u64::from_str_radix(std::str::from_utf8(f).ok()?, radix).ok();
    let ino = number(fields.next()?, 10)?;
    let mode = u32::try_from(number(fields.next()?, 8)?).ok()?;
    let uid = u32::try_from(number(fields.next()?, 10)?).ok()?;
    let gid = u32::try_from(number(fields.next()?, 10)?).ok()?;
    let tail = fields.next()?;
    let (name, size) = if mode & S_IFMT == S_IFDIR {
        (tail.strip_suffix(b"//")?, 0)
    } else {
        let tail = tail.strip_suffix(b"/")?;
        let cut = tail.iter().rposition(|&b| b == b'/')?;
        (&tail[..cut], number(&tail[cut + 1..], 10)?)
    };
    Some(Listed {
        ino,
        mode,
        uid,
        gid,
        name: name.to_vec(),
        size,
    })
}

/// Cuts `output` into the output of each of `commands`, at the echoes `debugfs: CMD` that
/// `debugfs -f` prints. An echo out of order, or a line before the first one, is an error.
fn sections<'a>(output: &'a [u8], commands: &[String]) -> Result<Vec<Vec<&'a [u8]>>, String> {
    let mut out: Vec<Vec<&[u8]>> = Vec::with_capacity(commands.len());
    for line in output.split(|&b| b == b'\n') {
        if let Some(cmd) = line.strip_prefix(b"debugfs: ") {
            match commands.get(out.len()) {
                Some(expected) if expected.as_bytes() == cmd => out.push(Vec::new()),
                _ => return Err("an echo of a command out of order".into()),
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(section) => section.push(line),
            None => return Err("output before the first command".into()),
        }
    }
    if out.len() != commands.len() {
        return Err(format!(
            "{} of {} commands answered",
            out.len(),
            commands.len()
        ));
    }
    Ok(out)
}

/// A running `debugfs -c -f - DISK`: the commands go in on stdin (from a thread of their own),
/// stdout is read by the caller, stderr's end is kept, and a watchdog kills it at its deadline.
/// Killed and reaped when dropped.
struct Debugfs {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// Dropped to call the watchdog off.
    stop_watchdog: Option<mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    timed_out: Arc<AtomicBool>,
    deadline: Duration,
}

impl Debugfs {
    fn start(disk: &Path, commands: &[String], deadline: Duration) -> Result<Self, DiskError> {
        let mut cmd: Command = DEBUGFS.command().map_err(DiskError::Tool)?;
        // -c opens the disk read-only without reading its bitmaps; -f - reads the commands.
        cmd.arg("-c")
            .arg("-f")
            .arg("-")
            .arg(disk)
            .env("DEBUGFS_PAGER", "__none__")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(DiskError::Spawn)?;
        let mut script = String::new();
        for c in commands {
            script.push_str(c);
            script.push('\n');
        }
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::spawn(move || {
                // A debugfs that died early closes the pipe; its output tells.
                let _ = stdin.write_all(script.as_bytes());
            });
        }
        let stderr = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
                tail
            })
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let timed_out = Arc::new(AtomicBool::new(false));
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let watchdog = std::thread::spawn({
            let timed_out = Arc::clone(&timed_out);
            move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(deadline) {
                    timed_out.store(true, Ordering::SeqCst);
                    // The child is not reaped before this thread is joined, so the pid is
                    // still its own.
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        });
        let stdout = child.stdout.take();
        Ok(Self {
            child,
            stdout,
            stderr,
            stop_watchdog: Some(stop),
            watchdog: Some(watchdog),
            timed_out,
            deadline,
        })
    }

    /// Ends `debugfs` (killed if it still runs) and calls the watchdog off.
    fn end(&mut self) {
        self.stop_watchdog.take();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The end of what `debugfs` wrote on stderr, once it has ended.
    fn stderr_tail(&mut self) -> String {
        self.end();
        let tail = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let start = tail.len().saturating_sub(STDERR_TAIL);
        super::guest_text(&tail[start..])
    }

    /// The error for output that is not what was asked for (or a timeout, if that was why).
    fn malformed(&mut self, what: impl Into<String>) -> DiskError {
        let stderr = self.stderr_tail();
        if self.timed_out.load(Ordering::SeqCst) {
            return DiskError::Timeout(self.deadline);
        }
        DiskError::Malformed {
            what: what.into(),
            stderr,
        }
    }
}

impl Drop for Debugfs {
    fn drop(&mut self) {
        self.end();
    }
}

/// Runs `commands` on `disk` and cuts the output per command; bounded in time and size.
fn run_batch(disk: &Path, commands: &[String]) -> Result<Vec<Vec<Vec<u8>>>, DiskError> {
    let mut debugfs = Debugfs::start(disk, commands, BATCH_TIMEOUT)?;
    let Some(stdout) = debugfs.stdout.take() else {
        return Err(debugfs.malformed("no output"));
    };
    let mut output = Vec::new();
    stdout
        .take(MAX_BATCH_OUTPUT + 1)
        .read_to_end(&mut output)
        .map_err(DiskError::Pipe)?;
    if output.len() as u64 > MAX_BATCH_OUTPUT {
        return Err(debugfs.malformed(format!(
            "more than {MAX_BATCH_OUTPUT} bytes of listing in one batch"
        )));
    }
    debugfs.end();
    if debugfs.timed_out.load(Ordering::SeqCst) {
        return Err(DiskError::Timeout(BATCH_TIMEOUT));
    }
    match sections(&output, commands) {
        Ok(parts) => Ok(parts
            .into_iter()
            .map(|lines| lines.into_iter().map(<[u8]>::to_vec).collect())
            .collect()),
        Err(what) => Err(debugfs.malformed(what)),
    }
}

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Dir,
    File { ino: u64, size: u64 },
    Symlink { ino: u64, target: Vec<u8> },
}

/// One archive entry, parents before children.
#[derive(Debug, Clone)]
struct Node {
    rel: PathBuf,
    content: Content,
    meta: Meta,
}

/// A copy out of an ended VM's disk, walked and checked, ready to stream.
#[derive(Debug)]
pub struct DiskExport {
    disk: PathBuf,
    nodes: Vec<Node>,
    /// Device nodes, FIFOs and sockets left out.
    pub skipped: u64,
}

/// A name for messages: lossy, cut.
fn shown(name: &[u8]) -> String {
    super::guest_text(&name[..name.len().min(128)])
}

fn ls(ino: u64) -> String {
    format!("ls -p <{ino}>")
}

impl DiskExport {
    /// Finds `guest_path` (absolute, checked by the caller) under `/upper` of `disk` and walks
    /// it. Every check happens here, before any byte of the archive is written.
    pub fn open(disk: &Path, guest_path: &str, limits: &Limits) -> Result<Self, DiskError> {
        let meta = std::fs::metadata(disk).map_err(|_| DiskError::NoDisk(disk.to_owned()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let mut export = Self {
            disk: disk.to_owned(),
            nodes: Vec::new(),
            skipped: 0,
        };
        let components: Vec<&str> = guest_path.split('/').filter(|c| !c.is_empty()).collect();
        // The folder or file at the path: upper's own entry, then each component's.
        let mut at = Listed {
            ino: ROOT_INODE,
            mode: S_IFDIR,
            uid: 0,
            gid: 0,
            name: Vec::new(),
            size: 0,
        };
        let mut walked = String::new();
        for (i, name) in std::iter::once(UPPER_DIR)
            .chain(components.iter().copied())
            .enumerate()
        {
            if i > 0 {
                walked.push('/');
                walked.push_str(name);
            }
            match at.kind() {
                S_IFDIR => {}
                S_IFLNK => {
                    return Err(DiskError::ThroughSymlink {
                        path: walked_parent(&walked),
                    });
                }
                _ => {
                    return Err(DiskError::NotFolder {
                        path: walked_parent(&walked),
                    });
                }
            }
            let listing = export.list(&[at.ino], &[walked_parent(&walked)])?;
            let mut found = listing
                .into_iter()
                .next()
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.name == name.as_bytes());
            at = match (found.next(), found.next()) {
                (Some(e), None) => e,
                (None, _) => {
                    return Err(DiskError::NotFound {
                        path: guest_path.to_owned(),
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(DiskError::Duplicate {
                        name: shown(name.as_bytes()),
                        dir: walked_parent(&walked),
                    });
                }
            };
        }
        let shown_path = if walked.is_empty() {
            "/".to_owned()
        } else {
            walked
        };
        let meta_of = |e: &Listed| Meta {
            mode: e.mode,
            uid: u64::from(e.uid),
            gid: u64::from(e.gid),
            mtime,
        };
        // The top entry is named after the path's last component; for `/` the entries are
        // the root's children.
        let top = components.last().map(PathBuf::from).unwrap_or_default();
        match at.kind() {
            S_IFDIR => {
                if !top.as_os_str().is_empty() {
                    export.nodes.push(Node {
                        rel: top.clone(),
                        content: Content::Dir,
                        meta: meta_of(&at),
                    });
                }
                export.walk(at.ino, top, shown_path, limits, &meta_of)?;
            }
            S_IFREG => {
                check_bytes(at.size, limits)?;
                export.nodes.push(Node {
                    rel: top,
                    content: Content::File {
                        ino: at.ino,
                        size: at.size,
                    },
                    meta: meta_of(&at),
                });
            }
            S_IFLNK => export.nodes.push(Node {
                rel: top,
                content: Content::Symlink {
                    ino: at.ino,
                    target: Vec::new(),
                },
                meta: meta_of(&at),
            }),
            _ => {
                return Err(DiskError::NotFound {
                    path: guest_path.to_owned(),
                });
            }
        }
        export.read_symlinks()?;
        Ok(export)
    }

    /// The number of entries the archive will hold.
    pub fn entries(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// Lists the folders `inos` (named `dirs` in messages), in one batch.
    fn list(&self, inos: &[u64], dirs: &[String]) -> Result<Vec<Vec<Listed>>, DiskError> {
        let commands: Vec<String> = inos.iter().map(|&i| ls(i)).collect();
        let sections = run_batch(&self.disk, &commands)?;
        sections
            .into_iter()
            .zip(dirs)
            .map(|(lines, dir)| {
                lines
                    .iter()
                    .map(|line| {
                        parse_listed(line).ok_or_else(|| DiskError::Malformed {
                            what: format!("a line of {dir}'s listing does not parse"),
                            stderr: String::new(),
                        })
                    })
                    .filter(|e| !matches!(e, Ok(l) if l.name == b"." || l.name == b".."))
                    .collect()
            })
            .collect()
    }

    /// Walks the folder `ino` (archived as `rel`), a level of the tree per batch.
    fn walk(
        &mut self,
        ino: u64,
        rel: PathBuf,
        shown_path: String,
        limits: &Limits,
        meta_of: &dyn Fn(&Listed) -> Meta,
    ) -> Result<(), DiskError> {
        let mut visited = HashSet::from([ino]);
        let mut level = vec![(ino, rel, shown_path)];
        let mut depth = 0usize;
        let mut bytes = 0u64;
        while !level.is_empty() {
            depth += 1;
            let inos: Vec<u64> = level.iter().map(|(i, _, _)| *i).collect();
            let names: Vec<String> = level.iter().map(|(_, _, s)| s.clone()).collect();
            let listings = self.list(&inos, &names)?;
            let mut next = Vec::new();
            for ((_, rel, shown_dir), listing) in level.into_iter().zip(listings) {
                let mut seen = HashSet::new();
                for entry in listing {
                    if entry.name.is_empty()
                        || entry.name.len() > MAX_NAME_LEN
                        || entry.name.contains(&b'/')
                    {
                        return Err(DiskError::BadName {
                            name: shown(&entry.name),
                            dir: shown_dir.clone(),
                        });
                    }
                    if !seen.insert(entry.name.clone()) {
                        return Err(DiskError::Duplicate {
                            name: shown(&entry.name),
                            dir: shown_dir.clone(),
                        });
                    }
                    let child = rel.join(OsStr::from_bytes(&entry.name));
                    let content = match entry.kind() {
                        S_IFDIR => {
                            let shown_child = format!("{shown_dir}/{}", shown(&entry.name));
                            if !visited.insert(entry.ino) {
                                return Err(DiskError::Loop { dir: shown_child });
                            }
                            if depth >= limits.max_depth {
                                return Err(DiskError::TooDeep {
                                    dir: shown_child,
                                    max: limits.max_depth,
                                });
                            }
                            next.push((entry.ino, child.clone(), shown_child));
                            Content::Dir
                        }
                        S_IFREG => {
                            bytes = bytes.saturating_add(entry.size);
                            check_bytes(bytes, limits)?;
                            Content::File {
                                ino: entry.ino,
                                size: entry.size,
                            }
                        }
                        S_IFLNK => Content::Symlink {
                            ino: entry.ino,
                            target: Vec::new(),
                        },
                        _ => {
                            self.skipped += 1;
                            continue;
                        }
                    };
                    self.nodes.push(Node {
                        rel: child,
                        content,
                        meta: meta_of(&entry),
                    });
                    if self.nodes.len() as u64 > limits.max_entries {
                        return Err(DiskError::TooManyEntries {
                            max: limits.max_entries,
                        });
                    }
                }
            }
            level = next;
        }
        Ok(())
    }

    /// Reads every symlink's target: `stat` confirms each is a symlink, then `rdump` makes it
    /// in a private folder under a name chosen here, where it is read back.
    fn read_symlinks(&mut self) -> Result<(), DiskError> {
        let inos: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|n| match n.content {
                Content::Symlink { ino, .. } => Some(ino),
                _ => None,
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if inos.is_empty() {
            return Ok(());
        }
        let stats: Vec<String> = inos.iter().map(|i| format!("stat <{i}>")).collect();
        for (ino, lines) in inos.iter().zip(run_batch(&self.disk, &stats)?) {
            let first = lines.first().map(Vec::as_slice).unwrap_or_default();
            let expected = format!("Inode: {ino}   Type: symlink ");
            if !first.starts_with(expected.as_bytes()) {
                return Err(DiskError::Malformed {
                    what: format!("inode {ino} is listed as a symlink but is not one"),
                    stderr: String::new(),
                });
            }
        }
        let parent = self.disk.parent().unwrap_or(Path::new("."));
        let private = tempfile::Builder::new()
            .prefix(".cp-links-")
            .tempdir_in(parent)
            .map_err(DiskError::Staging)?;
        let dir = private.path().display().to_string();
        if dir.contains(['\n', ' ', '"']) {
            return Err(DiskError::Staging(io::Error::other(
                "the VM directory's path has a space, quote or newline",
            )));
        }
        let dumps: Vec<String> = inos.iter().map(|i| format!("rdump <{i}> {dir}")).collect();
        run_batch(&self.disk, &dumps)?;
        for node in &mut self.nodes {
            if let Content::Symlink { ino, target } = &mut node.content {
                let link = private.path().join(format!("<{ino}>"));
                let read = std::fs::read_link(&link)
                    .ok()
                    .map(|t| t.into_os_string().into_vec())
                    .filter(|t| !t.is_empty() && t.len() <= MAX_LINK_TARGET);
                *target = read.ok_or_else(|| DiskError::Symlink {
                    path: node.rel.display().to_string(),
                })?;
            }
        }
        Ok(())
    }

    /// Writes the archive into `out`: folders and symlinks from the walk, file contents from one
    /// `debugfs` that `cat`s each file in order. On an error `out` is closed, so nothing after
    /// it looks like the end of a whole archive.
    pub fn write_tar(self, out: &mut ChannelWriter) -> Result<u64, DiskError> {
        let mut builder = Builder::new(&mut *out);
        let result = self.append_all(&mut builder);
        match result {
            Ok(entries) => {
                builder.into_inner().map_err(DiskError::Write)?;
                out.flush().map_err(DiskError::Write)?;
                Ok(entries)
            }
            Err(e) => {
                builder.get_mut().close();
                drop(builder);
                Err(e)
            }
        }
    }

    fn append_all<W: Write>(&self, builder: &mut Builder<W>) -> Result<u64, DiskError> {
        let cats: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| match n.content {
                Content::File { ino, .. } => Some(format!("cat <{ino}>")),
                _ => None,
            })
            .collect();
        let mut debugfs = match cats.is_empty() {
            true => None,
            false => Some(Debugfs::start(&self.disk, &cats, CONTENTS_TIMEOUT)?),
        };
        let mut contents = match debugfs.as_mut().and_then(|d| d.stdout.take()) {
            Some(stdout) => Some(BufReader::new(stdout)),
            None if debugfs.is_some() => {
                return Err(DiskError::Pipe(io::Error::other("no stdout")));
            }
            None => None,
        };
        let mut cat = cats.iter();
        for node in &self.nodes {
            let path = || node.rel.display().to_string();
            match &node.content {
                Content::Dir => {
                    let mut h = archive::header(EntryType::Directory, node.meta, 0);
                    builder
                        .append_data(&mut h, &node.rel, io::empty())
                        .map_err(DiskError::Write)?;
                }
                Content::Symlink { target, .. } => {
                    let mut h = archive::header(EntryType::Symlink, node.meta, 0);
                    builder
                        .append_link(&mut h, &node.rel, OsStr::from_bytes(target))
                        .map_err(DiskError::Write)?;
                }
                Content::File { size, .. } => {
                    let (Some(reader), Some(command)) = (contents.as_mut(), cat.next()) else {
                        return Err(DiskError::Pipe(io::Error::other("no contents")));
                    };
                    // A file cut short by the watchdog is a timeout, not a bad disk.
                    let contents_err = |source| {
                        if debugfs
                            .as_ref()
                            .is_some_and(|d| d.timed_out.load(Ordering::SeqCst))
                        {
                            return DiskError::Timeout(CONTENTS_TIMEOUT);
                        }
                        DiskError::Contents {
                            path: path(),
                            source,
                        }
                    };
                    expect_echo(reader, command).map_err(contents_err)?;
                    let mut h = archive::header(EntryType::Regular, node.meta, *size);
                    let mut data = ExactRead::new(&mut *reader, *size);
                    let appended = builder.append_data(&mut h, &node.rel, &mut data);
                    if let Some(e) = data.take_failure() {
                        return Err(contents_err(e));
                    }
                    appended.map_err(DiskError::Write)?;
                }
            }
        }
        if let Some(reader) = contents.as_mut() {
            let mut extra = [0u8; 1];
            if reader.read(&mut extra).map_err(DiskError::Pipe)? != 0 {
                let what = "a file is longer than its listing";
                return Err(match debugfs.as_mut() {
                    Some(d) => d.malformed(what),
                    None => DiskError::Pipe(io::Error::other(what)),
                });
            }
        }
        Ok(self.nodes.len() as u64)
    }
}

/// Reads the echo `debugfs: COMMAND\n` that comes before a command's output.
fn expect_echo(reader: &mut impl BufRead, command: &str) -> io::Result<()> {
    let expected = format!("debugfs: {command}\n");
    let mut got = Vec::with_capacity(expected.len());
    reader.take(expected.len() as u64).read_to_end(&mut got)?;
    if got != expected.as_bytes() {
        return Err(io::Error::other(
            "debugfs's output is out of step (a file is shorter than its listing)",
        ));
    }
    Ok(())
}

fn check_bytes(bytes: u64, limits: &Limits) -> Result<(), DiskError> {
    if bytes > limits.max_bytes {
        return Err(DiskError::TooLarge {
            max: limits.max_bytes,
        });
    }
    Ok(())
}

/// The guest path of the folder that holds the last component walked.
fn walked_parent(walked: &str) -> String {
    match walked.rsplit_once('/') {
        Some(("", _)) | None => "/".to_owned(),
        Some((parent, _)) => parent.to_owned(),
    }
}
