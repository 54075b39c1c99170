//! Seccomp allowlists: one filter per kind of VMM thread, and the `SIGSYS` handler that reports a
//! forbidden syscall.
//!
//! # Why one filter per thread
//! The threads of the VMM do very different jobs. A vCPU thread needs `KVM_RUN` and the few calls
//! its devices make on the way (console writes, eventfd kicks), but never a socket; the vsock
//! device thread needs Unix sockets, but never an ioctl on KVM; a block device thread needs
//! `pread64`/`pwrite64`/`fdatasync` on its one file and nothing else; the network device thread
//! needs `read` and `write` on its TAP and no `ioctl` at all. One filter for the whole
//! process would be the union of all of them. With a filter per thread, a guest that takes over
//! the thread it talks to gets only that thread's calls (Firecracker does the same, with its
//! `vmm`, `api` and `vcpu` filters).
//!
//! # How filters stack
//! A filter is a property of a thread, and a new thread inherits its creator's filters; a filter
//! can only be added, never removed, and when several are installed every one of them must allow
//! a call. So the order is fixed:
//! 1. [`prepare`], on the main thread before any other thread exists: opens the `SIGSYS` record
//!    (`<vm-dir>/exit.json`), installs the `SIGSYS` handler and compiles every filter to BPF, so
//!    a failure is a setup error and later steps cannot fail on a bad filter. It also keeps
//!    glibc's malloc to one arena, so that no thread opens a `/proc` file when it frees memory
//!    (see `single_malloc_arena`).
//! 2. Every thread the VMM spawns calls [`confine_current_thread`] with its kind as the first
//!    thing it does. It was spawned by the still unfiltered main thread, so its own filter is the
//!    only one it has.
//! 3. The main thread installs its own [`ThreadKind::Vmm`] filter only after it has spawned the
//!    last vCPU thread (in [`crate::machine::Vmm::run`]). That filter has no `clone`/`clone3`: the
//!    main thread cannot start another thread afterwards, and nothing inherits its filter.
//!
//! A mismatch raises `SIGSYS` ([`SeccompAction::Trap`]). The handler writes
//! `{"reason":"seccomp","exit_code":14,"syscall":"NAME","syscall_nr":N}` into the pre-opened
//! `exit.json`, one line naming the call to stderr, and ends the process with exit code 14
//! ([`crate::ExitReason::Seccomp`]). It runs on the offending thread and under that thread's
//! filter, so every filter allows what the handler needs ([`HANDLER_CALLS`]). Names come from
//! the `syscalls` crate's [`Sysno`] (a `const fn` match, async-signal-safe).
//!
//! # How to change a list
//! The lists are the table in [`ThreadKind::allowlist`]. They were found by tracing real boots
//! (`strace -ff`) inside the nested L1 VM: the busybox initramfs with one and two vCPUs, vsock in
//! both directions, a guest panic, a SIGTERM stop, read-only and writable disks, and the daemon's
//! image and `cp` tests. To change one:
//! 1. edit the table (say in a comment what needs the call);
//! 2. run `nanoclaw-vmm --print-seccomp > host-agent/vmm/seccomp-filters.txt` and review the
//!    diff; `scripts/test` fails while the checked-in copy differs from the binary's;
//! 3. run `scripts/e2e vmm::`, `scripts/e2e image::` and `scripts/e2e cp::`: a call that is
//!    missing ends a VM with reason `seccomp` and names the call in `exit.json` and on stderr.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

/// The exit code of a VMM that made a forbidden syscall (see [`crate::ExitReason::Seccomp`]).
pub const SECCOMP_EXIT_CODE: i32 = 14;

/// The syscall the `--test-forbidden-syscall` hook makes: `getppid`, which is harmless and which
/// no thread of the VMM needs, so it is in no allowlist.
pub const TEST_FORBIDDEN_SYSCALL: Sysno = Sysno::getppid;

