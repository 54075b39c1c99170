//! Per-VM cgroups: cpu, memory and pids limits for each jailed VMM.
//!
//! The daemon makes one cgroup per VM under a parent (`nanoclaw` by default) in every
//! hierarchy that holds one of the three controllers, writes the limits, and passes the
//! folders to the VMM, which joins them before it unshares anything (see the VMM's `jail`
//! module). When the VM has ended the folders are removed.
//!
//! Both cgroup versions are supported, and the mix of them that many hosts run:
//! - **v2** (one `cgroup2` mount): the controllers are enabled in the parent's
//!   `cgroup.subtree_control`; limits go to `cpu.max`, `memory.max` (+ `memory.swap.max`) and
//!   `pids.max`.
//! - **v1** (a `cgroup` mount per controller set, e.g. `cpu,cpuacct`, `memory`, `pids`):
//!   `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.limit_in_bytes` (+ `memsw` where swap
//!   accounting is on) and `pids.max`.
//! - **hybrid**: v1 controllers beside an empty `cgroup2` mount (`/sys/fs/cgroup/unified`).
//!   A controller bound to a v1 hierarchy is used there; v2 is used only for controllers it
//!   actually offers.
//!
//! The hierarchies are found in `/proc/self/mountinfo`, not by assuming `/sys/fs/cgroup`.

use std::path::{Path, PathBuf};

/// The controllers the daemon limits.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// The CFS period the cpu limit is expressed in (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// What a VM's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per [`CPU_PERIOD_US`]: one period per vCPU.
    pub cpu_quota_us: u64,
    /// Memory in bytes: guest RAM plus the VMM's own.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
}

impl Limits {
    /// The limits for a VM with `vcpus` vCPUs and `memory_mib` MiB of RAM, allowing
    /// `overhead_mib` MiB for the VMM itself.
    pub fn for_vm(vcpus: u8, memory_mib: u64, overhead_mib: u64) -> Self {
        Limits {
            cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
            memory_bytes: memory_mib
                .saturating_add(overhead_mib)
                .saturating_mul(1 << 20),
            pids: 64 + u64::from(vcpus),
        }
    }
}

/// Where each controller lives on this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hierarchies {
    /// The `cgroup2` mount, when it offers at least one of [`CONTROLLERS`].
    pub v2: Option<(PathBuf, Vec<String>)>,
    /// v1 mounts, each with the controllers it holds (only those in [`CONTROLLERS`]).
    pub v1: Vec<(PathBuf, Vec<String>)>,
}

