//! Live migration between two daemons, both ends: the source's `POST /v1/vms/{id}/migrate`
//! ([`Daemon::start_migration`]) and the target's listener ([`serve_migrations`]). What each
//! step does and why is in [`crate::migration`]; the link is [`crate::migration::link`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoclaw_api::{MigrateVm, MigratedTo, MigrationEvent, MigrationOutcome, VmStatus};
use shared_proto::credential::IssuedToken;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, mpsc};

use super::images::{SCRATCH_DISK_FILE, VmImage};
use super::state::{self, VmRecord};
use super::vm::Vm;
use super::{Daemon, vmm_control};
use crate::agent_tokens::CarriedTokens;
use crate::error_chain;
use crate::migration::link::{self, Identity, Link, LinkError};
use crate::migration::{CopyState, Offer, OfferImage, Peers, Reply, Request};

/// The socket in the source VMM's folder that its VMM sends the VM into.
pub const OUT_SOCKET: &str = "migrate.sock";
/// The socket in the target VM's folder that its VMM receives the VM from.
pub const IN_SOCKET: &str = "migrate-in.sock";
/// How long the peer's offer or reply, and a VMM's connect to its socket, may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a target VMM may take, once the stream has ended, to serve its control socket.
pub const TARGET_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The most migrations a daemon receives at once; a further caller is turned away.
pub const MAX_INCOMING: usize = 4;

/// This daemon's migration setup (`--migration-listen`, `--migration-peer`).
#[derive(Debug)]
pub struct MigrationSetup {
    /// Its identity, `<state>/migration/host.key`.
    pub identity: Identity,
    /// The pinned peers.
    pub peers: Peers,
}

/// Why a migration cannot start (the answer's status says which kind).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No such VM.
    #[error("no VM {0}")]
    NoVm(String),
    /// The VM is not in a state to move, or moves already.
    #[error("VM {id} {why}")]
    Conflict {
        /// The VM.
        id: String,
        /// Why.
        why: String,
    },
    /// The request cannot be served as asked.
    #[error("{0}")]
    Bad(String),
    /// The target host could not be asked, or the VMM not resumed.
    #[error("{0}")]
    Unreachable(String),
}

/// The migrations under way on this host as a source, by VM id: each one's cancel.
pub type Running = std::sync::Mutex<std::collections::HashMap<String, Arc<Notify>>>;

