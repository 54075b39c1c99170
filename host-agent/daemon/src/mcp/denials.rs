//! Summaries of one VM's repeated denials.
//!
//! An agent that retries a call its profile denies (a loop, a confused model, a probe) would
//! otherwise write one `policy_decision` record, with its sync, per attempt. Instead, per
//! gateway (one VM) and per (tool, rule):
//!
//! - the first denial of a window of [`WINDOW`] is recorded in full, as every decision is,
//!   before the agent gets its answer;
//! - the same denial again within that window is only counted;
//! - once the window is over, the count goes into one `denial_summary` record (agent, VM,
//!   profile, tool, rule, `repeats`, and the window's first and last denial times), written
//!   before the next call of that VM goes on, or when the gateway is dropped.
//!
//! Only a policy's plain deny is summarised: allowed calls, approvals and denials after an
//! approval are recorded one by one as before, so no action ever runs unrecorded (a denial is
//! not an action). What a summary gives up: the argument digests of the counted repeats, and,
//! if the daemon dies before the window's summary is written, their count (the first denial of
//! the window is on disk regardless). At most [`MAX_WINDOWS`] (tool, rule) pairs are counted at
//! once; a denial beyond that is recorded in full, so a guest cannot grow this map.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanoclaw_audit::AuditLog;
use serde_json::{Value, json};

/// How long the repeats of a denial are counted before their summary is written.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The most (tool, rule) pairs counted at once.
pub const MAX_WINDOWS: usize = 64;

/// The kind of a summary record.
pub const SUMMARY_KIND: &str = "denial_summary";

#[derive(Debug)]
struct Window {
    opened: Instant,
    first_unix_ms: u64,
    last_unix_ms: u64,
    repeats: u64,
}

/// What to do with one denial.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Note {
    /// Record it in full.
    Record,
    /// Counted in its window: no record now.
    Counted,
}

