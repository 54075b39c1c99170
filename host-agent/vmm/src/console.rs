//! The guest console sink: where the serial port's bytes go.
//!
//! It does three things with the guest's output:
//! - writes it to the console file (or stdout), whole lines at a time;
//! - stops writing after a byte cap, counting what it drops and saying so once, so a guest cannot
//!   fill the host's disk;
//! - watches the stream, cap or no cap, for the kernel lines that tell how the guest ended (a
//!   panic, a power-off or halt without ACPI) and reports each kind once.

use std::io::Write;

/// A guest lifecycle event recognised on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `Kernel panic - not syncing`.
    Panic,
    /// `reboot: Power down` or `reboot: System halted`.
    PowerOff,
}

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
const POWER_OFF_MARKERS: [&[u8]; 2] = [b"reboot: Power down", b"reboot: System halted"];
/// Longest line kept for matching; the markers sit near the start of their lines.
const MAX_LINE: usize = 512;
/// Pending output is written out at a newline or when it reaches this size.
const FLUSH_THRESHOLD: usize = 4096;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Classifies one console line.
pub fn classify_line(line: &[u8]) -> Option<ConsoleEvent> {
    if contains(line, PANIC_MARKER) {
        Some(ConsoleEvent::Panic)
    } else if POWER_OFF_MARKERS.iter().any(|m| contains(line, m)) {
        Some(ConsoleEvent::PowerOff)
    } else {
        None
    }
}

/// The serial port's output sink. Its [`Write::flush`] does nothing (the UART flushes after every
/// byte); call [`ConsoleSink::finish`] at the end.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    cap: u64,
    written: u64,
    dropped: u64,
    write_errors: u64,
    pending: Vec<u8>,
    line: Vec<u8>,
    seen_panic: bool,
    seen_power_off: bool,
    on_event: Box<dyn FnMut(ConsoleEvent) + Send>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("cap", &self.cap)
            .field("written", &self.written)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// A sink writing at most `cap` guest bytes to `out` and reporting events to `on_event`.
    pub fn new(
        out: Box<dyn Write + Send>,
        cap: u64,
        on_event: Box<dyn FnMut(ConsoleEvent) + Send>,
    ) -> Self {
        Self {
            out,
            cap,
            written: 0,
            dropped: 0,
            write_errors: 0,
            pending: Vec::new(),
            line: Vec::new(),
            seen_panic: false,
            seen_power_off: false,
            on_event,
        }
    }

    /// Guest bytes dropped because of the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Guest bytes written out (or pending).
    pub fn written(&self) -> u64 {
        self.written
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            let event = classify_line(&self.line);
            self.line.clear();
            match event {
                Some(ConsoleEvent::Panic) if !self.seen_panic => {
                    self.seen_panic = true;
                    (self.on_event)(ConsoleEvent::Panic);
                }
                Some(ConsoleEvent::PowerOff) if !self.seen_power_off => {
                    self.seen_power_off = true;
                    (self.on_event)(ConsoleEvent::PowerOff);
                }
                _ => {}
            }
        } else if self.line.len() < MAX_LINE {
            self.line.push(byte);
        }
    }

    fn emit_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        self.pending.clear();
        if result.is_err() {
            self.write_errors += 1;
            if self.write_errors == 1 {
                tracing::warn!("writing guest console output failed; further failures are counted");
            }
        }
    }

    /// Writes out what is pending and, if the cap dropped anything, a closing note with the count.
    pub fn finish(&mut self) {
        self.emit_pending();
        if self.dropped > 0 {
            let note = format!(
                "\n[nanoclaw-vmm: {} console bytes dropped over the {}-byte cap]\n",
                self.dropped, self.cap
            );
            self.pending.extend_from_slice(note.as_bytes());
            self.emit_pending();
            tracing::info!(
                dropped = self.dropped,
                cap = self.cap,
                "guest console output was capped"
            );
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        let room = self.cap.saturating_sub(self.written);
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.pending.extend_from_slice(&buf[..take]);
        self.written += take as u64;
        if take < buf.len() {
            if self.dropped == 0 {
                tracing::warn!(
                    cap = self.cap,
                    "console byte cap reached; dropping further guest output"
                );
                self.pending.extend_from_slice(
                    format!("\n[nanoclaw-vmm: console cap of {} bytes reached; dropping further output]\n", self.cap)
                        .as_bytes(),
                );
            }
            self.dropped += (buf.len() - take) as u64;
        }
        if self.pending.len() >= FLUSH_THRESHOLD || self.pending.last() == Some(&b'\n') {
            self.emit_pending();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn sink(cap: u64) -> (ConsoleSink, Shared, Arc<Mutex<Vec<ConsoleEvent>>>) {
        let out = Shared::default();
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let s = ConsoleSink::new(
            Box::new(out.clone()),
            cap,
            Box::new(move |ev| e.lock().unwrap().push(ev)),
        );
        (s, out, events)
    }

    fn feed(s: &mut ConsoleSink, text: &[u8]) {
        // The UART writes one byte at a time.
        for b in text {
            s.write_all(std::slice::from_ref(b)).unwrap();
        }
    }

    #[test]
    fn writes_whole_lines_until_the_cap_then_counts_drops_and_notes_once() {
        let (mut s, out, _) = sink(10);
        feed(&mut s, b"hello");
        assert!(out.0.lock().unwrap().is_empty(), "line not complete yet");
        feed(&mut s, b"\nworld, this is long\nmore\n");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("hello\nworl\n[nanoclaw-vmm: console cap of 10 bytes reached"));
        assert_eq!(text.matches("cap of 10 bytes reached").count(), 1);
        assert_eq!(s.written(), 10);
        assert_eq!(s.dropped(), 31 - 10);
        s.finish();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with("[nanoclaw-vmm: 21 console bytes dropped over the 10-byte cap]\n"));
    }

    #[test]
    fn detects_panic_and_power_off_even_past_the_cap() {
        let (mut s, _, events) = sink(4);
        feed(
            &mut s,
            b"[    1.0] Kernel panic - not syncing: Attempted to kill init!\n",
        );
        feed(
            &mut s,
            b"[    1.1] ---[ end Kernel panic - not syncing: Attempted ]---\n",
        );
        feed(&mut s, b"[    2.0] reboot: Power down\n");
        feed(&mut s, b"[    2.0] reboot: System halted\n");
        assert_eq!(
            *events.lock().unwrap(),
            vec![ConsoleEvent::Panic, ConsoleEvent::PowerOff]
        );
    }

    #[test]
    fn classifies_lines() {
        assert_eq!(
            classify_line(b"reboot: System halted"),
            Some(ConsoleEvent::PowerOff)
        );
        assert_eq!(classify_line(b"reboot: Restarting system"), None);
        assert_eq!(classify_line(b"Kernel panic"), None);
        let long = [b'x'; 2 * MAX_LINE];
        assert_eq!(classify_line(&long), None);
    }

    #[test]
    fn flush_is_deferred_to_finish() {
        let (mut s, out, _) = sink(100);
        feed(&mut s, b"no newline");
        s.flush().unwrap();
        assert!(out.0.lock().unwrap().is_empty());
        s.finish();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"no newline");
    }
}
