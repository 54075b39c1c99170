//! The host-agent daemon (`host-agent serve`): it creates microVMs that each run one agent,
//! relays the agent's control channel, and serves the HTTP/JSON API of [`nanoclaw_api`] on a Unix
//! socket.
//!
//! - Each VM is one VMM process (the `nanoclaw-vmm` binary beside this one, or `--vmm-bin`), started
//!   in its own session, so it outlives the daemon; its stdio is copied into `<vm-dir>/vmm.log`
//!   up to a cap ([`vmm_log`]).
//! - The state of each VM lives in `<state-dir>/vms/<id>/` ([`state`]). On start the daemon
//!   re-attaches every VM whose VMM still runs (same pid and start time): it re-binds the
//!   control listener and waits for the sidecar to reconnect. A VM whose VMM vanished without
//!   the daemon seeing it end becomes `failed` if the VMM left an `exit.json`, else `lost`.
//!   A VM found in the middle of a live migration out asks its VMM how the migration ended
//!   ([`Daemon::settle_interrupted`](migrate)): one that moved ends here as `migrated`.
//! - One daemon per state directory: it holds an exclusive lock on `<state-dir>/daemon.lock`.
//! - At most `--max-vms` VMs are unended at once. A VM an orchestrator spawned
//!   ([`gateways::DaemonSpawner`]) records its parent; each parent has at most
//!   `--max-children` attached children and spawns at the pace of a [`ratelimit::TokenBucket`].
//!   When a VM ends (stopped, killed, failed, or found ended on a restart), its attached
//!   children are stopped, and theirs in turn; `POST /v1/vms/{id}/detach` exempts one.
//!
//! # Layout
//! - [`state`]: the on-disk record and process checks.
//! - [`vm`]: one VM at run time (VMM, control connection, events, stop).
//! - [`event_feed`]: a VM's live events for the API's streams, bounded in bytes.
//! - [`routes`]: the HTTP handlers.
//! - [`ratelimit`]: the log budget for guest-triggered lines.
//! - [`vmm_log`]: the VMM's stdout and stderr, copied into `vmm.log` up to a cap.
//! - [`vmm_control`]: the VMM's control socket: pausing and resuming its vCPUs, snapshots.
//! - [`snapshots`]: the snapshot store (`<state-dir>/snapshots/`), and what a restore copies.
//! - [`images`]: the image routes, and what a VM created with an image gets.
//! - [`files`]: copying files into and out of a VM (`nanoclaw cp`).
//! - [`gateways`]: the MCP gateway of each VM that has a profile, and agent spawning.

pub mod cgroup;
pub mod event_feed;
pub mod files;
pub mod gateways;
pub mod images;
pub mod jail;
pub mod migrate;
pub mod pinning;
pub mod ratelimit;
pub mod routes;
pub mod snapshots;
pub mod state;
pub mod vm;
pub mod vmm_control;
pub mod vmm_log;
pub mod warm;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;

use self::state::{StateError, VmRecord};
use self::vm::{Vm, VmError, VmmLaunch};
use crate::error_chain;
use nanoclaw_api::{self as api, CreateVm};

