//! [`Vmm`]: builds a microVM from a [`VmConfig`] and runs it until it ends.
//!
//! Setup order matters to KVM: the TSS and identity-map addresses and the in-kernel irqchip and
//! PIT come before any vCPU; memory slots before the kernel is loaded; the irqchip before irqfds
//! and before each vCPU's LAPIC is written.

use crate::memory::GuestRam;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::Killable;

use super::console::{ConsoleEvent, ConsoleSink};
use super::devices::bus::{Bus, BusError};
use super::devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use super::devices::serial::{COM1_PORT, SerialDevice, UART_PORT_LEN};
use super::devices::virtio::net::{NetError, Tap};
use super::devices::virtio::{
    BlockConfig, BlockHandle, MmioSlot, NetHandle, VirtioDevices, VirtioError, VsockConfig,
    VsockHandle, VsockHooks, attach_block, attach_net, attach_vsock,
};
use super::exit::{DiskRecord, ExitDecider, ExitReason, ExitReport, PANIC_GRACE, VmEvent};
use super::layout::{
    FIRST_DISK_MMIO_SLOT, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, NIC_MMIO_SLOT, SERIAL_GSI,
    VIRTIO_MMIO_SLOT_LEN, VSOCK_MMIO_SLOT, e820_map, virtio_mmio_slot,
};
use super::seccomp::{self, ThreadKind};
use super::snapshot::{self, HostSupport};
use super::timeline::BootTimeline;
use super::vcpu::{RunGate, VcpuError, VcpuRunner};
use super::x86_64::mptable::{self, MptableError};
use super::x86_64::regs::{self, RegsError};
use super::{
    ConfigError, ConsoleTarget, EXIT_RECORD_NAME, VmConfig, boot, control, memory, signals, vcpu,
};

