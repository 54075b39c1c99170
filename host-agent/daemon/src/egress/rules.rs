//! A profile's `[network] egress` entries: `host:port` pairs, where `host` is an exact DNS name
//! or a `*.suffix` wildcard.
//!
//! - An exact name matches itself only.
//! - `*.example.com` matches one or more labels below `example.com` (`a.example.com`,
//!   `a.b.example.com`) but not `example.com` itself. The suffix must have at least two labels:
//!   `*.com` would hand out a whole top-level domain and is refused.
//! - Names are compared case-insensitively; one trailing dot is ignored.
//! - IP literals, empty labels, labels that are not letters, digits, `-` or `_`, labels longer
//!   than 63 bytes, names longer than 253 bytes and ports outside 1..=65535 are refused.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why an egress entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// No `:port` after the host.
    #[error("egress entry {entry:?}: expected host:port")]
    MissingPort {
        /// The entry as written.
        entry: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("egress entry {entry:?}: port must be a number from 1 to 65535")]
    BadPort {
        /// The entry as written.
        entry: String,
        /// The number's parse error, when it was not a number at all.
        #[source]
        source: Option<std::num::ParseIntError>,
    },
    /// The host is an IP address: egress is granted by name only.
    #[error("egress entry {entry:?}: IP literals are not allowed, name the host")]
    IpLiteral {
        /// The entry as written.
        entry: String,
    },
    /// The host is not a valid DNS name.
    #[error("egress entry {entry:?}: {reason}")]
    BadName {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The host half of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name (lower case, no trailing dot).
    Exact(String),
    /// Any name one or more labels below this suffix (lower case, no trailing dot, no `*.`).
    Wildcard(String),
}

impl HostPattern {
    /// Whether `name` (already normalized by [`normalize_name`]) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(exact) => name == exact,
            HostPattern::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// One `host:port` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// The host or wildcard.
    pub host: HostPattern,
    /// The TCP port.
    pub port: u16,
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl EgressRule {
    /// Parses one entry.
    pub fn parse(entry: &str) -> Result<Self, RuleError> {
        let owned = || entry.to_owned();
        if entry.starts_with('[') || entry.parse::<Ipv6Addr>().is_ok() {
            return Err(RuleError::IpLiteral { entry: owned() });
        }
        let (host, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| RuleError::MissingPort { entry: owned() })?;
        let port: u32 = port.parse().map_err(|e| RuleError::BadPort {
            entry: owned(),
            source: Some(e),
        })?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| RuleError::BadPort {
                entry: owned(),
                source: None,
            })?;
        let bad = |reason| RuleError::BadName {
            entry: owned(),
            reason,
        };
        let host = normalize_name(host);
        if host.parse::<Ipv4Addr>().is_ok() {
            return Err(RuleError::IpLiteral { entry: owned() });
        }
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, host.as_str()),
        };
        check_name(name).map_err(bad)?;
        let host = if wildcard {
            if !name.contains('.') {
                return Err(bad(
                    "a wildcard must sit below a name of two or more labels",
                ));
            }
            HostPattern::Wildcard(name.to_owned())
        } else {
            HostPattern::Exact(name.to_owned())
        };
        Ok(Self { host, port })
    }
}

/// Lower-cases a name and drops one trailing dot.
pub fn normalize_name(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Checks a normalized name: 1..=253 bytes, labels of 1..=63 letters, digits, `-` or `_`, a
/// label neither starting nor ending with `-`, and not all digits in the last label (which
/// would make it an address).
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > 253 {
        return Err("name longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("labels may hold only letters, digits, '-' and '_'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'");
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label is all digits");
    }
    Ok(())
}

/// A VM's allowlist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    rules: Vec<EgressRule>,
}

