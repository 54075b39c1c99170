//! One networked VM's egress enforcement, running: the resolver ([`super::dns`]) and the SNI
//! check ([`super::sni`]) on the VM's gateway address inside its network namespace, and the
//! daemon's side of what they report.
//!
//! [`VmEgress::start`] binds three sockets inside the namespace, on the gateway address (the
//! guest's default route and its `resolv.conf` nameserver): UDP and TCP port 53 for the
//! resolver, and TCP [`SNI_PORT`], where the namespace's firewall redirects the guest's
//! port-443 connections ([`crate::net::firewall::vm_ruleset`]). It then serves them on the
//! daemon's runtime. What goes upstream (the resolver's queries, the SNI check's spliced
//! connections) leaves from the daemon's own namespace, so it never crosses the VM's rules.
//!
//! - **Grants.** Each address the resolver gives out is added to the namespace's `allowed` set,
//!   on the ports the rules allow for the name, before the answer goes out
//!   ([`super::dns::ApplyGrant`], [`crate::net::firewall::allow_all`]). So the guest never
//!   learns an address that its first packet to would be refused. A grant is written for
//!   twice the answer's time to live and not again while one is left (`Applied`), so
//!   repeated answers cost no `nft` run.
//! - **Denials.** A name no rule allows, and a port-443 connection the SNI check resets, each
//!   become an `egress_denied` record in the audit log: the VM, the name or address, the port,
//!   and the rule or reason. A guest can cause these as fast as it likes, so each VM has an
//!   audit budget ([`AUDIT_BURST`] records, then one per [`AUDIT_REFILL`]); the next record
//!   admitted carries how many were left out (`suppressed`). Refusals in the kernel (a raw
//!   address, the metadata address, the host, another port, inbound) are counted by the
//!   firewall's named counters, which `nanoclaw inspect` shows beside the resolver's and the
//!   SNI check's, and logged to NFLOG within a kernel rate limit; the daemon reads that log
//!   in the VM's namespace ([`super::firewall_log`]) into `egress_denied` records with
//!   `by = "firewall"`, within the same audit budget. Without NFLOG (an older kernel) the VM
//!   keeps its counters only, with one warning.
//! - **Life.** Dropping the [`VmEgress`] stops its servers; the sockets close with them. The
//!   daemon drops it when the VM ends, and starts a new one when it re-attaches to a running
//!   VM after a restart (the `allowed` set then still holds the earlier grants).
//! - **Grants across a restart.** With a state folder, the SNI check's table of addresses
//!   given out is kept in a file there ([`super::saved`]): written when the table gains a
//!   grant (at most once per [`SAVE_GAP`]) and every [`SAVE_EVERY`] if a grant was only
//!   lengthened, and read back when a new [`VmEgress`] starts over the same folder. So a
//!   restarted daemon does not reset connections to addresses the guest resolved before.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nanoclaw_audit::AuditLog;
use serde_json::json;
use tokio::task::JoinHandle;

use super::dns::ApplyGrant;
use super::firewall_log::{FirewallLog, Received};
use super::nflog::FirewallDenial;
use super::saved::SavedGrants;
use super::table::GrantTable;
use super::{
    EgressEvent, EgressPolicy, Resolver, ResolverCounters, RuleError, SniCounters, SniGate,
};
use crate::daemon::ratelimit::TokenBucket;
use crate::net::addr::VmLink;
use crate::net::firewall;
use crate::net::netns::{NetnsError, VmNetns};

/// The SNI check's port on the gateway, inside the VM's namespace.
pub const SNI_PORT: u16 = 4443;
/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// Denial records a VM may cause at once.
pub const AUDIT_BURST: u32 = 64;
/// How often one more denial record is allowed after the burst.
pub const AUDIT_REFILL: Duration = Duration::from_secs(1);
/// Events waiting for the daemon at most (grants wait for room; the rest are dropped).
const EVENT_QUEUE: usize = 256;
/// The shortest time between two writes of the saved grants.
pub const SAVE_GAP: Duration = Duration::from_secs(1);
/// How often the saved grants are written when grants were only lengthened.
pub const SAVE_EVERY: Duration = Duration::from_secs(300);

