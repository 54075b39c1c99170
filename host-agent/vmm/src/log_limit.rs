//! Per-callsite rate limiting of every log line the VMM writes, the dependencies' included.
//!
//! Device code rate-limits the lines it knows a guest can trigger
//! ([`RateLimitedLog`](crate::devices::virtio::RateLimitedLog)), but the rust-vmm crates log
//! through the `log` crate on their own (virtio-queue writes an error for each bad available
//! index or descriptor table read), and those reach our subscriber through `tracing-log`. So
//! the layer that writes lines is wrapped in [`RateLimited`]: each log site gets a token bucket
//! of [`BURST`] lines, refilled by one line per [`REFILL_INTERVAL`]. When a line passes after
//! others from its site were suppressed, a WARN line from target [`REPORT_TARGET`] with
//! `suppressed=N` and the site comes first.
//!
//! A site is a `tracing` callsite. Events from the `log` crate all share one callsite per
//! level, so for them the site is the record's target, file and line (the `log.target`,
//! `log.file` and `log.line` fields `tracing-log` gives them). At most [`MAX_SITES`] sites get
//! their own bucket; past that (not expected: sites are lines of code) they share one.
//!
//! The clock is injected ([`Clock`]) so the tests step time instead of sleeping.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::{Callsite, Identifier};
use tracing::field::{Field, FieldSet, Value, Visit};
use tracing::metadata::{Kind, LevelFilter};
use tracing::span;
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Dispatch, Event, Level, Metadata};
use tracing_subscriber::layer::{Context, Layer};

/// Lines a site may write at once.
pub const BURST: u32 = 10;
/// One more line is allowed per this interval, up to [`BURST`].
pub const REFILL_INTERVAL: Duration = Duration::from_secs(1);
/// Most sites with a bucket of their own.
pub const MAX_SITES: usize = 4096;
/// Target of the "lines suppressed" report.
pub const REPORT_TARGET: &str = "nanoclaw_vmm::log_limit";

/// Where the limiter reads the time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What a bucket decided for one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write the line; `suppressed` lines of the same site were dropped since the last one
    /// written.
    Pass {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop the line.
    Suppress,
}

/// A token bucket: [`BURST`] tokens, one more per [`REFILL_INTERVAL`].
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: u32,
    last_refill: Instant,
    suppressed: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            last_refill: now,
            suppressed: 0,
        }
    }

    /// Takes a token for a line at `now`, if there is one.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let periods = elapsed.as_nanos() / REFILL_INTERVAL.as_nanos();
        if periods >= u128::from(BURST - self.tokens) {
            self.tokens = BURST;
            self.last_refill = now;
        } else if periods > 0 {
            // Less than BURST periods: fits a u32. Keep the part of a period already elapsed.
            let periods = periods as u32;
            self.tokens += periods;
            self.last_refill += REFILL_INTERVAL * periods;
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return Verdict::Suppress;
        }
        self.tokens -= 1;
        Verdict::Pass {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }
}

/// What identifies a log site.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SiteKey {
    /// A `tracing` callsite.
    Callsite(Identifier),
    /// A `log` record's target, file and line, hashed.
    Log(u64),
    /// Every site past [`MAX_SITES`].
    Overflow,
}

#[derive(Debug)]
struct Site {
    bucket: TokenBucket,
    name: String,
}

/// Whether `meta` is the callsite `tracing-log` uses for `log` records.
fn is_log_record(meta: &Metadata<'_>) -> bool {
    meta.fields().field("log.line").is_some()
}

/// Hashes a `log` record's target, file and line fields.
struct LogSiteHasher(DefaultHasher);

