//! How a VM ends: the events that can end it, the rule that picks the exit reason from them, the
//! process exit code of each reason, and the `exit.json` record.
//!
//! | reason | exit code | cause |
//! | --- | --- | --- |
//! | `reset` | 0 | i8042 reset, triple fault (`KVM_EXIT_SHUTDOWN`), `KVM_SYSTEM_EVENT_RESET` |
//! | `poweroff` | 10 | `reboot: Power down` / `reboot: System halted` on the console, a halted vCPU |
//! | `panic` | 11 | `Kernel panic - not syncing` on the console, whatever follows it |
//! | `vcpu_error` | 12 | failed entry, internal error, an unexpected exit or ioctl error |
//! | `signal` | 13 | SIGTERM or SIGINT to the VMM |
//! | `seccomp` | 14 | a VMM thread made a syscall its seccomp filter forbids; the `SIGSYS` handler writes `exit.json` (with `syscall` and `syscall_nr`) and exits at once (see [`crate::seccomp`]) |
//! | (setup error) | 1 | the VM never ran; no `exit.json` reason applies |

use std::path::Path;
use std::time::Duration;

use crate::devices::virtio::{BlockMetricsSnapshot, NetMetricsSnapshot, VsockMetricsSnapshot};

/// Exit code for a VM that could not be set up.
pub const SETUP_ERROR_EXIT_CODE: i32 = 1;
/// How long to wait, after the console shows a panic, for the reset that `panic=-1` causes.
pub const PANIC_GRACE: Duration = Duration::from_secs(2);

/// Why the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset the machine.
    Reset,
    /// The guest powered off or halted.
    #[serde(rename = "poweroff")]
    PowerOff,
    /// The guest kernel panicked.
    Panic,
    /// A vCPU failed.
    VcpuError,
    /// The VMM was told to stop.
    Signal,
    /// A VMM thread made a syscall outside its seccomp allowlist. Only the `SIGSYS` handler
    /// writes this reason ([`crate::seccomp`]); no event leads to it.
    Seccomp,
}

impl ExitReason {
    /// The VMM process exit code for this reason.
    pub fn exit_code(self) -> i32 {
        match self {
            ExitReason::Reset => 0,
            ExitReason::PowerOff => 10,
            ExitReason::Panic => 11,
            ExitReason::VcpuError => 12,
            ExitReason::Signal => 13,
            ExitReason::Seccomp => crate::seccomp::SECCOMP_EXIT_CODE,
        }
    }

    /// The reason as written in `exit.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Reset => "reset",
            ExitReason::PowerOff => "poweroff",
            ExitReason::Panic => "panic",
            ExitReason::VcpuError => "vcpu_error",
            ExitReason::Signal => "signal",
            ExitReason::Seccomp => "seccomp",
        }
    }
}

/// Something that happened to the VM, sent to the thread that waits for its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (or triple-faulted).
    Reset,
    /// The guest powered off or halted.
    PowerOff,
    /// The console showed a kernel panic; the reset usually follows.
    PanicSeen,
    /// vCPU `cpu` failed; `detail` says how.
    VcpuError {
        /// vCPU index.
        cpu: u8,
        /// What failed.
        detail: String,
    },
    /// The VMM received this signal.
    Signal(i32),
}

/// Folds events into an exit reason. A panic seen on the console wins over whatever ends the VM
/// after it; a signal always wins.
#[derive(Debug, Default)]
pub struct ExitDecider {
    panic_seen: bool,
}

impl ExitDecider {
    /// Whether a panic has been seen (the caller then bounds its wait by [`PANIC_GRACE`]).
    pub fn panic_seen(&self) -> bool {
        self.panic_seen
    }

    /// Takes one event; returns the exit reason once the VM is over.
    pub fn on_event(&mut self, event: &VmEvent) -> Option<ExitReason> {
        let ending = match event {
            VmEvent::PanicSeen => {
                self.panic_seen = true;
                return None;
            }
            VmEvent::Signal(_) => return Some(ExitReason::Signal),
            VmEvent::Reset => ExitReason::Reset,
            VmEvent::PowerOff => ExitReason::PowerOff,
            VmEvent::VcpuError { .. } => ExitReason::VcpuError,
        };
        Some(if self.panic_seen {
            ExitReason::Panic
        } else {
            ending
        })
    }

    /// The reason when the grace period after a panic ran out with nothing else happening.
    pub fn on_panic_grace_expired(&self) -> ExitReason {
        ExitReason::Panic
    }
}

/// One disk's counters at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskRecord {
    /// The id the guest read.
    pub id: String,
    /// Whether the disk was read-only.
    pub read_only: bool,
    /// The device's counters.
    pub metrics: BlockMetricsSnapshot,
}

/// The final record of a VM run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExitReport {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// The process exit code.
    pub exit_code: i32,
    /// Milliseconds from VMM start to the guest's first vsock connection, if it made one.
    pub boot_to_ready_ms: Option<u64>,
    /// Each disk's counters, in attach order (`/dev/vda` first); left out with no disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskRecord>,
    /// The vsock device's counters; left out when the VM had no vsock device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockMetricsSnapshot>,
    /// The network device's counters; left out when the VM had no network device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMetricsSnapshot>,
}

impl ExitReport {
    /// A report for `reason`, with no disk records.
    pub fn new(reason: ExitReason, boot_to_ready_ms: Option<u64>) -> Self {
        Self {
            reason,
            exit_code: reason.exit_code(),
            boot_to_ready_ms,
            disks: Vec::new(),
            vsock: None,
            net: None,
        }
    }

    /// The report with `disks` as its disk records.
    pub fn with_disks(self, disks: Vec<DiskRecord>) -> Self {
        Self { disks, ..self }
    }

