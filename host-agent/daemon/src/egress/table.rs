//! The addresses the resolver gave out, `addr -> names` with an expiry each: what the SNI check
//! asks before it lets a connection through.
//!
//! The table is bounded ([`MAX_ADDRS`] addresses, [`MAX_NAMES_PER_ADDR`] names each). When it is
//! full, expired entries are purged first; a grant that still does not fit is not recorded and
//! [`GrantTable::grant`] says so, so the resolver leaves that address out of its answer rather
//! than hand out an address the SNI check would refuse.
//!
//! The table notes when it changes ([`GrantTable::gained`], [`GrantTable::take_dirty`]), so
//! that the daemon can keep a copy in the VM's state folder ([`super::saved`]) and a restarted
//! daemon does not refuse connections to addresses handed out before it stopped.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The shortest grant: short upstream TTLs are raised to it so a connection can follow the
/// answer.
pub const MIN_TTL: Duration = Duration::from_secs(30);
/// The longest grant.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Addresses the table holds at most.
pub const MAX_ADDRS: usize = 4096;
/// Names one address holds at most.
pub const MAX_NAMES_PER_ADDR: usize = 32;

/// Clamps a TTL in seconds to [`MIN_TTL`]..=[`MAX_TTL`].
pub fn clamp_ttl(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs)).clamp(MIN_TTL, MAX_TTL)
}

/// The shared table; clones share it.
#[derive(Debug, Clone, Default)]
pub struct GrantTable {
    inner: Arc<Mutex<HashMap<Ipv4Addr, HashMap<String, Instant>>>>,
    changes: Arc<Changes>,
}

/// What the table tells whoever keeps a copy of it.
#[derive(Debug, Default)]
struct Changes {
    /// A grant was added or lengthened since the last [`GrantTable::take_dirty`].
    dirty: AtomicBool,
    /// Woken when a new `(addr, name)` pair is added.
    gained: Notify,
}

/// One grant, as [`GrantTable::entries_at`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The address given out.
    pub addr: Ipv4Addr,
    /// The name it was given out for (normalized).
    pub name: String,
    /// When the grant runs out.
    pub until: Instant,
}

impl GrantTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, HashMap<String, Instant>>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters (every update is one insert or retain), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `addr` was given out for `name` (normalized) until `now + ttl`; a later
    /// expiry replaces an earlier one. `false` when the table is full.
    pub fn grant_at(&self, addr: Ipv4Addr, name: &str, ttl: Duration, now: Instant) -> bool {
        let until = now + ttl;
        let mut map = self.lock();
        if !map.contains_key(&addr) && map.len() >= MAX_ADDRS {
            purge(&mut map, now);
            if map.len() >= MAX_ADDRS {
                return false;
            }
        }
        let names = map.entry(addr).or_default();
        if !names.contains_key(name) && names.len() >= MAX_NAMES_PER_ADDR {
            names.retain(|_, exp| *exp > now);
            if names.len() >= MAX_NAMES_PER_ADDR {
                return false;
            }
        }
        let (gained, lengthened) = match names.get_mut(name) {
            Some(exp) if *exp > now => {
                let later = until > *exp;
                *exp = (*exp).max(until);
                (false, later)
            }
            // An expired grant given again counts as a new one.
            Some(exp) => {
                *exp = until;
                (true, true)
            }
            None => {
                names.insert(name.to_owned(), until);
                (true, true)
            }
        };
        drop(map);
        if lengthened {
            self.changes.dirty.store(true, Ordering::Release);
        }
        if gained {
            self.changes.gained.notify_one();
        }
        true
    }

    /// [`grant_at`](Self::grant_at) now.
    pub fn grant(&self, addr: Ipv4Addr, name: &str, ttl: Duration) -> bool {
        self.grant_at(addr, name, ttl, Instant::now())
    }

    /// Whether `addr` was given out for `name` (normalized) and the grant has not expired at
    /// `now`.
    pub fn is_granted_at(&self, addr: Ipv4Addr, name: &str, now: Instant) -> bool {
        self.lock()
            .get(&addr)
            .and_then(|names| names.get(name))
            .is_some_and(|exp| *exp > now)
    }

    /// [`is_granted_at`](Self::is_granted_at) now.
    pub fn is_granted(&self, addr: Ipv4Addr, name: &str) -> bool {
        self.is_granted_at(addr, name, Instant::now())
    }

    /// Drops every expired grant.
    pub fn purge_at(&self, now: Instant) {
        purge(&mut self.lock(), now);
    }

    /// Every grant that has not expired at `now`.
    pub fn entries_at(&self, now: Instant) -> Vec<Grant> {
        let map = self.lock();
        let mut out = Vec::new();
        for (addr, names) in map.iter() {
            for (name, until) in names {
                if *until > now {
                    out.push(Grant {
                        addr: *addr,
                        name: name.clone(),
                        until: *until,
                    });
                }
            }
        }
        out
    }

    /// Waits until a new `(addr, name)` pair is added (at once if one was added since the last
    /// wait ended). One waiter at a time.
    pub async fn gained(&self) {
        self.changes.gained.notified().await;
    }

    /// Whether a grant was added or lengthened since the last call (and clears that).
    pub fn take_dirty(&self) -> bool {
        self.changes.dirty.swap(false, Ordering::AcqRel)
    }

    /// Notes the table as changed again (a copy could not be written; the next try writes it).
    pub fn mark_dirty(&self) {
        self.changes.dirty.store(true, Ordering::Release);
    }

    /// Addresses held (expired ones included until a purge).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the table holds no address.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

