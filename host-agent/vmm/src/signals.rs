//! Signal handling for the VMM process.
//!
//! - **Termination.** SIGTERM and SIGINT are blocked in every thread (the mask is set before any
//!   thread is spawned and inherited) and taken synchronously by one waiter thread with
//!   `sigwait`, so no handler runs arbitrary code.
//! - **vCPU kicks.** A real-time signal interrupts a vCPU thread inside `KVM_RUN`. Its handler
//!   sets `immediate_exit` in that thread's `kvm_run` page, so a kick that lands just before the
//!   thread re-enters the guest still makes `KVM_RUN` return at once with `EINTR`.

use std::cell::Cell;
use std::ptr;
use std::sync::mpsc::Sender;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, block_signal, create_sigset, register_signal_handler};

use super::exit::VmEvent;

/// Errors from setting up signal handling.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Blocking a termination signal failed.
    #[error("block signal {signal}: {detail}")]
    Block {
        /// The signal number.
        signal: i32,
        /// What failed (`vmm_sys_util::signal::Error` is not a `std::error::Error`).
        detail: String,
    },
    /// Building the signal set for `sigwait` failed.
    #[error("build termination signal set")]
    SigSet(#[source] vmm_sys_util::errno::Error),
    /// Installing the vCPU kick handler failed.
    #[error("install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// Spawning the waiter thread failed.
    #[error("spawn the signal waiter thread")]
    SpawnWaiter(#[source] std::io::Error),
}

/// The signals that stop the VMM.
pub const TERMINATION_SIGNALS: [i32; 2] = [libc::SIGTERM, libc::SIGINT];

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` page, if it runs a vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// Records the calling vCPU thread's `kvm_run` page for the kick handler.
///
/// # Safety
///
/// `run` must point to the `kvm_run` mapping of a vCPU owned by the calling thread and must stay
/// valid until [`clear_thread_kvm_run`] is called on this thread (call it before dropping the
/// vCPU).
pub unsafe fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Forgets the calling thread's `kvm_run` page.
pub fn clear_thread_kvm_run() {
    KVM_RUN.with(|c| c.set(ptr::null_mut()));
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never panics (the slot may be gone while the thread exits); a const-initialised
    // thread local needs no allocation, so this is async-signal-safe.
    let _ = KVM_RUN.try_with(|c| {
        let run = c.get();
        if !run.is_null() {
            // SAFETY: `set_thread_kvm_run`'s contract keeps `run` valid while it is recorded, and
            // the handler runs on the thread that recorded it. A volatile single-byte store is
            // what KVM reads on the next `KVM_RUN` entry; the vCPU thread itself is interrupted,
            // so nothing else writes the byte concurrently.
            unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the vCPU kick handler (process-wide).
pub fn install_kick_handler() -> Result<(), SignalError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(SignalError::KickHandler)
}

/// Blocks SIGTERM and SIGINT in the calling thread; threads spawned afterwards inherit the mask.
/// Call this before spawning any thread.
pub fn block_termination_signals() -> Result<(), SignalError> {
    for signal in TERMINATION_SIGNALS {
        match block_signal(signal) {
            Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => {
                return Err(SignalError::Block {
                    signal,
                    detail: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Spawns the thread that waits for SIGTERM or SIGINT and reports it as [`VmEvent::Signal`].
/// The signals must already be blocked ([`block_termination_signals`]).
pub fn spawn_termination_waiter(events: Sender<VmEvent>) -> Result<(), SignalError> {
    let set = create_sigset(&TERMINATION_SIGNALS).map_err(SignalError::SigSet)?;
    std::thread::Builder::new()
        .name("vmm-signals".into())
        .spawn(move || {
            crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Signals);
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is an initialised signal set and `signal` a valid out-pointer;
                // `sigwait` only reads the one and writes the other.
                let rc = unsafe { libc::sigwait(&set, &mut signal) };
                if rc == 0 {
                    tracing::info!(signal, "received termination signal");
                    // The receiver may be gone when the VM already ended; nothing to do then.
                    let _ = events.send(VmEvent::Signal(signal));
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(SignalError::SpawnWaiter)
}