/// How long open API responses may take to finish once the daemon is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A `--migration-peer` does not parse.
    #[error(transparent)]
    MigrationPeer(#[from] crate::migration::BadPeer),
    /// The `--underlay` interface cannot be used.
    #[error("the underlay")]
    Underlay(#[source] crate::net::underlay::UnderlayError),
    /// Live migration's identity or listener could not be set up.
    #[error("live migration")]
    Migration(#[source] crate::migration::link::LinkError),
    /// `--socket-group` names no group.
    #[error("--socket-group: no group named {0:?}")]
    NoSuchGroup(String),
    /// The remote API's token file is unusable.
    #[error("remote API tokens")]
    Tokens(#[source] crate::remote::tokens::TokenError),
    /// The remote API could not be set up.
    #[error("remote API")]
    Remote(#[source] crate::remote::RemoteError),
    /// The jail's settings are unusable.
    #[error("jail")]
    Jail(#[source] jail::JailError),
    /// `--pin-vmm-cpus` found no CPU to hand out.
    #[error("--pin-vmm-cpus")]
    Pin(#[source] pinning::PinError),
    /// Neither `--kernel`/`--initrd` nor `--guest-manifest` was given.
    #[error("no guest image: pass --kernel and --initrd, or --guest-manifest")]
    NoGuestImage,
    /// The guest manifest cannot be read.
    #[error("cannot read the guest manifest {}", .path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest manifest lacks a key.
    #[error("the guest manifest {} has no {key}", .path.display())]
    ManifestKey {
        /// The manifest.
        path: PathBuf,
        /// The missing key.
        key: &'static str,
    },
    /// A guest image file is missing.
    #[error("guest image file {} is missing", .0.display())]
    MissingImage(PathBuf),
    /// Finding our own executable (whose sibling is the VMM binary) failed.
    #[error("cannot find the host-agent executable, whose sibling is the default --vmm-bin")]
    CurrentExe(#[source] std::io::Error),
    /// Creating a directory failed.
    #[error("cannot create {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon holds the state directory.
    #[error("another daemon already uses the state directory {}", .0.display())]
    StateLocked(PathBuf),
    /// Locking the state directory failed.
    #[error("cannot lock {}", .path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A daemon already answers on the API socket.
    #[error("a daemon already listens on {}", .0.display())]
    SocketInUse(PathBuf),
    /// Binding the API socket failed.
    #[error("cannot listen on {}", .path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving the API failed.
    #[error("API server failed")]
    Serve(#[source] std::io::Error),
    /// Building the async runtime failed.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The credential relay could not start.
    #[error("credential relay")]
    Relay(#[source] crate::relay::RelayError),
    /// Creating a VM failed.
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    /// The state of a VM failed.
    #[error("VM state")]
    State(#[source] StateError),
    /// Starting passkey approvals failed.
    #[error("passkey approvals")]
    Approvals(#[source] crate::approval::server::ServerError),
    /// The snapshot store could not be opened.
    #[error("snapshot store")]
    Snapshots(#[source] snapshots::SnapshotError),
    /// Opening the audit log failed.
    #[error("audit log")]
    Audit(#[source] nanoclaw_audit::AuditError),
    /// The VM's image could not be set up (no such image, a bad config, no writable disk).
    #[error("image: {0}")]
    Image(String),
    /// A limit of the daemon refused the VM.
    #[error(transparent)]
    Limit(LimitError),
    /// Opening the image store failed.
    #[error("image store")]
    ImageStore(#[source] nanoclaw_image::StoreError),
}

/// `host-agent serve`: run the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Where VM state lives (`<dir>/vms/<id>/`).
    #[arg(long, default_value = api::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The API socket (created with mode 0600, or 0660 with --socket-group).
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Also let this group's members use the API socket (mode 0660, this group): the package
    /// makes the group `nanoclaw` for it. Its members can do anything the API does.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Guest kernel (bzImage or ELF vmlinux).
    #[arg(long, requires = "initrd", conflicts_with = "guest_manifest")]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// A `guest-image/build` manifest (KERNEL_VMLINUX or KERNEL_BZIMAGE, and INITRAMFS).
    #[arg(long)]
    pub guest_manifest: Option<PathBuf>,
    /// The VMM binary, run as `BIN --kernel ... --vm-dir ...` (default: `nanoclaw-vmm` beside this
    /// executable).
    #[arg(long)]
    pub vmm_bin: Option<PathBuf>,
    /// Seconds between the Shutdown request and SIGTERM (and between SIGTERM and SIGKILL).
    #[arg(long, default_value_t = 10)]
    pub stop_grace_secs: u64,
    /// Largest agent-output.ndjson per VM, in bytes; further output is dropped and counted.
    #[arg(long, default_value_t = 16 << 20)]
    pub output_cap_bytes: u64,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Serve the passkey registration and approval pages on this TCP address (e.g.
    /// 127.0.0.1:8443). Without it every approval request is denied.
    #[arg(long, value_name = "ADDR")]
    pub approvals_listen: Option<std::net::SocketAddr>,
    /// The approval pages' origin as the browser sees it (default http://localhost:PORT); its
    /// host is the passkeys' rp id.
    #[arg(long, requires = "approvals_listen")]
    pub approvals_origin: Option<String>,
    /// Seconds an approval request waits for the user before it is denied as expired.
    #[arg(long, default_value_t = 300)]
    pub approvals_ttl_secs: u64,
    /// POST a JSON notice ({approval_id, summary, url}) here for each new approval request.
    #[arg(long, value_name = "URL", requires = "approvals_listen")]
    pub approvals_webhook: Option<String>,
    /// Send Web Push notifications to browsers that subscribe while registering a passkey;
    /// the value is the VAPID contact push services may use (mailto:you@example.com).
    #[arg(long, value_name = "MAILTO", requires = "approvals_listen")]
    pub approvals_push_contact: Option<String>,
    /// Listen for the user's device (`vault-device`) on this TCP address and relay the VMs'
    /// credential sessions to it (see [`crate::relay`]).
    #[arg(long)]
    pub device_listen: Option<std::net::SocketAddr>,
    /// While a device is linked, ask it to sign an audit checkpoint at least this often (and
    /// once more at shutdown); 0 turns checkpoints off.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub audit_checkpoint_secs: u64,
    /// Also ask as soon as this many audit records were appended since the last checkpoint.
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_records: u64,
    /// Where images live (`<dir>/images/`); default the state directory. Images are
    /// content-addressed, so several daemons may share one store.
    #[arg(long, value_name = "DIR")]
    pub image_store: Option<PathBuf>,
    /// Also serve the API over TLS on this address, for remote clients with a bearer token
    /// (`nanoclaw token create`). Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// The remote API's certificate chain (PEM); default: one the daemon makes and keeps in
    /// `<state-dir>/tls/`. With --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The remote API's private key (PEM). With --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Another name for the daemon's own certificate (besides localhost and the host name);
    /// repeatable.
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// Jail every VMM (own namespaces, root, uid, cgroups): `auto` does when the daemon runs as
    /// root, `on` refuses to start otherwise, `off` never does (development only).
    #[arg(long, value_enum, default_value_t = jail::JailMode::Auto)]
    pub jail: jail::JailMode,
    /// Also put each jailed VMM in a user namespace that maps only its uid and gid: `auto`
    /// does where the host allows user namespaces, `on` refuses to start otherwise.
    #[arg(long, value_enum, default_value_t = jail::UserNsMode::Auto)]
    pub jail_userns: jail::UserNsMode,
    /// Keep each VMM on host CPUs of its own, as many as it has vCPUs, handed out in turn
    /// from the daemon's own CPUs (see `daemon::pinning`). Off by default.
    #[arg(long, env = "NANOCLAW_PIN_VMM_CPUS", value_parser = clap::builder::FalseyValueParser::new())]
    pub pin_vmm_cpus: bool,
    /// The first uid (and gid) given to a jailed VMM; each running VM has its own.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub jail_uid_base: u32,
    /// How many uids from --jail-uid-base there are: at most this many VMs run at once.
    #[arg(long, default_value_t = 10_000)]
    pub jail_uid_count: u32,
    /// The IPv4 prefix the addresses of VMs with network egress come from (a /29 each; see
    /// `docs/security/network.md`). It must not overlap a network the host reaches.
    #[arg(long, default_value = crate::net::addr::OverlayPrefix::DEFAULT, value_name = "A.B.C.D/LEN")]
    pub overlay_prefix: crate::net::addr::OverlayPrefix,
    /// The DNS server the VMs' resolvers ask, as `ADDR:PORT` (queries for names a VM's profile
    /// allows go here from the daemon's own namespace). Default: the first `nameserver` of
    /// `/etc/resolv.conf`, port 53.
    #[arg(long, value_name = "ADDR:PORT")]
    pub egress_dns: Option<std::net::SocketAddr>,
    /// The interface on the network this host shares with the other hosts and the agents'
    /// clients (see `docs/security/network.md`, "The underlay"). The daemon answers ARP there
    /// for its networked VMs' addresses, clients on its networks may reach the ports a
    /// profile's `[network] ingress` opens, and a VM migrated here is announced there.
    #[arg(long, value_name = "IFACE")]
    pub underlay: Option<String>,
    /// The parent of each VM's cgroup, relative to each cgroup hierarchy's root.
    #[arg(long, default_value = "nanoclaw")]
    pub cgroup_parent: String,
    /// At most this many VMs exist unended at once, whether the user created them or an
    /// orchestrator spawned them; one more is refused.
    #[arg(long, default_value_t = 64)]
    pub max_vms: usize,
    /// At most this many live agents one orchestrator VM has spawned (detached ones do not
    /// count); one more is refused.
    #[arg(long, default_value_t = 8)]
    pub max_children: usize,
    /// How many agents an orchestrator VM may spawn at once before --spawn-interval-secs
    /// paces it.
    #[arg(long, default_value_t = 4)]
    pub spawn_burst: u32,
    /// Once its burst is used, an orchestrator VM may spawn one agent per this many seconds.
    #[arg(long, default_value_t = 5)]
    pub spawn_interval_secs: u64,
    /// Receive live migrations from the pinned peers on this TCP address (`HOST:PORT`). Off
    /// unless given.
    #[arg(long, value_name = "ADDR", requires = "migration_peers")]
    pub migration_listen: Option<std::net::SocketAddr>,
    /// Another host's daemon that VMs migrate to and from: its migration address and its
    /// migration key (`host-agent migration-key` on that host), as `HOST:PORT=KEY`; repeatable.
    /// VMs move only between pinned peers.
    #[arg(long = "migration-peer", value_name = "HOST:PORT=KEY")]
    pub migration_peers: Vec<String>,
}

/// The daemon's limits on how many VMs there are and how fast orchestrators spawn them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unended VMs at once (`--max-vms`).
    pub max_vms: usize,
    /// Live, attached children of one VM (`--max-children`).
    pub max_children: usize,
    /// Spawns one VM may make at once (`--spawn-burst`).
    pub spawn_burst: u32,
    /// Then one spawn per this long (`--spawn-interval-secs`).
    pub spawn_interval: Duration,
}

impl Limits {
    /// Checks a create against the VMs there are: `vms` are every VM the daemon knows of,
    /// `parent` the VM that spawns this one (if one does). Counts only unended VMs, and for the
    /// parent only the children still attached to it.
    fn admit(
        &self,
        vms: &HashMap<String, Arc<Vm>>,
        parent: Option<&str>,
    ) -> Result<(), LimitError> {
        let live = || vms.values().filter(|v| !v.status().is_terminal());
        if let Some(parent) = parent {
            let ending = vms
                .get(parent)
                .is_none_or(|p| p.status().is_terminal() || p.status() == api::VmStatus::Stopping);
            if ending {
                return Err(LimitError::ParentEnding(parent.to_owned()));
            }
            let children = live()
                .filter(|v| v.attached_parent().as_deref() == Some(parent))
                .count();
            if children >= self.max_children {
                return Err(LimitError::TooManyChildren {
                    parent: parent.to_owned(),
                    limit: self.max_children,
                });
            }
        }
        if live().count() >= self.max_vms {
            return Err(LimitError::TooManyVms {
                limit: self.max_vms,
            });
        }
        Ok(())
    }
}

/// Why a create was refused by the daemon's [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `--max-vms` unended VMs exist already.
    #[error("the daemon already runs {limit} VMs (--max-vms)")]
    TooManyVms {
        /// The cap.
        limit: usize,
    },
    /// The parent has `--max-children` live children already.
    #[error("VM {parent} already has {limit} live children (--max-children)")]
    TooManyChildren {
        /// The parent.
        parent: String,
        /// The cap.
        limit: usize,
    },
    /// The parent is ending (or gone): a child made now would outlive it.
    #[error("VM {0} is ending")]
    ParentEnding(String),
}

/// The VMM binary's file name; the daemon runs the one beside its own executable by default.
pub const VMM_BIN_NAME: &str = "nanoclaw-vmm";

/// The daemon's audit log, in the state directory.
pub use nanoclaw_api::AUDIT_FILE;

/// The approver for `approvals`: the passkey approver when approvals are served, else
/// [`crate::approval::DenyAll`].
fn approver_of(
    approvals: Option<&crate::approval::passkey::PasskeyApprover>,
) -> Arc<dyn crate::approval::Approver> {
    match approvals {
        Some(a) => Arc::new(a.clone()),
        None => Arc::new(crate::approval::DenyAll),
    }
}

/// Errors of detaching a VM from its parent.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// No such VM.
    #[error("no such VM")]
    NotFound,
    /// No VM spawned it.
    #[error("no VM spawned it")]
    NoParent,
}

/// Errors of removing a VM.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// No such VM.
    #[error("no such VM")]
    NotFound,
    /// The VM has not ended.
    #[error("the VM is {}", .0.as_str())]
    NotEnded(api::VmStatus),
    /// Its network namespace or veth could not be removed (its folder is kept).
    #[error("cannot remove the VM's network")]
    Network(#[source] crate::net::netns::NetnsError),
    /// Deleting its directory failed.
    #[error("cannot delete {}", .path.display())]
    Delete {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How long a restored VMM has to load its snapshot and serve its control socket.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot cannot be used.
    #[error(transparent)]
    Snapshot(#[from] snapshots::SnapshotError),
    /// The VM could not be made or started.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The VMM refused the snapshot (its own words).
    #[error("the VMM refused the snapshot: {0}")]
    Refused(String),
}

/// The most VMs one fork makes.
pub const MAX_FORK: u32 = 8;

/// Why a fork failed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// `n` out of range.
    #[error("a fork makes 1 to {MAX_FORK} VMs, not {0}")]
    BadCount(u32),
    /// The VM is paused: its guest could not freeze its processes for the fork.
    #[error("VM {0} is paused; resume it first (a fork freezes the guest's processes)")]
    Paused(String),
    /// The snapshot or a restore failed (the VMs made before are stopped and removed).
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

/// The last line of a VM's `vmm.log` (what a VMM that refused to start said), at most 400
/// bytes of it.
fn vmm_log_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join(state::VMM_LOG_FILE)).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    let text = String::from_utf8_lossy(&text[start..]).into_owned();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("it ended without a word");
    line.chars().take(400).collect()
}

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    /// The snapshots.
    snapshots: snapshots::Store,
    vms_dir: PathBuf,
    /// The MCP gateways of VMs created with a profile.
    mcp: gateways::VmGateways,
    launch: VmmLaunch,
    /// Where networked VMs' addresses come from (`--overlay-prefix`).
    overlay: crate::net::addr::OverlayPrefix,
    /// The DNS server networked VMs' resolvers forward to (`--egress-dns`).
    egress_dns: std::net::SocketAddr,
    /// The network shared with the other hosts and the clients (`--underlay`).
    underlay: Option<Arc<crate::net::underlay::Underlay>>,
    /// The audit log, for egress denials.
    audit: Arc<nanoclaw_audit::AuditLog>,
    stop_grace: Duration,
    output_cap: u64,
    /// Shared with the tasks that act when a VM ends.
    vms: Arc<Mutex<HashMap<String, Arc<Vm>>>>,
    approvals: Option<crate::approval::passkey::PasskeyApprover>,
    relay: Option<Arc<crate::relay::Relay>>,
    images: nanoclaw_image::ImageStore,
    limits: Limits,
    /// Each orchestrator VM's spawn pace, from its first spawn until it ends.
    spawn_pace: Mutex<HashMap<String, ratelimit::TokenBucket>>,
    /// The remote API's bearer tokens (hashed).
    tokens: Arc<crate::remote::tokens::TokenStore>,
    /// Live migration's identity and pinned peers, when it is on.
    migration: Option<Arc<migrate::MigrationSetup>>,
    /// The migrations under way from this host.
    migrating: migrate::Running,
    /// The budget of log lines about refused migration callers.
    migration_log_budget: Mutex<ratelimit::LogBudget>,
    /// The tokenizers carried by VMs migrating in, for their gateways, by VM id.
    carried_tokens: Mutex<HashMap<String, crate::agent_tokens::CarriedTokens>>,
}

impl Daemon {
    /// The remote API's token store.
    pub fn tokens(&self) -> &Arc<crate::remote::tokens::TokenStore> {
        &self.tokens
    }

    /// The image store.
    pub fn images(&self) -> &nanoclaw_image::ImageStore {
        &self.images
    }

    /// The approver gated actions ask: passkeys when `--approvals-listen` is set, else
    /// [`crate::approval::DenyAll`].
    pub fn approver(&self) -> Arc<dyn crate::approval::Approver> {
        approver_of(self.approvals.as_ref())
    }

    /// The passkey approver, when approvals are served.
    pub fn approvals(&self) -> Option<&crate::approval::passkey::PasskeyApprover> {
        self.approvals.as_ref()
    }

    /// Every VM, oldest first.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        let mut vms: Vec<_> = self.lock_vms().values().cloned().collect();
        vms.sort_by_key(|v| (v.info().created_unix_ms, v.id.clone()));
        vms
    }

    /// The VM with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Vm>> {
        self.lock_vms().get(id).cloned()
    }

    /// Forgets an ended VM and deletes its directory.
    pub fn remove(&self, id: &str) -> Result<(), RemoveError> {
        let ended = |vms: &HashMap<String, Arc<Vm>>| {
            let vm = vms.get(id).ok_or(RemoveError::NotFound)?;
            let status = vm.status();
            if !status.is_terminal() {
                return Err(RemoveError::NotEnded(status));
            }
            Ok(Arc::clone(vm))
        };
        let vm = ended(&self.lock_vms())?;
        // Its namespace and veth go first, while the VM still holds its address (a mounted
        // namespace file would stop the folder's deletion anyway); an ended VM never gets them
        // back, so doing this outside the lock races with nothing but another removal.
        if vm.network().is_some() {
            crate::net::netns::teardown(&vm.dir.join(crate::net::netns::NETNS_FILE), id)
                .map_err(RemoveError::Network)?;
        }
        let vm = {
            let mut vms = self.lock_vms();
            ended(&vms)?;
            vms.remove(id).ok_or(RemoveError::NotFound)?
        };
        std::fs::remove_dir_all(&vm.dir).map_err(|source| RemoveError::Delete {
            path: vm.dir.clone(),
            source,
        })?;
        tracing::info!(vm = %id, "VM removed");
        Ok(())
    }

    /// How long a stop waits at each step.
    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }

    fn lock_vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one of `parent`'s spawns at `now` (`--spawn-burst`, `--spawn-interval-secs`):
    /// `Err(wait)` when it has none left, with how long until the next.
    pub fn pace_spawn(&self, parent: &str, now: std::time::Instant) -> Result<(), Duration> {
        let mut pace = self.spawn_pace.lock().unwrap_or_else(|p| p.into_inner());
        pace.entry(parent.to_owned())
            .or_insert_with(|| {
                ratelimit::TokenBucket::new(self.limits.spawn_burst, self.limits.spawn_interval)
            })
            .take(now)
    }

    /// Detaches a spawned VM from its parent: it no longer stops when the parent ends.
    pub fn detach(&self, id: &str) -> Result<Arc<Vm>, DetachError> {
        let vm = self.get(id).ok_or(DetachError::NotFound)?;
        if !vm.detach() {
            return Err(DetachError::NoParent);
        }
        tracing::info!(vm = %id, "VM detached from its parent");
        Ok(vm)
    }

    /// Once `vm` has ended, stops the VMs it spawned that are still attached to it (and so on
    /// down: each of those does the same for its own when it ends).
    fn stop_children_when_ended(self: &Arc<Self>, vm: &Arc<Vm>) {
        let (daemon, id, mut ended) = (Arc::downgrade(self), vm.id.clone(), vm.ended());
        tokio::spawn(async move {
            vm::wait_ended(&mut ended).await;
            let Some(daemon) = daemon.upgrade() else {
                return;
            };
            daemon
                .spawn_pace
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let children: Vec<Arc<Vm>> = daemon
                .lock_vms()
                .values()
                .filter(|v| !v.status().is_terminal())
                .filter(|v| v.attached_parent().as_deref() == Some(id.as_str()))
                .cloned()
                .collect();
            let grace = daemon.stop_grace;
            for child in children {
                tracing::info!(vm = %child.id, parent = %id, "stopping: its parent ended");
                tokio::spawn(async move { child.stop(grace).await });
            }
        });
    }

    /// Creates a VM for `spec` and starts its VMM.
    pub fn create(self: &Arc<Self>, spec: CreateVm) -> Result<Arc<Vm>, DaemonError> {
        self.create_as(spec, None)
    }

    /// Creates a VM for `spec` spawned by the VM `parent` (within `--max-children`), and starts
    /// its VMM. It stops when `parent` ends unless the user detaches it.
    pub fn create_child(
        self: &Arc<Self>,
        spec: CreateVm,
        parent: &str,
    ) -> Result<Arc<Vm>, DaemonError> {
        self.create_as(spec, Some(parent))
    }

    fn create_as(
        self: &Arc<Self>,
        spec: CreateVm,
        parent: Option<&str>,
    ) -> Result<Arc<Vm>, DaemonError> {
        // A cheap early refusal; the check that counts is made again under the lock below.
        self.limits
            .admit(&self.lock_vms(), parent)
            .map_err(DaemonError::Limit)?;
        if let Some(vm) = self.warm_start(&spec, parent)? {
            return Ok(vm);
        }
        let (id, dir) = state::create_vm_dir(&self.vms_dir).map_err(DaemonError::State)?;
        let record = match spec.image.is_some() {
            false => VmRecord::new(id.clone(), spec, state::now_unix_ms()),
            true => match images::resolve(&self.images, spec, &dir) {
                Ok((spec, image)) => {
                    let mut record = VmRecord::new(id.clone(), spec, state::now_unix_ms());
                    record.image = Some(image);
                    record
                }
                Err(why) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(DaemonError::Image(why));
                }
            },
        };
        let mut record = record;
        record.parent = parent.map(str::to_owned);
        let (vm, child) = self.start(id, dir, record, parent)?;
        tokio::spawn(Arc::clone(&vm).watch_child(child));
        Ok(vm)
    }

    /// Lists the VM of `record` in `dir` (within the limits, with a uid of its own) and starts
    /// its VMM: the one path of a created VM and a restored one. On a refusal `dir` is deleted;
    /// a VMM that cannot be spawned leaves the VM ended (`spawn_failed`).
    fn start(
        self: &Arc<Self>,
        id: String,
        dir: PathBuf,
        mut record: VmRecord,
        parent: Option<&str>,
    ) -> Result<(Arc<Vm>, tokio::process::Child), DaemonError> {
        // The limits are checked, the uid is picked and the VM listed under one lock, so two
        // VMs never share a uid nor pass a limit together.
        let mut vms = self.lock_vms();
        if let Err(e) = self.limits.admit(&vms, parent) {
            drop(vms);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(DaemonError::Limit(e));
        }
        if let Some(jail) = &self.launch.jail {
            let in_use = vms
                .values()
                .filter(|v| !v.status().is_terminal())
                .filter_map(|v| v.jail_uid())
                .collect();
            match jail.pick_uid(&in_use) {
                Ok(uid) => record.jail_uid = Some(uid),
                Err(e) => {
                    drop(vms);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(DaemonError::Vm(vm::VmError::Jail(e)));
                }
            }
        }
        if wants_network(&record.spec) {
            let link = match record.net.filter(|_| record.migrate_in.is_some()) {
                // A VM migrating in keeps its addresses, if they are free here.
                Some(link) => self
                    .check_network(&record.spec)
                    .and_then(|()| self.check_link(&vms, &link))
                    .map(|()| link),
                None => self.allocate_link(&vms, &record.spec),
            };
            match link {
                Ok(link) => record.net = Some(link),
                Err(e) => {
                    drop(vms);
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(DaemonError::Vm(vm::VmError::Network(e)));
                }
            }
        }
        let opened = record
            .save(&dir)
            .map_err(DaemonError::State)
            .and_then(|()| Vm::open(dir, record, self.output_cap).map_err(DaemonError::Vm));
        let vm = opened?;
        vm.set_relay(self.relay.clone());
        vms.insert(id, Arc::clone(&vm));
        drop(vms);
        self.stop_children_when_ended(&vm);
        // The listeners exist before the VMM, so the sidecar's first connect finds them.
        self.start_mcp(&vm);
        let started = self
            .prepare_network(&vm)
            .and_then(|()| vm.bind_control())
            .and_then(|l| Ok((l, vm.spawn_vmm(&self.launch)?)));
        match started {
            Ok((listener, child)) => {
                tokio::spawn(Arc::clone(&vm).accept_control(listener));
                Ok((vm, child))
            }
            Err(e) => {
                vm.conclude(
                    Some(api::VmmExit {
                        reason: "spawn_failed".to_owned(),
                        exit_code: None,
                        signal: None,
                        boot_to_ready_ms: None,
                        ..Default::default()
                    }),
                    false,
                );
                Err(DaemonError::Vm(e))
            }
        }
    }

    /// The snapshot store.
    pub fn snapshots(&self) -> &snapshots::Store {
        &self.snapshots
    }

    /// Takes a snapshot of VM `id` named `name` (a fresh name when `None`) into the store
    /// (see [`snapshots`]). A running VM is paused around it.
    pub async fn snapshot(
        &self,
        id: &str,
        name: Option<String>,
    ) -> Result<api::SnapshotInfo, snapshots::SnapshotError> {
        use snapshots::SnapshotError;
        let name = match name {
            Some(n) => n,
            None => snapshots::fresh_name()?,
        };
        snapshots::validate_name(&name)?;
        let vm = self
            .get(id)
            .ok_or_else(|| SnapshotError::NoVm(id.to_owned()))?;
        let staging = self.snapshots.stage(&name)?;
        // A running guest stops its processes first, so that none runs in a restored copy
        // before the copy has its own identity; a paused one cannot answer and is taken as is.
        let frozen = !vm.paused() && vm.control_connected();
        if frozen && let Err(e) = vm.freeze().await {
            vm.thaw();
            let _ = std::fs::remove_dir_all(&staging);
            return Err(SnapshotError::Freeze(e));
        }
        let taken = self.snapshot_into(&vm, &name, &staging, frozen).await;
        if frozen {
            vm.thaw();
        }
        match taken {
            Ok(meta) => {
                let info = self
                    .snapshots
                    .commit(&staging, &name, &meta)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_dir_all(&staging);
                    })?;
                self.audit_lifecycle(
                    "vm_snapshot",
                    serde_json::json!({
                        "vm": id,
                        "snapshot": name,
                        "frozen": frozen,
                        "memory_data_bytes": meta.memory_data_bytes,
                    }),
                )
                .await;
                Ok(info)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(e)
            }
        }
    }

    async fn snapshot_into(
        &self,
        vm: &Arc<Vm>,
        name: &str,
        staging: &Path,
        frozen: bool,
    ) -> Result<snapshots::SnapshotMeta, snapshots::SnapshotError> {
        let (spec, image) = vm.spec_and_image();
        // The VMM's folder for it, inside its jail: a name the VMM makes anew.
        let in_jail = format!("snapshot-{name}");
        let jail_dir = vm.vmm_dir.join(&in_jail);
        let disk_to = image.as_ref().map(|_| staging.join(snapshots::DISK_FILE));
        let result = async {
            let (written, disk_bytes) = vm.snapshot(&in_jail, disk_to.as_deref()).await?;
            let state_bytes = snapshots::adopt(&jail_dir, staging, snapshots::STATE_FILE)?;
            let memory_bytes = snapshots::adopt(&jail_dir, staging, snapshots::MEMORY_FILE)?;
            let format_version =
                snapshots::format_version(name, &staging.join(snapshots::STATE_FILE))?;
            let (boot_id, agent_sent, agent_pid) = vm.guest_facts();
            Ok(snapshots::SnapshotMeta {
                source_vm: vm.id.clone(),
                spec,
                image,
                created_unix_ms: state::now_unix_ms(),
                format_version,
                memory_bytes,
                memory_data_bytes: written.memory_data_bytes,
                state_bytes,
                disk_bytes,
                boot_id,
                agent_sent,
                agent_pid,
                frozen,
                guest: Some(self.launch.guest_fingerprint()),
            })
        }
        .await;
        // Whatever the VMM left in its folder goes (it is the VMM's, links are not followed).
        let _ = std::fs::remove_dir_all(&jail_dir);
        result
    }

    /// Makes `n` new VMs from VM `id`: a snapshot of it (paused around it), `n` restores of
    /// that snapshot, and the snapshot removed (each restore has read it by the time it
    /// answers). All `n` count
    /// against `--max-vms`, checked first; when a restore fails, the VMs made before it are
    /// stopped and removed. The guest is frozen for the snapshot (see [`Daemon::snapshot`])
    /// and each copy takes a new identity before its processes run again
    /// (`state::Reidentify`).
    pub async fn fork(self: &Arc<Self>, id: &str, n: u32) -> Result<Vec<Arc<Vm>>, ForkError> {
        if !(1..=MAX_FORK).contains(&n) {
            return Err(ForkError::BadCount(n));
        }
        if self.get(id).is_some_and(|vm| vm.paused()) {
            return Err(ForkError::Paused(id.to_owned()));
        }
        {
            let vms = self.lock_vms();
            let live = vms.values().filter(|v| !v.status().is_terminal()).count();
            if live + n as usize > self.limits.max_vms {
                return Err(
                    RestoreError::Daemon(DaemonError::Limit(LimitError::TooManyVms {
                        limit: self.limits.max_vms,
                    }))
                    .into(),
                );
            }
        }
        let name = format!(
            "fork-{id}-{}",
            snapshots::fresh_name()
                .map_err(RestoreError::Snapshot)?
                .trim_start_matches("snap-")
        );
        self.snapshot(id, Some(name.clone()))
            .await
            .map_err(RestoreError::Snapshot)?;
        let mut made: Vec<Arc<Vm>> = Vec::new();
        let mut failure = None;
        for _ in 0..n {
            match self.restore_copy(&name, false, RestoreKind::Fork).await {
                Ok(vm) => made.push(vm),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = self.snapshots.remove(&name) {
            tracing::warn!(snapshot = %name, error = %error_chain(&e), "fork snapshot left");
        }
        if let Some(e) = failure {
            for vm in made {
                vm.stop(self.stop_grace).await;
                let _ = self.remove(&vm.id);
            }
            return Err(e.into());
        }
        tracing::info!(vm = %id, n, "VM forked");
        let copies: Vec<&str> = made.iter().map(|vm| vm.id.as_str()).collect();
        self.audit_lifecycle("vm_fork", serde_json::json!({ "vm": id, "copies": copies }))
            .await;
        Ok(made)
    }

    /// Records a snapshot, restore or fork in the audit log: snapshots hold guest memory, and
    /// the user must be able to see where copies of an agent came from. The action has
    /// happened; a record that cannot be written is logged.
    async fn audit_lifecycle(&self, kind: &str, data: serde_json::Value) {
        if let Err(e) = self.audit.submit(kind, data).await {
            tracing::error!(kind, error = %error_chain(&e), "cannot record in the audit log");
        }
    }

    /// Starts a new VM from snapshot `name`: a VMM started with `--restore` on the stored
    /// folder, which it opens before its jail and reads (only a writable disk is copied, into
    /// the new VM's folder). Answers once the VMM
    /// serves its control socket (it has restored the guest); a VMM that refuses the snapshot
    /// leaves nothing behind, and its error is the answer's.
    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        paused: bool,
    ) -> Result<Arc<Vm>, RestoreError> {
        self.restore_copy(name, paused, RestoreKind::Restore).await
    }

    /// [`Self::restore`], for a restore or one copy of a fork. A fork's copies forward no host
    /// ports: the parent still holds them, and a port has one listener. A restore keeps the
    /// snapshot's, and fails with the port's error when one is taken.
    async fn restore_copy(
        self: &Arc<Self>,
        name: &str,
        paused: bool,
        kind: RestoreKind,
    ) -> Result<Arc<Vm>, RestoreError> {
        let asked = std::time::Instant::now();
        let meta = self.snapshots.meta(name)?;
        self.limits
            .admit(&self.lock_vms(), None)
            .map_err(DaemonError::Limit)?;
        if let Some(image) = &meta.image
            && !image.rootfs.is_file()
        {
            return Err(snapshots::SnapshotError::ImageGone {
                name: name.to_owned(),
                path: image.rootfs.clone(),
            }
            .into());
        }
        let (id, dir) = state::create_vm_dir(&self.vms_dir).map_err(DaemonError::State)?;
        let image = meta.image.clone().map(|mut i| {
            i.scratch = dir.join(images::SCRATCH_DISK_FILE);
            i
        });
        let disk_to = image.as_ref().map(|i| i.scratch.clone());
        let snapshot_dir = match self
            .snapshots
            .prepare_restore(name, &meta, disk_to.as_deref())
        {
            Ok(found) => found,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let mut spec = meta.spec.clone();
        if kind == RestoreKind::Fork {
            spec.ports.clear();
        }
        let mut record = VmRecord::new(id.clone(), spec, state::now_unix_ms());
        record.image = image;
        record.boot_id = meta.boot_id.clone();
        record.agent_sent = meta.agent_sent;
        record.agent_pid = meta.agent_pid;
        if meta.agent_pid.is_some() {
            record.status = api::VmStatus::Running;
        }
        record.paused = paused;
        // Any restore may be one of several copies: each takes its own identity first.
        record.reidentify = Some(state::Reidentify::default());
        record.restore = Some(state::Restore {
            snapshot: name.to_owned(),
            dir: snapshot_dir,
            paused,
        });
        let prepared_ms = asked.elapsed().as_millis();
        let (vm, child) = match self.start(id.clone(), dir.clone(), record, None) {
            Ok(started) => started,
            Err(e) => {
                // Nothing half-started is kept: a VMM that could not be spawned is forgotten.
                self.lock_vms().remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        match vm::wait_served(&vm, child, RESTORE_TIMEOUT).await {
            Ok(child) => {
                tokio::spawn(Arc::clone(&vm).watch_child(child));
                tracing::info!(
                    vm = %vm.id,
                    snapshot = name,
                    prepared_ms,
                    ms = asked.elapsed().as_millis(),
                    "VM restored"
                );
                self.audit_lifecycle(
                    "vm_restore",
                    serde_json::json!({ "vm": vm.id, "snapshot": name, "source_vm": meta.source_vm }),
                )
                .await;
                Ok(vm)
            }
            Err(status) => {
                let why = self.discard_unserved(&vm, status).await;
                tracing::warn!(snapshot = name, error = %why, "restore refused by the VMM");
                Err(RestoreError::Refused(why))
            }
        }
    }

    /// Forgets VM `vm`, whose VMM ended (`status`) before it served its control socket (a
    /// restore or a migration it refused): records the end, deletes its folder, and answers
    /// why, from the VMM's log.
    async fn discard_unserved(&self, vm: &Vm, status: Option<std::process::ExitStatus>) -> String {
        vm.finish(status).await;
        let mut why = vmm_log_tail(&vm.dir);
        // A VMM killed by a signal wrote no error of its own: say how it ended.
        if let Some(exit) = vm.info().vmm_exit
            && let Some(signal) = exit.signal
        {
            why = format!(
                "the VMM was killed by signal {signal} ({}); its log ends: {why}",
                exit.reason
            );
        }
        // A networked VM's namespace, veth and route go first: the address is free again
        // once the VM leaves the list, and a mounted namespace file would keep its folder.
        if vm.network().is_some()
            && let Err(e) =
                crate::net::netns::teardown(&vm.dir.join(crate::net::netns::NETNS_FILE), &vm.id)
        {
            tracing::warn!(vm = %vm.id, error = %error_chain(&e), "cannot remove the network of a VM that never ran here");
        }
        self.lock_vms().remove(&vm.id);
        let _ = std::fs::remove_dir_all(&vm.dir);
        why
    }

    /// Starts the VM's MCP gateway when it was created with a profile. A failure is logged: the
    /// agent then finds no MCP endpoint (nothing runs unchecked).
    fn start_mcp(&self, vm: &Arc<Vm>) {
        let carried = self.take_carried_tokens(&vm.id);
        if let Some(profile) = vm.info().spec.profile {
            match self.mcp.start(
                &vm.id,
                &vm.vmm_dir,
                vm.jail_uid(),
                &profile,
                vm.ended(),
                carried.as_ref(),
            ) {
                Ok(tokens) => vm.set_tokens(tokens),
                Err(e) => tracing::error!(vm = %vm.id, error = %error_chain(&e), "mcp gateway"),
            }
        }
    }

    /// Picks the addresses of a networked VM, against those of every VM still listed (`vms`,
    /// held locked by the caller). Networked VMs need the jail: the TAP is owned by the VMM's
    /// uid and the VMM joins the namespace as it enters the jail.
    fn allocate_link(
        &self,
        vms: &HashMap<String, Arc<Vm>>,
        spec: &CreateVm,
    ) -> Result<crate::net::addr::VmLink, vm::NetworkError> {
        self.check_network(spec)?;
        let in_use = vms
            .values()
            .filter_map(|v| v.network())
            .map(|link| link.guest)
            .collect();
        crate::net::addr::allocate(&self.overlay, &in_use).map_err(vm::NetworkError::Addr)
    }

    /// Whether this daemon can give `spec` the network it asks for: the jail, and an underlay
    /// for ingress ports.
    fn check_network(&self, spec: &CreateVm) -> Result<(), vm::NetworkError> {
        if self.launch.jail.is_none() {
            return Err(vm::NetworkError::NeedsJail);
        }
        let ingress = vm::profile_of(spec).is_some_and(|p| !p.network.ingress.is_empty());
        if ingress && self.underlay.is_none() {
            return Err(vm::NetworkError::NoUnderlay);
        }
        Ok(())
    }

    /// Checks the addresses a migrating VM brings (`link`) against this daemon's prefix and
    /// the addresses of every VM it still lists (`vms`, held locked by the caller).
    fn check_link(
        &self,
        vms: &HashMap<String, Arc<Vm>>,
        link: &crate::net::addr::VmLink,
    ) -> Result<(), vm::NetworkError> {
        if !self.overlay.has_link(link) {
            return Err(vm::NetworkError::NotOurs(link.guest, self.overlay));
        }
        if let Some(holder) = vms
            .values()
            .find(|v| v.network().is_some_and(|l| l.guest == link.guest))
        {
            return Err(vm::NetworkError::InUse(link.guest, holder.id.clone()));
        }
        Ok(())
    }

    /// Makes the network of a VM that has addresses: its namespace, links, firewall and the
    /// host's table. What was made is removed again on an error.
    fn prepare_network(&self, vm: &Arc<Vm>) -> Result<(), vm::VmError> {
        use crate::net::{firewall, netns};
        let (Some(link), Some(uid)) = (vm.network(), vm.jail_uid()) else {
            return Ok(());
        };
        let path = vm.dir.join(netns::NETNS_FILE);
        let made = netns::VmNetns::create(&path)
            .map_err(vm::NetworkError::Netns)
            .and_then(|ns| {
                netns::setup(&ns, &vm.id, &link, uid).map_err(vm::NetworkError::Netns)?;
                firewall::install(
                    &ns,
                    &link,
                    &self.overlay,
                    Some(crate::egress::service::SNI_PORT),
                    &self.ingress_of(vm),
                )
                .map_err(vm::NetworkError::Firewall)?;
                firewall::install_host(&self.overlay, self.underlay.as_deref())
                    .map_err(vm::NetworkError::Firewall)?;
                self.start_network_services(vm, ns, &link)?;
                // A VM migrating in is published once its copy runs (see `migrate_in`).
                if !vm.migrating_in() {
                    self.publish(vm, false);
                }
                Ok(())
            });
        if let Err(e) = made {
            if let Err(undo) = netns::teardown(&path, &vm.id) {
                tracing::warn!(vm = %vm.id, error = %error_chain(&undo), "cannot undo a VM's network");
            }
            return Err(vm::VmError::Network(e));
        }
        tracing::info!(vm = %vm.id, guest = %link.guest, "VM network ready");
        Ok(())
    }

    /// Who may connect to `vm` from the underlay.
    fn ingress_of(&self, vm: &Vm) -> crate::net::firewall::Ingress {
        let ports = vm::profile_of(&vm.info().spec)
            .map(|p| p.network.ingress)
            .unwrap_or_default();
        crate::net::firewall::Ingress::new(self.underlay.as_deref(), &ports)
    }

    /// Answers ARP for `vm`'s address on the underlay, when there is one; with `announce`,
    /// also tells the underlay's neighbours at once (three gratuitous ARPs over about 1.5 s,
    /// the later ones for a neighbour that missed the first, or that heard the old host's
    /// last answer after it). A failure is logged: the VM runs, unreachable from the underlay.
    pub(crate) fn publish(&self, vm: &Vm, announce: bool) {
        let (Some(underlay), Some(link)) = (self.underlay.clone(), vm.network()) else {
            return;
        };
        if let Err(e) = underlay.publish(link.guest) {
            tracing::warn!(vm = %vm.id, error = %error_chain(&e), "underlay: cannot publish the VM's address");
            return;
        }
        if !announce {
            return;
        }
        let id = vm.id.clone();
        tokio::spawn(async move {
            for pause in [0, 500, 1000] {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if let Err(e) = underlay.announce(link.guest) {
                    tracing::warn!(vm = %id, error = %error_chain(&e), "underlay: cannot announce the VM's address");
                }
            }
            tracing::info!(vm = %id, guest = %link.guest, "underlay: address announced");
        });
    }

    /// Starts the resolver and the SNI check of a networked VM in its namespace `ns`, its
    /// forwarded host ports and its peers (see [`Self::link_peers`]), and stops them all when
    /// the VM ends.
    fn start_network_services(
        &self,
        vm: &Arc<Vm>,
        ns: crate::net::netns::VmNetns,
        link: &crate::net::addr::VmLink,
    ) -> Result<(), vm::NetworkError> {
        let spec = vm.info().spec;
        let egress = vm::profile_of(&spec)
            .map(|p| p.network.egress)
            .unwrap_or_default();
        let bound = crate::net::forward::bind(&spec.ports).map_err(vm::NetworkError::Forward)?;
        let running = crate::egress::VmEgress::start(
            &vm.id,
            ns.clone(),
            link,
            &egress,
            self.egress_dns,
            Some(Arc::clone(&self.audit)),
            Some(&vm.dir),
        )
        .map_err(vm::NetworkError::Egress)?;
        let forwards = crate::net::forward::serve(&vm.id, ns, link.guest, bound)
            .map_err(vm::NetworkError::ForwardServe)?;
        vm.set_egress(Some(running));
        vm.set_forwards(Some(forwards));
        self.link_peers(vm);
        let (vm, mut ended) = (Arc::clone(vm), vm.ended());
        let others_of = self.networked_peers_of(&vm.id);
        let underlay = self.underlay.clone();
        tokio::spawn(async move {
            let _ = ended.wait_for(|e| *e).await;
            vm.set_egress(None);
            vm.set_forwards(None);
            if let (Some(underlay), Some(link)) = (underlay, vm.network()) {
                let id = vm.id.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = underlay.withdraw(link.guest) {
                        tracing::warn!(vm = %id, error = %error_chain(&e), "underlay: cannot withdraw an ended VM's address");
                    }
                })
                .await;
            }
            // Its address leaves every other VM's `peers` set (a later VM may get it).
            if let Some(link) = vm.network() {
                let others = others_of();
                let _ = tokio::task::spawn_blocking(move || {
                    for (id, ns) in others {
                        if let Err(e) = crate::net::firewall::set_peer(&ns, link.guest, false) {
                            tracing::warn!(vm = %id, error = %error_chain(&e), "peers: cannot remove an ended VM");
                        }
                    }
                })
                .await;
            }
        });
        Ok(())
    }

    /// A VM's profile name and `[network] peers`, when it is networked and running.
    fn peer_profile(vm: &Vm) -> Option<(String, Vec<String>)> {
        if vm.status().is_terminal() {
            return None;
        }
        vm.network()?;
        let profile = vm::profile_of(&vm.info().spec)?;
        Some((profile.name, profile.network.peers))
    }

    /// Opens the way between `vm` and each running networked VM whose profile and `vm`'s name
    /// each other (`[network] peers`), both ways: each gets the other's guest address in its
    /// `peers` set. Anything else between VMs stays refused.
    fn link_peers(&self, vm: &Arc<Vm>) {
        let (Some((name, peers)), Some(link), Some(ns)) =
            (Self::peer_profile(vm), vm.network(), vm.netns())
        else {
            return;
        };
        if peers.is_empty() {
            return;
        }
        for other in self.list() {
            if other.id == vm.id {
                continue;
            }
            let (Some((other_name, other_peers)), Some(other_link), Some(other_ns)) =
                (Self::peer_profile(&other), other.network(), other.netns())
            else {
                continue;
            };
            if !(peers.contains(&other_name) && other_peers.contains(&name)) {
                continue;
            }
            let both = crate::net::firewall::set_peer(&ns, other_link.guest, true)
                .and_then(|()| crate::net::firewall::set_peer(&other_ns, link.guest, true));
            match both {
                Ok(()) => tracing::info!(vm = %vm.id, peer = %other.id, "peers linked"),
                Err(e) => {
                    tracing::warn!(vm = %vm.id, peer = %other.id, error = %error_chain(&e), "peers: cannot link")
                }
            }
        }
    }

    /// A function that lists, when called, every other running networked VM's id and
    /// namespace (for the end of VM `id`).
    fn networked_peers_of(
        &self,
        id: &str,
    ) -> impl Fn() -> Vec<(String, crate::net::netns::VmNetns)> + Send + 'static {
        let id = id.to_owned();
        let vms = Arc::clone(&self.vms);
        move || {
            vms.lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|v| v.id != id && !v.status().is_terminal())
                .filter_map(|v| v.netns().map(|ns| (v.id.clone(), ns)))
                .collect()
        }
    }

    /// Loads every VM under the state directory, re-attaching live ones and concluding dead
    /// ones (see the module doc).
    /// Then, once all are loaded, every VM stops its attached children when it ends (at once
    /// for one that ended while the daemon was away).
    fn recover(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.vms_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.join(state::RECORD_FILE).exists() {
                continue;
            }
            if let Err(e) = self.recover_one(dir.clone()) {
                tracing::error!(dir = %dir.display(), error = %error_chain(&e), "cannot load VM");
            }
        }
        for vm in self.list() {
            self.stop_children_when_ended(&vm);
        }
    }

    fn recover_one(self: &Arc<Self>, dir: PathBuf) -> Result<(), DaemonError> {
        let record = VmRecord::load(&dir).map_err(DaemonError::State)?;
        let terminal = record.status.is_terminal();
        let vm = Vm::open(dir, record, self.output_cap).map_err(DaemonError::Vm)?;
        vm.set_relay(self.relay.clone());
        self.lock_vms().insert(vm.id.clone(), Arc::clone(&vm));
        if terminal {
            return Ok(());
        }
        if vm.vmm_alive() {
            let listener = vm.bind_control().map_err(DaemonError::Vm)?;
            tracing::info!(vm = %vm.id, "re-attached to a running VMM");
            vm.reattach_vmm_log();
            self.start_mcp(&vm);
            if let (Some(ns), Some(link)) = (vm.netns(), vm.network())
                && let Err(e) = self.start_network_services(&vm, ns, &link)
            {
                tracing::error!(vm = %vm.id, error = %error_chain(&e), "network: the VM has no resolver, SNI check or forwarded ports now");
            }
            tokio::spawn(Arc::clone(&vm).accept_control(listener));
            tokio::spawn(Arc::clone(&vm).watch_adopted());
            if vm.status() == api::VmStatus::Stopping {
                let (vm, grace) = (Arc::clone(&vm), self.stop_grace);
                tokio::spawn(async move { vm.stop(grace).await });
            }
            if let Some(to) = vm.migrating_to() {
                let (daemon, vm) = (Arc::clone(self), Arc::clone(&vm));
                tokio::spawn(async move { daemon.settle_interrupted(&vm, to).await });
            }
        } else {
            vm.migration_lost_with_vmm();
            match state::read_vmm_exit(&vm.vmm_dir) {
                Some(exit) => vm.conclude(Some(exit), false),
                None => {
                    tracing::warn!(vm = %vm.id, "VMM vanished without an exit record: lost");
                    vm.conclude(None, true);
                }
            }
        }
        Ok(())
    }
}

/// Whether `spec` gives its VM a network: its profile allows egress (`[network] egress`; a
/// profile that does not load gives none, and its gateway refuses it too), or it forwards host
/// ports to the agent.
pub(crate) fn wants_network(spec: &CreateVm) -> bool {
    !spec.ports.is_empty() || vm::profile_of(spec).is_some_and(|p| !p.network.is_empty())
}

/// Reads `KEY=VALUE` lines (shell syntax, optional quotes) of a guest-image manifest.
fn read_manifest(path: &Path) -> Result<(PathBuf, PathBuf), DaemonError> {
    let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Manifest {
        path: path.to_path_buf(),
        source,
    })?;
    let mut vars = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            vars.insert(k.trim().to_owned(), v.to_owned());
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let get = |key: &'static str| vars.get(key).map(|v| base.join(v));
    let kernel = get("KERNEL_VMLINUX")
        .or_else(|| get("KERNEL_BZIMAGE"))
        .ok_or_else(|| DaemonError::ManifestKey {
            path: path.to_path_buf(),
            key: "KERNEL_VMLINUX or KERNEL_BZIMAGE",
        })?;
    let initrd = get("INITRAMFS").ok_or_else(|| DaemonError::ManifestKey {
        path: path.to_path_buf(),
        key: "INITRAMFS",
    })?;
    Ok((kernel, initrd))
}

/// Raises the soft limit on open files to the hard one: every VM holds a few listeners and
/// every agent session a connection, and the default soft limit (often 1024) is reached long
/// before memory or CPU are.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| DaemonError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Takes the state directory's exclusive lock for the life of the daemon.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = state_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::Lock {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                DaemonError::StateLocked(state_dir.to_path_buf())
            } else {
                DaemonError::Lock {
                    path,
                    source: errno.into(),
                }
            }
        },
    )
}