/// Errors from preparing or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Creating the VM folder failed.
    #[error("create the VM folder")]
    VmDir(#[source] std::io::Error),
    /// Opening `exit.json` for the `SIGSYS` record failed.
    #[error("open the seccomp exit record")]
    ExitRecord(#[source] std::io::Error),
    /// Installing the `SIGSYS` handler failed.
    #[error("install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// A filter does not compile (a bug in the table).
    #[error("compile the {0} filter")]
    Compile(&'static str, #[source] seccompiler::Error),
    /// The filters were prepared twice.
    #[error("seccomp filters are already prepared")]
    AlreadyPrepared,
    /// The kernel refused a filter.
    #[error("install the {0} filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread, once it has started every other thread: waits for the VM's end, kicks
    /// and joins the vCPUs, stops the devices, writes `exit.json`.
    Vmm,
    /// A vCPU thread (`vcpu<N>`): `KVM_RUN` and the port-I/O and MMIO devices it reaches.
    Vcpu,
    /// The vsock device thread (`vsock-dev`): the queues and the Unix sockets behind them.
    Vsock,
    /// A block device thread (`blk-dev<N>`): the queue and the backing file.
    Block,
    /// The network device thread (`net-dev`): the two queues and the TAP.
    Net,
    /// The signal waiter thread (`vmm-signals`): `sigwait` for SIGTERM and SIGINT.
    Signals,
    /// The control thread (`vmm-control`): the control socket, pausing and resuming the vCPUs.
    Control,
}

impl ThreadKind {
    /// Every kind, in the order `--print-seccomp` lists them.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Vsock,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Signals,
        ThreadKind::Control,
    ];

    /// The kind's name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Block => "block",
            ThreadKind::Net => "net",
            ThreadKind::Signals => "signals",
            ThreadKind::Control => "control",
        }
    }

    fn index(self) -> u8 {
        match self {
            ThreadKind::Vmm => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::Vsock => 3,
            ThreadKind::Block => 4,
            ThreadKind::Signals => 5,
            ThreadKind::Control => 6,
            ThreadKind::Net => 7,
        }
    }

    fn from_index(index: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.index() == index)
    }

    /// The calls this kind of thread may make: the table to edit (see the module doc).
    pub fn allowlist(self) -> Vec<Allowed> {
        use Sysno::*;
        let mut list: Vec<Allowed> = HANDLER_CALLS.iter().map(|&s| Allowed::any(s)).collect();
        list.extend(runtime_calls());
        match self {
            ThreadKind::Vmm => list.extend([
                // Kicking the vCPUs out of KVM_RUN: pthread_kill is getpid + tgkill.
                Allowed::any(getpid),
                Allowed::any(tgkill),
                // The pause between kicks.
                Allowed::any(clock_nanosleep),
                // exit.json: a temporary file created, written, synced and renamed over the
                // record, then the folder opened and synced.
                Allowed::when(
                    openat,
                    [[Check::masked(2, O_ACCMODE, O_WRONLY, "O_WRONLY")]],
                )
                .or([Check::masked(2, O_ACCMODE, O_RDONLY, "O_RDONLY")]),
                Allowed::any(fsync),
                Allowed::any(rename),
                // The vsock socket file removed on stop.
                Allowed::any(unlink),
                // Dropping devices, vCPU files and the VM.
                Allowed::any(close),
            ]),
            ThreadKind::Vcpu => list.extend([
                // The KVM calls a vCPU makes: running, after a pause telling the guest's
                // kvmclock it was stopped, and while parked for a snapshot reading its own
                // state (crate::snapshot::cpu; nothing is set on a running VM's vCPU).
                VCPU_SNAPSHOT_IOCTLS.iter().fold(
                    Allowed::when(ioctl, [[Check::eq(1, KVM_RUN, "KVM_RUN")]]).or([Check::eq(
                        1,
                        KVM_KVMCLOCK_CTRL,
                        "KVM_KVMCLOCK_CTRL",
                    )]),
                    |allowed, &(nr, name)| allowed.or([Check::eq(1, nr, name)]),
                ),
                // A kick interrupts KVM_RUN through a signal handler.
                Allowed::any(rt_sigreturn),
                // The vCPU file, closed when the thread ends (console and eventfd writes are
                // `write`, in every list).
                Allowed::any(close),
            ]),
            ThreadKind::Vsock => list.extend([
                Allowed::any(epoll_wait),
                Allowed::any(epoll_ctl),
                // Queue eventfds and host streams.
                Allowed::any(read),
                Allowed::any(recvfrom),
                Allowed::any(sendto),
                // Host-initiated connections (vsock.sock) ...
                Allowed::any(accept4),
                Allowed::when(ioctl, [[Check::eq(1, FIONBIO, "FIONBIO")]]),
                // ... and guest-initiated ones (vsock.sock_<port>), Unix sockets only.
                Allowed::when(socket, [[Check::eq(0, AF_UNIX, "AF_UNIX")]]),
                Allowed::any(connect),
                Allowed::any(shutdown),
                Allowed::any(close),
                // The listener's socket file when the device stops.
                Allowed::any(unlink),
            ]),
            ThreadKind::Block => list.extend([
                Allowed::any(epoll_wait),
                // Queue and command eventfds.
                Allowed::any(read),
                // The backing file (pwrite64 is also a handler call).
                Allowed::any(pread64),
                Allowed::any(fdatasync),
                // Dropping the disk unlocks and closes it.
                Allowed::when(flock, [[Check::eq(1, LOCK_UN, "LOCK_UN")]]),
                Allowed::any(close),
            ]),
            ThreadKind::Net => list.extend([
                // Not yet traced in a booted guest (no daemon or guest driver uses the device);
                // `net::tests::thread::the_net_filter_allows_what_the_device_thread_does` runs
                // the thread's frames, reset and stop under this list.
                // Queue, command and stop eventfds, and the TAP (edge-triggered, registered
                // before the filter; the set never changes, so no epoll_ctl).
                Allowed::any(epoll_wait),
                // Eventfds and frames from the TAP (frames to it are `write`, in every list).
                Allowed::any(read),
                // Dropping the TAP when the device stops.
                Allowed::any(close),
            ]),
            ThreadKind::Signals => list.extend([
                // sigwait.
                Allowed::any(rt_sigtimedwait),
            ]),
            ThreadKind::Control => list.extend([
                // One client at a time on control.sock: accept, a read timeout, the request
                // (recvfrom), the answer (sendto), close.
                Allowed::any(accept4),
                Allowed::any(sendto),
                Allowed::when(
                    setsockopt,
                    [[
                        Check::eq(1, SOL_SOCKET, "SOL_SOCKET"),
                        Check::eq(2, SO_RCVTIMEO, "SO_RCVTIMEO"),
                    ]],
                )
                .or([
                    Check::eq(1, SOL_SOCKET, "SOL_SOCKET"),
                    Check::eq(2, SO_SNDTIMEO, "SO_SNDTIMEO"),
                ]),
                Allowed::any(recvfrom),
                Allowed::any(close),
                // A migration's link: a Unix socket in the VM folder, connected to (its
                // timeouts are the setsockopt above; its pages go out with `write`).
                Allowed::when(socket, [[Check::eq(0, AF_UNIX, "AF_UNIX")]]),
                Allowed::any(connect),
                // ... and its writable disks, read through the descriptors the VMM opened at
                // start (no open here): their extents found with lseek, their blocks read.
                Allowed::any(lseek),
                Allowed::any(pread64),
                // Kicking the vCPUs into the pause: pthread_kill is getpid + tgkill.
                Allowed::any(getpid),
                Allowed::any(tgkill),
                // The pause after a failed accept.
                Allowed::any(clock_nanosleep),
                // Snapshots (crate::snapshot): the VM-wide state of the VM file ...
                VM_SNAPSHOT_IOCTLS.iter().skip(1).fold(
                    Allowed::when(
                        ioctl,
                        [[Check::eq(
                            1,
                            VM_SNAPSHOT_IOCTLS[0].0,
                            VM_SNAPSHOT_IOCTLS[0].1,
                        )]],
                    ),
                    |allowed, &(nr, name)| allowed.or([Check::eq(1, nr, name)]),
                ),
                // ... and a new folder and two new files in the VM folder, created write-only
                // (O_EXCL: never over an existing file), written (pwrite64 is a handler call,
                // write an everywhere call), sized and synced.
                Allowed::any(mkdir),
                Allowed::when(
                    openat,
                    [[Check::masked(
                        2,
                        O_ACCMODE | O_CREAT | O_EXCL,
                        O_WRONLY | O_CREAT | O_EXCL,
                        "O_WRONLY|O_CREAT|O_EXCL",
                    )]],
                ),
                Allowed::any(ftruncate),
                Allowed::any(fsync),
            ]),
        }
        list.sort_by_key(|a| a.sysno.name());
        list.dedup_by(|b, a| {
            if a.sysno != b.sysno {
                return false;
            }
            // A call listed twice: any arguments if either entry said so, else both rule sets.
            if a.rules.is_empty() || b.rules.is_empty() {
                a.rules.clear();
            } else {
                a.rules.append(&mut b.rules);
            }
            true
        });
        list
    }
}

