//! The MCP gateway: the host's authoritative check of every tool call an agent makes.
//!
//! One [`Gateway`] per agent. It connects to the upstream MCP servers the agent's profile names
//! (rmcp clients, see `upstream`) and serves the agent one MCP endpoint: newline-delimited
//! JSON-RPC on the hybrid-vsock listener `<vm-dir>/vsock.sock_<MCP_PORT>`, which the sidecar
//! forwards the agent's local endpoint to. The guest is hostile, so the gateway re-checks every
//! call whatever the sidecar did; a guest that skips the sidecar gets the same answers.
//!
//! For each `tools/call`:
//! 1. arguments are restored (the agent's surrogates become the real values, profile mode
//!    `enforce`), for a tool the profile marks `restore = true` only: any other gets the
//!    surrogates, so an agent cannot send a real value wherever it likes;
//! 2. the profile decides ([`AccessPolicy::decide`]); the decision is appended to the audit log
//!    (kind `policy_decision`: decision, rule, agent, tool, the digest of the canonical
//!    arguments as the agent sent them, never a value) and the call waits until it is on disk
//!    (awaiting the log's writer thread, which syncs concurrent calls' records together; the
//!    runtime is never blocked). The same denial repeated within a short window is counted
//!    into one `denial_summary` record instead (`denials`);
//! 3. a needs-approval decision goes to the [`Approver`] and proceeds only on `Approved`;
//! 4. a denial is a JSON-RPC error ([`DENIED`]) naming the rule;
//! 5. an allowed call goes upstream and its result is tokenized before it reaches the agent
//!    (`monitor` records the kind and count of what would have been, kind `tokenize`).
//!
//! Orchestrators also get the host-served tool `spawn_agent`: a spawn whose profile is within
//! the caller's own ([`AccessPolicy::spawn_excess`]) goes to the [`Spawner`]; anything beyond it
//! goes to the [`Approver`] first. The spawner may still refuse by the host's limits (children
//! per VM, VMs per host, spawn rate, see [`SpawnError`]): the refusal is recorded as a `deny`
//! decision with a `spawn:limit:*` rule and reaches the agent as a [`DENIED`] error.
//!
//! # Why the agent side is not rmcp's server
//! The upstream side uses rmcp's client. The agent side is a small JSON-RPC loop of our own
//! (`endpoint`) because it faces a hostile peer and must answer every malformed frame, batch,
//! replayed request id, oversized message and unserved method with a typed JSON-RPC error and
//! go on serving, with limits we set; rmcp's server has no hooks for those answers. It serves
//! only `initialize`, `ping`, `tools/list` and `tools/call` (protocol revisions up to
//! 2025-11-25, the initialize handshake).
//!
//! # Layout
//! - `upstream`: rmcp clients of the upstream servers (stdio child processes, streamable HTTP).
//! - `endpoint`: the agent-facing JSON-RPC session and its socket loop.
//! - `denials`: the windows that summarise one VM's repeated denials.
//! - [`AgentTokens`] (`crate::agent_tokens`): the agent's tokenizer, shared with the credential
//!   relay; re-exported here.
//! - How the daemon starts one gateway per VM is the daemon's own (`crate::daemon::gateways`):
//!   nothing here reaches into the daemon.
//! - this file: the error, the gateway and the call path.

mod denials;
mod endpoint;
mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use rmcp::model::Tool;
use serde_json::{Map, Value, json};

use crate::approval::{ApprovalAction, ApprovalSubject, Approver};
use crate::policy::{AccessPolicy, Decision, Profile, SPAWN_AGENT_TOOL, Tier};
use nanoclaw_audit::{self as audit, AuditLog};
use nanoclaw_tokenize::{Mode, Report, Tokenizer};

pub use crate::agent_tokens::AgentTokens;
pub use endpoint::{MAX_ARGUMENT_BYTES, MAX_ID_BYTES, MAX_MESSAGE_BYTES, MAX_REQUEST_IDS, Session};

