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
    /// The VM's network. With no `egress` the VM gets no network device at all.
    #[serde(default, skip_serializing_if = "NetworkSpec::is_empty")]
    pub network: NetworkSpec,
}

/// The most `[network] egress` entries one profile may hold.
pub const MAX_EGRESS: usize = 64;

/// `[network]`: where the agent's VM may connect to, besides the host's own services.
///
/// ```toml
/// [network]
/// egress = ["pypi.org:443", "*.githubusercontent.com:443"]
/// ```
///
/// Each entry is `HOST:PORT`: `HOST` a DNS name, or `*.` and a DNS name for any name below it
/// (not the name itself); `PORT` 1 to 65535. The strings are kept as written; the resolver
/// matches names against them and the host's firewall admits only the addresses it resolved.
///
/// `peers` names other profiles: two running VMs may reach each other (any TCP or UDP port,
/// both ways) only when each one's profile names the other's. Other VMs are never reachable.
///
/// `ingress` lists TCP ports the agent serves to clients on the hosts' underlay (the network
/// a daemon's `--underlay` names): those clients may open connections to the guest's overlay
/// address on those ports, and the guest may answer them. Nobody else may. A daemon without an
/// underlay refuses a profile with ingress ports, rather than start a VM nobody can reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The destinations, `HOST:PORT`.
    #[serde(default)]
    pub egress: Vec<String>,
    /// The profiles whose VMs this VM may reach, and be reached by, when they name it too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// The TCP ports clients on the underlay may connect to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<u16>,
}

impl NetworkSpec {
    /// Whether the VM gets no network at all.
    pub fn is_empty(&self) -> bool {
        self.egress.is_empty() && self.peers.is_empty() && self.ingress.is_empty()
    }

    /// The entries, parsed (each was checked when the profile loaded).
    pub fn destinations(&self) -> Result<Vec<EgressRule>, EgressError> {
        self.egress.iter().map(|e| EgressRule::parse(e)).collect()
    }
}

/// Why a `[network] egress` entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// No `:PORT`.
    #[error("egress entry `{0}` must be HOST:PORT")]
    NoPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("egress entry `{0}`: the port must be 1 to 65535")]
    BadPort(String),
    /// The host is not a DNS name (or `*.` and one).
    #[error("egress entry `{0}`: the host must be a DNS name or `*.` followed by one")]
    BadHost(String),
    /// More entries than [`MAX_EGRESS`].
    #[error("`[network] egress` names more than {MAX_EGRESS} destinations")]
    TooMany,
}

/// One parsed `[network] egress` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// The name, lower case, without the `*.` of a wildcard.
    pub host: String,
    /// Whether the entry admits every name below `host` (`*.host`), not `host` itself.
    pub wildcard: bool,
    /// The port.
    pub port: u16,
}

impl EgressRule {
    /// Parses and checks one entry.
    pub fn parse(entry: &str) -> Result<Self, EgressError> {
        let shown = || entry.escape_debug().to_string();
        let (host, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| EgressError::NoPort(shown()))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && !port.starts_with('+'))
            .ok_or_else(|| EgressError::BadPort(shown()))?;
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        if !is_dns_name(name) {
            return Err(EgressError::BadHost(shown()));
        }
        Ok(Self {
            host: name.to_ascii_lowercase(),
            wildcard,
            port,
        })
    }

    /// Whether `name` (a DNS name, any case, no trailing dot) on `port` is admitted.
    pub fn admits(&self, name: &str, port: u16) -> bool {
        if port != self.port {
            return false;
        }
        let name = name.to_ascii_lowercase();
        if self.wildcard {
            name.strip_suffix(self.host.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        } else {
            name == self.host
        }
    }
}

/// A DNS host name: 1 to 253 characters, dot-separated labels of 1 to 63 ASCII letters, digits
/// and hyphens, no label starting or ending with a hyphen, and not all digits at the end (an
/// IPv4 address is not a name: egress goes by name only).
fn is_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    let last_not_numeric = name
        .rsplit('.')
        .next()
        .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && last_not_numeric
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
        if self.network.egress.len() > MAX_EGRESS {
            return Err(PolicyError::Egress(EgressError::TooMany));
        }
        self.network.destinations().map_err(PolicyError::Egress)?;
        if self.network.peers.len() > MAX_EGRESS {
            return bad(format!(
                "`[network] peers` names more than {MAX_EGRESS} profiles"
            ));
        }
        for peer in &self.network.peers {
            check_name("a `[network] peers` entry", peer)?;
        }
        if self.network.ingress.len() > MAX_EGRESS {
            return bad(format!(
                "`[network] ingress` names more than {MAX_EGRESS} ports"
            ));
        }
        if self.network.ingress.contains(&0) {
            return bad("`[network] ingress`: a port must be 1 to 65535, not 0".to_owned());
        }
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