/// How long to keep kicking a vCPU thread that has not stopped.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between kicks.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Errors from building or starting the VM. Each is a setup error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[source] ConfigError),
    /// Signal handling could not be set up.
    #[error("set up signal handling")]
    Signals(#[source] signals::SignalError),
    /// The seccomp filters or the `SIGSYS` handler could not be set up.
    #[error("set up seccomp")]
    Seccomp(#[source] seccomp::SeccompError),
    /// Creating or clearing the VM directory failed.
    #[error("prepare vm-dir {path}")]
    VmDir {
        /// The VM directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Opening the console file failed.
    #[error("open console file {path}")]
    Console {
        /// The console path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Opening `/dev/kvm` failed.
    #[error("open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the VMM needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// `KVM_CREATE_VM` failed.
    #[error("create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("set the identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// Guest memory could not be set up.
    #[error("set up guest memory")]
    Memory(#[source] memory::MemoryError),
    /// `KVM_CREATE_VCPU` failed.
    #[error("create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("get supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// Creating the serial interrupt eventfd failed.
    #[error("create the serial interrupt eventfd")]
    SerialEventFd(#[source] std::io::Error),
    /// Registering the serial irqfd failed.
    #[error("register the serial irqfd on GSI {gsi}")]
    SerialIrqfd {
        /// The serial GSI.
        gsi: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Putting a legacy device on the port-I/O bus failed.
    #[error("insert {0} on the port-I/O bus")]
    PioBus(&'static str, #[source] BusError),
    /// No virtio-mmio slot is left.
    #[error("no virtio-mmio slot {0}")]
    NoMmioSlot(u32),
    /// Attaching the vsock device failed.
    #[error("attach the vsock device")]
    Vsock(#[source] VirtioError),
    /// Attaching a disk failed.
    #[error("attach disk {index} ({path})")]
    Disk {
        /// Its place in `VmConfig::disks` (0 is `/dev/vda`).
        index: usize,
        /// Its backing file.
        path: String,
        /// The cause.
        #[source]
        source: VirtioError,
    },
    /// Attaching to the TAP failed.
    #[error("open the network device's TAP")]
    OpenTap(#[source] NetError),
    /// The config has a network device but no TAP was opened for it.
    #[error("the network device's TAP was not opened before the VM was built")]
    TapNotOpened,
    /// The config restores a snapshot but its files were not opened before the VM was built.
    #[error("the snapshot's files were not opened before the VM was built")]
    SnapshotNotOpened,
    /// Attaching the network device failed.
    #[error("attach the network device")]
    Net(#[source] VirtioError),
    /// Loading the guest failed.
    #[error("load the guest")]
    Boot(#[source] boot::BootError),
    /// Writing the boot page tables or GDT failed.
    #[error("write boot tables")]
    BootTables(#[source] RegsError),
    /// Writing the MP table failed.
    #[error("write the MP table")]
    Mptable(#[source] MptableError),
    /// Configuring a vCPU failed.
    #[error("configure vCPUs")]
    Vcpu(#[source] VcpuError),
    /// Writing `exit.json` failed.
    #[error("write {EXIT_RECORD_NAME}")]
    WriteExitRecord(#[source] std::io::Error),
    /// Connecting to the migration socket failed.
    #[error("connect to the migration socket {path}")]
    MigrationLink {
        /// The socket.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config migrates a VM in but its link was not opened before the VM was built.
    #[error("the migration link was not opened before the VM was built")]
    MigrationNotOpened,
    /// Receiving a migrating VM failed.
    #[error("receive the migrating VM")]
    Migration(#[source] crate::migration::MigrationError),
    /// Restoring the snapshot failed.
    #[error("restore the snapshot in {path}")]
    Restore {
        /// The snapshot folder.
        path: String,
        /// The cause.
        #[source]
        source: snapshot::SnapshotError,
    },
}

/// Host devices the VMM opens before it enters its jail, while it still sees the host's device
/// nodes, the host's files and the network namespace it was started in: the network device's
/// TAP, and the snapshot to restore.
#[derive(Debug, Default)]
pub struct HostDevices {
    /// The TAP of [`VmConfig::net`], attached.
    pub tap: Option<Tap>,
    /// The files of [`VmConfig::restore`]'s snapshot, open read-only.
    pub snapshot: Option<snapshot::SnapshotFiles>,
    /// The link of [`VmConfig::migrate_from`], connected.
    pub migration: Option<std::os::unix::net::UnixStream>,
}

impl HostDevices {
    /// Opens what `config` needs: attaches to its TAP by name (see [`Tap::open`]) and opens
    /// the snapshot's files (see [`snapshot::SnapshotFiles`]).
    pub fn open(config: &VmConfig) -> Result<Self, VmmError> {
        let tap = config
            .net
            .as_ref()
            .map(|net| Tap::open(&net.tap))
            .transpose()
            .map_err(VmmError::OpenTap)?;
        let snapshot = config
            .restore
            .as_ref()
            .map(|r| snapshot::SnapshotFiles::open(&r.dir).map_err(|e| restore_err(config, e)))
            .transpose()?;
        let migration = config
            .migrate_from
            .as_ref()
            .map(|path| {
                let link = std::os::unix::net::UnixStream::connect(path)?;
                // A source that stalls ends the migration instead of holding this VMM.
                link.set_read_timeout(Some(crate::control::MIGRATION_LINK_TIMEOUT))?;
                link.set_write_timeout(Some(crate::control::MIGRATION_LINK_TIMEOUT))?;
                Ok(link)
            })
            .transpose()
            .map_err(|source| VmmError::MigrationLink {
                path: config
                    .migrate_from
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            })?;
        Ok(Self {
            tap,
            snapshot,
            migration,
        })
    }
}

/// The target's answer to a migration's source, owed once the VM is received: `Resumed` when
/// the VM is about to run ([`MigrationAnswer::resumed`]), a refusal when this VMM fails before
/// that (dropped unanswered, on any error path), so that the source knows it may run the VM
/// again.
struct MigrationAnswer(Option<std::os::unix::net::UnixStream>);

impl MigrationAnswer {
    fn resumed(mut self) {
        if let Some(mut link) = self.0.take()
            && let Err(e) = crate::migration::answer(&mut link, Ok(()))
        {
            // The VM runs here either way: the source, without an answer, stays paused until
            // its daemon learns from this host that the VM runs here.
            tracing::error!(error = %crate::error_chain(&e), "the migration's source did not take the answer");
        }
    }
}

impl Drop for MigrationAnswer {
    fn drop(&mut self) {
        if let Some(mut link) = self.0.take() {
            let why = "the target VMM failed to build the VM (its log says why)";
            let _ = crate::migration::answer(&mut link, Err(&why));
        }
    }
}

/// A built microVM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPU files and devices go before the VM file, and guest
    // memory is dropped last, after every KVM object that maps it.
    vcpus: Vec<VcpuFd>,
    vsock: Option<VsockHandle>,
    disks: Vec<BlockHandle>,
    net: Option<NetHandle>,
    serial: Arc<Mutex<SerialDevice<ConsoleSink>>>,
    pio: Bus,
    mmio: Bus,
    events: Sender<VmEvent>,
    ready_ms: Arc<OnceLock<u64>>,
    /// The control socket, served from [`Vmm::run`] on (see [`crate::control`]).
    control: Option<std::os::unix::net::UnixListener>,
    /// What snapshots need from KVM; `None` when the probe failed (no snapshots then).
    snapshot_host: Option<Arc<HostSupport>>,
    /// The i8042, whose state a snapshot saves (the port-I/O bus holds it too).
    i8042: Arc<Mutex<I8042>>,
    /// The virtio transports, which a pause quiesces and a snapshot saves.
    virtio: VirtioDevices,
    /// The VM's folder, where snapshots are made.
    vm_dir: std::path::PathBuf,
    /// Whether the vCPUs start parked (`--restore-paused`).
    start_paused: bool,
    /// A migrating VM's link, to answer the source once the VM is about to run.
    migration_answer: Option<MigrationAnswer>,
    /// The boot timeline so far, for vCPU 0 to report at its first run.
    timeline: Option<BootTimeline>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestRam,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

fn check_capabilities(kvm: &Kvm) -> Result<(), VmmError> {
    let needed = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCapability(name));
        }
    }
    Ok(())
}

fn open_console(target: &ConsoleTarget) -> Result<Box<dyn Write + Send>, VmmError> {
    match target {
        ConsoleTarget::Stdout => Ok(Box::new(std::io::stdout())),
        ConsoleTarget::File(path) => File::create(path)
            .map(|f| Box::new(f) as Box<dyn Write + Send>)
            .map_err(|source| VmmError::Console {
                path: path.display().to_string(),
                source,
            }),
    }
}

/// Removes `path` if it exists (a stale socket or exit record from an earlier run).
fn remove_stale(path: &std::path::Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::VmDir {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl Vmm {
    /// Builds the VM: everything up to, not including, starting the vCPUs. `host` holds the
    /// host devices opened before the jail. `events` receives every event that can end the VM;
    /// [`Vmm::run`] takes the matching receiver.
    pub fn new(
        config: &VmConfig,
        mut host_files: HostDevices,
        process_start: Instant,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmmError> {
        let vm_dir_err = |source| VmmError::VmDir {
            path: config.vm_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&config.vm_dir).map_err(vm_dir_err)?;
        // A stale exit.json is not removed here: `seccomp::prepare` (called by `run` before any
        // thread exists) truncated it and holds it open for the SIGSYS handler.
        remove_stale(&config.vsock_path())?;
        let control_path = config.vm_dir.join(control::CONTROL_SOCKET_NAME);
        remove_stale(&control_path)?;
        let control = control::bind(&control_path).map_err(|source| VmmError::VmDir {
            path: control_path.display().to_string(),
            source,
        })?;

        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        check_capabilities(&kvm)?;
        let mut timeline = BootTimeline::new(process_start);
        let vm = kvm.create_vm().map_err(VmmError::CreateVm)?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmmError::SetTssAddress)?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmmError::SetIdentityMapAddress)?;
        vm.create_irq_chip().map_err(VmmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(VmmError::CreatePit)?;
        timeline.mark("vm");
        let snapshot_host = match HostSupport::probe(&kvm, &vm) {
            Ok(host) => Some(Arc::new(host)),
            Err(e) if config.migrate_from.is_some() => {
                return Err(VmmError::Migration(e.into()));
            }
            Err(e) if config.restore.is_none() => {
                tracing::warn!(error = %crate::error_chain(&e), "snapshots are unavailable");
                None
            }
            Err(source) => return Err(restore_err(config, source)),
        };
        // A snapshot to restore is read and checked before anything is built from it.
        let mut restored = match (&config.restore, &snapshot_host) {
            (Some(restore), Some(host)) => {
                let files = host_files
                    .snapshot
                    .take()
                    .ok_or(VmmError::SnapshotNotOpened)?;
                let state = snapshot::open_for_restore(restore, &files, host)
                    .map_err(|source| restore_err(config, source))?;
                Some((Some(files), state))
            }
            _ => None,
        };

        let mem_size = config.memory_bytes();
        // A restored guest's RAM is its snapshot's memory file, mapped copy-on-write.
        let mem = match &restored {
            Some((Some(files), state)) => snapshot::map_memory(files, state, mem_size)
                .map_err(|source| restore_err(config, source))?,
            _ => memory::create_guest_memory(mem_size).map_err(VmmError::Memory)?,
        };
        memory::register_guest_memory(&vm, &mem).map_err(VmmError::Memory)?;
        timeline.mark("memory");
        // A migrating VM's memory and state come over its link, into the fresh memory; from
        // here, any failure answers the source with a refusal (see `MigrationAnswer`).
        let migration_answer = match (&config.migrate_from, &snapshot_host) {
            (Some(_), Some(host)) => {
                let mut link = host_files
                    .migration
                    .take()
                    .ok_or(VmmError::MigrationNotOpened)?;
                // The writable disks, opened (and locked) only while their blocks come in;
                // the block devices open them again below.
                let disks = match target_disks(config) {
                    Ok(disks) => disks,
                    Err(e) => {
                        let _ = crate::migration::answer(&mut link, Err(&e));
                        return Err(e);
                    }
                };
                let received = match crate::migration::receive(&mut link, &mem, &disks, host) {
                    Ok(received) => received,
                    Err(e) => {
                        let _ = crate::migration::answer(&mut link, Err(&e));
                        return Err(VmmError::Migration(e));
                    }
                };
                drop(disks);
                tracing::info!(
                    pages = received.pages,
                    blocks = received.blocks,
                    since_start_ms = process_start.elapsed().as_millis(),
                    "migrating VM received"
                );
                restored = Some((None, received.state));
                timeline.mark("received");
                Some(MigrationAnswer(Some(link)))
            }
            _ => None,
        };

        let vcpus = (0..config.vcpus)
            .map(|i| {
                vm.create_vcpu(u64::from(i))
                    .map_err(|e| VmmError::CreateVcpu(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::SupportedCpuid)?;

        // Legacy devices on the port-I/O bus.
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::SerialEventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_GSI)
            .map_err(|source| VmmError::SerialIrqfd {
                gsi: SERIAL_GSI,
                source,
            })?;
        let console_events = events.clone();
        let sink = ConsoleSink::new(
            open_console(&config.console)?,
            config.console_cap,
            Box::new(move |event| {
                let event = match event {
                    ConsoleEvent::Panic => VmEvent::PanicSeen,
                    ConsoleEvent::PowerOff => VmEvent::PowerOff,
                };
                let _ = console_events.send(event);
            }),
        );
        let serial = match &restored {
            Some((_, state)) => SerialDevice::with_state(serial_irq, sink, &state.devices.serial)
                .map_err(|e| {
                let source = snapshot::SnapshotError::DeviceState {
                    device: "serial port",
                    detail: e.to_string(),
                };
                restore_err(config, source)
            })?,
            None => SerialDevice::new(serial_irq, sink),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), COM1_PORT, UART_PORT_LEN)
            .map_err(|e| VmmError::PioBus("serial", e))?;
        let reset_events = events.clone();
        let mut i8042 = I8042::new(Box::new(move || {
            let _ = reset_events.send(VmEvent::Reset);
        }));
        if let Some((_, state)) = &restored {
            i8042.set_state(&state.devices.i8042).map_err(|e| {
                let source = snapshot::SnapshotError::DeviceState {
                    device: "i8042",
                    detail: e.to_string(),
                };
                restore_err(config, source)
            })?;
        }
        let i8042 = Arc::new(Mutex::new(i8042));
        pio.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)
            .map_err(|e| VmmError::PioBus("i8042", e))?;

        // virtio-vsock in the first virtio-mmio slot.
        let mut mmio = Bus::new();
        let (base, gsi) =
            virtio_mmio_slot(VSOCK_MMIO_SLOT).ok_or(VmmError::NoMmioSlot(VSOCK_MMIO_SLOT))?;
        let ready_ms = Arc::new(OnceLock::new());
        let ready = ready_ms.clone();
        let hooks = VsockHooks {
            on_first_guest_connect: Some(Box::new(move |port| {
                let ms = u64::try_from(process_start.elapsed().as_millis()).unwrap_or(u64::MAX);
                if ready.set(ms).is_ok() {
                    tracing::info!(
                        boot_to_ready_ms = ms,
                        port,
                        "guest is ready (first vsock connection)"
                    );
                    // Never a panic when the daemon's end of stderr is gone (see main).
                    let _ = writeln!(std::io::stderr(), "nanoclaw-vmm: boot_to_ready_ms={ms}");
                }
                seccomp::fire_test_hook();
            })),
        };
        let vsock = attach_vsock(
            &vm,
            mem.clone(),
            &mut mmio,
            MmioSlot {
                base,
                len: VIRTIO_MMIO_SLOT_LEN,
                gsi,
            },
            VsockConfig {
                guest_cid: config.cid,
                uds_path: config.vsock_path(),
            },
            hooks,
        )
        .map_err(VmmError::Vsock)?;
        let mut virtio = VirtioDevices::default();
        if let Some(t) = vsock.transport() {
            virtio.add(VSOCK_MMIO_SLOT, t.clone());
        }

        // One virtio-blk device per disk, in config order, in the slots after vsock. Their
        // `virtio_mmio.device=` arguments follow vsock's in the same order: Linux registers the
        // devices in command-line order and virtio-blk names disks in probe order, so disk 0 is
        // /dev/vda, disk 1 /dev/vdb, ...
        let mut disks = Vec::with_capacity(config.disks.len());
        for (index, disk) in config.disks.iter().enumerate() {
            let slot_index = FIRST_DISK_MMIO_SLOT + index as u32;
            let (base, gsi) =
                virtio_mmio_slot(slot_index).ok_or(VmmError::NoMmioSlot(slot_index))?;
            let handle = attach_block(
                &vm,
                mem.clone(),
                &mut mmio,
                MmioSlot {
                    base,
                    len: VIRTIO_MMIO_SLOT_LEN,
                    gsi,
                },
                BlockConfig {
                    path: disk.path.clone(),
                    read_only: disk.read_only,
                    id: disk.device_id().to_owned(),
                },
                format!("blk-dev{index}"),
            )
            .map_err(|source| VmmError::Disk {
                index,
                path: disk.path.display().to_string(),
                source,
            })?;
            tracing::info!(
                index,
                path = %disk.path.display(),
                read_only = disk.read_only,
                id = handle.id(),
                device = %handle.cmdline_arg(),
                "disk attached"
            );
            if let Some(t) = handle.transport() {
                virtio.add(slot_index, t.clone());
            }
            disks.push(handle);
        }

        // The network device, in the slot kept for it past the last disk. Its argument comes
        // after the disks', so it changes no disk's name.
        let net = match (&config.net, host_files.tap) {
            (None, _) => None,
            (Some(_), None) => return Err(VmmError::TapNotOpened),
            (Some(net), Some(tap)) => {
                let (base, gsi) =
                    virtio_mmio_slot(NIC_MMIO_SLOT).ok_or(VmmError::NoMmioSlot(NIC_MMIO_SLOT))?;
                let tap_name = tap.name().to_owned();
                let handle = attach_net(
                    &vm,
                    mem.clone(),
                    &mut mmio,
                    MmioSlot {
                        base,
                        len: VIRTIO_MMIO_SLOT_LEN,
                        gsi,
                    },
                    net.mac,
                    tap,
                )
                .map_err(VmmError::Net)?;
                tracing::info!(
                    tap = %tap_name,
                    mac = %net.mac_string(),
                    device = %handle.cmdline_arg(),
                    "network device attached"
                );
                if let Some(t) = handle.transport() {
                    virtio.add(NIC_MMIO_SLOT, t.clone());
                }
                Some(handle)
            }
        };

        timeline.mark("devices");
        // With `restore` or `migrate_from` set, a failed probe has already returned its error.
        let start_paused = if let Some(host) = snapshot_host.as_deref()
            && let Some((_, state)) = &restored
        {
            let paused = config.restore.as_ref().is_some_and(|r| r.paused);
            snapshot::restore_vm(state, &vm, &vcpus, host)
                .map_err(|source| restore_err(config, source))?;
            // The devices after the irqchip, so that an interrupt a device raises again is not
            // overwritten by the saved irqchip state; paused first if the VM starts paused.
            if paused {
                virtio
                    .pause()
                    .map_err(|e| restore_err(config, snapshot::SnapshotError::Quiesce(e)))?;
            }
            snapshot::restore_virtio(state, &virtio)
                .map_err(|source| restore_err(config, source))?;
            tracing::info!(
                from = %config
                    .restore
                    .as_ref()
                    .map_or_else(|| "a migration".to_owned(), |r| r.dir.display().to_string()),
                memory_mib = config.memory_mib,
                vcpus = config.vcpus,
                paused,
                since_start_ms = process_start.elapsed().as_millis(),
                "VM restored"
            );
            timeline.mark("restored");
            paused
        } else {
            // The guest image and boot structures.
            let kernel = boot::load_kernel(&mem, &config.kernel).map_err(VmmError::Boot)?;
            timeline.mark("kernel");
            let initrd = boot::load_initrd(&mem, &config.initrd, mem_size, &kernel)
                .map_err(VmmError::Boot)?;
            timeline.mark("initrd");
            let device_args: Vec<String> = std::iter::once(vsock.cmdline_arg())
                .chain(disks.iter().map(BlockHandle::cmdline_arg))
                .chain(net.iter().map(NetHandle::cmdline_arg))
                .collect();
            let cmdline = boot::build_cmdline(&device_args, config.cmdline_extra.as_deref())
                .map_err(VmmError::Boot)?;
            let cmdline_size = boot::write_cmdline(&mem, &cmdline).map_err(VmmError::Boot)?;
            let params =
                boot::build_boot_params(&kernel, cmdline_size, Some(initrd), &e820_map(mem_size))
                    .map_err(VmmError::Boot)?;
            boot::write_boot_params(&mem, &params).map_err(VmmError::Boot)?;
            mptable::setup_mptable(&mem, config.vcpus).map_err(VmmError::Mptable)?;
            regs::write_boot_tables(&mem).map_err(VmmError::BootTables)?;
            for (i, fd) in (0u8..).zip(&vcpus) {
                vcpu::configure(fd, i, config.vcpus, &supported_cpuid, kernel.entry)
                    .map_err(VmmError::Vcpu)?;
            }
            tracing::info!(
                format = ?kernel.format,
                entry = format_args!("{:#x}", kernel.entry),
                initrd_addr = format_args!("{:#x}", initrd.0),
                initrd_size = initrd.1,
                memory_mib = config.memory_mib,
                vcpus = config.vcpus,
                cmdline = %cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default(),
                "VM built"
            );
            timeline.mark("loaded");
            false
        };

        Ok(Self {
            vcpus,
            vsock: Some(vsock),
            disks,
            net,
            serial,
            pio,
            mmio,
            events,
            ready_ms,
            control: Some(control),
            snapshot_host,
            i8042,
            virtio,
            vm_dir: config.vm_dir.clone(),
            start_paused,
            migration_answer,
            timeline: Some(timeline),
            vm: Arc::new(vm),
            _kvm: kvm,
            mem,
        })
    }

    /// Runs the vCPUs until the VM ends, stops everything, and reports why it ended. `events` is
    /// the receiver paired with the sender given to [`Vmm::new`].
    pub fn run(mut self, events: Receiver<VmEvent>) -> ExitReport {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(RunGate::default());
        // A migrated VM: the source learns its VM runs here, just before it does. Had anything
        // failed before this point, the answer would have been a refusal.
        if let Some(answer) = self.migration_answer.take() {
            answer.resumed();
        }
        if self.start_paused {
            // The vCPUs park before their first KVM_RUN.
            gate.close();
        }
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut spawn_failed = None;
        let mut commands = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in (0u8..).zip(std::mem::take(&mut self.vcpus)) {
            let (commands_tx, commands_rx) = std::sync::mpsc::channel();
            commands.push(commands_tx);
            let runner = VcpuRunner {
                index,
                vcpu: fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                stop: stop.clone(),
                events: self.events.clone(),
                mem: self.mem.clone(),
                gate: gate.clone(),
                commands: Some(commands_rx),
                timeline: if index == 0 {
                    self.timeline.take()
                } else {
                    None
                },
            };
            match std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || runner.run())
            {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    spawn_failed = Some(VmEvent::VcpuError {
                        cpu: index,
                        detail: format!("spawn vCPU thread: {e}"),
                    });
                    break;
                }
            }
        }
        if let Some(event) = spawn_failed {
            let _ = self.events.send(event);
        }
        // The control thread may kick the vCPU threads until they are retired below.
        let kicker = {
            use std::os::unix::thread::JoinHandleExt;
            Arc::new(control::Kicker::new(
                threads.iter().map(|t| t.as_pthread_t()).collect(),
            ))
        };
        let (serial, i8042, virtio) =
            (self.serial.clone(), self.i8042.clone(), self.virtio.clone());
        let save_devices: snapshot::SaveDevices = Arc::new(move || {
            Ok(snapshot::DeviceStates {
                serial: serial.lock().unwrap_or_else(|p| p.into_inner()).state(),
                i8042: i8042.lock().unwrap_or_else(|p| p.into_inner()).state(),
                virtio: snapshot::VirtioStates::Saved(virtio.save().map_err(
                    |(slot, source)| snapshot::SnapshotError::VirtioState { slot, source },
                )?),
            })
        });
        let snapshots = self
            .snapshot_host
            .clone()
            .map(|host| control::SnapshotContext {
                vm_dir: self.vm_dir.clone(),
                source: snapshot::SnapshotSource {
                    vm: self.vm.clone(),
                    mem: self.mem.clone(),
                    vcpus: commands,
                    host,
                    devices: save_devices,
                    disks: self
                        .disks
                        .iter()
                        .filter_map(BlockHandle::migration_disk)
                        .collect(),
                },
            });
        if let Some(listener) = self.control.take()
            && let Err(e) = control::spawn(
                listener,
                gate.clone(),
                kicker.clone(),
                Arc::new(self.virtio.clone()),
                snapshots,
            )
        {
            // The VM runs on; it only cannot be paused.
            tracing::error!(error = %e, "cannot start the control thread");
        }
        // Every other thread is running now (the signal waiter, the device threads, the vCPUs),
        // each under its own filter; the main thread's comes last, so nothing inherits it.
        seccomp::confine_or_exit(ThreadKind::Vmm);

        let reason = wait_for_end(&events, PANIC_GRACE);
        tracing::info!(reason = reason.as_str(), "VM ended; stopping");
        kicker.retire();
        stop_vcpus(&stop, threads);
        tracing::debug!("vCPUs stopped");
        let vsock_metrics = self.vsock.take().map(|vsock| {
            let metrics = vsock.metrics();
            vsock.stop();
            tracing::debug!("vsock stopped");
            metrics.snapshot()
        });
        let disks: Vec<DiskRecord> = std::mem::take(&mut self.disks)
            .into_iter()
            .map(|disk| {
                let (id, read_only, metrics) =
                    (disk.id().to_owned(), disk.read_only(), disk.metrics());
                disk.stop();
                DiskRecord {
                    id,
                    read_only,
                    metrics: metrics.snapshot(),
                }
            })
            .collect();
        let net_metrics = self.net.take().map(|net| {
            let metrics = net.metrics();
            net.stop();
            tracing::debug!("net stopped");
            metrics.snapshot()
        });
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if serial.errors() > 0 {
            tracing::warn!(errors = serial.errors(), "serial: register writes failed");
        }
        serial.sink_mut().finish();
        drop(serial);
        let mut report = ExitReport::new(reason, self.ready_ms.get().copied()).with_disks(disks);
        if let Some(m) = vsock_metrics {
            report = report.with_vsock(m);
        }
        if let Some(m) = net_metrics {
            report = report.with_net(m);
        }
        report
    }
}

fn restore_err(config: &VmConfig, source: snapshot::SnapshotError) -> VmmError {
    match &config.restore {
        Some(r) => VmmError::Restore {
            path: r.dir.display().to_string(),
            source,
        },
        // A migrated VM is restored from the state its link brought.
        None => VmmError::Migration(source.into()),
    }
}

/// Waits for the event that ends the VM and logs what it is. After a panic shows on the console,
/// waits at most `panic_grace` for whatever ends the VM next.
fn wait_for_end(events: &Receiver<VmEvent>, panic_grace: Duration) -> ExitReason {
    let mut decider = ExitDecider::default();
    let mut panic_deadline: Option<Instant> = None;
    loop {
        let event = match panic_deadline {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => {
                events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => return decider.on_panic_grace_expired(),
            // Every sender lives in the Vmm, which outlives this loop; treat it as a failure.
            Err(RecvTimeoutError::Disconnected) => return ExitReason::VcpuError,
        };
        match &event {
            VmEvent::VcpuError { cpu, detail } => tracing::error!(cpu, %detail, "vCPU failed"),
            VmEvent::PanicSeen => tracing::warn!("guest kernel panicked"),
            other => tracing::info!(event = ?other, "VM event"),
        }
        if let Some(reason) = decider.on_event(&event) {
            return reason;
        }
        if decider.panic_seen() && panic_deadline.is_none() {
            panic_deadline = Some(Instant::now() + panic_grace);
        }
    }
}

/// Sets the stop flag and kicks every vCPU thread until it returns (or the timeout passes).
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    for (index, handle) in threads.into_iter().enumerate() {
        while !handle.is_finished() && Instant::now() < deadline {
            // ESRCH when the thread is already gone; either way keep polling.
            let _ = handle.kill(signals::kick_signal());
            std::thread::sleep(KICK_INTERVAL);
        }
        if handle.is_finished() {
            if handle.join().is_err() {
                tracing::error!(cpu = index, "vCPU thread panicked");
            }
        } else {
            tracing::error!(
                cpu = index,
                "vCPU thread did not stop; leaving it to process exit"
            );
        }
    }
}

/// A migrating VM's writable disks on the target, in config order, for
/// [`crate::migration::receive`] to fill.
fn target_disks(config: &VmConfig) -> Result<Vec<crate::migration::TargetDisk>, VmmError> {
    use crate::devices::virtio::block::{BlockError, DiskFile};
    config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, disk)| !disk.read_only)
        .map(|(index, disk)| {
            let err = |source| VmmError::Disk {
                index,
                path: disk.path.display().to_string(),
                source: VirtioError::Block(source),
            };
            let file = DiskFile::open(&disk.path, false).map_err(err)?;
            Ok(crate::migration::TargetDisk {
                file: file.try_clone_file().map_err(|source| {
                    err(BlockError::Duplicate {
                        path: disk.path.clone(),
                        source,
                    })
                })?,
                bytes: file.capacity_bytes(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn the_first_ending_event_decides() {
        let (tx, rx) = channel();
        tx.send(VmEvent::PowerOff).unwrap();
        tx.send(VmEvent::Reset).unwrap();
        assert_eq!(wait_for_end(&rx, PANIC_GRACE), ExitReason::PowerOff);
        let err = VmEvent::VcpuError {
            cpu: 0,
            detail: "x".into(),
        };
        tx.send(err).unwrap();
        assert_eq!(wait_for_end(&rx, PANIC_GRACE), ExitReason::Reset);
        assert_eq!(wait_for_end(&rx, PANIC_GRACE), ExitReason::VcpuError);
    }

    #[test]
    fn a_panic_ends_the_vm_even_without_the_reset() {
        let (tx, rx) = channel();
        tx.send(VmEvent::PanicSeen).unwrap();
        let started = Instant::now();
        assert_eq!(
            wait_for_end(&rx, Duration::from_millis(20)),
            ExitReason::Panic
        );
        assert!(started.elapsed() >= Duration::from_millis(20));
        tx.send(VmEvent::PanicSeen).unwrap();
        tx.send(VmEvent::Reset).unwrap();
        assert_eq!(
            wait_for_end(&rx, Duration::from_secs(60)),
            ExitReason::Panic
        );
        drop(tx);
        assert_eq!(wait_for_end(&rx, PANIC_GRACE), ExitReason::VcpuError);
    }
}