/// The most MCP sessions (connections) one agent may hold open at once.
pub const MAX_SESSIONS: usize = 64;

/// JSON-RPC error code of a call the profile denied (or whose approval was refused).
pub const DENIED: i64 = -32003;
/// JSON-RPC error code of an upstream that failed.
pub const UPSTREAM_FAILED: i64 = -32004;

/// Errors of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// Starting an upstream's child process failed.
    #[error("upstream `{server}`: cannot start its command")]
    Spawn {
        /// The server's name in the profile.
        server: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An upstream failed (handshake, listing, connection).
    #[error("upstream `{server}`: {what}")]
    Upstream {
        /// The server's name in the profile.
        server: String,
        /// What failed (rmcp's error, in words).
        what: String,
    },
    /// Binding the per-VM listener failed.
    #[error("MCP listener {}", .path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM's profile does not load.
    #[error("profile")]
    Profile(#[source] crate::policy::PolicyError),
    /// Creating the agent's tokenizer failed.
    #[error("tokenizer")]
    Tokenizer(#[source] nanoclaw_tokenize::TokenizeError),
    /// Appending to the audit log failed: the call does not run unrecorded.
    #[error("audit")]
    Audit(#[source] nanoclaw_audit::AuditError),
}

/// Why a [`Spawner`] did not spawn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    /// The caller already has as many live children as one VM may have.
    #[error("VM {parent} already has {limit} live spawned agents, the most one VM may have")]
    TooManyChildren {
        /// The calling VM.
        parent: String,
        /// The cap.
        limit: usize,
    },
    /// The host already runs as many VMs as it may.
    #[error("the host already runs {limit} VMs, the most it may")]
    TooManyVms {
        /// The cap.
        limit: usize,
    },
    /// The caller spawns faster than its rate allows.
    #[error("spawning too fast: the next spawn is allowed in {retry_after_ms} ms")]
    RateLimited {
        /// How long until the next spawn is allowed.
        retry_after_ms: u64,
    },
    /// The calling VM is ending: nothing it spawns now would be stopped with it.
    #[error("VM {0} is ending")]
    ParentEnding(String),
    /// Creating the VM failed.
    #[error("{0}")]
    Failed(String),
}

impl SpawnError {
    /// The audit rule of a refusal by a limit (`None` for a failure).
    pub fn limit_rule(&self) -> Option<&'static str> {
        match self {
            Self::TooManyChildren { .. } => Some("spawn:limit:children-per-vm"),
            Self::TooManyVms { .. } => Some("spawn:limit:vms-per-host"),
            Self::RateLimited { .. } => Some("spawn:limit:rate"),
            Self::ParentEnding(_) => Some("spawn:parent-ending"),
            Self::Failed(_) => None,
        }
    }
}

/// Spawns an agent for an orchestrator's `spawn_agent` (the daemon's create path), within the
/// host's limits on spawning.
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Takes one of `parent_vm`'s spawns ([`SpawnError::RateLimited`] when it has none left).
    /// The gateway asks first, before any approval, so that calls that would ask the user are
    /// paced too.
    fn pace(&self, parent_vm: &str) -> Result<(), SpawnError>;

    /// Creates and starts a VM running `command` under `profile` as a child of `parent_vm`;
    /// returns the new VM's id.
    fn spawn(
        &self,
        parent_vm: String,
        profile: Profile,
        command: Vec<String>,
    ) -> Pin<Box<dyn Future<Output = Result<String, SpawnError>> + Send + '_>>;
}

