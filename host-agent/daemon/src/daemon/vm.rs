//! One VM as the daemon runs it: the VMM process, the sidecar's control connection, the event
//! log and the stop sequence.
//!
//! A [`Vm`] is shared (`Arc`) between the API handlers and three kinds of task:
//! - the control listener on `<vm-dir>/vsock.sock_<CONTROL_PORT>`, which accepts the sidecar's
//!   connections (the first one and every reconnect) and serves each on its own task;
//! - the VMM watcher, which waits for the VMM to end (as its parent, or by polling `/proc` for
//!   a VMM adopted after a daemon restart) and then records the final status;
//! - the API's event streams, fed from the output log and the live feed ([`EventRing`], bounded
//!   in bytes);
//! - with a credential relay (`--device-listen`), the VM's credential proxy listener, bound
//!   after the first admitted `Hello` with the boot id and key it carried, and closed when the
//!   VM ends.
//!
//! Everything the guest sends is hostile: a bad frame or a message out of order closes that
//! connection (the sidecar may reconnect), is counted, and is logged within a [`LogBudget`].

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shared_proto::handshake::answer_hello;
use shared_proto::message::{AgentSpec, GuestToHost, HostToGuest, OutputStream, RootFs};
use shared_proto::{FrameDecoder, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use super::cgroup;
use super::event_feed::{EventFeed, EventRing};
use super::ratelimit::LogBudget;
use super::state::{self, StateError, VmRecord};
use crate::error_chain;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nanoclaw_api::{self as api, Event, EventRecord, VmInfo, VmStatus, VmmExit};

/// How long a new control connection has to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one frame to the guest may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VMM watcher waits for the control connection to drain after the VMM ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an adopted VMM (not our child) is checked in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// The longest guest error message kept, in bytes.
const GUEST_MESSAGE_MAX: usize = 512;
/// How long a snapshot waits for the guest to confirm a freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// The entropy bytes a restored guest gets with `Reidentify`.
const REIDENTIFY_ENTROPY: usize = 64;
/// Control connections served at once per VM (one current, a few being replaced or refused).
const MAX_CONTROL_CONNECTIONS: usize = 4;
/// How much of the event log's end is read for its last `seq` on a restart: more than its
/// longest line (a 1 MiB frame of output is about 1.4 MiB of base64 in JSON).
const LAST_SEQ_TAIL: u64 = 4 << 20;
/// Room above the event log's cap kept for the daemon's own events (`Ended`, whose VMM exit
/// record is read from at most 64 KiB of `exit.json`): guest-triggered events stop at the cap.
const DAEMON_EVENT_HEADROOM: u64 = 128 << 10;

/// Errors of one VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Binding the control listener failed.
    #[error("cannot listen on {}", .path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Spawning the VMM failed.
    #[error("cannot start the VMM {}", .bin.display())]
    Spawn {
        /// The VMM binary.
        bin: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening a file in the VM directory failed.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The on-disk record failed.
    #[error("VM state")]
    State(#[source] StateError),
    /// The VMM's jail could not be prepared.
    #[error("jail")]
    Jail(#[source] super::jail::JailError),
    /// The VMM's log could not be set up.
    #[error("VMM log")]
    VmmLog(#[source] super::vmm_log::VmmLogError),
    /// The VM's network could not be set up.
    #[error("the VM's network")]
    Network(#[source] NetworkError),
}

/// Why a VM whose profile allows egress could not get its network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// VMMs are not jailed (`--jail off`, or the daemon is not root).
    #[error("a VM with network egress needs the VMM jail")]
    NeedsJail,
    /// No address is free.
    #[error("no address")]
    Addr(#[source] crate::net::addr::AddrError),
    /// The namespace or its links could not be made.
    #[error("the network namespace")]
    Netns(#[source] crate::net::netns::NetnsError),
    /// The firewall could not be loaded.
    #[error("the firewall")]
    Firewall(#[source] crate::net::firewall::FirewallError),
    /// The resolver or the SNI check could not start.
    #[error("the egress enforcement")]
    Egress(#[source] crate::egress::service::EgressStartError),
    /// A forwarded host port could not be opened.
    #[error("a forwarded port")]
    Forward(#[source] crate::net::forward::ForwardError),
    /// The forwarded ports could not be served.
    #[error("serving the forwarded ports")]
    ForwardServe(#[source] std::io::Error),
    /// The profile opens ingress ports, and this daemon has no underlay to open them on.
    #[error(
        "the profile's `[network] ingress` needs a daemon started with --underlay IFACE: no client could reach the VM"
    )]
    NoUnderlay,
    /// A migrating VM's address is not one of this host's overlay prefix.
    #[error("address {0} is not a VM's address in this host's overlay prefix {1}")]
    NotOurs(std::net::Ipv4Addr, crate::net::addr::OverlayPrefix),
    /// A migrating VM's address is held by a VM here (an ended one holds it until removed).
    #[error("address {0} is held here by VM {1} (an ended VM holds it until `nanoclaw rm`)")]
    InUse(std::net::Ipv4Addr, String),
}

/// The access profile of a create request, when it has one that loads (one that does not is
/// refused by the VM's gateway, and gives the VM nothing).
pub fn profile_of(spec: &api::CreateVm) -> Option<crate::policy::Profile> {
    crate::policy::Profile::from_toml(spec.profile.as_deref()?).ok()
}

/// How to start a VMM.
#[derive(Debug, Clone)]
pub struct VmmLaunch {
    /// The binary, run as `BIN --kernel ... --initrd ... --vm-dir ...`.
    pub bin: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initrd: PathBuf,
    /// The jail's settings, when VMMs are jailed.
    pub jail: Option<super::jail::JailSettings>,
    /// Who hands each VMM its host CPUs, with `--pin-vmm-cpus`.
    pub pin: Option<Arc<super::pinning::CpuPinner>>,
}

impl VmmLaunch {
    /// The machine it makes, as the VMM's, the kernel's and the initramfs's paths, lengths and
    /// modification times: what a warm template records, so that one made of another guest, or
    /// by another VMM (whose devices may offer other features), is not used.
    pub fn guest_fingerprint(&self) -> String {
        [&self.bin, &self.kernel, &self.initrd]
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path).ok();
                let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
                let modified = meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{}:{len}:{modified}", path.display())
            })
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// What the sidecar is told of the VM's link: its address, the gateway (also its resolver) and
/// the MAC of the device to configure.
pub fn guest_network(link: &crate::net::addr::VmLink) -> shared_proto::message::GuestNetwork {
    shared_proto::message::GuestNetwork {
        address: link.guest,
        prefix_len: crate::net::addr::VmLink::LINK_PREFIX_LEN,
        gateway: link.gateway,
        dns: link.gateway,
        mac: link.mac(),
    }
}

/// The reason for a VMM that ended without an exit record: what the jail did to it, when
/// the wait status or its memory cgroup shows it (`oom_killed`).
pub fn jail_reason(signal: Option<i32>, oom_killed: bool) -> &'static str {
    match signal {
        Some(nix::libc::SIGSYS) => "seccomp",
        Some(nix::libc::SIGXFSZ) => "file_size_limit",
        Some(nix::libc::SIGKILL) if oom_killed => "memory_limit",
        _ => "unknown",
    }
}

/// A `--disk` value for the VMM: the path, then its options. A path holding a comma would be
/// read as options, so the daemon's paths never do (it names them itself).
fn disk_arg(path: &Path, options: &str) -> std::ffi::OsString {
    let mut arg = path.as_os_str().to_owned();
    arg.push(options);
    arg
}

/// The agent event log: `agent-output.ndjson`. Every event the guest triggers counts against
/// its cap; the daemon's own `Ended` may use [`DAEMON_EVENT_HEADROOM`] above it.
#[derive(Debug)]
struct EventLog {
    file: Option<File>,
    size: u64,
    cap: u64,
    next_seq: u64,
}

/// The current control connection.
#[derive(Debug)]
struct Control {
    /// Distinguishes connections, so a closing one does not clear its successor.
    conn: u64,
    to_guest: mpsc::Sender<HostToGuest>,
    /// Tells the connection's task to close it (superseded, or the VM ended).
    kick: Arc<Notify>,
}

/// One VM (see the module doc).
#[derive(Debug)]
pub struct Vm {
    /// The id.
    pub id: String,
    /// `<state-dir>/vms/<id>`.
    pub dir: PathBuf,
    /// The VMM's folder (`<dir>/vmm`, the jail's root; `<dir>` for VMs of older daemons).
    pub vmm_dir: PathBuf,
    record: Mutex<VmRecord>,
    log: Mutex<EventLog>,
    /// The recent events, for live subscribers (bounded in bytes).
    events: Arc<Mutex<EventRing>>,
    control: Mutex<Option<Control>>,
    next_conn: Mutex<u64>,
    budget: Mutex<LogBudget>,
    ended: watch::Sender<bool>,
    /// The credential relay, when the daemon has one.
    relay: Mutex<Option<Arc<crate::relay::Relay>>>,
    /// This VM's credential proxy listener, from the first admitted `Hello` to the end.
    credential_listener: Mutex<Option<crate::relay::VmRelay>>,
    /// The agent's tokenizer, shared by its MCP gateway and (for the device) the relay.
    tokens: Mutex<Option<Arc<crate::agent_tokens::AgentTokens>>>,
    /// A networked VM's resolver and SNI check, while it runs.
    egress: Mutex<Option<crate::egress::VmEgress>>,
    /// A networked VM's forwarded host ports, while it runs.
    forwards: Mutex<Option<crate::net::forward::PortForwards>>,
    /// The task copying the VMM's output into `vmm.log` ([`super::vmm_log`]).
    vmm_log: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held across a pause or resume, so that the record says what the VMM last answered.
    pausing: tokio::sync::Mutex<()>,
    /// When this daemon started the VMM (for the boot-to-ready figure of `/metrics`).
    spawned_at: Mutex<Option<Instant>>,
    /// Wakes a [`Vm::freeze`] waiting for the guest's `Frozen`.
    frozen: Notify,
}

/// Why a guest could not be frozen before a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// No sidecar is connected to ask.
    #[error("the guest's sidecar is not connected")]
    NotConnected,
    /// The sidecar did not answer in time (or answered with an error, which the VM's events
    /// show).
    #[error("the guest did not confirm the freeze within {0:?}")]
    NoAnswer(Duration),
}

/// Why a VM could not be paused or resumed.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The VM is not running (it has not started, is stopping or has ended).
    #[error("the VM is {0}; only a running VM can be paused or resumed")]
    NotRunning(&'static str),
    /// The VMM could not be asked, or refused.
    #[error("the VMM")]
    Vmm(#[from] super::vmm_control::VmmControlError),
}

/// How a hello was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// A boot id the VM had not had: its first boot, or a restored guest's new identity.
    NewBoot,
    /// The current boot, connecting again.
    Reconnect,
    /// A restored guest with its snapshot's identity: it is asked for a new one.
    Reidentify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// Wraps `record` for the VM in `dir`, opening its event log for appending.
    pub fn open(dir: PathBuf, record: VmRecord, output_cap: u64) -> Result<Arc<Self>, VmError> {
        let path = dir.join(state::OUTPUT_FILE);
        // An ended VM's log is only read from now on; keep no descriptor for it.
        let file = if record.status.is_terminal() {
            None
        } else {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmError::Open {
                    path: path.clone(),
                    source,
                })?;
            Some(file)
        };
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        let next_seq = last_seq(&path).map_or(0, |s| s + 1);
        let events = EventRing::new(next_seq);
        let (ended, _) = watch::channel(record.status.is_terminal());
        let vmm_dir = match record.vmm_subdir {
            true => dir.join(state::VMM_DIR),
            false => dir.clone(),
        };
        if !record.status.is_terminal() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&vmm_dir)
                .map_err(|source| VmError::Open {
                    path: vmm_dir.clone(),
                    source,
                })?;
        }
        Ok(Arc::new(Self {
            id: record.id.clone(),
            vmm_dir,
            dir,
            record: Mutex::new(record),
            log: Mutex::new(EventLog {
                file,
                size,
                cap: output_cap,
                next_seq,
            }),
            events,
            control: Mutex::new(None),
            next_conn: Mutex::new(0),
            budget: Mutex::new(LogBudget::new()),
            ended,
            relay: Mutex::new(None),
            credential_listener: Mutex::new(None),
            tokens: Mutex::new(None),
            egress: Mutex::new(None),
            forwards: Mutex::new(None),
            vmm_log: Mutex::new(None),
            pausing: tokio::sync::Mutex::new(()),
            spawned_at: Mutex::new(None),
            frozen: Notify::new(),
        }))
    }

    /// The API view of this VM.
    pub fn info(&self) -> VmInfo {
        let r = lock(&self.record).clone();
        let network = r.net.map(|link| {
            let net = profile_of(&r.spec).map(|p| p.network).unwrap_or_default();
            api::VmNetworkInfo {
                address: link.guest.to_string(),
                gateway: link.gateway.to_string(),
                egress: net.egress,
                ingress: net.ingress,
                counters: self
                    .egress_counters()
                    .map(|c| c.by_name())
                    .unwrap_or_default(),
            }
        });
        VmInfo {
            id: r.id,
            status: r.status,
            spec: r.spec,
            created_unix_ms: r.created_unix_ms,
            vmm_pid: r.vmm_pid,
            agent_pid: r.agent_pid,
            agent_exit: r.agent_exit,
            vmm_exit: r.vmm_exit,
            control_connected: lock(&self.control).is_some(),
            control_reconnects: r.control_reconnects,
            guest_protocol_errors: r.guest_protocol_errors,
            output_dropped_bytes: r.output_dropped_bytes,
            events_dropped: r.events_dropped,
            vmm_log_dropped_bytes: r.vmm_log_dropped_bytes,
            vm_dir: self.dir.display().to_string(),
            parent: r.parent,
            detached: r.detached,
            paused: r.paused,
            restored_from: r.restore.map(|r| r.snapshot),
            boot_id: r.boot_id,
            reidentify_pending: r.reidentify.is_some(),
            network,
            migrated_to: r.migrated_to,
            migrated_from: r.migrated_from,
        }
    }

    /// The VM that spawned this one, unless the user detached it (or none did).
    pub fn attached_parent(&self) -> Option<String> {
        let r = lock(&self.record);
        r.parent.clone().filter(|_| !r.detached)
    }

    /// Detaches this VM from the VM that spawned it, durably; `false` when none did.
    pub fn detach(&self) -> bool {
        self.update(|r| {
            r.detached |= r.parent.is_some();
            r.parent.is_some()
        })
    }

    /// Pauses (`true`) or resumes the VM's vCPUs through its VMM, and records the outcome.
    /// Idempotent. A paused VM keeps its memory and its connections; the guest sees no time
    /// lost in its clocks, only a gap (see the VMM's `control` and `vcpu` modules).
    pub async fn set_paused(&self, paused: bool) -> Result<(), PauseError> {
        let _one_at_a_time = self.pausing.lock().await;
        let status = self.status();
        if status.is_terminal() || status == VmStatus::Stopping || !self.vmm_alive() {
            return Err(PauseError::NotRunning(status.as_str()));
        }
        let op = if paused {
            super::vmm_control::Op::Pause
        } else {
            super::vmm_control::Op::Resume
        };
        let now = super::vmm_control::request(&self.vmm_dir, self.jail_uid(), op).await?;
        self.update(|r| r.paused = now);
        tracing::info!(vm = %self.id, paused = now, "VM {}", if now { "paused" } else { "resumed" });
        Ok(())
    }

    /// Saves the VM into the new folder `dir` inside its VMM's folder (the VMM's
    /// `snapshot`), pausing it around the snapshot when it runs; with `disk_to`, copies its
    /// writable disk there while it is paused. Answers what the VMM wrote and the disk copy's
    /// length. A VM that was paused stays paused; one that ran runs again, also when the
    /// snapshot failed.
    pub async fn snapshot(
        &self,
        dir: &str,
        disk_to: Option<&Path>,
    ) -> Result<(super::vmm_control::SnapshotWritten, Option<u64>), super::snapshots::SnapshotError>
    {
        use super::snapshots::SnapshotError;
        use super::vmm_control::{Op, request};
        let _one_at_a_time = self.pausing.lock().await;
        let status = self.status();
        if status.is_terminal() || status == VmStatus::Stopping || !self.vmm_alive() {
            return Err(SnapshotError::NotRunning(status.as_str()));
        }
        let uid = self.jail_uid();
        let was_paused = request(&self.vmm_dir, uid, Op::State)
            .await
            .map_err(SnapshotError::Vmm)?;
        if !was_paused {
            let now = request(&self.vmm_dir, uid, Op::Pause)
                .await
                .map_err(SnapshotError::Vmm)?;
            self.update(|r| r.paused = now);
        }
        let taken = async {
            let written = super::vmm_control::snapshot(&self.vmm_dir, uid, dir)
                .await
                .map_err(SnapshotError::Vmm)?;
            let scratch = lock(&self.record).image.as_ref().map(|i| i.scratch.clone());
            let disk = match (disk_to, scratch) {
                (Some(to), Some(from)) => Some(super::snapshots::copy_sparse(&from, to)?),
                _ => None,
            };
            Ok((written, disk))
        }
        .await;
        if !was_paused {
            match request(&self.vmm_dir, uid, Op::Resume).await {
                Ok(now) => self.update(|r| r.paused = now),
                Err(e) => {
                    tracing::warn!(vm = %self.id, error = %error_chain(&e), "resume after snapshot")
                }
            }
        }
        if taken.is_ok() {
            tracing::info!(vm = %self.id, dir, "snapshot taken");
        }
        taken
    }

    /// The sidecar's boot id, whether the agent was asked to run, and its pid: what a
    /// snapshot of this VM records for the VM restored from it.
    pub fn guest_facts(&self) -> (Option<String>, bool, Option<u32>) {
        let r = lock(&self.record);
        (r.boot_id.clone(), r.agent_sent, r.agent_pid)
    }

    /// The record's spec and image.
    pub fn spec_and_image(&self) -> (api::CreateVm, Option<super::images::VmImage>) {
        let r = lock(&self.record);
        (r.spec.clone(), r.image.clone())
    }

    /// Whether the VM's vCPUs are paused.
    pub fn paused(&self) -> bool {
        lock(&self.record).paused
    }

    /// The current status.
    pub fn status(&self) -> VmStatus {
        lock(&self.record).status
    }

    /// A receiver that turns `true` once the VM has ended.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.subscribe()
    }

    /// Subscribes to live events. Subscribe before reading the log, then skip what was read.
    pub fn subscribe(&self) -> EventFeed {
        EventRing::subscribe(&self.events)
    }

    /// The event log's path.
    pub fn output_path(&self) -> PathBuf {
        self.dir.join(state::OUTPUT_FILE)
    }

    /// Changes the record under its lock and saves it; a failed save is logged (the in-memory
    /// record stays authoritative while the daemon lives).
    fn update<R>(&self, f: impl FnOnce(&mut VmRecord) -> R) -> R {
        let mut rec = lock(&self.record);
        let out = f(&mut rec);
        if let Err(e) = rec.save(&self.dir) {
            tracing::error!(vm = %self.id, error = %error_chain(&e), "cannot save the VM record");
        }
        out
    }

    /// Changes the record in memory only; the next [`Vm::update`] saves it. For counters a
    /// guest can drive, so that it cannot turn its misbehaviour into disk writes.
    fn update_quiet<R>(&self, f: impl FnOnce(&mut VmRecord) -> R) -> R {
        f(&mut lock(&self.record))
    }

    /// Appends `event` to the log and broadcasts it. Guest-triggered events (all but `Ended`)
    /// are written only while the log is under its cap; the rest are counted.
    fn emit(&self, event: Event) {
        let mut log = lock(&self.log);
        let rec = EventRecord {
            seq: log.next_seq,
            event,
        };
        log.next_seq += 1;
        let mut line = serde_json::to_vec(&rec).unwrap_or_default();
        line.push(b'\n');
        let limit = match rec.event {
            Event::Ended { .. } => log.cap.saturating_add(DAEMON_EVENT_HEADROOM),
            _ => log.cap,
        };
        if log.size.saturating_add(line.len() as u64) > limit {
            drop(log);
            match &rec.event {
                Event::Output { data, .. } => {
                    let pad = data.bytes().rev().take_while(|&b| b == b'=').count();
                    let dropped = (data.len() / 4 * 3).saturating_sub(pad) as u64;
                    self.update_quiet(|r| r.output_dropped_bytes += dropped);
                }
                _ => self.update_quiet(|r| r.events_dropped += 1),
            }
            log = lock(&self.log);
        } else if let Some(file) = log.file.as_mut() {
            match file.write_all(&line) {
                Ok(()) => log.size += line.len() as u64,
                Err(e) => {
                    tracing::error!(vm = %self.id, error = %e, "cannot append to the output log");
                    log.file = None;
                }
            }
        }
        // Pushed under the log lock so that subscribers see events in sequence order.
        lock(&self.events).push(rec, line.len());
        drop(log);
    }

    /// Logs a guest-triggered problem within this VM's budget and counts it.
    fn guest_fault(&self, what: &str, detail: &str) {
        self.update_quiet(|r| r.guest_protocol_errors += 1);
        if let Some(suppressed) = lock(&self.budget).admit(Instant::now()) {
            tracing::warn!(vm = %self.id, suppressed, detail, "guest protocol error: {what}");
        }
    }

    /// This VM's addresses, when its profile gives it a network.
    pub fn network(&self) -> Option<crate::net::addr::VmLink> {
        lock(&self.record).net
    }

    /// Whether this VM came, or is coming, by migration.
    pub fn migrating_in(&self) -> bool {
        lock(&self.record).migrate_in.is_some()
    }

    /// This VM's network namespace, when its profile gives it a network (the resolver binds
    /// its socket there with [`crate::net::netns::VmNetns::run_in`], on the gateway address).
    pub fn netns(&self) -> Option<crate::net::netns::VmNetns> {
        self.network()
            .map(|_| crate::net::netns::VmNetns::at(&self.dir.join(crate::net::netns::NETNS_FILE)))
    }

    /// The uid of this VM's jailed VMM, when it is jailed.
    pub fn jail_uid(&self) -> Option<u32> {
        lock(&self.record).jail_uid
    }

    /// Gives this VM the daemon's credential relay (or none).
    pub fn set_relay(&self, relay: Option<Arc<crate::relay::Relay>>) {
        *lock(&self.relay) = relay;
    }

    /// This VM's agent's tokenizer, when its profile tokenizes.
    pub fn tokens(&self) -> Option<Arc<crate::agent_tokens::AgentTokens>> {
        lock(&self.tokens).clone()
    }

    /// Gives this VM its agent's tokenizer (before the VMM starts).
    pub fn set_tokens(&self, tokens: Option<Arc<crate::agent_tokens::AgentTokens>>) {
        *lock(&self.tokens) = tokens;
    }

    /// Keeps (or, with `None`, stops) this VM's resolver and SNI check.
    pub fn set_egress(&self, egress: Option<crate::egress::VmEgress>) {
        let old = std::mem::replace(&mut *lock(&self.egress), egress);
        drop(old);
    }

    /// Keeps (or, with `None`, closes) this VM's forwarded host ports.
    pub fn set_forwards(&self, forwards: Option<crate::net::forward::PortForwards>) {
        let old = std::mem::replace(&mut *lock(&self.forwards), forwards);
        drop(old);
    }

    /// The counters of this VM's resolver and SNI check, while they run.
    pub fn egress_counters(&self) -> Option<crate::egress::EgressCounters> {
        lock(&self.egress)
            .as_ref()
            .map(crate::egress::VmEgress::counters)
    }

    /// The boot key of the sidecar whose credential sessions this host relays, once its
    /// `Hello` was admitted (what the device is told when the VM moves).
    pub fn credential_boot_key(&self) -> Option<[u8; 32]> {
        lock(&self.credential_listener)
            .as_ref()
            .map(crate::relay::VmRelay::boot_key)
    }

    /// Binds this VM's credential proxy listener for the admitted boot, once.
    fn attach_credentials(&self, boot_id: [u8; 16], sidecar_public_key: [u8; 32]) {
        let Some(relay) = lock(&self.relay).clone() else {
            return;
        };
        let mut listener = lock(&self.credential_listener);
        if listener.is_some() {
            return;
        }
        let identity = crate::relay::VmIdentity {
            vm_id: self.id.clone(),
            boot_id,
            sidecar_public_key,
            tokens: lock(&self.tokens).clone(),
            vmm_uid: self.jail_uid(),
        };
        match relay.attach_vm(&self.vmm_dir, identity) {
            Ok(l) => *listener = Some(l),
            Err(e) => tracing::warn!(vm = %self.id, error = %error_chain(&e), "credential relay"),
        }
    }

    /// Binds `<vm-dir>/vsock.sock_<CONTROL_PORT>`, replacing a stale socket file.
    pub fn bind_control(&self) -> Result<UnixListener, VmError> {
        let path = control_socket_path(&self.vmm_dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| VmError::Listen {
            path: path.clone(),
            source,
        })?;
        super::jail::open_to_vmm(&path, self.jail_uid())
            .map_err(|source| VmError::Listen { path, source })?;
        Ok(listener)
    }

    /// Spawns the VMM in its own session, with its stdout and stderr copied into `vmm.log` up to
    /// a cap ([`super::vmm_log`]), and records its pid and start time. Returns the child so the
    /// caller can wait for it.
    pub fn spawn_vmm(
        self: &Arc<Self>,
        launch: &VmmLaunch,
    ) -> Result<tokio::process::Child, VmError> {
        let (fifo, out, log) = super::vmm_log::create(&self.dir).map_err(VmError::VmmLog)?;
        let err = out.try_clone().map_err(|source| VmError::Open {
            path: self.dir.join(super::vmm_log::VMM_PIPE_FILE),
            source,
        })?;
        let (spec, image, restore, net, migrate_in) = {
            let record = lock(&self.record);
            (
                record.spec.clone(),
                record.image.clone(),
                record.restore.clone(),
                record.net,
                record.migrate_in.clone(),
            )
        };
        // The jail's arguments go last: a VMM's first argument is --kernel or --disk.
        let mut jail_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(jail) = &launch.jail {
            // Picked when the VM was created (a VMM is spawned once per VM, right after).
            let uid = self
                .jail_uid()
                .ok_or(VmError::Jail(super::jail::JailError::NoUid(0)))?;
            let cgroups = jail
                .prepare(
                    &self.id,
                    uid,
                    spec.vcpus,
                    spec.memory_mib,
                    image.as_ref().map(|i| i.scratch.as_path()),
                )
                .map_err(VmError::Jail)?;
            jail_args.extend(["--jail-uid".into(), uid.to_string().into()]);
            jail_args.extend(["--jail-gid".into(), uid.to_string().into()]);
            if jail.user_namespace {
                jail_args.push("--jail-userns".into());
            }
            if net.is_some() {
                jail_args.push("--jail-netns".into());
                jail_args.push(self.dir.join(crate::net::netns::NETNS_FILE).into());
            }
            for cg in &cgroups {
                jail_args.extend(["--jail-cgroup".into(), cg.clone().into_os_string()]);
            }
            self.update(|r| r.jail_cgroups = cgroups);
            // A snapshot to restore stays the daemon's: the VMM opens its files read-only
            // before it drops to `uid` (see `snapshots::Snapshots::prepare_restore`).
        }
        let mut cmd = tokio::process::Command::new(&launch.bin);
        if let Some(image) = &image {
            // The order makes the image /dev/vda and the writable disk /dev/vdb.
            cmd.arg("--disk")
                .arg(disk_arg(&image.rootfs, ",ro,id=image"))
                .arg("--disk")
                .arg(disk_arg(&image.scratch, ",id=scratch"));
        }
        match (&restore, &migrate_in) {
            // A migration in reads no kernel either: the guest comes over the socket, which the
            // VMM connects to before it enters its jail.
            (_, Some(socket)) => {
                cmd.arg("--migrate-from").arg(socket);
            }
            // A restore reads no kernel: the guest is in the snapshot.
            (Some(restore), None) => {
                cmd.arg("--restore").arg(&restore.dir);
                if restore.paused {
                    cmd.arg("--restore-paused");
                }
            }
            (None, None) => {
                cmd.arg("--kernel")
                    .arg(&launch.kernel)
                    .arg("--initrd")
                    .arg(&launch.initrd);
            }
        }
        if let Some(link) = &net {
            // In the VM's namespace, which the VMM joins first (`--jail-netns`).
            cmd.arg("--net").arg(format!(
                "tap={},mac={}",
                crate::net::netns::TAP_NAME,
                link.mac_string()
            ));
        }
        if let Some(pin) = &launch.pin {
            cmd.arg("--cpus").arg(pin.next_list(spec.vcpus));
        }
        cmd.arg("--vm-dir")
            .arg(&self.vmm_dir)
            .arg("--memory-mib")
            .arg(spec.memory_mib.to_string())
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .args(&jail_args)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and calls only setsid(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            bin: launch.bin.clone(),
            source,
        })?;
        *lock(&self.spawned_at) = Some(Instant::now());
        crate::metrics::global().boots.inc();
        // Our copies of the FIFO's write end go with `cmd`: the VMM (and its jail's supervisor)
        // then hold the only ones, and the copy ends when they have exited.
        drop(cmd);
        self.copy_vmm_log(fifo, log);
        let pid = child.id();
        let ticks = pid.and_then(state::process_start_ticks);
        self.update(|r| {
            r.vmm_pid = pid;
            r.vmm_start_ticks = ticks;
        });
        tracing::info!(vm = %self.id, pid, "VMM started");
        Ok(child)
    }

    /// Copies the VMM's output into `vmm.log` on a task of its own, counting what is dropped.
    fn copy_vmm_log(self: &Arc<Self>, fifo: tokio::net::unix::pipe::Receiver, log: File) {
        let vm = Arc::clone(self);
        let task = tokio::spawn(async move {
            super::vmm_log::copy(fifo, log, |n| {
                vm.update_quiet(|r| r.vmm_log_dropped_bytes += n);
            })
            .await;
        });
        *lock(&self.vmm_log) = Some(task);
    }

    /// After a daemon restart: resumes copying a running VMM's output into `vmm.log`, when its
    /// daemon gave it a FIFO (see [`super::vmm_log`]). A failure is logged.
    pub fn reattach_vmm_log(self: &Arc<Self>) {
        match super::vmm_log::reattach(&self.dir) {
            Ok(Some((fifo, log))) => self.copy_vmm_log(fifo, log),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(vm = %self.id, error = %error_chain(&e), "cannot reattach vmm.log")
            }
        }
    }

    /// Whether the recorded VMM process still runs (same pid and start time).
    pub fn vmm_alive(&self) -> bool {
        let r = lock(&self.record);
        match (r.vmm_pid, r.vmm_start_ticks) {
            (Some(pid), Some(ticks)) => state::process_matches(pid, ticks),
            _ => false,
        }
    }

    /// Accepts control connections until the VM ends.
    pub async fn accept_control(self: Arc<Self>, listener: UnixListener) {
        let mut ended = self.ended();
        let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                            drop(stream);
                            self.guest_fault("too many control connections", "");
                            continue;
                        };
                        let vm = Arc::clone(&self);
                        tokio::spawn(async move {
                            vm.serve_control(stream).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::error!(vm = %self.id, error = %e, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = wait_ended(&mut ended) => break,
            }
        }
        let _ = std::fs::remove_file(control_socket_path(&self.vmm_dir));
    }

    /// Runs one control connection: hello, then relay until it closes or misbehaves.
    async fn serve_control(self: Arc<Self>, mut stream: UnixStream) {
        let mut decoder = FrameDecoder::<GuestToHost>::new();
        let mut buf = vec![0u8; 64 * 1024];
        let first = match tokio::time::timeout(
            HELLO_TIMEOUT,
            read_frame(&mut stream, &mut decoder, &mut buf),
        )
        .await
        {
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) => return,
            Ok(Err(detail)) => return self.guest_fault("bad hello frame", &detail),
            Err(_) => return self.guest_fault("no hello in time", ""),
        };
        let verdict = answer_hello(&first);
        let mut reply = verdict.reply;
        if let Err(e) = verdict.outcome {
            let _ = write_msg(&mut stream, &reply).await;
            return self.guest_fault("hello refused", &e.to_string());
        }
        let GuestToHost::Hello {
            boot_id,
            ephemeral_public_key,
            ..
        } = first
        else {
            return;
        };
        let boot_hex: String = boot_id.iter().map(|b| format!("{b:02x}")).collect();
        // Admit the boot: the first hello sets it; a reconnect must repeat it. A restored
        // guest first takes a new identity (see `state::Reidentify`).
        let admitted = self.update(|r| {
            if r.status.is_terminal() {
                return Err("the VM has ended");
            }
            if let Some(pending) = &mut r.reidentify {
                if pending.sent_to.as_ref().is_none_or(|s| *s == boot_hex) {
                    pending.sent_to = Some(boot_hex.clone());
                    return Ok(Admit::Reidentify);
                }
                r.reidentify = None;
                r.reidentified += 1;
                r.boot_id = Some(boot_hex.clone());
                return Ok(Admit::NewBoot);
            }
            match &r.boot_id {
                None => {
                    r.boot_id = Some(boot_hex.clone());
                    Ok(Admit::NewBoot)
                }
                Some(b) if *b == boot_hex => {
                    r.control_reconnects += 1;
                    Ok(Admit::Reconnect)
                }
                Some(_) => Err("unknown boot id"),
            }
        });
        if let Ok(Admit::NewBoot) = admitted
            && let Some(spawned) = *lock(&self.spawned_at)
        {
            crate::metrics::global()
                .boot_to_ready
                .observe(spawned.elapsed().as_secs_f64());
        }
        let admitted = match admitted {
            Ok(a) => a,
            Err(reason) => {
                reply = HostToGuest::HelloReject {
                    reason: reason.to_owned(),
                    host_protocol_version: shared_proto::PROTOCOL_VERSION,
                };
                let _ = write_msg(&mut stream, &reply).await;
                return self.guest_fault("hello refused", reason);
            }
        };
        if write_msg(&mut stream, &reply).await.is_err() {
            return;
        }
        let reidentify = admitted == Admit::Reidentify;
        if reidentify {
            // The snapshot's identity gets no agent request and no credential relay, only the
            // request for a new identity; what the guest still had queued is relayed as usual
            // until it closes this connection and says hello again with its new identity.
            let mut entropy = vec![0u8; REIDENTIFY_ENTROPY];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut entropy);
            // A networked clone has a link of its own (a new address, gateway and MAC): the
            // guest moves its interface there before its processes go on.
            let network = self.network().as_ref().map(guest_network);
            if write_msg(&mut stream, &HostToGuest::Reidentify { entropy, network })
                .await
                .is_err()
            {
                return;
            }
            if let Some(suppressed) = lock(&self.budget).admit(Instant::now()) {
                tracing::info!(vm = %self.id, suppressed, "restored guest asked for a new identity");
            }
        } else {
            self.attach_credentials(boot_id, ephemeral_public_key);
            let thaw = lock(&self.record).thaw_pending
                && self.update(|r| std::mem::take(&mut r.thaw_pending));
            if thaw && write_msg(&mut stream, &HostToGuest::Thaw).await.is_err() {
                self.update(|r| r.thaw_pending = true);
                return;
            }
        }

        // This connection becomes the current one; a previous one is dropped.
        let (to_guest, mut outgoing) = mpsc::channel::<HostToGuest>(64);
        let conn = {
            let mut n = lock(&self.next_conn);
            *n += 1;
            *n
        };
        let kick = Arc::new(Notify::new());
        let old = lock(&self.control).replace(Control {
            conn,
            to_guest: to_guest.clone(),
            kick: Arc::clone(&kick),
        });
        if let Some(old) = old {
            old.kick.notify_one();
        }
        let (send_agent, stop) = self.update(|r| {
            let send = !reidentify && !r.template && !r.agent_sent && !r.stop_requested;
            r.agent_sent |= send;
            (
                send.then(|| (r.spec.clone(), r.image.clone(), r.net)),
                r.stop_requested,
            )
        });
        if let Some((spec, image, net)) = send_agent {
            let _ = to_guest
                .send(HostToGuest::RunAgent(AgentSpec {
                    command: spec.command,
                    args: spec.args,
                    env: spec.env,
                    cwd: spec.cwd,
                    uid: spec.uid,
                    gid: spec.gid,
                    mcp: super::gateways::VmGateways::summary(spec.profile.as_deref()),
                    root: image.as_ref().map(|_| RootFs {
                        image_device: super::images::IMAGE_DEVICE.to_owned(),
                        scratch_device: super::images::SCRATCH_DEVICE.to_owned(),
                    }),
                    user: image.and_then(|i| i.user),
                    network: net.as_ref().map(guest_network),
                }))
                .await;
            // The API has no stdin for the agent yet: it reads EOF, never blocks on it.
            let _ = to_guest
                .send(HostToGuest::AgentStdin { data: Vec::new() })
                .await;
            tracing::info!(vm = %self.id, "agent requested");
        } else if let Some(suppressed) = lock(&self.budget).admit(Instant::now()) {
            // A guest can reconnect as often as it likes: this line is within its budget.
            tracing::info!(vm = %self.id, suppressed, "sidecar reconnected");
        }
        if stop {
            let _ = to_guest.send(HostToGuest::Shutdown).await;
        }
        drop(to_guest);

        let result = self
            .relay(&mut stream, &mut decoder, &mut buf, &mut outgoing, &kick)
            .await;
        if let Err(detail) = result {
            self.guest_fault("connection closed", &detail);
        }
        let mut control = lock(&self.control);
        if control.as_ref().is_some_and(|c| c.conn == conn) {
            *control = None;
        }
    }

    /// Relays frames both ways. `Ok` on a clean EOF; `Err` with a reason on a protocol error.
    async fn relay(
        &self,
        stream: &mut UnixStream,
        decoder: &mut FrameDecoder<GuestToHost>,
        buf: &mut [u8],
        outgoing: &mut mpsc::Receiver<HostToGuest>,
        kick: &Notify,
    ) -> Result<(), String> {
        loop {
            while let Some(msg) = decoder.decode_next().map_err(|e| error_chain(&e))? {
                self.on_guest_message(msg)?;
            }
            tokio::select! {
                n = stream.read(buf) => match n {
                    Ok(0) => return Ok(()),
                    Ok(n) => decoder.push(&buf[..n]),
                    Err(e) => return Err(format!("read: {e}")),
                },
                msg = outgoing.recv() => match msg {
                    Some(msg) => {
                        if let Err(e) = write_msg(stream, &msg).await {
                            tracing::debug!(vm = %self.id, error = %e, "control write failed");
                            return Ok(());
                        }
                    }
                    // Cannot happen while `control` holds a sender; treat as closed.
                    None => return Ok(()),
                },
                () = kick.notified() => return Ok(()),
            }
        }
    }

    /// Applies one message from the guest, or says why it is out of order.
    fn on_guest_message(&self, msg: GuestToHost) -> Result<(), String> {
        match msg {
            GuestToHost::Hello { .. } => Err("hello on an established connection".into()),
            GuestToHost::Frozen => {
                // Only a waiting `freeze` cares; an unasked one wakes nobody.
                self.frozen.notify_waiters();
                Ok(())
            }
            GuestToHost::AgentStarted { pid } => {
                self.update(|r| {
                    if !r.agent_sent || r.agent_pid.is_some() {
                        return Err("unexpected agent_started".to_owned());
                    }
                    r.agent_pid = Some(pid);
                    if r.status == VmStatus::Starting {
                        r.status = VmStatus::Running;
                    }
                    Ok(())
                })?;
                self.emit(Event::Started { pid });
                Ok(())
            }
            GuestToHost::AgentOutput { stream, data } => {
                {
                    let r = lock(&self.record);
                    if r.agent_pid.is_none() || r.agent_exit.is_some() {
                        return Err("agent_output while no agent runs".into());
                    }
                }
                let stream = match stream {
                    OutputStream::Stdout => api::Stream::Stdout,
                    OutputStream::Stderr => api::Stream::Stderr,
                };
                self.emit(Event::Output {
                    stream,
                    data: BASE64.encode(&data),
                });
                Ok(())
            }
            GuestToHost::AgentExited { status } => {
                let status = api::AgentExit::from(status);
                self.update(|r| {
                    if !r.agent_sent || r.agent_exit.is_some() {
                        return Err("unexpected agent_exited".to_owned());
                    }
                    r.agent_exit = Some(status);
                    Ok(())
                })?;
                tracing::info!(vm = %self.id, ?status, "agent exited");
                self.emit(Event::Exited { status });
                Ok(())
            }
            GuestToHost::Error { message } => {
                let message = truncate(&message, GUEST_MESSAGE_MAX);
                if let Some(suppressed) = lock(&self.budget).admit(Instant::now()) {
                    tracing::warn!(vm = %self.id, suppressed, message, "sidecar error");
                }
                self.emit(Event::GuestError { message });
                Ok(())
            }
        }
    }

    /// Asks the guest to stop every process but its sidecar (`Freeze`) and waits for its
    /// `Frozen`, at most [`FREEZE_TIMEOUT`]. Before a snapshot, so that no process of a clone
    /// runs before the clone has a new identity (see `state::Reidentify`).
    pub async fn freeze(&self) -> Result<(), FreezeError> {
        let answered = self.frozen.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if !self.send_to_guest(HostToGuest::Freeze) {
            return Err(FreezeError::NotConnected);
        }
        tokio::time::timeout(FREEZE_TIMEOUT, answered)
            .await
            .map_err(|_| FreezeError::NoAnswer(FREEZE_TIMEOUT))
    }

    /// Lets what [`Vm::freeze`] stopped go on. Without a control connection to send it on, it
    /// is kept and sent when the sidecar connects again.
    pub fn thaw(&self) {
        if !self.send_to_guest(HostToGuest::Thaw) {
            self.update(|r| r.thaw_pending = true);
        }
    }

    /// Whether a sidecar is connected on the control channel.
    pub fn control_connected(&self) -> bool {
        lock(&self.control).is_some()
    }

    /// Queues a message on the current control connection; `false` when there is none or its
    /// queue is full (a guest that stopped reading must not stall the caller).
    pub fn send_to_guest(&self, msg: HostToGuest) -> bool {
        lock(&self.control)
            .as_ref()
            .is_some_and(|c| c.to_guest.try_send(msg).is_ok())
    }

    /// Waits for our child VMM to end, then records the end.
    pub async fn watch_child(self: Arc<Self>, mut child: tokio::process::Child) {
        let status = child.wait().await.ok();
        self.finish(status).await;
    }

    /// Polls an adopted VMM (not our child) until it ends, then records the end.
    pub async fn watch_adopted(self: Arc<Self>) {
        while self.vmm_alive() {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
        self.finish(None).await;
    }

    /// Records how the VM ended: lets the control connection drain, reads `exit.json` (else
    /// the wait status `wait` of our child), sets the final status and emits [`Event::Ended`].
    /// Without either the VM is [`VmStatus::Lost`].
    pub async fn finish(&self, wait: Option<std::process::ExitStatus>) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while lock(&self.control).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(c) = lock(&self.control).take() {
            c.kick.notify_one();
        }
        // The copy ends when the VMM's side of the FIFO is closed; wait so that its count is
        // final (a process that inherited the FIFO and lives on only delays the count).
        let copy = lock(&self.vmm_log).take();
        if let Some(copy) = copy
            && tokio::time::timeout(DRAIN_TIMEOUT, copy).await.is_ok()
        {
            let _ = std::fs::remove_file(self.dir.join(super::vmm_log::VMM_PIPE_FILE));
        }
        let from_file = state::read_vmm_exit(&self.vmm_dir);
        // An adopted VMM has no wait status: gone without exit.json, it is lost.
        let lost = from_file.is_none() && wait.is_none();
        let cgroups = lock(&self.record).jail_cgroups.clone();
        let vmm_exit = from_file.or_else(|| {
            wait.map(|w| {
                use std::os::unix::process::ExitStatusExt;
                VmmExit {
                    reason: jail_reason(w.signal(), cgroup::oom_killed(&cgroups)).to_owned(),
                    exit_code: w.code(),
                    signal: w.signal(),
                    boot_to_ready_ms: None,
                    ..Default::default()
                }
            })
        });
        self.conclude(vmm_exit, lost);
    }

    /// Sets the final status (`lost`: [`VmStatus::Lost`] unless a stop was asked for) and emits
    /// [`Event::Ended`].
    pub fn conclude(&self, vmm_exit: Option<VmmExit>, lost: bool) {
        lock(&self.credential_listener).take();
        let cgroups = std::mem::take(&mut lock(&self.record).jail_cgroups);
        cgroup::remove(&cgroups);
        let status = self.update(|r| {
            let moved = r
                .migrated_to
                .as_ref()
                .is_some_and(|m| m.outcome == api::MigrationOutcome::Moved);
            r.status = if moved {
                VmStatus::Migrated
            } else if r.stop_requested {
                VmStatus::Stopped
            } else if lost {
                VmStatus::Lost
            } else if r.agent_exit.is_some() {
                VmStatus::Exited
            } else {
                VmStatus::Failed
            };
            r.vmm_exit = vmm_exit.clone();
            r.paused = false;
            r.status
        });
        tracing::info!(vm = %self.id, status = status.as_str(), ?vmm_exit, "VM ended");
        self.emit(Event::Ended { status, vmm_exit });
        lock(&self.log).file = None;
        self.ended.send_replace(true);
    }

    /// Stops the VM: asks the sidecar to shut down, then after `grace` sends SIGTERM to the VMM,
    /// and SIGKILL after as long again. Returns once the VM has ended (or gave up waiting).
    pub async fn stop(&self, grace: Duration) {
        let already = self.update(|r| {
            if r.status.is_terminal() {
                return true;
            }
            r.stop_requested = true;
            r.status = VmStatus::Stopping;
            false
        });
        if already {
            return;
        }
        tracing::info!(vm = %self.id, "stopping");
        if self.paused() {
            // A paused guest cannot shut down by itself: let it run again first.
            let op = super::vmm_control::Op::Resume;
            match super::vmm_control::request(&self.vmm_dir, self.jail_uid(), op).await {
                Ok(now) => self.update(|r| r.paused = now),
                Err(e) => {
                    tracing::warn!(vm = %self.id, error = %error_chain(&e), "resume before stop")
                }
            }
        }
        self.send_to_guest(HostToGuest::Shutdown);
        let mut ended = self.ended();
        for signal in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGKILL] {
            if tokio::time::timeout(grace, wait_ended(&mut ended))
                .await
                .is_ok()
            {
                return;
            }
            self.signal_vmm(signal);
        }
        let _ = tokio::time::timeout(grace, wait_ended(&mut ended)).await;
    }

    /// Ends this copy of a VM that now runs on another host (`to`): records where it went, then
    /// ends the VMM (which refuses to run the VM again) with SIGTERM, and SIGKILL after
    /// `grace`. The guest is not asked to shut down: it runs on, there.
    pub async fn end_migrated(&self, to: api::MigratedTo, grace: Duration) {
        self.update(|r| {
            r.migrated_to = Some(to);
            r.migrating_to = None;
        });
        let mut ended = self.ended();
        for signal in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGKILL] {
            self.signal_vmm(signal);
            if tokio::time::timeout(grace, wait_ended(&mut ended))
                .await
                .is_ok()
            {
                return;
            }
        }
    }

    /// Records a migration out that left the VM here: whether its vCPUs are paused, as the VMM
    /// said, and no migration under way (one record write).
    pub fn migration_kept(&self, paused: bool) {
        self.update(|r| {
            r.paused = paused;
            r.migrating_to = None;
        });
    }

    /// Records a migration whose outcome is unknown: the VM stays paused here, and its record
    /// says where it may run.
    pub fn migration_unknown(&self, to: api::MigratedTo) {
        self.update(|r| {
            r.migrated_to = Some(to);
            r.migrating_to = None;
            r.paused = true;
        });
    }

    /// Records a migration out whose copy begins, and where to; its outcome clears it
    /// ([`Vm::end_migrated`], [`Vm::migration_unknown`], [`Vm::migration_kept`]).
    pub fn migration_begins(&self, to: api::MigratedTo) {
        self.update(|r| r.migrating_to = Some(to));
    }

    /// Records, for a VM whose VMM ended while the daemon was away in the middle of a
    /// migration out, where the migration may have taken it (outcome `unknown`).
    pub fn migration_lost_with_vmm(&self) {
        if lock(&self.record).migrating_to.is_none() {
            return;
        }
        self.update(|r| {
            r.migrated_to = r.migrating_to.take().map(|to| api::MigratedTo {
                outcome: api::MigrationOutcome::Unknown,
                ..to
            });
        });
    }

    /// Where a migration out whose outcome was never recorded was taking this VM.
    pub fn migrating_to(&self) -> Option<api::MigratedTo> {
        lock(&self.record).migrating_to.clone()
    }

    /// Forgets a migration of unknown outcome, once the target said it holds no copy.
    pub fn clear_migration(&self) {
        self.update(|r| r.migrated_to = None);
    }

    /// Signals the VMM, if the recorded process is still the same one.
    fn signal_vmm(&self, signal: nix::sys::signal::Signal) {
        let pid = lock(&self.record).vmm_pid;
        if let Some(pid) = pid.filter(|_| self.vmm_alive()) {
            tracing::warn!(vm = %self.id, pid, %signal, "signalling the VMM");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }
}