impl Daemon {
    /// Checks that VM `id` may move to `req.to` and starts its migration on a task, whose events
    /// (the last one `Ended`) go to the returned receiver. Errors come before anything starts.
    pub fn start_migration(
        self: &Arc<Self>,
        id: &str,
        req: MigrateVm,
    ) -> Result<mpsc::Receiver<MigrationEvent>, MigrateError> {
        let setup = self.migration.clone().ok_or_else(|| {
            MigrateError::Bad(
                "live migration is off on this host (start the daemon with --migration-peer)"
                    .to_owned(),
            )
        })?;
        let pinned = setup.peers.key_of(&req.to).ok_or_else(|| {
            MigrateError::Bad(format!(
                "{} is not a pinned migration peer of this host (--migration-peer {}=KEY)",
                req.to, req.to
            ))
        })?;
        let vm = self
            .get(id)
            .ok_or_else(|| MigrateError::NoVm(id.to_owned()))?;
        let conflict = |why: &str| MigrateError::Conflict {
            id: id.to_owned(),
            why: why.to_owned(),
        };
        let offer = self.offer_of(&vm).map_err(|why| conflict(&why))?;
        crate::migration::check_offer(&offer).map_err(MigrateError::Bad)?;
        let cancel = Arc::new(Notify::new());
        {
            let mut running = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(id) {
                return Err(conflict("is migrating already"));
            }
            running.insert(id.to_owned(), Arc::clone(&cancel));
        }
        let (tx, rx) = mpsc::channel(64);
        let daemon = Arc::clone(self);
        tokio::spawn(async move {
            let ended = daemon
                .migrate_out(&vm, &req, pinned, offer, &setup.identity, &tx, &cancel)
                .await;
            daemon
                .migrating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&vm.id);
            let _ = tx.send(ended).await;
        });
        Ok(rx)
    }

    /// Cancels VM `id`'s migration; false when none runs.
    pub fn cancel_migration(&self, id: &str) -> bool {
        let running = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        match running.get(id) {
            Some(cancel) => {
                cancel.notify_one();
                true
            }
            None => false,
        }
    }

    /// What the target is offered for `vm`, or why it cannot move.
    fn offer_of(&self, vm: &Arc<Vm>) -> Result<Offer, String> {
        let info = vm.info();
        if !matches!(info.status, VmStatus::Starting | VmStatus::Running) || !vm.vmm_alive() {
            return Err(format!(
                "is {}: only a running VM migrates",
                info.status.as_str()
            ));
        }
        if info.paused {
            return Err("is paused: resume it first".to_owned());
        }
        if info.reidentify_pending {
            return Err("is taking a new identity after a restore; try again".to_owned());
        }
        if info.migrated_to.is_some() {
            return Err("has a migration of unknown outcome: ask the target host".to_owned());
        }
        if let Some(parent) = vm.attached_parent() {
            return Err(format!("stops with its parent {parent}: detach it first"));
        }
        let children = self
            .lock_vms()
            .values()
            .filter(|v| !v.status().is_terminal())
            .filter(|v| v.attached_parent().as_deref() == Some(vm.id.as_str()))
            .count();
        if children > 0 {
            return Err(format!(
                "has {children} attached children: detach them first"
            ));
        }
        let (boot_id, agent_sent, agent_pid) = vm.guest_facts();
        let image = match vm.spec_and_image().1 {
            None => None,
            Some(image) => {
                let disk = std::fs::metadata(&image.scratch).map_err(|e| {
                    format!(
                        "has a writable disk {} that cannot be read: {e}",
                        image.scratch.display()
                    )
                })?;
                Some(OfferImage {
                    name: image.name,
                    digest: image.digest,
                    user: image.user,
                    disk_bytes: disk.len(),
                })
            }
        };
        Ok(Offer {
            version: crate::migration::OFFER_VERSION,
            source_vm: vm.id.clone(),
            spec: info.spec,
            boot_id,
            agent_sent,
            agent_pid,
            status: info.status,
            net: vm.network(),
            image,
            // Filled as the offer goes out (`migrate_out`).
            tokens: None,
        })
    }

    /// Tells the device where `vm` goes (as `target_vm`, on the host whose credential link key
    /// is `link_key`, hex), before the copy: what became of it, for the client, or `None` when
    /// the VM has no credential link here to carry.
    async fn tell_device(
        &self,
        vm: &Vm,
        target_vm: &str,
        link_key: Option<&str>,
    ) -> Option<MigrationEvent> {
        let relay = self.relay.as_ref()?;
        let boot_key = vm.credential_boot_key()?;
        let target_key = link_key
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| <[u8; 32]>::try_from(k).ok());
        let told = match target_key {
            None => Err("the target host serves no device link".to_owned()),
            Some(to_host) => relay
                .tell_moving(&vm.id, boot_key, to_host, target_vm)
                .await
                .map_err(|e| e.to_string()),
        };
        match &told {
            Ok(()) => tracing::info!(vm = %vm.id, target_vm, "the device follows the VM"),
            Err(why) => tracing::warn!(
                vm = %vm.id,
                target_vm,
                why,
                "the device does not follow the VM: its credential calls will fail on the target"
            ),
        }
        Some(MigrationEvent::Device {
            follows: told.is_ok(),
            error: told.err(),
        })
    }

    /// The source's side, to its end: the offer, the copy, and what the VMM says ran where.
    #[allow(clippy::too_many_arguments)]
    async fn migrate_out(
        &self,
        vm: &Arc<Vm>,
        req: &MigrateVm,
        pinned: [u8; 32],
        mut offer: Offer,
        identity: &Identity,
        events: &mpsc::Sender<MigrationEvent>,
        cancel: &Notify,
    ) -> MigrationEvent {
        let started = Instant::now();
        // The agent's tokenizer goes with the offer: its key, and what it issued so far in
        // batches after it; what it issues during the copy follows once the VM has moved.
        let carried = vm.tokens().map(|t| t.carried_since(0));
        let (batches, token_seq) = match &carried {
            Some((c, seq)) => (crate::migration::token_batches(&c.issued), *seq),
            None => (Vec::new(), 0),
        };
        offer.tokens = carried
            .as_ref()
            .map(|(c, _)| crate::migration::OfferTokens {
                key: hex::encode(*c.key),
                batches: u32::try_from(batches.len()).unwrap_or(u32::MAX),
            });
        drop(carried);
        let kept = |error: String, target_vm: Option<String>| MigrationEvent::Ended {
            outcome: MigrationOutcome::Kept,
            target_vm,
            downtime_ms: None,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            error: Some(error),
        };
        // The offer and its answer; a cancel here just drops the link.
        let dialled = async {
            let mut link = link::connect(&req.to, identity, &pinned).await?;
            let text = serde_json::to_vec(&Request::Offer(Box::new(offer)))
                .map_err(|_| LinkError::BadRecord(0))?;
            link.send(&text).await?;
            for batch in &batches {
                link.send(batch).await?;
            }
            let reply = tokio::time::timeout(STEP_TIMEOUT, link.recv())
                .await
                .map_err(|_| LinkError::HandshakeTimeout(STEP_TIMEOUT))??;
            Ok::<_, LinkError>((link, reply))
        };
        let (link, reply) = tokio::select! {
            r = dialled => match r {
                Ok(ok) => ok,
                Err(e) => return kept(format!("{}: {}", req.to, error_chain(&e)), None),
            },
            () = cancel.notified() => return kept("cancelled".to_owned(), None),
        };
        let (target_vm, link_key) = match serde_json::from_slice::<Reply>(&reply) {
            Ok(Reply::Accepted { vm, link_key }) if is_vm_id(&vm) => (vm, link_key),
            Ok(Reply::Refused { reason }) => {
                let reason: String = reason.chars().take(300).collect();
                return kept(format!("{} refused the VM: {reason}", req.to), None);
            }
            _ => return kept(format!("{} answered the offer with nonsense", req.to), None),
        };
        let _ = events
            .send(MigrationEvent::Accepted {
                target_vm: target_vm.clone(),
            })
            .await;
        tracing::info!(vm = %vm.id, to = %req.to, target_vm, "migration accepted; copying");
        if let Some(event) = self.tell_device(vm, &target_vm, link_key.as_deref()).await {
            let _ = events.send(event).await;
        }

        // The copy: the VMM sends into our socket, which is relayed to the target.
        let socket = vm.vmm_dir.join(OUT_SOCKET);
        let listener = match bind_for(&socket, vm.jail_uid()) {
            Ok(l) => l,
            Err(e) => {
                return kept(
                    format!("listen on {}: {e}", socket.display()),
                    Some(target_vm),
                );
            }
        };
        let relay = tokio::spawn(relay_from(listener, link));
        let abort = relay.abort_handle();
        let to = |outcome| MigratedTo {
            host: req.to.clone(),
            vm: target_vm.clone(),
            outcome,
        };
        // From here the VMM may send the VM: a daemon that restarts before the outcome is
        // recorded asks the VMM ([`Daemon::settle_interrupted`]).
        vm.migration_begins(to(MigrationOutcome::Unknown));
        let mut forward = |round: vmm_control::MigrationRound| {
            let _ = events.try_send(MigrationEvent::Round {
                round: round.round,
                pages: round.pages,
                blocks: round.blocks,
                mb_per_s: round.mb_per_s,
                dirty: round.dirty,
                expected_downtime_ms: round.expected_downtime_ms,
            });
        };
        let asked = vmm_control::migrate(
            &vm.vmm_dir,
            vm.jail_uid(),
            OUT_SOCKET,
            req.downtime_ms,
            req.max_rounds,
            &mut forward,
        );
        // A cancel cuts the relay: a VMM that has not sent the state yet runs on, and says so.
        tokio::pin!(asked);
        let answered = tokio::select! {
            a = &mut asked => a,
            () = cancel.notified() => {
                tracing::info!(vm = %vm.id, "migration cancelled");
                abort.abort();
                asked.await
            }
        };
        abort.abort();
        let relayed = relay.await;
        let _ = std::fs::remove_file(&socket);
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        let relay_error = match relayed {
            Ok(Err(e)) => Some(error_chain(&e)),
            _ => None,
        };
        // The state went out and no answer came: the VM stays paused here, recorded as such.
        let unknown = |error: String| {
            tracing::error!(vm = %vm.id, to = %req.to, target_vm, %error,
                "migration outcome unknown: the VM stays paused here; ask the target host");
            vm.migration_unknown(to(MigrationOutcome::Unknown));
            MigrationEvent::Ended {
                outcome: MigrationOutcome::Unknown,
                target_vm: Some(target_vm.clone()),
                downtime_ms: None,
                total_ms,
                error: Some(error),
            }
        };
        match answered {
            Ok((end, paused)) => match end.outcome {
                MigrationOutcome::Moved => {
                    tracing::info!(vm = %vm.id, to = %req.to, target_vm, downtime_ms = end.downtime_ms,
                        total_ms, "VM migrated: it runs on the target");
                    self.send_token_delta(vm, req, pinned, identity, &target_vm, token_seq)
                        .await;
                    self.end_moved(vm, to(MigrationOutcome::Moved), Some(end.downtime_ms))
                        .await;
                    MigrationEvent::Ended {
                        outcome: MigrationOutcome::Moved,
                        target_vm: Some(target_vm),
                        downtime_ms: Some(end.downtime_ms),
                        total_ms,
                        error: None,
                    }
                }
                MigrationOutcome::Kept => {
                    vm.migration_kept(paused);
                    let mut error = end.error.unwrap_or_else(|| "the VMM kept the VM".into());
                    if let Some(relay) = relay_error {
                        error = format!("{error} (the link: {relay})");
                    }
                    tracing::warn!(vm = %vm.id, to = %req.to, %error, "migration failed; the VM stays here");
                    kept(error, Some(target_vm))
                }
                MigrationOutcome::Unknown => unknown(end.error.unwrap_or_default()),
            },
            Err(e) => {
                // The VMM did not say how it ended. If it runs on, the VM is here; if it is
                // paused or gone, it may be there.
                let error = format!("the VMM: {}", error_chain(&e));
                match outcome_by_state(vm).await {
                    MigrationOutcome::Kept => {
                        vm.migration_kept(false);
                        kept(error, Some(target_vm))
                    }
                    MigrationOutcome::Moved => {
                        tracing::info!(vm = %vm.id, to = %req.to, target_vm, %error,
                            "VM migrated (its VMM says so, without its answer): it runs on the target");
                        self.send_token_delta(vm, req, pinned, identity, &target_vm, token_seq)
                            .await;
                        self.end_moved(vm, to(MigrationOutcome::Moved), None).await;
                        MigrationEvent::Ended {
                            outcome: MigrationOutcome::Moved,
                            target_vm: Some(target_vm),
                            downtime_ms: None,
                            total_ms,
                            error: Some(error),
                        }
                    }
                    MigrationOutcome::Unknown => unknown(error),
                }
            }
        }
    }

    /// Sends the target the surrogates `vm`'s tokenizer issued since `seq` (during the copy),
    /// over a link of their own ([`Request::Tokens`]), so that the agent's newest surrogates
    /// are restored there too. Best effort, within [`STEP_TIMEOUT`]: a failure is logged (those
    /// surrogates then stay as they are on the target).
    async fn send_token_delta(
        &self,
        vm: &Vm,
        req: &MigrateVm,
        pinned: [u8; 32],
        identity: &Identity,
        target_vm: &str,
        seq: u64,
    ) {
        let Some(tokens) = vm.tokens() else {
            return;
        };
        let batches = crate::migration::token_batches(&tokens.carried_since(seq).0.issued);
        if batches.is_empty() {
            return;
        }
        let sent = tokio::time::timeout(STEP_TIMEOUT, async {
            let mut link = link::connect(&req.to, identity, &pinned).await?;
            let request = Request::Tokens {
                source_vm: vm.id.clone(),
                target_vm: target_vm.to_owned(),
                batches: u32::try_from(batches.len()).unwrap_or(u32::MAX),
            };
            let text = serde_json::to_vec(&request).map_err(|_| LinkError::BadRecord(0))?;
            link.send(&text).await?;
            for batch in &batches {
                link.send(batch).await?;
            }
            // The target answers once it has them all.
            link.recv().await.map(drop)
        })
        .await;
        match sent {
            Ok(Ok(())) => tracing::debug!(vm = %vm.id, batches = batches.len(),
                "surrogates issued during the copy sent to the target"),
            Ok(Err(e)) => tracing::warn!(vm = %vm.id, error = %error_chain(&e),
                "surrogates issued during the copy did not reach the target"),
            Err(_) => tracing::warn!(vm = %vm.id,
                "surrogates issued during the copy did not reach the target in time"),
        }
    }

    /// Ends this host's copy of `vm`, which now runs on another host (`to`): the audit record,
    /// then the record and the VMM ([`Vm::end_migrated`]).
    async fn end_moved(&self, vm: &Vm, to: MigratedTo, downtime_ms: Option<f64>) {
        self.audit_lifecycle(
            "vm_migrate_out",
            serde_json::json!({"vm": vm.id, "to": to.host, "target_vm": to.vm,
                "downtime_ms": downtime_ms}),
        )
        .await;
        vm.end_migrated(to, self.stop_grace).await;
    }

    /// Settles a migration out of `vm` (to `to`) that was under way when this daemon stopped,
    /// found on its restart with the VMM still running: the VMM's state says how it ended
    /// ([`outcome_by_state`]). Moved, this copy ends as `migrated`; running, the VM stays here;
    /// paused or silent, the outcome is recorded as unknown, for `migrate --resolve`.
    pub(super) async fn settle_interrupted(&self, vm: &Vm, to: MigratedTo) {
        let outcome = outcome_by_state(vm).await;
        tracing::warn!(vm = %vm.id, to = %to.host, target_vm = %to.vm, ?outcome,
            "a migration out was under way when the daemon stopped; its VMM tells how it ended");
        let to = MigratedTo { outcome, ..to };
        match outcome {
            MigrationOutcome::Moved => self.end_moved(vm, to, None).await,
            MigrationOutcome::Kept => vm.migration_kept(false),
            MigrationOutcome::Unknown => vm.migration_unknown(to),
        }
    }

    /// The target's side of one caller: the handshake, the offer, the VM made and its VMM
    /// started, the copy relayed, and the VM kept only if its VMM then runs it.
    async fn migrate_in(self: &Arc<Self>, stream: tokio::net::TcpStream, setup: &MigrationSetup) {
        let peer_addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut link = match link::respond(stream, &setup.identity, &setup.peers.keys()).await {
            Ok(l) => l,
            Err(e) => {
                self.note_refused_peer(&peer_addr, &error_chain(&e));
                return;
            }
        };
        let peer = hex::encode(link.peer());
        let request = match tokio::time::timeout(STEP_TIMEOUT, link.recv()).await {
            Ok(Ok(text)) => serde_json::from_slice::<Request>(&text)
                .map_err(|e| format!("the request does not parse: {e}")),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(_) => Err(format!("no request within {STEP_TIMEOUT:?}")),
        };
        let offer = match request {
            Ok(Request::Offer(offer)) => Ok(*offer),
            Ok(Request::Tokens {
                source_vm,
                target_vm,
                batches,
            }) => {
                self.take_token_delta(&mut link, &peer, &source_vm, &target_vm, batches)
                    .await;
                return;
            }
            Ok(Request::Ask {
                source_vm,
                target_vm,
            }) => {
                let state = self.copy_state(&peer, &source_vm, &target_vm);
                tracing::info!(
                    peer,
                    source_vm,
                    target_vm,
                    ?state,
                    "asked about a migrated VM"
                );
                let reply = serde_json::to_vec(&Reply::Copy { state }).unwrap_or_default();
                let _ = link.send(&reply).await;
                return;
            }
            Err(e) => Err(e),
        };
        let offer = offer.and_then(|offer| {
            crate::migration::check_offer(&offer)?;
            super::routes::validate(&offer.spec)?;
            Ok(offer)
        });
        let carried = match &offer {
            Ok(o) => read_carried(&mut link, o).await,
            Err(_) => Ok(None),
        };
        let made = offer.and_then(|offer| {
            let carried = carried?;
            self.make_incoming(&offer, &peer, carried)
                .map(|made| (made, offer))
        });
        let ((vm, child, listener), offer) = match made {
            Ok(made) => made,
            Err(reason) => {
                tracing::warn!(peer, %reason, "migration offer refused");
                let reply = serde_json::to_vec(&Reply::Refused { reason }).unwrap_or_default();
                let _ = link.send(&reply).await;
                return;
            }
        };
        let accepted = serde_json::to_vec(&Reply::Accepted {
            vm: vm.id.clone(),
            link_key: self.relay.as_ref().map(|r| hex::encode(r.public_key())),
        })
        .unwrap_or_default();
        // The relay runs beside the wait below, which needs nothing from it: whatever the
        // relay says, the VMM knows whether it restored the VM. It serves its control socket
        // once it has (its answer to the source already written), and exits when it has not.
        let relay = link
            .send(&accepted)
            .await
            .map(|()| tokio::spawn(relay_from(listener, link)));
        let ready = super::vm::wait_served(&vm, child, TARGET_READY_TIMEOUT).await;
        let _ = std::fs::remove_file(vm.dir.join(IN_SOCKET));
        let why = match ready {
            Ok(child) => {
                tokio::spawn(Arc::clone(&vm).watch_child(child));
                // Its copy runs here now: its address is answered for, and announced, here.
                self.publish(&vm, true);
                tracing::info!(vm = %vm.id, source_vm = %offer.source_vm, peer, "VM migrated in");
                self.audit_lifecycle(
                    "vm_migrate_in",
                    serde_json::json!({"vm": vm.id, "source_vm": offer.source_vm, "from": peer}),
                )
                .await;
                None
            }
            Err(status) => Some(self.discard_unserved(&vm, status).await),
        };
        // The relay ends when the source, having its VMM's answer, closes the link.
        let relayed = match relay {
            Err(e) => Err(error_chain(&e)),
            Ok(relay) => {
                let abort = relay.abort_handle();
                match tokio::time::timeout(STEP_TIMEOUT, relay).await {
                    Ok(Ok(relayed)) => relayed.map(drop).map_err(|e| error_chain(&e)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => {
                        abort.abort();
                        Err(format!(
                            "the link was still open {STEP_TIMEOUT:?} after the VMM's end of it"
                        ))
                    }
                }
            }
        };
        match (why, relayed) {
            (Some(why), relayed) => tracing::warn!(vm = %vm.id, peer, relay = ?relayed.err(),
                vmm = %why, "migration in failed; the VM is removed here"),
            (None, Err(e)) => {
                tracing::info!(vm = %vm.id, peer, relay = %e, "migration link ended")
            }
            _ => {}
        }
    }

    /// Where the VM `source_vm` of host `peer` is, if it came here as `target_vm`.
    fn copy_state(&self, peer: &str, source_vm: &str, target_vm: &str) -> CopyState {
        let Some(vm) = self.get(target_vm) else {
            return CopyState::None;
        };
        let came = vm
            .info()
            .migrated_from
            .is_some_and(|m| m.host == peer && m.vm == source_vm);
        match (came, vm.status().is_terminal()) {
            (false, _) => CopyState::None,
            (true, false) => CopyState::Running,
            (true, true) => CopyState::Ended,
        }
    }

    /// Settles a migration of VM `id` whose outcome is unknown by asking the target host: a
    /// copy there that runs or ran ends this one (`migrated`); none there lets this one run
    /// again. Answers the VM as it now is.
    pub async fn resolve_migration(&self, id: &str) -> Result<nanoclaw_api::VmInfo, MigrateError> {
        let vm = self
            .get(id)
            .ok_or_else(|| MigrateError::NoVm(id.to_owned()))?;
        let to = vm
            .info()
            .migrated_to
            .filter(|m| m.outcome == MigrationOutcome::Unknown && !vm.status().is_terminal())
            .ok_or_else(|| MigrateError::Conflict {
                id: id.to_owned(),
                why: "has no migration of unknown outcome".to_owned(),
            })?;
        let setup = self
            .migration
            .clone()
            .ok_or_else(|| MigrateError::Bad("live migration is off on this host".to_owned()))?;
        let pinned = setup.peers.key_of(&to.host).ok_or_else(|| {
            MigrateError::Bad(format!("{} is no longer a pinned migration peer", to.host))
        })?;
        let asked = async {
            let mut link = link::connect(&to.host, &setup.identity, &pinned).await?;
            let ask = Request::Ask {
                source_vm: id.to_owned(),
                target_vm: to.vm.clone(),
            };
            link.send(&serde_json::to_vec(&ask).map_err(|_| LinkError::BadRecord(0))?)
                .await?;
            tokio::time::timeout(STEP_TIMEOUT, link.recv())
                .await
                .map_err(|_| LinkError::HandshakeTimeout(STEP_TIMEOUT))?
        };
        let reply = asked
            .await
            .map_err(|e| MigrateError::Unreachable(format!("{}: {}", to.host, error_chain(&e))))?;
        match serde_json::from_slice::<Reply>(&reply) {
            Ok(Reply::Copy {
                state: state @ (CopyState::Running | CopyState::Ended),
            }) => {
                tracing::info!(vm = id, to = %to.host, target_vm = %to.vm, ?state,
                    "migration resolved: the VM moved");
                self.audit_lifecycle(
                    "vm_migrate_out",
                    serde_json::json!({"vm": id, "to": to.host, "target_vm": to.vm,
                        "resolved": true}),
                )
                .await;
                let moved = MigratedTo {
                    outcome: MigrationOutcome::Moved,
                    ..to
                };
                vm.end_migrated(moved, self.stop_grace).await;
            }
            Ok(Reply::Copy {
                state: CopyState::None,
            }) => {
                vm.set_paused(false).await.map_err(|e| {
                    MigrateError::Unreachable(format!("resume the VM here: {}", error_chain(&e)))
                })?;
                vm.clear_migration();
                tracing::info!(vm = id, to = %to.host, "migration resolved: no copy there; the VM runs here again");
            }
            _ => {
                return Err(MigrateError::Unreachable(format!(
                    "{} answered with nonsense",
                    to.host
                )));
            }
        }
        Ok(vm.info())
    }

    /// Makes the incoming VM's folder and record (with an image, its writable disk, blank),
    /// listens on its socket and starts its VMM.
    fn make_incoming(
        self: &Arc<Self>,
        offer: &Offer,
        peer: &str,
        carried: Option<CarriedTokens>,
    ) -> Result<(Arc<Vm>, tokio::process::Child, UnixListener), String> {
        // The image is looked up before anything is made: a refusal leaves nothing.
        let rootfs = offer
            .image
            .as_ref()
            .map(|image| self.rootfs_for(image).map(|rootfs| (image, rootfs)))
            .transpose()?;
        let (id, dir) = state::create_vm_dir(&self.vms_dir).map_err(|e| error_chain(&e))?;
        let image = match rootfs {
            None => None,
            Some((offered, rootfs)) => match blank_disk_for(offered, rootfs, &dir) {
                Ok(image) => Some(image),
                Err(why) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(why);
                }
            },
        };
        let socket = dir.join(IN_SOCKET);
        let listener = match bind_for(&socket, None) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("listen on {}: {e}", socket.display()));
            }
        };
        let mut record = VmRecord::new(id.clone(), offer.spec.clone(), state::now_unix_ms());
        // The VMM gets the disks as a created VM's: the image's read-only, then the writable.
        record.image = image;
        record.status = offer.status;
        record.boot_id = offer.boot_id.clone();
        record.agent_sent = offer.agent_sent;
        record.agent_pid = offer.agent_pid;
        record.migrate_in = Some(socket);
        record.net = offer.net;
        record.migrated_from = Some(MigratedTo {
            host: peer.to_owned(),
            vm: offer.source_vm.clone(),
            outcome: MigrationOutcome::Moved,
        });
        // The gateway, started with the VM, takes the agent's tokenizer from here.
        if let Some(carried) = carried {
            self.carry_tokens(&id, carried);
        }
        match self.start(id.clone(), dir.clone(), record, None) {
            Ok((vm, child)) => Ok((vm, child, listener)),
            Err(e) => {
                self.take_carried_tokens(&id);
                self.lock_vms().remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                Err(error_chain(&e))
            }
        }
    }

    /// The root disk of the offered image in this host's store, found by digest; or why the
    /// offer is refused.
    fn rootfs_for(&self, image: &OfferImage) -> Result<PathBuf, String> {
        let digest: nanoclaw_image::Digest = image
            .digest
            .parse()
            .map_err(|e| format!("the offered image {}: {}", image.name, error_chain(&e)))?;
        match self.images.rootfs_of(&digest) {
            Ok(Some(rootfs)) => Ok(rootfs),
            Ok(None) => Err(format!(
                "image {} ({digest}) is not on this host: import the same image here first",
                image.name
            )),
            Err(e) => Err(format!(
                "image {} ({digest}): {}",
                image.name,
                error_chain(&e)
            )),
        }
    }

    /// Takes the surrogates the source sent after the VM moved ([`Request::Tokens`]) into its
    /// copy here, when `peer` is the host it came from; answers once all are read.
    async fn take_token_delta(
        &self,
        link: &mut Link,
        peer: &str,
        source_vm: &str,
        target_vm: &str,
        batches: u32,
    ) {
        let tokens = self
            .get(target_vm)
            .filter(|vm| {
                vm.info()
                    .migrated_from
                    .is_some_and(|m| m.host == peer && m.vm == source_vm)
            })
            .and_then(|vm| vm.tokens());
        let Some(tokens) = tokens else {
            tracing::debug!(
                peer,
                source_vm,
                target_vm,
                "surrogates for no VM that came from there"
            );
            return;
        };
        match read_batches(link, batches).await {
            Ok(issued) => {
                tokens.adopt(&issued);
                tracing::info!(
                    vm = target_vm,
                    surrogates = issued.len(),
                    "surrogates issued on the source during the copy taken"
                );
                let _ = link.send(b"{}").await;
            }
            Err(why) => self.note_refused_peer(peer, &why),
        }
    }

    /// Keeps `carried` for the gateway of VM `id`, about to start.
    fn carry_tokens(&self, id: &str, carried: CarriedTokens) {
        self.carried_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), carried);
    }

    /// The tokenizer carried for VM `id`, once.
    pub(super) fn take_carried_tokens(&self, id: &str) -> Option<CarriedTokens> {
        self.carried_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Logs a caller turned away, within a budget: anyone who reaches the port can try.
    fn note_refused_peer(&self, peer_addr: &str, why: &str) {
        crate::egress::guest_log(&self.migration_log_budget, |suppressed| {
            tracing::warn!(
                peer = peer_addr,
                error = why,
                suppressed,
                "migration caller refused"
            );
        });
    }
}

