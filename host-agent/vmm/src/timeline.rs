//! The boot timeline: when each stage of building a VM ended, counted from the process's start,
//! and when its first vCPU first entered the guest. vCPU 0 prints it once, just before its first
//! `KVM_RUN`, as a log line and as one line on stderr that `scripts/bench-boot` reads:
//!
//! ```text
//! nanoclaw-vmm: boot_timeline_ms vm=1.9 memory=2.3 devices=3.1 kernel=7.9 initrd=8.4 loaded=9.8 first_run=10.6
//! ```
//!
//! The stages (see [`crate::machine::Vmm::new`]): `vm`, the VM made with its interrupt
//! controllers (KVM starts the guest's clock here); `memory`, guest RAM mapped and registered;
//! `devices`, the vCPUs and every device built; `kernel`, the kernel image copied in; `initrd`,
//! the initramfs copied in; `loaded`, the command line and boot tables written and the vCPUs set
//! up (`restored` instead of those three, for a restored VM); then
//! `first_run`. What follows `first_run` is the guest's own: a benchmark compares it with the
//! guest's ready marker.

use std::time::{Duration, Instant};

/// Most stages a timeline holds (it never allocates past this).
pub const MAX_STAGES: usize = 8;

/// The stages passed so far, each with its time since the process started.
#[derive(Debug, Clone)]
pub struct BootTimeline {
    start: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl BootTimeline {
    /// A timeline counted from `start`, the process's start.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Vec::with_capacity(MAX_STAGES),
        }
    }

    /// Marks the end of `stage`, now. Stages past [`MAX_STAGES`] are not kept.
    pub fn mark(&mut self, stage: &'static str) {
        if self.marks.len() < MAX_STAGES {
            self.marks.push((stage, self.start.elapsed()));
        }
    }

    /// The stages in order as `name=milliseconds` (one decimal), then `last` at `at`.
    pub fn line(&self, last: &'static str, at: Duration) -> String {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        self.marks
            .iter()
            .chain(std::iter::once(&(last, at)))
            .map(|(name, d)| format!("{name}={:.1}", ms(d)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Prints the timeline with `first_run` now: a log line and the stderr line of the module
    /// doc. Called once, by vCPU 0, just before its first `KVM_RUN`.
    pub fn report_first_run(&self) {
        let line = self.line("first_run", self.start.elapsed());
        tracing::info!(timeline = %line, "boot timeline (ms since the process started)");
        // Never a panic when the daemon's end of stderr is gone (see main).
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("nanoclaw-vmm: boot_timeline_ms {line}\n").as_bytes(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_lists_the_stages_in_order_and_keeps_a_bounded_number() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut t = BootTimeline::new(start);
        t.mark("vm");
        t.mark("memory");
        let line = t.line("first_run", Duration::from_micros(12_345));
        let names: Vec<&str> = line
            .split(' ')
            .map(|kv| kv.split_once('=').unwrap().0)
            .collect();
        assert_eq!(names, ["vm", "memory", "first_run"]);
        assert!(line.ends_with("first_run=12.3"), "{line}");
        let vm: f64 = line.split(' ').next().unwrap()[3..].parse().unwrap();
        assert!(vm >= 5.0, "{line}");
        for _ in 0..20 {
            t.mark("more");
        }
        assert_eq!(
            t.line("x", Duration::ZERO).split(' ').count(),
            MAX_STAGES + 1
        );
    }
}
