//! The virtual machine monitor: one process per microVM.
//!
//! [`run`] takes a validated [`VmConfig`], builds the VM ([`Vmm::new`]: KVM, guest memory, the
//! in-kernel irqchip and PIT, the serial console, the i8042 reset line, virtio-vsock, one
//! virtio-blk device per disk, an optional virtio-net device on a TAP, the kernel, initramfs,
//! zero page and MP table, every vCPU's registers), runs it on one thread per vCPU
//! ([`Vmm::run`]) until the guest resets, powers off or panics, a vCPU fails or a signal arrives,
//! and records the outcome in `<vm-dir>/exit.json`. The `nanoclaw-vmm` binary is a thin shell
//! around it.
//!
//! # Layout
//! - [`devices`]: the emulated devices and the buses that route guest I/O to them: serial,
//!   i8042, and over virtio-mmio, vsock ([`devices::virtio::vsock`]), the file-backed
//!   block device ([`devices::virtio::block`]) and the TAP-backed network device
//!   ([`devices::virtio::net`]).
//! - [`layout`]: the guest physical address map and the e820 map.
//! - [`memory`]: guest RAM and its KVM memory slots.
//! - [`boot`]: kernel, initramfs, command line and zero page.
//! - [`x86_64`]: GDT, page tables, registers, CPUID, MSRs, LAPIC and the MP table.
//! - [`vcpu`]: per-vCPU setup and the vCPU run loop.
//! - [`console`]: the capped console sink that also spots panics and power-offs.
//! - [`exit`]: exit reasons, exit codes and `exit.json`.
//! - [`signals`]: termination signals and vCPU kicks.
//! - [`control`]: the control socket: pausing and resuming the vCPUs, taking snapshots.
//! - [`snapshot`]: saving a paused VM's vCPUs, irqchip, clock and memory, and restoring them.
//! - [`seccomp`]: the per-thread syscall allowlists and the `SIGSYS` handler that reports a
//!   forbidden call.
//! - [`affinity`]: `--cpus`, the host CPUs every VMM thread is kept on.
//! - [`log_limit`]: per-site rate limiting of every log line, the dependencies' included.
//! - [`machine`]: [`Vmm`], which puts the parts together.

pub mod affinity;
pub mod boot;
pub mod console;
pub mod control;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod layout;
pub mod log_limit;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod timeline;
pub mod vcpu;
pub mod x86_64;

use std::path::PathBuf;
use std::time::Instant;

pub use exit::{ExitReason, ExitReport};
pub use machine::{HostDevices, Vmm, VmmError};

/// Fewest MiB of guest RAM accepted.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most MiB of guest RAM accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 32;
/// Most disks accepted (`/dev/vda` to `/dev/vdh`); see [`layout::FIRST_DISK_MMIO_SLOT`].
pub const MAX_DISKS: usize = 8;
/// Longest disk id, in bytes (virtio-blk `VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_ID_LEN: usize = 20;
/// Disk id a read-only disk reports when none is configured.
pub const DEFAULT_IMAGE_DISK_ID: &str = "nanoclaw-image";
/// Disk id a writable disk reports when none is configured.
pub const DEFAULT_SCRATCH_DISK_ID: &str = "nanoclaw-scratch";
/// Default console byte cap (4 MiB).
pub const DEFAULT_CONSOLE_CAP: u64 = 4 << 20;
/// Name of the hybrid vsock socket inside the VM directory.
pub const VSOCK_SOCKET_NAME: &str = "vsock.sock";
/// Name of the exit record inside the VM directory.
pub const EXIT_RECORD_NAME: &str = "exit.json";

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// A host file the guest sees as a virtio-blk disk.
///
/// Disks are attached in [`VmConfig::disks`] order: the first is the guest's `/dev/vda`, the
/// second `/dev/vdb`, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The backing file: a regular file whose size is a multiple of 512 bytes.
    pub path: PathBuf,
    /// Opened `O_RDONLY` and offered with `VIRTIO_BLK_F_RO`; guest writes fail.
    pub read_only: bool,
    /// The id the guest reads with `VIRTIO_BLK_T_GET_ID` (its `serial` in sysfs): 1 to 20 ASCII
    /// letters, digits, `-`, `_` or `.`. Default: [`DEFAULT_IMAGE_DISK_ID`] for a read-only
    /// disk, [`DEFAULT_SCRATCH_DISK_ID`] for a writable one.
    pub id: Option<String>,
}

