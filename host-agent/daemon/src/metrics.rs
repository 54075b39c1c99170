//! `GET /metrics`: the daemon's figures in the Prometheus text format (OpenMetrics), on the
//! local socket and, with a `read` token, on the remote API.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `nanoclaw_vms` | gauge, read at each scrape | `state`: each [`VmStatus`], and `paused` |
//! | `nanoclaw_boots_total` | counter: VMMs started | |
//! | `nanoclaw_boot_to_ready_seconds` | histogram: VMM start to the sidecar's first admitted hello | |
//! | `nanoclaw_gateway_decisions_total` | counter: MCP tool-call decisions | `result`: `allow`, `deny`, `needs_approval` |
//! | `nanoclaw_approvals_total` | counter: ended approval requests | `outcome`: `approved`, `denied`, `expired` |
//! | `nanoclaw_proxy_bytes_total` | counter: credential-proxy bytes relayed | `direction`: `to_device`, `from_device` |
//! | `nanoclaw_denials_total` | counter: refused actions | `kind`: `tool`, `spawn` |
//!
//! Every label takes one of a few fixed values, so no guest can grow the label sets. The
//! counters live for the daemon's process ([`global`]); the modules that see each event count it.

use std::sync::OnceLock;

use nanoclaw_api::VmStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label set of one fixed-value label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabel {
    /// The VM state.
    pub state: &'static str,
}

/// `result` of a gateway decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabel {
    /// `allow`, `deny` or `needs_approval`.
    pub result: &'static str,
}

/// `outcome` of an approval.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `approved`, `denied` or `expired`.
    pub outcome: &'static str,
}

/// `direction` of proxied bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_device` or `from_device`.
    pub direction: &'static str,
}

/// `kind` of a denial.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// `tool` or `spawn`.
    pub kind: &'static str,
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vms: Family<StateLabel, Gauge>,
    /// VMMs started.
    pub boots: Counter,
    /// VMM start to the sidecar's first admitted hello, in seconds.
    pub boot_to_ready: Histogram,
    /// MCP tool-call decisions by result.
    pub gateway_decisions: Family<ResultLabel, Counter>,
    /// Ended approval requests by outcome.
    pub approvals: Family<OutcomeLabel, Counter>,
    /// Credential-proxy bytes by direction.
    pub proxy_bytes: Family<DirectionLabel, Counter>,
    /// Refused actions by kind.
    pub denials: Family<KindLabel, Counter>,
}

/// Every VM state, as the `state` label spells it.
const STATES: [VmStatus; 7] = [
    VmStatus::Starting,
    VmStatus::Running,
    VmStatus::Stopping,
    VmStatus::Exited,
    VmStatus::Stopped,
    VmStatus::Failed,
    VmStatus::Lost,
];

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("nanoclaw");
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register("vms", "VMs the daemon knows, by state", vms.clone());
        let boots = Counter::default();
        registry.register("boots", "VMMs started", boots.clone());
        let boot_to_ready =
            Histogram::new([0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]);
        registry.register_with_unit(
            "boot_to_ready",
            "From starting the VMM to the sidecar's first admitted hello",
            prometheus_client::registry::Unit::Seconds,
            boot_to_ready.clone(),
        );
        let gateway_decisions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "gateway_decisions",
            "MCP tool-call decisions, by result",
            gateway_decisions.clone(),
        );
        let approvals = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "approvals",
            "Approval requests that ended, by outcome",
            approvals.clone(),
        );
        let proxy_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "proxy_bytes",
            "Credential-proxy bytes relayed between sidecars and the device",
            proxy_bytes.clone(),
        );
        let denials = Family::<KindLabel, Counter>::default();
        registry.register("denials", "Refused actions, by kind", denials.clone());
        Self {
            registry,
            vms,
            boots,
            boot_to_ready,
            gateway_decisions,
            approvals,
            proxy_bytes,
            denials,
        }
    }

    /// The text to serve: the VM gauges set from `vms` (each VM's status and whether it is
    /// paused), then every metric.
    pub fn render(&self, vms: impl IntoIterator<Item = (VmStatus, bool)>) -> String {
        let mut counts = [0i64; STATES.len()];
        let mut paused = 0i64;
        for (status, is_paused) in vms {
            if let Some(i) = STATES.iter().position(|s| *s == status) {
                counts[i] += 1;
            }
            paused += i64::from(is_paused);
        }
        for (state, count) in STATES.iter().zip(counts) {
            self.vms
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(count);
        }
        self.vms
            .get_or_create(&StateLabel { state: "paused" })
            .set(paused);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The daemon's metrics, made on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Counts one gateway decision of `kind` (`allow`, `deny`, `needs_approval`); a denial counts
/// as a `spawn` denial when the call was `spawn_agent`.
pub fn gateway_decision(kind: &str, spawn: bool) {
    let result = match kind {
        "allow" => "allow",
        "deny" => "deny",
        _ => "needs_approval",
    };
    let m = global();
    m.gateway_decisions
        .get_or_create(&ResultLabel { result })
        .inc();
    if result == "deny" {
        let kind = if spawn { "spawn" } else { "tool" };
        m.denials.get_or_create(&KindLabel { kind }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_holds_every_metric_and_the_vm_counts() {
        let m = Metrics::new();
        m.boots.inc();
        m.boot_to_ready.observe(0.7);
        m.proxy_bytes
            .get_or_create(&DirectionLabel {
                direction: "to_device",
            })
            .inc_by(42);
        let text = m.render([
            (VmStatus::Running, false),
            (VmStatus::Running, true),
            (VmStatus::Exited, false),
        ]);
        for line in [
            "nanoclaw_vms{state=\"running\"} 2",
            "nanoclaw_vms{state=\"exited\"} 1",
            "nanoclaw_vms{state=\"paused\"} 1",
            "nanoclaw_vms{state=\"lost\"} 0",
            "nanoclaw_boots_total 1",
            "nanoclaw_boot_to_ready_seconds_count 1",
            "nanoclaw_proxy_bytes_total{direction=\"to_device\"} 42",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
