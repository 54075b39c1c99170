//! The fake VMMs' live migration: the source's `migrate` request on the control socket
//! (served by [`super::serve_control`]) and the target's `--migrate-from` ([`migrate_in`]), over
//! a fake stream of their own. The daemons relay the stream without looking at it, so any
//! bytes do; the real one is `nanoclaw_vmm::migration::stream`.
//!
//! # The stream
//! Source to target, lines of ASCII, each `PAGES` line followed by that many bytes of
//! [`pattern`] (which the target checks byte by byte, so a relay that loses, reorders or changes
//! a byte is caught):
//!
//! ```text
//! NCFAKEMIG1 boot=<32 hex digits> mode=<mode> memory_mib=<M> vcpus=<N>
//! PAGES <record> <bytes>      one per pre-copy round, then one sent with the VM stopped
//! DONE <records> <bytes>
//! ```
//!
//! The target answers once all of it is received and checked: `RESUMED` (it runs the VM) or
//! `REFUSED <why>` (a header of another guest size, a bad byte: the source runs on).
//!
//! # Modes
//! The source reads its [`MigrationMode`] from [`MIGRATION_MODE_FILE`] in its folder (written by
//! the test's fake agent; none is `normal`) and sends it in the header, so that both ends act it
//! out.
//!
//! # As the real VMM answers
//! Progress lines `{"progress":{...}}` on the control connection, one per round, then the
//! answer: `moved` (state `paused`; from then on every request but `state` is refused);
//! `kept` when the stream broke before `DONE` (the daemon closing the socket is a cancel), or
//! the target refused (the VM runs again unless it was paused before); `unknown` when `DONE`
//! went out and no answer came within [`ANSWER_TIMEOUT`] (state `paused`). While the VM is
//! stopped for the switch-over, for good after `moved`, and after `unknown` until a `resume`,
//! its fake guest hears nothing ([`super::wait_while_migration_stopped`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::MIGRATION_STOPPED;

/// The file in the source's VM folder that names its [`MigrationMode`].
pub const MIGRATION_MODE_FILE: &str = "migration-mode";
/// How long the fake source waits for the target's answer after `DONE` (the real VMM: 60 s).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a `no-answer` target holds the socket silent before it gives up (exit 1).
const SILENT_FOR: Duration = Duration::from_secs(60);
/// The stream's first word.
const MAGIC: &str = "NCFAKEMIG1";
/// A fake page.
const PAGE: usize = 4096;
/// The file a `late-answer` source writes in its folder once the target runs the VM.
pub const SWITCHED_FILE: &str = "migration-switched";
/// How long a `late-answer` source holds its `moved` answer.
pub const LATE_ANSWER: Duration = Duration::from_secs(3);
/// How far apart the rounds of a slow migration are.
const SLOW_ROUND_GAP: Duration = Duration::from_millis(100);

/// What a fake migration acts out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// Three rounds (64, 16 and 4 pages) back to back, then 2 final pages; the target runs it.
    Normal,
    /// Fifty rounds of 4 pages, 100 ms apart (5 s), so that a cancel lands mid-copy.
    Slow,
    /// As slow; the target exits 1 after the first round without answering.
    TargetDies,
    /// As normal; the target reads `DONE` and then holds the socket silent (60 s, then exits
    /// 1), so the source's outcome is `unknown`.
    NoAnswer,
    /// As normal, but once the target runs the VM the source writes [`SWITCHED_FILE`] in its
    /// folder and holds its `moved` answer for [`LATE_ANSWER`]: time for a test to kill the
    /// source daemon between the switch-over and its record of it.
    LateAnswer,
}

impl MigrationMode {
    /// The mode's word: in the header, in [`MIGRATION_MODE_FILE`] and as the fake agent's
    /// argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Slow => "slow",
            Self::TargetDies => "target-dies",
            Self::NoAnswer => "no-answer",
            Self::LateAnswer => "late-answer",
        }
    }

    /// The mode `word` names.
    pub fn parse(word: &str) -> Option<Self> {
        [
            Self::Normal,
            Self::Slow,
            Self::TargetDies,
            Self::NoAnswer,
            Self::LateAnswer,
        ]
        .into_iter()
        .find(|m| m.as_str() == word)
    }

    /// The pages of each pre-copy round.
    fn rounds(self) -> Vec<usize> {
        match self {
            Self::Normal | Self::NoAnswer | Self::LateAnswer => vec![64, 16, 4],
            Self::Slow | Self::TargetDies => vec![4; 50],
        }
    }

    fn slow(self) -> bool {
        matches!(self, Self::Slow | Self::TargetDies)
    }
}

/// The `at`th byte of record `record`'s pages.
pub fn pattern(record: u32, at: usize) -> u8 {
    (record as usize * 151 + at * 7 + at / PAGE) as u8
}

