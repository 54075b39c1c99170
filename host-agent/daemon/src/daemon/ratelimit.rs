//! Rate limits on what a guest can make the host do.
//!
//! - [`LogBudget`]: the budget for log lines that guest behaviour can trigger; it lives in
//!   `shared-proto` so that the device uses the same one.
//! - [`TokenBucket`]: a burst, then one event per interval; the daemon uses one per
//!   orchestrator VM to pace its `spawn_agent` calls.

use std::time::{Duration, Instant};

pub use shared_proto::ratelimit::LogBudget;

/// A token bucket: up to `burst` events at once, then one more per `interval`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: u32,
    interval: Duration,
    tokens: u32,
    /// When the next token starts to accrue (`None` until the first event).
    since: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least one), refilled one per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        let burst = burst.max(1);
        Self {
            burst,
            interval,
            tokens: burst,
            since: None,
        }
    }

    /// Takes one token at `now`: `Ok` when there was one, else `Err(wait)`, how long until the
    /// next one.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let since = *self.since.get_or_insert(now);
        if self.interval.is_zero() {
            self.tokens = self.burst;
        } else if self.tokens < self.burst {
            let elapsed = now.saturating_duration_since(since);
            let earned = elapsed.as_nanos() / self.interval.as_nanos();
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            if earned > 0 {
                self.tokens = self.tokens.saturating_add(earned).min(self.burst);
                // A full bucket accrues nothing more; a partial one keeps the part earned.
                self.since = Some(match self.tokens == self.burst {
                    true => now,
                    false => since + self.interval * earned,
                });
            }
        }
        if self.tokens == 0 {
            let next = self.since.unwrap_or(now) + self.interval;
            return Err(next.saturating_duration_since(now));
        }
        if self.tokens == self.burst {
            // Refill starts from the first token taken out of a full bucket.
            self.since = Some(now);
        }
        self.tokens -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_interval() {
        let every = Duration::from_secs(5);
        let mut b = TokenBucket::new(4, every);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(b.take(t0), Ok(()));
        }
        assert_eq!(b.take(t0), Err(every));
        assert_eq!(
            b.take(t0 + Duration::from_secs(2)),
            Err(Duration::from_secs(3))
        );
        assert_eq!(b.take(t0 + every), Ok(()));
        assert_eq!(b.take(t0 + every), Err(every));
        // Idle time refills up to the burst, never beyond it.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..4 {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
        // Two intervals and a bit earn two tokens; the bit carries over.
        let t1 = later + every * 2 + Duration::from_secs(1);
        assert_eq!(b.take(t1), Ok(()));
        assert_eq!(b.take(t1), Ok(()));
        assert_eq!(b.take(t1), Err(Duration::from_secs(4)));
    }
}