impl EgressPolicy {
    /// Parses a profile's `egress` entries; the first bad entry fails the whole list.
    pub fn parse(entries: &[String]) -> Result<Self, RuleError> {
        let rules = entries
            .iter()
            .map(|e| EgressRule::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    /// The rules, in profile order.
    pub fn rules(&self) -> &[EgressRule] {
        &self.rules
    }

    /// The first rule that allows `name` (any case, trailing dot or not) and the sorted ports
    /// of every rule that allows it; `None` when no rule does.
    pub fn decide(&self, name: &str) -> Option<(&EgressRule, Vec<u16>)> {
        let name = normalize_name(name);
        if check_name(&name).is_err() {
            return None;
        }
        let mut matching = self.rules.iter().filter(|r| r.host.matches(&name));
        let first = matching.next()?;
        let mut ports: Vec<u16> = std::iter::once(first.port)
            .chain(matching.map(|r| r.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Some((first, ports))
    }

    /// Whether some rule allows `name` on `port`.
    pub fn allows(&self, name: &str, port: u16) -> bool {
        self.decide(name)
            .is_some_and(|(_, ports)| ports.contains(&port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parses_exact_and_wildcard_entries() {
        let p = policy(&["PyPI.org.:443", "*.githubusercontent.com:443"]);
        assert_eq!(
            p.rules(),
            &[
                EgressRule {
                    host: HostPattern::Exact("pypi.org".into()),
                    port: 443
                },
                EgressRule {
                    host: HostPattern::Wildcard("githubusercontent.com".into()),
                    port: 443
                },
            ]
        );
        assert_eq!(p.rules()[1].to_string(), "*.githubusercontent.com:443");
    }

    #[test]
    fn refuses_bad_entries_with_typed_errors() {
        let err = |e: &str| EgressRule::parse(e).unwrap_err();
        assert!(matches!(err("pypi.org"), RuleError::MissingPort { .. }));
        assert!(matches!(
            err("pypi.org:0"),
            RuleError::BadPort { source: None, .. }
        ));
        assert!(matches!(
            err("pypi.org:65536"),
            RuleError::BadPort { source: None, .. }
        ));
        assert!(matches!(
            err("pypi.org:https"),
            RuleError::BadPort {
                source: Some(_),
                ..
            }
        ));
        assert!(matches!(err("pypi.org:-1"), RuleError::BadPort { .. }));
        assert!(matches!(err("1.2.3.4:443"), RuleError::IpLiteral { .. }));
        assert!(matches!(err("[::1]:443"), RuleError::IpLiteral { .. }));
        assert!(matches!(err("::1"), RuleError::IpLiteral { .. }));
        assert!(matches!(err("a..b:443"), RuleError::BadName { .. }));
        assert!(matches!(err(".a.b:443"), RuleError::BadName { .. }));
        assert!(matches!(err(":443"), RuleError::BadName { .. }));
        assert!(matches!(err("*:443"), RuleError::BadName { .. }));
        assert!(matches!(err("*.com:443"), RuleError::BadName { .. }));
        assert!(matches!(err("a.*.com:443"), RuleError::BadName { .. }));
        assert!(matches!(err("**.a.com:443"), RuleError::BadName { .. }));
        assert!(matches!(err("-a.com:443"), RuleError::BadName { .. }));
        assert!(matches!(err("a b.com:443"), RuleError::BadName { .. }));
        assert!(matches!(err("a.123:443"), RuleError::BadName { .. }));
        let long = format!("{}.com:443", "a".repeat(64));
        assert!(matches!(err(&long), RuleError::BadName { .. }));
        let list = ["pypi.org:443".to_string(), "bad".to_string()];
        assert!(EgressPolicy::parse(&list).is_err());
    }

    #[test]
    fn wildcard_matches_labels_below_but_not_the_suffix() {
        let p = policy(&["*.githubusercontent.com:443"]);
        assert!(p.decide("raw.githubusercontent.com").is_some());
        assert!(p.decide("a.b.githubusercontent.com").is_some());
        assert!(p.decide("RAW.GitHubUserContent.com.").is_some());
        assert!(p.decide("githubusercontent.com").is_none());
        assert!(p.decide("evilgithubusercontent.com").is_none());
        assert!(p.decide("githubusercontent.com.evil.test").is_none());
        assert!(p.decide(".githubusercontent.com").is_none());
    }

    #[test]
    fn exact_matches_only_itself_any_case_with_or_without_dot() {
        let p = policy(&["pypi.org:443"]);
        assert!(p.decide("pypi.org").is_some());
        assert!(p.decide("PYPI.ORG.").is_some());
        assert!(p.decide("www.pypi.org").is_none());
        assert!(p.decide("pypi.org.evil").is_none());
        assert!(p.decide("pypi.org..").is_none());
        assert!(p.decide("").is_none());
    }

    #[test]
    fn decide_returns_first_rule_and_all_ports() {
        let p = policy(&[
            "*.example.com:8443",
            "api.example.com:443",
            "api.example.com:443",
        ]);
        let (rule, ports) = p.decide("api.example.com").unwrap();
        assert_eq!(rule.port, 8443);
        assert_eq!(ports, vec![443, 8443]);
        assert!(p.allows("api.example.com", 443));
        assert!(!p.allows("www.example.com", 443));
        assert!(p.allows("www.example.com", 8443));
    }
}