/// Who the gateway serves, and with what.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The agent's name (the Cedar principal, in every record).
    pub agent: String,
    /// The VM it runs in.
    pub vm_id: String,
    /// Its compiled profile.
    pub policy: Arc<AccessPolicy>,
    /// Where decisions go.
    pub audit: Arc<AuditLog>,
    /// Who answers needs-approval decisions ([`crate::approval::DenyAll`] by default).
    pub approver: Arc<dyn Approver>,
    /// Who creates agents for `spawn_agent` (`None`: spawning is unavailable).
    pub spawner: Option<Arc<dyn Spawner>>,
    /// The agent's tokenizer when the daemon shares it with the credential relay (`None`: the
    /// gateway makes its own from the profile).
    pub tokens: Option<Arc<AgentTokens>>,
}

/// The gateway of one agent.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    /// Upstreams by server name.
    upstreams: BTreeMap<String, upstream::Upstream>,
    /// The tools the agent sees, as the upstreams define them (and `spawn_agent`), in order.
    tools: Vec<Tool>,
    /// The agent's tokenizer (its random key is held only on the host and, for the credential
    /// path, on the user's device), or `None` when off.
    tokenizer: Option<Arc<AgentTokens>>,
    /// The tokenizer's mode.
    mode: Option<Mode>,
    /// The windows in which repeats of a denial are counted rather than recorded one by one.
    denials: denials::Denials,
}

impl Gateway {
    /// Connects to every upstream the profile names and lists their tools, keeping those the
    /// profile lets the agent see. A tool the profile lists but its server does not is left
    /// out (and logged).
    pub async fn connect(config: GatewayConfig) -> Result<Self, McpError> {
        let profile = config.policy.profile();
        let mut upstreams = BTreeMap::new();
        let mut tools = Vec::new();
        for (name, spec) in &profile.servers {
            let up = upstream::Upstream::connect(name, spec).await?;
            for tool in up.list_tools().await? {
                let listed = profile
                    .tool(&tool.name)
                    .is_some_and(|rule| rule.server == *name);
                if listed {
                    tools.push(tool);
                }
            }
            upstreams.insert(name.clone(), up);
        }
        for rule in &profile.tools {
            if !tools.iter().any(|t| t.name == rule.name) {
                tracing::warn!(server = %rule.server, tool = %rule.name,
                    "mcp: the profile lists a tool its server does not offer");
            }
        }
        if profile.tier == Tier::Orchestrator {
            tools.push(spawn_agent_tool());
        }
        let tokenizer = match &config.tokens {
            Some(t) => Some(Arc::clone(t)),
            None => AgentTokens::for_profile(profile)
                .map_err(McpError::Tokenizer)?
                .map(Arc::new),
        };
        let mode = tokenizer.as_ref().map(|t| t.mode());
        let denials = denials::Denials::new(
            Arc::clone(&config.audit),
            &config.agent,
            &config.vm_id,
            &profile.name,
        );
        Ok(Self {
            config,
            upstreams,
            tools,
            tokenizer,
            mode,
            denials,
        })
    }

    /// The tools the agent sees.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Binds the agent's endpoint at `<vm_dir>/vsock.sock_<MCP_PORT>` (replacing a stale
    /// socket file).
    /// A jailed VMM's uid `owner` is given the socket so that it may connect.
    pub fn bind(vm_dir: &Path, owner: Option<u32>) -> Result<tokio::net::UnixListener, McpError> {
        let path = shared_proto::ports::host_listener_path(vm_dir, shared_proto::ports::MCP_PORT);
        let _ = std::fs::remove_file(&path);
        let listener =
            tokio::net::UnixListener::bind(&path).map_err(|source| McpError::Listen {
                path: path.clone(),
                source,
            })?;
        crate::daemon::jail::open_to_vmm(&path, owner)
            .map_err(|source| McpError::Listen { path, source })?;
        Ok(listener)
    }