const KVM_RUN: u64 = 0xae80; // _IO(KVMIO, 0x80)
const KVM_KVMCLOCK_CTRL: u64 = 0xaead; // _IO(KVMIO, 0xad)

/// `_IOC(dir, KVMIO, nr, size)`: a KVM ioctl's number, as `<linux/kvm.h>` builds it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
/// `_IOR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u64) -> u64 {
    kvm_ioc(2, nr, std::mem::size_of::<T>())
}
/// `_IOW(KVMIO, nr, T)`.
const fn kvm_iow<T>(nr: u64) -> u64 {
    kvm_ioc(1, nr, std::mem::size_of::<T>())
}
/// `_IOWR(KVMIO, nr, T)`.
const fn kvm_iowr<T>(nr: u64) -> u64 {
    kvm_ioc(3, nr, std::mem::size_of::<T>())
}

/// What a parked vCPU reads of itself for a snapshot (crate::snapshot::cpu::VcpuState).
const VCPU_SNAPSHOT_IOCTLS: [(u64, &str); 12] = {
    use kvm_bindings::*;
    [
        (kvm_ior::<kvm_regs>(0x81), "KVM_GET_REGS"),
        (kvm_ior::<kvm_sregs>(0x83), "KVM_GET_SREGS"),
        (kvm_iowr::<kvm_msrs>(0x88), "KVM_GET_MSRS"),
        (kvm_ior::<kvm_fpu>(0x8c), "KVM_GET_FPU"),
        (kvm_ior::<kvm_lapic_state>(0x8e), "KVM_GET_LAPIC"),
        (kvm_iowr::<kvm_cpuid2>(0x91), "KVM_GET_CPUID2"),
        (kvm_ior::<kvm_mp_state>(0x98), "KVM_GET_MP_STATE"),
        (kvm_ior::<kvm_vcpu_events>(0x9f), "KVM_GET_VCPU_EVENTS"),
        (kvm_ior::<kvm_debugregs>(0xa1), "KVM_GET_DEBUGREGS"),
        (kvm_ioc(0, 0xa3, 0), "KVM_GET_TSC_KHZ"),
        (kvm_ior::<kvm_xsave>(0xa4), "KVM_GET_XSAVE"),
        (kvm_ior::<kvm_xcrs>(0xa6), "KVM_GET_XCRS"),
    ]
};

