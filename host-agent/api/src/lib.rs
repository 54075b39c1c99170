//! The daemon's HTTP/JSON API, as types shared by the daemon and the `nanoclaw` CLI.
//!
//! The daemon serves HTTP/1.1 on a Unix socket (mode 0600). Routes:
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/vms` | [`CreateVm`] | `201` and [`VmInfo`]; `429` when the daemon already runs its most VMs (`--max-vms`) |
//! | `GET /v1/vms` | | `[`[`VmInfo`]`, ...]` |
//! | `GET /v1/vms/{id}` | | [`VmInfo`] |
//! | `DELETE /v1/vms/{id}` | | `204`; `409` unless the VM has ended |
//! | `POST /v1/vms/{id}/stop` | | [`VmInfo`] once the VMM has ended; the VMs it spawned that are not detached are stopped too |
//! | `POST /v1/vms/{id}/detach` | | [`VmInfo`]: the VM no longer stops with the VM that spawned it; `409` if none did |
//! | `POST /v1/vms/{id}/pause` | | [`VmInfo`] once every vCPU is parked (`paused: true`); `409` unless the VMM runs; `502` when the VMM refused |
//! | `POST /v1/vms/{id}/resume` | | [`VmInfo`] once the vCPUs run again; `409` unless the VMM runs; `502` when the VMM refused |
//! | `POST /v1/vms/{id}/snapshot` | [`CreateSnapshot`] | `201` and [`SnapshotInfo`]: the VM's memory and state saved under the daemon's state folder (a running VM is paused around it); `409` unless the VMM runs or when the name is taken; `502` when the VMM refused |
//! | `POST /v1/vms/{id}/fork` | [`ForkVm`] | `201` and `[`[`VmInfo`]`, ...]`: `n` new VMs restored from one snapshot of the VM (then removed); `400` unless `n` is 1 to 8; `429` when `n` more would pass `--max-vms`; otherwise as the snapshot and restore routes |
//! | `POST /v1/vms/{id}/migrate` | [`MigrateVm`] | newline-delimited [`MigrationEvent`]s, the last one `Ended`; `404` if there is no such VM, `409` unless it runs or when it migrates already, `400` when the host is not a pinned migration peer or the VM cannot move yet |
//! | `POST /v1/vms/{id}/migrate/resolve` | | [`VmInfo`] once a migration of unknown outcome is settled by asking the target host: `migrated` when a copy runs or ran there, running again here when none does; `409` when the VM has no such migration; `502` when the target cannot be asked |
//! | `DELETE /v1/vms/{id}/migrate` | | `204`: the VM's migration is cancelled (the VM runs on here) unless its state has gone out; `409` when none runs |
//! | `GET /v1/snapshots` | | `[`[`SnapshotInfo`]`, ...]`, oldest first |
//! | `DELETE /v1/snapshots/{name}` | | `204`; `404` if there is none |
//! | `POST /v1/snapshots/{name}/restore` | [`RestoreSnapshot`] | `201` and the new VM's [`VmInfo`] once its VMM has restored the snapshot; `404` if there is none; `422` when the snapshot is damaged, of another format or the VMM refused it; `429` at `--max-vms` |
//! | `GET /v1/vms/{id}/events?follow=BOOL` | | newline-delimited [`Event`]s |
//! | `GET /v1/vms/{id}/console?follow=BOOL` | | the raw console bytes |
//! | `PUT /v1/vms/{id}/files?path=DIR` | a tar stream | [`FilesCopied`] once the guest unpacked it under the folder `DIR` |
//! | `GET /v1/vms/{id}/files?path=PATH` | | a tar stream of the file or folder `PATH` (its entries named from its last component) |
//! | `GET /v1/images` | | `[`[`ImageInfo`]`, ...]` |
//! | `GET /v1/images/{name}` | | [`ImageInfo`] |
//! | `DELETE /v1/images/{name}` | | `204` |
//! | `POST /v1/images/import` | [`ImportImage`] | [`ImageInfo`] |
//! | `POST /v1/images/build` | [`BuildImage`] | newline-delimited [`BuildProgress`], the last one `Done` or `Failed` |
//! | `GET /v1/approvals` | | `[`[`PendingApproval`]`, ...]`; `[]` when approvals are off |
//! | `POST /v1/approvals/registration` | | [`RegistrationLink`]; `409` when approvals are off |
//! | `POST /v1/tokens` | [`CreateToken`] | `201` and [`CreatedToken`]: the token, shown once |
//! | `GET /v1/tokens` | | `[`[`TokenInfo`]`, ...]` |
//! | `DELETE /v1/tokens/{id}` | | `204`; `404` if there is none |
//! | `GET /v1/openapi.json` | | this API's OpenAPI 3.1 description ([`openapi`]) |
//! | `GET /metrics` | | the daemon's figures in the Prometheus text format |
//!
//! **Remote access.** With `host-agent serve --listen ADDR`, the same routes are served over
//! TLS, and every request needs `Authorization: Bearer TOKEN` with a token of enough
//! [`TokenScope`]: `401` without a valid one, `403` when its scope is too small. The Unix
//! socket needs no token: access to it is access to the daemon.
//!
//! Errors are a non-2xx status with an [`ApiError`] body. An event stream with `follow=true`
//! ends after the VM's [`Event::Ended`] event; without it, it ends after the events recorded so
//! far. Output bytes travel base64-encoded (standard alphabet, padded) so that binary output
//! survives JSON.
//! The agent's standard input is empty: it reads EOF at once.
//!
//! `/files` copies need a VM with an image; a `PUT` needs it running, a `GET` also reads an
//! ended VM's writable disk (what the agent wrote, symlinks not followed). Tar streams are
//! capped at 2 GiB and 100 000 entries (`413`); a refused path or archive is `422`, a VM that
//! is not running or not ready `409`, a missing path `404`. Once a `GET`'s tar has started, a
//! failure cuts the body short: a body that does not end cleanly is not a whole archive.

use serde::{Deserialize, Serialize};

pub mod openapi;

/// A pending approval request, as `GET /v1/approvals` lists it.
/// The daemon's audit log's file name, in the state directory.
pub const AUDIT_FILE: &str = "audit.ndjson";

/// A pending approval request, as the CLI and the approval page show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingApproval {
    /// The request (everything the passkey signs).
    #[schema(value_type = Object)]
    pub request: shared_proto::approval::ApprovalRequest,
    /// Its challenge, base64url: SHA-256 of its canonical encoding.
    pub challenge: String,
    /// Its approval page.
    pub url: String,
}

/// A one-time link to register a passkey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistrationLink {
    /// Open it in the browser that holds (or will hold) the passkey.
    pub url: String,
}

/// What a remote API token may do. Scopes nest: each includes the ones before it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// List and read: VMs, their events, console and files, images, pending approvals.
    Read,
    /// Also create, stop, pause, resume, detach and remove VMs, copy files into them, take,
    /// restore and remove snapshots, and fork VMs.
    Run,
    /// Also manage images, passkey registration and tokens.
    Admin,
}

impl TokenScope {
    /// The scope's name, as `--scope` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Read => "read",
            TokenScope::Run => "run",
            TokenScope::Admin => "admin",
        }
    }
}

/// `POST /v1/tokens`: make a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What it may do.
    pub scope: TokenScope,
}

/// A token's record: never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Its id (`DELETE /v1/tokens/{id}`).
    pub id: String,
    /// What it may do.
    pub scope: TokenScope,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// The answer to `POST /v1/tokens`: the token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The bearer token (`Authorization: Bearer ...`).
    pub token: String,
    /// Its record.
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nanoclaw/api.sock";

/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nanoclaw";

/// The default user and group the agent runs as inside the guest.
pub const DEFAULT_AGENT_ID: u32 = 1000;

/// The default guest RAM, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// The default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;

/// A request to create a VM that runs one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateVm {
    /// The program, a path inside the guest.
    pub command: String,
    /// Its arguments, without `argv[0]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment, in order, as `[name, value]` pairs.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Its working directory (default `/`).
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The agent's user id.
    #[serde(default = "default_id")]
    pub uid: u32,
    /// The agent's group id.
    #[serde(default = "default_id")]
    pub gid: u32,
    /// The agent's access profile, as TOML text (see `examples/profiles/`): the host serves
    /// it an MCP gateway checked against it. Without one the agent has no MCP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The image whose root file system the agent runs in (a name from `/v1/images`). Without
    /// one, the agent runs in the guest's initramfs. With one, an empty `command` runs the
    /// image's entrypoint and command, its environment comes first (the request's variables
    /// override it), and the default working directory and user are the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The size of the VM's writable disk in MiB (with an image).
    #[serde(default = "default_disk")]
    pub disk_size_mib: u64,
    /// The user in the image (`name`, `uid`, `name:group` or `uid:gid`); default the image's.
    /// The agent never runs as root: root, or no user, means the unprivileged `uid`/`gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Files copied into the VM before it boots (with an image): an uncompressed tar, base64,
    /// whose entry names are paths in the guest relative to its root. They land on the VM's
    /// writable disk, owned as the tar says; at most [`MAX_COPY_IN_BYTES`] of tar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_in_tar: Option<String>,
    /// Host ports forwarded to the agent (`nanoclaw run -p`), at most [`MAX_PORT_FORWARDS`].
    /// A VM with any gets a network device even when its profile allows no egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
}