/// The value of `--NAME VALUE` on this process's command line (the fake VMM's: the daemon's
/// `--memory-mib` and `--vcpus`).
fn own_arg(name: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].clone())
        .unwrap_or_default()
}

/// One pre-copy round, as the real VMM reports it.
fn round_info(round: u32, pages: usize, elapsed: Duration, dirty: usize) -> serde_json::Value {
    let ms = elapsed.as_secs_f64() * 1e3;
    let mb_per_s = (pages * PAGE) as f64 / elapsed.as_secs_f64().max(1e-6) / 1e6;
    let expected_downtime_ms = (dirty * PAGE) as f64 / (mb_per_s * 1e6).max(1.0) * 1e3;
    serde_json::json!({"round": round, "pages": pages, "ms": ms, "mb_per_s": mb_per_s,
        "dirty": dirty, "expected_downtime_ms": expected_downtime_ms})
}

/// What [`send`] leaves behind.
pub(super) struct Sent {
    /// The answer line.
    pub answer: serde_json::Value,
    /// Whether the VM is paused now.
    pub paused: bool,
    /// Whether it moved (then this fake VMM refuses everything but `state`).
    pub moved: bool,
}

/// The source's side of `{"op":"migrate","socket":NAME,...}` (`req`) for the guest of
/// `boot_id`, paused or not: connects to `<vm_dir>/NAME`, sends the fake stream, writes a
/// progress line per round to `progress`, and waits for the target's answer.
pub(super) fn send(
    vm_dir: &Path,
    boot_id: [u8; 16],
    req: &serde_json::Value,
    paused: bool,
    progress: &mut dyn Write,
) -> Sent {
    let refuse = |error: String| Sent {
        answer: serde_json::json!({"ok": false, "error": error}),
        paused,
        moved: false,
    };
    let name = req["socket"].as_str().unwrap_or("");
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return refuse(format!(
            "bad migration socket name {name:?}: a plain name inside the VM's folder"
        ));
    }
    let mut link = match UnixStream::connect(vm_dir.join(name)) {
        Ok(link) => link,
        Err(e) => return refuse(format!("connect to the migration socket {name}: {e}")),
    };
    let mode = std::fs::read_to_string(vm_dir.join(MIGRATION_MODE_FILE))
        .ok()
        .and_then(|w| MigrationMode::parse(w.trim()))
        .unwrap_or(MigrationMode::Normal);
    let max_rounds = req["max_rounds"].as_u64().unwrap_or(30) as usize;
    let mut plan = mode.rounds();
    plan.truncate(max_rounds + 1);
    let failed = |outcome: &str, error: String, paused: bool| {
        let state = if paused { "paused" } else { "running" };
        serde_json::json!({"ok": false, "state": state, "migration": {"outcome": outcome,
            "error": error, "rounds": [], "final_pages": 0, "downtime_ms": 0.0}})
    };
    // Before DONE went out the target cannot run the VM: it runs on here (as it was).
    let kept = |error: String| {
        MIGRATION_STOPPED.store(false, Ordering::SeqCst);
        Sent {
            answer: failed("kept", error, paused),
            paused,
            moved: false,
        }
    };
    let _ = link.set_write_timeout(Some(Duration::from_secs(60)));
    let header = format!(
        "{MAGIC} boot={} mode={} memory_mib={} vcpus={}\n",
        hex::encode(boot_id),
        mode.as_str(),
        own_arg("--memory-mib"),
        own_arg("--vcpus")
    );
    if let Err(e) = link.write_all(header.as_bytes()) {
        return kept(format!("migration stream: write the header: {e}"));
    }
    let started = Instant::now();
    let (mut rounds, mut sent) = (Vec::new(), 0usize);
    for (i, &pages) in plan.iter().enumerate() {
        let record = i as u32;
        let t = Instant::now();
        if let Err(e) = write_pages(&mut link, record, pages) {
            return kept(format!("migration stream: write round {record}: {e}"));
        }
        sent += pages * PAGE;
        let dirty = plan.get(i + 1).copied().unwrap_or(2);
        let info = round_info(record, pages, t.elapsed(), dirty);
        let _ =
            progress.write_all(format!("{}\n", serde_json::json!({"progress": &info})).as_bytes());
        rounds.push(info);
        if mode.slow() {
            std::thread::sleep(SLOW_ROUND_GAP);
        }
    }
    // The switch-over: the VM stops, its last pages go, then DONE.
    MIGRATION_STOPPED.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    let final_record = plan.len() as u32;
    let final_pages = 2;
    if let Err(e) = write_pages(&mut link, final_record, final_pages) {
        return kept(format!("migration stream: write the final pages: {e}"));
    }
    sent += final_pages * PAGE;
    let done = format!("DONE {} {sent}\n", plan.len() + 1);
    if let Err(e) = link.write_all(done.as_bytes()) {
        return kept(format!("migration stream: write DONE: {e}"));
    }
    let _ = link.set_read_timeout(Some(ANSWER_TIMEOUT));
    let mut answer = String::new();
    let read = BufReader::new(&link).read_line(&mut answer);
    let answer = answer.trim_end();
    if answer == "RESUMED" {
        let downtime_ms = stopped.elapsed().as_secs_f64() * 1e3;
        if mode == MigrationMode::LateAnswer {
            let _ = std::fs::write(vm_dir.join(SWITCHED_FILE), b"");
            std::thread::sleep(LATE_ANSWER);
        }
        eprintln!(
            "fake vmm: migrated in {:.0} ms: the target runs the VM",
            started.elapsed().as_secs_f64() * 1e3
        );
        return Sent {
            answer: serde_json::json!({"ok": true, "state": "paused", "migration": {
                "outcome": "moved", "rounds": rounds, "final_pages": final_pages,
                "downtime_ms": downtime_ms}}),
            paused: true,
            moved: true,
        };
    }
    if let Some(why) = answer.strip_prefix("REFUSED ") {
        return kept(format!("the target refused the VM: {why}"));
    }
    // The state went out and no answer came: the target may run it. Stay stopped.
    let why = match read {
        Err(e) => format!("no answer from the target within {ANSWER_TIMEOUT:?}: {e}"),
        Ok(_) if answer.is_empty() => "the link closed before the target's answer".to_owned(),
        Ok(_) => format!("the target answered {answer:?}"),
    };
    eprintln!("fake vmm: migration outcome unknown: {why}");
    Sent {
        answer: failed("unknown", why, true),
        paused: true,
        moved: false,
    }
}