/// Errors of making or removing a VM's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No hierarchy holds this controller.
    #[error("no cgroup hierarchy offers the {0} controller")]
    Missing(&'static str),
    /// A cgroup file or folder could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Hierarchies {
    /// Reads this process's mount table.
    pub fn detect() -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut found = Self::parse(&mountinfo);
        if let Some((root, controllers)) = &mut found.v2 {
            let offered =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            controllers.extend(
                offered
                    .split_whitespace()
                    .filter(|c| CONTROLLERS.contains(c))
                    .map(str::to_owned),
            );
        }
        found.v2.take_if(|(_, c)| c.is_empty());
        found
    }

    /// Parses `/proc/self/mountinfo`: v1 mounts with their controllers, the v2 mount with none
    /// yet (its controllers are read from its `cgroup.controllers`).
    pub fn parse(mountinfo: &str) -> Self {
        let mut found = Hierarchies::default();
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (fstype, super_opts) = (right.next(), right.nth(1).unwrap_or(""));
            let path = PathBuf::from(unescape(mount_point));
            match fstype {
                Some("cgroup2") if found.v2.is_none() => found.v2 = Some((path, Vec::new())),
                Some("cgroup") => {
                    let controllers: Vec<String> = super_opts
                        .split(',')
                        .filter(|o| CONTROLLERS.contains(o))
                        .map(str::to_owned)
                        .collect();
                    if !controllers.is_empty() && !found.v1.iter().any(|(p, _)| *p == path) {
                        found.v1.push((path, controllers));
                    }
                }
                _ => {}
            }
        }
        found
    }

    /// Where each controller is: `(hierarchy root, is v2)`, v1 first.
    fn place(&self, controller: &'static str) -> Result<(&Path, bool), CgroupError> {
        if let Some((root, _)) = self
            .v1
            .iter()
            .find(|(_, c)| c.iter().any(|x| x == controller))
        {
            return Ok((root, false));
        }
        match &self.v2 {
            Some((root, c)) if c.iter().any(|x| x == controller) => Ok((root, true)),
            _ => Err(CgroupError::Missing(controller)),
        }
    }

    /// Makes `<parent>/<name>` in every hierarchy that holds a controller, writes `limits`, and
    /// returns the folders to join. On error, what was made is removed again.
    pub fn create(
        &self,
        parent: &str,
        name: &str,
        limits: Limits,
    ) -> Result<Vec<PathBuf>, CgroupError> {
        let mut made: Vec<PathBuf> = Vec::new();
        let result = self.create_into(parent, name, limits, &mut made);
        if result.is_err() {
            remove(&made);
        }
        result.map(|()| made)
    }

    fn create_into(
        &self,
        parent: &str,
        name: &str,
        limits: Limits,
        made: &mut Vec<PathBuf>,
    ) -> Result<(), CgroupError> {
        for controller in CONTROLLERS {
            let (root, v2) = self.place(controller)?;
            let dir = root.join(parent).join(name);
            if !made.contains(&dir) {
                if v2 {
                    // Controllers must be enabled on the way down.
                    mkdir(&root.join(parent))?;
                    let enable: String = CONTROLLERS
                        .iter()
                        .filter(|c| self.place(c).is_ok_and(|(r, v)| v && r == root))
                        .map(|c| format!("+{c} "))
                        .collect();
                    write(&root.join("cgroup.subtree_control"), enable.trim())?;
                    write(
                        &root.join(parent).join("cgroup.subtree_control"),
                        enable.trim(),
                    )?;
                } else {
                    mkdir(&root.join(parent))?;
                }
                mkdir(&dir)?;
                made.push(dir.clone());
            }
            match (controller, v2) {
                ("cpu", true) => write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?,
                ("cpu", false) => {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &limits.cpu_quota_us.to_string(),
                    )?;
                }
                ("memory", true) => {
                    write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                    write_if_present(&dir.join("memory.swap.max"), "0")?;
                }
                ("memory", false) => {
                    write(
                        &dir.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    write_if_present(
                        &dir.join("memory.memsw.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                }
                (_, _) => write(&dir.join("pids.max"), &limits.pids.to_string())?,
            }
        }
        Ok(())
    }
}

/// Whether the memory limit killed something in the cgroup folders `dirs` (v2 `memory.events`
/// `oom_kill`, v1 `memory.oom_control` `oom_kill`).
pub fn oom_killed(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| {
        ["memory.events", "memory.oom_control"].iter().any(|f| {
            std::fs::read_to_string(d.join(f)).is_ok_and(|t| {
                t.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
        })
    })
}

/// Removes the cgroup folders (they must hold no process any more); errors are logged.
pub fn remove(dirs: &[PathBuf]) {
    for dir in dirs.iter().rev() {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove cgroup"),
        }
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Write {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes `value` to `path` if the kernel offers that file (swap accounting may be off).
fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() {
        write(path, value)
    } else {
        Ok(())
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 24 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
32 25 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
33 25 0:30 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
34 25 0:31 / /sys/fs/cgroup/my\\040group rw - cgroup cgroup rw,freezer
";

    #[test]
    fn a_hybrid_host_uses_its_v1_controllers() {
        let h = Hierarchies::parse(HYBRID);
        assert_eq!(h.v2, Some(("/sys/fs/cgroup/unified".into(), vec![])));
        assert_eq!(
            h.v1,
            [
                ("/sys/fs/cgroup/cpu,cpuacct".into(), vec!["cpu".to_owned()]),
                ("/sys/fs/cgroup/memory".into(), vec!["memory".to_owned()]),
                ("/sys/fs/cgroup/pids".into(), vec!["pids".to_owned()]),
            ]
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn v1_limits_are_written_in_each_controllers_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let h = Hierarchies {
            v2: None,
            v1: CONTROLLERS
                .iter()
                .map(|c| (root.path().join(c), vec![(*c).to_owned()]))
                .collect(),
        };
        for c in CONTROLLERS {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        let limits = Limits::for_vm(2, 256, 64);
        let dirs = h.create("nanoclaw", "vm1", limits).unwrap();
        assert_eq!(dirs.len(), 3);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("cpu/nanoclaw/vm1/cpu.cfs_quota_us"), "200000");
        assert_eq!(read("cpu/nanoclaw/vm1/cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory/nanoclaw/vm1/memory.limit_in_bytes"),
            (320u64 << 20).to_string()
        );
        assert_eq!(read("pids/nanoclaw/vm1/pids.max"), "66");
    }

    #[test]
    fn v2_limits_enable_the_controllers_on_the_way_down() {
        let root = tempfile::tempdir().unwrap();
        let h = Hierarchies {
            v2: Some((
                root.path().to_owned(),
                CONTROLLERS.iter().map(|c| (*c).to_owned()).collect(),
            )),
            v1: vec![],
        };
        let dirs = h
            .create("nanoclaw", "vm2", Limits::for_vm(1, 128, 64))
            .unwrap();
        assert_eq!(dirs, [root.path().join("nanoclaw/vm2")]);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(
            read("nanoclaw/cgroup.subtree_control"),
            "+cpu +memory +pids"
        );
        assert_eq!(read("nanoclaw/vm2/cpu.max"), "100000 100000");
        assert_eq!(read("nanoclaw/vm2/memory.max"), (192u64 << 20).to_string());
        assert_eq!(read("nanoclaw/vm2/pids.max"), "65");
    }

    #[test]
    fn a_missing_controller_is_named_and_nothing_is_left_behind() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("cpu")).unwrap();
        let h = Hierarchies {
            v2: None,
            v1: vec![(root.path().join("cpu"), vec!["cpu".to_owned()])],
        };
        let err = h
            .create("nanoclaw", "vm3", Limits::for_vm(1, 128, 64))
            .unwrap_err();
        assert!(matches!(err, CgroupError::Missing("memory")), "{err}");
        assert_eq!(
            err.to_string(),
            "no cgroup hierarchy offers the memory controller"
        );
    }

    /// On the real hierarchies of this host (as root): the group is made, limited, and removed.
    #[test]
    fn this_hosts_cgroups_take_a_vms_limits() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: making cgroups needs root");
            return;
        }
        let h = Hierarchies::detect();
        let parent = format!("nanoclaw-test-{}", std::process::id());
        let dirs = h.create(&parent, "vm", Limits::for_vm(1, 64, 64)).unwrap();
        assert!(!dirs.is_empty());
        let memory = dirs
            .iter()
            .find_map(|d| {
                ["memory.max", "memory.limit_in_bytes"]
                    .iter()
                    .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            })
            .unwrap();
        assert_eq!(memory.trim(), (128u64 << 20).to_string());
        remove(&dirs);
        for d in &dirs {
            assert!(!d.exists(), "{} is left", d.display());
            let _ = std::fs::remove_dir(d.parent().unwrap());
        }
    }

    #[test]
    fn an_oom_kill_is_seen_in_either_version() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("memory.events"), "low 0\noom 1\noom_kill 0\n").unwrap();
        assert!(!oom_killed(&[d.path().to_owned()]));
        std::fs::write(d.path().join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        assert!(oom_killed(&[d.path().to_owned()]));
        let v1 = tempfile::tempdir().unwrap();
        std::fs::write(
            v1.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert!(oom_killed(&[v1.path().to_owned()]));
    }
}