    /// The report with the vsock device's counters.
    pub fn with_vsock(self, vsock: VsockMetricsSnapshot) -> Self {
        Self {
            vsock: Some(vsock),
            ..self
        }
    }

    /// The report with the network device's counters.
    pub fn with_net(self, net: NetMetricsSnapshot) -> Self {
        Self {
            net: Some(net),
            ..self
        }
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        // Serializing plain fields into a string cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Writes `exit.json` into `vm_dir` durably: a temporary file, fsynced, renamed over the
    /// record, then the folder fsynced. A reader never sees half a record, and a host crash
    /// right after the VMM exits does not lose how the VM ended.
    ///
    /// The rest of the workspace does this with `shared_proto::fs::replace_file`; the VMM links
    /// no wire crate (it would bring the credential channels' crypto into every VMM process),
    /// so these few lines are its own. The temporary name is fixed: one VMM owns a VM folder.
    pub fn write(&self, vm_dir: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = vm_dir.join("exit.json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(format!("{}\n", self.to_json()).as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, vm_dir.join("exit.json"))?;
        std::fs::File::open(vm_dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_stable() {
        let all = [
            (ExitReason::Reset, 0, "reset"),
            (ExitReason::PowerOff, 10, "poweroff"),
            (ExitReason::Panic, 11, "panic"),
            (ExitReason::VcpuError, 12, "vcpu_error"),
            (ExitReason::Signal, 13, "signal"),
            (ExitReason::Seccomp, 14, "seccomp"),
        ];
        for (reason, code, name) in all {
            assert_eq!(reason.exit_code(), code);
            assert_eq!(reason.as_str(), name);
            assert_eq!(
                serde_json::to_string(&reason).unwrap(),
                format!("\"{name}\"")
            );
        }
    }

    #[test]
    fn events_map_to_reasons() {
        let mut d = ExitDecider::default();
        assert_eq!(d.on_event(&VmEvent::Reset), Some(ExitReason::Reset));
        assert_eq!(d.on_event(&VmEvent::PowerOff), Some(ExitReason::PowerOff));
        let err = VmEvent::VcpuError {
            cpu: 1,
            detail: "KVM_EXIT_FAIL_ENTRY".into(),
        };
        assert_eq!(d.on_event(&err), Some(ExitReason::VcpuError));
        assert_eq!(d.on_event(&VmEvent::Signal(15)), Some(ExitReason::Signal));
        assert!(!d.panic_seen());
    }

    #[test]
    fn a_panic_colours_the_reset_that_follows_it_but_not_a_signal() {
        let mut d = ExitDecider::default();
        assert_eq!(d.on_event(&VmEvent::PanicSeen), None);
        assert!(d.panic_seen());
        assert_eq!(d.on_event(&VmEvent::Reset), Some(ExitReason::Panic));
        assert_eq!(d.on_event(&VmEvent::PowerOff), Some(ExitReason::Panic));
        assert_eq!(d.on_event(&VmEvent::Signal(15)), Some(ExitReason::Signal));
        assert_eq!(d.on_panic_grace_expired(), ExitReason::Panic);
    }

    #[test]
    fn report_json_and_file() {
        let r = ExitReport::new(ExitReason::Panic, Some(1234));
        assert_eq!(
            r.to_json(),
            r#"{"reason":"panic","exit_code":11,"boot_to_ready_ms":1234}"#
        );
        let none = ExitReport::new(ExitReason::Reset, None);
        assert_eq!(
            none.to_json(),
            r#"{"reason":"reset","exit_code":0,"boot_to_ready_ms":null}"#
        );
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("exit.json")).unwrap();
        assert_eq!(text.trim_end(), r.to_json());
        assert!(!dir.path().join("exit.json.tmp").exists());
    }

    #[test]
    fn disk_records_follow_the_report() {
        let metrics = BlockMetricsSnapshot {
            reads: 3,
            read_bytes: 1536,
            ..BlockMetricsSnapshot::default()
        };
        let r = ExitReport::new(ExitReason::PowerOff, None).with_disks(vec![DiskRecord {
            id: "nanoclaw-image".into(),
            read_only: true,
            metrics,
        }]);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["reason"], "poweroff");
        let disk = &v["disks"][0];
        assert_eq!(disk["id"], "nanoclaw-image");
        assert_eq!(disk["read_only"], true);
        assert_eq!(disk["metrics"]["reads"], 3);
        assert_eq!(disk["metrics"]["read_bytes"], 1536);
        assert_eq!(disk["metrics"]["dropped_chains"], 0);
    }

    #[test]
    fn vsock_counters_follow_the_report() {
        let vsock = VsockMetricsSnapshot {
            conns_opened: 4,
            credit_violations: 1,
            ..VsockMetricsSnapshot::default()
        };
        let r = ExitReport::new(ExitReason::Reset, Some(7)).with_vsock(vsock);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["vsock"]["conns_opened"], 4);
        assert_eq!(v["vsock"]["credit_violations"], 1);
        assert_eq!(v["vsock"]["rst_queue_overflows"], 0);
        assert!(v.get("disks").is_none(), "no disks, no disk records: {v}");
        assert!(v.get("net").is_none(), "no network device, no record: {v}");

        let net = NetMetricsSnapshot {
            tx_frames: 5,
            rx_oversized: 2,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(
            &ExitReport::new(ExitReason::Reset, None)
                .with_net(net)
                .to_json(),
        )
        .unwrap();
        assert_eq!(v["net"]["tx_frames"], 5);
        assert_eq!(v["net"]["rx_oversized"], 2);
        assert_eq!(v["net"]["tx_oversized"], 0);
    }
}
