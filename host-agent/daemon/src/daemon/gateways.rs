//! The daemon's use of the MCP gateway: one [`Gateway`] per VM whose create request carries a
//! profile, listening on the VM's `vsock.sock_<MCP_PORT>` from before the VMM starts until the
//! VM ends, and the [`Spawner`] that creates orchestrators' agents through the daemon.
//!
//! It lives with the daemon, not in `mcp`, so that the gateway knows nothing of the daemon:
//! the daemon uses `mcp`, never the reverse.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};

use shared_proto::message::McpSummary;
use tokio::sync::watch;

use super::Daemon;
use crate::agent_tokens::{AgentTokens, CarriedTokens};
use crate::approval::Approver;
use crate::mcp::{Gateway, GatewayConfig, McpError, SpawnError, Spawner};
use crate::policy::{AccessPolicy, Profile};
use nanoclaw_api::CreateVm;
use nanoclaw_audit::AuditLog;

/// The TCP port of the agent's local MCP endpoint on 127.0.0.1 in the guest.
pub const MCP_LOCAL_PORT: u16 = 8931;

/// Starts gateways for the daemon's VMs; they share the daemon's audit log and approver.
#[derive(Debug)]
pub struct VmGateways {
    audit: Arc<AuditLog>,
    approver: Arc<dyn Approver>,
    spawner: OnceLock<Arc<dyn Spawner>>,
}

impl VmGateways {
    /// Gateways that record in the daemon's `audit` log and ask `approver` for approvals.
    pub fn new(audit: Arc<AuditLog>, approver: Arc<dyn Approver>) -> Self {
        Self {
            audit,
            approver,
            spawner: OnceLock::new(),
        }
    }

    /// Sets who creates agents for orchestrators' `spawn_agent` (the daemon, once it exists).
    pub fn set_spawner(&self, spawner: Arc<dyn Spawner>) {
        let _ = self.spawner.set(spawner);
    }

    /// The summary the sidecar gets for a profile's TOML text (`None` without a profile, or
    /// for a profile that does not compile: such a VM is refused at create).
    pub fn summary(profile: Option<&str>) -> Option<McpSummary> {
        let policy = AccessPolicy::from_toml(profile?).ok()?;
        Some(McpSummary {
            tools: policy.visible_tools(),
            local_port: MCP_LOCAL_PORT,
        })
    }

    /// Binds the VM's MCP listener now and serves it (after connecting the upstreams) until
    /// `ended` turns true; then closes the upstreams. Answers the agent's tokenizer (`None`
    /// when the profile turns it off), which the daemon also gives the credential relay: a
    /// fresh one, or the one `carried` from the agent's previous host (live migration).
    pub fn start(
        &self,
        vm_id: &str,
        vm_dir: &Path,
        vmm_uid: Option<u32>,
        profile: &str,
        mut ended: watch::Receiver<bool>,
        carried: Option<&CarriedTokens>,
    ) -> Result<Option<Arc<AgentTokens>>, McpError> {
        let policy = Arc::new(AccessPolicy::from_toml(profile).map_err(McpError::Profile)?);
        let tokens = AgentTokens::for_profile_carrying(policy.profile(), carried)
            .map_err(McpError::Tokenizer)?
            .map(Arc::new);
        let audit = Arc::clone(&self.audit);
        let listener = Gateway::bind(vm_dir, vmm_uid)?;
        let config = GatewayConfig {
            agent: format!("{}@{vm_id}", policy.profile().name),
            vm_id: vm_id.to_owned(),
            policy,
            audit,
            approver: Arc::clone(&self.approver),
            spawner: self.spawner.get().cloned(),
            tokens: tokens.clone(),
        };
        let vm = vm_id.to_owned();
        tokio::spawn(async move {
            let gateway = match Gateway::connect(config).await {
                Ok(g) => Arc::new(g),
                Err(e) => {
                    tracing::error!(vm = %vm, error = %crate::error_chain(&e), "mcp gateway");
                    return;
                }
            };
            tracing::info!(vm = %vm, tools = gateway.tools().len(), "mcp gateway up");
            tokio::select! {
                () = Arc::clone(&gateway).serve(listener) => {}
                () = super::vm::wait_ended(&mut ended) => {}
            }
            if let Ok(g) = Arc::try_unwrap(gateway) {
                g.close().await;
            }
        });
        Ok(tokens)
    }
}

/// Spawns agents through the daemon's own create path: the child's profile (already checked to
/// be within the caller's rights, or approved) becomes the new VM's `profile`, validated like
/// any create request. Each call is paced per parent ([`Daemon::pace_spawn`], asked by the
/// gateway before anything else) and the new VM is the parent's child
/// ([`Daemon::create_child`]: within `--max-children` and `--max-vms`, stopped with its
/// parent).
#[derive(Debug)]
pub struct DaemonSpawner(Weak<Daemon>);

impl DaemonSpawner {
    /// A spawner for `daemon` (held weakly: the daemon owns the gateways).
    pub fn new(daemon: &Arc<Daemon>) -> Self {
        Self(Arc::downgrade(daemon))
    }
}

impl Spawner for DaemonSpawner {
    fn pace(&self, parent_vm: &str) -> Result<(), SpawnError> {
        let daemon = self
            .0
            .upgrade()
            .ok_or_else(|| SpawnError::Failed("the daemon is stopping".into()))?;
        daemon
            .pace_spawn(parent_vm, std::time::Instant::now())
            .map_err(|wait| SpawnError::RateLimited {
                retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            })
    }

    fn spawn(
        &self,
        parent_vm: String,
        profile: Profile,
        command: Vec<String>,
    ) -> Pin<Box<dyn Future<Output = Result<String, SpawnError>> + Send + '_>> {
        Box::pin(async move {
            let daemon = self
                .0
                .upgrade()
                .ok_or_else(|| SpawnError::Failed("the daemon is stopping".into()))?;
            let text = toml::to_string(&profile)
                .map_err(|e| SpawnError::Failed(format!("profile: {e}")))?;
            let mut argv = command.into_iter();
            let mut spec = CreateVm::new(argv.next().unwrap_or_default(), argv.collect());
            spec.profile = Some(text);
            super::routes::validate(&spec).map_err(SpawnError::Failed)?;
            let vm = daemon.create_child(spec, &parent_vm).map_err(|e| match e {
                super::DaemonError::Limit(limit) => spawn_refusal(limit),
                e => SpawnError::Failed(crate::error_chain(&e)),
            })?;
            tracing::info!(parent = %parent_vm, vm = %vm.id, "spawned an agent");
            Ok(vm.id.clone())
        })
    }
}

/// The gateway's name for a refusal by the daemon's limits.
fn spawn_refusal(limit: super::LimitError) -> SpawnError {
    match limit {
        super::LimitError::TooManyVms { limit } => SpawnError::TooManyVms { limit },
        super::LimitError::TooManyChildren { parent, limit } => {
            SpawnError::TooManyChildren { parent, limit }
        }
        super::LimitError::ParentEnding(parent) => SpawnError::ParentEnding(parent),
    }
}