/// What the control thread reads of the VM for a snapshot (crate::snapshot::cpu::VmState).
const VM_SNAPSHOT_IOCTLS: [(u64, &str); 5] = {
    use kvm_bindings::*;
    [
        (kvm_iowr::<kvm_irqchip>(0x62), "KVM_GET_IRQCHIP"),
        (kvm_ior::<kvm_clock_data>(0x7c), "KVM_GET_CLOCK"),
        (kvm_ior::<kvm_pit_state2>(0x9f), "KVM_GET_PIT2"),
        // A live migration (crate::migration) turns dirty-page logging on and off for the VM's
        // memory slots (each registered again, at the same place, with other flags) and reads
        // the log.
        (
            kvm_iow::<kvm_userspace_memory_region>(0x46),
            "KVM_SET_USER_MEMORY_REGION",
        ),
        (kvm_iow::<kvm_dirty_log>(0x42), "KVM_GET_DIRTY_LOG"),
    ]
};
const SOL_SOCKET: u64 = libc::SOL_SOCKET as u64;
const SO_RCVTIMEO: u64 = libc::SO_RCVTIMEO as u64;
const SO_SNDTIMEO: u64 = libc::SO_SNDTIMEO as u64;
const FIONBIO: u64 = libc::FIONBIO;
const AF_UNIX: u64 = libc::AF_UNIX as u64;
const LOCK_UN: u64 = libc::LOCK_UN as u64;
const O_ACCMODE: u64 = libc::O_ACCMODE as u64;
const O_RDONLY: u64 = libc::O_RDONLY as u64;
const O_WRONLY: u64 = libc::O_WRONLY as u64;
const O_CREAT: u64 = libc::O_CREAT as u64;
const O_EXCL: u64 = libc::O_EXCL as u64;
const F_GETFD: u64 = libc::F_GETFD as u64;
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// What the `SIGSYS` handler calls, under whichever filter its thread has: the record
/// (`pwrite64`), the stderr line (`write`) and the exit (`exit_group`).
pub const HANDLER_CALLS: [Sysno; 3] = [Sysno::pwrite64, Sysno::write, Sysno::exit_group];

/// What every Rust thread may do whatever its job: allocate (never executable memory), take
/// locks and wait on channels (`futex`), yield, read the clock when the vDSO cannot, log to
/// stderr and write eventfds (`write`, a handler call), and end the thread (glibc blocks signals
/// and frees the stack and the alternate signal stack).
fn runtime_calls() -> Vec<Allowed> {
    use Sysno::*;
    let no_exec = || [[Check::masked(2, PROT_EXEC, 0, "!PROT_EXEC")]];
    vec![
        Allowed::any(futex),
        Allowed::when(mmap, no_exec()),
        Allowed::when(mprotect, no_exec()),
        Allowed::any(munmap),
        Allowed::any(mremap),
        Allowed::any(madvise),
        Allowed::any(brk),
        Allowed::any(sched_yield),
        Allowed::any(clock_gettime),
        Allowed::any(rt_sigprocmask),
        Allowed::any(sigaltstack),
        Allowed::any(gettid),
        // std checks that a descriptor is open before closing it (debug builds).
        Allowed::when(fcntl, [[Check::eq(1, F_GETFD, "F_GETFD")]]),
        Allowed::any(exit),
    ]
}

/// How an argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    /// `arg == value`.
    Eq,
    /// `arg & mask == value`.
    Masked(u64),
}

/// One condition on one syscall argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    arg: u8,
    op: CmpOp,
    value: u64,
    /// What the value means (`KVM_RUN`, `AF_UNIX`), for the printed list.
    label: &'static str,
}

impl Check {
    /// `arg == value`.
    fn eq(arg: u8, value: u64, label: &'static str) -> Self {
        Self {
            arg,
            op: CmpOp::Eq,
            value,
            label,
        }
    }

    /// `arg & mask == value`.
    fn masked(arg: u8, mask: u64, value: u64, label: &'static str) -> Self {
        Self {
            arg,
            op: CmpOp::Masked(mask),
            value,
            label,
        }
    }

    fn condition(&self) -> Result<SeccompCondition, seccompiler::Error> {
        let op = match self.op {
            CmpOp::Eq => SeccompCmpOp::Eq,
            CmpOp::Masked(mask) => SeccompCmpOp::MaskedEq(mask),
        };
        // Every value compared here fits 32 bits; a Dword compare ignores the upper half the
        // kernel does not define for `int` arguments.
        SeccompCondition::new(self.arg, SeccompCmpArgLen::Dword, op, self.value)
            .map_err(seccompiler::Error::Backend)
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op {
            CmpOp::Eq => write!(f, "arg{} == {:#x} ({})", self.arg, self.value, self.label),
            CmpOp::Masked(mask) => write!(
                f,
                "arg{} & {mask:#x} == {:#x} ({})",
                self.arg, self.value, self.label
            ),
        }
    }
}