/// Makes the incoming VM's writable disk in `dir` (its folder), as a sparse all-zero file of
/// the source's length for the VMM to fill, and what its record keeps of the image
/// (`rootfs`, this host's copy of it).
fn blank_disk_for(image: &OfferImage, rootfs: PathBuf, dir: &Path) -> Result<VmImage, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let scratch = dir.join(SCRATCH_DISK_FILE);
    // As `nanoclaw_image::create_scratch_disk` makes a created VM's, before its file system.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&scratch)
        .and_then(|file| file.set_len(image.disk_bytes))
        .map_err(|e| format!("make the writable disk {}: {e}", scratch.display()))?;
    Ok(VmImage {
        name: image.name.clone(),
        digest: image.digest.clone(),
        rootfs,
        scratch,
        user: image.user.clone(),
    })
}

/// How a migration out of `vm` ended, by its VMM's state, when the VMM's answer is lost (it
/// did not come, or this daemon restarted since): running, the VM is here (`kept`); `moved`,
/// the target runs it; paused, or a VMM that does not answer, it may run there (`unknown`).
/// Reads the `batches` messages of surrogates that follow an offer or a [`Request::Tokens`].
async fn read_batches(link: &mut Link, batches: u32) -> Result<Vec<IssuedToken>, String> {
    if batches > crate::migration::MAX_TOKEN_BATCHES {
        return Err(format!("{batches} batches of surrogates"));
    }
    let mut issued = Vec::new();
    for _ in 0..batches {
        let batch = match tokio::time::timeout(STEP_TIMEOUT, link.recv()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(error_chain(&e)),
            Err(_) => return Err(format!("no batch of surrogates within {STEP_TIMEOUT:?}")),
        };
        crate::migration::read_token_batch(&batch, &mut issued)?;
    }
    Ok(issued)
}