/// The most host ports one VM may have forwarded.
pub const MAX_PORT_FORWARDS: usize = 16;

/// A host port forwarded to a port of the agent's VM: connections to `host_addr:host_port` on
/// the host reach `guest_port` on the guest's address. The daemon listens; the guest sees
/// connections from its gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortForward {
    /// The host address to listen on; loopback unless asked otherwise.
    #[serde(default = "default_forward_addr")]
    pub host_addr: String,
    /// The host port (1 to 65535).
    pub host_port: u16,
    /// The guest port (1 to 65535).
    pub guest_port: u16,
}

fn default_forward_addr() -> String {
    "127.0.0.1".to_owned()
}

impl std::str::FromStr for PortForward {
    type Err = String;

    /// `[ADDR:]HOSTPORT:GUESTPORT`, as `nanoclaw run -p` takes it (an IPv6 `ADDR` in brackets).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{}` is not [ADDR:]HOSTPORT:GUESTPORT", s.escape_debug());
        let (rest, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let (addr, host) = match rest.rsplit_once(':') {
            Some((a, h)) => (a.trim_start_matches('[').trim_end_matches(']'), h),
            None => ("127.0.0.1", rest),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        addr.parse::<std::net::IpAddr>().map_err(|_| bad())?;
        Ok(Self {
            host_addr: addr.to_owned(),
            host_port: port(host)?,
            guest_port: port(guest)?,
        })
    }
}

/// What `PUT /v1/vms/{id}/files` copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FilesCopied {
    /// The length of the tar stream the guest received.
    pub bytes: u64,
    /// The archive entries it unpacked.
    pub entries: u64,
}

