//! Access profiles: which MCP servers and tools an agent may use, with which arguments, which
//! calls need the user's approval, and the agent's tier; decided by `cedar-policy`.
//!
//! A profile is a TOML file the user writes ([`Profile`], see `examples/profiles/`). Loading it
//! ([`AccessPolicy::load`]) parses it strictly (unknown keys are errors), checks it, compiles it
//! to a Cedar schema and policy set, and validates the set against the schema, so a typo is a
//! load error and never a silent allow. [`AccessPolicy::decide`] then answers each call with a
//! [`Decision`] that names the rule behind it. A tool that names arguments admits only those
//! unless it says `other_args = "allow"` (see `profile`'s module doc).
//!
//! Privilege never escalates: [`AccessPolicy::spawn_excess`] lists everything a profile asked
//! for by an orchestrator's `spawn_agent` holds beyond the orchestrator's own rights; an empty
//! list is the only way a spawn proceeds without the user's approval.
//!
//! # Layout
//! - `profile`: the TOML types and their load-time checks.
//! - `cedar`: compiling a profile to Cedar and asking the authorizer.
//! - this file: the error, [`Decision`], [`AccessPolicy`] and the spawn comparison.

mod cedar;
mod profile;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use cedar::DEFAULT_DENY;
pub use profile::{
    ArgConstraint, EgressError, EgressRule, MAX_EGRESS, NetworkSpec, OtherArgs, Profile,
    SPAWN_AGENT_TOOL, ServerSpec, Tier, TokenizeMode, ToolRule,
};

/// The most unexpected argument names a denial lists.
const MAX_NAMED_ARGS: usize = 8;
/// The most characters of one unexpected argument name a denial shows.
const MAX_SHOWN_NAME: usize = 64;

/// Errors of loading a profile.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Reading the file failed.
    #[error("profile {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the profile's shape.
    #[error("profile does not parse")]
    Parse(#[source] toml::de::Error),
    /// A check failed.
    #[error("profile is invalid: {0}")]
    Invalid(String),
    /// A `[network] egress` entry is refused.
    #[error("profile is invalid")]
    Egress(#[source] profile::EgressError),
    /// Cedar refused the schema, a policy or a request.
    #[error("cedar: {0}")]
    Cedar(String),
}

/// The answer to one tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The call may run.
    Allow {
        /// The policy that permitted it.
        rule: String,
    },
    /// The call may not run.
    Deny {
        /// The policy (or [`DEFAULT_DENY`]) that denied it.
        rule: String,
        /// Why, in words for the agent.
        reason: String,
    },
    /// The call runs only if the user approves it.
    NeedsApproval {
        /// The policy that asks for approval.
        rule: String,
        /// Why, in words for the user.
        reason: String,
    },
}

impl Decision {
    /// `allow`, `deny` or `needs_approval`, as the audit log records it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allow",
            Self::Deny { .. } => "deny",
            Self::NeedsApproval { .. } => "needs_approval",
        }
    }

    /// The rule behind the decision.
    pub fn rule(&self) -> &str {
        match self {
            Self::Allow { rule } | Self::Deny { rule, .. } | Self::NeedsApproval { rule, .. } => {
                rule
            }
        }
    }
}

/// A loaded, checked and compiled profile.
#[derive(Debug)]
pub struct AccessPolicy {
    profile: Profile,
    cedar: cedar::CedarProfile,
}