/// One `PAGES` record of `pages` pages.
fn write_pages(link: &mut UnixStream, record: u32, pages: usize) -> std::io::Result<()> {
    let len = pages * PAGE;
    let mut bytes = format!("PAGES {record} {len}\n").into_bytes();
    bytes.extend((0..len).map(|at| pattern(record, at)));
    link.write_all(&bytes)
}

/// The target's side of `--migrate-from SOCKET`, for the VM in `vm_dir`: connects to `socket`,
/// receives the fake stream and checks it (the guest size in its header against this VMM's
/// `--memory-mib` and `--vcpus`, every byte, the counts), serves the control socket
/// ([`super::serve_control`]), answers `RESUMED`, and returns the guest's boot id, which its
/// sidecar keeps.
///
/// A stream that breaks or does not check ends this VMM as the real one ends when its
/// migration fails: a `REFUSED` answer if it can, a line on stderr, exit 1, no `exit.json`. The
/// modes `target-dies` and `no-answer` act out a target that fails.
pub fn migrate_in(socket: &Path, vm_dir: &Path) -> [u8; 16] {
    let link = super::connect_retrying(socket);
    let _ = link.set_read_timeout(Some(Duration::from_secs(60)));
    let mut reader = BufReader::new(&link);
    let answer = |text: &str| {
        let _ = (&link).write_all(format!("{text}\n").as_bytes());
    };
    let die = |why: &str| -> ! {
        eprintln!("nanoclaw-vmm: error: migration: {why}");
        std::process::exit(1);
    };
    let line = |reader: &mut BufReader<&UnixStream>| -> String {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => die("the stream ended before DONE"),
            Ok(_) => line.trim_end().to_owned(),
            Err(e) => die(&format!("read the stream: {e}")),
        }
    };
    let header = line(&mut reader);
    let fields: std::collections::HashMap<&str, &str> = header
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.split_once('='))
        .collect();
    let boot_id: Option<[u8; 16]> = fields
        .get("boot")
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok());
    let mode = fields.get("mode").and_then(|m| MigrationMode::parse(m));
    let (Some(boot_id), Some(mode), true) = (boot_id, mode, header.starts_with(MAGIC)) else {
        answer("REFUSED not a fake migration stream");
        die(&format!("not a fake migration stream: {header:?}"));
    };
    for (field, arg) in [("memory_mib", "--memory-mib"), ("vcpus", "--vcpus")] {
        let (theirs, ours) = (fields.get(field).copied().unwrap_or(""), own_arg(arg));
        if theirs != ours {
            let why = format!("the source's {field} is {theirs}, this VMM's {arg} {ours}");
            answer(&format!("REFUSED {why}"));
            die(&why);
        }
    }
    let (mut records, mut received) = (0u32, 0usize);
    loop {
        let line = line(&mut reader);
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["PAGES", record, len] => {
                let (Ok(record), Ok(len)) = (record.parse::<u32>(), len.parse::<usize>()) else {
                    die(&format!("bad record {line:?}"));
                };
                let mut pages = vec![0u8; len];
                if let Err(e) = reader.read_exact(&mut pages) {
                    die(&format!("read record {record}: {e}"));
                }
                if record != records
                    || pages
                        .iter()
                        .enumerate()
                        .any(|(at, &b)| b != pattern(record, at))
                {
                    answer(&format!("REFUSED record {record} is not what was sent"));
                    die(&format!(
                        "record {record} (the {records}th) is not what was sent"
                    ));
                }
                records += 1;
                received += len;
                if mode == MigrationMode::TargetDies {
                    die("the target dies mid-copy (mode target-dies)");
                }
            }
            ["DONE", n, bytes] => {
                if *n != records.to_string() || *bytes != received.to_string() {
                    let why = format!(
                        "DONE says {n} records of {bytes} bytes; {records} of {received} came"
                    );
                    answer(&format!("REFUSED {why}"));
                    die(&why);
                }
                break;
            }
            _ => die(&format!("bad record {line:?}")),
        }
    }
    if mode == MigrationMode::NoAnswer {
        // Holds the link open, silent, as a target that hangs.
        std::thread::sleep(SILENT_FOR);
        die("no answer given (mode no-answer)");
    }
    super::serve_control(vm_dir, boot_id, false);
    answer("RESUMED");
    drop(reader);
    drop(link);
    boot_id
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// Asks the fake VMM serving `vm_dir` to migrate into `migrate.sock` there; the control
    /// connection and the source's end of the stream.
    fn request_migration(vm_dir: &Path, max_rounds: u32) -> (UnixStream, UnixStream) {
        let listener = UnixListener::bind(vm_dir.join("migrate.sock")).unwrap();
        let mut control = UnixStream::connect(vm_dir.join("control.sock")).unwrap();
        writeln!(
            control,
            r#"{{"op":"migrate","socket":"migrate.sock","max_rounds":{max_rounds}}}"#
        )
        .unwrap();
        (control, listener.accept().unwrap().0)
    }

    /// Every line to the end, as JSON.
    fn read_lines(control: UnixStream) -> Vec<serde_json::Value> {
        BufReader::new(control)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect()
    }

    /// The fake source and the fake target, relayed as the daemons would: the guest moves, the
    /// rounds are reported, and the source refuses all but `state` afterwards.
    #[test]
    fn a_fake_source_moves_its_guest_to_a_fake_target() {
        let (source, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let boot_id = [9u8; 16];
        super::super::serve_control(source.path(), boot_id, false);
        let (control, source_link) = request_migration(source.path(), 1);
        let target_in = UnixListener::bind(target.path().join("in.sock")).unwrap();
        let target_dir = target.path().to_owned();
        let received =
            std::thread::spawn(move || migrate_in(&target_dir.join("in.sock"), &target_dir));
        let (target_link, _) = target_in.accept().unwrap();
        let relay = |mut from: UnixStream, to: UnixStream| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut &to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        relay(
            source_link.try_clone().unwrap(),
            target_link.try_clone().unwrap(),
        );
        relay(target_link, source_link);
        assert_eq!(received.join().unwrap(), boot_id);
        let lines = read_lines(control);
        let rounds: Vec<u64> = lines[..2]
            .iter()
            .map(|l| l["progress"]["round"].as_u64().unwrap())
            .collect();
        assert_eq!(rounds, [0, 1]);
        let answer = &lines[2];
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["migration"]["outcome"], "moved");
        assert_eq!(answer["migration"]["final_pages"], 2);
        assert!(target.path().join("control.sock").exists());
        let mut again = UnixStream::connect(source.path().join("control.sock")).unwrap();
        writeln!(again, r#"{{"op":"resume"}}"#).unwrap();
        assert_eq!(
            read_lines(again)[0]["error"],
            "the VM has moved to another host"
        );
    }

    /// A slow migration whose socket is closed after the first round ends `kept`, running.
    #[test]
    fn closing_the_socket_mid_copy_keeps_the_fake_guest_running() {
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join(MIGRATION_MODE_FILE), "slow").unwrap();
        super::super::serve_control(source.path(), [3; 16], false);
        let (control, link) = request_migration(source.path(), 30);
        let mut reader = BufReader::new(&link);
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        assert!(header.starts_with("NCFAKEMIG1 boot=0303"), "{header}");
        assert!(header.contains(" mode=slow "), "{header}");
        drop(reader);
        drop(link);
        let lines = read_lines(control);
        let answer = lines.last().unwrap();
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["state"], "running");
        assert_eq!(answer["migration"]["outcome"], "kept");
        assert!(lines.len() < 10, "{lines:?}");
    }
}