/// The most tar bytes a create request may copy in (larger trees: `nanoclaw cp` once it runs).
pub const MAX_COPY_IN_BYTES: usize = 64 << 20;

/// The default size of a VM's writable disk, in MiB.
pub const DEFAULT_DISK_MIB: u64 = 2048;

/// The largest writable disk a VM may ask for, in MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 20;

fn default_disk() -> u64 {
    DEFAULT_DISK_MIB
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_cwd() -> String {
    "/".to_owned()
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_id() -> u32 {
    DEFAULT_AGENT_ID
}

impl CreateVm {
    /// A request for `command args...` with every other field at its default.
    pub fn new(command: impl Into<String>, args: Vec<String>) -> Self {
        Self {
            command: command.into(),
            args,
            env: Vec::new(),
            cwd: default_cwd(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: DEFAULT_VCPUS,
            uid: DEFAULT_AGENT_ID,
            gid: DEFAULT_AGENT_ID,
            profile: None,
            image: None,
            disk_size_mib: DEFAULT_DISK_MIB,
            user: None,
            copy_in_tar: None,
            ports: Vec::new(),
        }
    }
}

/// The life of a VM as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// The VMM runs; the agent has not started yet.
    Starting,
    /// The agent runs.
    Running,
    /// A stop was requested and the VMM has not ended yet.
    Stopping,
    /// The VMM ended after the agent exited ([`VmInfo::agent_exit`] holds how).
    Exited,
    /// The VMM ended because of a stop request.
    Stopped,
    /// The VMM ended before the agent exited (see [`VmInfo::vmm_exit`]).
    Failed,
    /// The VMM vanished without a recorded exit while the daemon was not watching it.
    Lost,
    /// The VM moved to another host by a live migration ([`VmInfo::migrated_to`]); this
    /// host's copy has ended for good.
    Migrated,
}

impl VmStatus {
    /// Whether the VM has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Exited | Self::Stopped | Self::Failed | Self::Lost | Self::Migrated
        )
    }

    /// The lowercase name used on the wire and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Lost => "lost",
            Self::Migrated => "migrated",
        }
    }
}

