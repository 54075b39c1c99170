//! The host-enforced default deny of a networked VM: nftables rules inside the VM's network
//! namespace ([`install`]), which the guest cannot reach (its VMM holds no capability there),
//! and the host's own table for the overlay prefix ([`install_host`]).
//!
//! Rules are written as `nft` text and loaded with `nft -f -` in one transaction: the whole
//! ruleset applies or none of it does. The table is made and replaced in the same batch
//! (`add table`, `delete table`, then the table), so loading it twice leaves one copy.
//!
//! In the VM's namespace, table `inet nanoclaw`:
//! - **forward**, from `tap0`: replies to established connections pass; then, whatever the
//!   `allowed` set says, a source other than the guest's address (so nothing un-masqueraded
//!   leaves), IPv6, loopback (`127.0.0.0/8`), link-local and metadata
//!   (`169.254.0.0/16`), the host's own addresses and the overlay prefix (other VMs, but the
//!   members of `peers`) are refused; then members of `allowed` (`ipv4_addr . inet_service`,
//!   each with its own timeout, added by [`allow`]) pass, TCP or UDP; everything else is
//!   refused. Traffic *to* `tap0` passes only as replies, or from a member of `peers`
//!   ([`set_peer`]), or, for a profile with `[network] ingress` on a daemon with an underlay
//!   ([`Ingress`]), as TCP from the underlay's networks to those ports. The guest's side of those
//!   connections passes from those ports to those networks only, also when the connection has
//!   no conntrack entry here: after a migration the first packet this namespace sees may be
//!   the guest's (conntrack then picks the connection up mid-stream), so matching on
//!   `ct state established` alone would reset every connection that moved.
//! - **input**, from `tap0`: only DNS (UDP and TCP 53) from the guest's address to the gateway
//!   address, and replies.
//! - with an SNI port ([`vm_ruleset`]): **prerouting** redirects the guest's TCP 443 to that
//!   port on the gateway (never-allowed destinations excepted, so they are still refused), and
//!   input admits those redirected connections only.
//!
//! Every refusal is a reject, never a silent drop: TCP gets a reset, the rest ICMP
//! administratively-prohibited. Every refusal rule counts into a named counter, which
//! [`counters`] reads back (`nft -j list counters`), and is preceded by a rule with the same
//! match that logs the packet to NFLOG group [`LOG_GROUP`] with the counter's name as the
//! prefix, within one rate limit per VM ([`LOG_LIMIT`]); the daemon reads that group
//! (`crate::egress::firewall_log`) into the audit log.
//!
//! On the host, table `ip nanoclaw`: the overlay prefix is masqueraded on its way out of any
//! interface but the VMs' veths (and, with an underlay, but to the underlay's own networks:
//! a client there sees the guest's own address, which is what follows a migrated VM), and
//! nothing from a VM's veth reaches the host itself (input from `nc-*` is refused but for
//! replies), which covers host addresses added after a VM's rules were written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use super::ToolError;
use super::addr::{OverlayPrefix, VmLink};
use super::netns::{HOST_VETH_PREFIX, TAP_NAME, VmNetns};
use super::underlay::Underlay;

/// The table, in the VM's namespace (family `inet`) and on the host (family `ip`).
pub const TABLE: &str = "nanoclaw";
/// The set of destinations the resolver allows.
pub const ALLOWED_SET: &str = "allowed";
/// The set of other VMs' guest addresses this VM may reach and be reached by (both profiles
/// name each other).
pub const PEERS_SET: &str = "peers";
/// The longest timeout an element of [`ALLOWED_SET`] may get.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The named counters of the VM's namespace, one per kind of refusal.
pub const COUNTERS: &[&str] = &[
    "deny_ipv6",
    "deny_spoof",
    "deny_loopback",
    "deny_metadata",
    "deny_host",
    "deny_overlay",
    "deny_other",
    "deny_inbound",
    "deny_input",
];