#[cfg(test)]
mod egress_tests {
    use super::*;

    fn with_egress(entries: &str) -> Result<Profile, PolicyError> {
        Profile::from_toml(&format!(
            "name = \"n\"\ntier = \"worker\"\n[network]\negress = [{entries}]\n"
        ))
    }

    #[test]
    fn egress_entries_keep_their_text_and_parse() {
        let p = with_egress(r#""pypi.org:443", "*.githubusercontent.com:443""#).unwrap();
        assert_eq!(
            p.network.egress,
            ["pypi.org:443", "*.githubusercontent.com:443"]
        );
        let rules = p.network.destinations().unwrap();
        assert_eq!(
            rules[1],
            EgressRule {
                host: "githubusercontent.com".into(),
                wildcard: true,
                port: 443
            }
        );
        assert!(rules[0].admits("PyPI.org", 443));
        assert!(!rules[0].admits("pypi.org", 80));
        assert!(!rules[0].admits("evilpypi.org", 443));
        assert!(rules[1].admits("raw.githubusercontent.com", 443));
        assert!(!rules[1].admits("githubusercontent.com", 443));
        assert!(!rules[1].admits("xgithubusercontent.com", 443));
    }

    #[test]
    fn a_profile_without_network_has_no_egress() {
        let p = Profile::from_toml("name = \"n\"\ntier = \"worker\"\n").unwrap();
        assert!(p.network.is_empty());
        let p = Profile::from_toml("name = \"n\"\ntier = \"worker\"\n[network]\n").unwrap();
        assert!(p.network.is_empty());
        // A misspelt key is refused, never ignored.
        assert!(matches!(
            Profile::from_toml("name = \"n\"\ntier = \"worker\"\n[network]\negres = []\n"),
            Err(PolicyError::Parse(_))
        ));
    }

    #[test]
    fn ingress_ports_are_a_network_and_bad_ones_are_refused() {
        let with = |ports: &str| {
            Profile::from_toml(&format!(
                "name = \"n\"\ntier = \"worker\"\n[network]\ningress = [{ports}]\n"
            ))
        };
        let p = with("7000, 8080").unwrap();
        assert_eq!(p.network.ingress, [7000, 8080]);
        assert!(
            !p.network.is_empty(),
            "ingress alone gives the VM a network"
        );
        for bad in ["0", "65536", "-1", "\"7000\""] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (1..=MAX_EGRESS as u16 + 1).map(|p| p.to_string()).collect();
        assert!(matches!(
            with(&many.join(",")),
            Err(PolicyError::Invalid(_))
        ));
    }

    /// An entry and the check of the error it must get.
    type Case = (&'static str, fn(&EgressError) -> bool);

    #[test]
    fn bad_egress_entries_get_typed_errors() {
        let cases: &[Case] = &[
            ("pypi.org", |e| matches!(e, EgressError::NoPort(_))),
            ("pypi.org:0", |e| matches!(e, EgressError::BadPort(_))),
            ("pypi.org:65536", |e| matches!(e, EgressError::BadPort(_))),
            ("pypi.org:+443", |e| matches!(e, EgressError::BadPort(_))),
            ("pypi.org:https", |e| matches!(e, EgressError::BadPort(_))),
            (":443", |e| matches!(e, EgressError::BadHost(_))),
            ("*:443", |e| matches!(e, EgressError::BadHost(_))),
            ("*.:443", |e| matches!(e, EgressError::BadHost(_))),
            ("a.*.org:443", |e| matches!(e, EgressError::BadHost(_))),
            ("-a.org:443", |e| matches!(e, EgressError::BadHost(_))),
            ("a..org:443", |e| matches!(e, EgressError::BadHost(_))),
            ("10.0.0.1:443", |e| matches!(e, EgressError::BadHost(_))),
            ("[::1]:443", |e| matches!(e, EgressError::BadHost(_))),
            ("a_b.org:443", |e| matches!(e, EgressError::BadHost(_))),
        ];
        for (entry, want) in cases {
            match with_egress(&format!("{entry:?}")) {
                Err(PolicyError::Egress(e)) => assert!(want(&e), "{entry}: {e:?}"),
                other => panic!("{entry}: {other:?}"),
            }
        }
        let long = format!("{}.org:443", "a".repeat(64));
        assert!(matches!(
            with_egress(&format!("{long:?}")),
            Err(PolicyError::Egress(EgressError::BadHost(_)))
        ));
        let many: Vec<String> = (0..=MAX_EGRESS)
            .map(|i| format!("\"h{i}.test:443\""))
            .collect();
        assert!(matches!(
            with_egress(&many.join(",")),
            Err(PolicyError::Egress(EgressError::TooMany))
        ));
        assert_eq!(
            with_egress("\"x.test:65535\"")
                .unwrap()
                .network
                .destinations()
                .unwrap()[0]
                .port,
            65535
        );
    }
}