/// How the agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentExit {
    /// It exited with this code.
    Exit(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl AgentExit {
    /// The shell convention: the code, or 128 plus the signal number (clamped to 0..=255).
    pub fn shell_code(self) -> u8 {
        let code = match self {
            Self::Exit(c) => c,
            Self::Signal(s) => 128i32.saturating_add(s),
        };
        code.clamp(0, 255) as u8
    }
}

impl From<shared_proto::message::ExitStatus> for AgentExit {
    fn from(s: shared_proto::message::ExitStatus) -> Self {
        match s {
            shared_proto::message::ExitStatus::Exit(c) => Self::Exit(c),
            shared_proto::message::ExitStatus::Signal(s) => Self::Signal(s),
        }
    }
}

/// How the VMM process ended: its `exit.json` when it wrote one, else its wait status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmmExit {
    /// The VMM's reason (`reset`, `power_off`, `panic`, ...), or `unknown`.
    pub reason: String,
    /// The VMM's exit code, when known.
    pub exit_code: Option<i32>,
    /// The signal that killed the VMM, when one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Milliseconds from VMM start to the guest being ready, when reported.
    #[serde(default)]
    pub boot_to_ready_ms: Option<u64>,
    /// The vsock device's counters at the end (connections, resets, malformed packets, ...),
    /// by name, when the VMM reported them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vsock: std::collections::BTreeMap<String, u64>,
    /// Each disk's counters at the end, in attach order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskCounters>,
    /// The syscall a VMM thread was stopped for, by name, when its seccomp filter ended it
    /// (reason `seccomp` with an exit record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscall: Option<String>,
}

/// One virtio-blk disk's counters, as the VMM reported them when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskCounters {
    /// The id the guest read (`nanoclaw-image`, `nanoclaw-scratch`, ...).
    pub id: String,
    /// Whether the disk was read-only.
    pub read_only: bool,
    /// Requests, bytes, refusals and errors, by name.
    pub metrics: std::collections::BTreeMap<String, u64>,
}

/// Everything the daemon knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInfo {
    /// The VM's id (short random hex).
    pub id: String,
    /// Where it stands.
    pub status: VmStatus,
    /// What it was created with.
    pub spec: CreateVm,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VMM's pid on the host, once spawned.
    pub vmm_pid: Option<u32>,
    /// The agent's pid inside the guest, once started.
    pub agent_pid: Option<u32>,
    /// How the agent ended, once it has.
    pub agent_exit: Option<AgentExit>,
    /// How the VMM ended, once it has.
    pub vmm_exit: Option<VmmExit>,
    /// Whether a sidecar control connection is up right now.
    pub control_connected: bool,
    /// Accepted control connections after the first one for this boot (sidecar reconnects).
    pub control_reconnects: u64,
    /// Guest messages refused (bad frames, out-of-order messages, failed hellos).
    pub guest_protocol_errors: u64,
    /// Output bytes not written to the output log because it reached its cap.
    pub output_dropped_bytes: u64,
    /// Other guest-triggered events (guest errors, ...) not written to the output log because it
    /// reached its cap.
    #[serde(default)]
    pub events_dropped: u64,
    /// Bytes of the VMM's own output not written to its `vmm.log` because it reached its cap.
    #[serde(default)]
    pub vmm_log_dropped_bytes: u64,
    /// The VM's state directory on the host.
    pub vm_dir: String,
    /// The orchestrator VM that spawned this one, if one did. It is stopped when that VM
    /// ends, unless detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Whether the user detached it from its parent (`POST /v1/vms/{id}/detach`).
    #[serde(default)]
    pub detached: bool,
    /// Whether its vCPUs are paused (`POST /v1/vms/{id}/pause`; `.../resume` ends it).
    #[serde(default)]
    pub paused: bool,
    /// The snapshot this VM was restored from, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The guest sidecar's boot id (hex) the daemon admitted. A restored copy draws a new one
    /// (with a new boot key) before it is admitted, so copies of one snapshot never share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Whether the restored guest still has to take a new identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reidentify_pending: bool,
    /// The VM's network, when its profile allows egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetworkInfo>,
    /// Where a live migration took the VM (status `migrated`), or may have (a migration whose
    /// outcome is unknown: the VM stays paused here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<MigratedTo>,
    /// Where the VM came from, when a live migration brought it to this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_from: Option<MigratedTo>,
}

