//! The device's tokenization reports (kinds and counts only), which go to the daemon's audit
//! log.

use std::sync::Arc;

use shared_proto::credential::{self, DeviceToHost};

use super::Relay;

impl Relay {
    /// Sets the audit log the device's tokenization reports go to (default: none, they are
    /// logged at debug only).
    pub fn set_audit(&self, audit: Arc<nanoclaw_audit::AuditLog>) {
        *self.audit.lock().unwrap_or_else(|p| p.into_inner()) = Some(audit);
    }

    /// Records a device's tokenization report (kinds and counts only).
    pub(super) fn record_tokenized(&self, report: DeviceToHost) {
        let DeviceToHost::Tokenized {
            vm_id,
            target_host,
            part,
            enforce,
            counts,
            unscanned,
        } = report
        else {
            return;
        };
        let audit = self.audit.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(audit) = audit else {
            tracing::debug!(%vm_id, %target_host, ?part, "tokenization report (no audit log)");
            return;
        };
        let part = match part {
            credential::BodyPart::RequestTokenized => "request_tokenized",
            credential::BodyPart::RequestRestored => "request_restored",
            credential::BodyPart::Response => "response",
        };
        let data = serde_json::json!({
            "path": "credential",
            "vm_id": vm_id,
            "target_host": target_host,
            "direction": part,
            "mode": if enforce { "enforce" } else { "monitor" },
            "counts": {
                "cards": counts.cards,
                "ssns": counts.ssns,
                "emails": counts.emails,
                "api_keys": counts.api_keys,
                "skipped": counts.skipped,
            },
            "unscanned": unscanned,
        });
        if let Err(e) = audit.append("tokenize", data) {
            tracing::error!(error = %crate::error_chain(&e), "audit: a device tokenization report");
        }
    }
}
