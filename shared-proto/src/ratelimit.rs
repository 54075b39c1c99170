//! A budget for log lines that guest behaviour can trigger (the daemon keeps one per VM, the
//! device one per kind of line).
//!
//! A hostile guest can make the host reject its messages as fast as it can connect. Each VM gets
//! [`LogBudget::PER_WINDOW`] such lines per [`LogBudget::WINDOW`]; the rest are counted, and the
//! first line of the next window reports how many were suppressed.

use std::time::{Duration, Instant};

/// The state of one VM's log budget.
#[derive(Debug)]
pub struct LogBudget {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBudget {
    /// Lines allowed per window.
    pub const PER_WINDOW: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// A full budget.
    pub fn new() -> Self {
        Self {
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Asks to log one line at `now`. `Some(n)` means log it, and mention that `n` earlier lines
    /// were suppressed (when `n > 0`); `None` means drop it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < Self::PER_WINDOW {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_a_window_then_reports_the_suppressed() {
        let mut b = LogBudget::new();
        let t0 = Instant::now();
        for _ in 0..LogBudget::PER_WINDOW {
            assert_eq!(b.admit(t0), Some(0));
        }
        assert_eq!(b.admit(t0), None);
        assert_eq!(b.admit(t0 + Duration::from_secs(59)), None);
        assert_eq!(b.admit(t0 + LogBudget::WINDOW), Some(2));
        assert_eq!(b.admit(t0 + LogBudget::WINDOW), Some(0));
    }
}