/// The other end of a live migration: a host and the VM's id there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigratedTo {
    /// The host: the address dialled (on the source), or the peer's migration key, hex (on the
    /// target).
    pub host: String,
    /// The VM's id on that host.
    pub vm: String,
    /// `moved` (the copy there runs) or `unknown` (the state went out and no answer came).
    pub outcome: MigrationOutcome,
}

/// `POST /v1/vms/{id}/migrate`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrateVm {
    /// The target host's migration address, `HOST:PORT`, as pinned with `--migration-peer`.
    pub to: String,
    /// The downtime target in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// The most pre-copy rounds after the first (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
}

/// How a live migration ended, for the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    /// The target runs the VM; the source's copy has ended.
    Moved,
    /// The VM stays here (running, or paused if it was): the migration failed or was
    /// cancelled before the switch-over.
    #[default]
    Kept,
    /// The state went out and no answer came: the VM stays paused here until the target's
    /// host says which copy runs.
    Unknown,
}

/// One line of `POST /v1/vms/{id}/migrate`'s stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum MigrationEvent {
    /// The target host accepted the VM and started a VMM to receive it.
    Accepted {
        /// The VM's id on the target host.
        target_vm: String,
    },
    /// Whether the user's device follows the VM to the target, so that its credential calls
    /// go on there (sent only for a VM with a credential link on the source).
    Device {
        /// The device said it will serve the VM on the target host.
        follows: bool,
        /// Why not, when it will not (no device linked, the target not paired with it, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A pre-copy round ended, while the VM ran.
    Round {
        /// 0 for the full copy.
        round: u32,
        /// Pages sent.
        pages: u64,
        /// Writable disks' blocks sent (4 KiB each), for a VM with an image.
        #[serde(default, skip_serializing_if = "is_zero")]
        blocks: u64,
        /// Its rate, MB/s.
        mb_per_s: f64,
        /// Pages and blocks written meanwhile, for the next round.
        dirty: u64,
        /// How long sending those would take at this rate, in milliseconds.
        expected_downtime_ms: f64,
    },
    /// The migration ended; the last line.
    Ended {
        /// Which copy runs.
        outcome: MigrationOutcome,
        /// The VM's id on the target host, once it accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_vm: Option<String>,
        /// How long the VM was stopped, in milliseconds (`moved` only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<f64>,
        /// The whole migration, in milliseconds.
        total_ms: f64,
        /// Why it did not move.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A networked VM's addresses, its allowlist and what its egress enforcement counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmNetworkInfo {
    /// The guest's address.
    pub address: String,
    /// Its gateway and resolver.
    pub gateway: String,
    /// The profile's `[network] egress` entries.
    pub egress: Vec<String>,
    /// The profile's `[network] ingress` ports (open to the underlay's clients).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<u16>,
    /// Counters by name: the resolver's (`dns_*`), the SNI check's (`sni_*`), and, in
    /// `GET /v1/vms/{id}`, the firewall's refusals in packets (`firewall_deny_*`). Empty
    /// once the VM has ended.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// The longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 64;

/// `POST /v1/vms/{id}/snapshot`'s body (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateSnapshot {
    /// The snapshot's name: 1 to [`MAX_SNAPSHOT_NAME`] of `A-Z a-z 0-9 . _ -`, not starting
    /// with `.` or `-`. The daemon makes one up when absent (`snap-` and random hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /v1/images/{name}/warm`'s body (an empty body is the same as `{}`): the size of the
/// VMs the template serves. A `run --image` starts warm only at exactly this size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarmImage {
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The size of the writable disk in MiB.
    #[serde(default = "default_disk")]
    pub disk_size_mib: u64,
}

impl Default for WarmImage {
    fn default() -> Self {
        Self {
            memory_mib: default_memory(),
            vcpus: default_vcpus(),
            disk_size_mib: default_disk(),
        }
    }
}

/// `POST /v1/snapshots/{name}/restore`'s body (an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreSnapshot {
    /// Start the restored VM with its vCPUs paused (resume it with `POST .../resume`).
    #[serde(default)]
    pub paused: bool,
}

/// `POST /v1/vms/{id}/fork`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForkVm {
    /// How many VMs to make: 1 to 8.
    pub n: u32,
}