fn purge(map: &mut HashMap<Ipv4Addr, HashMap<String, Instant>>, now: Instant) {
    map.retain(|_, names| {
        names.retain(|_, exp| *exp > now);
        !names.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn ttl_is_clamped() {
        assert_eq!(clamp_ttl(0), MIN_TTL);
        assert_eq!(clamp_ttl(300), Duration::from_secs(300));
        assert_eq!(clamp_ttl(u32::MAX), MAX_TTL);
    }

    #[test]
    fn grants_expire_and_are_per_name() {
        let t = GrantTable::new();
        let now = Instant::now();
        assert!(t.grant_at(A, "pypi.org", MIN_TTL, now));
        assert!(t.is_granted_at(A, "pypi.org", now));
        assert!(!t.is_granted_at(A, "other.test", now));
        assert!(!t.is_granted_at(Ipv4Addr::new(192, 0, 2, 2), "pypi.org", now));
        assert!(!t.is_granted_at(A, "pypi.org", now + MIN_TTL));
        // A shorter grant does not cut a longer one short.
        assert!(t.grant_at(A, "pypi.org", MAX_TTL, now));
        assert!(t.grant_at(A, "pypi.org", MIN_TTL, now));
        assert!(t.is_granted_at(A, "pypi.org", now + MIN_TTL));
        t.purge_at(now + MAX_TTL);
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded_and_purges_expired_entries_when_full() {
        let t = GrantTable::new();
        let now = Instant::now();
        for i in 0..MAX_ADDRS as u32 {
            assert!(t.grant_at(Ipv4Addr::from(i), "a.test", MIN_TTL, now));
        }
        assert!(!t.grant_at(Ipv4Addr::from(u32::MAX), "a.test", MIN_TTL, now));
        assert_eq!(t.len(), MAX_ADDRS);
        // Once the old grants expire there is room again.
        assert!(t.grant_at(Ipv4Addr::from(u32::MAX), "a.test", MIN_TTL, now + MIN_TTL));
        assert_eq!(t.len(), 1);

        for i in 0..MAX_NAMES_PER_ADDR {
            assert!(t.grant_at(A, &format!("n{i}.test"), MIN_TTL, now));
        }
        assert!(!t.grant_at(A, "one-more.test", MIN_TTL, now));
        assert!(t.grant_at(A, "n0.test", MIN_TTL, now));
    }

    #[tokio::test]
    async fn a_new_grant_wakes_the_keeper_and_a_longer_one_only_marks_the_table() {
        let t = GrantTable::new();
        let now = Instant::now();
        assert!(!t.take_dirty());
        assert!(t.grant_at(A, "pypi.org", MIN_TTL, now));
        assert!(t.take_dirty());
        assert!(!t.take_dirty());
        // The gain left a wake-up behind.
        tokio::time::timeout(Duration::from_secs(1), t.gained())
            .await
            .expect("woken by the new grant");
        // The same grant again, no longer: nothing changed.
        assert!(t.grant_at(A, "pypi.org", MIN_TTL, now));
        assert!(!t.take_dirty());
        // Lengthened: marked, but no wake-up.
        assert!(t.grant_at(A, "pypi.org", MAX_TTL, now));
        assert!(t.take_dirty());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), t.gained())
                .await
                .is_err()
        );
        let entries = t.entries_at(now);
        assert_eq!(
            entries,
            vec![Grant {
                addr: A,
                name: "pypi.org".into(),
                until: now + MAX_TTL
            }]
        );
        assert!(t.entries_at(now + MAX_TTL).is_empty());
    }
}
