//! A minimal `tracing` subscriber that writes one short line per event to the console.
//!
//! The guest's console is its serial port, slow and read by the host, so lines are plain text,
//! capped at [`MAX_LINE`] bytes, with no spans, colours or timestamps (the host stamps them).
//! It replaces `tracing-subscriber`, whose formatting machinery would grow the static binary.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The longest line written, in bytes, before the newline.
pub const MAX_LINE: usize = 240;

/// Writes events at or above a level to a writer, one line each.
pub struct ConsoleLog {
    out: Mutex<Box<dyn Write + Send>>,
    max_level: Level,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLog")
            .field("max_level", &self.max_level)
            .finish_non_exhaustive()
    }
}

impl ConsoleLog {
    /// A subscriber writing events up to `max_level` (inclusive) to `out`.
    pub fn new(out: Box<dyn Write + Send>, max_level: Level) -> Self {
        Self {
            out: Mutex::new(out),
            max_level,
        }
    }

    /// Formats one event as a line, without the newline.
    fn format(event: &Event<'_>) -> String {
        let mut line = format!("vpod-sidecar {}:", event.metadata().level());
        event.record(&mut LineVisitor(&mut line));
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        line
    }
}

struct LineVisitor<'a>(&'a mut String);

impl Visit for LineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for ConsoleLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max_level
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::from_level(
            self.max_level,
        ))
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Self::format(event);
        line.push('\n');
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A console that cannot be written to has nowhere to report that.
        let _ = out.write_all(line.as_bytes());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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

    #[test]
    fn writes_short_lines_at_or_above_the_level() {
        let buf = Shared::default();
        let log = ConsoleLog::new(Box::new(buf.clone()), Level::INFO);
        tracing::subscriber::with_default(log, || {
            tracing::info!(port = 5u32, "hello");
            tracing::debug!("hidden");
            tracing::warn!(reason = "x".repeat(1000), "long");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], "vpod-sidecar INFO: hello port=5");
        assert!(lines[1].starts_with("vpod-sidecar WARN: long reason="));
        assert!(lines[1].len() <= MAX_LINE + '…'.len_utf8());
    }
}