impl Visit for LogSiteHasher {
    fn record_str(&mut self, field: &Field, value: &str) {
        if matches!(field.name(), "log.target" | "log.file") {
            (field.name(), value).hash(&mut self.0);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "log.line" {
            value.hash(&mut self.0);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

/// Spells a `log` record's site as `target file:line`.
#[derive(Default)]
struct LogSiteName {
    target: String,
    file: String,
    line: u64,
}

impl Visit for LogSiteName {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => self.target = value.to_owned(),
            "log.file" => self.file = value.to_owned(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "log.line" {
            self.line = value;
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

fn site_key(event: &Event<'_>) -> SiteKey {
    let meta = event.metadata();
    if is_log_record(meta) {
        let mut h = LogSiteHasher(DefaultHasher::new());
        event.record(&mut h);
        SiteKey::Log(h.0.finish())
    } else {
        SiteKey::Callsite(meta.callsite())
    }
}

fn site_name(event: &Event<'_>) -> String {
    let meta = event.metadata();
    if is_log_record(meta) {
        let mut n = LogSiteName::default();
        event.record(&mut n);
        return format!("{} {}:{}", n.target, n.file, n.line);
    }
    format!(
        "{} {}:{}",
        meta.target(),
        meta.file().unwrap_or("?"),
        meta.line().unwrap_or(0)
    )
}

/// The callsite of the "lines suppressed" report, which the limiter writes itself.
struct ReportCallsite;

static REPORT_CALLSITE: ReportCallsite = ReportCallsite;
static REPORT_META: Metadata<'static> = Metadata::new(
    "log lines suppressed",
    REPORT_TARGET,
    Level::WARN,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(
        &["message", "suppressed", "site"],
        Identifier(&REPORT_CALLSITE),
    ),
    Kind::EVENT,
);

impl Callsite for ReportCallsite {
    fn set_interest(&self, _interest: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        &REPORT_META
    }
}

/// Wraps the layer that writes log lines (normally `tracing_subscriber::fmt::layer()`) and
/// hands it at most [`BURST`] lines per site at once, then one per [`REFILL_INTERVAL`].
pub struct RateLimited<L, C = MonotonicClock> {
    inner: L,
    clock: C,
    sites: Mutex<HashMap<SiteKey, Site>>,
}

impl<L, C> std::fmt::Debug for RateLimited<L, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimited").finish_non_exhaustive()
    }
}

impl<L> RateLimited<L> {
    /// Rate-limits `inner` on the system clock.
    pub fn new(inner: L) -> Self {
        Self::with_clock(inner, MonotonicClock)
    }
}

impl<L, C: Clock> RateLimited<L, C> {
    /// Rate-limits `inner` on `clock`.
    pub fn with_clock(inner: L, clock: C) -> Self {
        Self {
            inner,
            clock,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for `event`; with lines to report, also returns its site's name.
    fn check(&self, event: &Event<'_>) -> (Verdict, Option<String>) {
        let now = self.clock.now();
        let mut key = site_key(event);
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        if !sites.contains_key(&key) && sites.len() >= MAX_SITES {
            key = SiteKey::Overflow;
        }
        let site = sites.entry(key).or_insert_with_key(|key| Site {
            bucket: TokenBucket::new(now),
            name: match key {
                SiteKey::Overflow => "(other sites)".to_owned(),
                _ => site_name(event),
            },
        });
        let verdict = site.bucket.check(now);
        let name = matches!(verdict, Verdict::Pass { suppressed } if suppressed > 0)
            .then(|| site.name.clone());
        (verdict, name)
    }

    /// Hands `inner` a WARN event saying that `suppressed` lines of `site` were dropped.
    fn report<S>(&self, suppressed: u64, site: &str, ctx: Context<'_, S>)
    where
        S: Subscriber,
        L: Layer<S>,
    {
        let fields = REPORT_META.fields();
        let (Some(message), Some(count), Some(at)) = (
            fields.field("message"),
            fields.field("suppressed"),
            fields.field("site"),
        ) else {
            return;
        };
        let text = "log lines suppressed";
        let values = [
            (&message, Some(&text as &dyn Value)),
            (&count, Some(&suppressed as &dyn Value)),
            (&at, Some(&site as &dyn Value)),
        ];
        let value_set = fields.value_set(&values);
        self.inner
            .on_event(&Event::new(&REPORT_META, &value_set), ctx);
    }
}

impl<S, L, C> Layer<S> for RateLimited<L, C>
where
    S: Subscriber,
    L: Layer<S>,
    C: Clock,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_new_span(attrs, id, ctx);
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }

    fn on_record(&self, span: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.inner.on_record(span, values, ctx);
    }

    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_follows_from(span, follows, ctx);
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        match self.check(event) {
            (Verdict::Suppress, _) => {}
            (Verdict::Pass { suppressed }, Some(site)) => {
                self.report(suppressed, &site, ctx.clone());
                self.inner.on_event(event, ctx);
            }
            (Verdict::Pass { .. }, None) => self.inner.on_event(event, ctx),
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn bucket_passes_a_burst_then_one_per_interval_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0);
        for _ in 0..BURST {
            assert_eq!(b.check(t0), Verdict::Pass { suppressed: 0 });
        }
        for _ in 0..90 {
            assert_eq!(b.check(t0), Verdict::Suppress);
        }
        // Just under one interval: still nothing.
        let almost = t0 + REFILL_INTERVAL - Duration::from_millis(1);
        assert_eq!(b.check(almost), Verdict::Suppress);
        // One interval: one line, which carries the count of the 91 dropped.
        let t1 = t0 + REFILL_INTERVAL;
        assert_eq!(b.check(t1), Verdict::Pass { suppressed: 91 });
        assert_eq!(b.check(t1), Verdict::Suppress);
        // 2.5 intervals later: two tokens, and the half interval is kept for the third.
        let t2 = t1 + REFILL_INTERVAL * 5 / 2;
        assert_eq!(b.check(t2), Verdict::Pass { suppressed: 1 });
        assert_eq!(b.check(t2), Verdict::Pass { suppressed: 0 });
        assert_eq!(b.check(t2), Verdict::Suppress);
        assert_eq!(
            b.check(t2 + REFILL_INTERVAL / 2),
            Verdict::Pass { suppressed: 1 }
        );
        // A long quiet spell refills to BURST, no more.
        let t3 = t2 + REFILL_INTERVAL * 1000;
        let passed = (0..100)
            .filter(|_| matches!(b.check(t3), Verdict::Pass { .. }))
            .count();
        assert_eq!(passed, BURST as usize);
        // A clock that goes backwards refills nothing.
        assert_eq!(b.check(t0), Verdict::Suppress);
    }

    /// A clock the test moves.
    #[derive(Clone)]
    struct ManualClock(Arc<Mutex<Instant>>);

    impl ManualClock {
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    /// Records each event it is handed as `target field=value ...`.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", field.name(), value));
        }
    }

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let mut line = Line(event.metadata().target().to_owned());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
    }

    fn setup() -> (Capture, ManualClock, impl Subscriber) {
        let capture = Capture::default();
        let clock = ManualClock(Arc::new(Mutex::new(Instant::now())));
        let subscriber = tracing_subscriber::registry()
            .with(RateLimited::with_clock(capture.clone(), clock.clone()));
        (capture, clock, subscriber)
    }

    fn flood(n: usize) {
        for i in 0..n {
            tracing::warn!(i, "flood");
        }
    }

    #[test]
    fn a_flood_from_one_site_is_cut_to_the_burst_and_reported() {
        let (capture, clock, subscriber) = setup();
        tracing::subscriber::with_default(subscriber, || {
            flood(1000);
            // Another site is not affected by the first one's flood.
            tracing::warn!("elsewhere");
            clock.advance(REFILL_INTERVAL);
            flood(1000);
        });
        let lines = capture.0.lock().unwrap();
        // 10 + 1 from the first site's two floods, the other site, and one report.
        assert_eq!(lines.len(), BURST as usize + 3, "{lines:#?}");
        assert!(lines[BURST as usize].ends_with("message=elsewhere"));
        // The second flood's first line passes after a report of the 990 dropped before it.
        let report = &lines[BURST as usize + 1];
        assert!(report.starts_with(REPORT_TARGET), "{report}");
        assert!(report.contains("suppressed=990"), "{report}");
        assert!(report.contains("log_limit.rs"), "{report}");
        assert!(lines[BURST as usize + 2].contains("i=0"));
    }

    #[test]
    fn log_records_are_limited_per_file_and_line_not_per_level() {
        let (capture, _clock, subscriber) = setup();
        tracing::subscriber::with_default(subscriber, || {
            // What `tracing-log` makes of `log::error!` from two places in one crate: the same
            // callsite, told apart by their fields.
            for line in [573u64, 747] {
                for _ in 0..100 {
                    tracing::error!(
                        log.target = "virtio_queue::queue",
                        log.file = "src/queue.rs",
                        log.line = line,
                        "Iterator error"
                    );
                }
            }
        });
        let lines = capture.0.lock().unwrap();
        assert_eq!(lines.len(), 2 * BURST as usize);
        assert_eq!(
            lines.iter().filter(|l| l.contains("log.line=747")).count(),
            BURST as usize
        );
    }

    #[test]
    fn sites_past_the_cap_share_one_bucket() {
        let (capture, _clock, subscriber) = setup();
        let site = |line: u64| {
            tracing::error!(log.target = "t", log.file = "f.rs", log.line = line, "x");
        };
        tracing::subscriber::with_default(subscriber, || {
            for line in 0..MAX_SITES as u64 {
                site(line);
            }
            // The table is full: two new sites draw on one bucket.
            for _ in 0..BURST {
                site(1_000_000);
            }
            site(1_000_001);
            // Sites with a bucket of their own keep it.
            site(0);
        });
        let lines = capture.0.lock().unwrap();
        assert_eq!(lines.len(), MAX_SITES + BURST as usize + 1);
        assert!(!lines.iter().any(|l| l.contains("log.line=1000001")));
    }
}
