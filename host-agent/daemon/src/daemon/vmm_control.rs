//! The daemon's side of the VMM's control socket, `<vm-dir>/vmm/control.sock`: pausing and
//! resuming a VM's vCPUs, asking whether they run, and taking snapshots.
//!
//! The VMM serves one JSON line per connection and answers one (its `control` module is the
//! other side): `{"op":"pause"|"resume"|"state"}` in, `{"ok":true,"state":"running"|"paused"}`
//! (or `"moved"`, from a VMM whose VM a live migration moved away) or
//! `{"ok":false,"error":"..."}` out; `{"op":"snapshot","dir":NAME}` in,
//! `{"ok":true,"state":"paused","snapshot":{"dir":..,"vcpus":..,"memory_bytes":..,
//! "memory_data_bytes":..}}` out once the folder `NAME` inside the VMM's folder is written. The VMM links none of the daemon's crates, so the
//! few fields are written here again; the end-to-end pause test runs both sides.
//!
//! A jailed VMM owns its folder and could put a link to another VM's socket in place of its
//! own, so the peer's uid, as the kernel reports it, must be this VM's. The answer is capped at
//! [`MAX_ANSWER`] bytes and the whole exchange at [`EXCHANGE_TIMEOUT`].

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The socket's name in the VMM's folder.
pub const SOCKET: &str = "control.sock";
/// The longest answer read.
pub const MAX_ANSWER: u64 = 4096;
/// How long one exchange may take: longer than the VMM's own wait for its vCPUs to park.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a snapshot may take: the VMM writes the whole of guest memory.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What to ask the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Park every vCPU.
    Pause,
    /// Run them again.
    Resume,
    /// Only say whether they run (also: whether the VMM serves its socket yet).
    State,
}

impl Op {
    fn request(self) -> &'static [u8] {
        match self {
            Op::Pause => b"{\"op\":\"pause\"}\n",
            Op::Resume => b"{\"op\":\"resume\"}\n",
            Op::State => b"{\"op\":\"state\"}\n",
        }
    }
}

/// Whether a VM's vCPUs run, as its VMM says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// They run.
    Running,
    /// Every one is parked.
    Paused,
    /// A live migration moved the VM to another host; they stay parked here for good.
    Moved,
}

impl RunState {
    /// Whether the vCPUs are parked.
    pub fn paused(self) -> bool {
        self != RunState::Running
    }
}

/// What the VMM says it wrote for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SnapshotWritten {
    /// The folder, as named in the request.
    pub dir: String,
    /// vCPUs saved.
    pub vcpus: usize,
    /// The memory file's length.
    pub memory_bytes: u64,
    /// Bytes of it that hold data.
    pub memory_data_bytes: u64,
}

/// Why the VMM could not be asked, or refused.
#[derive(Debug, thiserror::Error)]
pub enum VmmControlError {
    /// The socket could not be reached (the VMM is gone, or predates pausing).
    #[error("cannot reach the VMM's control socket")]
    Connect(#[source] std::io::Error),
    /// The socket is served by a process of another uid.
    #[error("the control socket is served by uid {peer}, not the VM's uid {expected}")]
    NotTheVmm {
        /// This VM's uid.
        expected: u32,
        /// The peer's.
        peer: u32,
    },
    /// No answer in time.
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    /// The VMM refused, and why.
    #[error("the VMM refused: {0}")]
    Refused(String),
    /// The answer is not one the VMM gives.
    #[error("unexpected answer from the VMM: {0}")]
    BadAnswer(String),
}

#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    snapshot: Option<SnapshotWritten>,
}

/// Asks the VMM whose folder is `vmm_dir` (jailed as `vmm_uid`) to carry out `op`; answers
/// whether its vCPUs are now paused.
pub async fn request(
    vmm_dir: &Path,
    vmm_uid: Option<u32>,
    op: Op,
) -> Result<bool, VmmControlError> {
    let line = exchange(vmm_dir, vmm_uid, op.request(), EXCHANGE_TIMEOUT).await?;
    parse(&line).map(|(state, _)| state.paused())
}

/// Asks the VMM whose folder is `vmm_dir` (jailed as `vmm_uid`) whether its vCPUs run, are
/// parked, or stay parked because the VM moved to another host.
pub async fn state(vmm_dir: &Path, vmm_uid: Option<u32>) -> Result<RunState, VmmControlError> {
    let line = exchange(vmm_dir, vmm_uid, Op::State.request(), EXCHANGE_TIMEOUT).await?;
    parse(&line).map(|(state, _)| state)
}