/// Why the rules could not be loaded or read.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The namespace could not be entered.
    #[error("the VM's network namespace")]
    Netns(#[source] super::netns::NetnsError),
    /// `nft` (or `ip`, listing the host's addresses) failed.
    #[error("nftables")]
    Nft(#[source] ToolError),
    /// `nft -j` or `ip -j` printed what does not parse.
    #[error("cannot parse the output of `{0}`")]
    Parse(&'static str, #[source] serde_json::Error),
    /// A timeout of zero or over [`MAX_TTL`].
    #[error("an allowed destination's timeout must be 1 ms to {MAX_TTL:?}, not {0:?}")]
    BadTtl(Duration),
}

/// Who may open connections to a VM from outside the overlay: clients on the hosts' underlay,
/// to the TCP ports of the VM's profile (`[network] ingress`). Empty when either is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingress {
    /// The underlay's networks, `A.B.C.D/LEN` (from the interface's own addresses).
    pub from: Vec<String>,
    /// The TCP ports.
    pub ports: Vec<u16>,
}

impl Ingress {
    /// The ingress of a VM with `ports` on a daemon with `underlay`.
    pub fn new(underlay: Option<&Underlay>, ports: &[u16]) -> Self {
        match underlay {
            Some(u) if !ports.is_empty() => Self {
                from: u.networks().to_vec(),
                ports: ports.to_vec(),
            },
            _ => Self::default(),
        }
    }

    /// Whether nothing may connect in.
    pub fn is_empty(&self) -> bool {
        self.from.is_empty() || self.ports.is_empty()
    }

    /// The networks and the ports as nft sets.
    fn sets(&self) -> (String, String) {
        (nft_set(&self.from), nft_set(&self.ports))
    }
}

/// `{ a, b }`: `items` as an anonymous nft set.
fn nft_set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The NFLOG group the VM's refusals are logged to (groups belong to a namespace, so every
/// VM uses the same number).
pub const LOG_GROUP: u16 = 15;
/// The named limit all of a VM's log rules share: refusals logged at most, the rest only
/// counted.
pub const LOG_LIMIT: &str = "denials_logged";
/// [`LOG_LIMIT`]'s rate, as nft writes it.
pub const LOG_RATE: &str = "rate 10/second burst 64 packets";

/// A refusal of whatever matched `what`: logged to [`LOG_GROUP`] with `counter` as the prefix
/// (when `log`, within [`LOG_LIMIT`]), then TCP gets a reset, the rest ICMP administratively
/// prohibited; both count into `counter`.
///
/// The log is a rule of its own before the two rejects, not a statement in them: a `limit`
/// that is over its rate ends its rule, which would skip the reject too.
fn reject(out: &mut String, what: &str, counter: &str, log: bool) {
    if log {
        let _ = writeln!(
            out,
            "    {what} limit name \"{LOG_LIMIT}\" log prefix \"{counter}\" group {LOG_GROUP}"
        );
    }
    let _ = writeln!(
        out,
        "    {what} meta l4proto tcp counter name \"{counter}\" reject with tcp reset"
    );
    let _ = writeln!(
        out,
        "    {what} counter name \"{counter}\" reject with icmpx admin-prohibited"
    );
}

/// The ruleset of one VM's namespace (see the module doc). `host_addrs` are the host's own
/// IPv4 addresses when the rules are written. With `sni_port`, the guest's TCP connections to
/// port 443 of any address that is not never-allowed are redirected to that port on the
/// gateway, where the SNI check listens (it reads the original destination and splices only
/// allowed names to addresses the resolver gave out); input admits exactly those redirected
/// connections, not a direct one to that port.
///
/// Each refusal is also logged to [`LOG_GROUP`] (see the module doc);
/// [`vm_ruleset_counted_only`] is the same without the logs, for a kernel without
/// `nfnetlink_log`.
pub fn vm_ruleset(
    link: &VmLink,
    prefix: &OverlayPrefix,
    host_addrs: &[Ipv4Addr],
    sni_port: Option<u16>,
    ingress: &Ingress,
) -> String {
    ruleset(link, prefix, host_addrs, sni_port, ingress, true)
}

/// [`vm_ruleset`] whose refusals are counted but not logged.
pub fn vm_ruleset_counted_only(
    link: &VmLink,
    prefix: &OverlayPrefix,
    host_addrs: &[Ipv4Addr],
    sni_port: Option<u16>,
    ingress: &Ingress,
) -> String {
    ruleset(link, prefix, host_addrs, sni_port, ingress, false)
}

fn ruleset(
    link: &VmLink,
    prefix: &OverlayPrefix,
    host_addrs: &[Ipv4Addr],
    sni_port: Option<u16>,
    ingress: &Ingress,
    log: bool,
) -> String {
    let reject = |out: &mut String, what: &str, counter: &str| reject(out, what, counter, log);
    let tap = TAP_NAME;
    let mut out = String::new();
    let _ = writeln!(out, "add table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    for c in COUNTERS {
        let _ = writeln!(out, "  counter {c} {{ }}");
    }
    if log {
        let _ = writeln!(out, "  limit {LOG_LIMIT} {{ {LOG_RATE} }}");
    }
    let _ = writeln!(
        out,
        "  set {ALLOWED_SET} {{\n    type ipv4_addr . inet_service\n    flags timeout\n  }}"
    );
    let _ = writeln!(out, "  set {PEERS_SET} {{\n    type ipv4_addr\n  }}");
    let _ = writeln!(
        out,
        "  set host_addrs {{\n    type ipv4_addr\n    flags interval"
    );
    if !host_addrs.is_empty() {
        let list: Vec<String> = host_addrs.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(out, "    elements = {{ {} }}", list.join(", "));
    }
    let _ = writeln!(out, "  }}");
    let guest = link.guest;
    if let Some(port) = sni_port {
        let _ = writeln!(
            out,
            "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             iifname \"{tap}\" ip saddr {guest} ip daddr != {{ 127.0.0.0/8, 169.254.0.0/16, {prefix} }} \
             ip daddr != @host_addrs tcp dport 443 redirect to :{port}\n  }}"
        );
    }
    let _ = writeln!(
        out,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
    );
    let _ = writeln!(
        out,
        "    iifname \"{tap}\" ct state established,related accept"
    );
    let _ = writeln!(
        out,
        "    oifname \"{tap}\" ct state established,related accept"
    );
    let _ = writeln!(out, "    oifname \"{tap}\" ip saddr @{PEERS_SET} accept");
    if !ingress.is_empty() {
        let (from, ports) = ingress.sets();
        let _ = writeln!(
            out,
            "    oifname \"{tap}\" ip saddr {from} tcp dport {ports} accept"
        );
    }
    reject(&mut out, &format!("oifname \"{tap}\""), "deny_inbound");
    reject(
        &mut out,
        &format!("iifname \"{tap}\" meta nfproto ipv6"),
        "deny_ipv6",
    );
    reject(
        &mut out,
        &format!("iifname \"{tap}\" ip saddr != {}", link.guest),
        "deny_spoof",
    );
    reject(
        &mut out,
        &format!("iifname \"{tap}\" ip daddr 127.0.0.0/8"),
        "deny_loopback",
    );
    reject(
        &mut out,
        &format!("iifname \"{tap}\" ip daddr 169.254.0.0/16"),
        "deny_metadata",
    );
    reject(
        &mut out,
        &format!("iifname \"{tap}\" ip daddr @host_addrs"),
        "deny_host",
    );
    if !ingress.is_empty() {
        let (to, ports) = ingress.sets();
        let _ = writeln!(
            out,
            "    iifname \"{tap}\" ip saddr {guest} ip daddr {to} tcp sport {ports} accept"
        );
    }
    let _ = writeln!(out, "    iifname \"{tap}\" ip daddr @{PEERS_SET} accept");
    reject(
        &mut out,
        &format!("iifname \"{tap}\" ip daddr {prefix}"),
        "deny_overlay",
    );
    let _ = writeln!(
        out,
        "    iifname \"{tap}\" meta l4proto {{ tcp, udp }} ip daddr . th dport @{ALLOWED_SET} accept"
    );
    reject(&mut out, &format!("iifname \"{tap}\""), "deny_other");
    let _ = writeln!(out, "  }}");
    let _ = writeln!(
        out,
        "  chain input {{\n    type filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(
        out,
        "    iifname \"{tap}\" ct state established,related accept"
    );
    let gw = link.gateway;
    let _ = writeln!(
        out,
        "    iifname \"{tap}\" ip saddr {} ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept",
        link.guest
    );
    if let Some(port) = sni_port {
        let _ = writeln!(
            out,
            "    iifname \"{tap}\" ip saddr {guest} tcp dport {port} ct status dnat accept"
        );
    }
    reject(&mut out, &format!("iifname \"{tap}\""), "deny_input");
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

/// The host's table (see the module doc).
pub fn host_ruleset(prefix: &OverlayPrefix, underlay: Option<&Underlay>) -> String {
    let veths = format!("{HOST_VETH_PREFIX}*");
    let unmasked = underlay.map_or(String::new(), |u| {
        format!(
            "    ip saddr {prefix} oifname \"{}\" ip daddr {} accept\n",
            u.iface(),
            nft_set(u.networks())
        )
    });
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \x20 counter deny_host_input {{ }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         {unmasked}\
         \x20   ip saddr {prefix} oifname != \"{veths}\" masquerade\n\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{veths}\" ct state established,related accept\n\
         \x20   iifname \"{veths}\" meta l4proto tcp counter name \"deny_host_input\" reject with tcp reset\n\
         \x20   iifname \"{veths}\" counter name \"deny_host_input\" reject with icmp type admin-prohibited\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Runs `nft ARGS` in `ns` (the host's namespace when `None`), `stdin` as its input.
fn nft(ns: Option<&VmNetns>, args: &[&str], stdin: Option<&str>) -> Result<Vec<u8>, FirewallError> {
    let (mut cmd, _keep) = match ns {
        Some(ns) => {
            let (cmd, file) = ns.command("nft").map_err(FirewallError::Netns)?;
            (cmd, Some(file))
        }
        None => (Command::new("nft"), None),
    };
    cmd.args(args);
    super::run_tool(cmd, stdin.map(str::as_bytes)).map_err(FirewallError::Nft)
}

/// The host's own IPv4 addresses (`ip -j -4 addr show`), loopback included.
pub fn host_addresses() -> Result<Vec<Ipv4Addr>, FirewallError> {
    #[derive(serde::Deserialize)]
    struct Iface {
        #[serde(default)]
        addr_info: Vec<AddrInfo>,
    }
    #[derive(serde::Deserialize)]
    struct AddrInfo {
        #[serde(default)]
        local: Option<String>,
    }
    let mut cmd = Command::new("ip");
    cmd.args(["-j", "-4", "addr", "show"]);
    let out = super::run_tool(cmd, None).map_err(FirewallError::Nft)?;
    let ifaces: Vec<Iface> =
        serde_json::from_slice(&out).map_err(|e| FirewallError::Parse("ip -j addr", e))?;
    let mut addrs: Vec<Ipv4Addr> = ifaces
        .iter()
        .flat_map(|i| &i.addr_info)
        .filter_map(|a| a.local.as_deref()?.parse().ok())
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    Ok(addrs)
}

/// Loads the VM's ruleset into its namespace ([`vm_ruleset`], with the host's addresses now).
/// Loading it again (with an `sni_port` once the SNI check listens) replaces it, but empties
/// the `allowed` set. A kernel that refuses the log rules (no `nfnetlink_log`) gets
/// [`vm_ruleset_counted_only`], with a warning: its refusals are counted, not logged.
pub fn install(
    ns: &VmNetns,
    link: &VmLink,
    prefix: &OverlayPrefix,
    sni_port: Option<u16>,
    ingress: &Ingress,
) -> Result<(), FirewallError> {
    let host = host_addresses()?;
    let logged = nft(
        Some(ns),
        &["-f", "-"],
        Some(&vm_ruleset(link, prefix, &host, sni_port, ingress)),
    );
    match logged {
        Ok(_) => Ok(()),
        Err(FirewallError::Nft(e)) => {
            let counted = nft(
                Some(ns),
                &["-f", "-"],
                Some(&vm_ruleset_counted_only(
                    link, prefix, &host, sni_port, ingress,
                )),
            )?;
            drop(counted);
            tracing::warn!(error = %crate::error_chain(&e), "firewall: the kernel refused the log rules; refusals are counted but not audited one by one");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Loads the host's table ([`host_ruleset`]); loading it again replaces it.
pub fn install_host(
    prefix: &OverlayPrefix,
    underlay: Option<&Underlay>,
) -> Result<(), FirewallError> {
    nft(None, &["-f", "-"], Some(&host_ruleset(prefix, underlay))).map(drop)
}

/// The `nft` commands that (re)add `addr . port` to [`ALLOWED_SET`] with timeout `ttl`: added,
/// deleted and added again in one transaction, so an element already there gets the new
/// timeout instead of keeping its old one.
pub fn allow_commands(addr: Ipv4Addr, port: u16, ttl: Duration) -> Result<String, FirewallError> {
    if ttl.is_zero() || ttl > MAX_TTL || ttl.as_millis() == 0 {
        return Err(FirewallError::BadTtl(ttl));
    }
    let ms = ttl.as_millis();
    let set = format!("inet {TABLE} {ALLOWED_SET}");
    Ok(format!(
        "add element {set} {{ {addr} . {port} timeout {ms}ms }}\n\
         delete element {set} {{ {addr} . {port} }}\n\
         add element {set} {{ {addr} . {port} timeout {ms}ms }}\n"
    ))
}

/// Lets the VM of `ns` open connections (TCP or UDP) to `addr:port` for `ttl` (the resolver
/// calls this for each address it answered with; a later call sets a new timeout).
pub fn allow(ns: &VmNetns, addr: Ipv4Addr, port: u16, ttl: Duration) -> Result<(), FirewallError> {
    allow_all(ns, &[(addr, port)], ttl)
}

/// [`allow`] for several destinations in one `nft` run and one transaction (each run costs a
/// process: about 18 ms on a small shared host, so an answer with many addresses should come
/// here once).
pub fn allow_all(
    ns: &VmNetns,
    dests: &[(Ipv4Addr, u16)],
    ttl: Duration,
) -> Result<(), FirewallError> {
    if dests.is_empty() {
        return Ok(());
    }
    let mut cmds = String::new();
    for (addr, port) in dests {
        cmds.push_str(&allow_commands(*addr, *port, ttl)?);
    }
    nft(Some(ns), &["-f", "-"], Some(&cmds)).map(drop)
}

/// Lets the VM of `ns` reach, and be reached by, the guest at `addr` (another VM whose profile
/// and this one's name each other), or (`add` false) no longer.
pub fn set_peer(ns: &VmNetns, addr: Ipv4Addr, add: bool) -> Result<(), FirewallError> {
    let set = format!("inet {TABLE} {PEERS_SET}");
    // Adding what is there, or deleting what is not, must not fail: add first either way.
    let mut cmds = format!("add element {set} {{ {addr} }}\n");
    if !add {
        cmds.push_str(&format!("delete element {set} {{ {addr} }}\n"));
    }
    nft(Some(ns), &["-f", "-"], Some(&cmds)).map(drop)
}

/// One named counter's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// Reads `nft -j list counters` output: the counters of table [`TABLE`], by name.
pub fn parse_counters(json: &[u8]) -> Result<BTreeMap<String, Counter>, FirewallError> {
    #[derive(serde::Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Named {
        name: String,
        table: String,
        packets: u64,
        bytes: u64,
    }
    let listing: Listing = serde_json::from_slice(json)
        .map_err(|e| FirewallError::Parse("nft -j list counters", e))?;
    let mut out = BTreeMap::new();
    for item in listing.nftables {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let c: Named = serde_json::from_value(c.clone())
            .map_err(|e| FirewallError::Parse("nft -j list counters", e))?;
        if c.table == TABLE {
            out.insert(
                c.name,
                Counter {
                    packets: c.packets,
                    bytes: c.bytes,
                },
            );
        }
    }
    Ok(out)
}

/// The refusal counters of the VM of `ns` (for `nanoclaw inspect`).
pub fn counters(ns: &VmNetns) -> Result<BTreeMap<String, Counter>, FirewallError> {
    let out = nft(
        Some(ns),
        &["-j", "list", "counters", "table", "inet", TABLE],
        None,
    )?;
    parse_counters(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> VmLink {
        VmLink {
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            guest: Ipv4Addr::new(10, 200, 0, 2),
            host_end: Ipv4Addr::new(10, 200, 0, 5),
            netns_end: Ipv4Addr::new(10, 200, 0, 6),
        }
    }

    fn ruleset() -> String {
        let prefix: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        vm_ruleset(
            &link(),
            &prefix,
            &[Ipv4Addr::new(192, 0, 2, 7)],
            None,
            &Ingress::default(),
        )
    }

    fn rules(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).collect()
    }

    #[test]
    fn every_refusal_is_counted_and_never_a_silent_drop() {
        let text = ruleset();
        let mut used = std::collections::BTreeSet::new();
        for rule in rules(&text) {
            assert!(!rule.split_whitespace().any(|w| w == "drop"), "{rule}");
            if rule.contains("reject") {
                let name = rule
                    .split("counter name \"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_else(|| panic!("uncounted: {rule}"));
                assert!(COUNTERS.contains(&name), "{rule}");
                assert!(
                    rule.ends_with("reject with tcp reset") && rule.contains("l4proto tcp")
                        || rule.ends_with("reject with icmpx admin-prohibited"),
                    "{rule}"
                );
                used.insert(name);
            }
        }
        // Every counter is declared and used.
        for c in COUNTERS {
            assert!(text.contains(&format!("counter {c} {{ }}")), "{c}");
            assert!(used.contains(c), "{c} is never used");
        }
        // Each refusal gives TCP a reset first, then everything else an ICMP error.
        for c in COUNTERS {
            let lines: Vec<&str> = rules(&text)
                .into_iter()
                .filter(|r| r.contains(&format!("name \"{c}\"")))
                .collect();
            assert_eq!(lines.len(), 2, "{c}");
            assert!(lines[0].ends_with("tcp reset") && lines[1].ends_with("admin-prohibited"));
        }
    }

    #[test]
    fn every_refusal_is_logged_first_with_its_rule_name_within_one_limit() {
        let text = ruleset();
        assert!(text.contains(&format!("  limit {LOG_LIMIT} {{ {LOG_RATE} }}\n")));
        let lines = rules(&text);
        let mut logged = std::collections::BTreeSet::new();
        for (i, rule) in lines.iter().enumerate() {
            if rule.contains("reject with icmpx") {
                // The second reject of a pair follows the first.
                assert!(lines[i - 1].ends_with("reject with tcp reset"), "{rule}");
            }
            let Some((what, counted)) = rule.split_once(" meta l4proto tcp counter name \"") else {
                continue;
            };
            // The first reject of a pair: the log sits right before it, with the same match.
            let name = counted.split('"').next().unwrap();
            assert_eq!(
                lines[i - 1],
                format!(
                    "{what} limit name \"{LOG_LIMIT}\" log prefix \"{name}\" group {LOG_GROUP}"
                ),
                "the log before {rule}"
            );
            logged.insert(name);
        }
        assert_eq!(logged.len(), COUNTERS.len(), "{logged:?}");
        // Every log rule is one of those, and none ends its rule with a verdict.
        let logs: Vec<&&str> = lines.iter().filter(|r| r.contains(" log ")).collect();
        assert_eq!(logs.len(), COUNTERS.len());
        assert!(
            logs.iter()
                .all(|r| r.ends_with(&format!("group {LOG_GROUP}")))
        );

        // Without the logs: the same rules otherwise.
        let prefix: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let counted = vm_ruleset_counted_only(
            &link(),
            &prefix,
            &[Ipv4Addr::new(192, 0, 2, 7)],
            None,
            &Ingress::default(),
        );
        assert!(!counted.contains(" log ") && !counted.contains("limit"));
        let stripped: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|r| !r.contains(" log ") && !r.starts_with("limit "))
            .collect();
        assert_eq!(stripped, rules(&counted));
    }

    #[test]
    fn the_never_allowed_come_before_the_set_and_the_catch_all_after() {
        let text = ruleset();
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("`{needle}` missing"))
        };
        let set = at("@allowed accept");
        for never in [
            "meta nfproto ipv6",
            "ip saddr != 10.200.0.2",
            "ip daddr 127.0.0.0/8",
            "ip daddr 169.254.0.0/16",
            "ip daddr @host_addrs",
            "ip daddr 10.200.0.0/16",
        ] {
            assert!(at(never) < set, "{never} after the set");
        }
        assert!(at("ct state established,related accept") < at("meta nfproto ipv6"));
        assert!(set < at("name \"deny_other\""));
        assert!(text.contains("elements = { 192.0.2.7 }"));
        // The set holds address . port with timeouts, matched on TCP and UDP.
        assert!(text.contains("type ipv4_addr . inet_service\n    flags timeout"));
        assert!(text.contains("meta l4proto { tcp, udp } ip daddr . th dport @allowed accept"));
    }

    #[test]
    fn ingress_admits_its_ports_from_the_underlay_only_and_answers_only_there() {
        let prefix: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let none = vm_ruleset(&link(), &prefix, &[], None, &Ingress::default());
        assert!(!none.contains("sport") && !none.contains("dport { "));
        // Ports without an underlay, or an underlay without ports: nothing opens.
        assert!(Ingress::new(None, &[7000]).is_empty());
        let ingress = Ingress {
            from: vec!["192.0.2.0/24".into()],
            ports: vec![7000, 7001],
        };
        let text = vm_ruleset(&link(), &prefix, &[], None, &ingress);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("`{needle}` missing in\n{text}"))
        };
        let inbound =
            at("oifname \"tap0\" ip saddr { 192.0.2.0/24 } tcp dport { 7000, 7001 } accept");
        assert!(inbound < at("name \"deny_inbound\""));
        // The guest's answers: from those ports, to those networks, after the never-allowed.
        let answers = at(
            "iifname \"tap0\" ip saddr 10.200.0.2 ip daddr { 192.0.2.0/24 } tcp sport { 7000, 7001 } accept",
        );
        for never in [
            "ip saddr != 10.200.0.2",
            "ip daddr 127.0.0.0/8",
            "ip daddr 169.254.0.0/16",
            "ip daddr @host_addrs",
        ] {
            assert!(at(never) < answers, "{never} after the answers");
        }
        assert!(answers < at("name \"deny_other\""));
    }

    #[test]
    fn peers_pass_after_the_host_and_before_the_overlay_refusal_both_ways() {
        let text = ruleset();
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("`{needle}` missing"))
        };
        let out = at("iifname \"tap0\" ip daddr @peers accept");
        assert!(at("ip daddr @host_addrs") < out);
        assert!(at("ip daddr 169.254.0.0/16") < out);
        assert!(out < at("ip daddr 10.200.0.0/16"));
        let inbound = at("oifname \"tap0\" ip saddr @peers accept");
        assert!(inbound < at("name \"deny_inbound\""));
        assert!(text.contains("set peers {\n    type ipv4_addr\n  }"));
    }

    #[test]
    fn input_admits_only_dns_to_the_gateway() {
        let text = ruleset();
        let input = &text[text.find("chain input").unwrap()..];
        let accepts: Vec<&str> = rules(input)
            .into_iter()
            .filter(|r| r.ends_with("accept") && !r.contains("policy"))
            .collect();
        assert_eq!(
            accepts,
            [
                "iifname \"tap0\" ct state established,related accept",
                "iifname \"tap0\" ip saddr 10.200.0.2 ip daddr 10.200.0.1 meta l4proto { tcp, udp } th dport 53 accept"
            ]
        );
        assert!(input.contains("name \"deny_input\" reject with icmpx admin-prohibited"));
    }

    #[test]
    fn no_host_addresses_leave_an_empty_set_and_loading_twice_replaces() {
        let prefix: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let text = vm_ruleset(&link(), &prefix, &[], None, &Ingress::default());
        assert!(!text.contains("elements"));
        let first: Vec<&str> = text.lines().take(3).collect();
        assert_eq!(
            first,
            [
                "add table inet nanoclaw",
                "delete table inet nanoclaw",
                "table inet nanoclaw {"
            ]
        );
        let host = host_ruleset(&prefix, None);
        assert!(host.contains("ip saddr 10.200.0.0/16 oifname != \"nc-*\" masquerade"));
        assert!(host.starts_with("add table ip nanoclaw\ndelete table ip nanoclaw\n"));
        assert!(!host.split_whitespace().any(|w| w == "drop"));
    }

    #[test]
    fn the_sni_redirect_spares_the_never_allowed_and_input_takes_only_redirected() {
        let prefix: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        assert!(!ruleset().contains("redirect"));
        let text = vm_ruleset(&link(), &prefix, &[], Some(8443), &Ingress::default());
        let redirect: Vec<&str> = rules(&text)
            .into_iter()
            .filter(|r| r.contains("redirect"))
            .collect();
        assert_eq!(redirect.len(), 1, "{text}");
        let r = redirect[0];
        assert!(
            r.starts_with("iifname \"tap0\" ip saddr 10.200.0.2 "),
            "{r}"
        );
        for never in [
            "127.0.0.0/8",
            "169.254.0.0/16",
            "10.200.0.0/16",
            "!= @host_addrs",
        ] {
            assert!(r.contains(never), "{never}: {r}");
        }
        assert!(r.ends_with("tcp dport 443 redirect to :8443"), "{r}");
        let input = &text[text.find("chain input").unwrap()..];
        assert!(
            input.contains(
                "iifname \"tap0\" ip saddr 10.200.0.2 tcp dport 8443 ct status dnat accept"
            )
        );
        assert!(input.find("ct status dnat accept").unwrap() < input.find("deny_input").unwrap());
    }

    #[test]
    fn allow_refreshes_the_timeout_and_refuses_odd_ttls() {
        let cmds = allow_commands(
            Ipv4Addr::new(151, 101, 0, 223),
            443,
            Duration::from_secs(300),
        )
        .unwrap();
        let lines: Vec<&str> = cmds.lines().collect();
        assert_eq!(
            lines,
            [
                "add element inet nanoclaw allowed { 151.101.0.223 . 443 timeout 300000ms }",
                "delete element inet nanoclaw allowed { 151.101.0.223 . 443 }",
                "add element inet nanoclaw allowed { 151.101.0.223 . 443 timeout 300000ms }",
            ]
        );
        for bad in [
            Duration::ZERO,
            Duration::from_micros(10),
            MAX_TTL + Duration::from_secs(1),
        ] {
            assert!(matches!(
                allow_commands(Ipv4Addr::LOCALHOST, 1, bad),
                Err(FirewallError::BadTtl(_))
            ));
        }
    }

    #[test]
    fn counters_parse_from_nft_json_and_other_tables_are_skipped() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "deny_other", "table": "nanoclaw", "handle": 3, "packets": 4, "bytes": 240}},
            {"counter": {"family": "inet", "name": "x", "table": "other", "handle": 1, "packets": 9, "bytes": 9}}]}"#;
        let got = parse_counters(json).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got["deny_other"],
            Counter {
                packets: 4,
                bytes: 240
            }
        );
        assert!(matches!(
            parse_counters(b"{\"nftables\": 3}"),
            Err(FirewallError::Parse(..))
        ));
        assert!(matches!(
            parse_counters(br#"{"nftables": [{"counter": {"name": 1}}]}"#),
            Err(FirewallError::Parse(..))
        ));
    }
}