/// Why a VM's egress enforcement could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressStartError {
    /// The profile's `egress` entries do not parse.
    #[error("the VM's egress rules")]
    Rules(#[source] RuleError),
    /// The VM's namespace could not be entered.
    #[error("the VM's network namespace")]
    Netns(#[source] NetnsError),
    /// A socket could not be bound on the gateway address.
    #[error("cannot bind {what} on {addr} in the VM's namespace")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Where.
        addr: SocketAddrV4,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The counters `nanoclaw inspect` shows of a networked VM (the firewall's are read separately,
/// see [`firewall::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EgressCounters {
    /// The resolver's.
    pub dns: ResolverCounters,
    /// The SNI check's.
    pub sni: SniCounters,
    /// Denial records left out of the audit log by the VM's budget.
    pub audit_suppressed: u64,
    /// Times the kernel dropped firewall log messages the daemon had no room for.
    pub firewall_log_overruns: u64,
}

impl EgressCounters {
    /// The counters by name, as `nanoclaw inspect` shows them (`dns_*`, `sni_*`).
    pub fn by_name(&self) -> std::collections::BTreeMap<String, u64> {
        let (d, s) = (&self.dns, &self.sni);
        [
            ("dns_queries", d.queries),
            ("dns_forwarded", d.forwarded),
            ("dns_granted", d.granted),
            ("dns_refused", d.refused),
            ("dns_aaaa_empty", d.aaaa_empty),
            ("dns_malformed", d.malformed),
            ("dns_dropped", d.dropped),
            ("dns_upstream_failures", d.upstream_failures),
            ("dns_non_public", d.non_public),
            ("dns_apply_failures", d.apply_failures),
            ("sni_connections", s.connections),
            ("sni_allowed", s.allowed),
            ("sni_refused", s.refused),
            ("audit_suppressed", self.audit_suppressed),
            ("firewall_log_overruns", self.firewall_log_overruns),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// One VM's running egress enforcement (see the module doc).
#[derive(Debug)]
pub struct VmEgress {
    resolver: Resolver,
    gate: SniGate,
    audit_suppressed: Arc<Mutex<(TokenBucket, u64, u64)>>,
    log_overruns: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for VmEgress {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl VmEgress {
    /// Starts VM `vm`'s resolver and SNI check in `ns` on `link`'s gateway, for the profile's
    /// `egress` entries, forwarding allowed queries to `upstream` and recording denials in
    /// `audit`. With `state_dir` (the VM's folder), the grants saved there by an earlier
    /// [`VmEgress`] are restored, and this one's are saved there. Must run inside the daemon's
    /// Tokio runtime.
    pub fn start(
        vm: &str,
        ns: VmNetns,
        link: &VmLink,
        egress: &[String],
        upstream: SocketAddr,
        audit: Option<Arc<AuditLog>>,
        state_dir: Option<&Path>,
    ) -> Result<Self, EgressStartError> {
        let policy = Arc::new(EgressPolicy::parse(egress).map_err(EgressStartError::Rules)?);
        let gw = link.gateway;
        let bound = ns
            .run_in(move || bind_all(gw))
            .map_err(EgressStartError::Netns)??;
        let (udp, dns_tcp, sni) = on_runtime(gw, bound)?;
        let (events, mut received) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let apply_ns = ns.clone();
        // A guest can ask again and again: a failing `nft` is logged within a budget.
        let apply_log = Arc::new(Mutex::new(shared_proto::ratelimit::LogBudget::new()));
        let applied = Arc::new(Mutex::new(Applied::default()));
        let apply: ApplyGrant = Arc::new(move |addr: Ipv4Addr, ports: Vec<u16>, ttl: Duration| {
            let ns = apply_ns.clone();
            let log = Arc::clone(&apply_log);
            let applied = Arc::clone(&applied);
            Box::pin(async move {
                if lock(&applied).fresh(addr, &ports, ttl, Instant::now()) {
                    return true;
                }
                // Written for twice the answer's time to live (see `Applied`).
                let ttl = (ttl * 2).min(firewall::MAX_TTL);
                let dests: Vec<(Ipv4Addr, u16)> = ports.iter().map(|p| (addr, *p)).collect();
                let done =
                    tokio::task::spawn_blocking(move || firewall::allow_all(&ns, &dests, ttl))
                        .await;
                match done {
                    Ok(Ok(())) => {
                        lock(&applied).record(addr, ports, ttl, Instant::now());
                        true
                    }
                    Ok(Err(e)) => {
                        super::guest_log(&log, |suppressed| {
                            tracing::warn!(error = %crate::error_chain(&e), %addr, suppressed, "egress: cannot open the firewall to a granted address");
                        });
                        false
                    }
                    Err(_) => false,
                }
            })
        });
        let resolver = Resolver::with_apply(Arc::clone(&policy), upstream, events.clone(), apply);
        let gate = SniGate::new(policy, resolver.table(), events);
        let audit_suppressed = Arc::new(Mutex::new((
            TokenBucket::new(AUDIT_BURST, AUDIT_REFILL),
            0u64,
            0u64,
        )));
        let mut tasks = Vec::new();
        if let Some(dir) = state_dir {
            let saved = SavedGrants::in_dir(dir);
            let table = resolver.table();
            let restored = saved.restore(&table, Instant::now(), SystemTime::now());
            if restored > 0 {
                tracing::info!(
                    vm,
                    restored,
                    "egress: grants from before the restart restored"
                );
            }
            tasks.push(tokio::spawn(keep_saved(table, saved)));
        }
        let log_overruns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        match FirewallLog::open(&ns) {
            Ok(log) => tasks.push(tokio::spawn(read_firewall_log(
                vm.to_owned(),
                log,
                audit.clone(),
                Arc::clone(&audit_suppressed),
                Arc::clone(&log_overruns),
            ))),
            Err(e) => {
                tracing::warn!(vm, error = %crate::error_chain(&e), "egress: the firewall's refusals are counted but not audited one by one");
            }
        }
        let vm_id = vm.to_owned();
        let r = resolver.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = r.serve_udp(udp).await {
                tracing::warn!(error = %crate::error_chain(&e), "egress: the resolver (UDP) stopped");
            }
        }));
        let r = resolver.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = r.serve_tcp(dns_tcp).await {
                tracing::warn!(error = %crate::error_chain(&e), "egress: the resolver (TCP) stopped");
            }
        }));
        let g = gate.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = g.serve(sni).await {
                tracing::warn!(error = %crate::error_chain(&e), "egress: the SNI check stopped");
            }
        }));
        let budget = Arc::clone(&audit_suppressed);
        tasks.push(tokio::spawn(async move {
            while let Some(event) = received.recv().await {
                if let Some(record) = denial_record(&vm_id, &event) {
                    audit_denial(audit.as_deref(), &budget, record).await;
                }
            }
        }));
        tracing::info!(vm, gateway = %gw, sni_port = SNI_PORT, "egress enforcement started");
        Ok(Self {
            resolver,
            gate,
            audit_suppressed,
            log_overruns,
            tasks,
        })
    }

    /// The resolver's and the SNI check's counters so far.
    pub fn counters(&self) -> EgressCounters {
        let suppressed = lock(&self.audit_suppressed).2;
        EgressCounters {
            dns: self.resolver.counters(),
            sni: self.gate.counters(),
            audit_suppressed: suppressed,
            firewall_log_overruns: self.log_overruns.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Writes `table` to `saved` whenever it gains a grant (at most once per [`SAVE_GAP`]) and
/// every [`SAVE_EVERY`] when it changed otherwise; runs until aborted. A failed write is
/// logged within a budget (the guest decides how often the table gains) and tried again at the
/// next turn.
async fn keep_saved(table: GrantTable, saved: SavedGrants) {
    let log = Mutex::new(shared_proto::ratelimit::LogBudget::new());
    loop {
        tokio::select! {
            () = table.gained() => {}
            () = tokio::time::sleep(SAVE_EVERY) => {}
        }
        if table.take_dirty() {
            let entries = table.entries_at(Instant::now());
            let file = saved.clone();
            let written = tokio::task::spawn_blocking(move || {
                file.write(&entries, Instant::now(), SystemTime::now())
            })
            .await;
            let failed = match written {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(crate::error_chain(&e)),
                Err(e) => Some(e.to_string()),
            };
            if let Some(error) = failed {
                table.mark_dirty();
                super::guest_log(&log, |suppressed| {
                    tracing::warn!(%error, suppressed, "egress: cannot save the grants");
                });
            }
        }
        tokio::time::sleep(SAVE_GAP).await;
    }
}

/// Reads VM `vm`'s firewall log until it fails or the VM's egress stops: each refusal becomes
/// an `egress_denied` record within the VM's audit `budget`. Messages that do not parse and
/// the kernel's overruns are counted, and logged within a budget (a guest decides how often
/// packets are refused).
async fn read_firewall_log(
    vm: String,
    log: FirewallLog,
    audit: Option<Arc<AuditLog>>,
    budget: Arc<Mutex<(TokenBucket, u64, u64)>>,
    overruns: Arc<std::sync::atomic::AtomicU64>,
) {
    let lines = Mutex::new(shared_proto::ratelimit::LogBudget::new());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match log.next(&mut buf).await {
            Ok(Received::Messages(messages)) => {
                let (found, bad) = super::firewall_log::denials(messages);
                if bad > 0 {
                    super::guest_log(&lines, |suppressed| {
                        tracing::warn!(
                            vm,
                            bad,
                            suppressed,
                            "egress: firewall log messages that do not parse"
                        );
                    });
                }
                for denial in &found {
                    audit_denial(audit.as_deref(), &budget, firewall_record(&vm, denial)).await;
                }
            }
            Ok(Received::Overrun) => {
                overruns.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                super::guest_log(&lines, |suppressed| {
                    tracing::warn!(
                        vm,
                        suppressed,
                        "egress: the firewall's log overran; those refusals are counted only"
                    );
                });
            }
            Err(e) => {
                tracing::warn!(vm, error = %crate::error_chain(&e), "egress: the firewall's log stopped; refusals are counted only");
                return;
            }
        }
    }
}

/// The audit record of a refusal the firewall logged.
fn firewall_record(vm: &str, d: &FirewallDenial) -> serde_json::Value {
    json!({
        "vm": vm,
        "by": "firewall",
        "rule": d.rule,
        "addr": d.dst.to_string(),
        "src": d.src.to_string(),
        "proto": d.proto_name(),
        "port": d.port,
    })
}

/// The DNS server the host itself uses: the first `nameserver` line of `resolv_conf`, port 53.
/// Without one (no file, or no such line), `127.0.0.1:53`, with a warning: queries then fail
/// (SERVFAIL) until `--egress-dns` names a server.
pub fn system_dns(resolv_conf: &std::path::Path) -> SocketAddr {
    let found = std::fs::read_to_string(resolv_conf)
        .ok()
        .and_then(|text| first_nameserver(&text));
    found.unwrap_or_else(|| {
        let fallback = SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT));
        tracing::warn!(file = %resolv_conf.display(), %fallback, "egress: no nameserver found; give one with --egress-dns");
        fallback
    })
}