/// One allowed syscall. With no rules it is allowed with any arguments; otherwise it is allowed
/// when every check of at least one rule holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    sysno: Sysno,
    rules: Vec<Vec<Check>>,
}

impl Allowed {
    /// `sysno` with any arguments.
    fn any(sysno: Sysno) -> Self {
        Self {
            sysno,
            rules: Vec::new(),
        }
    }

    /// `sysno` when one of `rules` holds.
    fn when<const N: usize, const M: usize>(sysno: Sysno, rules: [[Check; M]; N]) -> Self {
        Self {
            sysno,
            rules: rules.into_iter().map(Vec::from).collect(),
        }
    }

    /// One more rule that allows the call.
    fn or<const M: usize>(mut self, rule: [Check; M]) -> Self {
        self.rules.push(Vec::from(rule));
        self
    }

    /// The syscall.
    pub fn sysno(&self) -> Sysno {
        self.sysno
    }
}

impl std::fmt::Display for Allowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sysno.name())?;
        for rule in &self.rules {
            f.write_str("\n    if ")?;
            for (i, check) in rule.iter().enumerate() {
                if i > 0 {
                    f.write_str(" && ")?;
                }
                write!(f, "{check}")?;
            }
        }
        Ok(())
    }
}

/// Compiles the filter of `kind` to BPF: its allowlist, and [`SeccompAction::Trap`] for the rest.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e| SeccompError::Compile(kind.name(), e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in kind.allowlist() {
        let chain = allowed
            .rules
            .iter()
            .map(|rule| {
                let conditions = rule
                    .iter()
                    .map(Check::condition)
                    .collect::<Result<Vec<_>, _>>()?;
                SeccompRule::new(conditions).map_err(seccompiler::Error::Backend)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        rules.insert(i64::from(allowed.sysno.id()), chain);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| err(seccompiler::Error::Backend(e)))?;
    BpfProgram::try_from(filter).map_err(|e| err(seccompiler::Error::Backend(e)))
}

/// Every filter as text, sorted and stable: what `nanoclaw-vmm --print-seccomp` prints and
/// `host-agent/vmm/seccomp-filters.txt` holds.
pub fn describe() -> String {
    let mut out = String::from(
        "# nanoclaw-vmm seccomp filters (x86_64). Any other call: SIGSYS, exit code 14.\n\
         # Generated by `nanoclaw-vmm --print-seccomp`; see host-agent/vmm/src/seccomp.rs.\n",
    );
    for kind in ThreadKind::ALL {
        let list = kind.allowlist();
        let _ = write!(out, "\n[{}] {} syscalls\n", kind.name(), list.len());
        for allowed in list {
            let _ = writeln!(out, "{allowed}");
        }
    }
    out
}

/// The compiled filters, one per kind, made by [`prepare`].
static FILTERS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();
/// `exit.json`, opened by [`prepare`] for the `SIGSYS` handler (-1 before).
static EXIT_RECORD_FD: AtomicI32 = AtomicI32::new(-1);
/// Whether `--test-forbidden-syscall` asked for the hook.
static TEST_HOOK_ARMED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The kind of filter this thread installed (0: none), for the `SIGSYS` report.
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Opens `<vm_dir>/exit.json` (truncating a stale record: an empty record reads as absent) for
/// the `SIGSYS` handler, installs the handler, and compiles every filter. Call it on the main
/// thread before any other thread exists; [`confine_current_thread`] does nothing before it.
pub fn prepare(vm_dir: &Path) -> Result<(), SeccompError> {
    if FILTERS.get().is_some() {
        return Err(SeccompError::AlreadyPrepared);
    }
    let filters = ThreadKind::ALL
        .into_iter()
        .map(|kind| compile(kind).map(|bpf| (kind, bpf)))
        .collect::<Result<Vec<_>, _>>()?;
    single_malloc_arena();
    std::fs::create_dir_all(vm_dir).map_err(SeccompError::VmDir)?;
    let record = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(vm_dir.join(crate::EXIT_RECORD_NAME))
        .map_err(SeccompError::ExitRecord)?;
    // Kept open for the life of the process (the handler may run at any time); O_CLOEXEC is
    // std's default.
    let old = EXIT_RECORD_FD.swap(record.into_raw_fd(), Ordering::AcqRel);
    if old >= 0 {
        // SAFETY: `old` came from `into_raw_fd` above in an earlier call and nothing else owns
        // it; closing it once is sound.
        unsafe { libc::close(old) };
    }
    install_handler()?;
    FILTERS
        .set(filters)
        .map_err(|_| SeccompError::AlreadyPrepared)
}