/// A snapshot the daemon keeps (`<state-dir>/snapshots/<name>/`): what it was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotInfo {
    /// Its name (`DELETE /v1/snapshots/{name}`, `POST /v1/snapshots/{name}/restore`).
    pub name: String,
    /// The VM it was taken of.
    pub source_vm: String,
    /// What that VM was created with (a restore makes a VM of the same memory, vCPUs,
    /// image and profile).
    pub spec: CreateVm,
    /// The image the VM ran, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VMM's snapshot format version.
    pub format_version: u32,
    /// The memory file's length (guest RAM).
    pub memory_bytes: u64,
    /// Bytes of the memory file that hold data (the rest are holes).
    pub memory_data_bytes: u64,
    /// The state file's length.
    pub state_bytes: u64,
    /// The length of the copy of the VM's writable disk, for VMs with an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Where it lies on the host.
    pub dir: String,
}

/// One agent event, as streamed by `GET /v1/vms/{id}/events` and kept in the output log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Position in this VM's event sequence, from 0; gaps mean events not kept.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The agent started with this pid inside the guest.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// A chunk of agent output.
    Output {
        /// `stdout` or `stderr`.
        stream: Stream,
        /// The bytes, base64.
        data: String,
    },
    /// The sidecar reported an error.
    GuestError {
        /// Its message (guest-controlled text, truncated).
        message: String,
    },
    /// The agent exited.
    Exited {
        /// How.
        status: AgentExit,
    },
    /// The VM ended; the last event of a VM.
    Ended {
        /// The final status.
        status: VmStatus,
        /// How the VMM ended, when known.
        vmm_exit: Option<VmmExit>,
    },
}

/// An agent output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// One line saying what went wrong.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_vm_fills_defaults() {
        let req: CreateVm = serde_json::from_str(r#"{"command":"/bin/true"}"#).unwrap();
        assert_eq!(req, CreateVm::new("/bin/true", vec![]));
        assert_eq!(req.uid, 1000);
        assert_eq!(req.cwd, "/");
    }

    #[test]
    fn port_forwards_parse_with_loopback_by_default() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_addr.as_str(), p.host_port, p.guest_port),
            ("127.0.0.1", 8080, 80)
        );
        let p: PortForward = "0.0.0.0:8443:443".parse().unwrap();
        assert_eq!(p.host_addr, "0.0.0.0");
        let p: PortForward = "[::1]:9000:9".parse().unwrap();
        assert_eq!(p.host_addr, "::1");
        for bad in [
            "80",
            "0:80",
            "8080:0",
            "x:1:2",
            "8080:70000",
            "1.2.3.4:5",
            "",
        ] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
        let json: CreateVm =
            serde_json::from_str(r#"{"command":"/a","ports":[{"host_port":1,"guest_port":2}]}"#)
                .unwrap();
        assert_eq!(json.ports[0].host_addr, "127.0.0.1");
    }

    #[test]
    fn events_are_tagged_and_flat() {
        let rec = EventRecord {
            seq: 4,
            event: Event::Exited {
                status: AgentExit::Exit(3),
            },
        };
        let line = serde_json::to_string(&rec).unwrap();
        assert_eq!(line, r#"{"seq":4,"event":"exited","status":{"exit":3}}"#);
        assert_eq!(serde_json::from_str::<EventRecord>(&line).unwrap(), rec);
    }

    #[test]
    fn shell_codes_follow_the_shell() {
        assert_eq!(AgentExit::Exit(3).shell_code(), 3);
        assert_eq!(AgentExit::Signal(9).shell_code(), 137);
        assert_eq!(AgentExit::Exit(-1).shell_code(), 0);
        assert_eq!(AgentExit::Exit(999).shell_code(), 255);
    }
}

pub use nanoclaw_image::{ImageConfig, ImageInfo};

/// A request to import a `docker save` tarball or an OCI image layout (a folder or a tar) that
/// lies on the daemon's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportImage {
    /// The name to give it.
    pub name: String,
    /// The source's path on the daemon's host.
    pub source: String,
}

/// A request to build a Debian image with debootstrap (and pip), cached by its recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildImage {
    /// The name to give it.
    pub name: String,
    /// The Debian suite, such as `bookworm`.
    pub suite: String,
    /// Debian packages besides the minimal base.
    #[serde(default)]
    pub packages: Vec<String>,
    /// pip requirements, installed from PyPI.
    #[serde(default)]
    pub pip: Vec<String>,
    /// The Debian mirror (default: the daemon's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
}

/// One line of a build's progress stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildProgress {
    /// A step's output.
    Line(String),
    /// The image is built (or was found in the cache).
    #[schema(value_type = Object)]
    Done(Box<ImageInfo>),
    /// The build failed; nothing was stored.
    Failed(String),
}
