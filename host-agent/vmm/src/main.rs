//! The `nanoclaw-vmm` binary: one microVM in this process, run until it ends. The daemon starts
//! it once per agent VM. All logic lives in the library; this file parses arguments, sets up
//! logging and maps the outcome to an exit code.
//!
//! Exit status: 0 guest reset, 10 power-off/halt, 11 kernel panic, 12 vCPU failure, 13 stopped by
//! SIGTERM/SIGINT, 14 a forbidden syscall (seccomp), 1 setup error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nanoclaw_vmm::log_limit::RateLimited;
use nanoclaw_vmm::{self as vmm, ConsoleTarget, DiskConfig, HostDevices, NetConfig, VmConfig};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Boot one microVM in this process and run it until it ends.
///
/// Exit status: 0 guest reset, 10 power-off/halt, 11 kernel panic, 12 vCPU failure,
/// 13 stopped by SIGTERM/SIGINT, 14 a forbidden syscall (seccomp), 1 setup error.
#[derive(Debug, Parser)]
#[command(name = "nanoclaw-vmm", version)]
struct VmmArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux.
    #[arg(long, required_unless_present_any = ["print_seccomp", "restore", "migrate_from"])]
    kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long, required_unless_present_any = ["print_seccomp", "restore", "migrate_from"])]
    initrd: Option<PathBuf>,
    /// The VM's directory (vsock.sock, exit.json, console.log by default). Created if missing.
    #[arg(long, required_unless_present = "print_seccomp")]
    vm_dir: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended last.
    #[arg(long)]
    cmdline_extra: Option<String>,
    /// Guest RAM in MiB (at least 64).
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    cid: u64,
    /// Console destination: a file path, or `-` for standard output. Default: <vm-dir>/console.log.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Console bytes kept; later output is dropped and counted.
    #[arg(long, default_value_t = vmm::DEFAULT_CONSOLE_CAP)]
    console_cap: u64,
    /// A virtio-blk disk backed by a host file (size a multiple of 512 bytes), read-only with
    /// `ro`, with the id the guest reads (its serial) set by `id=`. Repeat for more disks, at
    /// most 8: the first is the guest's /dev/vda, the second /dev/vdb, and so on.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=ID]")]
    disks: Vec<DiskConfig>,
    /// A virtio-net device on the existing TAP interface NAME (in the network namespace the
    /// VMM starts in; it is attached before the jail is entered), with the guest's MAC address
    /// (unicast, e.g. 02:00:00:00:00:01).
    #[arg(long, value_name = "tap=NAME,mac=MAC")]
    net: Option<NetConfig>,
    /// Keep every VMM thread on these host CPUs (`0`, `0-3`, `0,2`): set before any thread
    /// starts, and not changeable afterwards (see the `affinity` module).
    #[arg(long, value_name = "LIST")]
    cpus: Option<vmm::affinity::CpuList>,
    /// Run jailed as this uid (needs root to start; see the `jail` module). With `--jail-gid`.
    #[arg(long, requires = "jail_gid")]
    jail_uid: Option<u32>,
    /// Run jailed with this gid. With `--jail-uid`.
    #[arg(long, requires = "jail_uid")]
    jail_gid: Option<u32>,
    /// A cgroup folder the jailed VMM joins before anything else. Repeat for each hierarchy.
    #[arg(long = "jail-cgroup", value_name = "DIR", requires = "jail_uid")]
    jail_cgroups: Vec<PathBuf>,
    /// Also enter a user namespace that maps only the jail's uid and gid. With `--jail-uid`.
    #[arg(long, requires = "jail_uid")]
    jail_userns: bool,
    /// Join this network namespace (a bind-mounted nsfs file the daemon made for the VM)
    /// before opening the TAP, and keep it in the jail instead of an empty one.
    #[arg(long, value_name = "PATH", requires = "jail_uid")]
    jail_netns: Option<PathBuf>,
    /// Test hook: after entering the jail, try to open each of these paths (or connect to
    /// `tcp:HOST:PORT`), print one line per try (`PROBE <target> ok|<error>`) and exit 0
    /// without booting. It shows what a VMM taken over by its guest could reach.
    #[arg(long = "jail-probe", hide = true, requires = "jail_uid")]
    jail_probes: Vec<String>,
    /// Start from this snapshot folder (made by the control socket's `snapshot`) instead of
    /// booting a kernel. --memory-mib and --vcpus must match the snapshot's. Jailed, the folder
    /// must be inside --vm-dir.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd"])]
    restore: Option<PathBuf>,
    /// With --restore: start with the vCPUs paused (resume on the control socket).
    #[arg(long, requires = "restore", conflicts_with_all = ["kernel", "initrd"])]
    restore_paused: bool,
    /// With --restore: also restore a snapshot that holds no virtio device state (the VMM
    /// always saves it; a hand-made state may not), which is right only for a guest that never
    /// set up its virtio devices.
    #[arg(long, requires = "restore", conflicts_with_all = ["kernel", "initrd"])]
    restore_without_devices: bool,
    /// Start from a VM migrating in from another VMM instead of booting a kernel: connect to
    /// this Unix socket (before the jail), receive the VM's memory and state, restore it, answer,
    /// and run it. --memory-mib and --vcpus must match the source's.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["kernel", "initrd", "restore"])]
    migrate_from: Option<PathBuf>,
    /// Print every seccomp filter (each thread kind's allowed syscalls and their argument
    /// conditions) and exit; needs no other argument.
    #[arg(long)]
    print_seccomp: bool,
    /// Test hook: once the guest is ready (its first vsock connection), the vsock device thread
    /// makes a syscall that no seccomp filter allows (`getppid`), so the VMM ends through its
    /// SIGSYS handler with exit code 14. For the end-to-end tests only.
    #[arg(long, hide = true)]
    test_forbidden_syscall: bool,
}