/// The open windows of one gateway, and where their summaries go.
#[derive(Debug)]
pub(super) struct Denials {
    audit: Arc<AuditLog>,
    /// Agent, VM and profile, in every summary.
    who: [(&'static str, String); 3],
    windows: Mutex<HashMap<(String, String), Window>>,
}

impl Denials {
    pub(super) fn new(audit: Arc<AuditLog>, agent: &str, vm_id: &str, profile: &str) -> Self {
        Self {
            audit,
            who: [
                ("agent", agent.to_owned()),
                ("vm_id", vm_id.to_owned()),
                ("profile", profile.to_owned()),
            ],
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Notes a denial of `tool` under `rule` at `now`.
    pub(super) fn note(&self, tool: &str, rule: &str, now: Instant) -> Note {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tool.to_owned(), rule.to_owned());
        if let Some(w) = windows.get_mut(&key)
            && now.duration_since(w.opened) < WINDOW
        {
            w.repeats += 1;
            w.last_unix_ms = now_unix_ms();
            return Note::Counted;
        }
        // An expired window of this pair has been taken by `take_expired` before the call, or
        // holds no repeats (a concurrent call may just have let it expire): start afresh.
        let expired = windows.remove(&key);
        if let Some(w) = expired.filter(|w| w.repeats > 0) {
            // Written with the next batch; the caller awaits its own record after it.
            drop(self.audit.submit(SUMMARY_KIND, self.summary(&key, &w)));
        }
        if windows.len() < MAX_WINDOWS {
            let ms = now_unix_ms();
            windows.insert(
                key,
                Window {
                    opened: now,
                    first_unix_ms: ms,
                    last_unix_ms: ms,
                    repeats: 0,
                },
            );
        }
        Note::Record
    }

    /// Takes the windows over at `now` and returns the summary records of those with repeats.
    pub(super) fn take_expired(&self, now: Instant) -> Vec<Value> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.is_empty() {
            return Vec::new();
        }
        let over: Vec<_> = windows
            .iter()
            .filter(|(_, w)| now.duration_since(w.opened) >= WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        over.into_iter()
            .filter_map(|k| windows.remove(&k).map(|w| (k, w)))
            .filter(|(_, w)| w.repeats > 0)
            .map(|(k, w)| self.summary(&k, &w))
            .collect()
    }

    fn summary(&self, (tool, rule): &(String, String), w: &Window) -> Value {
        let mut data = json!({
            "decision": "deny",
            "tool": tool,
            "rule": rule,
            "repeats": w.repeats,
            "first_unix_ms": w.first_unix_ms,
            "last_unix_ms": w.last_unix_ms,
            "window_ms": WINDOW.as_millis() as u64,
        });
        for (k, v) in &self.who {
            data[*k] = Value::String(v.clone());
        }
        data
    }
}

impl Drop for Denials {
    /// Queues the summaries of every open window (the audit log writes what is queued even if
    /// it is dropped right after).
    fn drop(&mut self) {
        let windows = std::mem::take(self.windows.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (k, w) in windows {
            if w.repeats > 0 {
                drop(self.audit.submit(SUMMARY_KIND, self.summary(&k, &w)));
            }
        }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denials(dir: &std::path::Path) -> (Arc<AuditLog>, Denials) {
        let audit = Arc::new(AuditLog::open(dir.join("audit.ndjson")).unwrap());
        let d = Denials::new(Arc::clone(&audit), "a", "vm", "p");
        (audit, d)
    }

    fn kinds(dir: &std::path::Path) -> Vec<(String, Value)> {
        nanoclaw_audit::tail(&dir.join("audit.ndjson"), 100)
            .unwrap()
            .into_iter()
            .map(|r| (r.record.kind, r.record.data))
            .collect()
    }

    #[test]
    fn repeats_within_a_window_are_counted_and_summarised_once_it_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, d) = denials(dir.path());
        let t0 = Instant::now();
        assert_eq!(d.note("rm", "deny-rm", t0), Note::Record);
        for i in 1..=5 {
            assert_eq!(
                d.note("rm", "deny-rm", t0 + Duration::from_secs(i)),
                Note::Counted
            );
        }
        // Another tool, or the same tool under another rule, has its own window.
        assert_eq!(d.note("cp", "deny-rm", t0), Note::Record);
        assert_eq!(d.note("rm", "default-deny", t0), Note::Record);
        assert!(d.take_expired(t0 + WINDOW / 2).is_empty());
        let over = d.take_expired(t0 + WINDOW);
        assert_eq!(over.len(), 1, "only the window with repeats: {over:?}");
        assert_eq!(over[0]["repeats"], 5);
        assert_eq!(over[0]["tool"], "rm");
        assert_eq!(over[0]["rule"], "deny-rm");
        assert_eq!(over[0]["vm_id"], "vm");
        // A new window opens with a full record.
        assert_eq!(d.note("rm", "deny-rm", t0 + WINDOW), Note::Record);
        drop((audit, d));
    }

    #[test]
    fn a_window_over_at_the_next_denial_is_summarised_then() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, d) = denials(dir.path());
        let t0 = Instant::now();
        assert_eq!(d.note("rm", "r", t0), Note::Record);
        assert_eq!(d.note("rm", "r", t0), Note::Counted);
        assert_eq!(d.note("rm", "r", t0 + WINDOW), Note::Record);
        drop(d);
        drop(audit);
        let records = kinds(dir.path());
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].0, SUMMARY_KIND);
        assert_eq!(records[0].1["repeats"], 1);
    }

    #[test]
    fn open_windows_are_summarised_when_the_gateway_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, d) = denials(dir.path());
        let t0 = Instant::now();
        d.note("rm", "r", t0);
        d.note("rm", "r", t0);
        d.note("rm", "r", t0);
        d.note("ls", "r", t0);
        drop(d);
        drop(audit);
        let records = kinds(dir.path());
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].1["repeats"], 2);
        assert_eq!(records[0].1["tool"], "rm");
    }

    #[test]
    fn past_the_window_limit_denials_are_recorded_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let (_audit, d) = denials(dir.path());
        let t0 = Instant::now();
        for i in 0..MAX_WINDOWS {
            assert_eq!(d.note(&format!("t{i}"), "r", t0), Note::Record);
        }
        assert_eq!(d.note("one-more", "r", t0), Note::Record);
        assert_eq!(d.note("one-more", "r", t0), Note::Record);
        assert_eq!(d.note("t0", "r", t0), Note::Counted);
    }
}
