//! The access profile as the user writes it (TOML), and its load-time checks.
//!
//! Every table is `deny_unknown_fields`: a misspelt key (`aproval`, `prefx`) is a load error,
//! never a silently ignored restriction. After parsing, [`Profile::check`] refuses what TOML's
//! types cannot: names outside the allowed alphabet, a tool naming a server the profile does not
//! declare, two tools the agent would see under the same name, a constraint with no bound or with
//! bounds of two types, an argument used as a string by one tool and as an integer by another.
//!
//! # Arguments a profile does not name
//! A tool whose `args` names arguments admits only those: a call with any other argument is
//! denied (rule `other_args:S/T`, the reason naming each unexpected argument) before Cedar is
//! asked, so the upstream never sees it. `other_args = "allow"` on the tool opts out: other
//! arguments then pass unchecked (for free text such as a file's `content`).
//!
//! A tool listed with no `args` at all admits any arguments, as before: listing a tool bare is
//! an explicit grant of the whole tool, and there the profile claims no bound an unnamed
//! argument could get round. Denying every argument instead would leave most bare-listed tools
//! unusable and push writers to `other_args = "allow"`, which reads the same. A bare tool that
//! must take no arguments says `other_args = "deny"`.
//!
//! ```toml
//! name = "worker"
//! tier = "worker"
//! tokenize = "enforce"
//!
//! [servers.files]
//! command = ["python3", "server.py"]
//!
//! [[tools]]
//! server = "files"
//! name = "read_file"
//! args.path = { prefix = "/data/" }
//!
//! [[tools]]
//! server = "files"
//! name = "write_file"
//! args.path = { prefix = "/data/out/" }
//! other_args = "allow"    # `content`, unchecked
//!
//! [[tools]]
//! server = "files"
//! name = "delete_file"
//! approval = "deletes a file"
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::PolicyError;

/// The name of the host-served tool an orchestrator spawns agents with.
pub const SPAWN_AGENT_TOOL: &str = "spawn_agent";

/// Checks a list of hosts (`llm_hosts`, `restore_hosts`): at most
/// [`shared_proto::credential::MAX_LLM_HOSTS`], each a host name, optionally with `:port`.
fn check_hosts(field: &str, hosts: &[String]) -> Result<(), PolicyError> {
    let max = shared_proto::credential::MAX_LLM_HOSTS;
    if hosts.len() > max {
        return Err(PolicyError::Invalid(format!(
            "`{field}` names more than {max} hosts"
        )));
    }
    for host in hosts {
        let (name, port) = host.rsplit_once(':').unwrap_or((host, "443"));
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !name_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(PolicyError::Invalid(format!(
                "`{field}` entry `{}` must be a host name, optionally with :port",
                host.escape_debug()
            )));
        }
    }
    Ok(())
}

/// The longest name (profile, server, tool, argument) accepted.
const MAX_NAME: usize = 64;

/// An agent's declared access profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name (shown in denials, approvals and the audit log).
    pub name: String,
    /// The agent's tier.
    pub tier: Tier,
    /// What the host does with sensitive values in tool results and arguments.
    #[serde(default)]
    pub tokenize: TokenizeMode,
    /// Hosts (`host` or `host:port`) of the model APIs the agent calls through the credential
    /// proxy: request bodies to these are tokenized (the model sees surrogates).
    #[serde(default)]
    pub llm_hosts: Vec<String>,
    /// Hosts (`host` or `host:port`) whose request bodies, through the credential proxy, get
    /// the real values back in place of surrogates. A body to a host in neither list leaves as
    /// the agent wrote it, surrogates and all: real values go only where the profile says.
    #[serde(default)]
    pub restore_hosts: Vec<String>,
    /// The upstream MCP servers, by name.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerSpec>,
    /// The tools the agent may see and call.
    #[serde(default)]
    pub tools: Vec<ToolRule>,
}

/// An agent's tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Calls the tools of its profile; spawns nothing.
    Worker,
    /// Also gets the host's `spawn_agent` tool, to spawn workers no more privileged than itself.
    Orchestrator,
}