impl DiskConfig {
    /// The id the guest sees: the configured one or the default for the disk's mode.
    pub fn device_id(&self) -> &str {
        match (&self.id, self.read_only) {
            (Some(id), _) => id,
            (None, true) => DEFAULT_IMAGE_DISK_ID,
            (None, false) => DEFAULT_SCRATCH_DISK_ID,
        }
    }

    /// Whether `id` is acceptable as a disk id.
    pub fn is_valid_id(id: &str) -> bool {
        (1..=MAX_DISK_ID_LEN).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }
}

/// A `--disk` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskSpecError {
    /// The path before the first comma is empty.
    #[error("disk spec has an empty path")]
    EmptyPath,
    /// An option is neither `ro`, `rw` nor `id=ID`.
    #[error("unknown disk option {0:?} (expected ro, rw or id=ID)")]
    UnknownOption(String),
    /// An option was given twice (or both `ro` and `rw`).
    #[error("disk option {0:?} given twice")]
    Repeated(String),
    /// The id is empty, too long or has other characters than ASCII letters, digits, `-_.`.
    #[error("disk id {0:?} must be 1 to 20 ASCII letters, digits, '-', '_' or '.'")]
    BadId(String),
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskSpecError;

    /// Parses `PATH[,ro|,rw][,id=ID]`. The path cannot hold a comma.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskSpecError::EmptyPath);
        }
        let mut mode = None;
        let mut id = None;
        for opt in parts {
            match opt {
                "ro" | "rw" => {
                    if mode.replace(opt == "ro").is_some() {
                        return Err(DiskSpecError::Repeated(opt.to_owned()));
                    }
                }
                _ => {
                    let Some(value) = opt.strip_prefix("id=") else {
                        return Err(DiskSpecError::UnknownOption(opt.to_owned()));
                    };
                    if !DiskConfig::is_valid_id(value) {
                        return Err(DiskSpecError::BadId(value.to_owned()));
                    }
                    if id.replace(value.to_owned()).is_some() {
                        return Err(DiskSpecError::Repeated("id".to_owned()));
                    }
                }
            }
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only: mode.unwrap_or(false),
            id,
        })
    }
}

/// Longest network interface name, in bytes (`IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// The VM's network device: a TAP the daemon made, and the MAC address the guest gets.
///
/// The VMM opens the TAP by name in the network namespace it was started in, before it enters
/// its jail (see [`HostDevices::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface: 1 to 15 ASCII letters, digits, `-`, `_` or `.`, not `.` or `..`.
    pub tap: String,
    /// The guest's MAC address: unicast (bit 0 of the first byte clear) and not all zero.
    pub mac: [u8; 6],
}

impl NetConfig {
    /// Whether `name` is acceptable as a TAP name (a subset of what Linux accepts).
    pub fn is_valid_tap_name(name: &str) -> bool {
        (1..=MAX_TAP_NAME_LEN).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }

    /// Whether `mac` can be a NIC's own address: unicast and not all zero.
    pub fn is_valid_mac(mac: &[u8; 6]) -> bool {
        mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (hex digits, either case); `None` for anything else.
    pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next()?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        parts.next().is_none().then_some(mac)
    }

    /// The MAC address as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A `--net` value that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetSpecError {
    /// An option is neither `tap=NAME` nor `mac=MAC`.
    #[error("unknown net option {0:?} (expected tap=NAME or mac=MAC)")]
    UnknownOption(String),
    /// An option was given twice.
    #[error("net option {0:?} given twice")]
    Repeated(&'static str),
    /// `tap=` is missing.
    #[error("net spec needs tap=NAME")]
    MissingTap,
    /// `mac=` is missing.
    #[error("net spec needs mac=MAC")]
    MissingMac,
    /// The TAP name is not 1 to 15 of ASCII letters, digits, `-_.`.
    #[error("TAP name {0:?} must be 1 to 15 ASCII letters, digits, '-', '_' or '.'")]
    BadTapName(String),
    /// The MAC is not six colon-separated hex bytes, or is multicast or all zero.
    #[error("MAC {0:?} must be six hex bytes like 02:00:00:00:00:01, unicast and not all zero")]
    BadMac(String),
}

impl std::str::FromStr for NetConfig {
    type Err = NetSpecError;