/// Asks the paused VMM whose folder is `vmm_dir` to save the VM into the new folder `dir`
/// (relative to `vmm_dir`); answers what it wrote. Waits up to [`SNAPSHOT_TIMEOUT`].
pub async fn snapshot(
    vmm_dir: &Path,
    vmm_uid: Option<u32>,
    dir: &str,
) -> Result<SnapshotWritten, VmmControlError> {
    let mut request = serde_json::to_vec(&serde_json::json!({"op": "snapshot", "dir": dir}))
        .map_err(|e| VmmControlError::BadAnswer(e.to_string()))?;
    request.push(b'\n');
    let line = exchange(vmm_dir, vmm_uid, &request, SNAPSHOT_TIMEOUT).await?;
    match parse(&line)? {
        (_, Some(written)) if written.dir == dir => Ok(written),
        _ => Err(VmmControlError::BadAnswer(
            String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
        )),
    }
}

/// How long a migrating VMM may say nothing (between two progress lines, or before its
/// answer): longer than the VMM's own stall limit on the link (60 s), so the VMM, which knows
/// which copy runs, always speaks first.
pub const MIGRATE_IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// The longest line of a migration's exchange (an answer lists every round).
pub const MAX_MIGRATE_LINE: u64 = 1 << 20;

/// One pre-copy round, as the VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct MigrationRound {
    /// 0 for the full copy.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Writable disks' blocks sent (4 KiB each).
    #[serde(default)]
    pub blocks: u64,
    /// Its rate, MB/s.
    pub mb_per_s: f64,
    /// Pages and blocks written meanwhile.
    pub dirty: u64,
    /// How long sending those would take, in milliseconds.
    pub expected_downtime_ms: f64,
}

/// How the VMM says a migration ended.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MigrationEnd {
    /// `moved`, `kept` or `unknown`.
    pub outcome: nanoclaw_api::MigrationOutcome,
    /// Why it did not move.
    #[serde(default)]
    pub error: Option<String>,
    /// The rounds (when it moved).
    #[serde(default)]
    pub rounds: Vec<MigrationRound>,
    /// How long the VM was stopped, in milliseconds (when it moved).
    #[serde(default)]
    pub downtime_ms: f64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MigrateLine {
    Progress { progress: MigrationRound },
    Answer { migration: MigrationEnd },
}

/// Asks the VMM whose folder is `vmm_dir` to live-migrate its VM into the Unix socket `socket`
/// (a plain name inside that folder, which the caller listens on); `progress` hears of each
/// round. Answers how it ended, and whether the VM is now paused. Each line must come within
/// [`MIGRATE_IDLE_TIMEOUT`] of the last.
pub async fn migrate(
    vmm_dir: &Path,
    vmm_uid: Option<u32>,
    socket: &str,
    downtime_ms: Option<u64>,
    max_rounds: Option<u32>,
    progress: &mut (dyn FnMut(MigrationRound) + Send),
) -> Result<(MigrationEnd, bool), VmmControlError> {
    let mut request = serde_json::json!({"op": "migrate", "socket": socket});
    if let Some(ms) = downtime_ms {
        request["downtime_ms"] = ms.into();
    }
    if let Some(n) = max_rounds {
        request["max_rounds"] = n.into();
    }
    let mut request =
        serde_json::to_vec(&request).map_err(|e| VmmControlError::BadAnswer(e.to_string()))?;
    request.push(b'\n');
    let stream = tokio::time::timeout(MIGRATE_IDLE_TIMEOUT, connect(vmm_dir, vmm_uid))
        .await
        .map_err(|_| VmmControlError::Timeout(MIGRATE_IDLE_TIMEOUT))??;
    let (read, mut write) = stream.into_split();
    write
        .write_all(&request)
        .await
        .map_err(VmmControlError::Connect)?;
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut capped = (&mut reader).take(MAX_MIGRATE_LINE);
        let read = capped.read_until(b'\n', &mut line);
        tokio::time::timeout(MIGRATE_IDLE_TIMEOUT, read)
            .await
            .map_err(|_| VmmControlError::Timeout(MIGRATE_IDLE_TIMEOUT))?
            .map_err(VmmControlError::Connect)?;
        let shown = || String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
        match serde_json::from_slice::<MigrateLine>(&line) {
            Ok(MigrateLine::Progress { progress: round }) => progress(round),
            Ok(MigrateLine::Answer { migration }) => {
                // `ok` is false unless it moved; `state` says where the VM is either way.
                let answer: Answer = serde_json::from_slice(&line)
                    .map_err(|_| VmmControlError::BadAnswer(shown()))?;
                let paused = match answer.state.as_deref() {
                    Some("paused") => true,
                    Some("running") => false,
                    _ => return Err(VmmControlError::BadAnswer(shown())),
                };
                return Ok((migration, paused));
            }
            Err(_) => {
                // A plain refusal (a bad request, a VMM that cannot migrate).
                parse(&line)?;
                return Err(VmmControlError::BadAnswer(shown()));
            }
        }
    }
}

