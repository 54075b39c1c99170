//! Approvals: sensitive actions wait for the user's passkey.
//!
//! When a profile says a call needs approval (a destructive tool, elevated permissions, a new
//! external service, a credential from the vault), or a spawn or grant exceeds the caller's
//! rights, the caller builds an [`ApprovalSubject`] and asks an [`Approver`]. The action runs
//! only on [`ApprovalOutcome::Approved`]; anything else, including no answer before the
//! deadline, means no action.
//!
//! # Layout
//! - this file: the subject of an approval, the outcome, the [`Approver`] trait and
//!   [`DenyAll`], the approver used until passkey approvals are configured.
//! - [`passkey`]: [`passkey::PasskeyApprover`], the real approver: pending requests, one
//!   approval per request, expiry, registered passkeys and the audit records.
//! - [`server`]: the registration and approval pages (`pages/`) and their JSON API (axum).
//! - The canonical request encoding and the WebAuthn verifier are in
//!   [`shared_proto::approval`], so that vault-device runs the same checks.

pub mod passkey;
pub mod server;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// What is to be approved, as the user must see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalSubject {
    /// The agent asking (its VM's agent name or id).
    pub agent: String,
    /// The VM it runs in.
    pub vm_id: String,
    /// The agent's profile name.
    pub profile: String,
    /// The action.
    pub action: ApprovalAction,
    /// The full arguments, exactly as they will be used.
    pub arguments: serde_json::Value,
    /// The rule that asked for approval.
    pub rule: String,
    /// Why, in words for the user.
    pub reason: String,
}

/// The kinds of action that can need approval: the action of the canonical request the
/// passkey signs, so what the caller asks for is exactly what the user sees.
pub use shared_proto::approval::RequestAction as ApprovalAction;

/// How an approval ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ApprovalOutcome {
    /// The user approved with a verified passkey assertion over this exact request.
    Approved {
        /// The approval's id (in the audit log).
        approval_id: String,
    },
    /// Refused: by the user, or because approvals are not available.
    Denied {
        /// Why.
        reason: String,
    },
    /// No answer before the request expired.
    Expired,
}

impl ApprovalOutcome {
    /// Whether the action may run.
    pub fn is_approved(&self) -> bool {
        matches!(self, Self::Approved { .. })
    }
}

/// Asks the user. Implementations never approve on their own.
pub trait Approver: Send + Sync + std::fmt::Debug {
    /// Waits for the user's answer to `subject` (bounded by the approver's expiry).
    fn request(
        &self,
        subject: ApprovalSubject,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + '_>>;

    /// The evidence of an approval this approver gave (the canonical request and the
    /// assertion), once, for a third party that checks it itself (vault-device). `None` when
    /// the approver keeps none.
    fn take_evidence(&self, _approval_id: &str) -> Option<passkey::ApprovalEvidence> {
        None
    }
}

/// The approver when no passkey approvals are configured: every request is denied with
/// "requires approval".
#[derive(Debug, Clone, Copy, Default)]
pub struct DenyAll;

impl Approver for DenyAll {
    fn request(
        &self,
        subject: ApprovalSubject,
    ) -> Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + '_>> {
        Box::pin(async move {
            ApprovalOutcome::Denied {
                reason: format!(
                    "requires approval (rule {}): no passkey approvals are configured",
                    subject.rule
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deny_all_denies_with_requires_approval() {
        let subject = ApprovalSubject {
            agent: "a".into(),
            vm_id: "v".into(),
            profile: "worker".into(),
            action: ApprovalAction::ToolCall {
                server: "fs".into(),
                tool: "delete".into(),
            },
            arguments: serde_json::json!({"path": "/x"}),
            rule: "destructive".into(),
            reason: "deletes files".into(),
        };
        let out = DenyAll.request(subject).await;
        assert!(!out.is_approved());
        match out {
            ApprovalOutcome::Denied { reason } => {
                assert!(reason.starts_with("requires approval"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