impl VmmArgs {
    /// The jail asked for, if any.
    fn jail(&self) -> Option<vmm::jail::JailConfig> {
        Some(vmm::jail::JailConfig {
            uid: self.jail_uid?,
            gid: self.jail_gid?,
            cgroups: self.jail_cgroups.clone(),
            user_namespace: self.jail_userns,
            netns: self.jail_netns.clone(),
        })
    }

    fn into_config(self) -> VmConfig {
        // clap requires these three unless --print-seccomp is given, which exits before this.
        let vm_dir = self.vm_dir.unwrap_or_default();
        let console = match self.console {
            Some(p) if p.as_os_str() == "-" => ConsoleTarget::Stdout,
            Some(p) => ConsoleTarget::File(p),
            None => ConsoleTarget::File(vm_dir.join("console.log")),
        };
        VmConfig {
            kernel: self.kernel.unwrap_or_default(),
            initrd: self.initrd.unwrap_or_default(),
            vm_dir,
            cmdline_extra: self.cmdline_extra,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            cid: self.cid,
            console,
            console_cap: self.console_cap,
            disks: self.disks,
            net: self.net,
            restore: self.restore.map(|dir| vmm::snapshot::RestoreConfig {
                dir,
                paused: self.restore_paused,
                without_devices: self.restore_without_devices,
            }),
            migrate_from: self.migrate_from,
        }
    }
}