    /// Parses `tap=NAME,mac=MAC` (in either order).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for opt in spec.split(',') {
            if let Some(name) = opt.strip_prefix("tap=") {
                if !NetConfig::is_valid_tap_name(name) {
                    return Err(NetSpecError::BadTapName(name.to_owned()));
                }
                if tap.replace(name.to_owned()).is_some() {
                    return Err(NetSpecError::Repeated("tap"));
                }
            } else if let Some(text) = opt.strip_prefix("mac=") {
                let parsed = NetConfig::parse_mac(text)
                    .filter(NetConfig::is_valid_mac)
                    .ok_or_else(|| NetSpecError::BadMac(text.to_owned()))?;
                if mac.replace(parsed).is_some() {
                    return Err(NetSpecError::Repeated("mac"));
                }
            } else {
                return Err(NetSpecError::UnknownOption(opt.to_owned()));
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or(NetSpecError::MissingTap)?,
            mac: mac.ok_or(NetSpecError::MissingMac)?,
        })
    }
}

/// Everything needed to boot one microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: a bzImage or an ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Initramfs (a cpio archive, possibly compressed).
    pub initrd: PathBuf,
    /// The VM's directory: holds `vsock.sock`, `exit.json` and by default the console log.
    pub vm_dir: PathBuf,
    /// Extra kernel command-line arguments, appended last.
    pub cmdline_extra: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The guest's vsock CID.
    pub cid: u64,
    /// Where the console goes.
    pub console: ConsoleTarget,
    /// Console bytes kept before further output is dropped.
    pub console_cap: u64,
    /// Disks, in the order the guest enumerates them (`/dev/vda` first).
    pub disks: Vec<DiskConfig>,
    /// The network device, if any.
    pub net: Option<NetConfig>,
    /// Start from this snapshot instead of booting the kernel (which is then not read).
    pub restore: Option<snapshot::RestoreConfig>,
    /// Start from a VM migrating in from another VMM instead of booting the kernel: the Unix
    /// socket to connect to (before the jail) and receive its memory and state from (see
    /// [`migration`]).
    pub migrate_from: Option<PathBuf>,
}

/// Invalid [`VmConfig`] values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A VM starts from a snapshot or from a migration, not both.
    #[error("a VM starts from a snapshot or from a migration, not both")]
    RestoreAndMigration,
    /// The vCPU count is out of range.
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus {
        /// The requested count.
        got: u8,
        /// The largest count accepted.
        max: u8,
    },
    /// The memory size is out of range.
    #[error("memory must be between {min} and {max} MiB, got {got} MiB")]
    Memory {
        /// The requested MiB.
        got: u64,
        /// Fewest MiB accepted.
        min: u64,
        /// Most MiB accepted.
        max: u64,
    },
    /// The CID is reserved or too large.
    #[error("guest CID must be between 3 and {max}, got {got}")]
    Cid {
        /// The requested CID.
        got: u64,
        /// Largest CID accepted.
        max: u64,
    },
    /// A required file is missing or is not a regular file.
    #[error("{what} {path} does not exist or is not a regular file")]
    MissingFile {
        /// Which input.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// The VM directory exists but is not a directory.
    #[error("vm-dir {0} is not a directory")]
    VmDirNotDirectory(PathBuf),
    /// The console cap is zero.
    #[error("console cap must be at least 1 byte")]
    ConsoleCap,
    /// More disks than there are virtio-mmio slots for them.
    #[error("at most {max} disks are supported, got {got}")]
    TooManyDisks {
        /// The number of disks given.
        got: usize,
        /// The most accepted.
        max: usize,
    },
    /// A disk id is empty, too long or has characters other than ASCII letters, digits, `-_.`.
    #[error("disk id {0:?} must be 1 to 20 ASCII letters, digits, '-', '_' or '.'")]
    DiskId(String),
    /// The TAP name is not 1 to 15 of ASCII letters, digits, `-_.`.
    #[error("TAP name {0:?} must be 1 to 15 ASCII letters, digits, '-', '_' or '.'")]
    TapName(String),
    /// The MAC address is multicast or all zero.
    #[error("MAC address must be unicast and not all zero")]
    Mac,
}