    /// Serves every connection on `listener` until the task is dropped, at most
    /// [`MAX_SESSIONS`] at once (a guest cannot exhaust the host with connections; one over the
    /// limit is closed at once).
    pub async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
        let mut backoff = crate::relay::AcceptBackoff::new("mcp");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff.ok();
                    let Ok(permit) = Arc::clone(&sessions).try_acquire_owned() else {
                        tracing::debug!("mcp: session limit reached; closing a connection");
                        drop(stream);
                        continue;
                    };
                    let gw = Arc::clone(&self);
                    tokio::spawn(async move {
                        gw.serve_connection(stream).await;
                        drop(permit);
                    });
                }
                Err(e) => backoff.failed(&e).await,
            }
        }
    }

    /// Serves one connection (one MCP session) until the peer closes it or breaks framing.
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        endpoint::serve(self, stream).await
    }

    /// Closes every upstream.
    pub async fn close(self) {
        for (_, up) in self.upstreams {
            up.close().await;
        }
    }

    /// Answers one `tools/call`: `Ok(result)` or `Err((code, message, data))`.
    async fn call(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, (i64, String, Value)> {
        let digest = args_digest(&args);
        for summary in self.denials.take_expired(Instant::now()) {
            self.record(denials::SUMMARY_KIND, summary).await?;
        }
        if name == SPAWN_AGENT_TOOL && self.config.policy.profile().tier == Tier::Orchestrator {
            return self.spawn_agent(args, &digest).await;
        }
        let restores = self
            .config
            .policy
            .profile()
            .tool(name)
            .is_some_and(|t| t.restore);
        // The arguments as the agent sent them are needed only for their digest (taken above):
        // the call goes on with the restored ones, or with these, moved rather than copied.
        let real = match self.mode {
            Some(Mode::Enforce) if restores => {
                let value = Value::Object(args);
                let (restored, report) = self.with_tokenizer(|t| t.detokenize_json(&value))?;
                self.record_tokenize(name, "arguments", report).await?;
                match (restored, value) {
                    (Value::Object(m), _) | (_, Value::Object(m)) => m,
                    _ => Map::new(),
                }
            }
            _ => args,
        };
        let policy = &self.config.policy;
        let decision = policy
            .decide(&self.config.agent, name, &real, false)
            .map_err(|e| internal(format!("policy: {}", crate::error_chain(&e))))?;
        // A plain deny repeated within its window is counted, not recorded again (see
        // `denials`); every other decision is on disk before anything else happens.
        let counted = matches!(&decision, Decision::Deny { rule, .. }
            if self.denials.note(name, rule, Instant::now()) == denials::Note::Counted);
        if !counted {
            self.record_decision(name, &decision, &digest).await?;
        }
        match decision {
            Decision::Allow { .. } => {}
            Decision::Deny { rule, reason } => return Err(denied(&rule, &reason)),
            Decision::NeedsApproval { rule, reason } => {
                let server = policy
                    .profile()
                    .tool(name)
                    .map(|t| t.server.clone())
                    .unwrap_or_default();
                let subject = self.subject(
                    ApprovalAction::ToolCall {
                        server,
                        tool: name.into(),
                    },
                    Value::Object(real.clone()),
                    &rule,
                    &reason,
                );
                self.ask_approval(subject, name, &rule, &digest).await?;
                let again = policy
                    .decide(&self.config.agent, name, &real, true)
                    .map_err(|e| internal(format!("policy: {}", crate::error_chain(&e))))?;
                self.record_decision(name, &again, &digest).await?;
                if let Decision::Deny { rule, reason } | Decision::NeedsApproval { rule, reason } =
                    again
                {
                    return Err(denied(&rule, &reason));
                }
            }
        }
        let server = policy
            .profile()
            .tool(name)
            .map(|t| t.server.as_str())
            .unwrap_or("");
        let Some(up) = self.upstreams.get(server) else {
            return Err(internal(format!("no upstream `{server}`")));
        };
        let answer = up.call_tool(name, real).await.map_err(|e| {
            (
                UPSTREAM_FAILED,
                crate::error_chain(&e),
                json!({"server": server}),
            )
        })?;
        match answer {
            Ok(result) => {
                let value = serde_json::to_value(&result)
                    .map_err(|e| internal(format!("encoding the result: {e}")))?;
                self.tokenize_out(name, value).await
            }
            Err(e) => {
                let message = self
                    .tokenize_out(name, Value::String(e.message.to_string()))
                    .await?;
                Err((
                    i64::from(e.code.0),
                    message.as_str().unwrap_or("upstream error").to_owned(),
                    json!({"server": server}),
                ))
            }
        }
    }

    /// The host-served `spawn_agent`.
    async fn spawn_agent(
        &self,
        args: Map<String, Value>,
        digest: &str,
    ) -> Result<Value, (i64, String, Value)> {
        let bad = |m: String| (endpoint::INVALID_PARAMS, m, Value::Null);
        let Some(Value::String(text)) = args.get("profile") else {
            return Err(bad("spawn_agent: `profile` (TOML text) is required".into()));
        };
        let command: Vec<String> = match args.get("command") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("spawn_agent: `command` must be strings".into()))?,
            _ => return Err(bad("spawn_agent: `command` (a list) is required".into())),
        };
        let child = Profile::from_toml(text)
            .map_err(|e| bad(format!("spawn_agent: {}", crate::error_chain(&e))))?;
        if let Some(spawner) = self.config.spawner.as_ref()
            && let Err(e) = spawner.pace(&self.config.vm_id)
        {
            return Err(self.refuse_spawn(e, digest).await?);
        }
        let excess = self.config.policy.spawn_excess(&child);
        let decision = if excess.is_empty() {
            Decision::Allow {
                rule: "spawn:within-own-rights".into(),
            }
        } else {
            Decision::NeedsApproval {
                rule: "spawn:beyond-own-rights".into(),
                reason: excess.join("; "),
            }
        };
        self.record_decision(SPAWN_AGENT_TOOL, &decision, digest)
            .await?;
        if let Decision::NeedsApproval { rule, reason } = &decision {
            let subject = self.subject(
                ApprovalAction::Spawn {
                    profile: child.name.clone(),
                },
                Value::Object(args.clone()),
                rule,
                reason,
            );
            self.ask_approval(subject, SPAWN_AGENT_TOOL, rule, digest)
                .await?;
        }
        let Some(spawner) = self.config.spawner.as_ref() else {
            return Err(internal("spawning is not available on this host".into()));
        };
        let vm = match spawner
            .spawn(self.config.vm_id.clone(), child, command)
            .await
        {
            Ok(vm) => vm,
            Err(e) => return Err(self.refuse_spawn(e, digest).await?),
        };
        self.record(
            "spawn",
            json!({"agent": self.config.agent, "vm_id": self.config.vm_id,
            "spawned_vm": vm}),
        )
        .await?;
        Ok(json!({
            "content": [{"type": "text", "text": format!("spawned agent in VM {vm}")}],
            "isError": false,
        }))
    }

    /// The error for a spawn the spawner refused. A refusal by a limit is a decision like the
    /// others: recorded as a denial, and a [`DENIED`] error to the agent.
    async fn refuse_spawn(
        &self,
        e: SpawnError,
        digest: &str,
    ) -> Result<(i64, String, Value), (i64, String, Value)> {
        let Some(rule) = e.limit_rule() else {
            return Ok(internal(format!("spawn_agent: {e}")));
        };
        let refused = Decision::Deny {
            rule: rule.into(),
            reason: e.to_string(),
        };
        self.record_decision(SPAWN_AGENT_TOOL, &refused, digest)
            .await?;
        Ok(denied(rule, &e.to_string()))
    }

    fn subject(
        &self,
        action: ApprovalAction,
        arguments: Value,
        rule: &str,
        reason: &str,
    ) -> ApprovalSubject {
        ApprovalSubject {
            agent: self.config.agent.clone(),
            vm_id: self.config.vm_id.clone(),
            profile: self.config.policy.profile().name.clone(),
            action,
            arguments,
            rule: rule.into(),
            reason: reason.into(),
        }
    }

    /// Asks the approver; `Ok` only on `Approved`. The outcome is recorded.
    async fn ask_approval(
        &self,
        subject: ApprovalSubject,
        tool: &str,
        rule: &str,
        digest: &str,
    ) -> Result<(), (i64, String, Value)> {
        let asked_because = subject.reason.clone();
        let outcome = self.config.approver.request(subject).await;
        self.record(
            "approval_outcome",
            json!({"agent": self.config.agent, "vm_id": self.config.vm_id, "tool": tool,
                "rule": rule, "args_digest": digest, "outcome": outcome}),
        )
        .await?;
        match outcome {
            crate::approval::ApprovalOutcome::Approved { .. } => Ok(()),
            crate::approval::ApprovalOutcome::Denied { reason } => Err(denied(
                rule,
                &format!("{reason} (approval was asked because: {asked_because})"),
            )),
            crate::approval::ApprovalOutcome::Expired => Err(denied(
                rule,
                "requires approval: no answer before the request expired",
            )),
        }
    }

    /// Tokenizes a value going to the agent (enforce) or records what would have been (monitor).
    async fn tokenize_out(&self, tool: &str, value: Value) -> Result<Value, (i64, String, Value)> {
        if self.tokenizer.is_none() {
            return Ok(value);
        }
        let (out, report) = self.with_tokenizer(|t| t.tokenize_json(&value))?;
        self.record_tokenize(tool, "result", report).await?;
        Ok(out)
    }

    fn with_tokenizer<T>(
        &self,
        f: impl FnOnce(&mut Tokenizer) -> Result<T, nanoclaw_tokenize::TokenizeError>,
    ) -> Result<T, (i64, String, Value)> {
        let Some(t) = self.tokenizer.as_ref() else {
            return Err(internal("no tokenizer".into()));
        };
        let mut t = t.lock();
        f(&mut t).map_err(|e| internal(format!("tokenize: {}", crate::error_chain(&e))))
    }

    async fn record_tokenize(
        &self,
        tool: &str,
        direction: &str,
        report: Report,
    ) -> Result<(), (i64, String, Value)> {
        if report.total() == 0 && report.skipped == 0 {
            return Ok(());
        }
        let mode = self.mode;
        self.record(
            "tokenize",
            json!({"agent": self.config.agent, "vm_id": self.config.vm_id, "tool": tool,
                "direction": direction, "mode": mode, "counts": report}),
        )
        .await
    }

    async fn record_decision(
        &self,
        tool: &str,
        decision: &Decision,
        digest: &str,
    ) -> Result<(), (i64, String, Value)> {
        crate::metrics::gateway_decision(decision.kind(), tool == SPAWN_AGENT_TOOL);
        self.record(
            "policy_decision",
            json!({
                "decision": decision.kind(),
                "rule": decision.rule(),
                "agent": self.config.agent,
                "vm_id": self.config.vm_id,
                "profile": self.config.policy.profile().name,
                "tool": tool,
                "args_digest": digest,
            }),
        )
        .await
    }

    /// Appends a record and waits (without blocking the runtime) until it is on disk: the
    /// audit log's writer thread syncs concurrent calls' records together.
    async fn record(&self, kind: &str, data: Value) -> Result<(), (i64, String, Value)> {
        self.config
            .audit
            .submit(kind, data)
            .await
            .map(|_| ())
            .map_err(|e| internal(format!("audit log: {}", crate::error_chain(&e))))
    }
}

