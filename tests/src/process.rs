//! Processes, ports and polling: the bounded command runner ([`OutputWithin`]), a free loopback
//! port, waiting for a condition, and finding processes by their command line.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a quick CLI call (`nanoclaw ps`, `inspect`, `audit verify`) may take. Generous: in L1
/// (software emulation) a debug binary is first read over 9p, which takes tens of seconds on a
/// loaded machine.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a command that boots a microVM and runs an agent in it (`nanoclaw run`) may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// [`Command::output`] with a deadline. An e2e test that waits on a stuck program must fail with
/// that program's output, never hang the tier.
pub trait OutputWithin {
    /// Runs the command with stdin from /dev/null and its stdout and stderr collected, like
    /// [`Command::output`]. If it has not exited within `timeout`, kills it and fails with what
    /// it had printed.
    fn output_within(&mut self, timeout: Duration) -> Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {self:?}"))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // A grandchild that kept the pipes open must not hold us here either.
        let collect = |rx: mpsc::Receiver<Vec<u8>>| {
            rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
        };
        let (stdout, stderr) = (collect(stdout), collect(stderr));
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => bail!(
                "{self:?} still running after {timeout:?}, killed; its stdout so far:\n{}\nits stderr so far:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        }
    }
}

/// Reads `pipe` to its end on a thread of its own; the receiver gets everything read.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// A free TCP port on 127.0.0.1 (bound and released; whoever needs it binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `done` every 20 ms until it holds.
///
/// # Panics
///
/// If it does not hold within `timeout`, naming `what` was awaited.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `bytes` as text, invalid UTF-8 replaced: a program's output in an assertion.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every process whose command line (NUL-separated argv) contains `needle`, with that command
/// line.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let argv = std::fs::read(e.path().join("cmdline")).ok()?;
            let argv = String::from_utf8_lossy(&argv).into_owned();
            argv.contains(needle).then_some((pid, argv))
        })
        .collect()
}