fn main() -> ExitCode {
    // The boot timer starts here, before anything else.
    let process_start = Instant::now();
    let mut args = VmmArgs::parse();
    if args.print_seccomp {
        print!("{}", vmm::seccomp::describe());
        return ExitCode::SUCCESS;
    }
    if args.test_forbidden_syscall {
        vmm::seccomp::arm_test_hook();
    }
    // Every line, `log` records from the rust-vmm crates included, goes through the per-site
    // rate limit: a guest must not be able to flood the VMM log.
    //
    // Our stderr is a FIFO the daemon reads (and caps). While no daemon runs it has no reader:
    // SIGPIPE is ignored (Rust's runtime sets that before `main`), so a write fails with EPIPE,
    // and every write to stderr ignores the failure (no `eprintln!`, which would panic, and no
    // report of the failure by tracing-subscriber, which would use `eprintln!`).
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with(RateLimited::new(lines))
        .init();

    // Before any thread starts, so that every one inherits the mask.
    if let Some(cpus) = args.cpus.take()
        && let Err(e) = cpus.apply()
    {
        let _ = writeln!(std::io::stderr(), "nanoclaw-vmm: error: {e}");
        return ExitCode::from(vmm::exit::SETUP_ERROR_EXIT_CODE as u8);
    }
    let jail = args.jail();
    let probes = std::mem::take(&mut args.jail_probes);
    let mut config = args.into_config();
    let setup_error = |what: &str, e: &(dyn std::error::Error + 'static)| {
        let _ = writeln!(
            std::io::stderr(),
            "nanoclaw-vmm: error: {what}{}",
            vmm::error_chain(e)
        );
        ExitCode::from(vmm::exit::SETUP_ERROR_EXIT_CODE as u8)
    };
    // Bad paths are reported as the daemon gave them, before they move into the jail.
    if let Err(e) = config.validate() {
        return setup_error("", &e);
    }
    // The VM's own network namespace, when the daemon made one: its TAP lives there.
    if let Some(netns) = jail.as_ref().and_then(|j| j.netns.as_deref())
        && let Err(e) = vmm::jail::join_netns(netns)
    {
        return setup_error("cannot enter the jail: ", &e);
    }
    // Host devices are opened here, before the jail: it leaves no /dev/net/tun in the VMM's
    // root and moves the VMM into an empty network namespace (or keeps the VM's own), where
    // the TAP is reachable only through this descriptor.
    let host = match HostDevices::open(&config) {
        Ok(host) => host,
        Err(e) => return setup_error("", &e),
    };
    if let Some(jail) = &jail {
        if let Err(e) = vmm::jail::enter(jail, &mut config) {
            return setup_error("cannot enter the jail: ", &e);
        }
        tracing::info!(uid = jail.uid, gid = jail.gid, "VMM jailed");
        if !probes.is_empty() {
            for target in &probes {
                let _ = writeln!(
                    std::io::stdout(),
                    "PROBE {target} {}",
                    vmm::jail::probe(target)
                );
            }
            return ExitCode::SUCCESS;
        }
    }
    match vmm::run(&config, host, process_start) {
        Ok(report) => {
            tracing::info!(
                reason = report.reason.as_str(),
                exit_code = report.exit_code,
                boot_to_ready_ms = report.boot_to_ready_ms,
                "VMM exiting"
            );
            ExitCode::from(report.exit_code as u8)
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "nanoclaw-vmm: error: {}",
                vmm::error_chain(&e)
            );
            ExitCode::from(vmm::exit::SETUP_ERROR_EXIT_CODE as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmmArgs, clap::Error> {
        let base = [
            "nanoclaw-vmm",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--vm-dir",
            "d",
        ];
        VmmArgs::try_parse_from(base.iter().chain(args))
    }

    #[test]
    fn disks_keep_their_command_line_order() {
        let config = parse(&["--disk", "/img/base.ext4,ro", "--disk", "/vm/s.img,id=work"])
            .unwrap()
            .into_config();
        let disks: Vec<_> = config
            .disks
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.read_only, d.device_id()))
            .collect();
        assert_eq!(
            disks,
            [
                ("/img/base.ext4", true, "nanoclaw-image"),
                ("/vm/s.img", false, "work")
            ]
        );
        assert!(parse(&[]).unwrap().into_config().disks.is_empty());
    }

    #[test]
    fn print_seccomp_needs_no_other_argument() {
        let args = VmmArgs::try_parse_from(["nanoclaw-vmm", "--print-seccomp"]).unwrap();
        assert!(args.print_seccomp);
        let err = VmmArgs::try_parse_from(["nanoclaw-vmm"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(
            parse(&["--test-forbidden-syscall"])
                .unwrap()
                .test_forbidden_syscall
        );
    }

    #[test]
    fn the_net_option_parses_into_the_config() {
        let config = parse(&["--net", "tap=nc-tap0,mac=02:00:00:00:00:07"])
            .unwrap()
            .into_config();
        let net = config.net.unwrap();
        assert_eq!((net.tap.as_str(), net.mac), ("nc-tap0", [2, 0, 0, 0, 0, 7]));
        assert!(parse(&[]).unwrap().into_config().net.is_none());
        let err = parse(&["--net", "tap=t,mac=01:00:00:00:00:07"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("unicast"), "{err}");
        let err = parse(&[
            "--net",
            "tap=a,mac=02:00:00:00:00:07",
            "--net",
            "tap=b,mac=02:00:00:00:00:08",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn the_cpus_option_takes_a_kernel_cpu_list() {
        let args = parse(&["--cpus", "0,2-3"]).unwrap();
        assert_eq!(args.cpus.unwrap().cpus(), &[0, 2, 3]);
        assert!(parse(&[]).unwrap().cpus.is_none());
        let err = parse(&["--cpus", "3-1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("below its start"), "{err}");
    }

    #[test]
    fn the_netns_option_needs_a_jail_and_reaches_its_config() {
        let err = parse(&["--jail-netns", "/x/netns"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let args = parse(&[
            "--jail-uid",
            "1000",
            "--jail-gid",
            "1000",
            "--jail-netns",
            "/x/netns",
        ])
        .unwrap();
        assert_eq!(args.jail().unwrap().netns, Some(PathBuf::from("/x/netns")));
        let args = parse(&["--jail-uid", "1000", "--jail-gid", "1000"]).unwrap();
        assert_eq!(args.jail().unwrap().netns, None);
    }

    #[test]
    fn restore_replaces_the_kernel_and_initrd() {
        let args = VmmArgs::try_parse_from([
            "nanoclaw-vmm",
            "--vm-dir",
            "d",
            "--restore",
            "d/snap",
            "--restore-paused",
        ])
        .unwrap();
        let config = args.into_config();
        let restore = config.restore.unwrap();
        assert_eq!(restore.dir, PathBuf::from("d/snap"));
        assert!(restore.paused && !restore.without_devices);
        // Not with a kernel, and its options not without it.
        assert!(parse(&["--restore", "s"]).is_err());
        assert!(parse(&["--restore-paused"]).is_err());
        assert!(parse(&[]).unwrap().into_config().restore.is_none());
    }

    #[test]
    fn migrate_from_replaces_the_kernel_and_initrd_and_a_restore() {
        let base = [
            "nanoclaw-vmm",
            "--vm-dir",
            "d",
            "--migrate-from",
            "d/in.sock",
        ];
        let config = VmmArgs::try_parse_from(base).unwrap().into_config();
        assert_eq!(config.migrate_from, Some(PathBuf::from("d/in.sock")));
        assert!(config.restore.is_none());
        assert!(VmmArgs::try_parse_from(base.iter().chain(&["--restore", "r"])).is_err());
        assert!(parse(&["--migrate-from", "s"]).is_err());
    }

    #[test]
    fn a_bad_disk_spec_is_a_usage_error() {
        let err = parse(&["--disk", "x.img,readonly"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("unknown disk option"), "{err}");
    }
}