/// Installs the filter of `kind` on the calling thread, if [`prepare`] ran (otherwise, as in
/// unit tests that drive devices directly, does nothing). The filter stays for the thread's
/// life and is inherited by any thread it spawns.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let Some((_, bpf)) = filters.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    THREAD_KIND.with(|c| c.set(kind.index()));
    seccompiler::apply_filter(bpf).map_err(|e| SeccompError::Install(kind.name(), e))?;
    tracing::debug!(thread = kind.name(), "seccomp filter installed");
    Ok(())
}

/// [`confine_current_thread`], or, when the kernel refuses the filter, ends the process with the
/// setup-error exit code: the VMM never runs a thread unconfined. The filters were compiled and
/// tested by [`prepare`], so this is a kernel without seccomp filters, not a bad list.
pub fn confine_or_exit(kind: ThreadKind) {
    if let Err(e) = confine_current_thread(kind) {
        tracing::error!(error = %crate::error_chain(&e), "cannot confine a VMM thread; exiting");
        std::process::exit(crate::exit::SETUP_ERROR_EXIT_CODE);
    }
}

/// Arms the `--test-forbidden-syscall` hook (see [`fire_test_hook`]).
pub fn arm_test_hook() {
    TEST_HOOK_ARMED.store(true, Ordering::Release);
}

/// Test hook: when armed, makes [`TEST_FORBIDDEN_SYSCALL`], which no filter allows, so the VMM
/// ends through the `SIGSYS` handler. The VMM calls it on the thread that sees the guest ready.
pub fn fire_test_hook() {
    if TEST_HOOK_ARMED.swap(false, Ordering::AcqRel) {
        tracing::warn!(
            syscall = TEST_FORBIDDEN_SYSCALL.name(),
            "test hook: making a forbidden syscall"
        );
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::syscall(TEST_FORBIDDEN_SYSCALL.id() as libc::c_long) };
    }
}