/// The digest of arguments as canonical JSON ([`shared_proto::canonical_json`]: object keys
/// sorted at every level, no spaces), so the agent's key order does not change it.
pub fn args_digest(args: &Map<String, Value>) -> String {
    let text = shared_proto::canonical_json(&Value::Object(args.clone()));
    audit::digest(text.as_bytes())
}

fn denied(rule: &str, reason: &str) -> (i64, String, Value) {
    (
        DENIED,
        format!("denied by rule `{rule}`: {reason}"),
        json!({"rule": rule}),
    )
}

fn internal(message: String) -> (i64, String, Value) {
    (endpoint::INTERNAL_ERROR, message, Value::Null)
}

fn spawn_agent_tool() -> Tool {
    let schema = json!({
        "type": "object",
        "properties": {
            "profile": {"type": "string", "description": "the new agent's profile, as TOML"},
            "command": {"type": "array", "items": {"type": "string"},
                "description": "the command the new agent runs"},
        },
        "required": ["profile", "command"],
    });
    let schema = match schema {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let mut tool = Tool::new(
        SPAWN_AGENT_TOOL,
        "Spawn a worker agent in its own microVM, with a profile no more privileged than yours.",
        Arc::new(schema),
    );
    tool.title = Some("Spawn agent".into());
    tool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_digest_ignores_key_order() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "s"}}"#)
                .unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"a": {"x": "s", "y": [1, {"p": 3, "q": 2}]}, "b": 1}"#)
                .unwrap();
        assert_eq!(args_digest(&a), args_digest(&b));
        let c: Map<String, Value> = serde_json::from_str(r#"{"a": 1}"#).unwrap();
        assert_ne!(args_digest(&a), args_digest(&c));
        assert_eq!(args_digest(&c), audit::digest(br#"{"a":1}"#));
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn gateway(dir: &std::path::Path) -> Arc<Gateway> {
        let policy = AccessPolicy::from_toml("name = \"t\"\ntier = \"worker\"\n").unwrap();
        let config = GatewayConfig {
            agent: "t@vm".into(),
            vm_id: "vm".into(),
            policy: Arc::new(policy),
            audit: Arc::new(AuditLog::open(dir.join("audit.ndjson")).unwrap()),
            approver: Arc::new(crate::approval::DenyAll),
            spawner: None,
            tokens: None,
        };
        Arc::new(Gateway::connect(config).await.unwrap())
    }

    /// Review finding H4: a session that says nothing is closed after the idle timeout.
    #[tokio::test(start_paused = true)]
    async fn a_silent_session_is_closed_after_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path()).await;
        let (ours, theirs) = tokio::io::duplex(4096);
        let served = tokio::spawn(async move { gw.serve_connection(theirs).await });
        let start = tokio::time::Instant::now();
        tokio::time::timeout(endpoint::IDLE_TIMEOUT * 2, served)
            .await
            .expect("the silent session is closed")
            .unwrap();
        assert!(start.elapsed() >= endpoint::IDLE_TIMEOUT);
        drop(ours);
    }

    /// Review finding L6: an agent that sends requests but never reads the answers does not
    /// hold the session's task: the blocked reply times out and the session ends.
    #[tokio::test(start_paused = true)]
    async fn an_agent_that_never_reads_its_answers_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path()).await;
        let (mut ours, theirs) = tokio::io::duplex(1024);
        let served = tokio::spawn(async move { gw.serve_connection(theirs).await });
        // Each line is answered with a parse error longer than the line; the small pipe fills.
        let writer = tokio::spawn(async move {
            for _ in 0..10_000 {
                if ours.write_all(b"x\n").await.is_err() {
                    break;
                }
            }
            ours
        });
        let start = tokio::time::Instant::now();
        tokio::time::timeout(endpoint::IDLE_TIMEOUT, served)
            .await
            .expect("the session is cut before it would idle out")
            .unwrap();
        assert!(start.elapsed() >= endpoint::WRITE_TIMEOUT);
        assert!(start.elapsed() < endpoint::IDLE_TIMEOUT);
        let mut ours = writer.await.unwrap();
        let mut rest = Vec::new();
        let _ = ours.read_to_end(&mut rest).await;
    }
}
