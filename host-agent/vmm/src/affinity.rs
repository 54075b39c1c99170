//! Host CPU affinity: `--cpus LIST` keeps every thread of the VMM (vCPUs and device threads) on
//! the listed host CPUs.
//!
//! The mask is set on the main thread before any other thread exists, so every thread the VMM
//! starts inherits it; the seccomp filters then forbid `sched_setaffinity`, so a VMM taken over
//! by its guest cannot leave its CPUs.
//!
//! Why an operator pins: a VM kept on its own cores has no noisy neighbour in the cache and no
//! cross-core wake-ups between its vCPU and its device threads. Our nested test machines need
//! it more: under a software-emulated (TCG) L1, guests of a VMM free to move between L1's CPUs
//! crash far more often under load than those of a pinned one (`docs/design.md`, "Tests: tiers,
//! and why end-to-end runs nested").
//!
//! The list syntax is the kernel's (`cpuset(7)`): `0`, `0-3`, `0,2,4-5`.

use std::fmt;
use std::str::FromStr;

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// The most CPUs a list may name: the size of the kernel's `cpu_set_t` in the C library.
pub const MAX_CPUS: usize = 1024;

/// A set of host CPUs, as `--cpus` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

/// A `--cpus` list that does not parse, or a mask the kernel refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AffinityError {
    /// The list names no CPU.
    #[error("the CPU list is empty")]
    Empty,
    /// An item is not a number or a `LOW-HIGH` range.
    #[error("bad CPU list item {0:?}: expected a number or LOW-HIGH")]
    BadItem(String),
    /// A range runs backwards.
    #[error("bad CPU range {0:?}: its end is below its start")]
    Backwards(String),
    /// A CPU number is past [`MAX_CPUS`].
    #[error("CPU {got} is out of range (the most is {})", MAX_CPUS - 1)]
    OutOfRange {
        /// The number given.
        got: usize,
    },
    /// `sched_setaffinity` failed (for instance: none of the CPUs is online, or allowed by
    /// this process's cpuset).
    #[error("cannot keep the VMM on CPUs {list}: {errno}")]
    Set {
        /// The list asked for.
        list: String,
        /// The kernel's answer.
        errno: nix::errno::Errno,
    },
}

impl CpuList {
    /// The CPUs, ascending and without repeats.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Keeps the calling thread (and every thread it starts from now on) on these CPUs.
    pub fn apply(&self) -> Result<(), AffinityError> {
        let mut set = CpuSet::new();
        for &cpu in &self.0 {
            set.set(cpu)
                .map_err(|_| AffinityError::OutOfRange { got: cpu })?;
        }
        sched_setaffinity(Pid::from_raw(0), &set).map_err(|errno| AffinityError::Set {
            list: self.to_string(),
            errno,
        })
    }
}

impl FromStr for CpuList {
    type Err = AffinityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |item: &str, text: &str| -> Result<usize, AffinityError> {
            let n: usize = text
                .trim()
                .parse()
                .map_err(|_| AffinityError::BadItem(item.to_string()))?;
            if n >= MAX_CPUS {
                return Err(AffinityError::OutOfRange { got: n });
            }
            Ok(n)
        };
        // A mark per CPU: however long the list, or however often it repeats a range, the set
        // stays this size.
        let mut chosen = [false; MAX_CPUS];
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (number(item, low)?, number(item, high)?),
                None => {
                    let cpu = number(item, item)?;
                    (cpu, cpu)
                }
            };
            if high < low {
                return Err(AffinityError::Backwards(item.to_string()));
            }
            chosen[low..=high].fill(true);
        }
        let cpus: Vec<usize> = (0..MAX_CPUS).filter(|&c| chosen[c]).collect();
        if cpus.is_empty() {
            return Err(AffinityError::Empty);
        }
        Ok(CpuList(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_in_the_kernel_syntax() {
        let list: CpuList = "3, 0-1,1".parse().unwrap();
        assert_eq!(list.cpus(), &[0, 1, 3]);
        assert_eq!(list.to_string(), "0-1,3");
        assert_eq!("7".parse::<CpuList>().unwrap().cpus(), &[7]);
        assert_eq!("0-2,4".parse::<CpuList>().unwrap().to_string(), "0-2,4");
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        assert_eq!("".parse::<CpuList>(), Err(AffinityError::Empty));
        assert_eq!(" , ".parse::<CpuList>(), Err(AffinityError::Empty));
        assert_eq!(
            "a".parse::<CpuList>(),
            Err(AffinityError::BadItem("a".into()))
        );
        assert_eq!(
            "1-".parse::<CpuList>(),
            Err(AffinityError::BadItem("1-".into()))
        );
        assert_eq!(
            "-1".parse::<CpuList>(),
            Err(AffinityError::BadItem("-1".into()))
        );
        assert_eq!(
            "3-1".parse::<CpuList>(),
            Err(AffinityError::Backwards("3-1".into()))
        );
        assert_eq!(
            "1024".parse::<CpuList>(),
            Err(AffinityError::OutOfRange { got: 1024 })
        );
        // A huge range is refused by its end, not expanded.
        assert_eq!(
            "0-99999999999".parse::<CpuList>(),
            Err(AffinityError::OutOfRange {
                got: 99_999_999_999
            })
        );
    }

    #[test]
    fn applying_keeps_the_thread_on_its_cpus() {
        // On a thread of its own, so the test binary's other threads keep their mask.
        std::thread::spawn(|| {
            let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            let first = (0..CpuSet::count())
                .find(|&c| allowed.is_set(c).unwrap_or(false))
                .unwrap();
            let list: CpuList = first.to_string().parse().unwrap();
            list.apply().unwrap();
            let now = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            let set: Vec<usize> = (0..CpuSet::count())
                .filter(|&c| now.is_set(c).unwrap_or(false))
                .collect();
            assert_eq!(set, vec![first]);
        })
        .join()
        .unwrap();
    }
}