/// Waits until the VMM of `vm` serves its control socket (it has restored the VM it was
/// started to restore or receive), and gives its child back; or, when it exits first or
/// `timeout` passes (then it is killed), how it ended.
pub async fn wait_served(
    vm: &Vm,
    mut child: tokio::process::Child,
    timeout: Duration,
) -> Result<tokio::process::Child, Option<std::process::ExitStatus>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            status = child.wait() => return Err(status.ok()),
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let op = super::vmm_control::Op::State;
        if super::vmm_control::request(&vm.vmm_dir, vm.jail_uid(), op)
            .await
            .is_ok()
        {
            return Ok(child);
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(child.wait().await.ok());
        }
    }
}

/// Returns once `ended` turns `true` (or its sender is gone).
pub async fn wait_ended(ended: &mut watch::Receiver<bool>) {
    loop {
        let done = *ended.borrow_and_update();
        if done || ended.changed().await.is_err() {
            return;
        }
    }
}

/// The path of the control listener in `dir`.
pub fn control_socket_path(dir: &Path) -> PathBuf {
    shared_proto::ports::host_listener_path(dir, shared_proto::ports::CONTROL_PORT)
}

/// Reads until one whole frame is decoded. `Ok(None)` on EOF before it.
async fn read_frame(
    stream: &mut UnixStream,
    decoder: &mut FrameDecoder<GuestToHost>,
    buf: &mut [u8],
) -> Result<Option<GuestToHost>, String> {
    loop {
        if let Some(msg) = decoder.decode_next().map_err(|e| error_chain(&e))? {
            return Ok(Some(msg));
        }
        match stream.read(buf).await {
            Ok(0) => return Ok(None),
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Writes one frame, giving up after [`WRITE_TIMEOUT`] (a guest that does not read).
async fn write_msg(stream: &mut UnixStream, msg: &HostToGuest) -> std::io::Result<()> {
    let frame = encode_frame(msg).map_err(std::io::Error::other)?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&frame))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// The last `seq` in an event log, if any line in its last [`LAST_SEQ_TAIL`] bytes parses.
/// Only that tail is read: the log may be as large as its cap.
fn last_seq(path: &Path) -> Option<u64> {
    use std::io::{Read, Seek};
    let mut file = File::open(path).ok()?;
    let start = file.metadata().ok()?.len().saturating_sub(LAST_SEQ_TAIL);
    file.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut text = Vec::new();
    file.take(LAST_SEQ_TAIL).read_to_end(&mut text).ok()?;
    // A tail that starts inside the file starts inside a line: skip that part line.
    let lines = match start {
        0 => &text[..],
        _ => &text[text.iter().position(|&b| b == b'\n')? + 1..],
    };
    lines
        .split(|&b| b == b'\n')
        .rev()
        .find_map(|line| serde_json::from_slice::<EventRecord>(line).ok())
        .map(|r| r.seq)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoclaw_api::{AgentExit, CreateVm};
    use shared_proto::message::ExitStatus;
    use tokio::sync::broadcast;

    #[test]
    fn the_guest_is_told_its_address_gateway_resolver_and_mac() {
        let link = crate::net::addr::VmLink {
            gateway: "10.200.0.9".parse().unwrap(),
            guest: "10.200.0.10".parse().unwrap(),
            host_end: "10.200.0.13".parse().unwrap(),
            netns_end: "10.200.0.14".parse().unwrap(),
        };
        let net = guest_network(&link);
        assert_eq!(net.address, link.guest);
        assert_eq!((net.gateway, net.dns), (link.gateway, link.gateway));
        assert_eq!(net.prefix_len, 30);
        assert_eq!(net.mac, [2, 0, 10, 200, 0, 10]);
    }

    #[test]
    fn a_vmm_killed_without_an_exit_record_is_named_by_its_signal() {
        use nix::libc::{SIGKILL, SIGSEGV, SIGSYS, SIGXFSZ};
        assert_eq!(jail_reason(Some(SIGSYS), false), "seccomp");
        assert_eq!(jail_reason(Some(SIGXFSZ), false), "file_size_limit");
        assert_eq!(jail_reason(Some(SIGKILL), false), "unknown");
        assert_eq!(jail_reason(Some(SIGKILL), true), "memory_limit");
        assert_eq!(jail_reason(Some(SIGSEGV), true), "unknown");
        assert_eq!(jail_reason(None, false), "unknown");
    }

    fn vm(cap: u64) -> (tempfile::TempDir, Arc<Vm>) {
        let dir = tempfile::tempdir().unwrap();
        let rec = VmRecord::new("abcd0123".into(), CreateVm::new("/bin/a", vec![]), 1);
        let vm = Vm::open(dir.path().to_path_buf(), rec, cap).unwrap();
        (dir, vm)
    }

    fn out(data: &[u8]) -> GuestToHost {
        GuestToHost::AgentOutput {
            stream: OutputStream::Stdout,
            data: data.to_vec(),
        }
    }

    #[test]
    fn guest_messages_must_come_in_order() {
        let (_dir, vm) = vm(1 << 20);
        // Nothing before RunAgent was sent.
        assert!(
            vm.on_guest_message(GuestToHost::AgentStarted { pid: 1 })
                .is_err()
        );
        vm.update(|r| r.agent_sent = true);
        assert!(vm.on_guest_message(out(b"early")).is_err());
        vm.on_guest_message(GuestToHost::AgentStarted { pid: 9 })
            .unwrap();
        assert!(
            vm.on_guest_message(GuestToHost::AgentStarted { pid: 9 })
                .is_err()
        );
        vm.on_guest_message(out(b"hi")).unwrap();
        vm.on_guest_message(GuestToHost::AgentExited {
            status: ExitStatus::Signal(9),
        })
        .unwrap();
        assert!(vm.on_guest_message(out(b"late")).is_err());
        assert!(
            vm.on_guest_message(GuestToHost::AgentExited {
                status: ExitStatus::Exit(0),
            })
            .is_err()
        );
        let info = vm.info();
        assert_eq!(info.status, VmStatus::Running);
        assert_eq!(info.agent_exit, Some(AgentExit::Signal(9)));
        // The record on disk follows.
        let saved = VmRecord::load(&vm.dir).unwrap();
        assert_eq!(saved.agent_pid, Some(9));
    }

    #[test]
    fn output_over_the_cap_is_counted_not_written_and_seq_resumes() {
        let (dir, vm) = vm(200);
        vm.update(|r| r.agent_sent = true);
        vm.on_guest_message(GuestToHost::AgentStarted { pid: 1 })
            .unwrap();
        vm.on_guest_message(out(&[b'x'; 30])).unwrap();
        vm.on_guest_message(out(&[b'y'; 301])).unwrap();
        vm.conclude(None, false);
        assert_eq!(vm.info().output_dropped_bytes, 301);
        assert_eq!(vm.status(), VmStatus::Failed);
        let text = std::fs::read_to_string(vm.output_path()).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<EventRecord>(l).unwrap().seq)
            .collect();
        // started, the first chunk, (the dropped chunk), ended.
        assert_eq!(seqs, [0, 1, 3]);
        let reopened = Vm::open(
            dir.path().to_path_buf(),
            VmRecord::load(dir.path()).unwrap(),
            200,
        )
        .unwrap();
        assert_eq!(lock(&reopened.log).next_seq, 4);
    }

    /// The log's lines, parsed.
    fn logged(vm: &Vm) -> Vec<EventRecord> {
        std::fs::read_to_string(vm.output_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn guest_errors_count_against_the_cap_and_ended_is_still_written() {
        let (_dir, vm) = vm(200);
        vm.update(|r| r.agent_sent = true);
        vm.on_guest_message(GuestToHost::AgentStarted { pid: 1 })
            .unwrap();
        for _ in 0..50 {
            vm.on_guest_message(GuestToHost::Error {
                message: "e".repeat(100),
            })
            .unwrap();
        }
        vm.conclude(None, false);
        let text = std::fs::read_to_string(vm.output_path()).unwrap();
        let (guest, ended) = text.trim_end().rsplit_once('\n').unwrap();
        // The guest's lines stay under the cap; the daemon's final event is still written.
        assert!(guest.len() < 200, "{} bytes of guest events", guest.len());
        assert!(ended.contains(r#""event":"ended""#), "{ended}");
        assert_eq!(logged(&vm).last().unwrap().seq, 51);
        let info = vm.info();
        assert_eq!(info.events_dropped as usize, 51 - (logged(&vm).len() - 1));
        assert!(info.events_dropped >= 49, "{info:?}");
    }

    /// Bytes this thread has read through read(2) and friends so far.
    fn thread_read_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn last_seq_reads_only_the_tail_of_a_huge_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(state::OUTPUT_FILE);
        let mut file = File::create(&path).unwrap();
        // 128 MiB of hole (no disk used), then two records.
        file.set_len(128 << 20).unwrap();
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        for seq in [40, 41] {
            let rec = EventRecord {
                seq,
                event: Event::GuestError {
                    message: "x".into(),
                },
            };
            writeln!(file, "\n{}", serde_json::to_string(&rec).unwrap()).unwrap();
        }
        let before = thread_read_bytes();
        assert_eq!(last_seq(&path), Some(41));
        let read = thread_read_bytes() - before;
        assert!(read <= 8 << 20, "read {read} bytes");
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn reconnects_are_counted_and_logged_within_the_budget() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (_dir, vm) = vm(1 << 20);
        let hello = encode_frame(&GuestToHost::Hello {
            protocol_version: shared_proto::PROTOCOL_VERSION,
            sidecar_version: "test".into(),
            boot_id: [1; 16],
            ephemeral_public_key: [7; 32],
        })
        .unwrap();
        for _ in 0..30 {
            let (mut guest, host) = UnixStream::pair().unwrap();
            let served = tokio::spawn(Arc::clone(&vm).serve_control(host));
            guest.write_all(&hello).await.unwrap();
            let mut ack = [0u8; 1];
            guest.read_exact(&mut ack).await.unwrap();
            drop(guest);
            served.await.unwrap();
        }
        assert_eq!(vm.info().control_reconnects, 29);
        let text = String::from_utf8(lock(&captured.0).clone()).unwrap();
        let lines = text.matches("sidecar reconnected").count();
        assert!(
            (1..=LogBudget::PER_WINDOW as usize).contains(&lines),
            "{lines} lines:\n{text}"
        );
    }

    #[test]
    fn a_lagging_subscriber_holds_a_bounded_number_of_bytes() {
        use super::super::event_feed::EVENT_BUFFER_BYTES;
        let (_dir, vm) = vm(1000);
        vm.update(|r| r.agent_sent = true);
        vm.on_guest_message(GuestToHost::AgentStarted { pid: 1 })
            .unwrap();
        let mut live = vm.subscribe();
        for _ in 0..1100 {
            vm.on_guest_message(out(&[b'z'; 32 << 10])).unwrap();
        }
        let mut lagged = false;
        let mut held = 0;
        loop {
            match live.try_recv() {
                Ok(rec) => {
                    if let Event::Output { data, .. } = &rec.event {
                        held += data.len();
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                Err(_) => break,
            }
        }
        assert!(lagged);
        assert!(held <= EVENT_BUFFER_BYTES, "{held} bytes held");
        assert!(lock(&vm.events).bytes() <= EVENT_BUFFER_BYTES);
    }

    #[tokio::test]
    async fn a_networked_vm_s_vmm_gets_its_tap_and_mac_and_others_none() {
        use std::os::unix::fs::PermissionsExt;
        let link = crate::net::addr::VmLink {
            gateway: "10.200.0.1".parse().unwrap(),
            guest: "10.200.0.2".parse().unwrap(),
            host_end: "10.200.0.5".parse().unwrap(),
            netns_end: "10.200.0.6".parse().unwrap(),
        };
        for net in [None, Some(link)] {
            let dir = tempfile::tempdir().unwrap();
            let mut rec = VmRecord::new("abcd0123".into(), CreateVm::new("/bin/a", vec![]), 1);
            rec.net = net;
            let vm = Vm::open(dir.path().to_path_buf(), rec, 1 << 20).unwrap();
            // A "VMM" that writes its arguments, one a line, and exits.
            let bin = dir.path().join("args-vmm");
            let out = dir.path().join("args");
            std::fs::write(
                &bin,
                format!(
                    "#!/bin/sh
printf '%s\\n' \"$@\" > {}\n",
                    out.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
            // The networked one is also pinned.
            let pin =
                net.map(|_| Arc::new(super::super::pinning::CpuPinner::new(vec![5]).unwrap()));
            let launch = VmmLaunch {
                bin,
                kernel: "k".into(),
                initrd: "i".into(),
                jail: None,
                pin,
            };
            let child = vm.spawn_vmm(&launch).unwrap();
            Arc::clone(&vm).watch_child(child).await;
            let args = std::fs::read_to_string(&out).unwrap();
            let args: Vec<&str> = args.lines().collect();
            let cpus_at = args.iter().position(|a| *a == "--cpus");
            match net {
                None => assert_eq!(cpus_at, None, "{args:?}"),
                Some(_) => assert_eq!(cpus_at.map(|at| args[at + 1]), Some("5"), "{args:?}"),
            }
            let net_at = args.iter().position(|a| *a == "--net");
            match net {
                None => assert_eq!(net_at, None, "{args:?}"),
                Some(_) => {
                    let at = net_at.unwrap_or_else(|| panic!("no --net: {args:?}"));
                    assert_eq!(args[at + 1], "tap=tap0,mac=02:00:0a:c8:00:02");
                }
            }
        }
    }

    #[tokio::test]
    async fn vmm_log_is_capped_and_the_vmm_is_never_blocked() {
        use super::super::vmm_log::VMM_LOG_CAP;
        let (dir, vm) = vm(1 << 20);
        // A "VMM" that writes 8 MiB to stderr and exits.
        let bin = dir.path().join("noisy-vmm");
        std::fs::write(&bin, "#!/bin/sh\nhead -c 8388608 /dev/zero >&2\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let launch = VmmLaunch {
            bin,
            kernel: "k".into(),
            initrd: "i".into(),
            jail: None,
            pin: None,
        };
        let child = vm.spawn_vmm(&launch).unwrap();
        Arc::clone(&vm).watch_child(child).await;
        assert_eq!(vm.info().vmm_exit.unwrap().exit_code, Some(0));
        let log = std::fs::read(dir.path().join(state::VMM_LOG_FILE)).unwrap();
        assert!(
            log.len() as u64 <= VMM_LOG_CAP + 4096,
            "{} bytes",
            log.len()
        );
        assert!(log.starts_with(&[0; 64]));
        assert_eq!(
            vm.info().vmm_log_dropped_bytes,
            (8 << 20) - VMM_LOG_CAP,
            "every byte past the cap is counted"
        );
    }
}
