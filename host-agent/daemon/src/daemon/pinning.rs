//! `--pin-vmm-cpus`: each VMM is kept on host CPUs of its own (the VMM's `--cpus`), handed out
//! in turn from the CPUs the daemon itself may run on.
//!
//! A VM gets as many CPUs as it has vCPUs (all of them when it has more vCPUs than the host has
//! CPUs), starting where the previous VM's ended and wrapping around. The turn does not look at
//! which VMs have ended, so after many starts and stops two busy VMs can share a CPU while
//! another idles; an operator who needs more places VMs with cgroup cpusets instead.
//!
//! Off by default. Our software-emulated test machine (L1) is where it was first needed: there,
//! guests of VMMs free to move between L1's CPUs crash far more often under load (see
//! `docs/design.md`, "Tests: tiers, and why end-to-end runs nested"), and `scripts/bench-net`
//! sets `NANOCLAW_PIN_VMM_CPUS=1`.

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CpuSet, sched_getaffinity};
use nix::unistd::Pid;

/// Hands out host CPUs to VMMs in turn.
#[derive(Debug)]
pub struct CpuPinner {
    /// The CPUs to hand out, ascending.
    cpus: Vec<usize>,
    /// Where the next VM's CPUs start, as an index into `cpus` (modulo its length).
    next: AtomicUsize,
}

/// The daemon's own CPU mask could not be read, or allows no CPU.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// `sched_getaffinity` failed.
    #[error("cannot read the daemon's CPU affinity")]
    Affinity(#[source] nix::errno::Errno),
    /// The mask is empty.
    #[error("the daemon's CPU affinity names no CPU")]
    NoCpu,
}

impl CpuPinner {
    /// Hands out the CPUs this process may run on.
    pub fn from_own_affinity() -> Result<Self, PinError> {
        let set = sched_getaffinity(Pid::from_raw(0)).map_err(PinError::Affinity)?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        Self::new(cpus)
    }

    /// Hands out `cpus` (sorted and deduplicated here).
    pub fn new(mut cpus: Vec<usize>) -> Result<Self, PinError> {
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(PinError::NoCpu);
        }
        Ok(Self {
            cpus,
            next: AtomicUsize::new(0),
        })
    }

    /// The CPUs for the next VM, with `vcpus` vCPUs, as a `--cpus` list (`2` or `0,3`).
    pub fn next_list(&self, vcpus: u8) -> String {
        let n = self.cpus.len();
        let take = usize::from(vcpus).clamp(1, n);
        let start = self.next.fetch_add(take, Ordering::Relaxed) % n;
        let mut chosen: Vec<usize> = (0..take).map(|i| self.cpus[(start + i) % n]).collect();
        chosen.sort_unstable();
        chosen
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_take_their_cpus_in_turn_and_wrap_around() {
        let pinner = CpuPinner::new(vec![3, 1, 2, 1]).unwrap();
        assert_eq!(pinner.next_list(1), "1");
        assert_eq!(pinner.next_list(1), "2");
        assert_eq!(pinner.next_list(2), "1,3");
        assert_eq!(pinner.next_list(1), "2");
        // More vCPUs than CPUs: every CPU, once.
        assert_eq!(pinner.next_list(8), "1,2,3");
        // Zero vCPUs is refused before a VMM is spawned; here it still names one CPU.
        assert_eq!(pinner.next_list(0).split(',').count(), 1);
    }

    #[test]
    fn an_empty_set_is_refused_and_the_own_mask_reads() {
        assert!(matches!(CpuPinner::new(vec![]), Err(PinError::NoCpu)));
        let own = CpuPinner::from_own_affinity().unwrap();
        assert!(!own.cpus.is_empty());
    }
}