/// Binds the API socket with mode 0600 (0660 and `group` when one is given), refusing to
/// steal it from a live daemon.
fn bind_api_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, DaemonError> {
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| DaemonError::Bind {
                    path: path.to_path_buf(),
                    source: e.into(),
                })?
                .ok_or_else(|| DaemonError::NoSuchGroup(name.to_owned()))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        // The group's members must reach the socket through the folder too.
        create_dir(parent, if gid.is_some() { 0o750 } else { 0o700 })?;
        if let Some(gid) = gid {
            std::os::unix::fs::lchown(parent, None, Some(gid)).map_err(|source| {
                DaemonError::Bind {
                    path: parent.to_path_buf(),
                    source,
                }
            })?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::SocketInUse(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    let bind_err = |source| DaemonError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    }
    Ok(listener)
}

/// Installs the tracing subscriber, unless the binary already did.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the daemon until SIGINT or SIGTERM. VMs keep running after it returns.
pub async fn serve(args: ServeArgs) -> Result<(), DaemonError> {
    let (kernel, initrd) = match (&args.kernel, &args.initrd, &args.guest_manifest) {
        (Some(k), Some(i), _) => (k.clone(), i.clone()),
        (_, _, Some(m)) => read_manifest(m)?,
        _ => return Err(DaemonError::NoGuestImage),
    };
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(DaemonError::MissingImage(f.clone()));
        }
    }
    let bin = match args.vmm_bin {
        Some(b) => b,
        None => std::env::current_exe()
            .map_err(DaemonError::CurrentExe)?
            .with_file_name(VMM_BIN_NAME),
    };
    raise_open_file_limit();
    let pin = if args.pin_vmm_cpus {
        let pinner = pinning::CpuPinner::from_own_affinity().map_err(DaemonError::Pin)?;
        tracing::info!("each VMM is kept on host CPUs of its own (--pin-vmm-cpus)");
        Some(Arc::new(pinner))
    } else {
        None
    };
    let jail = jail::JailSettings::new(
        args.jail,
        args.jail_uid_base,
        args.jail_uid_count,
        &args.cgroup_parent,
    )
    .and_then(|j| {
        j.map(|j| j.with_user_namespace(args.jail_userns))
            .transpose()
    })
    .map_err(DaemonError::Jail)?;
    create_dir(&args.state_dir, 0o700)?;
    let tokens = Arc::new(
        crate::remote::tokens::TokenStore::open(&args.state_dir).map_err(DaemonError::Tokens)?,
    );
    let _lock = lock_state_dir(&args.state_dir)?;
    let vms_dir = args.state_dir.join("vms");
    create_dir(&vms_dir, 0o700)?;
    // One audit log for the whole daemon: two writers of one file would fork its chain.
    let audit = Arc::new(
        nanoclaw_audit::AuditLog::open(args.state_dir.join(AUDIT_FILE))
            .map_err(DaemonError::Audit)?,
    );
    // Who is told that a credential request waits on the device's own approval page: the
    // same receivers as the host's approval requests.
    let mut device_notifiers = crate::notify::from_flags(args.approvals_webhook.as_deref());
    let approvals = match args.approvals_listen {
        Some(listen) => {
            let notifiers = crate::notify::from_flags(args.approvals_webhook.as_deref());
            let push = args
                .approvals_push_contact
                .clone()
                .map(|contact| {
                    crate::notify::webpush::WebPush::open(
                        &args.state_dir.join("vapid.key"),
                        args.state_dir.join("push-subscriptions.json"),
                        contact,
                    )
                })
                .transpose()
                .map_err(|e| {
                    DaemonError::Approvals(crate::approval::server::ServerError::Push(e))
                })?;
            if let Some(push) = &push {
                device_notifiers.push(Arc::new(push.clone()));
            }
            let config = crate::approval::server::ServeConfig {
                listen,
                origin: args.approvals_origin.clone(),
                ttl: Duration::from_secs(args.approvals_ttl_secs),
                audit: Arc::clone(&audit),
                passkeys_file: args.state_dir.join("passkeys.json"),
                notifiers,
                push,
            };
            Some(
                crate::approval::server::start(config)
                    .await
                    .map_err(DaemonError::Approvals)?,
            )
        }
        None => None,
    };
    let relay = match args.device_listen {
        Some(addr) => {
            let relay = crate::relay::Relay::open(&args.state_dir, "host-agent")
                .map_err(DaemonError::Relay)?;
            relay.listen(addr).await.map_err(DaemonError::Relay)?;
            // The device's asks for credential approvals go to the same approver as every
            // other gated action.
            relay.set_approver(approver_of(approvals.as_ref()));
            relay.set_notifiers(device_notifiers);
            relay.set_audit(Arc::clone(&audit));
            if args.audit_checkpoint_secs > 0 {
                relay.spawn_checkpoints(
                    Arc::clone(&audit),
                    crate::relay::CheckpointPolicy {
                        every: Duration::from_secs(args.audit_checkpoint_secs),
                        every_records: args.audit_checkpoint_records,
                    },
                );
            }
            if relay.pairing_code().is_some() {
                tracing::info!(
                    file = %args.state_dir.join("relay/pairing-code").display(),
                    "no device paired: give the pairing code in this file to `vault-device pair` \
                     (it is valid for an hour; a new one is drawn after that)"
                );
            }
            Some(relay)
        }
        None => None,
    };
    let images =
        nanoclaw_image::ImageStore::open(args.image_store.as_deref().unwrap_or(&args.state_dir))
            .map_err(DaemonError::ImageStore)?;
    // Kept for the last checkpoint at shutdown.
    let checkpoint_relay = relay.clone().filter(|_| args.audit_checkpoint_secs > 0);
    let snapshots = snapshots::Store::open(&args.state_dir).map_err(DaemonError::Snapshots)?;
    let underlay = match &args.underlay {
        Some(iface) => Some(Arc::new(
            crate::net::underlay::Underlay::open(iface).map_err(DaemonError::Underlay)?,
        )),
        None => None,
    };
    let migration = if args.migration_peers.is_empty() {
        None
    } else {
        let peers = crate::migration::Peers::parse(&args.migration_peers)
            .map_err(DaemonError::MigrationPeer)?;
        let identity = crate::migration::link::Identity::open(&args.state_dir)
            .map_err(DaemonError::Migration)?;
        tracing::info!(key = %hex::encode(identity.public()), peers = args.migration_peers.len(),
            "live migration on: this host's migration key");
        Some(Arc::new(migrate::MigrationSetup { identity, peers }))
    };
    let migration_listener = match args.migration_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| {
                    DaemonError::Migration(crate::migration::link::LinkError::Io {
                        what: "listen for migrations",
                        source,
                    })
                })?,
        ),
        None => None,
    };
    let daemon = Arc::new(Daemon {
        snapshots,
        images,
        mcp: gateways::VmGateways::new(Arc::clone(&audit), approver_of(approvals.as_ref())),
        approvals,
        vms_dir,
        launch: VmmLaunch {
            bin,
            kernel,
            initrd,
            jail,
            pin,
        },
        overlay: args.overlay_prefix,
        underlay,
        egress_dns: match args.egress_dns {
            Some(addr) => addr,
            None => crate::egress::service::system_dns(Path::new("/etc/resolv.conf")),
        },
        audit: Arc::clone(&audit),
        stop_grace: Duration::from_secs(args.stop_grace_secs),
        output_cap: args.output_cap_bytes,
        vms: Arc::new(Mutex::new(HashMap::new())),
        relay,
        limits: Limits {
            max_vms: args.max_vms,
            max_children: args.max_children,
            spawn_burst: args.spawn_burst,
            spawn_interval: Duration::from_secs(args.spawn_interval_secs),
        },
        spawn_pace: Mutex::new(HashMap::new()),
        tokens,
        migration,
        migrating: Default::default(),
        migration_log_budget: Mutex::new(ratelimit::LogBudget::new()),
        carried_tokens: Mutex::new(HashMap::new()),
    });
    daemon
        .mcp
        .set_spawner(Arc::new(gateways::DaemonSpawner::new(&daemon)));
    daemon.recover();
    if let Some(listener) = migration_listener {
        let local = listener.local_addr().ok();
        tracing::info!(?local, "receiving live migrations from the pinned peers");
        tokio::spawn(migrate::serve_migrations(Arc::clone(&daemon), listener));
    }
    let listener = bind_api_socket(&args.socket, args.socket_group.as_deref())?;
    tracing::info!(socket = %args.socket.display(), state_dir = %args.state_dir.display(),
        vms = daemon.lock_vms().len(), "daemon listening");
    let app = routes::router(Arc::clone(&daemon));
    if let Some(addr) = args.listen {
        let settings = crate::remote::TlsSettings {
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
            names: args.tls_names.clone(),
        };
        let (config, fingerprint) =
            crate::remote::tls_config(&args.state_dir, &settings).map_err(DaemonError::Remote)?;
        let listener = crate::remote::TlsListener::bind(addr, config)
            .await
            .map_err(DaemonError::Remote)?;
        let local = axum::serve::Listener::local_addr(&listener).unwrap_or(addr);
        let remote = app.clone().layer(axum::middleware::from_fn_with_state(
            Arc::clone(daemon.tokens()),
            crate::remote::authorize,
        ));
        tracing::info!(%local, certificate_sha256 = %fingerprint, "remote API listening (TLS)");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, remote).await {
                tracing::error!(error = %e, "remote API stopped");
            }
        });
    }
    // Graceful shutdown waits for open responses, and a followed stream may never end: give
    // them a moment, then go.
    let stopping = Arc::new(tokio::sync::Notify::new());
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let stopping = Arc::clone(&stopping);
        async move {
            shutdown_signal().await;
            stopping.notify_one();
        }
    });
    let result = tokio::select! {
        r = server => r.map_err(DaemonError::Serve),
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    };
    let _ = std::fs::remove_file(&args.socket);
    if let Some(relay) = checkpoint_relay.filter(|r| r.is_linked()) {
        // The records up to now anchored before the daemon goes (a bounded wait).
        match relay.checkpoint(&audit).await {
            Ok(Some(record)) => tracing::info!(record, "audit checkpoint at shutdown"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %crate::error_chain(&e),
                "audit checkpoint at shutdown not recorded"),
        }
    }
    tracing::info!("daemon stopped; VMs keep running");
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// The blocking entry point for `host-agent serve`: logging, a runtime, [`serve`].
pub fn serve_main(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(args))?;
    // VM tasks may still be waiting on sockets; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// What a restored VM is: a restore of a snapshot, or one copy of a fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreKind {
    Restore,
    Fork,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_profile_with_egress_gets_a_network() {
        let mut spec = CreateVm::new("/bin/agent", vec![]);
        assert!(!wants_network(&spec));
        spec.profile = Some("name = \"p\"\ntier = \"worker\"\n".into());
        assert!(!wants_network(&spec));
        spec.profile = Some("name = \"p\"\ntier = \"worker\"\n[network]\negress = []\n".into());
        assert!(!wants_network(&spec));
        spec.profile = Some(
            "name = \"p\"\ntier = \"worker\"\n[network]\negress = [\"pypi.org:443\"]\n".into(),
        );
        assert!(wants_network(&spec));
        // A profile that does not load gives no network.
        spec.profile =
            Some("name = \"p\"\ntier = \"worker\"\n[network]\negress = [\"pypi.org\"]\n".into());
        assert!(!wants_network(&spec));
    }

    #[test]
    fn the_overlay_prefix_flag_parses_and_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let base = ["host-agent", "--kernel", "k", "--initrd", "i"];
        let cli = Cli::try_parse_from(base).unwrap();
        assert_eq!(cli.serve.overlay_prefix.to_string(), "10.200.0.0/16");
        let cli =
            Cli::try_parse_from(base.iter().chain(&["--overlay-prefix", "172.31.0.0/20"])).unwrap();
        assert_eq!(cli.serve.overlay_prefix.prefix_len(), 20);
        assert!(
            Cli::try_parse_from(base.iter().chain(&["--overlay-prefix", "10.0.0.1/16"])).is_err()
        );
    }

    #[test]
    fn pinning_is_off_unless_asked_for() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let base = ["host-agent", "--kernel", "k", "--initrd", "i"];
        // The environment may ask for it (scripts/nested-run does); the flag always does.
        let cli = Cli::try_parse_from(base.iter().chain(&["--pin-vmm-cpus"])).unwrap();
        assert!(cli.serve.pin_vmm_cpus);
        if std::env::var_os("NANOCLAW_PIN_VMM_CPUS").is_none() {
            assert!(!Cli::try_parse_from(base).unwrap().serve.pin_vmm_cpus);
        }
    }

    /// VMs as the daemon lists them: `(id, status, parent, detached)`.
    fn vms(
        root: &Path,
        specs: &[(&str, api::VmStatus, Option<&str>, bool)],
    ) -> HashMap<String, Arc<Vm>> {
        specs
            .iter()
            .map(|&(id, status, parent, detached)| {
                let mut rec = VmRecord::new(id.into(), CreateVm::new("/bin/a", vec![]), 1);
                rec.status = status;
                rec.parent = parent.map(str::to_owned);
                rec.detached = detached;
                std::fs::create_dir(root.join(id)).unwrap();
                let vm = Vm::open(root.join(id), rec, 1 << 20).unwrap();
                (id.to_owned(), vm)
            })
            .collect()
    }

    #[test]
    fn limits_count_live_vms_and_attached_live_children() {
        use api::VmStatus::{Exited, Running, Starting, Stopped, Stopping};
        let root = tempfile::tempdir().unwrap();
        let all = vms(
            root.path(),
            &[
                ("p", Running, None, false),
                ("c1", Running, Some("p"), false),
                ("c2", Starting, Some("p"), false),
                // Detached, and ended: neither counts against the parent.
                ("c3", Running, Some("p"), true),
                ("c4", Exited, Some("p"), false),
                ("q", Stopping, None, false),
                ("r", Stopped, None, false),
            ],
        );
        let limits = |max_vms, max_children| Limits {
            max_vms,
            max_children,
            spawn_burst: 1,
            spawn_interval: Duration::from_secs(1),
        };
        // Live: p, c1, c2, c3, q.
        assert_eq!(limits(6, 3).admit(&all, Some("p")), Ok(()));
        assert_eq!(limits(6, 3).admit(&all, None), Ok(()));
        assert_eq!(
            limits(5, 3).admit(&all, None),
            Err(LimitError::TooManyVms { limit: 5 })
        );
        assert_eq!(
            limits(6, 2).admit(&all, Some("p")),
            Err(LimitError::TooManyChildren {
                parent: "p".into(),
                limit: 2
            })
        );
        // A parent that is ending, has ended or is unknown spawns nothing.
        for parent in ["q", "r", "nope"] {
            assert_eq!(
                limits(60, 8).admit(&all, Some(parent)),
                Err(LimitError::ParentEnding(parent.into()))
            );
        }
    }

    #[test]
    fn manifest_paths_resolve_and_prefer_vmlinux() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("manifest");
        std::fs::write(
            &m,
            "# comment\nKERNEL_BZIMAGE=/k/bzImage\nKERNEL_VMLINUX=\"/k/vmlinux\"\nINITRAMFS=rel/initramfs.cpio.gz\n",
        )
        .unwrap();
        let (k, i) = read_manifest(&m).unwrap();
        assert_eq!(k, PathBuf::from("/k/vmlinux"));
        assert_eq!(i, dir.path().join("rel/initramfs.cpio.gz"));
        std::fs::write(&m, "KERNEL_BZIMAGE=/k/bzImage\n").unwrap();
        assert!(matches!(
            read_manifest(&m),
            Err(DaemonError::ManifestKey {
                key: "INITRAMFS",
                ..
            })
        ));
    }
}