impl AccessPolicy {
    /// Reads, parses, checks and compiles the profile at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses, checks and compiles a profile's TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        Self::new(Profile::from_toml(text)?)
    }

    /// Checks and compiles a parsed profile.
    pub fn new(profile: Profile) -> Result<Self, PolicyError> {
        profile.check()?;
        let cedar = cedar::CedarProfile::compile(&profile)?;
        Ok(Self { profile, cedar })
    }

    /// The profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The generated Cedar policies, as text.
    pub fn cedar_source(&self) -> &str {
        self.cedar.source()
    }

    /// Whether the agent sees the tool it knows as `name` (`spawn_agent` for orchestrators).
    pub fn visible(&self, name: &str) -> bool {
        self.profile.tool(name).is_some()
            || (name == SPAWN_AGENT_TOOL && self.profile.tier == Tier::Orchestrator)
    }

    /// The names of every tool the agent sees.
    pub fn visible_tools(&self) -> Vec<String> {
        let mut names: Vec<String> = self.profile.tools.iter().map(|t| t.name.clone()).collect();
        if self.profile.tier == Tier::Orchestrator {
            names.push(SPAWN_AGENT_TOOL.into());
        }
        names
    }

    /// Decides a call by `agent` of the tool it knows as `tool` with `args`. A tool outside the
    /// profile is denied by [`DEFAULT_DENY`] (it reaches Cedar under an unknown server, so no
    /// rule can match it by accident). A call carrying an argument its tool's rule does not name
    /// is denied by the rule `other_args:S/T` unless the tool admits other arguments
    /// ([`ToolRule::admits_other_args`]); the reason names each such argument.
    pub fn decide(
        &self,
        agent: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
        approved: bool,
    ) -> Result<Decision, PolicyError> {
        let Some(rule) = self.profile.tool(tool) else {
            return self.cedar.decide(agent, "?", tool, args, approved);
        };
        if !rule.admits_other_args() {
            let mut unnamed: Vec<&str> = args
                .keys()
                .map(String::as_str)
                .filter(|name| !rule.args.contains_key(*name))
                .collect();
            if !unnamed.is_empty() {
                unnamed.sort_unstable();
                return Ok(Decision::Deny {
                    rule: format!("other_args:{}/{tool}", rule.server),
                    reason: unnamed_reason(rule, &unnamed),
                });
            }
        }
        self.cedar.decide(agent, &rule.server, tool, args, approved)
    }

    /// What `child` would hold beyond this profile's own rights, in words (empty: nothing).
    ///
    /// A child is within its parent when it is a worker; every server it names is one of the
    /// parent's, defined the same way; every tool it lists is the parent's, on the same server,
    /// with every argument constraint of the parent's present and at least as narrow (under a
    /// parent's `prefix`, every `one_of` value of the child must start with it and hold no `..`
    /// segment or encoding of one, see `wider`); where the parent's tool denies arguments it
    /// does not name, the child's does too and names none the parent's does not; and no tool
    /// that needs approval in the parent is free of approval in the child. Only a worker can be
    /// spawned without approval: orchestrator-tier tools are never granted onward.
    ///
    /// The guard holds down a chain of spawns: each child is compared with its parent, whose own
    /// bounds were compared with its parent's, so a set value under an ancestor's prefix is
    /// checked at every generation. Only the user's approval of a spawn breaks the chain, and
    /// then the approval request names the escaping value.
    pub fn spawn_excess(&self, child: &Profile) -> Vec<String> {
        let parent = &self.profile;
        let mut out = Vec::new();
        if child.tier != Tier::Worker {
            out.push(format!(
                "tier {:?}: only workers can be spawned (no orchestrator tools are granted)",
                child.tier
            ));
        }
        if (child.tokenize as u8) < (parent.tokenize as u8) {
            out.push(format!(
                "tokenize {:?} is weaker than the parent's {:?}",
                child.tokenize, parent.tokenize
            ));
        }
        for host in &parent.llm_hosts {
            if !child.llm_hosts.contains(host) {
                out.push(format!(
                    "llm host `{host}` is missing: bodies to it would carry real values"
                ));
            }
        }
        for host in &child.restore_hosts {
            if !parent.restore_hosts.contains(host) {
                out.push(format!(
                    "restore host `{host}` is not the parent's: bodies to it would get real values"
                ));
            }
        }
        for dest in &child.network.egress {
            if !parent.network.egress.contains(dest) {
                out.push(format!(
                    "egress `{dest}` is not the parent's: the child could reach it"
                ));
            }
        }
        for peer in &child.network.peers {
            if !parent.network.peers.contains(peer) {
                out.push(format!(
                    "peer `{peer}` is not the parent's: the child could reach its VMs"
                ));
            }
        }
        for port in &child.network.ingress {
            if !parent.network.ingress.contains(port) {
                out.push(format!(
                    "ingress port {port} is not the parent's: clients could reach the child there"
                ));
            }
        }
        for (name, spec) in &child.servers {
            if parent.servers.get(name) != Some(spec) {
                out.push(format!("server `{name}` is not the parent's"));
            }
        }
        for tool in &child.tools {
            let Some(mine) = parent.tool(&tool.name).filter(|t| t.server == tool.server) else {
                out.push(format!("tool `{}` is not the parent's", tool.name));
                continue;
            };
            if tool.restore && !mine.restore {
                out.push(format!(
                    "tool `{}` gets real values in its arguments, which the parent's does not",
                    tool.name
                ));
            }
            if mine.approval.is_some() && tool.approval.is_none() {
                out.push(format!(
                    "tool `{}` drops the parent's approval requirement",
                    tool.name
                ));
            }
            for (arg, bound) in &mine.args {
                let why = match tool.args.get(arg) {
                    Some(c) => wider(c, bound),
                    None => Some("it is unconstrained".into()),
                };
                if let Some(why) = why {
                    out.push(format!(
                        "tool `{}` argument `{arg}` is wider than the parent's: {why}",
                        tool.name
                    ));
                }
            }
            if !mine.admits_other_args() {
                if tool.admits_other_args() {
                    out.push(format!(
                        "tool `{}` admits arguments the parent's does not name (other_args)",
                        tool.name
                    ));
                }
                for arg in tool.args.keys().filter(|a| !mine.args.contains_key(*a)) {
                    out.push(format!(
                        "tool `{}` argument `{arg}` is not one the parent's admits",
                        tool.name
                    ));
                }
            }
        }
        out
    }
}

