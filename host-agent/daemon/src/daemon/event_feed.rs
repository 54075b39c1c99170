//! The live feed of one VM's events: the recent events in a buffer bounded in bytes, which any
//! number of subscribers read at their own pace.
//!
//! A guest chooses how large its events are (an output frame may carry 1 MiB), so a buffer
//! bounded in messages is not bounded in memory. [`EventRing`] keeps the newest events up to
//! [`EVENT_BUFFER_BYTES`] (plus the newest event, whatever its size), shared by every
//! subscriber. An [`EventFeed`] that falls behind what the ring still holds gets
//! [`RecvError::Lagged`], as from a `tokio` broadcast channel, and catches up from the event
//! log.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use nanoclaw_api::EventRecord;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;

/// The most bytes (of the events' JSON lines) a VM's live feed holds.
pub const EVENT_BUFFER_BYTES: usize = 4 << 20;

/// The recent events of one VM, oldest first, with contiguous sequence numbers.
#[derive(Debug)]
pub struct EventRing {
    events: VecDeque<(Arc<EventRecord>, usize)>,
    bytes: usize,
    /// The sequence number the next event gets.
    next_seq: u64,
    /// Tells subscribers the next sequence number changed.
    wake: watch::Sender<u64>,
}

fn lock(ring: &Mutex<EventRing>) -> MutexGuard<'_, EventRing> {
    // Plain data: a panic while holding the lock leaves it usable.
    ring.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventRing {
    /// An empty ring whose first event will be `next_seq`.
    pub fn new(next_seq: u64) -> Arc<Mutex<Self>> {
        let (wake, _) = watch::channel(next_seq);
        Arc::new(Mutex::new(Self {
            events: VecDeque::new(),
            bytes: 0,
            next_seq,
            wake,
        }))
    }

    /// Adds `rec` (whose JSON line is `len` bytes long; its seq must be the next one), dropping
    /// the oldest events while the ring holds more than [`EVENT_BUFFER_BYTES`].
    pub fn push(&mut self, rec: EventRecord, len: usize) {
        if rec.seq != self.next_seq {
            // Sequence numbers come from the event log under its lock; never out of order.
            self.events.clear();
            self.bytes = 0;
        }
        self.next_seq = rec.seq + 1;
        self.events.push_back((Arc::new(rec), len));
        self.bytes += len;
        while self.bytes > EVENT_BUFFER_BYTES && self.events.len() > 1 {
            if let Some((_, len)) = self.events.pop_front() {
                self.bytes -= len;
            }
        }
        self.wake.send_replace(self.next_seq);
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A subscriber that gets every event from the next one on.
    pub fn subscribe(ring: &Arc<Mutex<Self>>) -> EventFeed {
        let r = lock(ring);
        EventFeed {
            ring: Arc::clone(ring),
            wake: r.wake.subscribe(),
            next: r.next_seq,
        }
    }
}

/// One subscriber of a VM's live events (see the module doc).
#[derive(Debug)]
pub struct EventFeed {
    ring: Arc<Mutex<EventRing>>,
    wake: watch::Receiver<u64>,
    /// The sequence number this subscriber reads next.
    next: u64,
}

impl EventFeed {
    /// The next event, if the ring has it; `Lagged(n)` when `n` events were dropped before this
    /// subscriber read them (it then goes on from the oldest event held).
    pub fn try_recv(&mut self) -> Result<Arc<EventRecord>, TryRecvError> {
        let ring = lock(&self.ring);
        let Some(first) = ring.events.front().map(|(e, _)| e.seq) else {
            return Err(TryRecvError::Empty);
        };
        if self.next < first {
            let missed = first - self.next;
            self.next = first;
            return Err(TryRecvError::Lagged(missed));
        }
        let index = usize::try_from(self.next - first).unwrap_or(usize::MAX);
        match ring.events.get(index) {
            Some((e, _)) => {
                self.next += 1;
                Ok(Arc::clone(e))
            }
            None => Err(TryRecvError::Empty),
        }
    }

    /// Waits for the next event (see [`EventFeed::try_recv`]).
    pub async fn recv(&mut self) -> Result<Arc<EventRecord>, RecvError> {
        loop {
            // Marked seen before looking, so an event pushed after the look wakes us.
            self.wake.borrow_and_update();
            match self.try_recv() {
                Ok(e) => return Ok(e),
                Err(TryRecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
                Err(_) => {}
            }
            if self.wake.changed().await.is_err() {
                return Err(RecvError::Closed);
            }
        }
    }
}