/// Connects to the control socket and checks the peer is the VM's uid.
async fn connect(vmm_dir: &Path, vmm_uid: Option<u32>) -> Result<UnixStream, VmmControlError> {
    let stream = UnixStream::connect(vmm_dir.join(SOCKET))
        .await
        .map_err(VmmControlError::Connect)?;
    if let Some(expected) = vmm_uid {
        let peer = stream.peer_cred().map_err(VmmControlError::Connect)?.uid();
        if peer != expected {
            return Err(VmmControlError::NotTheVmm { expected, peer });
        }
    }
    Ok(stream)
}

/// Sends `request` and reads one answer line, within `timeout`.
async fn exchange(
    vmm_dir: &Path,
    vmm_uid: Option<u32>,
    request: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, VmmControlError> {
    let exchange = async {
        let stream = connect(vmm_dir, vmm_uid).await?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(request)
            .await
            .map_err(VmmControlError::Connect)?;
        let mut line = Vec::new();
        BufReader::new(read.take(MAX_ANSWER))
            .read_until(b'\n', &mut line)
            .await
            .map_err(VmmControlError::Connect)?;
        Ok(line)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| VmmControlError::Timeout(timeout))?
}

/// Reads the VMM's answer: whether the vCPUs run, and what a snapshot wrote.
fn parse(line: &[u8]) -> Result<(RunState, Option<SnapshotWritten>), VmmControlError> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
    let answer: Answer =
        serde_json::from_slice(line).map_err(|_| VmmControlError::BadAnswer(shown()))?;
    match (answer.ok, answer.state.as_deref(), answer.error) {
        (true, Some("paused"), _) => Ok((RunState::Paused, answer.snapshot)),
        (true, Some("running"), _) => Ok((RunState::Running, answer.snapshot)),
        (true, Some("moved"), None) if answer.snapshot.is_none() => Ok((RunState::Moved, None)),
        (false, _, Some(error)) => Err(VmmControlError::Refused(error.chars().take(200).collect())),
        _ => Err(VmmControlError::BadAnswer(shown())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoclaw_api::MigrationOutcome;

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(
            parse(br#"{"ok":true,"state":"paused"}"#).unwrap(),
            (RunState::Paused, None)
        );
        assert_eq!(
            parse(br#"{"ok":true,"state":"running"}"#).unwrap(),
            (RunState::Running, None)
        );
        assert_eq!(
            parse(br#"{"ok":true,"state":"moved"}"#).unwrap(),
            (RunState::Moved, None)
        );
        assert!(RunState::Moved.paused() && RunState::Paused.paused());
        assert!(!RunState::Running.paused());
        let (state, written) = parse(
            br#"{"ok":true,"state":"paused","snapshot":{"dir":"s","vcpus":2,"memory_bytes":8,"memory_data_bytes":4}}"#,
        )
        .unwrap();
        assert_eq!(state, RunState::Paused);
        assert_eq!(written.unwrap().memory_data_bytes, 4);
        assert!(matches!(
            parse(br#"{"ok":false,"error":"the VM is stopping"}"#),
            Err(VmmControlError::Refused(e)) if e == "the VM is stopping"
        ));
        for bad in [
            &b""[..],
            b"{}",
            br#"{"ok":true,"state":"sleeping"}"#,
            br#"{"ok":true,"state":"moved","snapshot":{"dir":"s","vcpus":2,"memory_bytes":8,"memory_data_bytes":4}}"#,
            b"\xff",
        ] {
            assert!(
                matches!(parse(bad), Err(VmmControlError::BadAnswer(_))),
                "{bad:?}"
            );
        }
    }

    /// Serves one control connection that answers `lines` to a `migrate` request.
    async fn answering(dir: &Path, lines: &[&str]) -> tokio::task::JoinHandle<()> {
        let lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let listener = tokio::net::UnixListener::bind(dir.join(SOCKET)).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (read, mut write) = s.into_split();
            let mut request = String::new();
            BufReader::new(read).read_line(&mut request).await.unwrap();
            let request: serde_json::Value = serde_json::from_str(&request).unwrap();
            assert_eq!(request["op"], "migrate");
            assert_eq!(request["socket"], "migrate.sock");
            assert_eq!(request["downtime_ms"], 300);
            for line in &lines {
                write.write_all(line.as_bytes()).await.unwrap();
            }
        })
    }

    #[tokio::test]
    async fn a_migration_reports_its_rounds_then_how_it_ended() {
        let progress = r#"{"progress":{"round":0,"pages":10,"ms":1.0,"mb_per_s":40.9,"dirty":2,"expected_downtime_ms":0.2}}
"#;
        // The lines served, the outcome and whether paused (none: an error), the rounds seen.
        type Case<'a> = (&'a [&'a str], Option<(MigrationOutcome, bool)>, usize);
        let cases: [Case; 4] = [
            (
                &[
                    progress,
                    progress,
                    "{\"ok\":true,\"state\":\"paused\",\"migration\":{\"outcome\":\"moved\",\"rounds\":[],\"final_pages\":1,\"downtime_ms\":3.5}}\n",
                ],
                Some((MigrationOutcome::Moved, true)),
                2,
            ),
            (
                &[
                    progress,
                    "{\"ok\":false,\"state\":\"running\",\"migration\":{\"outcome\":\"kept\",\"error\":\"cut\",\"rounds\":[],\"final_pages\":0,\"downtime_ms\":0.0}}\n",
                ],
                Some((MigrationOutcome::Kept, false)),
                1,
            ),
            (
                &[
                    "{\"ok\":false,\"state\":\"paused\",\"migration\":{\"outcome\":\"unknown\",\"error\":\"no answer\",\"rounds\":[],\"final_pages\":0,\"downtime_ms\":0.0}}\n",
                ],
                Some((MigrationOutcome::Unknown, true)),
                0,
            ),
            // A plain refusal, and then a VMM that hangs up mid-way: errors, not outcomes.
            (
                &["{\"ok\":false,\"error\":\"bad migration socket name\"}\n"],
                None,
                0,
            ),
        ];
        for (lines, want, rounds) in cases {
            let dir = tempfile::tempdir().unwrap();
            let server = answering(dir.path(), lines).await;
            let mut seen = 0;
            let got = migrate(
                dir.path(),
                None,
                "migrate.sock",
                Some(300),
                None,
                &mut |r| {
                    assert_eq!(r.pages, 10);
                    seen += 1;
                },
            )
            .await;
            server.await.unwrap();
            assert_eq!(seen, rounds);
            match (got, want) {
                (Ok((end, paused)), Some((outcome, want_paused))) => {
                    assert_eq!((end.outcome, paused), (outcome, want_paused));
                }
                (Err(VmmControlError::Refused(e)), None) => assert!(e.contains("bad migration")),
                (got, want) => panic!("{got:?} against {want:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let server = answering(dir.path(), &[progress]).await;
        let got = migrate(
            dir.path(),
            None,
            "migrate.sock",
            Some(300),
            None,
            &mut |_| {},
        )
        .await;
        server.await.unwrap();
        assert!(matches!(got, Err(VmmControlError::BadAnswer(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_socket_of_another_uid_or_no_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            request(dir.path(), None, Op::Pause).await,
            Err(VmmControlError::Connect(_))
        ));
        let listener = tokio::net::UnixListener::bind(dir.path().join(SOCKET)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let server = tokio::spawn(async move {
            // The first client hangs up on seeing the wrong uid.
            drop(listener.accept().await.unwrap());
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"{\"op\":\"pause\"}\n");
            s.write_all(b"{\"ok\":true,\"state\":\"paused\"}\n")
                .await
                .unwrap();
        });
        assert!(matches!(
            request(dir.path(), Some(me.wrapping_add(1)), Op::Pause).await,
            Err(VmmControlError::NotTheVmm { .. })
        ));
        assert!(request(dir.path(), Some(me), Op::Pause).await.unwrap());
        server.await.unwrap();
    }
}