/// Words for the agent naming the arguments of a call that `rule` does not name (sorted), and
/// those it does. The names come from the agent, so each is escaped and cut short.
fn unnamed_reason(rule: &ToolRule, unnamed: &[&str]) -> String {
    let show = |name: &str| {
        let escaped: Vec<char> = name.escape_debug().collect();
        let mut shown: String = escaped.iter().take(MAX_SHOWN_NAME).collect();
        if escaped.len() > MAX_SHOWN_NAME {
            shown.push_str("...");
        }
        format!("`{shown}`")
    };
    let mut listed: Vec<String> = unnamed
        .iter()
        .take(MAX_NAMED_ARGS)
        .map(|n| show(n))
        .collect();
    if unnamed.len() > MAX_NAMED_ARGS {
        listed.push(format!("and {} more", unnamed.len() - MAX_NAMED_ARGS));
    }
    let (noun, verb) = if unnamed.len() == 1 {
        ("argument", "is")
    } else {
        ("arguments", "are")
    };
    let named: Vec<String> = rule.args.keys().map(|a| format!("`{a}`")).collect();
    let admits = if named.is_empty() {
        "no arguments".to_owned()
    } else {
        format!("only {}", named.join(", "))
    };
    format!(
        "{noun} {} {verb} not named by the profile for tool `{}`, which admits {admits}",
        listed.join(", "),
        rule.name,
    )
}

/// Why constraint `c` admits a value that `bound` refuses, or `None` when it admits none.
///
/// Under a parent's `prefix`, every string bound of the child must stay under it: each `one_of`
/// value, and the child's own prefix when it has no set, must start with the parent's prefix
/// and must not step out of it (a `..` segment, an encoded dot, slash or backslash, or a
/// backslash: what the compiled `prefix` rule refuses). An escaping set value is refused even
/// when the child's own prefix would deny it at call time: the spawn is plainly asking for it.
fn wider(c: &ArgConstraint, bound: &ArgConstraint) -> Option<String> {
    if c.arg_type() != bound.arg_type() {
        return Some("it has another type".into());
    }
    if let Some(p) = &bound.prefix {
        let outside = |s: &str| {
            if !s.starts_with(p.as_str()) {
                Some(format!(
                    "`{}` is not under the prefix `{}`",
                    s.escape_debug(),
                    p.escape_debug()
                ))
            } else if cedar::steps_out(s) {
                Some(format!(
                    "`{}` steps out of the prefix `{}` (a `..` segment, an encoded dot, slash or \
                     backslash, or a backslash)",
                    s.escape_debug(),
                    p.escape_debug()
                ))
            } else {
                None
            }
        };
        match (&c.one_of, &c.prefix) {
            (Some(set), _) => {
                if let Some(why) = set.iter().find_map(|s| outside(s)) {
                    return Some(format!("`one_of` value {why}"));
                }
            }
            (None, Some(q)) => {
                if let Some(why) = outside(q) {
                    return Some(format!("prefix {why}"));
                }
            }
            (None, None) => return Some(format!("it has no prefix under `{}`", p.escape_debug())),
        }
    }
    if let Some(set) = &bound.one_of {
        match &c.one_of {
            Some(mine) => {
                if let Some(v) = mine.iter().find(|s| !set.contains(s)) {
                    return Some(format!(
                        "`one_of` value `{}` is not the parent's",
                        v.escape_debug()
                    ));
                }
            }
            None => return Some("it has no `one_of` within the parent's".into()),
        }
    }
    match (bound.min, c.min) {
        (Some(b), Some(m)) if m < b => return Some(format!("min {m} is below the parent's {b}")),
        (Some(b), None) => return Some(format!("it has no min (the parent's is {b})")),
        _ => {}
    }
    match (bound.max, c.max) {
        (Some(b), Some(m)) if m > b => return Some(format!("max {m} is over the parent's {b}")),
        (Some(b), None) => return Some(format!("it has no max (the parent's is {b})")),
        _ => {}
    }
    None
}