/// Makes glibc's malloc use its main arena for every thread.
///
/// By default each thread may get an arena of its own, carved from `mmap`ed heaps. The first
/// time such a heap shrinks, glibc opens `/proc/sys/vm/overcommit_memory` to choose how
/// (`check_may_shrink_heap`), from whichever thread frees the memory: seen in the nested runs
/// as an `openat` on the vsock thread at the end of a 1 MiB echo. No device thread should be
/// allowed to open files, so the VMM keeps one arena (`M_ARENA_MAX` = 1), as a musl-linked VMM
/// such as Firecracker effectively does. Its threads allocate little, so the shared arena's lock
/// costs nothing measurable.
fn single_malloc_arena() {
    // SAFETY: mallopt only sets a malloc tunable; it is called before any other thread exists.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX, 1) failed; a thread may trap on glibc's heap trim");
    }
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask, default handler)
    // that is then filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialise; `sigaction` reads a fully
    // initialised struct, and `handle_sigsys` has the SA_SIGINFO signature and is
    // async-signal-safe.
    let rc = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `si_code` of a `SIGSYS` raised by a seccomp filter (`SYS_SECCOMP` in
/// `<asm-generic/siginfo.h>`).
const SYS_SECCOMP: libc::c_int = 1;
/// Offset of `_sigsys._syscall` in `siginfo_t` on x86_64: `si_signo`, `si_errno`, `si_code`
/// (12 bytes) and padding put the union at 16, where `_call_addr` (a pointer) comes first.
const SIGSYS_SYSCALL_OFFSET: usize = 24;

/// A fixed buffer that text is appended to without allocating; what does not fit is dropped.
struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            if self.len < N {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    fn push_int(&mut self, n: i64) -> &mut Self {
        if n < 0 {
            self.push("-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            if self.len < N {
                self.buf[self.len] = d;
                self.len += 1;
            }
        }
        self
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The `exit.json` record for forbidden syscall `nr`. Syscall names are plain identifiers, so no
/// JSON escaping is needed.
fn record(nr: i32) -> StackText<160> {
    let name = syscall_name(nr);
    let mut text = StackText::new();
    text.push(r#"{"reason":"seccomp","exit_code":"#)
        .push_int(i64::from(SECCOMP_EXIT_CODE))
        .push(r#","syscall":""#)
        .push(name)
        .push(r#"","syscall_nr":"#)
        .push_int(i64::from(nr))
        .push("}\n");
    text
}

/// The name of syscall `nr`, or `unknown`.
pub fn syscall_name(nr: i32) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map_or("unknown", |s| s.name())
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Everything here is async-signal-safe: no allocation, no locks, no tracing; only pwrite,
    // write and _exit, which every filter allows (HANDLER_CALLS).
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; `si_code` is read
    // through libc's field, and for SYS_SECCOMP the `_sigsys` member is the active one, whose int
    // `_syscall` lies at SIGSYS_SYSCALL_OFFSET (checked against <asm-generic/siginfo.h>, and by
    // the subprocess test that expects the right name).
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr =
            std::ptr::read_unaligned(info.cast::<u8>().add(SIGSYS_SYSCALL_OFFSET).cast::<i32>());
        (code, nr)
    };
    let nr = if code == SYS_SECCOMP { nr } else { -1 };
    let rec = record(nr);
    let fd = EXIT_RECORD_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let bytes = rec.as_bytes();
        // SAFETY: `bytes` is a live stack buffer of `bytes.len()` bytes; `fd` is the record
        // opened by `prepare` and never closed while the process lives.
        unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), 0) };
    }
    let thread = THREAD_KIND
        .try_with(Cell::get)
        .ok()
        .and_then(ThreadKind::from_index)
        .map_or("unconfined", ThreadKind::name);
    let mut line = StackText::<160>::new();
    line.push("nanoclaw-vmm: seccomp: the ")
        .push(thread)
        .push(" thread made a forbidden syscall ")
        .push(syscall_name(nr))
        .push(" (")
        .push_int(i64::from(nr))
        .push("); exiting\n");
    let bytes = line.as_bytes();
    // SAFETY: as above, a live stack buffer; fd 2 is stderr (a failed write changes nothing).
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(SECCOMP_EXIT_CODE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot ioctls' numbers, as `<linux/kvm.h>` gives them on x86_64.
    #[test]
    fn snapshot_ioctl_numbers_match_the_kernel_headers() {
        let expected = [
            ("KVM_GET_REGS", 0x8090_ae81),
            ("KVM_GET_SREGS", 0x8138_ae83),
            ("KVM_GET_MSRS", 0xc008_ae88),
            ("KVM_GET_FPU", 0x81a0_ae8c),
            ("KVM_GET_LAPIC", 0x8400_ae8e),
            ("KVM_GET_CPUID2", 0xc008_ae91),
            ("KVM_GET_MP_STATE", 0x8004_ae98),
            ("KVM_GET_VCPU_EVENTS", 0x8040_ae9f),
            ("KVM_GET_DEBUGREGS", 0x8080_aea1),
            ("KVM_GET_TSC_KHZ", 0xaea3),
            ("KVM_GET_XSAVE", 0x9000_aea4),
            ("KVM_GET_XCRS", 0x8188_aea6),
            ("KVM_GET_IRQCHIP", 0xc208_ae62),
            ("KVM_GET_CLOCK", 0x8030_ae7c),
            ("KVM_GET_PIT2", 0x8070_ae9f),
            ("KVM_SET_USER_MEMORY_REGION", 0x4020_ae46),
            ("KVM_GET_DIRTY_LOG", 0x4010_ae42),
        ];
        let ours: Vec<(&str, u64)> = VCPU_SNAPSHOT_IOCTLS
            .iter()
            .chain(&VM_SNAPSHOT_IOCTLS)
            .map(|&(nr, name)| (name, nr))
            .collect();
        for (name, nr) in expected {
            assert!(
                ours.contains(&(name, nr)),
                "{name} is not {nr:#x} in {ours:x?}"
            );
        }
        assert_eq!(ours.len(), expected.len());
    }

    #[test]
    fn every_filter_compiles_to_bpf() {
        for kind in ThreadKind::ALL {
            let bpf = compile(kind).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
            assert!(!bpf.is_empty());
            // The kernel's limit on one filter.
            assert!(
                bpf.len() < 4096,
                "{}: {} instructions",
                kind.name(),
                bpf.len()
            );
        }
    }

    #[test]
    fn every_filter_lets_the_handler_work_and_none_has_the_test_syscall() {
        for kind in ThreadKind::ALL {
            let list = kind.allowlist();
            let has = |s: Sysno| list.iter().any(|a| a.sysno == s);
            for s in HANDLER_CALLS {
                assert!(has(s), "{}: {}", kind.name(), s.name());
            }
            assert!(!has(TEST_FORBIDDEN_SYSCALL), "{}", kind.name());
            assert!(!has(Sysno::execve), "{}", kind.name());
            // `--cpus` holds: no thread may move itself (or another) to other CPUs.
            assert!(!has(Sysno::sched_setaffinity), "{}", kind.name());
            // Sorted by name, each call once.
            let names: Vec<_> = list.iter().map(|a| a.sysno.name()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(names, sorted, "{}", kind.name());
        }
        // Only the threads the VMM spawns before its own filter may create none: no clone.
        for kind in ThreadKind::ALL {
            let list = kind.allowlist();
            assert!(
                !list.iter().any(|a| a.sysno == Sysno::clone3),
                "{}",
                kind.name()
            );
        }
    }

    #[test]
    fn the_net_thread_cannot_configure_its_tap_or_reach_a_socket_or_file() {
        let list = ThreadKind::Net.allowlist();
        let has = |s: Sysno| list.iter().any(|a| a.sysno == s);
        for s in [Sysno::read, Sysno::write, Sysno::epoll_wait, Sysno::close] {
            assert!(has(s), "{}", s.name());
        }
        for s in [
            Sysno::ioctl,
            Sysno::socket,
            Sysno::connect,
            Sysno::openat,
            Sysno::epoll_ctl,
            Sysno::sendto,
            Sysno::unlink,
        ] {
            assert!(!has(s), "{}", s.name());
        }
    }

    #[test]
    fn the_record_is_json_naming_the_call() {
        let rec = record(110);
        let v: serde_json::Value = serde_json::from_slice(rec.as_bytes()).unwrap();
        assert_eq!(v["reason"], "seccomp");
        assert_eq!(v["exit_code"], 14);
        assert_eq!(v["syscall"], "getppid");
        assert_eq!(v["syscall_nr"], 110);
        let v: serde_json::Value = serde_json::from_slice(record(-1).as_bytes()).unwrap();
        assert_eq!(v["syscall"], "unknown");
        assert_eq!(v["syscall_nr"], -1);
        assert_eq!(syscall_name(100_000), "unknown");
        assert_eq!(syscall_name(i32::MIN), "unknown");
    }

    /// Set in the child process of the subprocess tests: the VM folder, then `:` and what the
    /// confined thread does wrong.
    const CHILD_ENV: &str = "NANOCLAW_SECCOMP_TEST_CHILD";

    /// The child's side of [`forbidden_call_in_a_child`]: prepares the filters, then a thread
    /// installs the vCPU filter, makes allowed calls (a KVM_RUN ioctl on a bad fd fails with
    /// EBADF instead of trapping; a non-executable mapping works), says so, and then makes the
    /// forbidden call. Does nothing in a normal test run.
    #[test]
    fn seccomp_child_process() {
        let Some(spec) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let spec = spec.into_string().unwrap();
        let (dir, what) = spec.rsplit_once(':').unwrap();
        prepare(Path::new(dir)).unwrap();
        let what = what.to_owned();
        let thread = std::thread::spawn(move || {
            confine_current_thread(ThreadKind::Vcpu).unwrap();
            // SAFETY: an ioctl on an fd that is not open touches no memory; it fails with EBADF.
            let rc = unsafe { libc::ioctl(-1, KVM_RUN as _, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((rc, errno), (-1, Some(libc::EBADF)));
            // SAFETY: a fresh anonymous private mapping, unmapped right away; no memory is shared.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                libc::munmap(p, 4096);
            }
            eprintln!("ALLOWED CALLS OK");
            match what.as_str() {
                "getppid" => {
                    // SAFETY: getppid has no arguments.
                    unsafe { libc::getppid() };
                }
                "exec-mmap" => {
                    // SAFETY: as above; PROT_EXEC is what the filter refuses.
                    unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                }
                other => panic!("unknown child action {other}"),
            }
            eprintln!("STILL ALIVE");
        });
        let _ = thread.join();
        // Not reached when the handler ended the process.
        std::process::exit(3);
    }

    /// Runs [`seccomp_child_process`] in a child process doing `what`; returns its exit code,
    /// its stderr and its exit.json.
    fn forbidden_call_in_a_child(what: &str) -> (Option<i32>, String, serde_json::Value) {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::seccomp_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}:{what}", dir.path().display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let text = std::fs::read_to_string(dir.path().join(crate::EXIT_RECORD_NAME)).unwrap();
        let record = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("exit.json {text:?}: {e}; stderr: {stderr}"));
        (out.status.code(), stderr, record)
    }

    #[test]
    fn a_forbidden_syscall_ends_the_process_with_14_and_a_record() {
        let (code, stderr, record) = forbidden_call_in_a_child("getppid");
        assert_eq!(code, Some(14), "{stderr}");
        assert!(stderr.contains("ALLOWED CALLS OK"), "{stderr}");
        assert!(!stderr.contains("STILL ALIVE"), "{stderr}");
        assert!(
            stderr.contains("the vcpu thread made a forbidden syscall getppid (110)"),
            "{stderr}"
        );
        assert_eq!(record["reason"], "seccomp");
        assert_eq!(record["exit_code"], 14);
        assert_eq!(record["syscall"], "getppid");
        assert_eq!(record["syscall_nr"], libc::SYS_getppid);
    }

    #[test]
    fn an_executable_mapping_is_refused_by_its_argument_condition() {
        let (code, stderr, record) = forbidden_call_in_a_child("exec-mmap");
        assert_eq!(code, Some(14), "{stderr}");
        assert!(stderr.contains("ALLOWED CALLS OK"), "{stderr}");
        assert_eq!(record["syscall"], "mmap", "{stderr}");
        assert_eq!(record["syscall_nr"], libc::SYS_mmap);
    }

    #[test]
    fn the_description_names_every_kind_and_its_conditions() {
        let text = describe();
        for kind in ThreadKind::ALL {
            assert!(text.contains(&format!("[{}] ", kind.name())), "{text}");
        }
        assert!(
            text.contains("ioctl\n    if arg1 == 0xae80 (KVM_RUN)"),
            "{text}"
        );
        assert!(
            text.contains("socket\n    if arg0 == 0x1 (AF_UNIX)"),
            "{text}"
        );
        assert_eq!(text, describe(), "stable");
    }
}