/// How the host tokenizes what flows to and from the agent's tools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizeMode {
    /// Nothing is scanned.
    Off,
    /// Nothing changes; the audit log records the kind and count of what would have been
    /// tokenized.
    Monitor,
    /// Tool results reach the agent with surrogates; arguments leave with the real values.
    #[default]
    Enforce,
}

/// How the host reaches an upstream MCP server: exactly one of `command` and `url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// A stdio server: the program and its arguments, started as a child process of the host.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The child's environment (besides none of the host's own).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A streamable-HTTP server: its endpoint (`http://`).
    #[serde(default)]
    pub url: Option<String>,
}

/// One tool the agent may see and call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRule {
    /// The upstream server (a key of `servers`).
    pub server: String,
    /// The tool's name on that server (and as the agent sees it).
    pub name: String,
    /// Constraints on arguments, by argument name. An argument named here must be present.
    #[serde(default)]
    pub args: BTreeMap<String, ArgConstraint>,
    /// Whether a call may carry arguments `args` does not name. Unset, a tool that names
    /// arguments denies the others, and a tool with no `args` admits any (see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_args: Option<OtherArgs>,
    /// If set, every call needs the user's approval; the text says why, for the user.
    #[serde(default)]
    pub approval: Option<String>,
    /// Whether the call's arguments get the real values back in place of the agent's
    /// surrogates (mode `enforce`). Unset, the upstream gets the surrogates: real values go only
    /// into the tools the profile marks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore: bool,
}

/// What a tool admits besides the arguments its `args` names (`other_args`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherArgs {
    /// A call carrying any other argument is denied (rule `other_args:S/T`).
    Deny,
    /// Other arguments pass to the upstream as the agent sent them, unchecked.
    Allow,
}

impl ToolRule {
    /// Whether a call may carry arguments `args` does not name: as `other_args` says, and when
    /// it is unset, only for a tool with no `args`.
    pub fn admits_other_args(&self) -> bool {
        match self.other_args {
            Some(OtherArgs::Allow) => true,
            Some(OtherArgs::Deny) => false,
            None => self.args.is_empty(),
        }
    }
}

/// A constraint on one argument: string bounds (`prefix`, `one_of`) or integer bounds
/// (`min`, `max`), not both kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgConstraint {
    /// The string must start with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The string must be one of these (and, for an argument some tool bounds by `prefix`, hold
    /// no `..` segment or encoding of one).
    #[serde(default)]
    pub one_of: Option<Vec<String>>,
    /// The integer must be at least this.
    #[serde(default)]
    pub min: Option<i64>,
    /// The integer must be at most this.
    #[serde(default)]
    pub max: Option<i64>,
}

/// The type an argument's constraint gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    /// A JSON string.
    String,
    /// A JSON integer (fits `i64`).
    Long,
}

impl ArgType {
    /// The Cedar type's name.
    pub fn cedar(self) -> &'static str {
        match self {
            Self::String => "String",
            Self::Long => "Long",
        }
    }
}

impl ArgConstraint {
    /// The argument's type, or `None` when the constraint has no bound or mixes kinds.
    pub fn arg_type(&self) -> Option<ArgType> {
        let string = self.prefix.is_some() || self.one_of.is_some();
        let long = self.min.is_some() || self.max.is_some();
        match (string, long) {
            (true, false) => Some(ArgType::String),
            (false, true) => Some(ArgType::Long),
            _ => None,
        }
    }
}

