//! The VMM's own stdout and stderr, copied into `<vm-dir>/vmm.log` up to a cap.
//!
//! The VMM faces the guest, and a guest (or a VMM it took over) can make it write without end.
//! So the VMM never gets `vmm.log` itself: its stdout and stderr are the write end of a FIFO,
//! `<vm-dir>/vmm.pipe`, and a daemon task copies from the FIFO into `vmm.log` until the file
//! holds [`VMM_LOG_CAP`] bytes. After that it notes once in the log that the cap was reached,
//! keeps draining the FIFO (so the VMM never blocks on a full pipe), and counts what it drops.
//! The copy ends at end of file, which comes when the last writer (the VMM, and its jail's
//! supervisor) has exited.
//!
//! Why a FIFO and not an anonymous pipe: the VMM outlives the daemon. While no daemon runs,
//! the FIFO has no reader, so the VMM's writes fail with `EPIPE` and are lost (they do not
//! block it, and they do not kill it: see below). A restarted daemon opens the FIFO by name
//! again ([`reattach`]) and the copy resumes where `vmm.log` stands; an anonymous pipe
//! could never be found again. The FIFO lives in `<vm-dir>`, outside a jailed VMM's root
//! (`<vm-dir>/vmm/`), so a jailed VMM holds only the descriptor it was given.
//!
//! `SIGPIPE`: the daemon's `Command` resets `SIGPIPE` to its default in the child, but
//! `nanoclaw-vmm` is a Rust binary, whose runtime sets `SIGPIPE` to "ignore" before `main`
//! (and its jail's fork keeps that), so a write with no reader fails with `EPIPE` instead of
//! killing the VMM. The VMM writes its stderr so that such a failure is ignored, never a panic
//! (no `eprintln!`, and `tracing-subscriber`'s own error report is turned off there).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

/// The largest `vmm.log`, in bytes; the rest of the VMM's output is counted and dropped.
pub const VMM_LOG_CAP: u64 = 4 << 20;
/// The FIFO between the VMM and the daemon, in a VM's directory.
pub const VMM_PIPE_FILE: &str = "vmm.pipe";
/// The line written once when the cap is reached.
const CAP_NOTE: &[u8] =
    b"\n[nanoclaw: vmm.log reached its cap; further VMM output is counted and dropped]\n";

/// Errors of the VMM's log.
#[derive(Debug, thiserror::Error)]
pub enum VmmLogError {
    /// Making the FIFO failed.
    #[error("cannot make the FIFO {}", .path.display())]
    Fifo {
        /// The FIFO.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening the FIFO or the log failed.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The daemon's end of a fresh FIFO in `dir` and the VMM's end (for its stdout and stderr).
/// `vmm.log` is emptied.
pub fn create(dir: &Path) -> Result<(pipe::Receiver, File, File), VmmLogError> {
    let path = dir.join(VMM_PIPE_FILE);
    let fifo_err = |source| VmmLogError::Fifo {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fifo_err(e)),
        _ => {}
    }
    nix::unistd::mkfifo(
        &path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|e| fifo_err(e.into()))?;
    // The read end first (it does not wait for a writer), so that opening the write end finds a
    // reader and returns at once.
    let reader = pipe::OpenOptions::new()
        .open_receiver(&path)
        .map_err(fifo_err)?;
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(fifo_err)?;
    let log = open_log(dir, true)?;
    Ok((reader, writer, log))
}

/// The daemon's end of the FIFO of a VMM started by an earlier daemon, with `vmm.log` to append
/// to; `None` when that VMM has no FIFO (its daemon gave it `vmm.log` itself).
pub fn reattach(dir: &Path) -> Result<Option<(pipe::Receiver, File)>, VmmLogError> {
    let path = dir.join(VMM_PIPE_FILE);
    // Never blocks: the read end of a FIFO opens without a writer, and a file that is not a
    // FIFO is refused.
    let reader = match pipe::OpenOptions::new().open_receiver(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(VmmLogError::Open { path, source }),
    };
    Ok(Some((reader, open_log(dir, false)?)))
}

/// Opens `<dir>/vmm.log` for appending, emptied when `fresh`.
fn open_log(dir: &Path, fresh: bool) -> Result<File, VmmLogError> {
    let path = dir.join(super::state::VMM_LOG_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .truncate(false)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|f| {
            if fresh {
                f.set_len(0)?;
            }
            Ok(f)
        })
        .map_err(|source| VmmLogError::Open { path, source })
}

/// Copies from `fifo` into `log` until end of file (every writer gone), keeping `log` at most
/// [`VMM_LOG_CAP`] bytes plus a note written once when the cap is reached; tells `dropped` of
/// every chunk dropped, in bytes. Never stops reading early, so the VMM never blocks on it.
pub async fn copy(mut fifo: pipe::Receiver, mut log: File, mut dropped: impl FnMut(u64)) {
    let mut size = log.metadata().map_or(VMM_LOG_CAP, |m| m.len());
    // A log already at the cap (a restarted daemon's) has its note.
    let mut noted = size >= VMM_LOG_CAP;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match fifo.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the VMM's output");
                return;
            }
        };
        let room = usize::try_from(VMM_LOG_CAP.saturating_sub(size)).unwrap_or(usize::MAX);
        let mut keep = n.min(room);
        if keep > 0 {
            if let Err(e) = log.write_all(&buf[..keep]) {
                tracing::warn!(error = %e, "cannot write vmm.log; dropping the VMM's output");
                // Written in part or not at all: count it all and stop writing.
                keep = 0;
                size = VMM_LOG_CAP;
                noted = true;
            } else {
                size += keep as u64;
            }
        }
        if keep < n {
            dropped((n - keep) as u64);
            if !noted {
                noted = true;
                let _ = log.write_all(CAP_NOTE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_restarted_daemon_reattaches_and_appends_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        assert!(reattach(dir.path()).unwrap().is_none());
        let (reader, writer, log) = create(dir.path()).unwrap();
        // The daemon goes away: its reader and copier with it.
        drop((reader, log));
        let mut writer = writer;
        // Nobody reads: the write fails (SIGPIPE is ignored in Rust programs), never blocks.
        let e = writer.write_all(b"lost\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPIPE));
        std::fs::write(
            dir.path().join(super::super::state::VMM_LOG_FILE),
            b"before\n",
        )
        .unwrap();
        let (reader, log) = reattach(dir.path()).unwrap().unwrap();
        let writing = std::thread::spawn(move || {
            writer.write_all(b"after\n").unwrap();
            writer.write_all(&vec![b'x'; VMM_LOG_CAP as usize]).unwrap();
        });
        let mut total = 0;
        copy(reader, log, |n| total += n).await;
        writing.join().unwrap();
        let text = std::fs::read(dir.path().join(super::super::state::VMM_LOG_FILE)).unwrap();
        assert_eq!(text.len() as u64, VMM_LOG_CAP + CAP_NOTE.len() as u64);
        assert!(text.starts_with(b"before\nafter\nxx"));
        assert!(text.ends_with(CAP_NOTE));
        assert_eq!(total, 13);
    }
}