/// The agent's tokenizer that follows `offer` on `link`, if it tokenizes.
async fn read_carried(link: &mut Link, offer: &Offer) -> Result<Option<CarriedTokens>, String> {
    let Some(tokens) = &offer.tokens else {
        return Ok(None);
    };
    let key = tokens.key()?;
    let issued = read_batches(link, tokens.batches).await?;
    Ok(Some(CarriedTokens { key, issued }))
}

async fn outcome_by_state(vm: &Vm) -> MigrationOutcome {
    match vmm_control::state(&vm.vmm_dir, vm.jail_uid()).await {
        Ok(vmm_control::RunState::Running) => MigrationOutcome::Kept,
        Ok(vmm_control::RunState::Moved) => MigrationOutcome::Moved,
        Ok(vmm_control::RunState::Paused) | Err(_) => MigrationOutcome::Unknown,
    }
}

/// Listens on `path` (a stale socket there removed first), for the VMM of `uid` to connect.
fn bind_for(path: &Path, uid: Option<u32>) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = uid {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    }
    Ok(listener)
}

/// Takes the VMM's one connection on `listener` (within [`STEP_TIMEOUT`]) and relays it over
/// `link` until both ends have finished.
async fn relay_from(listener: UnixListener, link: Link) -> Result<link::Relayed, LinkError> {
    let (conn, _) = tokio::time::timeout(STEP_TIMEOUT, listener.accept())
        .await
        .map_err(|_| LinkError::HandshakeTimeout(STEP_TIMEOUT))?
        .map_err(|source| LinkError::Io {
            what: "accept the VMM's connection",
            source,
        })?;
    drop(listener);
    link.relay(conn).await
}

/// Accepts migration callers on `listener` for as long as the daemon runs, at most
/// [`MAX_INCOMING`] at once.
pub async fn serve_migrations(daemon: Arc<Daemon>, listener: TcpListener) {
    let Some(setup) = daemon.migration.clone() else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INCOMING));
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "migration listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            daemon.note_refused_peer(&addr.to_string(), "too many migrations at once");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (daemon, setup) = (Arc::clone(&daemon), Arc::clone(&setup));
        tokio::spawn(async move {
            daemon.migrate_in(stream, &setup).await;
            drop(slot);
        });
    }
}

/// Whether `id` looks like a VM id this daemon makes (eight lowercase hex digits): a peer's
/// answer is shown to the user and kept in the record.
fn is_vm_id(id: &str) -> bool {
    id.len() == 8 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