impl Profile {
    /// Parses and checks a profile from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let profile: Profile = toml::from_str(text).map_err(PolicyError::Parse)?;
        profile.check()?;
        Ok(profile)
    }

    /// The load-time checks TOML's types cannot express.
    pub fn check(&self) -> Result<(), PolicyError> {
        let bad = |what: String| Err(PolicyError::Invalid(what));
        check_name("profile name", &self.name)?;
        check_hosts("llm_hosts", &self.llm_hosts)?;
        check_hosts("restore_hosts", &self.restore_hosts)?;
        let max = shared_proto::credential::MAX_LLM_HOSTS;
        if self.llm_hosts.len() + self.restore_hosts.len() > max {
            return bad(format!(
                "`llm_hosts` and `restore_hosts` name more than {max} hosts together"
            ));
        }
        if let Some(host) = self.restore_hosts.iter().find(|h| {
            self.llm_hosts
                .iter()
                .any(|l| l.eq_ignore_ascii_case(h.as_str()))
        }) {
            return bad(format!(
                "`{host}` is in both `llm_hosts` and `restore_hosts`: a model API never gets real values"
            ));
        }
        for (name, server) in &self.servers {
            check_name("server name", name)?;
            match (&server.command, &server.url) {
                (Some(cmd), None) if !cmd.is_empty() => {}
                (Some(_), None) => return bad(format!("server `{name}`: `command` is empty")),
                (None, Some(url)) if url.starts_with("http://") => {}
                (None, Some(_)) => {
                    return bad(format!("server `{name}`: `url` must start with http://"));
                }
                (None, None) => return bad(format!("server `{name}`: needs `command` or `url`")),
                (Some(_), Some(_)) => {
                    return bad(format!(
                        "server `{name}`: give `command` or `url`, not both"
                    ));
                }
            }
            if server.url.is_some() && !server.env.is_empty() {
                return bad(format!(
                    "server `{name}`: `env` applies to a `command` only"
                ));
            }
        }
        let mut seen = BTreeSet::new();
        let mut arg_types: BTreeMap<&str, (ArgType, &str)> = BTreeMap::new();
        for tool in &self.tools {
            check_name("tool name", &tool.name)?;
            if !self.servers.contains_key(&tool.server) {
                return bad(format!(
                    "tool `{}` names server `{}`, which `servers` does not declare",
                    tool.name, tool.server
                ));
            }
            if tool.name == SPAWN_AGENT_TOOL {
                return bad(format!(
                    "tool `{SPAWN_AGENT_TOOL}` is served by the host to orchestrators; \
                     a profile cannot list it"
                ));
            }
            if !seen.insert(tool.name.as_str()) {
                return bad(format!("tool `{}` is listed twice", tool.name));
            }
            if let Some(reason) = &tool.approval
                && reason.trim().is_empty()
            {
                return bad(format!("tool `{}`: `approval` needs a reason", tool.name));
            }
            for (arg, c) in &tool.args {
                check_name("argument name", arg)?;
                let Some(ty) = c.arg_type() else {
                    return bad(format!(
                        "tool `{}` argument `{arg}`: give string bounds (prefix, one_of) or \
                         integer bounds (min, max), not none and not both",
                        tool.name
                    ));
                };
                if let (Some(min), Some(max)) = (c.min, c.max)
                    && min > max
                {
                    return bad(format!(
                        "tool `{}` argument `{arg}`: min {min} is over max {max}",
                        tool.name
                    ));
                }
                if c.one_of.as_ref().is_some_and(Vec::is_empty) {
                    return bad(format!(
                        "tool `{}` argument `{arg}`: `one_of` is empty",
                        tool.name
                    ));
                }
                match arg_types.get(arg.as_str()) {
                    Some((other, by)) if *other != ty => {
                        return bad(format!(
                            "argument `{arg}` is a {:?} for tool `{}` but a {:?} for tool `{by}`",
                            ty, tool.name, other
                        ));
                    }
                    _ => {
                        arg_types.insert(arg, (ty, &tool.name));
                    }
                }
            }
        }
        Ok(())
    }

    /// The rule for the tool the agent knows as `name`.
    pub fn tool(&self, name: &str) -> Option<&ToolRule> {
        self.tools.iter().find(|t| t.name == name)
    }
}

/// Names are ASCII letters, digits, `_`, `-` and `.`, 1 to [`MAX_NAME`] long: they become
/// Cedar entity ids and attribute names, and appear in denials.
fn check_name(what: &str, name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::Invalid(format!(
            "{what} `{}` must be 1 to {MAX_NAME} of A-Z a-z 0-9 _ - .",
            name.escape_debug()
        )))
    }
}