fn first_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, DNS_PORT))
    })
}

/// The grants last written to the firewall, with when each runs out, so that an answer the
/// guest asks for again and again does not run `nft` each time. A grant is written for twice
/// the answer's time to live, and not written again while at least one time to live is left of
/// it: every answer given meanwhile is covered for as long as the guest may cache it. At most
/// [`APPLIED_MAX`] are remembered; past that the memory starts over (and grants are written
/// again).
#[derive(Debug, Default)]
struct Applied(std::collections::HashMap<(Ipv4Addr, Vec<u16>), Instant>);

/// Grants [`Applied`] remembers at most.
const APPLIED_MAX: usize = 4096;

impl Applied {
    /// Whether an answer with `ttl` for `addr` on `ports` is covered by what was written.
    fn fresh(&self, addr: Ipv4Addr, ports: &[u16], ttl: Duration, now: Instant) -> bool {
        self.0
            .get(&(addr, ports.to_vec()))
            .is_some_and(|until| *until >= now + ttl)
    }

    /// Notes that `addr` on `ports` was written with timeout `written` at `now`.
    fn record(&mut self, addr: Ipv4Addr, ports: Vec<u16>, written: Duration, now: Instant) {
        if self.0.len() >= APPLIED_MAX {
            self.0.clear();
        }
        self.0.insert((addr, ports), now + written);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Bound = (
    std::net::UdpSocket,
    std::net::TcpListener,
    std::net::TcpListener,
);

/// Binds the three sockets on `gw`, non-blocking (run on a thread inside the VM's namespace,
/// which has no Tokio runtime: the caller makes the Tokio types).
fn bind_all(gw: Ipv4Addr) -> Result<Bound, EgressStartError> {
    let bind_err = |what, port| {
        move |source| EgressStartError::Bind {
            what,
            addr: SocketAddrV4::new(gw, port),
            source,
        }
    };
    let udp = std::net::UdpSocket::bind((gw, DNS_PORT)).map_err(bind_err("DNS (UDP)", DNS_PORT))?;
    udp.set_nonblocking(true)
        .map_err(bind_err("DNS (UDP)", DNS_PORT))?;
    let tcp =
        std::net::TcpListener::bind((gw, DNS_PORT)).map_err(bind_err("DNS (TCP)", DNS_PORT))?;
    tcp.set_nonblocking(true)
        .map_err(bind_err("DNS (TCP)", DNS_PORT))?;
    let sni =
        std::net::TcpListener::bind((gw, SNI_PORT)).map_err(bind_err("the SNI check", SNI_PORT))?;
    sni.set_nonblocking(true)
        .map_err(bind_err("the SNI check", SNI_PORT))?;
    Ok((udp, tcp, sni))
}

/// The Tokio types of [`bind_all`]'s sockets (on the runtime).
fn on_runtime(
    gw: Ipv4Addr,
    (udp, tcp, sni): Bound,
) -> Result<
    (
        tokio::net::UdpSocket,
        tokio::net::TcpListener,
        tokio::net::TcpListener,
    ),
    EgressStartError,
> {
    let err = |what, port| {
        move |source| EgressStartError::Bind {
            what,
            addr: SocketAddrV4::new(gw, port),
            source,
        }
    };
    Ok((
        tokio::net::UdpSocket::from_std(udp).map_err(err("DNS (UDP)", DNS_PORT))?,
        tokio::net::TcpListener::from_std(tcp).map_err(err("DNS (TCP)", DNS_PORT))?,
        tokio::net::TcpListener::from_std(sni).map_err(err("the SNI check", SNI_PORT))?,
    ))
}

/// The audit record of a denial event (`None` for a grant or an allowed connection).
fn denial_record(vm: &str, event: &EgressEvent) -> Option<serde_json::Value> {
    match event {
        EgressEvent::Refused { name, rule } => Some(json!({
            "vm": vm,
            "by": "dns",
            "name": name,
            "rule": rule,
        })),
        EgressEvent::ConnectionRefused {
            sni,
            addr,
            port,
            reason,
        } => Some(json!({
            "vm": vm,
            "by": "sni",
            "name": sni,
            "addr": addr.map(|a| a.to_string()),
            "port": port,
            "rule": reason,
        })),
        EgressEvent::Granted { .. } | EgressEvent::Connected { .. } => None,
    }
}

/// Appends `record` as `egress_denied` within the VM's budget (`budget`: the bucket, the
/// count left out since the last admitted record, the count left out in all).
async fn audit_denial(
    audit: Option<&AuditLog>,
    budget: &Mutex<(TokenBucket, u64, u64)>,
    mut record: serde_json::Value,
) {
    let suppressed = {
        let mut b = lock(budget);
        if b.0.take(Instant::now()).is_err() {
            b.1 += 1;
            b.2 += 1;
            return;
        }
        std::mem::take(&mut b.1)
    };
    record["suppressed"] = json!(suppressed);
    let Some(audit) = audit else {
        tracing::info!(%record, "egress denied");
        return;
    };
    if let Err(e) = audit.submit("egress_denied", record).await {
        tracing::warn!(error = %e, "egress: cannot record a denial");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_written_again_only_when_an_answer_could_outlive_it() {
        let mut a = Applied::default();
        let (addr, now, ttl) = (
            Ipv4Addr::new(198, 51, 100, 2),
            Instant::now(),
            Duration::from_secs(60),
        );
        assert!(!a.fresh(addr, &[443], ttl, now));
        // Written for twice the time to live: answers within the first one are covered.
        a.record(addr, vec![443], ttl * 2, now);
        assert!(a.fresh(addr, &[443], ttl, now + Duration::from_secs(59)));
        assert!(!a.fresh(addr, &[443], ttl, now + Duration::from_secs(61)));
        // Other ports are another grant.
        assert!(!a.fresh(addr, &[443, 8443], ttl, now));
        for i in 0..APPLIED_MAX as u32 {
            a.record(Ipv4Addr::from(i), vec![1], ttl, now);
        }
        assert!(a.0.len() <= APPLIED_MAX);
    }

    #[test]
    fn the_system_resolver_is_the_first_nameserver_line() {
        let text = "# generated\nsearch example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(
            first_nameserver(text),
            Some("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver ::1\n"),
            Some("[::1]:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver bogus\noptions ndots:1\n"),
            None
        );
        let none = std::path::Path::new("/nonexistent/resolv.conf");
        assert_eq!(system_dns(none), "127.0.0.1:53".parse().unwrap());
    }

    #[test]
    fn refusals_become_records_and_grants_do_not() {
        let refused = EgressEvent::Refused {
            name: "other.test".into(),
            rule: "other.test not in egress allowlist".into(),
        };
        let r = denial_record("vm1", &refused).unwrap();
        assert_eq!(r["by"], "dns");
        assert_eq!(r["name"], "other.test");
        let reset = EgressEvent::ConnectionRefused {
            sni: "no SNI".into(),
            addr: Some(Ipv4Addr::new(198, 51, 100, 2)),
            port: 443,
            reason: "no server name".into(),
        };
        let r = denial_record("vm1", &reset).unwrap();
        assert_eq!(
            (r["addr"].as_str(), r["port"].as_u64()),
            (Some("198.51.100.2"), Some(443))
        );
        let granted = EgressEvent::Granted {
            name: "pkgs.test".into(),
            addr: Ipv4Addr::new(198, 51, 100, 2),
            ports: vec![443],
            ttl: Duration::from_secs(60),
        };
        assert!(denial_record("vm1", &granted).is_none());
    }

    #[test]
    fn a_firewall_refusal_becomes_a_record_naming_rule_address_protocol_and_port() {
        let d = FirewallDenial {
            rule: "deny_metadata".into(),
            src: Ipv4Addr::new(10, 200, 0, 2).into(),
            dst: Ipv4Addr::new(169, 254, 169, 254).into(),
            proto: 6,
            port: Some(80),
        };
        let r = firewall_record("vm1", &d);
        assert_eq!(
            r,
            json!({"vm": "vm1", "by": "firewall", "rule": "deny_metadata", "addr": "169.254.169.254",
                   "src": "10.200.0.2", "proto": "tcp", "port": 80})
        );
    }

    #[tokio::test]
    async fn a_flood_of_denials_is_cut_to_the_budget_and_the_next_record_says_how_many() {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(dir.path().join("audit.log")).unwrap();
        let budget = Mutex::new((TokenBucket::new(3, Duration::from_secs(3600)), 0, 0));
        for i in 0..10 {
            audit_denial(Some(&audit), &budget, json!({ "n": i })).await;
        }
        assert_eq!(audit.stats().records, 3);
        assert_eq!(lock(&budget).2, 7);
        // A fresh token: the next admitted record carries the seven left out.
        lock(&budget).0 = TokenBucket::new(1, Duration::from_secs(3600));
        audit_denial(Some(&audit), &budget, json!({ "n": 10 })).await;
        let text = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["record"]["data"]["suppressed"], 7, "{last}");
    }
}