impl VmConfig {
    /// Checks ranges and that the kernel and initramfs exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus {
                got: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        let max_cid = u64::from(u32::MAX) - 1;
        if !(3..=max_cid).contains(&self.cid) {
            return Err(ConfigError::Cid {
                got: self.cid,
                max: max_cid,
            });
        }
        // A snapshot to restore is checked where its files are opened, before the jail
        // (`HostDevices::open`): inside the jail its host path is not there to look at.
        let boot_files = [("kernel", &self.kernel), ("initrd", &self.initrd)];
        if self.restore.is_some() && self.migrate_from.is_some() {
            return Err(ConfigError::RestoreAndMigration);
        }
        let boot_files = if self.restore.is_some() || self.migrate_from.is_some() {
            &boot_files[..0]
        } else {
            &boot_files[..]
        };
        for &(what, path) in boot_files {
            if !path.is_file() {
                return Err(ConfigError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        if self.vm_dir.exists() && !self.vm_dir.is_dir() {
            return Err(ConfigError::VmDirNotDirectory(self.vm_dir.clone()));
        }
        if self.console_cap == 0 {
            return Err(ConfigError::ConsoleCap);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks {
                got: self.disks.len(),
                max: MAX_DISKS,
            });
        }
        for disk in &self.disks {
            if !disk.path.is_file() {
                return Err(ConfigError::MissingFile {
                    what: "disk",
                    path: disk.path.clone(),
                });
            }
            if let Some(id) = disk.id.as_ref().filter(|id| !DiskConfig::is_valid_id(id)) {
                return Err(ConfigError::DiskId(id.clone()));
            }
        }
        if let Some(net) = &self.net {
            if !NetConfig::is_valid_tap_name(&net.tap) {
                return Err(ConfigError::TapName(net.tap.clone()));
            }
            if !NetConfig::is_valid_mac(&net.mac) {
                return Err(ConfigError::Mac);
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// The hybrid vsock socket path.
    pub fn vsock_path(&self) -> PathBuf {
        self.vm_dir.join(VSOCK_SOCKET_NAME)
    }
}

/// Boots the VM described by `config` and runs it to its end. `host` holds the host devices
/// opened before the jail ([`HostDevices::open`]); `process_start` is when the VMM process
/// started (the "boot to ready" timer's origin). Writes `<vm-dir>/exit.json` and returns
/// the same report; the caller exits with [`ExitReport::exit_code`].
///
/// Call this from the process's main thread before spawning other threads: it blocks SIGTERM
/// and SIGINT process-wide and takes them on its own waiter thread, and every thread it starts
/// (and the main thread itself, once it has started them all) runs under its seccomp filter
/// ([`seccomp`]). A stale `exit.json` is truncated here: the `SIGSYS` handler's record is opened
/// before any thread exists.
pub fn run(
    config: &VmConfig,
    host: HostDevices,
    process_start: Instant,
) -> Result<ExitReport, VmmError> {
    config.validate().map_err(VmmError::Config)?;
    seccomp::prepare(&config.vm_dir).map_err(VmmError::Seccomp)?;
    signals::block_termination_signals().map_err(VmmError::Signals)?;
    signals::install_kick_handler().map_err(VmmError::Signals)?;
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    signals::spawn_termination_waiter(events_tx.clone()).map_err(VmmError::Signals)?;
    let vmm = Vmm::new(config, host, process_start, events_tx)?;
    let report = vmm.run(events_rx);
    tracing::debug!("VM torn down");
    report
        .write(&config.vm_dir)
        .map_err(VmmError::WriteExitRecord)?;
    Ok(report)
}

/// An error and its whole `source()` chain on one line, `outer: cause: root cause`: how the VMM
/// binary prints a setup error.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> VmConfig {
        let kernel = dir.join("bzImage");
        let initrd = dir.join("initramfs.cpio.gz");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        VmConfig {
            kernel,
            initrd,
            vm_dir: dir.join("vm"),
            cmdline_extra: None,
            memory_mib: 128,
            vcpus: 1,
            cid: 3,
            console: ConsoleTarget::Stdout,
            console_cap: DEFAULT_CONSOLE_CAP,
            disks: Vec::new(),
            net: None,
            restore: None,
            migrate_from: None,
        }
    }

    #[test]
    fn a_snapshots_files_are_opened_before_the_vm_is_built_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        std::fs::write(snap.join(snapshot::STATE_FILE), b"state").unwrap();
        let mut config = config(dir.path());
        config.restore = Some(snapshot::RestoreConfig {
            dir: snap.clone(),
            paused: false,
            without_devices: false,
        });
        let err = HostDevices::open(&config).unwrap_err();
        let text = error_chain(&err);
        assert!(
            text.contains("read the memory file") && text.contains("memory.bin"),
            "{text}"
        );
        std::fs::write(snap.join(snapshot::MEMORY_FILE), b"memory").unwrap();
        let host = HostDevices::open(&config).unwrap();
        let files = host.snapshot.expect("the snapshot's files");
        assert_eq!(files.dir, snap);
        // Read-only: a jailed VMM cannot write through them.
        use std::io::Write;
        assert!((&files.memory).write_all(b"x").is_err());
        assert!((&files.state).write_all(b"x").is_err());
    }

    #[test]
    fn validation_accepts_the_defaults_and_rejects_each_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(good.memory_bytes(), 128 << 20);
        assert_eq!(good.vsock_path(), dir.path().join("vm/vsock.sock"));

        let bad = VmConfig {
            vcpus: 0,
            ..good.clone()
        };
        assert_eq!(bad.validate(), Err(ConfigError::Vcpus { got: 0, max: 32 }));
        let bad = VmConfig {
            vcpus: 33,
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Vcpus { got: 33, .. })
        ));
        assert_eq!(
            VmConfig {
                vcpus: 32,
                ..good.clone()
            }
            .validate(),
            Ok(())
        );

        let bad = VmConfig {
            memory_mib: 63,
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Memory { got: 63, .. })
        ));
        assert_eq!(
            VmConfig {
                memory_mib: 64,
                ..good.clone()
            }
            .validate(),
            Ok(())
        );

        let bad = VmConfig {
            cid: 2,
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Cid { got: 2, .. })
        ));

        let bad = VmConfig {
            kernel: dir.path().join("nope"),
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::MissingFile { what: "kernel", .. })
        ));
        let bad = VmConfig {
            initrd: dir.path().to_path_buf(),
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::MissingFile { what: "initrd", .. })
        ));

        let bad = VmConfig {
            vm_dir: good.kernel.clone(),
            ..good.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::VmDirNotDirectory(_))
        ));
        let bad = VmConfig {
            console_cap: 0,
            ..good.clone()
        };
        assert_eq!(bad.validate(), Err(ConfigError::ConsoleCap));
    }

    #[test]
    fn validation_checks_disks() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        let image = dir.path().join("image.ext4");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let disk = DiskConfig {
            path: image,
            read_only: true,
            id: None,
        };
        let with = |disks: Vec<DiskConfig>| VmConfig {
            disks,
            ..good.clone()
        };
        assert_eq!(with(vec![disk.clone(); MAX_DISKS]).validate(), Ok(()));
        assert_eq!(
            with(vec![disk.clone(); MAX_DISKS + 1]).validate(),
            Err(ConfigError::TooManyDisks { got: 9, max: 8 })
        );
        let missing = DiskConfig {
            path: dir.path().join("nope"),
            ..disk.clone()
        };
        assert!(matches!(
            with(vec![disk.clone(), missing]).validate(),
            Err(ConfigError::MissingFile { what: "disk", .. })
        ));
        let bad_id = DiskConfig {
            id: Some("has space".into()),
            ..disk
        };
        assert_eq!(
            with(vec![bad_id]).validate(),
            Err(ConfigError::DiskId("has space".into()))
        );
    }

    #[test]
    fn disk_specs_parse_into_configs_or_typed_errors() {
        let parse = |s: &str| s.parse::<DiskConfig>();
        let d = parse("/images/base.ext4,ro").unwrap();
        assert_eq!(d.path, PathBuf::from("/images/base.ext4"));
        assert!(d.read_only);
        assert_eq!(d.device_id(), DEFAULT_IMAGE_DISK_ID);
        let d = parse("scratch.img").unwrap();
        assert!(!d.read_only);
        assert_eq!(d.device_id(), DEFAULT_SCRATCH_DISK_ID);
        let d = parse("s.img,id=work-1,rw").unwrap();
        assert_eq!((d.read_only, d.device_id()), (false, "work-1"));
        let d = parse("s.img,id=abcdefghijklmnopqrst,ro").unwrap();
        assert_eq!(d.id.as_deref(), Some("abcdefghijklmnopqrst"));

        assert_eq!(parse(""), Err(DiskSpecError::EmptyPath));
        assert_eq!(parse(",ro"), Err(DiskSpecError::EmptyPath));
        assert_eq!(
            parse("a,readonly"),
            Err(DiskSpecError::UnknownOption("readonly".into()))
        );
        assert_eq!(parse("a,"), Err(DiskSpecError::UnknownOption("".into())));
        assert_eq!(parse("a,ro,rw"), Err(DiskSpecError::Repeated("rw".into())));
        assert_eq!(
            parse("a,id=x,id=y"),
            Err(DiskSpecError::Repeated("id".into()))
        );
        assert_eq!(parse("a,id="), Err(DiskSpecError::BadId("".into())));
        assert_eq!(
            parse("a,id=abcdefghijklmnopqrstu"),
            Err(DiskSpecError::BadId("abcdefghijklmnopqrstu".into()))
        );
        assert_eq!(parse("a,id=a/b"), Err(DiskSpecError::BadId("a/b".into())));
    }

    #[test]
    fn net_specs_parse_into_configs_or_typed_errors() {
        let parse = |s: &str| s.parse::<NetConfig>();
        let n = parse("tap=nc-tap0,mac=02:00:0A:ff:00:01").unwrap();
        assert_eq!(n.tap, "nc-tap0");
        assert_eq!(n.mac, [0x02, 0x00, 0x0a, 0xff, 0x00, 0x01]);
        assert_eq!(n.mac_string(), "02:00:0a:ff:00:01");
        assert_eq!(parse("mac=02:00:00:00:00:01,tap=t").unwrap().tap, "t");
        assert_eq!(
            parse("tap=abcdefghijklmno,mac=02:00:00:00:00:01")
                .unwrap()
                .tap
                .len(),
            MAX_TAP_NAME_LEN
        );

        assert_eq!(
            parse("mac=02:00:00:00:00:01"),
            Err(NetSpecError::MissingTap)
        );
        assert_eq!(parse("tap=t"), Err(NetSpecError::MissingMac));
        assert_eq!(
            parse("tap=t,mac=02:00:00:00:00:01,mtu=9000"),
            Err(NetSpecError::UnknownOption("mtu=9000".into()))
        );
        assert_eq!(
            parse("tap=t,tap=u,mac=02:00:00:00:00:01"),
            Err(NetSpecError::Repeated("tap"))
        );
        for bad in ["", ".", "..", "a/b", "a b", "abcdefghijklmnop", "tap:0"] {
            assert_eq!(
                parse(&format!("tap={bad},mac=02:00:00:00:00:01")),
                Err(NetSpecError::BadTapName(bad.into())),
                "{bad:?}"
            );
        }
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1",
            "02:00:00:00:00:0g",
            "02-00-00-00-00-01",
            "+2:00:00:00:00:01",
            // Multicast, broadcast, all zero.
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert_eq!(
                parse(&format!("tap=t,mac={bad}")),
                Err(NetSpecError::BadMac(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn validation_checks_the_net_device() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        let with = |tap: &str, mac: [u8; 6]| VmConfig {
            net: Some(NetConfig {
                tap: tap.into(),
                mac,
            }),
            ..good.clone()
        };
        assert_eq!(with("tap0", [2, 0, 0, 0, 0, 1]).validate(), Ok(()));
        assert_eq!(
            with("a/b", [2, 0, 0, 0, 0, 1]).validate(),
            Err(ConfigError::TapName("a/b".into()))
        );
        assert_eq!(
            with("tap0", [1, 0, 0, 0, 0, 1]).validate(),
            Err(ConfigError::Mac)
        );
        assert_eq!(with("tap0", [0; 6]).validate(), Err(ConfigError::Mac));
    }
}
